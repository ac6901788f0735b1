/* check_prom.c — the metrics registry: the text exposition (HELP, TYPE,
 * series, number forms), label and help escaping, histogram buckets, sums
 * and counts, many series, and the definitions it refuses. */
#include "agentq/prom.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static aq_prom *p;

static void setup(void) { p = aq_prom_new(); }
static void teardown(void) { aq_prom_free(p); }

/* The exposition must be exactly `want`. */
static void expect_text(const char *want)
{
    char *got = aq_prom_text(p);
    ck_assert_msg(!strcmp(got, want), "exposition:\n%s\nwant:\n%s", got, want);
    free(got);
}

START_TEST(counters_and_gauges_with_help_and_type)
{
    aq_prom_family *tasks = aq_prom_family_new(p, AQ_PROM_COUNTER, "t_tasks_total", "Tasks by status.", "status",
                                               NULL, 0);
    aq_prom_family *run = aq_prom_family_new(p, AQ_PROM_GAUGE, "t_running", "Running now.", NULL, NULL, 0);
    ck_assert_ptr_nonnull(tasks);
    ck_assert_ptr_nonnull(run);
    /* before anything: the labelled family has no series, the other its one at 0 */
    expect_text("# HELP t_tasks_total Tasks by status.\n# TYPE t_tasks_total counter\n"
                "# HELP t_running Running now.\n# TYPE t_running gauge\nt_running 0\n");
    aq_prom_add(aq_prom_with(tasks, (const char *[]){"failed"}), 1);
    aq_prom_add(aq_prom_with(tasks, (const char *[]){"completed"}), 2);
    aq_prom_add(aq_prom_with(tasks, (const char *[]){"failed"}), 1);
    aq_prom_set(aq_prom_with(run, NULL), 7);
    aq_prom_add(aq_prom_with(run, NULL), -2);
    /* series in the order first seen; integers print without a fraction */
    expect_text("# HELP t_tasks_total Tasks by status.\n# TYPE t_tasks_total counter\n"
                "t_tasks_total{status=\"failed\"} 2\nt_tasks_total{status=\"completed\"} 2\n"
                "# HELP t_running Running now.\n# TYPE t_running gauge\nt_running 5\n");
}
END_TEST

START_TEST(numbers_print_short_and_exact)
{
    aq_prom_family *g = aq_prom_family_new(p, AQ_PROM_GAUGE, "g", "", "k", NULL, 0);
    const double v[] = {0.1, 1e-7, 123456789012.0, 0.30000000000000004, NAN, INFINITY, -INFINITY, -2.5};
    const char *keys[] = {"a", "b", "c", "d", "e", "f", "h", "i"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(v); i++) aq_prom_set(aq_prom_with(g, (const char *[]){keys[i]}), v[i]);
    expect_text("# HELP g \n# TYPE g gauge\n"
                "g{k=\"a\"} 0.1\ng{k=\"b\"} 1e-07\ng{k=\"c\"} 123456789012\ng{k=\"d\"} 0.30000000000000004\n"
                "g{k=\"e\"} NaN\ng{k=\"f\"} +Inf\ng{k=\"h\"} -Inf\ng{k=\"i\"} -2.5\n");
}
END_TEST

START_TEST(label_values_and_help_are_escaped)
{
    aq_prom_family *c = aq_prom_family_new(p, AQ_PROM_COUNTER, "esc_total", "A \\ backslash\nand \"quotes\".",
                                           "model,provider", NULL, 0);
    aq_prom_add(aq_prom_with(c, (const char *[]){"a\"b\\c\nd", "x,y={z}"}), 1);
    /* help: \ and newline; label values: \, " and newline; the rest as is */
    expect_text("# HELP esc_total A \\\\ backslash\\nand \"quotes\".\n# TYPE esc_total counter\n"
                "esc_total{model=\"a\\\"b\\\\c\\nd\",provider=\"x,y={z}\"} 1\n");
}
END_TEST

START_TEST(empty_label_values_are_left_out)
{
    aq_prom_family *c = aq_prom_family_new(p, AQ_PROM_COUNTER, "calls_total", "h", "model,error_type", NULL, 0);
    aq_prom_add(aq_prom_with(c, (const char *[]){"m", ""}), 1);
    aq_prom_add(aq_prom_with(c, (const char *[]){"m", NULL}), 1); /* NULL reads as "": the same series */
    aq_prom_add(aq_prom_with(c, (const char *[]){"m", "timeout"}), 1);
    aq_prom_add(aq_prom_with(c, (const char *[]){"", ""}), 1);
    expect_text("# HELP calls_total h\n# TYPE calls_total counter\n"
                "calls_total{model=\"m\"} 2\ncalls_total{model=\"m\",error_type=\"timeout\"} 1\ncalls_total 1\n");
}
END_TEST

START_TEST(histogram_buckets_sum_and_count)
{
    const double b[] = {0.25, 0.5, 1};
    aq_prom_family *h = aq_prom_family_new(p, AQ_PROM_HISTOGRAM, "d_seconds", "Durations.", "op", b, 3);
    ck_assert_ptr_nonnull(h);
    aq_prom_series *s = aq_prom_with(h, (const char *[]){"chat"});
    /* a bound is inclusive (le); past the last: +Inf only; NaN not counted */
    const double obs[] = {0.125, 0.25, 0.375, 1, 2, 8};
    for (size_t i = 0; i < AQ_ARRAY_LEN(obs); i++) aq_prom_observe(s, obs[i]);
    aq_prom_observe(s, NAN);
    aq_prom_with(h, (const char *[]){"embed"}); /* seen, never observed: all zero */
    expect_text("# HELP d_seconds Durations.\n# TYPE d_seconds histogram\n"
                "d_seconds_bucket{op=\"chat\",le=\"0.25\"} 2\n"
                "d_seconds_bucket{op=\"chat\",le=\"0.5\"} 3\n"
                "d_seconds_bucket{op=\"chat\",le=\"1\"} 4\n"
                "d_seconds_bucket{op=\"chat\",le=\"+Inf\"} 6\n"
                "d_seconds_sum{op=\"chat\"} 11.75\n"
                "d_seconds_count{op=\"chat\"} 6\n"
                "d_seconds_bucket{op=\"embed\",le=\"0.25\"} 0\n"
                "d_seconds_bucket{op=\"embed\",le=\"0.5\"} 0\n"
                "d_seconds_bucket{op=\"embed\",le=\"1\"} 0\n"
                "d_seconds_bucket{op=\"embed\",le=\"+Inf\"} 0\n"
                "d_seconds_sum{op=\"embed\"} 0\n"
                "d_seconds_count{op=\"embed\"} 0\n");
}
END_TEST

START_TEST(histogram_bounds_print_as_written)
{
    /* OpenTelemetry's duration buckets: no binary noise in le */
    const double b[] = {0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92};
    aq_prom_family *h = aq_prom_family_new(p, AQ_PROM_HISTOGRAM, "op_seconds", "o", NULL, b, AQ_ARRAY_LEN(b));
    aq_prom_observe(aq_prom_with(h, NULL), 0.01);
    aq_prom_observe(aq_prom_with(h, NULL), 0.3);
    char *text = aq_prom_text(p);
    ck_assert_msg(strstr(text, "\nop_seconds_bucket{le=\"0.01\"} 1\nop_seconds_bucket{le=\"0.02\"} 1\n") != NULL, "%s", text);
    ck_assert_msg(strstr(text, "\nop_seconds_bucket{le=\"0.16\"} 1\nop_seconds_bucket{le=\"0.32\"} 2\n") != NULL, "%s", text);
    ck_assert_msg(strstr(text, "\nop_seconds_bucket{le=\"81.92\"} 2\nop_seconds_bucket{le=\"+Inf\"} 2\n") != NULL, "%s", text);
    ck_assert_msg(strstr(text, "\nop_seconds_sum 0.31\nop_seconds_count 2\n") != NULL, "%s", text);
    free(text);
}
END_TEST

START_TEST(histogram_without_labels_and_large_bounds)
{
    /* OpenTelemetry's token buckets: integers up to 2^26 print whole */
    const double b[] = {1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864};
    aq_prom_family *h = aq_prom_family_new(p, AQ_PROM_HISTOGRAM, "tok", "t", NULL, b, AQ_ARRAY_LEN(b));
    aq_prom_series *s = aq_prom_with(h, NULL);
    aq_prom_observe(s, 100);
    aq_prom_observe(s, 1e9);
    char *text = aq_prom_text(p);
    ck_assert_ptr_nonnull(strstr(text, "\ntok_bucket{le=\"64\"} 0\ntok_bucket{le=\"256\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "\ntok_bucket{le=\"67108864\"} 1\ntok_bucket{le=\"+Inf\"} 2\n"));
    ck_assert_ptr_nonnull(strstr(text, "\ntok_sum 1000000100\ntok_count 2\n"));
    free(text);
}
END_TEST

START_TEST(many_series_are_found_again)
{
    aq_prom_family *c = aq_prom_family_new(p, AQ_PROM_COUNTER, "many_total", "h", "a,b", NULL, 0);
    enum { N = 2000 };
    static aq_prom_series *made[N];
    char a[16], b[16];
    for (int i = 0; i < N; i++) {
        snprintf(a, sizeof a, "%d", i % 37);
        snprintf(b, sizeof b, "%d", i);
        made[i] = aq_prom_with(c, (const char *[]){a, b});
        aq_prom_add(made[i], i);
    }
    /* ("1", "23") and ("12", "3") hash apart and stay apart */
    aq_prom_series *x = aq_prom_with(c, (const char *[]){"1", "23"}), *y = aq_prom_with(c, (const char *[]){"12", "3"});
    ck_assert_ptr_ne(x, y);
    for (int i = 0; i < N; i++) { /* the index grew many times: the same series come back */
        snprintf(a, sizeof a, "%d", i % 37);
        snprintf(b, sizeof b, "%d", i);
        ck_assert_ptr_eq(aq_prom_with(c, (const char *[]){a, b}), made[i]);
    }
    char *text = aq_prom_text(p);
    ck_assert_ptr_nonnull(strstr(text, "\nmany_total{a=\"1\",b=\"1999\"} 1999\n"));
    free(text);
}
END_TEST

START_TEST(wrong_definitions_are_refused)
{
    const double up[] = {1, 2}, down[] = {2, 1}, inf[] = {1, INFINITY};
    ck_assert_ptr_nonnull(aq_prom_family_new(p, AQ_PROM_COUNTER, "ok_total", "h", "a,b_2", NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "ok_total", "again", NULL, NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "9lives", "h", NULL, NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "bad-name", "h", NULL, NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "l1", "h", "a,", NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "l2", "h", "a,a", NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "l3", "h", "__x", NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "l4", "h", "a:b", NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_COUNTER, "l5", "h", "a,b,c,d,e,f,g,h,i", NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_HISTOGRAM, "h1", "h", "le", up, 2));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_HISTOGRAM, "h2", "h", NULL, down, 2));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_HISTOGRAM, "h3", "h", NULL, inf, 2));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_HISTOGRAM, "h4", "h", NULL, NULL, 0));
    ck_assert_ptr_null(aq_prom_family_new(p, AQ_PROM_GAUGE, "g1", "h", NULL, up, 2));
    ck_assert_ptr_nonnull(aq_prom_family_new(p, AQ_PROM_GAUGE, "ns:g", "h", "le", NULL, 0)); /* le is only a histogram's */
    /* what was refused left nothing behind */
    expect_text("# HELP ok_total h\n# TYPE ok_total counter\n# HELP ns:g h\n# TYPE ns:g gauge\n");
}
END_TEST

int main(void)
{
    const TTest *core[] = {counters_and_gauges_with_help_and_type, numbers_print_short_and_exact,
                           label_values_and_help_are_escaped, empty_label_values_are_left_out,
                           histogram_buckets_sum_and_count, histogram_bounds_print_as_written,
                           histogram_without_labels_and_large_bounds};
    const TTest *limits[] = {many_series_are_found_again};
    const TTest *errors[] = {wrong_definitions_are_refused};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .setup = setup, .teardown = teardown},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .setup = setup, .teardown = teardown},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .setup = setup, .teardown = teardown},
    };
    return aq_test_run(aq_test_suite("prom", tcases, AQ_ARRAY_LEN(tcases)));
}
