/* dashboard.c — the web dashboard (see dashboard.h).
 *
 * Owns: the evhttp listener and its routes; the page, script, style sheet
 * and SQL compiled in (dash_assets.c, which embed.cmake writes from
 * src/dash at build time); the backend threads, each with its own reader
 * and writer PGconn and broker connection; the job queue between the loop
 * and them; the reads of RabbitMQ's management API. Does not own what the
 * statements say (dashboard.sql), the broker's topology and confirms
 * (broker.h), how a Postgres connection is made (pgconn.h), the HTTP
 * client (http.h).
 *
 * A request's life: the loop checks it (route, method, Host, token,
 * parameters) and either answers at once (assets, /api/info, errors) or
 * queues a job; a backend thread runs the job's statements and hands it
 * back through the mailbox; the loop answers it. A client that went away
 * meanwhile is answered all the same: evhttp frees a request whose
 * connection is gone when it is answered. Every request is answered once,
 * by its job or its management read; aq_dashboard_free answers those
 * still open. */
#include "agentq/dashboard.h"
#include "agentq/broker.h"
#include "agentq/http.h"
#include "agentq/log.h"
#include "agentq/mailbox.h"
#include "agentq/pgconn.h"
#include "agentq/status.h"
#include "agentq/task.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <getopt.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

/* The assets, from dash_assets.c (generated): each NUL-terminated, the
 * length without the NUL. */
extern const unsigned char aq__dash_index_html[], aq__dash_app_js[], aq__dash_app_css[],
    aq__dash_favicon_svg[], aq__dash_dashboard_sql[];
extern const size_t aq__dash_index_html_len, aq__dash_app_js_len, aq__dash_app_css_len,
    aq__dash_favicon_svg_len, aq__dash_dashboard_sql_len;

#define DASH_THREADS_DEFAULT 2
#define DASH_CONNECT_TIMEOUT_MS 5000
/* Every read is an index range or a LIMIT (docs/benchmarks.md): a
 * statement that takes this long is a bug or a sick database, and it
 * bounds how long aq_dashboard_free waits for a thread. */
#define DASH_STATEMENT_TIMEOUT "10s"
#define DASH_BROKER_TIMEOUT_MS 5000
#define DASH_CONFIRM_TIMEOUT_MS 10000
#define DASH_MGMT_TIMEOUT_MS 3000
#define DASH_TOKEN_MIN 16
#define DASH_MAX_PARAMS 8

/* Asked of every answer. No inline script or style anywhere: the page's
 * only script is /app.js and it draws the chart with DOM calls. */
#define DASH_CSP                                                                                            \
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "         \
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

typedef enum { J_OVERVIEW, J_TASKS, J_TASK, J_DEAD, J_QUEUES, J_CANCEL, J_REQUEUE } job_kind;

typedef struct job {
    struct job *next;
    aq_dashboard *d;
    struct evhttp_request *req;
    job_kind kind;
    char *param[DASH_MAX_PARAMS]; /* text; NULL is SQL NULL */
    int nparam;
    int limit;                    /* the page size shown (J_TASKS, J_DEAD) */
    char *mgmt_error;             /* J_QUEUES after the management API failed */
    json_t *mgmt_list;            /* J_QUEUES: what the management API said, a
                                   * ready count missing where it has no
                                   * statistics yet (a queue just declared) */
    char peer[64];                /* who asked, for the actions' log lines */
    int code;                     /* the answer */
    char *body;                   /* JSON text */
} job;

typedef struct backend {
    aq_dashboard *d;
    pthread_t thread;
    bool started;
    PGconn *reader, *writer;
    aq_broker *broker;            /* passive declares; requeues connect their own */
} backend;

typedef struct mgmt_call {
    aq_dashboard *d;
    struct evhttp_request *req;
} mgmt_call;

struct aq_dashboard {
    struct event_base *base;
    const aq_config *cfg;
    struct evhttp *http;
    struct evhttp_bound_socket *sock;
    int port;
    bool loopback;      /* a loopback listener: the Host header is checked */
    char *allow_host;
    char *token;        /* NULL: read-only */
    char *reader_dsn, *writer_dsn;
    aq_http *mgmt;      /* NULL: no management API */
    char *mgmt_queues_url;
    char **queues;      /* every queue of the topology, and its group */
    const char **groups;
    int nqueues;
    pthread_mutex_t mu; /* guards head, tail, stopping */
    pthread_cond_t cv;
    job *head, *tail;
    bool stopping;
    backend *backends;
    int nbackends;
    aq_mailbox *done;
};

/* ------------------------------------------------------------ assets --- */

typedef struct asset {
    const char *path;
    const unsigned char *bytes;
    const size_t *len;
    const char *type;
} asset;

static const asset ASSETS[] = {
    {"/", aq__dash_index_html, &aq__dash_index_html_len, "text/html; charset=utf-8"},
    {"/index.html", aq__dash_index_html, &aq__dash_index_html_len, "text/html; charset=utf-8"},
    {"/app.js", aq__dash_app_js, &aq__dash_app_js_len, "text/javascript; charset=utf-8"},
    {"/app.css", aq__dash_app_css, &aq__dash_app_css_len, "text/css; charset=utf-8"},
    {"/favicon.svg", aq__dash_favicon_svg, &aq__dash_favicon_svg_len, "image/svg+xml"},
};

const char *aq_dashboard_asset(const char *path, size_t *len, const char **content_type)
{
    for (size_t i = 0; path && i < AQ_ARRAY_LEN(ASSETS); i++) {
        if (strcmp(path, ASSETS[i].path)) continue;
        if (len) *len = *ASSETS[i].len;
        if (content_type) *content_type = ASSETS[i].type;
        return (const char *)ASSETS[i].bytes;
    }
    return NULL;
}

/* ---------------------------------------------------------- the SQL --- */

typedef struct sql_section {
    char *name;
    char *sql;
} sql_section;

static sql_section *g_sql;
static int g_nsql;
static pthread_once_t g_sql_once = PTHREAD_ONCE_INIT;

/* Splits the compiled-in dashboard.sql at its `-- name: NAME` lines; the
 * comment lines of a section are left out. Kept for the process's life. */
static void parse_sql(void)
{
    const char *p = (const char *)aq__dash_dashboard_sql;
    size_t cap = 0;
    char *cur = NULL;
    size_t curlen = 0;
    while (*p) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        if (n > 9 && !strncmp(p, "-- name: ", 9)) {
            if ((size_t)g_nsql == cap) {
                cap = cap ? cap * 2 : 16;
                g_sql = aq_xrealloc(g_sql, cap * sizeof *g_sql);
            }
            size_t k = n - 9;
            while (k && (p[9 + k - 1] == ' ' || p[9 + k - 1] == '\r')) k--;
            g_sql[g_nsql].name = aq_xstrndup(p + 9, k);
            g_sql[g_nsql].sql = aq_xstrdup("");
            cur = g_sql[g_nsql].sql;
            curlen = 0;
            g_nsql++;
        } else if (g_nsql > 0 && strncmp(p, "--", 2)) {
            cur = aq_xrealloc(cur, curlen + n + 2);
            memcpy(cur + curlen, p, n);
            curlen += n;
            cur[curlen++] = '\n';
            cur[curlen] = '\0';
            g_sql[g_nsql - 1].sql = cur;
        }
        p += n + (eol ? 1 : 0);
    }
    for (int i = 0; i < g_nsql; i++) { /* trailing blank lines */
        char *s = g_sql[i].sql;
        size_t n = strlen(s);
        while (n && (s[n - 1] == '\n' || s[n - 1] == ' ')) s[--n] = '\0';
    }
}

const char *aq_dashboard_sql(const char *name)
{
    pthread_once(&g_sql_once, parse_sql);
    for (int i = 0; name && i < g_nsql; i++)
        if (!strcmp(g_sql[i].name, name)) return g_sql[i].sql;
    return NULL;
}

/* A statement the code names is in the file: checked when the dashboard
 * starts (and by the unit tests), so a renamed section fails at once. */
static const char *const SQL_NAMES[] = {
    "overview_counts", "overview_throughput", "overview_running", "overview_llm", "overview_limits",
    "tasks", "task", "task_steps", "task_dead_letters", "dead_letters", "dead_letter_reasons",
    "cancel", "requeue_select", "requeue_mark", "requeue_unmark",
};

/* ------------------------------------------------------- pure parts --- */

bool aq_dashboard_authorized(const char *want, const char *authorization)
{
    if (!want || !*want || !authorization) return false;
    if (strncasecmp(authorization, "Bearer ", 7)) return false;
    const char *got = authorization + 7;
    while (*got == ' ') got++;
    size_t wl = strlen(want), gl = strlen(got);
    /* Every byte of `want` is compared whatever the earlier ones gave, so
     * the time depends on the lengths only (the length of a guess is the
     * guesser's own business). */
    volatile unsigned char diff = (unsigned char)(wl != gl);
    for (size_t i = 0; i < wl; i++)
        diff |= (unsigned char)((unsigned char)want[i] ^ (unsigned char)(i < gl ? got[i] : 0));
    return diff == 0;
}

char *aq_dashboard_json_harden(const char *json, size_t len, size_t *outlen)
{
    size_t extra = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)json[i];
        if (c == '<' || c == '>' || c == '&') extra += 5;
        else if (c == 0xE2 && i + 2 < len && (unsigned char)json[i + 1] == 0x80 &&
                 ((unsigned char)json[i + 2] == 0xA8 || (unsigned char)json[i + 2] == 0xA9))
            extra += 3;
    }
    char *out = aq_xmalloc(len + extra + 1), *o = out;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)json[i];
        if (c == '<' || c == '>' || c == '&') {
            o += sprintf(o, "\\u%04x", c);
        } else if (c == 0xE2 && i + 2 < len && (unsigned char)json[i + 1] == 0x80 &&
                   ((unsigned char)json[i + 2] == 0xA8 || (unsigned char)json[i + 2] == 0xA9)) {
            o += sprintf(o, "\\u%04x", (unsigned char)json[i + 2] == 0xA8 ? 0x2028 : 0x2029);
            i += 2;
        } else {
            *o++ = (char)c;
        }
    }
    *o = '\0';
    if (outlen) *outlen = (size_t)(o - out);
    return out;
}

/* Calls fn(key, value) for every key=value of `query`, both decoded
 * ('+' is a space); stops at the first non-zero return. */
static int query_each(const char *query, int (*fn)(const char *, const char *, void *, char *, size_t), void *arg,
                      char *err, size_t errlen)
{
    if (!query) return AQ_OK;
    const char *p = query;
    while (*p) {
        size_t n = strcspn(p, "&");
        if (n > 0) {
            char *pair = aq_xstrndup(p, n);
            char *eq = strchr(pair, '=');
            if (eq) *eq = '\0';
            char *k = evhttp_uridecode(pair, 1, NULL);
            char *v = evhttp_uridecode(eq ? eq + 1 : "", 1, NULL);
            int rc = k && v ? fn(k, v, arg, err, errlen) : AQ_EINVAL;
            if (!k || !v) aq_seterr(err, errlen, "malformed query string");
            free(k);
            free(v);
            free(pair);
            if (rc) return rc;
        }
        p += n + (p[n] == '&');
    }
    return AQ_OK;
}

/* A time as the page sends it (ISO 8601 from Date.toISOString, or a
 * listed_at the API gave): PostgreSQL parses it; this keeps out anything
 * that is no time at all. */
static bool time_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= 48) return false;
    if (!strcmp(s, "-infinity") || !strcmp(s, "infinity")) return true;
    return strspn(s, "0123456789-:.+TZ ") == n && s[0] >= '0' && s[0] <= '9';
}

static bool copy_value(char *dst, size_t cap, const char *v)
{
    size_t n = strlen(v);
    if (n >= cap) return false;
    memcpy(dst, v, n + 1);
    return true;
}

static int parse_limit(const char *v, int *out, char *err, size_t errlen)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (!*v || *end || errno || n < 1 || n > AQ_DASHBOARD_PAGE_MAX) {
        aq_seterr(err, errlen, "limit: must be an integer from 1 to %d", AQ_DASHBOARD_PAGE_MAX);
        return AQ_EINVAL;
    }
    *out = (int)n;
    return AQ_OK;
}

static int task_param(const char *k, const char *v, void *arg, char *err, size_t errlen)
{
    aq_dashboard_task_query *q = arg;
    if (!*v && strcmp(k, "limit")) return AQ_OK; /* an empty field of the form */
    if (!strcmp(k, "status")) {
        if (aq_status_parse(v) == AQ_STATUS_NONE || !copy_value(q->status, sizeof q->status, v)) {
            aq_seterr(err, errlen, "status: no status '%.40s'", v);
            return AQ_EINVAL;
        }
    } else if (!strcmp(k, "user")) {
        if (!copy_value(q->user, sizeof q->user, v)) {
            aq_seterr(err, errlen, "user: a user_id is at most 128 bytes");
            return AQ_EINVAL;
        }
    } else if (!strcmp(k, "from") || !strcmp(k, "to")) {
        char *dst = !strcmp(k, "from") ? q->from : q->to;
        if (!time_ok(v) || !copy_value(dst, sizeof q->from, v)) {
            aq_seterr(err, errlen, "%s: '%.48s' is not a time (ISO 8601, e.g. 2026-12-01T10:00:00Z)", k, v);
            return AQ_EINVAL;
        }
    } else if (!strcmp(k, "before")) {
        const char *bar = strrchr(v, '|');
        char at[48];
        if (!bar || (size_t)(bar - v) >= sizeof at) goto bad_cursor;
        memcpy(at, v, (size_t)(bar - v));
        at[bar - v] = '\0';
        if (!time_ok(at) || !aq_task_uuid_valid(bar + 1)) goto bad_cursor;
        memcpy(q->before_at, at, strlen(at) + 1);
        if (!copy_value(q->before_id, sizeof q->before_id, bar + 1)) goto bad_cursor;
    } else if (!strcmp(k, "limit")) {
        return parse_limit(v, &q->limit, err, errlen);
    }
    return AQ_OK;
bad_cursor:
    aq_seterr(err, errlen, "before: not a cursor this API gave (TIME|TASK_ID)");
    return AQ_EINVAL;
}

int aq_dashboard_parse_task_query(const char *query, aq_dashboard_task_query *q, char *err, size_t errlen)
{
    memset(q, 0, sizeof *q);
    q->limit = AQ_DASHBOARD_PAGE_DEFAULT;
    return query_each(query, task_param, q, err, errlen);
}

static int dead_param(const char *k, const char *v, void *arg, char *err, size_t errlen)
{
    aq_dashboard_dead_query *q = arg;
    if (!*v && strcmp(k, "limit")) return AQ_OK;
    if (!strcmp(k, "reason")) {
        size_t n = strlen(v);
        if (n > 32 || strspn(v, "abcdefghijklmnopqrstuvwxyz_") != n) {
            aq_seterr(err, errlen, "reason: a reason is a word of a-z and _ (e.g. failed, rejected)");
            return AQ_EINVAL;
        }
        memcpy(q->reason, v, n + 1);
    } else if (!strcmp(k, "parked")) {
        if (!strcmp(v, "1") || !strcmp(v, "true")) q->parked = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false")) q->parked = false;
        else {
            aq_seterr(err, errlen, "parked: 1 or 0");
            return AQ_EINVAL;
        }
    } else if (!strcmp(k, "before")) {
        char *end;
        errno = 0;
        long long n = strtoll(v, &end, 10);
        if (*end || errno || n < 1) {
            aq_seterr(err, errlen, "before: a dead letter id (a positive integer)");
            return AQ_EINVAL;
        }
        q->before = n;
    } else if (!strcmp(k, "limit")) {
        return parse_limit(v, &q->limit, err, errlen);
    }
    return AQ_OK;
}

int aq_dashboard_parse_dead_query(const char *query, aq_dashboard_dead_query *q, char *err, size_t errlen)
{
    memset(q, 0, sizeof *q);
    q->limit = AQ_DASHBOARD_PAGE_DEFAULT;
    return query_each(query, dead_param, q, err, errlen);
}

/* A DNS rebinding page (evil.example resolving to 127.0.0.1) reaches a
 * loopback listener with its own name in Host: such a listener answers
 * only loopback addresses, "localhost" and the name allowed. */
bool aq_dashboard_host_allowed(const char *host, const char *allow)
{
    if (!host) return true; /* HTTP/1.0 without Host: no browser sends that */
    char name[256];
    size_t n;
    if (host[0] == '[') {
        const char *end = strchr(host, ']');
        if (!end) return false;
        n = (size_t)(end - host - 1);
        host++;
    } else {
        n = strcspn(host, ":");
    }
    if (n == 0 || n >= sizeof name) return false;
    memcpy(name, host, n);
    name[n] = '\0';
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, name, &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, name, &a6) == 1) return IN6_IS_ADDR_LOOPBACK(&a6);
    if (!strcasecmp(name, "localhost")) return true;
    return allow && *allow && !strcasecmp(name, allow);
}

/* ----------------------------------------------------------- answers --- */

static void security_headers(struct evhttp_request *req, const char *ctype, bool cacheable)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", ctype);
    evhttp_add_header(h, "Content-Security-Policy", DASH_CSP);
    evhttp_add_header(h, "X-Content-Type-Options", "nosniff");
    evhttp_add_header(h, "X-Frame-Options", "DENY");
    evhttp_add_header(h, "Referrer-Policy", "no-referrer");
    evhttp_add_header(h, "Cross-Origin-Opener-Policy", "same-origin");
    evhttp_add_header(h, "Cross-Origin-Resource-Policy", "same-origin");
    /* The API answers are live figures; the assets change with the binary. */
    evhttp_add_header(h, "Cache-Control", cacheable ? "no-cache" : "no-store");
}

static void reply_bytes(struct evhttp_request *req, int code, const char *ctype, bool cacheable, const void *body,
                        size_t len)
{
    struct evbuffer *b = evbuffer_new();
    if (!b) aq_oom("an HTTP answer");
    evbuffer_add(b, body, len);
    security_headers(req, ctype, cacheable);
    evhttp_send_reply(req, code, NULL, b);
    evbuffer_free(b);
}

static void reply_json(struct evhttp_request *req, int code, const char *json)
{
    size_t n;
    char *safe = aq_dashboard_json_harden(json, strlen(json), &n);
    reply_bytes(req, code, "application/json; charset=utf-8", false, safe, n);
    free(safe);
}

/* {"error": msg} as JSON text (jansson escapes msg); caller frees. */
static char *error_json(const char *fmt, va_list ap)
{
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    json_t *o = json_pack("{s:s}", "error", msg);
    if (!o) { /* not UTF-8: say so without it */
        o = json_pack("{s:s}", "error", "an error whose text is not UTF-8");
        if (!o) aq_oom("an error answer");
    }
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s) aq_oom("an error answer");
    return s;
}

static void reply_error(struct evhttp_request *req, int code, const char *fmt, ...) AQ_PRINTF(3, 4);
static void reply_error(struct evhttp_request *req, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = error_json(fmt, ap);
    va_end(ap);
    reply_json(req, code, s);
    free(s);
}

static void job_error(job *j, int code, const char *fmt, ...) AQ_PRINTF(3, 4);
static void job_error(job *j, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    free(j->body);
    j->body = error_json(fmt, ap);
    va_end(ap);
    j->code = code;
}

static void job_free(job *j)
{
    for (int i = 0; i < j->nparam; i++) free(j->param[i]);
    free(j->mgmt_error);
    json_decref(j->mgmt_list);
    free(j->body);
    free(j);
}

static void job_answer(job *j)
{
    if (j->body) reply_json(j->req, j->code ? j->code : 200, j->body);
    else reply_error(j->req, 500, "no answer");
    job_free(j);
}

/* ------------------------------------------------------ the backends --- */

static bool stopping(aq_dashboard *d)
{
    pthread_mutex_lock(&d->mu);
    bool s = d->stopping;
    pthread_mutex_unlock(&d->mu);
    return s;
}

static bool stop_cb(void *arg) { return stopping(arg); }

/* The reader or the writer connection of `b`, made if need be. */
static PGconn *pg_conn(backend *b, bool writer, char *err, size_t errlen)
{
    PGconn **slot = writer ? &b->writer : &b->reader;
    if (*slot && PQstatus(*slot) != CONNECTION_OK) {
        PQfinish(*slot);
        *slot = NULL;
    }
    if (*slot) return *slot;
    aq_pg_connect_opts o = {.application_name = writer ? "agentq-dashboard-admin" : "agentq-dashboard",
                            .timeout_ms = DASH_CONNECT_TIMEOUT_MS, .stop = stop_cb, .stop_arg = b->d};
    PGconn *c = aq_pg_connect(writer ? b->d->writer_dsn : b->d->reader_dsn, &o, err, errlen);
    if (!c) return NULL;
    /* Read-only whatever role the DSN logs in as; UTC, so "today" is the
     * UTC day and every time the page gets says +00:00. */
    PGresult *r = PQexec(c, writer ? "SET statement_timeout = '" DASH_STATEMENT_TIMEOUT "'; SET TimeZone = 'UTC'"
                                   : "SET default_transaction_read_only = on; SET statement_timeout = '"
                                     DASH_STATEMENT_TIMEOUT "'; SET TimeZone = 'UTC'");
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok) aq_seterr(err, errlen, "setting up the connection: %s", PQerrorMessage(c));
    PQclear(r);
    if (!ok) {
        PQfinish(c);
        return NULL;
    }
    *slot = c;
    return c;
}

/* What a failed statement means for the page: 400 for a value PostgreSQL
 * refused (a time it cannot parse), 504 for the statement timeout, 503
 * when the connection is gone (the caller may try once more), else 500. */
static int pg_failure(PGconn *pg, const PGresult *r, char *err, size_t errlen)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    aq_seterr(err, errlen, "%s", msg ? msg : PQerrorMessage(pg));
    size_t n = strlen(err);
    while (n && (err[n - 1] == '\n' || err[n - 1] == ' ')) err[--n] = '\0';
    if (PQstatus(pg) != CONNECTION_OK) return 503;
    if (state && !strncmp(state, "22", 2)) return 400;
    if (state && !strcmp(state, "57014")) return 504;
    return 500;
}

/* Runs statement `name` and puts the first column of its first row in
 * *out (malloc'd; NULL when there is no row). Returns 0, or the HTTP
 * status of the failure with the reason in err. */
static int run_one(PGconn *pg, const char *name, int n, const char *const *params, char **out, char *err,
                   size_t errlen)
{
    *out = NULL;
    PGresult *r = PQexecParams(pg, aq_dashboard_sql(name), n, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        int code = pg_failure(pg, r, err, errlen);
        PQclear(r);
        return code;
    }
    if (st == PGRES_TUPLES_OK && PQntuples(r) > 0 && !PQgetisnull(r, 0, 0)) *out = aq_xstrdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

static int run_cmd(PGconn *pg, const char *sql, char *err, size_t errlen)
{
    PGresult *r = PQexec(pg, sql);
    int code = PQresultStatus(r) == PGRES_COMMAND_OK ? 0 : pg_failure(pg, r, err, errlen);
    PQclear(r);
    return code;
}

/* A growing text buffer for the answers made of several statements. */
typedef struct sbuf {
    char *s;
    size_t len, cap;
} sbuf;

static void sb_add(sbuf *b, const char *s)
{
    size_t n = strlen(s);
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->s = aq_xrealloc(b->s, b->cap);
    }
    memcpy(b->s + b->len, s, n + 1);
    b->len += n;
}

/* A JSON array of page + 1 rows cut to `page`: returns the page as JSON
 * text (caller frees) and sets *more, and *last to the last row kept
 * (a new reference) when there is more. NULL if `rows` is not an array. */
static char *cut_page(const char *rows, int page, bool *more, json_t **last)
{
    json_t *a = json_loads(rows, JSON_DECODE_ANY, NULL);
    *more = false;
    if (last) *last = NULL;
    if (!json_is_array(a)) {
        json_decref(a);
        return NULL;
    }
    if (json_array_size(a) > (size_t)page) {
        *more = true;
        while (json_array_size(a) > (size_t)page) json_array_remove(a, json_array_size(a) - 1);
        if (last && page > 0) *last = json_incref(json_array_get(a, (size_t)page - 1));
    }
    char *s = json_dumps(a, JSON_COMPACT | JSON_REAL_PRECISION(15));
    json_decref(a);
    if (!s) aq_oom("a page of rows");
    return s;
}

/* The statements of one answer run in one snapshot. */
#define READ_TX "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

static int do_overview(PGconn *pg, job *j, char *err, size_t errlen)
{
    static const char *const parts[][2] = {{"counts", "overview_counts"}, {"throughput", "overview_throughput"},
                                           {"running", "overview_running"}, {"llm", "overview_llm"},
                                           {"limits", "overview_limits"}};
    int code = run_cmd(pg, READ_TX, err, errlen);
    sbuf b = {0};
    sb_add(&b, "{");
    for (size_t i = 0; code == 0 && i < AQ_ARRAY_LEN(parts); i++) {
        char *v;
        if ((code = run_one(pg, parts[i][1], 0, NULL, &v, err, errlen)) != 0) break;
        sb_add(&b, i ? ",\"" : "\"");
        sb_add(&b, parts[i][0]);
        sb_add(&b, "\":");
        sb_add(&b, v ? v : "null");
        free(v);
    }
    sb_add(&b, "}");
    char ignore[8];
    (void)run_cmd(pg, code == 0 ? "COMMIT" : "ROLLBACK", ignore, sizeof ignore);
    if (code == 0) j->body = b.s;
    else free(b.s);
    return code;
}

static int do_tasks(PGconn *pg, job *j, char *err, size_t errlen)
{
    char *rows;
    int code = run_one(pg, "tasks", j->nparam, (const char *const *)j->param, &rows, err, errlen);
    if (code) return code;
    bool more;
    json_t *last;
    char *page = cut_page(rows ? rows : "[]", j->limit, &more, &last);
    free(rows);
    if (!page) {
        aq_seterr(err, errlen, "the task list is not a JSON array");
        return 500;
    }
    /* The cursor is the last row shown, as the next request sends it back. */
    json_t *next = json_null();
    if (last) {
        const char *at = json_string_value(json_object_get(last, "listed_at"));
        const char *id = json_string_value(json_object_get(last, "task_id"));
        if (at && id) next = json_sprintf("%s|%s", at, id);
        json_decref(last);
    }
    char *cursor = json_dumps(next, JSON_ENCODE_ANY);
    json_decref(next);
    sbuf b = {0};
    sb_add(&b, "{\"tasks\":");
    sb_add(&b, page);
    sb_add(&b, more ? ",\"more\":true,\"next\":" : ",\"more\":false,\"next\":");
    sb_add(&b, cursor);
    sb_add(&b, "}");
    free(cursor);
    free(page);
    j->body = b.s;
    return 0;
}

static int do_task(PGconn *pg, job *j, char *err, size_t errlen)
{
    const char *const *p = (const char *const *)j->param;
    int code = run_cmd(pg, READ_TX, err, errlen);
    char *task = NULL, *steps = NULL, *dead = NULL;
    if (code == 0) code = run_one(pg, "task", 1, p, &task, err, errlen);
    if (code == 0 && task) code = run_one(pg, "task_steps", 1, p, &steps, err, errlen);
    if (code == 0 && task) code = run_one(pg, "task_dead_letters", 1, p, &dead, err, errlen);
    char ignore[8];
    (void)run_cmd(pg, code == 0 ? "COMMIT" : "ROLLBACK", ignore, sizeof ignore);
    if (code == 0 && !task) {
        aq_seterr(err, errlen, "no task %s", j->param[0]);
        code = 404;
    }
    if (code == 0) {
        sbuf b = {0};
        sb_add(&b, "{\"task\":");
        sb_add(&b, task);
        sb_add(&b, ",\"steps\":");
        sb_add(&b, steps ? steps : "[]");
        sb_add(&b, ",\"dead_letters\":");
        sb_add(&b, dead ? dead : "[]");
        sb_add(&b, "}");
        j->body = b.s;
    }
    free(task);
    free(steps);
    free(dead);
    return code;
}

static int do_dead(PGconn *pg, job *j, char *err, size_t errlen)
{
    int code = run_cmd(pg, READ_TX, err, errlen);
    char *rows = NULL, *reasons = NULL;
    if (code == 0) code = run_one(pg, "dead_letters", j->nparam, (const char *const *)j->param, &rows, err, errlen);
    if (code == 0) code = run_one(pg, "dead_letter_reasons", 0, NULL, &reasons, err, errlen);
    char ignore[8];
    (void)run_cmd(pg, code == 0 ? "COMMIT" : "ROLLBACK", ignore, sizeof ignore);
    if (code == 0) {
        bool more;
        json_t *last;
        char *page = cut_page(rows ? rows : "[]", j->limit, &more, &last);
        if (!page) {
            aq_seterr(err, errlen, "the dead letters are not a JSON array");
            code = 500;
        } else {
            char next[32] = "null";
            if (last) {
                json_t *id = json_object_get(last, "id");
                if (json_is_integer(id)) snprintf(next, sizeof next, "%lld", (long long)json_integer_value(id));
                json_decref(last);
            }
            sbuf b = {0};
            sb_add(&b, "{\"dead_letters\":");
            sb_add(&b, page);
            sb_add(&b, more ? ",\"more\":true,\"next\":" : ",\"more\":false,\"next\":");
            sb_add(&b, next);
            sb_add(&b, ",\"reasons\":");
            sb_add(&b, reasons ? reasons : "[]");
            sb_add(&b, "}");
            j->body = b.s;
            free(page);
        }
    }
    free(rows);
    free(reasons);
    return code;
}

/* The groups of the topology, in the order the overview lists them. */
static const char *const G_TASKS = "tasks", *const G_LANE = "lane", *const G_RETRY = "retry", *const G_DEAD = "dead";

static json_t *queue_entry(const aq_dashboard *d, int i)
{
    return json_pack("{s:s,s:s,s:n,s:n,s:n}", "name", d->queues[i], "group", d->groups[i], "ready", "unacked",
                     "consumers");
}

static char *queues_answer(json_t *list, const char *source, const char *mgmt_error)
{
    json_t *o = json_pack("{s:s,s:o}", "source", source, "queues", list);
    json_object_set_new(o, "management_error", mgmt_error ? json_string(mgmt_error) : json_null());
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s) aq_oom("the queue depths");
    return s;
}

/* Ready counts by passive declare: unacked cannot be had that way. A
 * declare of a queue that does not exist closes the channel, so the
 * connection is made again for the queues after it. With the management
 * API's list, only the queues it had no ready count for are asked. */
static void do_queues_amqp(backend *b, job *j)
{
    aq_dashboard *d = b->d;
    char err[512] = "";
    json_t *list = json_array();
    bool down = false;
    for (int i = 0; i < d->nqueues; i++) {
        json_t *e = j->mgmt_list ? json_incref(json_array_get(j->mgmt_list, (size_t)i)) : NULL;
        if (e && (!json_is_null(json_object_get(e, "ready")) || json_object_get(e, "error"))) {
            json_array_append_new(list, e); /* counted, or not there at all */
            continue;
        }
        if (!e) e = queue_entry(d, i);
        if (!b->broker && !down) {
            b->broker = aq_broker_connect(d->cfg, 0, DASH_BROKER_TIMEOUT_MS, err, sizeof err);
            down = !b->broker;
        }
        int64_t m = 0, c = 0;
        if (down) {
            json_object_set_new(e, "error", json_string(err));
        } else if (aq_broker_queue_depth(b->broker, d->queues[i], &m, &c, err, sizeof err) == AQ_OK) {
            json_object_set_new(e, "ready", json_integer(m));
            json_object_set_new(e, "consumers", json_integer(c));
            if (j->mgmt_list) json_object_set_new(e, "via", json_string("amqp"));
        } else {
            json_object_set_new(e, "error", json_string(err));
            aq_broker_free(b->broker);
            b->broker = NULL;
        }
        json_array_append_new(list, e);
    }
    j->body = queues_answer(list, j->mgmt_list ? "management" : "amqp", j->mgmt_error);
    j->code = 200;
}

/* agentqctl cancel, through the writer. */
static int do_cancel(PGconn *pg, job *j, char *err, size_t errlen)
{
    char *row;
    int code = run_one(pg, "cancel", 1, (const char *const *)j->param, &row, err, errlen);
    if (code) return code;
    if (!row) {
        aq_seterr(err, errlen, "no task %s", j->param[0]);
        return 404;
    }
    json_t *o = json_loads(row, 0, NULL);
    const char *status = json_string_value(json_object_get(o, "status"));
    aq_log_task(AQ_LOG_INFO, j->param[0], NULL, "dashboard: cancel requested by %s (task now %s)", j->peer,
                status ? status : "?");
    json_decref(o);
    j->body = row;
    return 0;
}

/* agentqctl requeue, for one dead letter: the dead letter is marked
 * requeued and its task queued, the body is published to the task
 * exchange and confirmed; if the broker does not confirm, the marks are
 * taken back and the dead letter stays parked. */
static int do_requeue(PGconn *pg, job *j, char *err, size_t errlen)
{
    aq_dashboard *d = j->d;
    const char *const p[] = {j->param[0]};
    PGresult *r = PQexecParams(pg, aq_dashboard_sql("requeue_select"), 1, NULL, p, NULL, NULL, 1);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        int code = pg_failure(pg, r, err, errlen);
        PQclear(r);
        return code;
    }
    if (PQntuples(r) == 0) {
        PQclear(r);
        aq_seterr(err, errlen, "no parked dead letter %s (requeued already, or no such id)", j->param[0]);
        return 404;
    }
    const char *tid = PQgetvalue(r, 0, 2), *reason = PQgetvalue(r, 0, 3);
    if (!strcmp(reason, "duplicate")) {
        aq_seterr(err, errlen,
                  "dead letter %s is a duplicate: a refused twin of task %s, not the task; "
                  "agentqctl requeue --dead --reason duplicate sends such letters back if you mean it",
                  j->param[0], tid);
        PQclear(r);
        return 409;
    }
    aq_broker *b = aq_broker_connect(d->cfg, 0, DASH_CONFIRM_TIMEOUT_MS, err, errlen);
    if (!b || aq_broker_declare(b, d->cfg, err, errlen) != AQ_OK) {
        aq_broker_free(b);
        PQclear(r);
        return 503;
    }
    int code = run_cmd(pg, "BEGIN", err, errlen);
    char *none;
    if (code == 0) code = run_one(pg, "requeue_mark", 1, p, &none, err, errlen);
    if (code == 0) code = run_cmd(pg, "COMMIT", err, errlen);
    else {
        char ignore[8];
        (void)run_cmd(pg, "ROLLBACK", ignore, sizeof ignore);
    }
    if (code == 0) {
        aq_publish msg = {d->cfg->amqp_exchange, "task", PQgetvalue(r, 0, 1), (size_t)PQgetlength(r, 0, 1),
                          *tid ? tid : NULL, atoi(PQgetvalue(r, 0, 4)), NULL, 0, NULL};
        int64_t nacked = 0;
        if (aq_broker_publish(b, &msg, NULL, err, errlen) < 0 ||
            aq_broker_wait_confirms(b, DASH_CONFIRM_TIMEOUT_MS, &nacked, err, errlen) != AQ_OK) {
            char why[512], ignore[512];
            snprintf(why, sizeof why, "%s", err);
            if (run_cmd(pg, "BEGIN", ignore, sizeof ignore) == 0 &&
                run_one(pg, "requeue_unmark", 1, p, &none, ignore, sizeof ignore) == 0)
                (void)run_cmd(pg, "COMMIT", ignore, sizeof ignore);
            else
                (void)run_cmd(pg, "ROLLBACK", ignore, sizeof ignore);
            aq_seterr(err, errlen, "not confirmed by the broker (%s); the dead letter stays parked", why);
            code = 503;
        }
    }
    aq_broker_free(b);
    if (code == 0) {
        aq_log_task(AQ_LOG_INFO, *tid ? tid : NULL, NULL, "dashboard: dead letter %s requeued by %s", j->param[0],
                    j->peer);
        json_t *o = json_pack("{s:s,s:s?,s:b}", "id", j->param[0], "task_id", *tid ? tid : NULL, "requeued", 1);
        j->body = json_dumps(o, JSON_COMPACT);
        json_decref(o);
    }
    PQclear(r);
    return code;
}

static void run_job(backend *b, job *j)
{
    char err[1024] = "";
    if (j->kind == J_QUEUES) {
        do_queues_amqp(b, j);
        return;
    }
    bool writer = j->kind == J_CANCEL || j->kind == J_REQUEUE;
    int code = 0;
    /* A connection found dead when used is made again once: the server
     * may have restarted since the last page. An action is not repeated
     * (its first try may have committed). */
    for (int attempt = 0; attempt < 2; attempt++) {
        PGconn *pg = pg_conn(b, writer, err, sizeof err);
        if (!pg) {
            job_error(j, 503, "database unavailable: %s", err);
            return;
        }
        switch (j->kind) {
        case J_OVERVIEW: code = do_overview(pg, j, err, sizeof err); break;
        case J_TASKS: code = do_tasks(pg, j, err, sizeof err); break;
        case J_TASK: code = do_task(pg, j, err, sizeof err); break;
        case J_DEAD: code = do_dead(pg, j, err, sizeof err); break;
        case J_CANCEL: code = do_cancel(pg, j, err, sizeof err); break;
        case J_REQUEUE: code = do_requeue(pg, j, err, sizeof err); break;
        case J_QUEUES: break;
        }
        if (code != 503 || writer || PQstatus(pg) == CONNECTION_OK) break;
    }
    if (code) job_error(j, code, "%s", err);
    else j->code = 200;
}

static void *backend_main(void *arg)
{
    backend *b = arg;
    aq_dashboard *d = b->d;
    for (;;) {
        pthread_mutex_lock(&d->mu);
        while (!d->head && !d->stopping) pthread_cond_wait(&d->cv, &d->mu);
        if (d->stopping) {
            pthread_mutex_unlock(&d->mu);
            break;
        }
        job *j = d->head;
        d->head = j->next;
        if (!d->head) d->tail = NULL;
        pthread_mutex_unlock(&d->mu);
        run_job(b, j);
        aq_mailbox_push(d->done, j);
    }
    if (b->reader) PQfinish(b->reader);
    if (b->writer) PQfinish(b->writer);
    aq_broker_free(b->broker);
    b->reader = b->writer = NULL;
    b->broker = NULL;
    return NULL;
}

static void on_done(void *item, void *arg)
{
    (void)arg;
    job_answer(item);
}

/* ---------------------------------------------------------- requests --- */

static job *job_new(aq_dashboard *d, struct evhttp_request *req, job_kind kind)
{
    job *j = aq_xcalloc(1, sizeof *j);
    j->d = d;
    j->req = req;
    j->kind = kind;
    struct evhttp_connection *c = evhttp_request_get_connection(req);
    char *addr = NULL;
    uint16_t port = 0;
    if (c) evhttp_connection_get_peer(c, &addr, &port);
    snprintf(j->peer, sizeof j->peer, "%s:%u", addr ? addr : "?", (unsigned)port);
    return j;
}

static void job_param(job *j, const char *v) { j->param[j->nparam++] = v && *v ? aq_xstrdup(v) : NULL; }

static void submit(aq_dashboard *d, job *j)
{
    pthread_mutex_lock(&d->mu);
    if (d->tail) d->tail->next = j;
    else d->head = j;
    d->tail = j;
    pthread_cond_signal(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static void on_mgmt(aq_http_req *hr, const aq_http_result *res, void *arg)
{
    (void)hr;
    mgmt_call *c = arg;
    aq_dashboard *d = c->d;
    struct evhttp_request *req = c->req;
    free(c);
    if (stopping(d)) {
        reply_error(req, 503, "the dashboard is stopping");
        return;
    }
    char why[512] = "";
    json_t *all = NULL;
    if (res->code != 0) snprintf(why, sizeof why, "%s", res->error);
    else if (res->status != 200) snprintf(why, sizeof why, "HTTP %ld from the management API", res->status);
    else if (!(all = json_loadb(res->body, res->body_len, 0, NULL)) || !json_is_array(all))
        snprintf(why, sizeof why, "the management API's answer is not a list of queues");
    if (*why) {
        json_decref(all);
        /* Ready counts are still to be had from the broker itself. */
        job *j = job_new(d, req, J_QUEUES);
        j->mgmt_error = aq_xstrdup(why);
        submit(d, j);
        return;
    }
    json_t *list = json_array();
    for (int i = 0; i < d->nqueues; i++) {
        json_t *e = queue_entry(d, i), *q = NULL;
        size_t k;
        json_t *v;
        json_array_foreach(all, k, v) {
            const char *name = json_string_value(json_object_get(v, "name"));
            if (name && !strcmp(name, d->queues[i])) {
                q = v;
                break;
            }
        }
        if (!q) {
            json_object_set_new(e, "error", json_string("no such queue"));
        } else {
            /* A queue the statistics have not seen yet has no counts. */
            static const char *const fields[][2] = {
                {"ready", "messages_ready"}, {"unacked", "messages_unacknowledged"}, {"consumers", "consumers"}};
            for (size_t f = 0; f < AQ_ARRAY_LEN(fields); f++) {
                json_t *n = json_object_get(q, fields[f][1]);
                if (json_is_integer(n)) json_object_set(e, fields[f][0], n);
            }
        }
        json_array_append_new(list, e);
    }
    json_decref(all);
    bool missing = false;
    for (int i = 0; i < d->nqueues; i++) {
        json_t *e = json_array_get(list, (size_t)i);
        missing |= json_is_null(json_object_get(e, "ready")) && !json_object_get(e, "error");
    }
    if (missing) {
        job *j = job_new(d, req, J_QUEUES);
        j->mgmt_list = list;
        submit(d, j);
        return;
    }
    char *body = queues_answer(list, "management", NULL);
    reply_json(req, 200, body);
    free(body);
}

static void queues_request(aq_dashboard *d, struct evhttp_request *req)
{
    if (!d->mgmt) {
        submit(d, job_new(d, req, J_QUEUES));
        return;
    }
    mgmt_call *c = aq_xcalloc(1, sizeof *c);
    c->d = d;
    c->req = req;
    aq_http_request rq = {.method = AQ_HTTP_GET, .url = d->mgmt_queues_url, .timeout_ms = DASH_MGMT_TIMEOUT_MS,
                          .max_response_bytes = (size_t)32 << 20};
    char err[256];
    if (aq_http_submit(d->mgmt, &rq, on_mgmt, c, NULL, err, sizeof err) != AQ_OK) {
        free(c);
        job *j = job_new(d, req, J_QUEUES);
        j->mgmt_error = aq_xstrdup(err);
        submit(d, j);
        return;
    }
}

static void info_request(aq_dashboard *d, struct evhttp_request *req)
{
    json_t *o = json_pack("{s:s,s:b,s:b,s:i,s:i}", "version", AGENTQ_VERSION, "actions", d->token != NULL,
                          "management", d->mgmt != NULL, "lanes", d->cfg->amqp_lanes, "page_max",
                          AQ_DASHBOARD_PAGE_MAX);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    reply_json(req, 200, s);
    free(s);
}

/* "/api/tasks/<uuid>" + rest: the id (37 bytes with its NUL) and the rest. */
static const char *path_id(const char *path, const char *prefix, char *id, size_t cap)
{
    size_t pl = strlen(prefix);
    if (strncmp(path, prefix, pl)) return NULL;
    const char *s = path + pl;
    size_t n = strcspn(s, "/");
    if (n == 0 || n >= cap) return NULL;
    memcpy(id, s, n);
    id[n] = '\0';
    return s + n;
}

static void reply_method(struct evhttp_request *req, const char *allow)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", allow);
    reply_error(req, 405, "method not allowed: use %s", allow);
}

/* An action may run: POST, a token configured, the request's token equal
 * to it. Otherwise answers and returns false. */
static bool action_allowed(aq_dashboard *d, struct evhttp_request *req, const char *what)
{
    if (evhttp_request_get_command(req) != EVHTTP_REQ_POST) {
        reply_method(req, "POST");
        return false;
    }
    if (!d->token) {
        reply_error(req, 403, "read-only dashboard: start it with --admin-token-env NAME to %s", what);
        return false;
    }
    const char *auth = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!aq_dashboard_authorized(d->token, auth)) {
        reply_error(req, 403, "the admin token is missing or wrong");
        return false;
    }
    return true;
}

static void tasks_request(aq_dashboard *d, struct evhttp_request *req, const char *query)
{
    aq_dashboard_task_query q;
    char err[256], lim[16];
    if (aq_dashboard_parse_task_query(query, &q, err, sizeof err) != AQ_OK) {
        reply_error(req, 400, "%s", err);
        return;
    }
    job *j = job_new(d, req, J_TASKS);
    snprintf(lim, sizeof lim, "%d", q.limit + 1); /* one more: is there a next page? */
    j->limit = q.limit;
    job_param(j, q.status);
    job_param(j, q.user);
    job_param(j, q.from);
    job_param(j, q.to);
    job_param(j, q.before_at);
    job_param(j, q.before_id);
    job_param(j, lim);
    submit(d, j);
}

static void dead_request(aq_dashboard *d, struct evhttp_request *req, const char *query)
{
    aq_dashboard_dead_query q;
    char err[256], before[32] = "", lim[16];
    if (aq_dashboard_parse_dead_query(query, &q, err, sizeof err) != AQ_OK) {
        reply_error(req, 400, "%s", err);
        return;
    }
    job *j = job_new(d, req, J_DEAD);
    if (q.before) snprintf(before, sizeof before, "%lld", (long long)q.before);
    snprintf(lim, sizeof lim, "%d", q.limit + 1);
    j->limit = q.limit;
    job_param(j, q.reason);
    job_param(j, q.parked ? "true" : "false");
    job_param(j, before);
    job_param(j, lim);
    submit(d, j);
}

/* A job of one parameter, the id in the path. */
static void id_job(aq_dashboard *d, struct evhttp_request *req, job_kind kind, const char *id)
{
    job *j = job_new(d, req, kind);
    job_param(j, id);
    submit(d, j);
}

static bool dead_id_valid(const char *id)
{
    char *end;
    errno = 0;
    long long n = strtoll(id, &end, 10);
    return *id && !*end && !errno && n >= 1;
}

static void api_request(aq_dashboard *d, struct evhttp_request *req, const char *path, const char *query)
{
    char id[48];
    const char *rest;
    if ((rest = path_id(path, "/api/tasks/", id, sizeof id)) && !strcmp(rest, "/cancel")) {
        if (!action_allowed(d, req, "cancel tasks")) return;
        if (!aq_task_uuid_valid(id)) reply_error(req, 400, "'%s' is not a task id", id);
        else id_job(d, req, J_CANCEL, id);
        return;
    }
    if ((rest = path_id(path, "/api/dead-letters/", id, sizeof id)) && !strcmp(rest, "/requeue")) {
        if (!action_allowed(d, req, "requeue dead letters")) return;
        if (!dead_id_valid(id)) reply_error(req, 400, "'%s' is not a dead letter id", id);
        else id_job(d, req, J_REQUEUE, id);
        return;
    }
    if (evhttp_request_get_command(req) != EVHTTP_REQ_GET) {
        reply_method(req, "GET");
    } else if (!strcmp(path, "/api/info")) {
        info_request(d, req);
    } else if (!strcmp(path, "/api/overview")) {
        submit(d, job_new(d, req, J_OVERVIEW));
    } else if (!strcmp(path, "/api/queues")) {
        queues_request(d, req);
    } else if (!strcmp(path, "/api/tasks")) {
        tasks_request(d, req, query);
    } else if ((rest = path_id(path, "/api/tasks/", id, sizeof id)) && !*rest) {
        if (!aq_task_uuid_valid(id)) reply_error(req, 400, "'%s' is not a task id", id);
        else id_job(d, req, J_TASK, id);
    } else if (!strcmp(path, "/api/dead-letters")) {
        dead_request(d, req, query);
    } else {
        reply_error(req, 404, "no such API: %s", path);
    }
}

static void reply_text(struct evhttp_request *req, int code, const char *msg)
{
    reply_bytes(req, code, "text/plain; charset=utf-8", false, msg, strlen(msg));
}

static void on_request(struct evhttp_request *req, void *arg)
{
    aq_dashboard *d = arg;
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    if (d->loopback && !aq_dashboard_host_allowed(evhttp_find_header(in, "Host"), d->allow_host)) {
        reply_text(req, 403, "refused: this dashboard listens on loopback and answers only for localhost, "
                             "loopback addresses and --allow-host (a guard against DNS rebinding)\n");
        return;
    }
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    if (!path || !*path) path = "/";
    if (!strncmp(path, "/api/", 5)) {
        api_request(d, req, path, evhttp_uri_get_query(uri));
        return;
    }
    size_t len;
    const char *type;
    const char *body = aq_dashboard_asset(path, &len, &type);
    if (!body) {
        reply_text(req, 404, "not found: the dashboard is at /\n");
    } else if (evhttp_request_get_command(req) != EVHTTP_REQ_GET) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET");
        reply_text(req, 405, "method not allowed\n");
    } else {
        reply_bytes(req, 200, type, true, body, len);
    }
}

/* ------------------------------------------------------------ set-up --- */

/* "HOST:PORT" or "[V6]:PORT" into host and port. */
static int parse_listen(const char *listen, char *host, size_t cap, int *port, char *err, size_t errlen)
{
    const char *colon = listen ? strrchr(listen, ':') : NULL;
    char *end;
    long p = colon ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || colon == listen || colon[1] == '\0' || *end || p < 0 || p > 65535) {
        aq_seterr(err, errlen, "--listen '%s' must be HOST:PORT (e.g. 127.0.0.1:8090)", listen ? listen : "");
        return AQ_EINVAL;
    }
    const char *h = listen;
    size_t n = (size_t)(colon - listen);
    if (h[0] == '[' && n >= 2 && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n == 0 || n >= cap) {
        aq_seterr(err, errlen, "--listen '%s': no host", listen);
        return AQ_EINVAL;
    }
    memcpy(host, h, n);
    host[n] = '\0';
    *port = (int)p;
    return AQ_OK;
}

static bool is_loopback(const char *host)
{
    struct in_addr a4;
    struct in6_addr a6;
    if (!strcasecmp(host, "localhost")) return true;
    if (inet_pton(AF_INET, host, &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
    return inet_pton(AF_INET6, host, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
}

/* The vhost of an amqp:// URL as the management API's path wants it
 * (percent-encoded; "/" when the URL names none). */
static char *url_vhost(const char *amqp_url)
{
    const char *p = strstr(amqp_url, "://");
    p = p ? p + 3 : amqp_url;
    const char *slash = strchr(p, '/');
    if (!slash || !slash[1]) return aq_xstrdup("%2F");
    size_t n = strcspn(slash + 1, "?#");
    return n ? aq_xstrndup(slash + 1, n) : aq_xstrdup("%2F");
}

static void add_queue(aq_dashboard *d, const char *name, const char *group)
{
    d->queues = aq_xrealloc(d->queues, (size_t)(d->nqueues + 1) * sizeof *d->queues);
    d->groups = aq_xrealloc(d->groups, (size_t)(d->nqueues + 1) * sizeof *d->groups);
    d->queues[d->nqueues] = aq_xstrdup(name);
    d->groups[d->nqueues] = group;
    d->nqueues++;
}

aq_dashboard *aq_dashboard_new(struct event_base *base, const aq_config *cfg, const aq_dashboard_opts *opts,
                               char *err, size_t errlen)
{
    for (size_t i = 0; i < AQ_ARRAY_LEN(SQL_NAMES); i++) {
        if (!aq_dashboard_sql(SQL_NAMES[i])) {
            aq_seterr(err, errlen, "dashboard.sql has no statement '%s' (a build out of step)", SQL_NAMES[i]);
            return NULL;
        }
    }
    char host[256];
    int port;
    if (parse_listen(opts->listen, host, sizeof host, &port, err, errlen) != AQ_OK) return NULL;

    aq_dashboard *d = aq_xcalloc(1, sizeof *d);
    d->base = base;
    d->cfg = cfg;
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    d->loopback = is_loopback(host);
    d->allow_host = opts->allow_host && *opts->allow_host ? aq_xstrdup(opts->allow_host) : NULL;
    d->token = opts->admin_token && *opts->admin_token ? aq_xstrdup(opts->admin_token) : NULL;
    d->reader_dsn = aq_xstrdup(cfg->pg_dsn);
    d->writer_dsn = aq_xstrdup(opts->admin_dsn && *opts->admin_dsn ? opts->admin_dsn : cfg->pg_dsn);

    add_queue(d, cfg->amqp_queue, G_TASKS);
    for (int i = 0; i < cfg->amqp_lanes; i++) {
        for (int band = 0; band < aq_config_bands(cfg); band++) {
            char name[256];
            aq_broker_lane_queue(cfg, i, band, name, sizeof name);
            add_queue(d, name, G_LANE);
        }
    }
    long delays[32];
    int nd = aq_config_retry_delays(cfg, delays, (int)AQ_ARRAY_LEN(delays));
    for (int i = 0; i < nd; i++) {
        char name[256];
        aq_broker_retry_queue(cfg, delays[i], name, sizeof name);
        add_queue(d, name, G_RETRY);
    }
    add_queue(d, cfg->amqp_dead_queue, G_DEAD);

    const char *mgmt = opts->management_url ? opts->management_url : cfg->amqp_management_url;
    if (mgmt && *mgmt) {
        aq_http_config hc = {.max_connections = 2, .connect_timeout_ms = DASH_MGMT_TIMEOUT_MS};
        if (!(d->mgmt = aq_http_new(base, &hc, err, errlen))) goto fail;
        char node[1024] = "";
        aq_config_amqp_node(cfg, 0, node, sizeof node); /* every node serves the same vhost */
        char *vhost = url_vhost(node);
        size_t n = strlen(mgmt);
        while (n && mgmt[n - 1] == '/') n--;
        size_t cap = n + strlen(vhost) + 128;
        d->mgmt_queues_url = aq_xmalloc(cap);
        snprintf(d->mgmt_queues_url, cap,
                 "%.*s/api/queues/%s?columns=name,messages_ready,messages_unacknowledged,consumers", (int)n, mgmt,
                 vhost);
        free(vhost);
    }

    if (!(d->done = aq_mailbox_new()) || aq_mailbox_attach(d->done, base, on_done, d) != AQ_OK) {
        aq_seterr(err, errlen, "cannot make the dashboard's mailbox (file descriptors?)");
        goto fail;
    }
    d->http = evhttp_new(base);
    if (!d->http || !(d->sock = evhttp_bind_socket_with_handle(d->http, host, (uint16_t)port))) {
        aq_seterr(err, errlen, "cannot listen on %s (address in use, or not this host's?)", opts->listen);
        goto fail;
    }
    evhttp_set_gencb(d->http, on_request, d);
    evhttp_set_allowed_methods(d->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST);
    evhttp_set_max_headers_size(d->http, 16384);
    evhttp_set_max_body_size(d->http, 4096); /* the actions take no body */
    evhttp_set_timeout(d->http, 60);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(evhttp_bound_socket_get_fd(d->sock), (struct sockaddr *)&ss, &sl) == 0)
        d->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);

    d->nbackends = opts->threads > 0 ? opts->threads : DASH_THREADS_DEFAULT;
    d->backends = aq_xcalloc((size_t)d->nbackends, sizeof *d->backends);
    for (int i = 0; i < d->nbackends; i++) {
        d->backends[i].d = d;
        if (pthread_create(&d->backends[i].thread, NULL, backend_main, &d->backends[i]) != 0) {
            aq_seterr(err, errlen, "cannot start the dashboard's threads");
            goto fail;
        }
        d->backends[i].started = true;
    }
    return d;
fail:
    aq_dashboard_free(d);
    return NULL;
}

int aq_dashboard_port(const aq_dashboard *d) { return d->port; }

void aq_dashboard_free(aq_dashboard *d)
{
    if (!d) return;
    if (d->http && d->sock) evhttp_del_accept_socket(d->http, d->sock);
    pthread_mutex_lock(&d->mu);
    d->stopping = true;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
    for (int i = 0; i < d->nbackends; i++)
        if (d->backends[i].started) pthread_join(d->backends[i].thread, NULL);
    /* Answered: what the threads finished, then what they never took. */
    if (d->done) {
        void **items;
        size_t n = aq_mailbox_take(d->done, &items);
        for (size_t i = 0; i < n; i++) job_answer(items[i]);
        free(items);
    }
    for (job *j = d->head, *next; j; j = next) {
        next = j->next;
        job_error(j, 503, "the dashboard is stopping");
        job_answer(j);
    }
    d->head = d->tail = NULL;
    aq_http_free(d->mgmt); /* answers its reads with 503 (on_mgmt) */
    aq_mailbox_free(d->done, NULL);
    if (d->http) evhttp_free(d->http);
    for (int i = 0; i < d->nqueues; i++) free(d->queues[i]);
    free(d->queues);
    free(d->groups);
    free(d->backends);
    free(d->mgmt_queues_url);
    free(d->allow_host);
    free(d->token);
    free(d->reader_dsn);
    free(d->writer_dsn);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

/* -------------------------------------------------------------- main --- */

void aq_dashboard_usage(FILE *out)
{
    fputs("Usage: agentqctl [-c FILE] dashboard [OPTIONS]\n"
          "\n"
          "Serves the agentq dashboard: queue depths, throughput, running tasks, today's LLM\n"
          "calls and rate limits; the task list and each task's step timeline; dead letters.\n"
          "Reads go through postgres.dsn (give it a login role in agentq_reader).\n"
          "\n"
          "Options:\n"
          "  --listen HOST:PORT       where to serve (default 127.0.0.1:8090; port 0: any free one)\n"
          "  --admin-token-env NAME   allow the actions (cancel a task, requeue a dead letter) to\n"
          "                           requests with 'Authorization: Bearer TOKEN', TOKEN the value of\n"
          "                           the variable NAME (at least 16 bytes); without it the\n"
          "                           dashboard is read-only and every action answers 403\n"
          "  --admin-dsn-env NAME     the variable holding the DSN the actions write through (a login\n"
          "                           role in agentq_worker; default: postgres.dsn)\n"
          "  --allow-host NAME        a Host name to answer besides localhost and loopback addresses\n"
          "                           when listening on loopback (behind a proxy or a tunnel)\n"
          "  --port-file FILE         write the port to FILE once listening\n"
          "  -h, --help               this help\n"
          "\n"
          "Queue depths: ready and unacked from amqp.management_url when it is set, else ready\n"
          "from the broker (passive declares) and unacked shown as '-'.\n"
          "Exit status: 0 after SIGINT or SIGTERM, 2 usage or configuration error.\n",
          out);
}

static void on_signal(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopexit(arg, NULL);
}

static int write_port_file(const char *path, int port)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return AQ_EIO;
    fprintf(f, "%d\n", port);
    if (fclose(f) != 0 || rename(tmp, path) != 0) return AQ_EIO;
    return AQ_OK;
}

int aq_dashboard_main(const aq_config *cfg, int argc, char **argv)
{
    static const struct option longopts[] = {{"listen", required_argument, 0, 'l'},
                                             {"admin-token-env", required_argument, 0, 't'},
                                             {"admin-dsn-env", required_argument, 0, 'w'},
                                             {"allow-host", required_argument, 0, 'a'},
                                             {"port-file", required_argument, 0, 'p'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *listen = "127.0.0.1:8090", *token_env = NULL, *dsn_env = NULL, *allow = NULL, *port_file = NULL;
    int ch;
    optind = 0; /* GNU: start afresh, whatever parsed argv before */
    while ((ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'l': listen = optarg; break;
        case 't': token_env = optarg; break;
        case 'w': dsn_env = optarg; break;
        case 'a': allow = optarg; break;
        case 'p': port_file = optarg; break;
        case 'h': aq_dashboard_usage(stdout); return 0;
        default: fprintf(stderr, "Try 'agentqctl dashboard --help'.\n"); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "agentqctl dashboard: unexpected argument '%s'. Try --help.\n", argv[optind]);
        return 2;
    }
    const char *token = NULL, *admin_dsn = NULL;
    if (token_env) {
        token = getenv(token_env);
        if (!token || strlen(token) < DASH_TOKEN_MIN) {
            fprintf(stderr,
                    "agentqctl dashboard: --admin-token-env %s: the variable %s (at least %d bytes, e.g. "
                    "openssl rand -hex 24)\n",
                    token_env, token ? "is too short" : "is not set", DASH_TOKEN_MIN);
            return 2;
        }
        /* Never in a log line, whatever logs a header. */
        (void)aq_log_add_secret(token);
    }
    if (dsn_env) {
        admin_dsn = getenv(dsn_env);
        if (!admin_dsn || !*admin_dsn) {
            fprintf(stderr, "agentqctl dashboard: --admin-dsn-env %s: the variable is not set\n", dsn_env);
            return 2;
        }
    }
    if (aq_http_global_init() != AQ_OK) {
        fprintf(stderr, "agentqctl dashboard: cannot initialise libcurl\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* evhttp writes to clients that went away */
    struct event_base *base = event_base_new();
    if (!base) aq_oom("an event loop");
    char err[1024];
    aq_dashboard_opts o = {.listen = listen, .admin_token = token, .admin_dsn = admin_dsn, .allow_host = allow};
    aq_dashboard *d = aq_dashboard_new(base, cfg, &o, err, sizeof err);
    if (!d) {
        fprintf(stderr, "agentqctl dashboard: %s\n", err);
        event_base_free(base);
        return 2;
    }
    if (port_file && write_port_file(port_file, aq_dashboard_port(d)) != AQ_OK) {
        fprintf(stderr, "agentqctl dashboard: cannot write %s: %s\n", port_file, strerror(errno));
        aq_dashboard_free(d);
        event_base_free(base);
        return 2;
    }
    char host[256];
    int port;
    (void)parse_listen(listen, host, sizeof host, &port, err, sizeof err);
    printf("agentq dashboard on http://%s%s%s:%d/ (%s)\n", strchr(host, ':') ? "[" : "", host,
           strchr(host, ':') ? "]" : "", aq_dashboard_port(d),
           token ? "actions allowed with the admin token" : "read-only");
    fflush(stdout);
    struct event *sigint = evsignal_new(base, SIGINT, on_signal, base);
    struct event *sigterm = evsignal_new(base, SIGTERM, on_signal, base);
    if (!sigint || !sigterm) aq_oom("signal events");
    event_add(sigint, NULL);
    event_add(sigterm, NULL);
    event_base_dispatch(base);
    aq_log(AQ_LOG_INFO, "dashboard: stopping");
    aq_dashboard_free(d);
    event_free(sigint);
    event_free(sigterm);
    event_base_free(base);
    return 0;
}
