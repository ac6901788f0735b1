/* log.c — JSON-lines logger with secret masking (see log.h). Owns the
 * process-wide log level, worker id and the list of registered secrets; it
 * does not own stderr. */
#include "agentq/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

int aq__log_min_level = AQ_LOG_INFO;

#define AQ_LOG_MAX_SECRETS 32
#define AQ_LOG_LINE_MAX 8192

static char *log_worker_id;
static char *log_secrets[AQ_LOG_MAX_SECRETS];
static int log_nsecrets;
static int log_fd = 2;

static const char *const level_names[] = {"debug", "info", "warn", "error", "fatal"};

int aq_log_level_parse(const char *name)
{
    if (!name) return -1;
    if (!strcasecmp(name, "warning")) return AQ_LOG_WARN;
    for (int i = 0; i < (int)AQ_ARRAY_LEN(level_names); i++)
        if (!strcasecmp(name, level_names[i])) return i;
    return -1;
}

const char *aq_log_level_name(aq_log_level level)
{
    if ((int)level < 0 || (int)level >= (int)AQ_ARRAY_LEN(level_names)) return "info";
    return level_names[level];
}

void aq_log_set_level(aq_log_level level) { aq__log_min_level = (int)level; }

void aq_log_set_worker_id(const char *id)
{
    free(log_worker_id);
    log_worker_id = id ? aq_xstrdup(id) : NULL;
}

void aq_log_add_secret(const char *secret)
{
    if (!secret || strlen(secret) < 4 || log_nsecrets >= AQ_LOG_MAX_SECRETS) return;
    for (int i = 0; i < log_nsecrets; i++)
        if (!strcmp(log_secrets[i], secret)) return;
    log_secrets[log_nsecrets++] = aq_xstrdup(secret);
}

void aq_log_set_fd(int fd) { log_fd = fd; }

/* Appends with truncation; returns the new length. */
static size_t put(char *out, size_t len, size_t cap, const char *s, size_t n)
{
    if (len + 1 >= cap) return len;
    if (n > cap - 1 - len) n = cap - 1 - len;
    memcpy(out + len, s, n);
    out[len + n] = '\0';
    return len + n;
}

/* Length of a URL password at `p` (just after "scheme://user:"), or 0. */
static size_t url_password_len(const char *p)
{
    size_t n = strcspn(p, "@/ \t\n\"'");
    return p[n] == '@' ? n : 0;
}

void aq_log_redact(const char *in, char *out, size_t outlen)
{
    size_t len = 0;
    if (!outlen) return;
    out[0] = '\0';
    const char *p = in ? in : "";
    while (*p) {
        int matched = 0;
        for (int i = 0; i < log_nsecrets; i++) {
            size_t sl = strlen(log_secrets[i]);
            if (!strncmp(p, log_secrets[i], sl)) {
                len = put(out, len, outlen, "***", 3);
                p += sl;
                matched = 1;
                break;
            }
        }
        if (matched) continue;
        /* scheme://user:password@host */
        if (p[0] == ':' && p[1] == '/' && p[2] == '/') {
            const char *user = p + 3;
            size_t ul = strcspn(user, ":@/ \t\n\"'");
            if (user[ul] == ':') {
                size_t pl = url_password_len(user + ul + 1);
                if (pl) {
                    len = put(out, len, outlen, p, 3 + ul + 1);
                    len = put(out, len, outlen, "***", 3);
                    p = user + ul + 1 + pl;
                    continue;
                }
            }
        }
        /* libpq keyword form: password=secret or password='se cret' */
        if (!strncasecmp(p, "password=", 9)) {
            len = put(out, len, outlen, p, 9);
            len = put(out, len, outlen, "***", 3);
            p += 9;
            if (*p == '\'') {
                p++;
                while (*p && *p != '\'') p += (*p == '\\' && p[1]) ? 2 : 1;
                if (*p) p++;
            } else {
                p += strcspn(p, " \t\n\"");
            }
            continue;
        }
        len = put(out, len, outlen, p, 1);
        p++;
    }
}

/* Appends `s` as a JSON string body (escaped, no quotes). */
static size_t put_json(char *out, size_t len, size_t cap, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        switch (*p) {
        case '"': len = put(out, len, cap, "\\\"", 2); break;
        case '\\': len = put(out, len, cap, "\\\\", 2); break;
        case '\n': len = put(out, len, cap, "\\n", 2); break;
        case '\r': len = put(out, len, cap, "\\r", 2); break;
        case '\t': len = put(out, len, cap, "\\t", 2); break;
        default:
            if (*p < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *p);
                len = put(out, len, cap, esc, 6);
            } else {
                len = put(out, len, cap, (const char *)p, 1);
            }
        }
    }
    return len;
}

static size_t put_field(char *out, size_t len, size_t cap, const char *key, const char *val)
{
    char clean[1024];
    if (!val) return len;
    aq_log_redact(val, clean, sizeof clean);
    len = put(out, len, cap, ",\"", 2);
    len = put(out, len, cap, key, strlen(key));
    len = put(out, len, cap, "\":\"", 3);
    len = put_json(out, len, cap, clean);
    return put(out, len, cap, "\"", 1);
}

void aq__log(aq_log_level level, const char *task_id, const char *user_id, const char *fmt, ...)
{
    int saved_errno = errno;
    char msg[AQ_LOG_LINE_MAX / 2], clean[AQ_LOG_LINE_MAX / 2], line[AQ_LOG_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    aq_log_redact(msg, clean, sizeof clean);

    struct timespec ts;
    struct tm tm;
    char tbuf[40];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t tl = strftime(tbuf, sizeof tbuf, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(tbuf + tl, sizeof tbuf - tl, ".%06ldZ", (long)(ts.tv_nsec / 1000));

    size_t len = 0, cap = sizeof line - 2; /* room for "}\n" */
    line[0] = '\0';
    len = put(line, len, cap, "{\"ts\":\"", 7);
    len = put(line, len, cap, tbuf, strlen(tbuf));
    len = put(line, len, cap, "\",\"level\":\"", 11);
    const char *ln = aq_log_level_name(level);
    len = put(line, len, cap, ln, strlen(ln));
    len = put(line, len, cap, "\",\"msg\":\"", 9);
    len = put_json(line, len, cap, clean);
    len = put(line, len, cap, "\"", 1);
    len = put_field(line, len, cap, "worker_id", log_worker_id);
    len = put_field(line, len, cap, "task_id", task_id);
    len = put_field(line, len, cap, "user_id", user_id);
    line[len++] = '}';
    line[len++] = '\n';
    ssize_t w = write(log_fd, line, len);
    (void)w;
    errno = saved_errno;
}
