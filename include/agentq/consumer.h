/* consumer.h — the worker's broker side: one thread that owns an AMQP
 * connection, consumes the ingress queue (tasks to route), every lane
 * (tasks to run: one prefetch of concurrency + lookahead shared by all
 * lanes; with quorum queues, a few consumers per lane queue of each
 * priority band, see aq_consumer_running) and the dead-letter queue, and carries out acks, rejects and
 * confirmed publishes that the loop thread asks for.
 *
 * rabbitmq-c has no background thread and its calls block, so they stay
 * off the event loop: the loop talks to this thread through mailboxes, and
 * the thread calls into the library at least every heartbeat/2 so
 * heartbeats flow. A lost connection is re-established with backoff and
 * jitter; deliveries of the lost connection are void (the broker redelivers
 * them), so acks for them are dropped, and publishes not yet confirmed are
 * reported as failed. */
#ifndef AGENTQ_CONSUMER_H
#define AGENTQ_CONSUMER_H

#include "agentq/broker.h"
#include "agentq/config.h"

struct event_base;
typedef struct aq_consumer aq_consumer;

/* Deliveries are aq_delivery (broker.h): `tag` is set to an opaque value
 * to pass back to ack/reject, `source` to the queue it came from. */

typedef struct aq_consumer_callbacks {
    /* A delivery; takes ownership of d. */
    void (*on_delivery)(aq_delivery *d, void *arg);
    /* A publish's outcome: ok = confirmed by the broker. */
    void (*on_published)(void *cookie, bool ok, void *arg);
    /* Connected (true) or lost (false). */
    void (*on_state)(bool connected, void *arg);
    void *arg;
} aq_consumer_callbacks;

/* Starts the thread; it connects in the background and keeps trying.
 * `cfg` is borrowed and must outlive the consumer. `consume_dead` also
 * consumes the dead-letter queue. Callbacks run on `base`'s loop. */
aq_consumer *aq_consumer_new(const aq_config *cfg, struct event_base *base,
                             const aq_consumer_callbacks *cb, bool consume_dead,
                             char *err, size_t errlen);

/* Stops the thread (after sending what was asked), closes the connection
 * and frees. Unacked deliveries go back to the queue by the broker. */
void aq_consumer_free(aq_consumer *c);

/* Thread-safe requests; they are carried out in order. */
void aq_consumer_ack(aq_consumer *c, uint64_t tag);
void aq_consumer_reject(aq_consumer *c, uint64_t tag, bool requeue);
/* Copies msg; on_published(cookie, ...) reports the confirm. */
void aq_consumer_publish(aq_consumer *c, const aq_publish *msg, void *cookie);
/* Stops consuming the task queue (drain); deliveries already received are
 * still handed over. */
void aq_consumer_stop_consuming(aq_consumer *c);

/* Stops taking deliveries from lane `lane` (paused) or takes them again:
 * while every held delivery of a lane's users waits on a cap, taking more
 * of them would only fill the prefetch that other users' tasks need. A
 * reconnect consumes every lane again. */
void aq_consumer_pause_lane(aq_consumer *c, int lane, bool paused);

/* A lane delivery's session started (true) or ended (false): with quorum
 * queues, which take no prefetch shared by a channel, a lane queue gets
 * a consumer more as its sessions fill the ones it has. No-op with
 * classic queues (one prefetch shared by every lane). */
void aq_consumer_running(aq_consumer *c, const aq_delivery *d, bool started);

bool aq_consumer_connected(const aq_consumer *c);

/* True if `tag` belongs to the connection deliveries come from now (an
 * ack for it can still reach the broker); false for a delivery of a lost
 * connection, which the broker has put back in the queue. Loop thread. */
bool aq_consumer_delivery_current(const aq_consumer *c, uint64_t tag);

#endif
