/* check_dashboard.c — the dashboard without a browser and without
 * servers: the token check, the JSON hardening, the query parameters, the
 * Host guard, the statements and assets compiled in, and the HTTP surface
 * (security headers, actions refused, methods, bad parameters) of a
 * dashboard whose database is a closed port. The pages themselves, with
 * real data, are tests/browser's. */
#include "agentq/config.h"
#include "agentq/dashboard.h"
#include "agentq/http.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <event2/event.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define UUID "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f"

/* ------------------------------------------------------------ token --- */

START_TEST(token_matches_only_the_same_bearer_token)
{
    const char *want = "s3cret-token-0123456789";
    ck_assert(aq_dashboard_authorized(want, "Bearer s3cret-token-0123456789"));
    ck_assert(aq_dashboard_authorized(want, "bearer s3cret-token-0123456789"));
    ck_assert(aq_dashboard_authorized(want, "BEARER   s3cret-token-0123456789"));
    ck_assert(!aq_dashboard_authorized(want, "Bearer s3cret-token-012345678"));  /* a prefix */
    ck_assert(!aq_dashboard_authorized(want, "Bearer s3cret-token-01234567890")); /* longer */
    ck_assert(!aq_dashboard_authorized(want, "Bearer t3cret-token-0123456789"));  /* first byte */
    ck_assert(!aq_dashboard_authorized(want, "Bearer s3cret-token-0123456788"));  /* last byte */
    ck_assert(!aq_dashboard_authorized(want, "Bearer "));
    ck_assert(!aq_dashboard_authorized(want, "s3cret-token-0123456789"));
    ck_assert(!aq_dashboard_authorized(want, "Basic s3cret-token-0123456789"));
    ck_assert(!aq_dashboard_authorized(want, "Bearers3cret-token-0123456789"));
    ck_assert(!aq_dashboard_authorized(want, NULL));
}
END_TEST

START_TEST(no_token_configured_authorizes_nothing)
{
    ck_assert(!aq_dashboard_authorized(NULL, "Bearer "));
    ck_assert(!aq_dashboard_authorized("", "Bearer "));
    ck_assert(!aq_dashboard_authorized("", "Bearer x"));
    ck_assert(!aq_dashboard_authorized(NULL, NULL));
}
END_TEST

/* ------------------------------------------------------------- JSON --- */

START_TEST(harden_escapes_markup_and_keeps_the_value)
{
    /* What PostgreSQL's json_build_object sends for a hostile goal. */
    const char *in = "{\"goal\" : \"<script>window.__pwned=1</script> & <img src=x onerror=alert(1)>"
                     " \\\"q\\\" \xe2\x80\xa8 \xe2\x80\xa9 \xc3\xa9\", \"n\" : 1.5}";
    size_t n;
    char *out = aq_dashboard_json_harden(in, strlen(in), &n);
    ck_assert_uint_eq(n, strlen(out));
    ck_assert_ptr_null(strchr(out, '<'));
    ck_assert_ptr_null(strchr(out, '>'));
    ck_assert_ptr_null(strchr(out, '&'));
    ck_assert_ptr_null(strstr(out, "\xe2\x80\xa8"));
    ck_assert_ptr_null(strstr(out, "\xe2\x80\xa9"));
    ck_assert_ptr_nonnull(strstr(out, "\\u003cscript\\u003e"));
    ck_assert_ptr_nonnull(strstr(out, "\xc3\xa9")); /* other UTF-8 stays as it is */
    json_error_t e;
    json_t *a = json_loads(in, 0, &e), *b = json_loads(out, 0, &e);
    ck_assert_msg(a && b, "%s", e.text);
    ck_assert(json_equal(a, b));
    json_decref(a);
    json_decref(b);
    free(out);
}
END_TEST

START_TEST(harden_leaves_plain_json_alone)
{
    const char *in = "[{\"a\":\"b c\",\"n\":[1,2,null,true]}]";
    char *out = aq_dashboard_json_harden(in, strlen(in), NULL);
    ck_assert_str_eq(out, in);
    free(out);
    out = aq_dashboard_json_harden("", 0, NULL);
    ck_assert_str_eq(out, "");
    free(out);
}
END_TEST

/* ------------------------------------------------------- parameters --- */

START_TEST(task_query_parses_filters_and_cursor)
{
    aq_dashboard_task_query q;
    char err[256];
    ck_assert_int_eq(aq_dashboard_parse_task_query(NULL, &q, err, sizeof err), 0);
    ck_assert_int_eq(q.limit, AQ_DASHBOARD_PAGE_DEFAULT);
    ck_assert_str_eq(q.status, "");
    ck_assert_int_eq(aq_dashboard_parse_task_query("status=failed&user=alice+b%26c&limit=20&_=17", &q, err,
                                                   sizeof err), 0);
    ck_assert_str_eq(q.status, "failed");
    ck_assert_str_eq(q.user, "alice b&c");
    ck_assert_int_eq(q.limit, 20);
    ck_assert_int_eq(aq_dashboard_parse_task_query("user=%3Cscript%3E&from=2026-12-01T10%3A00%3A00.000Z"
                                                   "&to=2026-12-02T00:00:00Z",
                                                   &q, err, sizeof err), 0);
    ck_assert_str_eq(q.user, "<script>");
    ck_assert_str_eq(q.from, "2026-12-01T10:00:00.000Z");
    ck_assert_str_eq(q.to, "2026-12-02T00:00:00Z");
    /* the cursor exactly as the API gave it, '+' percent-encoded */
    ck_assert_int_eq(aq_dashboard_parse_task_query("before=2026-12-01T19%3A38%3A35.622859%2B00%3A00%7C" UUID, &q,
                                                   err, sizeof err), 0);
    ck_assert_str_eq(q.before_at, "2026-12-01T19:38:35.622859+00:00");
    ck_assert_str_eq(q.before_id, UUID);
    ck_assert_int_eq(aq_dashboard_parse_task_query("before=-infinity|" UUID, &q, err, sizeof err), 0);
    ck_assert_str_eq(q.before_at, "-infinity");
    /* an empty field of the form is "not given" */
    ck_assert_int_eq(aq_dashboard_parse_task_query("status=&user=&from=", &q, err, sizeof err), 0);
    ck_assert_str_eq(q.status, "");
    ck_assert_str_eq(q.user, "");
}
END_TEST

START_TEST(dead_query_parses)
{
    aq_dashboard_dead_query q;
    char err[256];
    ck_assert_int_eq(aq_dashboard_parse_dead_query("", &q, err, sizeof err), 0);
    ck_assert(!q.parked);
    ck_assert_int_eq(q.before, 0);
    ck_assert_int_eq(aq_dashboard_parse_dead_query("reason=budget_exceeded&parked=1&before=42&limit=10", &q, err,
                                                   sizeof err), 0);
    ck_assert_str_eq(q.reason, "budget_exceeded");
    ck_assert(q.parked);
    ck_assert_int_eq(q.before, 42);
    ck_assert_int_eq(q.limit, 10);
    ck_assert_int_eq(aq_dashboard_parse_dead_query("parked=false", &q, err, sizeof err), 0);
    ck_assert(!q.parked);
}
END_TEST

/* A bad value of each parameter, and what the message must name. */
static const struct {
    bool dead;
    const char *query, *names;
} BAD[] = {
    {false, "status=done", "status"},
    {false, "status=COMPLETED", "status"},
    {false, "limit=0", "limit"},
    {false, "limit=201", "limit"},
    {false, "limit=12abc", "limit"},
    {false, "limit=", "limit"},
    {false, "from=yesterday", "from"},
    {false, "to=2026-12-01';DROP", "to"},
    {false, "before=2026-12-01T10:00:00Z", "before"},
    {false, "before=2026-12-01T10:00:00Z|not-a-uuid", "before"},
    {false, "before=|" UUID, "before"},
    {true, "reason=Failed", "reason"},
    {true, "reason=a%20b", "reason"},
    {true, "parked=maybe", "parked"},
    {true, "before=0", "before"},
    {true, "before=-3", "before"},
    {true, "limit=1000", "limit"},
};

START_TEST(bad_parameters_are_refused_by_name)
{
    char err[256] = "";
    int rc;
    if (BAD[_i].dead) {
        aq_dashboard_dead_query q;
        rc = aq_dashboard_parse_dead_query(BAD[_i].query, &q, err, sizeof err);
    } else {
        aq_dashboard_task_query q;
        rc = aq_dashboard_parse_task_query(BAD[_i].query, &q, err, sizeof err);
    }
    ck_assert_msg(rc == AQ_EINVAL, "%s was accepted", BAD[_i].query);
    ck_assert_msg(!strncmp(err, BAD[_i].names, strlen(BAD[_i].names)), "%s: '%s' does not name %s", BAD[_i].query,
                  err, BAD[_i].names);
}
END_TEST

START_TEST(user_is_at_most_128_bytes)
{
    char query[400], err[256];
    aq_dashboard_task_query q;
    memset(query, 0, sizeof query);
    strcpy(query, "user=");
    memset(query + 5, 'u', 128);
    ck_assert_int_eq(aq_dashboard_parse_task_query(query, &q, err, sizeof err), 0);
    ck_assert_uint_eq(strlen(q.user), 128);
    query[5 + 128] = 'u';
    ck_assert_int_eq(aq_dashboard_parse_task_query(query, &q, err, sizeof err), AQ_EINVAL);
    ck_assert_int_eq(aq_dashboard_parse_task_query("limit=200", &q, err, sizeof err), 0);
    ck_assert_int_eq(q.limit, AQ_DASHBOARD_PAGE_MAX);
}
END_TEST

START_TEST(host_guard_answers_loopback_names_only)
{
    ck_assert(aq_dashboard_host_allowed(NULL, NULL));
    ck_assert(aq_dashboard_host_allowed("127.0.0.1:8090", NULL));
    ck_assert(aq_dashboard_host_allowed("127.0.0.1", NULL));
    ck_assert(aq_dashboard_host_allowed("127.9.8.7:1", NULL));
    ck_assert(aq_dashboard_host_allowed("localhost:8090", NULL));
    ck_assert(aq_dashboard_host_allowed("LocalHost", NULL));
    ck_assert(aq_dashboard_host_allowed("[::1]:8090", NULL));
    ck_assert(aq_dashboard_host_allowed("[::1]", NULL));
    ck_assert(!aq_dashboard_host_allowed("evil.example:8090", NULL));
    ck_assert(!aq_dashboard_host_allowed("localhost.evil.example", NULL));
    ck_assert(!aq_dashboard_host_allowed("10.0.0.7:8090", NULL));
    ck_assert(!aq_dashboard_host_allowed("[::2]:8090", NULL));
    ck_assert(!aq_dashboard_host_allowed("[::1", NULL));
    ck_assert(!aq_dashboard_host_allowed("", NULL));
    ck_assert(aq_dashboard_host_allowed("dash.example.com:443", "dash.example.com"));
    ck_assert(aq_dashboard_host_allowed("DASH.example.com", "dash.example.com"));
    ck_assert(!aq_dashboard_host_allowed("other.example.com", "dash.example.com"));
}
END_TEST

/* ------------------------------------------------- SQL and assets --- */

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "cannot read %s", path);
    char *s = calloc(1, 1 << 20);
    size_t n = fread(s, 1, (1 << 20) - 1, f);
    s[n] = '\0';
    fclose(f);
    return s;
}

START_TEST(statements_are_compiled_in)
{
    static const char *const names[] = {"overview_counts", "overview_throughput", "overview_running",
                                        "overview_llm", "overview_limits", "tasks", "task", "task_steps",
                                        "task_dead_letters", "dead_letters", "dead_letter_reasons", "cancel",
                                        "requeue_select", "requeue_mark", "requeue_unmark"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(names); i++) {
        const char *sql = aq_dashboard_sql(names[i]);
        ck_assert_msg(sql && *sql, "no statement %s", names[i]);
        ck_assert_ptr_null(strstr(sql, "-- name:"));
        ck_assert_msg(sql[strlen(sql) - 1] != '\n', "%s ends in a newline", names[i]);
    }
    ck_assert_ptr_null(aq_dashboard_sql("no_such_statement"));
    ck_assert_ptr_null(aq_dashboard_sql(NULL));
    /* agentqctl cancel's statement, as the contract says */
    ck_assert_ptr_nonnull(strstr(aq_dashboard_sql("cancel"), "SET cancel_requested = true"));
}
END_TEST

START_TEST(task_list_orders_by_what_017_indexes)
{
    /* The planner uses an expression index only for the same expression. */
    char path[1024];
    snprintf(path, sizeof path, "%s/017_dashboard.sql", AGENTQ_SOURCE_SQL_DIR);
    char *mig = slurp(path);
    ck_assert_ptr_nonnull(strstr(mig, "coalesce(enqueued_at, finished_at, '-infinity'::timestamptz)"));
    const char *sql = aq_dashboard_sql("tasks");
    ck_assert_ptr_nonnull(strstr(sql, "ORDER BY coalesce(enqueued_at, finished_at, '-infinity') DESC, task_id DESC"));
    ck_assert_ptr_nonnull(strstr(mig, "WHERE kind = 'llm'"));
    ck_assert_ptr_nonnull(strstr(aq_dashboard_sql("overview_llm"), "WHERE kind = 'llm' AND started_at >="));
    free(mig);
}
END_TEST

START_TEST(assets_are_self_contained_and_script_sets_text_only)
{
    size_t n;
    const char *type;
    const char *html = aq_dashboard_asset("/", &n, &type);
    ck_assert_ptr_nonnull(html);
    ck_assert_uint_eq(n, strlen(html));
    ck_assert_str_eq(type, "text/html; charset=utf-8");
    ck_assert_ptr_nonnull(strstr(html, "<script src=\"/app.js\" defer></script>"));
    /* one script, its own, and nothing from elsewhere */
    const char *p = html;
    int scripts = 0;
    while ((p = strstr(p, "<script"))) {
        scripts++;
        p++;
    }
    ck_assert_int_eq(scripts, 1);
    ck_assert_ptr_null(strstr(html, "http"));
    ck_assert_ptr_null(strstr(html, " style="));
    const char *css = aq_dashboard_asset("/app.css", NULL, &type);
    ck_assert_str_eq(type, "text/css; charset=utf-8");
    ck_assert_ptr_null(strstr(css, "http"));
    ck_assert_ptr_null(strstr(css, "@import"));
    const char *js = aq_dashboard_asset("/app.js", NULL, &type);
    ck_assert_str_eq(type, "text/javascript; charset=utf-8");
    static const char *const banned[] = {"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                                         "eval(", "new Function", "DOMParser", "createContextualFragment"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(banned); i++)
        ck_assert_msg(!strstr(js, banned[i]), "app.js uses %s", banned[i]);
    /* its one URL is the SVG namespace */
    const char *u = strstr(js, "http");
    ck_assert_ptr_nonnull(u);
    ck_assert(!strncmp(u, "http://www.w3.org/2000/svg'", 27));
    ck_assert_ptr_null(strstr(u + 1, "http"));
    ck_assert_ptr_nonnull(aq_dashboard_asset("/favicon.svg", NULL, NULL));
    ck_assert_ptr_null(aq_dashboard_asset("/app.js.map", NULL, NULL));
    ck_assert_ptr_null(aq_dashboard_asset("/../dashboard.sql", NULL, NULL));
    ck_assert_ptr_null(aq_dashboard_asset("/dashboard.sql", NULL, NULL));
}
END_TEST

/* --------------------------------------------------------- over HTTP --- */

typedef struct reply {
    int done;
    long status;
    char *body;
    char *csp, *nosniff, *ctype, *allow;
} reply;

static void on_reply(aq_http_req *r, const aq_http_result *res, void *arg)
{
    (void)r;
    reply *out = arg;
    out->status = res->status;
    out->body = strdup(res->body);
    const char *h;
    if ((h = aq_http_result_header(res, "Content-Security-Policy"))) out->csp = strdup(h);
    if ((h = aq_http_result_header(res, "X-Content-Type-Options"))) out->nosniff = strdup(h);
    if ((h = aq_http_result_header(res, "Content-Type"))) out->ctype = strdup(h);
    if ((h = aq_http_result_header(res, "Allow"))) out->allow = strdup(h);
    out->done = 1;
}

static void reply_free(reply *r)
{
    free(r->body);
    free(r->csp);
    free(r->nosniff);
    free(r->ctype);
    free(r->allow);
    memset(r, 0, sizeof *r);
}

typedef struct fixture {
    struct event_base *base;
    aq_config cfg;
    aq_dashboard *d;
    aq_http *http;
    int dead_port_fd;
} fixture;

static fixture F;

/* A dashboard on 127.0.0.1:0 whose database is a closed port. */
static void start(const char *token)
{
    memset(&F, 0, sizeof F);
    F.base = event_base_new();
    aq_config_init(&F.cfg);
    int port;
    F.dead_port_fd = aq_test_loopback_socket(0, &port); /* bound, not listening: refused */
    char dsn[128], err[512];
    snprintf(dsn, sizeof dsn, "host=127.0.0.1 port=%d dbname=nowhere connect_timeout=2", port);
    ck_assert_int_eq(aq_config_set(&F.cfg, "postgres.dsn", dsn, err, sizeof err), 0);
    aq_dashboard_opts o = {.listen = "127.0.0.1:0", .admin_token = token, .management_url = "", .threads = 1};
    F.d = aq_dashboard_new(F.base, &F.cfg, &o, err, sizeof err);
    ck_assert_msg(F.d != NULL, "%s", err);
    ck_assert_int_gt(aq_dashboard_port(F.d), 0);
    F.http = aq_http_new(F.base, NULL, err, sizeof err);
    ck_assert_ptr_nonnull(F.http);
}

static void stop(void)
{
    aq_http_free(F.http);
    aq_dashboard_free(F.d);
    aq_config_free(&F.cfg);
    event_base_free(F.base);
    close(F.dead_port_fd);
}

static void request(aq_http_method m, const char *path, const char *const *headers, size_t nh, reply *out)
{
    char url[512], err[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", aq_dashboard_port(F.d), path);
    aq_http_request rq = {.method = m, .url = url, .headers = headers, .nheaders = nh, .timeout_ms = 10000};
    memset(out, 0, sizeof *out);
    ck_assert_int_eq(aq_http_submit(F.http, &rq, on_reply, out, NULL, err, sizeof err), 0);
    ck_assert_msg(aq_test_loop_until(F.base, &out->done, 1, 15000), "no answer to %s", path);
}

static void assert_error(const reply *r, long status, const char *says)
{
    ck_assert_msg(r->status == status, "HTTP %ld, want %ld: %s", r->status, status, r->body);
    ck_assert_ptr_nonnull(r->ctype);
    ck_assert_str_eq(r->ctype, "application/json; charset=utf-8");
    json_t *o = json_loads(r->body, 0, NULL);
    ck_assert_msg(o != NULL, "not JSON: %s", r->body);
    const char *e = json_string_value(json_object_get(o, "error"));
    ck_assert_msg(e && strstr(e, says), "error '%s' does not say '%s'", e ? e : "(none)", says);
    json_decref(o);
}

START_TEST(every_answer_carries_the_security_headers)
{
    start(NULL);
    static const char *const paths[] = {"/", "/app.js", "/app.css", "/api/info", "/api/tasks?status=bogus",
                                        "/nothing-here"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(paths); i++) {
        reply r;
        request(AQ_HTTP_GET, paths[i], NULL, 0, &r);
        ck_assert_msg(r.csp && strstr(r.csp, "default-src 'self'") && strstr(r.csp, "script-src 'self'") &&
                          !strstr(r.csp, "unsafe-inline") && !strstr(r.csp, "unsafe-eval"),
                      "%s: CSP %s", paths[i], r.csp ? r.csp : "(none)");
        ck_assert_msg(r.nosniff && !strcmp(r.nosniff, "nosniff"), "%s: no nosniff", paths[i]);
        reply_free(&r);
    }
    reply r;
    request(AQ_HTTP_GET, "/", NULL, 0, &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(strstr(r.body, "/app.js"));
    reply_free(&r);
    request(AQ_HTTP_GET, "/api/info", NULL, 0, &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(strstr(r.body, "\"actions\":false"));
    reply_free(&r);
    stop();
}
END_TEST

START_TEST(actions_are_refused_without_the_token)
{
    start(NULL); /* read-only: even the right-looking header does nothing */
    reply r;
    const char *const auth[] = {"Authorization: Bearer 0123456789abcdef0123"};
    request(AQ_HTTP_POST, "/api/tasks/" UUID "/cancel", auth, 1, &r);
    assert_error(&r, 403, "read-only");
    reply_free(&r);
    request(AQ_HTTP_POST, "/api/dead-letters/7/requeue", auth, 1, &r);
    assert_error(&r, 403, "read-only");
    reply_free(&r);
    stop();

    start("0123456789abcdef0123");
    request(AQ_HTTP_POST, "/api/tasks/" UUID "/cancel", NULL, 0, &r);
    assert_error(&r, 403, "token");
    reply_free(&r);
    const char *const wrong[] = {"Authorization: Bearer 0123456789abcdef0124"};
    request(AQ_HTTP_POST, "/api/tasks/" UUID "/cancel", wrong, 1, &r);
    assert_error(&r, 403, "token");
    reply_free(&r);
    request(AQ_HTTP_POST, "/api/dead-letters/7/requeue", wrong, 1, &r);
    assert_error(&r, 403, "token");
    reply_free(&r);
    request(AQ_HTTP_GET, "/api/info", NULL, 0, &r);
    ck_assert_ptr_nonnull(strstr(r.body, "\"actions\":true"));
    reply_free(&r);
    /* the right token gets as far as the database, which is not there */
    request(AQ_HTTP_POST, "/api/tasks/" UUID "/cancel", auth, 1, &r);
    assert_error(&r, 503, "database unavailable");
    reply_free(&r);
    stop();
}
END_TEST

START_TEST(methods_paths_and_parameters_are_checked)
{
    start("0123456789abcdef0123");
    reply r;
    request(AQ_HTTP_GET, "/api/tasks/" UUID "/cancel", NULL, 0, &r); /* an action is POST only */
    assert_error(&r, 405, "POST");
    ck_assert_str_eq(r.allow, "POST");
    reply_free(&r);
    request(AQ_HTTP_POST, "/api/tasks", NULL, 0, &r);
    assert_error(&r, 405, "GET");
    reply_free(&r);
    request(AQ_HTTP_GET, "/api/tasks/not-a-uuid", NULL, 0, &r);
    assert_error(&r, 400, "not a task id");
    reply_free(&r);
    const char *const auth[] = {"Authorization: Bearer 0123456789abcdef0123"};
    request(AQ_HTTP_POST, "/api/dead-letters/x1/requeue", auth, 1, &r);
    assert_error(&r, 400, "not a dead letter id");
    reply_free(&r);
    request(AQ_HTTP_GET, "/api/tasks?status=%3Cscript%3E", NULL, 0, &r);
    assert_error(&r, 400, "status");
    ck_assert_ptr_null(strchr(r.body, '<')); /* the echoed value is escaped */
    reply_free(&r);
    request(AQ_HTTP_GET, "/api/dead-letters?parked=maybe", NULL, 0, &r);
    assert_error(&r, 400, "parked");
    reply_free(&r);
    request(AQ_HTTP_GET, "/api/nothing", NULL, 0, &r);
    assert_error(&r, 404, "no such API");
    reply_free(&r);
    request(AQ_HTTP_GET, "/api/overview", NULL, 0, &r);
    assert_error(&r, 503, "database unavailable");
    reply_free(&r);
    request(AQ_HTTP_POST, "/", NULL, 0, &r);
    ck_assert_int_eq(r.status, 405);
    reply_free(&r);
    stop();
}
END_TEST

START_TEST(loopback_listener_refuses_other_host_names)
{
    start(NULL);
    reply r;
    const char *const evil[] = {"Host: evil.example:8090"};
    request(AQ_HTTP_GET, "/api/info", evil, 1, &r);
    ck_assert_int_eq(r.status, 403);
    ck_assert_ptr_nonnull(strstr(r.body, "DNS rebinding"));
    reply_free(&r);
    const char *const local[] = {"Host: localhost:8090"};
    request(AQ_HTTP_GET, "/api/info", local, 1, &r);
    ck_assert_int_eq(r.status, 200);
    reply_free(&r);
    stop();
}
END_TEST

START_TEST(bad_listen_addresses_are_refused)
{
    struct event_base *base = event_base_new();
    aq_config cfg;
    aq_config_init(&cfg);
    char err[512];
    static const char *const bad[] = {"8090", "127.0.0.1:", "127.0.0.1:99999", ":8090", "127.0.0.1:80x"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(bad); i++) {
        aq_dashboard_opts o = {.listen = bad[i], .management_url = ""};
        ck_assert_ptr_null(aq_dashboard_new(base, &cfg, &o, err, sizeof err));
        ck_assert_msg(strstr(err, "--listen"), "%s: %s", bad[i], err);
    }
    /* a port that is taken */
    int port, fd = aq_test_loopback_socket(16, &port);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    aq_dashboard_opts o = {.listen = listen, .management_url = ""};
    ck_assert_ptr_null(aq_dashboard_new(base, &cfg, &o, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "cannot listen"));
    close(fd);
    aq_config_free(&cfg);
    event_base_free(base);
}
END_TEST

START_TEST(main_refuses_a_missing_or_short_token)
{
    aq_config cfg;
    aq_config_init(&cfg);
    unsetenv("AQ_CHECK_DASH_TOKEN");
    char *a1[] = {"dashboard", "--admin-token-env", "AQ_CHECK_DASH_TOKEN", NULL};
    ck_assert_int_eq(aq_dashboard_main(&cfg, 3, a1), 2);
    setenv("AQ_CHECK_DASH_TOKEN", "short", 1);
    ck_assert_int_eq(aq_dashboard_main(&cfg, 3, a1), 2);
    char *a2[] = {"dashboard", "--no-such-flag", NULL};
    ck_assert_int_eq(aq_dashboard_main(&cfg, 2, a2), 2);
    char *a3[] = {"dashboard", "stray", NULL};
    ck_assert_int_eq(aq_dashboard_main(&cfg, 2, a3), 2);
    char *a4[] = {"dashboard", "--help", NULL};
    ck_assert_int_eq(aq_dashboard_main(&cfg, 2, a4), 0);
    char *a5[] = {"dashboard", "--listen", "nowhere", NULL};
    ck_assert_int_eq(aq_dashboard_main(&cfg, 3, a5), 2);
    aq_config_free(&cfg);
}
END_TEST

int main(void)
{
    const TTest *core[] = {token_matches_only_the_same_bearer_token,
                           harden_escapes_markup_and_keeps_the_value,
                           harden_leaves_plain_json_alone,
                           task_query_parses_filters_and_cursor,
                           dead_query_parses,
                           host_guard_answers_loopback_names_only,
                           statements_are_compiled_in,
                           task_list_orders_by_what_017_indexes,
                           assets_are_self_contained_and_script_sets_text_only,
                           every_answer_carries_the_security_headers,
                           loopback_listener_refuses_other_host_names};
    const TTest *limits[] = {user_is_at_most_128_bytes};
    const TTest *errors[] = {no_token_configured_authorizes_nothing,
                             actions_are_refused_without_the_token,
                             methods_paths_and_parameters_are_checked,
                             bad_listen_addresses_are_refused,
                             main_refuses_a_missing_or_short_token};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 30},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits)},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 30,
         .loop_test = bad_parameters_are_refused_by_name, .loops = (int)AQ_ARRAY_LEN(BAD)},
    };
    return aq_test_run_http(aq_test_suite("dashboard", tcases, AQ_ARRAY_LEN(tcases)));
}
