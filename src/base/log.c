/* log.c — JSON-lines logger with secret masking (see log.h). Owns the
 * process-wide log level, worker id and the list of registered secrets
 * (with the JSON-escaped forms of each), and the one matcher both masking
 * verbs use; it does not own stderr. */
#include "agentq/log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

int aq__log_min_level = AQ_LOG_INFO;

/* Each secret takes up to three slots: itself and its JSON-escaped forms. */
#define AQ_LOG_MAX_SECRETS 64
#define AQ_LOG_LINE_MAX 8192
/* Shorter secrets are refused, and a cut-off secret shorter than this at
 * the end of a text is left alone: masking "a" everywhere would garble
 * every line. */
#define AQ_LOG_MIN_SECRET 4
#define MASK "***"

static char *log_worker_id;
/* Written under log_secrets_lock, slot first and count after (release);
 * read without a lock up to the count (acquire), so a line logged while a
 * secret is being added sees it or not, never half of it. */
static char *log_secrets[AQ_LOG_MAX_SECRETS];
static size_t log_secret_len[AQ_LOG_MAX_SECRETS];
static atomic_int log_nsecrets;
static pthread_mutex_t log_secrets_lock = PTHREAD_MUTEX_INITIALIZER;
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

/* Under log_secrets_lock. */
static void add_secret_form(const char *form)
{
    int n = atomic_load_explicit(&log_nsecrets, memory_order_relaxed);
    for (int i = 0; i < n; i++)
        if (!strcmp(log_secrets[i], form)) return;
    log_secrets[n] = aq_xstrdup(form);
    log_secret_len[n] = strlen(form);
    atomic_store_explicit(&log_nsecrets, n + 1, memory_order_release);
}

/* `secret` as it reads inside a JSON string: what jansson writes, and with
 * "/" written as "\/" (PHP's default, allowed by JSON) when escape_slash.
 * The caller frees it. */
static char *json_form(const char *secret, bool escape_slash)
{
    char *out = aq_xmalloc(strlen(secret) * 6 + 1);
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)secret; *p; p++) {
        const char *esc = NULL;
        switch (*p) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '/': esc = escape_slash ? "\\/" : NULL; break;
        default: break;
        }
        if (esc) {
            memcpy(out + o, esc, strlen(esc));
            o += strlen(esc);
        } else if (*p < 0x20) {
            o += (size_t)snprintf(out + o, 7, "\\u%04x", *p);
        } else {
            out[o++] = (char)*p;
        }
    }
    out[o] = '\0';
    return out;
}

int aq_log_add_secret(const char *secret)
{
    if (!secret || strlen(secret) < AQ_LOG_MIN_SECRET) return AQ_EINVAL;
    char *plain = json_form(secret, false), *slashed = json_form(secret, true);
    int rc = AQ_OK;
    pthread_mutex_lock(&log_secrets_lock);
    int n = atomic_load_explicit(&log_nsecrets, memory_order_relaxed);
    bool known = false;
    for (int i = 0; i < n && !known; i++) known = !strcmp(log_secrets[i], secret);
    if (known) {
        /* its forms were added with it */
    } else if (n + 3 > AQ_LOG_MAX_SECRETS) {
        rc = AQ_ENOMEM;
    } else {
        add_secret_form(secret);
        add_secret_form(plain);
        add_secret_form(slashed);
    }
    pthread_mutex_unlock(&log_secrets_lock);
    free(plain);
    free(slashed);
    return rc;
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

/* Bytes of a registered secret at p (left bytes remain), the longest one
 * when several match; 0 if none. A text that ends in the start of a
 * secret (AQ_LOG_MIN_SECRET bytes or more) ends in a secret cut by some
 * length limit upstream, and that tail counts as a match too. */
static size_t secret_at(const char *p, size_t left)
{
    int n = atomic_load_explicit(&log_nsecrets, memory_order_acquire);
    size_t best = 0;
    for (int i = 0; i < n; i++) {
        if (*p != log_secrets[i][0]) continue; /* the common case, cheaply */
        size_t sl = log_secret_len[i];
        size_t m = sl <= left ? sl : left;
        if (m > best && (m == sl || m >= AQ_LOG_MIN_SECRET) && memcmp(p, log_secrets[i], m) == 0)
            best = m;
    }
    return best;
}

bool aq_log_has_secret(const char *in, size_t len)
{
    if (atomic_load_explicit(&log_nsecrets, memory_order_acquire) == 0) return false;
    for (size_t i = 0; i < len; i++)
        if (secret_at(in + i, len - i)) return true;
    return false;
}

char *aq_log_mask_secrets(const char *in, size_t len, size_t *out_len)
{
    /* A mask (3 bytes) is never longer than what it replaces (4 or more),
     * so the copy never outgrows the input. */
    char *out = aq_xmalloc(len + 1);
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t m = secret_at(in + i, len - i);
        if (m) {
            memcpy(out + o, MASK, 3);
            o += 3;
            i += m;
        } else {
            out[o++] = in[i++];
        }
    }
    out[o] = '\0';
    if (out_len) *out_len = o;
    return out;
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
    const char *end = p + strlen(p);
    while (*p) {
        size_t sl = secret_at(p, (size_t)(end - p));
        if (sl) {
            len = put(out, len, outlen, MASK, 3);
            p += sl;
            continue;
        }
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
