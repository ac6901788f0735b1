/* fleetlimit.h — the fleet-wide LLM rate limit (limits.mode = "fleet").
 *
 * The whole fleet shares two token buckets per provider+model in
 * agentq.rate_limits (requests/min and tokens/min, refilled by the
 * database's clock in agentq.take_tokens). Each worker leases small
 * batches — about a tenth of a second's worth — when its local pool runs
 * dry, and credits them to it (ratelimit.h's source mode), so the fleet
 * holds the provider's limit however many replicas run. A 429 or a reset
 * header pauses the shared buckets for every worker (agentq.pause_bucket,
 * whose NOTIFY on agentq_limits pauses every worker's pool at once, even
 * one holding leased credit). What the provider's headers say is left
 * clamps the shared bucket (agentq.clamp_bucket), and a lower limit it
 * reports redefines it. A lease a worker has not spent when it stops is
 * lost to the fleet: at most a tenth of a second's worth.
 *
 * One thread with its own PostgreSQL connection does the leasing, so the
 * loop never waits on the database; while the database is away, sessions
 * wait for grants (the limit is never exceeded by guessing). */
#ifndef AGENTQ_FLEETLIMIT_H
#define AGENTQ_FLEETLIMIT_H

#include "agentq/common.h"
#include "agentq/ratelimit.h"

struct event_base;
typedef struct aq_fleetlimit aq_fleetlimit;

typedef struct aq_fleetlimit_config {
    const char *dsn;     /* copied */
    const char *bucket;  /* name prefix: "<bucket>:requests", "<bucket>:tokens" */
    int64_t rpm, tpm;    /* the fleet's limits; 0 = none */
    int pool;            /* the pool of the limiter it credits */
} aq_fleetlimit_config;

/* Starts leasing for pool cfg->pool of `rl` (borrowed; outlives this),
 * which it switches to credit mode. Returns NULL and fills err if the
 * thread cannot start. */
aq_fleetlimit *aq_fleetlimit_new(const aq_fleetlimit_config *cfg, aq_ratelimit *rl, struct event_base *base,
                                 char *err, size_t errlen);
/* The provider reported lower limits: the shared buckets take them (every
 * worker's next lease follows). */
void aq_fleetlimit_set_limits(aq_fleetlimit *f, int64_t rpm, int64_t tpm);

/* The provider said this much is left (< 0: not said): the shared buckets
 * hold no more. */
void aq_fleetlimit_clamp(aq_fleetlimit *f, double requests, double tokens);

/* Stops the thread and frees. */
void aq_fleetlimit_free(aq_fleetlimit *f);

#endif
