/* check_skill.c — the agent's tools through the asynchronous call API:
 * calculator and current_time results and errors, the callback contract
 * (once, later, never after a cancel), http_get's address guard and
 * allowlist against an in-process evhttp server on 127.0.0.1 sharing the
 * event_base (and one on this host's own interface address), an HTTP
 * skill's POST as the server received it, output truncation, the tools
 * JSON, and config validation. No traffic leaves this host: the refused
 * addresses are refused before a socket exists. */
#include "agentq/skill.h"

#include <arpa/inet.h>
#include <check.h>
#include "held.h"
#include "suite.h"
#include "testenv.h"
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WEATHER_SCHEMA                                                                    \
    "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"},"                \
    "\"days\":{\"type\":\"integer\"}},\"required\":[\"city\"]}"

/* ---- the test server ------------------------------------------------- */

struct srv {
    struct evhttp *http;
    int port;
    int requests;
    /* what the last POST to /skill carried */
    char method[16];
    char content_type[128];
    char idempotency_key[128];
    char *body;
    aq_test_held_set held; /* the /slow requests */
};

static void reply(struct evhttp_request *r, int code, const char *reason, const char *body,
                  size_t len)
{
    evbuffer_add(evhttp_request_get_output_buffer(r), body, len);
    evhttp_send_reply(r, code, reason, NULL);
}

static void reply_filled(struct evhttp_request *r, const char *unit, size_t total)
{
    size_t ulen = strlen(unit);
    char *b = malloc(total);
    ck_assert_ptr_nonnull(b);
    for (size_t i = 0; i < total; i++) b[i] = unit[i % ulen];
    reply(r, 200, "OK", b, total);
    free(b);
}

static void srv_handle(struct evhttp_request *r, void *arg)
{
    struct srv *s = arg;
    s->requests++;
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(r);
    const char *path = evhttp_uri_get_path(u);
    const char *query = evhttp_uri_get_query(u);
    struct evkeyvalq *out_h = evhttp_request_get_output_headers(r);

    if (strcmp(path, "/page") == 0) {
        reply(r, 200, "OK", "hello page", 10);
    } else if (strcmp(path, "/big") == 0) {
        reply_filled(r, "x", 40000);
    } else if (strcmp(path, "/utf8") == 0) {
        reply_filled(r, "\xc3\xa9", 20001 * 2); /* "é" repeated */
    } else if (strcmp(path, "/huge") == 0) {
        reply_filled(r, "h", 100000);
    } else if (strcmp(path, "/redir") == 0) {
        char loc[128];
        snprintf(loc, sizeof loc, "http://127.0.0.1:%d/page", s->port);
        evhttp_add_header(out_h, "Location", loc);
        reply(r, 302, "Found", "go", 2);
    } else if (strcmp(path, "/goto") == 0 && query) {
        evhttp_add_header(out_h, "Location", query); /* /goto?<absolute URL> */
        reply(r, 302, "Found", "go", 2);
    } else if (strcmp(path, "/skill") == 0) {
        snprintf(s->method, sizeof s->method, "%s",
                 evhttp_request_get_command(r) == EVHTTP_REQ_POST ? "POST" : "other");
        const char *ct = evhttp_find_header(evhttp_request_get_input_headers(r), "Content-Type");
        snprintf(s->content_type, sizeof s->content_type, "%s", ct ? ct : "");
        const char *ik = evhttp_find_header(evhttp_request_get_input_headers(r), "Idempotency-Key");
        snprintf(s->idempotency_key, sizeof s->idempotency_key, "%s", ik ? ik : "(none)");
        struct evbuffer *in = evhttp_request_get_input_buffer(r);
        size_t n = evbuffer_get_length(in);
        free(s->body);
        s->body = calloc(1, n + 1);
        ck_assert_ptr_nonnull(s->body);
        evbuffer_copyout(in, s->body, n);
        reply(r, 200, "OK", "sunny, 21C", 10);
    } else if (strcmp(path, "/fail") == 0) {
        reply(r, 503, "Unavailable", "backend down", 12);
    } else if (strcmp(path, "/failbig") == 0) {
        char b[5000];
        memset(b, 'e', sizeof b);
        reply(r, 500, "Error", b, sizeof b);
    } else if (strcmp(path, "/slow") == 0) {
        int ms = 3000;
        if (query && strncmp(query, "ms=", 3) == 0) ms = atoi(query + 3);
        aq_test_hold(&s->held, r, ms, 200, "late");
    } else {
        reply(r, 404, "Not Found", "no such path", 12);
    }
}

static struct srv *srv_start_on(struct event_base *base, const char *host)
{
    struct srv *s = calloc(1, sizeof *s);
    ck_assert_ptr_nonnull(s);
    aq_test_held_init(&s->held, base);
    s->http = aq_test_httpd_on(base, host, srv_handle, s, &s->port);
    return s;
}

static struct srv *srv_start(struct event_base *base)
{
    return srv_start_on(base, "127.0.0.1");
}

static void srv_stop(struct srv *s)
{
    aq_test_held_flush(&s->held, 200, "late");
    evhttp_free(s->http);
    free(s->body);
    free(s);
}

/* ---- the fixture ----------------------------------------------------- */

struct fx {
    struct event_base *base;
    struct srv *srv;
    aq_http *http;
    aq_config cfg;
    aq_skills *skills;
    char url[256];
};

static void add_http_skill(aq_config *cfg, const char *name, const char *params,
                           const char *url, int timeout_ms)
{
    cfg->http_skills = realloc(cfg->http_skills,
                               (size_t)(cfg->n_http_skills + 1) * sizeof *cfg->http_skills);
    ck_assert_ptr_nonnull(cfg->http_skills);
    aq_http_skill *sk = &cfg->http_skills[cfg->n_http_skills++];
    sk->name = strdup(name);
    sk->description = strdup("Weather forecast for a city");
    sk->parameters = params ? strdup(params) : NULL;
    sk->url = strdup(url);
    sk->timeout_ms = timeout_ms;
}

static void set(aq_config *cfg, const char *key, const char *value)
{
    char err[256] = "";
    ck_assert_msg(aq_config_set(cfg, key, value, err, sizeof err) == AQ_OK, "%s: %s", key, err);
}

/* The default built-ins, http_get allowing `allow`, and the HTTP skill
 * "weather" posting to `skill_path` with `skill_timeout_ms`. */
static void fx_start_with(struct fx *f, const char *allow, const char *skill_path,
                          int skill_timeout_ms)
{
    memset(f, 0, sizeof *f);
    f->base = event_base_new();
    ck_assert_ptr_nonnull(f->base);
    f->srv = srv_start(f->base);
    aq_http_config hc = {.connect_timeout_ms = 2000, .timeout_ms = 10000,
                         .user_agent = "check_skill"};
    char err[256] = "";
    f->http = aq_http_new(f->base, &hc, err, sizeof err);
    ck_assert_msg(f->http != NULL, "aq_http_new: %s", err);
    aq_config_init(&f->cfg);
    set(&f->cfg, "skills.enabled", "calculator,http_get,current_time");
    set(&f->cfg, "skills.http_get_allow", allow);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", f->srv->port, skill_path);
    add_http_skill(&f->cfg, "weather", WEATHER_SCHEMA, url, skill_timeout_ms);
    f->skills = aq_skills_new(&f->cfg, f->base, f->http, err, sizeof err);
    ck_assert_msg(f->skills != NULL, "aq_skills_new: %s", err);
}

static void fx_start(struct fx *f, const char *allow)
{
    fx_start_with(f, allow, "/skill", 5000);
}

static void fx_stop(struct fx *f)
{
    aq_skills_free(f->skills);
    aq_http_free(f->http);
    srv_stop(f->srv);
    aq_config_free(&f->cfg);
    event_base_free(f->base);
}

static const char *url(struct fx *f, const char *host, const char *path)
{
    snprintf(f->url, sizeof f->url, "http://%s:%d%s", host, f->srv->port, path);
    return f->url;
}


/* ---- calls ----------------------------------------------------------- */

static bool g_in_call; /* set while aq_skills_call runs */

struct got {
    int calls;
    bool inside;   /* a callback ran inside aq_skills_call */
    char *out;
    size_t len;
    bool is_error;
};

static void got_cb(const char *output, size_t len, bool is_error, void *arg)
{
    struct got *g = arg;
    g->calls++;
    if (g_in_call) g->inside = true;
    free(g->out);
    g->out = malloc(len + 1);
    ck_assert_ptr_nonnull(g->out);
    memcpy(g->out, output, len);
    g->out[len] = '\0';
    ck_assert_int_eq(output[len], '\0');
    g->len = len;
    g->is_error = is_error;
}

static aq_skill_call *start(struct fx *f, const char *name, const char *args, struct got *g)
{
    memset(g, 0, sizeof *g);
    g_in_call = true;
    aq_skill_call *c = aq_skills_call(f->skills, name, args, args ? strlen(args) : 0, "t-1",
                                      "u-1", "t-1/3/2", got_cb, g);
    g_in_call = false;
    ck_assert_ptr_nonnull(c);
    /* Never from inside the call: nothing has run yet. */
    ck_assert_int_eq(g->calls, 0);
    return c;
}

/* Calls a skill and waits for its one callback; the caller frees g->out. */
static void call(struct fx *f, const char *name, const char *args, struct got *g)
{
    start(f, name, args, g);
    aq_test_loop_until(f->base, &g->calls, 1, 10000);
    ck_assert_msg(g->calls == 1, "%s(%s): callback ran %d times", name, args ? args : "",
                  g->calls);
    ck_assert(!g->inside);
    /* Exactly once: nothing more arrives. */
    aq_test_loop_for(f->base, 20);
    ck_assert_int_eq(g->calls, 1);
}

static void expect_ok(struct fx *f, const char *name, const char *args, const char *want)
{
    struct got g;
    call(f, name, args, &g);
    ck_assert_msg(!g.is_error, "%s(%s): unexpected error: %s", name, args, g.out);
    ck_assert_str_eq(g.out, want);
    free(g.out);
}

static void expect_error(struct fx *f, const char *name, const char *args, const char *want)
{
    struct got g;
    call(f, name, args, &g);
    ck_assert_msg(g.is_error, "%s(%s): expected an error, got %s", name, args, g.out);
    ck_assert_msg(strstr(g.out, want) != NULL, "%s(%s): \"%s\" lacks \"%s\"", name, args, g.out,
                  want);
    free(g.out);
}

static char *args_url(const char *u)
{
    json_t *j = json_pack("{s:s}", "url", u);
    char *t = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return t;
}

static void expect_get(struct fx *f, const char *u, bool is_error, const char *want)
{
    char *a = args_url(u);
    if (is_error) expect_error(f, "http_get", a, want);
    else expect_ok(f, "http_get", a, want);
    free(a);
}

/* Seconds between an ISO-8601 "YYYY-MM-DDTHH:MM:SS<zone>" text and now,
 * after taking off the zone's offset; `zone` is what the text must end in. */
static long time_skew(const char *text, const char *zone, int offset_s)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    const char *end = strptime(text, "%Y-%m-%dT%H:%M:%S", &tm);
    ck_assert_msg(end != NULL, "not ISO-8601: %s", text);
    ck_assert_str_eq(end, zone);
    time_t t = timegm(&tm) - offset_s;
    return labs((long)(t - time(NULL)));
}

/* ---- core ------------------------------------------------------------ */

START_TEST(test_calculator)
{
    struct fx f;
    fx_start(&f, "");
    expect_ok(&f, "calculator", "{\"expression\":\"(2+3)*4\"}", "20");
    expect_ok(&f, "calculator", "{\"expression\":\"2^-1 + 0.25\"}", "0.75");
    expect_ok(&f, "calculator", "{\"expression\":\"-7 % 3\"}", "-1");
    /* extra keys a model adds are tolerated */
    expect_ok(&f, "calculator", "{\"expression\":\"10/4\",\"note\":\"x\"}", "2.5");
    fx_stop(&f);
}
END_TEST

START_TEST(test_current_time)
{
    struct fx f;
    fx_start(&f, "");
    struct got g;
    call(&f, "current_time", "{}", &g);
    ck_assert(!g.is_error);
    ck_assert_int_le(time_skew(g.out, "Z", 0), 5);
    free(g.out);

    call(&f, "current_time", "", &g); /* no arguments at all */
    ck_assert(!g.is_error);
    ck_assert_int_le(time_skew(g.out, "Z", 0), 5);
    free(g.out);

    call(&f, "current_time", "{\"timezone\":\"utc\"}", &g);
    ck_assert(!g.is_error);
    ck_assert_int_le(time_skew(g.out, "Z", 0), 5);
    free(g.out);

    call(&f, "current_time", "{\"timezone\":\"+02:00\"}", &g);
    ck_assert_msg(!g.is_error, "%s", g.out);
    ck_assert_int_le(time_skew(g.out, "+02:00", 7200), 5);
    free(g.out);

    call(&f, "current_time", "{\"timezone\":\"UTC-05:30\"}", &g);
    ck_assert_msg(!g.is_error, "%s", g.out);
    ck_assert_int_le(time_skew(g.out, "-05:30", -19800), 5);
    free(g.out);
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_get_allowlisted)
{
    struct fx f;
    fx_start(&f, "127.0.0.1, localhost");
    expect_get(&f, url(&f, "127.0.0.1", "/page"), false, "HTTP 200\nhello page");
    expect_get(&f, url(&f, "localhost", "/page"), false, "HTTP 200\nhello page");
    /* an HTTP error status is a page the model reads, not a tool error */
    expect_get(&f, url(&f, "127.0.0.1", "/nope"), false, "HTTP 404\nno such path");
    /* redirects are followed */
    expect_get(&f, url(&f, "localhost", "/redir"), false, "HTTP 200\nhello page");
    ck_assert_int_eq(f.srv->requests, 5);
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_skill_post)
{
    struct fx f;
    fx_start(&f, "");
    expect_ok(&f, "weather", "{\"city\":\"Paris\",\"days\":2}", "sunny, 21C");
    ck_assert_int_eq(f.srv->requests, 1);
    ck_assert_str_eq(f.srv->method, "POST");
    ck_assert_str_eq(f.srv->content_type, "application/json");
    /* task, step, call: a repeat of this call after a crash sends the same */
    ck_assert_str_eq(f.srv->idempotency_key, "t-1/3/2");
    json_error_t je;
    json_t *got = json_loads(f.srv->body, 0, &je);
    ck_assert_msg(got != NULL, "server got non-JSON: %s", f.srv->body);
    json_t *want = json_pack("{s:{s:s,s:i},s:s,s:s}", "arguments", "city", "Paris", "days", 2,
                             "task_id", "t-1", "user_id", "u-1");
    ck_assert_msg(json_equal(got, want), "server got %s", f.srv->body);
    json_decref(got);
    json_decref(want);

    /* no arguments become {}, no ids become null */
    struct got g;
    memset(&g, 0, sizeof g);
    aq_skill_call *c = aq_skills_call(f.skills, "weather", NULL, 0, NULL, NULL, NULL, got_cb, &g);
    ck_assert_ptr_nonnull(c);
    aq_test_loop_until(f.base, &g.calls, 1, 10000);
    ck_assert_int_eq(g.calls, 1);
    ck_assert_str_eq(g.out, "sunny, 21C");
    free(g.out);
    ck_assert_str_eq(f.srv->body, "{\"arguments\":{},\"task_id\":null,\"user_id\":null}");
    ck_assert_str_eq(f.srv->idempotency_key, "(none)"); /* no key, no header */
    fx_stop(&f);
}
END_TEST

static json_t *tool_named(json_t *tools, const char *name)
{
    size_t i;
    json_t *t;
    json_array_foreach(tools, i, t) {
        json_t *fn = json_object_get(t, "function");
        if (strcmp(json_string_value(json_object_get(fn, "name")), name) == 0) return fn;
    }
    return NULL;
}

START_TEST(test_tools_json)
{
    struct fx f;
    fx_start(&f, "");
    /* ask_human is in every set, but offered only to a task that lists it */
    ck_assert_str_eq(aq_skills_names(f.skills), "calculator,http_get,current_time,weather,ask_human");
    ck_assert(aq_skills_has(f.skills, "weather"));
    ck_assert(aq_skills_has(f.skills, "ask_human"));
    ck_assert(!aq_skills_has(f.skills, "shell"));

    json_error_t je;
    json_t *tools = json_loads(aq_skills_tools_json(f.skills), 0, &je);
    ck_assert_msg(tools != NULL, "tools JSON: %s", je.text);
    ck_assert(json_is_array(tools));
    ck_assert_int_eq(json_array_size(tools), 4);
    size_t i;
    json_t *t;
    json_array_foreach(tools, i, t) {
        ck_assert_str_eq(json_string_value(json_object_get(t, "type")), "function");
        json_t *fn = json_object_get(t, "function");
        ck_assert(json_is_string(json_object_get(fn, "description")));
        ck_assert_str_eq(json_string_value(json_object_get(json_object_get(fn, "parameters"), "type")),
                         "object");
    }
    json_t *calc = tool_named(tools, "calculator");
    ck_assert_ptr_nonnull(calc);
    json_t *req = json_object_get(json_object_get(calc, "parameters"), "required");
    ck_assert_str_eq(json_string_value(json_array_get(req, 0)), "expression");
    json_t *get = tool_named(tools, "http_get");
    ck_assert_ptr_nonnull(get);
    ck_assert(json_is_object(json_object_get(
        json_object_get(json_object_get(get, "parameters"), "properties"), "url")));
    ck_assert_ptr_nonnull(tool_named(tools, "current_time"));
    json_t *weather = tool_named(tools, "weather");
    ck_assert_ptr_nonnull(weather);
    json_t *schema = json_loads(WEATHER_SCHEMA, 0, &je);
    ck_assert(json_equal(json_object_get(weather, "parameters"), schema));
    ck_assert_str_eq(json_string_value(json_object_get(weather, "description")),
                     "Weather forecast for a city");
    json_decref(schema);
    json_decref(tools);
    fx_stop(&f);
}
END_TEST

START_TEST(test_tools_subset)
{
    struct fx f;
    fx_start(&f, "");
    char *names[] = {"weather", "calculator", "calculator"};
    char *text = aq_skills_tools_json_for(f.skills, names, 3);
    ck_assert_ptr_nonnull(text);
    json_error_t je;
    json_t *tools = json_loads(text, 0, &je);
    ck_assert_msg(tools != NULL, "%s", je.text);
    /* configured order, repeats once */
    ck_assert_int_eq(json_array_size(tools), 2);
    ck_assert_ptr_nonnull(tool_named(tools, "calculator"));
    ck_assert_ptr_nonnull(tool_named(tools, "weather"));
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_array_get(tools, 0), "function"), "name")),
                     "calculator");
    json_decref(tools);
    free(text);

    text = aq_skills_tools_json_for(f.skills, NULL, 0);
    ck_assert_str_eq(text, "[]");
    free(text);

    char *bad[] = {"calculator", "shell"};
    ck_assert_ptr_null(aq_skills_tools_json_for(f.skills, bad, 2));
    fx_stop(&f);
}
END_TEST

/* ---- limits ---------------------------------------------------------- */

START_TEST(test_http_get_truncates)
{
    struct fx f;
    fx_start(&f, "127.0.0.1");
    struct got g;
    char *a = args_url(url(&f, "127.0.0.1", "/big"));
    call(&f, "http_get", a, &g);
    free(a);
    ck_assert(!g.is_error);
    ck_assert_int_le(g.len, AQ_SKILL_MAX_OUTPUT);
    ck_assert_int_ge(g.len, AQ_SKILL_MAX_OUTPUT - 200);
    ck_assert(strncmp(g.out, "HTTP 200\nxxxx", 13) == 0);
    ck_assert_msg(strstr(g.out, "[truncated]") && strstr(g.out, "of 40000 bytes shown"), "%s",
                  g.out + g.len - 80);
    free(g.out);

    /* a cut never splits a character */
    a = args_url(url(&f, "127.0.0.1", "/utf8"));
    call(&f, "http_get", a, &g);
    free(a);
    ck_assert(!g.is_error);
    ck_assert_int_le(g.len, AQ_SKILL_MAX_OUTPUT);
    json_t *s = json_stringn(g.out, g.len); /* NULL unless valid UTF-8 */
    ck_assert_msg(s != NULL, "output is not valid UTF-8");
    json_decref(s);
    free(g.out);
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_get_max_bytes)
{
    struct fx f;
    fx_start(&f, "127.0.0.1");
    /* default skills.http_get_max_bytes is 65536; the body is 100000 */
    expect_get(&f, url(&f, "127.0.0.1", "/huge"), true, "larger than 65536 bytes");
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_skill_timeout)
{
    struct fx f;
    fx_start_with(&f, "", "/slow?ms=3000", 200);
    int64_t t0 = aq_mono_us();
    struct got g;
    call(&f, "weather", "{\"city\":\"Oslo\"}", &g);
    ck_assert(g.is_error);
    ck_assert_msg(strncmp(g.out, "weather: ", 9) == 0 && strstr(g.out, "timed out"), "%s", g.out);
    ck_assert_int_lt(aq_mono_us() - t0, 2000000);
    free(g.out);
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_skill_error_excerpt)
{
    struct fx f;
    fx_start_with(&f, "", "/failbig", 5000);
    struct got g;
    call(&f, "weather", "{\"city\":\"Oslo\"}", &g);
    ck_assert(g.is_error);
    ck_assert(strncmp(g.out, "weather: HTTP 500: eeee", 23) == 0);
    ck_assert_int_le(g.len, 1024);
    ck_assert_msg(strstr(g.out, "of 5000 bytes shown"), "%s", g.out);
    free(g.out);
    fx_stop(&f);
}
END_TEST

/* ---- errors ---------------------------------------------------------- */

START_TEST(test_unknown_tool)
{
    struct fx f;
    fx_start(&f, "");
    expect_error(&f, "shell", "{\"cmd\":\"rm -rf /\"}",
                 "unknown tool 'shell'; available: calculator, http_get, current_time, weather");
    fx_stop(&f);
}
END_TEST

START_TEST(test_bad_arguments)
{
    struct fx f;
    fx_start(&f, "");
    expect_error(&f, "calculator", "{\"expression\":", "calculator: arguments are not valid JSON");
    expect_error(&f, "calculator", "[\"1+1\"]",
                 "calculator: arguments must be a JSON object, got an array");
    expect_error(&f, "calculator", "{\"expression\":\"1\",\"expression\":\"2\"}",
                 "calculator: arguments are not valid JSON");
    expect_error(&f, "calculator", "{}", "calculator: missing string argument 'expression'");
    expect_error(&f, "calculator", "{\"expression\":42}",
                 "calculator: argument 'expression' must be a string");
    expect_error(&f, "calculator", "{\"expression\":\"1/0\"}", "calculator: division by zero");
    expect_error(&f, "calculator", "{\"expression\":\"(1+2\"}", "calculator: expected ')'");
    expect_error(&f, "http_get", "{}", "http_get: missing string argument 'url'");
    expect_error(&f, "weather", "\"Paris\"", "weather: arguments must be a JSON object, got a string");
    ck_assert_int_eq(f.srv->requests, 0);
    fx_stop(&f);
}
END_TEST

START_TEST(test_current_time_bad_zone)
{
    struct fx f;
    fx_start(&f, "");
    expect_error(&f, "current_time", "{\"timezone\":\"Europe/Paris\"}",
                 "current_time: unsupported timezone 'Europe/Paris'");
    expect_error(&f, "current_time", "{\"timezone\":\"+25:00\"}", "unsupported timezone");
    expect_error(&f, "current_time", "{\"timezone\":\"+02:75\"}", "unsupported timezone");
    expect_error(&f, "current_time", "{\"timezone\":\"+2:00\"}", "unsupported timezone");
    expect_error(&f, "current_time", "{\"timezone\":2}", "'timezone' must be a string");
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_get_refuses_private)
{
    struct fx f;
    fx_start(&f, ""); /* nothing allowlisted */
    /* loopback is also this host's own address: matched from the range on */
    expect_get(&f, url(&f, "127.0.0.1", "/page"), true, "http_get: refused to connect to 127.0.0.1: ");
    expect_get(&f, url(&f, "127.0.0.1", "/page"), true,
               "loopback address (127.0.0.0/8) (not allowlisted)");
    expect_get(&f, url(&f, "10.0.0.1", "/page"), true,
               "http_get: refused to connect to 10.0.0.1: private address (10.0.0.0/8) "
               "(not allowlisted)");
    expect_get(&f, url(&f, "192.0.2.77", "/page"), true,
               "http_get: refused to connect to 192.0.2.77: documentation address "
               "(192.0.2.0/24) (not allowlisted)");
    expect_get(&f, url(&f, "[2001:db8::7]", "/page"), true,
               "documentation address (2001:db8::/32)");
    expect_get(&f, url(&f, "169.254.169.254", "/latest/meta-data/"), true,
               "refused to connect to 169.254.169.254");
    expect_get(&f, url(&f, "[::1]", "/page"), true, "refused to connect to ::1");
    /* a name that resolves to loopback is judged on the address */
    expect_get(&f, url(&f, "localhost", "/page"), true, "(not allowlisted)");
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_int_eq(st.sockets_opened, 0);
    ck_assert_int_eq(f.srv->requests, 0);
    fx_stop(&f);
}
END_TEST

/* The redirect goes to 127.0.0.1, not allowlisted; the HTTP skill called
 * first leaves a kept-alive connection to it in the client both share (as
 * in the worker), which the redirect must not ride either. */
START_TEST(test_http_get_redirect_refused)
{
    struct fx f;
    fx_start(&f, "localhost");
    expect_ok(&f, "weather", "{\"city\":\"Paris\"}", "sunny, 21C");
    expect_get(&f, url(&f, "localhost", "/redir"), true, "refused to connect to 127.0.0.1: ");
    expect_get(&f, url(&f, "localhost", "/redir"), true,
               "loopback address (127.0.0.0/8) (not allowlisted)");
    ck_assert_int_eq(f.srv->requests, 3); /* the skill, then /redir twice, never /page */
    fx_stop(&f);
}
END_TEST

/* http_get of this machine's own interface address (getifaddrs' first
 * one that is not loopback) with a real listener on it: refused as this
 * host's own address, whatever range it is in, and the listener never
 * sees a request; allowlisted, the same URL is fetched. */
START_TEST(test_http_get_own_address)
{
    char ip[INET6_ADDRSTRLEN + 64];
    if (!aq_test_own_addr(ip, sizeof ip)) {
        printf("test_http_get_own_address skipped: %s\n", ip);
        return;
    }
    struct fx f;
    fx_start(&f, "example.com");
    struct srv *own = srv_start_on(f.base, ip);
    char u[160], want[256];
    aq_test_url(u, sizeof u, ip, own->port, "/page");
    snprintf(want, sizeof want, "http_get: refused to connect to %s: this host's own address", ip);
    expect_get(&f, u, true, want);
    expect_get(&f, u, true, "(not allowlisted)");
    ck_assert_int_eq(own->requests, 0);
    srv_stop(own);
    fx_stop(&f);

    fx_start(&f, ip);
    own = srv_start_on(f.base, ip);
    aq_test_url(u, sizeof u, ip, own->port, "/page");
    expect_get(&f, u, false, "HTTP 200\nhello page");
    ck_assert_int_eq(own->requests, 1);
    srv_stop(own);
    fx_stop(&f);
}
END_TEST

/* An allowlisted server redirecting http_get to a refused address: each
 * hop is judged on the address it connects to. */
START_TEST(test_http_get_redirect_to_refused)
{
    static const struct {
        const char *target;
        const char *want;
    } cases[] = {
        {"http://203.0.113.5/x",
         "http_get: refused to connect to 203.0.113.5: documentation address (203.0.113.0/24) "
         "(not allowlisted)"},
        {"http://100.64.0.1/x", "shared (CGNAT) address (100.64.0.0/10)"},
        {"http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
         "cloud metadata address (169.254.169.254/32) inside a NAT64 address (64:ff9b::/96)"},
        {"http://[::ffff:192.168.1.1]/x", "private address (192.168.0.0/16)"},
        {"http://[fd00::1]/x", "private (unique local) address (fc00::/7)"},
    };
    struct fx f;
    fx_start(&f, "127.0.0.1");
    char via[512];
    for (size_t i = 0; i < AQ_ARRAY_LEN(cases); i++) {
        snprintf(via, sizeof via, "http://127.0.0.1:%d/goto?%s", f.srv->port, cases[i].target);
        expect_get(&f, via, true, cases[i].want);
    }
    char ip[INET6_ADDRSTRLEN + 64];
    if (aq_test_own_addr(ip, sizeof ip)) {
        struct srv *own = srv_start_on(f.base, ip);
        char target[160], want[256];
        aq_test_url(target, sizeof target, ip, own->port, "/page");
        snprintf(via, sizeof via, "http://127.0.0.1:%d/goto?%s", f.srv->port, target);
        snprintf(want, sizeof want, "refused to connect to %s: this host's own address", ip);
        expect_get(&f, via, true, want);
        ck_assert_int_eq(own->requests, 0);
        srv_stop(own);
    } else {
        printf("test_http_get_redirect_to_refused: own-address case skipped: %s\n", ip);
    }
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_get_bad_url)
{
    struct fx f;
    fx_start(&f, "127.0.0.1");
    expect_get(&f, "file:///etc/passwd", true, "only http:// and https:// URLs are allowed");
    expect_get(&f, "ftp://127.0.0.1/x", true, "only http:// and https:// URLs are allowed");
    expect_get(&f, "gopher://127.0.0.1:70/", true, "only http:// and https://");
    expect_get(&f, "127.0.0.1/page", true, "only http:// and https://");
    expect_get(&f, "http://", true, "http_get: ");
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_int_eq(st.sockets_opened, 0);
    fx_stop(&f);
}
END_TEST

START_TEST(test_http_skill_failures)
{
    struct fx f;
    fx_start_with(&f, "", "/fail", 5000);
    expect_error(&f, "weather", "{\"city\":\"Rome\"}", "weather: HTTP 503: backend down");
    fx_stop(&f);

    /* nobody listening: a network error names the skill */
    int port;
    close(aq_test_loopback_socket(0, &port));
    memset(&f, 0, sizeof f);
    f.base = event_base_new();
    f.srv = srv_start(f.base);
    char err[256] = "";
    f.http = aq_http_new(f.base, NULL, err, sizeof err);
    ck_assert_ptr_nonnull(f.http);
    aq_config_init(&f.cfg);
    char u[128];
    snprintf(u, sizeof u, "http://127.0.0.1:%d/skill", port);
    add_http_skill(&f.cfg, "weather", NULL, u, 2000);
    f.skills = aq_skills_new(&f.cfg, f.base, f.http, err, sizeof err);
    ck_assert_msg(f.skills != NULL, "%s", err);
    struct got g;
    call(&f, "weather", "{}", &g);
    ck_assert(g.is_error);
    ck_assert_msg(strncmp(g.out, "weather: ", 9) == 0 && g.len > 9, "%s", g.out);
    free(g.out);
    fx_stop(&f);
}
END_TEST

START_TEST(test_cancel)
{
    struct fx f;
    fx_start_with(&f, "127.0.0.1", "/slow?ms=300", 5000);
    struct got g1, g2, g3;

    /* an immediate result, cancelled before the loop runs */
    aq_skill_call *c = start(&f, "calculator", "{\"expression\":\"1+1\"}", &g1);
    aq_skill_call_cancel(c);

    /* an HTTP skill in flight, cancelled once the server has it */
    c = start(&f, "weather", "{\"city\":\"Lima\"}", &g2);
    aq_test_loop_until(f.base, &f.srv->requests, 1, 5000);
    ck_assert_int_eq(f.srv->requests, 1);
    aq_skill_call_cancel(c);

    /* an http_get in flight */
    char *a = args_url(url(&f, "127.0.0.1", "/slow?ms=300"));
    c = start(&f, "http_get", a, &g3);
    free(a);
    aq_test_loop_until(f.base, &f.srv->requests, 2, 5000);
    ck_assert_int_eq(f.srv->requests, 2);
    aq_skill_call_cancel(c);

    /* past the server's slow replies: still nothing */
    aq_test_loop_for(f.base, 600);
    ck_assert_int_eq(g1.calls, 0);
    ck_assert_int_eq(g2.calls, 0);
    ck_assert_int_eq(g3.calls, 0);
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_int_eq(st.inflight, 0);
    ck_assert_int_eq(st.completed, 2);
    fx_stop(&f);
}
END_TEST

START_TEST(test_free_with_calls_outstanding)
{
    struct fx f;
    fx_start_with(&f, "", "/slow?ms=2000", 5000);
    struct got g1, g2;
    start(&f, "weather", "{\"city\":\"Quito\"}", &g2);
    aq_test_loop_until(f.base, &f.srv->requests, 1, 5000);
    ck_assert_int_eq(f.srv->requests, 1);
    start(&f, "calculator", "{\"expression\":\"2*3\"}", &g1); /* result not yet delivered */
    aq_skills_free(f.skills);
    f.skills = NULL;
    aq_test_loop_for(f.base, 50);
    aq_http_free(f.http); /* calls back the aborted transfer: must stay silent */
    f.http = NULL;
    ck_assert_int_eq(g1.calls, 0);
    ck_assert_int_eq(g2.calls, 0);
    fx_stop(&f);
}
END_TEST

/* The skill set a config builds, or NULL with the message in err. */
static aq_skills *build(aq_config *cfg, struct event_base *base, aq_http *http, char *err,
                        size_t errlen)
{
    err[0] = '\0';
    return aq_skills_new(cfg, base, http, err, errlen);
}

START_TEST(test_config_errors)
{
    struct event_base *base = event_base_new();
    char err[512];
    aq_http *http = aq_http_new(base, NULL, err, sizeof err);
    ck_assert_ptr_nonnull(http);
    aq_config cfg;

    aq_config_init(&cfg);
    set(&cfg, "skills.enabled", "calculator, shell");
    ck_assert_ptr_null(build(&cfg, base, http, err, sizeof err));
    ck_assert_msg(strstr(err, "unknown built-in skill 'shell'") && strstr(err, "skills.enabled"),
                  "%s", err);
    aq_config_free(&cfg);

    aq_config_init(&cfg);
    add_http_skill(&cfg, "http_get", NULL, "http://127.0.0.1:9/x", 1000);
    ck_assert_ptr_null(build(&cfg, base, http, err, sizeof err));
    ck_assert_msg(strstr(err, "'http_get'") && strstr(err, "built-in"), "%s", err);
    aq_config_free(&cfg);

    /* a built-in's name is taken even when it is not enabled */
    aq_config_init(&cfg);
    set(&cfg, "skills.enabled", "calculator");
    add_http_skill(&cfg, "current_time", NULL, "http://127.0.0.1:9/x", 1000);
    ck_assert_ptr_null(build(&cfg, base, http, err, sizeof err));
    ck_assert_msg(strstr(err, "'current_time'"), "%s", err);
    aq_config_free(&cfg);

    aq_config_init(&cfg);
    add_http_skill(&cfg, "weather", NULL, "http://127.0.0.1:9/a", 1000);
    add_http_skill(&cfg, "weather", NULL, "http://127.0.0.1:9/b", 1000);
    ck_assert_ptr_null(build(&cfg, base, http, err, sizeof err));
    ck_assert_msg(strstr(err, "'weather' is declared twice"), "%s", err);
    aq_config_free(&cfg);

    aq_config_init(&cfg);
    add_http_skill(&cfg, "weather", "{\"type\":\"object\",", "http://127.0.0.1:9/a", 1000);
    ck_assert_ptr_null(build(&cfg, base, http, err, sizeof err));
    ck_assert_msg(strstr(err, "'weather'") && strstr(err, "not valid JSON"), "%s", err);
    aq_config_free(&cfg);

    aq_config_init(&cfg);
    add_http_skill(&cfg, "weather", "[1]", "http://127.0.0.1:9/a", 1000);
    ck_assert_ptr_null(build(&cfg, base, http, err, sizeof err));
    ck_assert_msg(strstr(err, "'weather'") && strstr(err, "must be a JSON object"), "%s", err);
    aq_config_free(&cfg);

    aq_config_init(&cfg);
    add_http_skill(&cfg, "weather", NULL, "file:///etc/passwd", 1000);
    ck_assert_ptr_null(build(&cfg, base, http, err, sizeof err));
    ck_assert_msg(strstr(err, "'weather'") && strstr(err, "http://"), "%s", err);
    aq_config_free(&cfg);

    aq_config_init(&cfg); /* http_get without a client */
    ck_assert_ptr_null(build(&cfg, base, NULL, err, sizeof err));
    ck_assert_msg(strstr(err, "'http_get' needs an HTTP client"), "%s", err);
    aq_config_free(&cfg);

    /* no skills at all is a valid (if dull) set */
    aq_config_init(&cfg);
    set(&cfg, "skills.enabled", "");
    aq_skills *s = build(&cfg, base, NULL, err, sizeof err);
    ck_assert_msg(s != NULL, "%s", err);
    ck_assert_str_eq(aq_skills_names(s), "ask_human");
    ck_assert_str_eq(aq_skills_tools_json(s), "[]");
    aq_skills_free(s);
    aq_config_free(&cfg);

    aq_http_free(http);
    event_base_free(base);
}
END_TEST

static Suite *skill_suite(void)
{
    const TTest *core[] = {test_calculator, test_current_time, test_http_get_allowlisted,
                           test_http_skill_post, test_tools_json, test_tools_subset};
    const TTest *limits[] = {test_http_get_truncates, test_http_get_max_bytes,
                             test_http_skill_timeout, test_http_skill_error_excerpt};
    const TTest *errors[] = {test_unknown_tool, test_bad_arguments, test_current_time_bad_zone,
                             test_http_get_refuses_private, test_http_get_redirect_refused,
                             test_http_get_own_address, test_http_get_redirect_to_refused,
                             test_http_get_bad_url, test_http_skill_failures, test_cancel,
                             test_free_with_calls_outstanding, test_config_errors};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 30},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 30},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 30},
    };
    return aq_test_suite("skill", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void) { return aq_test_run_http(skill_suite()); }
