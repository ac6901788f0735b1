/* calc.c — the calculator skill's parser and evaluator (see calc.h for the
 * grammar and the error contract). It evaluates while it parses, so there is
 * no tree to allocate and nothing to free.
 *
 * Two kinds of error: a syntax error (or too deep nesting, or a literal out
 * of range) stops the parse at once; an arithmetic error is remembered and
 * the parse goes on with NaN, so that a later syntax error still wins — the
 * model should fix its expression before its arithmetic. */
#include "agentq/calc.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct parser {
    const char *s;
    size_t len;
    size_t pos;
    int depth;
    bool failed;               /* a syntax error is in msg; stop */
    bool math_failed;          /* an arithmetic error is in msg; go on */
    char msg[128];
    /* Room to NUL-terminate one numeric literal for strtod without touching
     * the caller's bytes; a literal is never longer than the input. */
    char num[AQ_CALC_MAX_LEN + 1];
};

static double parse_expr(struct parser *p);
static double parse_unary(struct parser *p);

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static void skip_space(struct parser *p)
{
    while (p->pos < p->len && is_space(p->s[p->pos])) p->pos++;
}

/* The next non-space byte, or 0 at the end. The input may hold NUL bytes,
 * so callers that care tell the two apart with at_end(). */
static char peek(struct parser *p)
{
    skip_space(p);
    return p->pos < p->len ? p->s[p->pos] : 0;
}

static bool at_end(struct parser *p)
{
    skip_space(p);
    return p->pos >= p->len;
}

static void fail_unexpected(struct parser *p)
{
    if (p->failed) return;
    p->failed = true;
    if (at_end(p)) {
        snprintf(p->msg, sizeof p->msg, "unexpected end of expression");
        return;
    }
    unsigned char c = (unsigned char)p->s[p->pos];
    if (c >= 0x21 && c < 0x7f)
        snprintf(p->msg, sizeof p->msg, "unexpected '%c' at position %zu", c, p->pos + 1);
    else
        snprintf(p->msg, sizeof p->msg, "unexpected byte 0x%02x at position %zu", c, p->pos + 1);
}

static void fail_math(struct parser *p, const char *what)
{
    if (p->failed || p->math_failed) return;
    p->math_failed = true;
    snprintf(p->msg, sizeof p->msg, "%s", what);
}

/* Every operation funnels its result through here, so an overflow or a NaN
 * (0^-1, (-8)^(1/3), 1e308*10) is reported where it first appears. */
static double checked(struct parser *p, double v)
{
    if (!isfinite(v)) fail_math(p, "result is not a finite number");
    return v;
}

static bool enter(struct parser *p)
{
    if (p->depth >= AQ_CALC_MAX_DEPTH) {
        if (!p->failed) {
            p->failed = true;
            snprintf(p->msg, sizeof p->msg,
                     "expression nested too deep (limit %d) at position %zu",
                     AQ_CALC_MAX_DEPTH, p->pos + 1);
        }
        return false;
    }
    p->depth++;
    return true;
}

static size_t scan_digits(const struct parser *p, size_t i)
{
    while (i < p->len && is_digit(p->s[i])) i++;
    return i;
}

/* Scans the literal by hand and only then hands exactly those bytes to
 * strtod, which alone would also accept "inf", "nan" and hex floats. */
static double parse_number(struct parser *p)
{
    size_t start = p->pos;
    size_t i = scan_digits(p, start);
    size_t int_digits = i - start;
    size_t frac_digits = 0;
    if (i < p->len && p->s[i] == '.') {
        size_t j = scan_digits(p, i + 1);
        frac_digits = j - (i + 1);
        i = j;
    }
    if (int_digits == 0 && frac_digits == 0) {
        fail_unexpected(p);
        return NAN;
    }
    /* An exponent needs digits; "1e" leaves the 'e' to be reported. */
    if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
        size_t j = i + 1;
        if (j < p->len && (p->s[j] == '+' || p->s[j] == '-')) j++;
        size_t k = scan_digits(p, j);
        if (k > j) i = k;
    }

    size_t n = i - start;
    memcpy(p->num, p->s + start, n);
    p->num[n] = '\0';
    char *end = NULL;
    errno = 0;
    double v = strtod(p->num, &end);
    if (end != p->num + n) {
        /* Only a non-C LC_NUMERIC could make strtod stop early. */
        p->failed = true;
        snprintf(p->msg, sizeof p->msg, "bad number at position %zu", start + 1);
        return NAN;
    }
    if (!isfinite(v)) {
        p->failed = true;
        snprintf(p->msg, sizeof p->msg, "number out of range at position %zu", start + 1);
        return NAN;
    }
    /* Underflow (1e-400) is fine: it is as close to the value as a double gets. */
    p->pos = i;
    return v;
}

static double parse_primary(struct parser *p)
{
    char c = peek(p);
    if (!at_end(p) && c == '(') {
        if (!enter(p)) return NAN;
        p->pos++;
        double v = parse_expr(p);
        p->depth--;
        if (p->failed) return NAN;
        if (at_end(p) || peek(p) != ')') {
            p->failed = true;
            snprintf(p->msg, sizeof p->msg, "expected ')' at position %zu", p->pos + 1);
            return NAN;
        }
        p->pos++;
        return v;
    }
    if (!at_end(p) && (is_digit(c) || c == '.')) return parse_number(p);
    fail_unexpected(p);
    return NAN;
}

static double parse_power(struct parser *p)
{
    double base = parse_primary(p);
    if (p->failed) return NAN;
    if (at_end(p) || peek(p) != '^') return base;
    if (!enter(p)) return NAN;
    p->pos++;
    double power = parse_unary(p);
    p->depth--;
    if (p->failed) return NAN;
    return checked(p, pow(base, power));
}

static double parse_unary(struct parser *p)
{
    char c = peek(p);
    if (!at_end(p) && (c == '-' || c == '+')) {
        if (!enter(p)) return NAN;
        p->pos++;
        double v = parse_unary(p);
        p->depth--;
        return c == '-' ? -v : v;
    }
    return parse_power(p);
}

static double parse_term(struct parser *p)
{
    double v = parse_unary(p);
    while (!p->failed && !at_end(p)) {
        char op = peek(p);
        if (op != '*' && op != '/' && op != '%') break;
        p->pos++;
        double r = parse_unary(p);
        if (p->failed) return NAN;
        if (op == '*') {
            v = checked(p, v * r);
        } else if (r == 0) {
            fail_math(p, op == '/' ? "division by zero" : "modulo by zero");
            v = NAN;
        } else {
            v = checked(p, op == '/' ? v / r : fmod(v, r));
        }
    }
    return v;
}

static double parse_expr(struct parser *p)
{
    double v = parse_term(p);
    while (!p->failed && !at_end(p)) {
        char op = peek(p);
        if (op != '+' && op != '-') break;
        p->pos++;
        double r = parse_term(p);
        if (p->failed) return NAN;
        v = checked(p, op == '+' ? v + r : v - r);
    }
    return v;
}

int aq_calc_eval(const char *expr, size_t len, double *result,
                 char *err, size_t errlen)
{
    if (!expr) len = 0;
    if (len > AQ_CALC_MAX_LEN) {
        aq_seterr(err, errlen, "expression too long (%zu bytes, limit %d)",
                  len, AQ_CALC_MAX_LEN);
        return AQ_EINVAL;
    }
    /* Heap, not stack: the literal buffer is 4 KiB and callers may run on
     * small coroutine or thread stacks. */
    struct parser *p = aq_xcalloc(1, sizeof *p);
    p->s = expr;
    p->len = len;
    int rc = AQ_EINVAL;

    if (at_end(p)) {
        aq_seterr(err, errlen, "empty expression");
        goto out;
    }
    double v = parse_expr(p);
    if (!p->failed && !at_end(p)) fail_unexpected(p);
    if (p->failed || p->math_failed) {
        aq_seterr(err, errlen, "%s", p->msg);
        goto out;
    }
    /* -0 is an artefact of IEEE signs; the model should read 0. */
    *result = v == 0 ? 0.0 : v;
    rc = AQ_OK;
out:
    free(p);
    return rc;
}

void aq_calc_format(double v, char *out, size_t outlen)
{
    if (!out || outlen == 0) return;
    if (isfinite(v) && v == trunc(v) && fabs(v) < 1e15) {
        if (v == 0) v = 0.0;
        snprintf(out, outlen, "%.0f", v);
    } else {
        snprintf(out, outlen, "%.15g", v);
    }
}
