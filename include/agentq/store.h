/* store.h — the worker's PostgreSQL writer: every task status row, step row
 * and dead-letter row goes through it.
 *
 * A store owns one writer thread and one libpq connection. The verbs are
 * called on the event-loop thread, never block, copy their inputs and
 * queue a request; the writer takes what is queued (up to batch_max,
 * waiting up to flush_ms for more after the first) and writes it as ONE
 * transaction in libpq pipeline mode with prepared statements (unnamed
 * ones behind a pooler in transaction mode: see transaction_pool). A statement
 * that fails sinks only its own request: the batch is then retried one
 * request per transaction. A lost connection (or a database that is down
 * at start) is waited out with exponential backoff and jitter, and the
 * uncommitted batch is replayed; every statement is idempotent under replay
 * (claims carry a token, steps have a unique key, dead letters a store
 * key: see sql/010_store.sql), so nothing is lost or written twice.
 *
 * Callbacks run on the loop thread of the event_base given to
 * aq_store_new() (the writer wakes the loop through an eventfd), exactly
 * once per accepted request: after COMMIT on success, or with an error
 * code — also from aq_store_free() for requests that could not be written.
 * A verb that returns an error never calls its callback.
 *
 * The queue is not bounded: while the database is away requests pile up in
 * memory. Callers that care watch aq_store_pending().
 *
 * Cache lookups and puts (the fleet's LLM response cache, agentq.llm_cache
 * in sql/015_providers.sql) are the exception to all of the above: they
 * are optimisations, so they are never waited for nor replayed. Each runs
 * as a transaction of its own beside the batches (a cache statement never
 * sinks or holds up a batch's writes, and its locks last one statement);
 * while the store is not connected they are answered or dropped at once,
 * and a lookup not answered within cache_timeout_ms is answered with
 * AQ_ETIMEDOUT whatever the writer is doing.
 *
 * What it does not own: the schema (sql/), migrations (migrate.h), the
 * decision of what status a task gets (the worker's), acking deliveries. */
#ifndef AGENTQ_STORE_H
#define AGENTQ_STORE_H

#include "agentq/common.h"
#include "agentq/status.h"
#include "agentq/task.h"

struct event_base;

typedef struct aq_store aq_store;

/* All strings borrowed for the aq_store_new() call (the store copies). */
typedef struct aq_store_config {
    const char *dsn;       /* libpq connection string or URI */
    const char *worker_id; /* written to agentq.tasks.worker_id; NULL: "" */
    int batch_max;         /* most requests per transaction; <= 0: 500 */
    int flush_ms;          /* after a first request, wait this long for
                            * more before writing; <= 0: write at once */
    int flush_timeout_ms;  /* how long aq_store_free() waits for queued
                            * requests to be written; <= 0: 5000 */
    int reconnect_max_ms;  /* reconnect backoff cap; <= 0: 5000 */
    int max_inflight_per_user; /* a claim is refused (AQ_STORE_BUSY) while the
                            * task's user has this many running; <= 0: no cap */
    double lease_seconds;  /* lease a claim takes on a running row; <= 0: 30 */
    const char *over_budget; /* "wait": a task of a user over its daily
                            * budget waits (AQ_STORE_BUSY); anything else:
                            * it ends as budget_exceeded (agentq.users
                            * .over_budget overrides per user) */
    int lanes;             /* amqp.lanes: the lanes aq_store_route picks from */
    int max_interruptions; /* a claim that would start the task's
                            * (max_interruptions + 1)th interrupted
                            * execution ends it as failed; <= 0: 10 */
    int cache_timeout_ms;  /* a cache lookup not answered by then is
                            * answered AQ_ETIMEDOUT; <= 0: 1000 */
    bool transaction_pool; /* postgres.pool_mode "transaction": dsn is a
                            * pooler that may run each transaction in another
                            * server session (PgBouncer's pool_mode =
                            * transaction). Statements are then sent unnamed,
                            * and the worker's liveness lock (a session
                            * advisory lock) is held by a second connection,
                            * to session_dsn, made and lost together with the
                            * first */
    const char *session_dsn; /* that connection's (postgres.listen_dsn: Postgres
                            * itself or a session-mode pool); NULL or "": dsn */
} aq_store_config;

/* What a claim found (see agentq.claim in sql/012_leases.sql). */
typedef enum aq_store_outcome {
    AQ_STORE_RUN = 0,   /* the row now says running for this worker, under
                         * its lease: go */
    AQ_STORE_FINAL,     /* the task is final already: ack without running */
    AQ_STORE_DUPLICATE, /* a live worker runs it under a live lease: ack
                         * (that worker holds its own copy) */
    AQ_STORE_CONFLICT,  /* the task_id names a task another body defined:
                         * record this message as a duplicate, ack */
    AQ_STORE_ENDED,     /* the claim ended the task itself (status says how:
                         * cancelled, expired, failed after too many
                         * interruptions): ack */
    AQ_STORE_BUSY,      /* the user may not start a task now (at its cap of
                         * running tasks, or over its daily budget with
                         * over_budget "wait"): nothing written; hold the
                         * delivery and claim again later */
} aq_store_outcome;

/* The delivery being claimed. Pointers borrowed for the call. The first
 * message with a task_id defines the task: these fields are stored only
 * by the claim that creates the row (or one that finds a row no message
 * defined yet); later claims compare the body and change nothing else. */
typedef struct aq_store_task {
    const char *task_id;   /* canonical UUID text */
    const char *user_id;
    const char *goal;
    int priority;          /* 0..255 */
    int max_steps;
    double budget_usd;
    double timeout_seconds;
    const char *model;     /* NULL: none */
    const void *body;      /* the message body as received */
    size_t body_len;
    bool has_metadata;     /* the body has a metadata object: PostgreSQL
                            * parses it from the body, so it is stored as
                            * sent */
    int64_t enqueued_at_us;/* epoch microseconds; 0: now */
    int64_t deadline_us;   /* the message's TTL as an epoch time; 0: none */
} aq_store_task;

/* What a claim found: `outcome`, the attempt the row now holds (the one
 * to run, or the row's), the failed attempts before it, and the row's
 * status (for AQ_STORE_ENDED, the final status the claim wrote). */
typedef struct aq_store_claimed {
    aq_store_outcome outcome;
    int attempt;
    int failures;
    aq_status status;
    const char *reason;    /* AQ_STORE_BUSY: why, naming the setting; "" otherwise */
    int weight;            /* AQ_STORE_RUN: the user's weight (agentq.users), 1 by default */
    double run_seconds;    /* AQ_STORE_RUN: running time of the earlier attempts */
} aq_store_claimed;

/* Where a message of the ingress queue goes (agentq.route in
 * sql/013_fair.sql). */
typedef struct aq_store_routed {
    bool final;            /* the task is final and this is its body: ack */
    int lane;              /* else: publish it to this lane */
    int64_t ttl_ms;        /* what is left of its TTL: -1 none, 0 expired */
} aq_store_routed;

typedef void (*aq_store_route_cb)(void *arg, const aq_store_routed *r, int code);

/* Claim result. On code 0, `c` says what the claim found. On a negative
 * AQ_E* code nothing was written and `c` is NULL: AQ_EINVAL when
 * PostgreSQL rejected the row (the message is logged), AQ_EAGAIN when
 * another writer raced this claim, AQ_ECLOSED/AQ_ETIMEDOUT when the store
 * was freed first. */
typedef void (*aq_store_claim_cb)(void *arg, const aq_store_claimed *c, int code);

/* Completion of a finish or dead letter: 0 once committed, else AQ_E*. */
typedef void (*aq_store_done_cb)(void *arg, int code);

/* A task's new status and totals. Strings borrowed for the call. */
typedef struct aq_store_result {
    const char *task_id;
    int attempt;           /* the claimed attempt; the row is changed only
                            * while it holds it; <= 0: whatever it holds */
    aq_status status;      /* any status; final ones set finished_at */
    int steps;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
    const char *result;    /* NULL: SQL NULL */
    const char *error;     /* NULL: SQL NULL */
    const void *dead_body; /* non-NULL: if this finish takes effect, also
                            * record a dead letter (reason = status, this
                            * error) with this body, in the same statement */
    size_t dead_len;
    double run_seconds;    /* running time over all attempts */
    const char *question;  /* AQ_STATUS_WAITING: the open question */
    double wait_seconds;   /* AQ_STATUS_WAITING: how long it may wait */
    bool handed_over;      /* AQ_STATUS_QUEUED: a hand-over (the session
                            * continues on another attempt), not an
                            * interruption: amqp.max_interruptions does
                            * not count it and the TTL no longer applies */
} aq_store_result;

/* One agentq.steps row. Strings borrowed for the call. (task_id, attempt,
 * step, kind, seq) is its key: writing it twice keeps the first. */
typedef struct aq_store_step_row {
    const char *task_id;
    int attempt;
    int step;              /* step number, 1 for the first LLM call */
    int seq;               /* llm: 0 for the call that answered, 1..n for
                            * failed tries of the step; tool: the call's
                            * index (from 1) among the step's calls */
    const char *kind;      /* "llm" or "tool" */
    const char *name;      /* model or skill name; NULL allowed */
    const char *provider;  /* llm: the provider that answered, "cache" for
                            * a cache hit; NULL: SQL NULL */
    const char *status;    /* e.g. "ok", "error"; NULL allowed */
    int64_t started_at_us; /* epoch microseconds; 0: NULL */
    double duration_ms;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
    const char *detail;    /* JSON text; NULL: SQL NULL */
    const char *message;   /* what the call added to the conversation, JSON
                            * text of message_len bytes; NULL: SQL NULL */
    size_t message_len;
} aq_store_step_row;

/* A dead letter, and optionally the task row's final status, written in
 * one transaction. Pointers borrowed for the call. */
typedef struct aq_store_dead {
    const char *task_id;   /* canonical UUID, or NULL/invalid: no task */
    const char *reason;    /* "rejected", "expired", "failed", ... */
    const char *error;     /* names the problem; NULL allowed */
    const void *body;      /* any bytes (need not be UTF-8 nor text) */
    size_t body_len;
    const char *headers;   /* JSON object text; NULL: SQL NULL */
    aq_status status;      /* final status for the task row, or NONE to
                            * leave the row alone; ignored without task_id.
                            * An existing row takes it only while it waits
                            * (queued, retrying) and only if this body is
                            * the one that defined the task. */
    const char *user_id;   /* for a row that does not exist yet; NULL: "" */
    const char *goal;      /* likewise; NULL: "" */
    int attempt;           /* likewise; <= 0: 1 */
} aq_store_dead;

typedef struct aq_store_counters {
    uint64_t transactions; /* committed */
    uint64_t requests;     /* written and committed */
    uint64_t failed;       /* reported with an error */
    uint64_t reconnects;   /* connections made after the first */
    uint64_t pending;      /* as aq_store_pending() */
    bool connected;
    /* The cache's requests, apart: they are not transactions, requests
     * or failures above. */
    uint64_t cache_hits;   /* lookups answered with a response */
    uint64_t cache_misses; /* lookups answered with none */
    uint64_t cache_errors; /* lookups answered with an error code */
    uint64_t cache_puts;   /* puts written */
    uint64_t cache_dropped;/* puts dropped */
} aq_store_counters;

/* Starts the writer thread, which connects in the background (a database
 * that is down is retried, requests queue meanwhile). `cfg` is borrowed;
 * `base` is borrowed and must outlive the store. Returns NULL and fills err
 * only for a bad config or when the thread or eventfd cannot be made.
 * The caller frees the store with aq_store_free(). */
aq_store *aq_store_new(const aq_store_config *cfg, struct event_base *base,
                       char *err, size_t errlen);

/* Stops taking requests, waits up to flush_timeout_ms for the queued ones
 * to be written, joins the writer, then calls the callbacks of everything
 * left (code AQ_ECLOSED, or AQ_ETIMEDOUT if a transaction was cut short)
 * on the calling thread, which must be the loop thread; not from inside a
 * store callback. NULL is a no-op. */
void aq_store_free(aq_store *s);

/* Claims a delivery (see aq_store_outcome): a new task runs attempt 1; a
 * queued or retrying row runs its next attempt; a running row is taken
 * over (next attempt, one more interruption) only when its lease expired
 * or its owner is gone. The row, never the message, says the attempt and
 * the deadline. `t` is borrowed; `cb` is required. Returns 0 (cb will be
 * called), AQ_EINVAL (bad input) or AQ_ECLOSED (freeing). */
int aq_store_claim(aq_store *s, const aq_store_task *t, aq_store_claim_cb cb,
                   void *arg) AQ_MUSTCHECK;

/* Records a message of the ingress queue as a queued task (the first
 * message with a task_id defines it, as with claims) and picks its lane:
 * the lane its user's work is in, or for a user that just became active
 * the shorter of two it hashes to. `t` is borrowed; `cb` is required.
 * Returns 0, AQ_EINVAL or AQ_ECLOSED. */
int aq_store_route(aq_store *s, const aq_store_task *t, aq_store_route_cb cb,
                   void *arg) AQ_MUSTCHECK;

/* Sets a task's status and totals, ending this worker's lease. cb runs
 * after COMMIT with 0 when the row holds this result (this write or a
 * replay of it) or is final (either way the delivery may be acked),
 * AQ_ENOTFOUND when the row is not running this attempt (another attempt
 * took it over: the delivery goes back to the queue), AQ_EINVAL when
 * PostgreSQL rejected it. `r` is borrowed; `cb` may be NULL. Returns 0,
 * AQ_EINVAL or AQ_ECLOSED. */
int aq_store_finish(aq_store *s, const aq_store_result *r, aq_store_done_cb cb,
                    void *arg) AQ_MUSTCHECK;

/* Queues one step row; no callback (a row PostgreSQL rejects is logged and
 * dropped). `row` is borrowed. Returns 0, AQ_EINVAL or AQ_ECLOSED. */
int aq_store_step(aq_store *s, const aq_store_step_row *row) AQ_MUSTCHECK;

/* A running task's totals as its steps commit (live progress). */
typedef struct aq_store_progress {
    const char *task_id;
    int attempt;           /* the row changes only while it runs this attempt */
    int steps;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
    double run_seconds;
} aq_store_progress;

/* Records `p` on the task row, after every step row queued before it. cb
 * runs after COMMIT with 0 (the rows before it are committed too), or
 * AQ_ENOTFOUND when the row no longer runs this attempt, or another AQ_E*
 * code. `p` is borrowed; `cb` may be NULL. Returns 0, AQ_EINVAL or
 * AQ_ECLOSED. */
int aq_store_progress_write(aq_store *s, const aq_store_progress *p, aq_store_done_cb cb,
                            void *arg) AQ_MUSTCHECK;

/* The committed rows a task's new attempt resumes from (agentq.session_log
 * in sql/014_sessions.sql), borrowed for the callback; on an error code,
 * none. */
typedef void (*aq_store_load_cb)(void *arg, const aq_task_step *rows, size_t n, int code);

/* Reads the rows of `task_id` that changed its conversation. `cb` is
 * required. Returns 0, AQ_EINVAL or AQ_ECLOSED. */
int aq_store_load_session(aq_store *s, const char *task_id, aq_store_load_cb cb, void *arg) AQ_MUSTCHECK;

/* Records a dead letter (and the task's final status, see aq_store_dead).
 * cb gets 0 after COMMIT. `d` is borrowed; `cb` may be NULL. Returns 0,
 * AQ_EINVAL or AQ_ECLOSED. */
int aq_store_dead_letter(aq_store *s, const aq_store_dead *d, aq_store_done_cb cb,
                         void *arg) AQ_MUSTCHECK;

/* Renewal result: on code 0, the `n` task ids of the renewal this worker
 * no longer holds (another attempt took them over; borrowed for the
 * callback). A task whose own finish was committed before the renewal is
 * reported too, but its finish callback has run by then. */
typedef void (*aq_store_renew_cb)(void *arg, const char *const *lost, size_t n, int code);

/* Renews the leases of the `n` tasks this worker runs (ids borrowed for
 * the call), in one statement, and keeps the worker's liveness lock. `cb`
 * may be NULL. Returns 0, AQ_EINVAL or AQ_ECLOSED. */
int aq_store_renew(aq_store *s, const char *const *task_ids, size_t n, aq_store_renew_cb cb,
                   void *arg) AQ_MUSTCHECK;

/* A running task whose lease expired, to be published again. */
typedef struct aq_store_swept {
    char task_id[37];
    unsigned char *body;   /* the body that defined the task */
    size_t body_len;
    int priority;
} aq_store_swept;

/* Sweep result: on code 0, `n` rows (borrowed for the callback). */
typedef void (*aq_store_sweep_cb)(void *arg, const aq_store_swept *rows, size_t n, int code);

/* Marks up to `limit` running rows whose lease expired as swept and hands
 * them to cb, which publishes them again (a row is swept again after
 * `resweep_seconds` if it is still running unclaimed). `cb` is required.
 * Returns 0, AQ_EINVAL or AQ_ECLOSED. */
int aq_store_sweep(aq_store *s, int limit, double resweep_seconds, aq_store_sweep_cb cb,
                   void *arg) AQ_MUSTCHECK;

/* A cache lookup's answer. code 0: `response` is the cached reply, `len`
 * bytes (NUL-terminated too; borrowed for the callback), or NULL and 0 on
 * a miss. A negative AQ_E* code: the lookup could not be made, `response`
 * is NULL — treat it as a miss. AQ_EIO: the store is not connected, or
 * the connection broke under the lookup; AQ_ETIMEDOUT: no answer within
 * cache_timeout_ms; AQ_EAGAIN: too many cache requests are queued (the
 * writer is not keeping up), or the database was busy (a transient error,
 * not retried); AQ_EINVAL: PostgreSQL refused it (logged); AQ_ECLOSED:
 * the store was freed first. */
typedef void (*aq_store_cache_cb)(void *arg, const char *response, size_t len, int code);

/* Looks up the response cached for the request text `request` (`len`
 * bytes, not NUL-terminated, copied; the whole chat completion request as
 * it would be sent: its sha256 is the key) in agentq.cache_get. `cb` is
 * required and is called exactly once, from the loop, never inside this
 * call. A lookup never makes its session wait out a database outage: a
 * miss costs one LLM call, a stall the whole session. So while the store
 * is disconnected or reconnecting it is answered AQ_EIO at once, one the
 * connection loses is answered AQ_EIO, never replayed, and one that gets
 * no answer within cache_timeout_ms (behind a stuck batch, on a server
 * that stopped answering) is answered AQ_ETIMEDOUT. Returns 0 (cb will be
 * called), AQ_EINVAL (bad input, a NUL byte in the request) or
 * AQ_ECLOSED (freeing). */
int aq_store_cache_get(aq_store *s, const char *request, size_t len, aq_store_cache_cb cb,
                       void *arg) AQ_MUSTCHECK;

/* Caches `response` (`rlen` bytes, the provider's reply to `request`, `len`
 * bytes; neither NUL-terminated; both copied) made by `model` (borrowed;
 * NULL allowed) for `ttl_seconds`, and keeps the fleet's cache within
 * `max_bytes` of responses (agentq.cache_put: expired rows go first, then
 * the oldest; a response larger than max_bytes is not cached). Fire and
 * forget, no callback: a put is an optimisation, so it is dropped rather
 * than replayed or waited for — at once while the store is not connected
 * or too many cache requests are queued already, and when the connection
 * is lost under it or PostgreSQL refuses it (logged). Returns 0 (queued or
 * dropped as said), AQ_EINVAL (bad input, a NUL byte in either text,
 * ttl_seconds or max_bytes not positive) or AQ_ECLOSED (freeing). */
int aq_store_cache_put(aq_store *s, const char *request, size_t len, const char *model,
                       const char *response, size_t rlen, int ttl_seconds,
                       int64_t max_bytes) AQ_MUSTCHECK;

/* Requests accepted and not yet committed or failed. Any thread. */
size_t aq_store_pending(aq_store *s);

/* A snapshot of the counters. Any thread. */
void aq_store_stats(aq_store *s, aq_store_counters *out);


#endif
