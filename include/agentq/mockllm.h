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
 *          url=URL      the tool call's arguments are {"url": "URL"} (for
 *                       http_get, e.g. `tool=http_get url=http://...`); the
 *                       URL runs to the next white space, at most 4 KiB;
 *                       the calculator keeps its own arguments
 *        plus rate limits (429 + Retry-After + x-ratelimit-* headers),
 *        injected 5xx, malformed and never-answered replies, and an
 *        optional key (401 without it; with echo_key the 401 quotes the
 *        key the client presented, as some providers do).
 *        Checks, in order: the key (api_key, in `Authorization: Bearer KEY`
 *        or in the auth_header), the required query parameter
 *        (require_query: 400 naming it), a 429 storm, the body (400), then
 *        the limits: the rpm/tpm token buckets, whose replies carry
 *        x-ratelimit-{limit,remaining,reset}-{requests,tokens}, and the
 *        fixed window (window_requests per window_ms), whose replies carry
 *        x-ratelimit-remaining-requests and x-ratelimit-reset-requests
 *        (no limit header: a client would read it as per minute) in place
 *        of the bucket's requests headers. A 429 from either limit has a
 *        Retry-After of whole seconds, at least 1.
 *   POST /control  changes the faults while the simulator runs (see
 *                  aq_mockllm_control for the body); replies 200 with the
 *                  faults now in force, or 400 naming the bad field
 *   GET  /control  the faults now in force, as JSON:
 *                  {"fail_rate", "malformed_rate", "hang_rate", "latency_ms",
 *                   "jitter_ms", "storm_seconds_left", "retry_after",
 *                   "window_requests", "window_ms"}
 *   GET  /stats    counters as JSON (see aq_mockllm_stats)
 *   GET  /requests every chat request's arrival, in order, as a JSON array
 *                  [{"at_ms": 123, "status": 200}, ...]: at_ms is
 *                  aq_mono_us() / 1000 when the request arrived (the same
 *                  clock as the caller's in-process, and the instant the
 *                  limits judged it), status the one sent or, for a reply
 *                  still waiting out its latency, the one that will be
 *                  (0: never answered, hang_rate). A test reads it to prove
 *                  a client sent nothing between "remaining 0" and the
 *                  reset. The first 100,000 chat requests are kept.
 *   GET  /calls    chat requests per goal (the first user message), as a
 *                  JSON object {"<goal>": n}: what each task paid for, so a
 *                  test can tell a resumed task from one that started over
 *                  (the first 1,000,000 goals are counted)
 *   GET  /healthz  200 "ok"
 *
 * /control, /stats, /calls and /requests take no key and no query
 * parameter: bind the simulator to loopback. Paths match with or without
 * a query string.
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
    const char *api_key;     /* required key (copied); NULL or "" = no auth */
    const char *auth_header; /* the header that carries api_key (copied), e.g.
                              * "api-key" for Azure OpenAI's `api-key: KEY`;
                              * then an Authorization header does not do.
                              * NULL or "" = `Authorization: Bearer KEY` */
    const char *require_query; /* "name=value" (copied; the name printable
                              * ASCII without space or '&'), e.g. Azure's
                              * "api-version=2024-10-21": a chat request
                              * without that query parameter, or with another
                              * value (compared percent-decoded), gets 400
                              * naming it. NULL or "" = none */
    bool echo_key;           /* a 401 quotes the presented key, the way OpenAI's
                              * "Incorrect API key provided: <key>" does (cut
                              * to 200 printable ASCII bytes): lets tests prove
                              * a client keeps a provider's echo of its key out
                              * of logs and rows */
    int window_requests;     /* fixed-window quota, as many providers count:
                              * the first chat request to reach the limits
                              * opens a window of window_ms; its first
                              * window_requests requests are admitted, the
                              * rest get 429 until it ends; the next request
                              * after that opens a new one. 0..1000000;
                              * 0 = off. Applies on top of rpm/tpm */
    int window_ms;           /* the window's length, 0..3600000; 0 = 1000 */
    size_t max_body_bytes;   /* largest request body; default 8 MiB */
    int idle_timeout_s;      /* idle keep-alive connection timeout; default 120 */
} aq_mockllm_config;

/* Counters since aq_mockllm_new(). */
typedef struct aq_mockllm_stats {
    uint64_t requests;          /* chat completion requests received */
    uint64_t completed;         /* valid completions sent */
    uint64_t rate_limited;      /* 429 replies: limits, storms, fail=429 */
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

/* Changes the faults in force, as POST /control does. `body` (borrowed,
 * `len` bytes, need not be NUL-terminated) is a JSON object with any of:
 *   fail_rate, malformed_rate, hang_rate   numbers 0..1
 *   latency_ms, jitter_ms                  integers 0..3600000
 *   storm_seconds   number 0..3600: for that long every chat request is
 *                   answered 429 with Retry-After (0 ends a storm)
 *   retry_after     integer 1..3600, only with storm_seconds: the storm's
 *                   Retry-After (default: the seconds the storm has left)
 *   window_requests integer 0..1000000: the fixed window's quota (0 = off)
 *   window_ms       integer 1..3600000: the fixed window's length
 *                   (naming either, or a reset, closes the window now open:
 *                   the next request opens a new one under the new terms)
 *   reset           true: back to the start-up settings (cfg) and no storm,
 *                   then the other fields of the body apply
 * An empty object {} resets too. Fields not named keep their value. The
 * body is checked in full before anything changes: on a bad one nothing
 * changes and AQ_EINVAL comes back with `err` naming the field (e.g.
 * "fail_rate: must be a number from 0 to 1 (got 1.5)") and `field` (may
 * be NULL, at least 32 bytes) holding its name ("body" for the whole).
 * Returns AQ_OK on success. Call on the loop's thread. */
int aq_mockllm_control(aq_mockllm *m, const char *body, size_t len, char *field, char *err,
                       size_t errlen) AQ_MUSTCHECK;

/* The port actually bound (useful with cfg->port == 0). */
int aq_mockllm_port(const aq_mockllm *m);

/* Copies the counters into `out` (caller's storage). */
void aq_mockllm_get_stats(const aq_mockllm *m, aq_mockllm_stats *out);

/* Closes the listener and every connection; requests still waiting for
 * their reply are dropped without one. NULL is allowed. */
void aq_mockllm_free(aq_mockllm *m);

#endif
