/* consumer.c — the worker's AMQP thread (see consumer.h).
 *
 * Owns: the thread, its aq_broker connection, the ops queue from the loop
 * and the list of publishes awaiting confirms. Does not own: what a
 * delivery means (the worker decides) or the loop (events reach it through
 * a mailbox).
 *
 * Delivery tags handed out carry the connection generation and channel, so
 * an ack meant for a connection that has since been lost is recognised and
 * dropped instead of acking an unrelated message on the new connection. */
#include "agentq/consumer.h"
#include "agentq/log.h"
#include "agentq/mailbox.h"

#include <amqp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define CH_DEAD 3
#define TAG_BITS 44
#define TAG_MASK ((UINT64_C(1) << TAG_BITS) - 1)

typedef enum { OP_ACK, OP_REJECT, OP_PUBLISH, OP_STOP_CONSUMING, OP_QUIT } op_kind;

typedef struct op {
    op_kind kind;
    uint64_t tag;
    bool requeue;
    /* OP_PUBLISH */
    char *exchange, *routing_key, *body, *message_id, *expiration;
    size_t len;
    int priority;
    int64_t timestamp;
    json_t *headers;
    void *cookie;
} op;

typedef enum { EV_DELIVERY, EV_PUBLISHED, EV_STATE } event_kind;

typedef struct loop_event {
    event_kind kind;
    aq_delivery *delivery;
    void *cookie;
    bool ok;
    uint16_t gen;        /* EV_STATE: the connection's generation */
} loop_event;

typedef struct pending_confirm {
    uint64_t seq;
    void *cookie;
} pending_confirm;

struct aq_consumer {
    const aq_config *cfg;
    aq_consumer_callbacks cb;
    bool consume_dead;
    pthread_t thread;
    aq_mailbox *ops;     /* loop -> thread */
    aq_mailbox *events;  /* thread -> loop */

    /* thread-only state */
    aq_broker *b;
    uint16_t gen;
    uint16_t loop_gen;   /* loop thread: the generation deliveries now
                          * come from, 0 while disconnected */
    bool consuming;
    bool stop_consuming;
    amqp_bytes_t consumer_tag;
    pending_confirm *pending;
    size_t npending, cappending;
    unsigned backoff_ms;
    unsigned rng;

    volatile bool connected; /* read by the loop thread; advisory */
};

void aq_delivery_free(aq_delivery *d)
{
    if (!d) return;
    free(d->body);
    free(d->message_id);
    free(d->expiration);
    free(d->routing_key);
    json_decref(d->headers);
    free(d);
}

static void op_free(op *o)
{
    free(o->exchange);
    free(o->routing_key);
    free(o->body);
    free(o->message_id);
    free(o->expiration);
    json_decref(o->headers);
    free(o);
}

static void emit(aq_consumer *c, event_kind kind, aq_delivery *d, void *cookie, bool ok)
{
    loop_event *e = aq_xcalloc(1, sizeof *e);
    e->kind = kind;
    e->delivery = d;
    e->cookie = cookie;
    e->ok = ok;
    e->gen = c->gen;
    aq_mailbox_push(c->events, e);
}

static char *bytes_dup(amqp_bytes_t b)
{
    return aq_xstrndup(b.bytes, b.len);
}

/* Fails every publish awaiting a confirm: after a lost connection nobody
 * will confirm them. */
static void fail_pending(aq_consumer *c)
{
    for (size_t i = 0; i < c->npending; i++) emit(c, EV_PUBLISHED, NULL, c->pending[i].cookie, false);
    c->npending = 0;
}

static void disconnect(aq_consumer *c, const char *why)
{
    if (!c->b) return;
    aq_log(AQ_LOG_WARN, "broker connection lost: %s", why);
    aq_broker_free(c->b);
    c->b = NULL;
    c->consuming = false;
    fail_pending(c);
    c->connected = false;
    emit(c, EV_STATE, NULL, NULL, false);
}

static int try_connect(aq_consumer *c)
{
    char err[512];
    const aq_config *cfg = c->cfg;
    aq_broker *b = aq_broker_connect(cfg->amqp_url, cfg->amqp_heartbeat, 10000, err, sizeof err);
    if (!b) goto fail;
    if (aq_broker_declare(b, cfg, err, sizeof err)) goto fail;
    amqp_connection_state_t conn = aq_broker_conn(b);
    amqp_basic_qos(conn, AQ_BROKER_CH_MAIN, 0, (uint16_t)cfg->worker_concurrency, 0); /* config caps it at 65535 */
    if (amqp_get_rpc_reply(conn).reply_type != AMQP_RESPONSE_NORMAL) {
        snprintf(err, sizeof err, "basic.qos refused");
        goto fail;
    }
    if (!c->stop_consuming) {
        amqp_basic_consume_ok_t *ok = amqp_basic_consume(conn, AQ_BROKER_CH_MAIN, amqp_cstring_bytes(cfg->amqp_queue),
                                                         amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
        if (!ok) {
            snprintf(err, sizeof err, "cannot consume %s", cfg->amqp_queue);
            goto fail;
        }
        amqp_bytes_free(c->consumer_tag);
        c->consumer_tag = amqp_bytes_malloc_dup(ok->consumer_tag);
        c->consuming = true;
    }
    if (c->consume_dead) {
        amqp_channel_open(conn, CH_DEAD);
        amqp_basic_qos(conn, CH_DEAD, 0, 64, 0);
        if (!amqp_basic_consume(conn, CH_DEAD, amqp_cstring_bytes(cfg->amqp_dead_queue), amqp_empty_bytes, 0, 0, 0,
                                amqp_empty_table)) {
            snprintf(err, sizeof err, "cannot consume %s", cfg->amqp_dead_queue);
            goto fail;
        }
    }
    c->b = b;
    if (++c->gen == 0) c->gen = 1; /* 0 means "no connection" to the loop */
    c->backoff_ms = 0;
    c->connected = true;
    aq_log(AQ_LOG_INFO, "broker connected; consuming %s with prefetch %d", cfg->amqp_queue, cfg->worker_concurrency);
    emit(c, EV_STATE, NULL, NULL, true);
    return AQ_OK;
fail:
    if (b) aq_broker_free(b);
    if (c->backoff_ms == 0 || c->backoff_ms >= 1000)
        aq_log(AQ_LOG_WARN, "broker not available, retrying: %s", err);
    return AQ_EIO;
}

static uint64_t make_tag(aq_consumer *c, int channel, uint64_t dtag)
{
    return ((uint64_t)c->gen << 48) | ((uint64_t)channel << TAG_BITS) | (dtag & TAG_MASK);
}

/* Returns the channel of a tag of the current connection, or 0. */
static int tag_channel(aq_consumer *c, uint64_t tag, uint64_t *dtag)
{
    if ((uint16_t)(tag >> 48) != c->gen) return 0;
    *dtag = tag & TAG_MASK;
    return (int)((tag >> TAG_BITS) & 0xf);
}

static void do_op(aq_consumer *c, op *o)
{
    amqp_connection_state_t conn = c->b ? aq_broker_conn(c->b) : NULL;
    uint64_t dtag;
    int ch;
    switch (o->kind) {
    case OP_ACK:
    case OP_REJECT:
        if (!conn || !(ch = tag_channel(c, o->tag, &dtag))) break; /* void: redelivered anyway */
        if (o->kind == OP_ACK) amqp_basic_ack(conn, (amqp_channel_t)ch, dtag, 0);
        else amqp_basic_reject(conn, (amqp_channel_t)ch, dtag, o->requeue);
        break;
    case OP_PUBLISH: {
        if (!conn) {
            emit(c, EV_PUBLISHED, NULL, o->cookie, false);
            break;
        }
        aq_publish p = {o->exchange, o->routing_key, o->body, o->len, o->message_id, o->priority,
                        o->expiration, o->timestamp, o->headers};
        char err[256];
        int64_t seq = aq_broker_publish(c->b, &p, err, sizeof err);
        if (seq < 0) {
            emit(c, EV_PUBLISHED, NULL, o->cookie, false);
            disconnect(c, err);
            break;
        }
        if (c->npending == c->cappending) {
            c->cappending = c->cappending ? c->cappending * 2 : 64;
            c->pending = aq_xrealloc(c->pending, c->cappending * sizeof *c->pending);
        }
        c->pending[c->npending++] = (pending_confirm){(uint64_t)seq, o->cookie};
        break;
    }
    case OP_STOP_CONSUMING:
        c->stop_consuming = true;
        if (conn && c->consuming) {
            amqp_basic_cancel(conn, AQ_BROKER_CH_MAIN, c->consumer_tag);
            c->consuming = false;
        }
        break;
    case OP_QUIT: break;
    }
}

static void confirm(aq_consumer *c, uint64_t tag, bool multiple, bool ok)
{
    size_t keep = 0;
    for (size_t i = 0; i < c->npending; i++) {
        pending_confirm *p = &c->pending[i];
        if (p->seq == tag || (multiple && p->seq < tag)) emit(c, EV_PUBLISHED, NULL, p->cookie, ok);
        else c->pending[keep++] = *p;
    }
    c->npending = keep;
}

static void on_deliver(aq_consumer *c, amqp_channel_t ch, amqp_basic_deliver_t *m)
{
    amqp_connection_state_t conn = aq_broker_conn(c->b);
    uint64_t dtag = m->delivery_tag;
    bool redelivered = m->redelivered;
    char *rk = bytes_dup(m->routing_key);
    amqp_message_t msg;
    amqp_rpc_reply_t r = amqp_read_message(conn, ch, &msg, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        free(rk);
        disconnect(c, "reading a message body failed");
        return;
    }
    aq_delivery *d = aq_xcalloc(1, sizeof *d);
    d->tag = make_tag(c, ch, dtag);
    d->source = ch == CH_DEAD ? AQ_FROM_DEAD : AQ_FROM_TASKS;
    d->redelivered = redelivered;
    d->routing_key = rk;
    d->body = aq_xmalloc(msg.body.len + 1);
    memcpy(d->body, msg.body.bytes, msg.body.len);
    d->body[msg.body.len] = '\0';
    d->len = msg.body.len;
    amqp_basic_properties_t *p = &msg.properties;
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) d->message_id = bytes_dup(p->message_id);
    if (p->_flags & AMQP_BASIC_EXPIRATION_FLAG) d->expiration = bytes_dup(p->expiration);
    if (p->_flags & AMQP_BASIC_PRIORITY_FLAG) d->priority = p->priority;
    if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG) d->timestamp = (int64_t)p->timestamp;
    d->headers = (p->_flags & AMQP_BASIC_HEADERS_FLAG) ? aq_broker_table_to_json(&p->headers) : json_object();
    amqp_destroy_message(&msg);
    emit(c, EV_DELIVERY, d, NULL, true);
}

/* Reads and handles every frame that is ready. Returns false if the
 * connection was lost. */
static bool pump_frames(aq_consumer *c)
{
    for (int i = 0; i < 4096 && c->b; i++) {
        amqp_connection_state_t conn = aq_broker_conn(c->b);
        amqp_frame_t f;
        struct timeval zero = {0, 0};
        int st = amqp_simple_wait_frame_noblock(conn, &f, &zero);
        if (st == AMQP_STATUS_TIMEOUT) break;
        if (st != AMQP_STATUS_OK) {
            disconnect(c, amqp_error_string2(st));
            return false;
        }
        if (f.frame_type != AMQP_FRAME_METHOD) continue;
        switch (f.payload.method.id) {
        case AMQP_BASIC_DELIVER_METHOD:
            on_deliver(c, f.channel, f.payload.method.decoded);
            break;
        case AMQP_BASIC_ACK_METHOD: {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            confirm(c, a->delivery_tag, a->multiple, true);
            break;
        }
        case AMQP_BASIC_NACK_METHOD: {
            amqp_basic_nack_t *a = f.payload.method.decoded;
            confirm(c, a->delivery_tag, a->multiple, false);
            break;
        }
        case AMQP_BASIC_CANCEL_METHOD:
            disconnect(c, "the broker cancelled the consumer (queue deleted?)");
            return false;
        case AMQP_CHANNEL_CLOSE_METHOD:
        case AMQP_CONNECTION_CLOSE_METHOD: {
            amqp_channel_close_t *m = f.payload.method.decoded;
            char why[300];
            snprintf(why, sizeof why, "closed by broker: %u %.*s", m->reply_code, (int)m->reply_text.len,
                     (char *)m->reply_text.bytes);
            disconnect(c, why);
            return false;
        }
        default: break;
        }
    }
    if (c->b) amqp_maybe_release_buffers(aq_broker_conn(c->b));
    return c->b != NULL;
}

static void *thread_main(void *arg)
{
    aq_consumer *c = arg;
    bool quit = false;
    while (!quit) {
        if (!c->b && try_connect(c) != AQ_OK) {
            /* Back off with jitter, but stay responsive to ops (quit). */
            c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : 100;
            if (c->backoff_ms > 5000) c->backoff_ms = 5000;
            unsigned wait = c->backoff_ms / 2 + (unsigned)(rand_r(&c->rng) % (c->backoff_ms / 2 + 1));
            struct pollfd pf = {aq_mailbox_fd(c->ops), POLLIN, 0};
            poll(&pf, 1, (int)wait);
        }
        void **items;
        size_t n = aq_mailbox_take(c->ops, &items);
        for (size_t i = 0; i < n; i++) {
            op *o = items[i];
            if (o->kind == OP_QUIT) quit = true;
            do_op(c, o);
            op_free(o);
        }
        free(items);
        if (quit || !c->b) continue;

        amqp_connection_state_t conn = aq_broker_conn(c->b);
        if (!amqp_frames_enqueued(conn) && !amqp_data_in_buffer(conn)) {
            struct pollfd pf[2] = {{amqp_get_sockfd(conn), POLLIN, 0}, {aq_mailbox_fd(c->ops), POLLIN, 0}};
            int hb = c->cfg->amqp_heartbeat;
            poll(pf, 2, hb > 0 && hb * 500 < 1000 ? hb * 500 : 1000);
        }
        pump_frames(c);
    }
    if (c->b) {
        /* Give confirms of the last publishes a moment before closing. */
        int64_t nacked;
        char err[256];
        if (c->npending && aq_broker_wait_confirms(c->b, 2000, &nacked, err, sizeof err) == AQ_OK) c->npending = 0;
        aq_broker_free(c->b);
        c->b = NULL;
    }
    fail_pending(c);
    return NULL;
}

static void on_event(void *item, void *arg)
{
    aq_consumer *c = arg;
    loop_event *e = item;
    switch (e->kind) {
    case EV_DELIVERY:
        if (c->cb.on_delivery) c->cb.on_delivery(e->delivery, c->cb.arg);
        else aq_delivery_free(e->delivery);
        break;
    case EV_PUBLISHED:
        if (c->cb.on_published) c->cb.on_published(e->cookie, e->ok, c->cb.arg);
        break;
    case EV_STATE:
        c->loop_gen = e->ok ? e->gen : 0;
        if (c->cb.on_state) c->cb.on_state(e->ok, c->cb.arg);
        break;
    }
    free(e);
}

aq_consumer *aq_consumer_new(const aq_config *cfg, struct event_base *base, const aq_consumer_callbacks *cb,
                             bool consume_dead, char *err, size_t errlen)
{
    aq_consumer *c = aq_xcalloc(1, sizeof *c);
    c->cfg = cfg;
    c->cb = *cb;
    c->consume_dead = consume_dead;
    c->rng = (unsigned)aq_now_us();
    c->consumer_tag = amqp_empty_bytes;
    c->ops = aq_mailbox_new();
    c->events = aq_mailbox_new();
    if (!c->ops || !c->events || aq_mailbox_attach(c->events, base, on_event, c) != AQ_OK) {
        aq_seterr(err, errlen, "cannot create the consumer's wake-up descriptors");
        goto fail;
    }
    if (pthread_create(&c->thread, NULL, thread_main, c) != 0) {
        aq_seterr(err, errlen, "cannot start the consumer thread");
        goto fail;
    }
    return c;
fail:
    aq_mailbox_free(c->ops, NULL);
    aq_mailbox_free(c->events, NULL);
    free(c);
    return NULL;
}

static void push_op(aq_consumer *c, op *o) { aq_mailbox_push(c->ops, o); }

void aq_consumer_free(aq_consumer *c)
{
    if (!c) return;
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = OP_QUIT;
    push_op(c, o);
    pthread_join(c->thread, NULL);
    /* Events the loop has not run yet (deliveries, confirms) are freed;
     * their deliveries return to the queue with the connection. */
    void **items;
    size_t n = aq_mailbox_take(c->events, &items);
    for (size_t i = 0; i < n; i++) {
        loop_event *e = items[i];
        if (e->kind == EV_DELIVERY) aq_delivery_free(e->delivery);
        else if (e->kind == EV_PUBLISHED && c->cb.on_published) c->cb.on_published(e->cookie, e->ok, c->cb.arg);
        free(e);
    }
    free(items);
    aq_mailbox_free(c->ops, NULL);    /* the thread ran every op before quitting */
    aq_mailbox_free(c->events, NULL); /* drained above */
    amqp_bytes_free(c->consumer_tag);
    free(c->pending);
    free(c);
}

void aq_consumer_ack(aq_consumer *c, uint64_t tag)
{
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = OP_ACK;
    o->tag = tag;
    push_op(c, o);
}

void aq_consumer_reject(aq_consumer *c, uint64_t tag, bool requeue)
{
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = OP_REJECT;
    o->tag = tag;
    o->requeue = requeue;
    push_op(c, o);
}

void aq_consumer_publish(aq_consumer *c, const aq_publish *msg, void *cookie)
{
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = OP_PUBLISH;
    o->exchange = aq_xstrdup(msg->exchange);
    o->routing_key = aq_xstrdup(msg->routing_key);
    o->body = aq_xmalloc(msg->len + 1);
    memcpy(o->body, msg->body, msg->len);
    o->len = msg->len;
    o->message_id = msg->message_id ? aq_xstrdup(msg->message_id) : NULL;
    o->expiration = msg->expiration ? aq_xstrdup(msg->expiration) : NULL;
    o->priority = msg->priority;
    o->timestamp = msg->timestamp;
    o->headers = msg->headers ? json_deep_copy(msg->headers) : NULL;
    o->cookie = cookie;
    push_op(c, o);
}

void aq_consumer_stop_consuming(aq_consumer *c)
{
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = OP_STOP_CONSUMING;
    push_op(c, o);
}

bool aq_consumer_connected(const aq_consumer *c) { return c->connected; }

bool aq_consumer_delivery_current(const aq_consumer *c, uint64_t tag)
{
    return c->loop_gen && (uint16_t)(tag >> 48) == c->loop_gen;
}
