/* ratelimit.c — two token buckets and a deficit round robin of waiters by
 * user (see ratelimit.h). Owns its timer, the waiter records and one entry
 * per user with waiters (in a strmap); does not own the callers' state.
 *
 * The users with waiters form a ring; rl->ring is the user whose turn it
 * is, and rl->turn_open says its quantum has been added for this turn, so
 * a turn cut short by an empty bucket resumes where it stopped instead of
 * adding the quantum again. Each step of serve() either grants the head
 * of the current user or passes the turn on, so a grant costs O(pools)
 * plus the turns that grant nothing, at most 60 per waiting user (a call
 * costs at most 60 quanta, see cost()); nothing scans the waiters.
 *
 * The head waiter takes the first pool that can serve it (choose()); when
 * none can, the turn stays open and the timer is set for the soonest pool
 * (a credit-mode pool asks its source instead, a held pool waits for its
 * release), so the fairness order is the same whichever pool serves.
 *
 * Eviction rule: a user's entry lives exactly as long as the user has a
 * waiter. It is made when the first waiter queues and freed when the last
 * one leaves (granted or cancelled), so memory follows the users waiting
 * now, not every user ever seen. Nothing is lost by dropping it: an entry
 * with no waiters holds only its name, a weight that the next acquire sets
 * again, and a deficit that DRR resets to 0 when a FIFO empties anyway; it
 * is out of the ring, and a user joining the ring is placed by ring_add()
 * alone — just before the cursor — whether the entry is new or not. The map's
 * bucket array does not shrink; it follows the most users ever waiting at
 * once. */
#include "agentq/ratelimit.h"
#include "agentq/strmap.h"

#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

typedef struct user_q user_q;

struct aq_rl_wait {
    aq_rl_wait *next, *prev; /* within the user's FIFO */
    user_q *user;
    int64_t tokens;
    uint64_t avoid;          /* pools it should not come from */
    aq_rl_cb cb;
    void *arg;
};

struct user_q {
    user_q *rnext, *rprev;      /* ring of users with waiters */
    aq_rl_wait *head, *tail;    /* FIFO; empty only inside acquire, before the append */
    int64_t deficit;            /* DRR: cost it may still be granted, in rl's unit */
    int weight;                 /* of its latest acquire, 1..AQ_RL_WEIGHT_MAX */
    bool in_ring;
    char name[];                /* the key it is stored under in rl->users */
};

typedef struct bucket {
    double rate;   /* per microsecond; 0 = unlimited */
    double cap;
    double level;
    bool limited;  /* rate > 0: a limit was configured */
    int64_t per_min;
} bucket;

typedef struct pool {
    bucket req, tok;
    int64_t paused_until;
    bool held;
    int weight;            /* routing weight, 1..1000 */
    int64_t current;       /* smooth weighted round robin */
    aq_rl_source src;      /* credits instead of the clock, when src.need */
    bool asked;            /* src.need called, no credit since */
} pool;

struct aq_ratelimit {
    struct event_base *base;
    struct event *timer;
    pool pools[AQ_RL_POOLS_MAX];
    int npools;
    bool weighted;
    int64_t last_us;
    aq_strmap *users;      /* name -> user_q, users with waiters only */
    user_q *ring;  /* the user whose turn it is */
    bool turn_open;        /* ring has had its quantum for this turn */
    /* DRR's unit is a token when tpm is set, else a call (see cost()). */
    int64_t quantum;       /* added per turn, times the weight */
    int64_t cost_min, cost_max; /* of one call, in the unit */
    size_t nwaiting, nring;
};

static void bucket_init(bucket *b, int64_t per_min, double min_cap)
{
    b->per_min = per_min > 0 ? per_min : 0;
    b->rate = per_min > 0 ? (double)per_min / 60e6 : 0;
    b->limited = per_min > 0;
    double second = (double)per_min / 60.0;
    b->cap = second > min_cap ? second : min_cap;
    b->level = b->cap;
}

static void refill(aq_ratelimit *rl)
{
    int64_t now = aq_mono_us();
    double dt = (double)(now - rl->last_us);
    rl->last_us = now;
    for (int i = 0; i < rl->npools; i++) {
        pool *p = &rl->pools[i];
        if (p->src.need) continue; /* credited, not refilled */
        bucket *bs[] = {&p->req, &p->tok};
        for (int k = 0; k < 2; k++) {
            bucket *b = bs[k];
            if (!b->rate) continue;
            b->level += dt * b->rate;
            if (b->level > b->cap) b->level = b->cap;
        }
    }
}

/* Can pool `p` take a call with `tokens` now? If not, *wait_us says how
 * long (-1: until a credit or a release, no timer). */
static bool can_take(aq_ratelimit *rl, pool *p, int64_t tokens, int64_t *wait_us)
{
    int64_t now = aq_mono_us();
    if (p->held) {
        *wait_us = -1;
        return false;
    }
    if (p->paused_until > now) {
        *wait_us = p->paused_until - now;
        return false;
    }
    /* A call larger than the bucket may go once the bucket is full. */
    double need = (double)tokens < p->tok.cap ? (double)tokens : p->tok.cap;
    if (p->src.need) {
        bool req_short = p->req.limited && p->req.level < 1.0;
        bool tok_short = p->tok.limited && p->tok.level < need;
        if (!req_short && !tok_short) return true;
        if (!p->asked) {
            /* Only the short bucket: leasing the other would hoard what the
             * rest of the fleet could spend. */
            p->asked = true;
            p->src.need(p->src.arg, req_short, tok_short);
        }
        *wait_us = -1; /* no timer: the credit serves the waiters */
        return false;
    }
    double w = 0;
    if (p->req.rate && p->req.level < 1.0) w = (1.0 - p->req.level) / p->req.rate;
    if (p->tok.rate && p->tok.level < need) {
        double wt = (need - p->tok.level) / p->tok.rate;
        if (wt > w) w = wt;
    }
    *wait_us = (int64_t)w + 1;
    return w <= 0;
}

/* The pool a call of `tokens` avoiding `avoid` can have now, or -1 with
 * *wait_us the soonest any candidate could (-1: none by the clock). */
static int choose(aq_ratelimit *rl, int64_t tokens, uint64_t avoid, int64_t *wait_us)
{
    uint64_t unheld = 0;
    for (int i = 0; i < rl->npools; i++)
        if (!rl->pools[i].held) unheld |= (uint64_t)1 << i;
    uint64_t set = unheld & ~avoid ? unheld & ~avoid : unheld;
    int64_t soonest = -1;
    int best = -1;
    int64_t total = 0;
    for (int i = 0; i < rl->npools; i++) {
        if (!(set >> i & 1)) continue;
        pool *p = &rl->pools[i];
        int64_t w;
        if (!can_take(rl, p, tokens, &w)) {
            if (w >= 0 && (soonest < 0 || w < soonest)) soonest = w;
            continue;
        }
        if (!rl->weighted) return i;
        /* Smooth weighted round robin (nginx's) over the pools that can
         * serve now: each gains its weight, the furthest ahead is chosen
         * and pays back the sum, so over time each serves its share. */
        p->current += p->weight;
        total += p->weight;
        if (best < 0 || p->current > rl->pools[best].current) best = i;
    }
    if (best >= 0) {
        rl->pools[best].current -= total;
        return best;
    }
    *wait_us = soonest;
    return -1;
}

/* Sets DRR's unit from the limits (summed over the pools): tokens when
 * there is a tokens limit, calls otherwise (each costs 1 and a turn is
 * `weight` calls: at weight 1, plain round robin by calls). */
static void drr_init(aq_ratelimit *rl)
{
    int64_t rpm = 0, tpm = 0;
    for (int i = 0; i < rl->npools; i++) {
        rpm += rl->pools[i].req.per_min;
        tpm += rl->pools[i].tok.per_min;
    }
    if (tpm <= 0) {
        rl->quantum = rl->cost_min = rl->cost_max = 1;
        return;
    }
    /* A turn is about a second of the quota (the most a bucket releases at
     * once), and at least a typical call: few turns per long-context call,
     * and no user holds the others up for long. */
    int64_t second = (tpm + 59) / 60;
    rl->quantum = second > AQ_RL_QUANTUM_MIN ? second : AQ_RL_QUANTUM_MIN;
    /* With both limits a call also spends 1/rpm of the minute's requests,
     * which is worth tpm/rpm tokens: charging that much at least keeps a
     * user of tiny calls from taking every request when rpm is what binds. */
    rl->cost_min = rpm > 0 ? (tpm + rpm - 1) / rpm : 1;
    /* The provider refuses a call above its tokens/min, and the bucket
     * serves one once it is full anyway; the cap bounds a call to 60 turns. */
    rl->cost_max = tpm;
}

/* What granting `w` takes from its user's deficit. */
static int64_t cost(const aq_ratelimit *rl, const aq_rl_wait *w)
{
    if (w->tokens < rl->cost_min) return rl->cost_min;
    if (w->tokens > rl->cost_max) return rl->cost_max;
    return w->tokens;
}

static void take(pool *p, int64_t tokens)
{
    if (p->req.limited) p->req.level -= 1.0;
    if (p->tok.limited) p->tok.level -= (double)tokens;
}

/* The entry of `name`, made if the user has none (that is, no waiters). */
static user_q *user_get(aq_ratelimit *rl, const char *name)
{
    user_q *u = aq_strmap_get(rl->users, name);
    if (u) return u;
    size_t len = strlen(name);
    u = aq_xcalloc(1, sizeof *u + len + 1);
    memcpy(u->name, name, len + 1);
    aq_strmap_put(rl->users, name, u);
    return u;
}

/* Frees the entry of a user whose last waiter has left (see the eviction
 * rule at the top). */
static void user_evict(aq_ratelimit *rl, user_q *u)
{
    aq_strmap_del(rl->users, u->name);
    free(u);
}

static void ring_add(aq_ratelimit *rl, user_q *u)
{
    if (u->in_ring) return;
    u->in_ring = true;
    rl->nring++;
    if (!rl->ring) {
        u->rnext = u->rprev = u;
        rl->ring = u;
        return;
    }
    /* Insert just before the cursor: a newcomer is served after everyone
     * already waiting has had a turn. */
    u->rnext = rl->ring;
    u->rprev = rl->ring->rprev;
    u->rprev->rnext = u;
    rl->ring->rprev = u;
}

static void ring_remove(aq_ratelimit *rl, user_q *u)
{
    if (!u->in_ring) return;
    u->in_ring = false;
    rl->nring--;
    if (rl->ring == u) rl->turn_open = false; /* the next user's turn starts afresh */
    if (u->rnext == u) {
        rl->ring = NULL;
    } else {
        u->rprev->rnext = u->rnext;
        u->rnext->rprev = u->rprev;
        if (rl->ring == u) rl->ring = u->rnext;
    }
    u->rnext = u->rprev = NULL;
}

/* Takes `w` off its user's FIFO; when it was the last waiter the user
 * leaves the ring and its entry is freed (w->user then dangles). */
static void unlink_wait(aq_ratelimit *rl, aq_rl_wait *w)
{
    user_q *u = w->user;
    if (w->prev) w->prev->next = w->next;
    else u->head = w->next;
    if (w->next) w->next->prev = w->prev;
    else u->tail = w->prev;
    rl->nwaiting--;
    if (!u->head) {
        ring_remove(rl, u);
        user_evict(rl, u);
    }
}

static void arm(aq_ratelimit *rl, int64_t us)
{
    if (us < 0) return; /* waiting for a credit */
    struct timeval tv = {us / 1000000, us % 1000000};
    event_add(rl->timer, &tv);
}

/* Grants waiters in deficit round robin order while the pools allow. */
static void serve(aq_ratelimit *rl)
{
    refill(rl);
    while (rl->ring) {
        user_q *u = rl->ring;
        if (!rl->turn_open) {
            u->deficit += rl->quantum * u->weight;
            rl->turn_open = true;
        }
        aq_rl_wait *w = u->head;
        int64_t c = cost(rl, w);
        if (c > u->deficit) {
            /* Its turn is spent; what is left carries to its next one, so
             * a call bigger than a quantum goes after a few turns. */
            rl->ring = u->rnext;
            rl->turn_open = false;
            continue;
        }
        int64_t wait_us;
        int pi = choose(rl, w->tokens, w->avoid, &wait_us);
        if (pi < 0) {
            arm(rl, wait_us); /* the turn stays open: it resumes here */
            return;
        }
        take(&rl->pools[pi], w->tokens);
        u->deficit -= c;
        unlink_wait(rl, w); /* the last one: u leaves, and its deficit with it */
        aq_rl_cb cb = w->cb;
        void *arg = w->arg;
        free(w);
        cb(arg, pi);
    }
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    serve(arg);
}

static void pool_init(pool *p, int64_t rpm, int64_t tpm, int weight)
{
    memset(p, 0, sizeof *p);
    bucket_init(&p->req, rpm, 1.0);
    bucket_init(&p->tok, tpm, 1.0);
    p->weight = weight < 1 ? 1 : weight > 1000 ? 1000 : weight;
}

aq_ratelimit *aq_ratelimit_new(struct event_base *base, int64_t rpm, int64_t tpm)
{
    aq_ratelimit *rl = aq_xcalloc(1, sizeof *rl);
    rl->base = base;
    rl->timer = evtimer_new(base, on_timer, rl);
    if (!rl->timer) aq_oom("a timer");
    pool_init(&rl->pools[0], rpm, tpm, 1);
    rl->npools = 1;
    drr_init(rl);
    rl->last_us = aq_mono_us();
    rl->users = aq_strmap_new();
    return rl;
}

int aq_ratelimit_add_pool(aq_ratelimit *rl, int64_t rpm, int64_t tpm, int weight)
{
    if (rl->npools >= AQ_RL_POOLS_MAX) return AQ_EINVAL;
    refill(rl);
    pool_init(&rl->pools[rl->npools], rpm, tpm, weight);
    drr_init(rl);
    return rl->npools++;
}

void aq_ratelimit_set_weight(aq_ratelimit *rl, int pi, int weight)
{
    rl->pools[pi].weight = weight < 1 ? 1 : weight > 1000 ? 1000 : weight;
}

void aq_ratelimit_set_weighted(aq_ratelimit *rl, bool weighted) { rl->weighted = weighted; }

static void user_free(const char *name, void *value, void *arg)
{
    user_q *u = value;
    for (aq_rl_wait *w = u->head, *wn; w; w = wn) {
        wn = w->next;
        free(w);
    }
    free(u);
}

void aq_ratelimit_free(aq_ratelimit *rl)
{
    if (!rl) return;
    event_free(rl->timer);
    aq_strmap_each(rl->users, user_free, NULL); /* frees values only */
    aq_strmap_free(rl->users);
    free(rl);
}

bool aq_ratelimit_acquire(aq_ratelimit *rl, const char *user, int64_t tokens, aq_rl_cb cb, void *arg,
                          aq_rl_wait **wait)
{
    return aq_ratelimit_acquire_from(rl, user, 1, tokens, 0, cb, arg, wait, NULL);
}

bool aq_ratelimit_acquire_weighted(aq_ratelimit *rl, const char *user, int weight, int64_t tokens,
                                   aq_rl_cb cb, void *arg, aq_rl_wait **wait)
{
    return aq_ratelimit_acquire_from(rl, user, weight, tokens, 0, cb, arg, wait, NULL);
}

bool aq_ratelimit_acquire_from(aq_ratelimit *rl, const char *user, int weight, int64_t tokens, uint64_t avoid,
                               aq_rl_cb cb, void *arg, aq_rl_wait **wait, int *pool_out)
{
    *wait = NULL;
    int64_t wait_us = -1;
    if (!rl->ring) {
        refill(rl);
        int pi = choose(rl, tokens, avoid, &wait_us);
        if (pi >= 0) {
            take(&rl->pools[pi], tokens);
            if (pool_out) *pool_out = pi;
            return true;
        }
    }
    user_q *u = user_get(rl, user ? user : "");
    u->weight = weight < 1 ? 1 : weight > AQ_RL_WEIGHT_MAX ? AQ_RL_WEIGHT_MAX : weight;
    aq_rl_wait *w = aq_xcalloc(1, sizeof *w);
    w->user = u;
    w->tokens = tokens;
    w->avoid = avoid;
    w->cb = cb;
    w->arg = arg;
    w->prev = u->tail;
    if (u->tail) u->tail->next = w;
    else u->head = w;
    u->tail = w;
    rl->nwaiting++;
    ring_add(rl, u);
    if (!evtimer_pending(rl->timer, NULL)) {
        refill(rl);
        aq_rl_wait *h = rl->ring->head;
        if (choose(rl, h->tokens, h->avoid, &wait_us) >= 0) wait_us = 0; /* serve() grants it at once */
        arm(rl, wait_us);
    }
    *wait = w;
    return false;
}

void aq_ratelimit_cancel(aq_ratelimit *rl, aq_rl_wait *w)
{
    if (!w) return;
    unlink_wait(rl, w);
    free(w);
}

void aq_ratelimit_adjust(aq_ratelimit *rl, int pi, int64_t delta)
{
    pool *p = &rl->pools[pi];
    if (!p->tok.limited) return;
    refill(rl);
    p->tok.level -= (double)delta;
    if (p->tok.level > p->tok.cap) p->tok.level = p->tok.cap;
    if (delta < 0 && rl->ring) arm(rl, 0); /* tokens came back: a waiter may fit */
}

void aq_ratelimit_pause(aq_ratelimit *rl, int pi, int64_t ms)
{
    pool *p = &rl->pools[pi];
    int64_t until = aq_mono_us() + ms * 1000;
    if (until > p->paused_until) p->paused_until = until;
    if (p->src.pause) p->src.pause(p->src.arg, ms);
    /* Waiters go to the other pools now, or wait for this one. */
    if (rl->ring) arm(rl, 0);
}

void aq_ratelimit_hold(aq_ratelimit *rl, int pi, bool held)
{
    pool *p = &rl->pools[pi];
    if (p->held == held) return;
    p->held = held;
    if (!held && rl->ring) arm(rl, 0);
}

void aq_ratelimit_clamp(aq_ratelimit *rl, int pi, double requests, double tokens)
{
    pool *p = &rl->pools[pi];
    refill(rl);
    if (requests >= 0 && p->req.limited && p->req.level > requests) p->req.level = requests;
    if (tokens >= 0 && p->tok.limited && p->tok.level > tokens) p->tok.level = tokens;
}

static void bucket_relimit(bucket *b, int64_t per_min)
{
    double level = b->level;
    bool was = b->limited;
    bucket_init(b, per_min, 1.0);
    if (was && level < b->level) b->level = level;
}

void aq_ratelimit_set_limits(aq_ratelimit *rl, int pi, int64_t rpm, int64_t tpm)
{
    pool *p = &rl->pools[pi];
    refill(rl);
    bucket_relimit(&p->req, rpm);
    bucket_relimit(&p->tok, tpm);
    if (p->src.need) { /* credit mode: what it holds came from the source */
        if (p->req.level > p->req.cap) p->req.level = p->req.cap;
        if (p->tok.level > p->tok.cap) p->tok.level = p->tok.cap;
    }
    drr_init(rl);
}

void aq_ratelimit_limits(const aq_ratelimit *rl, int pi, int64_t *rpm, int64_t *tpm)
{
    *rpm = rl->pools[pi].req.per_min;
    *tpm = rl->pools[pi].tok.per_min;
}

void aq_ratelimit_set_source(aq_ratelimit *rl, int pi, const aq_rl_source *src)
{
    pool *p = &rl->pools[pi];
    p->src = *src;
    /* Start empty: what the fleet may spend comes from the shared bucket. */
    if (p->req.limited) p->req.level = 0;
    if (p->tok.limited) p->tok.level = 0;
}

void aq_ratelimit_credit(aq_ratelimit *rl, int pi, double requests, double tokens)
{
    pool *p = &rl->pools[pi];
    p->asked = false;
    if (p->req.limited) p->req.level += requests;
    if (p->tok.limited) p->tok.level += tokens;
    serve(rl);
}

size_t aq_ratelimit_waiting(const aq_ratelimit *rl, size_t *users)
{
    if (users) *users = rl->nring;
    return rl->nwaiting;
}

size_t aq_ratelimit_users(const aq_ratelimit *rl) { return aq_strmap_size(rl->users); }
