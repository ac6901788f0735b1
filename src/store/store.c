/* store.c — the worker's PostgreSQL writer (see store.h).
 *
 * Owns: the request queue and the done list (both under one mutex), the
 * writer thread, its libpq connection, and the eventfd through which the
 * writer wakes the loop to run callbacks. Does not own the event_base, the
 * schema, or what the statuses mean beyond agentq.is_final.
 *
 * Flow: a verb builds a request (its statements with every parameter
 * already rendered as text, or bytes for a body) on the loop thread and
 * queues it. The writer takes a batch, sends BEGIN, each request's
 * prepared statements, COMMIT and a sync in one pipeline, then reads the
 * results. Requests move to the done list only once their transaction's
 * outcome is known; the loop thread drains the done list and calls back.
 *
 * The connection is non-blocking and every wait is a poll() in 100 ms
 * slices, so that aq_store_free() can cut a hung server short at its
 * deadline.
 *
 * Behind a pooler in transaction mode (transaction_pool: PgBouncer's
 * pool_mode = transaction) consecutive transactions of one connection may
 * run in different server sessions, and a server session serves other
 * clients in between. So nothing the writer leaves in a session may
 * outlive its transaction: every statement is sent unnamed (Parse, Bind,
 * Execute with the same SQL and parameter types; still one pipeline per
 * batch), and the liveness lock (a session advisory lock, see
 * agentq.owner_alive) is held by a second connection, to session_dsn,
 * which does nothing else. A renewal through the pooler runs
 * agentq.renew_leases, which takes that lock wherever it is free; the same
 * transaction then releases it again (S_UNHOLD), so a pooled server
 * session never keeps it for a worker that has gone. The writer takes no
 * request while the lock connection is down: both connections are lost
 * and made together.
 *
 * Cache requests share the queue and the connection but not the batch:
 * the writer sends them first, each as an implicit transaction of its own
 * (its own sync), never replays them and never waits for a connection on
 * their behalf. A lookup's deadline is kept on the loop side, by one timer
 * over the list of lookups not yet answered (all have the same timeout, so
 * the list is in deadline order): a lookup is answered by whichever comes
 * first, its result (deliver) or its deadline (the timer), and the other
 * only frees the request. Both run on the loop thread, so no lock decides
 * between them; the request stays the writer's until it comes back
 * through the done list. */
#include "agentq/store.h"
#include "agentq/log.h"
#include "agentq/pgconn.h"
#include "agentq/task.h"

#include <errno.h>
#include <event2/event.h>
#include <libpq-fe.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define STORE_MAX_PARAMS 19
#define STORE_MAX_STMTS 2
#define STORE_BATCH_DEFAULT 500
#define STORE_FLUSH_TIMEOUT_DEFAULT_MS 5000
#define STORE_RECONNECT_MAX_DEFAULT_MS 5000
#define STORE_BACKOFF_MIN_MS 100
#define STORE_CONNECT_TIMEOUT_MS 10000
#define STORE_IDLE_CHECK_US 1000000LL
#define STORE_POLL_SLICE_MS 100
#define STORE_TRANSIENT_RETRIES 5
#define STORE_MAX_LOSSES 10 /* connection losses under one batch */
#define STORE_BYTEA_OID 17
#define STORE_LEASE_DEFAULT_S 30.0
#define STORE_MAX_INTERRUPTIONS_DEFAULT 10
#define STORE_CACHE_TIMEOUT_DEFAULT_MS 1000
/* Request and response texts of queued cache requests, at most: beyond
 * it lookups are answered AQ_EAGAIN and puts dropped at once, so a writer
 * stuck on a dead server does not pile up whole conversations. */
#define STORE_CACHE_QUEUE_BYTES (32u * 1024u * 1024u)

/* ------------------------------------------------------------ statements */

enum { S_CLAIM, S_ROUTE, S_FINISH, S_STEP, S_DEAD, S_DEAD_TASK, S_RENEW, S_SWEEP, S_HOLD, S_PROGRESS, S_LOAD,
       S_CACHE_GET, S_CACHE_PUT, S_UNHOLD, S_COUNT };

static const struct {
    const char *name;
    int nparams;
    int bytea_param; /* 1-based index of a binary bytea parameter, or 0 */
    const char *sql;
} stmts[S_COUNT] = {
    /* agentq.claim (sql/012_leases.sql, with caps and budgets from
     * sql/013_fair.sql) decides under the row's lock. */
    [S_CLAIM] = {"aq_claim", 19, 9,
        "SELECT o_outcome, o_attempt, o_failures, o_status, o_reason, o_weight, o_run_seconds FROM agentq.claim("
        "$1::uuid, $2::text, $3::text, $4::int, $5::int, $6::float8, $7::float8, $8::text,"
        " $9::bytea, $10::bool, $11::bigint, $12::bigint, $13::text, $14::text, $15::int,"
        " $16::float8, $17::int, $18::int, $19::text)"},
    /* agentq.route (sql/013_fair.sql): record as queued, pick the lane. */
    [S_ROUTE] = {"aq_route", 13, 9,
        "SELECT o_outcome, o_lane, o_ttl_ms FROM agentq.route("
        "$1::uuid, $2::text, $3::text, $4::int, $5::int, $6::float8, $7::float8, $8::text,"
        " $9::bytea, $10::bool, $11::bigint, $12::bigint, $13::int)"},
    /* Changes the row only while this attempt runs it; the last columns
     * (pre-update snapshot) tell "already final" and "this very finish,
     * replayed" from "not ours". A failed attempt counts toward
     * amqp.max_attempts, a drained one toward amqp.max_interruptions. With
     * a body ($10), the same statement records the dead letter of a task
     * that ended other than completed, if this finish took effect. A
     * waiting task keeps its question ($13) until wait_until ($14 s from
     * now); a hand-over ($15) is no interruption (sql/014_sessions.sql). */
    [S_FINISH] = {"aq_finish", 15, 10,
        "WITH u AS ("
        " UPDATE agentq.tasks SET status = $3::text, steps = $4::int,"
        "   prompt_tokens = $5::bigint, completion_tokens = $6::bigint,"
        "   cost_usd = $7::float8, result = $8::text, error = $9::text,"
        "   finished_at = CASE WHEN agentq.is_final($3::text) THEN now() END,"
        "   failures = failures + CASE WHEN $3::text IN ('retrying', 'failed') THEN 1 ELSE 0 END,"
        "   interruptions = interruptions + CASE WHEN $3::text = 'queued' AND NOT $15::bool THEN 1 ELSE 0 END,"
        "   run_seconds = greatest(run_seconds, $12::float8),"
        "   question = CASE WHEN $3::text = 'waiting' THEN $13::text END,"
        "   wait_until = CASE WHEN $3::text = 'waiting' THEN now() + $14::float8 * interval '1 second' END,"
        "   resume_reason = CASE WHEN $3::text = 'queued' AND $15::bool THEN 'handover' END,"
        "   lease_owner = NULL, lease_until = NULL"
        " WHERE task_id = $1::uuid AND ($2::int <= 0 OR attempt = $2::int)"
        "   AND status = 'running'"
        " RETURNING task_id),"
        " dl AS ("
        " INSERT INTO agentq.dead_letters (task_id, reason, error, body, store_key)"
        " SELECT u.task_id, $3::text, $9::text, $10::bytea, $11::text FROM u WHERE $10::bytea IS NOT NULL"
        " ON CONFLICT (store_key) DO NOTHING)"
        " SELECT (SELECT count(*) FROM u)::int, t.status, t.attempt"
        "   FROM (SELECT 1) one LEFT JOIN agentq.tasks t ON t.task_id = $1::uuid"},
    [S_STEP] = {"aq_step", 15, 0,
        "INSERT INTO agentq.steps (task_id, attempt, step, seq, kind, name, status,"
        "   started_at, duration_ms, prompt_tokens, completion_tokens, cost_usd, detail, message,"
        "   provider)"
        " VALUES ($1::uuid, $2::int, $3::int, $4::int, $5::text, $6::text, $7::text,"
        "   timestamptz 'epoch' + $8::bigint * interval '1 microsecond',"
        "   $9::float8, $10::bigint, $11::bigint, $12::float8, $13::jsonb, $14::text, $15::text)"
        " ON CONFLICT (task_id, attempt, step, kind, seq) DO NOTHING"},
    [S_DEAD] = {"aq_dead", 6, 4,
        "INSERT INTO agentq.dead_letters (task_id, reason, error, body, headers, store_key)"
        " VALUES ($1::uuid, $2::text, $3::text, $4::bytea, $5::jsonb, $6::text)"
        " ON CONFLICT (store_key) DO NOTHING"},
    /* A task dead-lettered before any claim (a malformed body, an expired
     * message) gets a minimal row. An existing row changes only while it
     * waits (queued, retrying) and only for the message that defined it:
     * a twin with another body, or a copy of a task a worker runs, leaves
     * the task alone. */
    [S_DEAD_TASK] = {"aq_dead_task", 8, 8,
        "INSERT INTO agentq.tasks AS t (task_id, user_id, goal, status, attempt, error,"
        "   worker_id, finished_at)"
        " VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::int, $6::text, $7::text, now())"
        " ON CONFLICT (task_id) DO UPDATE SET status = EXCLUDED.status,"
        "   error = EXCLUDED.error, worker_id = EXCLUDED.worker_id, finished_at = now()"
        " WHERE t.status IN ('queued', 'retrying')"
        "   AND (t.body_sha256 IS NULL OR t.body_sha256 = sha256($8::bytea))"},
    [S_RENEW] = {"aq_renew", 3, 0, "SELECT * FROM agentq.renew_leases($1::int, $2::float8, $3::uuid[])"},
    [S_SWEEP] = {"aq_sweep", 2, 0,
        "SELECT swept_task_id, swept_body, swept_priority FROM agentq.sweep_leases($1::int, $2::float8)"},
    [S_HOLD] = {"aq_hold", 1, 0, "SELECT agentq.hold_owner_lock($1::int)"},
    /* Live progress; never moves run_seconds back (a replay). */
    [S_PROGRESS] = {"aq_progress", 7, 0,
        "UPDATE agentq.tasks SET steps = $3::int, prompt_tokens = $4::bigint,"
        "   completion_tokens = $5::bigint, cost_usd = $6::float8,"
        "   run_seconds = greatest(run_seconds, $7::float8)"
        " WHERE task_id = $1::uuid AND attempt = $2::int AND status = 'running'"},
    [S_LOAD] = {"aq_load", 1, 0,
        "SELECT attempt, step, seq, kind, message, prompt_tokens, completion_tokens, cost_usd"
        " FROM agentq.session_log($1::uuid)"},
    /* The fleet's response cache (sql/015_providers.sql); each runs as a
     * transaction of its own, outside the batches. */
    [S_CACHE_GET] = {"aq_cache_get", 1, 0, "SELECT agentq.cache_get($1::text)"},
    [S_CACHE_PUT] = {"aq_cache_put", 5, 0,
        "SELECT agentq.cache_put($1::text, $2::text, $3::text, $4::int, $5::bigint)"},
    /* Transaction pooling only, after a renewal: releases the liveness
     * lock (sql/012_leases.sql's namespace and key) if agentq.renew_leases
     * took it in this pooled server session, where it would outlive us. */
    [S_UNHOLD] = {"aq_unhold", 1, 0,
        "SELECT count(pg_advisory_unlock(1634169969, $1::int)) FROM pg_catalog.pg_locks l"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.pid = pg_backend_pid()"
        "   AND l.classid = 1634169969::oid AND l.objid = $1::int::oid AND l.objsubid = 2"},
};

/* -------------------------------------------------------------- requests */

enum { REQ_CLAIM, REQ_ROUTE, REQ_FINISH, REQ_STEP, REQ_DEAD, REQ_RENEW, REQ_SWEEP, REQ_PROGRESS, REQ_LOAD,
       REQ_CACHE_GET, REQ_CACHE_PUT };
static const char *const req_names[] = {"claim", "route", "finish", "step", "dead letter", "lease renewal",
                                        "lease sweep", "progress", "session load", "cache lookup",
                                        "cache put"};

typedef struct stmt {
    int id;
    int n;
    char *v[STORE_MAX_PARAMS]; /* owned; NULL is SQL NULL */
    int len[STORE_MAX_PARAMS];
    int fmt[STORE_MAX_PARAMS];
} stmt;

typedef struct req {
    struct req *next;
    int kind;
    int nstmt;
    stmt st[STORE_MAX_STMTS];
    char task_id[AQ_TASK_ID_LEN + 1]; /* for log lines; may be "" */
    int64_t queued_us;
    aq_store_claim_cb claim_cb;
    aq_store_route_cb route_cb;
    aq_store_done_cb done_cb;
    aq_store_sweep_cb sweep_cb;
    aq_store_renew_cb renew_cb;
    aq_store_load_cb load_cb;
    void *arg;
    /* Set by the writer before the request reaches the done list. */
    int code;
    aq_store_outcome outcome;
    int attempt;
    int failures;
    aq_status status;
    char reason[256];       /* REQ_CLAIM: why busy */
    int weight;             /* REQ_CLAIM: the user's */
    int lane;               /* REQ_ROUTE */
    int64_t ttl_ms;
    aq_store_swept *swept;  /* REQ_SWEEP: the rows marked */
    size_t nswept;
    char **lost;            /* REQ_RENEW: task ids no longer held */
    size_t nlost;
    double run_seconds;     /* REQ_CLAIM */
    aq_task_step *rows;     /* REQ_LOAD */
    size_t nrows;
    /* REQ_CACHE_GET, REQ_CACHE_PUT */
    aq_store_cache_cb cache_cb;
    size_t cache_bytes;     /* its texts, counted in the store's cache_queued */
    int64_t deadline_us;    /* a lookup's answer is due (monotonic) */
    char *response;         /* set by the writer: a hit's text, NUL-terminated */
    size_t response_len;
    /* Loop thread only: in the store's list of lookups not yet answered. */
    bool waiting;
    struct req *wprev, *wnext;
} req;

enum { LINK_UNKNOWN, LINK_UP, LINK_DOWN };

struct aq_store {
    char *dsn;
    char *dsn_shown; /* the DSN without its password, for log lines */
    bool pooled;     /* transaction_pool: unnamed statements, lock connection */
    char *lock_dsn;  /* pooled: the liveness lock's connection's DSN */
    char *lock_dsn_shown;
    char *worker_id;
    int max_inflight_per_user; /* claim refuses past it (0: no cap) */
    char over_budget[8];        /* "fail" or "wait" */
    int lanes;
    double lease_seconds;
    int max_interruptions;
    int owner;          /* this store's lease key (sql/012_leases.sql) */
    int batch_max;
    int flush_ms;
    int flush_timeout_ms;
    int reconnect_max_ms;
    int cache_timeout_ms;
    char token_prefix[24];
    uint64_t token_seq; /* atomic */

    struct event_base *base;
    struct event *wake_ev;
    struct event *cache_timer; /* the lookups' deadlines */
    req *gets_head, *gets_tail; /* loop thread only: lookups not yet answered */
    int efd;
    pthread_t thread;
    bool thread_started;

    pthread_mutex_t mu;
    pthread_cond_t cond;
    /* under mu */
    req *q_head, *q_tail;
    size_t q_len;
    req *done_head, *done_tail;
    size_t pending;
    bool closing;
    int64_t stop_deadline_us;
    aq_store_counters counters;
    size_t cache_queued;  /* bytes of cache requests' texts not yet done */
    size_t q_gets;        /* lookups in the queue (they cut the flush window) */

    /* writer thread only */
    PGconn *conn;
    PGconn *lockc;      /* pooled: holds the liveness lock, nothing else */
    bool lock_held;     /* pooled: lockc holds it (else renewals retry) */
    bool pooler_misfit; /* the last failure says a pooler shares sessions */
    int link;
    bool ever_connected;
    aq_pg_backoff backoff;
    int64_t next_connect_us;
    int64_t next_check_us;
};

static void stmt_init(stmt *st, int id)
{
    memset(st, 0, sizeof *st);
    st->id = id;
}

static void p_str(stmt *st, const char *s)
{
    st->v[st->n++] = s ? aq_xstrdup(s) : NULL;
}

static void p_int(stmt *st, long long v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", v);
    p_str(st, buf);
}

static void p_dbl(stmt *st, double v)
{
    char buf[40];
    snprintf(buf, sizeof buf, "%.17g", v);
    p_str(st, buf);
}

static void p_bin(stmt *st, const void *b, size_t n)
{
    char *copy = aq_xmalloc(n);
    if (n) memcpy(copy, b, n);
    st->v[st->n] = copy;
    st->len[st->n] = (int)n;
    st->fmt[st->n] = 1;
    st->n++;
}

static req *req_new(int kind, const char *task_id)
{
    req *r = aq_xcalloc(1, sizeof *r);
    r->kind = kind;
    if (task_id) snprintf(r->task_id, sizeof r->task_id, "%s", task_id);
    return r;
}

static void req_free(req *r)
{
    for (int i = 0; i < r->nstmt; i++)
        for (int j = 0; j < r->st[i].n; j++) free(r->st[i].v[j]);
    for (size_t i = 0; i < r->nswept; i++) free(r->swept[i].body);
    free(r->swept);
    for (size_t i = 0; i < r->nlost; i++) free(r->lost[i]);
    free(r->lost);
    for (size_t i = 0; i < r->nrows; i++) free(r->rows[i].message);
    free(r->rows);
    free(r->response);
    free(r);
}

/* ----------------------------------------------------------------- locks */

static void lock(aq_store *s) { pthread_mutex_lock(&s->mu); }
static void unlock(aq_store *s) { pthread_mutex_unlock(&s->mu); }

/* Waits on the store's condition (mu held) until the monotonic time `due`. */
static void wait_until(aq_store *s, int64_t due_us)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(due_us / 1000000);
    ts.tv_nsec = (long)(due_us % 1000000) * 1000;
    pthread_cond_timedwait(&s->cond, &s->mu, &ts);
}

static bool stop_passed(aq_store *s)
{
    lock(s);
    bool passed = s->closing && aq_mono_us() >= s->stop_deadline_us;
    unlock(s);
    return passed;
}

/* ------------------------------------------------------- completing side */

static bool is_cache(const req *r) { return r->kind == REQ_CACHE_GET || r->kind == REQ_CACHE_PUT; }

/* The lookups not yet answered: a list in deadline order. Loop thread. */
static void gets_unlink(aq_store *s, req *r)
{
    if (r->wprev)
        r->wprev->wnext = r->wnext;
    else
        s->gets_head = r->wnext;
    if (r->wnext)
        r->wnext->wprev = r->wprev;
    else
        s->gets_tail = r->wprev;
    r->wprev = r->wnext = NULL;
    r->waiting = false;
}

/* Calls a lookup back once: whichever of its result and its deadline
 * comes first. Loop thread. */
static void answer_get(aq_store *s, req *r, int code)
{
    if (!r->waiting) return;
    gets_unlink(s, r);
    bool hit = code == AQ_OK && r->response;
    lock(s);
    if (code != AQ_OK)
        s->counters.cache_errors++;
    else if (hit)
        s->counters.cache_hits++;
    else
        s->counters.cache_misses++;
    unlock(s);
    r->cache_cb(r->arg, hit ? r->response : NULL, hit ? r->response_len : 0, code);
}

/* Answers every lookup whose deadline passed, then sleeps until the next
 * one's. A callback may queue new lookups: they go to the tail, later. */
static void on_cache_timer(evutil_socket_t fd, short what, void *arg)
{
    aq_store *s = arg;
    (void)fd;
    (void)what;
    int64_t now = aq_mono_us();
    while (s->gets_head && s->gets_head->deadline_us <= now) answer_get(s, s->gets_head, AQ_ETIMEDOUT);
    if (s->gets_head) {
        int64_t us = s->gets_head->deadline_us - now;
        struct timeval tv = {.tv_sec = (time_t)(us / 1000000), .tv_usec = (suseconds_t)(us % 1000000)};
        evtimer_add(s->cache_timer, &tv);
    }
}

/* Moves finished requests to the done list (steps are freed: nobody waits
 * for them) and wakes the loop. Writer thread. */
static void complete(aq_store *s, req **v, size_t n, bool committed)
{
    uint64_t one = 1;
    bool wake = false;
    lock(s);
    if (committed) {
        s->counters.transactions++;
        s->counters.requests += n;
    }
    for (size_t i = 0; i < n; i++) {
        req *r = v[i];
        s->pending--;
        if (is_cache(r)) {
            s->cache_queued -= r->cache_bytes;
            if (r->kind == REQ_CACHE_PUT) {
                if (r->code == AQ_OK)
                    s->counters.cache_puts++;
                else
                    s->counters.cache_dropped++;
            }
        } else if (r->code != AQ_OK) {
            s->counters.failed++;
        }
        if (!r->claim_cb && !r->route_cb && !r->done_cb && !r->sweep_cb && !r->renew_cb &&
            !r->load_cb && !r->cache_cb) { /* nobody waits */
            req_free(r);
            continue;
        }
        r->next = NULL;
        if (s->done_tail)
            s->done_tail->next = r;
        else
            s->done_head = r;
        s->done_tail = r;
        wake = true;
    }
    unlock(s);
    if (wake && write(s->efd, &one, sizeof one) < 0 && errno != EAGAIN)
        aq_log(AQ_LOG_ERROR, "store: cannot wake the event loop: %s", strerror(errno));
}

static void fail_reqs(aq_store *s, req **v, size_t n, int code, const char *why)
{
    for (size_t i = 0; i < n; i++) v[i]->code = code;
    /* One line per request only when it is that request's own fault;
     * a shutdown with thousands queued gets one line. */
    if (n == 1)
        aq_log_task(AQ_LOG_WARN, v[0]->task_id[0] ? v[0]->task_id : NULL, NULL,
                    "store: %s not written: %s", req_names[v[0]->kind], why);
    else
        aq_log(AQ_LOG_WARN, "store: %zu requests not written: %s", n, why);
    complete(s, v, n, false);
}

/* Runs the callbacks of everything on the done list. Loop thread. */
static void deliver(aq_store *s)
{
    lock(s);
    req *list = s->done_head;
    s->done_head = s->done_tail = NULL;
    unlock(s);
    while (list) {
        req *r = list;
        list = r->next;
        if (r->kind == REQ_CLAIM) {
            aq_store_claimed c = {r->outcome, r->attempt, r->failures, r->status, r->reason, r->weight,
                                  r->run_seconds};
            if (r->claim_cb) r->claim_cb(r->arg, r->code == AQ_OK ? &c : NULL, r->code);
        } else if (r->kind == REQ_ROUTE) {
            aq_store_routed rt = {r->outcome == AQ_STORE_FINAL, r->lane, r->ttl_ms};
            if (r->route_cb) r->route_cb(r->arg, r->code == AQ_OK ? &rt : NULL, r->code);
        } else if (r->kind == REQ_SWEEP) {
            if (r->sweep_cb) r->sweep_cb(r->arg, r->swept, r->nswept, r->code);
        } else if (r->kind == REQ_RENEW) {
            if (r->renew_cb) r->renew_cb(r->arg, (const char *const *)r->lost, r->nlost, r->code);
        } else if (r->kind == REQ_LOAD) {
            r->load_cb(r->arg, r->code == AQ_OK ? r->rows : NULL, r->code == AQ_OK ? r->nrows : 0, r->code);
        } else if (r->kind == REQ_CACHE_GET) {
            answer_get(s, r, r->code); /* a no-op if its deadline answered it */
        } else if (r->done_cb) {
            r->done_cb(r->arg, r->code);
        }
        req_free(r);
    }
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    aq_store *s = arg;
    uint64_t v;
    (void)what;
    /* A failed read only means another wake-up drained it first. */
    if (read(fd, &v, sizeof v) < 0 && errno != EAGAIN)
        aq_log(AQ_LOG_ERROR, "store: eventfd read: %s", strerror(errno));
    deliver(s);
}

/* ------------------------------------------------------------ connection */

/* libpq's messages span lines; a log line is one line. */
static void one_line(char *msg)
{
    char *w = msg;
    bool space = false;
    for (const char *p = msg; *p; p++) {
        bool ws = *p == '\n' || *p == '\t' || *p == ' ' || *p == '\r';
        if (ws) {
            space = w != msg;
            continue;
        }
        if (space) *w++ = ' ';
        space = false;
        *w++ = *p;
    }
    *w = '\0';
}

static void set_msg(char *msg, size_t msglen, const char *text)
{
    snprintf(msg, msglen, "%s", text && *text ? text : "unknown error");
    one_line(msg);
}

static void drop_conn(aq_store *s)
{
    if (s->conn) PQfinish(s->conn);
    s->conn = NULL;
    if (s->lockc) PQfinish(s->lockc);
    s->lockc = NULL;
    s->lock_held = false;
    lock(s);
    s->counters.connected = false;
    unlock(s);
}

/* The connection went away under us: log it once, reconnect at once. */
static void lost_conn(aq_store *s, const char *why)
{
    if (s->link != LINK_DOWN)
        aq_log(s->pooler_misfit ? AQ_LOG_ERROR : AQ_LOG_WARN,
               "store: lost the PostgreSQL connection (%s): %s; reconnecting", s->dsn_shown, why);
    s->link = LINK_DOWN;
    drop_conn(s);
    aq_pg_backoff_reset(&s->backoff);
    s->next_connect_us = aq_mono_us();
}

enum { IO_OK = 0, IO_CONN = -1, IO_ABANDON = -2 };

/* Next result of the pipeline of `c` (NULL at the end of a query's
 * results), flushing what is still unsent meanwhile. */
static int next_result(aq_store *s, PGconn *c, PGresult **out)
{
    *out = NULL;
    for (;;) {
        int f = PQflush(c);
        if (f < 0) return IO_CONN;
        if (!PQisBusy(c)) {
            *out = PQgetResult(c);
            return IO_OK;
        }
        struct pollfd pfd = {.fd = PQsocket(c), .events = (short)(POLLIN | (f ? POLLOUT : 0))};
        if (pfd.fd < 0) return IO_CONN;
        int pr = poll(&pfd, 1, STORE_POLL_SLICE_MS);
        if (pr < 0 && errno != EINTR) return IO_CONN;
        if (stop_passed(s)) return IO_ABANDON;
        if (pr > 0 && (pfd.revents & (POLLIN | POLLERR | POLLHUP)) && !PQconsumeInput(c))
            return IO_CONN;
    }
}

/* Reads one query's result and the NULL that ends it. *out is NULL only
 * when something other than IO_OK is returned. */
static int read_one(aq_store *s, PGconn *c, PGresult **out)
{
    PGresult *end;
    int rc = next_result(s, c, out);
    if (rc != IO_OK) return rc;
    if (!*out) return IO_CONN; /* out of step with the pipeline: start over */
    if (PQstatus(c) == CONNECTION_BAD) goto bad;
    rc = next_result(s, c, &end);
    if (rc != IO_OK) goto bad;
    if (end) {
        PQclear(end);
        goto bad;
    }
    return IO_OK;
bad:
    PQclear(*out);
    *out = NULL;
    return rc == IO_ABANDON ? IO_ABANDON : IO_CONN;
}

static int read_sync(aq_store *s, PGconn *c)
{
    PGresult *r;
    int rc = next_result(s, c, &r);
    if (rc != IO_OK) return rc;
    rc = r && PQresultStatus(r) == PGRES_PIPELINE_SYNC ? IO_OK : IO_CONN;
    PQclear(r);
    return rc;
}

static void stmt_types(int id, Oid *types)
{
    memset(types, 0, sizeof *types * STORE_MAX_PARAMS);
    if (stmts[id].bytea_param) types[stmts[id].bytea_param - 1] = STORE_BYTEA_OID;
}

/* Queues statement `id` in the pipeline of `c`: by the name prepare_all
 * gave it, or under transaction pooling unnamed, with the same SQL and
 * parameter types (the server parses it again: the price of a session
 * that is not ours, measured in docs/deploy.md). */
static int send_stmt(const aq_store *s, PGconn *c, int id, int n, const char *const *v, const int *len,
                     const int *fmt)
{
    if (!s->pooled) return PQsendQueryPrepared(c, stmts[id].name, n, v, len, fmt, 0);
    Oid types[STORE_MAX_PARAMS];
    stmt_types(id, types);
    return PQsendQueryParams(c, stmts[id].sql, n, types, v, len, fmt, 0);
}

/* What a server session shared with other clients (a pooler in
 * transaction mode, with postgres.pool_mode left "session") does to named
 * statements: one this connection prepared is missing (26000), or one
 * another client prepared is there already (42P05). Either way says so in
 * msg, with the fix, and returns true. */
static bool pooler_hint(aq_store *s, const PGresult *r, char *msg, size_t msglen)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    if (s->pooled || !state || (strcmp(state, "26000") && strcmp(state, "42P05"))) return false;
    size_t l = strlen(msg);
    if (l + 1 < msglen)
        snprintf(msg + l, msglen - l,
                 " — this connection's server session is shared with other clients, as behind PgBouncer in"
                 " transaction pooling mode: set postgres.pool_mode = \"transaction\" and postgres.listen_dsn"
                 " (docs/deploy.md, PgBouncer)");
    s->pooler_misfit = true;
    return true;
}

/* Makes every statement known on the fresh connection. */
static bool prepare_all(aq_store *s, char *msg, size_t msglen)
{
    PGconn *c = s->conn;
    for (int i = 0; i < S_COUNT; i++) {
        Oid types[STORE_MAX_PARAMS];
        stmt_types(i, types);
        if (!PQsendPrepare(c, stmts[i].name, stmts[i].sql, stmts[i].nparams, types)) {
            set_msg(msg, msglen, PQerrorMessage(c));
            return false;
        }
    }
    if (!PQpipelineSync(c)) {
        set_msg(msg, msglen, PQerrorMessage(c));
        return false;
    }
    bool ok = true;
    for (int i = 0; i < S_COUNT; i++) {
        PGresult *r;
        if (read_one(s, c, &r) != IO_OK) {
            set_msg(msg, msglen, PQerrorMessage(c));
            return false;
        }
        if (ok && PQresultStatus(r) != PGRES_COMMAND_OK) {
            const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
            snprintf(msg, msglen, "preparing %s: %s", stmts[i].name,
                     primary ? primary : PQresStatus(PQresultStatus(r)));
            one_line(msg);
            if (!pooler_hint(s, r, msg, msglen)) {
                size_t l = strlen(msg);
                if (l + 1 < msglen) snprintf(msg + l, msglen - l, " (is the schema migrated? agentqctl migrate)");
            }
            ok = false;
        }
        PQclear(r);
    }
    if (read_sync(s, c) != IO_OK && ok) {
        set_msg(msg, msglen, PQerrorMessage(c));
        ok = false;
    }
    return ok;
}

static void result_msg(const PGresult *r, char *msg, size_t msglen);

/* Takes this worker's liveness lock on `c` (the store's connection, or
 * under transaction pooling the lock connection) before any claim can
 * name it as a lease owner (see agentq.owner_alive). False when the query
 * failed (msg says why); the lock may still be another session's. */
static bool hold_owner_lock(aq_store *s, PGconn *c, char *msg, size_t msglen)
{
    char owner[16];
    snprintf(owner, sizeof owner, "%d", s->owner);
    const char *v[] = {owner};
    PGresult *r = NULL;
    if (!send_stmt(s, c, S_HOLD, 1, v, NULL, NULL) || !PQpipelineSync(c) || read_one(s, c, &r) != IO_OK) {
        set_msg(msg, msglen, PQerrorMessage(c));
        return false;
    }
    bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;
    bool held = ok && PQgetvalue(r, 0, 0)[0] == 't';
    if (!ok) result_msg(r, msg, msglen);
    else if (!held)
        aq_log(AQ_LOG_INFO, "store: lease key %d is held by another session (our previous connection?);"
               " the next lease renewal takes it", s->owner);
    PQclear(r);
    if (read_sync(s, c) != IO_OK) {
        if (ok) set_msg(msg, msglen, PQerrorMessage(c));
        return false;
    }
    if (s->pooled) s->lock_held = held;
    return ok;
}

static bool stop_cb(void *arg) { return stop_passed(arg); }

/* Transaction pooling: makes the lock connection and takes the lock. */
static bool connect_lock(aq_store *s, char *msg, size_t msglen)
{
    char why[512] = "";
    aq_pg_connect_opts o = {.application_name = "agentq-worker-lock",
                            .timeout_ms = STORE_CONNECT_TIMEOUT_MS,
                            .stop = stop_cb,
                            .stop_arg = s};
    PGconn *c = aq_pg_connect(s->lock_dsn, &o, why, sizeof why);
    if (c && (PQsetnonblocking(c, 1) != 0 || !PQenterPipelineMode(c))) {
        set_msg(why, sizeof why, PQerrorMessage(c));
        PQfinish(c);
        c = NULL;
    }
    if (c && !hold_owner_lock(s, c, why, sizeof why)) {
        PQfinish(c);
        c = NULL;
    }
    if (!c) {
        snprintf(msg, msglen, "the liveness lock's connection (postgres.listen_dsn: %s): %s", s->lock_dsn_shown,
                 why);
        return false;
    }
    s->lockc = c;
    return true;
}

/* Transaction pooling: false once the lock connection has closed (the
 * server went away or ended the session): the lock went with it. */
static bool lock_conn_up(aq_store *s)
{
    if (!s->pooled) return true;
    if (!s->lockc || PQsocket(s->lockc) < 0) return false;
    struct pollfd pfd = {.fd = PQsocket(s->lockc), .events = POLLIN};
    if (poll(&pfd, 1, 0) > 0 && !PQconsumeInput(s->lockc)) return false;
    PGnotify *n;
    while ((n = PQnotifies(s->lockc))) PQfreemem(n);
    return PQstatus(s->lockc) == CONNECTION_OK;
}

/* One connection attempt (bounded by STORE_CONNECT_TIMEOUT_MS and the stop
 * deadline). On failure, schedules the next one with backoff and jitter. */
static bool try_connect(aq_store *s)
{
    char msg[1024] = "";
    aq_pg_connect_opts o = {.application_name = "agentq-worker",
                            .timeout_ms = STORE_CONNECT_TIMEOUT_MS,
                            .stop = stop_cb,
                            .stop_arg = s};
    s->pooler_misfit = false;
    /* The lock first: nothing may be claimed in this worker's name before. */
    PGconn *c = !s->pooled || connect_lock(s, msg, sizeof msg) ? aq_pg_connect(s->dsn, &o, msg, sizeof msg) : NULL;
    if (c) {
        s->conn = c;
        if (PQsetnonblocking(c, 1) != 0 || !PQenterPipelineMode(c)) {
            set_msg(msg, sizeof msg, PQerrorMessage(c));
            s->conn = NULL;
        } else if (!s->pooled && (!prepare_all(s, msg, sizeof msg) || !hold_owner_lock(s, c, msg, sizeof msg))) {
            s->conn = NULL;
        }
        if (!s->conn) PQfinish(c);
    }
    if (!s->conn) drop_conn(s); /* the lock connection too */

    int64_t now = aq_mono_us();
    if (s->conn) {
        lock(s);
        s->counters.connected = true;
        if (s->ever_connected) s->counters.reconnects++;
        unlock(s);
        if (s->link == LINK_DOWN)
            aq_log(AQ_LOG_INFO, "store: PostgreSQL connection restored (%s)", s->dsn_shown);
        else if (s->link == LINK_UNKNOWN)
            aq_log(AQ_LOG_INFO, "store: connected to PostgreSQL (%s%s%s)", s->dsn_shown,
                   s->pooled ? "; transaction pooling, the liveness lock on " : "",
                   s->pooled ? s->lock_dsn_shown : "");
        s->link = LINK_UP;
        s->ever_connected = true;
        aq_pg_backoff_reset(&s->backoff);
        s->next_check_us = now + STORE_IDLE_CHECK_US;
        return true;
    }
    if (s->link != LINK_DOWN || s->pooler_misfit)
        aq_log(s->pooler_misfit ? AQ_LOG_ERROR : AQ_LOG_WARN,
               "store: cannot connect to PostgreSQL (%s): %s; retrying with backoff, "
               "requests queue meanwhile", s->dsn_shown, msg);
    s->link = LINK_DOWN;
    s->next_connect_us = now + (int64_t)aq_pg_backoff_next(&s->backoff) * 1000;
    return false;
}

/* Connects, waiting out an outage; false only once the stop deadline has
 * passed without a connection. A lock connection found closed loses the
 * store connection too: no claim goes out unless the lock is held. */
static bool ensure_conn(aq_store *s)
{
    if (s->conn && !lock_conn_up(s)) lost_conn(s, "the liveness lock's connection (postgres.listen_dsn) closed");
    while (!s->conn) {
        if (stop_passed(s)) return false;
        if (aq_mono_us() >= s->next_connect_us) {
            try_connect(s);
            continue;
        }
        lock(s);
        int64_t due = s->next_connect_us;
        if (s->closing && s->stop_deadline_us < due) due = s->stop_deadline_us;
        wait_until(s, due);
        unlock(s);
    }
    return true;
}

/* While idle, notices a connection the server closed (restart,
 * pg_terminate_backend) before a batch has to. */
static void check_idle_conn(aq_store *s)
{
    if (!lock_conn_up(s)) {
        lost_conn(s, "the liveness lock's connection (postgres.listen_dsn) closed");
        return;
    }
    struct pollfd pfd = {.fd = PQsocket(s->conn), .events = POLLIN};
    if (pfd.fd < 0) {
        lost_conn(s, "no socket");
        return;
    }
    if (poll(&pfd, 1, 0) <= 0) return;
    if (!PQconsumeInput(s->conn) || PQstatus(s->conn) == CONNECTION_BAD) {
        char msg[512];
        set_msg(msg, sizeof msg, PQerrorMessage(s->conn));
        lost_conn(s, msg);
        return;
    }
    PGnotify *n;
    while ((n = PQnotifies(s->conn))) PQfreemem(n);
}

/* ----------------------------------------------------------- the writer */

enum { TXN_OK, TXN_CONN, TXN_TRANSIENT, TXN_STMT, TXN_ABANDONED };

static int classify(PGconn *c, const PGresult *r)
{
    if (PQstatus(c) == CONNECTION_BAD) return TXN_CONN;
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    /* No SQLSTATE: libpq's own error, i.e. the connection. */
    if (!state) return TXN_CONN;
    /* 08: connection exception; 57P: server shutting down or admin
     * termination; 26000: our prepared statements are gone (a pooler);
     * 25P02: the session is stuck in an aborted transaction. A fresh
     * connection fixes all of them. */
    if (!strncmp(state, "08", 2) || !strncmp(state, "57P", 3) || !strcmp(state, "26000") ||
        !strcmp(state, "25P02"))
        return TXN_CONN;
    /* Serialization failure, deadlock, lock not available, out of
     * resources: the same batch may well pass next time. */
    if (!strcmp(state, "40001") || !strcmp(state, "40P01") || !strcmp(state, "55P03") ||
        !strncmp(state, "53", 2))
        return TXN_TRANSIENT;
    return TXN_STMT;
}

static void result_msg(const PGresult *r, char *msg, size_t msglen)
{
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    const char *detail = PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL);
    if (primary)
        snprintf(msg, msglen, "%s%s%s%s%s", state ? state : "", state ? ": " : "", primary,
                 detail ? " — " : "", detail ? detail : "");
    else
        set_msg(msg, msglen, PQresultErrorMessage(r));
    one_line(msg);
}

static void interpret_claim(req *r, const PGresult *res)
{
    static const struct {
        const char *name;
        aq_store_outcome outcome;
    } outcomes[] = {{"run", AQ_STORE_RUN},         {"final", AQ_STORE_FINAL},
                    {"duplicate", AQ_STORE_DUPLICATE}, {"conflict", AQ_STORE_CONFLICT},
                    {"ended", AQ_STORE_ENDED},     {"busy", AQ_STORE_BUSY}};
    r->code = AQ_EAGAIN;
    if (PQntuples(res) < 1 || PQnfields(res) < 4) return;
    const char *outcome = PQgetvalue(res, 0, 0);
    r->attempt = atoi(PQgetvalue(res, 0, 1));
    r->failures = atoi(PQgetvalue(res, 0, 2));
    r->status = aq_status_parse(PQgetvalue(res, 0, 3));
    if (PQnfields(res) > 4 && !PQgetisnull(res, 0, 4))
        snprintf(r->reason, sizeof r->reason, "%s", PQgetvalue(res, 0, 4));
    r->weight = PQnfields(res) > 5 && !PQgetisnull(res, 0, 5) ? atoi(PQgetvalue(res, 0, 5)) : 1;
    r->run_seconds = PQnfields(res) > 6 && !PQgetisnull(res, 0, 6) ? strtod(PQgetvalue(res, 0, 6), NULL) : 0;
    for (size_t i = 0; i < AQ_ARRAY_LEN(outcomes); i++) {
        if (strcmp(outcome, outcomes[i].name)) continue;
        r->outcome = outcomes[i].outcome;
        r->code = AQ_OK;
        return;
    }
    aq_log_task(AQ_LOG_ERROR, r->task_id, NULL, "store: unknown claim outcome '%s'", outcome);
}

static void interpret_route(req *r, const PGresult *res)
{
    r->code = AQ_EAGAIN;
    if (PQntuples(res) < 1 || PQnfields(res) < 3) return;
    const char *outcome = PQgetvalue(res, 0, 0);
    r->outcome = strcmp(outcome, "final") ? AQ_STORE_RUN : AQ_STORE_FINAL;
    r->lane = atoi(PQgetvalue(res, 0, 1));
    r->ttl_ms = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
    r->code = AQ_OK;
}

/* r->attempt and r->status hold what the finish asked for. */
static void interpret_finish(req *r, const PGresult *res)
{
    bool row = PQntuples(res) && !PQgetisnull(res, 0, 1);
    int updated = PQntuples(res) ? atoi(PQgetvalue(res, 0, 0)) : 0;
    const char *status = row ? PQgetvalue(res, 0, 1) : NULL;
    int attempt = row ? atoi(PQgetvalue(res, 0, 2)) : 0;
    aq_status now = aq_status_parse(status);
    bool replayed = row && now == r->status && (r->attempt <= 0 || attempt == r->attempt);
    if (updated > 0 || replayed || aq_status_final(now)) {
        r->code = AQ_OK;
        return;
    }
    r->code = AQ_ENOTFOUND;
    if (row)
        aq_log_task(AQ_LOG_INFO, r->task_id, NULL,
                    "store: finish of attempt %d changed nothing: the row is %s at attempt %d", r->attempt,
                    status, attempt);
    else
        aq_log_task(AQ_LOG_WARN, r->task_id, NULL, "store: finish changed nothing: the row does not exist");
}

/* The task ids a renewal no longer holds, copied for the loop thread. */
static void interpret_renew(req *r, const PGresult *res)
{
    int n = PQntuples(res);
    r->code = AQ_OK;
    if (n <= 0) return;
    r->lost = aq_xcalloc((size_t)n, sizeof *r->lost);
    for (int i = 0; i < n; i++) r->lost[r->nlost++] = aq_xstrdup(PQgetvalue(res, i, 0));
}

/* The rows a sweep marked, copied for the loop thread. */
static void interpret_sweep(req *r, const PGresult *res)
{
    int n = PQntuples(res);
    r->code = AQ_OK;
    if (n <= 0) return;
    r->swept = aq_xcalloc((size_t)n, sizeof *r->swept);
    for (int i = 0; i < n; i++) {
        aq_store_swept *w = &r->swept[r->nswept];
        size_t len = 0;
        unsigned char *b = PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 1), &len);
        if (!b) aq_oom("a swept task's body");
        snprintf(w->task_id, sizeof w->task_id, "%s", PQgetvalue(res, i, 0));
        w->body = aq_xmalloc(len + 1);
        memcpy(w->body, b, len);
        w->body[len] = '\0';
        w->body_len = len;
        PQfreemem(b);
        w->priority = atoi(PQgetvalue(res, i, 2));
        r->nswept++;
    }
}

static void interpret_progress(req *r, const PGresult *res)
{
    r->code = atoi(PQcmdTuples((PGresult *)res)) > 0 ? AQ_OK : AQ_ENOTFOUND;
}

/* The rows a resume reads, copied for the loop thread. */
static void interpret_load(req *r, const PGresult *res)
{
    int n = PQntuples(res);
    r->code = AQ_OK;
    if (n <= 0) return;
    r->rows = aq_xcalloc((size_t)n, sizeof *r->rows);
    for (int i = 0; i < n; i++) {
        aq_task_step *w = &r->rows[r->nrows++];
        w->attempt = atoi(PQgetvalue(res, i, 0));
        w->step = atoi(PQgetvalue(res, i, 1));
        w->seq = atoi(PQgetvalue(res, i, 2));
        w->tool = !strcmp(PQgetvalue(res, i, 3), "tool");
        w->message_len = (size_t)PQgetlength(res, i, 4);
        w->message = aq_xstrndup(PQgetvalue(res, i, 4), w->message_len);
        w->prompt_tokens = strtoll(PQgetvalue(res, i, 5), NULL, 10);
        w->completion_tokens = strtoll(PQgetvalue(res, i, 6), NULL, 10);
        w->cost_usd = strtod(PQgetvalue(res, i, 7), NULL);
    }
}

/* Sends ROLLBACK after a failed pipeline left the session in an aborted
 * transaction block. */
static void rollback(aq_store *s)
{
    PGTransactionStatusType ts = PQtransactionStatus(s->conn);
    if (ts != PQTRANS_INERROR && ts != PQTRANS_INTRANS) return;
    PGresult *r = NULL;
    if (!PQsendQueryParams(s->conn, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0) ||
        !PQpipelineSync(s->conn) || read_one(s, s->conn, &r) != IO_OK || read_sync(s, s->conn) != IO_OK) {
        PQclear(r);
        lost_conn(s, "rollback failed");
        return;
    }
    PQclear(r);
}

/* One transaction holding every request of v. On TXN_STMT, *bad is the
 * index of the request whose statement failed (n if unknown). */
static int run_txn(aq_store *s, req **v, size_t n, size_t *bad, char *msg, size_t msglen)
{
    PGconn *c = s->conn;
    size_t nops = 2;
    for (size_t i = 0; i < n; i++) nops += (size_t)v[i]->nstmt;
    PGresult **res = aq_xcalloc(nops, sizeof *res);
    size_t *owner = aq_xcalloc(nops, sizeof *owner);
    int *first = aq_xcalloc(nops, sizeof *first); /* a request's first statement: its result */
    int rc = TXN_OK;
    *bad = n;

    /* Send everything, then read: one round trip for the whole batch. */
    bool sent = PQsendQueryParams(c, "BEGIN", 0, NULL, NULL, NULL, NULL, 0);
    size_t k = 1;
    owner[0] = n;
    for (size_t i = 0; sent && i < n; i++) {
        for (int j = 0; sent && j < v[i]->nstmt; j++, k++) {
            const stmt *st = &v[i]->st[j];
            owner[k] = i;
            first[k] = j == 0;
            sent = send_stmt(s, c, st->id, st->n, (const char *const *)st->v, st->len, st->fmt);
        }
    }
    owner[nops - 1] = n;
    sent = sent && PQsendQueryParams(c, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) &&
           PQpipelineSync(c);
    if (!sent) {
        set_msg(msg, msglen, PQerrorMessage(c));
        rc = TXN_CONN;
        goto out;
    }

    for (k = 0; k < nops; k++) {
        int r = read_one(s, c, &res[k]);
        if (r != IO_OK) {
            set_msg(msg, msglen, PQerrorMessage(c));
            rc = r == IO_ABANDON ? TXN_ABANDONED : TXN_CONN;
            goto out;
        }
        if (PQresultStatus(res[k]) == PGRES_FATAL_ERROR && PQstatus(c) == CONNECTION_BAD) {
            result_msg(res[k], msg, msglen);
            rc = TXN_CONN;
            goto out;
        }
    }
    int r = read_sync(s, c);
    if (r != IO_OK) {
        set_msg(msg, msglen, PQerrorMessage(c));
        rc = r == IO_ABANDON ? TXN_ABANDONED : TXN_CONN;
        goto out;
    }

    for (k = 0; k < nops; k++) {
        ExecStatusType st = PQresultStatus(res[k]);
        if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) continue;
        /* The first error; the rest of the pipeline is merely aborted. */
        result_msg(res[k], msg, msglen);
        pooler_hint(s, res[k], msg, msglen);
        rc = st == PGRES_FATAL_ERROR ? classify(c, res[k]) : TXN_CONN;
        *bad = owner[k];
        break;
    }
    if (rc == TXN_OK) {
        for (k = 1; k + 1 < nops; k++) {
            req *q = v[owner[k]];
            if (!first[k])
                continue; /* the second statement of a dead letter or a pooled renewal */
            if (q->kind == REQ_CLAIM)
                interpret_claim(q, res[k]);
            else if (q->kind == REQ_ROUTE)
                interpret_route(q, res[k]);
            else if (q->kind == REQ_FINISH)
                interpret_finish(q, res[k]);
            else if (q->kind == REQ_SWEEP)
                interpret_sweep(q, res[k]);
            else if (q->kind == REQ_RENEW)
                interpret_renew(q, res[k]);
            else if (q->kind == REQ_PROGRESS)
                interpret_progress(q, res[k]);
            else if (q->kind == REQ_LOAD)
                interpret_load(q, res[k]);
            else
                q->code = AQ_OK;
        }
    } else if (rc != TXN_CONN) {
        rollback(s);
    }

out:
    for (k = 0; k < nops; k++) PQclear(res[k]);
    free(res);
    free(owner);
    free(first);
    return rc;
}

/* Sleeps (interruptibly) before retrying a transient failure; false if the
 * stop deadline passed meanwhile. */
static bool pause_before_retry(aq_store *s, int attempt)
{
    int64_t due = aq_mono_us() + (int64_t)STORE_BACKOFF_MIN_MS * 1000 * (1 << attempt);
    lock(s);
    while (aq_mono_us() < due && !(s->closing && aq_mono_us() >= s->stop_deadline_us)) {
        int64_t d = due;
        if (s->closing && s->stop_deadline_us < d) d = s->stop_deadline_us;
        wait_until(s, d);
    }
    unlock(s);
    return !stop_passed(s);
}

/* Transaction pooling: a batch that renews leases first takes the
 * liveness lock on the lock connection if that did not get it yet (a
 * stale session of ours held it), as agentq.renew_leases does on the
 * store's own connection otherwise. False if the lock connection broke. */
static bool retake_lock(aq_store *s, req **v, size_t n, char *msg, size_t msglen)
{
    if (!s->pooled || s->lock_held) return true;
    for (size_t i = 0; i < n; i++)
        if (v[i]->kind == REQ_RENEW) return hold_owner_lock(s, s->lockc, msg, msglen);
    return true;
}

static void write_batch(aq_store *s, req **v, size_t n)
{
    int transient = 0, losses = 0;
    char msg[1024];
    while (n > 0) {
        if (!ensure_conn(s)) {
            fail_reqs(s, v, n, AQ_ECLOSED, "the store closed before PostgreSQL could be reached");
            return;
        }
        msg[0] = '\0';
        if (!retake_lock(s, v, n, msg, sizeof msg)) {
            lost_conn(s, msg);
            continue;
        }
        size_t bad;
        msg[0] = '\0';
        int rc = run_txn(s, v, n, &bad, msg, sizeof msg);
        switch (rc) {
        case TXN_OK:
            complete(s, v, n, true);
            return;
        case TXN_CONN:
            /* Nothing of the batch is known to be committed: replay it all
             * on a new connection (every statement is replay-safe). */
            lost_conn(s, msg);
            if (++losses < STORE_MAX_LOSSES) continue;
            /* The connection keeps dying under this very batch, though it
             * comes back each time: suspect a request that crashes the
             * backend, and isolate it rather than loop forever. */
            if (n == 1) {
                fail_reqs(s, v, 1, AQ_EIO, "the connection broke every time it was sent");
                return;
            }
            for (size_t i = 0; i < n; i++) write_batch(s, &v[i], 1);
            return;
        case TXN_ABANDONED:
            drop_conn(s);
            fail_reqs(s, v, n, AQ_ETIMEDOUT, "the store closed while the transaction was in flight");
            return;
        case TXN_TRANSIENT:
            if (transient < STORE_TRANSIENT_RETRIES) {
                aq_log(AQ_LOG_INFO, "store: transaction of %zu requests failed (%s); retrying", n, msg);
                if (!pause_before_retry(s, transient++)) {
                    fail_reqs(s, v, n, AQ_ETIMEDOUT, msg);
                    return;
                }
                continue;
            }
            /* Persistent: treat as the rows' fault. */
            /* fall through */
        default:
            if (n == 1) {
                fail_reqs(s, v, 1, AQ_EINVAL, msg);
                return;
            }
            if (bad >= n) {
                /* Unknown culprit (COMMIT failed): one transaction each. */
                for (size_t i = 0; i < n; i++) write_batch(s, &v[i], 1);
                return;
            }
            /* Those before the culprit together, the culprit alone, then
             * the rest, in order (a step may depend on an earlier claim). */
            if (bad > 0) write_batch(s, v, bad);
            write_batch(s, &v[bad], 1);
            v += bad + 1;
            n -= bad + 1;
            transient = 0;
            continue;
        }
    }
}

/* A lookup's result, copied for the loop thread. */
static void interpret_cache_get(req *r, const PGresult *res)
{
    r->code = AQ_OK;
    if (PQntuples(res) < 1 || PQgetisnull(res, 0, 0)) return;
    r->response_len = (size_t)PQgetlength(res, 0, 0);
    r->response = aq_xstrndup(PQgetvalue(res, 0, 0), r->response_len);
}

/* Runs the cache requests of a batch, each its own implicit transaction
 * (a statement and a sync), all sent before any is read. Never waits for
 * a connection and never replays: without one, or when it breaks, what
 * is left fails at once (a lookup with AQ_EIO, a put is dropped). A
 * lookup whose deadline passed while it queued is not sent: the loop has
 * answered it already. */
static void run_cache(aq_store *s, req **v, size_t n)
{
    lock(s);
    bool closing = s->closing;
    unlock(s);
    int64_t now = aq_mono_us();
    int gone = closing ? AQ_ECLOSED : AQ_EIO;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        req *r = v[i];
        if (r->kind == REQ_CACHE_GET && now >= r->deadline_us)
            r->code = AQ_ETIMEDOUT;
        else if (!s->conn)
            r->code = gone;
        else {
            v[i] = v[m];
            v[m++] = r;
        }
    }
    if (m < n) complete(s, v + m, n - m, false);
    if (m == 0) return;

    char msg[1024] = "";
    size_t sent = 0;
    while (sent < m) {
        const stmt *st = &v[sent]->st[0];
        if (!send_stmt(s, s->conn, st->id, st->n, (const char *const *)st->v, st->len, st->fmt) ||
            !PQpipelineSync(s->conn))
            break;
        sent++;
    }
    size_t k = 0;
    bool broke = sent < m;
    if (broke) set_msg(msg, sizeof msg, PQerrorMessage(s->conn));
    for (; !broke && k < sent; k++) {
        req *r = v[k];
        PGresult *res = NULL;
        int io = read_one(s, s->conn, &res);
        if (io != IO_OK) {
            set_msg(msg, sizeof msg, PQerrorMessage(s->conn));
            gone = io == IO_ABANDON ? AQ_ETIMEDOUT : AQ_EIO;
            broke = true;
            break;
        }
        if (PQresultStatus(res) == PGRES_TUPLES_OK) {
            if (r->kind == REQ_CACHE_GET)
                interpret_cache_get(r, res);
            else
                r->code = AQ_OK;
        } else {
            int cls = classify(s->conn, res);
            if (cls == TXN_CONN) {
                result_msg(res, msg, sizeof msg);
                pooler_hint(s, res, msg, sizeof msg);
                PQclear(res);
                broke = true;
                break;
            }
            /* That request alone fails: its own fault, or a busy database
             * (a put that did not get the fleet's put lock within its
             * lock_timeout is one) — not worth a retry either way. */
            char why[512];
            result_msg(res, why, sizeof why);
            r->code = cls == TXN_TRANSIENT ? AQ_EAGAIN : AQ_EINVAL;
            aq_log(cls == TXN_TRANSIENT ? AQ_LOG_INFO : AQ_LOG_WARN, "store: %s failed: %s",
                   req_names[r->kind], why);
        }
        PQclear(res);
        int sy = read_sync(s, s->conn);
        if (sy != IO_OK) {
            set_msg(msg, sizeof msg, PQerrorMessage(s->conn));
            gone = sy == IO_ABANDON ? AQ_ETIMEDOUT : AQ_EIO;
            k++; /* this one's result is in */
            broke = true;
            break;
        }
    }
    if (broke) {
        for (size_t i = k; i < m; i++) v[i]->code = gone;
        if (gone == AQ_ETIMEDOUT)
            drop_conn(s);
        else
            lost_conn(s, msg);
    }
    complete(s, v, m, false);
}

/* Takes the next batch, waiting for requests (and the flush window);
 * keeps the connection up meanwhile. Returns 0 when closing and empty. */
static size_t take_batch(aq_store *s, req **batch)
{
    lock(s);
    for (;;) {
        int64_t now = aq_mono_us();
        if (s->q_head) {
            /* A lookup does not wait for the flush window: a session waits on it. */
            if (s->closing || s->flush_ms <= 0 || s->q_len >= (size_t)s->batch_max || s->q_gets) break;
            int64_t due = s->q_head->queued_us + (int64_t)s->flush_ms * 1000;
            if (now >= due) break;
            wait_until(s, due);
            continue;
        }
        if (s->closing) {
            unlock(s);
            return 0;
        }
        int64_t wake = now + STORE_IDLE_CHECK_US;
        if (!s->conn) {
            if (now >= s->next_connect_us) {
                unlock(s);
                try_connect(s);
                lock(s);
                continue;
            }
            if (s->next_connect_us < wake) wake = s->next_connect_us;
        } else if (now >= s->next_check_us) {
            unlock(s);
            check_idle_conn(s);
            lock(s);
            s->next_check_us = aq_mono_us() + STORE_IDLE_CHECK_US;
            continue;
        } else {
            wake = s->next_check_us;
        }
        wait_until(s, wake);
    }
    size_t n = 0;
    while (s->q_head && n < (size_t)s->batch_max) {
        req *r = s->q_head;
        s->q_head = r->next;
        r->next = NULL;
        if (r->kind == REQ_CACHE_GET) s->q_gets--;
        batch[n++] = r;
    }
    if (!s->q_head) s->q_tail = NULL;
    s->q_len -= n;
    unlock(s);
    return n;
}

static void *writer_main(void *arg)
{
    aq_store *s = arg;
    req **batch = aq_xcalloc((size_t)s->batch_max, sizeof *batch);
    req **cache = aq_xcalloc((size_t)s->batch_max, sizeof *cache);
    size_t n;
    while ((n = take_batch(s, batch)) > 0) {
        /* The cache's requests first, apart (a session waits on a lookup);
         * the rest in order, as one transaction. */
        size_t nc = 0, nw = 0;
        for (size_t i = 0; i < n; i++) {
            if (is_cache(batch[i]))
                cache[nc++] = batch[i];
            else
                batch[nw++] = batch[i];
        }
        if (nc) run_cache(s, cache, nc);
        if (nw) write_batch(s, batch, nw);
    }
    free(cache);
    free(batch);
    drop_conn(s);
    return NULL;
}

/* ---------------------------------------------------------------- public */

/* "host=... port=... dbname=... user=..." without the password, or NULL
 * (and err filled) when libpq cannot parse the DSN. */
static char *dsn_for_logs(const char *key, const char *dsn, char *err, size_t errlen)
{
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(dsn, &perr);
    if (!opts) {
        char msg[512];
        set_msg(msg, sizeof msg, perr ? perr : "out of memory");
        aq_seterr(err, errlen, "%s: %s", key, msg);
        PQfreemem(perr);
        return NULL;
    }
    static const char *const shown[] = {"host", "hostaddr", "port", "dbname", "user"};
    char out[1024] = "";
    size_t len = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val || !*o->val) continue;
        for (size_t i = 0; i < AQ_ARRAY_LEN(shown); i++) {
            if (strcmp(o->keyword, shown[i])) continue;
            int w = snprintf(out + len, sizeof out - len, "%s%s=%s", len ? " " : "", o->keyword,
                             o->val);
            if (w > 0 && (size_t)w < sizeof out - len) len += (size_t)w;
        }
    }
    PQconninfoFree(opts);
    return aq_xstrdup(len ? out : "(libpq defaults)");
}

aq_store *aq_store_new(const aq_store_config *cfg, struct event_base *base, char *err,
                       size_t errlen)
{
    if (!cfg || !cfg->dsn || !base) {
        aq_seterr(err, errlen, "store: a config with a dsn and an event base are required");
        return NULL;
    }
    char *shown = dsn_for_logs("postgres.dsn", cfg->dsn, err, errlen);
    if (!shown) return NULL;
    const char *lock_dsn = cfg->session_dsn && *cfg->session_dsn ? cfg->session_dsn : cfg->dsn;
    char *lock_shown = cfg->transaction_pool ? dsn_for_logs("postgres.listen_dsn", lock_dsn, err, errlen) : NULL;
    if (cfg->transaction_pool && !lock_shown) {
        free(shown);
        return NULL;
    }

    aq_store *s = aq_xcalloc(1, sizeof *s);
    s->dsn = aq_xstrdup(cfg->dsn);
    s->dsn_shown = shown;
    s->pooled = cfg->transaction_pool;
    s->lock_dsn = s->pooled ? aq_xstrdup(lock_dsn) : NULL;
    s->lock_dsn_shown = lock_shown;
    s->worker_id = aq_xstrdup(cfg->worker_id ? cfg->worker_id : "");
    s->max_inflight_per_user = cfg->max_inflight_per_user > 0 ? cfg->max_inflight_per_user : 0;
    snprintf(s->over_budget, sizeof s->over_budget, "%s",
             cfg->over_budget && !strcmp(cfg->over_budget, "wait") ? "wait" : "fail");
    s->lanes = cfg->lanes > 0 ? cfg->lanes : 1;
    s->lease_seconds = cfg->lease_seconds > 0 ? cfg->lease_seconds : STORE_LEASE_DEFAULT_S;
    s->max_interruptions = cfg->max_interruptions > 0 ? cfg->max_interruptions
                                                      : STORE_MAX_INTERRUPTIONS_DEFAULT;
    s->batch_max = cfg->batch_max > 0 ? cfg->batch_max : STORE_BATCH_DEFAULT;
    s->flush_ms = cfg->flush_ms > 0 ? cfg->flush_ms : 0;
    s->flush_timeout_ms = cfg->flush_timeout_ms > 0 ? cfg->flush_timeout_ms
                                                    : STORE_FLUSH_TIMEOUT_DEFAULT_MS;
    s->reconnect_max_ms = cfg->reconnect_max_ms > 0 ? cfg->reconnect_max_ms
                                                    : STORE_RECONNECT_MAX_DEFAULT_MS;
    s->cache_timeout_ms = cfg->cache_timeout_ms > 0 ? cfg->cache_timeout_ms
                                                    : STORE_CACHE_TIMEOUT_DEFAULT_MS;
    if (s->reconnect_max_ms < STORE_BACKOFF_MIN_MS) s->reconnect_max_ms = STORE_BACKOFF_MIN_MS;
    s->base = base;
    s->efd = -1;

    /* Tokens must differ across processes and restarts: random prefix. */
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = (uint64_t)aq_now_us() ^ ((uint64_t)getpid() << 32);
    snprintf(s->token_prefix, sizeof s->token_prefix, "%016llx", (unsigned long long)seed);
    aq_pg_backoff_init(&s->backoff, STORE_BACKOFF_MIN_MS, s->reconnect_max_ms);
    /* The lease key: a positive int4, the advisory lock's second key. */
    s->owner = (int)((seed >> 17) % 2147483646u) + 1;

    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);

    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0) {
        aq_seterr(err, errlen, "store: eventfd: %s", strerror(errno));
        goto fail;
    }
    s->wake_ev = event_new(base, s->efd, EV_READ | EV_PERSIST, on_wake, s);
    if (!s->wake_ev || event_add(s->wake_ev, NULL) != 0) {
        aq_seterr(err, errlen, "store: cannot register the wake-up event");
        goto fail;
    }
    s->cache_timer = evtimer_new(base, on_cache_timer, s);
    if (!s->cache_timer) {
        aq_seterr(err, errlen, "store: cannot make the cache lookups' timer");
        goto fail;
    }

    /* The writer takes no signals: they belong to the loop (evsignal). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int prc = pthread_create(&s->thread, NULL, writer_main, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (prc != 0) {
        aq_seterr(err, errlen, "store: cannot start the writer thread: %s", strerror(prc));
        goto fail;
    }
    s->thread_started = true;
    return s;

fail:
    aq_store_free(s);
    return NULL;
}

void aq_store_free(aq_store *s)
{
    if (!s) return;
    lock(s);
    s->closing = true;
    s->stop_deadline_us = aq_mono_us() + (int64_t)s->flush_timeout_ms * 1000;
    pthread_cond_broadcast(&s->cond);
    unlock(s);
    if (s->thread_started) pthread_join(s->thread, NULL);
    /* Every accepted request comes back through the done list, so this
     * answers every lookup still waiting. */
    deliver(s);
    if (s->cache_timer) event_free(s->cache_timer);
    if (s->wake_ev) event_free(s->wake_ev);
    if (s->efd >= 0) close(s->efd);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mu);
    free(s->dsn);
    free(s->dsn_shown);
    free(s->lock_dsn);
    free(s->lock_dsn_shown);
    free(s->worker_id);
    free(s);
}

/* Appends `r` to the writer's queue and wakes it. Under the lock. */
static void enqueue_locked(aq_store *s, req *r)
{
    r->queued_us = aq_mono_us();
    if (s->q_tail)
        s->q_tail->next = r;
    else
        s->q_head = r;
    s->q_tail = r;
    s->q_len++;
    s->pending++;
    pthread_cond_signal(&s->cond);
}

static int submit(aq_store *s, req *r)
{
    lock(s);
    if (s->closing) {
        unlock(s);
        req_free(r);
        return AQ_ECLOSED;
    }
    enqueue_locked(s, r);
    unlock(s);
    return AQ_OK;
}

static void next_token(aq_store *s, char prefix, char *out, size_t len)
{
    unsigned long long seq = __atomic_add_fetch(&s->token_seq, 1, __ATOMIC_RELAXED);
    snprintf(out, len, "%c%s-%llu", prefix, s->token_prefix, seq);
}

/* The task's fields: the first twelve parameters of agentq.claim and
 * agentq.route alike. */
static void p_task(stmt *st, const aq_store_task *t)
{
    p_str(st, t->task_id);
    p_str(st, t->user_id);
    p_str(st, t->goal);
    p_int(st, t->priority);
    p_int(st, t->max_steps);
    p_dbl(st, t->budget_usd);
    p_dbl(st, t->timeout_seconds);
    p_str(st, t->model);
    p_bin(st, t->body, t->body_len);
    p_str(st, t->has_metadata ? "t" : "f");
    if (t->enqueued_at_us > 0)
        p_int(st, t->enqueued_at_us);
    else
        p_str(st, NULL);
    p_int(st, t->deadline_us > 0 ? t->deadline_us : 0);
}

static bool task_valid(const aq_store_task *t)
{
    return t && aq_task_uuid_valid(t->task_id) && t->user_id && t->goal && (!t->body_len || t->body) &&
           t->body_len <= INT_MAX && isfinite(t->budget_usd) && isfinite(t->timeout_seconds);
}

int aq_store_claim(aq_store *s, const aq_store_task *t, aq_store_claim_cb cb, void *arg)
{
    if (!s || !cb || !task_valid(t)) return AQ_EINVAL;
    char token[64];
    next_token(s, 'c', token, sizeof token);
    req *r = req_new(REQ_CLAIM, t->task_id);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_CLAIM);
    p_task(st, t);
    p_str(st, s->worker_id);
    p_str(st, token);
    p_int(st, s->owner);
    p_dbl(st, s->lease_seconds);
    p_int(st, s->max_inflight_per_user);
    p_int(st, s->max_interruptions);
    p_str(st, s->over_budget);
    r->claim_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

int aq_store_route(aq_store *s, const aq_store_task *t, aq_store_route_cb cb, void *arg)
{
    if (!s || !cb || !task_valid(t)) return AQ_EINVAL;
    req *r = req_new(REQ_ROUTE, t->task_id);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_ROUTE);
    p_task(st, t);
    p_int(st, s->lanes);
    r->route_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

int aq_store_finish(aq_store *s, const aq_store_result *res, aq_store_done_cb cb, void *arg)
{
    if (!s || !res || !aq_task_uuid_valid(res->task_id) || res->status <= AQ_STATUS_NONE || res->status >= AQ_STATUS_COUNT ||
        !isfinite(res->cost_usd) || res->dead_len > INT_MAX)
        return AQ_EINVAL;
    req *r = req_new(REQ_FINISH, res->task_id);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_FINISH);
    p_str(st, res->task_id);
    p_int(st, res->attempt);
    p_str(st, aq_status_name(res->status));
    p_int(st, res->steps);
    p_int(st, res->prompt_tokens);
    p_int(st, res->completion_tokens);
    p_dbl(st, res->cost_usd);
    p_str(st, res->result);
    p_str(st, res->error);
    if (res->dead_body) {
        char key[64];
        next_token(s, 'd', key, sizeof key);
        p_bin(st, res->dead_body, res->dead_len);
        p_str(st, key);
    } else {
        p_str(st, NULL);
        p_str(st, NULL);
    }
    p_dbl(st, isfinite(res->run_seconds) && res->run_seconds > 0 ? res->run_seconds : 0);
    p_str(st, res->question);
    p_dbl(st, isfinite(res->wait_seconds) ? res->wait_seconds : 0);
    p_str(st, res->handed_over ? "t" : "f");
    r->attempt = res->attempt; /* what interpret_finish compares the row with */
    r->status = res->status;
    r->done_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

int aq_store_step(aq_store *s, const aq_store_step_row *row)
{
    if (!s || !row || !aq_task_uuid_valid(row->task_id) || !row->kind ||
        (strcmp(row->kind, "llm") && strcmp(row->kind, "tool")) || row->seq < 0 ||
        !isfinite(row->duration_ms) || !isfinite(row->cost_usd))
        return AQ_EINVAL;
    req *r = req_new(REQ_STEP, row->task_id);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_STEP);
    p_str(st, row->task_id);
    p_int(st, row->attempt > 0 ? row->attempt : 1);
    p_int(st, row->step);
    p_int(st, row->seq);
    p_str(st, row->kind);
    p_str(st, row->name);
    p_str(st, row->status);
    if (row->started_at_us > 0)
        p_int(st, row->started_at_us);
    else
        p_str(st, NULL);
    p_dbl(st, row->duration_ms);
    p_int(st, row->prompt_tokens);
    p_int(st, row->completion_tokens);
    p_dbl(st, row->cost_usd);
    p_str(st, row->detail);
    if (row->message) {
        st->v[st->n++] = aq_xstrndup(row->message, row->message_len);
    } else {
        p_str(st, NULL);
    }
    p_str(st, row->provider);
    return submit(s, r);
}

int aq_store_progress_write(aq_store *s, const aq_store_progress *p, aq_store_done_cb cb, void *arg)
{
    if (!s || !p || !aq_task_uuid_valid(p->task_id) || !isfinite(p->cost_usd) || !isfinite(p->run_seconds))
        return AQ_EINVAL;
    req *r = req_new(REQ_PROGRESS, p->task_id);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_PROGRESS);
    p_str(st, p->task_id);
    p_int(st, p->attempt);
    p_int(st, p->steps);
    p_int(st, p->prompt_tokens);
    p_int(st, p->completion_tokens);
    p_dbl(st, p->cost_usd);
    p_dbl(st, p->run_seconds > 0 ? p->run_seconds : 0);
    r->done_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

int aq_store_load_session(aq_store *s, const char *task_id, aq_store_load_cb cb, void *arg)
{
    if (!s || !cb || !aq_task_uuid_valid(task_id)) return AQ_EINVAL;
    req *r = req_new(REQ_LOAD, task_id);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_LOAD);
    p_str(st, task_id);
    r->load_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

int aq_store_dead_letter(aq_store *s, const aq_store_dead *d, aq_store_done_cb cb, void *arg)
{
    if (!s || !d || !d->reason || (d->body_len && !d->body) || d->body_len > INT_MAX ||
        (d->status != AQ_STATUS_NONE && !aq_status_final(d->status)))
        return AQ_EINVAL;
    bool has_id = d->task_id && aq_task_uuid_valid(d->task_id);
    char key[64];
    next_token(s, 'd', key, sizeof key);
    req *r = req_new(REQ_DEAD, has_id ? d->task_id : NULL);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_DEAD);
    p_str(st, has_id ? d->task_id : NULL);
    p_str(st, d->reason);
    p_str(st, d->error);
    p_bin(st, d->body, d->body_len);
    p_str(st, d->headers);
    p_str(st, key);
    if (has_id && d->status != AQ_STATUS_NONE) {
        st = &r->st[r->nstmt++];
        stmt_init(st, S_DEAD_TASK);
        p_str(st, d->task_id);
        p_str(st, d->user_id ? d->user_id : "");
        p_str(st, d->goal ? d->goal : "");
        p_str(st, aq_status_name(d->status));
        p_int(st, d->attempt > 0 ? d->attempt : 1);
        p_str(st, d->error);
        p_str(st, s->worker_id);
        p_bin(st, d->body, d->body_len);
    }
    r->done_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

int aq_store_renew(aq_store *s, const char *const *task_ids, size_t n, aq_store_renew_cb cb, void *arg)
{
    if (!s || (n && !task_ids)) return AQ_EINVAL;
    /* A uuid[] literal: {id,id,...}; the ids are checked, so no quoting. */
    char *arr = aq_xmalloc(n * (AQ_TASK_ID_LEN + 1) + 3);
    size_t len = 0;
    arr[len++] = '{';
    for (size_t i = 0; i < n; i++) {
        if (!aq_task_uuid_valid(task_ids[i])) {
            free(arr);
            return AQ_EINVAL;
        }
        if (i) arr[len++] = ',';
        memcpy(arr + len, task_ids[i], AQ_TASK_ID_LEN);
        len += AQ_TASK_ID_LEN;
    }
    arr[len++] = '}';
    arr[len] = '\0';
    req *r = req_new(REQ_RENEW, NULL);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_RENEW);
    p_int(st, s->owner);
    p_dbl(st, s->lease_seconds);
    st->v[st->n++] = arr;
    if (s->pooled) {
        st = &r->st[r->nstmt++];
        stmt_init(st, S_UNHOLD);
        p_int(st, s->owner);
    }
    r->renew_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

int aq_store_sweep(aq_store *s, int limit, double resweep_seconds, aq_store_sweep_cb cb, void *arg)
{
    if (!s || !cb || limit <= 0 || !isfinite(resweep_seconds)) return AQ_EINVAL;
    req *r = req_new(REQ_SWEEP, NULL);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_SWEEP);
    p_int(st, limit);
    p_dbl(st, resweep_seconds);
    r->sweep_cb = cb;
    r->arg = arg;
    return submit(s, r);
}

/* A text parameter of `len` bytes: PostgreSQL text holds no NUL. */
static bool text_ok(const char *t, size_t len)
{
    return (t || !len) && len <= INT_MAX && !(len && memchr(t, '\0', len));
}

/* Queues a cache request unless the store cannot take it now: not
 * connected, or over STORE_CACHE_QUEUE_BYTES. Then a lookup is answered
 * (code `*why`) through the done list, from the loop, and a put is
 * dropped; either way 0 is returned, as for one queued. */
static int submit_cache(aq_store *s, req *r)
{
    lock(s);
    if (s->closing) {
        unlock(s);
        req_free(r);
        return AQ_ECLOSED;
    }
    int refuse = !s->counters.connected ? AQ_EIO
                 : s->cache_queued + r->cache_bytes > STORE_CACHE_QUEUE_BYTES ? AQ_EAGAIN
                                                                                : AQ_OK;
    if (refuse == AQ_OK) {
        s->cache_queued += r->cache_bytes;
        if (r->kind == REQ_CACHE_GET) s->q_gets++;
        enqueue_locked(s, r);
        unlock(s);
        return AQ_OK;
    }
    if (r->kind == REQ_CACHE_PUT) {
        s->counters.cache_dropped++;
        unlock(s);
        req_free(r);
        return AQ_OK;
    }
    r->code = refuse;
    r->next = NULL;
    if (s->done_tail)
        s->done_tail->next = r;
    else
        s->done_head = r;
    s->done_tail = r;
    unlock(s);
    uint64_t one = 1;
    if (write(s->efd, &one, sizeof one) < 0 && errno != EAGAIN)
        aq_log(AQ_LOG_ERROR, "store: cannot wake the event loop: %s", strerror(errno));
    return AQ_OK;
}

int aq_store_cache_get(aq_store *s, const char *request, size_t len, aq_store_cache_cb cb, void *arg)
{
    if (!s || !cb || !text_ok(request, len)) return AQ_EINVAL;
    req *r = req_new(REQ_CACHE_GET, NULL);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_CACHE_GET);
    st->v[st->n++] = aq_xstrndup(request ? request : "", len);
    r->cache_cb = cb;
    r->arg = arg;
    r->cache_bytes = len;
    r->deadline_us = aq_mono_us() + (int64_t)s->cache_timeout_ms * 1000;
    int rc = submit_cache(s, r);
    if (rc != AQ_OK) return rc;
    /* Queued, but only deliver() on this thread hands it back (it has a
     * callback, so the writer never frees it): on the list in time. The
     * writer touches none of these fields. */
    r->waiting = true;
    r->wprev = s->gets_tail;
    if (s->gets_tail)
        s->gets_tail->wnext = r;
    else
        s->gets_head = r;
    s->gets_tail = r;
    if (!evtimer_pending(s->cache_timer, NULL)) {
        struct timeval tv = {.tv_sec = s->cache_timeout_ms / 1000,
                             .tv_usec = (suseconds_t)(s->cache_timeout_ms % 1000) * 1000};
        evtimer_add(s->cache_timer, &tv);
    }
    return AQ_OK;
}

int aq_store_cache_put(aq_store *s, const char *request, size_t len, const char *model, const char *response,
                       size_t rlen, int ttl_seconds, int64_t max_bytes)
{
    if (!s || !text_ok(request, len) || !response || !text_ok(response, rlen) || ttl_seconds <= 0 ||
        max_bytes <= 0)
        return AQ_EINVAL;
    req *r = req_new(REQ_CACHE_PUT, NULL);
    stmt *st = &r->st[r->nstmt++];
    stmt_init(st, S_CACHE_PUT);
    st->v[st->n++] = aq_xstrndup(request ? request : "", len);
    p_str(st, model);
    st->v[st->n++] = aq_xstrndup(response, rlen);
    p_int(st, ttl_seconds);
    p_int(st, max_bytes);
    r->cache_bytes = len + rlen;
    return submit_cache(s, r);
}

size_t aq_store_pending(aq_store *s)
{
    lock(s);
    size_t n = s->pending;
    unlock(s);
    return n;
}

void aq_store_stats(aq_store *s, aq_store_counters *out)
{
    lock(s);
    *out = s->counters;
    out->pending = s->pending;
    unlock(s);
}
