/* consumer.c — the worker's AMQP thread (see consumer.h).
 *
 * Owns: the thread, its aq_broker connection (broker.c speaks AMQP and
 * tracks the publisher confirms; this file never touches rabbitmq-c) and
 * the ops queue from the loop. Does not own: what a delivery means (the
 * worker decides) or the loop (events reach it through a mailbox).
 *
 * Delivery tags handed out carry the connection generation and channel, so
 * an ack meant for a connection that has since been lost is recognised and
 * dropped instead of acking an unrelated message on the new connection. */
#include "agentq/consumer.h"
#include "agentq/log.h"
#include "agentq/mailbox.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define CH_LANES AQ_BROKER_CH_MAIN
#define CH_DEAD 3
#define CH_INGRESS 4
#define TAG_BITS 44
#define TAG_MASK ((UINT64_C(1) << TAG_BITS) - 1)

typedef enum {
    OP_ACK,
    OP_REJECT,
    OP_PUBLISH,
    OP_STOP_CONSUMING,
    OP_PAUSE_LANE,
    OP_RESUME_LANE,
    OP_RUNNING,
    OP_QUIT
} op_kind;

typedef struct op {
    op_kind kind;
    uint64_t tag;
    bool requeue;        /* OP_REJECT; OP_RUNNING: started (true) or done */
    int lane;            /* OP_PAUSE_LANE, OP_RESUME_LANE; OP_RUNNING: the lane queue's index */
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
    /* Quorum queues take no prefetch shared by a channel's consumers,
     * only one per consumer. So each lane queue (lanes x priority bands)
     * has consumers of `per_consumer` deliveries each, one more than its
     * running sessions fill: a worker holds a few unstarted deliveries
     * of each busy queue (and starts the highest band's first), and a
     * queue whose sessions fill the worker's slots gets more consumers as
     * they start, so one user alone can still fill them all. */
    int nqueues;            /* lanes x bands; 0 with classic queues */
    int per_consumer;
    int *running;           /* per lane queue: sessions of this connection */
    bool *dirty;            /* its consumers are to be counted again */
    bool *lane_paused;      /* per lane */
    unsigned backoff_ms;
    unsigned rng;

    atomic_bool connected; /* read by the loop thread; advisory */
};

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

static uint64_t make_tag(aq_consumer *c, int channel, uint64_t dtag)
{
    return ((uint64_t)c->gen << 48) | ((uint64_t)channel << TAG_BITS) | (dtag & TAG_MASK);
}

/* Broker events, on this thread: to the loop. */
static void on_broker_delivery(aq_delivery *d, int channel, uint64_t dtag, void *arg)
{
    aq_consumer *c = arg;
    d->tag = make_tag(c, channel, dtag);
    d->source = channel == CH_DEAD ? AQ_FROM_DEAD : channel == CH_INGRESS ? AQ_FROM_INGRESS : AQ_FROM_TASKS;
    /* d->routing_key names the lane queue it came from (the default
     * exchange routes by queue name). */
    emit(c, EV_DELIVERY, d, NULL, true);
}

static void on_broker_confirmed(void *cookie, bool ack, void *arg)
{
    emit(arg, EV_PUBLISHED, NULL, cookie, ack);
}

/* Freeing the broker reports every publish still unconfirmed as failed:
 * after a lost connection nobody will confirm them. */
static void disconnect(aq_consumer *c, const char *why)
{
    if (!c->b) return;
    aq_log(AQ_LOG_WARN, "broker connection lost: %s", why);
    aq_broker_free(c->b);
    c->b = NULL;
    c->consuming = false;
    atomic_store(&c->connected, false);
    emit(c, EV_STATE, NULL, NULL, false);
}

static void lane_queue_name(const aq_config *cfg, int q, char *buf, size_t len)
{
    int bands = aq_config_bands(cfg);
    aq_broker_lane_queue(cfg, q / bands, q % bands, buf, len);
}

/* Every lane: classic queues under one prefetch shared by the channel
 * (running sessions plus the lookahead); quorum ones one consumer each to
 * start with (see per_consumer). */
static int consume_lanes(aq_consumer *c, aq_broker *b, char *err, size_t errlen)
{
    const aq_config *cfg = c->cfg;
    size_t n = (size_t)cfg->amqp_lanes * (size_t)aq_config_bands(cfg);
    char (*names)[256] = aq_xcalloc(n, sizeof *names);
    const char **queues = aq_xcalloc(n, sizeof *queues);
    for (size_t q = 0; q < n; q++) {
        lane_queue_name(cfg, (int)q, names[q], sizeof names[q]);
        queues[q] = names[q];
    }
    int rc;
    if (c->nqueues) {
        memset(c->running, 0, (size_t)c->nqueues * sizeof *c->running);
        memset(c->dirty, 0, (size_t)c->nqueues * sizeof *c->dirty);
        memset(c->lane_paused, 0, (size_t)cfg->amqp_lanes * sizeof *c->lane_paused);
        rc = aq_broker_consume_each(b, CH_LANES, queues, n, c->per_consumer, err, errlen);
    } else {
        rc = aq_broker_consume_shared(b, CH_LANES, queues, n, aq_config_lane_prefetch(cfg), err, errlen);
    }
    free(queues);
    free(names);
    return rc;
}

/* Gives each quorum lane queue whose running count changed the consumers
 * it now wants: one more than its running sessions fill. */
static void update_consumers(aq_consumer *c)
{
    if (!c->nqueues || !c->b || !c->consuming) return;
    int bands = aq_config_bands(c->cfg);
    for (int q = 0; q < c->nqueues && c->b; q++) {
        if (!c->dirty[q]) continue;
        c->dirty[q] = false;
        if (c->lane_paused[q / bands]) continue;
        char name[256], err[256];
        lane_queue_name(c->cfg, q, name, sizeof name);
        int want = c->running[q] / c->per_consumer + 1;
        int have = aq_broker_consumers(c->b, CH_LANES, name);
        for (; have > want; have--) aq_broker_cancel_queue(c->b, CH_LANES, name);
        for (; have < want; have++) {
            if (aq_broker_add_consumer(c->b, CH_LANES, name, err, sizeof err) != AQ_OK) {
                disconnect(c, err);
                return;
            }
        }
    }
}

static int try_connect(aq_consumer *c)
{
    char err[512];
    const aq_config *cfg = c->cfg;
    aq_broker *b = aq_broker_connect(cfg, cfg->amqp_heartbeat, 10000, err, sizeof err);
    if (!b) goto fail;
    aq_broker_events ev = {on_broker_delivery, on_broker_confirmed, c};
    aq_broker_set_events(b, &ev);
    if (aq_broker_declare(b, cfg, err, sizeof err)) goto fail;
    if (!c->stop_consuming) {
        if (consume_lanes(c, b, err, sizeof err) ||
            aq_broker_consume(b, CH_INGRESS, cfg->amqp_queue, cfg->amqp_route_prefetch, err, sizeof err))
            goto fail;
        c->consuming = true;
    }
    if (c->consume_dead && aq_broker_consume(b, CH_DEAD, cfg->amqp_dead_queue, 64, err, sizeof err)) goto fail;
    c->b = b;
    if (++c->gen == 0) c->gen = 1; /* 0 means "no connection" to the loop */
    c->backoff_ms = 0;
    atomic_store(&c->connected, true);
    if (c->nqueues)
        aq_log(AQ_LOG_INFO, "broker connected; routing %s into %d lanes of %d priority bands (quorum queues),"
               " consuming each with consumers of prefetch %d", cfg->amqp_queue, cfg->amqp_lanes,
               aq_config_bands(cfg), c->per_consumer);
    else
        aq_log(AQ_LOG_INFO, "broker connected; routing %s into %d lanes, consuming them with prefetch %d",
               cfg->amqp_queue, cfg->amqp_lanes, aq_config_lane_prefetch(cfg));
    emit(c, EV_STATE, NULL, NULL, true);
    return AQ_OK;
fail:
    if (b) aq_broker_free(b);
    if (c->backoff_ms == 0 || c->backoff_ms >= 1000)
        aq_log(AQ_LOG_WARN, "broker not available, retrying: %s", err);
    return AQ_EIO;
}

/* Returns the channel of a tag of the current connection, or 0. */
static int tag_channel(aq_consumer *c, uint64_t tag, uint64_t *dtag)
{
    if ((uint16_t)(tag >> 48) != c->gen) return 0;
    *dtag = tag & TAG_MASK;
    return (int)((tag >> TAG_BITS) & 0xf);
}

/* Acks gathered from one batch of ops, by channel. */
typedef struct acks {
    uint64_t *tags[16];
    size_t n[16], cap[16];
} acks;

static void acks_add(aq_consumer *c, acks *a, uint64_t tag)
{
    uint64_t dtag;
    int ch;
    if (!c->b || !(ch = tag_channel(c, tag, &dtag))) return; /* void: redelivered anyway */
    if (a->n[ch] == a->cap[ch]) {
        a->cap[ch] = a->cap[ch] ? a->cap[ch] * 2 : 64;
        a->tags[ch] = aq_xrealloc(a->tags[ch], a->cap[ch] * sizeof *a->tags[ch]);
    }
    a->tags[ch][a->n[ch]++] = dtag;
}

static void acks_send(aq_consumer *c, acks *a)
{
    for (int ch = 0; ch < 16; ch++) {
        if (a->n[ch] && c->b) (void)aq_broker_ack_many(c->b, ch, a->tags[ch], a->n[ch]);
        free(a->tags[ch]);
    }
}

static void do_op(aq_consumer *c, op *o)
{
    uint64_t dtag;
    int ch;
    switch (o->kind) {
    case OP_ACK:
    case OP_REJECT:
        if (!c->b || !(ch = tag_channel(c, o->tag, &dtag))) break; /* void: redelivered anyway */
        if (o->kind == OP_ACK) (void)aq_broker_ack(c->b, ch, dtag);
        else (void)aq_broker_reject(c->b, ch, dtag, o->requeue);
        break;
    case OP_PUBLISH: {
        if (!c->b) {
            emit(c, EV_PUBLISHED, NULL, o->cookie, false);
            break;
        }
        aq_publish p = {o->exchange, o->routing_key, o->body, o->len, o->message_id, o->priority,
                        o->expiration, o->timestamp, o->headers};
        char err[256];
        if (aq_broker_publish(c->b, &p, o->cookie, err, sizeof err) < 0) {
            emit(c, EV_PUBLISHED, NULL, o->cookie, false); /* not tracked: not published */
            disconnect(c, err);
        }
        break;
    }
    case OP_STOP_CONSUMING:
        c->stop_consuming = true;
        if (c->b && c->consuming) {
            aq_broker_cancel_consume(c->b, CH_INGRESS);
            aq_broker_cancel_consume(c->b, CH_LANES);
            c->consuming = false;
        }
        break;
    case OP_PAUSE_LANE:
    case OP_RESUME_LANE: {
        /* A reconnect consumes every lane again: pauses last one connection. */
        if (!c->b || !c->consuming) break;
        int bands = aq_config_bands(c->cfg);
        if (c->nqueues) c->lane_paused[o->lane] = o->kind == OP_PAUSE_LANE;
        for (int band = 0; band < bands && c->b; band++) {
            char name[256], err[256];
            aq_broker_lane_queue(c->cfg, o->lane, band, name, sizeof name);
            if (o->kind == OP_PAUSE_LANE) {
                while (aq_broker_consuming(c->b, CH_LANES, name)) aq_broker_cancel_queue(c->b, CH_LANES, name);
            } else if (c->nqueues) {
                c->dirty[o->lane * bands + band] = true; /* update_consumers adds them */
            } else if (aq_broker_add_queue(c->b, CH_LANES, name, err, sizeof err) != AQ_OK) {
                disconnect(c, err);
            }
        }
        break;
    }
    case OP_RUNNING:
        /* Counts of a lost connection's deliveries went with it. */
        if (!c->b || !tag_channel(c, o->tag, &dtag) || o->lane < 0 || o->lane >= c->nqueues) break;
        c->running[o->lane] += o->requeue ? 1 : -1;
        if (c->running[o->lane] < 0) c->running[o->lane] = 0;
        c->dirty[o->lane] = true;
        break;
    case OP_QUIT: break;
    }
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
        /* Acks of one wake-up go together, per channel, so the broker can
         * send them several to a frame (aq_broker_ack_many). */
        acks pending = {0};
        for (size_t i = 0; i < n; i++) {
            op *o = items[i];
            if (o->kind == OP_QUIT) quit = true;
            if (o->kind == OP_ACK) acks_add(c, &pending, o->tag);
            else do_op(c, o);
            op_free(o);
        }
        acks_send(c, &pending);
        free(items);
        update_consumers(c);
        if (quit || !c->b) continue;

        if (!aq_broker_buffered(c->b)) {
            struct pollfd pf[2] = {{aq_broker_fd(c->b), POLLIN, 0}, {aq_mailbox_fd(c->ops), POLLIN, 0}};
            int hb = c->cfg->amqp_heartbeat;
            poll(pf, 2, hb > 0 && hb * 500 < 1000 ? hb * 500 : 1000);
        }
        char err[256];
        if (aq_broker_pump(c->b, err, sizeof err) != AQ_OK) disconnect(c, err);
    }
    if (c->b) {
        /* Give confirms of the last publishes a moment before closing;
         * each one that comes is reported, the rest fail with the free. */
        int64_t nacked;
        char err[256];
        if (aq_broker_unconfirmed(c->b) && aq_broker_wait_confirms(c->b, 2000, &nacked, err, sizeof err) != AQ_OK)
            aq_log(AQ_LOG_DEBUG, "closing with publishes unconfirmed: %s", err);
        aq_broker_free(c->b);
        c->b = NULL;
    }
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
    if (aq_config_quorum(cfg)) {
        c->nqueues = cfg->amqp_lanes * aq_config_bands(cfg);
        int ahead = aq_config_lane_prefetch(cfg) - cfg->worker_concurrency;
        c->per_consumer = ahead / 8 > 2 ? ahead / 8 : 2;
        c->running = aq_xcalloc((size_t)c->nqueues, sizeof *c->running);
        c->dirty = aq_xcalloc((size_t)c->nqueues, sizeof *c->dirty);
        c->lane_paused = aq_xcalloc((size_t)cfg->amqp_lanes, sizeof *c->lane_paused);
    }
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
    free(c->running);
    free(c->dirty);
    free(c->lane_paused);
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
    free(c->running);
    free(c->dirty);
    free(c->lane_paused);
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

void aq_consumer_pause_lane(aq_consumer *c, int lane, bool paused)
{
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = paused ? OP_PAUSE_LANE : OP_RESUME_LANE;
    o->lane = lane;
    push_op(c, o);
}

void aq_consumer_running(aq_consumer *c, const aq_delivery *d, bool started)
{
    if (!c->nqueues || !d) return; /* classic queues: one shared prefetch */
    int band, lane = aq_broker_lane_of(c->cfg, d->routing_key, &band);
    if (lane < 0) return;
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = OP_RUNNING;
    o->tag = d->tag;
    o->lane = lane * aq_config_bands(c->cfg) + band; /* the lane queue's index */
    o->requeue = started;
    push_op(c, o);
}

void aq_consumer_stop_consuming(aq_consumer *c)
{
    op *o = aq_xcalloc(1, sizeof *o);
    o->kind = OP_STOP_CONSUMING;
    push_op(c, o);
}

bool aq_consumer_connected(const aq_consumer *c) { return atomic_load(&((aq_consumer *)c)->connected); }

bool aq_consumer_delivery_current(const aq_consumer *c, uint64_t tag)
{
    return c->loop_gen && (uint16_t)(tag >> 48) == c->loop_gen;
}
