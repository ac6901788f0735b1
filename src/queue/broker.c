/* broker.c — blocking rabbitmq-c client (see broker.h). Owns one AMQP
 * connection, its channels, its consumers and its publisher-confirm
 * tracker; knows agentq's topology. The only file that includes
 * rabbitmq-c, so the one place TLS to the broker is set up (amqps://,
 * rabbitmq-c's OpenSSL socket, from the amqp.* TLS keys). */
#include "agentq/broker.h"
#include "agentq/log.h"

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>

#define BROKER_MAX_CHANNELS 8

/* A publish waiting for its confirm. */
typedef struct unconfirmed {
    uint64_t seq;
    void *cookie;
    bool settled;
} unconfirmed;

/* The deliveries of one channel not settled yet, so that acks can go
 * several to a frame: RabbitMQ numbers a channel's deliveries 1, 2, 3...,
 * and `multiple` acks every unsettled one up to a tag. done[i] says tag
 * lo + i is settled (acked or rejected); tags below lo all are. */
typedef struct unsettled {
    uint64_t lo, hi;       /* lowest tag not known settled; highest handed out */
    unsigned char *done;
    size_t cap;
} unsettled;

/* One basic.consume: its tag, and the queue it consumes. */
typedef struct consumer_ref {
    amqp_bytes_t tag;
    char *queue;
} consumer_ref;

struct aq_broker {
    amqp_connection_state_t conn;
    bool opened;           /* the socket was opened: there is something to close */
    int timeout_ms;
    aq_broker_events ev;
    /* The confirm tracker: publishes in sequence order; [head, n) may
     * still hold unsettled ones (confirms can come out of order). */
    uint64_t next_seq;     /* confirm sequence of the next publish */
    unconfirmed *pend;
    size_t head, n, cap;
    int64_t outstanding;   /* unsettled entries */
    int64_t nacked;
    /* Consumers by channel: a channel may consume several queues (the
     * lanes) under one prefetch. */
    consumer_ref *consumers[BROKER_MAX_CHANNELS];
    size_t nconsumers[BROKER_MAX_CHANNELS];
    unsettled open_tags[BROKER_MAX_CHANNELS];
    uint64_t acked, ack_frames;
    bool channel_open[BROKER_MAX_CHANNELS];
};

static const char *reply_text(amqp_rpc_reply_t r, char *buf, size_t len)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return "ok";
    case AMQP_RESPONSE_NONE: return "missing reply";
    case AMQP_RESPONSE_LIBRARY_EXCEPTION: return amqp_error_string2(r.library_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            snprintf(buf, len, "connection closed by broker: %u %.*s", m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            snprintf(buf, len, "channel closed by broker: %u %.*s", m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
        } else {
            snprintf(buf, len, "broker error (method 0x%08x)", r.reply.id);
        }
        return buf;
    }
    return "unknown reply";
}

/* Fills err from the last RPC reply; returns AQ_OK if it was normal. */
static int check_reply(aq_broker *b, const char *what, char *err, size_t errlen)
{
    char buf[256];
    amqp_rpc_reply_t r = amqp_get_rpc_reply(b->conn);
    if (r.reply_type == AMQP_RESPONSE_NORMAL) return AQ_OK;
    aq_seterr(err, errlen, "%s: %s", what, reply_text(r, buf, sizeof buf));
    return AQ_EIO;
}

/* The TLS half of connecting: a rabbitmq-c SSL socket set up from the
 * amqp.* TLS keys. Verification is one switch (amqp.verify_peer) for both
 * of rabbitmq-c's checks: a hostname checked against a certificate nobody
 * verified proves nothing. rabbitmq-c 0.11 never loads OpenSSL's default
 * CA paths, so without amqp.ca_file nothing would verify; aq_config_check
 * refuses that combination, and this says so again for callers that did
 * not check. Returns NULL with err filled. */
static amqp_socket_t *tls_socket(amqp_connection_state_t conn, const aq_config *cfg, char *err, size_t errlen)
{
    bool verify = cfg->amqp_verify_peer != 0;
    if (verify && !*cfg->amqp_ca_file) {
        aq_seterr(err, errlen, "amqps with amqp.verify_peer = 1 needs amqp.ca_file (rabbitmq-c does not use the"
                               " system CA store)");
        return NULL;
    }
    amqp_socket_t *s = amqp_ssl_socket_new(conn);
    if (!s) {
        aq_seterr(err, errlen, "cannot create a TLS socket (OpenSSL failed to initialise)");
        return NULL;
    }
    amqp_ssl_socket_set_verify_peer(s, verify);
    amqp_ssl_socket_set_verify_hostname(s, verify);
    if (amqp_ssl_socket_set_ssl_versions(s, AMQP_TLSv1_2, AMQP_TLSvLATEST) != AMQP_STATUS_OK) {
        aq_seterr(err, errlen, "cannot require TLS 1.2 or later on the broker connection");
        return NULL;
    }
    if (*cfg->amqp_ca_file && amqp_ssl_socket_set_cacert(s, cfg->amqp_ca_file) != AMQP_STATUS_OK) {
        aq_seterr(err, errlen, "amqp.ca_file '%s': OpenSSL cannot load it as a PEM CA bundle", cfg->amqp_ca_file);
        return NULL;
    }
    if (*cfg->amqp_cert_file &&
        amqp_ssl_socket_set_key(s, cfg->amqp_cert_file, cfg->amqp_key_file) != AMQP_STATUS_OK) {
        aq_seterr(err, errlen,
                  "amqp.cert_file '%s' / amqp.key_file '%s': OpenSSL cannot load them as a PEM certificate"
                  " and its matching unencrypted private key",
                  cfg->amqp_cert_file, cfg->amqp_key_file);
        return NULL;
    }
    return s;
}

static bool ip_literal(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* Why opening the socket failed, in the words an operator needs: the
 * library's TLS statuses name no host and no file. */
static void open_failed(int st, const struct amqp_connection_info *ci, const aq_config *cfg, const char *shown,
                        int timeout_ms, char *err, size_t errlen)
{
    switch (st) {
    case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED:
        aq_seterr(err, errlen,
                  "cannot connect to broker %s: TLS: the broker's certificate is not valid for host '%s'"
                  " (hostname verification failed: no DNS name of the certificate matches it%s)",
                  shown, ci->host, ip_literal(ci->host) ? "; rabbitmq-c matches DNS names only, so the URL must name"
                                                          " the host by the name its certificate gives"
                                                        : "");
        return;
    case AMQP_STATUS_SSL_PEER_VERIFY_FAILED:
        aq_seterr(err, errlen,
                  "cannot connect to broker %s: TLS: the certificate of host '%s' was not verified: it is not"
                  " signed by a CA in amqp.ca_file '%s', or it has expired",
                  shown, ci->host, cfg->amqp_ca_file);
        return;
    case AMQP_STATUS_SSL_CONNECTION_FAILED:
    case AMQP_STATUS_SSL_ERROR:
        aq_seterr(err, errlen,
                  "cannot connect to broker %s: TLS handshake with %s:%d failed (%s; is the port a TLS"
                  " listener, and does the broker want a client certificate, amqp.cert_file?)",
                  shown, ci->host, ci->port, amqp_error_string2(st));
        return;
    case AMQP_STATUS_TIMEOUT:
        aq_seterr(err, errlen, "cannot connect to broker %s: the TCP connect%s did not finish within %d ms", shown,
                  ci->ssl ? " and TLS handshake" : "", timeout_ms);
        return;
    default:
        aq_seterr(err, errlen, "cannot connect to broker %s: %s", shown, amqp_error_string2(st));
    }
}

/* What a connection lost during login usually means. A TLS-only listener
 * reads the AMQP header as a broken TLS record and hangs up; a broker that
 * wants a client certificate it trusts ends the TLS session after the
 * handshake (TLS 1.3 reports it there, not in the handshake). */
static const char *login_hint(const struct amqp_connection_info *ci, amqp_rpc_reply_t r)
{
    if (r.reply_type != AMQP_RESPONSE_LIBRARY_EXCEPTION || r.library_error == AMQP_STATUS_TIMEOUT) return "";
    if (!ci->ssl)
        return " (the broker hung up on a plain AMQP handshake: if the port is a TLS listener, the URL must be"
               " amqps://)";
    return " (the broker ended the TLS session: it may want a client certificate it trusts, amqp.cert_file and"
           " amqp.key_file)";
}

static aq_broker *connect_node(const aq_config *cfg, const char *url, int heartbeat, int timeout_ms, char *err,
                               size_t errlen)
{
    struct amqp_connection_info ci;
    char *copy = aq_xstrdup(url);
    char shown[512];
    aq_log_redact(url, shown, sizeof shown);
    if (amqp_parse_url(copy, &ci) != AMQP_STATUS_OK) {
        aq_seterr(err, errlen, "amqp.url '%s' is not a valid amqp:// or amqps://user:pass@host:port/vhost URL",
                  shown);
        free(copy);
        return NULL;
    }
    aq_broker *b = aq_xcalloc(1, sizeof *b);
    b->timeout_ms = timeout_ms;
    b->next_seq = 1;
    b->conn = amqp_new_connection();
    /* The connection owns the socket either way (freed with it). */
    amqp_socket_t *sock = NULL;
    if (ci.ssl) {
        char why[400];
        if (!(sock = tls_socket(b->conn, cfg, why, sizeof why))) {
            aq_seterr(err, errlen, "cannot connect to broker %s: %s", shown, why);
            goto fail;
        }
    } else if (!(sock = amqp_tcp_socket_new(b->conn))) {
        aq_seterr(err, errlen, "cannot connect to broker %s: %s", shown, amqp_error_string2(AMQP_STATUS_NO_MEMORY));
        goto fail;
    }
    /* One deadline for TCP connect and, with amqps, the TLS handshake. */
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    int st = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
    if (st != AMQP_STATUS_OK) {
        open_failed(st, &ci, cfg, shown, timeout_ms, err, errlen);
        goto fail;
    }
    b->opened = true;
    /* Guard every later write: a publish must not block forever on a dead
     * peer (rabbitmq-c 0.11 issue #780). The TLS socket writes to the
     * same fd, so the same timeout holds under it. */
    int fd = amqp_socket_get_sockfd(sock);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    amqp_set_handshake_timeout(b->conn, &tv);
    amqp_set_rpc_timeout(b->conn, &tv);
    amqp_rpc_reply_t r = amqp_login(b->conn, ci.vhost, 0, 131072, heartbeat, AMQP_SASL_METHOD_PLAIN,
                                    ci.user, ci.password);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char buf[256];
        aq_seterr(err, errlen, "cannot log in to broker %s: %s%s", shown, reply_text(r, buf, sizeof buf),
                  login_hint(&ci, r));
        goto fail;
    }
    amqp_channel_open(b->conn, AQ_BROKER_CH_MAIN);
    if (check_reply(b, "opening channel", err, errlen)) goto fail;
    b->channel_open[AQ_BROKER_CH_MAIN] = true;
    amqp_channel_open(b->conn, AQ_BROKER_CH_PUBLISH);
    if (check_reply(b, "opening channel", err, errlen)) goto fail;
    b->channel_open[AQ_BROKER_CH_PUBLISH] = true;
    amqp_confirm_select(b->conn, AQ_BROKER_CH_PUBLISH);
    if (check_reply(b, "enabling publisher confirms", err, errlen)) goto fail;
    free(copy);
    return b;
fail:
    free(copy);
    aq_broker_free(b);
    return NULL;
}

/* The node a connect tries first: the last one that took a connection,
 * shared by every connection of the process. A node that went away is
 * tried first once more and refused, and the next one takes over. */
static atomic_int first_node;

aq_broker *aq_broker_connect(const aq_config *cfg, int heartbeat, int timeout_ms, char *err, size_t errlen)
{
    int n = aq_config_amqp_nodes(cfg);
    if (n <= 1) return connect_node(cfg, cfg->amqp_url, heartbeat, timeout_ms, err, errlen);
    int start = atomic_load(&first_node) % n;
    size_t used = 0;
    if (err && errlen) err[0] = '\0';
    for (int k = 0; k < n; k++) {
        int i = (start + k) % n;
        char url[1024], why[512];
        if (!aq_config_amqp_node(cfg, i, url, sizeof url)) continue;
        aq_broker *b = connect_node(cfg, url, heartbeat, timeout_ms, why, sizeof why);
        if (b) {
            if (i != start || i != 0) {
                char shown[512];
                aq_log_redact(url, shown, sizeof shown);
                aq_log(AQ_LOG_INFO, "broker: connected to node %d of %d, %s", i + 1, n, shown);
            }
            atomic_store(&first_node, i);
            return b;
        }
        /* Every node's reason, so a misconfigured one is not hidden. */
        if (err && used < errlen) {
            int w = snprintf(err + used, errlen - used, "%snode %d of %d: %s", k ? "; " : "", i + 1, n, why);
            used += w > 0 ? (size_t)w : 0;
        }
    }
    return NULL;
}

void aq_broker_free(aq_broker *b)
{
    if (!b) return;
    /* Nobody will confirm these any more. */
    for (size_t i = b->head; i < b->n; i++)
        if (!b->pend[i].settled && b->pend[i].cookie && b->ev.confirmed)
            b->ev.confirmed(b->pend[i].cookie, false, b->ev.arg);
    /* Without a socket rabbitmq-c asserts; destroying closes the fd. */
    if (b->opened) amqp_connection_close(b->conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(b->conn);
    for (int i = 0; i < BROKER_MAX_CHANNELS; i++) {
        for (size_t k = 0; k < b->nconsumers[i]; k++) {
            amqp_bytes_free(b->consumers[i][k].tag);
            free(b->consumers[i][k].queue);
        }
        free(b->consumers[i]);
        free(b->open_tags[i].done);
    }
    free(b->pend);
    free(b);
}

void aq_broker_set_events(aq_broker *b, const aq_broker_events *ev)
{
    if (ev) b->ev = *ev;
    else memset(&b->ev, 0, sizeof b->ev);
}

int aq_broker_fd(const aq_broker *b) { return amqp_get_sockfd(b->conn); }

bool aq_broker_buffered(const aq_broker *b)
{
    return amqp_frames_enqueued(b->conn) || amqp_data_in_buffer(b->conn);
}

static int open_channel(aq_broker *b, int channel, char *err, size_t errlen)
{
    if (channel <= 0 || channel >= BROKER_MAX_CHANNELS) {
        aq_seterr(err, errlen, "channel %d out of range", channel);
        return AQ_EINVAL;
    }
    if (!b->channel_open[channel]) {
        amqp_channel_open(b->conn, (amqp_channel_t)channel);
        if (check_reply(b, "opening channel", err, errlen)) return AQ_EIO;
        b->channel_open[channel] = true;
    }
    return AQ_OK;
}

/* One basic.consume on an open channel; remembers the consumer tag. */
static int consume_one(aq_broker *b, int channel, const char *queue, char *err, size_t errlen)
{
    char what[300];
    amqp_basic_consume_ok_t *ok = amqp_basic_consume(b->conn, (amqp_channel_t)channel, amqp_cstring_bytes(queue),
                                                     amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    snprintf(what, sizeof what, "consuming %s", queue);
    if (check_reply(b, what, err, errlen) || !ok) return AQ_EIO;
    size_t n = b->nconsumers[channel];
    b->consumers[channel] = aq_xrealloc(b->consumers[channel], (n + 1) * sizeof(consumer_ref));
    b->consumers[channel][n].tag = amqp_bytes_malloc_dup(ok->consumer_tag);
    b->consumers[channel][n].queue = aq_xstrdup(queue);
    b->nconsumers[channel] = n + 1;
    return AQ_OK;
}

/* AMQP's prefetch count is 16 bits (the config caps it). RabbitMQ reads
 * global = true as "shared by every consumer of the channel". */
static int set_prefetch(aq_broker *b, int channel, int prefetch, bool shared, char *err, size_t errlen)
{
    amqp_basic_qos(b->conn, (amqp_channel_t)channel, 0, (uint16_t)(prefetch > 65535 ? 65535 : prefetch),
                   shared);
    return check_reply(b, "basic.qos", err, errlen) ? AQ_EIO : AQ_OK;
}

int aq_broker_consume(aq_broker *b, int channel, const char *queue, int prefetch, char *err,
                      size_t errlen)
{
    int rc = open_channel(b, channel, err, errlen);
    if (rc == AQ_OK) rc = set_prefetch(b, channel, prefetch, false, err, errlen);
    if (rc == AQ_OK) rc = consume_one(b, channel, queue, err, errlen);
    return rc;
}

int aq_broker_consume_shared(aq_broker *b, int channel, const char *const *queues, size_t n, int prefetch,
                             char *err, size_t errlen)
{
    int rc = open_channel(b, channel, err, errlen);
    if (rc == AQ_OK) rc = set_prefetch(b, channel, prefetch, true, err, errlen);
    for (size_t i = 0; rc == AQ_OK && i < n; i++) rc = consume_one(b, channel, queues[i], err, errlen);
    return rc;
}

int aq_broker_consume_each(aq_broker *b, int channel, const char *const *queues, size_t n, int prefetch,
                           char *err, size_t errlen)
{
    int rc = open_channel(b, channel, err, errlen);
    if (rc == AQ_OK) rc = set_prefetch(b, channel, prefetch, false, err, errlen);
    for (size_t i = 0; rc == AQ_OK && i < n; i++) rc = consume_one(b, channel, queues[i], err, errlen);
    return rc;
}

void aq_broker_cancel_consume(aq_broker *b, int channel)
{
    if (channel <= 0 || channel >= BROKER_MAX_CHANNELS) return;
    /* Deliveries already on their way still arrive, and are handed over. */
    for (size_t k = 0; k < b->nconsumers[channel]; k++) {
        amqp_basic_cancel(b->conn, (amqp_channel_t)channel, b->consumers[channel][k].tag);
        amqp_bytes_free(b->consumers[channel][k].tag);
        free(b->consumers[channel][k].queue);
    }
    free(b->consumers[channel]);
    b->consumers[channel] = NULL;
    b->nconsumers[channel] = 0;
}

static consumer_ref *find_consumer(aq_broker *b, int channel, const char *queue)
{
    if (channel <= 0 || channel >= BROKER_MAX_CHANNELS) return NULL;
    for (size_t k = 0; k < b->nconsumers[channel]; k++)
        if (!strcmp(b->consumers[channel][k].queue, queue)) return &b->consumers[channel][k];
    return NULL;
}

bool aq_broker_consuming(aq_broker *b, int channel, const char *queue)
{
    return find_consumer(b, channel, queue) != NULL;
}

void aq_broker_cancel_queue(aq_broker *b, int channel, const char *queue)
{
    consumer_ref *c = find_consumer(b, channel, queue);
    if (!c) return;
    amqp_basic_cancel(b->conn, (amqp_channel_t)channel, c->tag);
    amqp_bytes_free(c->tag);
    free(c->queue);
    *c = b->consumers[channel][--b->nconsumers[channel]];
}

int aq_broker_add_consumer(aq_broker *b, int channel, const char *queue, char *err, size_t errlen)
{
    if (channel <= 0 || channel >= BROKER_MAX_CHANNELS || !b->channel_open[channel]) {
        aq_seterr(err, errlen, "channel %d is not consuming", channel);
        return AQ_EINVAL;
    }
    return consume_one(b, channel, queue, err, errlen);
}

int aq_broker_add_queue(aq_broker *b, int channel, const char *queue, char *err, size_t errlen)
{
    if (find_consumer(b, channel, queue)) return AQ_OK;
    return aq_broker_add_consumer(b, channel, queue, err, errlen);
}

int aq_broker_consumers(aq_broker *b, int channel, const char *queue)
{
    int n = 0;
    for (size_t k = 0; channel > 0 && channel < BROKER_MAX_CHANNELS && k < b->nconsumers[channel]; k++)
        if (!strcmp(b->consumers[channel][k].queue, queue)) n++;
    return n;
}

/* A delivery handed out on `channel`. */
static void note_delivered(aq_broker *b, int channel, uint64_t dtag)
{
    if (channel <= 0 || channel >= BROKER_MAX_CHANNELS) return;
    unsettled *u = &b->open_tags[channel];
    if (!u->lo) u->lo = dtag;
    if (dtag < u->lo) return;
    if (dtag > u->hi) u->hi = dtag;
    size_t need = (size_t)(u->hi - u->lo + 1);
    if (need > u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 256;
        while (cap < need) cap *= 2;
        u->done = aq_xrealloc(u->done, cap);
        memset(u->done + u->cap, 0, cap - u->cap);
        u->cap = cap;
    }
}

/* Marks `dtag` settled; false if it was already (or is unknown): a second
 * ack of a tag would close the channel. */
static bool settle_tag(aq_broker *b, int channel, uint64_t dtag)
{
    unsettled *u = &b->open_tags[channel];
    if (!u->lo || dtag < u->lo || dtag > u->hi || u->done[dtag - u->lo]) return false;
    u->done[dtag - u->lo] = 1;
    return true;
}

/* Drops the settled prefix; returns the highest tag of it, or 0. */
static uint64_t advance(aq_broker *b, int channel)
{
    unsettled *u = &b->open_tags[channel];
    size_t n = u->lo ? (size_t)(u->hi - u->lo + 1) : 0, k = 0;
    while (k < n && u->done[k]) k++;
    if (!k) return 0;
    memmove(u->done, u->done + k, n - k);
    memset(u->done + n - k, 0, k);
    u->lo += k;
    return u->lo - 1;
}

int aq_broker_ack_many(aq_broker *b, int channel, const uint64_t *dtags, size_t n)
{
    if (channel <= 0 || channel >= BROKER_MAX_CHANNELS) return AQ_EINVAL;
    size_t fresh = 0;
    uint64_t *mine = aq_xmalloc((n ? n : 1) * sizeof *mine);
    for (size_t i = 0; i < n; i++)
        if (settle_tag(b, channel, dtags[i])) mine[fresh++] = dtags[i];
    /* Everything up to the end of the settled prefix goes in one frame;
     * tags past it (a delivery below them is still held or running) one
     * frame each. */
    uint64_t upto = advance(b, channel);
    int rc = AQ_OK;
    size_t covered = 0;
    uint64_t last = 0; /* the highest of this batch's tags in the prefix */
    for (size_t i = 0; i < fresh; i++) {
        if (mine[i] > upto) continue;
        covered++;
        if (mine[i] > last) last = mine[i];
    }
    /* A `multiple` ack must name a tag the broker still holds (RabbitMQ
     * closes the channel otherwise), hence `last`, not `upto`; every tag
     * below it is settled, so the frame acks exactly this batch's. */
    bool one_frame = covered > 1;
    if (one_frame) {
        if (amqp_basic_ack(b->conn, (amqp_channel_t)channel, last, 1) != AMQP_STATUS_OK) rc = AQ_EIO;
        b->ack_frames++;
    }
    for (size_t i = 0; i < fresh; i++) {
        if (one_frame && mine[i] <= last) continue;
        if (amqp_basic_ack(b->conn, (amqp_channel_t)channel, mine[i], 0) != AMQP_STATUS_OK) rc = AQ_EIO;
        b->ack_frames++;
    }
    b->acked += fresh;
    free(mine);
    return rc;
}

int aq_broker_ack(aq_broker *b, int channel, uint64_t dtag) { return aq_broker_ack_many(b, channel, &dtag, 1); }

int aq_broker_reject(aq_broker *b, int channel, uint64_t dtag, bool requeue)
{
    if (channel <= 0 || channel >= BROKER_MAX_CHANNELS) return AQ_EINVAL;
    if (!settle_tag(b, channel, dtag)) return AQ_OK; /* settled already */
    int rc = amqp_basic_reject(b->conn, (amqp_channel_t)channel, dtag, requeue) == AMQP_STATUS_OK ? AQ_OK : AQ_EIO;
    (void)advance(b, channel);
    return rc;
}

void aq_broker_ack_stats(const aq_broker *b, uint64_t *acked, uint64_t *frames)
{
    *acked = b->acked;
    *frames = b->ack_frames;
}

static amqp_table_entry_t entry_long(const char *key, int64_t v)
{
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(key);
    e.value.kind = AMQP_FIELD_KIND_I64;
    e.value.value.i64 = v;
    return e;
}

static amqp_table_entry_t entry_str(const char *key, const char *v)
{
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(key);
    e.value.kind = AMQP_FIELD_KIND_UTF8;
    e.value.value.bytes = amqp_cstring_bytes(v);
    return e;
}

static int declare_queue(aq_broker *b, const char *name, amqp_table_entry_t *args, int nargs,
                         char *err, size_t errlen)
{
    amqp_table_t t = {nargs, args};
    char what[300];
    snprintf(what, sizeof what, "declaring queue %s", name);
    amqp_queue_declare(b->conn, AQ_BROKER_CH_MAIN, amqp_cstring_bytes(name), 0, 1, 0, 0, t);
    int rc = check_reply(b, what, err, errlen);
    if (rc && err && strstr(err, "inequivalent arg 'x-queue-type'")) {
        /* A fleet moved from classic to quorum queues or back: the
         * broker keeps a queue's type for its life. */
        size_t n = strlen(err);
        snprintf(err + n, errlen - n, " (the queue exists with another type than amqp.queue_type: drain and delete"
                 " it, or give the queues new names)");
    }
    return rc;
}

static int bind_queue(aq_broker *b, const char *queue, const char *exchange, const char *key,
                      char *err, size_t errlen)
{
    char what[300];
    snprintf(what, sizeof what, "binding %s to %s", queue, exchange);
    amqp_queue_bind(b->conn, AQ_BROKER_CH_MAIN, amqp_cstring_bytes(queue), amqp_cstring_bytes(exchange),
                    amqp_cstring_bytes(key), amqp_empty_table);
    return check_reply(b, what, err, errlen);
}

/* 5000 ms -> "5s", the suffix of retry queue names (agentq.retry.5s). */
static void delay_name(long ms, char *buf, size_t len)
{
    if (ms % 1000 == 0) snprintf(buf, len, "%lds", ms / 1000);
    else snprintf(buf, len, "%ldms", ms);
}

int aq_broker_declare(aq_broker *b, const aq_config *cfg, char *err, size_t errlen)
{
    amqp_exchange_declare(b->conn, AQ_BROKER_CH_MAIN, amqp_cstring_bytes(cfg->amqp_exchange),
                          amqp_cstring_bytes("direct"), 0, 1, 0, 0, amqp_empty_table);
    if (check_reply(b, "declaring exchange", err, errlen)) return AQ_EIO;
    amqp_exchange_declare(b->conn, AQ_BROKER_CH_MAIN, amqp_cstring_bytes(cfg->amqp_dlx),
                          amqp_cstring_bytes("fanout"), 0, 1, 0, 0, amqp_empty_table);
    if (check_reply(b, "declaring dead-letter exchange", err, errlen)) return AQ_EIO;

    if (aq_config_quorum(cfg)) {
        /* Replicated queues without priorities: the priority is kept by
         * the lanes' bands. Dead-lettering at least once, which needs
         * reject-publish (a full queue refuses publishes, never drops). */
        amqp_table_entry_t in_args[] = {entry_str("x-queue-type", "quorum"),
                                        entry_str("x-dead-letter-exchange", cfg->amqp_dlx),
                                        entry_str("x-dead-letter-strategy", "at-least-once"),
                                        entry_str("x-overflow", "reject-publish"),
                                        entry_long("x-delivery-limit", cfg->amqp_delivery_limit)};
        if (declare_queue(b, cfg->amqp_queue, in_args, 5, err, errlen)) return AQ_EIO;
        if (bind_queue(b, cfg->amqp_queue, cfg->amqp_exchange, "task", err, errlen)) return AQ_EIO;
        for (int i = 0; i < cfg->amqp_lanes; i++) {
            for (int band = 0; band < aq_config_bands(cfg); band++) {
                char name[256];
                aq_broker_lane_queue(cfg, i, band, name, sizeof name);
                if (declare_queue(b, name, in_args, 4, err, errlen)) return AQ_EIO;
            }
        }
        amqp_table_entry_t dead_args[] = {entry_str("x-queue-type", "quorum")};
        if (declare_queue(b, cfg->amqp_dead_queue, dead_args, 1, err, errlen)) return AQ_EIO;
    } else {
        amqp_table_entry_t task_args[] = {entry_long("x-max-priority", 9),
                                          entry_str("x-dead-letter-exchange", cfg->amqp_dlx)};
        if (declare_queue(b, cfg->amqp_queue, task_args, 2, err, errlen)) return AQ_EIO;
        if (bind_queue(b, cfg->amqp_queue, cfg->amqp_exchange, "task", err, errlen)) return AQ_EIO;
        for (int i = 0; i < cfg->amqp_lanes; i++) {
            char name[256];
            aq_broker_lane_queue(cfg, i, 0, name, sizeof name);
            if (declare_queue(b, name, task_args, 2, err, errlen)) return AQ_EIO;
        }
        if (declare_queue(b, cfg->amqp_dead_queue, NULL, 0, err, errlen)) return AQ_EIO;
    }
    if (bind_queue(b, cfg->amqp_dead_queue, cfg->amqp_dlx, "", err, errlen)) return AQ_EIO;

    long delays[32];
    int n = aq_config_retry_delays(cfg, delays, 32);
    for (int i = 0; i < n; i++) {
        char name[256];
        aq_broker_retry_queue(cfg, delays[i], name, sizeof name);
        amqp_table_entry_t args[] = {entry_long("x-message-ttl", delays[i]),
                                     entry_str("x-dead-letter-exchange", cfg->amqp_exchange),
                                     entry_str("x-dead-letter-routing-key", "task"),
                                     entry_str("x-queue-type", "quorum"),
                                     entry_str("x-dead-letter-strategy", "at-least-once"),
                                     entry_str("x-overflow", "reject-publish")};
        if (declare_queue(b, name, args, aq_config_quorum(cfg) ? 6 : 3, err, errlen)) return AQ_EIO;
    }
    return AQ_OK;
}

void aq_broker_lane_queue(const aq_config *cfg, int lane, int band, char *buf, size_t len)
{
    if (aq_config_quorum(cfg))
        snprintf(buf, len, "%s%d.b%d", cfg->amqp_lane_prefix, lane, band);
    else
        snprintf(buf, len, "%s%d", cfg->amqp_lane_prefix, lane);
}

int aq_broker_lane_of(const aq_config *cfg, const char *queue, int *band)
{
    size_t n = strlen(cfg->amqp_lane_prefix);
    if (band) *band = 0;
    if (!queue || strncmp(queue, cfg->amqp_lane_prefix, n)) return -1;
    const char *p = queue + n;
    char *end;
    if (*p < '0' || *p > '9') return -1;
    long lane = strtol(p, &end, 10);
    if (lane >= cfg->amqp_lanes) return -1;
    if (aq_config_quorum(cfg)) {
        if (end[0] != '.' || end[1] != 'b' || end[2] < '0' || end[2] > '9') return -1;
        long b = strtol(end + 2, &end, 10);
        if (*end || b >= aq_config_bands(cfg)) return -1;
        if (band) *band = (int)b;
    } else if (*end) {
        return -1;
    }
    return (int)lane;
}

void aq_broker_retry_queue(const aq_config *cfg, long delay_ms, char *buf, size_t len)
{
    char suffix[32];
    delay_name(delay_ms, suffix, sizeof suffix);
    snprintf(buf, len, "%s%s", cfg->amqp_retry_prefix, suffix);
}

/* JSON object -> AMQP table. Entries and nested tables are allocated in
 * `pool`; strings are borrowed from the JSON. */
static void json_to_table(const json_t *obj, amqp_table_t *t, amqp_pool_t *pool)
{
    size_t n = json_object_size(obj), i = 0;
    t->num_entries = 0;
    t->entries = n ? amqp_pool_alloc(pool, n * sizeof *t->entries) : NULL;
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)obj, key, v) {
        amqp_table_entry_t *e = &t->entries[i];
        e->key = amqp_cstring_bytes(key);
        switch (json_typeof(v)) {
        case JSON_STRING:
            e->value.kind = AMQP_FIELD_KIND_UTF8;
            e->value.value.bytes.bytes = (void *)json_string_value(v);
            e->value.value.bytes.len = json_string_length(v);
            break;
        case JSON_INTEGER:
            e->value.kind = AMQP_FIELD_KIND_I64;
            e->value.value.i64 = json_integer_value(v);
            break;
        case JSON_REAL:
            e->value.kind = AMQP_FIELD_KIND_F64;
            e->value.value.f64 = json_real_value(v);
            break;
        case JSON_TRUE:
        case JSON_FALSE:
            e->value.kind = AMQP_FIELD_KIND_BOOLEAN;
            e->value.value.boolean = json_is_true(v);
            break;
        case JSON_OBJECT:
            e->value.kind = AMQP_FIELD_KIND_TABLE;
            json_to_table(v, &e->value.value.table, pool);
            break;
        default:
            continue; /* arrays and null are not sent */
        }
        i++;
    }
    t->num_entries = (int)i;
}

static json_t *field_to_json(const amqp_field_value_t *f);

json_t *aq_broker_table_to_json(const void *table)
{
    const amqp_table_t *t = table;
    json_t *obj = json_object();
    for (int i = 0; t && i < t->num_entries; i++) {
        char key[257];
        size_t kl = t->entries[i].key.len < 256 ? t->entries[i].key.len : 256;
        memcpy(key, t->entries[i].key.bytes, kl);
        key[kl] = '\0';
        json_t *v = field_to_json(&t->entries[i].value);
        if (v) json_object_set_new(obj, key, v);
    }
    return obj;
}

static json_t *field_to_json(const amqp_field_value_t *f)
{
    switch (f->kind) {
    case AMQP_FIELD_KIND_BOOLEAN: return json_boolean(f->value.boolean);
    case AMQP_FIELD_KIND_I8: return json_integer(f->value.i8);
    case AMQP_FIELD_KIND_U8: return json_integer(f->value.u8);
    case AMQP_FIELD_KIND_I16: return json_integer(f->value.i16);
    case AMQP_FIELD_KIND_U16: return json_integer(f->value.u16);
    case AMQP_FIELD_KIND_I32: return json_integer(f->value.i32);
    case AMQP_FIELD_KIND_U32: return json_integer(f->value.u32);
    case AMQP_FIELD_KIND_I64: return json_integer(f->value.i64);
    case AMQP_FIELD_KIND_U64: return json_integer((json_int_t)f->value.u64);
    case AMQP_FIELD_KIND_TIMESTAMP: return json_integer((json_int_t)f->value.u64);
    case AMQP_FIELD_KIND_F32: return json_real(f->value.f32);
    case AMQP_FIELD_KIND_F64: return json_real(f->value.f64);
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: {
        /* json_stringn checks UTF-8; not UTF-8: keep a marker rather than
         * invalid JSON. */
        json_t *s = json_stringn(f->value.bytes.bytes, f->value.bytes.len);
        return s ? s : json_string("(binary)");
    }
    case AMQP_FIELD_KIND_TABLE: return aq_broker_table_to_json(&f->value.table);
    case AMQP_FIELD_KIND_ARRAY: {
        json_t *a = json_array();
        for (int i = 0; i < f->value.array.num_entries; i++) {
            json_t *v = field_to_json(&f->value.array.entries[i]);
            if (v) json_array_append_new(a, v);
        }
        return a;
    }
    default: return json_null();
    }
}

int64_t aq_broker_publish(aq_broker *b, const aq_publish *msg, void *cookie, char *err, size_t errlen)
{
    amqp_basic_properties_t p;
    amqp_pool_t pool;
    init_amqp_pool(&pool, 1024);
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_PRIORITY_FLAG;
    p.content_type = amqp_cstring_bytes("application/json");
    p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    p.priority = (uint8_t)(msg->priority < 0 ? 0 : msg->priority > 9 ? 9 : msg->priority);
    if (msg->message_id) {
        p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        p.message_id = amqp_cstring_bytes(msg->message_id);
    }
    if (msg->expiration) {
        p._flags |= AMQP_BASIC_EXPIRATION_FLAG;
        p.expiration = amqp_cstring_bytes(msg->expiration);
    }
    if (msg->timestamp) {
        p._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
        p.timestamp = (uint64_t)msg->timestamp;
    }
    if (msg->headers && json_object_size(msg->headers)) {
        p._flags |= AMQP_BASIC_HEADERS_FLAG;
        json_to_table(msg->headers, &p.headers, &pool);
    }
    amqp_bytes_t body = {msg->len, (void *)msg->body};
    int st = amqp_basic_publish(b->conn, AQ_BROKER_CH_PUBLISH, amqp_cstring_bytes(msg->exchange),
                                amqp_cstring_bytes(msg->routing_key), 0, 0, &p, body);
    empty_amqp_pool(&pool);
    if (st != AMQP_STATUS_OK) {
        aq_seterr(err, errlen, "publish to %s failed: %s", msg->exchange, amqp_error_string2(st));
        return AQ_EIO;
    }
    if (b->head > 0 && b->head == b->n) b->head = b->n = 0;
    if (b->n == b->cap) {
        if (b->head > b->cap / 2) { /* reuse the settled front */
            memmove(b->pend, b->pend + b->head, (b->n - b->head) * sizeof *b->pend);
            b->n -= b->head;
            b->head = 0;
        } else {
            b->cap = b->cap ? b->cap * 2 : 64;
            b->pend = aq_xrealloc(b->pend, b->cap * sizeof *b->pend);
        }
    }
    b->pend[b->n++] = (unconfirmed){b->next_seq, cookie, false};
    b->outstanding++;
    return (int64_t)b->next_seq++;
}

int64_t aq_broker_unconfirmed(const aq_broker *b) { return b->outstanding; }

static void settle(aq_broker *b, unconfirmed *u, bool ack)
{
    u->settled = true;
    b->outstanding--;
    if (!ack) b->nacked++;
    if (u->cookie && b->ev.confirmed) b->ev.confirmed(u->cookie, ack, b->ev.arg);
}

/* Confirms usually arrive in order, but need not (a message routed to
 * several queues is confirmed when all have it): an entry is settled
 * where it stands and the front advances over settled ones. */
int64_t aq_broker_note_confirm(aq_broker *b, uint64_t tag, bool multiple, bool ack)
{
    int64_t n = 0;
    if (multiple) {
        for (size_t i = b->head; i < b->n && b->pend[i].seq <= tag; i++)
            if (!b->pend[i].settled) {
                settle(b, &b->pend[i], ack);
                n++;
            }
    } else {
        /* Sequence numbers are sorted: binary search. */
        size_t lo = b->head, hi = b->n;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (b->pend[mid].seq < tag) lo = mid + 1;
            else hi = mid;
        }
        if (lo < b->n && b->pend[lo].seq == tag && !b->pend[lo].settled) {
            settle(b, &b->pend[lo], ack);
            n = 1;
        }
    }
    while (b->head < b->n && b->pend[b->head].settled) b->head++;
    return n;
}

/* Handles one method frame for the verbs that read: confirms, deliveries
 * (with `deliver`), closes and cancels. Returns AQ_OK or AQ_EIO (err set). */
static int on_method(aq_broker *b, const amqp_frame_t *f, bool deliver, char *err, size_t errlen);

int aq_broker_wait_confirms(aq_broker *b, int timeout_ms, int64_t *nacked, char *err, size_t errlen)
{
    int64_t deadline = aq_mono_us() + (int64_t)timeout_ms * 1000;
    while (b->outstanding > 0) {
        int64_t left = deadline - aq_mono_us();
        if (left <= 0) {
            aq_seterr(err, errlen, "timed out waiting for %lld publisher confirms",
                      (long long)aq_broker_unconfirmed(b));
            return AQ_ETIMEDOUT;
        }
        struct timeval tv = {left / 1000000, left % 1000000};
        amqp_frame_t f;
        int st = amqp_simple_wait_frame_noblock(b->conn, &f, &tv);
        if (st == AMQP_STATUS_TIMEOUT) continue;
        if (st != AMQP_STATUS_OK) {
            aq_seterr(err, errlen, "connection lost waiting for confirms: %s", amqp_error_string2(st));
            return AQ_EIO;
        }
        if (f.frame_type != AMQP_FRAME_METHOD) continue;
        if (on_method(b, &f, false, err, errlen) != AQ_OK) return AQ_EIO;
        amqp_maybe_release_buffers(b->conn);
    }
    if (nacked) *nacked = b->nacked;
    if (b->nacked) {
        aq_seterr(err, errlen, "broker refused %lld messages (nack)", (long long)b->nacked);
        return AQ_EIO;
    }
    return AQ_OK;
}

int aq_broker_queue_depth(aq_broker *b, const char *queue, int64_t *messages, int64_t *consumers,
                          char *err, size_t errlen)
{
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(b->conn, AQ_BROKER_CH_MAIN, amqp_cstring_bytes(queue),
                                                     1, 0, 0, 0, amqp_empty_table);
    char what[300];
    snprintf(what, sizeof what, "reading depth of queue %s", queue);
    if (check_reply(b, what, err, errlen) || !ok) return AQ_EIO;
    if (messages) *messages = ok->message_count;
    if (consumers) *consumers = ok->consumer_count;
    return AQ_OK;
}

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

static char *bytes_dup(amqp_bytes_t v) { return aq_xstrndup(v.bytes, v.len); }

/* Reads the header and body frames that follow a basic.deliver. */
static int read_delivery(aq_broker *b, int channel, const amqp_basic_deliver_t *m, char *err, size_t errlen)
{
    uint64_t dtag = m->delivery_tag;
    bool redelivered = m->redelivered;
    char *rk = bytes_dup(m->routing_key);
    amqp_message_t msg;
    amqp_rpc_reply_t r = amqp_read_message(b->conn, (amqp_channel_t)channel, &msg, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        free(rk);
        aq_seterr(err, errlen, "reading a message body failed");
        return AQ_EIO;
    }
    aq_delivery *d = aq_xcalloc(1, sizeof *d);
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
    note_delivered(b, channel, dtag);
    if (b->ev.delivery) b->ev.delivery(d, channel, dtag, b->ev.arg);
    else aq_delivery_free(d);
    return AQ_OK;
}

static int on_method(aq_broker *b, const amqp_frame_t *f, bool deliver, char *err, size_t errlen)
{
    switch (f->payload.method.id) {
    case AMQP_BASIC_DELIVER_METHOD:
        /* Not handed over: never acked, so the broker redelivers it. */
        if (!deliver) return AQ_OK;
        return read_delivery(b, f->channel, f->payload.method.decoded, err, errlen);
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *a = f->payload.method.decoded;
        aq_broker_note_confirm(b, a->delivery_tag, a->multiple, true);
        return AQ_OK;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *a = f->payload.method.decoded;
        aq_broker_note_confirm(b, a->delivery_tag, a->multiple, false);
        return AQ_OK;
    }
    case AMQP_BASIC_CANCEL_METHOD:
        aq_seterr(err, errlen, "the broker cancelled the consumer (queue deleted?)");
        return AQ_EIO;
    case AMQP_CHANNEL_CLOSE_METHOD:
    case AMQP_CONNECTION_CLOSE_METHOD: {
        amqp_channel_close_t *m = f->payload.method.decoded;
        aq_seterr(err, errlen, "broker closed the %s: %u %.*s",
                  f->payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ? "channel" : "connection", m->reply_code,
                  (int)m->reply_text.len, (char *)m->reply_text.bytes);
        return AQ_EIO;
    }
    default: return AQ_OK;
    }
}

int aq_broker_pump(aq_broker *b, char *err, size_t errlen)
{
    /* Bounded, so a flood of deliveries still lets the caller's ops in. */
    for (int i = 0; i < 4096; i++) {
        amqp_frame_t f;
        struct timeval zero = {0, 0};
        int st = amqp_simple_wait_frame_noblock(b->conn, &f, &zero);
        if (st == AMQP_STATUS_TIMEOUT) break;
        if (st != AMQP_STATUS_OK) {
            aq_seterr(err, errlen, "%s", amqp_error_string2(st));
            return AQ_EIO;
        }
        if (f.frame_type != AMQP_FRAME_METHOD) continue;
        if (on_method(b, &f, true, err, errlen) != AQ_OK) return AQ_EIO;
    }
    amqp_maybe_release_buffers(b->conn);
    return AQ_OK;
}
