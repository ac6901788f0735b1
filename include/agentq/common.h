/* common.h — what every agentq module shares: error codes, attributes,
 * the out-of-memory policy.
 *
 * Errors: a fallible call returns 0 or a negative AQ_E* code; a human
 * message goes into the caller's `err` buffer when one is passed.
 *
 * Out of memory: agentq does not try to limp on without memory. The
 * aq_xmalloc family aborts with a log line; a worker that dies this way is
 * restarted by its supervisor and its unacked deliveries are redelivered,
 * which is the same path as any crash and is covered by the delivery
 * guarantees. Third-party allocations (jansson, libpq) that report NULL are
 * treated the same way through aq_oom(). */
#ifndef AGENTQ_COMMON_H
#define AGENTQ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define AQ_MUSTCHECK __attribute__((warn_unused_result))
#define AQ_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define AQ_NORETURN __attribute__((noreturn))
#define AQ_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

enum {
    AQ_OK = 0,
    AQ_EINVAL = -1,   /* bad input: a field, key or argument is wrong */
    AQ_ENOMEM = -2,
    AQ_EIO = -3,      /* a server or file could not be reached/read */
    AQ_ENOTFOUND = -4,
    AQ_ETIMEDOUT = -5,
    AQ_EAGAIN = -6,   /* try again later (retryable) */
    AQ_ECLOSED = -7,  /* connection or object closed */
    AQ_EPROTO = -8,   /* the peer spoke nonsense */
};

/* Returns a static string naming an AQ_E* code. */
const char *aq_strerror(int code);

/* Aborts the process after logging that `what` could not be allocated. */
AQ_NORETURN void aq_oom(const char *what);

void *aq_xmalloc(size_t n);
void *aq_xcalloc(size_t n, size_t size);
void *aq_xrealloc(void *p, size_t n);
char *aq_xstrdup(const char *s);
char *aq_xstrndup(const char *s, size_t n);

/* snprintf into a caller's error buffer; a NULL buffer is allowed. */
void aq_seterr(char *err, size_t errlen, const char *fmt, ...) AQ_PRINTF(3, 4);

/* Wall clock in microseconds since the epoch, and a monotonic clock in
 * microseconds from an arbitrary origin. */
int64_t aq_now_us(void);
int64_t aq_mono_us(void);

#endif
