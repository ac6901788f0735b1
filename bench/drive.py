#!/usr/bin/python3
"""drive.py — the measuring side of bench/run: enqueues one run's tasks,
waits for their results in Postgres, samples the memory and CPU time of
the processes under test as the OS reports them, and prints one JSON line.
bench/run (through lib.sh) starts and stops the servers, the mock and the
workers; this file only measures.

  drive.py batch   --system agentq|celery ...  one throughput run (S1, S2, S0)
  drive.py latency --system agentq|celery ...  one task at a time (S4)
  drive.py burst   --system agentq|celery ...  fairness under a burst (S5)
  drive.py tokens  --system agentq ...         token fairness under a limit (S5T)
  drive.py crash   --system agentq|celery ...  LLM calls and tokens per task, with kills or not (S6)
  drive.py rate    --providers a=URL,b=URL ... the providers' limits used by a fleet (S3b)
  drive.py table RESULTS.jsonl                  the Markdown table

Clocks: every timestamp compared here comes from this machine's clock (the
worker's, Postgres's now(), Celery's utcnow()), so differences between
them are meaningful to well under a millisecond.

Memory: RSS is VmRSS from /proc/PID/status; PSS is Pss from
/proc/PID/smaps_rollup (shared pages divided among the processes sharing
them: the honest figure for a forked pool). Both are summed over the
process tree and sampled every --sample-s; the peak is reported.
CPU: utime + stime from /proc/PID/stat, summed over the tree, end minus
start (for Postgres, exited backends' time is in the postmaster's cutime).

Runs with Debian's /usr/bin/python3 (celery, psycopg2, amqp from apt).
"""
import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import psycopg2

TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(*a):
    print("drive:", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------- /proc --

def children(pid):
    out = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid):
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += children(p)
    return seen


def stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()  # fields from 3 (state) on


def cpu_of(pid, with_dead_children=False):
    """utime+stime (+ cutime+cstime) of one process, in seconds."""
    try:
        f = stat_fields(pid)
    except OSError:
        return 0.0
    t = int(f[11]) + int(f[12])
    if with_dead_children:
        t += int(f[13]) + int(f[14])
    return t / TCK


def cpu_tree(pid, with_dead_children=False):
    if not pid:
        return 0.0
    return sum(cpu_of(p, with_dead_children and p == pid) for p in tree(pid))


def mem_of(pid, with_pss=True):
    """(rss_bytes, pss_bytes) of one process (pss 0 unless with_pss)."""
    rss = pss = 0
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
        if not with_pss:
            return rss, 0
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return rss, pss


def mem_tree(pids, with_pss=True):
    rss = pss = 0
    for root in pids:
        for p in tree(root):
            r, s = mem_of(p, with_pss)
            rss += r
            pss += s
    return rss, pss


def machine_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / TCK


def tcp_counters():
    """TcpExt counters of the whole machine (ListenOverflows, ...)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                return dict(zip(names.split()[1:], map(int, values.split()[1:])))
    except OSError:
        pass
    return {}


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


class Sampler(threading.Thread):
    """Peak RSS/PSS of the process trees under test, sampled in the
    background. For a pool of more than 4 processes PSS (smaps_rollup walks
    the page tables: ~1 ms for a 60 MB process) is read every 4th sample
    only, so that sampling 65 processes does not take the CPU it measures."""

    def __init__(self, pids, every):
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.peak_rss = self.peak_pss = 0
        self.n = 0
        self.stop_ev = threading.Event()

    def sample(self, with_pss=True):
        rss, pss = mem_tree(self.pids, with_pss)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def run(self):
        small = sum(len(tree(p)) for p in self.pids) <= 4
        while not self.stop_ev.wait(self.every):
            self.n += 1
            self.sample(small or self.n % 4 == 0)

    def stop(self):
        self.stop_ev.set()
        self.join()
        self.sample()


class CpuSnap:
    """CPU seconds of each component at one instant."""

    def __init__(self, a):
        self.sut = sum(cpu_tree(p) for p in a.pids)
        self.mock = cpu_tree(a.mock_pid)
        self.broker = cpu_tree(a.broker_pid)
        self.pg = cpu_tree(a.pg_pid, with_dead_children=True)
        self.driver = cpu_tree(os.getpid())
        self.machine = machine_busy()

    def minus(self, o):
        return {k: round(getattr(self, k) - getattr(o, k), 3)
                for k in ("sut", "mock", "broker", "pg", "driver", "machine")}


def worker_metrics(url):
    """The worker's own unlabelled counters (agentq_http_*, agentq_store_*),
    e.g. the transactions its store committed."""
    out = {}
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(("agentq_http_", "agentq_store_")) and "{" not in line:
                    k, v = line.split()[:2]
                    out[k] = float(v)
    except Exception as e:
        log("cannot read the worker's /metrics: %s" % e)
    return out


def mock_stats(url):
    try:
        with urllib.request.urlopen(url + "/stats", timeout=5) as r:
            return json.loads(r.read())
    except Exception as e:  # the mock's figures are context, not the result
        log("cannot read the mock's /stats: %s" % e)
        return {}


# ------------------------------------------------------------- systems --

class Agentq:
    def __init__(self, a):
        self.a = a
        self.db = psycopg2.connect(os.environ["AGENTQ_POSTGRES_DSN"])
        self.db.autocommit = True

    def enqueue(self, n, goal):
        path = os.path.join(self.a.workdir, "tasks-%d.jsonl" % os.getpid())
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"user_id": "bench-%d" % (i % 16), "goal": goal,
                                    "skills": ["calculator"], "max_steps": 10,
                                    "timeout_seconds": 600, "budget_usd": 0}) + "\n")
        subprocess.run([self.a.producer, "--file", path, "--quiet", "--window", "1000"], check=True)
        os.unlink(path)

    def progress(self, final=False):
        with self.db.cursor() as c:
            c.execute("SELECT count(*) FILTER (WHERE agentq.is_final(status)),"
                      " count(*) FILTER (WHERE status = 'completed') FROM agentq.tasks")
            return c.fetchone()

    def finish_times(self):
        with self.db.cursor() as c:
            c.execute("SELECT extract(epoch FROM max(finished_at))::float8, coalesce(sum(steps), 0)"
                      " FROM agentq.tasks WHERE status = 'completed'")
            return c.fetchone()

    def extra(self):
        """A task's own run time (claim to final row), which with the
        concurrency bounds the rate: rate <= concurrency / run time."""
        with self.db.cursor() as c:
            c.execute("SELECT percentile_cont(array[0.5, 0.99]) WITHIN GROUP"
                      " (ORDER BY extract(epoch FROM finished_at - started_at)),"
                      " avg(extract(epoch FROM finished_at - started_at))::float8"
                      " FROM agentq.tasks WHERE status = 'completed'")
            (p50, p99), avg = c.fetchone()
        return {"task_run_s_p50": rnd(p50, 3), "task_run_s_p99": rnd(p99, 3), "task_run_s_mean": rnd(avg, 3)}


class CeleryBase:
    def __init__(self, a):
        self.a = a
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "celery"))
        import tasks  # noqa: E402  (the baseline's app, configured from BENCH_*)
        self.tasks = tasks
        tasks.app.backend.ResultSession().close()  # creates celery_taskmeta
        self.db = psycopg2.connect(os.environ["BENCH_RESULT_URL"])
        self.db.autocommit = True
        with self.db.cursor() as c:
            c.execute("TRUNCATE celery_taskmeta")
        tasks.app.control.purge()

    def enqueue(self, n, goal):
        self.ids = []
        with self.tasks.app.producer_or_acquire() as prod:
            for _ in range(n):
                r = self.tasks.agent.apply_async(args=[goal], kwargs={"max_steps": 10}, producer=prod)
                self.ids.append(r.id)

    def progress(self, final=False):
        # The database is this run's and the queue was purged before the
        # worker started, so a plain count is this run's; only the last
        # check matches the ids (cheap once, not every poll).
        with self.db.cursor() as c:
            c.execute("SELECT count(*) FILTER (WHERE status IN ('SUCCESS', 'FAILURE')),"
                      " count(*) FILTER (WHERE status = 'SUCCESS') FROM celery_taskmeta" +
                      (" WHERE task_id = ANY(%s)" if final else ""), (self.ids,) if final else None)
            return c.fetchone()

    def finish_times(self):
        with self.db.cursor() as c:
            # date_done is utcnow() without a zone: its epoch is the UTC one
            c.execute("SELECT extract(epoch FROM max(date_done))::float8 FROM celery_taskmeta"
                      " WHERE status = 'SUCCESS' AND task_id = ANY(%s)", (self.ids,))
            return c.fetchone()[0], None

    def extra(self):
        return {}


# --------------------------------------------------------------- batch --

def cmd_batch(a):
    sysobj = Agentq(a) if a.system == "agentq" else CeleryBase(a)
    stats0 = mock_stats(a.mock_url) if a.mock_url else {}
    sampler = Sampler(a.pids, a.sample_s)
    sampler.sample()
    idle_rss, idle_pss = sampler.peak_rss, sampler.peak_pss
    load = loadavg()
    tcp0 = tcp_counters()
    cpu0 = CpuSnap(a)
    sampler.start()
    t0 = time.time()
    sysobj.enqueue(a.tasks, a.goal)
    t_enq = time.time()
    deadline = t0 + a.timeout
    final = completed = 0
    while time.time() < deadline:
        final, completed = sysobj.progress()
        if final >= a.tasks:
            break
        time.sleep(a.poll_s)
    t_seen = time.time()
    cpu1 = CpuSnap(a)
    sampler.stop()
    final, completed = sysobj.progress(final=True)
    tcp1 = tcp_counters()
    stats1 = mock_stats(a.mock_url) if a.mock_url else {}
    t_end, steps = sysobj.finish_times()
    metrics = worker_metrics(a.metrics_url) if a.metrics_url else {}
    if not t_end or final < a.tasks:
        t_end = t_seen
    wall = t_end - t0
    cpu = cpu1.minus(cpu0)
    llm_calls = stats1.get("requests", 0) - stats0.get("requests", 0)
    r = {
        "scenario": a.scenario, "system": a.system, "settings": a.settings,
        "tasks": a.tasks, "completed": completed, "timed_out": final < a.tasks,
        "wall_s": round(wall, 3), "enqueue_s": round(t_enq - t0, 3),
        "tasks_per_s": round(completed / wall, 1) if wall > 0 else None,
        "ideal_s": a.ideal_s,
        "ideal_tasks_per_s": round(a.tasks / a.ideal_s, 1) if a.ideal_s else None,
        "rss_mb": round(sampler.peak_rss / 2**20, 1), "pss_mb": round(sampler.peak_pss / 2**20, 1),
        "idle_rss_mb": round(idle_rss / 2**20, 1), "idle_pss_mb": round(idle_pss / 2**20, 1),
        "cpu_s": cpu["sut"],
        "llm_calls": llm_calls,
        "mock_peak_in_flight": stats1.get("peak_in_flight"),
        "cpu_us_per_task": round(cpu["sut"] / completed * 1e6, 1) if completed else None,
        "cpu_us_per_llm_call": round(cpu["sut"] / llm_calls * 1e6, 1) if llm_calls else None,
        "cpu_mock_s": cpu["mock"], "cpu_broker_s": cpu["broker"], "cpu_pg_s": cpu["pg"],
        "cpu_driver_s": cpu["driver"], "cpu_machine_s": cpu["machine"],
        "load1_before": load,
        # accept queues that overflowed meanwhile (SYNs dropped, retried 1 s later)
        "listen_overflows": tcp1.get("ListenOverflows", 0) - tcp0.get("ListenOverflows", 0),
    }
    if a.system == "agentq" and steps is not None:
        r["llm_steps_recorded"] = int(steps)
    r.update(sysobj.extra())
    for k in ("agentq_http_sockets_opened_total", "agentq_store_transactions_total"):
        if k in metrics:
            r[k[len("agentq_"):]] = int(metrics[k])
    if a.ideal_s:
        r["wall_over_ideal"] = round(wall / (a.ideal_s + r["enqueue_s"] * a.ideal_plus_enqueue), 2)
    if a.sessions:
        r["rss_kib_per_session"] = round((sampler.peak_rss - idle_rss) / 1024 / a.sessions, 1)
    print(json.dumps(r), flush=True)
    return 0 if completed == a.tasks else 1


# ------------------------------------------------------------- latency --

NOTIFY_SQL = """
CREATE OR REPLACE FUNCTION public.bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('bench', NEW.{key}::text || ' ' || NEW.status);
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS bench_notify ON {table};
CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE OF status ON {table}
  FOR EACH ROW EXECUTE FUNCTION public.bench_notify();
"""


def pct(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    if not s:
        return None
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def cmd_latency(a):
    """One task at a time on an idle fleet. A trigger (this run's database
    only) NOTIFYs every status change; a notification is delivered when its
    transaction commits, so its arrival is when the row became visible.
    enqueue -> running: publish start to the 'running' (agentq) or
    'STARTED' (Celery, task_track_started) row visible. answer -> visible:
    the worker's receipt of the final LLM reply (agentq: the last llm
    step's start + duration; Celery: time.time() after the reply) to the
    final row visible."""
    if a.system == "agentq":
        dsn = os.environ["AGENTQ_POSTGRES_DSN"]
        table, key, running, final_states = "agentq.tasks", "task_id", "running", ("completed", "failed")
    else:
        cb = CeleryBase(a)
        dsn = os.environ["BENCH_RESULT_URL"]
        table, key, running, final_states = "celery_taskmeta", "task_id", "STARTED", ("SUCCESS", "FAILURE")
    db = psycopg2.connect(dsn)
    db.autocommit = True
    with db.cursor() as c:
        c.execute(NOTIFY_SQL.format(table=table, key=key))
        c.execute("LISTEN bench")

    if a.system == "agentq":
        import amqp
        url = os.environ["AGENTQ_AMQP_URL"]  # amqp://guest:guest@127.0.0.1:PORT/%2f
        hostport = url.split("@", 1)[1].split("/", 1)[0]
        conn = amqp.Connection(host=hostport, userid="guest", password="guest", virtual_host="/",
                               confirm_publish=True)
        conn.connect()
        ch = conn.channel()

        def publish():
            tid = str(uuid.uuid4())
            body = json.dumps({"task_id": tid, "user_id": "bench", "goal": a.goal,
                               "skills": ["calculator"], "max_steps": 10})
            t0 = time.time()
            ch.basic_publish(amqp.Message(body, content_type="application/json", delivery_mode=2,
                                          message_id=tid, timestamp=int(t0)),
                             exchange="agentq", routing_key="task")
            return tid, t0
    else:
        def publish():
            tid = str(uuid.uuid4())
            t0 = time.time()
            cb.tasks.agent.apply_async(args=[a.goal], kwargs={"max_steps": 10}, task_id=tid)
            return tid, t0

    rows = []
    t_begin = time.time()
    for _ in range(a.tasks):
        time.sleep(a.gap_s)  # idle between tasks: no batching with the last one
        tid, t0 = publish()
        t_run = t_fin = None
        deadline = t0 + 30
        while t_fin is None and time.time() < deadline:
            if select.select([db], [], [], 1.0) == ([], [], []):
                continue
            now = time.time()
            db.poll()
            while db.notifies:
                n = db.notifies.pop(0)
                nid, status = n.payload.split(" ", 1)
                if nid != tid:
                    continue
                if status == running and t_run is None:
                    t_run = now
                elif status in final_states:
                    t_fin = now
        rows.append((tid, t0, t_run, t_fin))
    wall = time.time() - t_begin

    # The moment the worker had the final answer.
    answers = {}
    if a.system == "agentq":
        time.sleep(0.5)  # step rows may be written in the batch after the status
        with db.cursor() as c:
            c.execute("SELECT task_id::text, max(extract(epoch FROM started_at)::float8 + duration_ms / 1000.0)"
                      " FROM agentq.steps WHERE kind = 'llm' GROUP BY task_id")
            answers = dict(c.fetchall())
    else:
        for tid, _, _, t_fin in rows:
            if t_fin:
                try:
                    answers[tid] = cb.tasks.app.AsyncResult(tid).get(timeout=5)["t_answer"]
                except Exception as e:
                    log("no result for %s: %s" % (tid, e))
    e2r = [(r - t0) * 1000 for _, t0, r, f in rows if r is not None]
    a2v = [(f - answers[tid]) * 1000 for tid, _, _, f in rows if f is not None and tid in answers]
    e2e = [(f - t0) * 1000 for _, t0, _, f in rows if f is not None]
    done = sum(1 for r in rows if r[3] is not None)
    out = {
        "scenario": a.scenario, "system": a.system, "settings": a.settings,
        "tasks": a.tasks, "completed": done, "wall_s": round(wall, 3), "tasks_per_s": None,
        "enqueue_to_running_p50_ms": rnd(pct(e2r, 50)), "enqueue_to_running_p99_ms": rnd(pct(e2r, 99)),
        "answer_to_visible_p50_ms": rnd(pct(a2v, 50)), "answer_to_visible_p99_ms": rnd(pct(a2v, 99)),
        "end_to_end_p50_ms": rnd(pct(e2e, 50)), "end_to_end_p99_ms": rnd(pct(e2e, 99)),
        "samples": [len(e2r), len(a2v)], "load1_before": loadavg(),
    }
    if a.pids:
        rss, pss = mem_tree(a.pids)
        out["rss_mb"], out["pss_mb"] = round(rss / 2**20, 1), round(pss / 2**20, 1)
    print(json.dumps(out), flush=True)
    return 0 if done == a.tasks else 1


def rnd(x, n=2):
    return None if x is None else round(x, n)


# --------------------------------------------------------------- burst --

def agentq_body(tid, user, goal):
    """A task body as bench's agentq-producer lines carry it."""
    return {"task_id": tid, "user_id": user, "goal": goal, "skills": ["calculator"],
            "max_steps": 10, "timeout_seconds": 600, "budget_usd": 0}


class AmqpPublisher:
    """Publishes agentq tasks one by one with publisher confirms (py-amqp),
    the way agentq-producer does (exchange 'agentq', key 'task', persistent,
    message_id = task id, AMQP timestamp), so that each task's publish time
    is known to the microsecond (agentq.tasks.enqueued_at holds the AMQP
    timestamp, whole seconds)."""

    def __init__(self):
        import amqp
        self.amqp = amqp
        url = os.environ["AGENTQ_AMQP_URL"]  # amqp://guest:guest@127.0.0.1:PORT/%2f
        hostport = url.split("@", 1)[1].split("/", 1)[0]
        self.conn = amqp.Connection(host=hostport, userid="guest", password="guest", virtual_host="/",
                                    confirm_publish=True)
        self.conn.connect()
        self.ch = self.conn.channel()

    def publish(self, tid, user, goal):
        t = time.time()
        self.ch.basic_publish(self.amqp.Message(json.dumps(agentq_body(tid, user, goal)),
                                                content_type="application/json", delivery_mode=2,
                                                message_id=tid, timestamp=int(t)),
                              exchange="agentq", routing_key="task")
        return t

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


def med_or_none(xs):
    return statistics.median(xs) if xs else None


def ratio(x, y, n=2):
    return round(x / y, n) if x is not None and y else None


def cmd_burst(a):
    """S5: one user ("burst") enqueues --burst-tasks tasks; --late-delay-s
    after the first publish (or once the burst is all published, if that
    takes longer), --late-users other users (late1, late2, ...) enqueue
    --late-tasks each. Every task is measured from its own publish
    (the driver's clock, just before the publish) to its start and its
    final row; the run's completion is first publish -> last final row."""
    late_users = ["late%d" % (i + 1) for i in range(a.late_users)]
    n_late = a.late_users * a.late_tasks
    n_total = a.burst_tasks + n_late
    if a.system == "agentq":
        sysobj = Agentq(a)
        pub = AmqpPublisher()
    else:
        sysobj = CeleryBase(a)
        pub = None
    late_pub = {}  # task id -> (user, publish time)
    late_err = []
    burst_queued = threading.Event()

    def enqueue_late(t0):
        # At t0 + delay, and not before the burst is all published (the late
        # users arrive behind the whole burst, as the scenario says, also
        # when publishing it takes longer than the delay).
        burst_queued.wait(a.timeout)
        try:
            if a.system == "celery":
                with sysobj.tasks.app.producer_or_acquire() as prod:
                    wait = t0 + a.late_delay_s - time.time()
                    if wait > 0:
                        time.sleep(wait)
                    for u in late_users:
                        for _ in range(a.late_tasks):
                            tid = str(uuid.uuid4())
                            t = time.time()
                            sysobj.tasks.agent.apply_async(args=[a.goal], kwargs={"max_steps": 10},
                                                           task_id=tid, producer=prod)
                            late_pub[tid] = (u, t)
            else:
                wait = t0 + a.late_delay_s - time.time()
                if wait > 0:
                    time.sleep(wait)
                for u in late_users:
                    for _ in range(a.late_tasks):
                        tid = str(uuid.uuid4())
                        late_pub[tid] = (u, pub.publish(tid, u, a.goal))
        except Exception as e:  # reported, and the run fails
            late_err.append(repr(e))

    if a.system == "agentq":
        path = os.path.join(a.workdir, "burst-%d.jsonl" % os.getpid())
        with open(path, "w") as f:
            for _ in range(a.burst_tasks):
                f.write(json.dumps(agentq_body(str(uuid.uuid4()), "burst", a.goal)) + "\n")
    sampler = Sampler(a.pids, a.sample_s)
    sampler.sample()
    load = loadavg()
    cpu0 = CpuSnap(a)
    sampler.start()
    t0 = time.time()  # the first publish follows (the producer's start-up is in the burst's figures)
    th = threading.Thread(target=enqueue_late, args=(t0,), daemon=True)
    th.start()
    if a.system == "agentq":
        try:
            subprocess.run([a.producer, "--file", path, "--quiet", "--window", "1000"], check=True)
        finally:
            os.unlink(path)
        burst_ids = None
    else:
        sysobj.enqueue(a.burst_tasks, a.goal)
        burst_ids = list(sysobj.ids)
    t_enq = time.time()
    burst_queued.set()
    th.join(a.late_delay_s + 60)
    if a.system == "celery":
        sysobj.ids = burst_ids + list(late_pub)
    deadline = t0 + a.timeout
    final = 0
    while time.time() < deadline and not late_err:
        final, _ = sysobj.progress()
        if final >= n_total:
            break
        time.sleep(a.poll_s)
    cpu1 = CpuSnap(a)
    sampler.stop()
    if pub:
        pub.close()
    final, completed = sysobj.progress(final=True)

    # (task id, user, status, enqueued, started, finished): epoch seconds
    rows = []
    if a.system == "agentq":
        with sysobj.db.cursor() as c:
            c.execute("SELECT task_id::text, user_id, status, extract(epoch FROM enqueued_at)::float8,"
                      " extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8"
                      " FROM agentq.tasks")
            for tid, user, status, enq, st, fin in c.fetchall():
                if tid in late_pub:
                    enq = late_pub[tid][1]
                elif user == "burst":
                    enq = t0  # the producer published them all within enqueue_s
                rows.append((tid, user, status, enq, st, fin))
    else:
        import calendar
        be = sysobj.tasks.app.backend
        sess = be.ResultSession()
        try:
            found = sess.query(be.task_cls).filter(be.task_cls.task_id.in_(sysobj.ids)).all()
            for t in found:
                res = t.result if isinstance(t.result, dict) else {}
                fin = None
                if t.date_done:  # utcnow(), without a zone
                    fin = calendar.timegm(t.date_done.utctimetuple()) + t.date_done.microsecond / 1e6
                user, enq = late_pub.get(t.task_id, ("burst", t0))
                rows.append((t.task_id, user, "completed" if t.status == "SUCCESS" else t.status,
                             enq, res.get("t_start"), fin))
        finally:
            sess.close()

    def of(users):
        return [r for r in rows if r[1] in users]

    burst_rows, late_rows = of({"burst"}), of(set(late_users))
    late_lat = [r[5] - r[3] for r in late_rows if r[5] is not None]
    late_wait = [r[4] - r[3] for r in late_rows if r[4] is not None]
    burst_run = [r[5] - r[4] for r in burst_rows if r[4] is not None and r[5] is not None]
    finishes = [r[5] for r in rows if r[5] is not None]
    run_p50 = med_or_none(burst_run)
    all_done = (max(finishes) - t0) if finishes and final >= n_total else None
    ideal = n_total * a.task_s / a.slots
    lat_p50, lat_max = med_or_none(late_lat), (max(late_lat) if late_lat else None)
    wait_p50, wait_max = med_or_none(late_wait), (max(late_wait) if late_wait else None)
    late_at = [t for _, t in late_pub.values()]
    by_user = {}
    for r in late_rows:
        if r[5] is not None:
            by_user.setdefault(r[1], []).append(r[5] - r[3])
    cpu = cpu1.minus(cpu0)
    out = {
        "scenario": a.scenario, "system": a.system, "settings": a.settings,
        "tasks": n_total, "completed": completed, "timed_out": final < n_total,
        "burst_tasks": a.burst_tasks, "late_users": a.late_users, "late_tasks_each": a.late_tasks,
        "slots": a.slots, "task_s_nominal": a.task_s,
        "enqueue_s": round(t_enq - t0, 3),
        "late_enqueued_at_s": rnd(min(late_at) - t0, 3) if late_at else None,
        "late_latency_p50_s": rnd(lat_p50, 3), "late_latency_max_s": rnd(lat_max, 3),
        "late_wait_p50_s": rnd(wait_p50, 3), "late_wait_max_s": rnd(wait_max, 3),
        "late_latency_p50_x": ratio(lat_p50, a.task_s), "late_latency_max_x": ratio(lat_max, a.task_s),
        "late_wait_p50_x": ratio(wait_p50, a.task_s), "late_wait_max_x": ratio(wait_max, a.task_s),
        "late_latency_p50_x_measured": ratio(lat_p50, run_p50),
        "late_latency_max_x_measured": ratio(lat_max, run_p50),
        "late_latency_max_by_user_s": {u: round(max(v), 3) for u, v in sorted(by_user.items())},
        "burst_task_run_p50_s": rnd(run_p50, 3),
        "burst_wait_p50_s": rnd(med_or_none([r[4] - r[3] for r in burst_rows if r[4] is not None]), 3),
        "all_done_s": rnd(all_done, 3), "wall_s": rnd(all_done, 3), "ideal_s": round(ideal, 3),
        "all_done_over_ideal": ratio(all_done, ideal),
        "ideal_measured_s": rnd(n_total * run_p50 / a.slots, 3) if run_p50 else None,
        "all_done_over_ideal_measured": ratio(all_done, n_total * run_p50 / a.slots) if run_p50 else None,
        "target_late_p50_s": 2 * a.task_s, "target_all_done_s": round(1.15 * ideal, 3),
        "late_p50_ok": lat_p50 is not None and lat_p50 <= 2 * a.task_s,
        "all_done_ok": all_done is not None and all_done <= 1.15 * ideal,
        "tasks_per_s": round(completed / all_done, 1) if all_done else None,
        "rss_mb": round(sampler.peak_rss / 2**20, 1), "cpu_s": cpu["sut"], "cpu_machine_s": cpu["machine"],
        "load1_before": load,
    }
    if late_err:
        out["error"] = "; ".join(late_err)
    print(json.dumps(out), flush=True)
    return 0 if completed == n_total and not late_err else 1


# --------------------------------------------------------------- crash --

def mock_calls(url):
    """The mock's GET /calls: {goal: chat requests that carried it}."""
    try:
        with urllib.request.urlopen(url + "/calls", timeout=30) as r:
            return json.loads(r.read())
    except Exception as e:
        log("cannot read the mock's /calls: %s" % e)
        return {}


def read_kills(path, t_until):
    """The kill loop's log (lib.sh crash_loop): one "EPOCH_S INDEX PID" a
    kill. Returns the times of the kills up to t_until, and how many came
    after it."""
    times, after = [], 0
    try:
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) >= 3:
                    if float(p[0]) <= t_until:
                        times.append(float(p[0]))
                    else:
                        after += 1
    except OSError:
        pass
    return sorted(times), after


def cmd_crash(a):
    """S6: --tasks tasks of the goal --goal plus " #i" (one goal per task, so
    that the mock's GET /calls counts each task's LLM requests), enqueued at
    once; waits until every task is final and then writes --done-file, which
    ends bench/run's kill loop (lib.sh crash_loop). The cost is the mock's:
    requests and tokens (GET /stats, after minus before; a fresh mock per
    run) per completed task, and per task from /calls. --kill-log is the
    loop's record of its kills (none in an uninterrupted run); --baseline
    the uninterrupted run's JSON line, to which the ratios refer."""
    n = a.tasks
    goals = ["%s #%d" % (a.goal, i) for i in range(n)]
    if a.system == "agentq":
        sysobj = Agentq(a)
        path = os.path.join(a.workdir, "crash-%d.jsonl" % os.getpid())
        with open(path, "w") as f:
            for i, g in enumerate(goals):
                b = agentq_body(str(uuid.uuid4()), "bench-%d" % (i % 16), g)
                f.write(json.dumps(b) + "\n")
    else:
        sysobj = CeleryBase(a)
    stats0 = mock_stats(a.mock_url)
    load = loadavg()
    t0 = time.time()
    if a.start_file:  # the kill loop's clock starts here
        with open(a.start_file, "w") as f:
            f.write("%.6f\n" % t0)
    if a.system == "agentq":
        try:
            subprocess.run([a.producer, "--file", path, "--quiet", "--window", "1000"], check=True)
        finally:
            os.unlink(path)
    else:
        sysobj.ids = []
        with sysobj.tasks.app.producer_or_acquire() as prod:
            for g in goals:
                r = sysobj.tasks.agent.apply_async(args=[g], kwargs={"max_steps": 10}, producer=prod)
                sysobj.ids.append(r.id)
    t_enq = time.time()
    final = 0
    while time.time() < t0 + a.timeout:
        final, _ = sysobj.progress()
        if final >= n:
            break
        time.sleep(a.poll_s)
    t_seen = time.time()
    if a.done_file:
        with open(a.done_file, "w") as f:
            f.write("%.6f\n" % t_seen)
    final, completed = sysobj.progress(final=True)
    t_end, steps = sysobj.finish_times()
    if not t_end or final < n:
        t_end = t_seen
    stats1 = mock_stats(a.mock_url)
    calls = mock_calls(a.mock_url)

    extra = {}
    if a.system == "agentq":
        with sysobj.db.cursor() as c:
            c.execute("SELECT count(*) FILTER (WHERE status = 'completed' AND steps = %s),"
                      " coalesce(sum(interruptions), 0), count(*) FILTER (WHERE interruptions > 0),"
                      " coalesce(max(interruptions), 0), coalesce(max(attempt), 0),"
                      " count(*) FILTER (WHERE status = 'failed')"
                      " FROM agentq.tasks", (a.llm_calls,))
            full, ints, tasks_int, max_int, max_att, failed = c.fetchone()
            c.execute("SELECT status, count(*) FROM agentq.tasks GROUP BY status ORDER BY status")
            by_status = dict(c.fetchall())
        extra = {"completed_all_steps": full, "interruptions": int(ints), "tasks_interrupted": tasks_int,
                 "max_interruptions_per_task": max_int, "max_attempt": max_att, "failed": failed,
                 "by_status": by_status, "llm_steps_recorded": int(steps or 0)}
    else:
        be = sysobj.tasks.app.backend
        sess = be.ResultSession()
        full = 0
        by_status = {}
        try:
            for t in sess.query(be.task_cls).filter(be.task_cls.task_id.in_(sysobj.ids)).all():
                res = t.result if isinstance(t.result, dict) else {}
                st = res.get("status") if t.status == "SUCCESS" else t.status
                by_status[st] = by_status.get(st, 0) + 1
                if st == "completed" and res.get("steps") == a.llm_calls:
                    full += 1
        finally:
            sess.close()
        # completed = SUCCESS rows whose agent loop reached its final answer
        completed = by_status.get("completed", 0)
        extra = {"completed_all_steps": full, "by_status": by_status}

    kill_times, kills_after = read_kills(a.kill_log, t_end) if a.kill_log else ([], 0)
    kills = len(kill_times)
    gaps = [y - x for x, y in zip([t0] + kill_times, kill_times)]  # the first from the first publish

    def d(k):
        return stats1.get(k, 0) - stats0.get(k, 0)

    reqs = d("requests")
    ptok, ctok = d("prompt_tokens"), d("completion_tokens")
    per = [calls.get(g, 0) for g in goals]
    wall = t_end - t0
    out = {
        "scenario": a.scenario, "system": a.system, "settings": a.settings, "mode": a.mode,
        "tasks": n, "llm_calls_nominal": a.llm_calls, "completed": completed, "lost": n - completed,
        "timed_out": final < n, "kills": kills, "kills_after_done": kills_after,
        "kill_every_s": a.kill_every_s if a.mode == "crash" else None,
        "kill_gap_mean_s": rnd(statistics.mean(gaps), 3) if gaps else None,
        "kill_gap_min_s": rnd(min(gaps), 3) if gaps else None, "kill_gap_max_s": rnd(max(gaps), 3) if gaps else None,
        "wall_s": round(wall, 3), "enqueue_s": round(t_enq - t0, 3),
        "llm_calls": reqs, "llm_answered": d("completed"), "llm_cancelled": d("cancelled"),
        "prompt_tokens": ptok, "completion_tokens": ctok, "tokens": ptok + ctok,
        "calls_per_task": round(reqs / completed, 3) if completed else None,
        "tokens_per_task": round((ptok + ctok) / completed, 1) if completed else None,
        "calls_per_task_p50": pct(per, 50), "calls_per_task_p99": pct(per, 99),
        "calls_per_task_max": max(per) if per else None,
        "tasks_with_repeated_calls": sum(1 for x in per if x > a.llm_calls),
        "calls_counted_by_goal": sum(per),
        "load1_before": load, "load1_after": loadavg(),
    }
    out.update(extra)
    if a.baseline:
        try:
            with open(a.baseline) as f:
                base = json.loads(f.read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as e:
            log("no baseline (%s): no ratios" % e)
            base = {}
        out["calls_ratio"] = ratio(out["calls_per_task"], base.get("calls_per_task"), 3)
        out["tokens_ratio"] = ratio(out["tokens_per_task"], base.get("tokens_per_task"), 3)
        out["wall_ratio"] = ratio(out["wall_s"], base.get("wall_s"), 2)
        out["target_ratio"] = a.target_ratio
        out["calls_ok"] = out["calls_ratio"] is not None and out["calls_ratio"] <= a.target_ratio
        out["tokens_ok"] = out["tokens_ratio"] is not None and out["tokens_ratio"] <= a.target_ratio
    print(json.dumps(out), flush=True)
    if completed != n:
        log("%s %s: %d of %d tasks completed (%s)" % (a.system, a.mode, completed, n, out["by_status"]))
    if a.mode == "crash" and kills == 0:
        log("%s: the crash run made no kill (the run ended before the first one)" % a.system)
    return 0 if completed == n and (a.mode != "crash" or kills > 0) else 1


# -------------------------------------------------------------- tokens --

def goal_max_bytes():
    """AQ_TASK_GOAL_MAX from include/agentq/task.h (the longest goal a task
    may carry), so that the bench follows the product if it changes."""
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        with open(os.path.join(here, "..", "include", "agentq", "task.h")) as f:
            m = re.search(r"#define\s+AQ_TASK_GOAL_MAX\s+(\d+)", f.read())
            if m:
                return int(m.group(1))
    except OSError:
        pass
    return 65536


# The messages of a first LLM call other than the goal's text: the system
# prompt and the JSON framing (the mock counts prompt tokens as the bytes
# of the messages array / 4; agentq estimates the same way).
PROMPT_OVERHEAD_BYTES = 160
FILLER = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
          "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu ")


def padded_goal(prompt_tokens, prefix="bench steps=1 "):
    """A goal whose first prompt is about prompt_tokens tokens (4 bytes
    each): the mock's directives, then plain ASCII words (no character that
    JSON escapes). Capped at the task's goal limit; returns (goal, capped)."""
    want = max(len(prefix) + 8, prompt_tokens * 4 - PROMPT_OVERHEAD_BYTES)
    cap = goal_max_bytes()
    capped = want > cap
    n = min(want, cap)
    body = prefix + FILLER * (n // len(FILLER) + 1)
    return body[:n - 1].rstrip() + ".", capped


def metric_gauge(url, name):
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except Exception:
        pass
    return None


def cmd_tokens(a):
    """S5T: two users' tasks enqueued together, interleaved, under a
    tokens/min limit: "heavy" (--heavy-tasks tasks whose prompts are about
    --heavy-prompt-tokens) and "light" (--light-tasks of about
    --light-prompt-tokens). The concurrency holds every task at once, so
    both users' sessions wait at the limiter from the start; what each user
    is granted is then the limiter's choice alone. Tokens granted = prompt +
    completion tokens of the llm step rows (the provider's usage), each
    counted at its step's start (the grant), over the window in which both
    users still had calls to be granted: from the later of the two users'
    first grants to the earlier of their last grants."""
    sysobj = Agentq(a)
    heavy_goal, heavy_capped = padded_goal(a.heavy_prompt_tokens)
    light_goal, light_capped = padded_goal(a.light_prompt_tokens)
    if heavy_capped or light_capped:
        log("a goal is capped at %d bytes (AQ_TASK_GOAL_MAX): the heavy prompts are about %d tokens, "
            "not %d" % (goal_max_bytes(), (len(heavy_goal) + PROMPT_OVERHEAD_BYTES) // 4,
                        a.heavy_prompt_tokens))
    # Interleaved in proportion, so that both users' tasks are claimed at once.
    order = sorted([((i + 0.5) / a.heavy_tasks, "heavy") for i in range(a.heavy_tasks)] +
                   [((i + 0.5) / a.light_tasks, "light") for i in range(a.light_tasks)])
    path = os.path.join(a.workdir, "tokens-%d.jsonl" % os.getpid())
    with open(path, "w") as f:
        for _, u in order:
            f.write(json.dumps(agentq_body(str(uuid.uuid4()), u, heavy_goal if u == "heavy" else light_goal)) + "\n")
    n = len(order)
    waits = []  # (time, users waiting at the limiter: the most any one process reports)
    stop = threading.Event()

    def sample_waiting():
        while not stop.wait(a.sample_s):
            v = [metric_gauge(u, "agentq_ratelimit_waiting_users") for u in a.metrics_urls]
            v = [x for x in v if x is not None]
            if v:
                waits.append((time.time(), max(v)))

    sm = threading.Thread(target=sample_waiting, daemon=True)
    sm.start()
    load = loadavg()
    t0 = time.time()
    try:
        subprocess.run([a.producer, "--file", path, "--quiet", "--window", "1000"], check=True)
    finally:
        os.unlink(path)
    t_enq = time.time()
    final = 0
    while time.time() < t0 + a.timeout:
        final, _ = sysobj.progress()
        if final >= n:
            break
        time.sleep(a.poll_s)
    stop.set()
    sm.join()
    final, completed = sysobj.progress(final=True)
    # Step rows may be written in the batch after the final status.
    q = ("SELECT t.user_id, extract(epoch FROM s.started_at)::float8, s.prompt_tokens, s.completion_tokens"
         " FROM agentq.steps s JOIN agentq.tasks t USING (task_id) WHERE s.kind = 'llm' AND s.status = 'ok'")
    for _ in range(50):
        with sysobj.db.cursor() as c:
            c.execute("SELECT coalesce(sum(steps), 0) FROM agentq.tasks")
            want = c.fetchone()[0]
            c.execute(q)
            steps = c.fetchall()
        if len(steps) >= want:
            break
        time.sleep(0.1)
    users = ("heavy", "light")
    per = {u: [(st, (p or 0) + (c or 0), p or 0) for uu, st, p, c in steps if uu == u] for u in users}
    out = {
        "scenario": a.scenario, "system": "agentq", "settings": a.settings,
        "tasks": n, "completed": completed, "timed_out": final < n,
        "heavy_tasks": a.heavy_tasks, "light_tasks": a.light_tasks, "tokens_per_minute": a.tpm,
        "heavy_prompt_tokens_asked": a.heavy_prompt_tokens, "light_prompt_tokens_asked": a.light_prompt_tokens,
        "heavy_goal_bytes": len(heavy_goal), "light_goal_bytes": len(light_goal),
        "enqueue_s": round(t_enq - t0, 3), "load1_before": load,
    }
    for u in users:
        p = [x[2] for x in per[u]]
        out[u + "_prompt_tokens_per_call_mean"] = round(statistics.mean(p)) if p else None
        out[u + "_prompt_tokens_per_call_max"] = max(p) if p else None
        out[u + "_tokens_total"] = sum(x[1] for x in per[u])
    ends = [t for u in users for t in [x[0] for x in per[u]] if t is not None]
    if all(per[u] for u in users):
        w0 = max(min(x[0] for x in per[u]) for u in users)
        w1 = min(max(x[0] for x in per[u]) for u in users)
        got = {u: sum(x[1] for x in per[u] if w0 <= x[0] <= w1) for u in users}
        calls = {u: sum(1 for x in per[u] if w0 <= x[0] <= w1) for u in users}
        tot = sum(got.values())
        inw = [v for t, v in waits if w0 <= t <= w1]
        out.update({
            "window_s": round(w1 - w0, 3), "window_start_s": round(w0 - t0, 3),
            "window_tokens_per_s": round(tot / (w1 - w0)) if w1 > w0 else None,
            "limit_tokens_per_s": round(a.tpm / 60),
            "heavy_tokens": got["heavy"], "light_tokens": got["light"],
            "heavy_calls": calls["heavy"], "light_calls": calls["light"],
            "heavy_share": round(got["heavy"] / tot, 3) if tot else None,
            "light_share": round(got["light"] / tot, 3) if tot else None,
            "heavy_over_light": round(got["heavy"] / got["light"], 2) if got["light"] else None,
            # Each share within 20% of an equal share: 40%..60%.
            "target_share_range": [0.4, 0.6],
            "shares_ok": bool(tot) and all(0.4 <= got[u] / tot <= 0.6 for u in users),
            "both_waiting_samples": [sum(1 for v in inw if v >= 2), len(inw)],
        })
    if ends:
        out["wall_s"] = round(max(ends) - t0, 3)
    print(json.dumps(out), flush=True)
    return 0 if completed == n else 1


# ---------------------------------------------------------------- rate --

def mock_requests(url):
    """The mock's GET /requests: [(at_ms, status), ...], at_ms on the
    machine's CLOCK_MONOTONIC (Python's time.monotonic())."""
    with urllib.request.urlopen(url + "/requests", timeout=30) as r:
        return [(x["at_ms"], x["status"]) for x in json.loads(r.read())]


def worker_gauges(url):
    """(sessions waiting for a grant, {provider: 1 while its breaker is
    open}) from one worker's /metrics; None if it does not answer."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=1) as r:
            text = r.read().decode()
    except Exception:
        return None
    waiting, open_ = None, {}
    for line in text.splitlines():
        if line.startswith("agentq_ratelimit_waiting "):
            waiting = float(line.split()[1])
        elif line.startswith("agentq_llm_route_open{"):
            labels, v = line[len("agentq_llm_route_open{"):].rsplit("} ", 1)
            prov = labels.split('provider="', 1)[1].split('"', 1)[0]
            open_[prov] = float(v)
    return waiting, open_


def max_in_span(times, span):
    """The most of the sorted times in any half-open interval of span s."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - span:
            j += 1
        best = max(best, i - j + 1)
    return best


def intervals(samples, t_end):
    """[(t, on)] samples in time order -> [[start, end], ...] while on."""
    out, start = [], None
    for t, on in samples:
        if on and start is None:
            start = t
        elif not on and start is not None:
            out.append([round(start, 2), round(t, 2)])
            start = None
    if start is not None:
        out.append([round(start, 2), round(t_end, 2)])
    return out


def cmd_rate(a):
    """S3b: --tasks one-call tasks enqueued at once onto a fleet whose
    providers (--providers NAME=URL,...: one agentq-mockllm each, --rpm
    requests/min each) together allow far fewer calls than the sessions
    could make, so the fleet's limiter is the only bound. Everything is
    measured from the mocks' GET /requests (every chat request's arrival on
    CLOCK_MONOTONIC and the status it was given) over the steady window
    [--window-start-s, + --window-s) after the first publish: admitted
    calls (200) per provider, utilisation = admitted / (limit x window),
    the share of 429s among all requests. With --outage-log (written by
    lib.sh outage_loop: when --outage-provider went down and came back),
    also the other providers' use during the outage, and the fleet's
    outside it."""
    provs = []
    for item in a.providers.split(","):
        name, url = item.split("=", 1)
        provs.append((name, url))
    names = [n for n, _ in provs]
    before = dict(x.split("=", 1) for x in a.before.split(",") if x) if a.before else {}
    per_s = a.rpm / 60.0
    ws, we = a.window_start_s, a.window_start_s + a.window_s
    db = psycopg2.connect(os.environ["AGENTQ_POSTGRES_DSN"])
    db.autocommit = True
    path = os.path.join(a.workdir, "rate-%d.jsonl" % os.getpid())
    with open(path, "w") as f:
        for i in range(a.tasks):
            f.write(json.dumps(agentq_body(str(uuid.uuid4()), "bench-%d" % (i % 16), a.goal)) + "\n")

    samples = []  # (monotonic s, worker index, waiting, {provider: open})
    stop = threading.Event()

    def sample():
        while not stop.wait(a.sample_s):
            for i, u in enumerate(a.metrics_urls):
                g = worker_gauges(u)
                if g:
                    samples.append((time.monotonic(), i, g[0], g[1]))

    sm = threading.Thread(target=sample, daemon=True)
    load = loadavg()
    t0, m0 = time.time(), time.monotonic()
    if a.start_file:
        with open(a.start_file, "w") as f:
            f.write("%.6f\n%.6f\n" % (t0, m0))
    sm.start()
    try:
        subprocess.run([a.producer, "--file", path, "--quiet", "--window", "1000"], check=True)
    finally:
        os.unlink(path)
    t_enq = time.monotonic() - m0

    def cpu_now():
        return {"workers": sum(cpu_tree(p) for p in a.pids), "mocks": sum(cpu_tree(p) for p in a.mock_pids),
                "broker": cpu_tree(a.broker_pid), "pg": cpu_tree(a.pg_pid, with_dead_children=True),
                "machine": machine_busy()}

    def sleep_until(rel):
        d = m0 + rel - time.monotonic()
        if d > 0:
            time.sleep(d)

    sleep_until(ws)
    c0 = cpu_now()
    sleep_until(we)
    c1 = cpu_now()
    with db.cursor() as c:
        c.execute("SELECT count(*) FILTER (WHERE NOT agentq.is_final(status)),"
                  " count(*) FILTER (WHERE status = 'completed') FROM agentq.tasks")
        left, completed = c.fetchone()
        c.execute("SELECT status, count(*) FROM agentq.tasks GROUP BY status ORDER BY status")
        by_status = dict(c.fetchall())
    down = up = None
    if a.outage_log:
        deadline = time.monotonic() + 30
        ev = {}
        while time.monotonic() < deadline:
            ev = {}
            try:
                with open(a.outage_log) as f:
                    for line in f:
                        p = line.split()
                        if len(p) == 2:
                            ev[p[0]] = float(p[1]) - t0
            except OSError:
                pass
            if "up" in ev or (time.monotonic() > m0 + we + 1 and "down" not in ev):
                break
            time.sleep(0.05)
        down, up = ev.get("down"), ev.get("up")
    stop.set()
    sm.join()
    calls = {}  # the workers' agentq_llm_calls_total, summed: {provider: {outcome: n}}
    for u in a.metrics_urls:
        try:
            with urllib.request.urlopen(u + "/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("agentq_llm_calls_total{"):
                        labels, v = line[len("agentq_llm_calls_total{"):].rsplit("} ", 1)
                        prov = labels.split('provider="', 1)[1].split('"', 1)[0]
                        oc = labels.split('outcome="', 1)[1].split('"', 1)[0]
                        calls.setdefault(prov, {})
                        calls[prov][oc] = calls[prov].get(oc, 0) + int(float(v))
        except Exception as e:
            log("cannot read %s/metrics: %s" % (u, e))
    reqs, stats = {}, {}
    for name, url in provs:
        arr = []
        if name in before:
            with open(before[name]) as f:
                arr += [(x["at_ms"], x["status"]) for x in json.loads(f.read() or "[]")]
        arr += mock_requests(url)
        reqs[name] = sorted((at / 1000.0 - m0, st) for at, st in arr)
        stats[name] = mock_stats(url)

    def n(name, t_from, t_to, pred=lambda s: True):
        return sum(1 for t, s in reqs[name] if t_from <= t < t_to and pred(s))

    def ok(s):
        return s == 200

    limit_all = per_s * len(provs)
    win = we - ws
    admitted = {p: n(p, ws, we, ok) for p in names}
    total = {p: n(p, ws, we) for p in names}
    r429 = {p: n(p, ws, we, lambda s: s == 429) for p in names}
    r5xx = {p: n(p, ws, we, lambda s: 500 <= s < 600) for p in names}
    other = {p: total[p] - admitted[p] - r429[p] - r5xx[p] for p in names}
    all_req = sum(total.values())
    util = sum(admitted.values()) / (limit_all * win)
    frac429 = sum(r429.values()) / all_req if all_req else None
    secs = int(round(win))
    series = {p: [n(p, ws + i, ws + i + 1, ok) for i in range(secs)] for p in names}
    warm = {p: [n(p, i, i + 1, ok) for i in range(int(ws))] for p in names}  # before the window: the start's burst
    both = [sum(series[p][i] for p in names) for i in range(secs)]
    oks = {p: [t for t, s in reqs[p] if ok(s) and ws <= t < we] for p in names}
    wait_in = {}
    for t, i, w, _ in samples:
        if w is not None and ws <= t - m0 < we:
            wait_in.setdefault(round(t - m0, 1), {})[i] = w
    waits = [sum(v.values()) for v in wait_in.values() if len(v) == len(a.metrics_urls)]
    breakers = {}
    for i in range(len(a.metrics_urls)):
        mine = [(t - m0, o) for t, j, _, o in samples if j == i]
        for p in names:
            iv = intervals([(t, o.get(p, 0) > 0) for t, o in mine], we)
            if iv:
                breakers.setdefault("w%d" % (i + 1), {})[p] = iv
    cpu = {k: round(c1[k] - c0[k], 2) for k in c0}
    out = {
        "scenario": a.scenario, "system": "agentq", "settings": a.settings, "mode": a.mode,
        "tasks": a.tasks, "providers": names, "rpm_each": a.rpm,
        "window_s": [round(ws, 3), round(we, 3)], "enqueue_s": round(t_enq, 3),
        "admitted": admitted, "requests": total, "rate_limited": r429, "server_errors": r5xx, "other": other,
        "admitted_per_min": round(sum(admitted.values()) / win * 60, 1),
        "limit_per_min": a.rpm * len(provs),
        "utilisation": round(util, 4),
        "utilisation_by_provider": {p: round(admitted[p] / (per_s * win), 4) for p in names},
        "share_429": round(frac429, 5) if frac429 is not None else None,
        "admitted_per_s_min": min(both) if both else None, "admitted_per_s_max": max(both) if both else None,
        # The fleet's own bound: never more than the limit plus a second's worth in any span.
        "max_admitted_10s_per_min": {p: round(max_in_span(oks[p], 10.0) * 6, 1) for p in names},
        "max_admitted_1s": {p: max_in_span(oks[p], 1.0) for p in names},
        "per_s": series, "per_s_before_window": warm,
        "waiting_min": min(waits) if waits else None, "waiting_median": med_or_none(waits),
        "tasks_left_at_end": left, "completed_at_end": completed, "tasks_by_status_at_end": by_status,
        "cpu_window_s": cpu, "machine_busy_share": round(cpu["machine"] / (os.cpu_count() * win), 3),
        "load1_before": load, "load1_after": loadavg(),
        "mock_stats": stats, "worker_llm_calls": calls,
        "target_utilisation": 0.97, "target_share_429": 0.005,
    }
    if breakers:
        out["breaker_open_s"] = breakers
    # In an outage run the whole limit is not there to use: the utilisation
    # target is the one outside the outage (below).
    checks = [bool(a.outage_log) or util >= 0.97, frac429 is not None and frac429 <= 0.005]
    if a.outage_log:
        down_p = a.outage_provider
        rest = [p for p in names if p != down_p]
        out.update({"outage_provider": down_p, "outage_how": a.outage_how,
                    "outage_s": [rnd(down, 3), rnd(up, 3)]})
        if down is not None and up is not None:
            olen = up - down
            outside = win - olen
            adm_out = sum(n(p, ws, down, ok) + n(p, up, we, ok) for p in names)
            adm_rest = sum(n(p, down, up, ok) for p in rest)
            u_out = adm_out / (limit_all * outside) if outside > 0 else None
            u_rest = adm_rest / (per_s * len(rest) * olen) if olen > 0 else None
            first_ok = next((t for t, s in reqs[down_p] if t >= up and ok(s)), None)
            back = next((t for t, s in reqs[down_p] if t >= up), None)
            out.update({
                "outage_len_s": round(olen, 3),
                "utilisation_outside_outage": rnd(u_out, 4),
                "utilisation_others_during_outage": rnd(u_rest, 4),
                "admitted_during_outage": {p: n(p, down, up, ok) for p in names},
                "requests_during_outage": {p: n(p, down, up) for p in names},
                "down_provider_before_s": rnd(None if down <= ws else n(down_p, ws, down, ok) / (per_s * (down - ws)), 4),
                "down_provider_after_s": rnd(n(down_p, up, we, ok) / (per_s * (we - up)) if we > up else None, 4),
                "down_provider_first_request_after_up_s": rnd(back - up if back is not None else None, 3),
                "down_provider_first_ok_after_up_s": rnd(first_ok - up if first_ok is not None else None, 3),
            })
            checks += [u_out is not None and u_out >= 0.97, u_rest is not None and u_rest >= 0.97]
        else:
            checks.append(False)
    out["targets_ok"] = all(checks)
    print(json.dumps(out), flush=True)
    if left == 0:
        log("the demand ran out before the window's end: the figures do not measure the limit")
    return 0 if sum(admitted.values()) > 0 and left > 0 else 1


# --------------------------------------------------------------- table --

def med(rows, k):
    v = [r[k] for r in rows if r.get(k) is not None]
    return statistics.median(v) if v else None


def fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float) and nd == 0:
        return "%.0f" % x
    return ("%." + str(nd) + "f") % x if isinstance(x, float) else str(x)


def span(rows, k, nd=1):
    v = [r[k] for r in rows if r.get(k) is not None]
    if not v:
        return "–"
    m = statistics.median(v)
    if len(v) == 1 or min(v) == max(v):
        return fmt(float(m), nd)
    return "%s (%s–%s)" % (fmt(float(m), nd), fmt(float(min(v)), nd), fmt(float(max(v)), nd))


def cmd_table(a):
    rows = []
    with open(a.results) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    groups = {}
    for r in rows:
        size = r.get("tasks") if r["scenario"] != "raw" else None  # raw: ops done vary per run
        groups.setdefault((r["scenario"], r["system"], r["settings"], size), []).append(r)
    order = {"s1": 0, "s2": 1, "s0": 2, "s3b": 2.5, "s4": 3, "s5": 4, "s5t": 5, "s6": 6, "raw": 7}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 9), k[1] != "agentq", k[1], k[2], k[3] or 0))

    main = [k for k in keys if k[0] not in ("s3b", "s4", "s5", "s5t", "s6", "raw")]
    if main:
        print("| scenario | system | settings | tasks | runs | wall s | tasks/s | ideal tasks/s | "
              "peak RSS MB | peak PSS MB | worker CPU s | CPU µs / LLM call |")
        print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for k in main:
        g = groups[k]
        print("| %s | %s | %s | %d | %d | %s | %s | %s | %s | %s | %s | %s |" % (
            k[0].upper(), k[1], k[2], g[0]["tasks"], len(g), span(g, "wall_s", 2), span(g, "tasks_per_s"),
            fmt(med(g, "ideal_tasks_per_s")), span(g, "rss_mb", 0), span(g, "pss_mb", 0),
            span(g, "cpu_s", 2), span(g, "cpu_us_per_llm_call", 0)))

    rate = [k for k in keys if k[0] == "s3b"]
    if rate:
        g0 = groups[rate[0]][0]
        print()
        print("S3b: %d providers × %d requests/min under one model, measured from the mocks over %s–%s s "
              "after the first publish (targets: ≥ 97%% of the limit used, ≤ 0.5%% 429s; in an outage, "
              "≥ 97%% of the others' limit during it and of the whole limit outside it)"
              % (len(g0["providers"]), g0["rpm_each"], fmt(g0["window_s"][0], 0), fmt(g0["window_s"][1], 0)))
        print()
        print("| S3b | settings | runs | admitted / min (limit) | utilisation | by provider | 429 share | "
              "outage s | others during outage | all outside outage | down one's first 200 after heal s | "
              "targets |")
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|")
        for k in rate:
            g = groups[k]
            byp = " / ".join("%s %s %%" % (p, fmt(100 * statistics.median(r["utilisation_by_provider"][p] for r in g), 1))
                             for p in g[0]["providers"])
            out_s = "–"
            if g[0].get("outage_s"):
                o = g[0]["outage_s"]
                out_s = "%s–%s" % (fmt(o[0], 1), fmt(o[1], 1)) if o[0] is not None else "–"
            pc = lambda f, nd=1: "–" if med(g, f) is None else "%s %%" % span(  # noqa: E731
                [{f: 100 * r[f]} for r in g if r.get(f) is not None], f, nd)
            print("| %s | %s | %d | %s (%s) | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                k[1], k[2], len(g), span(g, "admitted_per_min", 0), fmt(med(g, "limit_per_min"), 0),
                pc("utilisation"), byp, pc("share_429", 2), out_s, pc("utilisation_others_during_outage"),
                pc("utilisation_outside_outage"), span(g, "down_provider_first_ok_after_up_s", 1),
                "/".join("✓" if r.get("targets_ok") else "✗" for r in g)))

    lat = [k for k in keys if k[0] == "s4"]
    if lat:
        print()
        print("| S4 latency | settings | tasks | enqueue→running p50 ms | p99 ms | answer→row visible p50 ms | "
              "p99 ms | end-to-end p50 ms |")
        print("|---|---|--:|--:|--:|--:|--:|--:|")
        for k in lat:
            g = groups[k]
            print("| %s | %s | %d | %s | %s | %s | %s | %s |" % (
                k[1], k[2], g[0]["tasks"], span(g, "enqueue_to_running_p50_ms", 2),
                span(g, "enqueue_to_running_p99_ms", 2), span(g, "answer_to_visible_p50_ms", 2),
                span(g, "answer_to_visible_p99_ms", 2), span(g, "end_to_end_p50_ms", 2)))

    burst = [k for k in keys if k[0] == "s5"]
    if burst:
        g0 = groups[burst[0]][0]
        print()
        print("S5 fairness under a burst: %d tasks of user 'burst', then %d users × %d tasks %.1f s later; "
              "%d slots; one task = %.2f s nominal (targets: late p50 ≤ %.1f s, all done ≤ 1.15 × ideal)"
              % (g0["burst_tasks"], g0["late_users"], g0["late_tasks_each"], g0.get("late_enqueued_at_s") or 0,
                 g0["slots"], g0["task_s_nominal"], 2 * g0["task_s_nominal"]))
        print()
        print("| S5 | settings | runs | late latency p50 s (× task) | late latency max s (× task) | "
              "late wait p50 s | late wait max s | burst task run p50 s | all done s | ideal s | "
              "all done ÷ ideal | late p50 target | all-done target |")
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|:-:|")
        for k in burst:
            g = groups[k]
            ok = lambda f: "/".join("✓" if r.get(f) else "✗" for r in g)  # noqa: E731
            print("| %s | %s | %d | %s (%s×) | %s (%s×) | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                k[1], k[2], len(g), span(g, "late_latency_p50_s", 2), span(g, "late_latency_p50_x", 1),
                span(g, "late_latency_max_s", 2), span(g, "late_latency_max_x", 1),
                span(g, "late_wait_p50_s", 2), span(g, "late_wait_max_s", 2),
                span(g, "burst_task_run_p50_s", 3), span(g, "all_done_s", 2), fmt(med(g, "ideal_s"), 1),
                span(g, "all_done_over_ideal", 2), ok("late_p50_ok"), ok("all_done_ok")))

    tok = [k for k in keys if k[0] == "s5t"]
    if tok:
        print()
        print("| S5T token fairness | settings | runs | tokens/min | prompt tokens per call heavy / light | "
              "window s | tokens granted heavy / light | heavy share | light share | "
              "target (each 40–60%) |")
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|:-:|")
        for k in tok:
            g = groups[k]
            print("| %s | %s | %d | %s | %s / %s | %s | %s / %s | %s | %s | %s |" % (
                k[1], k[2], len(g), fmt(med(g, "tokens_per_minute"), 0),
                span(g, "heavy_prompt_tokens_per_call_mean", 0), span(g, "light_prompt_tokens_per_call_mean", 0),
                span(g, "window_s", 1), span(g, "heavy_tokens", 0), span(g, "light_tokens", 0),
                span(g, "heavy_share", 3), span(g, "light_share", 3),
                "/".join("✓" if r.get("shares_ok") else "✗" for r in g)))

    crash = sorted((k for k in keys if k[0] == "s6"),
                   key=lambda k: (k[1] != "agentq", k[1], groups[k][0].get("mode") == "crash", k[2], k[3]))
    if crash:
        g0 = groups[crash[0]][0]
        print()
        print("S6 crash cost: %d tasks of %d LLM calls each; crash runs SIGKILL one worker process in turn "
              "and start it again; cost = the mock's requests and tokens per completed task (target for "
              "agentq: ≤ %.2f × uninterrupted)" % (g0["tasks"], g0.get("llm_calls_nominal") or 0,
                                                   g0.get("target_ratio") or 1.05))
        print()
        print("| S6 | settings | runs | completed | kills | LLM calls / task | calls / task p99 / max | "
              "tokens / task | wall s | calls ÷ uninterrupted | tokens ÷ uninterrupted | ≤ target |")
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|")
        for k in crash:
            g = groups[k]
            comp = "/".join("%d/%d" % (r["completed"], r["tasks"]) + ("" if r["completed"] == r["tasks"] else " ✗")
                            for r in g)
            ok = "–"
            if any("calls_ratio" in r for r in g):
                ok = "/".join(("calls ✓" if r.get("calls_ok") else "calls ✗") + ", " +
                              ("tokens ✓" if r.get("tokens_ok") else "tokens ✗") for r in g)
            print("| %s | %s | %d | %s | %s | %s | %s / %s | %s | %s | %s | %s | %s |" % (
                k[1], k[2], len(g), comp, span(g, "kills", 0), span(g, "calls_per_task", 3),
                span(g, "calls_per_task_p99", 0), span(g, "calls_per_task_max", 0),
                span(g, "tokens_per_task", 0), span(g, "wall_s", 1),
                span(g, "calls_ratio", 3), span(g, "tokens_ratio", 3), ok))

    raw = [k for k in keys if k[0] == "raw"]
    if raw:
        print()
        print("| raw limit | settings | ops | rate /s |")
        print("|---|---|--:|--:|")
        for k in raw:
            g = groups[k]
            print("| %s | %s | %s | %s |" % (k[1], k[2], span(g, "tasks", 0), span(g, "tasks_per_s", 0)))

    # Ratios: agentq's best against Celery's best in each scenario.
    ratios = []
    for sc in ("s1", "s2", "s0"):
        best = {}
        for k in keys:
            if k[0] != sc:
                continue
            v = med(groups[k], "tasks_per_s")
            if v is not None and (k[1] not in best or v > best[k[1]][0]):
                best[k[1]] = (v, k[2], med(groups[k], "pss_mb"))
        if "agentq" in best and "celery" in best and best["celery"][0]:
            aq, ce = best["agentq"], best["celery"]
            ratios.append("- %s: agentq %.1f tasks/s (%s) vs Celery's best %.1f tasks/s (%s): **%.1f×**"
                          % (sc.upper(), aq[0], aq[1], ce[0], ce[1], aq[0] / ce[0]))
    if lat:
        parts = ["%s (%s) %.2f / %.2f ms" % (k[1], k[2], med(groups[k], "enqueue_to_running_p50_ms") or 0,
                                            med(groups[k], "enqueue_to_running_p99_ms") or 0) for k in lat]
        ratios.append("- S4: enqueue→running p50 / p99: " + "; ".join(parts))
    raw_rate = [med(groups[k], "tasks_per_s") for k in raw if k[1] == "rabbitmq"]
    s0_aq = [med(groups[k], "tasks_per_s") for k in keys if k[0] == "s0" and k[1] == "agentq"]
    if raw_rate and s0_aq and raw_rate[0]:
        ratios.append("- S0: agentq end-to-end %.0f tasks/s = %.1f%% of the raw broker rate (%.0f msg/s)"
                      % (max(s0_aq), 100 * max(s0_aq) / raw_rate[0], raw_rate[0]))
    if ratios:
        print()
        print("\n".join(ratios))
    return 0


# ---------------------------------------------------------------- main --

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("batch", "latency"):
        s = sub.add_parser(name)
        s.add_argument("--system", choices=["agentq", "celery"], required=True)
        s.add_argument("--scenario", required=True)
        s.add_argument("--settings", required=True)
        s.add_argument("--tasks", type=int, required=True)
        s.add_argument("--goal", required=True)
        s.add_argument("--pids", type=lambda v: [int(x) for x in v.split(",") if x], default=[])
        s.add_argument("--mock-url", default="")
        s.add_argument("--mock-pid", type=int, default=0)
        s.add_argument("--metrics-url", default="")
        s.add_argument("--broker-pid", type=int, default=0)
        s.add_argument("--pg-pid", type=int, default=0)
        s.add_argument("--producer", default="")
        s.add_argument("--workdir", default="/tmp")
        s.add_argument("--timeout", type=float, default=600)
        s.add_argument("--ideal-s", type=float, default=0)
        s.add_argument("--ideal-plus-enqueue", type=int, default=0,
                       help="1: the ideal wall time includes the enqueueing time (S2)")
        s.add_argument("--sessions", type=int, default=0, help="in-flight sessions, for RSS per session")
        s.add_argument("--sample-s", type=float, default=0.5)
        s.add_argument("--poll-s", type=float, default=0.1)
        s.add_argument("--gap-s", type=float, default=0.05)
    b = sub.add_parser("burst")
    b.add_argument("--system", choices=["agentq", "celery"], required=True)
    b.add_argument("--scenario", default="s5")
    b.add_argument("--settings", required=True)
    b.add_argument("--burst-tasks", type=int, required=True)
    b.add_argument("--late-users", type=int, default=5)
    b.add_argument("--late-tasks", type=int, default=4, help="tasks per late user")
    b.add_argument("--late-delay-s", type=float, default=2.0, help="from the first publish")
    b.add_argument("--slots", type=int, required=True, help="task slots of the whole fleet")
    b.add_argument("--task-s", type=float, required=True, help="one task's nominal duration")
    b.add_argument("--goal", default="bench steps=1")
    b.add_argument("--pids", type=lambda v: [int(x) for x in v.split(",") if x], default=[])
    b.add_argument("--producer", default="")
    b.add_argument("--timeout", type=float, default=600)
    b.add_argument("--sample-s", type=float, default=0.5)
    b.add_argument("--poll-s", type=float, default=0.1)
    k = sub.add_parser("tokens")
    k.add_argument("--system", choices=["agentq"], default="agentq")
    k.add_argument("--scenario", default="s5t")
    k.add_argument("--settings", required=True)
    k.add_argument("--heavy-tasks", type=int, required=True)
    k.add_argument("--light-tasks", type=int, required=True)
    k.add_argument("--heavy-prompt-tokens", type=int, default=40000)
    k.add_argument("--light-prompt-tokens", type=int, default=1000)
    k.add_argument("--tpm", type=int, required=True, help="the workers' llm.tokens_per_minute")
    k.add_argument("--metrics-urls", type=lambda v: [x for x in v.split(",") if x], default=[])
    k.add_argument("--producer", required=True)
    k.add_argument("--timeout", type=float, default=600)
    k.add_argument("--sample-s", type=float, default=0.25)
    k.add_argument("--poll-s", type=float, default=0.2)
    x = sub.add_parser("crash")
    x.add_argument("--system", choices=["agentq", "celery"], required=True)
    x.add_argument("--scenario", default="s6")
    x.add_argument("--settings", required=True)
    x.add_argument("--mode", choices=["uninterrupted", "crash"], required=True)
    x.add_argument("--tasks", type=int, required=True)
    x.add_argument("--goal", default="bench steps=5", help="each task's goal is this + ' #i'")
    x.add_argument("--llm-calls", type=int, default=6, help="LLM calls of one uninterrupted task")
    x.add_argument("--producer", default="")
    x.add_argument("--start-file", default="", help="written just before the first publish")
    x.add_argument("--done-file", default="", help="written once every task is final")
    x.add_argument("--kill-log", default="", help="the kill loop's record (crash runs)")
    x.add_argument("--kill-every-s", type=float, default=0)
    x.add_argument("--baseline", default="", help="the uninterrupted run's JSON line")
    x.add_argument("--target-ratio", type=float, default=1.05)
    x.add_argument("--timeout", type=float, default=900)
    x.add_argument("--poll-s", type=float, default=0.1)
    for x in (b, k, x):
        x.add_argument("--mock-url", default="")
        x.add_argument("--mock-pid", type=int, default=0)
        x.add_argument("--broker-pid", type=int, default=0)
        x.add_argument("--pg-pid", type=int, default=0)
        x.add_argument("--workdir", default="/tmp")
    q = sub.add_parser("rate")
    q.add_argument("--scenario", default="s3b")
    q.add_argument("--settings", required=True)
    q.add_argument("--mode", default="steady", help="a label: steady or outage")
    q.add_argument("--providers", required=True, help="NAME=MOCK_URL,... in the config's order")
    q.add_argument("--rpm", type=float, required=True, help="each provider's requests/min")
    q.add_argument("--tasks", type=int, required=True)
    q.add_argument("--goal", default="bench steps=0")
    q.add_argument("--producer", required=True)
    q.add_argument("--window-start-s", type=float, default=5)
    q.add_argument("--window-s", type=float, default=60)
    q.add_argument("--start-file", default="", help="the first publish's epoch and monotonic times")
    q.add_argument("--outage-log", default="", help="lib.sh outage_loop's record (an outage run)")
    q.add_argument("--outage-provider", default="a")
    q.add_argument("--outage-how", default="fail")
    q.add_argument("--before", default="", help="NAME=FILE,...: a killed mock's GET /requests")
    q.add_argument("--pids", type=lambda v: [int(x) for x in v.split(",") if x], default=[])
    q.add_argument("--mock-pids", type=lambda v: [int(x) for x in v.split(",") if x], default=[])
    q.add_argument("--metrics-urls", type=lambda v: [x for x in v.split(",") if x], default=[])
    q.add_argument("--broker-pid", type=int, default=0)
    q.add_argument("--pg-pid", type=int, default=0)
    q.add_argument("--workdir", default="/tmp")
    q.add_argument("--sample-s", type=float, default=0.25)
    t = sub.add_parser("table")
    t.add_argument("results")
    a = p.parse_args()
    if a.cmd == "table":
        return cmd_table(a)
    if a.cmd == "batch":
        return cmd_batch(a)
    if a.cmd == "burst":
        return cmd_burst(a)
    if a.cmd == "tokens":
        return cmd_tokens(a)
    if a.cmd == "crash":
        return cmd_crash(a)
    if a.cmd == "rate":
        return cmd_rate(a)
    return cmd_latency(a)


if __name__ == "__main__":
    sys.exit(main())
