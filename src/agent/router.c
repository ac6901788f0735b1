/* router.c — routes, pools, breakers and the cache in front of them (see
 * router.h).
 *
 * Owns: the providers' clients, one limiter per model (or one for the
 * llm.* provider's models), each pool's state (breaker, in-flight count,
 * cooldown timer, fleet lease thread), the routes, and every call from the
 * ask to its callback. Does not own: the HTTP client, the cache's storage
 * (deps.cache), the conversation, or any retry decision.
 *
 * A pool is held (ratelimit.h) for exactly three reasons, recomputed in
 * one place (pool_update): its breaker is open, its one probe is in
 * flight, or it has max_concurrent calls in flight. Everything else that
 * keeps a call from a route — a pause, an empty bucket — is the limiter's.
 *
 * Every callback runs from a loop event (a grant callback, the HTTP
 * client's, the cache's, or the call's own `done` event), never inside
 * aq_router_send or aq_router_cancel. */
#include "agentq/router.h"
#include "agentq/fleetlimit.h"
#include "agentq/log.h"
#include "agentq/ratelimit.h"

#include <event2/event.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct group group;

/* Grants a pool counts per second, over the last GRANT_SECONDS: what
 * /metrics compares with its requests/min limit. */
#define GRANT_SECONDS 60

typedef struct pool_state {
    aq_router *r;
    group *g;
    int index;               /* within g's limiter */
    const char *provider;    /* borrowed from r->prov */
    const char *label;       /* model, or "*" for the llm.* provider's shared pool */
    int max_concurrent;
    int in_flight;
    int fails;               /* in a row */
    bool open;               /* breaker open: cooling down */
    bool probing;            /* half-open: the one probe call is out */
    struct event *cool_ev;
    aq_fleetlimit *fleet;
    uint32_t granted[GRANT_SECONDS];    /* a ring: slot = second % GRANT_SECONDS */
    int64_t granted_at[GRANT_SECONDS];  /* the second (mono) each slot counts */
} pool_state;

typedef struct route {
    aq_provider *prov;       /* borrowed from r->prov */
    aq_provider_model *pm;   /* borrowed from prov */
    aq_llm *llm;             /* the provider's client, borrowed from r->clients */
    pool_state *ps;
    double price_in, price_out; /* USD per token */
    uint64_t answered, rate_limited, failed, prompt_tokens, completion_tokens;
    double cost;
} route;

/* A model as tasks name it: its limiter group and its route per pool. */
typedef struct model {
    char *name;
    group *g;
    route *by_pool[AQ_RL_POOLS_MAX];
} model;

struct group {
    aq_ratelimit *rl;
    pool_state *pools[AQ_RL_POOLS_MAX];
    int npools;
};

struct aq_router {
    aq_router_deps d;
    aq_provider *prov;
    int nprov;
    aq_llm **clients;        /* one per provider */
    group **groups;
    int ngroups;
    model *models;
    int nmodels;
    route *routes;
    int nroutes;
    pool_state **pools;      /* every pool, for freeing */
    int npools;
    bool cache_on;
    uint64_t cache_hits;
    aq_router_call *calls;   /* outstanding, for aq_router_free */
};

typedef enum { C_CACHE, C_GRANT, C_SENT, C_DONE } cstate;

struct aq_router_call {
    aq_router *r;
    aq_router_call *next, *prev;
    model *m;
    cstate state;
    aq_router_cb cb;
    void *arg;
    char *body;              /* with the task's model name: the cache key */
    size_t body_len;
    const aq_chat *chat;     /* the ask's, borrowed until the callback */
    const char *tools_json;
    aq_chat_sampling sampling;
    bool cacheable;
    char *user;
    int weight;
    uint64_t avoid;
    int64_t est_tokens;
    aq_rl_wait *wait;
    route *rt;
    aq_llm_call *llm_call;
    int64_t started_us, mono_sent;
    int64_t mono_asked;      /* when it asked for a grant */
    double wait_ms;          /* from the ask to the grant */
    bool cancelled;
    struct event *done_ev;   /* a result decided outside a library callback */
    aq_llm_result pending;   /* for done_ev */
    char pending_msg[256];
};

/* ---- pools -------------------------------------------------------------- */

/* The one place a pool's hold is decided (see the top). */
static void pool_update(pool_state *ps)
{
    bool full = ps->max_concurrent > 0 && ps->in_flight >= ps->max_concurrent;
    aq_ratelimit_hold(ps->g->rl, ps->index, ps->open || ps->probing || full);
}

static void on_cooled(evutil_socket_t fd, short what, void *arg)
{
    pool_state *ps = arg;
    /* Half-open: the next grant is the probe, and the pool is held again
     * until its result. */
    ps->open = false;
    aq_log(AQ_LOG_INFO, "provider %s model %s: cooldown over, probing", ps->provider, ps->label);
    pool_update(ps);
}

/* Opens the breaker for one llm.breaker_cooldown_ms. The cooldown does
 * not grow with failed probes: while other routes are saturated, every
 * second a healed provider goes unnoticed is capacity lost, and a probe
 * costs one call (bench S3b: a doubling cooldown noticed a provider back
 * 11 s late). */
static void breaker_trip(pool_state *ps, const char *why)
{
    int64_t ms = ps->r->d.cfg->llm_breaker_cooldown_ms;
    bool was_probe = ps->probing;
    ps->open = true;
    ps->probing = false;
    if (was_probe)
        aq_log(AQ_LOG_INFO, "provider %s model %s: probe failed (%s); cooled down for %lld ms more", ps->provider,
               ps->label, why, (long long)ms);
    else
        aq_log(AQ_LOG_WARN, "provider %s model %s: %d failures in a row (last: %s); cooled down for %lld ms",
               ps->provider, ps->label, ps->fails, why, (long long)ms);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_add(ps->cool_ev, &tv);
    pool_update(ps);
}

static void breaker_result(pool_state *ps, bool ok, bool probe, const char *why)
{
    if (ok) {
        if (ps->fails >= ps->r->d.cfg->llm_breaker_failures || probe)
            aq_log(AQ_LOG_INFO, "provider %s model %s: answering again", ps->provider, ps->label);
        ps->fails = 0;
        ps->probing = false;
        pool_update(ps);
        return;
    }
    ps->fails++;
    /* Cooling a route down sends its calls elsewhere; with nowhere else
     * it would only stall them, and each call's own retries and backoff
     * already ride out a failing provider. */
    bool elsewhere = ps->g->npools > 1;
    if (elsewhere && (probe || (!ps->open && ps->fails >= ps->r->d.cfg->llm_breaker_failures)))
        breaker_trip(ps, why);
    else
        pool_update(ps);
}

static void pool_count_grant(pool_state *ps)
{
    int64_t sec = aq_mono_us() / 1000000;
    int slot = (int)(sec % GRANT_SECONDS);
    if (ps->granted_at[slot] != sec) {
        ps->granted_at[slot] = sec;
        ps->granted[slot] = 0;
    }
    ps->granted[slot]++;
}

static int64_t pool_granted_last_minute(const pool_state *ps)
{
    int64_t sec = aq_mono_us() / 1000000, n = 0;
    for (int i = 0; i < GRANT_SECONDS; i++)
        if (ps->granted_at[i] > sec - GRANT_SECONDS) n += ps->granted[i];
    return n;
}

/* How long until a count at 0 has one again (see pool_learn). */
static int64_t until_one(int64_t reset_ms, int64_t limit)
{
    if (reset_ms < 0) return 1000;
    if (limit > 0) return (reset_ms + limit - 1) / limit;
    return reset_ms;
}

/* What the reply's headers say about the pool's limits. */
static void pool_learn(pool_state *ps, const aq_llm_limits *l)
{
    aq_ratelimit *rl = ps->g->rl;
    int64_t was_rpm, was_tpm;
    aq_ratelimit_limits(rl, ps->index, &was_rpm, &was_tpm);
    int64_t rpm = was_rpm, tpm = was_tpm;
    /* A configured limit above the provider's own is a mistake the
     * provider corrects: the lower one holds from now on. */
    if (l->limit_requests > 0 && (rpm == 0 || l->limit_requests < rpm)) rpm = l->limit_requests;
    if (l->limit_tokens > 0 && (tpm == 0 || l->limit_tokens < tpm)) tpm = l->limit_tokens;
    if (rpm != was_rpm || tpm != was_tpm) {
        aq_log(AQ_LOG_WARN, "provider %s model %s reports limits of %lld requests/min and %lld tokens/min,"
               " below the configuration's: using them", ps->provider, ps->label, (long long)rpm, (long long)tpm);
        aq_ratelimit_set_limits(rl, ps->index, rpm, tpm);
        if (ps->fleet) aq_fleetlimit_set_limits(ps->fleet, rpm, tpm);
    }
    /* Nothing left: wait rather than spend a 429 on it. A reset header
     * says when the count is whole again; a provider that refills
     * continuously and says its limit has one more much sooner, after
     * reset / (limit - remaining). */
    int64_t pause = -1;
    if (l->remaining_requests == 0) pause = until_one(l->reset_requests_ms, l->limit_requests);
    if (l->remaining_tokens == 0) {
        int64_t t = until_one(l->reset_tokens_ms, l->limit_tokens);
        if (t > pause) pause = t;
    }
    if (pause > 0) {
        aq_ratelimit_pause(rl, ps->index, pause);
        return;
    }
    /* Some left: the calls still out will spend part of it. */
    double others = (double)(ps->in_flight > 0 ? ps->in_flight : 0);
    double req = -1, tok = -1;
    if (l->remaining_requests >= 0) req = fmax(0, (double)l->remaining_requests - others);
    if (l->remaining_tokens >= 0) tok = (double)l->remaining_tokens;
    if (req < 0 && tok < 0) return;
    aq_ratelimit_clamp(rl, ps->index, req, tok);
    /* The fleet's bucket too, once the provider's count nears a second's
     * worth: above that the bucket's own cap already keeps it lower. */
    if (ps->fleet) {
        bool near_req = req >= 0 && rpm && req < (double)rpm / 60.0 * 2;
        bool near_tok = tok >= 0 && tpm && tok < (double)tpm / 60.0 * 2;
        if (near_req || near_tok) aq_fleetlimit_clamp(ps->fleet, near_req ? req : -1, near_tok ? tok : -1);
    }
}

/* ---- calls -------------------------------------------------------------- */

static void call_free(aq_router_call *c)
{
    aq_router *r = c->r;
    if (c->prev) c->prev->next = c->next;
    else r->calls = c->next;
    if (c->next) c->next->prev = c->prev;
    if (c->done_ev) event_free(c->done_ev);
    free(c->body);
    free(c->user);
    free(c);
}

/* True if a route of c's model other than those in `avoid` can take a
 * call once it has capacity (its breaker is not open). */
static bool other_route(const aq_router_call *c, uint64_t avoid)
{
    group *g = c->m->g;
    for (int i = 0; i < g->npools; i++)
        if (c->m->by_pool[i] && !(avoid >> i & 1) && !g->pools[i]->open) return true;
    return false;
}

static void deliver(aq_router_call *c, aq_llm_result *res, bool cached, double cost)
{
    c->state = C_DONE;
    route *rt = c->rt;
    int bit = rt ? rt->ps->index : -1;
    aq_router_result out = {
        .llm = res,
        .sent = c->mono_sent != 0,
        .cached = cached,
        .provider = cached ? "cache" : rt ? rt->prov->name : NULL,
        .route = cached ? -1 : bit,
        .cost_usd = cost,
        .started_us = c->started_us,
        .duration_ms = c->mono_sent ? (double)(aq_mono_us() - c->mono_sent) / 1000.0 : 0,
        .wait_ms = c->wait_ms,
        .other_route = other_route(c, c->avoid | (bit >= 0 ? (uint64_t)1 << bit : 0)),
    };
    c->llm_call = NULL;
    c->cb(&out, c->arg);
}

/* A result decided by the router itself (an abort, a refused send) goes
 * out from the loop, as every other. */
static void on_done_ev(evutil_socket_t fd, short what, void *arg)
{
    aq_router_call *c = arg;
    c->pending.message = c->pending.reason = c->pending_msg;
    deliver(c, &c->pending, false, 0);
    call_free(c);
}

static void finish_later(aq_router_call *c, aq_llm_outcome o, int code, const char *msg)
{
    c->state = C_DONE;
    memset(&c->pending, 0, sizeof c->pending);
    c->pending.outcome = o;
    c->pending.code = code;
    c->pending.retry_after_ms = -1;
    c->pending.limits = (aq_llm_limits){-1, -1, -1, -1, -1, -1};
    snprintf(c->pending_msg, sizeof c->pending_msg, "%s", msg);
    if (!c->done_ev) c->done_ev = event_new(c->r->d.base, -1, 0, on_done_ev, c);
    if (!c->done_ev) aq_oom("an event");
    event_active(c->done_ev, EV_TIMEOUT, 0);
}

static void on_llm(aq_llm_result *res, void *arg)
{
    aq_router_call *c = arg;
    if (!c->r) { /* the router was freed: nobody waits for it */
        free(c->body);
        free(c->user);
        free(c);
        return;
    }
    route *rt = c->rt;
    pool_state *ps = rt->ps;
    aq_ratelimit *rl = ps->g->rl;
    bool probe = c->state == C_SENT && ps->probing && ps->in_flight == 1;
    ps->in_flight--;
    double cost = 0;
    switch (res->outcome) {
    case AQ_LLM_ANSWERED: {
        const aq_chat_reply *rp = &res->reply;
        aq_ratelimit_adjust(rl, ps->index, rp->prompt_tokens + rp->completion_tokens - c->est_tokens);
        cost = (double)rp->prompt_tokens * rt->price_in + (double)rp->completion_tokens * rt->price_out;
        rt->answered++;
        rt->prompt_tokens += (uint64_t)rp->prompt_tokens;
        rt->completion_tokens += (uint64_t)rp->completion_tokens;
        rt->cost += cost;
        pool_learn(ps, &res->limits);
        breaker_result(ps, true, probe, NULL);
        if (c->cacheable && c->r->d.cache && res->body)
            c->r->d.cache->put(c->r->d.cache->ctx, c->body, c->body_len, c->m->name, res->body, res->body_len);
        break;
    }
    case AQ_LLM_RATE_LIMITED: {
        aq_ratelimit_adjust(rl, ps->index, -c->est_tokens);
        rt->rate_limited++;
        int64_t ms = res->retry_after_ms >= 0 ? res->retry_after_ms : c->r->d.cfg->llm_retry_backoff_ms;
        aq_ratelimit_pause(rl, ps->index, ms);
        pool_learn(ps, &res->limits);
        /* Not the breaker's: Retry-After is the provider saying when, and
         * the pause keeps every call off the route until then. */
        if (probe) ps->probing = false;
        pool_update(ps);
        break;
    }
    case AQ_LLM_RETRYABLE:
        aq_ratelimit_adjust(rl, ps->index, -c->est_tokens);
        rt->failed++;
        if (res->http_status) pool_learn(ps, &res->limits);
        breaker_result(ps, false, probe, res->reason);
        break;
    case AQ_LLM_FATAL:
        /* The request's fault, not the route's. */
        aq_ratelimit_adjust(rl, ps->index, -c->est_tokens);
        rt->failed++;
        pool_learn(ps, &res->limits);
        ps->probing = false;
        pool_update(ps);
        break;
    case AQ_LLM_ABORTED:
    default:
        aq_ratelimit_adjust(rl, ps->index, -c->est_tokens);
        if (probe) ps->probing = false; /* nothing learned: the next grant probes */
        pool_update(ps);
        break;
    }
    deliver(c, res, false, cost);
    call_free(c);
}

/* Sends c over route `pi` of its model: the grant is in hand. */
static void send_on(aq_router_call *c, int pi)
{
    c->wait = NULL;
    route *rt = c->m->by_pool[pi];
    pool_state *ps = rt->ps;
    c->rt = rt;
    /* A half-open pool's grant is its probe: nothing else goes until it
     * answers. */
    if (!ps->open && ps->g->npools > 1 && ps->fails >= c->r->d.cfg->llm_breaker_failures && ps->in_flight == 0)
        ps->probing = true;
    ps->in_flight++;
    pool_update(ps);
    pool_count_grant(ps);
    c->state = C_SENT;
    c->started_us = aq_now_us();
    c->mono_sent = aq_mono_us();
    c->wait_ms = (double)(c->mono_sent - c->mono_asked) / 1000.0;
    char *body = c->body, *own = NULL;
    size_t len = c->body_len;
    char err[256] = "cannot build the LLM request";
    int rc = AQ_OK;
    /* The provider's own name for the model goes in its request (the
     * cache key keeps the task's). */
    if (strcmp(rt->pm->upstream, c->m->name)) {
        rc = aq_chat_request(c->chat, rt->pm->upstream, c->tools_json, &c->sampling, &own, &len);
        body = own;
    }
    if (rc == AQ_OK) rc = aq_llm_send(rt->llm, rt->pm->upstream, body, len, on_llm, c, &c->llm_call, err, sizeof err);
    free(own); /* aq_http has its copy */
    if (rc != AQ_OK) {
        ps->in_flight--;
        if (ps->probing) ps->probing = false;
        pool_update(ps);
        aq_ratelimit_adjust(ps->g->rl, ps->index, -c->est_tokens);
        c->mono_sent = 0;
        finish_later(c, AQ_LLM_RETRYABLE, AQ_EAGAIN, err);
    }
}

static void on_grant(void *arg, int pool)
{
    send_on(arg, pool);
}

static void acquire(aq_router_call *c)
{
    c->state = C_GRANT;
    c->mono_asked = aq_mono_us();
    int pi = -1;
    if (aq_ratelimit_acquire_from(c->m->g->rl, c->user, c->weight, c->est_tokens, c->avoid, on_grant, c, &c->wait,
                                  &pi))
        send_on(c, pi);
}

static void on_cache(void *arg, const char *response, size_t len)
{
    aq_router_call *c = arg;
    if (!c->r) { /* the router was freed meanwhile */
        free(c->body);
        free(c->user);
        free(c);
        return;
    }
    if (c->cancelled) {
        finish_later(c, AQ_LLM_ABORTED, AQ_ECLOSED, "");
        return;
    }
    if (response) {
        aq_llm_result res = {
            .outcome = AQ_LLM_ANSWERED,
            .code = AQ_OK,
            .http_status = 200,
            .retry_after_ms = -1,
            .limits = {-1, -1, -1, -1, -1, -1},
            .message = "",
            .reason = "",
        };
        char why[256];
        if (aq_chat_parse_reply(response, len, &res.reply, why, sizeof why) == AQ_OK) {
            c->r->cache_hits++;
            c->started_us = aq_now_us();
            deliver(c, &res, true, 0);
            aq_chat_reply_free(&res.reply); /* unless the callback took it */
            call_free(c);
            return;
        }
        /* A row that no longer parses is a miss (and is replaced). */
        aq_chat_reply_free(&res.reply);
        aq_log(AQ_LOG_WARN, "cached reply for model %s does not parse (%s): asking the provider", c->m->name, why);
    }
    acquire(c);
}

static model *find_model(const aq_router *r, const char *name)
{
    for (int i = 0; name && i < r->nmodels; i++)
        if (!strcmp(r->models[i].name, name)) return &r->models[i];
    return NULL;
}

int aq_router_send(aq_router *r, const aq_router_ask *ask, aq_router_cb cb, void *arg, aq_router_call **out,
                   char *err, size_t errlen)
{
    model *m = find_model(r, ask->model);
    if (!m) {
        aq_seterr(err, errlen, "model '%s' is served by no provider", ask->model ? ask->model : "");
        return AQ_EINVAL;
    }
    char *body = NULL;
    size_t len = 0;
    if (aq_chat_request(ask->chat, m->name, ask->tools_json, &ask->sampling, &body, &len) != AQ_OK) {
        aq_seterr(err, errlen, "cannot build the LLM request");
        return AQ_EINVAL;
    }
    aq_router_call *c = aq_xcalloc(1, sizeof *c);
    c->r = r;
    c->m = m;
    c->cb = cb;
    c->arg = arg;
    c->body = body;
    c->body_len = len;
    c->user = aq_xstrdup(ask->user ? ask->user : "");
    c->weight = ask->weight;
    c->avoid = ask->avoid;
    c->chat = ask->chat;
    c->tools_json = ask->tools_json;
    c->sampling = ask->sampling;
    /* Reserved at the grant: the prompt (about 4 bytes a token) and the
     * reply's most (max_tokens), or a typical one. */
    int64_t reply = ask->sampling.max_tokens > 0 ? ask->sampling.max_tokens : 256;
    c->est_tokens = (int64_t)(aq_chat_bytes(ask->chat) / 4) + reply;
    c->next = r->calls;
    if (r->calls) r->calls->prev = c;
    r->calls = c;
    if (out) *out = c;
    double t = ask->sampling.temperature;
    c->cacheable = r->cache_on && t >= 0 && t <= r->d.cfg->cache_max_temperature;
    if (c->cacheable) {
        c->state = C_CACHE;
        if (r->d.cache->get(r->d.cache->ctx, body, len, on_cache, c) == AQ_OK) return AQ_OK;
        c->cacheable = true; /* the lookup could not start: ask the provider, still keep the reply */
    }
    acquire(c);
    return AQ_OK;
}

void aq_router_cancel(aq_router_call *c)
{
    switch (c->state) {
    case C_CACHE:
        c->cancelled = true; /* on_cache ends it */
        break;
    case C_GRANT:
        aq_ratelimit_cancel(c->m->g->rl, c->wait);
        c->wait = NULL;
        finish_later(c, AQ_LLM_ABORTED, AQ_ECLOSED, "");
        break;
    case C_SENT:
        if (c->llm_call) aq_llm_cancel(c->llm_call); /* on_llm ends it, ABORTED */
        break;
    case C_DONE:
        break;
    }
}

bool aq_router_waiting(const aq_router_call *c) { return c->state == C_CACHE || c->state == C_GRANT; }

void aq_router_each(const aq_router *r, void (*fn)(const aq_route_stats *st, void *arg), void *arg)
{
    for (int i = 0; i < r->nroutes; i++) {
        const route *rt = &r->routes[i];
        int64_t rpm, tpm;
        aq_ratelimit_limits(rt->ps->g->rl, rt->ps->index, &rpm, &tpm);
        aq_route_stats st = {
            .provider = rt->prov->name,
            .model = rt->pm->name,
            .answered = rt->answered,
            .rate_limited = rt->rate_limited,
            .failed = rt->failed,
            .prompt_tokens = rt->prompt_tokens,
            .completion_tokens = rt->completion_tokens,
            .cost_usd = rt->cost,
            .in_flight = rt->ps->in_flight,
            .open = rt->ps->open,
            .rpm = rpm,
            .tpm = tpm,
            .granted_last_minute = pool_granted_last_minute(rt->ps),
        };
        fn(&st, arg);
    }
    if (r->cache_on) {
        aq_route_stats st = {.provider = "cache", .model = "", .cached = r->cache_hits};
        fn(&st, arg);
    }
}

size_t aq_router_waiting_calls(const aq_router *r, size_t *users)
{
    size_t n = 0, u = 0;
    for (int i = 0; i < r->ngroups; i++) {
        size_t gu = 0;
        n += aq_ratelimit_waiting(r->groups[i]->rl, &gu);
        u += gu;
    }
    if (users) *users = u;
    return n;
}

/* ---- building ----------------------------------------------------------- */

static group *group_new(aq_router *r)
{
    group *g = aq_xcalloc(1, sizeof *g);
    r->groups = aq_xrealloc(r->groups, (size_t)(r->ngroups + 1) * sizeof *r->groups);
    r->groups[r->ngroups++] = g;
    return g;
}

static pool_state *pool_new(aq_router *r, group *g, const aq_provider *pv, const char *label, int64_t rpm,
                            int64_t tpm, int max_concurrent, char *err, size_t errlen)
{
    int index;
    if (!g->rl) {
        g->rl = aq_ratelimit_new(r->d.base, rpm, tpm);
        aq_ratelimit_set_weight(g->rl, 0, pv->weight);
        aq_ratelimit_set_weighted(g->rl, !strcmp(r->d.cfg->llm_routing, "weight"));
        index = 0;
    } else if ((index = aq_ratelimit_add_pool(g->rl, rpm, tpm, pv->weight)) < 0) {
        aq_seterr(err, errlen, "model %s: more than %d providers serve it", label, AQ_RL_POOLS_MAX);
        return NULL;
    }
    pool_state *ps = aq_xcalloc(1, sizeof *ps);
    ps->r = r;
    ps->g = g;
    ps->index = index;
    ps->provider = pv->name;
    ps->label = label;
    ps->max_concurrent = max_concurrent;
    ps->cool_ev = evtimer_new(r->d.base, on_cooled, ps);
    if (!ps->cool_ev) aq_oom("a timer");
    g->pools[g->npools++] = ps;
    r->pools = aq_xrealloc(r->pools, (size_t)(r->npools + 1) * sizeof *r->pools);
    r->pools[r->npools++] = ps;
    if (r->d.fleet && (rpm || tpm)) {
        /* The llm.* provider keeps the bucket names it always had. */
        char bucket[512];
        if (pv->shared_limits) snprintf(bucket, sizeof bucket, "%s", r->d.cfg->limits_bucket);
        else snprintf(bucket, sizeof bucket, "%s:%s:%s", r->d.cfg->limits_bucket, pv->name, label);
        aq_fleetlimit_config fc = {aq_config_listen_dsn(r->d.cfg), bucket, rpm, tpm, index};
        if (!(ps->fleet = aq_fleetlimit_new(&fc, g->rl, r->d.base, err, errlen))) return NULL;
    }
    return ps;
}

static model *model_get(aq_router *r, const char *name)
{
    model *m = find_model(r, name);
    if (m) return m;
    r->models = aq_xrealloc(r->models, (size_t)(r->nmodels + 1) * sizeof *r->models);
    m = &r->models[r->nmodels++];
    memset(m, 0, sizeof *m);
    m->name = aq_xstrdup(name);
    return m;
}

aq_router *aq_router_new(const aq_router_deps *deps, char *err, size_t errlen)
{
    aq_router *r = aq_xcalloc(1, sizeof *r);
    r->d = *deps;
    const aq_config *cfg = deps->cfg;
    r->prov = aq_config_providers(cfg, &r->nprov);
    r->clients = aq_xcalloc((size_t)r->nprov, sizeof *r->clients);
    int nroutes = 0;
    for (int i = 0; i < r->nprov; i++) nroutes += r->prov[i].n_models;
    r->routes = aq_xcalloc((size_t)nroutes, sizeof *r->routes);
    for (int i = 0; i < r->nprov; i++) {
        aq_provider *pv = &r->prov[i];
        /* A providers list names its key variables on purpose; the llm.*
         * default names one a keyless local server leaves unset. */
        aq_llm_endpoint ep = {pv->base_url, pv->query,       pv->auth,
                              pv->auth_header, pv->api_key_env, cfg->llm_timeout_ms,
                              !pv->shared_limits};
        if (!(r->clients[i] = aq_llm_new(&ep, deps->http, err, errlen))) goto fail;
        pool_state *shared = NULL;
        for (int j = 0; j < pv->n_models; j++) {
            aq_provider_model *pm = &pv->models[j];
            model *m = model_get(r, pm->name);
            pool_state *ps;
            if (pv->shared_limits) {
                /* One pool for all the provider's models, in one group. */
                if (!shared) {
                    group *g = r->ngroups ? r->groups[0] : group_new(r);
                    if (!(shared = pool_new(r, g, pv, "*", pm->rpm, pm->tpm, 0, err, errlen))) goto fail;
                }
                ps = shared;
                m->g = shared->g;
            } else {
                if (!m->g) m->g = group_new(r);
                if (!(ps = pool_new(r, m->g, pv, pm->name, pm->rpm, pm->tpm, pm->max_concurrent, err, errlen)))
                    goto fail;
            }
            route *rt = &r->routes[r->nroutes++];
            rt->prov = pv;
            rt->pm = pm;
            rt->llm = r->clients[i];
            rt->ps = ps;
            rt->price_in = pm->price_in / 1e6;
            rt->price_out = pm->price_out / 1e6;
            m->by_pool[ps->index] = rt;
        }
    }
    r->cache_on = cfg->cache_enabled && deps->cache && deps->cache->get && deps->cache->put;
    return r;
fail:
    aq_router_free(r);
    return NULL;
}

void aq_router_free(aq_router *r)
{
    if (!r) return;
    /* Outstanding calls are dropped without a callback (their sessions are
     * gone first); one in flight is cancelled and left to the HTTP
     * client's callback to free. */
    while (r->calls) {
        aq_router_call *c = r->calls;
        r->calls = c->next;
        if (c->state == C_GRANT && c->wait) aq_ratelimit_cancel(c->m->g->rl, c->wait);
        if (c->done_ev) event_free(c->done_ev);
        if (c->state == C_SENT && c->llm_call) {
            c->r = NULL;
            c->done_ev = NULL;
            aq_llm_cancel(c->llm_call);
            continue;
        }
        if (c->state == C_CACHE) {
            /* the store answers it later: it must find it */
            c->r = NULL;
            c->done_ev = NULL;
            continue;
        }
        free(c->body);
        free(c->user);
        free(c);
    }
    for (int i = 0; i < r->npools; i++) {
        aq_fleetlimit_free(r->pools[i]->fleet);
        if (r->pools[i]->cool_ev) event_free(r->pools[i]->cool_ev);
        free(r->pools[i]);
    }
    free(r->pools);
    for (int i = 0; i < r->ngroups; i++) {
        aq_ratelimit_free(r->groups[i]->rl);
        free(r->groups[i]);
    }
    free(r->groups);
    for (int i = 0; i < r->nmodels; i++) free(r->models[i].name);
    free(r->models);
    free(r->routes);
    for (int i = 0; r->clients && i < r->nprov; i++) aq_llm_free(r->clients[i]);
    free(r->clients);
    aq_config_providers_free(r->prov, r->nprov);
    free(r);
}
