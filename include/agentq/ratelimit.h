/* ratelimit.h — keeps LLM calls inside the providers' requests/min and
 * tokens/min, and shares the waiting fairly.
 *
 * A limiter holds one or more pools: the capacity of one provider+model
 * (routes of a model, see router.h). Each pool has two token buckets
 * (requests, tokens) that refill continuously at limit/60 per second and
 * hold at most one second's worth (at least one request, or one call's
 * tokens), so no sliding minute ever sees more than the limit plus that
 * second: the fleet spends the limit fully without bursting past it.
 * Token use is estimated when a call starts and corrected with the
 * reported usage when it ends (a bucket may go into debt). A grant names
 * the pool it came from: the first pool that can take the call (in the
 * order they were added), or under weighted routing the one whose share
 * is furthest behind (smooth weighted round robin); a pool paused (a
 * 429), held (its owner's choice: a cooled-down provider, a concurrency
 * cap) or short is passed over, so one waiting queue spends the capacity
 * of every pool.
 *
 * Sessions that must wait are shared between users by deficit round robin
 * (Shreedhar & Varghese) on estimated tokens: each user has a FIFO and a
 * deficit; on its turn a user's deficit grows by a quantum times its
 * weight and its calls are granted, oldest first, while the next one costs
 * no more than the deficit; then the turn passes on. So users share the
 * quota by tokens, not by calls (a user of 50k-token calls gets no more
 * tokens than one of 1k-token calls), a user of weight 3 gets three times
 * the share of one of weight 1 while both wait, and one user's burst of a
 * thousand tasks waits behind everyone else's next turn, not in front of
 * it. A call costs its estimate, but at least tpm/rpm tokens when both
 * limits are set (its share of the requests quota, so a user of tiny calls
 * cannot take all the requests) and at most a minute of tpm (the provider
 * refuses bigger calls anyway). The quantum is the larger of 4096 tokens
 * and one second of tpm: a turn holds the others up for about a second of
 * the quota, and a call bigger than the quantum is granted after a few
 * turns (at most 60), never starved. A user who stops waiting keeps no
 * deficit. With no tokens limit (tpm 0) every call costs one and the
 * quantum is one: round robin by calls, `weight` calls a turn. (rpm and
 * tpm here are the sums over the pools.)
 *
 * All calls are on the loop thread. */
#ifndef AGENTQ_RATELIMIT_H
#define AGENTQ_RATELIMIT_H

#include "agentq/common.h"

/* The least DRR quantum, in tokens (see above). */
#define AQ_RL_QUANTUM_MIN 4096

struct event_base;
typedef struct aq_ratelimit aq_ratelimit;
typedef struct aq_rl_wait aq_rl_wait;
/* A grant: `pool` is the pool it came from. */
typedef void (*aq_rl_cb)(void *arg, int pool);

/* Most pools of one limiter. */
#define AQ_RL_POOLS_MAX 64

/* A limiter with one pool (index 0) of rpm, tpm (0 = unlimited). Free with
 * aq_ratelimit_free(), which drops waiters without calling them. */
aq_ratelimit *aq_ratelimit_new(struct event_base *base, int64_t rpm, int64_t tpm);
void aq_ratelimit_free(aq_ratelimit *rl);

/* Adds a pool of rpm, tpm and routing `weight` (1..1000; the first pool's
 * is 1 until set here: aq_ratelimit_set_weight); returns its index, or
 * AQ_EINVAL past AQ_RL_POOLS_MAX. */
int aq_ratelimit_add_pool(aq_ratelimit *rl, int64_t rpm, int64_t tpm, int weight);
void aq_ratelimit_set_weight(aq_ratelimit *rl, int pool, int weight);
/* true: grants go by the pools' weights; false (the default): to the first
 * pool that can take the call. */
void aq_ratelimit_set_weighted(aq_ratelimit *rl, bool weighted);

/* Takes one request and `tokens` estimated tokens for `user` (borrowed).
 * Returns true if granted now (cb is not called). Otherwise queues the
 * caller, sets *wait, and calls cb(arg, pool) on the loop once granted;
 * cancel with aq_ratelimit_cancel() before then. */
bool aq_ratelimit_acquire(aq_ratelimit *rl, const char *user, int64_t tokens,
                          aq_rl_cb cb, void *arg, aq_rl_wait **wait);
/* The same, for a user of `weight` (1 for acquire(); below 1 counts as 1,
 * above AQ_RL_WEIGHT_MAX as that): while users wait, each gets a share of
 * the quota proportional to its weight. A user's weight is that of its
 * latest acquire and is kept only while it has waiters, so the caller
 * passes it with every call (from the task or its config), and changing
 * it takes effect from the user's next turn. */
#define AQ_RL_WEIGHT_MAX 1000
bool aq_ratelimit_acquire_weighted(aq_ratelimit *rl, const char *user, int weight, int64_t tokens,
                                   aq_rl_cb cb, void *arg, aq_rl_wait **wait);
/* The general form: `avoid` is a bit set of pools (bit i: pool i) the
 * call should not come from — the ones that just failed it — unless no
 * other pool is left unheld; *pool (when not NULL) gets the pool of a
 * grant made now. */
bool aq_ratelimit_acquire_from(aq_ratelimit *rl, const char *user, int weight, int64_t tokens, uint64_t avoid,
                               aq_rl_cb cb, void *arg, aq_rl_wait **wait, int *pool);
/* Removes a queued waiter; its cb is never called. */
void aq_ratelimit_cancel(aq_ratelimit *rl, aq_rl_wait *wait);

/* Corrects `pool`'s token bucket by `delta` (actual - estimated). */
void aq_ratelimit_adjust(aq_ratelimit *rl, int pool, int64_t delta);
/* Pauses `pool`'s grants for `ms` (a 429's Retry-After, a reset header). */
void aq_ratelimit_pause(aq_ratelimit *rl, int pool, int64_t ms);
/* Holds `pool` (no grant comes from it) or releases it. */
void aq_ratelimit_hold(aq_ratelimit *rl, int pool, bool held);
/* What the provider said is left: `pool`'s buckets hold no more than
 * `requests` and `tokens` (< 0: that bucket is left alone). */
void aq_ratelimit_clamp(aq_ratelimit *rl, int pool, double requests, double tokens);
/* New limits for `pool` (the provider's real ones, when lower than the
 * configuration's); 0 = unlimited. */
void aq_ratelimit_set_limits(aq_ratelimit *rl, int pool, int64_t rpm, int64_t tpm);
/* `pool`'s limits now. */
void aq_ratelimit_limits(const aq_ratelimit *rl, int pool, int64_t *rpm, int64_t *tpm);

/* Where tokens come from instead of the clock: the fleet-wide buckets in
 * Postgres (fleetlimit.h). need(arg, requests, tokens) is called on the
 * loop when a waiter cannot be served, saying which bucket is short, once
 * until the next credit; pause(arg, ms) when a 429 pauses grants.
 * Borrowed; must outlive the limiter. */
typedef struct aq_rl_source {
    void (*need)(void *arg, bool requests, bool tokens);
    void (*pause)(void *arg, int64_t ms);
    void *arg;
} aq_rl_source;

/* Switches `pool` to credits from `src`: its buckets no longer refill
 * with time, and hold what aq_ratelimit_credit() adds (at least one
 * second's worth may be held). */
void aq_ratelimit_set_source(aq_ratelimit *rl, int pool, const aq_rl_source *src);

/* Adds leased requests and tokens to `pool`, then serves waiters. */
void aq_ratelimit_credit(aq_ratelimit *rl, int pool, double requests, double tokens);

/* Number of waiting sessions, and of users with waiters. */
size_t aq_ratelimit_waiting(const aq_ratelimit *rl, size_t *users);

/* Number of per-user entries the limiter holds. An entry exists only while
 * its user has a waiter (it is freed when the last one is granted or
 * cancelled), so this equals the users count of aq_ratelimit_waiting() and
 * stays bounded by the users waiting at once, not by every user seen. */
size_t aq_ratelimit_users(const aq_ratelimit *rl);

#endif
