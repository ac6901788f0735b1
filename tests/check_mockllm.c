/* check_mockllm.c — the LLM simulator as the worker and the load tests see
 * it: the simulator runs in-process on its own event_base in a second
 * thread, bound to 127.0.0.1:0, and the tests talk to it over real HTTP
 * with libcurl (easy for single calls, multi for the 1,000-request burst).
 * The built agentq-mockllm binary is run for --help and a start/stop. */
#include "agentq/mockllm.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <arpa/inet.h>

/* ---- an in-process server ------------------------------------------------ */

typedef struct srv {
    struct event_base *base;
    aq_mockllm *m;
    pthread_t th;
    int port;
    char url[128];   /* .../v1/chat/completions */
    char stats[128]; /* .../stats */
} srv;

static void *srv_loop(void *arg)
{
    srv *s = arg;
    event_base_loop(s->base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static void srv_start(srv *s, const aq_mockllm_config *cfg)
{
    char err[256] = "";
    memset(s, 0, sizeof *s);
    s->base = event_base_new();
    ck_assert_ptr_nonnull(s->base);
    s->m = aq_mockllm_new(s->base, cfg, err, sizeof err);
    ck_assert_msg(s->m != NULL, "aq_mockllm_new: %s", err);
    s->port = aq_mockllm_port(s->m);
    ck_assert_int_gt(s->port, 0);
    snprintf(s->url, sizeof s->url, "http://127.0.0.1:%d/v1/chat/completions", s->port);
    snprintf(s->stats, sizeof s->stats, "http://127.0.0.1:%d/stats", s->port);
    ck_assert_int_eq(pthread_create(&s->th, NULL, srv_loop, s), 0);
}

/* Stops the loop, then reads the counters through the API (safe: the loop
 * thread has exited) and frees everything. */
static void srv_stop(srv *s, aq_mockllm_stats *st)
{
    event_base_loopbreak(s->base);
    pthread_join(s->th, NULL);
    if (st) aq_mockllm_get_stats(s->m, st);
    aq_mockllm_free(s->m);
    event_base_free(s->base);
}

static aq_mockllm_config cfg_default(void)
{
    aq_mockllm_config c;
    aq_mockllm_config_defaults(&c);
    c.port = 0;
    c.seed = 42;
    return c;
}

/* ---- an HTTP client --------------------------------------------------- */

typedef struct resp {
    CURLcode rc;
    long code;
    char *body;
    size_t len;
    char *hdrs;
    size_t hlen;
    double secs;
} resp;

static void resp_free(resp *r)
{
    free(r->body);
    free(r->hdrs);
}

static resp http_do(const char *url, const char *method, const char *body, const char *auth,
                    long timeout_ms)
{
    resp r;
    memset(&r, 0, sizeof r);
    FILE *fb = open_memstream(&r.body, &r.len), *fh = open_memstream(&r.hdrs, &r.hlen);
    ck_assert(fb && fh);
    CURL *c = curl_easy_init();
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    h = curl_slist_append(h, "Expect:");
    if (auth) h = curl_slist_append(h, auth);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, fb);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, fh);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms > 0 ? timeout_ms : 20000L);
    if (body) curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    if (method) curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    r.rc = curl_easy_perform(c);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    r.secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.code);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    fclose(fb);
    fclose(fh);
    return r;
}

static resp http_post(const srv *s, const char *body) { return http_do(s->url, NULL, body, NULL, 0); }

/* Value of response header `name` (case-insensitive), copied into buf;
 * NULL if absent. */
static const char *header(const resp *r, const char *name, char *buf, size_t len)
{
    size_t nl = strlen(name);
    for (const char *p = r->hdrs; p && *p;) {
        const char *eol = strstr(p, "\r\n");
        size_t ll = eol ? (size_t)(eol - p) : strlen(p);
        if (ll > nl && p[nl] == ':' && !strncasecmp(p, name, nl)) {
            const char *v = p + nl + 1;
            while (*v == ' ') v++;
            size_t vl = (size_t)(p + ll - v);
            if (vl >= len) vl = len - 1;
            memcpy(buf, v, vl);
            buf[vl] = '\0';
            return buf;
        }
        p = eol ? eol + 2 : p + ll;
    }
    return NULL;
}

static json_t *body_json(const resp *r)
{
    json_error_t e;
    json_t *j = json_loadb(r->body, r->len, 0, &e);
    ck_assert_msg(j != NULL, "reply is not JSON (%s): %.*s", e.text, (int)r->len, r->body);
    return j;
}

static void expect_error(const resp *r, long code, const char *type, const char *needle)
{
    ck_assert_int_eq(r->code, code);
    json_t *j = body_json(r);
    json_t *e = json_object_get(j, "error");
    ck_assert_msg(json_is_object(e), "no error object: %.*s", (int)r->len, r->body);
    const char *msg = json_string_value(json_object_get(e, "message"));
    ck_assert_msg(msg && *msg, "error without a message");
    if (type) ck_assert_str_eq(json_string_value(json_object_get(e, "type")), type);
    if (needle) ck_assert_msg(strstr(msg, needle), "message '%s' lacks '%s'", msg, needle);
    json_decref(j);
}

/* ---- conversations ------------------------------------------------------ */

static json_t *tool_def(const char *name, const char *prop)
{
    json_t *params = prop ? json_pack("{s:s, s:{s:{s:s}}, s:[s]}", "type", "object", "properties",
                                      prop, "type", "string", "required", prop)
                          : json_pack("{s:s, s:{}}", "type", "object", "properties");
    return json_pack("{s:s, s:{s:s, s:s, s:o}}", "type", "function", "function", "name", name,
                     "description", "a test tool", "parameters", params);
}

/* A request with a system prompt, the goal and two tools. */
static json_t *conv_new(const char *goal)
{
    return json_pack("{s:s, s:[{s:s, s:s}, {s:s, s:s}], s:[o, o]}", "model", "mock-model",
                     "messages", "role", "system", "content", "You are a test agent.", "role",
                     "user", "content", goal, "tools", tool_def("calculator", "expression"),
                     tool_def("current_time", NULL));
}

/* Posts the conversation; returns the parsed reply (caller decrefs). */
static json_t *conv_send(const srv *s, json_t *conv, long *code)
{
    char *body = json_dumps(conv, JSON_COMPACT);
    resp r = http_post(s, body);
    free(body);
    ck_assert_int_eq(r.rc, CURLE_OK);
    *code = r.code;
    json_t *j = body_json(&r);
    resp_free(&r);
    return j;
}

static json_t *reply_message(json_t *reply)
{
    json_t *m = json_object_get(json_array_get(json_object_get(reply, "choices"), 0), "message");
    ck_assert_ptr_nonnull(m);
    return m;
}

static const char *reply_finish(json_t *reply)
{
    const char *f = json_string_value(
        json_object_get(json_array_get(json_object_get(reply, "choices"), 0), "finish_reason"));
    ck_assert_ptr_nonnull(f);
    return f;
}

/* Appends the assistant message and one tool result per call, each made
 * by `answer` from the call's arguments. */
static void conv_answer(json_t *conv, json_t *reply, char *(*answer)(const char *args))
{
    json_t *msgs = json_object_get(conv, "messages");
    json_t *msg = reply_message(reply);
    json_array_append(msgs, msg);
    size_t i;
    json_t *call;
    json_array_foreach(json_object_get(msg, "tool_calls"), i, call) {
        const char *args = json_string_value(
            json_object_get(json_object_get(call, "function"), "arguments"));
        char *content = answer(args);
        json_array_append_new(msgs, json_pack("{s:s, s:s, s:s}", "role", "tool", "tool_call_id",
                                              json_string_value(json_object_get(call, "id")),
                                              "content", content));
        free(content);
    }
}

static char *answer_fixed(const char *args) { return strdup("14"); }

/* The test's own evaluator for the expressions calc mode sends. */
static double t_expr(const char **p);
static double t_atom(const char **p)
{
    while (**p == ' ') (*p)++;
    if (**p == '-') {
        (*p)++;
        return -t_atom(p);
    }
    if (**p == '(') {
        (*p)++;
        double v = t_expr(p);
        while (**p == ' ') (*p)++;
        ck_assert_int_eq(**p, ')');
        (*p)++;
        return v;
    }
    char *end;
    double v = strtod(*p, &end);
    ck_assert_ptr_ne(end, *p);
    *p = end;
    return v;
}
static double t_term(const char **p)
{
    double v = t_atom(p);
    for (;;) {
        while (**p == ' ') (*p)++;
        if (**p == '*') { (*p)++; v *= t_atom(p); }
        else if (**p == '/') { (*p)++; v /= t_atom(p); }
        else return v;
    }
}
static double t_expr(const char **p)
{
    double v = t_term(p);
    for (;;) {
        while (**p == ' ') (*p)++;
        if (**p == '+') { (*p)++; v += t_term(p); }
        else if (**p == '-') { (*p)++; v -= t_term(p); }
        else return v;
    }
}

static char *answer_calc(const char *args)
{
    json_t *a = json_loads(args, 0, NULL);
    const char *expr = json_string_value(json_object_get(a, "expression"));
    ck_assert_ptr_nonnull(expr);
    const char *p = expr;
    double v = t_expr(&p);
    ck_assert_msg(*p == '\0', "trailing text in '%s'", expr);
    char buf[64];
    snprintf(buf, sizeof buf, "%.17g", v);
    json_decref(a);
    return strdup(buf);
}

static char *answer_wrong(const char *args) { return strdup("{\"result\": 123456789.5}"); }

static json_t *get_stats(const srv *s)
{
    resp r = http_do(s->stats, NULL, NULL, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    json_t *j = body_json(&r);
    resp_free(&r);
    return j;
}

static long long stat_of(json_t *st, const char *key)
{
    json_t *v = json_object_get(st, key);
    ck_assert_msg(json_is_integer(v), "/stats has no integer '%s'", key);
    return json_integer_value(v);
}

/* ---- core --------------------------------------------------------------- */

START_TEST(test_plain_completion)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    json_t *conv = conv_new("say hello");
    char *body = json_dumps(conv, JSON_COMPACT);
    resp r = http_post(&s, body);
    ck_assert_int_eq(r.code, 200);
    char ct[64];
    ck_assert_ptr_nonnull(header(&r, "Content-Type", ct, sizeof ct));
    ck_assert_str_eq(ct, "application/json");
    json_t *j = body_json(&r);
    ck_assert_str_eq(json_string_value(json_object_get(j, "object")), "chat.completion");
    ck_assert(!strncmp(json_string_value(json_object_get(j, "id")), "chatcmpl-", 9));
    ck_assert_int_gt(json_integer_value(json_object_get(j, "created")), 1600000000);
    ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "mock-model");
    json_t *msg = reply_message(j);
    ck_assert_str_eq(json_string_value(json_object_get(msg, "role")), "assistant");
    const char *content = json_string_value(json_object_get(msg, "content"));
    ck_assert_ptr_nonnull(content);
    ck_assert_msg(!strncmp(content, "done: ", 6), "content '%s'", content);
    ck_assert_ptr_null(json_object_get(msg, "tool_calls"));
    ck_assert_str_eq(reply_finish(j), "stop");
    json_t *u = json_object_get(j, "usage");
    json_int_t pt = json_integer_value(json_object_get(u, "prompt_tokens"));
    json_int_t ct2 = json_integer_value(json_object_get(u, "completion_tokens"));
    /* ≈ bytes of the messages / 4 */
    size_t mbytes = json_dumpb(json_object_get(conv, "messages"), NULL, 0, JSON_COMPACT);
    ck_assert_int_ge(pt, 1);
    ck_assert_int_le(pt, (json_int_t)mbytes);
    ck_assert_int_ge(pt, (json_int_t)mbytes / 8);
    ck_assert_int_ge(ct2, 1);
    ck_assert_int_eq(json_integer_value(json_object_get(u, "total_tokens")), pt + ct2);
    json_decref(j);
    resp_free(&r);
    free(body);
    json_decref(conv);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_steps_two_then_final)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    json_t *conv = conv_new("add some numbers steps=2");
    int tool_turns = 0, turns = 0;
    const char *final = NULL;
    json_t *reply = NULL;
    while (turns < 6) {
        long code;
        json_decref(reply);
        reply = conv_send(&s, conv, &code);
        ck_assert_int_eq(code, 200);
        turns++;
        json_t *msg = reply_message(reply);
        if (!strcmp(reply_finish(reply), "tool_calls")) {
            json_t *calls = json_object_get(msg, "tool_calls");
            ck_assert_int_eq(json_array_size(calls), 1);
            json_t *call = json_array_get(calls, 0);
            ck_assert_str_eq(json_string_value(json_object_get(call, "type")), "function");
            ck_assert(json_string_length(json_object_get(call, "id")) > 0);
            json_t *fn = json_object_get(call, "function");
            ck_assert_str_eq(json_string_value(json_object_get(fn, "name")), "calculator");
            json_t *args = json_loads(json_string_value(json_object_get(fn, "arguments")), 0, NULL);
            ck_assert_msg(json_is_string(json_object_get(args, "expression")),
                          "arguments must be a JSON string holding {expression}");
            json_decref(args);
            tool_turns++;
            conv_answer(conv, reply, answer_fixed);
        } else {
            final = json_string_value(json_object_get(msg, "content"));
            break;
        }
    }
    ck_assert_int_eq(tool_turns, 2);
    ck_assert_int_eq(turns, 3);
    ck_assert_ptr_nonnull(final);
    ck_assert_msg(!strncmp(final, "done: ", 6), "final '%s'", final);
    json_decref(reply);
    json_decref(conv);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_parallel_three)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    json_t *conv = conv_new("fan out steps=1 parallel=3");
    long code;
    json_t *reply = conv_send(&s, conv, &code);
    ck_assert_int_eq(code, 200);
    ck_assert_str_eq(reply_finish(reply), "tool_calls");
    json_t *calls = json_object_get(reply_message(reply), "tool_calls");
    ck_assert_int_eq(json_array_size(calls), 3);
    const char *id0 = json_string_value(json_object_get(json_array_get(calls, 0), "id"));
    const char *id1 = json_string_value(json_object_get(json_array_get(calls, 1), "id"));
    const char *id2 = json_string_value(json_object_get(json_array_get(calls, 2), "id"));
    ck_assert(strcmp(id0, id1) && strcmp(id1, id2) && strcmp(id0, id2));
    conv_answer(conv, reply, answer_fixed);
    json_decref(reply);
    reply = conv_send(&s, conv, &code);
    ck_assert_str_eq(reply_finish(reply), "stop");
    json_decref(reply);
    json_decref(conv);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_tool_choice_and_named_tool)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    long code;
    /* tool=NAME picks an offered tool; a tool without required args gets {} */
    json_t *conv = conv_new("what time steps=1 tool=current_time");
    json_t *reply = conv_send(&s, conv, &code);
    json_t *fn = json_object_get(json_array_get(json_object_get(reply_message(reply), "tool_calls"), 0),
                                 "function");
    ck_assert_str_eq(json_string_value(json_object_get(fn, "name")), "current_time");
    ck_assert_str_eq(json_string_value(json_object_get(fn, "arguments")), "{}");
    json_decref(reply);
    /* tool_choice "none" wins over steps= */
    json_object_set_new(conv, "tool_choice", json_string("none"));
    reply = conv_send(&s, conv, &code);
    ck_assert_str_eq(reply_finish(reply), "stop");
    json_decref(reply);
    json_decref(conv);
    /* tokens=N is what usage reports */
    conv = conv_new("expensive tokens=5000");
    reply = conv_send(&s, conv, &code);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(reply, "usage"),
                                                       "completion_tokens")), 5000);
    json_decref(reply);
    json_decref(conv);
    srv_stop(&s, NULL);
}
END_TEST

/* Answers the calculator call of `reply` (which it frees) with `answer`,
 * sends the conversation on, and checks that the content of the reply
 * to that, the mock's verdict, starts with `verdict`. */
static void assert_verdict(srv *s, json_t *conv, json_t *reply, char *(*answer)(const char *args),
                           const char *verdict)
{
    conv_answer(conv, reply, answer);
    json_decref(reply);
    long code;
    reply = conv_send(s, conv, &code);
    const char *text = json_string_value(json_object_get(reply_message(reply), "content"));
    ck_assert_msg(text && !strncmp(text, verdict, strlen(verdict)), "verdict '%s'", text);
    json_decref(reply);
}

START_TEST(test_calc_mode_checks_result)
{
    aq_mockllm_config c = cfg_default();
    c.mode = AQ_MOCKLLM_CALC;
    srv s;
    srv_start(&s, &c);
    for (int round = 0; round < 5; round++) {
        json_t *conv = conv_new("compute something");
        long code;
        json_t *reply = conv_send(&s, conv, &code);
        ck_assert_int_eq(code, 200);
        ck_assert_str_eq(reply_finish(reply), "tool_calls");
        json_t *fn = json_object_get(
            json_array_get(json_object_get(reply_message(reply), "tool_calls"), 0), "function");
        ck_assert_str_eq(json_string_value(json_object_get(fn, "name")), "calculator");
        assert_verdict(&s, conv, reply, answer_calc, "correct: ");
        json_decref(conv);
    }
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_calc_goal_catches_wrong_result)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c); /* script mode: the goal's `calc` turns it on */
    json_t *conv = conv_new("please calc this");
    long code;
    json_t *reply = conv_send(&s, conv, &code);
    ck_assert_str_eq(reply_finish(reply), "tool_calls");
    assert_verdict(&s, conv, reply, answer_wrong, "WRONG: ");
    json_decref(conv);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_latency_applied)
{
    aq_mockllm_config c = cfg_default();
    c.latency_ms = 200;
    srv s;
    srv_start(&s, &c);
    resp r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
    ck_assert_int_eq(r.code, 200);
    ck_assert_msg(r.secs >= 0.195, "took %.3f s with 200 ms latency", r.secs);
    resp_free(&r);
    /* sleep=MS overrides the latency of one request */
    r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi sleep=450\"}]}");
    ck_assert_int_eq(r.code, 200);
    ck_assert_msg(r.secs >= 0.445, "took %.3f s with sleep=450", r.secs);
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_stats_and_healthz)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/healthz", s.port);
    resp r = http_do(url, NULL, NULL, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    ck_assert_int_eq((int)r.len, 2);
    ck_assert(!memcmp(r.body, "ok", 2));
    resp_free(&r);

    long long pt = 0, ct = 0;
    for (int i = 0; i < 3; i++) {
        json_t *conv = conv_new(i == 2 ? "a longer goal to make more prompt tokens here" : "hi");
        long code;
        json_t *reply = conv_send(&s, conv, &code);
        json_t *u = json_object_get(reply, "usage");
        pt += json_integer_value(json_object_get(u, "prompt_tokens"));
        ct += json_integer_value(json_object_get(u, "completion_tokens"));
        json_decref(reply);
        json_decref(conv);
    }
    r = http_post(&s, "not json");
    ck_assert_int_eq(r.code, 400);
    resp_free(&r);

    json_t *st = get_stats(&s);
    ck_assert_int_eq(stat_of(st, "requests"), 4);
    ck_assert_int_eq(stat_of(st, "completed"), 3);
    ck_assert_int_eq(stat_of(st, "failures"), 1);
    ck_assert_int_eq(stat_of(st, "rate_limited"), 0);
    ck_assert_int_eq(stat_of(st, "in_flight"), 0);
    ck_assert_int_eq(stat_of(st, "peak_in_flight"), 1);
    ck_assert_int_eq(stat_of(st, "prompt_tokens"), pt);
    ck_assert_int_eq(stat_of(st, "completion_tokens"), ct);
    json_decref(st);

    /* GET /calls: requests per goal, what a test of resumed tasks counts */
    char calls[128];
    snprintf(calls, sizeof calls, "http://127.0.0.1:%d/calls", s.port);
    r = http_do(calls, NULL, NULL, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    json_t *per_goal = body_json(&r);
    resp_free(&r);
    ck_assert_int_eq(json_object_size(per_goal), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(per_goal, "hi")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(per_goal, "a longer goal to make more prompt tokens here")),
                     1);
    json_decref(per_goal);

    aq_mockllm_stats api;
    srv_stop(&s, &api);
    ck_assert_int_eq(api.requests, 4);
    ck_assert_int_eq(api.completed, 3);
    ck_assert_int_eq((long long)api.prompt_tokens, pt);
}
END_TEST

/* Runs the built binary with `args` (a shell fragment); returns its exit
 * status and its stdout+stderr in out. */
static int run_bin(const char *args, char *out, size_t outlen)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' %s 2>&1", aq_test_bin("agentq-mockllm"), args);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    size_t n = fread(out, 1, outlen - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

START_TEST(test_binary_help_and_version)
{
    static char out[16384];
    ck_assert_int_eq(run_bin("--help", out, sizeof out), 0);
    ck_assert_ptr_nonnull(strstr(out, "--listen HOST:PORT"));
    ck_assert_ptr_nonnull(strstr(out, "--rpm"));
    ck_assert_ptr_nonnull(strstr(out, "--hang-rate"));
    ck_assert_ptr_nonnull(strstr(out, "steps=N"));
    ck_assert_ptr_nonnull(strstr(out, "url=URL"));
    ck_assert_ptr_nonnull(strstr(out, "POST /control"));
    ck_assert_ptr_nonnull(strstr(out, "storm_seconds"));
    ck_assert_ptr_nonnull(strstr(out, "--echo-key"));
    ck_assert_ptr_nonnull(strstr(out, "--auth-header"));
    ck_assert_ptr_nonnull(strstr(out, "--require-query"));
    ck_assert_ptr_nonnull(strstr(out, "--window-requests"));
    ck_assert_ptr_nonnull(strstr(out, "--window-ms"));
    ck_assert_ptr_nonnull(strstr(out, "window_requests"));
    ck_assert_ptr_nonnull(strstr(out, "GET /requests"));
    ck_assert_int_eq(run_bin("--version", out, sizeof out), 0);
    ck_assert(!strncmp(out, "agentq-mockllm ", 15));
    ck_assert_int_eq(run_bin("--fail-rate 2", out, sizeof out), 2);
    ck_assert_ptr_nonnull(strstr(out, "--fail-rate"));
    ck_assert_int_eq(run_bin("--mode banana", out, sizeof out), 2);
    ck_assert_int_eq(run_bin("--require-query api-version", out, sizeof out), 2);
    ck_assert_ptr_nonnull(strstr(out, "NAME=VALUE"));
    ck_assert_int_eq(run_bin("--auth-header api-key", out, sizeof out), 2);
    ck_assert_ptr_nonnull(strstr(out, "--api-key-env"));
    ck_assert_int_eq(run_bin("--window-ms 0", out, sizeof out), 2);
    ck_assert_int_eq(run_bin("--window-requests -1", out, sizeof out), 2);
}
END_TEST

START_TEST(test_binary_serves_and_stops)
{
    char dir[] = "/tmp/mockllm-test-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char portfile[128], logfile[128];
    snprintf(portfile, sizeof portfile, "%s/port", dir);
    snprintf(logfile, sizeof logfile, "%s/log", dir);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        FILE *lf = freopen(logfile, "w", stderr);
        (void)lf;
        execl(aq_test_bin("agentq-mockllm"), "agentq-mockllm", "--listen", "127.0.0.1:0",
              "--port-file", portfile, "--latency-ms", "10", (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (int i = 0; i < 200 && port == 0; i++) {
        FILE *f = fopen(portfile, "r");
        if (f) {
            if (fscanf(f, "%d", &port) != 1) port = 0;
            fclose(f);
        }
        if (!port) usleep(20000);
    }
    ck_assert_int_gt(port, 0);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/chat/completions", port);
    resp r = http_do(url, NULL, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
                     NULL, 0);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    ck_assert_int_eq(kill(pid, SIGTERM), 0);
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    /* the start line is JSON and names the real port */
    static char log[8192];
    FILE *f = fopen(logfile, "r");
    ck_assert_ptr_nonnull(f);
    size_t n = fread(log, 1, sizeof log - 1, f);
    log[n] = '\0';
    fclose(f);
    char *nl = strchr(log, '\n');
    ck_assert_ptr_nonnull(nl);
    json_t *line = json_loadb(log, (size_t)(nl - log), 0, NULL);
    ck_assert_ptr_nonnull(line);
    char want[64];
    snprintf(want, sizeof want, "http://127.0.0.1:%d/v1", port);
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(line, "msg")), want));
    json_decref(line);
    unlink(portfile);
    unlink(logfile);
    rmdir(dir);
}
END_TEST

/* A request whose goal offers http_get (a "url" parameter) and the calculator. */
static json_t *conv_with_http_get(const char *goal)
{
    return json_pack("{s:s, s:[{s:s, s:s}], s:[o, o]}", "model", "mock-model", "messages", "role",
                     "user", "content", goal, "tools", tool_def("http_get", "url"),
                     tool_def("calculator", "expression"));
}

/* The arguments (parsed) of the first tool call of a reply; caller decrefs. */
static json_t *first_call_args(json_t *reply, const char **name)
{
    json_t *fn = json_object_get(
        json_array_get(json_object_get(reply_message(reply), "tool_calls"), 0), "function");
    ck_assert_msg(fn != NULL, "the reply has no tool call");
    *name = json_string_value(json_object_get(fn, "name"));
    json_t *args = json_loads(json_string_value(json_object_get(fn, "arguments")), 0, NULL);
    ck_assert_ptr_nonnull(args);
    return args;
}

START_TEST(test_url_directive)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    long code;
    /* url= gives http_get exactly that URL, every tool turn */
    json_t *conv = conv_with_http_get("fetch it steps=2 tool=http_get url=http://127.0.0.1:9/a?b=c&d please");
    for (int turn = 0; turn < 2; turn++) {
        json_t *reply = conv_send(&s, conv, &code);
        ck_assert_int_eq(code, 200);
        ck_assert_str_eq(reply_finish(reply), "tool_calls");
        const char *name;
        json_t *args = first_call_args(reply, &name);
        ck_assert_str_eq(name, "http_get");
        ck_assert_int_eq(json_object_size(args), 1);
        ck_assert_str_eq(json_string_value(json_object_get(args, "url")), "http://127.0.0.1:9/a?b=c&d");
        json_decref(args);
        conv_answer(conv, reply, answer_fixed);
        json_decref(reply);
    }
    json_t *reply = conv_send(&s, conv, &code);
    ck_assert_str_eq(reply_finish(reply), "stop");
    json_decref(reply);
    json_decref(conv);
    /* without url= the schema filler's placeholder stays */
    conv = conv_with_http_get("fetch steps=1 tool=http_get");
    reply = conv_send(&s, conv, &code);
    const char *name;
    json_t *args = first_call_args(reply, &name);
    ck_assert_str_eq(json_string_value(json_object_get(args, "url")), "https://example.com/");
    json_decref(args);
    json_decref(reply);
    json_decref(conv);
    /* the calculator keeps its expression; a tool without a url parameter
     * still gets {"url": ...} (that is what the directive says) */
    conv = conv_with_http_get("sum steps=1 tool=calculator url=http://x/");
    reply = conv_send(&s, conv, &code);
    args = first_call_args(reply, &name);
    ck_assert_str_eq(name, "calculator");
    ck_assert_ptr_nonnull(json_object_get(args, "expression"));
    ck_assert_ptr_null(json_object_get(args, "url"));
    json_decref(args);
    json_decref(reply);
    json_decref(conv);
    conv = conv_new("now steps=1 tool=current_time url=http://y/");
    reply = conv_send(&s, conv, &code);
    args = first_call_args(reply, &name);
    ck_assert_str_eq(name, "current_time");
    ck_assert_str_eq(json_string_value(json_object_get(args, "url")), "http://y/");
    json_decref(args);
    json_decref(reply);
    json_decref(conv);
    srv_stop(&s, NULL);
}
END_TEST

/* ---- runtime faults -------------------------------------------------------- */

static const char *const chat_body =
    "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";

/* POSTs `body` to /control; returns the status, and the reply in *out
 * (caller decrefs) when out is not NULL. */
static long control(const srv *s, const char *body, json_t **out)
{
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/control", s->port);
    resp r = http_do(url, NULL, body, NULL, 0);
    ck_assert_int_eq(r.rc, CURLE_OK);
    long code = r.code;
    if (out) *out = body_json(&r);
    resp_free(&r);
    return code;
}

static json_t *control_state(const srv *s)
{
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/control", s->port);
    resp r = http_do(url, NULL, NULL, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    json_t *j = body_json(&r);
    resp_free(&r);
    return j;
}

static double num_of(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    ck_assert_msg(json_is_number(v), "no number '%s'", key);
    return json_number_value(v);
}

START_TEST(test_control_changes_and_reset_restores)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    resp r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);

    /* 5xx window */
    json_t *st;
    ck_assert_int_eq(control(&s, "{\"fail_rate\":1}", &st), 200);
    ck_assert(num_of(st, "fail_rate") == 1.0);
    json_decref(st);
    r = http_post(&s, chat_body);
    expect_error(&r, 500, "server_error", NULL);
    resp_free(&r);
    ck_assert_int_eq(control(&s, "{\"reset\":true}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);

    /* malformed window; {} resets */
    ck_assert_int_eq(control(&s, "{\"malformed_rate\":1.0}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    ck_assert_ptr_null(json_loadb(r.body, r.len, 0, NULL));
    resp_free(&r);
    ck_assert_int_eq(control(&s, "{}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    json_decref(body_json(&r));
    resp_free(&r);

    /* hung window: no reply until the client gives up */
    ck_assert_int_eq(control(&s, "{\"hang_rate\":1}", NULL), 200);
    r = http_do(s.url, NULL, chat_body, NULL, 300);
    ck_assert_int_eq(r.rc, CURLE_OPERATION_TIMEDOUT);
    resp_free(&r);
    /* latency through the control too; fields not named keep their value */
    ck_assert_int_eq(control(&s, "{\"hang_rate\":0,\"latency_ms\":250}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    ck_assert_msg(r.secs >= 0.245, "took %.3f s with latency_ms 250", r.secs);
    resp_free(&r);
    st = control_state(&s);
    ck_assert(num_of(st, "latency_ms") == 250 && num_of(st, "hang_rate") == 0);
    json_decref(st);

    /* reset goes back to the start-up settings, not to zero */
    srv_stop(&s, NULL);
    c.fail_rate = 1.0;
    srv_start(&s, &c);
    ck_assert_int_eq(control(&s, "{\"fail_rate\":0}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    ck_assert_int_eq(control(&s, "{\"reset\":true,\"malformed_rate\":0}", &st), 200);
    ck_assert(num_of(st, "fail_rate") == 1.0);
    json_decref(st);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 500);
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_control_storm_429_then_recovers)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    json_t *st;
    ck_assert_int_eq(control(&s, "{\"storm_seconds\":1.2,\"retry_after\":2}", &st), 200);
    ck_assert(num_of(st, "storm_seconds_left") > 0.5);
    ck_assert(num_of(st, "retry_after") == 2);
    json_decref(st);
    char v[64];
    for (int i = 0; i < 3; i++) {
        resp r = http_post(&s, chat_body);
        expect_error(&r, 429, NULL, "try again");
        ck_assert_str_eq(header(&r, "Retry-After", v, sizeof v), "2");
        json_t *j = body_json(&r);
        ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                         "rate_limit_exceeded");
        json_decref(j);
        resp_free(&r);
    }
    /* the other endpoints are not part of the storm */
    json_t *stats = get_stats(&s);
    ck_assert_int_eq(stat_of(stats, "rate_limited"), 3);
    ck_assert_int_eq(stat_of(stats, "completed"), 0);
    json_decref(stats);
    usleep(1300000);
    resp r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    st = control_state(&s);
    ck_assert(num_of(st, "storm_seconds_left") == 0);
    json_decref(st);

    /* without retry_after the reply asks for the seconds left; 0 ends it */
    ck_assert_int_eq(control(&s, "{\"storm_seconds\":30}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 429);
    int ra = atoi(header(&r, "Retry-After", v, sizeof v));
    ck_assert_msg(ra >= 29 && ra <= 30, "Retry-After %d with 30 s of storm left", ra);
    resp_free(&r);
    ck_assert_int_eq(control(&s, "{\"storm_seconds\":0}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    /* and a reset ends one too */
    ck_assert_int_eq(control(&s, "{\"storm_seconds\":30}", NULL), 200);
    ck_assert_int_eq(control(&s, "{}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

/* ---- limits -------------------------------------------------------------- */

START_TEST(test_rpm_limit_429)
{
    aq_mockllm_config c = cfg_default();
    c.rpm = 2;
    c.tpm = 100000;
    srv s;
    srv_start(&s, &c);
    const char *body = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    char v[64];
    for (int i = 0; i < 2; i++) {
        resp r = http_post(&s, body);
        ck_assert_int_eq(r.code, 200);
        ck_assert_str_eq(header(&r, "x-ratelimit-limit-requests", v, sizeof v), "2");
        ck_assert_int_eq(atoi(header(&r, "x-ratelimit-remaining-requests", v, sizeof v)), 1 - i);
        resp_free(&r);
    }
    resp r = http_post(&s, body);
    ck_assert_int_eq(r.code, 429);
    ck_assert_ptr_nonnull(header(&r, "Retry-After", v, sizeof v));
    for (const char *p = v; *p; p++) ck_assert_msg(isdigit((unsigned char)*p), "Retry-After '%s'", v);
    ck_assert_int_ge(atoi(v), 1);
    ck_assert_int_le(atoi(v), 60);
    ck_assert_str_eq(header(&r, "x-ratelimit-limit-requests", v, sizeof v), "2");
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "0");
    ck_assert_ptr_nonnull(header(&r, "x-ratelimit-reset-requests", v, sizeof v));
    ck_assert_msg(v[0] && v[strlen(v) - 1] == 's', "reset '%s'", v);
    ck_assert_str_eq(header(&r, "x-ratelimit-limit-tokens", v, sizeof v), "100000");
    ck_assert_ptr_nonnull(header(&r, "x-ratelimit-remaining-tokens", v, sizeof v));
    ck_assert_ptr_nonnull(header(&r, "x-ratelimit-reset-tokens", v, sizeof v));
    json_t *j = body_json(&r);
    json_t *e = json_object_get(j, "error");
    ck_assert_str_eq(json_string_value(json_object_get(e, "code")), "rate_limit_exceeded");
    ck_assert(json_string_length(json_object_get(e, "message")) > 0);
    json_decref(j);
    resp_free(&r);
    json_t *st = get_stats(&s);
    ck_assert_int_eq(stat_of(st, "rate_limited"), 1);
    ck_assert_int_eq(stat_of(st, "completed"), 2);
    json_decref(st);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_tpm_limit_429)
{
    aq_mockllm_config c = cfg_default();
    c.tpm = 50;
    srv s;
    srv_start(&s, &c);
    char big[1200];
    memset(big, 'a', 800);
    big[800] = '\0';
    char body[1400];
    snprintf(body, sizeof body, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}]}", big);
    /* a request larger than the whole minute is admitted once, into debt */
    resp r = http_post(&s, body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    r = http_post(&s, body);
    ck_assert_int_eq(r.code, 429);
    char v[64];
    ck_assert_int_ge(atoi(header(&r, "Retry-After", v, sizeof v)), 1);
    ck_assert_str_eq(header(&r, "x-ratelimit-limit-tokens", v, sizeof v), "50");
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-tokens", v, sizeof v), "0");
    ck_assert_ptr_null(header(&r, "x-ratelimit-limit-requests", v, sizeof v));
    json_t *j = body_json(&r);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "type")), "tokens");
    json_decref(j);
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

typedef struct sink {
    char buf[1024];
    size_t len;
} sink;

static size_t sink_write(char *p, size_t sz, size_t n, void *ud)
{
    sink *s = ud;
    size_t t = sz * n, room = sizeof s->buf - 1 - s->len;
    size_t k = t < room ? t : room;
    memcpy(s->buf + s->len, p, k);
    s->len += k;
    return t;
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

START_TEST(test_thousand_concurrent)
{
    enum { N = 1000 };
    raise_nofile();
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    ck_assert_msg(rl.rlim_cur >= 2 * N + 64, "open-file limit %llu is too low for this test",
                  (unsigned long long)rl.rlim_cur);
    aq_mockllm_config c = cfg_default();
    /* Long enough that all N are in flight before the first reply, even
     * under ThreadSanitizer on a busy machine (300 ms once saw 993). */
    c.latency_ms = 2000;
    srv s;
    srv_start(&s, &c);
    const char *body =
        "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hello steps=0\"}]}";
    CURLM *multi = curl_multi_init();
    CURL **easy = calloc(N, sizeof *easy);
    sink *sinks = calloc(N, sizeof *sinks);
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    for (int i = 0; i < N; i++) {
        easy[i] = curl_easy_init();
        curl_easy_setopt(easy[i], CURLOPT_URL, s.url);
        curl_easy_setopt(easy[i], CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(easy[i], CURLOPT_HTTPHEADER, h);
        curl_easy_setopt(easy[i], CURLOPT_WRITEFUNCTION, sink_write);
        curl_easy_setopt(easy[i], CURLOPT_WRITEDATA, &sinks[i]);
        curl_easy_setopt(easy[i], CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(easy[i], CURLOPT_TIMEOUT_MS, 60000L);
        curl_easy_setopt(easy[i], CURLOPT_CONNECTTIMEOUT_MS, 30000L);
        curl_multi_add_handle(multi, easy[i]);
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int running = 1;
    while (running) {
        ck_assert_int_eq(curl_multi_perform(multi, &running), CURLM_OK);
        if (running) curl_multi_poll(multi, NULL, 0, 100, NULL);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    int ok = 0, msgs;
    CURLMsg *msg;
    while ((msg = curl_multi_info_read(multi, &msgs)) != NULL) {
        if (msg->msg != CURLMSG_DONE) continue;
        long code = 0;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &code);
        if (msg->data.result == CURLE_OK && code == 200) ok++;
    }
    for (int i = 0; i < N; i++) {
        json_t *j = json_loadb(sinks[i].buf, sinks[i].len, 0, NULL);
        ck_assert_msg(j && json_is_object(json_object_get(j, "usage")), "reply %d not a completion", i);
        json_decref(j);
        curl_multi_remove_handle(multi, easy[i]);
        curl_easy_cleanup(easy[i]);
    }
    curl_multi_cleanup(multi);
    curl_slist_free_all(h);
    free(easy);
    free(sinks);
    ck_assert_int_eq(ok, N);
    /* one after another this would take 2,000 s */
    ck_assert_msg(secs < 30, "1000 requests took %.1f s", secs);
    json_t *st = get_stats(&s);
    ck_assert_int_eq(stat_of(st, "completed"), N);
    ck_assert_int_eq(stat_of(st, "in_flight"), 0);
    ck_assert_msg(stat_of(st, "peak_in_flight") == N, "peak_in_flight %lld",
                  stat_of(st, "peak_in_flight"));
    json_decref(st);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_hang_until_client_leaves)
{
    aq_mockllm_config c = cfg_default();
    c.hang_rate = 1.0;
    srv s;
    srv_start(&s, &c);
    resp r = http_do(s.url, NULL, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
                     NULL, 300);
    ck_assert_int_eq(r.rc, CURLE_OPERATION_TIMEDOUT);
    resp_free(&r);
    /* the client closed its socket: the held request is freed soon after */
    long long in_flight = -1, cancelled = -1, hung = -1;
    for (int i = 0; i < 100; i++) {
        json_t *st = get_stats(&s);
        in_flight = stat_of(st, "in_flight");
        cancelled = stat_of(st, "cancelled");
        hung = stat_of(st, "hung");
        json_decref(st);
        if (in_flight == 0) break;
        usleep(20000);
    }
    ck_assert_int_eq(hung, 1);
    ck_assert_int_eq(in_flight, 0);
    ck_assert_int_eq(cancelled, 1);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_free_with_requests_held)
{
    /* A request still waiting when the simulator is freed is dropped
     * without a leak or a crash (the sanitizer build checks the leak). */
    aq_mockllm_config c = cfg_default();
    c.latency_ms = 60000;
    srv s;
    srv_start(&s, &c);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    const char *body = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    char req[512];
    int n = snprintf(req, sizeof req,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     "application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
    ck_assert_int_eq(write(fd, req, (size_t)n), n);
    long long in_flight = 0;
    for (int i = 0; i < 100 && in_flight == 0; i++) {
        json_t *st = get_stats(&s);
        in_flight = stat_of(st, "in_flight");
        json_decref(st);
        if (!in_flight) usleep(10000);
    }
    ck_assert_int_eq(in_flight, 1);
    aq_mockllm_stats st;
    srv_stop(&s, &st);
    ck_assert_int_eq(st.completed, 0);
    /* the server closed the connection without a reply */
    char buf[64];
    ck_assert_int_eq(read(fd, buf, sizeof buf), 0);
    close(fd);
}
END_TEST

/* ---- errors -------------------------------------------------------------- */


START_TEST(test_fail_directives)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    resp r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x fail=400\"}]}");
    expect_error(&r, 400, "invalid_request_error", NULL);
    resp_free(&r);
    r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x fail=500\"}]}");
    expect_error(&r, 500, "server_error", NULL);
    resp_free(&r);
    r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x fail=429\"}]}");
    expect_error(&r, 429, NULL, NULL);
    char v[32];
    ck_assert_str_eq(header(&r, "Retry-After", v, sizeof v), "1");
    resp_free(&r);
    /* "nofail=400" is not the directive: it must start a word */
    r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x nofail=400\"}]}");
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    json_t *st = get_stats(&s);
    ck_assert_int_eq(stat_of(st, "failures"), 2);
    ck_assert_int_eq(stat_of(st, "rate_limited"), 1);
    json_decref(st);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_bad_bodies)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    static const struct { const char *body, *needle; } cases[] = {
        {"not json", "parse"},
        {"[1,2]", "object"},
        {"{\"model\":\"m\"}", "messages"},
        {"{\"model\":\"m\",\"messages\":[]}", "messages"},
        {"{\"model\":\"m\",\"messages\":{}}", "messages"},
        {"{\"model\":\"m\",\"messages\":[{\"content\":\"x\"}]}", "role"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", "model"},
        {"{\"model\":\"m\",\"model\":\"n\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
         "duplicate"},
        {"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{}]}",
         "tools[0]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        resp r = http_post(&s, cases[i].body);
        expect_error(&r, 400, "invalid_request_error", cases[i].needle);
        resp_free(&r);
    }
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_body_too_large)
{
    aq_mockllm_config c = cfg_default();
    c.max_body_bytes = 1024;
    srv s;
    srv_start(&s, &c);
    char *body = malloc(4096);
    memset(body, ' ', 4095);
    body[4095] = '\0';
    resp r = http_post(&s, body);
    ck_assert_int_eq(r.code, 413);
    resp_free(&r);
    free(body);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_api_key)
{
    aq_mockllm_config c = cfg_default();
    char key[] = "sk-test-123456";
    c.api_key = key;
    srv s;
    srv_start(&s, &c);
    memset(key, 'x', sizeof key - 1); /* the simulator copied it */
    const char *body = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    resp r = http_do(s.url, NULL, body, NULL, 0);
    expect_error(&r, 401, "invalid_request_error", NULL);
    resp_free(&r);
    r = http_do(s.url, NULL, body, "Authorization: Bearer sk-test-12345", 0);
    ck_assert_int_eq(r.code, 401);
    resp_free(&r);
    r = http_do(s.url, NULL, body, "Authorization: Bearer sk-test-123456", 0);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_control_bad_bodies)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    static const struct { const char *body, *param, *needle; } cases[] = {
        {"not json", "body", "not valid JSON"},
        {"", "body", "not valid JSON"},
        {"[1]", "body", "must be a JSON object"},
        {"{\"fail_rate\":1.5}", "fail_rate", "fail_rate: must be a number from 0 to 1 (got 1.5)"},
        {"{\"malformed_rate\":\"lots\"}", "malformed_rate", "(got a string)"},
        {"{\"hang_rate\":-0.1}", "hang_rate", "hang_rate: must be a number from 0 to 1"},
        {"{\"latency_ms\":1.5}", "latency_ms", "latency_ms: must be an integer"},
        {"{\"jitter_ms\":-1}", "jitter_ms", "jitter_ms: must be an integer"},
        {"{\"storm_seconds\":-1}", "storm_seconds", "storm_seconds: must be a number from 0 to 3600"},
        {"{\"storm_seconds\":5,\"retry_after\":0}", "retry_after", "retry_after: must be an integer"},
        {"{\"retry_after\":2}", "retry_after", "must come with storm_seconds"},
        {"{\"reset\":\"yes\"}", "reset", "reset: must be true or false"},
        {"{\"colour\":\"red\"}", "colour", "unknown field 'colour'"},
        {"{\"fail_rate\":0.5,\"fail_rate\":0.6}", "body", "duplicate"},
        {"{\"fail_rate\":0.5,\"hang_rate\":2}", "hang_rate", "hang_rate"},
        {"{\"fail_rate\":\"\xff\"}", "body", "not valid JSON"},
        {"{\"window_ms\":0}", "window_ms",
         "window_ms: must be an integer from 1 to 3600000 (got 0)"},
        {"{\"window_requests\":-1}", "window_requests",
         "window_requests: must be an integer from 0"},
        {"{\"window_requests\":1.5}", "window_requests", "(got 1.5)"},
        {"{\"window_requests\":1000001}", "window_requests", "1000000"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char url[128];
        snprintf(url, sizeof url, "http://127.0.0.1:%d/control", s.port);
        resp r = http_do(url, NULL, cases[i].body, NULL, 0);
        expect_error(&r, 400, "invalid_request_error", cases[i].needle);
        json_t *j = body_json(&r);
        ck_assert_msg(!strcmp(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                              cases[i].param),
                      "case %zu: param is not '%s': %.*s", i, cases[i].param, (int)r.len, r.body);
        json_decref(j);
        resp_free(&r);
    }
    /* a bad body changes nothing, not even its good fields */
    json_t *st = control_state(&s);
    ck_assert(num_of(st, "fail_rate") == 0 && num_of(st, "hang_rate") == 0);
    json_decref(st);
    resp r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/control", s.port);
    r = http_do(url, "DELETE", NULL, NULL, 0);
    expect_error(&r, 405, NULL, "POST");
    resp_free(&r);
    /* control replies are not chat requests */
    json_t *stats = get_stats(&s);
    ck_assert_int_eq(stat_of(stats, "requests"), 1);
    ck_assert_int_eq(stat_of(stats, "failures"), 0);
    json_decref(stats);
    srv_stop(&s, NULL);

    /* the same through the API */
    struct event_base *base = event_base_new();
    char err[256], field[32];
    aq_mockllm *m = aq_mockllm_new(base, &c, err, sizeof err);
    ck_assert_ptr_nonnull(m);
    const char *b = "{\"fail_rate\":true}";
    ck_assert_int_eq(aq_mockllm_control(m, b, strlen(b), field, err, sizeof err), AQ_EINVAL);
    ck_assert_str_eq(field, "fail_rate");
    ck_assert_msg(strstr(err, "(got a boolean)"), "err '%s'", err);
    b = "{\"fail_rate\":0.25}";
    ck_assert_int_eq(aq_mockllm_control(m, b, strlen(b), field, err, sizeof err), AQ_OK);
    ck_assert_str_eq(field, "");
    ck_assert_int_eq(aq_mockllm_control(m, "{}", 2, NULL, NULL, 0), AQ_OK);
    ck_assert_int_eq(aq_mockllm_control(m, "{", 1, NULL, NULL, 0), AQ_EINVAL);
    aq_mockllm_free(m);
    event_base_free(base);
}
END_TEST

START_TEST(test_api_key_echo)
{
    aq_mockllm_config c = cfg_default();
    c.api_key = "sk-right-000";
    c.echo_key = true;
    srv s;
    srv_start(&s, &c);
    resp r = http_do(s.url, NULL, chat_body, "Authorization: Bearer sk-wrong-4f2a9c", 0);
    expect_error(&r, 401, "invalid_request_error", "Incorrect API key provided: sk-wrong-4f2a9c.");
    json_t *j = body_json(&r);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "invalid_api_key");
    json_decref(j);
    ck_assert_ptr_null(strstr(r.body, "sk-right-000")); /* never the real one */
    resp_free(&r);
    /* no key: nothing to echo */
    r = http_do(s.url, NULL, chat_body, NULL, 0);
    expect_error(&r, 401, NULL, "missing API key");
    resp_free(&r);
    /* not Bearer: the header as presented */
    r = http_do(s.url, NULL, chat_body, "Authorization: Basic dXNlcjpwdw==", 0);
    expect_error(&r, 401, NULL, "provided: Basic dXNlcjpwdw==.");
    resp_free(&r);
    /* bytes that are not printable ASCII become '?'; a long key is cut */
    r = http_do(s.url, NULL, chat_body, "Authorization: Bearer sk-\xc3\xa9\x01z", 0);
    expect_error(&r, 401, NULL, "provided: sk-???z.");
    resp_free(&r);
    char longkey[400], hdr[450];
    memset(longkey, 'k', sizeof longkey - 1);
    longkey[sizeof longkey - 1] = '\0';
    snprintf(hdr, sizeof hdr, "Authorization: Bearer %s", longkey);
    r = http_do(s.url, NULL, chat_body, hdr, 0);
    ck_assert_int_eq(r.code, 401);
    char want[220];
    memset(want, 'k', 200);
    memcpy(want + 200, "...", 4);
    ck_assert_msg(strstr(r.body, want) && !strstr(r.body, longkey), "%.*s", (int)r.len, r.body);
    resp_free(&r);
    /* the right key still passes */
    r = http_do(s.url, NULL, chat_body, "Authorization: Bearer sk-right-000", 0);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    srv_stop(&s, NULL);

    /* echo off (the default): the key is not quoted */
    c.echo_key = false;
    srv_start(&s, &c);
    r = http_do(s.url, NULL, chat_body, "Authorization: Bearer sk-wrong-4f2a9c", 0);
    ck_assert_int_eq(r.code, 401);
    ck_assert_ptr_null(strstr(r.body, "sk-wrong-4f2a9c"));
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_injected_failures)
{
    aq_mockllm_config c = cfg_default();
    c.fail_rate = 1.0;
    srv s;
    srv_start(&s, &c);
    resp r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}");
    expect_error(&r, 500, "server_error", NULL);
    resp_free(&r);
    srv_stop(&s, NULL);

    c = cfg_default();
    c.malformed_rate = 1.0;
    srv_start(&s, &c);
    r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}");
    ck_assert_int_eq(r.code, 200);
    ck_assert_ptr_null(json_loadb(r.body, r.len, 0, NULL));
    ck_assert_int_gt((int)r.len, 10);
    resp_free(&r);
    aq_mockllm_stats st;
    srv_stop(&s, &st);
    ck_assert_int_eq(st.malformed, 1);
    ck_assert_int_eq(st.completed, 0);

    /* about half fail with fail_rate 0.5 */
    c = cfg_default();
    c.fail_rate = 0.5;
    srv_start(&s, &c);
    int fails = 0;
    for (int i = 0; i < 60; i++) {
        r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}");
        fails += r.code == 500;
        resp_free(&r);
    }
    srv_stop(&s, NULL);
    ck_assert_msg(fails > 10 && fails < 50, "%d of 60 failed at rate 0.5", fails);
}
END_TEST

START_TEST(test_unknown_path_and_method)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    resp r = http_do(s.url, "GET", NULL, NULL, 0);
    expect_error(&r, 405, NULL, "POST");
    resp_free(&r);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/nothing", s.port);
    r = http_do(url, NULL, NULL, NULL, 0);
    expect_error(&r, 404, NULL, "/v1/nothing");
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_bad_config)
{
    struct event_base *base = event_base_new();
    char err[256];
    aq_mockllm_config c = cfg_default();
    c.fail_rate = 1.5;
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "rate"));
    c = cfg_default();
    c.latency_ms = -1;
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "latency"));
    c = cfg_default();
    c.mode = (aq_mockllm_mode)7;
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    c = cfg_default();
    c.auth_header = "api key";
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    ck_assert_msg(strstr(err, "auth_header"), "err '%s'", err);
    c = cfg_default();
    c.require_query = "api-version";
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    ck_assert_msg(strstr(err, "require_query"), "err '%s'", err);
    c.require_query = "=2024-10-21";
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    c.require_query = "api version=2024-10-21";
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    c = cfg_default();
    c.window_requests = -1;
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    ck_assert_msg(strstr(err, "window"), "err '%s'", err);
    c = cfg_default();
    c.window_requests = 5;
    c.window_ms = 3600001;
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    /* a port already taken */
    c = cfg_default();
    aq_mockllm *a = aq_mockllm_new(base, &c, err, sizeof err);
    ck_assert_ptr_nonnull(a);
    c.port = aq_mockllm_port(a);
    ck_assert_ptr_null(aq_mockllm_new(base, &c, err, sizeof err));
    ck_assert_msg(strstr(err, "cannot listen"), "err '%s'", err);
    aq_mockllm_free(a);
    ck_assert_int_eq(aq_mockllm_mode_parse("calc"), AQ_MOCKLLM_CALC);
    ck_assert_int_eq(aq_mockllm_mode_parse("script"), AQ_MOCKLLM_SCRIPT);
    ck_assert_int_eq(aq_mockllm_mode_parse("nope"), -1);
    event_base_free(base);
}
END_TEST

/* ---- provider styles: header auth, required query, fixed window ---------- */

/* A reset header ("784ms", "1.5s", "0s", "6m0s") in milliseconds. */
static long dur_ms(const char *v)
{
    ck_assert_ptr_nonnull(v);
    char *end;
    double mins = 0, x = strtod(v, &end);
    if (*end == 'm' && end[1] != 's') {
        mins = x;
        x = strtod(end + 1, &end);
    }
    if (!strcmp(end, "ms")) return (long)ceil(x);
    ck_assert_msg(!strcmp(end, "s"), "duration '%s'", v);
    return (long)ceil((mins * 60 + x) * 1000);
}

/* The error's "param" of a reply (NULL when null); copied into buf. */
static const char *error_param(const resp *r, char *buf, size_t len)
{
    json_t *j = body_json(r);
    const char *p = json_string_value(json_object_get(json_object_get(j, "error"), "param"));
    if (p) snprintf(buf, len, "%s", p);
    json_decref(j);
    return p ? buf : NULL;
}

START_TEST(test_auth_header)
{
    aq_mockllm_config c = cfg_default();
    char hdr[] = "api-key";
    c.api_key = "az-key-789";
    c.auth_header = hdr;
    srv s;
    srv_start(&s, &c);
    memset(hdr, 'x', sizeof hdr - 1); /* the simulator copied it */
    /* Azure style passes, in any case of the header name */
    resp r = http_do(s.url, NULL, chat_body, "api-key: az-key-789", 0);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    r = http_do(s.url, NULL, chat_body, "API-Key: az-key-789", 0);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    /* the right key the OpenAI way does not */
    r = http_do(s.url, NULL, chat_body, "Authorization: Bearer az-key-789", 0);
    expect_error(&r, 401, "invalid_request_error", "api-key: <key>");
    resp_free(&r);
    /* no key; a wrong one */
    r = http_do(s.url, NULL, chat_body, NULL, 0);
    expect_error(&r, 401, NULL, "missing API key: send 'api-key: <key>'");
    resp_free(&r);
    r = http_do(s.url, NULL, chat_body, "api-key: az-key-78", 0);
    ck_assert_int_eq(r.code, 401);
    resp_free(&r);
    json_t *st = get_stats(&s);
    ck_assert_int_eq(stat_of(st, "completed"), 2);
    ck_assert_int_eq(stat_of(st, "failures"), 3);
    json_decref(st);
    srv_stop(&s, NULL);

    /* echo_key quotes the configured header, not Authorization */
    c.auth_header = "api-key";
    c.echo_key = true;
    srv_start(&s, &c);
    r = http_do(s.url, NULL, chat_body, "api-key: az-wrong-1", 0);
    expect_error(&r, 401, NULL, "provided: az-wrong-1.");
    resp_free(&r);
    r = http_do(s.url, NULL, chat_body, "Authorization: Bearer az-wrong-2", 0);
    expect_error(&r, 401, NULL, "missing API key");
    ck_assert_ptr_null(strstr(r.body, "az-wrong-2"));
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_require_query)
{
    aq_mockllm_config c = cfg_default();
    char q[] = "api-version=2024-10-21";
    c.require_query = q;
    srv s;
    srv_start(&s, &c);
    memset(q, 'x', sizeof q - 1); /* the simulator copied it */
    char url[256], p[64];
    /* missing: 400 naming the parameter */
    resp r = http_post(&s, chat_body);
    expect_error(&r, 400, "invalid_request_error", "'api-version'");
    ck_assert_str_eq(error_param(&r, p, sizeof p), "api-version");
    resp_free(&r);
    /* another value, or another parameter only */
    snprintf(url, sizeof url, "%s?api-version=2023-05-15", s.url);
    r = http_do(url, NULL, chat_body, NULL, 0);
    expect_error(&r, 400, NULL, "api-version=2024-10-21");
    ck_assert_str_eq(error_param(&r, p, sizeof p), "api-version");
    ck_assert_ptr_nonnull(strstr(r.body, "2023-05-15"));
    resp_free(&r);
    snprintf(url, sizeof url, "%s?api-versions=2024-10-21", s.url);
    r = http_do(url, NULL, chat_body, NULL, 0);
    ck_assert_int_eq(r.code, 400);
    resp_free(&r);
    /* with it (among others, percent-encoded or not) the path still matches */
    snprintf(url, sizeof url, "%s?api-version=2024-10-21", s.url);
    r = http_do(url, NULL, chat_body, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    json_decref(body_json(&r));
    resp_free(&r);
    snprintf(url, sizeof url,
             "http://127.0.0.1:%d/chat/completions?x=1&api%%2Dversion=2024%%2D10-21", s.port);
    r = http_do(url, NULL, chat_body, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    /* the other endpoints ask for nothing */
    snprintf(url, sizeof url, "%s?x=1", s.stats);
    r = http_do(url, NULL, NULL, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    json_t *st = body_json(&r);
    resp_free(&r);
    ck_assert_int_eq(stat_of(st, "requests"), 5);
    ck_assert_int_eq(stat_of(st, "failures"), 3);
    ck_assert_int_eq(stat_of(st, "completed"), 2);
    json_decref(st);
    srv_stop(&s, NULL);

    /* with a key too, Azure's pair: the key is checked first */
    c.require_query = "api-version=2024-10-21";
    c.api_key = "az";
    c.auth_header = "api-key";
    srv_start(&s, &c);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 401);
    resp_free(&r);
    r = http_do(s.url, NULL, chat_body, "api-key: az", 0);
    ck_assert_int_eq(r.code, 400);
    resp_free(&r);
    snprintf(url, sizeof url, "%s?api-version=2024-10-21", s.url);
    r = http_do(url, NULL, chat_body, "api-key: az", 0);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_window_quota)
{
    aq_mockllm_config c = cfg_default();
    c.window_requests = 2;
    c.window_ms = 800;
    srv s;
    srv_start(&s, &c);
    char v[64];
    long reset[3];
    for (int i = 0; i < 2; i++) {
        resp r = http_post(&s, chat_body);
        ck_assert_int_eq(r.code, 200);
        ck_assert_ptr_null(header(&r, "x-ratelimit-limit-requests", v, sizeof v));
        ck_assert_int_eq(atoi(header(&r, "x-ratelimit-remaining-requests", v, sizeof v)), 1 - i);
        reset[i] = dur_ms(header(&r, "x-ratelimit-reset-requests", v, sizeof v));
        ck_assert_msg(reset[i] > 0 && reset[i] <= 800, "reset %ld ms", reset[i]);
        resp_free(&r);
    }
    ck_assert_int_le(reset[1], reset[0]);
    resp r = http_post(&s, chat_body);
    expect_error(&r, 429, NULL, "2 per 800 ms");
    ck_assert_str_eq(header(&r, "Retry-After", v, sizeof v), "1");
    ck_assert_ptr_null(header(&r, "x-ratelimit-limit-requests", v, sizeof v));
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "0");
    reset[2] = dur_ms(header(&r, "x-ratelimit-reset-requests", v, sizeof v));
    ck_assert_msg(reset[2] <= reset[1], "reset %ld ms after %ld ms", reset[2], reset[1]);
    json_t *j = body_json(&r);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "rate_limit_exceeded");
    json_decref(j);
    resp_free(&r);
    /* past the window's end the next request opens a new one */
    usleep((useconds_t)(reset[2] + 50) * 1000);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "1");
    ck_assert_int_gt(dur_ms(header(&r, "x-ratelimit-reset-requests", v, sizeof v)), 700);
    resp_free(&r);
    json_t *st = get_stats(&s);
    ck_assert_int_eq(stat_of(st, "rate_limited"), 1);
    ck_assert_int_eq(stat_of(st, "completed"), 3);
    json_decref(st);
    srv_stop(&s, NULL);

    /* with the rpm bucket on as well: both apply, the window's headers
     * replace the bucket's requests headers, the tokens ones stay */
    c = cfg_default();
    c.rpm = 100;
    c.tpm = 100000;
    c.window_requests = 1;
    c.window_ms = 60000;
    srv_start(&s, &c);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    ck_assert_ptr_null(header(&r, "x-ratelimit-limit-requests", v, sizeof v));
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "0");
    ck_assert_int_gt(dur_ms(header(&r, "x-ratelimit-reset-requests", v, sizeof v)), 59000);
    ck_assert_str_eq(header(&r, "x-ratelimit-limit-tokens", v, sizeof v), "100000");
    resp_free(&r);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 429);
    int ra = atoi(header(&r, "Retry-After", v, sizeof v));
    ck_assert_msg(ra >= 59 && ra <= 60, "Retry-After %d with a 60 s window", ra);
    resp_free(&r);
    srv_stop(&s, NULL);
    /* the bucket says no first: the window is not charged for it */
    c.rpm = 1;
    c.window_requests = 5;
    srv_start(&s, &c);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "4");
    resp_free(&r);
    r = http_post(&s, chat_body);
    expect_error(&r, 429, NULL, "RPM");
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "4");
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_control_window)
{
    aq_mockllm_config c = cfg_default();
    srv s;
    srv_start(&s, &c);
    json_t *st = control_state(&s);
    ck_assert(num_of(st, "window_requests") == 0 && num_of(st, "window_ms") == 1000);
    json_decref(st);
    ck_assert_int_eq(control(&s, "{\"window_requests\":1,\"window_ms\":500}", &st), 200);
    ck_assert(num_of(st, "window_requests") == 1 && num_of(st, "window_ms") == 500);
    json_decref(st);
    char v[64];
    resp r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "0");
    ck_assert_int_le(dur_ms(header(&r, "x-ratelimit-reset-requests", v, sizeof v)), 500);
    resp_free(&r);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 429);
    resp_free(&r);
    /* a bad value names the field and changes nothing */
    char url[128], p[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/control", s.port);
    r = http_do(url, NULL, "{\"window_ms\":0}", NULL, 0);
    expect_error(&r, 400, "invalid_request_error",
                 "window_ms: must be an integer from 1 to 3600000");
    ck_assert_str_eq(error_param(&r, p, sizeof p), "window_ms");
    resp_free(&r);
    r = http_do(url, NULL, "{\"window_requests\":3,\"window_ms\":3600001}", NULL, 0);
    expect_error(&r, 400, NULL, "window_ms");
    resp_free(&r);
    st = control_state(&s);
    ck_assert(num_of(st, "window_requests") == 1 && num_of(st, "window_ms") == 500);
    json_decref(st);
    /* naming the window starts a new one under the new terms */
    ck_assert_int_eq(control(&s, "{\"window_requests\":2}", NULL), 200);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "1");
    resp_free(&r);
    /* reset restores the start-up settings: no window, no window headers */
    ck_assert_int_eq(control(&s, "{}", &st), 200);
    ck_assert(num_of(st, "window_requests") == 0 && num_of(st, "window_ms") == 1000);
    json_decref(st);
    for (int i = 0; i < 4; i++) {
        r = http_post(&s, chat_body);
        ck_assert_int_eq(r.code, 200);
        ck_assert_ptr_null(header(&r, "x-ratelimit-remaining-requests", v, sizeof v));
        resp_free(&r);
    }
    srv_stop(&s, NULL);

    /* reset goes back to the start-up window, not to none */
    c.window_requests = 1;
    c.window_ms = 250;
    srv_start(&s, &c);
    ck_assert_int_eq(control(&s, "{\"window_requests\":0}", NULL), 200);
    ck_assert_int_eq(control(&s, "{\"reset\":true}", &st), 200);
    ck_assert(num_of(st, "window_requests") == 1 && num_of(st, "window_ms") == 250);
    json_decref(st);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 200);
    resp_free(&r);
    r = http_post(&s, chat_body);
    ck_assert_int_eq(r.code, 429);
    resp_free(&r);
    srv_stop(&s, NULL);
}
END_TEST

/* GET /requests, parsed (caller decrefs). */
static json_t *get_requests(const srv *s)
{
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/requests", s->port);
    resp r = http_do(url, NULL, NULL, NULL, 0);
    ck_assert_int_eq(r.code, 200);
    char ct[64];
    ck_assert_str_eq(header(&r, "Content-Type", ct, sizeof ct), "application/json");
    json_t *j = body_json(&r);
    resp_free(&r);
    ck_assert(json_is_array(j));
    return j;
}

static long long arrival_at(json_t *log, size_t i)
{
    json_t *at = json_object_get(json_array_get(log, i), "at_ms");
    ck_assert_msg(json_is_integer(at), "entry %zu has no integer at_ms", i);
    return json_integer_value(at);
}

static long long arrival_status(json_t *log, size_t i)
{
    json_t *st = json_object_get(json_array_get(log, i), "status");
    ck_assert_msg(json_is_integer(st), "entry %zu has no integer status", i);
    return json_integer_value(st);
}

START_TEST(test_requests_log)
{
    aq_mockllm_config c = cfg_default();
    c.window_requests = 1;
    c.window_ms = 400;
    srv s;
    srv_start(&s, &c);
    json_t *log = get_requests(&s);
    ck_assert_int_eq(json_array_size(log), 0);
    json_decref(log);
    long long t0 = aq_mono_us() / 1000;
    char v[64];
    resp r = http_post(&s, chat_body); /* 200, remaining 0 */
    ck_assert_int_eq(r.code, 200);
    long reset = dur_ms(header(&r, "x-ratelimit-reset-requests", v, sizeof v));
    resp_free(&r);
    r = http_post(&s, chat_body); /* 429 */
    ck_assert_int_eq(r.code, 429);
    resp_free(&r);
    usleep((useconds_t)(reset + 20) * 1000);
    r = http_post(&s, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\","
                      "\"content\":\"x fail=500\"}]}");
    ck_assert_int_eq(r.code, 500);
    resp_free(&r);
    usleep(420000);
    r = http_post(&s, "not json"); /* 400, refused before the limits */
    ck_assert_int_eq(r.code, 400);
    resp_free(&r);
    r = http_do(s.url, "GET", NULL, NULL, 0); /* 405 */
    ck_assert_int_eq(r.code, 405);
    resp_free(&r);
    /* a delayed reply is listed with the status it will get, at once */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    const char *held = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\","
                       "\"content\":\"x fail=503 sleep=60000\"}]}";
    char req[512];
    int n = snprintf(req, sizeof req,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     "application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(held), held);
    ck_assert_int_eq(write(fd, req, (size_t)n), n);
    for (int i = 0; i < 200; i++) {
        log = get_requests(&s);
        if (json_array_size(log) == 6) break;
        json_decref(log);
        log = NULL;
        usleep(10000);
    }
    ck_assert_msg(log != NULL, "the held request was never listed");
    long long t1 = aq_mono_us() / 1000;
    static const int want[] = {200, 429, 500, 400, 405, 503};
    for (size_t i = 0; i < 6; i++) {
        ck_assert_msg(arrival_status(log, i) == want[i], "entry %zu: status %lld, not %d", i,
                      arrival_status(log, i), want[i]);
        ck_assert_int_ge(arrival_at(log, i), i ? arrival_at(log, i - 1) : t0);
        ck_assert_int_le(arrival_at(log, i), t1);
    }
    /* the 429 came inside the window; the next admitted one after its end */
    ck_assert_int_lt(arrival_at(log, 1), arrival_at(log, 0) + 400);
    ck_assert_int_ge(arrival_at(log, 2), arrival_at(log, 0) + 400);
    json_decref(log);
    json_t *st = get_stats(&s);
    ck_assert_int_eq(stat_of(st, "in_flight"), 1);
    ck_assert_int_eq(stat_of(st, "requests"), 6);
    json_decref(st);
    close(fd);
    srv_stop(&s, NULL);
}
END_TEST

START_TEST(test_binary_azure_style)
{
    char dir[] = "/tmp/mockllm-test-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char portfile[128];
    snprintf(portfile, sizeof portfile, "%s/port", dir);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        FILE *lf = freopen("/dev/null", "w", stderr);
        (void)lf;
        setenv("MOCK_AZ_KEY", "az-bin-key", 1);
        execl(aq_test_bin("agentq-mockllm"), "agentq-mockllm", "--listen", "127.0.0.1:0",
              "--port-file", portfile, "--api-key-env", "MOCK_AZ_KEY", "--auth-header", "api-key",
              "--require-query", "api-version=2024-10-21", "--window-requests", "1",
              "--window-ms", "30000", (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (int i = 0; i < 200 && port == 0; i++) {
        FILE *f = fopen(portfile, "r");
        if (f) {
            if (fscanf(f, "%d", &port) != 1) port = 0;
            fclose(f);
        }
        if (!port) usleep(20000);
    }
    ck_assert_int_gt(port, 0);
    char url[160], v[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/chat/completions", port);
    resp r = http_do(url, NULL, chat_body, "api-key: az-bin-key", 0);
    ck_assert_int_eq(r.code, 400);
    resp_free(&r);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/chat/completions?api-version=2024-10-21",
             port);
    r = http_do(url, NULL, chat_body, "Authorization: Bearer az-bin-key", 0);
    ck_assert_int_eq(r.code, 401);
    resp_free(&r);
    r = http_do(url, NULL, chat_body, "api-key: az-bin-key", 0);
    ck_assert_int_eq(r.code, 200);
    ck_assert_str_eq(header(&r, "x-ratelimit-remaining-requests", v, sizeof v), "0");
    resp_free(&r);
    r = http_do(url, NULL, chat_body, "api-key: az-bin-key", 0);
    ck_assert_int_eq(r.code, 429);
    resp_free(&r);
    ck_assert_int_eq(kill(pid, SIGTERM), 0);
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    unlink(portfile);
    rmdir(dir);
}
END_TEST

static Suite *mockllm_suite(void)
{
    const TTest *core[] = {test_plain_completion, test_steps_two_then_final, test_parallel_three,
                           test_tool_choice_and_named_tool, test_calc_mode_checks_result,
                           test_calc_goal_catches_wrong_result, test_latency_applied,
                           test_stats_and_healthz, test_binary_help_and_version,
                           test_binary_serves_and_stops, test_url_directive,
                           test_control_changes_and_reset_restores, test_requests_log,
                           test_binary_azure_style};
    const TTest *limits[] = {test_rpm_limit_429, test_tpm_limit_429, test_thousand_concurrent,
                             test_hang_until_client_leaves, test_free_with_requests_held,
                             test_control_storm_429_then_recovers, test_window_quota,
                             test_control_window};
    const TTest *errors[] = {test_fail_directives, test_bad_bodies, test_body_too_large,
                             test_api_key, test_api_key_echo, test_auth_header,
                             test_require_query, test_control_bad_bodies,
                             test_injected_failures, test_unknown_path_and_method, test_bad_config};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 60},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 90},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 60},
    };
    return aq_test_suite("mockllm", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    evthread_use_pthreads();
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int rc = aq_test_run(mockllm_suite());
    curl_global_cleanup();
    return rc;
}
