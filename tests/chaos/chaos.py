#!/usr/bin/python3
"""chaos.py -- the agentq chaos suite's driver (run it through tests/chaos/run).

Runs a real fleet against the private RabbitMQ and PostgreSQL that
tests/chaos/run started (scripts/testenv): `agentqctl migrate`, one
agentq-mockllm, three agentq-worker processes under a steady load published
with plain pika, while it

  * publishes 3% of the task ids a second time 0-2 s later (identical body,
    as a producer does after an uncertain confirm),
  * SIGKILLs a worker every few seconds and starts it again (each slot's
    log is appended to across its incarnations),
  * stops RabbitMQ for ~5 s once and restarts PostgreSQL once (same ports,
    same data: scripts/testenv rabbit-stop/rabbit-start/pg-stop/pg-start),
  * opens LLM fault windows of ~10 s through the mock's POST /control
    (5xx, malformed replies, 429 storms with Retry-After, hung requests),
  * publishes a hostile corpus alongside the load (invalid bodies, task id
    collisions, spoofed x-agentq-* headers, SSRF targets, a provider that
    echoes the API key, SQL meta-characters, a metadata number),

then waits (bounded) for the fleet to settle and checks, from Postgres and
the broker, that no task was lost or run twice and that the hostile corpus
got the treatment the contract promises (design.md, docs/contract.md).

It owns everything it starts (workers, mocks, the small HTTP servers of the
SSRF check) and stops it on the way out, also on failure, SIGINT or SIGTERM;
it never targets an address other than loopback and this host's own
interface addresses (see `offhost_target`). It does not own the servers:
tests/chaos/run starts and stops them.

Prints one line on stdout:
  chaos MODE: published=N completed=N other=STATUS:N,... lost=N duplicated=N
  kills=N restarts=rabbitmq:N,postgres:N,workers:N checks=OK|FAILED(n) (Ts)
and, before it on stderr, every failed check with the offending task ids and
their rows. Exit status: 0 all checks passed, 1 a check failed, 2 the run
itself could not be set up.
"""

import argparse
import hashlib
import http.server
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid

try:
    import pika
    import pika.exceptions
except ImportError:  # pragma: no cover - install-deps installs python3-pika
    sys.stderr.write("chaos: python3-pika is missing (run scripts/install-deps)\n")
    sys.exit(2)

FINAL = ("completed", "failed", "timeout", "budget_exceeded", "max_steps",
         "cancelled", "expired", "rejected")

# Everything a mode changes. Times are seconds from the start of the load.
MODES = {
    "short": dict(
        tasks=320, load_s=50, kill_first=3, kill_every=6, settle_s=50,
        faults=[(5, {"fail_rate": 0.5}, 8, "5xx"),
                (26, {"storm_seconds": 6, "retry_after": 2}, 6, "429 storm"),
                (38, {"hang_rate": 0.2}, 6, "hung requests")],
        rabbit=[(14, 5)], postgres=[(33, 2)], hostile=[1]),
    "long": dict(
        tasks=3000, load_s=330, kill_first=5, kill_every=11, settle_s=150,
        faults=[(20, {"fail_rate": 0.5}, 10, "5xx"),
                (50, {"malformed_rate": 0.3}, 10, "malformed"),
                (80, {"storm_seconds": 10, "retry_after": 2}, 10, "429 storm"),
                (110, {"hang_rate": 0.2}, 10, "hung requests"),
                (170, {"fail_rate": 0.5}, 10, "5xx"),
                (230, {"malformed_rate": 0.3}, 10, "malformed"),
                (260, {"storm_seconds": 10, "retry_after": 3}, 10, "429 storm"),
                (290, {"hang_rate": 0.3}, 10, "hung requests")],
        rabbit=[(140, 5)], postgres=[(200, 3)], hostile=[1, 150]),
}

WORKERS = 3
DUP_SHARE = 0.03
T0 = time.monotonic()


def log(msg):
    sys.stderr.write("chaos[%6.1fs]: %s\n" % (time.monotonic() - T0, msg))
    sys.stderr.flush()


class Stop(Exception):
    """Raised in the main thread by SIGTERM (SIGINT raises KeyboardInterrupt)."""


# ---------------------------------------------------------------- plumbing --

class Env:
    """Where everything is: paths, the servers' coordinates, the DSN."""

    def __init__(self, args):
        self.dir = args.dir
        self.build = args.build
        self.root = args.root
        self.logdir = os.path.join(self.dir, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.servers = os.path.join(self.dir, "servers")
        self.testenv = os.path.join(self.root, "scripts", "testenv")
        env = {}
        with open(os.path.join(self.servers, "env")) as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition("=")
                if k:
                    env[k] = v
        self.amqp_url = env["AGENTQ_TEST_AMQP_URL"]
        self.rabbitmqctl = env["AGENTQ_TEST_RABBITMQCTL"]
        self.pg_host = env["AGENTQ_TEST_PG_HOST"]
        self.pg_port = env["AGENTQ_TEST_PG_PORT"]
        self.psql = os.path.join(env["AGENTQ_TEST_PG_BINDIR"], "psql")
        self.db = "agentq_chaos"
        self.dsn = "host=%s port=%s user=postgres dbname=%s" % (self.pg_host, self.pg_port, self.db)
        self.admin_dsn = env["AGENTQ_TEST_PG_DSN"]
        self.pidfile = os.path.join(self.dir, "pids")

    def bin(self, name):
        return os.path.join(self.build, name)

    def note_pid(self, pid, what):
        """tests/chaos/run kills what is listed here should this driver die."""
        with open(self.pidfile, "a") as f:
            f.write("%d %s\n" % (pid, what))


E = None  # the Env, once main() has one


class SqlError(Exception):
    pass


def sql(q, dsn=None, timeout=60):
    """Runs q with psql; returns its unaligned output. Raises SqlError."""
    try:
        r = subprocess.run([E.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            "-d", dsn or E.dsn, "-c", q],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SqlError("psql timed out after %ds" % timeout)
    if r.returncode != 0:
        raise SqlError(r.stderr.decode("utf-8", "replace").strip() or "psql exit %d" % r.returncode)
    return r.stdout.decode("utf-8", "replace").strip()


def sql_rows(q, **kw):
    """The rows of query q as a list of dicts."""
    out = sql("SELECT coalesce(json_agg(t), '[]'::json) FROM (%s) t" % q, **kw)
    return json.loads(out or "[]")


def lit(s):
    """A SQL string literal (standard_conforming_strings is on)."""
    return "'" + s.replace("'", "''") + "'"


def testenv(verb):
    t = time.monotonic()
    r = subprocess.run([E.testenv, verb, E.servers], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=180)
    out = (r.stdout + r.stderr).decode("utf-8", "replace").strip()
    if r.returncode != 0:
        log("testenv %s failed:\n%s" % (verb, out))
        raise RuntimeError("testenv %s failed: %s" % (verb, " / ".join(out.splitlines()[-3:])))
    log("testenv %s: %s (%.1fs)" % (verb, out.splitlines()[-1] if out else "ok", time.monotonic() - t))


def list_queues():
    """{queue: (ready, unacked)} from rabbitmqctl; raises on failure."""
    r = subprocess.run([E.rabbitmqctl, "-q", "list_queues", "--no-table-headers", "name",
                        "messages_ready", "messages_unacknowledged"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("rabbitmqctl list_queues: " + r.stderr.decode("utf-8", "replace").strip())
    qs = {}
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) >= 3 and parts[1].isdigit() and parts[2].isdigit():
            qs[parts[0]] = (int(parts[1]), int(parts[2]))
    return qs


def http_json(url, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def wait_port_file(path, proc, what, seconds=10):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s at start" % (what, proc.returncode))
        try:
            with open(path) as f:
                port = int(f.read().strip() or 0)
            if port:
                return port
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError("%s wrote no port file in %ds" % (what, seconds))


# ---------------------------------------------------------------- publisher --

class PublishFailed(Exception):
    pass


class Publisher:
    """One pika connection with publisher confirms. publish() returns only
    once the broker confirmed the message; a publish cut off by a lost
    connection is sent again (it may then exist twice, as with any producer
    that retries an uncertain confirm)."""

    def __init__(self, url, stop):
        self.url = url
        self.stop = stop
        self.conn = None
        self.ch = None
        self.resent = 0

    def _connect(self):
        p = pika.URLParameters(self.url)
        p.heartbeat = 10
        p.socket_timeout = 3
        p.blocked_connection_timeout = 15
        p.connection_attempts = 1
        self.conn = pika.BlockingConnection(p)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def _drop(self):
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:
            pass
        self.conn = self.ch = None

    def publish(self, exchange, body, props, timeout=120):
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            try:
                if self.ch is None:
                    self._connect()
                self.ch.basic_publish(exchange, "task", body, props, mandatory=True)
                if tries:
                    self.resent += 1
                return
            except pika.exceptions.UnroutableError:
                time.sleep(0.3)  # the workers have not declared the topology yet
            except (pika.exceptions.AMQPError, OSError):
                self._drop()
                time.sleep(0.5)
            tries += 1
            if self.stop.is_set():
                raise PublishFailed("the run is stopping")
            if time.monotonic() > deadline:
                raise PublishFailed("no confirm for a publish to %s after %ds" % (exchange, timeout))

    def close(self):
        self._drop()


def props_for(task_id, priority=0, headers=None, message_id=True):
    return pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                priority=priority, headers=headers,
                                message_id=task_id if message_id else None,
                                timestamp=int(time.time()))


# ------------------------------------------------------------------- ledger --

class Ledger:
    """Every task id the driver published (once confirmed), with what it was."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tasks = {}      # task_id -> dict(kind, body, ...)
        self.dup_publishes = 0
        self.hostile = []    # case dicts, see Hostile

    def add(self, task_id, kind, body=None, **extra):
        with self.lock:
            if task_id not in self.tasks:
                self.tasks[task_id] = dict(kind=kind, body=body, **extra)

    def ids(self, kinds=None):
        with self.lock:
            return [t for t, v in self.tasks.items() if kinds is None or v["kind"] in kinds]


# -------------------------------------------------------------------- fleet --

class Fleet:
    """The worker slots: start, SIGKILL, restart; notices a worker that exits
    without being killed (that is a failure: it should live through every
    outage)."""

    def __init__(self, base_env, extra_args):
        self.base_env = base_env
        self.extra_args = extra_args
        self.lock = threading.Lock()
        self.procs = {}
        self.incarnation = {}
        self.kills = 0
        self.restarts = 0
        self.unexpected = []   # (slot, incarnation, exit status)

    def start(self, slot):
        with self.lock:
            n = self.incarnation.get(slot, 0) + 1
            self.incarnation[slot] = n
            env = dict(self.base_env, AGENTQ_WORKER_ID="chaos-w%d-%d" % (slot, n))
            path = os.path.join(E.logdir, "worker-%d.log" % slot)
            with open(path, "ab") as f:
                f.write(("=== chaos: worker slot %d, incarnation %d, at %.1fs ===\n"
                         % (slot, n, time.monotonic() - T0)).encode())
                p = subprocess.Popen([E.bin("agentq-worker")] + self.extra_args, env=env,
                                     stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
            E.note_pid(p.pid, "agentq-worker")
            self.procs[slot] = p
            if n > 1:
                self.restarts += 1

    def kill(self, slot):
        with self.lock:
            p = self.procs.get(slot)
            if p is None or p.poll() is not None:
                return False
            p.send_signal(signal.SIGKILL)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.kills += 1
            self.procs[slot] = None
            log("SIGKILL worker slot %d (pid %d, incarnation %d)" % (slot, p.pid, self.incarnation[slot]))
            return True

    def reap(self):
        """Restarts a worker that exited by itself, and records it."""
        dead = []
        with self.lock:
            for slot, p in self.procs.items():
                if p is not None and p.poll() is not None:
                    self.unexpected.append((slot, self.incarnation[slot], p.returncode))
                    log("worker slot %d exited by itself with status %s" % (slot, p.returncode))
                    self.procs[slot] = None
                    dead.append(slot)
        for slot in dead:
            if sum(1 for u in self.unexpected if u[0] == slot) <= 5:
                self.start(slot)

    def stop_all(self, grace=8):
        with self.lock:
            procs = [p for p in self.procs.values() if p is not None]
            self.procs = {s: None for s in self.procs}
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def stop_proc(p, grace=5):
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


# ------------------------------------------------------ SSRF test servers --

class Site:
    """A tiny HTTP server on (host, 0) that counts the paths it was asked for;
    /secret-* answers the marker, /redirect-* a 302 to `redirect_to`."""

    def __init__(self, host, marker, redirect_to=None):
        self.hits = {}
        self.lock = threading.Lock()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with site.lock:
                    site.hits[self.path] = site.hits.get(self.path, 0) + 1
                if self.path.startswith("/redirect") and redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = ("the secret page: %s\n" % marker).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def hits_on(self, prefix):
        with self.lock:
            return sum(n for p, n in self.hits.items() if p.startswith(prefix))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def own_addresses():
    """This host's non-loopback IPv4 interface addresses."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                             capture_output=True, timeout=10).stdout.decode()
        addrs = re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out)
    except (OSError, subprocess.TimeoutExpired):
        addrs = []
    if not addrs:
        try:
            out = subprocess.run(["hostname", "-I"], capture_output=True, timeout=10).stdout.decode()
            addrs = [a for a in out.split() if re.match(r"^\d+\.\d+\.\d+\.\d+$", a) and not a.startswith("127.")]
        except (OSError, subprocess.TimeoutExpired):
            addrs = []
    return addrs


def offhost_target(addr):
    """May a task make the worker's http_get try `addr`, which is neither
    loopback nor ours? Only if no packet could leave this host should the
    worker fail to refuse it: when there is no route to it, or when
    CHAOS_SSRF_OFFHOST (comma-separated) names it. Returns (ok, why)."""
    allowed = [a.strip() for a in os.environ.get("CHAOS_SSRF_OFFHOST", "").split(",") if a.strip()]
    if addr in allowed:
        return True, "allowed by CHAOS_SSRF_OFFHOST"
    try:
        r = subprocess.run(["ip", "route", "get", addr], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False, "cannot ask `ip route` whether it is reachable"
    out = (r.stdout + r.stderr).decode().strip()
    if r.returncode != 0 or re.search(r"\b(unreachable|prohibit|blackhole)\b", out):
        return True, "no route from this host"
    route = out.splitlines()[0] if out else "?"
    return False, ("reachable from this host (%s): not targeted, so a worker that fails to "
                   "refuse it cannot reach a real host; set CHAOS_SSRF_OFFHOST=%s where that "
                   "is harmless" % (route, addr))


# --------------------------------------------------------------- the load --

def load_task(i, rng):
    tid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    body = {"task_id": tid, "user_id": "user%d" % rng.randrange(8), "max_steps": 10,
            "timeout_seconds": 20, "skills": ["calculator"], "metadata": {"chaos": "load", "seq": i}}
    r = rng.random()
    if r < 0.015:    # ends max_steps
        body["goal"] = "chaos load %d loop" % i
        body["max_steps"] = 3
    elif r < 0.03:   # ends failed at once (a 400 from the provider)
        body["goal"] = "chaos load %d fail=400" % i
    elif r < 0.04:   # ends timeout (each LLM reply takes 2.5 s)
        body["goal"] = "chaos load %d sleep=2500" % i
        body["timeout_seconds"] = 1.5
    else:
        body["goal"] = "chaos load %d steps=%d" % (i, rng.randint(1, 3))
    return tid, body, rng.choice([0, 0, 0, 1, 3, 5])


def run_load(cfg, ledger, stop, rng, errors):
    pub = Publisher(E.amqp_url, stop)
    dups = []  # (due, tid, body bytes, priority)
    n, rate = cfg["tasks"], cfg["tasks"] / float(cfg["load_s"])
    start = time.monotonic()
    try:
        for i in range(n):
            due = start + i / rate
            while not stop.is_set():
                now = time.monotonic()
                dups.sort(key=lambda d: d[0])
                if dups and dups[0][0] <= now:
                    _, tid, raw, prio = dups.pop(0)
                    pub.publish("agentq", raw, props_for(tid, prio))
                    ledger.dup_publishes += 1
                    continue
                if now >= due:
                    break
                time.sleep(min(0.05, due - now))
            if stop.is_set():
                return
            tid, body, prio = load_task(i, rng)
            raw = json.dumps(body).encode()
            pub.publish("agentq", raw, props_for(tid, prio))
            ledger.add(tid, "load", body)
            if rng.random() < DUP_SHARE:
                dups.append((time.monotonic() + rng.uniform(0, 2), tid, raw, prio))
        for due, tid, raw, prio in sorted(dups):
            while time.monotonic() < due and not stop.is_set():
                time.sleep(0.05)
            pub.publish("agentq", raw, props_for(tid, prio))
            ledger.dup_publishes += 1
        log("load: %d tasks published, %d duplicate publishes, %d publishes resent after a lost "
            "connection" % (n, ledger.dup_publishes, pub.resent))
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        errors.append("load publisher: %s" % e)
        log("load publisher failed: %s" % e)
    finally:
        pub.close()


# ------------------------------------------------------------------ chaos --

class Chaos:
    def __init__(self, cfg, fleet, mock_url, stop, rng, errors):
        self.cfg, self.fleet, self.mock_url = cfg, fleet, mock_url
        self.stop, self.rng, self.errors = stop, rng, errors
        self.rabbit_restarts = 0
        self.pg_restarts = 0
        self.windows = []

    def sleep_until(self, t):
        while not self.stop.is_set() and time.monotonic() - self.start < t:
            time.sleep(0.1)
        return not self.stop.is_set()

    def kills(self):
        """SIGKILL a worker every kill_every seconds; restart it at once."""
        t = self.cfg["kill_first"]
        slot = self.rng.randrange(WORKERS)
        try:
            while t < self.cfg["load_s"] - 2:
                while not self.stop.is_set() and time.monotonic() - self.start < t:
                    self.fleet.reap()
                    time.sleep(0.2)
                if self.stop.is_set():
                    return
                slot = (slot + 1 + self.rng.randrange(WORKERS - 1)) % WORKERS
                if self.fleet.kill(slot):
                    time.sleep(self.rng.uniform(0.2, 1.0))
                    self.fleet.start(slot)
                t += self.cfg["kill_every"]
            while not self.stop.is_set() and time.monotonic() - self.start < self.cfg["load_s"] + 1:
                self.fleet.reap()
                time.sleep(0.2)
        except Exception as e:  # noqa: BLE001
            self.errors.append("kill loop: %s" % e)
            log("kill loop failed: %s" % traceback.format_exc())

    def control(self, body):
        for _ in range(20):
            try:
                return http_json(self.mock_url + "/control", body)
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise RuntimeError("the mock's /control does not answer")

    def events(self):
        """Fault windows and server outages, in time order, one at a time."""
        ev = []
        for at, body, length, name in self.cfg["faults"]:
            ev.append((at, "fault", (body, length, name)))
        for at, down in self.cfg["rabbit"]:
            ev.append((at, "rabbit", down))
        for at, down in self.cfg["postgres"]:
            ev.append((at, "postgres", down))
        ev.sort(key=lambda e: e[0])
        open_fault = None  # (end, name)
        for at, kind, arg in ev:
            try:
                if open_fault and open_fault[0] <= at:
                    if not self.sleep_until(open_fault[0]):
                        return
                    self.control({})
                    log("fault window closed: %s" % open_fault[1])
                    open_fault = None
                if not self.sleep_until(at):
                    return
                if kind == "fault":
                    body, length, name = arg
                    if open_fault:
                        self.control({})
                    self.control(body)
                    self.windows.append(name)
                    log("fault window open for %ds: %s %s" % (length, name, json.dumps(body)))
                    open_fault = (at + length, name)
                elif kind == "rabbit":
                    testenv("rabbit-stop")
                    time.sleep(arg)
                    testenv("rabbit-start")
                    self.rabbit_restarts += 1
                else:
                    testenv("pg-stop")
                    time.sleep(arg)
                    testenv("pg-start")
                    self.pg_restarts += 1
            except Exception as e:  # noqa: BLE001 - reported as a failed check
                self.errors.append("chaos event %s at %ss: %s" % (kind, at, e))
                log("chaos event %s failed: %s" % (kind, traceback.format_exc()))
                # leave the servers up for the rest of the run and the checks
                for verb in ("rabbit-start", "pg-start"):
                    try:
                        testenv(verb)
                    except Exception as e2:  # noqa: BLE001
                        self.errors.append("%s after a failure: %s" % (verb, e2))
        try:
            if open_fault:
                self.sleep_until(open_fault[0])
                self.control({})
                log("fault window closed: %s" % open_fault[1])
        except Exception as e:  # noqa: BLE001
            self.errors.append("closing the last fault window: %s" % e)


# ---------------------------------------------------------- hostile corpus --

SQL_USER = "o'brien\"; DROP TABLE agentq.tasks; --"
SQL_GOAL = ("sql meta steps=1 ' '' \" ; -- /* */ $$ $1 \\ \\\\ %s %% E'\\x41' \\' ?; "
            "SELECT pg_sleep(10); -- \u00e9\u4e2d\U0001f600")
SQL_META = {"q": "'; DELETE FROM agentq.steps; --", "k'ey": "va\"lue", "b\\s": "\\x00",
            "dollar": "$$ $tag$ x $tag$", "nested": {"a": ["x'y", "$$", None, True]}}


class Hostile:
    """Publishes the hostile corpus; every case is recorded in the ledger
    (ledger.hostile) with what the checks expect of it."""

    def __init__(self, ledger, stop, errors, sites, echo_exchange, marker):
        self.ledger, self.stop, self.errors = ledger, stop, errors
        self.sites, self.echo_exchange, self.marker = sites, echo_exchange, marker
        self.pub = None

    def case(self, **c):
        self.ledger.hostile.append(c)
        return c

    def publish(self, exchange, raw, props):
        self.pub.publish(exchange, raw, props)

    def wait_status(self, tid, want, seconds):
        """Polls until the row's status is in `want`; returns the status seen."""
        deadline = time.monotonic() + seconds
        st = None
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                rows = sql_rows("SELECT status FROM agentq.tasks WHERE task_id = %s" % lit(tid))
                st = rows[0]["status"] if rows else None
                if st in want:
                    return st
            except SqlError:
                pass
            time.sleep(0.2)
        return st

    def run(self, round_no):
        self.pub = Publisher(E.amqp_url, self.stop)
        try:
            self.invalid_bodies(round_no)
            self.headers_and_values(round_no)
            self.ssrf(round_no)
            if round_no == 0:
                self.echo()
            self.collisions(round_no)
        except Exception as e:  # noqa: BLE001
            self.errors.append("hostile corpus: %s" % e)
            log("hostile corpus failed: %s" % traceback.format_exc())
        finally:
            self.pub.close()

    def invalid_bodies(self, rn):
        def tid():
            return str(uuid.uuid4())

        cases = []
        i = tid()
        cases.append(("not JSON", b"this is { not json", i, ["body", "JSON"], True))
        i = tid()
        cases.append(("wrong type: user_id 5",
                      json.dumps({"task_id": i, "user_id": 5, "goal": "g"}).encode(), i, ["user_id"], True))
        i = tid()
        cases.append(("out of range: max_steps 0",
                      json.dumps({"task_id": i, "user_id": "h", "goal": "g", "max_steps": 0}).encode(),
                      i, ["max_steps"], True))
        i = tid()
        cases.append(("out of range: timeout_seconds 1e9",
                      json.dumps({"task_id": i, "user_id": "h", "goal": "g", "timeout_seconds": 1e9}).encode(),
                      i, ["timeout_seconds"], True))
        i = tid()
        cases.append(("out of range: budget_usd -1",
                      json.dumps({"task_id": i, "user_id": "h", "goal": "g", "budget_usd": -1}).encode(),
                      i, ["budget_usd"], True))
        i = tid()
        cases.append(("unknown field colour",
                      json.dumps({"task_id": i, "user_id": "h", "goal": "g", "colour": "red"}).encode(),
                      i, ["colour"], True))
        i = tid()
        cases.append(("missing field goal", json.dumps({"task_id": i, "user_id": "h"}).encode(),
                      i, ["goal"], True))
        i = tid()
        cases.append(("invalid UTF-8 in goal",
                      b'{"task_id":"' + i.encode() + b'","user_id":"h","goal":"bad \xff\xfe bytes"}',
                      i, ["goal", "UTF-8"], True))
        i = tid()
        cases.append(("huge goal (300 KiB, over the 256 KiB cap)",
                      json.dumps({"task_id": i, "user_id": "h", "goal": "x" * (300 << 10)}).encode(),
                      i, ["goal"], True))
        i = tid()
        cases.append(("duplicate key user_id",
                      ('{"task_id":"%s","user_id":"a","user_id":"b","goal":"g"}' % i).encode(),
                      i, ["user_id", "duplicate"], True))
        # a task_id that is not a UUID: no id to record it under, so no row
        cases.append(("task_id not a UUID",
                      json.dumps({"task_id": "not-a-uuid-%d" % rn, "user_id": "h", "goal": "g"}).encode(),
                      None, ["task_id"], False))
        for name, raw, i, needles, has_id in cases:
            self.publish("agentq", raw, props_for(i or str(uuid.uuid4()), message_id=has_id))
            self.case(kind="invalid", name=name, task_id=i if has_id else None,
                      md5=hashlib.md5(raw).hexdigest(), needles=needles)
            if has_id:
                self.ledger.add(i, "hostile-invalid", None, name=name)
        log("hostile: %d invalid bodies published" % len(cases))

    def valid(self, kind, body, name, headers=None, exchange="agentq"):
        raw = json.dumps(body).encode()
        self.publish(exchange, raw, props_for(body["task_id"], headers=headers))
        self.ledger.add(body["task_id"], kind, body, name=name)
        return body["task_id"]

    def headers_and_values(self, rn):
        t = self.valid("hostile", {"task_id": str(uuid.uuid4()), "user_id": "spoof",
                                   "goal": "spoofed attempt steps=1", "timeout_seconds": 20},
                       "x-agentq-attempt 99", headers={"x-agentq-attempt": 99})
        self.case(kind="spoof_attempt", task_id=t)
        t = self.valid("hostile", {"task_id": str(uuid.uuid4()), "user_id": "spoof",
                                   "goal": "spoofed deadline steps=1", "timeout_seconds": 20},
                       "x-agentq-deadline 1", headers={"x-agentq-deadline": 1})
        self.case(kind="spoof_deadline", task_id=t)
        t = self.valid("hostile", {"task_id": str(uuid.uuid4()), "user_id": SQL_USER, "goal": SQL_GOAL,
                                   "timeout_seconds": 20, "metadata": SQL_META}, "SQL meta-characters")
        self.case(kind="sql", task_id=t)
        # json.dumps writes 3.14159 as 3.14159: exactly what a producer sends
        t = self.valid("hostile", {"task_id": str(uuid.uuid4()), "user_id": "meta",
                                   "goal": "metadata number steps=1", "timeout_seconds": 20,
                                   "metadata": {"x": 3.14159, "y": 0.1, "n": 42}}, "metadata number")
        self.case(kind="metadata_number", task_id=t)
        log("hostile: spoofed headers, SQL meta-characters and a metadata number published")

    def ssrf(self, rn):
        lo, own, redir = self.sites["lo"], self.sites.get("own"), self.sites["redirect"]
        targets = [("127.0.0.1", "http://127.0.0.1:%d/secret-direct-%d" % (lo.port, rn), "/secret-direct")]
        if own:
            targets.append(("own interface %s" % own.host, "http://%s:%d/secret-own-%d" % (own.host, own.port, rn),
                            "/secret-own"))
        targets.append(("redirect from localhost to 127.0.0.1",
                        "http://localhost:%d/redirect-%d" % (redir.port, rn), "/secret-redirected"))
        for addr, url in (("169.254.169.254", "http://169.254.169.254/chaos-ssrf-probe"),
                          ("192.0.2.1", "http://192.0.2.1/chaos-ssrf-probe")):
            ok, why = offhost_target(addr)
            if ok:
                targets.append((addr, url, None))
            else:
                self.case(kind="ssrf_skipped", target=addr, why=why)
        for name, url, secret_path in targets:
            t = self.valid("hostile", {"task_id": str(uuid.uuid4()), "user_id": "ssrf",
                                       "goal": "ssrf probe steps=1 tool=http_get url=%s" % url,
                                       "skills": ["http_get"], "max_steps": 4, "timeout_seconds": 25},
                           "SSRF " + name)
            self.case(kind="ssrf", task_id=t, target=name, url=url, secret_path=secret_path)
        log("hostile: %d SSRF probes published" % len(targets))

    def echo(self):
        for k in range(3):
            t = self.valid("echo", {"task_id": str(uuid.uuid4()), "user_id": "echo",
                                    "goal": "echo the key steps=1 %d" % k, "timeout_seconds": 20},
                           "key echo", exchange=self.echo_exchange)
            self.case(kind="echo", task_id=t)
        log("hostile: 3 tasks published to the worker with a wrong key")

    def collisions(self, rn):
        # 1. a twin (same id, other user and goal) of a task that is running
        orig = {"task_id": str(uuid.uuid4()), "user_id": "alice",
                "goal": "collision original steps=2 sleep=1200", "max_steps": 10, "timeout_seconds": 30}
        self.valid("hostile", orig, "collision original")
        seen = self.wait_status(orig["task_id"], ("running",) + FINAL, 25)
        twin = {"task_id": orig["task_id"], "user_id": "mallory",
                "goal": "collision twin: overwrite steps=1", "max_steps": 10, "timeout_seconds": 30}
        twin_raw = json.dumps(twin).encode()
        self.publish("agentq", twin_raw, props_for(orig["task_id"]))
        self.case(kind="collision", task_id=orig["task_id"], orig=orig, twin=twin,
                  twin_md5=hashlib.md5(twin_raw).hexdigest(), seen_before_twin=seen)
        log("hostile: collision twin published (original was %s)" % seen)

        # 2. a malformed twin while the original runs, 3. one after it ended
        for when in ("running", "final"):
            o = {"task_id": str(uuid.uuid4()), "user_id": "bob",
                 "goal": "malformed twin target steps=1%s" % (" sleep=1200" if when == "running" else ""),
                 "timeout_seconds": 30}
            self.valid("hostile", o, "malformed-twin original (%s)" % when)
            want = ("running",) + FINAL if when == "running" else FINAL
            seen = self.wait_status(o["task_id"], want, 40)
            bad = json.dumps({"task_id": o["task_id"], "user_id": 5, "goal": "x"}).encode()
            self.publish("agentq", bad, props_for(o["task_id"]))
            self.case(kind="malformed_twin", task_id=o["task_id"], when=when, seen_before_twin=seen,
                      twin_md5=hashlib.md5(bad).hexdigest())
            log("hostile: malformed twin published (original was %s)" % seen)


# ----------------------------------------------------------------- checks --

class Checks:
    def __init__(self):
        self.results = []  # (name, ok, detail)

    def add(self, name, ok, detail=""):
        self.results.append((name, ok, detail))
        return ok

    def failed(self):
        return [r for r in self.results if not r[1]]


def describe(tids, limit=5):
    """Rows of up to `limit` tasks, for a failure message."""
    tids = list(tids)[:limit]
    if not tids:
        return ""
    inl = ",".join(lit(t) for t in tids)
    out = []
    try:
        rows = {r["task_id"]: r for r in sql_rows(
            "SELECT task_id::text, status, attempt, left(user_id, 60) AS user_id, left(goal, 80) AS goal, "
            "left(error, 240) AS error, worker_id, steps FROM agentq.tasks WHERE task_id::text IN (%s)" % inl)}
        steps = {}
        for r in sql_rows("SELECT task_id::text, attempt, step, kind, seq, status, left(detail::text, 120) AS d "
                          "FROM agentq.steps WHERE task_id::text IN (%s) ORDER BY task_id, attempt, step, kind, seq"
                          % inl):
            steps.setdefault(r["task_id"], []).append(
                "a%s/s%s/%s%s:%s" % (r["attempt"], r["step"], r["kind"], "" if not r["seq"] else "#%s" % r["seq"],
                                     r["status"]))
        dls = {}
        for r in sql_rows("SELECT task_id::text, reason, left(error, 160) AS error FROM agentq.dead_letters "
                          "WHERE task_id::text IN (%s) ORDER BY id" % inl):
            dls.setdefault(r["task_id"], []).append("%s: %s" % (r["reason"], r["error"]))
        trans = {}
        for r in sql_rows("SELECT task_id::text, old_status, new_status, attempt, worker_id FROM chaos.status_log "
                          "WHERE task_id::text IN (%s) ORDER BY id" % inl):
            trans.setdefault(r["task_id"], []).append(
                "%s->%s(a%s,%s)" % (r["old_status"], r["new_status"], r["attempt"], r["worker_id"]))
    except SqlError as e:
        return "    (cannot read the rows: %s)" % e
    for t in tids:
        out.append("    %s row=%s" % (t, json.dumps(rows.get(t), ensure_ascii=False)))
        out.append("      statuses: %s" % " ".join(trans.get(t, ["(none logged)"])))
        out.append("      steps: %s" % (" ".join(steps.get(t, [])) or "(none)"))
        if t in dls:
            out.append("      dead letters: %s" % " | ".join(dls[t]))
    return "\n".join(out)


def run_checks(ledger, fleet, chaos, sites, echo_key, marker, queues_end, driver_errors, cfg):
    c = Checks()
    tasks = {r["id"]: r for r in sql_rows(
        "SELECT task_id::text AS id, status, attempt, user_id, goal, error, left(result, 400) AS result, "
        "metadata FROM agentq.tasks")}
    published = ledger.ids()
    dl_rows = sql_rows("SELECT id, task_id::text AS task_id, reason, error, md5(body) AS md5 FROM agentq.dead_letters")
    dl_by_task, dl_by_md5 = {}, {}
    for d in dl_rows:
        if d["task_id"]:
            dl_by_task.setdefault(d["task_id"], []).append(d)
        dl_by_md5.setdefault(d["md5"], []).append(d)

    # -- the run itself
    c.add("driver", not driver_errors, "; ".join(driver_errors))
    c.add("workers_alive", not fleet.unexpected,
          "workers exited without being killed (slot, incarnation, status): %s" % fleet.unexpected)

    # -- no task lost (the invalid bodies of the hostile corpus are judged
    # by hostile_invalid_rejected instead)
    valid = [t for t in published if ledger.tasks[t]["kind"] != "hostile-invalid"]
    no_final = [t for t in valid if tasks.get(t, {}).get("status") not in FINAL]
    lost = [t for t in no_final if t not in dl_by_task]
    c.add("lost", not lost, "%d published task ids have neither a final row nor a dead letter:\n%s"
          % (len(lost), describe(lost)))
    c.add("final_row", not no_final, "%d published task ids have no final status row:\n%s"
          % (len(no_final), describe(no_final)))

    # -- no task run twice
    twice = sql_rows(
        "SELECT task_id::text AS id, array_agg(DISTINCT attempt ORDER BY attempt) AS attempts FROM agentq.steps "
        "WHERE kind = 'llm' AND status = 'ok' AND detail->>'tool_calls' = '0' "
        "GROUP BY task_id HAVING count(DISTINCT attempt) > 1")
    duplicated = [r["id"] for r in twice]
    c.add("run_once", not duplicated,
          "%d tasks ran more than one attempt to a final answer (an llm step, status ok, tool_calls 0, in "
          "each of several attempts):\n%s" % (len(duplicated), describe(duplicated)))
    no_answer = sql_rows(
        "SELECT task_id::text AS id FROM agentq.tasks t WHERE status = 'completed' AND NOT EXISTS ("
        "SELECT 1 FROM agentq.steps s WHERE s.task_id = t.task_id AND s.kind = 'llm' AND s.status = 'ok' "
        "AND s.detail->>'tool_calls' = '0')")
    c.add("completed_has_answer", not no_answer,
          "%d completed tasks have no final-answer step:\n%s" % (len(no_answer), describe([r["id"] for r in no_answer])))
    # The attempt that completed a task wrote each of its steps once: one
    # answered LLM call per step, one row per tool call.
    doubled = sql_rows(
        "SELECT s.task_id::text AS id, s.step, s.kind, count(*) AS n "
        "FROM agentq.steps s JOIN agentq.tasks t ON t.task_id = s.task_id AND t.attempt = s.attempt "
        "WHERE t.status = 'completed' AND s.status = 'ok' "
        "GROUP BY s.task_id, s.step, s.kind, CASE WHEN s.kind = 'tool' THEN s.seq END HAVING count(*) > 1")
    ids = sorted({r["id"] for r in doubled})
    c.add("doubled_steps", not doubled,
          "%d completed attempts have a step written more than once, e.g. %s:\n%s"
          % (len(ids), ", ".join("%s step %s %s x%s" % (r["id"][:8], r["step"], r["kind"], r["n"])
                                 for r in doubled[:5]), describe(ids)))
    # Not a check: how much interrupted or retried tasks ran again. A new
    # attempt resumes at the last committed step, so a step's reply is
    # recorded twice only when a worker cut off from the database longer
    # than a lease kept writing for an attempt that had been taken over.
    again = sql_rows(
        "SELECT count(*) AS steps, count(DISTINCT task_id) AS tasks FROM ("
        " SELECT s.task_id, s.step FROM agentq.steps s JOIN agentq.tasks t USING (task_id)"
        " WHERE t.status = 'completed' AND s.kind = 'llm' AND s.status = 'ok'"
        " GROUP BY 1, 2 HAVING count(*) > 1) d")
    resumed = sql_rows(
        "SELECT count(*) AS n FROM agentq.tasks WHERE status = 'completed' AND attempt > 1")
    log("note: %s completed tasks ran more than one attempt; %s steps of %s tasks have their LLM reply "
        "recorded twice (a new attempt resumes at the last committed step)"
        % (resumed[0]["n"], again[0]["steps"], again[0]["tasks"]))
    flips = sql_rows(
        "SELECT task_id::text AS id, old_status, new_status FROM chaos.status_log "
        "WHERE old_status IN %s AND new_status IS DISTINCT FROM old_status ORDER BY id" % (FINAL,))
    ids = sorted({r["id"] for r in flips})
    c.add("final_status_kept", not flips,
          "%d tasks left a final status (%s):\n%s"
          % (len(ids), ", ".join("%s %s->%s" % (r["id"][:8], r["old_status"], r["new_status"]) for r in flips[:8]),
             describe(ids)))

    # -- the broker is empty
    busy = {q: v for q, v in queues_end.items() if v != (0, 0)}
    c.add("queues_drained", not busy and bool(queues_end),
          "queues not empty after the fleet settled and stopped (ready, unacked): %s"
          % (busy or "rabbitmqctl listed no queue"))

    # -- every task that did not complete says why
    strict = [s for s in os.environ.get("CHAOS_DEAD_LETTER_STATUSES",
                                        "failed,expired,rejected,timeout,budget_exceeded,max_steps,cancelled").split(",")
              if s]
    # a task that kept losing its worker ends failed with reason interrupted
    want_reason = {"failed": ("failed", "interrupted"), "expired": ("expired",), "rejected": ("rejected",)}
    missing, no_why = {}, []
    for t in published:
        st = tasks.get(t, {}).get("status")
        if st not in FINAL or st == "completed":
            continue
        if not (tasks[t].get("error") or "").strip():
            no_why.append(t)
        if st not in strict:
            continue
        reasons = [d for d in dl_by_task.get(t, []) if d["reason"] in want_reason.get(st, (d["reason"],))
                   and (d["error"] or "").strip()]
        if not reasons:
            missing.setdefault(st, []).append(t)
    kinds = {}
    for st, ids in missing.items():
        for t in ids:
            why = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "ID", (tasks[t].get("error") or "")[:60])
            why = re.sub(r"\d+(\.\d+)?", "N", why)
            kinds[(st, why)] = kinds.get((st, why), 0) + 1
    c.add("dead_letter_says_why", not missing,
          "tasks that did not complete lack a dead letter (reason = status for failed/expired/rejected, "
          "error set), by status: %s; by status and error: %s\n%s"
          % (", ".join("%s %d" % (s, len(v)) for s, v in sorted(missing.items())),
             "; ".join("%s %r x%d" % (st, why, n) for (st, why), n in sorted(kinds.items())),
             describe([v[0] for v in missing.values()])))
    c.add("final_row_says_why", not no_why,
          "%d tasks ended other than completed with no error text in their row:\n%s" % (len(no_why), describe(no_why)))

    # -- the hostile corpus
    check_hostile(c, ledger, tasks, dl_by_task, dl_by_md5, sites, echo_key, marker)

    status_count = {}
    for t in published:
        st = tasks.get(t, {}).get("status") or "(none)"
        status_count[st] = status_count.get(st, 0) + 1
    return c, published, status_count, lost, duplicated


def check_hostile(c, ledger, tasks, dl_by_task, dl_by_md5, sites, echo_key, marker):
    by_kind = {}
    for h in ledger.hostile:
        by_kind.setdefault(h["kind"], []).append(h)

    # invalid bodies: a dead letter `rejected` naming the field; the row (if
    # the message had a task id) says rejected
    bad = []
    for h in by_kind.get("invalid", []):
        dls = [d for d in dl_by_md5.get(h["md5"], []) if d["reason"] == "rejected"]
        err = " | ".join((d["error"] or "") for d in dls)
        if not dls:
            bad.append("%s: no dead letter with reason rejected for its body (dead letters for that body: %s)"
                       % (h["name"], [d["reason"] for d in dl_by_md5.get(h["md5"], [])] or "none"))
        elif not any(n.lower() in err.lower() for n in h["needles"]):
            bad.append("%s: the error does not name %s: %r" % (h["name"], " or ".join(h["needles"]), err[:200]))
        if h["task_id"]:
            st = tasks.get(h["task_id"], {}).get("status")
            if st != "rejected":
                bad.append("%s: task row %s has status %s, want rejected" % (h["name"], h["task_id"], st or "(no row)"))
    c.add("hostile_invalid_rejected", not bad, "\n  ".join([""] + bad))

    # collisions
    bad, ids = [], []
    for h in by_kind.get("collision", []):
        t, o = h["task_id"], h["orig"]
        row = tasks.get(t)
        if not row:
            bad.append("%s: no row" % t)
            ids.append(t)
            continue
        if row["user_id"] != o["user_id"] or row["goal"] != o["goal"]:
            bad.append("%s: the twin changed the original's row: user_id %r goal %r (want %r, %r)"
                       % (t, row["user_id"], row["goal"], o["user_id"], o["goal"]))
            ids.append(t)
        answers = sql_rows("SELECT DISTINCT attempt FROM agentq.steps WHERE task_id = %s AND kind = 'llm' "
                           "AND status = 'ok' AND detail->>'tool_calls' = '0'" % lit(t))
        if len(answers) != 1:
            bad.append("%s: %d attempts reached a final answer, want exactly 1" % (t, len(answers)))
            ids.append(t)
        if row["status"] == "completed" and "collision original" not in (row.get("result") or ""):
            bad.append("%s: the result is not the original's: %r" % (t, (row.get("result") or "")[:120]))
            ids.append(t)
        dup = [d for d in dl_by_task.get(t, []) if d["reason"] == "duplicate"]
        if not dup:
            bad.append("%s: no dead letter with reason duplicate records the twin (dead letters: %s; the original "
                       "was %s when the twin was published)"
                       % (t, [d["reason"] for d in dl_by_task.get(t, [])] or "none", h["seen_before_twin"]))
            ids.append(t)
    c.add("collision_twin", not bad, "\n  ".join([""] + bad) + "\n" + describe(sorted(set(ids))))

    bad, ids = [], []
    for h in by_kind.get("malformed_twin", []):
        t = h["task_id"]
        st = tasks.get(t, {}).get("status")
        answered = sql_rows("SELECT 1 FROM agentq.steps WHERE task_id = %s AND kind = 'llm' AND status = 'ok' "
                            "AND detail->>'tool_calls' = '0' LIMIT 1" % lit(t))
        if st == "rejected" or (answered and st != "completed"):
            bad.append("%s: a malformed twin (sent while the original was %s) left the original %s%s"
                       % (t, h["seen_before_twin"], st, " although it reached a final answer" if answered else ""))
            ids.append(t)
        if not [d for d in dl_by_md5.get(h["twin_md5"], []) if d["reason"] == "rejected"]:
            bad.append("%s: the malformed twin has no dead letter with reason rejected" % t)
            ids.append(t)
    c.add("malformed_twin_harmless", not bad, "\n  ".join([""] + bad) + "\n" + describe(sorted(set(ids))))

    # spoofed headers
    bad, ids = [], []
    for h in by_kind.get("spoof_attempt", []):
        t = h["task_id"]
        # the attempt the first run was claimed as (a row may be created
        # queued before any run; what counts is the first `running`)
        first = sql_rows("SELECT attempt FROM chaos.status_log WHERE task_id = %s "
                         "ORDER BY new_status = 'running' DESC, id LIMIT 1" % lit(t))
        steps = sql_rows("SELECT min(attempt) AS a FROM agentq.steps WHERE task_id = %s" % lit(t))
        row_attempt = tasks.get(t, {}).get("attempt")
        a0 = first[0]["attempt"] if first else None
        if a0 is None or int(a0) != 1 or (row_attempt is not None and int(row_attempt) >= 99) or \
                (steps and steps[0]["a"] is not None and int(steps[0]["a"]) != 1):
            bad.append("%s: a first publish with x-agentq-attempt 99 was stored as attempt %s (row now %s, first "
                       "step attempt %s), want 1" % (t, a0, row_attempt, steps[0]["a"] if steps else None))
            ids.append(t)
    for h in by_kind.get("spoof_deadline", []):
        t = h["task_id"]
        st = tasks.get(t, {}).get("status")
        if st == "expired" or "TTL" in (tasks.get(t, {}).get("error") or ""):
            bad.append("%s: a fresh task published with x-agentq-deadline 1 ended %s: %s"
                       % (t, st, tasks.get(t, {}).get("error")))
            ids.append(t)
    c.add("spoofed_headers_ignored", not bad, "\n  ".join([""] + bad) + "\n" + describe(ids))

    # SQL meta-characters and the metadata number
    bad = []
    for h in by_kind.get("sql", []):
        row = tasks.get(h["task_id"])
        if not row:
            bad.append("%s: no row" % h["task_id"])
            continue
        for col, want in (("user_id", SQL_USER), ("goal", SQL_GOAL), ("metadata", SQL_META)):
            if row.get(col) != want:
                bad.append("%s: %s stored as %r, sent %r" % (h["task_id"], col, row.get(col), want))
        if row["status"] != "completed":
            bad.append("%s: status %s (error %r), want completed" % (h["task_id"], row["status"], row.get("error")))
    c.add("sql_verbatim", not bad, "\n  ".join([""] + bad))
    bad = []
    for h in by_kind.get("metadata_number", []):
        got = sql_rows("SELECT metadata->>'x' AS x, metadata->>'y' AS y, metadata->>'n' AS n FROM agentq.tasks "
                       "WHERE task_id = %s" % lit(h["task_id"]))
        g = got[0] if got else {}
        if (g.get("x"), g.get("y"), g.get("n")) != ("3.14159", "0.1", "42"):
            bad.append("%s: metadata ->> 'x', 'y', 'n' = %r, %r, %r; sent 3.14159, 0.1, 42"
                       % (h["task_id"], g.get("x"), g.get("y"), g.get("n")))
    c.add("metadata_as_sent", not bad, "\n  ".join([""] + bad))

    # SSRF: http_get was called, refused, and the secret is nowhere
    bad, ids = [], []
    for h in by_kind.get("ssrf", []):
        t = h["task_id"]
        calls = sql_rows("SELECT status, detail->'arguments'->>'url' AS url, detail->>'output' AS output "
                         "FROM agentq.steps WHERE task_id = %s AND kind = 'tool' AND name = 'http_get'" % lit(t))
        if not calls:
            bad.append("%s (%s): no http_get call was recorded (status %s): cannot show a refusal"
                       % (h["target"], t[:8], tasks.get(t, {}).get("status")))
            ids.append(t)
        for r in calls:
            out = r["output"] or ""
            if r["status"] != "error" or not re.search(r"refus", out, re.I):
                bad.append("%s: http_get %s was not refused: status %s, output %r"
                           % (h["target"], r["url"], r["status"], out[:200]))
                ids.append(t)
        if h["secret_path"]:
            site = sites["own"] if h["secret_path"] == "/secret-own" else sites["lo"]
            n = site.hits_on(h["secret_path"])
            if n:
                bad.append("%s: the secret page was fetched %d times (%s on %s)"
                           % (h["target"], n, h["secret_path"], site.host))
    like = lit("%" + marker + "%")
    leaks = sql_rows(
        "SELECT 'steps' AS tab, task_id::text AS id FROM agentq.steps WHERE detail::text LIKE %s "
        "UNION ALL SELECT 'tasks', task_id::text FROM agentq.tasks WHERE concat_ws(' ', result, error, goal, "
        "metadata::text) LIKE %s "
        "UNION ALL SELECT 'dead_letters', task_id::text FROM agentq.dead_letters WHERE "
        "concat_ws(' ', error, headers::text) LIKE %s" % (like, like, like))
    for r in leaks:
        bad.append("the secret marker is in agentq.%s (task %s)" % (r["tab"], r["id"]))
        ids.append(r["id"])
    c.add("ssrf_refused", not bad, "\n  ".join([""] + bad) + "\n" + describe(sorted(set(ids))))
    for target, why in sorted({(h["target"], h["why"]) for h in by_kind.get("ssrf_skipped", [])}):
        log("note: SSRF target %s skipped: %s" % (target, why))

    # a provider that echoes the key
    bad, ids = [], []
    like = lit("%" + echo_key + "%")
    for h in by_kind.get("echo", []):
        t = h["task_id"]
        row = tasks.get(t, {})
        if row.get("status") not in FINAL:
            bad.append("%s: status %s, want a final one (the provider answers 401)" % (t, row.get("status")))
            ids.append(t)
    leaks = sql_rows(
        "SELECT 'tasks.error' AS col, task_id::text AS id FROM agentq.tasks WHERE error LIKE %s "
        "UNION ALL SELECT 'tasks.result', task_id::text FROM agentq.tasks WHERE result LIKE %s "
        "UNION ALL SELECT 'steps.detail', task_id::text FROM agentq.steps WHERE detail::text LIKE %s "
        "UNION ALL SELECT 'dead_letters.error', task_id::text FROM agentq.dead_letters WHERE error LIKE %s "
        "UNION ALL SELECT 'dead_letters.headers', task_id::text FROM agentq.dead_letters WHERE headers::text LIKE %s"
        % (like, like, like, like, like))
    for r in leaks:
        bad.append("the worker's API key is in agentq.%s (task %s)" % (r["col"], r["id"]))
        ids.append(r["id"])
    try:
        with open(os.path.join(E.logdir, "worker-echo.log"), "rb") as f:
            n = f.read().count(echo_key.encode())
        if n:
            bad.append("the worker's API key is in its log %d times" % n)
    except OSError:
        pass
    saw = sql_rows("SELECT count(*) AS n FROM agentq.steps s JOIN agentq.tasks t USING (task_id) "
                   "WHERE t.user_id = 'echo' AND s.kind = 'llm' AND (s.detail->>'http_status') = '401'")
    if not saw or not saw[0]["n"]:
        bad.append("no LLM step recorded the provider's 401: the echo was never exercised")
    c.add("key_echo_masked", not bad, "\n  ".join([""] + bad) + "\n" + describe(sorted(set(ids))))


# ------------------------------------------------------------------- main --

STATUS_LOG_SQL = r"""
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.status_log (
    id bigserial PRIMARY KEY, task_id uuid, old_status text, new_status text,
    attempt text, worker_id text, at timestamptz NOT NULL DEFAULT clock_timestamp());
-- Every status (or attempt) a task row takes, for the checks; written by
-- an AFTER trigger that never fails the worker's own write.
CREATE OR REPLACE FUNCTION chaos.log_status() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE n jsonb := to_jsonb(NEW); o jsonb;
BEGIN
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO chaos.status_log (task_id, old_status, new_status, attempt, worker_id)
            VALUES (NEW.task_id, NULL, n->>'status', n->>'attempt', n->>'worker_id');
        ELSE
            o := to_jsonb(OLD);
            IF (n->>'status') IS DISTINCT FROM (o->>'status') OR (n->>'attempt') IS DISTINCT FROM (o->>'attempt') THEN
                INSERT INTO chaos.status_log (task_id, old_status, new_status, attempt, worker_id)
                VALUES (NEW.task_id, o->>'status', n->>'status', n->>'attempt', n->>'worker_id');
            END IF;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        NULL;
    END;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS chaos_status_log ON agentq.tasks;
CREATE TRIGGER chaos_status_log AFTER INSERT OR UPDATE ON agentq.tasks
    FOR EACH ROW EXECUTE FUNCTION chaos.log_status();
"""


def worker_env(mock_port, extra=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8",
           "AGENTQ_AMQP_URL": E.amqp_url, "AGENTQ_POSTGRES_DSN": E.dsn,
           "AGENTQ_LLM_BASE_URL": "http://127.0.0.1:%d/v1" % mock_port,
           "AGENTQ_AMQP_HEARTBEAT": "10", "AGENTQ_AMQP_RETRY_DELAYS": "1s,2s,3s",
           "AGENTQ_AMQP_MAX_ATTEMPTS": "4",
           "AGENTQ_WORKER_CONCURRENCY": "40", "AGENTQ_WORKER_DRAIN_SECONDS": "2",
           "AGENTQ_LLM_TIMEOUT_MS": "3000", "AGENTQ_LLM_CONNECT_TIMEOUT_MS": "2000",
           "AGENTQ_LLM_MAX_RETRIES": "3", "AGENTQ_LLM_RETRY_BACKOFF_MS": "200",
           "AGENTQ_SKILLS_HTTP_GET_ALLOW": "localhost", "AGENTQ_SKILLS_HTTP_GET_TIMEOUT_MS": "2000",
           "AGENTQ_METRICS_LISTEN": "127.0.0.1:0", "AGENTQ_LOG_LEVEL": "info"}
    env.update(extra or {})
    return env


def start_mock(name, port_file, args, env=None):
    path = os.path.join(E.logdir, "%s.log" % name)
    with open(path, "ab") as f:
        p = subprocess.Popen([E.bin("agentq-mockllm"), "--listen", "127.0.0.1:0", "--port-file", port_file] + args,
                             stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             env=env if env is not None else {"PATH": os.environ.get("PATH", "")})
    E.note_pid(p.pid, "agentq-mockllm")
    return p, wait_port_file(port_file, p, name)


def main():
    global E
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default="short")
    ap.add_argument("--dir", required=True, help="the run's directory (servers/ already started in it)")
    ap.add_argument("--build", required=True, help="build directory with the agentq programs")
    ap.add_argument("--root", required=True, help="source tree (for scripts/testenv)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    E = Env(args)
    cfg = MODES[args.mode]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    log("mode %s, seed %d (rerun the same plan with --seed %d)" % (args.mode, seed, seed))

    def on_term(sig, frame):
        raise Stop()
    signal.signal(signal.SIGTERM, on_term)

    stop = threading.Event()
    errors = []
    fleet = None
    procs = []
    sites = {}
    threads = []
    rc = 2
    try:
        # -- database, schema, status log
        sql("CREATE DATABASE %s" % E.db, dsn=E.admin_dsn)
        r = subprocess.run([E.bin("agentqctl"), "migrate"], env=worker_env(1), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError("agentqctl migrate: %s" % (r.stdout + r.stderr).decode("utf-8", "replace"))
        sql(STATUS_LOG_SQL)

        # -- test sites for the SSRF probes
        marker = "CHAOS-SECRET-" + uuid.uuid4().hex
        sites["lo"] = Site("127.0.0.1", marker)
        sites["redirect"] = Site("127.0.0.1", marker,
                                 redirect_to="http://127.0.0.1:%d/secret-redirected" % sites["lo"].port)
        own = own_addresses()
        if own:
            try:
                sites["own"] = Site(own[0], marker)
            except OSError as e:
                log("note: cannot listen on this host's address %s (%s): no own-interface probe" % (own[0], e))
        else:
            log("note: this host has no non-loopback IPv4 address: no own-interface probe")

        # -- mocks and workers
        mock, mock_port = start_mock("mock", os.path.join(E.dir, "mock.port"),
                                     ["--latency-ms", "40", "--jitter-ms", "30", "--seed", str(seed)])
        procs.append(mock)
        mock_url = "http://127.0.0.1:%d" % mock_port
        real_key = "sk-chaos-right-" + uuid.uuid4().hex
        echo_key = "sk-chaos-wrong-" + uuid.uuid4().hex
        echo_mock, echo_port = start_mock(
            "mock-echo", os.path.join(E.dir, "mock-echo.port"),
            ["--api-key-env", "CHAOS_MOCK_KEY", "--echo-key"],
            env={"PATH": os.environ.get("PATH", ""), "CHAOS_MOCK_KEY": real_key})
        procs.append(echo_mock)

        example = subprocess.run([E.bin("agentq-worker"), "--example-config"], capture_output=True,
                                 timeout=30).stdout.decode()
        extra_args = []
        if re.search(r"^\s*lease_seconds\s*=", example, re.M):
            extra_args = ["--set", "worker.lease_seconds=10"]
            log("the worker has worker.lease_seconds: running with 10")
        else:
            log("note: agentq-worker --example-config lists no worker.lease_seconds: running without one")
        fleet = Fleet(worker_env(mock_port), extra_args)
        for slot in range(WORKERS):
            fleet.start(slot)
        echo_env = worker_env(echo_port, {
            "AGENTQ_WORKER_ID": "chaos-echo", "AGENTQ_AMQP_EXCHANGE": "chaos_echo",
            "AGENTQ_AMQP_QUEUE": "chaos_echo.tasks", "AGENTQ_AMQP_DLX": "chaos_echo.dlx",
            "AGENTQ_AMQP_DEAD_QUEUE": "chaos_echo.dead", "AGENTQ_AMQP_RETRY_PREFIX": "chaos_echo.retry.",
            "AGENTQ_AMQP_LANE_PREFIX": "chaos_echo.lane.",
            "AGENTQ_LLM_API_KEY": echo_key, "AGENTQ_WORKER_CONCURRENCY": "4"})
        with open(os.path.join(E.logdir, "worker-echo.log"), "ab") as f:
            echo_worker = subprocess.Popen([E.bin("agentq-worker")] + extra_args, env=echo_env,
                                           stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        E.note_pid(echo_worker.pid, "agentq-worker")
        procs.append(echo_worker)
        log("fleet up: %d workers, mock on %d, key-echo mock on %d; sites: %s"
            % (WORKERS, mock_port, echo_port,
               ", ".join("%s=%s:%d" % (k, s.host, s.port) for k, s in sorted(sites.items()))))

        # -- the run
        ledger = Ledger()
        chaos = Chaos(cfg, fleet, mock_url, stop, rng, errors)
        hostile = Hostile(ledger, stop, errors, sites, "chaos_echo", marker)
        chaos.start = time.monotonic()

        def hostile_rounds():
            for n, at in enumerate(cfg["hostile"]):
                if not chaos.sleep_until(at):
                    return
                hostile.run(n)

        for target in (lambda: run_load(cfg, ledger, stop, random.Random(rng.random()), errors),
                       chaos.kills, chaos.events, hostile_rounds):
            th = threading.Thread(target=target, daemon=True)
            th.start()
            threads.append(th)
        deadline = chaos.start + cfg["load_s"] + 240
        for th in threads:
            th.join(max(0.1, deadline - time.monotonic()))
            if th.is_alive():
                errors.append("a driver thread did not finish in time")
        log("load and chaos over: %d kills, %d worker restarts, rabbitmq %d, postgres %d, fault windows: %s"
            % (fleet.kills, fleet.restarts, chaos.rabbit_restarts, chaos.pg_restarts, ", ".join(chaos.windows)))

        # -- settle (bounded): every task final and the queues empty
        try:
            chaos.control({})
        except RuntimeError as e:
            errors.append(str(e))
        expect = ledger.ids(("load", "hostile", "echo"))
        settle_end = time.monotonic() + cfg["settle_s"]
        pending = len(expect)
        qs = {}
        while time.monotonic() < settle_end:
            fleet.reap()
            try:
                st = {r["id"]: r["status"] for r in sql_rows("SELECT task_id::text AS id, status FROM agentq.tasks")}
                pending = sum(1 for t in expect if st.get(t) not in FINAL)
                qs = list_queues()
            except (SqlError, RuntimeError, subprocess.TimeoutExpired) as e:
                log("settle: %s" % e)
                time.sleep(1)
                continue
            busy = {q: v for q, v in qs.items() if v != (0, 0)}
            if pending == 0 and not busy:
                break
            log("settle: %d tasks not final, busy queues %s" % (pending, busy))
            time.sleep(2)
        log("settled: %d tasks not final" % pending)

        # -- stop the fleet, then look at what is left
        fleet.stop_all()
        for p in procs:
            stop_proc(p)
        try:
            qs = list_queues()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            errors.append("list_queues after the run: %s" % e)
            qs = {}
        checks, published, counts, lost, duplicated = run_checks(
            ledger, fleet, chaos, sites, echo_key, marker, qs, errors, cfg)
        failed = checks.failed()
        for name, _, detail in failed:
            sys.stderr.write("FAIL %s: %s\n" % (name, detail.rstrip()))
        for name, ok, _ in checks.results:
            if ok:
                sys.stderr.write("ok   %s\n" % name)
        other = ",".join("%s:%d" % (s, n) for s, n in sorted(counts.items()) if s != "completed")
        print("chaos %s: published=%d completed=%d other=%s lost=%d duplicated=%d kills=%d "
              "restarts=rabbitmq:%d,postgres:%d,workers:%d checks=%s (%.0fs)"
              % (args.mode, len(published), counts.get("completed", 0), other or "none", len(lost),
                 len(duplicated), fleet.kills, chaos.rabbit_restarts, chaos.pg_restarts, fleet.restarts,
                 "OK" if not failed else "FAILED(%d: %s)" % (len(failed), ",".join(f[0] for f in failed)),
                 time.monotonic() - T0))
        sys.stdout.flush()
        rc = 1 if failed or lost or duplicated else 0
    except (KeyboardInterrupt, Stop):
        log("interrupted: stopping everything")
        rc = 130
    except Exception:  # noqa: BLE001
        log("the run could not go on:\n%s" % traceback.format_exc())
        rc = 2
    finally:
        stop.set()
        if fleet is not None:
            fleet.stop_all(grace=3)
        for p in procs:
            stop_proc(p, grace=3)
        for s in sites.values():
            s.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
