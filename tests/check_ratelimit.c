/* check_ratelimit.c — the LLM rate limiter: bucket arithmetic, fairness
 * between users, pauses, and credit (fleet) mode. Real time on a real
 * event loop, with loose bounds. */
#include "agentq/ratelimit.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <event2/event.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct grant_log {
    char users[256][8];
    int64_t at[256];
    int n;
} grant_log;

typedef struct waiter {
    grant_log *log;
    const char *user;
} waiter;

static void on_grant(void *arg, int pool)
{
    waiter *w = arg;
    grant_log *g = w->log;
    strcpy(g->users[g->n], w->user);
    g->at[g->n++] = aq_mono_us();
}

static void run_until(struct event_base *base, grant_log *g, int want, int timeout_ms)
{
    int64_t end = aq_mono_us() + (int64_t)timeout_ms * 1000;
    while (g->n < want && aq_mono_us() < end) event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
}

START_TEST(unlimited_grants_at_once)
{
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 0, 0);
    aq_rl_wait *w;
    for (int i = 0; i < 1000; i++) ck_assert(aq_ratelimit_acquire(rl, "u", 100000, on_grant, NULL, &w));
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

START_TEST(requests_per_minute_holds)
{
    /* 600/min = 10/s with a burst of 10: 30 calls take about 2 s. */
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 600, 0);
    grant_log g = {0};
    waiter ws[30];
    aq_rl_wait *w;
    int now = 0;
    int64_t start = aq_mono_us();
    for (int i = 0; i < 30; i++) {
        ws[i] = (waiter){&g, "u"};
        if (aq_ratelimit_acquire(rl, "u", 10, on_grant, &ws[i], &w)) now++;
    }
    ck_assert_int_eq(now, 10); /* the burst */
    run_until(base, &g, 20, 5000);
    ck_assert_int_eq(g.n, 20);
    double took = (double)(g.at[19] - start) / 1e6;
    ck_assert_msg(took > 1.7 && took < 3.0, "20 queued grants at 10/s took %.2f s", took);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

START_TEST(users_served_round_robin)
{
    /* Alice queues 20 calls, then bob 2: bob does not wait behind alice. */
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 1200, 0); /* 20/s, burst 20 */
    aq_rl_wait *w;
    for (int i = 0; i < 20; i++) ck_assert(aq_ratelimit_acquire(rl, "filler", 1, on_grant, NULL, &w));
    grant_log g = {0};
    waiter a = {&g, "alice"}, b = {&g, "bob"};
    for (int i = 0; i < 20; i++) ck_assert(!aq_ratelimit_acquire(rl, "alice", 1, on_grant, &a, &w));
    for (int i = 0; i < 2; i++) ck_assert(!aq_ratelimit_acquire(rl, "bob", 1, on_grant, &b, &w));
    size_t users = 0;
    ck_assert_int_eq(aq_ratelimit_waiting(rl, &users), 22);
    ck_assert_int_eq(users, 2);
    run_until(base, &g, 5, 3000);
    int bob_seen = 0;
    for (int i = 0; i < 4; i++) bob_seen += !strcmp(g.users[i], "bob");
    ck_assert_msg(bob_seen == 2, "bob got %d of the first 4 grants", bob_seen);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

START_TEST(cancel_and_pause)
{
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 60000, 0); /* 1000/s */
    grant_log g = {0};
    waiter x = {&g, "u"};
    aq_rl_wait *w;
    aq_ratelimit_pause(rl, 0, 300);
    int64_t start = aq_mono_us();
    ck_assert(!aq_ratelimit_acquire(rl, "u", 1, on_grant, &x, &w));
    aq_rl_wait *w2;
    ck_assert(!aq_ratelimit_acquire(rl, "u", 1, on_grant, &x, &w2));
    aq_ratelimit_cancel(rl, w2); /* never granted */
    run_until(base, &g, 1, 2000);
    ck_assert_int_eq(g.n, 1);
    double waited = (double)(g.at[0] - start) / 1e3;
    ck_assert_msg(waited >= 290, "granted %.0f ms into a 300 ms pause", waited);
    run_until(base, &g, 2, 300);
    ck_assert_int_eq(g.n, 1);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

static int needs;
static bool needs_req, needs_tok;
static int64_t paused_ms;
static void on_need(void *arg, bool requests, bool tokens)
{
    needs++;
    needs_req = requests;
    needs_tok = tokens;
}
static void on_pause(void *arg, int64_t ms) { paused_ms = ms; }

START_TEST(credit_mode_grants_only_what_is_credited)
{
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 600, 0);
    aq_rl_source src = {on_need, on_pause, NULL};
    needs = 0;
    aq_ratelimit_set_source(rl, 0, &src);
    grant_log g = {0};
    waiter x = {&g, "u"};
    aq_rl_wait *w;
    for (int i = 0; i < 5; i++) ck_assert(!aq_ratelimit_acquire(rl, "u", 1, on_grant, &x, &w));
    ck_assert_int_eq(needs, 1); /* asked once, not once per waiter */
    ck_assert(needs_req && !needs_tok); /* only the short bucket */
    run_until(base, &g, 1, 200);
    ck_assert_int_eq(g.n, 0); /* time alone grants nothing */
    aq_ratelimit_credit(rl, 0, 3, 0);
    ck_assert_int_eq(g.n, 3);
    ck_assert_int_eq(needs, 2); /* still short: asks again */
    aq_ratelimit_credit(rl, 0, 2, 0);
    ck_assert_int_eq(g.n, 5);
    aq_ratelimit_pause(rl, 0, 1500);
    ck_assert_int_eq(paused_ms, 1500); /* passed on to the fleet */
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

static void no_need(void *arg, bool requests, bool tokens) {}
static void no_pause(void *arg, int64_t ms) {}
static void count_grant(void *arg, int pool) { (*(long *)arg)++; }

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define AQ_SANITIZED 1
size_t __sanitizer_get_current_allocated_bytes(void);
#endif

/* Bytes the process has allocated now (the sanitizers' allocators replace
 * glibc's under those builds). */
static size_t heap_bytes(void)
{
#ifdef AQ_SANITIZED
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#endif
}

/* Queues one waiter for each of `n` users from `first` on, then credits
 * them all: every one is granted. */
static void churn_batch(aq_ratelimit *rl, int first, int n, long *granted)
{
    char name[32];
    aq_rl_wait *w;
    for (int i = first; i < first + n; i++) {
        snprintf(name, sizeof name, "user-%d", i);
        ck_assert(!aq_ratelimit_acquire(rl, name, 1, count_grant, granted, &w));
    }
    ck_assert_uint_eq(aq_ratelimit_users(rl), (size_t)n);
    aq_ratelimit_credit(rl, 0, n, 0);
}

START_TEST(idle_users_are_evicted)
{
    /* A worker's life: a million distinct users, each waiting once and
     * granted. Credits grant synchronously, so every one really queues
     * (and so gets an entry) and the test takes no wall time. */
#ifdef AQ_SANITIZED
    /* A fifth of it under a sanitizer (its allocator is ten times slower):
     * 20 MB kept would still fail the bound below. */
    enum { BATCH = 1000, USERS = 200 * 1000 };
#else
    enum { BATCH = 1000, USERS = 1000 * 1000 };
#endif
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 600, 0);
    aq_rl_source src = {no_need, no_pause, NULL};
    aq_ratelimit_set_source(rl, 0, &src);
    long granted = 0;
    churn_batch(rl, 0, BATCH, &granted); /* warm up: the map's buckets, malloc's arenas */
    ck_assert_uint_eq(aq_ratelimit_users(rl), 0);
    size_t before = heap_bytes();
    for (int first = BATCH; first < BATCH + USERS; first += BATCH) churn_batch(rl, first, BATCH, &granted);
    size_t after = heap_bytes();
    ck_assert_int_eq(granted, BATCH + USERS);
    size_t users = 1;
    ck_assert_uint_eq(aq_ratelimit_waiting(rl, &users), 0);
    ck_assert_uint_eq(users, 0);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 0);
    /* An entry kept per user seen is ~100 bytes a user: ~100 MB here. */
    size_t growth = after > before ? after - before : 0;
    ck_assert_msg(growth < 8u << 20, "heap grew %zu bytes over %d users", growth, USERS);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

static void expect_grants(const grant_log *g, int from, const char *const *want, int n)
{
    ck_assert_int_eq(g->n, from + n);
    for (int i = 0; i < n; i++)
        ck_assert_msg(!strcmp(g->users[from + i], want[i]), "grant %d went to %s, not %s", from + i,
                      g->users[from + i], want[i]);
}

START_TEST(evicted_user_rejoins_fairly)
{
    /* Credits make the order exact. A user whose last waiter left (granted
     * or cancelled) loses its entry; coming back it is served as any
     * newcomer: after everyone already waiting, and not behind them twice. */
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 600, 0);
    aq_rl_source src = {no_need, no_pause, NULL};
    aq_ratelimit_set_source(rl, 0, &src);
    grant_log g = {0};
    waiter a = {&g, "alice"}, b = {&g, "bob"}, c = {&g, "carol"}, d = {&g, "dave"};
    aq_rl_wait *w;
    for (int i = 0; i < 6; i++) ck_assert(!aq_ratelimit_acquire(rl, "alice", 1, on_grant, &a, &w));
    ck_assert(!aq_ratelimit_acquire(rl, "bob", 1, on_grant, &b, &w));
    ck_assert_uint_eq(aq_ratelimit_users(rl), 2);
    aq_ratelimit_credit(rl, 0, 2, 0);
    expect_grants(&g, 0, (const char *const[]){"alice", "bob"}, 2);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 1); /* bob is gone */

    /* Bob comes back beside a newcomer: one turn each, then alice again. */
    ck_assert(!aq_ratelimit_acquire(rl, "bob", 1, on_grant, &b, &w));
    ck_assert(!aq_ratelimit_acquire(rl, "carol", 1, on_grant, &c, &w));
    ck_assert_uint_eq(aq_ratelimit_users(rl), 3);
    aq_ratelimit_credit(rl, 0, 4, 0);
    expect_grants(&g, 2, (const char *const[]){"alice", "bob", "carol", "alice"}, 4);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 1);

    /* Evicted by a cancel: neither pushed to the front nor to the back. */
    ck_assert(!aq_ratelimit_acquire(rl, "bob", 1, on_grant, &b, &w));
    aq_ratelimit_cancel(rl, w);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 1);
    ck_assert(!aq_ratelimit_acquire(rl, "bob", 1, on_grant, &b, &w));
    ck_assert(!aq_ratelimit_acquire(rl, "dave", 1, on_grant, &d, &w));
    aq_ratelimit_credit(rl, 0, 3, 0);
    expect_grants(&g, 6, (const char *const[]){"alice", "bob", "dave"}, 3);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 1); /* alice, 2 calls left */

    /* Users coming and going around a steady one: every round, alice and
     * the visitor get one grant each, whether the visitor is new or back. */
    static const char *const visitors[] = {"v0", "v1", "v2"};
    waiter vw[AQ_ARRAY_LEN(visitors)];
    for (size_t i = 0; i < AQ_ARRAY_LEN(visitors); i++) vw[i] = (waiter){&g, visitors[i]};
    for (int i = 0; i < 20; i++) ck_assert(!aq_ratelimit_acquire(rl, "alice", 1, on_grant, &a, &w));
    for (int r = 0; r < 20; r++) {
        size_t v = (size_t)r % AQ_ARRAY_LEN(visitors);
        ck_assert(!aq_ratelimit_acquire(rl, visitors[v], 1, on_grant, &vw[v], &w));
        aq_ratelimit_credit(rl, 0, 2, 0);
        expect_grants(&g, 9 + 2 * r, (const char *const[]){"alice", visitors[v]}, 2);
        ck_assert_uint_eq(aq_ratelimit_users(rl), 1);
    }
    aq_ratelimit_credit(rl, 0, 2, 0); /* alice's last two */
    ck_assert_int_eq(g.n, 51);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 0);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

int main(void)
{
    const TTest *core[] = {unlimited_grants_at_once, requests_per_minute_holds,
                           users_served_round_robin, evicted_user_rejoins_fairly};
    const TTest *limits[] = {cancel_and_pause, credit_mode_grants_only_what_is_credited,
                             idle_users_are_evicted};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 30},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 30},
    };
    return aq_test_run(aq_test_suite("ratelimit", tcases, AQ_ARRAY_LEN(tcases)));
}
