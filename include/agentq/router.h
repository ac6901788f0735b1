/* router.h — which provider answers a model's call, within what limits,
 * and whether the fleet already has the answer.
 *
 * The router owns the routes: one per provider and model it serves
 * (aq_config_providers), each with its provider's client (llm.h), its
 * price, a circuit breaker, its in-flight count and a pool of a limiter
 * (ratelimit.h) — in fleet mode credited by a fleetlimit.h lease thread
 * of its own. The routes of one model are the pools of one limiter, so the
 * sessions waiting for that model wait in one fair queue and each grant
 * comes from whichever route has capacity: the first in the providers
 * list (llm.routing "order") or by the providers' weights ("weight").
 * The llm.* provider's models share one pool: its limits were always the
 * provider's.
 *
 * A call (aq_router_send) is: the cache (when cache.enabled and the call
 * is deterministic: a temperature at most cache.max_temperature) → a
 * grant → the request → the reading of the reply, then one callback with
 * the outcome and the route that made it. The router acts on what every
 * reply says about its route, so the caller need not:
 *   - tokens reserved at the grant (prompt estimate + max_tokens or 256)
 *     are reconciled with the reported usage, or given back on failure;
 *   - a 429 pauses the route's pool for Retry-After (fleet-wide in fleet
 *     mode), and only that pool;
 *   - x-ratelimit-remaining-* clamp the pool to what the provider says is
 *     left (a 0 pauses it until one more is due: x-ratelimit-reset-*
 *     divided by the limit when the provider says its limit, else the
 *     whole reset), and an x-ratelimit-limit-* below the configured limit
 *     becomes the limit;
 *   - llm.breaker_failures failures in a row (5xx, network errors,
 *     timeouts, malformed replies; a 429 pauses instead) open the route's
 *     breaker: no grant
 *     comes from it for llm.breaker_cooldown_ms, then one probe call is
 *     let through; its success closes the breaker, its failure cools it
 *     down again (for as long: see breaker_trip). Only a model with another route has a
 *     breaker: with nowhere else to go, cooling down would only stall the
 *     calls that their own retries carry through;
 *   - max_concurrent holds a route while that many of its calls are in
 *     flight from this worker.
 * What to do next (fail over, back off, fail) is the caller's: the result
 * says whether another route of the model is open to a retry now.
 *
 * Contract: aq_router_send() either fails (AQ_EINVAL: the model is served
 * by no provider, or the request cannot be built — err says which) and
 * never calls back, or calls back exactly once, later, from the loop.
 *
 * Threads: the loop thread; the fleet lease threads talk to it through
 * mailboxes. */
#ifndef AGENTQ_ROUTER_H
#define AGENTQ_ROUTER_H

#include "agentq/chat.h"
#include "agentq/common.h"
#include "agentq/config.h"
#include "agentq/http.h"
#include "agentq/llm.h"

struct event_base;
typedef struct aq_router aq_router;
typedef struct aq_router_call aq_router_call;

/* The fleet's response cache (the worker's store). get() looks `request`
 * up and calls done(arg, response, len) exactly once, later, from the
 * loop — response NULL on a miss or when the lookup failed; put() keeps
 * a reply, fire and forget. Texts are borrowed for the call. */
typedef void (*aq_cache_done)(void *arg, const char *response, size_t len);
typedef struct aq_llm_cache {
    int (*get)(void *ctx, const char *request, size_t len, aq_cache_done done, void *arg);
    void (*put)(void *ctx, const char *request, size_t len, const char *model, const char *response,
                size_t rlen);
    void *ctx;
} aq_llm_cache;

typedef struct aq_router_deps {
    const aq_config *cfg;        /* borrowed; outlives the router */
    struct event_base *base;
    aq_http *http;               /* borrowed */
    const aq_llm_cache *cache;   /* borrowed; NULL: no cache whatever cache.enabled says */
    bool fleet;                  /* limits from agentq.rate_limits (postgres.dsn) */
} aq_router_deps;

/* Makes the routes. Fails (NULL, err filled) when a provider's client or a
 * fleet lease thread cannot start. */
aq_router *aq_router_new(const aq_router_deps *deps, char *err, size_t errlen);
/* Frees. Calls still outstanding are dropped without a callback: end the
 * sessions first. The HTTP client must outlive it (a call in flight is
 * cancelled and freed by the client's callback), and so must the cache. */
void aq_router_free(aq_router *r);

/* What a call asks. Strings and the chat borrowed until the callback. */
typedef struct aq_router_ask {
    const char *model;          /* as the task names it */
    const char *user;           /* whose share of the limits it spends */
    int weight;                 /* the user's weight (ratelimit.h) */
    const aq_chat *chat;
    const char *tools_json;     /* NULL or "[]": none */
    aq_chat_sampling sampling;
    uint64_t avoid;             /* routes (result.route bits) that failed this step */
} aq_router_ask;

typedef struct aq_router_result {
    aq_llm_result *llm;     /* the outcome, as llm.h describes it; ABORTED after a cancel */
    bool sent;              /* a request went out (false: cancelled before, or a cache hit) */
    bool cached;            /* answered from the fleet's cache: no grant, no request, cost 0 */
    const char *provider;   /* who answered: the provider's name, "cache", or NULL */
    int route;              /* its bit in aq_router_ask.avoid; -1 for none or the cache */
    double cost_usd;        /* of an answered call, at the route's price */
    int64_t started_us;     /* epoch us the request went out (or the cache answered) */
    double duration_ms;     /* of the request */
    double wait_ms;         /* from asking for a grant to getting it (0: a cache hit, or no
                             * grant came) */
    bool other_route;       /* the model has a route outside avoid and this one, not
                             * cooled down: a retry now may fail over to it */
} aq_router_result;

typedef void (*aq_router_cb)(const aq_router_result *res, void *arg);

AQ_MUSTCHECK int aq_router_send(aq_router *r, const aq_router_ask *ask, aq_router_cb cb, void *arg,
                                aq_router_call **out, char *err, size_t errlen);
/* Stops a call: it calls back once, from the loop, ABORTED (sent says
 * whether a request had gone out). Not after its callback returned. */
void aq_router_cancel(aq_router_call *c);
/* The call waits for the cache or a grant: nothing has gone out yet. */
bool aq_router_waiting(const aq_router_call *c);

/* Per-route counters, for /metrics: calls answered, rate limited, failed
 * otherwise, cache hits (route -1: provider "cache"), and the state now. */
typedef struct aq_route_stats {
    const char *provider, *model;
    uint64_t answered, rate_limited, failed, cached;
    uint64_t prompt_tokens, completion_tokens;
    double cost_usd;
    int in_flight;
    bool open;              /* cooled down: the breaker is open */
    int64_t rpm, tpm;       /* the limits in force (learned ones included) */
    int64_t granted_last_minute; /* grants of its pool in the last 60 s (the routes of the
                                  * llm.* provider share one pool, and its rpm) */
} aq_route_stats;
/* Calls fn once per route, then once for the cache (provider "cache",
 * model ""), when the cache is on. */
void aq_router_each(const aq_router *r, void (*fn)(const aq_route_stats *st, void *arg), void *arg);

/* Calls waiting for a grant, over all models, and the users they belong to. */
size_t aq_router_waiting_calls(const aq_router *r, size_t *users);

#endif
