"""The Celery baseline: the same agent loop agentq runs, as a Celery task.

One task = one agent session against the same OpenAI-compatible endpoint
(agentq-mockllm): system prompt + goal, the calculator offered as a tool,
each tool call run and its result appended, until the model answers
without tool calls or max_steps LLM calls were made. A 429 sleeps
Retry-After and retries; a 5xx or network error backs off and retries;
every retry loop is bounded.

Broker: RabbitMQ (py-amqp through kombu); results: the Postgres result
backend (SQLAlchemy + psycopg2). Settings come from the environment that
bench/lib.sh sets:

  BENCH_BROKER_URL   amqp://guest:guest@127.0.0.1:PORT//
  BENCH_RESULT_URL   postgresql://postgres@127.0.0.1:PORT/DB
  BENCH_LLM_URL      http://127.0.0.1:PORT/v1/chat/completions
  BENCH_HTTP_POOL    keep-alive connections kept per process (default 1000)
  BENCH_TRACK_STARTED  1: record the STARTED state (for the latency run)
  BENCH_READY_FILE   written once the worker is ready to consume
  BENCH_DB_POOL      1: keep result-backend connections pooled in a worker
                     that never forks (gevent); see below
  BENCH_PREFETCH_MULTIPLIER  worker_prefetch_multiplier (default 4, Celery's)
  BENCH_REJECT_ON_WORKER_LOST  1: task_reject_on_worker_lost (S6, the crash
                     runs): a task whose worker died goes back to the queue
  BENCH_SKIP_START_QOS  1: no second basic.qos at the consumer's start (S6;
                     see below)

Not the product: a fair, simple version of what a Celery user would write.
"""
import ast
import json
import operator
import os
import time

import requests
from requests.adapters import HTTPAdapter
from celery import Celery
from celery.signals import worker_ready

BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
RESULT = os.environ.get("BENCH_RESULT_URL", "postgresql://postgres@127.0.0.1:5432/celery")
LLM_URL = os.environ.get("BENCH_LLM_URL", "http://127.0.0.1:8080/v1/chat/completions")
HTTP_POOL = int(os.environ.get("BENCH_HTTP_POOL", "1000"))

app = Celery("agentq_bench", broker=BROKER, backend="db+" + RESULT)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # At-least-once like agentq: ack after the task ran and its result was
    # stored, not at delivery.
    task_acks_late=True,
    task_track_started=os.environ.get("BENCH_TRACK_STARTED") == "1",
    result_expires=None,
    # Messages each worker process reserves per pool slot (Celery's default
    # is 4; bench/run's S5_CELERY_PREFETCH sets it). In the gevent pool 1 is
    # slow here: with no message in reserve, a freed slot waits for the next
    # delivery after its ack (S5 took 2.1x as long as with 4).
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "4")),
    # S6 (bench/run s6) sets it: with acks_late, what Celery advises for
    # tasks that must survive their worker's death. It acts when a prefork
    # child dies under its parent (the message is requeued rather than
    # acked as failed); when a whole worker process dies (the gevent pool
    # S6 runs, SIGKILLed), its broker connection closes and RabbitMQ
    # requeues every unacked message anyway. Off elsewhere, so that the
    # other scenarios run as they did.
    task_reject_on_worker_lost=os.environ.get("BENCH_REJECT_ON_WORKER_LOST") == "1",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

# Celery's database backend pools its connections only in a process that
# forked (a prefork child); anywhere else (the gevent pool) it builds an
# engine with NullPool, i.e. a new Postgres connection for every result.
# The baseline runs at its best: in the gevent pool this marks the backend's
# session manager as forked so that it keeps a pool. (bench/lib.sh sets it
# for gevent only: a prefork parent must not hold connections its children
# would inherit.)
if os.environ.get("BENCH_DB_POOL") == "1":
    from celery.backends.database import DatabaseBackend
    DatabaseBackend.ResultSession.__defaults__[0].forked = True
    app.conf.database_engine_options = {"pool_size": 20, "max_overflow": 20}

# Celery 5.2's consumer loop for the gevent pool (synloop) sends the
# prefetch count a second time on its first turn (kombu's QoS starts with
# prev = None), and waits for the broker's qos-ok inside that call. A
# worker that starts with a backlog receives its whole prefetch before the
# qos-ok; each delivery beyond the pool's size is dispatched from inside
# that wait and blocks the loop at the pool's semaphore until a task ends,
# and the loop sends the acks that tasks leave it (task_acks_late: the
# consumer's pending operations) only when it gets back to its top. So
# nothing is acked until (prefetch - concurrency) tasks have started:
# 60 tasks, 9 s in S6, where a worker is SIGKILLed every 9 s. Every restart
# then re-ran the same 240 tasks, completed and never acked, and the crash
# run did 180 of 1,000 tasks in 900 s. The value was already set, on the
# same channel, by the Tasks bootstep: marking it sent skips only the
# repeat. S6 sets BENCH_SKIP_START_QOS=1 for Celery; the other scenarios
# start their workers before publishing, where the repeat costs nothing.
if os.environ.get("BENCH_SKIP_START_QOS") == "1":
    from celery import bootsteps

    class SkipStartQos(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, c):
            if c.qos is not None:
                c.qos.prev = c.qos.value

    app.steps["consumer"].add(SkipStartQos)

SYSTEM_PROMPT = ("You are a capable assistant. Use the tools when they help, "
                 "then answer concisely.")
TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": ("Evaluate an arithmetic expression and return the exact result. Supports "
                        "numbers (decimal or scientific, e.g. 1.5e3), + - * / % (remainder) ^ "
                        "(power) and parentheses."),
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string",
                                          "description": "The expression, e.g. \"(2 + 3) * 4^2 / 7\""}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}]

MAX_TRIES_PER_STEP = 20  # bounded: 429s and 5xx within one step
HTTP_TIMEOUT_S = 120

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.BitXor: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expr):
    """A small safe evaluator (no eval): numbers, + - * / % ^ and parentheses."""
    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.operand))
        raise ValueError("unsupported expression")
    if len(expr) > 1000:
        raise ValueError("expression too long")
    v = ev(ast.parse(expr, mode="eval"))
    return str(int(v)) if float(v).is_integer() else repr(v)


_session = None
_session_pid = None


def http():
    """One keep-alive pool per process (a forked child must not share its
    parent's sockets), sized for the greenlets of a gevent pool."""
    global _session, _session_pid
    if _session is None or _session_pid != os.getpid():
        s = requests.Session()
        s.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=HTTP_POOL, max_retries=0))
        _session, _session_pid = s, os.getpid()
    return _session


def llm_call(messages, model):
    """One LLM step: POST until a 200, sleeping Retry-After on 429."""
    body = {"model": model, "messages": messages, "tools": TOOLS, "tool_choice": "auto"}
    for attempt in range(MAX_TRIES_PER_STEP):
        try:
            r = http().post(LLM_URL, json=body, timeout=HTTP_TIMEOUT_S)
        except requests.RequestException:
            time.sleep(min(0.5 * 2 ** attempt, 10))
            continue
        if r.status_code == 429:
            time.sleep(float(r.headers.get("Retry-After") or 1))
            continue
        if r.status_code >= 500:
            time.sleep(min(0.5 * 2 ** attempt, 10))
            continue
        if r.status_code != 200:
            raise RuntimeError("LLM error %d: %s" % (r.status_code, r.text[:200]))
        return r.json()
    raise RuntimeError("LLM still failing after %d tries" % MAX_TRIES_PER_STEP)


@app.task(name="bench.agent")
def agent(goal, max_steps=15, model="mock-1"):
    t_start = time.time()
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": goal}]
    ptok = ctok = 0
    for step in range(1, max_steps + 1):
        reply = llm_call(messages, model)
        t_answer = time.time()
        usage = reply.get("usage") or {}
        ptok += usage.get("prompt_tokens", 0)
        ctok += usage.get("completion_tokens", 0)
        msg = reply["choices"][0]["message"]
        calls = msg.get("tool_calls") or []
        messages.append({k: v for k, v in msg.items() if v is not None})
        if not calls:
            return {"status": "completed", "result": msg.get("content"), "steps": step,
                    "prompt_tokens": ptok, "completion_tokens": ctok,
                    "t_start": t_start, "t_answer": t_answer}
        for c in calls:
            try:
                args = json.loads(c["function"]["arguments"] or "{}")
                out = calculator(str(args.get("expression", "")))
            except Exception as e:  # the model sees the error, as in agentq
                out = "error: %s" % e
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": out})
    return {"status": "max_steps", "steps": max_steps, "prompt_tokens": ptok,
            "completion_tokens": ctok, "t_start": t_start, "t_answer": time.time()}


@worker_ready.connect
def _ready(**_):
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
