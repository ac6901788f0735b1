/* broker.h — a blocking AMQP 0-9-1 client over rabbitmq-c: connect, declare
 * agentq's topology, publish with publisher confirms, read queue depths.
 *
 * Used directly by agentq-producer and agentqctl, and by the worker's
 * consumer thread (consumer.h), which adds the consuming side. Not
 * thread-safe: one thread owns a broker at a time. Channel 1 carries
 * declarations and consuming, channel 2 publishing in confirm mode. */
#ifndef AGENTQ_BROKER_H
#define AGENTQ_BROKER_H

#include "agentq/common.h"
#include "agentq/config.h"
#include <jansson.h>

typedef struct aq_broker aq_broker;

#define AQ_BROKER_CH_MAIN 1
#define AQ_BROKER_CH_PUBLISH 2

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

/* Connects, logs in and opens both channels (the publish channel in confirm
 * mode). `timeout_ms` bounds connecting and each blocking call. Returns
 * NULL and fills err (with the URL's password masked) on failure. Caller
 * frees with aq_broker_free(). */
aq_broker *aq_broker_connect(const char *url, int heartbeat, int timeout_ms,
                             char *err, size_t errlen);
void aq_broker_free(aq_broker *b);

/* Declares exchanges, the task queue, the retry tiers and the dead-letter
 * queue exactly as design.md's topology says. Idempotent. */
int aq_broker_declare(aq_broker *b, const aq_config *cfg, char *err, size_t errlen) AQ_MUSTCHECK;

/* Name of the retry queue for a delay: prefix + "5s", "30s", "2h", "500ms". */
void aq_broker_retry_queue(const aq_config *cfg, long delay_ms, char *buf, size_t len);

/* Publishes on the confirm channel; returns the message's confirm sequence
 * number (> 0) or a negative AQ_E* code. Does not wait for the confirm. */
int64_t aq_broker_publish(aq_broker *b, const aq_publish *msg, char *err, size_t errlen);

/* Waits until every message published so far is confirmed. Returns 0, or
 * AQ_EIO if the broker nacked one (*nacked counts them) or the connection
 * failed, or AQ_ETIMEDOUT. Frames for channel 1 met meanwhile are
 * dropped: not for use while consuming. */
int aq_broker_wait_confirms(aq_broker *b, int timeout_ms, int64_t *nacked,
                            char *err, size_t errlen) AQ_MUSTCHECK;

/* Unconfirmed publishes. */
int64_t aq_broker_unconfirmed(const aq_broker *b);

/* Message and consumer counts of `queue` (passive declare). */
int aq_broker_queue_depth(aq_broker *b, const char *queue, int64_t *messages,
                          int64_t *consumers, char *err, size_t errlen) AQ_MUSTCHECK;

/* The rabbitmq-c connection, for consumer.c. Borrowed. */
void *aq_broker_conn(aq_broker *b);

/* Records confirms from a basic.ack/nack frame on the publish channel:
 * every sequence number up to `tag` (multiple) or `tag` alone. Returns how
 * many were newly confirmed. For consumer.c, which reads the frames. */
int64_t aq_broker_note_confirm(aq_broker *b, uint64_t tag, bool multiple, bool ack);

/* AMQP field tables <-> JSON objects (x-death and our own headers).
 * aq_broker_table_to_json returns a new reference. */
json_t *aq_broker_table_to_json(const void *amqp_table);

#endif
