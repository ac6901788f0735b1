/* suite.c — see suite.h. */
#include "suite.h"

Suite *aq_test_suite(const char *name, const aq_tcase_spec *tcases, size_t n_tcases)
{
    Suite *s = suite_create(name);
    for (size_t i = 0; i < n_tcases; i++) {
        const aq_tcase_spec *spec = &tcases[i];
        TCase *tc = tcase_create(spec->name);
        if (spec->timeout_s > 0)
            tcase_set_timeout(tc, spec->timeout_s);
        if (spec->setup || spec->teardown)
            tcase_add_checked_fixture(tc, spec->setup, spec->teardown);
        for (size_t j = 0; j < spec->n_tests; j++)
            tcase_add_test(tc, spec->tests[j]);
        if (spec->loop_test)
            tcase_add_loop_test(tc, spec->loop_test, 0, spec->loops);
        suite_add_tcase(s, tc);
    }
    return s;
}
