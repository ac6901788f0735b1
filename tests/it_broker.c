/* it_broker.c — the AMQP client against the private RabbitMQ: the
 * topology it declares, publisher confirms, queue depths, and the worker's
 * consumer closing with confirms in flight. */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/consumer.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static aq_config cfg;
static aq_broker *b;

static void setup(void)
{
    char err[512], prefix[64], q[128];
    aq_config_init(&cfg);
    snprintf(prefix, sizeof prefix, "itb%d", (int)getpid());
    ck_assert(aq_config_set(&cfg, "amqp.url", aq_test_env_require("AGENTQ_TEST_AMQP_URL"), err, sizeof err) == 0);
    ck_assert(aq_config_set(&cfg, "amqp.exchange", prefix, err, sizeof err) == 0);
    snprintf(q, sizeof q, "%s.tasks", prefix);
    ck_assert(aq_config_set(&cfg, "amqp.queue", q, err, sizeof err) == 0);
    snprintf(q, sizeof q, "%s.dlx", prefix);
    ck_assert(aq_config_set(&cfg, "amqp.dlx", q, err, sizeof err) == 0);
    snprintf(q, sizeof q, "%s.dead", prefix);
    ck_assert(aq_config_set(&cfg, "amqp.dead_queue", q, err, sizeof err) == 0);
    snprintf(q, sizeof q, "%s.retry.", prefix);
    ck_assert(aq_config_set(&cfg, "amqp.retry_prefix", q, err, sizeof err) == 0);
    snprintf(q, sizeof q, "%s.lane.", prefix);
    ck_assert(aq_config_set(&cfg, "amqp.lane_prefix", q, err, sizeof err) == 0);
    ck_assert(aq_config_set(&cfg, "amqp.lanes", "3", err, sizeof err) == 0);
    b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_msg(b != NULL, "%s", err);
    ck_assert_msg(aq_broker_declare(b, &cfg, err, sizeof err) == 0, "%s", err);
}

static void teardown(void)
{
    aq_broker_free(b);
    aq_config_free(&cfg);
}

static char *ctl(const char *args)
{
    static char out[1 << 20]; /* every queue of the shared test broker */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' -q %s 2>&1", aq_test_env_require("AGENTQ_TEST_RABBITMQCTL"), args);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = '\0';
    pclose(p);
    return out;
}

START_TEST(topology_as_the_contract_says)
{
    char *q = ctl("list_queues name durable arguments");
    char line[512];
    snprintf(line, sizeof line, "%s", cfg.amqp_queue);
    ck_assert_msg(strstr(q, line) != NULL, "%s", q);
    /* The task queue: durable, priority 9, dead-lettered to the DLX. */
    const char *t = strstr(q, cfg.amqp_queue);
    ck_assert_msg(strstr(t, "x-max-priority") && strstr(t, "x-dead-letter-exchange"), "%s", t);
    /* One retry queue per tier, each dead-lettering back to the exchange. */
    const char *tiers[] = {"retry.5s", "retry.30s", "retry.120s", "retry.600s"};
    for (int i = 0; i < 4; i++) ck_assert_msg(strstr(q, tiers[i]) != NULL, "no %s in %s", tiers[i], q);
    /* One lane queue per amqp.lanes, each a priority queue dead-lettered
     * like the task queue. */
    for (int i = 0; i < 3; i++) {
        char lane[128];
        aq_broker_lane_queue(&cfg, i, 0, lane, sizeof lane);
        const char *l = strstr(q, lane);
        ck_assert_msg(l != NULL, "no %s in %s", lane, q);
        const char *eol = strchr(l, '\n');
        ck_assert_msg(strstr(l, "x-max-priority") && strstr(l, "x-dead-letter-exchange") &&
                          (!eol || strstr(l, "x-max-priority") < eol),
                      "%s", l);
    }
    char *e = ctl("list_exchanges name type durable");
    ck_assert_msg(strstr(e, "direct") && strstr(e, "fanout"), "%s", e);
    /* Declaring again changes nothing and does not fail. */
    char err[256];
    ck_assert_msg(aq_broker_declare(b, &cfg, err, sizeof err) == 0, "%s", err);
}
END_TEST

START_TEST(confirms_and_depth)
{
    char err[256];
    for (int i = 0; i < 50; i++) {
        aq_publish p = {cfg.amqp_exchange, "task", "{}", 2, NULL, i % 10, NULL, 0, NULL};
        ck_assert_int_eq(aq_broker_publish(b, &p, NULL, err, sizeof err), i + 1);
    }
    int64_t nacked = -1;
    ck_assert_msg(aq_broker_wait_confirms(b, 5000, &nacked, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(nacked, 0);
    ck_assert_int_eq(aq_broker_unconfirmed(b), 0);
    int64_t depth = -1, consumers = -1;
    ck_assert(aq_broker_queue_depth(b, cfg.amqp_queue, &depth, &consumers, err, sizeof err) == 0);
    ck_assert_int_eq(depth, 50);
    ck_assert_int_eq(consumers, 0);
    /* A queue that does not exist is an error naming it. */
    ck_assert(aq_broker_queue_depth(b, "agentq.no.such.queue", &depth, NULL, err, sizeof err) != 0);
    ck_assert_msg(strstr(err, "agentq.no.such.queue") != NULL, "%s", err);
}
END_TEST

START_TEST(out_of_order_confirms_counted_exactly)
{
    char err[256];
    for (int i = 0; i < 5; i++) {
        aq_publish p = {cfg.amqp_exchange, "task", "{}", 2, NULL, 0, NULL, 0, NULL};
        ck_assert_int_gt(aq_broker_publish(b, &p, NULL, err, sizeof err), 0);
    }
    /* Before the broker's own confirms are read: 3 alone, then 1, then 2
     * closes the gap, then 5 with multiple covers 4 and 5. */
    ck_assert_int_eq(aq_broker_note_confirm(b, 3, false, true), 1);
    ck_assert_int_eq(aq_broker_unconfirmed(b), 4);
    ck_assert_int_eq(aq_broker_note_confirm(b, 3, false, true), 0); /* no double count */
    ck_assert_int_eq(aq_broker_note_confirm(b, 1, false, true), 1);
    ck_assert_int_eq(aq_broker_note_confirm(b, 2, false, false), 1); /* a nack */
    ck_assert_int_eq(aq_broker_unconfirmed(b), 2);
    ck_assert_int_eq(aq_broker_note_confirm(b, 5, true, true), 2);
    ck_assert_int_eq(aq_broker_unconfirmed(b), 0);
    /* The broker's real confirms, read now, change nothing; the nack shows. */
    int64_t nacked = 0;
    ck_assert_int_eq(aq_broker_wait_confirms(b, 1000, &nacked, err, sizeof err), AQ_EIO);
    ck_assert_int_eq(nacked, 1);
}
END_TEST

START_TEST(bad_url_and_refused_connection)
{
    char err[256];
    aq_config_init(&cfg);
    ck_assert_int_eq(aq_config_set(&cfg, "amqp.url", "http://nope", err, sizeof err), 0);
    ck_assert_ptr_null(aq_broker_connect(&cfg, 0, 1000, err, sizeof err));
    ck_assert_msg(strstr(err, "amqp.url") != NULL, "%s", err);
    /* A closed port: refused quickly, the password not shown. */
    ck_assert_int_eq(aq_config_set(&cfg, "amqp.url", "amqp://u:s3cretpw@127.0.0.1:1/%2f", err, sizeof err), 0);
    ck_assert_ptr_null(aq_broker_connect(&cfg, 0, 1000, err, sizeof err));
    ck_assert_msg(strstr(err, "cannot connect") && !strstr(err, "s3cretpw"), "%s", err);
    aq_config_free(&cfg);
}
END_TEST

/* ---------------------------------------------------- the worker's side */

typedef struct confirm_rec {
    int calls, acked;
    bool ok;
} confirm_rec;

static int consumer_connected;

static void on_state(bool connected, void *arg)
{
    (void)arg;
    if (connected) consumer_connected++;
}

static void on_published(void *cookie, bool ok, void *arg)
{
    confirm_rec *r = cookie;
    (void)arg;
    r->calls++;
    r->acked += ok;
    r->ok = ok;
}

static void drop_delivery(aq_delivery *d, void *arg)
{
    (void)arg;
    aq_delivery_free(d);
}

/* The worker's consumer closes right after a burst of publishes whose
 * confirms it has not read yet (SIGTERM after a burst of retry
 * publishes): each one is reported confirmed, exactly once, and closing
 * does not stall waiting for confirms it had already read. */
START_TEST(consumer_closing_reports_every_confirm_without_stalling)
{
    struct event_base *base = event_base_new();
    char err[512];
    aq_consumer_callbacks cb = {drop_delivery, on_published, on_state, NULL};
    aq_consumer *c = aq_consumer_new(&cfg, base, &cb, false, err, sizeof err);
    ck_assert_msg(c != NULL, "%s", err);
    consumer_connected = 0;
    aq_test_loop_until(base, &consumer_connected, 1, 10000);
    ck_assert_int_eq(consumer_connected, 1);
    aq_consumer_stop_consuming(c);
    enum { N = 200 };
    static confirm_rec first, rec[N];
    memset(&first, 0, sizeof first);
    memset(rec, 0, sizeof rec);
    char q[160];
    snprintf(q, sizeof q, "%s", cfg.amqp_queue);
    aq_publish p = {"", q, "{}", 2, NULL, 0, NULL, 0, NULL};
    /* One publish confirmed and read in the ordinary way first. */
    aq_consumer_publish(c, &p, &first);
    aq_test_loop_until(base, &first.calls, 1, 5000);
    ck_assert_int_eq(first.acked, 1);
    /* Closed at once: the thread sends them and quits before their
     * confirms are read. */
    int64_t t0 = aq_mono_us();
    for (int i = 0; i < N; i++) aq_consumer_publish(c, &p, &rec[i]);
    aq_consumer_free(c);
    double secs = (double)(aq_mono_us() - t0) / 1e6;
    for (int i = 0; i < N; i++) {
        ck_assert_msg(rec[i].calls == 1, "publish %d reported %d times", i, rec[i].calls);
        ck_assert_msg(rec[i].acked == 1, "publish %d reported as not confirmed", i);
    }
    ck_assert_msg(secs < 1.0, "closing took %.2f s", secs);
    int64_t messages = 0;
    ck_assert_msg(aq_broker_queue_depth(b, cfg.amqp_queue, &messages, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(messages, N + 1);
    event_base_free(base);
}
END_TEST

/* What lanes_share_one_prefetch receives: per lane, and the tags to ack. */
typedef struct lane_rec {
    int per_lane[3];
    uint64_t tags[64];
    int ntags;
} lane_rec;

static void count_lane_delivery(aq_delivery *d, int channel, uint64_t dtag, void *arg)
{
    lane_rec *r = arg;
    (void)channel;
    for (int i = 0; i < 3; i++) {
        char lane[128];
        aq_broker_lane_queue(&cfg, i, 0, lane, sizeof lane);
        if (!strcmp(d->routing_key, lane)) r->per_lane[i]++;
    }
    if (r->ntags < 64) r->tags[r->ntags++] = dtag;
    aq_delivery_free(d);
}

/* Pumps for up to ms milliseconds or until nothing more arrives. */
static void pump_for(int ms)
{
    char err[256];
    int64_t end = aq_mono_us() + (int64_t)ms * 1000;
    while (aq_mono_us() < end) {
        ck_assert_msg(aq_broker_pump(b, err, sizeof err) == 0, "%s", err);
        usleep(2000);
    }
}

/* Publishes n messages "{}" to `queue` (default exchange) and waits for
 * their confirms. */
static void publish_confirmed(const char *queue, int n)
{
    char err[256];
    for (int k = 0; k < n; k++) {
        aq_publish p = {"", queue, "{}", 2, NULL, 0, NULL, 0, NULL};
        ck_assert_int_gt(aq_broker_publish(b, &p, NULL, err, sizeof err), 0);
    }
    int64_t nacked;
    ck_assert_msg(aq_broker_wait_confirms(b, 5000, &nacked, err, sizeof err) == 0, "%s", err);
}

/* Hands every delivery of the broker to `r` (count_lane_delivery). */
static void record_deliveries(lane_rec *r)
{
    memset(r, 0, sizeof *r);
    aq_broker_events ev = {count_lane_delivery, NULL, r};
    aq_broker_set_events(b, &ev);
}

/* The lanes a worker consumes share one prefetch: it never holds more
 * than that, and as slots free every lane with messages gets its turn, so
 * no lane's backlog shuts the others out. */
START_TEST(lanes_share_one_prefetch)
{
    char err[256], lane[128];
    for (int i = 0; i < 3; i++) {
        aq_broker_lane_queue(&cfg, i, 0, lane, sizeof lane);
        publish_confirmed(lane, 40);
    }
    static lane_rec r;
    record_deliveries(&r);
    const char *queues[3];
    char names[3][128];
    for (int i = 0; i < 3; i++) {
        aq_broker_lane_queue(&cfg, i, 0, names[i], sizeof names[i]);
        queues[i] = names[i];
    }
    ck_assert_msg(aq_broker_consume_shared(b, 5, queues, 3, 4, err, sizeof err) == 0, "%s", err);
    pump_for(300);
    ck_assert_int_eq(r.ntags, 4); /* the prefetch, over all three lanes */
    /* Free one slot at a time, 60 times: each lane gets a part of them
     * (20 expected; RabbitMQ offers a freed slot to the waiting queues in
     * an order that is random but not even: 30 slots once gave 13, 15, 2,
     * so the bound is what shutting a lane out would break). */
    int before[3] = {r.per_lane[0], r.per_lane[1], r.per_lane[2]};
    for (int k = 0; k < 60; k++) {
        ck_assert_int_gt(r.ntags, 0);
        ck_assert_int_eq(aq_broker_ack(b, 5, r.tags[--r.ntags]), 0);
        int had = r.ntags;
        for (int t = 0; t < 200 && r.ntags == had; t++) pump_for(2);
        ck_assert_int_eq(r.ntags, had + 1);
    }
    for (int i = 0; i < 3; i++) {
        int got = r.per_lane[i] - before[i];
        ck_assert_msg(got >= 3, "lane %d got %d of 60 freed slots (%d, %d, %d)", i, got, r.per_lane[0] - before[0],
                      r.per_lane[1] - before[1], r.per_lane[2] - before[2]);
    }
    aq_broker_cancel_consume(b, 5);
}
END_TEST

/* Acks go several to a frame where the broker allows it: a run that
 * completes the settled prefix is one `multiple` ack; an ack past a
 * delivery still held goes alone; a tag acked twice sends nothing (the
 * broker would close the channel). What was acked stays acked. */
START_TEST(acks_go_several_to_a_frame)
{
    char err[256], q[160];
    snprintf(q, sizeof q, "%s", cfg.amqp_dead_queue);
    publish_confirmed(q, 9);
    static lane_rec r;
    record_deliveries(&r);
    ck_assert_msg(aq_broker_consume(b, 6, q, 10, err, sizeof err) == 0, "%s", err);
    for (int t = 0; t < 200 && r.ntags < 9; t++) pump_for(5);
    ck_assert_int_eq(r.ntags, 9);
    uint64_t *tag = r.tags; /* 1..9 in delivery order */
    uint64_t acked, frames;
    uint64_t mid[] = {tag[1], tag[2]};
    ck_assert_int_eq(aq_broker_ack_many(b, 6, mid, 2), 0); /* the first is still held: one frame each */
    aq_broker_ack_stats(b, &acked, &frames);
    ck_assert_uint_eq(acked, 2);
    ck_assert_uint_eq(frames, 2);
    uint64_t rest[] = {tag[0], tag[3], tag[4]};
    ck_assert_int_eq(aq_broker_ack_many(b, 6, rest, 3), 0); /* 1..5 settled: one frame */
    aq_broker_ack_stats(b, &acked, &frames);
    ck_assert_uint_eq(acked, 5);
    ck_assert_uint_eq(frames, 3);
    ck_assert_int_eq(aq_broker_ack_many(b, 6, mid, 2), 0); /* again: nothing sent */
    ck_assert_int_eq(aq_broker_ack(b, 6, tag[5]), 0);
    aq_broker_ack_stats(b, &acked, &frames);
    ck_assert_uint_eq(acked, 6);
    ck_assert_uint_eq(frames, 4);
    /* The prefix may end on a tag acked before (9 here): the frame names
     * the batch's highest (8), which the broker still holds. */
    ck_assert_int_eq(aq_broker_ack(b, 6, tag[8]), 0);
    uint64_t last[] = {tag[6], tag[7]};
    ck_assert_int_eq(aq_broker_ack_many(b, 6, last, 2), 0);
    aq_broker_ack_stats(b, &acked, &frames);
    ck_assert_uint_eq(acked, 9);
    ck_assert_uint_eq(frames, 6);
    pump_for(100);
    char perr[256];
    ck_assert_msg(aq_broker_pump(b, perr, sizeof perr) == 0, "the channel closed: %s", perr); /* no unknown tag */
    aq_broker_cancel_consume(b, 6);
    /* Closed and opened again: none of the nine comes back. */
    aq_broker_free(b);
    b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_msg(b != NULL, "%s", err);
    int64_t depth = -1;
    ck_assert(aq_broker_queue_depth(b, q, &depth, NULL, err, sizeof err) == 0);
    ck_assert_int_eq(depth, 0);
}
END_TEST

int main(void)
{
    const TTest *core[] = {topology_as_the_contract_says, confirms_and_depth};
    const TTest *limits[] = {out_of_order_confirms_counted_exactly, lanes_share_one_prefetch, acks_go_several_to_a_frame,
                             consumer_closing_reports_every_confirm_without_stalling};
    const TTest *errors[] = {bad_url_and_refused_connection};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 60,
         .setup = setup, .teardown = teardown},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 60,
         .setup = setup, .teardown = teardown},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 60},
    };
    return aq_test_run(aq_test_suite("broker", tcases, AQ_ARRAY_LEN(tcases)));
}
