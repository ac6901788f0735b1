/* skill.c — the tools an agent session can call (see skill.h): the
 * built-in skills, the HTTP skills from the config, their tool definitions,
 * and the life of one call.
 *
 * It owns argument parsing and the text the model reads back. It does not
 * own the transport (http.c: connection reuse, the block_private address
 * guard, limits), the arithmetic (calc.c) or the tools array format
 * (chat.c).
 *
 * Every call completes through one of two paths, both from the loop:
 * results known at once (calculator, current_time, any argument error) are
 * parked on an event made active immediately, so the callback runs on the
 * loop's next pass and never inside aq_skills_call(); HTTP-backed calls
 * complete from the http module's callback. Outstanding calls sit on the
 * set's list so aq_skills_free() can cancel them; a cancelled HTTP call
 * stays allocated until the http module calls back (it always does), and
 * is then freed silently. */
#include "agentq/skill.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/event.h>
#include <jansson.h>

#include "agentq/calc.h"
#include "agentq/chat.h"

/* Longest URL http_get accepts from the model. */
#define URL_MAX 8192
/* Start of an HTTP skill's error body quoted in the tool error. */
#define ERROR_EXCERPT 1024
/* What a body of any size costs before the http module cuts it: HTTP skill
 * replies are shown up to AQ_SKILL_MAX_OUTPUT, so more is never useful. */
#define HTTP_SKILL_MAX_BYTES ((size_t)1 << 20)
/* Widest fixed UTC offset accepted, in minutes (UTC+14 exists). */
#define TZ_MAX_MINUTES (14 * 60)

typedef enum skill_kind {
    SK_CALCULATOR,
    SK_CURRENT_TIME,
    SK_HTTP_GET,
    SK_HTTP, /* declared in the config */
    SK_ASK_HUMAN, /* the session waits for a person (agent.c): never run here */
} skill_kind;

static const struct builtin {
    const char *name;
    skill_kind kind;
    const char *description;
    const char *parameters;
} BUILTINS[] = {
    {"calculator", SK_CALCULATOR,
     "Evaluate an arithmetic expression and return the exact result. Supports numbers "
     "(decimal or scientific, e.g. 1.5e3), + - * / % (remainder) ^ (power) and parentheses.",
     "{\"type\":\"object\",\"properties\":{\"expression\":{\"type\":\"string\","
     "\"description\":\"The expression, e.g. \\\"(2 + 3) * 4^2 / 7\\\"\"}},"
     "\"required\":[\"expression\"],\"additionalProperties\":false}"},
    {"current_time", SK_CURRENT_TIME,
     "Return the current date and time as ISO-8601 text.",
     "{\"type\":\"object\",\"properties\":{\"timezone\":{\"type\":\"string\","
     "\"description\":\"\\\"UTC\\\" (the default) or a fixed UTC offset such as \\\"+02:00\\\"\"}},"
     "\"additionalProperties\":false}"},
    {"http_get", SK_HTTP_GET,
     "Fetch a public web page or API with HTTP GET and return its status and body as text "
     "(large bodies are truncated).",
     "{\"type\":\"object\",\"properties\":{\"url\":{\"type\":\"string\","
     "\"description\":\"An http:// or https:// URL\"}},"
     "\"required\":[\"url\"],\"additionalProperties\":false}"},
    {AQ_SKILL_ASK_HUMAN, SK_ASK_HUMAN,
     "Ask a person a question and wait for the answer, which may take hours. Use it only when "
     "a person must decide or supply something you cannot find out yourself; ask one clear question.",
     "{\"type\":\"object\",\"properties\":{\"question\":{\"type\":\"string\","
     "\"description\":\"The question, complete enough to answer without other context\"}},"
     "\"required\":[\"question\"],\"additionalProperties\":false}"},
};

struct skill {
    const char *name;            /* borrowed: BUILTINS or cfg */
    skill_kind kind;
    const char *description;
    const char *parameters;
    const aq_http_skill *http;   /* SK_HTTP: borrowed from cfg */
};

struct aq_skill_call {
    aq_skills *s;                /* NULL once cancelled or orphaned */
    LIST_ENTRY(aq_skill_call) link;
    aq_skill_cb cb;
    void *arg;
    skill_kind kind;
    char *name;                  /* for messages */
    struct event *ev;            /* set while an immediate result waits */
    aq_http_req *req;            /* set while an HTTP transfer runs */
    char *out;
    size_t out_len;
    bool is_error;
};

struct aq_skills {
    const aq_config *cfg;
    struct event_base *base;
    aq_http *http;
    struct skill *skills;
    size_t n;
    char *names;                 /* "a,b,c" */
    char *names_human;           /* "a, b, c" for error messages */
    char *tools_json;
    char **tool_defs;            /* each skill's tool object as JSON text, so a
                                  * task's subset is a join, not a rebuild */
    char **allow;                /* skills.http_get_allow, trimmed */
    size_t nallow;
    LIST_HEAD(, aq_skill_call) calls;
};

/* ---- small text helpers ------------------------------------------------ */

static char *xvasprintf(const char *fmt, va_list ap) AQ_PRINTF(1, 0);

static char *xvasprintf(const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) n = 0;
    char *p = aq_xmalloc((size_t)n + 1);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    return p;
}

static char *xasprintf(const char *fmt, ...) AQ_PRINTF(1, 2);

static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *p = xvasprintf(fmt, ap);
    va_end(ap);
    return p;
}

/* Splits a comma list into trimmed, non-empty copies; *n gets the count.
 * The caller frees each item and the array. */
static char **split_list(const char *list, size_t *n)
{
    char **items = NULL;
    *n = 0;
    const char *p = list ? list : "";
    while (*p) {
        size_t len = strcspn(p, ",");
        const char *b = p, *e = p + len;
        while (b < e && isspace((unsigned char)*b)) b++;
        while (e > b && isspace((unsigned char)e[-1])) e--;
        if (e > b) {
            items = aq_xrealloc(items, (*n + 1) * sizeof *items);
            items[(*n)++] = aq_xstrndup(b, (size_t)(e - b));
        }
        p += len;
        if (*p == ',') p++;
    }
    return items;
}

static void free_list(char **items, size_t n)
{
    for (size_t i = 0; i < n; i++) free(items[i]);
    free(items);
}

/* `prefix` followed by body[0..len), the whole no longer than `cap` bytes:
 * a longer body is cut at a UTF-8 character boundary and followed by a
 * marker saying how much is shown. *outlen gets the length; the result is
 * NUL-terminated and the caller frees it. */
static char *cut_text(const char *prefix, const char *body, size_t len, size_t cap,
                      size_t *outlen)
{
    size_t plen = strlen(prefix);
    char marker[96] = "";
    size_t keep = len;
    if (plen + len > cap) {
        /* Room for the marker whatever the numbers in it. */
        size_t reserve = 80;
        keep = cap > plen + reserve ? cap - plen - reserve : 0;
        /* Never split a character: back up to the lead byte of the one
         * that would be cut, and drop it. */
        while (keep > 0 && ((unsigned char)body[keep] & 0xC0) == 0x80) keep--;
        snprintf(marker, sizeof marker, "\n" AQ_CHAT_TRUNCATED " (%zu of %zu bytes shown)",
                 keep, len);
    }
    size_t mlen = strlen(marker);
    char *out = aq_xmalloc(plen + keep + mlen + 1);
    memcpy(out, prefix, plen);
    if (keep) memcpy(out + plen, body, keep);
    memcpy(out + plen + keep, marker, mlen);
    out[plen + keep + mlen] = '\0';
    *outlen = plen + keep + mlen;
    return out;
}

/* ---- the set ----------------------------------------------------------- */

static const struct builtin *find_builtin(const char *name)
{
    for (size_t i = 0; i < AQ_ARRAY_LEN(BUILTINS); i++)
        if (strcmp(BUILTINS[i].name, name) == 0) return &BUILTINS[i];
    return NULL;
}

static const struct skill *find_skill(const aq_skills *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->skills[i].name, name) == 0) return &s->skills[i];
    return NULL;
}

static bool is_web_url(const char *url)
{
    return strncasecmp(url, "http://", 7) == 0 || strncasecmp(url, "https://", 8) == 0;
}

/* The tools array for the skills whose `pick` flag is set (all when pick
 * is NULL). */
static int build_tools(const aq_skills *s, const bool *pick, char **out, char *err, size_t errlen)
{
    aq_chat_tool_def *defs = aq_xcalloc(s->n ? s->n : 1, sizeof *defs);
    size_t nd = 0;
    for (size_t i = 0; i < s->n; i++) {
        if (pick && !pick[i]) continue;
        defs[nd].name = s->skills[i].name;
        defs[nd].description = s->skills[i].description;
        defs[nd].parameters_json = s->skills[i].parameters;
        nd++;
    }
    int rc = aq_chat_tools_json(defs, nd, out, err, errlen);
    free(defs);
    return rc;
}

static void add_skill(aq_skills *s, const struct skill *sk)
{
    s->skills = aq_xrealloc(s->skills, (s->n + 1) * sizeof *s->skills);
    s->skills[s->n++] = *sk;
}

aq_skills *aq_skills_new(const aq_config *cfg, struct event_base *base, aq_http *http,
                         char *err, size_t errlen)
{
    if (!cfg || !base) {
        aq_seterr(err, errlen, "skills: no config or event base");
        return NULL;
    }
    aq_skills *s = aq_xcalloc(1, sizeof *s);
    s->cfg = cfg;
    s->base = base;
    s->http = http;
    LIST_INIT(&s->calls);

    size_t nen = 0;
    char **enabled = split_list(cfg->skills_enabled, &nen);
    for (size_t i = 0; i < nen; i++) {
        const struct builtin *b = find_builtin(enabled[i]);
        if (!b) {
            aq_seterr(err, errlen,
                      "key 'skills.enabled': unknown built-in skill '%s' (known: calculator, "
                      "current_time, http_get; HTTP skills go in skills.http)", enabled[i]);
            free_list(enabled, nen);
            goto fail;
        }
        if (find_skill(s, b->name)) continue; /* listed twice: harmless */
        add_skill(s, &(struct skill){.name = b->name, .kind = b->kind,
                                     .description = b->description,
                                     .parameters = b->parameters});
    }
    free_list(enabled, nen);

    for (int i = 0; i < cfg->n_http_skills; i++) {
        const aq_http_skill *hs = &cfg->http_skills[i];
        if (!hs->name || !hs->name[0]) {
            aq_seterr(err, errlen, "key 'skills.http[%d].name': required", i);
            goto fail;
        }
        if (find_builtin(hs->name)) {
            aq_seterr(err, errlen, "key 'skills.http[%d]': skill '%s' has the name of a built-in skill",
                      i, hs->name);
            goto fail;
        }
        if (find_skill(s, hs->name)) {
            aq_seterr(err, errlen, "key 'skills.http': skill '%s' is declared twice", hs->name);
            goto fail;
        }
        if (!hs->url || !is_web_url(hs->url)) {
            aq_seterr(err, errlen, "key 'skills.http[%d].url': skill '%s' needs an http:// or "
                      "https:// URL", i, hs->name);
            goto fail;
        }
        if (hs->parameters) {
            json_error_t je;
            json_t *p = json_loads(hs->parameters, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
            bool ok = p && json_is_object(p);
            json_decref(p);
            if (!ok) {
                if (p) aq_seterr(err, errlen, "key 'skills.http[%d].parameters': skill '%s': the "
                                 "schema must be a JSON object", i, hs->name);
                else aq_seterr(err, errlen, "key 'skills.http[%d].parameters': skill '%s': not valid "
                               "JSON: %s (line %d, column %d)", i, hs->name, je.text, je.line,
                               je.column);
                goto fail;
            }
        }
        add_skill(s, &(struct skill){.name = hs->name, .kind = SK_HTTP,
                                     .description = hs->description,
                                     .parameters = hs->parameters, .http = hs});
    }

    if (!http) {
        for (size_t i = 0; i < s->n; i++) {
            if (s->skills[i].kind == SK_HTTP_GET || s->skills[i].kind == SK_HTTP) {
                aq_seterr(err, errlen, "skills: '%s' needs an HTTP client", s->skills[i].name);
                goto fail;
            }
        }
    }

    /* ask_human is always there, and offered only to a task that lists it:
     * a task that did not ask for a person never waits for one. */
    if (!find_skill(s, AQ_SKILL_ASK_HUMAN)) {
        const struct builtin *b = find_builtin(AQ_SKILL_ASK_HUMAN);
        add_skill(s, &(struct skill){.name = b->name, .kind = b->kind, .description = b->description,
                                     .parameters = b->parameters});
    }
    char tools_err[256] = "";
    bool *offered = aq_xcalloc(s->n, sizeof *offered);
    for (size_t i = 0; i < s->n; i++) offered[i] = s->skills[i].kind != SK_ASK_HUMAN;
    int trc = build_tools(s, offered, &s->tools_json, tools_err, sizeof tools_err);
    free(offered);
    if (trc != AQ_OK) {
        aq_seterr(err, errlen, "skills: %s", tools_err);
        goto fail;
    }

    /* Each skill alone: "[{...}]" -> "{...}". */
    s->tool_defs = aq_xcalloc(s->n ? s->n : 1, sizeof *s->tool_defs);
    bool *pick = aq_xcalloc(s->n ? s->n : 1, sizeof *pick);
    for (size_t i = 0; i < s->n; i++) {
        char *one = NULL;
        pick[i] = true;
        if (build_tools(s, pick, &one, tools_err, sizeof tools_err) != AQ_OK) aq_oom("a tool definition");
        pick[i] = false;
        size_t len = strlen(one);
        s->tool_defs[i] = aq_xstrndup(one + 1, len - 2);
        free(one);
    }
    free(pick);

    size_t total = 1;
    for (size_t i = 0; i < s->n; i++) total += strlen(s->skills[i].name) + 2;
    s->names = aq_xcalloc(1, total);
    s->names_human = aq_xcalloc(1, total);
    for (size_t i = 0; i < s->n; i++) {
        if (i) {
            strcat(s->names, ",");
            strcat(s->names_human, ", ");
        }
        strcat(s->names, s->skills[i].name);
        strcat(s->names_human, s->skills[i].name);
    }

    s->allow = split_list(cfg->skills_http_get_allow, &s->nallow);
    return s;

fail:
    aq_skills_free(s);
    return NULL;
}

static void call_free(aq_skill_call *c)
{
    if (c->ev) event_free(c->ev);
    free(c->name);
    free(c->out);
    free(c);
}

void aq_skills_free(aq_skills *s)
{
    if (!s) return;
    aq_skill_call *c;
    while ((c = LIST_FIRST(&s->calls)) != NULL) aq_skill_call_cancel(c);
    free(s->skills);
    free(s->names);
    free(s->names_human);
    free(s->tools_json);
    for (size_t i = 0; s->tool_defs && i < s->n; i++) free(s->tool_defs[i]);
    free(s->tool_defs);
    free_list(s->allow, s->nallow);
    free(s);
}

const char *aq_skills_names(const aq_skills *s)
{
    return s->names;
}

bool aq_skills_has(const aq_skills *s, const char *name)
{
    return name && find_skill(s, name) != NULL;
}

const char *aq_skills_tools_json(const aq_skills *s)
{
    return s->tools_json;
}

char *aq_skills_tools_json_for(const aq_skills *s, char *const *names, int n)
{
    bool *pick = aq_xcalloc(s->n ? s->n : 1, sizeof *pick);
    for (int i = 0; i < n; i++) {
        const struct skill *sk = names[i] ? find_skill(s, names[i]) : NULL;
        if (!sk) {
            free(pick);
            return NULL;
        }
        pick[sk - s->skills] = true;
    }
    size_t len = 3;
    for (size_t i = 0; i < s->n; i++)
        if (pick[i]) len += strlen(s->tool_defs[i]) + 1;
    char *out = aq_xmalloc(len), *p = out;
    *p++ = '[';
    for (size_t i = 0; i < s->n; i++) {
        if (!pick[i]) continue;
        if (p > out + 1) *p++ = ',';
        size_t l = strlen(s->tool_defs[i]);
        memcpy(p, s->tool_defs[i], l);
        p += l;
    }
    *p++ = ']';
    *p = '\0';
    free(pick);
    return out;
}

/* ---- completing a call ------------------------------------------------- */

/* Unlinks the call, frees it, then hands the output over: the callback may
 * free the set or start calls, so nothing of ours may be touched after it. */
static void deliver(aq_skill_call *c)
{
    aq_skill_cb cb = c->cb;
    void *arg = c->arg;
    char *out = c->out;
    size_t len = c->out_len;
    bool is_error = c->is_error;
    if (c->s) LIST_REMOVE(c, link);
    c->out = NULL;
    call_free(c);
    cb(out ? out : "", out ? len : 0, is_error, arg);
    free(out);
}

static void on_ready(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    deliver(arg);
}

/* Parks an immediate result (takes ownership of `out`) until the loop's
 * next pass. */
static void finish_later(aq_skill_call *c, char *out, bool is_error)
{
    c->out = out;
    c->out_len = strlen(out);
    c->is_error = is_error;
    c->ev = event_new(c->s->base, -1, 0, on_ready, c);
    if (!c->ev) aq_oom("a skill result event");
    event_active(c->ev, EV_TIMEOUT, 0);
}

static void fail_later(aq_skill_call *c, const char *fmt, ...) AQ_PRINTF(2, 3);

static void fail_later(aq_skill_call *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = xvasprintf(fmt, ap);
    va_end(ap);
    finish_later(c, msg, true);
}

/* ---- the skills -------------------------------------------------------- */

/* The arguments as a JSON object (new reference), or NULL after a tool
 * error has been queued. Empty or blank text is {}. */
static json_t *parse_args(aq_skill_call *c, const char *args, size_t len)
{
    size_t i = 0;
    while (i < len && isspace((unsigned char)args[i])) i++;
    if (i == len) return json_object();
    json_error_t je;
    json_t *j = json_loadb(args, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!j) {
        fail_later(c, "%s: arguments are not valid JSON: %s (at byte %d)", c->name, je.text,
                   je.position);
        return NULL;
    }
    if (!json_is_object(j)) {
        static const char *const types[] = {"an object", "an array", "a string", "an integer",
                                            "a number", "true", "false", "null"};
        int t = json_typeof(j);
        fail_later(c, "%s: arguments must be a JSON object, got %s", c->name,
                   t >= 0 && t < (int)AQ_ARRAY_LEN(types) ? types[t] : "something else");
        json_decref(j);
        return NULL;
    }
    return j;
}

/* A string argument, or NULL after a tool error has been queued. */
static const char *string_arg(aq_skill_call *c, json_t *args, const char *key)
{
    json_t *v = json_object_get(args, key);
    if (!v || json_is_null(v)) {
        fail_later(c, "%s: missing string argument '%s'", c->name, key);
        return NULL;
    }
    if (!json_is_string(v)) {
        fail_later(c, "%s: argument '%s' must be a string", c->name, key);
        return NULL;
    }
    return json_string_value(v);
}

static void run_calculator(aq_skill_call *c, json_t *args)
{
    const char *expr = string_arg(c, args, "expression");
    if (!expr) return;
    json_t *v = json_object_get(args, "expression");
    double r;
    char msg[256];
    if (aq_calc_eval(expr, json_string_length(v), &r, msg, sizeof msg) != AQ_OK) {
        fail_later(c, "calculator: %s", msg);
        return;
    }
    char buf[AQ_CALC_FMT_LEN];
    aq_calc_format(r, buf, sizeof buf);
    finish_later(c, aq_xstrdup(buf), false);
}

/* "UTC", "GMT", "Z", or one of those (or nothing) followed by a fixed
 * offset "+HH:MM", "+HHMM" or "+HH"; case-insensitive. Named zones would
 * need the tz database and its rules; a fixed offset is what the model can
 * state unambiguously. Returns false for anything else. */
static bool parse_tz(const char *tz, int *minutes)
{
    const char *p = tz;
    while (isspace((unsigned char)*p)) p++;
    if (strcasecmp(p, "z") == 0) {
        *minutes = 0;
        return true;
    }
    if (strncasecmp(p, "utc", 3) == 0 || strncasecmp(p, "gmt", 3) == 0) p += 3;
    else if (*p != '+' && *p != '-') return false;
    if (*p == '\0') {
        *minutes = 0;
        return true;
    }
    int sign = *p == '-' ? -1 : *p == '+' ? 1 : 0;
    if (!sign) return false;
    p++;
    int digits[4], nd = 0;
    bool colon = false;
    for (; *p; p++) {
        if (isdigit((unsigned char)*p) && nd < 4) {
            digits[nd++] = *p - '0';
        } else if (*p == ':' && nd == 2 && !colon) {
            colon = true;
        } else {
            return false;
        }
    }
    int h, m = 0;
    if (nd == 1) h = digits[0];
    else if (nd == 2) h = digits[0] * 10 + digits[1];
    else if (nd == 4) {
        h = digits[0] * 10 + digits[1];
        m = digits[2] * 10 + digits[3];
    } else return false;
    if (colon && nd != 4) return false;
    if (m >= 60 || h * 60 + m > TZ_MAX_MINUTES) return false;
    *minutes = sign * (h * 60 + m);
    return true;
}

static void run_current_time(aq_skill_call *c, json_t *args)
{
    json_t *v = json_object_get(args, "timezone");
    int off = 0;
    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) {
            fail_later(c, "current_time: argument 'timezone' must be a string");
            return;
        }
        if (!parse_tz(json_string_value(v), &off)) {
            fail_later(c, "current_time: unsupported timezone '%.64s'; use \"UTC\" or a fixed "
                       "offset such as \"+02:00\"", json_string_value(v));
            return;
        }
    }
    time_t t = (time_t)(aq_now_us() / 1000000) + (time_t)off * 60;
    struct tm tm;
    if (!gmtime_r(&t, &tm)) {
        fail_later(c, "current_time: the clock is out of range");
        return;
    }
    char buf[64];
    size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    if (off == 0) snprintf(buf + n, sizeof buf - n, "Z");
    else snprintf(buf + n, sizeof buf - n, "%c%02d:%02d", off < 0 ? '-' : '+', abs(off) / 60,
                  abs(off) % 60);
    finish_later(c, aq_xstrdup(buf), false);
}

/* The http module's messages start with "http: "; the tool name says it. */
static const char *strip_http_prefix(const char *msg)
{
    return strncmp(msg, "http: ", 6) == 0 ? msg + 6 : msg;
}

static void on_http_done(aq_http_req *req, const aq_http_result *res, void *arg)
{
    aq_skill_call *c = arg;
    (void)req;
    c->req = NULL;
    if (!c->s) { /* cancelled: the caller has forgotten this call */
        call_free(c);
        return;
    }
    if (res->code != AQ_OK) {
        c->out = xasprintf("%s: %s", c->name,
                           res->error && res->error[0] ? res->error : aq_strerror(res->code));
        c->out_len = strlen(c->out);
        c->is_error = true;
    } else if (c->kind == SK_HTTP_GET) {
        char prefix[32];
        snprintf(prefix, sizeof prefix, "HTTP %ld\n", res->status);
        c->out = cut_text(prefix, res->body, res->body_len, AQ_SKILL_MAX_OUTPUT, &c->out_len);
    } else if (res->status >= 200 && res->status < 300) {
        if (res->body_len == 0) {
            c->out = aq_xstrdup("(empty reply)");
            c->out_len = strlen(c->out);
        } else {
            c->out = cut_text("", res->body, res->body_len, AQ_SKILL_MAX_OUTPUT, &c->out_len);
        }
    } else {
        char prefix[160];
        snprintf(prefix, sizeof prefix, "%s: HTTP %ld: ", c->name, res->status);
        c->out = cut_text(prefix, res->body, res->body_len, ERROR_EXCERPT, &c->out_len);
        c->is_error = true;
    }
    deliver(c);
}

static void submit(aq_skill_call *c, const aq_http_request *rq)
{
    char err[256] = "";
    if (aq_http_submit(c->s->http, rq, on_http_done, c, &c->req, err, sizeof err) != AQ_OK) {
        c->req = NULL;
        fail_later(c, "%s: %s", c->name, strip_http_prefix(err));
    }
}

static void run_http_get(aq_skill_call *c, json_t *args)
{
    const char *url = string_arg(c, args, "url");
    if (!url) return;
    size_t ulen = json_string_length(json_object_get(args, "url"));
    if (ulen > URL_MAX || strlen(url) != ulen) {
        fail_later(c, "http_get: the URL is too long or holds a NUL byte");
        return;
    }
    if (!is_web_url(url)) {
        fail_later(c, "http_get: only http:// and https:// URLs are allowed (got '%.200s')", url);
        return;
    }
    const aq_skills *s = c->s;
    aq_http_request rq = {
        .method = AQ_HTTP_GET,
        .url = url,
        .max_response_bytes = (size_t)s->cfg->skills_http_get_max_bytes,
        .timeout_ms = s->cfg->skills_http_get_timeout_ms,
        .follow_redirects = true,
        .block_private = true,
        .allowlist = (const char *const *)s->allow,
        .nallowlist = s->nallow,
    };
    submit(c, &rq);
}

/* A JSON string, or null for NULL or text that is not UTF-8 (ids are
 * validated upstream; this only keeps a bad one from dropping the key). */
static json_t *string_or_null(const char *v)
{
    json_t *j = v ? json_string(v) : NULL;
    return j ? j : json_null();
}

static void run_http_skill(aq_skill_call *c, const struct skill *sk, json_t *args,
                           const char *task_id, const char *user_id, const char *idempotency_key)
{
    json_t *body = json_object();
    if (!body) aq_oom("a skill request");
    json_object_set(body, "arguments", args);
    json_object_set_new(body, "task_id", string_or_null(task_id));
    json_object_set_new(body, "user_id", string_or_null(user_id));
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (!text) aq_oom("a skill request");
    char key[300];
    const char *headers[3] = {"Content-Type: application/json", "Accept: application/json", key};
    size_t nheaders = 2;
    /* A key with a line break could add headers of its own: refused. */
    if (idempotency_key && *idempotency_key && !strpbrk(idempotency_key, "\r\n") &&
        strlen(idempotency_key) < sizeof key - 20) {
        snprintf(key, sizeof key, "Idempotency-Key: %s", idempotency_key);
        nheaders = 3;
    }
    aq_http_request rq = {
        .method = AQ_HTTP_POST,
        .url = sk->http->url,
        .headers = headers,
        .nheaders = nheaders,
        .body = text,
        .body_len = strlen(text),
        .max_response_bytes = HTTP_SKILL_MAX_BYTES,
        .timeout_ms = sk->http->timeout_ms,
        .follow_redirects = false,
        .block_private = false,
    };
    submit(c, &rq);
    free(text);
}

aq_skill_call *aq_skills_call(aq_skills *s, const char *name, const char *args_json,
                              size_t args_len, const char *task_id, const char *user_id,
                              const char *idempotency_key, aq_skill_cb cb, void *arg)
{
    aq_skill_call *c = aq_xcalloc(1, sizeof *c);
    c->s = s;
    c->cb = cb;
    c->arg = arg;
    LIST_INSERT_HEAD(&s->calls, c, link);

    const struct skill *sk = name ? find_skill(s, name) : NULL;
    if (!sk) {
        c->name = aq_xstrdup(name ? name : "");
        fail_later(c, "unknown tool '%.64s'; available: %s", c->name,
                   s->n ? s->names_human : "none");
        return c;
    }
    c->name = aq_xstrdup(sk->name);
    c->kind = sk->kind;
    json_t *args = parse_args(c, args_json ? args_json : "", args_json ? args_len : 0);
    if (!args) return c;
    switch (sk->kind) {
    case SK_CALCULATOR: run_calculator(c, args); break;
    case SK_CURRENT_TIME: run_current_time(c, args); break;
    case SK_HTTP_GET: run_http_get(c, args); break;
    case SK_HTTP: run_http_skill(c, sk, args, task_id, user_id, idempotency_key); break;
    case SK_ASK_HUMAN: fail_later(c, "ask_human is answered by a person, not run as a call"); break;
    }
    json_decref(args);
    return c;
}

void aq_skill_call_cancel(aq_skill_call *c)
{
    if (!c) return;
    if (c->s) {
        LIST_REMOVE(c, link);
        c->s = NULL;
    }
    if (c->req) {
        /* The http module calls back once more (from the loop, or from
         * aq_http_free); on_http_done frees the call then. */
        aq_http_cancel(c->req);
        return;
    }
    call_free(c);
}
