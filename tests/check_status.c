/* check_status.c — the status name table against the contract's list. */
#include "agentq/status.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <string.h>

START_TEST(names_round_trip_and_finals_are_the_contracts)
{
    /* docs/contract.md: not final queued, running, retrying, waiting; the rest final. */
    static const char *const open[] = {"queued", "running", "retrying", "waiting"};
    static const char *const finals[] = {"completed", "failed", "timeout", "budget_exceeded",
                                         "max_steps", "cancelled", "expired", "rejected"};
    int seen = 0;
    for (size_t i = 0; i < AQ_ARRAY_LEN(open); i++, seen++) {
        aq_status s = aq_status_parse(open[i]);
        ck_assert_int_ne(s, AQ_STATUS_NONE);
        ck_assert_str_eq(aq_status_name(s), open[i]);
        ck_assert(!aq_status_final(s));
    }
    for (size_t i = 0; i < AQ_ARRAY_LEN(finals); i++, seen++) {
        aq_status s = aq_status_parse(finals[i]);
        ck_assert_int_ne(s, AQ_STATUS_NONE);
        ck_assert_str_eq(aq_status_name(s), finals[i]);
        ck_assert(aq_status_final(s));
    }
    ck_assert_int_eq(seen, AQ_STATUS_COUNT - 1); /* every status but none */
    ck_assert_int_eq(aq_status_parse("none"), AQ_STATUS_NONE);
    ck_assert_int_eq(aq_status_parse("Completed"), AQ_STATUS_NONE);
    ck_assert_int_eq(aq_status_parse(NULL), AQ_STATUS_NONE);
    ck_assert(!aq_status_final(AQ_STATUS_NONE));
    ck_assert_str_eq(aq_status_name(AQ_STATUS_COUNT), "?");
    ck_assert_str_eq(aq_status_name((aq_status)-1), "?");
}
END_TEST

int main(void)
{
    const TTest *core[] = {names_round_trip_and_finals_are_the_contracts};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core)},
    };
    return aq_test_run(aq_test_suite("status", tcases, AQ_ARRAY_LEN(tcases)));
}
