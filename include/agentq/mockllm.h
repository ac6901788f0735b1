/* mockllm.h — an OpenAI-compatible LLM simulator that runs on a caller's
 * libevent event_base (evhttp), so tests and benchmarks embed it in-process
 * and agentq-mockllm only wires it to flags and signals.
 *
 * It serves:
 *   POST /v1/chat/completions (also /chat/completions)
 *        an OpenAI Chat Completions reply after latency ± jitter, driven by
 *        directives in the goal (the first "user" message):
 *          steps=N      N tool-call turns (counting the tool results already
 *                       in the conversation), then a final "done: ..." answer
 *          parallel=K   K tool calls per tool turn
 *          tool=NAME    call this offered tool instead of the first one
 *          loop         call a tool every turn, never finish
 *          calc         (or mode calc) call `calculator` with a random
 *                       expression, then check the tool result and answer
 *                       "correct: <expr> = <value>" or "WRONG: ..."
 *          fail=CODE    reply with HTTP CODE (400..599) and an OpenAI-style
 *                       error body
 *          tokens=N     report N completion tokens
 *          sleep=MS     this request's latency is MS
 *        plus rate limits (429 + Retry-After + x-ratelimit-* headers),
 *        injected 5xx, malformed and never-answered replies, and an
 *        optional bearer key (401 without it).
 *   GET  /stats    counters as JSON (see aq_mockllm_stats)
 *   GET  /healthz  200 "ok"
 *
 * Every reply is scheduled with a timer on the loop; nothing sleeps, and a
 * waiting request costs one small struct plus its reply, so one loop holds
 * tens of thousands of delayed requests. A held request whose client closes
 * (or half-closes) the connection is freed at once, without a reply.
 *
 * Threads: not thread-safe; call everything on the loop's thread (read
 * counters from elsewhere through GET /stats). The embedding program must
 * ignore SIGPIPE, since evhttp writes to sockets whose peer may be gone. */
#ifndef AGENTQ_MOCKLLM_H
#define AGENTQ_MOCKLLM_H

#include "agentq/common.h"

struct event_base;

typedef struct aq_mockllm aq_mockllm;

typedef enum {
    AQ_MOCKLLM_SCRIPT = 0, /* directives in the goal drive the replies */
    AQ_MOCKLLM_CALC = 1,   /* every goal behaves as if it said `calc` */
} aq_mockllm_mode;

typedef struct aq_mockllm_config {
    const char *host;        /* listen address (borrowed); default "127.0.0.1" */
    int port;                /* 0 picks a free port; see aq_mockllm_port() */
    int backlog;             /* listen(2) backlog; default 4096 */
    int latency_ms;          /* base reply latency; default 0 */
    int jitter_ms;           /* uniform ± around latency; default 0 */
    int64_t rpm;             /* requests per minute; 0 = unlimited */
    int64_t tpm;             /* tokens (prompt + completion) per minute; 0 = unlimited */
    double fail_rate;        /* fraction answered with 500, 0..1 */
    double malformed_rate;   /* fraction answered 200 with broken JSON, 0..1 */
    double hang_rate;        /* fraction never answered, 0..1 */
    aq_mockllm_mode mode;
    uint64_t seed;           /* PRNG seed; 0 = seeded from clock and pid */
    const char *api_key;     /* required bearer key (copied); NULL = no auth */
    size_t max_body_bytes;   /* largest request body; default 8 MiB */
    int idle_timeout_s;      /* idle keep-alive connection timeout; default 120 */
} aq_mockllm_config;

/* Counters since aq_mockllm_new(). */
typedef struct aq_mockllm_stats {
    uint64_t requests;          /* chat completion requests received */
    uint64_t completed;         /* valid completions sent */
    uint64_t rate_limited;      /* 429 replies from the rpm/tpm limits */
    uint64_t failures;          /* other error replies (4xx, 5xx) and malformed ones */
    uint64_t malformed;         /* of failures: 200 with broken JSON */
    uint64_t hung;              /* requests chosen never to be answered */
    uint64_t cancelled;         /* held requests whose client went away */
    uint64_t in_flight;         /* accepted, reply not yet sent (includes hung) */
    uint64_t peak_in_flight;
    uint64_t prompt_tokens;     /* summed over completed replies */
    uint64_t completion_tokens; /* summed over completed replies */
} aq_mockllm_stats;

/* Fills `cfg` with the defaults above. */
void aq_mockllm_config_defaults(aq_mockllm_config *cfg);

/* Parses "script" or "calc"; returns the mode, or -1 if unknown. */
int aq_mockllm_mode_parse(const char *name);

/* Binds host:port (listen backlog cfg->backlog) and starts serving on
 * `base` (borrowed; it must outlive the simulator). `cfg` is borrowed and
 * may be freed after the call (strings are copied). Returns NULL and fills
 * `err` on a bad setting or a bind failure. The caller frees the simulator
 * with aq_mockllm_free(). */
aq_mockllm *aq_mockllm_new(struct event_base *base, const aq_mockllm_config *cfg,
                           char *err, size_t errlen) AQ_MUSTCHECK;

/* The port actually bound (useful with cfg->port == 0). */
int aq_mockllm_port(const aq_mockllm *m);

/* Copies the counters into `out` (caller's storage). */
void aq_mockllm_get_stats(const aq_mockllm *m, aq_mockllm_stats *out);

/* Closes the listener and every connection; requests still waiting for
 * their reply are dropped without one. NULL is allowed. */
void aq_mockllm_free(aq_mockllm *m);

#endif
