# shellcheck shell=bash
# tests/examples/fleet.sh — sourced by tests/examples/run and
# tests/monitoring/check: a private agentq worker on the test servers.
#
# It starts no servers. The RabbitMQ and PostgreSQL come from the env file
# scripts/testenv writes (the ctest fixture `servers` starts them into
# BUILD/testenv): $AGENTQ_TEST_ENV_FILE, else $AGENTQ_TEST_DIR/env, else
# BUILD/testenv/env; as for the C tests (tests/support/testenv.c), a
# variable already in the environment wins over the file's.
#
# fleet_start NAME gives the caller, all its own so that nothing is shared
# with other tests on the same servers:
#   a database (migrated with agentqctl migrate)    FLEET_DSN, psql_q
#   a RabbitMQ vhost (default names inside it)     FLEET_AMQP_URL
#   agentq-mockllm                                  FLEET_LLM_URL
#   agentq-worker (metrics on a free port)          FLEET_METRICS_URL
#   a directory for logs                            FLEET_DIR
# and exports AGENTQ_AMQP_URL for the programs the caller runs. fleet_stop
# (an EXIT trap the caller sets) stops what fleet_start started, by pid,
# and removes the vhost and the database; on failure, or with FLEET_KEEP=1,
# the logs and the database stay.
#
# Needs: ROOT (the source tree) and BUILD (the build dir) set by the caller.

fleet_say() { echo "${FLEET_NAME:-fleet}: $*" >&2; }
fleet_die() { fleet_say "$*"; exit 1; }

fleet_load_env() {
    local file=${AGENTQ_TEST_ENV_FILE:-}
    [[ -z "$file" && -n "${AGENTQ_TEST_DIR:-}" ]] && file=$AGENTQ_TEST_DIR/env
    [[ -z "$file" ]] && file=$BUILD/testenv/env
    [[ -r "$file" ]] || fleet_die "no test servers: $file is missing (run through ctest, or: scripts/testenv start $BUILD/testenv)"
    local line key
    while IFS= read -r line || [[ -n "$line" ]]; do
        [[ "$line" == *=* ]] || continue
        key=${line%%=*}
        [[ "$key" =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
        # shellcheck disable=SC2163 # exports KEY=VALUE
        [[ -n "${!key+x}" ]] || export "$line"
    done <"$file"
    local v
    for v in AGENTQ_TEST_DIR AGENTQ_TEST_AMQP_URL AGENTQ_TEST_RABBITMQCTL AGENTQ_TEST_PG_DSN \
        AGENTQ_TEST_PG_HOST AGENTQ_TEST_PG_PORT AGENTQ_TEST_PG_BINDIR; do
        [[ -n "${!v:-}" ]] || fleet_die "$file does not say $v"
    done
}

# psql as the servers' superuser: psql_admin ARGS... (database postgres),
# psql_q ARGS... (the fleet's database).
psql_admin() { "$AGENTQ_TEST_PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d "$AGENTQ_TEST_PG_DSN" "$@"; }
psql_q() { "$AGENTQ_TEST_PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -d "$FLEET_DSN" "$@"; }

FLEET_PIDS=()

# fleet_spawn LOG CMD...: runs CMD in the background with output to LOG;
# its pid is recorded (for fleet_stop) and left in FLEET_LAST_PID.
fleet_spawn() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 </dev/null &
    FLEET_LAST_PID=$!
    FLEET_PIDS+=("$FLEET_LAST_PID")
}

fleet_start() {
    FLEET_NAME=$1
    local p
    for p in agentq-worker agentq-mockllm agentqctl; do
        [[ -x "$BUILD/$p" ]] || fleet_die "$BUILD/$p is not built (cmake --build $BUILD)"
    done
    fleet_load_env
    local tag
    tag="${FLEET_NAME//[^a-z0-9]/_}_$$_$RANDOM"
    FLEET_DIR=$AGENTQ_TEST_DIR/logs/$tag
    mkdir -p "$FLEET_DIR"

    # A database of its own, migrated.
    FLEET_DB=$tag
    psql_admin -c "CREATE DATABASE \"$FLEET_DB\"" || fleet_die "cannot create database $FLEET_DB"
    FLEET_DSN="host=$AGENTQ_TEST_PG_HOST port=$AGENTQ_TEST_PG_PORT user=postgres dbname=$FLEET_DB"
    AGENTQ_POSTGRES_DSN=$FLEET_DSN "$BUILD/agentqctl" migrate >"$FLEET_DIR/migrate.log" 2>&1 ||
        { cat "$FLEET_DIR/migrate.log" >&2; fleet_die "agentqctl migrate failed"; }

    # A vhost of its own: the default exchange and queue names, as a user
    # has them, without meeting other tests' queues.
    FLEET_VHOST=$tag
    "$AGENTQ_TEST_RABBITMQCTL" -q add_vhost "$FLEET_VHOST" >/dev/null ||
        fleet_die "cannot add vhost $FLEET_VHOST"
    "$AGENTQ_TEST_RABBITMQCTL" -q set_permissions -p "$FLEET_VHOST" guest '.*' '.*' '.*' >/dev/null ||
        fleet_die "cannot grant guest vhost $FLEET_VHOST"
    FLEET_AMQP_URL="${AGENTQ_TEST_AMQP_URL%/*}/$FLEET_VHOST"
    export AGENTQ_AMQP_URL=$FLEET_AMQP_URL

    # The simulator: 20 ms a call.
    fleet_spawn "$FLEET_DIR/mock.log" "$BUILD/agentq-mockllm" --listen 127.0.0.1:0 \
        --port-file "$FLEET_DIR/mock.port" --latency-ms 20 --jitter-ms 10
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s "$FLEET_DIR/mock.port" ]] && break
        sleep 0.05
    done
    [[ -s "$FLEET_DIR/mock.port" ]] || { cat "$FLEET_DIR/mock.log" >&2; fleet_die "agentq-mockllm did not start"; }
    FLEET_LLM_URL="http://127.0.0.1:$(cat "$FLEET_DIR/mock.port")/v1"

    # The worker, configured only through the environment. The simulator is
    # free: price it like gpt-4o-mini so that costs are not all zero.
    fleet_spawn "$FLEET_DIR/worker.log" env \
        AGENTQ_POSTGRES_DSN="$FLEET_DSN" AGENTQ_LLM_BASE_URL="$FLEET_LLM_URL" \
        AGENTQ_LLM_PRICE_INPUT_PER_MTOK=0.15 AGENTQ_LLM_PRICE_OUTPUT_PER_MTOK=0.60 \
        AGENTQ_METRICS_LISTEN=127.0.0.1:0 AGENTQ_WORKER_ID="$FLEET_NAME-worker" \
        AGENTQ_WORKER_CONCURRENCY=16 AGENTQ_AMQP_LANES=4 \
        "$BUILD/agentq-worker"
    FLEET_WORKER_PID=$FLEET_LAST_PID
    local port=""
    for ((i = 0; i < 300; i++)); do
        kill -0 "$FLEET_WORKER_PID" 2>/dev/null || { tail -n 20 "$FLEET_DIR/worker.log" >&2; fleet_die "agentq-worker exited"; }
        [[ -z "$port" ]] && port=$(grep -o '"metrics on port [0-9]*"' "$FLEET_DIR/worker.log" | grep -o '[0-9]*' | head -n 1 || true)
        [[ -n "$port" ]] && grep -q '"broker connected' "$FLEET_DIR/worker.log" && break
        sleep 0.1
    done
    if [[ -z "$port" ]] || ! grep -q '"broker connected' "$FLEET_DIR/worker.log"; then
        tail -n 20 "$FLEET_DIR/worker.log" >&2
        fleet_die "agentq-worker did not connect within 30 s"
    fi
    FLEET_METRICS_URL="http://127.0.0.1:$port/metrics"
    fleet_say "worker up (database $FLEET_DB, vhost $FLEET_VHOST, metrics $FLEET_METRICS_URL)"
}

# fleet_wait_final SECONDS ID...: waits until every task's row is final;
# prints "id status" lines. Fails if one is not final in time.
fleet_wait_final() {
    local secs=$1
    shift
    local ids deadline=$((SECONDS + secs)) left
    ids=$(printf "'%s'," "$@")
    ids=${ids%,}
    while :; do
        left=$(psql_q -tAc "SELECT count(*) FROM unnest(ARRAY[$ids]::uuid[]) AS i(id)
                            WHERE NOT EXISTS (SELECT 1 FROM agentq.tasks t
                                              WHERE t.task_id = i.id AND agentq.is_final(t.status))")
        [[ "$left" == 0 ]] && break
        ((SECONDS < deadline)) || {
            psql_q -c "SELECT task_id, status, error FROM agentq.tasks WHERE task_id IN ($ids)" >&2
            fleet_die "$left of $# tasks not final after ${secs}s"
        }
        sleep 0.2
    done
}

fleet_stop() {
    local rc=$?
    trap - EXIT
    local p i
    for p in "${FLEET_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${FLEET_PIDS[@]}"; do
        for ((i = 0; i < 100; i++)); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [[ -n "${FLEET_VHOST:-}" ]]; then
        "$AGENTQ_TEST_RABBITMQCTL" -q delete_vhost "$FLEET_VHOST" >/dev/null 2>&1 || true
    fi
    if ((rc == 0 && ! ${FLEET_KEEP:-0})); then
        [[ -n "${FLEET_DB:-}" ]] && psql_admin -c "DROP DATABASE IF EXISTS \"$FLEET_DB\" WITH (FORCE)" >/dev/null 2>&1
        [[ -n "${FLEET_DIR:-}" ]] && rm -rf "$FLEET_DIR"
    elif ((rc == 0)); then
        fleet_say "kept: logs in $FLEET_DIR, database $FLEET_DB ($FLEET_DSN)"
    elif [[ -n "${FLEET_DIR:-}" ]]; then
        fleet_say "failed (exit $rc); logs in $FLEET_DIR, database ${FLEET_DB:-?} kept"
    fi
    exit "$rc"
}
