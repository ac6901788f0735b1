/* suite.h — a Check suite built from tables: each test file lists its
 * tcases and their tests, and aq_test_suite() registers them, so that the
 * calls that do it are written once here instead of at the end of every
 * test file. */
#ifndef AGENTQ_TEST_SUITE_H
#define AGENTQ_TEST_SUITE_H

#include <check.h>
#include <stddef.h>

#include "agentq/common.h" /* AQ_ARRAY_LEN, for the tables' lengths */

/* One tcase: its name ("core", "limits", "errors"), its tests in the order
 * they run, and how each of them runs. Fields left out are zero: no
 * timeout of its own, no fixture, no loop test. */
typedef struct {
    const char *name;
    const TTest *const *tests;
    size_t n_tests;
    int timeout_s; /* per test; 0 keeps Check's default (CK_DEFAULT_TIMEOUT or 4 s) */
    /* A table-driven test, run after `tests` as a Check loop test: once
     * for each _i in [0, loops), one row of its table of cases each. */
    const TTest *loop_test;
    int loops;
    SFun setup; /* checked fixture run around each test (in its fork); NULL for none */
    SFun teardown;
} aq_tcase_spec;

/* The suite `name` with the tcases of `tcases`, in order; the caller runs
 * it with aq_test_run() or aq_test_run_http() (testenv.h), which free it. */
Suite *aq_test_suite(const char *name, const aq_tcase_spec *tcases, size_t n_tcases);

#endif
