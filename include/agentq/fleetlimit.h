/* fleetlimit.h — the fleet-wide LLM rate limit (limits.mode = "fleet").
 *
 * The whole fleet shares two token buckets in agentq.rate_limits
 * (requests/min and tokens/min, refilled by the database's clock in
 * agentq.take_tokens). Each worker leases small batches — about a tenth
 * of a second's worth — when its local limiter runs dry, and credits them
 * to it (ratelimit.h's source mode), so the fleet holds the provider's
 * limit however many replicas run. A 429 pauses the shared buckets for
 * every worker (agentq.pause_bucket). A lease a worker has not spent when
 * it stops is lost to the fleet: at most a tenth of a second's worth.
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
} aq_fleetlimit_config;

/* Starts leasing for `rl` (borrowed; outlives this), which it switches to
 * credit mode. Returns NULL and fills err if the thread cannot start. */
aq_fleetlimit *aq_fleetlimit_new(const aq_fleetlimit_config *cfg, aq_ratelimit *rl, struct event_base *base,
                                 char *err, size_t errlen);
/* Stops the thread and frees. */
void aq_fleetlimit_free(aq_fleetlimit *f);

#endif
