# shellcheck shell=bash disable=SC2034
# lib.sh — process plumbing for bench/run (sourced, not run): one private
# RabbitMQ + Postgres pair (scripts/testenv), and per run a fresh database,
# a fresh agentq-mockllm, and the workers under test (agentq or Celery).
#
# Owns: the processes it starts (their pids are in BENCH_PIDS so that the
# EXIT trap of bench/run stops them, by pid, and nothing else) and the
# databases it creates (bench_*). Measuring is drive.py's job.
#
# Everything listens on 127.0.0.1 only.

BENCH_PY=/usr/bin/python3 # Debian's, with python3-celery & co
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the source tree
BENCH_PIDS=()
WORKER_ARGS=() # agentq_start: the worker's arguments (S3b: --config FILE)

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

bench_free_port() {
    "$BENCH_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# bench_kill PID [GRACE_S]: TERM, wait, KILL — this one pid only.
bench_kill() {
    local pid=$1 grace=${2:-30} i
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    echo "bench: pid $pid did not stop in ${grace}s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

bench_forget() { # PID: no longer ours to stop
    local keep=() p
    for p in "${BENCH_PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
    BENCH_PIDS=("${keep[@]}")
}

bench_stop_all() {
    local p
    for p in "${BENCH_PIDS[@]}"; do bench_kill "$p" 20; done
    BENCH_PIDS=()
}

# ------------------------------------------------------------- servers --

bench_servers_start() { # DIR
    scripts/testenv start "$1" >&2 || die "could not start RabbitMQ and Postgres"
    set -a
    # shellcheck disable=SC1091
    source "$1/env"
    set +a
    BENCH_SERVERS=$1
    BROKER_PID=$(cat "$1/rabbit/rabbit.pid" 2>/dev/null || echo 0)
    PG_PID=$(head -n 1 "$(bench_pg_data)/postmaster.pid" 2>/dev/null || echo 0)
    export AGENTQ_AMQP_URL=$AGENTQ_TEST_AMQP_URL
}

bench_pg_data() {
    (
        # shellcheck disable=SC1091
        source "$BENCH_SERVERS/state"
        echo "$PG_DATA"
    )
}

bench_servers_stop() {
    [[ -n "${BENCH_SERVERS:-}" ]] && scripts/testenv stop "$BENCH_SERVERS" >/dev/null 2>&1
    BENCH_SERVERS=
}

bench_psql() { # psql as the superuser; -d DB in the arguments
    PGOPTIONS="-c client_min_messages=warning" "$AGENTQ_TEST_PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$AGENTQ_TEST_PG_HOST" \
        -p "$AGENTQ_TEST_PG_PORT" -U postgres "$@"
}

# bench_db NAME: a fresh database; sets BENCH_DB_DSN and BENCH_DB_URL.
bench_db() {
    bench_psql -d postgres -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
    BENCH_DB_DSN="host=$AGENTQ_TEST_PG_HOST port=$AGENTQ_TEST_PG_PORT user=postgres dbname=$1"
    BENCH_DB_URL="postgresql://postgres@$AGENTQ_TEST_PG_HOST:$AGENTQ_TEST_PG_PORT/$1"
}

bench_db_drop() { bench_psql -d postgres -c "DROP DATABASE IF EXISTS $1" >/dev/null 2>&1 || true; }

# ---------------------------------------------------------------- mock --

# mock_start LATENCY_MS: a fresh mock (its /stats count this run only);
# sets MOCK_PID and MOCK_URL (http://127.0.0.1:PORT).
mock_start() {
    local pf=$BENCH_WORK/mock.port
    rm -f "$pf"
    "$BUILD/agentq-mockllm" --listen 127.0.0.1:0 --port-file "$pf" --latency-ms "$1" \
        --log-level warn 2>>"$BENCH_WORK/mock.log" &
    MOCK_PID=$!
    BENCH_PIDS+=("$MOCK_PID")
    local i
    for ((i = 0; i < 200; i++)); do
        [[ -s "$pf" ]] && break
        sleep 0.05
    done
    [[ -s "$pf" ]] || die "agentq-mockllm did not start (see $BENCH_WORK/mock.log)"
    MOCK_URL="http://127.0.0.1:$(cat "$pf")"
}

mock_stop() {
    bench_kill "$MOCK_PID" 10
    bench_forget "$MOCK_PID"
    MOCK_PID=
}

# -------------------------------------------------------------- agentq --

# agentq_db NAME: fresh database + migrations; exports AGENTQ_POSTGRES_DSN.
agentq_db() {
    bench_db "$1"
    export AGENTQ_POSTGRES_DSN=$BENCH_DB_DSN
    "$BUILD/agentqctl" migrate >/dev/null 2>>"$BENCH_WORK/migrate.log" || die "agentqctl migrate failed"
}

# agentq_start CONCURRENCY [KEY=VALUE ...]: one worker process on the
# current mock and database, the extra environment applied (and the
# arguments in WORKER_ARGS, if any); waits until
# /readyz says it is connected. Sets WORKER_PID (the process itself, so
# that /proc shows its own memory and CPU).
agentq_start() {
    local conc=$1
    shift
    local port
    port=$(bench_free_port)
    env AGENTQ_WORKER_CONCURRENCY="$conc" AGENTQ_LLM_BASE_URL="$MOCK_URL/v1" \
        AGENTQ_METRICS_LISTEN="127.0.0.1:$port" AGENTQ_LOG_LEVEL=warn AGENTQ_WORKER_ID="${AGENTQ_WORKER_ID:-bench-worker}" \
        AGENTQ_WORKER_DRAIN_SECONDS=5 "$@" \
        "${WORKER_WRAP[@]}" "$BUILD/agentq-worker" "${WORKER_ARGS[@]}" 2>>"$BENCH_WORK/worker.log" &
    WORKER_PID=$!
    BENCH_PIDS+=("$WORKER_PID")
    WORKER_METRICS="http://127.0.0.1:$port"
    local i
    for ((i = 0; i < 600; i++)); do
        curl -sf "$WORKER_METRICS/readyz" >/dev/null 2>&1 && return 0
        kill -0 "$WORKER_PID" 2>/dev/null || die "agentq-worker exited at start (see $BENCH_WORK/worker.log)"
        sleep 0.1
    done
    die "agentq-worker not ready after 60s (see $BENCH_WORK/worker.log)"
}

agentq_stop() {
    bench_kill "$WORKER_PID" 30
    bench_forget "$WORKER_PID"
    WORKER_PID=
}

# agentq_start_n N CONCURRENCY [KEY=VALUE ...]: N worker processes on the
# current mock and database, each with its own worker id (bench-worker-1
# .. bench-worker-N) and its own metrics port, started one after the
# other. Sets WORKER_PIDS and WORKER_METRICS_URLS (one entry per process);
# WORKER_PID / WORKER_METRICS are the last one's.
agentq_start_n() {
    local n=$1 conc=$2 i
    shift 2
    WORKER_PIDS=()
    WORKER_METRICS_URLS=()
    for ((i = 1; i <= n; i++)); do
        AGENTQ_WORKER_ID=bench-worker-$i agentq_start "$conc" "$@"
        WORKER_PIDS+=("$WORKER_PID")
        WORKER_METRICS_URLS+=("$WORKER_METRICS")
    done
}

agentq_stop_n() { # the processes of agentq_start_n, one by one
    for WORKER_PID in "${WORKER_PIDS[@]}"; do agentq_stop; done
    WORKER_PIDS=()
    WORKER_METRICS_URLS=()
}

# agentq_stop_n_at_once: the processes of agentq_start_n, TERMed together
# (each drains in parallel with the others), then waited for one by one;
# one still there after 30 s is KILLed. Only those pids.
agentq_stop_n_at_once() {
    local p i
    for p in "${WORKER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${WORKER_PIDS[@]}"; do
        for ((i = 0; i < 300; i++)); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$p" 2>/dev/null; then
            echo "bench: pid $p did not stop in 30s; killing it" >&2
            kill -KILL "$p" 2>/dev/null || true
        fi
        wait "$p" 2>/dev/null || true
        bench_forget "$p"
    done
    WORKER_PIDS=()
    WORKER_METRICS_URLS=()
    WORKER_PID=
}

# agentq_purge: empties agentq's queues of the default names (the task
# queue, its 32 lanes, the retry tiers, the dead letters), with no worker
# running. A scenario that stops its fleet with tasks left (S3b) calls it,
# so that the next run, on a new database, does not get them.
agentq_purge() {
    "$BENCH_PY" - <<'PURGE_PY' >&2 || die "cannot purge agentq's queues"
import os
import time
import amqp
hostport = os.environ["AGENTQ_AMQP_URL"].split("@", 1)[1].split("/", 1)[0]
conn = amqp.Connection(host=hostport, userid="guest", password="guest", virtual_host="/")
conn.connect()
names = (["agentq.tasks", "agentq.dead"] + ["agentq.retry." + d for d in ("5s", "30s", "120s", "600s")] +
         ["agentq.lane.%d" % i for i in range(33)])

def each(verb):
    """verb(channel, queue) over the queues that exist."""
    out = []
    for q in names:
        ch = conn.channel()
        try:
            out.append(verb(ch, q))
            ch.close()
        except amqp.exceptions.NotFound:
            pass  # not declared (the broker closed the channel)
    return out


# A stopped worker's deliveries go back to their queues once the broker
# has seen its connection close: wait until no queue has a consumer.
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    if not any(c for _, _, c in each(lambda ch, q: ch.queue_declare(q, passive=True))):
        break
    time.sleep(0.1)
n = sum(x or 0 for x in each(lambda ch, q: ch.queue_purge(q)))
conn.close()
print("bench: purged %d messages from agentq's queues" % n)
PURGE_PY
}

# ------------------------------------------------ several mocks (S3b) --

# Mock number N (1, 2, ...): MOCKN_PID[N], MOCKN_URL[N], MOCKN_PORT[N] and
# the flags it was started with, MOCKN_FLAGS[N] (words without spaces),
# for mockn_restart. Each has its own port file and log (mock-N.log).
MOCKN_PID=()
MOCKN_URL=()
MOCKN_PORT=()
MOCKN_FLAGS=()

# mockn_start N PORT [FLAGS...]: a fresh agentq-mockllm as mock N on
# 127.0.0.1:PORT (0: a free port), with the flags (e.g. --latency-ms 300
# --rpm 600); returns once it listens.
mockn_start() {
    local n=$1 port=$2
    shift 2
    local pf=$BENCH_WORK/mock-$n.port i
    rm -f "$pf"
    "$BUILD/agentq-mockllm" --listen "127.0.0.1:$port" --port-file "$pf" --log-level warn "$@" \
        2>>"$BENCH_WORK/mock-$n.log" &
    MOCKN_PID[n]=$!
    BENCH_PIDS+=("$!")
    for ((i = 0; i < 200; i++)); do
        [[ -s "$pf" ]] && break
        kill -0 "${MOCKN_PID[n]}" 2>/dev/null || break
        sleep 0.02
    done
    [[ -s "$pf" ]] || die "agentq-mockllm $n did not start on port $port (see $BENCH_WORK/mock-$n.log)"
    MOCKN_PORT[n]=$(cat "$pf")
    MOCKN_URL[n]="http://127.0.0.1:${MOCKN_PORT[n]}"
    MOCKN_FLAGS[n]="$*"
}

# mockn_restart N: mock N again, on the same port with the same flags.
mockn_restart() {
    # shellcheck disable=SC2086  # the flags, one word each
    mockn_start "$1" "${MOCKN_PORT[$1]}" ${MOCKN_FLAGS[$1]}
}

mockn_stop() { # N
    [[ -n "${MOCKN_PID[$1]:-}" ]] || return 0
    bench_kill "${MOCKN_PID[$1]}" 10
    bench_forget "${MOCKN_PID[$1]}"
    MOCKN_PID[$1]=
}

# outage_loop fail|kill N RUN START_S LEN_S DRIVER_PID: S3b's outage of
# mock N. From RUN.started (drive.py writes its first publish's epoch time
# there) START_S later the provider goes down for LEN_S:
#   fail: POST /control {"fail_rate":1} (every chat request gets a 500
#         after the mock's latency), then {"fail_rate":0};
#   kill: its GET /requests so far saved to RUN.requests-N.before, then
#         SIGKILL (connections refused from then on), then mockn_restart
#         on the same port (a fresh process: its bucket is full again and
#         its /requests starts empty).
# "down EPOCH" and "up EPOCH" in RUN.outage say when each took effect
# (after the reply of /control; after the kill; once the new process
# listens). Returns early if the driver exits.
outage_loop() {
    local how=$1 n=$2 run=$3 start=$4 len=$5 dpid=$6 t0 at_us
    : >"$run.outage"
    while [[ ! -s "$run.started" ]]; do
        kill -0 "$dpid" 2>/dev/null || return 0
        sleep 0.01
    done
    t0=$(head -n 1 "$run.started")
    at_us=$("$BENCH_PY" -c "import sys; print(int(float(sys.argv[1]) * 1e6) + int(float(sys.argv[2]) * 1e6))" "$t0" "$start")
    while ((${EPOCHREALTIME/./} < at_us)); do
        kill -0 "$dpid" 2>/dev/null || return 0
        sleep 0.005
    done
    if [[ "$how" == fail ]]; then
        curl -sf -d '{"fail_rate":1}' "${MOCKN_URL[n]}/control" >/dev/null || die "POST /control to mock $n failed"
    else
        curl -sf "${MOCKN_URL[n]}/requests" >"$run.requests-$n.before" || die "GET /requests of mock $n failed"
        kill -KILL "${MOCKN_PID[n]}" 2>/dev/null || true
        wait "${MOCKN_PID[n]}" 2>/dev/null || true
        bench_forget "${MOCKN_PID[n]}"
    fi
    echo "down $EPOCHREALTIME" >>"$run.outage"
    at_us=$((at_us + $("$BENCH_PY" -c "import sys; print(int(float(sys.argv[1]) * 1e6))" "$len")))
    while ((${EPOCHREALTIME/./} < at_us)); do
        kill -0 "$dpid" 2>/dev/null || break
        sleep 0.005
    done
    if [[ "$how" == fail ]]; then
        curl -sf -d '{"fail_rate":0}' "${MOCKN_URL[n]}/control" >/dev/null || die "POST /control to mock $n failed"
    else
        mockn_restart "$n"
    fi
    echo "up $EPOCHREALTIME" >>"$run.outage"
}

# -------------------------------------------------------------- celery --

bench_celery_deps() {
    local pkgs="python3-celery python3-psycopg2 python3-sqlalchemy python3-gevent python3-requests"
    "$BENCH_PY" -c 'import celery, psycopg2, sqlalchemy, gevent, requests, amqp' 2>/dev/null && return 0
    say "installing the Celery baseline's Debian packages"
    [[ $(id -u) -eq 0 ]] || die "run as root, or: sudo apt-get install -y $pkgs"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -q $pkgs >/dev/null ||
        { apt-get update -q >/dev/null && apt-get install -y -q $pkgs >/dev/null; } ||
        die "apt-get install $pkgs failed"
}

# celery_env DB_URL: the baseline's settings (read by bench/celery/tasks.py).
celery_env() {
    export BENCH_BROKER_URL="amqp://guest:guest@127.0.0.1:$AGENTQ_TEST_AMQP_PORT//"
    export BENCH_RESULT_URL=$1
    export BENCH_LLM_URL="$MOCK_URL/v1/chat/completions"
}

# celery_purge: nothing left over from an earlier run (with late acks, a
# task whose ack had not gone out when its worker stopped comes back).
celery_purge() {
    (cd bench/celery && "$BENCH_PY" -c 'import tasks; tasks.app.control.purge()') >/dev/null 2>&1 ||
        die "cannot purge the Celery queue"
}

# celery_launch POOL CONCURRENCY NAME: one Celery worker (node NAME@host)
# in the background; sets CELERY_PID. celery_wait_ready NAME waits for its
# worker_ready signal.
celery_launch() {
    local pool=$1 conc=$2 name=$3 dbpool=0
    rm -f "$BENCH_WORK/celery-$name.ready"
    [[ "$pool" == gevent ]] && dbpool=${BENCH_DB_POOL:-1}
    # Best settings for throughput: no gossip/mingle/heartbeat chatter.
    (
        cd bench/celery &&
            BENCH_READY_FILE=$BENCH_WORK/celery-$name.ready BENCH_HTTP_POOL=$conc BENCH_DB_POOL=$dbpool \
                exec "$BENCH_PY" -m celery -A tasks worker \
                -P "$pool" -c "$conc" --loglevel=WARNING --without-gossip --without-mingle \
                --without-heartbeat -n "$name@%h"
    ) >>"$BENCH_WORK/celery.log" 2>&1 &
    CELERY_PID=$!
    BENCH_PIDS+=("$CELERY_PID")
}

celery_wait_ready() { # NAME PID
    local i
    for ((i = 0; i < 1800; i++)); do
        [[ -s "$BENCH_WORK/celery-$1.ready" ]] && return 0
        kill -0 "$2" 2>/dev/null || die "celery exited at start (see $BENCH_WORK/celery.log)"
        sleep 0.1
    done
    die "celery not ready after 180s (see $BENCH_WORK/celery.log)"
}

# celery_start POOL CONCURRENCY: a Celery worker (prefork or gevent) on the
# current mock; waits for its worker_ready signal. Sets CELERY_PID (the
# main process; the pool's children are found under it).
celery_start() {
    celery_purge
    celery_launch "$1" "$2" bench
    celery_wait_ready bench "$CELERY_PID"
}

# celery_start_n N POOL CONCURRENCY: N Celery workers (nodes bench1..benchN,
# each its own process and pool), started at once; waits for all of them.
# Sets CELERY_PIDS.
celery_start_n() {
    local n=$1 pool=$2 conc=$3 i
    celery_purge
    CELERY_PIDS=()
    for ((i = 1; i <= n; i++)); do
        celery_launch "$pool" "$conc" "bench$i"
        CELERY_PIDS+=("$CELERY_PID")
    done
    for ((i = 1; i <= n; i++)); do celery_wait_ready "bench$i" "${CELERY_PIDS[i - 1]}"; done
}

celery_stop_n() {
    for CELERY_PID in "${CELERY_PIDS[@]}"; do celery_stop; done
    CELERY_PIDS=()
}

celery_stop() {
    # Warm shutdown (TERM) lets the pool's children exit; the main process
    # waits for them. Should it have to be killed, its children (noted
    # first, by pid) are stopped one by one.
    local kids c
    kids=$(cat /proc/"$CELERY_PID"/task/*/children 2>/dev/null || true)
    bench_kill "$CELERY_PID" 60
    for c in $kids; do
        if { tr '\0' ' ' </proc/"$c"/cmdline; } 2>/dev/null | grep -q celery; then
            kill -KILL "$c" 2>/dev/null || true
        fi
    done
    bench_forget "$CELERY_PID"
    CELERY_PID=
}

# ------------------------------------------------------- crash (S6) --

# crash_loop agentq|celery EVERY_S DRIVER_PID RUN CONCURRENCY [ARGS...]:
# the kill loop of S6. From the moment the run's driver (drive.py crash,
# pid DRIVER_PID) writes RUN.started (just before its first publish) until
# it writes RUN.done (every task final) or exits, every EVERY_S seconds on
# average one worker process, chosen in turn, is SIGKILLed and at once
# started again. The gaps are drawn uniformly from 0.5-1.5 x EVERY_S, from
# a fixed seed (S6_KILL_SEED, default 6: the same gaps in every run): with
# a fixed period, kills beat in step with tasks of the same length (S6's
# are 6 x 500 ms = 3 s), and a task that restarts from scratch can be
# killed just before its end every time (Celery's last task did 1,168 LLM
# calls in 10 minutes that way, about 6 per kill).
# Each kill is a line "EPOCH_S INDEX PID" in RUN.kills, which drive.py
# counts. The processes are the current WORKER_PIDS (agentq, started by
# agentq_start_n; ARGS: their extra environment, KEY=VALUE) or CELERY_PIDS
# (Celery, by celery_start_n; ARGS: the pool, e.g. gevent); the loop puts
# each new pid in its place, so that agentq_stop_n / celery_stop_n stop
# what runs at the end.
crash_loop() {
    local sys=$1 every=$2 dpid=$3 run=$4 conc=$5
    shift 5
    local n i=0 step_us next_us pid
    if [[ "$sys" == agentq ]]; then n=${#WORKER_PIDS[@]}; else n=${#CELERY_PIDS[@]}; fi
    : >"$run.kills"
    while [[ ! -e "$run.started" ]]; do
        kill -0 "$dpid" 2>/dev/null || return 0
        sleep 0.02
    done
    # EPOCHREALTIME: seconds.micros (bash 5). The schedule is absolute from
    # the first publish, so a slow restart does not push later kills back.
    step_us=$("$BENCH_PY" -c "import sys; print(int(float(sys.argv[1]) * 1e6))" "$every")
    RANDOM=${S6_KILL_SEED:-6}
    next_us=$((${EPOCHREALTIME/./} + step_us * (16384 + RANDOM) / 32768))
    while :; do
        while ((${EPOCHREALTIME/./} < next_us)); do
            [[ -e "$run.done" ]] && return 0
            kill -0 "$dpid" 2>/dev/null || return 0
            sleep 0.02
        done
        [[ -e "$run.done" ]] && return 0
        if [[ "$sys" == agentq ]]; then
            pid=${WORKER_PIDS[i]}
            kill -KILL "$pid" 2>/dev/null || true
            echo "$EPOCHREALTIME $i $pid" >>"$run.kills"
            wait "$pid" 2>/dev/null || true
            bench_forget "$pid"
            # The same worker id, a new process (with a new lease key);
            # agentq_start returns once its /readyz answers.
            AGENTQ_WORKER_ID=bench-worker-$((i + 1)) agentq_start "$conc" "$@"
            WORKER_PIDS[i]=$WORKER_PID
            WORKER_METRICS_URLS[i]=$WORKER_METRICS
        else
            pid=${CELERY_PIDS[i]}
            # Only a worker that consumes is worth killing: one restarted
            # n kills ago gets the time it needs to be ready first.
            celery_wait_ready "bench$((i + 1))" "$pid"
            [[ -e "$run.done" ]] && return 0
            # gevent: one process, no pool children. Its broker connection
            # closes with it, and RabbitMQ requeues every unacked message.
            kill -KILL "$pid" 2>/dev/null || true
            echo "$EPOCHREALTIME $i $pid" >>"$run.kills"
            wait "$pid" 2>/dev/null || true
            bench_forget "$pid"
            # Started again at once but not waited for (a Celery start
            # takes seconds here): its readiness is awaited before its next
            # kill, n kills later.
            celery_launch "$1" "$conc" "bench$((i + 1))"
            CELERY_PIDS[i]=$CELERY_PID
        fi
        i=$(((i + 1) % n))
        next_us=$((next_us + step_us * (16384 + RANDOM) / 32768))
    done
}
