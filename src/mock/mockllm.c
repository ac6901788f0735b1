/* mockllm.c — the OpenAI-compatible LLM simulator (see mockllm.h).
 *
 * Owns its evhttp server, listening socket, rate-limit buckets and fixed
 * window, counters, the log of arrivals (GET /requests) and the requests
 * it holds while their reply waits; it does not own the event_base. A
 * request is parsed, answered in full (JSON written into the request's
 * output buffer) and then parked on a timer, so what a waiting request
 * costs is one mock_pending plus its reply text.
 *
 * Client-gone detection: evhttp 2.1 stops reading a connection once a
 * request is in, so it only notices a vanished client when it writes. A
 * parked request therefore watches the socket itself (one read event that
 * peeks): EOF or a socket error frees the connection, whose close callback
 * frees the parked state. Without that, a "hang" request would hold its
 * file descriptor forever. */
#include "agentq/mockllm.h"
#include "agentq/log.h"
#include "agentq/strmap.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/event_struct.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

#define MOCK_DEFAULT_BACKLOG 4096
#define MOCK_DEFAULT_MAX_BODY (8u << 20)
#define MOCK_DEFAULT_IDLE_S 120
#define MOCK_MAX_HEADERS (64u << 10)
#define MOCK_MAX_PARALLEL 64
#define MOCK_MAX_STEPS 100000
#define MOCK_GOAL_MAX (64u << 10)
#define MOCK_URL_MAX 4096
#define MOCK_ECHO_KEY_MAX 200
#define MOCK_MAX_LATENCY_MS 3600000
#define MOCK_MAX_STORM_S 3600
#define MOCK_MAX_WINDOW_REQUESTS 1000000
#define MOCK_MAX_WINDOW_MS 3600000
#define MOCK_DEFAULT_WINDOW_MS 1000
#define MOCK_QUERY_SHOWN_MAX 100 /* bytes of a client's query value quoted in a 400 */

enum mock_outcome {
    OUT_COMPLETED,  /* a valid completion */
    OUT_FAILED,     /* an error status with an OpenAI-style body */
    OUT_MALFORMED,  /* 200 with broken JSON */
    OUT_HANG,       /* never answered */
};

typedef struct mock_bucket {
    double cap;     /* 0 = unlimited */
    double level;   /* may go negative: a large request borrows ahead */
    double per_us;  /* refill rate */
    int64_t last_us;
} mock_bucket;

typedef struct mock_pending mock_pending;

/* The faults in force: the start-up config's, changed by aq_mockllm_control. */
typedef struct mock_faults {
    double fail_rate, malformed_rate, hang_rate;
    int latency_ms, jitter_ms;
    int64_t storm_until_us; /* monotonic; 0: no storm */
    int storm_retry_after;  /* seconds; 0: the seconds the storm has left */
    int window_requests;    /* the fixed window's quota; 0: off */
    int window_ms;          /* its length, > 0 */
} mock_faults;

/* One chat request as GET /requests lists it. */
typedef struct mock_arrival {
    int64_t at_ms;  /* aq_mono_us() / 1000 on arrival */
    int status;     /* sent or decided at arrival; 0: never answered */
} mock_arrival;

/* Most arrivals GET /requests keeps; later ones are not recorded (16
 * bytes each, so at most 1.6 MB). */
#define MOCK_MAX_ARRIVALS 100000

struct aq_mockllm {
    struct event_base *base; /* borrowed */
    struct evhttp *http;
    aq_mockllm_config cfg;   /* strings point at the copies below */
    char *host;
    char *api_key;
    char *auth_header;       /* NULL: Authorization: Bearer */
    char *query_name;        /* require_query split at its '=' (one allocation: */
    const char *query_value; /* the value points into query_name); NULL: none */
    int port;
    uint64_t rng;
    uint64_t next_id;
    mock_bucket rpm, tpm;
    mock_faults f;
    int64_t window_end_us;   /* monotonic end of the open window; 0: none open */
    int window_used;         /* requests admitted in it */
    mock_arrival *arrivals;  /* GET /requests, in arrival order */
    size_t n_arrivals, cap_arrivals;
    aq_mockllm_stats st;
    aq_strmap *calls;        /* goal -> requests that carried it (a count in the pointer) */
    mock_pending *pending;   /* every parked request, for aq_mockllm_free */
};

/* Most goals GET /calls keeps count of; later ones are not counted. */
#define MOCK_MAX_COUNTED_GOALS 1000000

/* A request parked until its reply is due (or forever, for OUT_HANG). */
struct mock_pending {
    aq_mockllm *m;
    struct evhttp_request *req;     /* owned by evhttp; valid while parked */
    struct evhttp_connection *evcon;
    struct event timer;
    struct event watch;
    mock_pending *prev, *next;
    uint32_t prompt_tokens, completion_tokens;
    short code;
    unsigned char outcome;
    unsigned char timer_on, watch_on;
};

/* ---- small helpers --------------------------------------------------- */

static uint64_t mock_rand(aq_mockllm *m)
{
    /* splitmix64: tiny, seedable, good enough for a simulator */
    uint64_t z = (m->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double mock_rand01(aq_mockllm *m)
{
    return (double)(mock_rand(m) >> 11) * (1.0 / 9007199254740992.0);
}

static int mock_rand_range(aq_mockllm *m, int lo, int hi)
{
    return lo + (int)(mock_rand(m) % (uint64_t)(hi - lo + 1));
}

static const char *mock_reason(int code)
{
    switch (code) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return code >= 500 ? "Server Error" : "Client Error";
    }
}

/* OpenAI's error "type" for an HTTP status. */
static const char *mock_error_type(int code)
{
    switch (code) {
    case 401: return "invalid_request_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    default: return code >= 500 ? "server_error" : "invalid_request_error";
    }
}

/* Replaces every byte outside printable ASCII with '?', in place: text
 * quoted from a client (a JSON parser's "near '...'", a cut field name)
 * may not be UTF-8, and jansson refuses to build a string from it. */
static void mock_ascii(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f) *s = '?';
}

/* Builds {"error":{"message","type","param","code"}} (param and code
 * null when NULL; param must be ASCII); caller frees. */
static char *mock_error_json_param(const char *type, const char *code, const char *param,
                                   const char *message)
{
    json_t *o = json_pack("{s:{s:s, s:s, s:s?, s:s?}}", "error", "message", message,
                          "type", type, "param", param, "code", code);
    if (!o) { /* not UTF-8: say it in ASCII */
        char *clean = aq_xstrdup(message);
        mock_ascii(clean);
        o = json_pack("{s:{s:s, s:s, s:s?, s:s?}}", "error", "message", clean, "type", type,
                      "param", param, "code", code);
        free(clean);
    }
    if (!o) aq_oom("an error body");
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s) aq_oom("an error body");
    return s;
}

/* Builds {"error":{"message","type","param":null,"code"}}; caller frees. */
static char *mock_error_json(const char *type, const char *code, const char *message)
{
    return mock_error_json_param(type, code, NULL, message);
}

static void mock_set_json(struct evhttp_request *req)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "application/json");
}

/* Replies now with `body` (takes ownership) as JSON. */
static void mock_send_now(struct evhttp_request *req, int code, char *body)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    mock_set_json(req);
    evbuffer_add(out, body, strlen(body));
    free(body);
    evhttp_send_reply(req, code, mock_reason(code), NULL);
}

static void mock_reply_error(aq_mockllm *m, struct evhttp_request *req, int code,
                             const char *errcode, const char *fmt, ...) AQ_PRINTF(5, 6);

/* Replies now with an OpenAI-style error and counts it as a failure. */
static void mock_reply_error(aq_mockllm *m, struct evhttp_request *req, int code,
                             const char *errcode, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    m->st.failures++;
    mock_send_now(req, code, mock_error_json(mock_error_type(code), errcode, msg));
}

/* "1.5s", "30s", "6m0s", "120ms": the duration style of OpenAI's
 * x-ratelimit-reset-* headers. */
static void mock_fmt_duration(double s, char *buf, size_t len)
{
    if (s <= 0) {
        snprintf(buf, len, "0s");
    } else if (s < 1) {
        snprintf(buf, len, "%dms", (int)ceil(s * 1000));
    } else if (s < 60) {
        snprintf(buf, len, "%gs", ceil(s * 1000) / 1000);
    } else {
        int mins = (int)(s / 60);
        snprintf(buf, len, "%dm%gs", mins, ceil((s - mins * 60.0) * 1000) / 1000);
    }
}

/* ---- rate limits ----------------------------------------------------- */

static void bucket_init(mock_bucket *b, int64_t per_min, int64_t now)
{
    b->cap = (double)(per_min > 0 ? per_min : 0);
    b->level = b->cap;
    b->per_us = b->cap / 60e6;
    b->last_us = now;
}

static void bucket_refill(mock_bucket *b, int64_t now)
{
    if (b->cap <= 0) return;
    b->level += (double)(now - b->last_us) * b->per_us;
    if (b->level > b->cap) b->level = b->cap;
    b->last_us = now;
}

/* Seconds until `need` is available (0 if it is). A need above the
 * capacity is clamped: such a request is admitted once the bucket is full
 * and leaves it in debt, rather than never. */
static double bucket_wait(const mock_bucket *b, double need)
{
    if (b->cap <= 0) return 0;
    if (need > b->cap) need = b->cap;
    return b->level >= need ? 0 : (need - b->level) / b->per_us / 1e6;
}

static void bucket_headers(const mock_bucket *b, struct evkeyvalq *h, const char *what)
{
    char name[64], val[64];
    if (b->cap <= 0) return;
    snprintf(name, sizeof name, "x-ratelimit-limit-%s", what);
    snprintf(val, sizeof val, "%.0f", b->cap);
    evhttp_add_header(h, name, val);
    snprintf(name, sizeof name, "x-ratelimit-remaining-%s", what);
    snprintf(val, sizeof val, "%.0f", b->level > 0 ? floor(b->level) : 0.0);
    evhttp_add_header(h, name, val);
    snprintf(name, sizeof name, "x-ratelimit-reset-%s", what);
    mock_fmt_duration((b->cap - b->level) / b->per_us / 1e6, val, sizeof val);
    evhttp_add_header(h, name, val);
}

/* Seconds until the buckets hold one request and `tokens` (0: now), and
 * which of them waits longer. Takes nothing: see buckets_take. */
static double buckets_wait(aq_mockllm *m, int64_t now, uint64_t tokens, const char **which)
{
    bucket_refill(&m->rpm, now);
    bucket_refill(&m->tpm, now);
    double wr = bucket_wait(&m->rpm, 1);
    double wt = bucket_wait(&m->tpm, (double)tokens);
    *which = wr >= wt ? "requests" : "tokens";
    return wr > wt ? wr : wt;
}

static void buckets_take(aq_mockllm *m, uint64_t tokens)
{
    if (m->rpm.cap > 0) m->rpm.level -= 1;
    if (m->tpm.cap > 0) m->tpm.level -= (double)tokens;
}

/* Seconds until the fixed window admits a request (0: now; always 0 when
 * the window is off). A request at or after the open window's end opens
 * a new one: "the first request opens the window", as providers count,
 * rather than windows aligned to the clock. */
static double window_wait(aq_mockllm *m, int64_t now)
{
    if (m->f.window_requests <= 0) return 0;
    if (!m->window_end_us || now >= m->window_end_us) {
        m->window_end_us = now + (int64_t)m->f.window_ms * 1000;
        m->window_used = 0;
    }
    if (m->window_used < m->f.window_requests) return 0;
    return (double)(m->window_end_us - now) / 1e6;
}

static void window_take(aq_mockllm *m)
{
    if (m->f.window_requests > 0) m->window_used++;
}

/* The window's x-ratelimit-remaining/reset-requests. No limit header: a
 * client reads x-ratelimit-limit-requests as per minute, which a window
 * of window_ms is not. */
static void window_headers(const aq_mockllm *m, int64_t now, struct evkeyvalq *h)
{
    char val[64];
    int left = m->f.window_requests - m->window_used;
    snprintf(val, sizeof val, "%d", left > 0 ? left : 0);
    evhttp_add_header(h, "x-ratelimit-remaining-requests", val);
    mock_fmt_duration((double)(m->window_end_us - now) / 1e6, val, sizeof val);
    evhttp_add_header(h, "x-ratelimit-reset-requests", val);
}

/* Every limit's headers for a reply decided at `now`: the window's take
 * the place of the rpm bucket's when the window is on. */
static void limit_headers(aq_mockllm *m, int64_t now, struct evkeyvalq *h)
{
    if (m->f.window_requests > 0) window_headers(m, now, h);
    else bucket_headers(&m->rpm, h, "requests");
    bucket_headers(&m->tpm, h, "tokens");
}

/* ---- arithmetic for calc mode ----------------------------------------- */

/* A parser of the expressions mock_gen_expr writes (numbers, + - * /,
 * parentheses, unary minus), kept apart from the calculator skill on
 * purpose: the mock is the independent check of that skill. */
typedef struct mock_eval {
    const char *p;
    bool bad;
} mock_eval;

static double eval_expr(mock_eval *e);

static void eval_ws(mock_eval *e)
{
    while (*e->p == ' ' || *e->p == '\t') e->p++;
}

static double eval_factor(mock_eval *e)
{
    eval_ws(e);
    if (*e->p == '-') {
        e->p++;
        return -eval_factor(e);
    }
    if (*e->p == '+') {
        e->p++;
        return eval_factor(e);
    }
    if (*e->p == '(') {
        e->p++;
        double v = eval_expr(e);
        eval_ws(e);
        if (*e->p != ')') e->bad = true;
        else e->p++;
        return v;
    }
    if (!isdigit((unsigned char)*e->p) && *e->p != '.') {
        e->bad = true;
        return 0;
    }
    char *end;
    double v = strtod(e->p, &end);
    if (end == e->p) e->bad = true;
    e->p = end;
    return v;
}

static double eval_term(mock_eval *e)
{
    double v = eval_factor(e);
    for (;;) {
        eval_ws(e);
        if (*e->p == '*') {
            e->p++;
            v *= eval_factor(e);
        } else if (*e->p == '/') {
            e->p++;
            double d = eval_factor(e);
            if (d == 0) e->bad = true;
            else v /= d;
        } else {
            return v;
        }
    }
}

static double eval_expr(mock_eval *e)
{
    double v = eval_term(e);
    for (;;) {
        eval_ws(e);
        if (*e->p == '+') {
            e->p++;
            v += eval_term(e);
        } else if (*e->p == '-') {
            e->p++;
            v -= eval_term(e);
        } else {
            return v;
        }
    }
}

/* Evaluates `s`; false if it is not a well-formed finite expression. */
static bool mock_evaluate(const char *s, double *out)
{
    mock_eval e = {s, false};
    double v = eval_expr(&e);
    eval_ws(&e);
    if (e.bad || *e.p || !isfinite(v)) return false;
    *out = v;
    return true;
}

/* Appends a random expression of at most `depth` levels to buf; returns
 * its value. Nested operations are always parenthesised, so the value
 * computed here is the one the string denotes. */
static double mock_gen_expr(aq_mockllm *m, char *buf, size_t cap, int depth, bool top)
{
    size_t len = strlen(buf);
    if (depth == 0 || (!top && mock_rand01(m) < 0.35)) {
        if (mock_rand01(m) < 0.2) {
            int whole = mock_rand_range(m, 1, 99), tenth = mock_rand_range(m, 1, 9);
            snprintf(buf + len, cap - len, "%d.%d", whole, tenth);
            return whole + tenth / 10.0;
        }
        int v = mock_rand_range(m, 1, 99);
        snprintf(buf + len, cap - len, "%d", v);
        return v;
    }
    char left[128] = "", right[128] = "";
    double lv = mock_gen_expr(m, left, sizeof left, depth - 1, false);
    double rv = mock_gen_expr(m, right, sizeof right, depth - 1, false);
    static const char ops[] = "+-*/";
    char op = ops[mock_rand(m) % 4];
    if (op == '/' && fabs(rv) < 1e-3) op = '*';
    snprintf(buf + len, cap - len, top ? "%s %c %s" : "(%s %c %s)", left, op, right);
    switch (op) {
    case '+': return lv + rv;
    case '-': return lv - rv;
    case '*': return lv * rv;
    default: return lv / rv;
    }
}

/* The first number after the last '=' in `s` (or the first number in
 * it when there is no '='): "2+3*4 = 14", "14", "result: 14". */
static bool mock_number_in_text(const char *s, double *out)
{
    const char *eq = strrchr(s, '=');
    const char *p = eq ? eq + 1 : s;
    while (*p && !isdigit((unsigned char)*p) &&
           !((*p == '-' || *p == '.') && isdigit((unsigned char)p[1])))
        p++;
    if (!*p) return false;
    char *end;
    *out = strtod(p, &end);
    return end != p && isfinite(*out);
}

/* The number a calculator reply carries: a JSON number, a JSON object's
 * "result"/"value"/"answer", or a number in plain text. */
static bool mock_result_number(const char *text, double *out)
{
    json_t *j = json_loads(text, JSON_DECODE_ANY, NULL);
    if (!j) return mock_number_in_text(text, out);
    json_t *v = j;
    if (json_is_object(j)) {
        v = json_object_get(j, "result");
        if (!v) v = json_object_get(j, "value");
        if (!v) v = json_object_get(j, "answer");
    }
    bool ok = false;
    if (json_is_number(v)) {
        *out = json_number_value(v);
        ok = true;
    } else if (json_is_string(v)) {
        ok = mock_number_in_text(json_string_value(v), out);
    }
    json_decref(j);
    return ok;
}

static bool mock_close_enough(double got, double want)
{
    if (got == want) return true;
    double scale = fabs(want) > fabs(got) ? fabs(want) : fabs(got);
    return fabs(got - want) <= 1e-9 * scale + 1e-12;
}

/* ---- the conversation --------------------------------------------------- */

typedef struct mock_dirs {
    long steps;      /* -1: not given */
    long parallel;
    long fail;       /* 0 or an HTTP status */
    long tokens;     /* -1: not given */
    long sleep_ms;   /* -1: not given */
    bool loop, calc;
    char tool[128];
    char url[MOCK_URL_MAX + 1]; /* "": not given */
} mock_dirs;

typedef struct mock_conv {
    json_t *root;        /* the request (owned) */
    json_t *messages;    /* borrowed from root */
    json_t *tools;       /* borrowed; NULL if none */
    const char *model;
    char *goal;          /* owned copy (text parts joined) */
    const json_t *forced; /* tool_choice's named function, borrowed */
    bool tools_off;      /* tool_choice "none" */
    bool tools_required; /* tool_choice "required" or a named function */
    long tool_turns;     /* assistant messages with tool_calls */
    long tool_results;   /* "tool" messages */
    const char *last_result;
} mock_conv;

/* Text of a message's content: a string, or the "text" parts of an array
 * joined; NULL when there is none. Caller frees. */
static char *mock_content_text(const json_t *content)
{
    if (json_is_string(content)) return aq_xstrdup(json_string_value(content));
    if (!json_is_array(content)) return NULL;
    size_t i, total = 0;
    json_t *part;
    json_array_foreach(content, i, part) {
        const char *t = json_string_value(json_object_get(part, "text"));
        if (t) total += strlen(t) + 1;
    }
    char *out = aq_xmalloc(total + 1);
    out[0] = '\0';
    json_array_foreach(content, i, part) {
        const char *t = json_string_value(json_object_get(part, "text"));
        if (t) {
            if (out[0]) strcat(out, "\n");
            strcat(out, t);
        }
    }
    return out;
}

/* Finds `key` (e.g. "steps=" or "loop") in the goal at a word start;
 * *val points just after it. */
static bool mock_find_word(const char *goal, const char *key, const char **val)
{
    size_t kl = strlen(key);
    bool is_flag = key[kl - 1] != '=';
    for (const char *p = goal; (p = strstr(p, key)) != NULL; p++) {
        bool start_ok = p == goal || (!isalnum((unsigned char)p[-1]) && p[-1] != '_');
        bool end_ok = !is_flag || (!isalnum((unsigned char)p[kl]) && p[kl] != '_');
        if (start_ok && end_ok) {
            *val = p + kl;
            return true;
        }
    }
    return false;
}

static long mock_find_long(const char *goal, const char *key, long lo, long hi, long dflt)
{
    const char *v;
    if (!mock_find_word(goal, key, &v)) return dflt;
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (end == v || errno) return dflt;
    return n < lo ? lo : n > hi ? hi : n;
}

static void mock_parse_dirs(const char *goal, mock_dirs *d)
{
    const char *v;
    memset(d, 0, sizeof *d);
    d->steps = mock_find_long(goal, "steps=", 0, MOCK_MAX_STEPS, -1);
    d->parallel = mock_find_long(goal, "parallel=", 1, MOCK_MAX_PARALLEL, 1);
    d->fail = mock_find_long(goal, "fail=", 0, 599, 0);
    if (d->fail < 400) d->fail = 0;
    d->tokens = mock_find_long(goal, "tokens=", 0, 100000000, -1);
    d->sleep_ms = mock_find_long(goal, "sleep=", 0, 3600 * 1000, -1);
    d->loop = mock_find_word(goal, "loop", &v);
    d->calc = mock_find_word(goal, "calc", &v);
    if (mock_find_word(goal, "tool=", &v)) {
        size_t n = strspn(v, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.");
        if (n >= sizeof d->tool) n = sizeof d->tool - 1;
        memcpy(d->tool, v, n);
        d->tool[n] = '\0';
    }
    if (mock_find_word(goal, "url=", &v)) {
        size_t n = strcspn(v, " \t\r\n\f\v");
        if (n > MOCK_URL_MAX) n = MOCK_URL_MAX;
        memcpy(d->url, v, n);
        d->url[n] = '\0';
    }
}

/* Validates the request and gathers what the script needs. On a bad body
 * returns false with a message in err (the caller replies 400). */
static bool mock_conv_load(mock_conv *c, const char *body, size_t len, char *err, size_t errlen)
{
    json_error_t jerr;
    memset(c, 0, sizeof *c);
    c->root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!c->root) {
        aq_seterr(err, errlen,
                  "We could not parse the JSON body of your request: %s (line %d, column %d)",
                  jerr.text, jerr.line, jerr.column);
        return false;
    }
    if (!json_is_object(c->root)) {
        aq_seterr(err, errlen, "The request body must be a JSON object.");
        return false;
    }
    json_t *model = json_object_get(c->root, "model");
    if (!json_is_string(model) || !json_string_length(model)) {
        aq_seterr(err, errlen, "you must provide a model parameter ('model': a non-empty string)");
        return false;
    }
    c->model = json_string_value(model);
    if (json_is_true(json_object_get(c->root, "stream"))) {
        aq_seterr(err, errlen, "'stream': true is not supported by agentq-mockllm");
        return false;
    }
    c->messages = json_object_get(c->root, "messages");
    if (!c->messages) {
        aq_seterr(err, errlen, "'messages' is a required property");
        return false;
    }
    if (!json_is_array(c->messages) || json_array_size(c->messages) == 0) {
        aq_seterr(err, errlen, "'messages' must be a non-empty array");
        return false;
    }
    size_t i;
    json_t *msg;
    json_array_foreach(c->messages, i, msg) {
        const char *role = json_string_value(json_object_get(msg, "role"));
        if (!json_is_object(msg) || !role) {
            aq_seterr(err, errlen, "messages[%zu]: must be an object with a string 'role'", i);
            return false;
        }
        if (!strcmp(role, "user") && !c->goal) {
            c->goal = mock_content_text(json_object_get(msg, "content"));
        } else if (!strcmp(role, "tool")) {
            c->tool_results++;
            const char *t = json_string_value(json_object_get(msg, "content"));
            if (t) c->last_result = t;
        } else if (!strcmp(role, "assistant")) {
            json_t *calls = json_object_get(msg, "tool_calls");
            if (json_is_array(calls) && json_array_size(calls)) c->tool_turns++;
        } else if (strcmp(role, "system") && strcmp(role, "developer") && strcmp(role, "user") &&
                   strcmp(role, "function")) {
            aq_seterr(err, errlen, "messages[%zu]: unknown role '%s'", i, role);
            return false;
        }
    }
    if (!c->goal) c->goal = aq_xstrdup("");
    if (strlen(c->goal) > MOCK_GOAL_MAX) c->goal[MOCK_GOAL_MAX] = '\0';

    c->tools = json_object_get(c->root, "tools");
    if (c->tools && !json_is_null(c->tools)) {
        json_t *tool;
        if (!json_is_array(c->tools)) {
            aq_seterr(err, errlen, "'tools' must be an array");
            return false;
        }
        json_array_foreach(c->tools, i, tool) {
            json_t *fn = json_object_get(tool, "function");
            if (!json_is_string(json_object_get(fn, "name"))) {
                aq_seterr(err, errlen, "tools[%zu].function.name is required", i);
                return false;
            }
        }
        if (json_array_size(c->tools) == 0) c->tools = NULL;
    } else {
        c->tools = NULL;
    }
    json_t *choice = json_object_get(c->root, "tool_choice");
    if (json_is_string(choice)) {
        c->tools_off = !strcmp(json_string_value(choice), "none");
        c->tools_required = !strcmp(json_string_value(choice), "required");
    } else if (json_is_object(choice)) {
        c->forced = json_object_get(json_object_get(choice, "function"), "name");
        c->tools_required = c->forced != NULL;
    }
    return true;
}

static void mock_conv_free(mock_conv *c)
{
    json_decref(c->root);
    free(c->goal);
}

/* The offered tool's "function" object named `name`, or NULL. */
static json_t *mock_tool_named(const mock_conv *c, const char *name)
{
    size_t i;
    json_t *tool;
    if (!c->tools || !name) return NULL;
    json_array_foreach(c->tools, i, tool) {
        json_t *fn = json_object_get(tool, "function");
        if (!strcmp(json_string_value(json_object_get(fn, "name")), name)) return fn;
    }
    return NULL;
}

/* Arguments for a tool that is not the calculator: the required
 * properties of its schema, filled with plausible values. */
static json_t *mock_args_for_schema(const json_t *fn)
{
    json_t *args = json_object();
    json_t *params = json_object_get(fn, "parameters");
    json_t *props = json_object_get(params, "properties");
    json_t *req = json_object_get(params, "required");
    size_t i;
    json_t *name;
    json_array_foreach(req, i, name) {
        const char *key = json_string_value(name);
        if (!key) continue;
        const char *type = json_string_value(json_object_get(json_object_get(props, key), "type"));
        json_t *v;
        if (type && (!strcmp(type, "integer") || !strcmp(type, "number"))) v = json_integer(1);
        else if (type && !strcmp(type, "boolean")) v = json_true();
        else if (type && !strcmp(type, "array")) v = json_array();
        else if (type && !strcmp(type, "object")) v = json_object();
        else if (strstr(key, "url")) v = json_string("https://example.com/");
        else v = json_string("mock input");
        json_object_set_new(args, key, v);
    }
    return args;
}

/* ---- the reply -------------------------------------------------------- */

typedef struct mock_reply {
    json_t *message;        /* the assistant message */
    bool tool_turn;
    uint64_t completion_tokens;
} mock_reply;

/* Adds `count` tool calls to `fn` (NULL: the calculator in calc mode);
 * `url` ("" if none) is the url= directive. */
static void mock_add_calls(aq_mockllm *m, const mock_conv *c, json_t *calls, const json_t *fn,
                           long count, bool calc, const char *url, uint64_t *chars)
{
    const char *name = json_string_value(json_object_get(fn, "name"));
    for (long k = 0; k < count; k++) {
        json_t *args;
        if (!strcmp(name, "calculator")) {
            char expr[256] = "";
            if (calc) {
                mock_gen_expr(m, expr, sizeof expr, 2, true);
            } else {
                long n = c->tool_turns * count + k;
                snprintf(expr, sizeof expr, "%ld+%ld*%d", 2 + n, 3 + n, 4);
            }
            args = json_pack("{s:s}", "expression", expr);
        } else if (url[0]) {
            /* json_string refuses text that is not UTF-8: send what is */
            json_t *u = json_string(url);
            args = json_object();
            json_object_set_new(args, "url", u ? u : json_string("(url= is not UTF-8)"));
        } else {
            args = mock_args_for_schema(fn);
        }
        char *argstr = json_dumps(args, JSON_COMPACT);
        json_decref(args);
        if (!argstr) aq_oom("tool arguments");
        char id[48];
        snprintf(id, sizeof id, "call_%llx_%ld", (unsigned long long)m->next_id, k);
        json_t *call = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", id, "type", "function",
                                 "function", "name", name, "arguments", argstr);
        if (!call) aq_oom("a tool call");
        *chars += strlen(name) + strlen(argstr) + 8;
        free(argstr);
        json_array_append_new(calls, call);
    }
}

/* The final answer of calc mode: checks every calculator call in the
 * conversation against the tool result that answered it. Caller frees. */
static char *mock_calc_verdict(const mock_conv *c)
{
    char *out = NULL;
    size_t outlen = 0;
    FILE *f = open_memstream(&out, &outlen);
    if (!f) aq_oom("a verdict");
    int checked = 0, wrong = 0;
    char *ok = NULL, *bad = NULL;
    size_t oklen = 0, badlen = 0;
    FILE *fok = open_memstream(&ok, &oklen), *fbad = open_memstream(&bad, &badlen);
    if (!fok || !fbad) aq_oom("a verdict");
    size_t i, j, k;
    json_t *msg, *call, *reply;
    json_array_foreach(c->messages, i, msg) {
        json_t *calls = json_object_get(msg, "tool_calls");
        const char *role = json_string_value(json_object_get(msg, "role"));
        if (!role || strcmp(role, "assistant") || !json_is_array(calls))
            continue;
        json_array_foreach(calls, j, call) {
            json_t *fn = json_object_get(call, "function");
            const char *name = json_string_value(json_object_get(fn, "name"));
            const char *id = json_string_value(json_object_get(call, "id"));
            const char *argstr = json_string_value(json_object_get(fn, "arguments"));
            if (!name || strcmp(name, "calculator") || !id || !argstr) continue;
            json_t *args = json_loads(argstr, 0, NULL);
            const char *expr = json_string_value(json_object_get(args, "expression"));
            char *result = NULL;
            json_array_foreach(c->messages, k, reply) {
                const char *rid = json_string_value(json_object_get(reply, "tool_call_id"));
                if (rid && !strcmp(rid, id)) {
                    result = mock_content_text(json_object_get(reply, "content"));
                    break;
                }
            }
            double want, got;
            checked++;
            if (!expr || !mock_evaluate(expr, &want)) {
                wrong++;
                fprintf(fbad, "%s%s: unreadable expression", wrong > 1 ? "; " : "", id);
            } else if (!result) {
                wrong++;
                fprintf(fbad, "%s%s: no tool result", wrong > 1 ? "; " : "", expr);
            } else if (!mock_result_number(result, &got)) {
                wrong++;
                fprintf(fbad, "%s%s: expected %.15g, got '%.100s'", wrong > 1 ? "; " : "",
                        expr, want, result);
            } else if (!mock_close_enough(got, want)) {
                wrong++;
                fprintf(fbad, "%s%s: expected %.15g, got %.15g", wrong > 1 ? "; " : "", expr,
                        want, got);
            } else {
                fprintf(fok, "%s%s = %.15g", checked - wrong > 1 ? "; " : "", expr, want);
            }
            free(result);
            json_decref(args);
        }
    }
    fclose(fok);
    fclose(fbad);
    if (checked == 0) fprintf(f, "WRONG: no calculator call in the conversation");
    else if (wrong) fprintf(f, "WRONG: %s", bad);
    else fprintf(f, "correct: %s", ok);
    fclose(f);
    free(ok);
    free(bad);
    return out;
}

/* Decides the assistant's next message from the conversation. */
static void mock_plan(aq_mockllm *m, const mock_conv *c, const mock_dirs *d, mock_reply *r)
{
    bool calc = m->cfg.mode == AQ_MOCKLLM_CALC || d->calc;
    const json_t *fn = NULL;
    if (!c->tools_off && c->tools) {
        if (c->forced) fn = mock_tool_named(c, json_string_value(c->forced));
        else if (calc) fn = mock_tool_named(c, "calculator");
        else if (d->tool[0]) fn = mock_tool_named(c, d->tool);
        if (!fn && !calc) fn = json_object_get(json_array_get(c->tools, 0), "function");
    }
    long steps = d->steps >= 0 ? d->steps : (calc ? 1 : 0);
    /* Turns taken so far: assistant tool turns, or tool results in groups of
     * `parallel` when the client kept only the results. */
    long by_results = (c->tool_results + d->parallel - 1) / d->parallel;
    long turns = c->tool_turns > by_results ? c->tool_turns : by_results;
    bool want_tool = d->loop || c->tools_required || turns < steps;

    uint64_t chars = 0;
    memset(r, 0, sizeof *r);
    r->message = json_pack("{s:s}", "role", "assistant");
    if (fn && want_tool) {
        json_t *calls = json_array();
        mock_add_calls(m, c, calls, fn, d->parallel, calc, d->url, &chars);
        json_object_set_new(r->message, "content", json_null());
        json_object_set_new(r->message, "tool_calls", calls);
        r->tool_turn = true;
    } else {
        char *text;
        if (calc && !mock_tool_named(c, "calculator")) {
            text = aq_xstrdup("WRONG: the calculator tool was not offered");
        } else if (calc) {
            text = mock_calc_verdict(c);
        } else {
            size_t n = 0;
            char *buf = NULL;
            FILE *f = open_memstream(&buf, &n);
            if (!f) aq_oom("an answer");
            if (c->tool_results)
                fprintf(f, "done: %ld tool result(s) for \"%.80s\"; last: %.200s",
                        c->tool_results, c->goal, c->last_result ? c->last_result : "");
            else
                fprintf(f, "done: %.200s", c->goal[0] ? c->goal : "(no goal)");
            fclose(f);
            text = buf;
        }
        chars = strlen(text);
        json_object_set_new(r->message, "content", json_string(text));
        free(text);
    }
    r->completion_tokens = d->tokens >= 0 ? (uint64_t)d->tokens : (chars + 3) / 4;
    if (r->completion_tokens == 0 && d->tokens < 0) r->completion_tokens = 1;
}

/* ---- parking requests --------------------------------------------------- */

static void pending_unlink(mock_pending *p)
{
    aq_mockllm *m = p->m;
    if (p->prev) p->prev->next = p->next;
    else m->pending = p->next;
    if (p->next) p->next->prev = p->prev;
    if (p->timer_on) event_del(&p->timer);
    if (p->watch_on) event_del(&p->watch);
    p->timer_on = p->watch_on = 0;
    m->st.in_flight--;
}

/* The connection of a parked request is going away: the client left, or
 * the server is shutting down. evhttp frees the request itself unless it
 * had already detached it from the connection. */
static void pending_on_close(struct evhttp_connection *evcon, void *arg)
{
    mock_pending *p = arg;
    pending_unlink(p);
    p->m->st.cancelled++;
    if (p->req && !evhttp_request_get_connection(p->req)) evhttp_request_free(p->req);
    free(p);
}

static void pending_on_timer(evutil_socket_t fd, short what, void *arg)
{
    mock_pending *p = arg;
    aq_mockllm *m = p->m;
    p->timer_on = 0;
    pending_unlink(p);
    evhttp_connection_set_closecb(p->evcon, NULL, NULL);
    switch (p->outcome) {
    case OUT_COMPLETED:
        m->st.completed++;
        m->st.prompt_tokens += p->prompt_tokens;
        m->st.completion_tokens += p->completion_tokens;
        break;
    case OUT_MALFORMED:
        m->st.malformed++;
        m->st.failures++;
        break;
    default:
        if (p->code == 429) m->st.rate_limited++;
        else m->st.failures++;
        break;
    }
    evhttp_send_reply(p->req, p->code, mock_reason(p->code), NULL);
    free(p);
}

/* Peeks at the socket of a parked request: EOF or an error means the
 * client is gone, so the connection (and, through its close callback, the
 * parked state) is freed now rather than when the reply is due. */
static void pending_on_watch(evutil_socket_t fd, short what, void *arg)
{
    mock_pending *p = arg;
    char c;
    p->watch_on = 0;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        aq_log(AQ_LOG_DEBUG, "mockllm: client closed a waiting request");
        evhttp_connection_free(p->evcon);
        return;
    }
    if (n < 0 && event_add(&p->watch, NULL) == 0) p->watch_on = 1;
    /* n > 0: the client pipelined its next request; stop watching and let
     * evhttp read it after this reply. */
}

/* Parks `req` (its reply already in the output buffer) for `delay_ms`, or
 * for good when the outcome is OUT_HANG. */
static void mock_park(aq_mockllm *m, struct evhttp_request *req, int code, int outcome,
                      long delay_ms, uint64_t prompt_tokens, uint64_t completion_tokens)
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    if (!evcon) { /* cannot happen for a request evhttp just handed us */
        evhttp_request_free(req);
        return;
    }
    mock_pending *p = aq_xcalloc(1, sizeof *p);
    p->m = m;
    p->req = req;
    p->evcon = evcon;
    p->code = (short)code;
    p->outcome = (unsigned char)outcome;
    p->prompt_tokens = (uint32_t)(prompt_tokens > UINT32_MAX ? UINT32_MAX : prompt_tokens);
    p->completion_tokens =
        (uint32_t)(completion_tokens > UINT32_MAX ? UINT32_MAX : completion_tokens);
    p->next = m->pending;
    if (p->next) p->next->prev = p;
    m->pending = p;
    if (++m->st.in_flight > m->st.peak_in_flight) m->st.peak_in_flight = m->st.in_flight;
    evhttp_connection_set_closecb(evcon, pending_on_close, p);

    struct bufferevent *bev = evhttp_connection_get_bufferevent(evcon);
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (fd >= 0) {
        event_assign(&p->watch, m->base, fd, EV_READ, pending_on_watch, p);
        if (event_add(&p->watch, NULL) == 0) p->watch_on = 1;
    }
    if (outcome != OUT_HANG) {
        struct timeval tv = {delay_ms / 1000, (delay_ms % 1000) * 1000};
        evtimer_assign(&p->timer, m->base, pending_on_timer, p);
        if (event_add(&p->timer, &tv) == 0) p->timer_on = 1;
        else pending_on_timer(-1, 0, p); /* cannot wait: answer now */
    }
}

static long mock_latency(aq_mockllm *m, const mock_dirs *d)
{
    if (d->sleep_ms >= 0) return d->sleep_ms;
    long ms = m->f.latency_ms;
    if (m->f.jitter_ms > 0) ms += mock_rand_range(m, -m->f.jitter_ms, m->f.jitter_ms);
    return ms < 0 ? 0 : ms;
}

static bool mock_key_matches(const aq_mockllm *m, const char *h)
{
    /* compare every byte, so timing does not reveal a matching prefix */
    size_t kl = strlen(m->api_key), hl = strlen(h);
    unsigned char diff = (unsigned char)(kl != hl);
    for (size_t i = 0; i < kl; i++) diff |= (unsigned char)(m->api_key[i] ^ (i < hl ? h[i] : 0));
    return diff == 0;
}

/* The key arrives as `Authorization: Bearer KEY`, or, with cfg.auth_header,
 * as `<auth_header>: KEY` (header names match in any case, as HTTP says)
 * and nothing else will do: a client that sends the Azure key the OpenAI
 * way must fail here as it would there. */
static bool mock_auth_ok(aq_mockllm *m, struct evhttp_request *req)
{
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    const char *h;
    if (m->auth_header) {
        h = evhttp_find_header(in, m->auth_header);
        if (!h) return false;
    } else {
        h = evhttp_find_header(in, "Authorization");
        if (!h || strncasecmp(h, "Bearer ", 7)) return false;
        h += 7;
    }
    while (*h == ' ') h++;
    return mock_key_matches(m, h);
}

/* The key the client presented: the auth_header's value, or the
 * Authorization header after "Bearer " (the whole header when it is not
 * Bearer auth); NULL when there is none. */
static const char *mock_presented_key(const aq_mockllm *m, struct evhttp_request *req)
{
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    const char *h = evhttp_find_header(in, m->auth_header ? m->auth_header : "Authorization");
    if (!h) return NULL;
    if (!m->auth_header && !strncasecmp(h, "Bearer ", 7)) h += 7;
    while (*h == ' ') h++;
    return h;
}

/* 401. With cfg.echo_key the message quotes the presented key the way
 * OpenAI's does, cut to MOCK_ECHO_KEY_MAX printable ASCII bytes (others
 * become '?', so the body stays valid JSON whatever the header held). */
static void mock_reply_unauthorized(aq_mockllm *m, struct evhttp_request *req)
{
    const char *key = m->cfg.echo_key ? mock_presented_key(m, req) : NULL;
    if (!key || !*key) {
        if (m->auth_header)
            mock_reply_error(m, req, 401, "invalid_api_key",
                             "Incorrect or missing API key: send '%s: <key>'.", m->auth_header);
        else
            mock_reply_error(m, req, 401, "invalid_api_key",
                             "Incorrect or missing API key: send 'Authorization: Bearer <key>'.");
        return;
    }
    char shown[MOCK_ECHO_KEY_MAX + 4];
    size_t n = 0;
    for (; key[n] && n < MOCK_ECHO_KEY_MAX; n++) {
        unsigned char ch = (unsigned char)key[n];
        shown[n] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
    }
    if (key[n]) {
        memcpy(shown + n, "...", 3);
        n += 3;
    }
    shown[n] = '\0';
    mock_reply_error(m, req, 401, "invalid_api_key",
                     "Incorrect API key provided: %s. You can find your API key at "
                     "https://platform.openai.com/account/api-keys.",
                     shown);
}

/* The value of query parameter `name` in `query` ("a=1&b=2", may be
 * NULL), percent-decoded; NULL when absent. The first occurrence wins; a
 * parameter without '=' has the value "". Caller frees. */
static char *mock_query_param(const char *query, const char *name)
{
    for (const char *p = query; p && *p;) {
        size_t n = strcspn(p, "&");
        char *part = aq_xmalloc(n + 1);
        memcpy(part, p, n);
        part[n] = '\0';
        char *eq = strchr(part, '=');
        if (eq) *eq = '\0';
        char *key = evhttp_uridecode(part, 1, NULL);
        bool hit = key && !strcmp(key, name);
        free(key);
        char *value = hit ? evhttp_uridecode(eq ? eq + 1 : "", 1, NULL) : NULL;
        free(part);
        if (hit) {
            if (!value) aq_oom("a query parameter");
            return value;
        }
        p += n;
        if (*p == '&') p++;
    }
    return NULL;
}

/* cfg.require_query: false (the 400 sent, counted as a failure) when the
 * request's query lacks the parameter or has another value. */
static bool mock_query_ok(aq_mockllm *m, struct evhttp_request *req)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    char *got = mock_query_param(uri ? evhttp_uri_get_query(uri) : NULL, m->query_name);
    bool ok = got && !strcmp(got, m->query_value);
    if (!ok) {
        char msg[512];
        if (!got)
            snprintf(msg, sizeof msg,
                     "Missing required query parameter '%s': this endpoint wants ?%s=%s.",
                     m->query_name, m->query_name, m->query_value);
        else
            snprintf(msg, sizeof msg,
                     "Unsupported value '%.*s' of query parameter '%s': this endpoint wants "
                     "?%s=%s.",
                     MOCK_QUERY_SHOWN_MAX, got, m->query_name, m->query_name, m->query_value);
        m->st.failures++;
        mock_send_now(req, 400,
                      mock_error_json_param("invalid_request_error",
                                            got ? "unsupported_value"
                                                : "missing_required_parameter",
                                            m->query_name, msg));
    }
    free(got);
    return ok;
}

/* True while a 429 storm (aq_mockllm_control) is on; *retry_after gets
 * the seconds its replies ask the client to wait. */
static bool mock_in_storm(aq_mockllm *m, int *retry_after)
{
    if (!m->f.storm_until_us) return false;
    int64_t left = m->f.storm_until_us - aq_mono_us();
    if (left <= 0) {
        m->f.storm_until_us = 0;
        aq_log(AQ_LOG_INFO, "mockllm: the 429 storm is over");
        return false;
    }
    int ra = m->f.storm_retry_after;
    if (ra <= 0) ra = (int)((left + 999999) / 1000000);
    *retry_after = ra < 1 ? 1 : ra;
    return true;
}

/* Answers one chat request that arrived at `now` (monotonic µs); returns
 * the status sent, or decided and parked (0: never to be answered). */
static int mock_chat_serve(aq_mockllm *m, struct evhttp_request *req, int64_t now)
{
    if (m->api_key && !mock_auth_ok(m, req)) {
        mock_reply_unauthorized(m, req);
        return 401;
    }
    if (m->query_name && !mock_query_ok(m, req)) return 400;
    int storm_ra;
    if (mock_in_storm(m, &storm_ra)) {
        char ra[24], msg[200];
        snprintf(ra, sizeof ra, "%d", storm_ra);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", ra);
        snprintf(msg, sizeof msg,
                 "Rate limit reached for requests (a simulated 429 storm). Please try again in %ds.",
                 storm_ra);
        m->st.rate_limited++;
        mock_send_now(req, 429, mock_error_json("requests", "rate_limit_exceeded", msg));
        return 429;
    }
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    const char *body = (const char *)evbuffer_pullup(in, -1);
    mock_conv c;
    char err[512];
    bool ok = mock_conv_load(&c, body ? body : "", len, err, sizeof err);
    evbuffer_drain(in, len); /* the request body is not needed any more */
    if (!ok) {
        mock_conv_free(&c);
        mock_reply_error(m, req, 400, NULL, "%s", err);
        return 400;
    }

    if (c.goal) { /* what a task paid for: a test compares it with an uninterrupted run */
        uintptr_t n = (uintptr_t)aq_strmap_get(m->calls, c.goal);
        if (n || aq_strmap_size(m->calls) < MOCK_MAX_COUNTED_GOALS)
            aq_strmap_put(m->calls, c.goal, (void *)(n + 1));
    }
    mock_dirs d;
    mock_parse_dirs(c.goal, &d);
    /* Prompt tokens: the usual ~4 bytes per token over the messages. */
    size_t msg_bytes = json_dumpb(c.messages, NULL, 0, JSON_COMPACT);
    uint64_t prompt_tokens = msg_bytes / 4 ? msg_bytes / 4 : 1;

    mock_reply r;
    mock_plan(m, &c, &d, &r);

    /* Both limits judge the request before either is charged, so a
     * request one of them refuses costs the other nothing. */
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    uint64_t tokens = prompt_tokens + r.completion_tokens;
    const char *which;
    double wait_buckets = buckets_wait(m, now, tokens, &which);
    double wait_window = window_wait(m, now);
    if (wait_buckets > 0 || wait_window > 0) {
        double w = wait_buckets > wait_window ? wait_buckets : wait_window;
        int retry_after = w < 1 ? 1 : (int)ceil(w);
        char ra[24], msg[256];
        snprintf(ra, sizeof ra, "%d", retry_after);
        evhttp_add_header(h, "Retry-After", ra);
        limit_headers(m, now, h);
        if (wait_window >= wait_buckets) {
            which = "requests";
            snprintf(msg, sizeof msg,
                     "Rate limit reached for requests (%d per %d ms window). Please try again "
                     "in %ds.",
                     m->f.window_requests, m->f.window_ms, retry_after);
        } else {
            snprintf(msg, sizeof msg,
                     "Rate limit reached for %s per min (%s): Limit %.0f. Please try again in "
                     "%ds.",
                     which, !strcmp(which, "requests") ? "RPM" : "TPM",
                     !strcmp(which, "requests") ? m->rpm.cap : m->tpm.cap, retry_after);
        }
        m->st.rate_limited++;
        mock_send_now(req, 429, mock_error_json(which, "rate_limit_exceeded", msg));
        json_decref(r.message);
        mock_conv_free(&c);
        return 429;
    }
    buckets_take(m, tokens);
    window_take(m);
    limit_headers(m, now, h);
    char reqid[32];
    snprintf(reqid, sizeof reqid, "req_mock%llx", (unsigned long long)m->next_id);
    evhttp_add_header(h, "x-request-id", reqid);

    long delay = mock_latency(m, &d);
    int outcome = OUT_COMPLETED, code = 200;
    char *text = NULL;
    if (d.fail) {
        char msg[128];
        snprintf(msg, sizeof msg, "Simulated failure: the goal asked for fail=%ld.", d.fail);
        code = (int)d.fail;
        outcome = OUT_FAILED;
        if (code == 429) evhttp_add_header(h, "Retry-After", "1");
        text = mock_error_json(mock_error_type(code), code == 429 ? "rate_limit_exceeded" : NULL,
                               msg);
    } else if (m->f.hang_rate > 0 && mock_rand01(m) < m->f.hang_rate) {
        outcome = OUT_HANG;
    } else if (m->f.fail_rate > 0 && mock_rand01(m) < m->f.fail_rate) {
        code = 500;
        outcome = OUT_FAILED;
        text = mock_error_json("server_error", NULL,
                               "The server had an error while processing your request "
                               "(simulated by fail_rate).");
    } else {
        char id[48];
        snprintf(id, sizeof id, "chatcmpl-mock%llx", (unsigned long long)m->next_id);
        json_t *resp = json_pack(
            "{s:s, s:s, s:I, s:s, s:s, s:[{s:i, s:O, s:n, s:s}], s:{s:I, s:I, s:I}}", "id", id,
            "object", "chat.completion", "created", (json_int_t)time(NULL), "model", c.model,
            "system_fingerprint", "agentq-mockllm", "choices", "index", 0, "message", r.message,
            "logprobs", "finish_reason", r.tool_turn ? "tool_calls" : "stop", "usage",
            "prompt_tokens", (json_int_t)prompt_tokens, "completion_tokens",
            (json_int_t)r.completion_tokens, "total_tokens",
            (json_int_t)(prompt_tokens + r.completion_tokens));
        if (!resp) aq_oom("a completion");
        text = json_dumps(resp, JSON_COMPACT);
        json_decref(resp);
        if (!text) aq_oom("a completion");
        if (m->f.malformed_rate > 0 && mock_rand01(m) < m->f.malformed_rate) {
            /* Cut it mid-way: valid HTTP, a truncated JSON document. */
            text[strlen(text) / 2] = '\0';
            outcome = OUT_MALFORMED;
        }
    }
    json_decref(r.message);
    mock_conv_free(&c);
    if (text) {
        mock_set_json(req);
        evbuffer_add(evhttp_request_get_output_buffer(req), text, strlen(text));
        free(text);
    }
    if (outcome == OUT_HANG) m->st.hung++;
    mock_park(m, req, code, outcome, delay, prompt_tokens, r.completion_tokens);
    return outcome == OUT_HANG ? 0 : code;
}

/* Appends to the arrivals GET /requests lists, up to MOCK_MAX_ARRIVALS. */
static void mock_note_arrival(aq_mockllm *m, int64_t now, int status)
{
    if (m->n_arrivals >= MOCK_MAX_ARRIVALS) return;
    if (m->n_arrivals == m->cap_arrivals) {
        m->cap_arrivals = m->cap_arrivals ? m->cap_arrivals * 2 : 256;
        if (m->cap_arrivals > MOCK_MAX_ARRIVALS) m->cap_arrivals = MOCK_MAX_ARRIVALS;
        m->arrivals = aq_xrealloc(m->arrivals, m->cap_arrivals * sizeof *m->arrivals);
    }
    m->arrivals[m->n_arrivals].at_ms = now / 1000;
    m->arrivals[m->n_arrivals].status = status;
    m->n_arrivals++;
}

static void mock_chat(aq_mockllm *m, struct evhttp_request *req)
{
    /* One instant for the limits and the log: a test compares an arrival
     * with the reset an earlier reply announced. */
    int64_t now = aq_mono_us();
    m->st.requests++;
    m->next_id++;
    mock_note_arrival(m, now, mock_chat_serve(m, req, now));
}

static void mock_stats_reply(aq_mockllm *m, struct evhttp_request *req)
{
    const aq_mockllm_stats *s = &m->st;
    json_t *o = json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}",
                          "requests", (json_int_t)s->requests, "completed",
                          (json_int_t)s->completed, "rate_limited", (json_int_t)s->rate_limited,
                          "failures", (json_int_t)s->failures, "malformed",
                          (json_int_t)s->malformed, "hung", (json_int_t)s->hung, "cancelled",
                          (json_int_t)s->cancelled, "in_flight", (json_int_t)s->in_flight,
                          "peak_in_flight", (json_int_t)s->peak_in_flight, "prompt_tokens",
                          (json_int_t)s->prompt_tokens, "completion_tokens",
                          (json_int_t)s->completion_tokens);
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!text) aq_oom("stats");
    mock_send_now(req, 200, text);
}

static void add_count(const char *goal, void *value, void *arg)
{
    json_object_set_new(arg, goal, json_integer((json_int_t)(uintptr_t)value));
}

/* GET /requests: [{"at_ms": ..., "status": ...}, ...], written straight
 * into the reply: 100,000 entries as jansson objects would cost tens of MB. */
static void mock_requests_reply(aq_mockllm *m, struct evhttp_request *req)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    evbuffer_add(out, "[", 1);
    for (size_t i = 0; i < m->n_arrivals; i++)
        evbuffer_add_printf(out, "%s{\"at_ms\":%lld,\"status\":%d}", i ? "," : "",
                            (long long)m->arrivals[i].at_ms, m->arrivals[i].status);
    evbuffer_add(out, "]", 1);
    mock_set_json(req);
    evhttp_send_reply(req, 200, "OK", NULL);
}

/* GET /calls: {"<goal>": requests, ...} for every goal seen. */
static void mock_calls_reply(aq_mockllm *m, struct evhttp_request *req)
{
    json_t *o = json_object();
    aq_strmap_each(m->calls, add_count, o);
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!text) aq_oom("calls");
    mock_send_now(req, 200, text);
}

/* ---- runtime faults (POST /control) --------------------------------------- */

static const char *const control_fields[] = {
    "reset", "fail_rate", "malformed_rate", "hang_rate", "latency_ms", "jitter_ms",
    "storm_seconds", "retry_after", "window_requests", "window_ms",
};

/* `cfg` as aq_mockllm_new normalised it (window_ms > 0). */
static mock_faults mock_faults_of(const aq_mockllm_config *cfg)
{
    mock_faults f = {
        .fail_rate = cfg->fail_rate,
        .malformed_rate = cfg->malformed_rate,
        .hang_rate = cfg->hang_rate,
        .latency_ms = cfg->latency_ms,
        .jitter_ms = cfg->jitter_ms,
        .window_requests = cfg->window_requests,
        .window_ms = cfg->window_ms,
    };
    return f;
}

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* What a bad value was, for the error: the number itself, else its kind. */
static void control_got(const json_t *v, char *buf, size_t len)
{
    if (json_is_integer(v)) snprintf(buf, len, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    else if (json_is_real(v)) snprintf(buf, len, "%g", json_real_value(v));
    else snprintf(buf, len, "%s", json_kind(v));
}

static int control_fail(char *field, const char *name, char *err, size_t errlen, const char *fmt,
                        ...) AQ_PRINTF(5, 6);

static int control_fail(char *field, const char *name, char *err, size_t errlen, const char *fmt,
                        ...)
{
    if (field) snprintf(field, 32, "%s", name);
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return AQ_EINVAL;
}

static int control_rate(const json_t *root, const char *name, double *out, char *field, char *err,
                        size_t errlen)
{
    const json_t *v = json_object_get(root, name);
    if (!v) return AQ_OK;
    double d = json_is_number(v) ? json_number_value(v) : -1;
    if (!json_is_number(v) || !(d >= 0 && d <= 1)) {
        char got[64];
        control_got(v, got, sizeof got);
        return control_fail(field, name, err, errlen, "%s: must be a number from 0 to 1 (got %s)",
                            name, got);
    }
    *out = d;
    return AQ_OK;
}

static int control_int(const json_t *root, const char *name, int lo, int hi, int *out,
                       char *field, char *err, size_t errlen)
{
    const json_t *v = json_object_get(root, name);
    if (!v) return AQ_OK;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char got[64];
        control_got(v, got, sizeof got);
        return control_fail(field, name, err, errlen,
                            "%s: must be an integer from %d to %d (got %s)", name, lo, hi, got);
    }
    *out = (int)json_integer_value(v);
    return AQ_OK;
}

static int control_ms(const json_t *root, const char *name, int *out, char *field, char *err,
                      size_t errlen)
{
    return control_int(root, name, 0, MOCK_MAX_LATENCY_MS, out, field, err, errlen);
}

static int control_apply(aq_mockllm *m, const json_t *root, char *field, char *err, size_t errlen)
{
    if (!json_is_object(root))
        return control_fail(field, "body", err, errlen, "body: must be a JSON object (got %s)",
                            json_kind(root));
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)root, key, v) {
        bool known = false;
        for (size_t i = 0; i < AQ_ARRAY_LEN(control_fields) && !known; i++)
            known = !strcmp(key, control_fields[i]);
        if (!known)
            return control_fail(field, key, err, errlen,
                                "unknown field '%.64s' (allowed: reset, fail_rate, malformed_rate, "
                                "hang_rate, latency_ms, jitter_ms, storm_seconds, retry_after, "
                                "window_requests, window_ms)",
                                key);
    }
    const json_t *reset = json_object_get(root, "reset");
    if (reset && !json_is_boolean(reset))
        return control_fail(field, "reset", err, errlen, "reset: must be true or false (got %s)",
                            json_kind(reset));
    mock_faults nf = m->f;
    bool resetting = json_object_size(root) == 0 || json_is_true(reset);
    if (resetting) nf = mock_faults_of(&m->cfg);
    int rc = control_rate(root, "fail_rate", &nf.fail_rate, field, err, errlen);
    if (!rc) rc = control_rate(root, "malformed_rate", &nf.malformed_rate, field, err, errlen);
    if (!rc) rc = control_rate(root, "hang_rate", &nf.hang_rate, field, err, errlen);
    if (!rc) rc = control_ms(root, "latency_ms", &nf.latency_ms, field, err, errlen);
    if (!rc) rc = control_ms(root, "jitter_ms", &nf.jitter_ms, field, err, errlen);
    if (!rc)
        rc = control_int(root, "window_requests", 0, MOCK_MAX_WINDOW_REQUESTS,
                         &nf.window_requests, field, err, errlen);
    if (!rc)
        rc = control_int(root, "window_ms", 1, MOCK_MAX_WINDOW_MS, &nf.window_ms, field, err,
                         errlen);
    if (rc) return rc;

    const json_t *storm = json_object_get(root, "storm_seconds");
    const json_t *ra = json_object_get(root, "retry_after");
    double secs = 0;
    if (storm) {
        secs = json_is_number(storm) ? json_number_value(storm) : -1;
        if (!json_is_number(storm) || !(secs >= 0 && secs <= MOCK_MAX_STORM_S)) {
            char got[64];
            control_got(storm, got, sizeof got);
            return control_fail(field, "storm_seconds", err, errlen,
                                "storm_seconds: must be a number from 0 to %d (got %s)",
                                MOCK_MAX_STORM_S, got);
        }
    }
    if (ra) {
        if (!json_is_integer(ra) || json_integer_value(ra) < 1 ||
            json_integer_value(ra) > MOCK_MAX_STORM_S) {
            char got[64];
            control_got(ra, got, sizeof got);
            return control_fail(field, "retry_after", err, errlen,
                                "retry_after: must be an integer from 1 to %d seconds (got %s)",
                                MOCK_MAX_STORM_S, got);
        }
        if (!storm || secs <= 0)
            return control_fail(field, "retry_after", err, errlen,
                                "retry_after: must come with storm_seconds > 0 in the same body");
    }
    if (storm) {
        nf.storm_until_us = secs > 0 ? aq_mono_us() + (int64_t)(secs * 1e6) : 0;
        nf.storm_retry_after = ra ? (int)json_integer_value(ra) : 0;
    }
    m->f = nf;
    /* New terms start a new window: one opened under the old ones would
     * otherwise end at a time the test that changed them cannot predict. */
    if (resetting || json_object_get(root, "window_requests") ||
        json_object_get(root, "window_ms")) {
        m->window_end_us = 0;
        m->window_used = 0;
    }
    aq_log(AQ_LOG_INFO,
           "mockllm: faults now fail %g, malformed %g, hang %g, latency %d+-%d ms, 429 storm %gs, "
           "window %d per %d ms",
           nf.fail_rate, nf.malformed_rate, nf.hang_rate, nf.latency_ms, nf.jitter_ms,
           nf.storm_until_us ? secs : 0.0, nf.window_requests, nf.window_ms);
    return AQ_OK;
}

int aq_mockllm_control(aq_mockllm *m, const char *body, size_t len, char *field, char *err,
                       size_t errlen)
{
    if (field) field[0] = '\0';
    json_error_t je;
    json_t *root =
        json_loadb(body ? body : "", len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!root)
        return control_fail(field, "body", err, errlen,
                            "body: not valid JSON: %s (line %d, column %d)", je.text, je.line,
                            je.column);
    int rc = control_apply(m, root, field, err, errlen);
    json_decref(root);
    return rc;
}

/* Replies with the faults now in force. */
static void mock_control_state(aq_mockllm *m, struct evhttp_request *req)
{
    double left = 0;
    if (m->f.storm_until_us) {
        int64_t us = m->f.storm_until_us - aq_mono_us();
        left = us > 0 ? (double)us / 1e6 : 0;
    }
    json_t *o = json_pack("{s:f, s:f, s:f, s:i, s:i, s:f, s:i, s:i, s:i}", "fail_rate",
                          m->f.fail_rate, "malformed_rate", m->f.malformed_rate, "hang_rate",
                          m->f.hang_rate, "latency_ms", m->f.latency_ms, "jitter_ms",
                          m->f.jitter_ms, "storm_seconds_left", left, "retry_after",
                          left > 0 ? m->f.storm_retry_after : 0, "window_requests",
                          m->f.window_requests, "window_ms", m->f.window_ms);
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!text) aq_oom("the control state");
    mock_send_now(req, 200, text);
}

static void mock_control(aq_mockllm *m, struct evhttp_request *req)
{
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (cmd == EVHTTP_REQ_GET) {
        mock_control_state(m, req);
        return;
    }
    if (cmd != EVHTTP_REQ_POST) {
        mock_send_now(req, 405,
                      mock_error_json("invalid_request_error", NULL,
                                      "Only GET and POST are allowed on /control."));
        return;
    }
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    const char *body = (const char *)evbuffer_pullup(in, -1);
    char field[32], err[512];
    int rc = aq_mockllm_control(m, body, len, field, err, sizeof err);
    evbuffer_drain(in, len);
    if (rc != AQ_OK) {
        mock_ascii(err);
        mock_ascii(field);
        json_t *o = json_pack("{s:{s:s, s:s, s:s, s:s}}", "error", "message", err, "type",
                              "invalid_request_error", "param", field, "code", "invalid_control");
        char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!text) aq_oom("a control error");
        mock_send_now(req, 400, text);
        return;
    }
    mock_control_state(m, req);
}

static void mock_on_request(struct evhttp_request *req, void *arg)
{
    aq_mockllm *m = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (!path || !*path) path = "/";

    if (!strcmp(path, "/v1/chat/completions") || !strcmp(path, "/chat/completions")) {
        if (cmd != EVHTTP_REQ_POST) {
            m->st.requests++;
            m->st.failures++;
            mock_note_arrival(m, aq_mono_us(), 405);
            mock_send_now(req, 405,
                          mock_error_json("invalid_request_error", NULL,
                                          "Only POST is allowed on /v1/chat/completions."));
            return;
        }
        mock_chat(m, req);
    } else if (!strcmp(path, "/healthz") && (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD)) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "text/plain");
        evbuffer_add(evhttp_request_get_output_buffer(req), "ok", 2);
        evhttp_send_reply(req, 200, "OK", NULL);
    } else if (!strcmp(path, "/stats") && cmd == EVHTTP_REQ_GET) {
        mock_stats_reply(m, req);
    } else if (!strcmp(path, "/calls") && cmd == EVHTTP_REQ_GET) {
        mock_calls_reply(m, req);
    } else if (!strcmp(path, "/requests") && cmd == EVHTTP_REQ_GET) {
        mock_requests_reply(m, req);
    } else if (!strcmp(path, "/control")) {
        mock_control(m, req);
    } else {
        char msg[256];
        snprintf(msg, sizeof msg, "Unknown request URL: %.200s. Try POST /v1/chat/completions.",
                 path);
        mock_send_now(req, 404, mock_error_json("invalid_request_error", "unknown_url", msg));
    }
}

/* ---- set-up ------------------------------------------------------------ */

void aq_mockllm_config_defaults(aq_mockllm_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->host = "127.0.0.1";
    cfg->backlog = MOCK_DEFAULT_BACKLOG;
    cfg->mode = AQ_MOCKLLM_SCRIPT;
    cfg->max_body_bytes = MOCK_DEFAULT_MAX_BODY;
    cfg->idle_timeout_s = MOCK_DEFAULT_IDLE_S;
}

int aq_mockllm_mode_parse(const char *name)
{
    if (!name) return -1;
    if (!strcmp(name, "script")) return AQ_MOCKLLM_SCRIPT;
    if (!strcmp(name, "calc")) return AQ_MOCKLLM_CALC;
    return -1;
}

/* A listening socket with our own backlog (evhttp_bind_socket uses 128,
 * far too few for thousands of clients connecting at once). */
static int mock_listen(const char *host, int port, int backlog, int *bound_port, char *err,
                       size_t errlen)
{
    struct addrinfo hints, *res = NULL, *ai;
    char portstr[16];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(portstr, sizeof portstr, "%d", port);
    if (host && (!*host || !strcmp(host, "*"))) host = NULL;
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc) {
        aq_seterr(err, errlen, "cannot resolve listen address %s: %s", host ? host : "*",
                  gai_strerror(rc));
        return -1;
    }
    int fd = -1, saved = 0;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0) break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        aq_seterr(err, errlen, "cannot listen on %s:%d: %s", host ? host : "*", port,
                  strerror(saved));
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *bound_port = port;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) *bound_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            *bound_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    return fd;
}

static bool mock_rate_ok(double r) { return r >= 0 && r <= 1; }

/* require_query's form: a NAME of printable ASCII other than space, '&'
 * and '=' (it is quoted in the error body's "param"), '=', any VALUE. */
static bool mock_query_spec_ok(const char *s)
{
    const char *eq = strchr(s, '=');
    if (!eq || eq == s) return false;
    for (; s < eq; s++)
        if (*s <= 0x20 || *s >= 0x7f || *s == '&') return false;
    return true;
}

/* An HTTP header name (RFC 9110 token). */
static bool mock_is_token(const char *s)
{
    if (!*s) return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("!#$%&'*+-.^_`|~", *s)) return false;
    return true;
}

aq_mockllm *aq_mockllm_new(struct event_base *base, const aq_mockllm_config *cfg, char *err,
                           size_t errlen)
{
    if (!base || !cfg) {
        aq_seterr(err, errlen, "mockllm: no event base or config");
        return NULL;
    }
    if (cfg->port < 0 || cfg->port > 65535) {
        aq_seterr(err, errlen, "mockllm: port %d is out of range 0..65535", cfg->port);
        return NULL;
    }
    if (cfg->latency_ms < 0 || cfg->jitter_ms < 0) {
        aq_seterr(err, errlen, "mockllm: latency and jitter must be >= 0 ms");
        return NULL;
    }
    if (cfg->rpm < 0 || cfg->tpm < 0) {
        aq_seterr(err, errlen, "mockllm: rpm and tpm must be >= 0 (0 = unlimited)");
        return NULL;
    }
    if (!mock_rate_ok(cfg->fail_rate) || !mock_rate_ok(cfg->malformed_rate) ||
        !mock_rate_ok(cfg->hang_rate)) {
        aq_seterr(err, errlen, "mockllm: fail, malformed and hang rates must be within 0..1");
        return NULL;
    }
    if (cfg->mode != AQ_MOCKLLM_SCRIPT && cfg->mode != AQ_MOCKLLM_CALC) {
        aq_seterr(err, errlen, "mockllm: unknown mode %d", (int)cfg->mode);
        return NULL;
    }
    if (cfg->auth_header && *cfg->auth_header && !mock_is_token(cfg->auth_header)) {
        aq_seterr(err, errlen, "mockllm: auth_header '%.64s' is not an HTTP header name",
                  cfg->auth_header);
        return NULL;
    }
    if (cfg->require_query && *cfg->require_query && !mock_query_spec_ok(cfg->require_query)) {
        aq_seterr(err, errlen, "mockllm: require_query '%.64s' is not NAME=VALUE",
                  cfg->require_query);
        return NULL;
    }
    if (cfg->window_requests < 0 || cfg->window_requests > MOCK_MAX_WINDOW_REQUESTS ||
        cfg->window_ms < 0 || cfg->window_ms > MOCK_MAX_WINDOW_MS) {
        aq_seterr(err, errlen,
                  "mockllm: window_requests must be within 0..%d and window_ms within 0..%d",
                  MOCK_MAX_WINDOW_REQUESTS, MOCK_MAX_WINDOW_MS);
        return NULL;
    }

    aq_mockllm *m = aq_xcalloc(1, sizeof *m);
    m->base = base;
    m->cfg = *cfg;
    m->host = aq_xstrdup(cfg->host ? cfg->host : "127.0.0.1");
    m->cfg.host = m->host;
    if (cfg->api_key && *cfg->api_key) m->api_key = aq_xstrdup(cfg->api_key);
    m->cfg.api_key = m->api_key;
    if (cfg->auth_header && *cfg->auth_header) m->auth_header = aq_xstrdup(cfg->auth_header);
    m->cfg.auth_header = m->auth_header;
    if (cfg->require_query && *cfg->require_query) {
        m->query_name = aq_xstrdup(cfg->require_query);
        char *eq = strchr(m->query_name, '=');
        *eq = '\0';
        m->query_value = eq + 1;
    }
    m->cfg.require_query = NULL; /* the split copy above is what counts */
    if (m->cfg.window_ms == 0) m->cfg.window_ms = MOCK_DEFAULT_WINDOW_MS;
    if (m->cfg.backlog <= 0) m->cfg.backlog = MOCK_DEFAULT_BACKLOG;
    if (m->cfg.max_body_bytes == 0) m->cfg.max_body_bytes = MOCK_DEFAULT_MAX_BODY;
    if (m->cfg.idle_timeout_s <= 0) m->cfg.idle_timeout_s = MOCK_DEFAULT_IDLE_S;
    m->calls = aq_strmap_new();
    m->rng = cfg->seed ? cfg->seed : (uint64_t)aq_now_us() ^ ((uint64_t)getpid() << 32);
    int64_t now = aq_mono_us();
    bucket_init(&m->rpm, cfg->rpm, now);
    bucket_init(&m->tpm, cfg->tpm, now);
    m->f = mock_faults_of(&m->cfg);

    int fd = mock_listen(m->host, cfg->port, m->cfg.backlog, &m->port, err, errlen);
    if (fd < 0) {
        aq_mockllm_free(m);
        return NULL;
    }
    m->http = evhttp_new(base);
    if (!m->http) aq_oom("an evhttp server");
    evhttp_set_max_body_size(m->http, (ev_ssize_t)m->cfg.max_body_bytes);
    evhttp_set_max_headers_size(m->http, MOCK_MAX_HEADERS);
    evhttp_set_timeout(m->http, m->cfg.idle_timeout_s);
    evhttp_set_gencb(m->http, mock_on_request, m);
    if (!evhttp_accept_socket_with_handle(m->http, fd)) {
        close(fd);
        aq_seterr(err, errlen, "mockllm: evhttp refused the listening socket");
        aq_mockllm_free(m);
        return NULL;
    }
    return m;
}

int aq_mockllm_port(const aq_mockllm *m) { return m->port; }

void aq_mockllm_get_stats(const aq_mockllm *m, aq_mockllm_stats *out) { *out = m->st; }

void aq_mockllm_free(aq_mockllm *m)
{
    if (!m) return;
    /* Freeing the server closes every connection; each parked request's
     * close callback unlinks and frees it. */
    if (m->http) evhttp_free(m->http);
    while (m->pending) {
        mock_pending *p = m->pending;
        pending_unlink(p);
        free(p);
    }
    aq_strmap_free(m->calls);
    free(m->arrivals);
    free(m->host);
    free(m->api_key);
    free(m->auth_header);
    free(m->query_name);
    free(m);
}
