#!/usr/bin/python3
"""drive.py — the measuring side of bench/run: enqueues one run's tasks,
waits for their results in Postgres, samples the memory and CPU time of
the processes under test as the OS reports them, and prints one JSON line.
bench/run (through lib.sh) starts and stops the servers, the mock and the
workers; this file only measures.

  drive.py batch   --system agentq|celery ...  one throughput run (S1, S2, S0)
  drive.py latency --system agentq|celery ...  one task at a time (S4)
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
    order = {"s1": 0, "s2": 1, "s0": 2, "s4": 3, "raw": 4}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 9), k[1] != "agentq", k[1], k[2], k[3] or 0))

    print("| scenario | system | settings | tasks | runs | wall s | tasks/s | ideal tasks/s | "
          "peak RSS MB | peak PSS MB | worker CPU s | CPU µs / LLM call |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for k in keys:
        g = groups[k]
        if k[0] in ("s4", "raw"):
            continue
        print("| %s | %s | %s | %d | %d | %s | %s | %s | %s | %s | %s | %s |" % (
            k[0].upper(), k[1], k[2], g[0]["tasks"], len(g), span(g, "wall_s", 2), span(g, "tasks_per_s"),
            fmt(med(g, "ideal_tasks_per_s")), span(g, "rss_mb", 0), span(g, "pss_mb", 0),
            span(g, "cpu_s", 2), span(g, "cpu_us_per_llm_call", 0)))

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
    t = sub.add_parser("table")
    t.add_argument("results")
    a = p.parse_args()
    if a.cmd == "table":
        return cmd_table(a)
    if a.cmd == "batch":
        return cmd_batch(a)
    return cmd_latency(a)


if __name__ == "__main__":
    sys.exit(main())
