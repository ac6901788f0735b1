/* task.c — the task message model (see task.h): validation of a body and
 * its properties against design.md's message table, the body form for
 * publishing, and UUIDs.
 *
 * Every check stops at the first problem and writes one message that names
 * the field and the rule, in the form "<field>: must be <rule> (got <what>)"
 * where it fits, so users, logs and the dead_letters table all read the
 * same sentence. Values echoed from the message are cut short and made
 * printable: a hostile body must not be able to put megabytes, control
 * characters or broken UTF-8 into a log line or a database row. */
#include "agentq/task.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

/* Year 9999: a larger AMQP timestamp is a broken producer clock, and
 * multiplying it into microseconds could overflow. */
#define TIMESTAMP_MAX 253402300799LL
#define EXCERPT_MAX 48

static const char *const known_fields[] = {
    "task_id", "user_id", "goal", "max_steps", "budget_usd",
    "timeout_seconds", "skills", "model", "metadata", "wait_timeout_seconds", "temperature",
};

/* ---- text helpers ------------------------------------------------------ */

/* Length of the well-formed UTF-8 sequence at s (n bytes available), or 0.
 * Rejects overlong forms, surrogates and code points above U+10FFFF, the
 * same set PostgreSQL refuses. */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) return 0;
    if (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) return 0;
    return len;
}

static bool utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t l = utf8_seq_len(p + i, n - i);
        if (l == 0) return false;
        i += l;
    }
    return true;
}

/* Makes a NUL-terminated buffer safe to log and store: bytes that are not
 * part of well-formed UTF-8 (including a sequence cut by truncation) and
 * control characters become '?'. Same length, so it works in place. */
static void make_printable(char *buf)
{
    unsigned char *p = (unsigned char *)buf;
    size_t n = strlen(buf);
    size_t i = 0;
    while (i < n) {
        size_t l = utf8_seq_len(p + i, n - i);
        if (l == 0 || (l == 1 && (p[i] < 0x20 || p[i] == 0x7f))) {
            p[i] = '?';
            l = 1;
        }
        i += l;
    }
}

/* Copies at most EXCERPT_MAX bytes of s to dst, cut on a character
 * boundary, with "..." when cut. */
static void excerpt(char *dst, size_t dstsize, const char *s, size_t n)
{
    size_t take = n;
    bool cut = false;
    if (take > EXCERPT_MAX) {
        take = EXCERPT_MAX;
        while (take > 0 && ((unsigned char)s[take] & 0xc0) == 0x80) take--;
        cut = true;
    }
    snprintf(dst, dstsize, "%.*s%s", (int)take, s, cut ? "..." : "");
}

static const char *type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "object";
    case JSON_ARRAY: return "array";
    case JSON_STRING: return "string";
    case JSON_INTEGER:
    case JSON_REAL: return "number";
    case JSON_TRUE:
    case JSON_FALSE: return "boolean";
    case JSON_NULL: return "null";
    }
    return "unknown";
}

/* The shortest text that reads back as d, in plain notation for everyday
 * magnitudes, with ".0" on whole numbers so a real stays recognisable as
 * one ("got 3.0" for an integer field). */
static void format_real(char *buf, size_t n, double d)
{
    double a = fabs(d);
    bool plain = a == 0 || (a >= 1e-4 && a < 1e15);
    for (int prec = plain ? 0 : 1; prec <= (plain ? 24 : 17); prec++) {
        snprintf(buf, n, plain ? "%.*f" : "%.*g", prec, d);
        if (strtod(buf, NULL) == d) break;
    }
    if (!strpbrk(buf, ".eEni")) {
        size_t l = strlen(buf);
        if (l + 3 <= n) memcpy(buf + l, ".0", 3);
    }
}

/* "got" text for a number field: the value when it is a number, else the
 * type. */
static void got_number(char *buf, size_t n, const json_t *v)
{
    if (json_is_integer(v))
        snprintf(buf, n, "%lld", (long long)json_integer_value(v));
    else if (json_is_real(v))
        format_real(buf, n, json_real_value(v));
    else
        snprintf(buf, n, "%s", type_name(v));
}

/* ---- errors ------------------------------------------------------------ */

AQ_PRINTF(3, 4)
static int fail(aq_task_error *e, const char *field, const char *fmt, ...)
{
    if (!e) return AQ_EINVAL;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    make_printable(e->message);
    snprintf(e->field, sizeof e->field, "%s", field);
    make_printable(e->field);
    return AQ_EINVAL;
}

/* ---- lists and UUIDs --------------------------------------------------- */

/* True if `name` (n bytes) is an entry of the comma-separated `list`;
 * blanks around entries are ignored. */
static bool list_has(const char *list, const char *name, size_t n)
{
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == '\t') p++;
        const char *start = p;
        while (*p && *p != ',') p++;
        const char *end = p;
        while (end > start && (end[-1] == ' ' || end[-1] == '\t')) end--;
        if ((size_t)(end - start) == n && n > 0 && memcmp(start, name, n) == 0)
            return true;
        if (*p == ',') p++;
    }
    return false;
}

static bool is_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static bool uuid_valid_n(const char *s, size_t n)
{
    if (n != AQ_TASK_ID_LEN) return false;
    for (size_t i = 0; i < AQ_TASK_ID_LEN; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-') return false;
        } else if (!is_hex(s[i])) {
            return false;
        }
    }
    return true;
}

bool aq_task_uuid_valid(const char *s)
{
    return s && uuid_valid_n(s, strnlen(s, AQ_TASK_ID_LEN + 1));
}

static void uuid_copy_lower(char dst[AQ_TASK_ID_LEN + 1], const char *src)
{
    for (size_t i = 0; i < AQ_TASK_ID_LEN; i++) {
        char c = src[i];
        dst[i] = (c >= 'A' && c <= 'F') ? (char)(c - 'A' + 'a') : c;
    }
    dst[AQ_TASK_ID_LEN] = '\0';
}

static bool read_urandom(unsigned char *buf, size_t n)
{
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    return got == n;
}

static void random_bytes(unsigned char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom(buf + got, n - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    if (got == n || read_urandom(buf, n)) return;
    /* No kernel randomness (a seccomp sandbox without getrandom and no
     * /dev): an id must still be unique, not secret, so mix the clocks,
     * the pid and a counter through splitmix64. */
    static uint64_t counter;
    uint64_t x = (uint64_t)aq_now_us() ^ ((uint64_t)aq_mono_us() << 21) ^
                 ((uint64_t)getpid() << 42) ^ ++counter * 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < n; i++) {
        if (i % 8 == 0) {
            x += 0x9e3779b97f4a7c15ULL;
            uint64_t z = x;
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
            x = z ^ (z >> 31);
        }
        buf[i] = (unsigned char)(x >> ((i % 8) * 8));
    }
}

void aq_task_uuid_generate(char out[AQ_TASK_ID_LEN + 1])
{
    unsigned char b[16];
    random_bytes(b, sizeof b);
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40); /* version 4 */
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    snprintf(out, AQ_TASK_ID_LEN + 1,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
             b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* ---- fields ------------------------------------------------------------ */

/* Checks that v is a string a C string can hold and that is valid UTF-8
 * (a json_t built in memory need not be either). Returns its length, or -1
 * after filling the error: `label` names the value in the message
 * ("skills[2]"), `field` is what the error records ("skills"). */
static long string_field(const json_t *v, const char *field, const char *label,
                         const char *rule, aq_task_error *e)
{
    if (!json_is_string(v)) {
        fail(e, field, "%s: must be %s (got %s)", label, rule, type_name(v));
        return -1;
    }
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (strlen(s) != n) {
        fail(e, field, "%s: must not contain NUL characters", label);
        return -1;
    }
    if (!utf8_valid(s, n)) {
        fail(e, field, "%s: must be valid UTF-8", label);
        return -1;
    }
    return (long)n;
}

static int parse_string(const json_t *body, const char *field, size_t max,
                        char **dst, aq_task_error *e)
{
    const json_t *v = json_object_get(body, field);
    if (!v) return fail(e, field, "%s: required field is missing", field);
    char rule[64];
    snprintf(rule, sizeof rule, "a string of 1 to %zu bytes", max);
    long n = string_field(v, field, field, rule, e);
    if (n < 0) return AQ_EINVAL;
    if (n == 0 || (size_t)n > max)
        return fail(e, field, "%s: must be %s (got %ld bytes)", field, rule, n);
    *dst = aq_xstrndup(json_string_value(v), (size_t)n);
    return AQ_OK;
}

static int parse_task_id(const json_t *body, const aq_task_props *props,
                         aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "task_id");
    if (v) {
        const char *rule = "a UUID like 0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f";
        long n = string_field(v, "task_id", "task_id", rule, e);
        if (n < 0) return AQ_EINVAL;
        const char *s = json_string_value(v);
        if (!uuid_valid_n(s, (size_t)n)) {
            char ex[EXCERPT_MAX + 8];
            excerpt(ex, sizeof ex, s, (size_t)n);
            return fail(e, "task_id", "task_id: must be %s (got '%s')", rule, ex);
        }
        uuid_copy_lower(t->task_id, s);
    } else if (props && aq_task_uuid_valid(props->message_id)) {
        uuid_copy_lower(t->task_id, props->message_id);
    } else {
        aq_task_uuid_generate(t->task_id);
        t->id_generated = true;
    }
    return AQ_OK;
}

static int parse_max_steps(const json_t *body, aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "max_steps");
    t->max_steps = AQ_TASK_MAX_STEPS_DEFAULT;
    if (!v) return AQ_OK;
    if (json_is_integer(v) && json_integer_value(v) >= 1 &&
        json_integer_value(v) <= AQ_TASK_MAX_STEPS_MAX) {
        t->max_steps = (int)json_integer_value(v);
        return AQ_OK;
    }
    char got[64];
    got_number(got, sizeof got, v);
    return fail(e, "max_steps", "max_steps: must be an integer from 1 to %d (got %s)",
                AQ_TASK_MAX_STEPS_MAX, got);
}

static int parse_budget(const json_t *body, aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "budget_usd");
    t->budget_usd = AQ_TASK_BUDGET_DEFAULT;
    if (!v) return AQ_OK;
    double d = json_is_number(v) ? json_number_value(v) : -1;
    if (!json_is_number(v) || !isfinite(d) || d < 0) {
        char got[64];
        got_number(got, sizeof got, v);
        return fail(e, "budget_usd", "budget_usd: must be a number >= 0 (got %s)", got);
    }
    t->budget_usd = d + 0.0; /* folds -0.0 into 0.0 */
    return AQ_OK;
}

static int parse_timeout(const json_t *body, aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "timeout_seconds");
    /* No bound from the broker's consumer_timeout: a long session hands
     * itself over to a new delivery (agent.h). */
    double max = AQ_TASK_TIMEOUT_MAX;
    t->timeout_seconds = AQ_TASK_TIMEOUT_DEFAULT;
    if (!v) return AQ_OK;
    double d = json_is_number(v) ? json_number_value(v) : -1;
    if (!json_is_number(v) || !(d > 0 && d <= max)) {
        char got[64];
        got_number(got, sizeof got, v);
        return fail(e, "timeout_seconds", "timeout_seconds: must be a number > 0 and <= %g (got %s)", max, got);
    }
    t->timeout_seconds = d;
    return AQ_OK;
}

static int parse_wait_timeout(const json_t *body, aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "wait_timeout_seconds");
    t->wait_timeout_seconds = AQ_TASK_WAIT_TIMEOUT_DEFAULT;
    if (!v) return AQ_OK;
    double d = json_is_number(v) ? json_number_value(v) : -1;
    if (!json_is_number(v) || !(d > 0 && d <= AQ_TASK_WAIT_TIMEOUT_MAX)) {
        char got[64];
        got_number(got, sizeof got, v);
        return fail(e, "wait_timeout_seconds", "wait_timeout_seconds: must be a number > 0 and <= %.0f (got %s)",
                    AQ_TASK_WAIT_TIMEOUT_MAX, got);
    }
    t->wait_timeout_seconds = d;
    return AQ_OK;
}

static int parse_temperature(const json_t *body, aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "temperature");
    t->temperature = -1;
    if (!v) return AQ_OK;
    double d = json_is_number(v) ? json_number_value(v) : -1;
    if (!json_is_number(v) || !(d >= 0 && d <= AQ_TASK_TEMPERATURE_MAX)) {
        char got[64];
        got_number(got, sizeof got, v);
        return fail(e, "temperature", "temperature: must be a number from 0 to %g (got %s)",
                    AQ_TASK_TEMPERATURE_MAX, got);
    }
    t->temperature = d + 0.0; /* folds -0.0 into 0.0 */
    return AQ_OK;
}

static int parse_skills(const json_t *body, const aq_task_limits *limits,
                        aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "skills");
    if (!v) return AQ_OK;
    if (!json_is_array(v))
        return fail(e, "skills", "skills: must be an array of skill names (got %s)",
                    type_name(v));
    size_t n = json_array_size(v);
    if (n == 0)
        return fail(e, "skills", "skills: must name at least one skill "
                    "(omit the field to allow every configured skill)");
    if (n > AQ_TASK_MAX_SKILLS)
        return fail(e, "skills", "skills: must name at most %d skills (got %zu)",
                    AQ_TASK_MAX_SKILLS, n);
    const char *allowed = limits ? limits->skills : NULL;
    t->skills = aq_xcalloc(n, sizeof *t->skills);
    for (size_t i = 0; i < n; i++) {
        const json_t *item = json_array_get(v, i);
        char label[32];
        snprintf(label, sizeof label, "skills[%zu]", i);
        long len = string_field(item, "skills", label, "a skill name string", e);
        if (len < 0) return AQ_EINVAL;
        const char *name = json_string_value(item);
        char ex[EXCERPT_MAX + 8];
        excerpt(ex, sizeof ex, name, (size_t)len);
        if (len == 0)
            return fail(e, "skills", "%s: must be a skill name (got an empty string)", label);
        if (allowed && !list_has(allowed, name, (size_t)len))
            return fail(e, "skills", "skills: '%s' is not a configured skill (configured: %s)",
                        ex, allowed[0] ? allowed : "none");
        for (int j = 0; j < t->n_skills; j++)
            if (strcmp(t->skills[j], name) == 0)
                return fail(e, "skills", "skills: '%s' is listed more than once", ex);
        t->skills[t->n_skills++] = aq_xstrndup(name, (size_t)len);
    }
    return AQ_OK;
}

static int parse_model(const json_t *body, const aq_task_limits *limits,
                       aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "model");
    const char *models = limits ? limits->models : NULL;
    const char *def = limits ? limits->default_model : NULL;
    if (!v) {
        if (def) {
            t->model = aq_xstrdup(def);
            t->model_default = true;
        }
        return AQ_OK;
    }
    long len = string_field(v, "model", "model", "a model name string", e);
    if (len < 0) return AQ_EINVAL;
    const char *name = json_string_value(v);
    if (len == 0)
        return fail(e, "model", "model: must be a model name (got an empty string)");
    bool ok = models == NULL && def == NULL;
    if (!ok && models && list_has(models, name, (size_t)len)) ok = true;
    if (!ok && def && strcmp(def, name) == 0) ok = true;
    if (!ok) {
        char ex[EXCERPT_MAX + 8];
        excerpt(ex, sizeof ex, name, (size_t)len);
        /* the default is allowed even when the list omits it: say so */
        bool def_listed = def && models && list_has(models, def, strlen(def));
        const char *extra = def && !def_listed ? def : "";
        const char *list = models ? models : "";
        return fail(e, "model", "model: '%s' is not a configured model (configured: %s%s%s)",
                    ex, list, list[0] && extra[0] ? "," : "", extra);
    }
    t->model = aq_xstrndup(name, (size_t)len);
    return AQ_OK;
}

static int parse_metadata(const json_t *body, aq_task *t, aq_task_error *e)
{
    const json_t *v = json_object_get(body, "metadata");
    if (!v) return AQ_OK;
    if (!json_is_object(v))
        return fail(e, "metadata", "metadata: must be an object (got %s)", type_name(v));
    /* A copy, not a shared reference: the caller's body may change after
     * this returns, and the task must not change with it. */
    t->metadata = json_deep_copy(v);
    if (!t->metadata) aq_oom("task metadata");
    return AQ_OK;
}

static int parse_props(const aq_task_props *props, aq_task *t, aq_task_error *e)
{
    aq_task_props none = {0};
    if (!props) props = &none;

    t->priority = props->priority < 0 ? 0
                : props->priority > AQ_TASK_PRIORITY_MAX ? AQ_TASK_PRIORITY_MAX
                : props->priority;

    t->expiration_ms = -1;
    if (props->expiration) {
        const char *s = props->expiration;
        int64_t ms = 0;
        bool ok = *s != '\0';
        for (; *s && ok; s++) {
            if (*s < '0' || *s > '9' || ms > (INT64_MAX - (*s - '0')) / 10) ok = false;
            else ms = ms * 10 + (*s - '0');
        }
        if (!ok) {
            char ex[EXCERPT_MAX + 8];
            excerpt(ex, sizeof ex, props->expiration, strlen(props->expiration));
            return fail(e, "expiration",
                        "expiration: must be a whole number of milliseconds (got '%s')", ex);
        }
        t->expiration_ms = ms;
    }

    if (props->timestamp > 0 && props->timestamp <= TIMESTAMP_MAX)
        t->enqueued_at_us = props->timestamp * 1000000;
    else
        t->enqueued_at_us = aq_now_us();
    t->user_weight = 1;
    return AQ_OK;
}

/* Fills e->task_id with the id the message names, if it names a valid one,
 * before any check can fail: the worker records rejected tasks under it. */
static void note_task_id(const json_t *body, const aq_task_props *props, aq_task_error *e)
{
    if (!e) return;
    const json_t *v = body ? json_object_get(body, "task_id") : NULL;
    if (json_is_string(v) && uuid_valid_n(json_string_value(v), json_string_length(v)))
        uuid_copy_lower(e->task_id, json_string_value(v));
    else if (!v && props && aq_task_uuid_valid(props->message_id))
        uuid_copy_lower(e->task_id, props->message_id);
}

static void error_reset(aq_task_error *e)
{
    if (!e) return;
    e->message[0] = '\0';
    e->field[0] = '\0';
    e->task_id[0] = '\0';
}

static int check_unknown(const json_t *body, aq_task_error *e)
{
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)body, key, v) {
        bool known = false;
        for (size_t i = 0; i < AQ_ARRAY_LEN(known_fields) && !known; i++)
            known = strcmp(key, known_fields[i]) == 0;
        if (!known) {
            char ex[EXCERPT_MAX + 8];
            excerpt(ex, sizeof ex, key, strlen(key));
            /* the error must name something even for a key "" */
            return fail(e, ex[0] ? ex : "(empty name)",
                        "unknown field '%s' (allowed: task_id, user_id, goal, max_steps, "
                        "budget_usd, timeout_seconds, skills, model, metadata, wait_timeout_seconds, temperature)", ex);
        }
    }
    return AQ_OK;
}

int aq_task_from_json(const json_t *body, const aq_task_props *props,
                      const aq_task_limits *limits, aq_task **out,
                      aq_task_error *e)
{
    *out = NULL;
    error_reset(e);
    if (!json_is_object(body)) {
        note_task_id(NULL, props, e);
        return fail(e, "body", "body: must be a JSON object (got %s)",
                    body ? type_name(body) : "nothing");
    }
    note_task_id(body, props, e);

    aq_task *t = aq_xcalloc(1, sizeof *t);
    int rc = check_unknown(body, e);
    if (rc == AQ_OK) rc = parse_task_id(body, props, t, e);
    if (rc == AQ_OK) rc = parse_string(body, "user_id", AQ_TASK_USER_ID_MAX, &t->user_id, e);
    if (rc == AQ_OK) rc = parse_string(body, "goal", AQ_TASK_GOAL_MAX, &t->goal, e);
    if (rc == AQ_OK) rc = parse_max_steps(body, t, e);
    if (rc == AQ_OK) rc = parse_budget(body, t, e);
    if (rc == AQ_OK) rc = parse_timeout(body, t, e);
    if (rc == AQ_OK) rc = parse_wait_timeout(body, t, e);
    if (rc == AQ_OK) rc = parse_temperature(body, t, e);
    if (rc == AQ_OK) rc = parse_skills(body, limits, t, e);
    if (rc == AQ_OK) rc = parse_model(body, limits, t, e);
    if (rc == AQ_OK) rc = parse_metadata(body, t, e);
    if (rc == AQ_OK) rc = parse_props(props, t, e);
    if (rc != AQ_OK) {
        aq_task_free(t);
        return rc;
    }
    *out = t;
    return AQ_OK;
}

int aq_task_parse(const char *body, size_t len, const aq_task_props *props,
                  const aq_task_limits *limits, aq_task **out, aq_task_error *e)
{
    *out = NULL;
    error_reset(e);
    json_error_t je;
    /* JSON_DECODE_ANY so a bare 42 or [] gets "must be a JSON object"
     * rather than jansson's "'[' or '{' expected". */
    json_t *root = json_loadb(body ? body : "", len,
                              JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!root) {
        note_task_id(NULL, props, e);
        if (len == 0)
            return fail(e, "body", "body is not valid JSON: the body is empty");
        if (json_error_code(&je) == json_error_invalid_utf8)
            return fail(e, "body", "body is not valid UTF-8: %s at line %d column %d", je.text, je.line,
                        je.column);
        return fail(e, "body", "body is not valid JSON: %s at line %d column %d",
                    je.text, je.line, je.column);
    }
    int rc = aq_task_from_json(root, props, limits, out, e);
    json_decref(root);
    return rc;
}

static void set_new(json_t *obj, const char *key, json_t *v)
{
    if (!v || json_object_set_new(obj, key, v) != 0) aq_oom("task JSON");
}

json_t *aq_task_to_json(const aq_task *t)
{
    json_t *o = json_object();
    if (!o) aq_oom("task JSON");
    set_new(o, "task_id", json_string(t->task_id));
    set_new(o, "user_id", json_string(t->user_id));
    set_new(o, "goal", json_string(t->goal));
    set_new(o, "max_steps", json_integer(t->max_steps));
    set_new(o, "budget_usd", json_real(t->budget_usd));
    set_new(o, "timeout_seconds", json_real(t->timeout_seconds));
    if (t->wait_timeout_seconds != AQ_TASK_WAIT_TIMEOUT_DEFAULT)
        set_new(o, "wait_timeout_seconds", json_real(t->wait_timeout_seconds));
    if (t->temperature >= 0) set_new(o, "temperature", json_real(t->temperature));
    if (t->n_skills > 0) {
        json_t *a = json_array();
        if (!a) aq_oom("task JSON");
        for (int i = 0; i < t->n_skills; i++)
            if (json_array_append_new(a, json_string(t->skills[i])) != 0)
                aq_oom("task JSON");
        set_new(o, "skills", a);
    }
    if (t->model && !t->model_default) set_new(o, "model", json_string(t->model));
    if (t->metadata) set_new(o, "metadata", json_deep_copy(t->metadata));
    return o;
}

bool aq_task_skill_allowed(const aq_task *t, const char *name)
{
    if (!name) return false;
    if (t->n_skills == 0) return true;
    for (int i = 0; i < t->n_skills; i++)
        if (strcmp(t->skills[i], name) == 0) return true;
    return false;
}

void aq_task_free(aq_task *t)
{
    if (!t) return;
    free(t->user_id);
    free(t->goal);
    for (int i = 0; i < t->n_skills; i++) free(t->skills[i]);
    free(t->skills);
    free(t->model);
    json_decref(t->metadata);
    free(t);
}
