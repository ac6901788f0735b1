/* calc.h — the arithmetic behind the agent's `calculator` skill: a
 * recursive-descent parser that evaluates as it parses, in doubles. It owns
 * no state and never evaluates code or runs a shell; the skill layer owns the
 * JSON arguments and the reply.
 *
 * Grammar (whitespace — space, tab, CR, LF, VT, FF — is allowed between
 * any two tokens):
 *
 *     expr    := term (('+' | '-') term)*
 *     term    := unary (('*' | '/' | '%') unary)*
 *     unary   := ('-' | '+') unary | power
 *     power   := primary ('^' unary)?
 *     primary := number | '(' expr ')'
 *     number  := digits ['.' [digits]] [exp] | '.' digits [exp]
 *     exp     := ('e' | 'E') ['+' | '-'] digits
 *
 * So '^' is right-associative and binds tighter than a unary minus on its
 * left (-2^2 = -4, 2^-1 = 0.5), and '%' is C's fmod (the sign follows the
 * dividend: -7 % 3 = -1).
 *
 * Bad input is a value the model sees, never a crash: the error message
 * names the problem and, for syntax errors, its 1-based byte position, e.g.
 * "unexpected ')' at position 7", "expected ')' at position 5",
 * "unexpected end of expression", "division by zero", "modulo by zero",
 * "result is not a finite number". A syntax error anywhere wins over an
 * arithmetic one. */
#ifndef AGENTQ_CALC_H
#define AGENTQ_CALC_H

#include <stddef.h>

#include "agentq/common.h"

/* Longest expression accepted, in bytes. */
#define AQ_CALC_MAX_LEN 4096
/* Deepest nesting accepted: each '(', unary sign and '^' opens a level.
 * Bounds the parser's recursion, so hostile input cannot exhaust the stack. */
#define AQ_CALC_MAX_DEPTH 200
/* A buffer this large always holds aq_calc_format()'s output. */
#define AQ_CALC_FMT_LEN 32

/* Evaluates the `len` bytes at `expr` (borrowed; need not be NUL-terminated;
 * may be NULL when len is 0). On success returns AQ_OK and stores a finite
 * value in *result (borrowed). On any error returns AQ_EINVAL, leaves
 * *result untouched and writes the message into `err` (borrowed, may be
 * NULL). */
int aq_calc_eval(const char *expr, size_t len, double *result,
                 char *err, size_t errlen) AQ_MUSTCHECK;

/* Writes `v` as the model should read it into `out` (borrowed, `outlen`
 * bytes, always NUL-terminated when outlen > 0; AQ_CALC_FMT_LEN is enough):
 * an integral value with |v| < 1e15 without a decimal point ("14", never
 * "-0"), anything else with "%.15g" ("0.3", "1e+15", "inf"). */
void aq_calc_format(double v, char *out, size_t outlen);

#endif
