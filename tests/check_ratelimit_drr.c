/* check_ratelimit_drr.c — how the rate limiter shares the quota between
 * waiting users: deficit round robin on tokens, weights, no starvation of
 * big calls, round robin by calls without a tokens limit, and per-user
 * entries that go away with their waiters.
 *
 * Most tests run the limiter in credit (fleet) mode, where the buckets
 * hold only what the test credits and a credit serves waiters at once:
 * the test decides exactly how many tokens arrive, so shares and orders
 * are exact and take no wall time. One test runs on the clock. */
#include "agentq/ratelimit.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <event2/event.h>
#include <stdio.h>
#include <string.h>

static void no_need(void *arg, bool requests, bool tokens) {}
static void no_pause(void *arg, int64_t ms) {}

/* A limiter that serves only what the test credits. */
static aq_ratelimit *credited_limiter(struct event_base *base, int64_t rpm, int64_t tpm)
{
    aq_ratelimit *rl = aq_ratelimit_new(base, rpm, tpm);
    static const aq_rl_source src = {no_need, no_pause, NULL};
    aq_ratelimit_set_source(rl, 0, &src);
    return rl;
}

/* One user's stream of calls of the same size. With `keep` set, every
 * grant queues the next call, so the user never stops waiting. */
typedef struct load {
    aq_ratelimit *rl;
    const char *user;
    int weight;
    int64_t tokens;  /* per call */
    bool keep;
    int calls;       /* granted */
    int64_t granted; /* tokens granted */
    char *order;     /* when set, each grant appends the user's first letter */
    int64_t granted_at; /* aq_mono_us() of the last grant */
} load;

static void queue_call(load *l);

static void on_grant(void *arg, int pool)
{
    load *l = arg;
    l->calls++;
    l->granted += l->tokens;
    if (l->order) strncat(l->order, l->user, 1);
    l->granted_at = aq_mono_us();
    if (l->keep) queue_call(l);
}

static void queue_call(load *l)
{
    aq_rl_wait *w;
    if (aq_ratelimit_acquire_weighted(l->rl, l->user, l->weight, l->tokens, on_grant, l, &w)) {
        /* Granted at once: nobody was waiting and the bucket had it. */
        l->calls++;
        l->granted += l->tokens;
    }
}

static void queue_calls(load *l, int n)
{
    for (int i = 0; i < n; i++) queue_call(l);
}

/* Grants every waiter left, which must free every per-user entry. */
static void drain(aq_ratelimit *rl, load *const *loads, int n)
{
    for (int i = 0; i < n; i++) loads[i]->keep = false;
    aq_ratelimit_credit(rl, 0, 1e9, 1e12);
    size_t users = 1;
    ck_assert_uint_eq(aq_ratelimit_waiting(rl, &users), 0);
    ck_assert_uint_eq(users, 0);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 0);
}

/* ---- shares: a table of two users waiting throughout ------------------ */

typedef struct share_case {
    const char *name;
    int64_t rpm, tpm;
    struct {
        const char *user;
        int weight;
        int64_t tokens;
    } users[2];
    bool by_calls;      /* the share measured is of calls, not of tokens */
    double want[2];     /* each user's share of what is granted */
    double credit_req, credit_tok; /* per step */
    int steps;
} share_case;

static const share_case share_cases[] = {
    /* 40k-token calls do not buy 40 times the share of 1k-token ones. */
    {"tokens, not calls", 0, 60000, {{"big", 1, 40000}, {"small", 1, 1000}}, false, {0.5, 0.5}, 0, 5000, 1000},
    {"weights 3:1", 0, 60000, {{"gold", 3, 1000}, {"plain", 1, 1000}}, false, {0.75, 0.25}, 0, 5000, 1000},
    {"weights 3:1, calls 1:40", 0, 60000, {{"gold", 3, 1000}, {"plain", 1, 40000}}, false, {0.75, 0.25}, 0,
     5000, 1000},
    /* A quantum of one second of tpm (100k) rather than 4096. */
    {"weights 1:2, big tpm", 0, 6000000, {{"one", 1, 3000}, {"two", 2, 70000}}, false, {1.0 / 3, 2.0 / 3}, 0,
     50000, 1000},
    /* No tokens limit: calls round robin, whatever their size. */
    {"requests only", 600, 0, {{"big", 1, 40000}, {"small", 1, 1000}}, true, {0.5, 0.5}, 1, 0, 1000},
    {"requests only, weights 3:1", 600, 0, {{"gold", 3, 40000}, {"plain", 1, 1000}}, true, {0.75, 0.25}, 1, 0,
     1000},
    /* Both limits: a call costs at least tpm/rpm = 1000 tokens, so 10-token
     * calls get 20 calls to one 20k call, not 2000 (all the requests). */
    {"both limits, tiny calls", 600, 600000, {{"tiny", 1, 10}, {"big", 1, 20000}}, true,
     {20.0 / 21, 1.0 / 21}, 1, 1000, 4000},
};

START_TEST(shares_follow_tokens_and_weights)
{
    const share_case *c = &share_cases[_i];
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = credited_limiter(base, c->rpm, c->tpm);
    load loads[2];
    for (int i = 0; i < 2; i++)
        loads[i] = (load){.rl = rl, .user = c->users[i].user, .weight = c->users[i].weight,
                          .tokens = c->users[i].tokens, .keep = true};
    for (int n = 0; n < 4; n++) /* several waiters each, interleaved */
        for (int i = 0; i < 2; i++) queue_call(&loads[i]);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 2);
    for (int s = 0; s < c->steps; s++) aq_ratelimit_credit(rl, 0, c->credit_req, c->credit_tok);

    double got[2], total = 0;
    for (int i = 0; i < 2; i++) {
        got[i] = c->by_calls ? loads[i].calls : (double)loads[i].granted;
        total += got[i];
    }
    ck_assert(total > 0);
    fprintf(stderr, "%s: %s %d calls %lld tokens share %.3f (want %.3f); %s %d calls %lld tokens share %.3f "
                    "(want %.3f)\n",
            c->name, loads[0].user, loads[0].calls, (long long)loads[0].granted, got[0] / total, c->want[0],
            loads[1].user, loads[1].calls, (long long)loads[1].granted, got[1] / total, c->want[1]);
    for (int i = 0; i < 2; i++) {
        double share = got[i] / total, off = share > c->want[i] ? share - c->want[i] : c->want[i] - share;
        ck_assert_msg(off <= 0.2 * c->want[i], "%s: %s got %.3f of the %s, not %.3f",
                      c->name, loads[i].user, share, c->by_calls ? "calls" : "tokens", c->want[i]);
    }
    drain(rl, (load *const[]){&loads[0], &loads[1]}, 2);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

/* ---- orders ---------------------------------------------------------- */

START_TEST(leaving_forfeits_the_deficit)
{
    /* tpm 60000: the quantum is 4096 tokens, so 1000-token calls go four a
     * turn with the remainder carried while the user keeps waiting. */
    ck_assert_int_eq(AQ_RL_QUANTUM_MIN, 4096);
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = credited_limiter(base, 0, 60000);
    char order[64] = "";
    load a = {.rl = rl, .user = "a", .weight = 1, .tokens = 1000, .order = order};
    load b = {.rl = rl, .user = "b", .weight = 1, .tokens = 1000, .order = order};
    queue_calls(&a, 20);
    queue_calls(&b, 1);
    aq_ratelimit_credit(rl, 0, 0, 8000);
    /* a: 4096 → 4 calls (96 left); b: 1 call and leaves with 3096 unused;
     * a: 4192 → 3 calls before the credit runs out, turn still open. */
    ck_assert_str_eq(order, "aaaabaaa");
    ck_assert_uint_eq(aq_ratelimit_users(rl), 1);

    queue_calls(&b, 8);
    order[0] = '\0';
    aq_ratelimit_credit(rl, 0, 0, 13000);
    /* a finishes its open turn (1 more), then b starts from 0, not 3096:
     * four calls a turn, not seven. */
    ck_assert_str_eq(order, "abbbbaaaabbbb");
    drain(rl, (load *const[]){&a, &b}, 2);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

START_TEST(requests_only_is_round_robin)
{
    /* tpm 0: every call costs one, whatever its tokens; a turn is `weight`
     * calls (below 1 counts as 1). */
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = credited_limiter(base, 600, 0);
    char order[64] = "";
    load a = {.rl = rl, .user = "a", .weight = 1, .tokens = 50000, .order = order};
    load b = {.rl = rl, .user = "b", .weight = 0, .tokens = 10, .order = order};
    load c = {.rl = rl, .user = "c", .weight = 2, .tokens = 10, .order = order};
    queue_calls(&a, 4);
    queue_calls(&b, 4);
    queue_calls(&c, 6);
    aq_ratelimit_credit(rl, 0, 8, 0);
    ck_assert_str_eq(order, "abccabcc");
    aq_ratelimit_credit(rl, 0, 6, 0);
    ck_assert_str_eq(order, "abccabccabccab");
    ck_assert_uint_eq(aq_ratelimit_users(rl), 0);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

/* ---- limits: big calls, the clock -------------------------------------- */

START_TEST(big_call_is_not_starved)
{
    /* A call bigger than the quantum (4096 here) waits a few turns while
     * its deficit grows, then goes; one above a minute's tokens (60000) is
     * charged as a minute's. Meanwhile the small user is served. */
    static const int64_t sizes[] = {50000, 200000};
    for (size_t k = 0; k < AQ_ARRAY_LEN(sizes); k++) {
        struct event_base *base = event_base_new();
        aq_ratelimit *rl = credited_limiter(base, 0, 60000);
        load small = {.rl = rl, .user = "small", .weight = 1, .tokens = 1000, .keep = true};
        int64_t credited = 0;
        load big = {.rl = rl, .user = "big", .weight = 1, .tokens = sizes[k]};
        queue_calls(&small, 3);
        queue_call(&big);
        while (big.calls == 0 && credited < 1000000) {
            aq_ratelimit_credit(rl, 0, 0, 1000);
            credited += 1000;
        }
        ck_assert_msg(big.calls == 1, "a %lld-token call never granted", (long long)sizes[k]);
        int64_t charged = sizes[k] < 60000 ? sizes[k] : 60000;
        /* The small user got about what big's call was charged, in turns
         * of 4096, before it went: it waited its turns, no more. */
        ck_assert_msg(small.granted >= charged - 2 * AQ_RL_QUANTUM_MIN &&
                          small.granted <= charged + 2 * AQ_RL_QUANTUM_MIN,
                      "%lld tokens to small before a %lld-token call (charged %lld)", (long long)small.granted,
                      (long long)sizes[k], (long long)charged);
        drain(rl, (load *const[]){&small, &big}, 2);
        aq_ratelimit_free(rl);
        event_base_free(base);
    }
}
END_TEST

START_TEST(big_call_goes_on_the_clock)
{
    /* The same on the clock: tpm 1.2M is 20k tokens/s, a bucket and a
     * quantum of 20k. A 30k call waits two turns of the small user (about
     * a second each) and a full bucket: granted in about 3 s, not never. */
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = aq_ratelimit_new(base, 0, 1200000);
    load small = {.rl = rl, .user = "small", .weight = 1, .tokens = 1000};
    load big = {.rl = rl, .user = "big", .weight = 1, .tokens = 30000};
    int64_t start = aq_mono_us();
    queue_calls(&small, 20); /* the full bucket: granted at once */
    ck_assert_int_eq(small.calls, 20);
    small.keep = true;
    queue_calls(&small, 3);
    queue_call(&big);
    ck_assert_int_eq(big.calls, 0);
    while (big.calls == 0 && aq_mono_us() - start < 10 * 1000000) event_base_loop(base, EVLOOP_ONCE);
    ck_assert_int_eq(big.calls, 1);
    double took = (double)(big.granted_at - start) / 1e6;
    ck_assert_msg(took > 1.5 && took < 5.0, "the 30k call went after %.2f s", took);
    ck_assert_msg(small.calls > 40, "small got %d calls meanwhile", small.calls);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

/* ---- errors: cancels ----------------------------------------------------- */

START_TEST(cancel_frees_entries_mid_turn)
{
    /* Cancelling every waiter of the user whose turn is open passes the
     * turn on, and entries go with the last waiter of each user. */
    struct event_base *base = event_base_new();
    aq_ratelimit *rl = credited_limiter(base, 0, 60000);
    char order[16] = "";
    load a = {.rl = rl, .user = "a", .weight = 1, .tokens = 1000, .order = order};
    load b = {.rl = rl, .user = "b", .weight = 1, .tokens = 1000, .order = order};
    aq_rl_wait *aw[3], *bw[3];
    for (int i = 0; i < 3; i++) {
        ck_assert(!aq_ratelimit_acquire_weighted(rl, "a", 1, 1000, on_grant, &a, &aw[i]));
        ck_assert(!aq_ratelimit_acquire_weighted(rl, "b", 1, 1000, on_grant, &b, &bw[i]));
    }
    aq_ratelimit_credit(rl, 0, 0, 1000); /* a's turn opens: one call, then the bucket is empty */
    ck_assert_str_eq(order, "a");
    ck_assert_uint_eq(aq_ratelimit_users(rl), 2);
    aq_ratelimit_cancel(rl, aw[1]);
    aq_ratelimit_cancel(rl, aw[2]);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 1);
    aq_ratelimit_credit(rl, 0, 0, 2000);
    ck_assert_str_eq(order, "abb");
    aq_ratelimit_cancel(rl, bw[2]);
    size_t users = 1;
    ck_assert_uint_eq(aq_ratelimit_waiting(rl, &users), 0);
    ck_assert_uint_eq(users, 0);
    ck_assert_uint_eq(aq_ratelimit_users(rl), 0);
    /* A user coming back after that is served as a newcomer. */
    ck_assert(!aq_ratelimit_acquire_weighted(rl, "b", 1, 1000, on_grant, &b, &bw[0]));
    aq_ratelimit_credit(rl, 0, 0, 1000);
    ck_assert_str_eq(order, "abbb");
    ck_assert_uint_eq(aq_ratelimit_users(rl), 0);
    aq_ratelimit_free(rl);
    event_base_free(base);
}
END_TEST

int main(void)
{
    const TTest *core[] = {leaving_forfeits_the_deficit, requests_only_is_round_robin};
    const TTest *limits[] = {big_call_is_not_starved, big_call_goes_on_the_clock};
    const TTest *errors[] = {cancel_frees_entries_mid_turn};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 30,
         .loop_test = shares_follow_tokens_and_weights, .loops = AQ_ARRAY_LEN(share_cases)},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 30},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 30},
    };
    return aq_test_run(aq_test_suite("ratelimit_drr", tcases, AQ_ARRAY_LEN(tcases)));
}
