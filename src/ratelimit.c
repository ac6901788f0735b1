/* ratelimit.c — two token buckets and a round-robin queue of waiters by
 * user (see ratelimit.h). Owns its timer and the waiter records; does not
 * own the callers' state. */
#include "agentq/ratelimit.h"

#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

typedef struct user_q user_q;

struct aq_rl_wait {
    aq_rl_wait *next, *prev; /* within the user's FIFO */
    user_q *user;
    int64_t tokens;
    aq_rl_cb cb;
    void *arg;
};

struct user_q {
    char *name;
    user_q *hnext;              /* hash chain */
    user_q *rnext, *rprev;      /* ring of users with waiters */
    aq_rl_wait *head, *tail;
    bool in_ring;
};

typedef struct bucket {
    double rate;   /* per microsecond; 0 = unlimited */
    double cap;
    double level;
    bool limited;  /* rate > 0: a limit was configured */
} bucket;

struct aq_ratelimit {
    struct event_base *base;
    struct event *timer;
    bucket req, tok;
    int64_t last_us;
    int64_t paused_until;
    user_q **table;
    size_t nbuckets, nusers;
    user_q *ring;  /* next user to serve */
    size_t nwaiting, nring;
    aq_rl_source src;      /* credits instead of the clock, when src.need */
    bool asked;            /* src.need called, no credit since */
};

static uint64_t hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static void bucket_init(bucket *b, int64_t per_min, double min_cap)
{
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
    if (rl->src.need) return; /* credited, not refilled */
    bucket *bs[] = {&rl->req, &rl->tok};
    for (int i = 0; i < 2; i++) {
        bucket *b = bs[i];
        if (!b->rate) continue;
        b->level += dt * b->rate;
        if (b->level > b->cap) b->level = b->cap;
    }
}

/* Can a call with `tokens` go now? If not, *wait_us says how long. */
static bool can_take(aq_ratelimit *rl, int64_t tokens, int64_t *wait_us)
{
    int64_t now = aq_mono_us();
    if (rl->paused_until > now) {
        *wait_us = rl->paused_until - now;
        return false;
    }
    /* A call larger than the bucket may go once the bucket is full. */
    double need = (double)tokens < rl->tok.cap ? (double)tokens : rl->tok.cap;
    if (rl->src.need) {
        bool req_short = rl->req.limited && rl->req.level < 1.0;
        bool tok_short = rl->tok.limited && rl->tok.level < need;
        if (!req_short && !tok_short) return true;
        if (!rl->asked) {
            /* Only the short bucket: leasing the other would hoard what the
             * rest of the fleet could spend. */
            rl->asked = true;
            rl->src.need(rl->src.arg, req_short, tok_short);
        }
        *wait_us = -1; /* no timer: the credit serves the waiters */
        return false;
    }
    double w = 0;
    if (rl->req.rate && rl->req.level < 1.0) w = (1.0 - rl->req.level) / rl->req.rate;
    if (rl->tok.rate && rl->tok.level < need) {
        double wt = (need - rl->tok.level) / rl->tok.rate;
        if (wt > w) w = wt;
    }
    *wait_us = (int64_t)w + 1;
    return w <= 0;
}

static void take(aq_ratelimit *rl, int64_t tokens)
{
    if (rl->req.limited) rl->req.level -= 1.0;
    if (rl->tok.limited) rl->tok.level -= (double)tokens;
}

static user_q *user_get(aq_ratelimit *rl, const char *name)
{
    uint64_t h = hash(name);
    size_t i = h & (rl->nbuckets - 1);
    for (user_q *u = rl->table[i]; u; u = u->hnext)
        if (!strcmp(u->name, name)) return u;
    if (rl->nusers >= rl->nbuckets) { /* grow: keep chains short */
        size_t nb = rl->nbuckets * 2;
        user_q **t = aq_xcalloc(nb, sizeof *t);
        for (size_t b = 0; b < rl->nbuckets; b++)
            for (user_q *u = rl->table[b], *next; u; u = next) {
                next = u->hnext;
                size_t j = hash(u->name) & (nb - 1);
                u->hnext = t[j];
                t[j] = u;
            }
        free(rl->table);
        rl->table = t;
        rl->nbuckets = nb;
        i = h & (nb - 1);
    }
    user_q *u = aq_xcalloc(1, sizeof *u);
    u->name = aq_xstrdup(name);
    u->hnext = rl->table[i];
    rl->table[i] = u;
    rl->nusers++;
    return u;
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
    if (u->rnext == u) {
        rl->ring = NULL;
    } else {
        u->rprev->rnext = u->rnext;
        u->rnext->rprev = u->rprev;
        if (rl->ring == u) rl->ring = u->rnext;
    }
    u->rnext = u->rprev = NULL;
}

static void unlink_wait(aq_ratelimit *rl, aq_rl_wait *w)
{
    user_q *u = w->user;
    if (w->prev) w->prev->next = w->next;
    else u->head = w->next;
    if (w->next) w->next->prev = w->prev;
    else u->tail = w->prev;
    rl->nwaiting--;
    if (!u->head) ring_remove(rl, u);
}

static void arm(aq_ratelimit *rl, int64_t us)
{
    if (us < 0) return; /* waiting for a credit */
    struct timeval tv = {us / 1000000, us % 1000000};
    event_add(rl->timer, &tv);
}

/* Grants waiters in round-robin order while the buckets allow. */
static void serve(aq_ratelimit *rl)
{
    refill(rl);
    while (rl->ring) {
        user_q *u = rl->ring;
        aq_rl_wait *w = u->head;
        int64_t wait_us;
        if (!can_take(rl, w->tokens, &wait_us)) {
            arm(rl, wait_us);
            return;
        }
        take(rl, w->tokens);
        rl->ring = u->rnext; /* next user's turn */
        unlink_wait(rl, w);
        aq_rl_cb cb = w->cb;
        void *arg = w->arg;
        free(w);
        cb(arg);
    }
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    serve(arg);
}

aq_ratelimit *aq_ratelimit_new(struct event_base *base, int64_t rpm, int64_t tpm)
{
    aq_ratelimit *rl = aq_xcalloc(1, sizeof *rl);
    rl->base = base;
    rl->timer = evtimer_new(base, on_timer, rl);
    if (!rl->timer) aq_oom("a timer");
    bucket_init(&rl->req, rpm, 1.0);
    bucket_init(&rl->tok, tpm, 1.0);
    rl->last_us = aq_mono_us();
    rl->nbuckets = 64;
    rl->table = aq_xcalloc(rl->nbuckets, sizeof *rl->table);
    return rl;
}

void aq_ratelimit_free(aq_ratelimit *rl)
{
    if (!rl) return;
    event_free(rl->timer);
    for (size_t b = 0; b < rl->nbuckets; b++)
        for (user_q *u = rl->table[b], *next; u; u = next) {
            next = u->hnext;
            for (aq_rl_wait *w = u->head, *wn; w; w = wn) {
                wn = w->next;
                free(w);
            }
            free(u->name);
            free(u);
        }
    free(rl->table);
    free(rl);
}

bool aq_ratelimit_acquire(aq_ratelimit *rl, const char *user, int64_t tokens, aq_rl_cb cb, void *arg,
                          aq_rl_wait **wait)
{
    *wait = NULL;
    if (!rl->ring) {
        int64_t wait_us;
        refill(rl);
        if (can_take(rl, tokens, &wait_us)) {
            take(rl, tokens);
            return true;
        }
    }
    user_q *u = user_get(rl, user ? user : "");
    aq_rl_wait *w = aq_xcalloc(1, sizeof *w);
    w->user = u;
    w->tokens = tokens;
    w->cb = cb;
    w->arg = arg;
    w->prev = u->tail;
    if (u->tail) u->tail->next = w;
    else u->head = w;
    u->tail = w;
    rl->nwaiting++;
    ring_add(rl, u);
    if (!evtimer_pending(rl->timer, NULL)) {
        int64_t wait_us;
        refill(rl);
        can_take(rl, rl->ring->head->tokens, &wait_us);
        arm(rl, wait_us > 0 ? wait_us : 0);
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

void aq_ratelimit_adjust(aq_ratelimit *rl, int64_t delta)
{
    if (!rl->tok.limited) return;
    refill(rl);
    rl->tok.level -= (double)delta;
    if (rl->tok.level > rl->tok.cap) rl->tok.level = rl->tok.cap;
}

void aq_ratelimit_pause(aq_ratelimit *rl, int64_t ms)
{
    int64_t until = aq_mono_us() + ms * 1000;
    if (until > rl->paused_until) rl->paused_until = until;
    if (rl->src.pause) rl->src.pause(rl->src.arg, ms);
    if (rl->ring) arm(rl, ms * 1000);
}

void aq_ratelimit_set_source(aq_ratelimit *rl, const aq_rl_source *src)
{
    rl->src = *src;
    /* Start empty: what the fleet may spend comes from the shared bucket. */
    if (rl->req.limited) rl->req.level = 0;
    if (rl->tok.limited) rl->tok.level = 0;
}

void aq_ratelimit_credit(aq_ratelimit *rl, double requests, double tokens)
{
    rl->asked = false;
    if (rl->req.limited) rl->req.level += requests;
    if (rl->tok.limited) rl->tok.level += tokens;
    serve(rl);
}

size_t aq_ratelimit_waiting(const aq_ratelimit *rl, size_t *users)
{
    if (users) *users = rl->nring;
    return rl->nwaiting;
}
