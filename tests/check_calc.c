/* check_calc.c — the calculator skill's parser: what the model gets back for
 * good expressions, the exact error text it gets for bad ones (it reads and
 * acts on those), and that hostile sizes and nesting are refused, not
 * crashed on. */
#include "agentq/calc.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SENTINEL 12345.678

/* Macros, not functions, so a failure names the test line. */
#define EVAL_OK(expr, want) do {                                              \
        double r_ = SENTINEL;                                                 \
        char e_[128] = "";                                                    \
        int rc_ = aq_calc_eval((expr), strlen(expr), &r_, e_, sizeof e_);     \
        ck_assert_msg(rc_ == AQ_OK, "%s: %s", (expr), e_);                   \
        ck_assert_msg(r_ == (want), "%s = %.17g, want %.17g", (expr), r_,     \
                      (double)(want));                                        \
    } while (0)

#define EVAL_ERR_N(expr, n, want) do {                                        \
        double r_ = SENTINEL;                                                 \
        char e_[128] = "";                                                    \
        int rc_ = aq_calc_eval((expr), (n), &r_, e_, sizeof e_);              \
        ck_assert_msg(rc_ == AQ_EINVAL, "accepted bad input, got %g", r_);    \
        ck_assert_str_eq(e_, (want));                                         \
        ck_assert_msg(r_ == SENTINEL, "result written on error");             \
    } while (0)

#define EVAL_ERR(expr, want) EVAL_ERR_N((expr), strlen(expr), (want))

#define FMT_IS(v, want) do {                                                  \
        char b_[AQ_CALC_FMT_LEN];                                             \
        aq_calc_format((v), b_, sizeof b_);                                   \
        ck_assert_str_eq(b_, (want));                                         \
    } while (0)

/* "((((1))))" with `n` pairs; caller frees. */
static char *nested(int n)
{
    char *s = malloc((size_t)n * 2 + 2);
    ck_assert_ptr_nonnull(s);
    memset(s, '(', (size_t)n);
    s[n] = '1';
    memset(s + n + 1, ')', (size_t)n);
    s[2 * n + 1] = '\0';
    return s;
}

/* ---- core --------------------------------------------------------------- */

START_TEST(test_precedence)
{
    EVAL_OK("2+3*4", 14);
    EVAL_OK("(2+3)*4", 20);
    EVAL_OK("10-2*3", 4);
    EVAL_OK("2*3^2", 18);
    EVAL_OK("2+7%3*2", 4);
    EVAL_OK("((2))", 2);
}
END_TEST

START_TEST(test_associativity)
{
    EVAL_OK("2^3^2", 512);
    EVAL_OK("(2^3)^2", 64);
    EVAL_OK("8/4/2", 1);
    EVAL_OK("10-4-3", 3);
    EVAL_OK("100%7%4", 2);
}
END_TEST

START_TEST(test_unary)
{
    EVAL_OK("-3+5", 2);
    EVAL_OK("-(2+3)", -5);
    EVAL_OK("2*-3", -6);
    EVAL_OK("--2", 2);
    EVAL_OK("+4", 4);
    EVAL_OK("3 - -3", 6);
    EVAL_OK("-2^2", -4);
    EVAL_OK("(-2)^2", 4);
    EVAL_OK("2^-1", 0.5);
    EVAL_OK("-2^-2", -0.25);
}
END_TEST

START_TEST(test_modulo_on_doubles)
{
    EVAL_OK("7%3", 1);
    EVAL_OK("7.5%2", 1.5);
    EVAL_OK("-7%3", -1);
    EVAL_OK("7%-3", 1);
}
END_TEST

START_TEST(test_numbers)
{
    EVAL_OK("3.25*4", 13);
    EVAL_OK(".5+.25", 0.75);
    EVAL_OK("5.+1", 6);
    EVAL_OK("007", 7);
    EVAL_OK("1e3", 1000);
    EVAL_OK("2.5E-3", 2.5E-3);
    EVAL_OK("1e+2", 100);
    EVAL_OK(".5e1", 5);
    EVAL_OK("1e-400", 0);
    EVAL_OK("0.1+0.2", 0.1 + 0.2);
}
END_TEST

START_TEST(test_whitespace)
{
    EVAL_OK(" \t2 +\n3 * ( 4 ) \r\n", 14);
    EVAL_OK("- 2 ^ 2", -4);
}
END_TEST

START_TEST(test_len_not_nul)
{
    /* The skill hands over a slice of a JSON string: only `len` counts. */
    double r = 0;
    ck_assert_int_eq(aq_calc_eval("2+3*4 junk", 5, &r, NULL, 0), AQ_OK);
    ck_assert(r == 14);
}
END_TEST

START_TEST(test_format)
{
    FMT_IS(14, "14");
    FMT_IS(-3, "-3");
    FMT_IS(-0.0, "0");
    FMT_IS(2.5, "2.5");
    FMT_IS(0.1 + 0.2, "0.3");
    FMT_IS(1.0 / 3, "0.333333333333333");
    FMT_IS(999999999999999.0, "999999999999999");
    FMT_IS(1e15, "1e+15");
    FMT_IS(-1e15, "-1e+15");
    FMT_IS(1e-7, "1e-07");
    FMT_IS(-1.7976931348623157e308, "-1.79769313486232e+308");
    FMT_IS(INFINITY, "inf");

    /* End to end, what the model sees. */
    double r = 0;
    char b[AQ_CALC_FMT_LEN];
    ck_assert_int_eq(aq_calc_eval("0*-1", 4, &r, NULL, 0), AQ_OK);
    aq_calc_format(r, b, sizeof b);
    ck_assert_str_eq(b, "0");
    ck_assert_int_eq(aq_calc_eval("1/4", 3, &r, NULL, 0), AQ_OK);
    aq_calc_format(r, b, sizeof b);
    ck_assert_str_eq(b, "0.25");

    /* A short buffer truncates but stays terminated. */
    char small[3];
    aq_calc_format(12345, small, sizeof small);
    ck_assert_str_eq(small, "12");
}
END_TEST

/* ---- limits ------------------------------------------------------------- */

START_TEST(test_long_input)
{
    /* "1+1+...+1" padded with a space to exactly the limit is fine... */
    char *s = malloc(AQ_CALC_MAX_LEN + 2);
    ck_assert_ptr_nonnull(s);
    s[0] = '1';
    size_t n = 1;
    while (n + 2 <= AQ_CALC_MAX_LEN) {
        s[n++] = '+';
        s[n++] = '1';
    }
    while (n < AQ_CALC_MAX_LEN) s[n++] = ' ';
    s[n] = '\0';
    ck_assert_uint_eq(strlen(s), AQ_CALC_MAX_LEN);
    EVAL_OK(s, AQ_CALC_MAX_LEN / 2);

    /* ...one byte more is refused before any parsing. */
    s[n++] = '1';
    s[n] = '\0';
    EVAL_ERR(s, "expression too long (4097 bytes, limit 4096)");
    free(s);
}
END_TEST

START_TEST(test_nesting_at_limit)
{
    char *s = nested(AQ_CALC_MAX_DEPTH);
    EVAL_OK(s, 1);
    free(s);
}
END_TEST

START_TEST(test_nesting_too_deep)
{
    char *s = nested(AQ_CALC_MAX_DEPTH + 1);
    EVAL_ERR(s, "expression nested too deep (limit 200) at position 201");
    free(s);

    /* 1000 unclosed '(' : an error, not a stack overflow. */
    s = malloc(1001);
    ck_assert_ptr_nonnull(s);
    memset(s, '(', 1000);
    s[1000] = '\0';
    EVAL_ERR(s, "expression nested too deep (limit 200) at position 201");

    /* Unary signs and '^' chains recurse too. */
    memset(s, '-', 1000);
    EVAL_ERR(s, "expression nested too deep (limit 200) at position 201");
    for (int i = 0; i < 1000; i += 2) {
        s[i] = '2';
        s[i + 1] = '^';
    }
    s[999] = '\0';
    EVAL_ERR(s, "expression nested too deep (limit 200) at position 402");
    free(s);
}
END_TEST

START_TEST(test_non_finite)
{
    EVAL_ERR("1e308*10", "result is not a finite number");
    EVAL_ERR("1e308*10/10", "result is not a finite number");
    EVAL_ERR("-1e308-1e308", "result is not a finite number");
    EVAL_ERR("2^1024", "result is not a finite number");
    EVAL_ERR("0^-1", "result is not a finite number");
    EVAL_ERR("(-8)^(1/3)", "result is not a finite number");
    EVAL_ERR("1e999", "number out of range at position 1");
    EVAL_ERR("2+1e400", "number out of range at position 3");
    EVAL_OK("1.7976931348623157e308", 1.7976931348623157e308);
}
END_TEST

/* ---- errors ------------------------------------------------------------- */

START_TEST(test_division_by_zero)
{
    EVAL_ERR("1/0", "division by zero");
    EVAL_ERR("1/(2-2)", "division by zero");
    EVAL_ERR("0/0", "division by zero");
    EVAL_ERR("5%0", "modulo by zero");
    EVAL_ERR("5%(0*-1)", "modulo by zero");
    /* The first arithmetic error is the one reported. */
    EVAL_ERR("1/0 + 1e308*10", "division by zero");
}
END_TEST

START_TEST(test_syntax_positions)
{
    EVAL_ERR("2 + 3 )", "unexpected ')' at position 7");
    EVAL_ERR("(1+2))", "unexpected ')' at position 6");
    EVAL_ERR("()", "unexpected ')' at position 2");
    EVAL_ERR("2+", "unexpected end of expression");
    EVAL_ERR("(", "unexpected end of expression");
    EVAL_ERR("-", "unexpected end of expression");
    EVAL_ERR("2^", "unexpected end of expression");
    EVAL_ERR("(2+3", "expected ')' at position 5");
    EVAL_ERR("(2 3)", "expected ')' at position 4");
    EVAL_ERR("2 3", "unexpected '3' at position 3");
    EVAL_ERR("2**3", "unexpected '*' at position 3");
    EVAL_ERR("2(3)", "unexpected '(' at position 2");
    EVAL_ERR("abc", "unexpected 'a' at position 1");
    EVAL_ERR(".", "unexpected '.' at position 1");
    EVAL_ERR("1..2", "unexpected '.' at position 3");
    EVAL_ERR("1e", "unexpected 'e' at position 2");
    EVAL_ERR("1e+", "unexpected 'e' at position 2");
    /* strtod would take these; the calculator must not. */
    EVAL_ERR("0x10", "unexpected 'x' at position 2");
    EVAL_ERR("inf", "unexpected 'i' at position 1");
    EVAL_ERR("nan", "unexpected 'n' at position 1");
    EVAL_ERR("", "empty expression");
    EVAL_ERR(" \t\n", "empty expression");
    EVAL_ERR_N("1+\0", 3, "unexpected byte 0x00 at position 3");
    EVAL_ERR("1+\xc3\xa9", "unexpected byte 0xc3 at position 3");
}
END_TEST

START_TEST(test_syntax_beats_arithmetic)
{
    /* The model should fix the expression before the arithmetic. */
    EVAL_ERR("1/0 +", "unexpected end of expression");
    EVAL_ERR("1/0)", "unexpected ')' at position 4");
    EVAL_ERR("1e308*10 (", "unexpected '(' at position 10");
}
END_TEST

START_TEST(test_err_buffer)
{
    double r = SENTINEL;
    /* No buffer at all is allowed... */
    ck_assert_int_eq(aq_calc_eval("1/0", 3, &r, NULL, 0), AQ_EINVAL);
    ck_assert_int_eq(aq_calc_eval(NULL, 0, &r, NULL, 0), AQ_EINVAL);
    ck_assert(r == SENTINEL);
    /* ...and a short one is truncated, terminated. */
    char e[9];
    ck_assert_int_eq(aq_calc_eval("1/0", 3, &r, e, sizeof e), AQ_EINVAL);
    ck_assert_str_eq(e, "division");
}
END_TEST

static Suite *calc_suite(void)
{
    const TTest *core[] = {test_precedence, test_associativity, test_unary, test_modulo_on_doubles,
                           test_numbers, test_whitespace, test_len_not_nul, test_format};
    const TTest *limits[] = {test_long_input, test_nesting_at_limit, test_nesting_too_deep,
                             test_non_finite};
    const TTest *errors[] = {test_division_by_zero, test_syntax_positions,
                             test_syntax_beats_arithmetic, test_err_buffer};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core)},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits)},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors)},
    };
    return aq_test_suite("calc", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void)
{
    return aq_test_run(calc_suite());
}
