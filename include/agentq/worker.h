/* worker.h — one agentq worker: turns deliveries into agent sessions and
 * their outcomes into committed rows and acks.
 *
 * Wires consumer (broker thread), store (Postgres thread), the agent
 * engine and its dependencies on one event loop. The delivery contract:
 * a delivery is acked only after its final status row is committed; a
 * redelivered task whose row is final is acked without running; a
 * retryable failure is republished to its retry tier and the original
 * acked after the broker confirms; out of attempts it goes to the
 * dead-letter exchange; rejected and expired messages are recorded in
 * agentq.dead_letters from the dead-letter queue. */
#ifndef AGENTQ_WORKER_H
#define AGENTQ_WORKER_H

#include "agentq/config.h"

struct event_base;
typedef struct aq_worker aq_worker;

typedef struct aq_worker_stats {
    uint64_t received, completed, failed, retried, rejected, dead_recorded, redelivered_final;
    uint64_t duplicates, conflicts, swept;
    uint64_t routed, waited; /* ingress messages moved to lanes; claims told to wait (cap, budget) */
    uint64_t resumed;     /* sessions that went on from an earlier attempt's committed steps */
    uint64_t waiting;     /* sessions that ended waiting for a person (ask_human) */
    uint64_t handed_over; /* sessions handed to a new delivery near consumer_timeout */
    uint64_t running;
    uint64_t held, held_blocked; /* deliveries waiting for a slot; of those, users at their cap */
    uint64_t lanes_paused;       /* lanes not consumed while their users wait */
    bool broker_connected, db_connected, draining;
} aq_worker_stats;

/* Starts a worker on `base`. `cfg` is borrowed and must outlive it.
 * Connections are made in the background and retried. */
aq_worker *aq_worker_new(const aq_config *cfg, struct event_base *base, char *err, size_t errlen);

/* Stops consuming, lets running sessions finish for worker.drain_seconds,
 * then requeues the rest (status back to queued); when nothing is left the
 * loop is asked to exit. */
void aq_worker_drain(aq_worker *w);

/* Frees the worker (after the loop has exited). */
void aq_worker_free(aq_worker *w);

void aq_worker_stats_get(const aq_worker *w, aq_worker_stats *out);

/* Prometheus text exposition of the worker's metrics; caller frees. */
char *aq_worker_metrics(const aq_worker *w);

/* True when the worker can take work (broker and database connected). */
bool aq_worker_ready(const aq_worker *w);

#endif
