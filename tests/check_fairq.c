/* check_fairq.c — the order held deliveries start in: strict priority,
 * then fewest running per weight, then FIFO; blocks, removal, counts and
 * that a user's entry goes when the user goes idle. */
#include "agentq/fairq.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Values are tags, not pointers to anything: user index and sequence
 * number packed into one non-NULL word, so a popped value says whose it
 * is and which one it was. */
#define TAG(user, n) ((void *)(intptr_t)((user) * 1000000 + (n) + 1))
#define TAG_USER(v) ((int)(((intptr_t)(v) - 1) / 1000000))
#define TAG_N(v) ((int)(((intptr_t)(v) - 1) % 1000000))

static const char *const NAMES[] = {"alice", "bob", "carol"};
enum { A, B, C };

static void push(aq_fairq *q, int user, int priority, int n)
{
    ck_assert_ptr_nonnull(aq_fairq_push(q, NAMES[user], priority, TAG(user, n)));
}

/* Pops and asserts the next item is user's n-th. */
static void pop_is(aq_fairq *q, int user, int n)
{
    void *v = aq_fairq_pop(q);
    ck_assert_msg(v != NULL, "nothing popped, wanted %s#%d", NAMES[user], n);
    ck_assert_msg(TAG_USER(v) == user && TAG_N(v) == n, "popped %s#%d, wanted %s#%d", NAMES[TAG_USER(v)],
                  TAG_N(v), NAMES[user], n);
}

/* ---- core ------------------------------------------------------------- */

START_TEST(empty_pops_null)
{
    aq_fairq *q = aq_fairq_new();
    ck_assert_ptr_null(aq_fairq_pop(q));
    ck_assert_uint_eq(aq_fairq_len(q), 0);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 0);
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_free(q, NULL);
    aq_fairq_free(NULL, NULL);
}
END_TEST

START_TEST(higher_priority_pops_first_whatever_the_user_or_arrival)
{
    aq_fairq *q = aq_fairq_new();
    for (int i = 0; i < 5; i++) push(q, A, 0, i); /* idle, early, low */
    push(q, B, 0, 0);
    /* carol has many running and arrives last, but at priority 9 */
    for (int i = 0; i < 50; i++) aq_fairq_started(q, NAMES[C]);
    push(q, C, 9, 0);
    push(q, B, 4, 1);
    pop_is(q, C, 0);
    pop_is(q, B, 1);
    pop_is(q, A, 0); /* then priority 0: alice's head is the oldest */
    ck_assert_uint_eq(aq_fairq_len(q), 5);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(user_with_fewer_running_pops_first)
{
    aq_fairq *q = aq_fairq_new();
    for (int i = 0; i < 4; i++) push(q, A, 1, i);
    aq_fairq_started(q, NAMES[A]);
    aq_fairq_started(q, NAMES[A]);
    push(q, B, 1, 0); /* just arrived, nothing running */
    pop_is(q, B, 0);
    aq_fairq_started(q, NAMES[B]);
    aq_fairq_started(q, NAMES[B]);
    aq_fairq_started(q, NAMES[B]);
    push(q, B, 1, 1);
    pop_is(q, A, 0); /* 2 running against bob's 3 */
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(equal_running_falls_back_to_oldest_head)
{
    aq_fairq *q = aq_fairq_new();
    push(q, B, 2, 0);
    push(q, A, 2, 0);
    push(q, B, 2, 1);
    pop_is(q, B, 0);
    pop_is(q, A, 0);
    pop_is(q, B, 1);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(weights_split_starts_in_proportion)
{
    aq_fairq *q = aq_fairq_new();
    for (int i = 0; i < 100; i++) {
        push(q, A, 3, i);
        push(q, B, 3, i);
    }
    aq_fairq_set_weight(q, NAMES[A], 3);
    aq_fairq_set_weight(q, NAMES[B], 1);
    int got[2] = {0, 0};
    for (int i = 0; i < 40; i++) {
        void *v = aq_fairq_pop(q);
        ck_assert_ptr_nonnull(v);
        ck_assert_int_eq(TAG_N(v), got[TAG_USER(v)]); /* FIFO on the way */
        got[TAG_USER(v)]++;
        aq_fairq_started(q, NAMES[TAG_USER(v)]); /* and never finished */
    }
    ck_assert_msg(got[A] >= 29 && got[A] <= 31 && got[B] >= 9 && got[B] <= 11, "split %d/%d, wanted 30/10",
                  got[A], got[B]);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(fifo_within_a_user_and_priority)
{
    aq_fairq *q = aq_fairq_new();
    for (int i = 0; i < 10; i++) push(q, A, i % 2 ? 7 : 3, i);
    for (int i = 1; i < 10; i += 2) pop_is(q, A, i);
    for (int i = 0; i < 10; i += 2) pop_is(q, A, i);
    ck_assert_ptr_null(aq_fairq_pop(q));
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(blocked_user_is_skipped_and_keeps_its_items_in_order)
{
    aq_fairq *q = aq_fairq_new();
    push(q, A, 5, 0);
    push(q, A, 1, 1);
    push(q, A, 5, 2);
    push(q, B, 3, 0);
    push(q, B, 3, 1);
    aq_fairq_block(q, NAMES[A], true);
    ck_assert(aq_fairq_blocked(q, NAMES[A]));
    ck_assert(!aq_fairq_blocked(q, NAMES[B]));
    ck_assert_uint_eq(aq_fairq_len(q), 5);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 3);
    push(q, A, 9, 3); /* held while blocked: counted as blocked, skipped */
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 4);
    pop_is(q, B, 0);
    pop_is(q, B, 1);
    ck_assert_ptr_null(aq_fairq_pop(q)); /* only blocked items remain */
    ck_assert_uint_eq(aq_fairq_len(q), 4);
    ck_assert_uint_eq(aq_fairq_users(q), 1);
    aq_fairq_block(q, NAMES[A], false);
    ck_assert(!aq_fairq_blocked(q, NAMES[A]));
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 0);
    pop_is(q, A, 3);
    pop_is(q, A, 0);
    pop_is(q, A, 2);
    pop_is(q, A, 1);
    ck_assert_ptr_null(aq_fairq_pop(q));
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(block_twice_and_unblock_twice_count_once)
{
    aq_fairq *q = aq_fairq_new();
    push(q, A, 0, 0);
    push(q, A, 0, 1);
    aq_fairq_block(q, NAMES[A], true);
    aq_fairq_block(q, NAMES[A], true);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 2);
    aq_fairq_block(q, NAMES[A], false);
    aq_fairq_block(q, NAMES[A], false);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 0);
    pop_is(q, A, 0);
    pop_is(q, A, 1);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(remove_takes_out_any_held_item)
{
    aq_fairq *q = aq_fairq_new();
    aq_fairq_item *a0 = aq_fairq_push(q, NAMES[A], 2, TAG(A, 0));
    aq_fairq_item *a1 = aq_fairq_push(q, NAMES[A], 2, TAG(A, 1));
    aq_fairq_item *a2 = aq_fairq_push(q, NAMES[A], 2, TAG(A, 2));
    aq_fairq_item *b0 = aq_fairq_push(q, NAMES[B], 8, TAG(B, 0));
    aq_fairq_item *b1 = aq_fairq_push(q, NAMES[B], 1, TAG(B, 1));
    aq_fairq_block(q, NAMES[B], true);

    ck_assert_ptr_eq(aq_fairq_remove(q, a1), TAG(A, 1)); /* the middle of a FIFO */
    ck_assert_uint_eq(aq_fairq_len(q), 4);
    ck_assert_ptr_eq(aq_fairq_remove(q, b0), TAG(B, 0)); /* a blocked user's */
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 1);
    ck_assert_uint_eq(aq_fairq_len(q), 3);
    pop_is(q, A, 0);
    ck_assert_ptr_eq(aq_fairq_remove(q, a2), TAG(A, 2)); /* the last of a user */
    ck_assert_ptr_null(aq_fairq_pop(q));
    ck_assert_uint_eq(aq_fairq_users(q), 1); /* bob: still blocked */
    ck_assert_ptr_eq(aq_fairq_remove(q, b1), TAG(B, 1));
    ck_assert_uint_eq(aq_fairq_len(q), 0);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 0);
    ck_assert_uint_eq(aq_fairq_users(q), 1);
    aq_fairq_block(q, NAMES[B], false);
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    (void)a0;
    aq_fairq_free(q, NULL);
}
END_TEST

static void count_value(void *value, void *arg)
{
    int *counts = arg;
    counts[TAG_USER(value)]++;
}

START_TEST(each_visits_a_users_items_or_everyones)
{
    aq_fairq *q = aq_fairq_new();
    for (int i = 0; i < 3; i++) push(q, A, i, i);
    for (int i = 0; i < 2; i++) push(q, B, 4, i);
    aq_fairq_block(q, NAMES[B], true);
    int counts[3] = {0};
    aq_fairq_each(q, NAMES[A], count_value, counts);
    ck_assert_int_eq(counts[A], 3);
    ck_assert_int_eq(counts[B], 0);
    aq_fairq_each(q, NULL, count_value, counts);
    ck_assert_int_eq(counts[A], 6);
    ck_assert_int_eq(counts[B], 2);
    aq_fairq_each(q, NAMES[C], count_value, counts); /* no entry: nothing */
    ck_assert_int_eq(counts[C], 0);
    aq_fairq_free(q, NULL);
}
END_TEST

/* ---- limits ----------------------------------------------------------- */

START_TEST(entry_goes_when_nothing_held_running_or_blocked)
{
    aq_fairq *q = aq_fairq_new();
    push(q, A, 0, 0);
    push(q, B, 0, 0);
    ck_assert_uint_eq(aq_fairq_users(q), 2);
    for (int i = 0; i < 2; i++) {
        void *v = aq_fairq_pop(q);
        aq_fairq_started(q, NAMES[TAG_USER(v)]);
    }
    ck_assert_uint_eq(aq_fairq_users(q), 2); /* running keeps them */
    aq_fairq_finished(q, NAMES[A]);
    ck_assert_uint_eq(aq_fairq_users(q), 1);
    aq_fairq_finished(q, NAMES[B]);
    ck_assert_uint_eq(aq_fairq_users(q), 0);

    aq_fairq_block(q, NAMES[C], true); /* a block alone keeps an entry */
    ck_assert_uint_eq(aq_fairq_users(q), 1);
    ck_assert(aq_fairq_blocked(q, NAMES[C]));
    aq_fairq_block(q, NAMES[C], false);
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_block(q, NAMES[C], false); /* unblocking a stranger makes none */
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_set_weight(q, NAMES[C], 5); /* nor does a weight */
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(hundred_thousand_users_leave_no_entries)
{
    enum { N = 100000 };
    char name[32];
    aq_fairq *q = aq_fairq_new();
    /* one at a time: never more than one entry */
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "one-%d", i);
        aq_fairq_push(q, name, i % 256, TAG(0, i));
        ck_assert_ptr_eq(aq_fairq_pop(q), TAG(0, i));
        aq_fairq_started(q, name);
        ck_assert_uint_eq(aq_fairq_users(q), 1);
        aq_fairq_finished(q, name);
        ck_assert_uint_eq(aq_fairq_users(q), 0);
    }
    /* all at once: every entry held, then every one gone (spread over the
     * levels, as pop scans the users of the top one) */
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "all-%d", i);
        aq_fairq_push(q, name, i % 256, TAG(0, i));
    }
    ck_assert_uint_eq(aq_fairq_users(q), N);
    ck_assert_uint_eq(aq_fairq_len(q), N);
    for (int i = 0; i < N; i++) {
        void *v = aq_fairq_pop(q);
        ck_assert_ptr_nonnull(v);
        snprintf(name, sizeof name, "all-%d", TAG_N(v));
        aq_fairq_started(q, name);
    }
    ck_assert_ptr_null(aq_fairq_pop(q));
    ck_assert_uint_eq(aq_fairq_len(q), 0);
    ck_assert_uint_eq(aq_fairq_users(q), N);
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "all-%d", i);
        aq_fairq_finished(q, name);
    }
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(many_held_items_pop_in_priority_then_fifo_order)
{
    /* Thousands held across many users: every pop is the highest priority
     * left, and within a user and priority the order is kept. */
    enum { USERS = 200, PER = 50 };
    char name[32];
    aq_fairq *q = aq_fairq_new();
    for (int n = 0; n < PER; n++)
        for (int u = 0; u < USERS; u++) {
            snprintf(name, sizeof name, "u%d", u);
            aq_fairq_push(q, name, (u + n) % 4, TAG(u, n));
        }
    int last_prio = 255;
    int last_n[USERS][4];
    for (int u = 0; u < USERS; u++)
        for (int p = 0; p < 4; p++) last_n[u][p] = -1;
    for (int i = 0; i < USERS * PER; i++) {
        void *v = aq_fairq_pop(q);
        ck_assert_ptr_nonnull(v);
        int u = TAG_USER(v), n = TAG_N(v), p = (u + n) % 4;
        ck_assert_int_le(p, last_prio);
        last_prio = p;
        ck_assert_int_gt(n, last_n[u][p]);
        last_n[u][p] = n;
    }
    ck_assert_ptr_null(aq_fairq_pop(q));
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(priority_outside_0_255_is_clamped)
{
    aq_fairq *q = aq_fairq_new();
    push(q, A, -5, 0);
    push(q, A, 0, 1);
    push(q, B, 255, 0);
    push(q, C, 1000, 0);
    pop_is(q, B, 0); /* 1000 is 255, and bob's is older */
    pop_is(q, C, 0);
    pop_is(q, A, 0); /* -5 is 0, and it was first */
    pop_is(q, A, 1);
    aq_fairq_free(q, NULL);
}
END_TEST

/* ---- errors ----------------------------------------------------------- */

START_TEST(finished_with_nothing_running_stays_at_zero)
{
    aq_fairq *q = aq_fairq_new();
    aq_fairq_finished(q, NAMES[A]); /* a stranger */
    ck_assert_uint_eq(aq_fairq_users(q), 0);
    aq_fairq_started(q, NAMES[A]);
    aq_fairq_finished(q, NAMES[A]);
    aq_fairq_finished(q, NAMES[A]);
    ck_assert_uint_eq(aq_fairq_users(q), 0);

    /* With a held item the entry stays; an extra finish must leave 0
     * running, not wrap to a huge count (alice would then lose to bob's
     * one running) nor to one that the next start turns into 0 (alice
     * would then beat bob at one running each). */
    aq_fairq_started(q, NAMES[B]); /* bob: 1 running, the older items */
    push(q, B, 0, 0);
    push(q, B, 0, 1);
    push(q, A, 0, 0);
    push(q, A, 0, 1);
    aq_fairq_finished(q, NAMES[A]);
    pop_is(q, A, 0);               /* 0 running against bob's 1 */
    aq_fairq_started(q, NAMES[A]); /* alice: 1 running */
    pop_is(q, B, 0);               /* a tie, so the older head */
    ck_assert_uint_eq(aq_fairq_users(q), 2);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(weight_below_one_counts_as_one)
{
    aq_fairq *q = aq_fairq_new();
    push(q, B, 0, 0); /* older */
    push(q, A, 0, 0);
    aq_fairq_set_weight(q, NAMES[A], 0);
    aq_fairq_set_weight(q, NAMES[B], -3);
    aq_fairq_started(q, NAMES[B]);
    /* alice 0 running vs bob 1: alice, whatever a zero weight would do */
    pop_is(q, A, 0);
    pop_is(q, B, 0);
    aq_fairq_free(q, NULL);
}
END_TEST

START_TEST(all_users_blocked_pops_null)
{
    aq_fairq *q = aq_fairq_new();
    push(q, A, 3, 0);
    push(q, B, 3, 0);
    aq_fairq_block(q, NAMES[A], true);
    aq_fairq_block(q, NAMES[B], true);
    ck_assert_ptr_null(aq_fairq_pop(q));
    ck_assert_uint_eq(aq_fairq_len(q), 2);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 2);
    aq_fairq_block(q, NAMES[B], false);
    pop_is(q, B, 0);
    ck_assert_ptr_null(aq_fairq_pop(q));
    aq_fairq_free(q, NULL);
}
END_TEST

/* The worker's unblock timer and its drain: unblock_all lets every
 * blocked user's items pop again; pop_any empties the queue, blocked
 * users' items included. */
START_TEST(unblock_all_and_pop_any_reach_blocked_users)
{
    aq_fairq *q = aq_fairq_new();
    push(q, A, 0, 0);
    push(q, B, 0, 0);
    push(q, C, 0, 0);
    aq_fairq_block(q, NAMES[A], true);
    aq_fairq_block(q, NAMES[B], true);
    pop_is(q, C, 0);
    ck_assert_ptr_null(aq_fairq_pop(q));
    aq_fairq_unblock_all(q);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 0);
    ck_assert(!aq_fairq_blocked(q, NAMES[A]) && !aq_fairq_blocked(q, NAMES[B]));
    pop_is(q, A, 0);
    pop_is(q, B, 0);
    ck_assert_uint_eq(aq_fairq_users(q), 0);

    push(q, A, 0, 1);
    push(q, B, 5, 1);
    aq_fairq_block(q, NAMES[A], true);
    aq_fairq_block(q, NAMES[B], true);
    int got = 0;
    void *v;
    while ((v = aq_fairq_pop_any(q))) got |= 1 << TAG_USER(v);
    ck_assert_int_eq(got, (1 << A) | (1 << B));
    ck_assert_uint_eq(aq_fairq_len(q), 0);
    ck_assert_uint_eq(aq_fairq_blocked_len(q), 0);
    aq_fairq_free(q, NULL);
}
END_TEST

static int freed;

static void free_counted(void *value)
{
    freed++;
    free(value);
}

START_TEST(free_frees_every_held_value)
{
    aq_fairq *q = aq_fairq_new();
    for (int i = 0; i < 30; i++) aq_fairq_push(q, NAMES[i % 3], i % 5, aq_xstrdup("held"));
    aq_fairq_block(q, NAMES[B], true);
    aq_fairq_started(q, NAMES[C]);
    free(aq_fairq_pop(q)); /* one is no longer held */
    freed = 0;
    aq_fairq_free(q, free_counted); /* ASan's leak check sees the rest */
    ck_assert_int_eq(freed, 29);
}
END_TEST

int main(void)
{
    const TTest *core[] = {empty_pops_null,
                           higher_priority_pops_first_whatever_the_user_or_arrival,
                           user_with_fewer_running_pops_first,
                           equal_running_falls_back_to_oldest_head,
                           weights_split_starts_in_proportion,
                           fifo_within_a_user_and_priority,
                           blocked_user_is_skipped_and_keeps_its_items_in_order,
                           block_twice_and_unblock_twice_count_once,
                           remove_takes_out_any_held_item,
                           each_visits_a_users_items_or_everyones};
    const TTest *limits[] = {entry_goes_when_nothing_held_running_or_blocked, hundred_thousand_users_leave_no_entries,
                             many_held_items_pop_in_priority_then_fifo_order, priority_outside_0_255_is_clamped};
    const TTest *errors[] = {finished_with_nothing_running_stays_at_zero, weight_below_one_counts_as_one,
                             all_users_blocked_pops_null, unblock_all_and_pop_any_reach_blocked_users,
                             free_frees_every_held_value};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core)},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 60},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors)},
    };
    return aq_test_run(aq_test_suite("fairq", tcases, AQ_ARRAY_LEN(tcases)));
}
