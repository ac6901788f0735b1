/* amqp_rate.c — the broker's raw rate on this machine, for context next to
 * the agentq and Celery figures: persistent publish with publisher
 * confirms on one connection, consume with manual acks on another, through
 * one durable classic queue, the path every agentq task takes once.
 *
 *   amqp_rate URL COUNT [SIZE [WINDOW [PREFETCH]]]
 *
 * Prints one JSON line: the end-to-end rate (first publish to last ack),
 * and the publish+confirm rate alone. Owns the queue bench.raw (declared,
 * purged, deleted). Built by bench/run with a plain `cc ... -lrabbitmq`;
 * not part of the product. */
#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#define QUEUE "bench.raw"
#define FRAME_WAIT_S 30 /* a silent broker for this long is a failure */

static char *url;
static long count, size = 300, window = 1000, prefetch = 1000;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "amqp_rate: %s\n", what);
    exit(1);
}

static void check_reply(amqp_rpc_reply_t r, const char *what)
{
    if (r.reply_type != AMQP_RESPONSE_NORMAL) die(what);
}

static amqp_connection_state_t open_conn(void)
{
    struct amqp_connection_info ci;
    char *copy = strdup(url);
    if (!copy || amqp_parse_url(copy, &ci) != AMQP_STATUS_OK) die("cannot parse the URL");
    amqp_connection_state_t c = amqp_new_connection();
    amqp_socket_t *s = amqp_tcp_socket_new(c);
    if (!s || amqp_socket_open(s, ci.host, ci.port) != AMQP_STATUS_OK) die("cannot connect");
    check_reply(amqp_login(c, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password), "login");
    amqp_channel_open(c, 1);
    check_reply(amqp_get_rpc_reply(c), "channel.open");
    free(copy);
    return c;
}

static void close_conn(amqp_connection_state_t c)
{
    amqp_channel_close(c, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c);
}

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ready;
    double last_ack;
    long consumed;
} shared_state;

static shared_state sh = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0};

static void *consumer(void *arg)
{
    (void)arg;
    amqp_connection_state_t c = open_conn();
    amqp_basic_qos(c, 1, 0, (uint16_t)prefetch, 0);
    check_reply(amqp_get_rpc_reply(c), "basic.qos");
    amqp_basic_consume(c, 1, amqp_cstring_bytes(QUEUE), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(c), "basic.consume");
    pthread_mutex_lock(&sh.mu);
    sh.ready = 1;
    pthread_cond_signal(&sh.cv);
    pthread_mutex_unlock(&sh.mu);
    struct timeval tv = {FRAME_WAIT_S, 0};
    long n = 0;
    while (n < count) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers(c);
        amqp_rpc_reply_t r = amqp_consume_message(c, &env, &tv, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) die("consume failed or timed out");
        if (amqp_basic_ack(c, 1, env.delivery_tag, 0) != AMQP_STATUS_OK) die("basic.ack");
        amqp_destroy_envelope(&env);
        n++;
    }
    pthread_mutex_lock(&sh.mu);
    sh.last_ack = now_s();
    sh.consumed = n;
    pthread_mutex_unlock(&sh.mu);
    close_conn(c);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: amqp_rate URL COUNT [SIZE [WINDOW [PREFETCH]]]\n");
        return 2;
    }
    url = argv[1];
    count = atol(argv[2]);
    if (argc > 3) size = atol(argv[3]);
    if (argc > 4) window = atol(argv[4]);
    if (argc > 5) prefetch = atol(argv[5]);
    if (count <= 0 || size <= 0 || window <= 0 || prefetch <= 0 || prefetch > 65535) die("bad arguments");

    amqp_connection_state_t p = open_conn();
    amqp_queue_declare(p, 1, amqp_cstring_bytes(QUEUE), 0, 1, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(p), "queue.declare");
    amqp_queue_purge(p, 1, amqp_cstring_bytes(QUEUE));
    check_reply(amqp_get_rpc_reply(p), "queue.purge");
    amqp_confirm_select(p, 1);
    check_reply(amqp_get_rpc_reply(p), "confirm.select");

    pthread_t th;
    if (pthread_create(&th, NULL, consumer, NULL)) die("pthread_create");
    pthread_mutex_lock(&sh.mu);
    while (!sh.ready) pthread_cond_wait(&sh.cv, &sh.mu);
    pthread_mutex_unlock(&sh.mu);

    char *body = malloc((size_t)size);
    unsigned char *done = calloc((size_t)count + 2, 1);
    if (!body || !done) die("out of memory");
    memset(body, 'x', (size_t)size);
    amqp_basic_properties_t props = {
        ._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG,
        .content_type = amqp_cstring_bytes("application/json"),
        .delivery_mode = 2,
    };
    amqp_bytes_t bb = {(size_t)size, body};
    long published = 0, cursor = 1, nacked = 0; /* cursor: lowest unconfirmed tag */
    struct timeval tv = {FRAME_WAIT_S, 0};
    double t0 = now_s();
    while (cursor <= count) {
        while (published < count && published - (cursor - 1) < window) {
            if (amqp_basic_publish(p, 1, amqp_empty_bytes, amqp_cstring_bytes(QUEUE), 0, 0, &props, bb) !=
                AMQP_STATUS_OK)
                die("basic.publish");
            published++;
        }
        amqp_frame_t f;
        int rc = amqp_simple_wait_frame_noblock(p, &f, &tv);
        if (rc != AMQP_STATUS_OK) die("no confirm from the broker");
        if (f.frame_type != AMQP_FRAME_METHOD) continue;
        uint64_t tag;
        int multiple;
        if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            tag = a->delivery_tag;
            multiple = a->multiple;
        } else if (f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
            amqp_basic_nack_t *a = f.payload.method.decoded;
            tag = a->delivery_tag;
            multiple = a->multiple;
            nacked++;
        } else {
            continue;
        }
        if (tag > (uint64_t)count) die("confirm for an unknown tag");
        if (multiple)
            for (long t = cursor; t <= (long)tag; t++) done[t] = 1;
        else
            done[tag] = 1;
        while (cursor <= count && done[cursor]) cursor++;
    }
    double t_confirmed = now_s();
    pthread_join(th, NULL);
    double wall = sh.last_ack - t0, pub = t_confirmed - t0;
    amqp_queue_delete(p, 1, amqp_cstring_bytes(QUEUE), 0, 0);
    (void)amqp_get_rpc_reply(p);
    close_conn(p);
    printf("{\"scenario\":\"raw\",\"system\":\"rabbitmq\",\"settings\":\"persistent publish+confirm (window %ld) + "
           "consume+ack (prefetch %ld), %ld B\",\"tasks\":%ld,\"wall_s\":%.3f,\"tasks_per_s\":%.1f,"
           "\"publish_confirm_per_s\":%.1f,\"nacked\":%ld}\n",
           window, prefetch, size, count, wall, (double)count / wall, (double)count / pub, nacked);
    free(body);
    free(done);
    return nacked ? 1 : 0;
}
