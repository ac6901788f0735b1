/* broker.h — a blocking AMQP 0-9-1 client over rabbitmq-c: connect, declare
 * agentq's topology, publish with publisher confirms, consume, ack and
 * reject, read queue depths. The one owner of an AMQP connection: nothing
 * else includes rabbitmq-c.
 *
 * Used directly by agentq-producer and agentqctl, and by the worker's
 * consumer thread (consumer.h), which drives aq_broker_pump(). Not
 * thread-safe: one thread owns a broker at a time. Channel 1 carries
 * declarations and consuming, channel 2 publishing in confirm mode; other
 * channels are opened by aq_broker_consume().
 *
 * Publisher confirms are tracked here, once: every publish gets a
 * sequence number and may carry a cookie; whichever verb reads the
 * broker's ack or nack (aq_broker_pump, aq_broker_wait_confirms) settles
 * it and hands the cookie to the `confirmed` event. Freeing the broker
 * settles what is still unconfirmed as not confirmed. */
#ifndef AGENTQ_BROKER_H
#define AGENTQ_BROKER_H

#include "agentq/common.h"
#include "agentq/config.h"
#include <jansson.h>

typedef struct aq_broker aq_broker;

#define AQ_BROKER_CH_MAIN 1
#define AQ_BROKER_CH_PUBLISH 2

/* Which queue a delivery came from: a lane (a task to run), the dead-letter
 * queue, or the ingress queue producers publish to (a task to route). */
typedef enum { AQ_FROM_TASKS, AQ_FROM_DEAD, AQ_FROM_INGRESS } aq_delivery_source;

/* One message received from a consumed queue. Owned by the receiver; free
 * with aq_delivery_free(). */
typedef struct aq_delivery {
    uint64_t tag;            /* set by the receiver (the broker leaves 0) */
    aq_delivery_source source; /* likewise */
    bool redelivered;
    char *body;              /* NUL-terminated copy; len excludes the NUL */
    size_t len;
    char *message_id;        /* NULL if absent */
    char *expiration;        /* NULL if absent */
    char *routing_key;
    int priority;
    int64_t timestamp;       /* seconds; 0 if absent */
    json_t *headers;         /* object (may be empty); owned */
} aq_delivery;

void aq_delivery_free(aq_delivery *d);

/* What the broker hands back as it reads frames. Called on the owning
 * thread, from inside the verbs that read (and aq_broker_free), which is
 * why a callback must not call into the same broker. */
typedef struct aq_broker_events {
    /* A message; the callee owns d. `dtag` is the channel's delivery tag,
     * for aq_broker_ack/aq_broker_reject on the same connection. */
    void (*delivery)(aq_delivery *d, int channel, uint64_t dtag, void *arg);
    /* The outcome of a publish made with a cookie: ack false is a nack,
     * or a connection that went away first. */
    void (*confirmed)(void *cookie, bool ack, void *arg);
    void *arg;
} aq_broker_events;

/* One message to publish. All pointers are borrowed for the call. */
typedef struct aq_publish {
    const char *exchange;
    const char *routing_key;
    const void *body;
    size_t len;
    const char *message_id;  /* NULL: none */
    int priority;            /* 0-9 */
    const char *expiration;  /* per-message TTL in ms as text; NULL: none */
    int64_t timestamp;       /* seconds since the epoch; 0: none */
    const json_t *headers;   /* object of string/integer/real/bool/object values; NULL: none */
} aq_publish;

/* Connects to a node of cfg->amqp_url (a list of a cluster's nodes: the
 * one that took the process's last connection first, then the others in
 * turn), logs in and opens both channels (the
 * publish channel in confirm mode). An amqps:// URL connects over TLS with
 * the amqp.ca_file, amqp.cert_file / amqp.key_file and amqp.verify_peer
 * keys (verify_peer checks both the chain and that the certificate names
 * the URL's host). `cfg` is borrowed for the call only. `timeout_ms` bounds
 * connecting (TCP and the TLS handshake together) and each blocking call.
 * Returns NULL and fills err (with the URL's password masked; naming the
 * host or the file at fault for a TLS failure) on failure. Caller frees
 * with aq_broker_free(). */
aq_broker *aq_broker_connect(const aq_config *cfg, int heartbeat, int timeout_ms,
                             char *err, size_t errlen);
void aq_broker_free(aq_broker *b);

/* Declares exchanges, the task queue, the retry tiers and the dead-letter
 * queue exactly as design.md's topology says. Idempotent. */
int aq_broker_declare(aq_broker *b, const aq_config *cfg, char *err, size_t errlen) AQ_MUSTCHECK;

/* Name of the retry queue for a delay: prefix + "5s", "30s", "2h", "500ms". */
void aq_broker_retry_queue(const aq_config *cfg, long delay_ms, char *buf, size_t len);

/* Name of lane queue `lane` (0 .. amqp.lanes - 1) of priority band `band`
 * (0 .. aq_config_bands() - 1): the prefix + the number for classic
 * queues, which are priority queues; + ".b" + the band for quorum ones. */
void aq_broker_lane_queue(const aq_config *cfg, int lane, int band, char *buf, size_t len);

/* The lane of a lane queue's name (and its band in *band), or -1 if the
 * name is not one of this configuration's lane queues. */
int aq_broker_lane_of(const aq_config *cfg, const char *queue, int *band);

/* Where deliveries and confirms go (copied; NULL: nowhere). */
void aq_broker_set_events(aq_broker *b, const aq_broker_events *ev);

/* Publishes on the confirm channel; `cookie` (may be NULL) comes back with
 * its confirm. Returns the message's confirm sequence number (> 0) or a
 * negative AQ_E* code (the message is not tracked then). Does not wait. */
int64_t aq_broker_publish(aq_broker *b, const aq_publish *msg, void *cookie, char *err,
                          size_t errlen);

/* Waits until every message published so far is confirmed, settling each
 * (the `confirmed` event). Returns 0, or AQ_EIO if the broker nacked one
 * (*nacked counts them since connect) or the connection failed, or
 * AQ_ETIMEDOUT. Deliveries met meanwhile are dropped (never acked, so the
 * broker redelivers them): for a producer, or a consumer shutting down. */
int aq_broker_wait_confirms(aq_broker *b, int timeout_ms, int64_t *nacked,
                            char *err, size_t errlen) AQ_MUSTCHECK;

/* Consumes `queue` on `channel` (opened if it is not 1 or 2) with a
 * prefetch of `prefetch` unacked deliveries. Returns 0 or AQ_EIO. */
int aq_broker_consume(aq_broker *b, int channel, const char *queue, int prefetch, char *err,
                      size_t errlen) AQ_MUSTCHECK;

/* Consumes each of `n` queues on `channel` (opened if need be) under one
 * prefetch of `prefetch` unacked deliveries shared by all of them: as a
 * slot frees, RabbitMQ offers it to the queues with messages in random
 * order, so each non-empty queue gets an equal share. Returns 0 or AQ_EIO. */
int aq_broker_consume_shared(aq_broker *b, int channel, const char *const *queues, size_t n, int prefetch,
                             char *err, size_t errlen) AQ_MUSTCHECK;

/* One queue of a shared-prefetch channel: stop consuming it (deliveries
 * on their way still arrive; unacked ones stay unacked), consume it again
 * under the channel's prefetch, or ask whether it is consumed. */
void aq_broker_cancel_queue(aq_broker *b, int channel, const char *queue);
int aq_broker_add_queue(aq_broker *b, int channel, const char *queue, char *err, size_t errlen) AQ_MUSTCHECK;
bool aq_broker_consuming(aq_broker *b, int channel, const char *queue);

/* One consumer more of `queue` on `channel`, under the channel's qos, and
 * how many consumers of it the channel has. aq_broker_cancel_queue stops
 * one of them. */
int aq_broker_add_consumer(aq_broker *b, int channel, const char *queue, char *err, size_t errlen) AQ_MUSTCHECK;
int aq_broker_consumers(aq_broker *b, int channel, const char *queue);

/* Consumes each of `n` queues on `channel` (opened if need be) with a
 * prefetch of `prefetch` unacked deliveries per consumer: what quorum
 * queues take (they refuse a prefetch shared by a channel). */
int aq_broker_consume_each(aq_broker *b, int channel, const char *const *queues, size_t n, int prefetch,
                           char *err, size_t errlen) AQ_MUSTCHECK;

/* Stops every consumer on `channel` (no-op when not consuming there). */
void aq_broker_cancel_consume(aq_broker *b, int channel);

/* Acks or rejects one delivery of `channel`. Returns 0 or AQ_EIO. A tag
 * settled already is skipped (acking it again would close the channel). */
int aq_broker_ack(aq_broker *b, int channel, uint64_t dtag);
int aq_broker_reject(aq_broker *b, int channel, uint64_t dtag, bool requeue);

/* Acks `n` deliveries of `channel` in as few frames as it can: the broker
 * remembers which deliveries of the channel are still unsettled, so the
 * ones that complete the settled run from the oldest go as one ack with
 * `multiple`, and the rest (an older delivery is still held or running)
 * one frame each. Returns 0 or AQ_EIO. */
int aq_broker_ack_many(aq_broker *b, int channel, const uint64_t *dtags, size_t n);

/* Deliveries acked, and the ack frames that carried them, since connect. */
void aq_broker_ack_stats(const aq_broker *b, uint64_t *acked, uint64_t *frames);

/* Reads every frame that is ready without waiting and hands deliveries
 * and confirms to the events. Returns 0, or AQ_EIO when the connection
 * failed or the broker closed it or cancelled a consumer (err says why):
 * the caller frees the broker and connects again. */
int aq_broker_pump(aq_broker *b, char *err, size_t errlen) AQ_MUSTCHECK;

/* The socket to poll for input, and whether frames are already buffered
 * (a poll on the socket would not wake for those). */
int aq_broker_fd(const aq_broker *b);
bool aq_broker_buffered(const aq_broker *b);

/* Unconfirmed publishes. */
int64_t aq_broker_unconfirmed(const aq_broker *b);

/* Message and consumer counts of `queue` (passive declare). */
int aq_broker_queue_depth(aq_broker *b, const char *queue, int64_t *messages,
                          int64_t *consumers, char *err, size_t errlen) AQ_MUSTCHECK;

/* Settles confirms as a basic.ack/nack frame on the publish channel says:
 * every sequence number up to `tag` (multiple) or `tag` alone; confirms
 * may come out of order. Returns how many were newly settled. The verbs
 * that read frames call it; public for tests. */
int64_t aq_broker_note_confirm(aq_broker *b, uint64_t tag, bool multiple, bool ack);

/* AMQP field tables <-> JSON objects (x-death and our own headers).
 * aq_broker_table_to_json returns a new reference. */
json_t *aq_broker_table_to_json(const void *amqp_table);

#endif
