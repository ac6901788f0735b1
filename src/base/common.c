/* common.c — error strings, the allocation wrappers that carry the
 * out-of-memory policy (see common.h), clocks. */
#include "agentq/common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *aq_strerror(int code)
{
    switch (code) {
    case AQ_OK: return "ok";
    case AQ_EINVAL: return "invalid argument";
    case AQ_ENOMEM: return "out of memory";
    case AQ_EIO: return "input/output error";
    case AQ_ENOTFOUND: return "not found";
    case AQ_ETIMEDOUT: return "timed out";
    case AQ_EAGAIN: return "temporarily unavailable";
    case AQ_ECLOSED: return "closed";
    case AQ_EPROTO: return "protocol error";
    default: return "unknown error";
    }
}

void aq_oom(const char *what)
{
    /* One JSON line straight to stderr: not through the logger, which
     * builds on this module, and with nothing left to allocate. `what` is
     * always a literal of ours (no quotes to escape). */
    char line[256];
    int n = snprintf(line, sizeof line, "{\"level\":\"fatal\",\"msg\":\"out of memory allocating %s\"}\n",
                     what ? what : "memory");
    if (n > 0 && write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1) < 0) {
        /* nothing more to do: abort below */
    }
    abort();
}

void *aq_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) aq_oom("a buffer");
    return p;
}

void *aq_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) aq_oom("a zeroed buffer");
    return p;
}

void *aq_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) aq_oom("a grown buffer");
    return q;
}

char *aq_xstrdup(const char *s)
{
    char *d = strdup(s ? s : "");
    if (!d) aq_oom("a string");
    return d;
}

char *aq_xstrndup(const char *s, size_t n)
{
    char *d = strndup(s ? s : "", n);
    if (!d) aq_oom("a string");
    return d;
}

void aq_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int64_t aq_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t aq_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}
