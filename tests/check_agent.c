/* check_agent.c — the agent engine end to end on one event_base: the mock
 * LLM (mockllm.h), the HTTP client, the skills, the rate limiter and the
 * engine all run in this process on one loop, plus a small evhttp server
 * for HTTP skills (a slow one, a big one) and, for one test, a scripted
 * "rogue" model that calls tools it was not offered.
 *
 * What is asserted is what a user reads in agentq.tasks and agentq.steps:
 * the final status and its reason, steps, tokens and cost (and that the
 * step rows add up to them), parallel tool calls, every stop (max_steps,
 * timeout with the transfer aborted, budget, cancel), the provider error
 * classes (429, 5xx, malformed, 400), a task's skill subset, the history
 * cap, and a thousand sessions in flight on one thread. */
#include "agentq/agent.h"
#include "agentq/log.h"
#include "agentq/mockllm.h"

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
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define SLOW_MS 300
#define BIG_BYTES 12000
#define TOOL_SCHEMA \
    "{\"type\":\"object\",\"properties\":{\"q\":{\"type\":\"string\"}},\"required\":[\"q\"]}"
#define PRICE_IN 3.0   /* USD per million prompt tokens */
#define PRICE_OUT 15.0 /* USD per million completion tokens */

/* ---- the tool server (and the rogue model) ----------------------------- */

struct srv {
    struct evhttp *http;
    int port;
    aq_test_held_set slow; /* the /slow requests */
    int rogue_requests;
};

static void reply(struct evhttp_request *r, int code, const char *body, size_t len)
{
    evbuffer_add(evhttp_request_get_output_buffer(r), body, len);
    evhttp_send_reply(r, code, code == 200 ? "OK" : "Error", NULL);
}

/* A model that ignores the offered tools: its first reply calls
 * `calculator` (well formed) and `current_time` with arguments that are
 * not an object; once tool results are in, it answers with all of them
 * joined, so the test reads what the engine told it. */
static void rogue_model(struct srv *s, struct evhttp_request *r)
{
    s->rogue_requests++;
    struct evbuffer *in = evhttp_request_get_input_buffer(r);
    size_t n = evbuffer_get_length(in);
    json_t *req = json_loadb((const char *)evbuffer_pullup(in, -1), n, 0, NULL);
    ck_assert_ptr_nonnull(req);
    json_t *msgs = json_object_get(req, "messages"), *m;
    size_t i;
    char answer[4096] = "";
    bool any = false;
    json_array_foreach(msgs, i, m) {
        if (strcmp(json_string_value(json_object_get(m, "role")), "tool")) continue;
        any = true;
        size_t len = strlen(answer);
        snprintf(answer + len, sizeof answer - len, "[%s] ",
                 json_string_value(json_object_get(m, "content")));
    }
    json_t *msg;
    if (!any) {
        msg = json_pack("{s:s, s:n, s:[{s:s, s:s, s:{s:s, s:s}}, {s:s, s:s, s:{s:s, s:s}}]}",
                        "role", "assistant", "content", "tool_calls", "id", "c1", "type",
                        "function", "function", "name", "calculator", "arguments",
                        "{\"expression\":\"1+1\"}", "id", "c2", "type", "function", "function",
                        "name", "current_time", "arguments", "[1,2]");
    } else {
        msg = json_pack("{s:s, s:s}", "role", "assistant", "content", answer);
    }
    json_t *resp = json_pack("{s:s, s:s, s:s, s:[{s:i, s:o, s:s}], s:{s:i, s:i}}", "id", "x",
                             "object", "chat.completion", "model", "rogue-1", "choices", "index",
                             0, "message", msg, "finish_reason", any ? "stop" : "tool_calls",
                             "usage", "prompt_tokens", 10, "completion_tokens", 5);
    ck_assert_ptr_nonnull(resp);
    char *text = json_dumps(resp, JSON_COMPACT);
    json_decref(resp);
    json_decref(req);
    evhttp_add_header(evhttp_request_get_output_headers(r), "Content-Type", "application/json");
    reply(r, 200, text, strlen(text));
    free(text);
}

/* `in` with every "/" written as "\/", as PHP's json_encode writes it. */
static char *escape_slashes(const char *in)
{
    char *out = malloc(strlen(in) * 2 + 1);
    ck_assert_ptr_nonnull(out);
    size_t o = 0;
    for (const char *p = in; *p; p++) {
        if (*p == '/') out[o++] = '\\';
        out[o++] = *p;
    }
    out[o] = '\0';
    return out;
}

/* A provider that echoes the bearer key it got, as OpenAI's 401 does, at
 * /echo/<mode>/chat/completions:
 *   openai    401 {"error":{"message":"Incorrect API key provided: KEY. ..."}}
 *   slashes   the same with every "/" escaped as "\/"
 *   raw       401 {"detail":"... KEY"} with "\/": no message field, so the
 *             engine keeps a snippet of the raw body
 *   server    500 with the openai body (retried)
 *   ok-error  200 whose body is the openai error object (retried) */
static void echo_key(struct evhttp_request *r, const char *mode)
{
    const char *auth = evhttp_find_header(evhttp_request_get_input_headers(r), "Authorization");
    const char *key = auth && !strncmp(auth, "Bearer ", 7) ? auth + 7 : "(none)";
    char msg[512];
    snprintf(msg, sizeof msg,
             "Incorrect API key provided: %s. You can find your API key at "
             "https://platform.openai.com/account/api-keys.",
             key);
    json_t *e = json_pack("{s:{s:s, s:s, s:n, s:s}}", "error", "message", msg, "type",
                          "invalid_request_error", "param", "code", "invalid_api_key");
    ck_assert_ptr_nonnull(e);
    char *body = json_dumps(e, JSON_COMPACT);
    json_decref(e);
    int code = 401;
    if (!strncmp(mode, "slashes/", 8)) {
        char *esc = escape_slashes(body);
        free(body);
        body = esc;
    } else if (!strncmp(mode, "raw/", 4)) {
        char *k = escape_slashes(key);
        free(body);
        size_t n = strlen(k) + 128;
        body = malloc(n);
        ck_assert_ptr_nonnull(body);
        snprintf(body, n, "{\"detail\":\"Incorrect API key provided: %s\"}", k);
        free(k);
    } else if (!strncmp(mode, "server/", 7)) {
        code = 500;
    } else if (!strncmp(mode, "ok-error/", 9)) {
        code = 200;
    }
    evhttp_add_header(evhttp_request_get_output_headers(r), "Content-Type", "application/json");
    reply(r, code, body, strlen(body));
    free(body);
}

static void srv_handle(struct evhttp_request *r, void *arg)
{
    struct srv *s = arg;
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(r));
    if (!strncmp(path, "/echo/", 6)) {
        echo_key(r, path + 6);
    } else if (!strcmp(path, "/slow")) {
        aq_test_hold(&s->slow, r, SLOW_MS, 200, "slow done");
    } else if (!strcmp(path, "/big")) {
        char *b = malloc(BIG_BYTES);
        ck_assert_ptr_nonnull(b);
        for (size_t i = 0; i < BIG_BYTES; i++) b[i] = (char)('a' + i % 26);
        reply(r, 200, b, BIG_BYTES);
        free(b);
    } else if (!strcmp(path, "/v1/chat/completions")) {
        rogue_model(s, r);
    } else {
        reply(r, 404, "no", 2);
    }
}

static struct srv *srv_start(struct event_base *base)
{
    struct srv *s = calloc(1, sizeof *s);
    ck_assert_ptr_nonnull(s);
    aq_test_held_init(&s->slow, base);
    s->http = aq_test_httpd(base, srv_handle, s, &s->port);
    return s;
}

static void srv_stop(struct srv *s)
{
    aq_test_held_flush(&s->slow, 200, "slow done");
    evhttp_free(s->http);
    free(s);
}

/* ---- the fixture --------------------------------------------------------- */

/* A step row as the engine reported it (strings copied). */
typedef struct row {
    char task_id[AQ_TASK_ID_LEN + 1];
    int attempt, step, seq;
    char kind[8], name[64], status[16];
    int64_t started_us;
    double duration_ms;
    int64_t prompt_tokens, completion_tokens;
    double cost;
    char *detail;
    char *message;     /* what the call added to the conversation, or NULL */
    size_t message_len;
} row;

struct fx;

/* One session and what its callback reported. */
typedef struct run {
    struct fx *f;
    aq_task *task;
    aq_session *s;
    int calls;             /* done callbacks: must end at 1 */
    bool in_cancel;        /* set around aq_session_cancel */
    bool cb_in_cancel;     /* the callback ran inside aq_session_cancel */
    char status[32];
    bool retryable;
    int steps;
    int64_t prompt_tokens, completion_tokens;
    double cost;
    char *result, *error;
    int64_t start_mono, end_mono;
} run;

typedef struct fx {
    struct event_base *base;
    aq_mockllm *mock;
    struct srv *srv;
    aq_config cfg;
    aq_http *http;
    aq_skills *skills;
    aq_router *router;
    aq_engine *engine;
    row *rows;
    size_t nrows, caprows;
    int want, ndone;
    bool expired;
    /* cancel-after-first-step */
    run *cancel_target;
    struct event *cancel_ev;
} fx;

static void set(aq_config *cfg, const char *key, const char *value)
{
    char err[256] = "";
    ck_assert_msg(aq_config_set(cfg, key, value, err, sizeof err) == AQ_OK, "%s: %s", key, err);
}

static void add_http_skill(fx *f, const char *name, const char *path)
{
    aq_config *cfg = &f->cfg;
    cfg->http_skills =
        realloc(cfg->http_skills, (size_t)(cfg->n_http_skills + 1) * sizeof *cfg->http_skills);
    ck_assert_ptr_nonnull(cfg->http_skills);
    aq_http_skill *sk = &cfg->http_skills[cfg->n_http_skills++];
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", f->srv->port, path);
    sk->name = strdup(name);
    sk->description = strdup("A test tool");
    sk->parameters = strdup(TOOL_SCHEMA);
    sk->url = strdup(url);
    sk->timeout_ms = 5000;
}

static void on_step(const aq_step_event *r, void *arg)
{
    fx *f = arg;
    if (f->nrows == f->caprows) {
        f->caprows = f->caprows ? f->caprows * 2 : 64;
        f->rows = realloc(f->rows, f->caprows * sizeof *f->rows);
        ck_assert_ptr_nonnull(f->rows);
    }
    row *w = &f->rows[f->nrows++];
    memset(w, 0, sizeof *w);
    snprintf(w->task_id, sizeof w->task_id, "%s", r->task_id);
    w->attempt = r->attempt;
    w->step = r->step;
    w->seq = r->seq;
    snprintf(w->kind, sizeof w->kind, "%s", r->kind);
    snprintf(w->name, sizeof w->name, "%s", r->name ? r->name : "");
    snprintf(w->status, sizeof w->status, "%s", r->status ? r->status : "");
    w->started_us = r->started_at_us;
    w->duration_ms = r->duration_ms;
    w->prompt_tokens = r->prompt_tokens;
    w->completion_tokens = r->completion_tokens;
    w->cost = r->cost_usd;
    w->detail = r->detail ? strdup(r->detail) : NULL;
    if (r->message) {
        w->message = strndup(r->message, r->message_len);
        w->message_len = r->message_len;
        json_t *m = json_loadb(r->message, r->message_len, 0, NULL);
        ck_assert_msg(m != NULL, "step message is not JSON: %.*s", (int)r->message_len, r->message);
        json_decref(m);
    }
    /* The store writes detail as jsonb: it must be JSON. */
    if (r->detail) {
        json_t *j = json_loads(r->detail, 0, NULL);
        ck_assert_msg(j != NULL, "step detail is not JSON: %s", r->detail);
        json_decref(j);
    }
    if (f->cancel_target && !strcmp(r->kind, "llm") && !strcmp(w->status, "ok") &&
        !strcmp(r->task_id, f->cancel_target->task->task_id))
        event_active(f->cancel_ev, EV_TIMEOUT, 0); /* cancel from the loop, as the worker does */
}

/* The base, the tool server, the mock (NULL mcfg: none) and a config
 * pointing at it; tests adjust f->cfg, then call fx_start. */
static void fx_init(fx *f, const aq_mockllm_config *mcfg)
{
    memset(f, 0, sizeof *f);
    f->base = event_base_new();
    ck_assert_ptr_nonnull(f->base);
    f->srv = srv_start(f->base);
    char err[256] = "", url[128];
    aq_config_init(&f->cfg);
    if (mcfg) {
        f->mock = aq_mockllm_new(f->base, mcfg, err, sizeof err);
        ck_assert_msg(f->mock != NULL, "aq_mockllm_new: %s", err);
        snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", aq_mockllm_port(f->mock));
    } else {
        snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/", f->srv->port);
    }
    set(&f->cfg, "llm.base_url", url);
    set(&f->cfg, "llm.retry_backoff_ms", "5");
    set(&f->cfg, "llm.timeout_ms", "10000");
    set(&f->cfg, "llm.price_input_per_mtok", "3.0");
    set(&f->cfg, "llm.price_output_per_mtok", "15.0");
    set(&f->cfg, "agent.system_prompt", "Be brief.");
    add_http_skill(f, "slow", "/slow");
    add_http_skill(f, "big", "/big");
}

static void fx_start(fx *f)
{
    char err[256] = "";
    aq_http_config hc = {.max_connections = f->cfg.llm_max_connections,
                         .connect_timeout_ms = f->cfg.llm_connect_timeout_ms,
                         .timeout_ms = f->cfg.llm_timeout_ms,
                         .user_agent = "check_agent"};
    f->http = aq_http_new(f->base, &hc, err, sizeof err);
    ck_assert_msg(f->http != NULL, "aq_http_new: %s", err);
    f->skills = aq_skills_new(&f->cfg, f->base, f->http, err, sizeof err);
    ck_assert_msg(f->skills != NULL, "aq_skills_new: %s", err);
    aq_router_deps rd = {&f->cfg, f->base, f->http, NULL, false};
    f->router = aq_router_new(&rd, err, sizeof err);
    ck_assert_msg(f->router != NULL, "aq_router_new: %s", err);
    aq_engine_deps deps = {&f->cfg, f->base, f->http, f->skills, f->router, on_step, f, NULL};
    f->engine = aq_engine_new(&deps, err, sizeof err);
    ck_assert_msg(f->engine != NULL, "aq_engine_new: %s", err);
}

static void run_free(run *r)
{
    aq_task_free(r->task);
    free(r->result);
    free(r->error);
}

static void fx_stop(fx *f)
{
    ck_assert_uint_eq(aq_engine_sessions(f->engine), 0);
    aq_engine_free(f->engine);
    aq_router_free(f->router);
    aq_skills_free(f->skills);
    aq_http_free(f->http);
    aq_mockllm_free(f->mock);
    srv_stop(f->srv);
    if (f->cancel_ev) event_free(f->cancel_ev);
    for (size_t i = 0; i < f->nrows; i++) {
        free(f->rows[i].detail);
        free(f->rows[i].message);
    }
    free(f->rows);
    aq_config_free(&f->cfg);
    event_base_free(f->base);
}

/* A task from a JSON body; model and skills checked against the fixture. */
static aq_task *make_task(fx *f, const char *body)
{
    aq_task_limits lim = {.skills = aq_skills_names(f->skills),
                          .models = NULL,
                          .default_model = f->cfg.llm_model};
    aq_task *t = NULL;
    aq_task_error e;
    memset(&e, 0, sizeof e);
    int rc = aq_task_parse(body, strlen(body), NULL, &lim, &t, &e);
    ck_assert_msg(rc == AQ_OK, "task %s: %s", body, e.message);
    return t;
}

static void on_done(aq_session *s, const aq_session_result *res, void *arg)
{
    run *r = arg;
    ck_assert_ptr_eq(s, r->s);
    r->calls++;
    r->cb_in_cancel = r->cb_in_cancel || r->in_cancel;
    r->end_mono = aq_mono_us();
    snprintf(r->status, sizeof r->status, "%s", aq_status_name(res->status));
    r->retryable = res->retryable;
    r->steps = res->totals.steps;
    r->prompt_tokens = res->totals.prompt_tokens;
    r->completion_tokens = res->totals.completion_tokens;
    r->cost = res->totals.cost_usd;
    r->result = res->result ? strdup(res->result) : NULL;
    r->error = res->error ? strdup(res->error) : NULL;
    fx *f = r->f;
    if (++f->ndone == f->want) event_base_loopbreak(f->base);
}

/* Starts attempt `attempt` of `body`, resuming from `past`. */
static void start_resumed(fx *f, run *r, const char *body, int attempt, const aq_session_past *past)
{
    memset(r, 0, sizeof *r);
    r->f = f;
    r->task = make_task(f, body);
    r->start_mono = aq_mono_us();
    int64_t deadline_us = aq_now_us() + (int64_t)(r->task->timeout_seconds * 1e6);
    r->s = aq_session_start(f->engine, r->task, attempt, deadline_us, past, on_done, r);
    ck_assert_ptr_nonnull(r->s);
    f->want++;
}

/* Starts a session of `body` with the task's own timeout. */
/* Starts attempt `attempt` of the task `body` with an absolute deadline
 * (epoch µs; 0: now + the task's timeout). */
static void start_at(fx *f, run *r, const char *body, int attempt, int64_t deadline_us)
{
    memset(r, 0, sizeof *r);
    r->f = f;
    r->task = make_task(f, body);
    r->start_mono = aq_mono_us();
    if (!deadline_us) deadline_us = aq_now_us() + (int64_t)(r->task->timeout_seconds * 1e6);
    r->s = aq_session_start(f->engine, r->task, attempt, deadline_us, NULL, on_done, r);
    ck_assert_ptr_nonnull(r->s);
    ck_assert_int_eq(r->calls, 0); /* never from inside start */
    f->want++;
}

static void start(fx *f, run *r, const char *body) { start_at(f, r, body, 1, 0); }

static void on_expire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    fx *f = arg;
    f->expired = true;
    event_base_loopbreak(f->base);
}

/* Runs the loop until every started session has called back; fails the
 * test after `ms`. */
static void run_all(fx *f, int ms)
{
    struct event *t = evtimer_new(f->base, on_expire, f);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(t, &tv);
    while (f->ndone < f->want && !f->expired) event_base_loop(f->base, EVLOOP_ONCE);
    event_free(t);
    ck_assert_msg(!f->expired, "only %d of %d sessions called back within %d ms", f->ndone,
                  f->want, ms);
}

/* Runs the loop for `ms`. */
static void spin(fx *f, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
}

/* Spins until the mock holds no request (up to `ms`); returns in_flight. */
static uint64_t mock_drained(fx *f, int ms)
{
    aq_mockllm_stats st;
    for (int waited = 0;; waited += 20) {
        aq_mockllm_get_stats(f->mock, &st);
        if (st.in_flight == 0 || waited >= ms) return st.in_flight;
        spin(f, 20);
    }
}

static size_t count_rows(const fx *f, const char *task_id, const char *kind, const char *status)
{
    size_t n = 0;
    for (size_t i = 0; i < f->nrows; i++) {
        const row *w = &f->rows[i];
        if (task_id && strcmp(w->task_id, task_id)) continue;
        if (kind && strcmp(w->kind, kind)) continue;
        if (status && strcmp(w->status, status)) continue;
        n++;
    }
    return n;
}

static void assert_close(double got, double want, const char *what)
{
    ck_assert_msg(fabs(got - want) <= 1e-9 + 1e-9 * fabs(want), "%s: got %.12g, want %.12g", what,
                  got, want);
}

/* The outcome's tokens and cost equal the sum of its step rows, and the
 * cost is tokens x the configured prices. */
static void assert_accounting(const fx *f, const run *r)
{
    int64_t pt = 0, ct = 0;
    double cost = 0;
    for (size_t i = 0; i < f->nrows; i++) {
        const row *w = &f->rows[i];
        if (strcmp(w->task_id, r->task->task_id)) continue;
        pt += w->prompt_tokens;
        ct += w->completion_tokens;
        cost += w->cost;
        if (!strcmp(w->kind, "llm"))
            assert_close(w->cost,
                         ((double)w->prompt_tokens * PRICE_IN +
                          (double)w->completion_tokens * PRICE_OUT) / 1e6,
                         "row cost");
    }
    ck_assert_int_eq(r->prompt_tokens, pt);
    ck_assert_int_eq(r->completion_tokens, ct);
    assert_close(r->cost, cost, "cost = sum of rows");
    assert_close(r->cost, ((double)pt * PRICE_IN + (double)ct * PRICE_OUT) / 1e6,
                 "cost = tokens x prices");
}

static aq_mockllm_config mock_defaults(void)
{
    aq_mockllm_config mc;
    aq_mockllm_config_defaults(&mc);
    mc.seed = 42;
    return mc;
}

/* The fixture on the default mock, started: how most tests begin. */
static void fx_start_default(fx *f)
{
    aq_mockllm_config mc = mock_defaults();
    fx_init(f, &mc);
    fx_start(f);
}

/* What the mock has counted so far. */
static aq_mockllm_stats mock_stats(const fx *f)
{
    aq_mockllm_stats st;
    aq_mockllm_get_stats(f->mock, &st);
    return st;
}

/* The fixture's step rows are the `n` tries of step 1 (seq 1 .. n), every
 * one of them an LLM call that failed. */
static void assert_failed_tries(const fx *f, size_t n)
{
    ck_assert_uint_eq(f->nrows, n);
    for (size_t i = 0; i < f->nrows; i++) {
        ck_assert_str_eq(f->rows[i].kind, "llm");
        ck_assert_str_eq(f->rows[i].status, "error");
        ck_assert_int_eq(f->rows[i].step, 1);
        ck_assert_int_eq(f->rows[i].seq, (int)i + 1);
    }
}

/* The session ended with `status`, `retryable` as given, after `steps`. */
static void assert_outcome(const run *r, const char *status, bool retryable, int steps)
{
    ck_assert_str_eq(r->status, status);
    ck_assert_msg(r->retryable == retryable, "%s: retryable is %d, want %d", r->status,
                  r->retryable, retryable);
    ck_assert_int_eq(r->steps, steps);
}

/* ---- core ---------------------------------------------------------------- */

START_TEST(test_completed)
{
    fx f;
    fx_start_default(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"steps=3\"}");
    ck_assert_uint_eq(aq_engine_sessions(f.engine), 1);
    run_all(&f, 10000);

    ck_assert_int_eq(r.calls, 1);
    ck_assert_str_eq(r.status, "completed");
    ck_assert(!r.retryable);
    ck_assert_ptr_null(r.error);
    ck_assert_int_eq(r.steps, 4);
    ck_assert_ptr_nonnull(r.result);
    ck_assert_msg(!strncmp(r.result, "done: 3 tool result(s)", 22), "result: %s", r.result);
    /* the last calculator result ("4+5*4") made it into the answer */
    ck_assert_msg(strstr(r.result, "last: 24"), "result: %s", r.result);

    /* 4 llm rows numbered 1..4 (seq 0), 3 calculator rows of steps 1..3 (seq 1) */
    ck_assert_uint_eq(count_rows(&f, r.task->task_id, "llm", "ok"), 4);
    ck_assert_uint_eq(count_rows(&f, r.task->task_id, "tool", "ok"), 3);
    ck_assert_uint_eq(f.nrows, 7);
    int llm_step = 0;
    for (size_t i = 0; i < f.nrows; i++) {
        row *w = &f.rows[i];
        ck_assert_int_eq(w->attempt, 1);
        ck_assert(w->started_us > 0 && w->duration_ms >= 0);
        if (!strcmp(w->kind, "llm")) {
            ck_assert_int_eq(w->step, ++llm_step);
            ck_assert_int_eq(w->seq, 0);
            ck_assert_str_eq(w->name, "mock-1");
            ck_assert(w->prompt_tokens > 0 && w->completion_tokens > 0);
        } else {
            ck_assert_int_eq(w->step, llm_step); /* the step whose reply asked for it */
            ck_assert_int_eq(w->seq, 1);
            ck_assert_str_eq(w->name, "calculator");
            ck_assert_int_eq(w->prompt_tokens, 0);
            assert_close(w->cost, 0, "tool cost");
            ck_assert_ptr_nonnull(strstr(w->detail, "\"output\""));
        }
    }
    assert_accounting(&f, &r);
    /* what the provider counted is what the task is charged */
    aq_mockllm_stats st = mock_stats(&f);
    ck_assert_uint_eq(st.requests, 4);
    ck_assert_uint_eq(st.prompt_tokens, (uint64_t)r.prompt_tokens);
    ck_assert_uint_eq(st.completion_tokens, (uint64_t)r.completion_tokens);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

START_TEST(test_parallel_tools)
{
    fx f;
    fx_start_default(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"steps=1 parallel=3 tool=slow\"}");
    run_all(&f, 10000);

    ck_assert_str_eq(r.status, "completed");
    ck_assert_int_eq(r.steps, 2);
    ck_assert_int_eq(f.srv->slow.total, 3);
    ck_assert_int_eq(f.srv->slow.peak, 3); /* all three were held at once */
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "ok"), 3);
    int64_t last_start = 0, first_end = INT64_MAX, first_start = INT64_MAX, last_end = 0;
    bool seqs[4] = {false};
    for (size_t i = 0; i < f.nrows; i++) {
        row *w = &f.rows[i];
        if (strcmp(w->kind, "tool")) continue;
        ck_assert_int_eq(w->step, 1);
        ck_assert_str_eq(w->name, "slow");
        ck_assert(w->seq >= 1 && w->seq <= 3 && !seqs[w->seq]);
        seqs[w->seq] = true;
        ck_assert(w->duration_ms >= SLOW_MS * 0.9);
        int64_t end = w->started_us + (int64_t)(w->duration_ms * 1000);
        if (w->started_us > last_start) last_start = w->started_us;
        if (w->started_us < first_start) first_start = w->started_us;
        if (end < first_end) first_end = end;
        if (end > last_end) last_end = end;
    }
    ck_assert_msg(last_start < first_end, "a tool call started after another had finished");
    /* concurrently: about 300 ms in all, not 900 */
    ck_assert_msg(last_end - first_start < 750000, "tool phase took %lld us",
                  (long long)(last_end - first_start));
    ck_assert_ptr_nonnull(strstr(r.result, "slow done"));
    run_free(&r);
    fx_stop(&f);
}
END_TEST

START_TEST(test_calculator_verified)
{
    fx f;
    fx_start_default(&f);
    run r[3];
    for (int i = 0; i < 3; i++) start(&f, &r[i], "{\"user_id\":\"u1\",\"goal\":\"calc\"}");
    run_all(&f, 10000);
    for (int i = 0; i < 3; i++) {
        ck_assert_str_eq(r[i].status, "completed");
        ck_assert_int_eq(r[i].steps, 2);
        ck_assert_msg(!strncmp(r[i].result, "correct:", 8), "mock's verdict: %s", r[i].result);
        run_free(&r[i]);
    }
    fx_stop(&f);
}
END_TEST

static void do_cancel(run *r, const char *status)
{
    if (r->calls) return; /* already over: the handle is gone */
    r->in_cancel = true;
    aq_session_cancel(r->s, aq_status_parse(status));
    r->in_cancel = false;
    ck_assert_int_eq(r->calls, 0); /* never from inside cancel */
}

static void on_cancel_ev(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    fx *f = arg;
    do_cancel(f->cancel_target, NULL);
}

START_TEST(test_cancelled)
{
    fx f;
    fx_start_default(&f);
    f.cancel_ev = event_new(f.base, -1, 0, on_cancel_ev, &f);

    /* after the first step, from the loop (as the worker's NOTIFY does),
     * while the slow tool call runs: that call is abandoned */
    run a, b, c;
    start(&f, &a, "{\"user_id\":\"u1\",\"goal\":\"loop tool=slow\"}");
    f.cancel_target = &a;
    /* before it ever ran, twice, with the worker's drain status */
    start(&f, &b, "{\"user_id\":\"u2\",\"goal\":\"loop\"}");
    do_cancel(&b, "queued");
    do_cancel(&b, NULL);
    run_all(&f, 10000);
    f.cancel_target = NULL;

    ck_assert_int_eq(a.calls, 1);
    ck_assert(!a.cb_in_cancel);
    assert_outcome(&a, "cancelled", false, 1);
    ck_assert_ptr_null(a.result);
    ck_assert_msg((a.end_mono - a.start_mono) < 1000000, "cancel took %lld us",
                  (long long)(a.end_mono - a.start_mono));
    ck_assert_int_le(f.srv->slow.total, 1);
    ck_assert_uint_eq(count_rows(&f, a.task->task_id, "tool", "ok"), 0);
    assert_accounting(&f, &a);

    ck_assert_int_eq(b.calls, 1);
    ck_assert(!b.cb_in_cancel);
    ck_assert_str_eq(b.status, "queued"); /* the first status given wins */
    ck_assert_int_eq(b.steps, 0);
    ck_assert_uint_eq(count_rows(&f, b.task->task_id, NULL, NULL), 0);

    /* while the LLM call is in flight: the transfer is aborted */
    start(&f, &c, "{\"user_id\":\"u3\",\"goal\":\"sleep=3000\"}");
    spin(&f, 150);
    aq_mockllm_stats st = mock_stats(&f);
    ck_assert_uint_eq(st.in_flight, 1);
    int64_t t0 = aq_mono_us();
    do_cancel(&c, NULL);
    run_all(&f, 2000);
    ck_assert_str_eq(c.status, "cancelled");
    ck_assert_int_eq(c.steps, 0);
    ck_assert_msg(c.end_mono - t0 < 500000, "cancel took %lld us", (long long)(c.end_mono - t0));
    ck_assert_uint_eq(mock_drained(&f, 2000), 0);
    st = mock_stats(&f);
    ck_assert_uint_ge(st.cancelled, 1);
    aq_http_stats hs;
    aq_http_stats_get(f.http, &hs);
    ck_assert_uint_eq(hs.inflight, 0);

    run_free(&a);
    run_free(&b);
    run_free(&c);
    fx_stop(&f);
}
END_TEST

START_TEST(test_max_steps)
{
    fx f;
    fx_start_default(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"loop\",\"max_steps\":3}");
    run_all(&f, 10000);
    assert_outcome(&r, "max_steps", false, 3);
    ck_assert_ptr_null(r.result);
    ck_assert_ptr_nonnull(strstr(r.error, "max_steps"));
    ck_assert_uint_eq(mock_stats(&f).requests, 3);
    /* the third reply's tool calls still ran and were recorded */
    ck_assert_uint_eq(count_rows(&f, NULL, "llm", "ok"), 3);
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "ok"), 3);
    assert_accounting(&f, &r);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

/* ---- limits ---------------------------------------------------------------- */

START_TEST(test_timeout)
{
    fx f;
    fx_start_default(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"sleep=3000\",\"timeout_seconds\":0.5}");
    run_all(&f, 5000);
    int64_t took = r.end_mono - r.start_mono;
    assert_outcome(&r, "timeout", false, 0);
    ck_assert_ptr_nonnull(strstr(r.error, "timeout_seconds"));
    ck_assert_msg(took >= 450000 && took < 1500000, "timed out after %lld us", (long long)took);
    /* the transfer was aborted: the mock saw its client leave */
    ck_assert_uint_eq(mock_drained(&f, 2000), 0);
    aq_mockllm_stats st = mock_stats(&f);
    ck_assert_uint_eq(st.cancelled, 1);
    ck_assert_uint_eq(st.completed, 0);
    /* the aborted call is on record, as a try of step 1 */
    ck_assert_uint_eq(f.nrows, 1);
    ck_assert_str_eq(f.rows[0].status, "aborted");
    ck_assert_int_eq(f.rows[0].step, 1);
    ck_assert_int_eq(f.rows[0].seq, 1);
    ck_assert(f.rows[0].duration_ms >= 400);
    aq_http_stats hs;
    aq_http_stats_get(f.http, &hs);
    ck_assert_uint_eq(hs.inflight, 0);
    run_free(&r);

    /* during a tool call: the slow call is abandoned at the deadline */
    run t;
    start(&f, &t, "{\"user_id\":\"u1\",\"goal\":\"loop tool=slow\",\"timeout_seconds\":0.15}");
    run_all(&f, 5000);
    took = t.end_mono - t.start_mono;
    ck_assert_str_eq(t.status, "timeout");
    ck_assert_int_eq(t.steps, 1);
    ck_assert_uint_eq(count_rows(&f, t.task->task_id, "tool", NULL), 0); /* never finished */
    ck_assert_msg(took < 1000000, "timed out after %lld us", (long long)took);
    run_free(&t);
    fx_stop(&f);
}
END_TEST

START_TEST(test_deadline_passed)
{
    fx f;
    fx_start_default(&f);
    /* a redelivered task whose absolute deadline has gone by */
    run r;
    start_at(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"steps=1\"}", 2, aq_now_us() - 1000000);
    run_all(&f, 2000);
    ck_assert_str_eq(r.status, "timeout");
    ck_assert_int_eq(r.steps, 0);
    spin(&f, 50);
    ck_assert_msg(mock_stats(&f).requests == 0 && f.nrows == 0, "sent %llu requests, %zu step rows: want none",
                  (unsigned long long)mock_stats(&f).requests, f.nrows);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

START_TEST(test_budget)
{
    fx f;
    fx_start_default(&f);
    /* 100000 completion tokens at $15/M = $1.50 a call */
    run a, b;
    start(&f, &a, "{\"user_id\":\"u1\",\"goal\":\"loop tokens=100000\",\"budget_usd\":0.01}");
    /* the budget allows two calls, the third would start past it */
    start(&f, &b, "{\"user_id\":\"u2\",\"goal\":\"loop tokens=100000\",\"budget_usd\":3.2}");
    run_all(&f, 10000);

    assert_outcome(&a, "budget_exceeded", false, 1);
    ck_assert(a.cost > 1.5 && a.cost < 1.6);
    ck_assert_ptr_nonnull(strstr(a.error, "budget_usd"));
    assert_accounting(&f, &a);
    ck_assert_uint_eq(count_rows(&f, a.task->task_id, "llm", NULL), 1);

    ck_assert_str_eq(b.status, "budget_exceeded");
    ck_assert_int_eq(b.steps, 3);
    ck_assert(b.cost > 3.2);
    assert_accounting(&f, &b);

    ck_assert_uint_eq(mock_stats(&f).requests, 4);
    run_free(&a);
    run_free(&b);
    fx_stop(&f);
}
END_TEST

START_TEST(test_too_many_tool_calls)
{
    fx f;
    aq_mockllm_config mc = mock_defaults();
    fx_init(&f, &mc);
    set(&f.cfg, "agent.max_tool_calls", "2");
    fx_start(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"steps=1 parallel=4\"}");
    run_all(&f, 10000);
    ck_assert_str_eq(r.status, "completed");
    ck_assert_int_eq(r.steps, 2);
    /* two ran, two were refused as tool errors the model read */
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "ok"), 2);
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "error"), 2);
    ck_assert_msg(strstr(r.result, "too many tool calls"), "result: %s", r.result);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

START_TEST(test_history_cap)
{
    enum { CAP = 2048, STEPS = 20 };
    fx f;
    aq_mockllm_config mc = mock_defaults();
    fx_init(&f, &mc);
    set(&f.cfg, "agent.max_context_bytes", "2048");
    fx_start(&f);
    /* Every turn brings a 12 KB tool output; with the cap, the prompt the
     * provider sees stays flat instead of growing by 12 KB a step. (The
     * mock counts turns in the history it is sent, so under a cap this
     * small a "steps=N" goal would never end: loop into max_steps.) */
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"loop tool=big\",\"max_steps\":20}");
    run_all(&f, 20000);
    ck_assert_str_eq(r.status, "max_steps");
    ck_assert_int_eq(r.steps, STEPS);
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "ok"), STEPS);
    int64_t most = 0;
    for (size_t i = 0; i < f.nrows; i++) {
        row *w = &f.rows[i];
        if (strcmp(w->kind, "llm")) continue;
        /* the mock counts a token per 4 bytes of the messages it got */
        if (w->prompt_tokens > most) most = w->prompt_tokens;
    }
    ck_assert_msg(most * 4 <= CAP + 512, "a request carried %lld bytes of messages (cap %d)",
                  (long long)most * 4, CAP);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

START_TEST(test_thousand_sessions)
{
    enum { N = 1000 };
    raise_nofile();
    struct rlimit rl;
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
    ck_assert_msg(rl.rlim_cur >= 2 * N + 200, "RLIMIT_NOFILE %llu is too low for this test",
                  (unsigned long long)rl.rlim_cur);
    fx f;
    aq_mockllm_config mc = mock_defaults();
    mc.latency_ms = 200;
    fx_init(&f, &mc);
    set(&f.cfg, "llm.max_connections", "1100");
    fx_start(&f);
    run *r = calloc(N, sizeof *r);
    ck_assert_ptr_nonnull(r);
    int64_t t0 = aq_mono_us();
    for (int i = 0; i < N; i++) {
        char body[128];
        snprintf(body, sizeof body, "{\"user_id\":\"user%d\",\"goal\":\"steps=1\"}", i % 37);
        start(&f, &r[i], body);
    }
    ck_assert_uint_eq(aq_engine_sessions(f.engine), N);
    run_all(&f, 20000);
    int64_t took = aq_mono_us() - t0;
    for (int i = 0; i < N; i++) {
        ck_assert_msg(!strcmp(r[i].status, "completed"), "session %d: %s (%s)", i, r[i].status,
                      r[i].error ? r[i].error : "");
        ck_assert_int_eq(r[i].calls, 1);
        ck_assert_int_eq(r[i].steps, 2);
        ck_assert_msg(!strncmp(r[i].result, "done: 1 tool result(s)", 22), "%s", r[i].result);
        run_free(&r[i]);
    }
    free(r);
    aq_mockllm_stats st = mock_stats(&f);
    ck_assert_uint_eq(st.completed, 2 * N);
    ck_assert_msg(st.peak_in_flight >= 900, "peak in flight at the mock: %llu",
                  (unsigned long long)st.peak_in_flight);
    /* serially: 2000 x 200 ms = 400 s */
    ck_assert_msg(took < 10000000, "1000 sessions took %lld ms", (long long)took / 1000);
    ck_assert_uint_eq(f.nrows, 3 * N);
    fx_stop(&f);
}
END_TEST

/* ---- errors ---------------------------------------------------------------- */

START_TEST(test_rate_limited)
{
    enum { N = 25 };
    fx f;
    aq_mockllm_config mc = mock_defaults();
    /* 30 requests a second, counted in fixed windows and saying no limit
     * (had it said one, the limiter would pace to it and see no 429):
     * 25 sessions' second calls overrun the first window */
    mc.window_requests = 30;
    mc.window_ms = 1000;
    fx_init(&f, &mc);
    fx_start(&f);
    run r[N];
    for (int i = 0; i < N; i++) {
        char body[128];
        snprintf(body, sizeof body, "{\"user_id\":\"u%d\",\"goal\":\"steps=4\"}", i % 5);
        start(&f, &r[i], body);
    }
    run_all(&f, 15000);
    aq_mockllm_stats st = mock_stats(&f);
    ck_assert_uint_gt(st.rate_limited, 0);
    ck_assert_uint_eq(st.completed, 5 * N);
    ck_assert_uint_eq(st.requests, st.completed + st.rate_limited);
    ck_assert_uint_eq(count_rows(&f, NULL, "llm", "rate_limited"), st.rate_limited);
    for (int i = 0; i < N; i++) {
        ck_assert_msg(!strcmp(r[i].status, "completed"), "session %d: %s (%s)", i, r[i].status,
                      r[i].error ? r[i].error : "");
        ck_assert_int_eq(r[i].steps, 5); /* 429s use no step */
        ck_assert_uint_eq(count_rows(&f, r[i].task->task_id, "llm", "ok"), 5);
        assert_accounting(&f, &r[i]);
        run_free(&r[i]);
    }
    fx_stop(&f);
}
END_TEST


/* Provider faults a session rides out: each failed call is retried with
 * backoff, recorded as a step row of its own (none lost to a key clash),
 * and every session still completes with its steps. */
static const struct fault_case {
    const char *name;
    double fail_rate, malformed_rate, hang_rate;
    const char *timeout_ms; /* llm.timeout_ms; NULL: the default */
    int tool_steps;         /* steps=N in the goal: N tool turns + the answer */
    int sessions;
} fault_cases[] = {
    {"5xx", 0.3, 0, 0, NULL, 2, 10},
    {"malformed", 0, 0.3, 0, NULL, 1, 10},
    {"hung", 0, 0, 0.3, "300", 1, 6},
};

START_TEST(test_faults_retried)
{
    const struct fault_case *fc = &fault_cases[_i];
    enum { MAX = 10 };
    fx f;
    aq_mockllm_config mc = mock_defaults();
    mc.fail_rate = fc->fail_rate;
    mc.malformed_rate = fc->malformed_rate;
    mc.hang_rate = fc->hang_rate;
    fx_init(&f, &mc);
    if (fc->timeout_ms) set(&f.cfg, "llm.timeout_ms", fc->timeout_ms);
    set(&f.cfg, "llm.max_retries", "6");
    fx_start(&f);
    run r[MAX];
    char goal[64];
    snprintf(goal, sizeof goal, "{\"user_id\":\"u1\",\"goal\":\"steps=%d\"}", fc->tool_steps);
    for (int i = 0; i < fc->sessions; i++) start(&f, &r[i], goal);
    run_all(&f, 15000);
    aq_mockllm_stats st = mock_stats(&f);
    uint64_t faults = fc->hang_rate ? st.hung : fc->malformed_rate ? st.malformed : st.failures;
    ck_assert_msg(faults > 0, "%s: the mock injected no fault", fc->name);
    ck_assert_uint_eq(st.completed, (uint64_t)(fc->tool_steps + 1) * (uint64_t)fc->sessions);
    ck_assert_uint_eq(count_rows(&f, NULL, "llm", "error"), faults);
    for (int i = 0; i < fc->sessions; i++) {
        ck_assert_msg(!strcmp(r[i].status, "completed"), "%s: session %d: %s (%s)", fc->name, i, r[i].status,
                      r[i].error ? r[i].error : "");
        ck_assert_int_eq(r[i].steps, fc->tool_steps + 1);
        assert_accounting(&f, &r[i]);
        run_free(&r[i]);
    }
    /* a hung call timed out on our side and its connection was closed
     * (the mock freed the request) */
    if (fc->hang_rate) ck_assert_uint_eq(mock_drained(&f, 2000), 0);
    fx_stop(&f);
}
END_TEST

START_TEST(test_server_errors_exhausted)
{
    fx f;
    aq_mockllm_config mc = mock_defaults();
    fx_init(&f, &mc);
    set(&f.cfg, "llm.max_retries", "2");
    fx_start(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"fail=500\"}");
    run_all(&f, 10000);
    assert_outcome(&r, "failed", true, 0);
    ck_assert_msg(strstr(r.error, "2 retries") && strstr(r.error, "500"), "error: %s", r.error);
    ck_assert_uint_eq(mock_stats(&f).requests, 3); /* the call and its 2 retries */
    /* the three tries of step 1: seq 1, 2, 3, each with the provider's word */
    assert_failed_tries(&f, 3);
    for (size_t i = 0; i < f.nrows; i++)
        ck_assert_msg(strstr(f.rows[i].detail, "\"http_status\":500") &&
                          strstr(f.rows[i].detail, "fail=500"),
                      "detail: %s", f.rows[i].detail);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

START_TEST(test_client_error)
{
    fx f;
    fx_start_default(&f);
    run r, k;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"fail=400\"}");
    start(&f, &k, "{\"user_id\":\"u1\",\"goal\":\"fail=401\"}");
    run_all(&f, 10000);
    assert_outcome(&r, "failed", false, 0);
    ck_assert_msg(strstr(r.error, "the goal asked for fail=400") && strstr(r.error, "400"),
                  "error: %s", r.error);
    ck_assert_str_eq(k.status, "failed");
    ck_assert(!k.retryable);
    ck_assert_uint_eq(mock_stats(&f).requests, 2); /* no retries */
    run_free(&r);
    run_free(&k);
    fx_stop(&f);
}
END_TEST


START_TEST(test_api_key)
{
    fx f;
    aq_mockllm_config mc = mock_defaults();
    mc.api_key = "sk-check-agent";
    fx_init(&f, &mc);
    set(&f.cfg, "llm.api_key_env", "CHECK_AGENT_KEY");
    setenv("CHECK_AGENT_KEY", "sk-check-agent", 1);
    fx_start(&f); /* the router reads the key here */
    run ok;
    start(&f, &ok, "{\"user_id\":\"u1\",\"goal\":\"steps=1\"}");
    run_all(&f, 5000);
    ck_assert_str_eq(ok.status, "completed");
    run_free(&ok);
    aq_engine_free(f.engine);
    aq_router_free(f.router);

    setenv("CHECK_AGENT_KEY", "sk-wrong", 1);
    char err[256] = "";
    aq_router_deps rd = {&f.cfg, f.base, f.http, NULL, false};
    f.router = aq_router_new(&rd, err, sizeof err); /* the router's clients read the key */
    ck_assert_ptr_nonnull(f.router);
    aq_engine_deps deps = {&f.cfg, f.base, f.http, f.skills, f.router, on_step, &f, NULL};
    f.engine = aq_engine_new(&deps, err, sizeof err);
    ck_assert_ptr_nonnull(f.engine);
    run bad;
    start(&f, &bad, "{\"user_id\":\"u1\",\"goal\":\"steps=1\"}");
    run_all(&f, 5000);
    ck_assert_str_eq(bad.status, "failed");
    ck_assert(!bad.retryable);
    ck_assert_msg(strstr(bad.error, "401") && strstr(bad.error, "Incorrect or missing API key"),
                  "error: %s", bad.error);
    ck_assert_msg(!strstr(bad.error, "sk-wrong"), "the key leaked into the error: %s", bad.error);
    run_free(&bad);
    unsetenv("CHECK_AGENT_KEY");
    fx_stop(&f);
}
END_TEST

/* A key with the characters JSON writers escape differently. */
#define ECHO_KEY "sk-test/Ab+cd/EF0123456789-secret"

/* No part of ECHO_KEY, raw or JSON-escaped, in `text`. */
static void assert_no_key(const char *text, const char *what)
{
    static const char *const pieces[] = {ECHO_KEY, "sk-test\\/Ab+cd\\/EF0123456789-secret",
                                         "sk-test", "Ab+cd", "EF0123456789", "-secret"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(pieces); i++)
        ck_assert_msg(!strstr(text, pieces[i]), "%s holds \"%s\": %s", what, pieces[i], text);
}

/* Runs one session against /echo/<mode> with ECHO_KEY set and checks
 * what would be stored and logged: the session's error and every step
 * row of the task hold "***" where the provider echoed the key, and no
 * trace of it; so do the log lines written meanwhile. */
static void run_echo(const char *mode, const char *want_status, bool want_retryable,
                     const char *want_error)
{
    fx f;
    fx_init(&f, NULL);
    char url[160];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/echo/%s", f.srv->port, mode);
    set(&f.cfg, "llm.base_url", url);
    set(&f.cfg, "llm.max_retries", "2");
    set(&f.cfg, "llm.api_key_env", "CHECK_AGENT_ECHO_KEY");
    setenv("CHECK_AGENT_ECHO_KEY", ECHO_KEY, 1);
    fx_start(&f); /* the engine learns the key here */

    char logpath[] = "/tmp/check_agent_log_XXXXXX";
    int logfd = mkstemp(logpath);
    ck_assert_int_ge(logfd, 0);
    unlink(logpath);
    aq_log_set_fd(logfd);
    aq_log_set_level(AQ_LOG_DEBUG);

    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"anything\"}");
    run_all(&f, 10000);
    aq_log_set_fd(2);
    aq_log_set_level(AQ_LOG_WARN);

    ck_assert_msg(!strcmp(r.status, want_status), "%s: status %s (%s)", mode, r.status,
                  r.error ? r.error : "");
    ck_assert(r.retryable == want_retryable);
    ck_assert_ptr_nonnull(r.error);
    assert_no_key(r.error, "the session's error");
    ck_assert_msg(strstr(r.error, want_error), "%s: error \"%s\" lacks \"%s\"", mode, r.error,
                  want_error);

    size_t rows = 0;
    for (size_t i = 0; i < f.nrows; i++) {
        const row *w = &f.rows[i];
        if (strcmp(w->task_id, r.task->task_id)) continue;
        rows++;
        ck_assert_ptr_nonnull(w->detail);
        assert_no_key(w->detail, "a step's detail");
        assert_no_key(w->name, "a step's name");
        ck_assert_msg(strstr(w->detail, "***"), "%s: detail without the mask: %s", mode,
                      w->detail);
    }
    ck_assert_uint_eq(rows, want_retryable ? 3 : 1); /* the call, and its retries */

    off_t end = lseek(logfd, 0, SEEK_END);
    ck_assert_int_ge(end, 0);
    char *log = calloc(1, (size_t)end + 1);
    ck_assert_ptr_nonnull(log);
    ck_assert_int_eq(pread(logfd, log, (size_t)end, 0), end);
    close(logfd);
    assert_no_key(log, "the log");
    free(log);

    run_free(&r);
    unsetenv("CHECK_AGENT_ECHO_KEY");
    fx_stop(&f);
}

START_TEST(test_key_echo_masked)
{
    run_echo("openai", "failed", false,
             "LLM provider refused the request (HTTP 401): Incorrect API key provided: ***. ");
    run_echo("slashes", "failed", false,
             "LLM provider refused the request (HTTP 401): Incorrect API key provided: ***. ");
    run_echo("raw", "failed", false, "Incorrect API key provided: ***\"}");
    run_echo("server", "failed", true,
             "LLM call failed after 2 retries: HTTP 500: Incorrect API key provided: ***. ");
    run_echo("ok-error", "failed", true,
             "LLM call failed after 2 retries: reply is an error: Incorrect API key provided: ***. ");
}
END_TEST


START_TEST(test_skill_subset)
{
    fx f;
    fx_init(&f, NULL); /* the rogue model */
    fx_start(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"anything\",\"skills\":[\"current_time\"]}");
    run_all(&f, 10000);
    ck_assert_str_eq(r.status, "completed");
    ck_assert_int_eq(r.steps, 2);
    ck_assert_int_eq(f.srv->rogue_requests, 2);
    ck_assert_msg(strstr(r.result, "tool 'calculator' is not available to this task"),
                  "result: %s", r.result);
    ck_assert_msg(strstr(r.result, "current_time: arguments are not a JSON object"),
                  "result: %s", r.result);
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "error"), 2);
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "ok"), 0);
    ck_assert_uint_eq(count_rows(&f, NULL, "llm", "ok"), 2);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

/* A provider nobody listens on: every try is a network error (a row
 * without an HTTP status), retried llm.max_retries times, then the
 * attempt fails as retryable with curl's reason. */
START_TEST(test_connection_refused_retried)
{
    int port;
    int fd = aq_test_loopback_socket(0, &port); /* bound, not listening: connect is refused */
    fx f;
    fx_init(&f, NULL);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", port);
    set(&f.cfg, "llm.base_url", url);
    set(&f.cfg, "llm.max_retries", "2");
    fx_start(&f);
    run r;
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"anything\"}");
    run_all(&f, 10000);
    close(fd);
    assert_outcome(&r, "failed", true, 0);
    ck_assert_msg(strstr(r.error, "LLM call failed after 2 retries: "), "error: %s", r.error);
    assert_failed_tries(&f, 3);
    for (size_t i = 0; i < f.nrows; i++)
        ck_assert_msg(!strstr(f.rows[i].detail, "http_status") && strstr(f.rows[i].detail, "\"error\""),
                      "detail: %s", f.rows[i].detail);
    ck_assert_int_eq(f.srv->rogue_requests, 0);
    run_free(&r);
    fx_stop(&f);
}
END_TEST

/* ---- durable sessions ---------------------------------------------------- */

/* The rows of `task_id` that carry a message, up to step `last` (and of
 * step `last` + 1 its LLM reply and the first `extra_tools` results), as
 * agentq.session_log would give them: what a crash after them leaves. */
static aq_task_step *committed(const fx *f, const char *task_id, int last, int extra_tools, size_t *n)
{
    aq_task_step *v = calloc(f->nrows + 1, sizeof *v);
    ck_assert_ptr_nonnull(v);
    *n = 0;
    int tools_of_next = 0;
    for (size_t i = 0; i < f->nrows; i++) {
        const row *w = &f->rows[i];
        if (strcmp(w->task_id, task_id) || !w->message) continue;
        bool tool = !strcmp(w->kind, "tool");
        if (w->step > last + 1) continue;
        if (w->step == last + 1 && tool && tools_of_next++ >= extra_tools) continue;
        if (w->step == last + 1 && extra_tools < 0) continue;
        v[(*n)++] = (aq_task_step){w->attempt, w->step, w->seq, tool, w->message, w->message_len,
                                   w->prompt_tokens, w->completion_tokens, w->cost};
    }
    return v;
}

static uint64_t mock_requests(const fx *f) { return mock_stats(f).requests; }

START_TEST(test_resume_after_committed_steps)
{
    fx f;
    fx_start_default(&f);
    const char *body = "{\"user_id\":\"u1\",\"goal\":\"steps=5\",\"max_steps\":10}";
    run whole;
    start(&f, &whole, body);
    run_all(&f, 10000);
    ck_assert_str_eq(whole.status, "completed");
    ck_assert_int_eq(whole.steps, 6);
    uint64_t calls_whole = mock_requests(&f);
    ck_assert_uint_eq(calls_whole, 6);

    /* The worker died after step 3 was committed: attempt 2 makes only the
     * three calls left, and ends with the same answer, steps and cost as
     * the run that was never interrupted. */
    size_t n;
    aq_task_step *rows = committed(&f, whole.task->task_id, 3, -1, &n);
    ck_assert_uint_eq(n, 6); /* 3 replies, 3 results */
    aq_session_past past = {rows, n, 1.5};
    run again;
    start_resumed(&f, &again, body, 2, &past);
    run_all(&f, 10000);
    ck_assert_str_eq(again.status, "completed");
    ck_assert_uint_eq(mock_requests(&f) - calls_whole, 3);
    ck_assert_int_eq(again.steps, whole.steps);
    ck_assert_int_eq(again.prompt_tokens, whole.prompt_tokens);
    ck_assert_int_eq(again.completion_tokens, whole.completion_tokens);
    assert_close(again.cost, whole.cost, "cost over attempts");
    ck_assert_str_eq(again.result, whole.result);
    free(rows);
    run_free(&again);

    /* Died in step 4 with its reply committed but not its tool result: no
     * LLM call for step 4, its tool runs again, then steps 5 and 6. */
    uint64_t before = mock_requests(&f);
    size_t tools_before = count_rows(&f, NULL, "tool", "ok");
    rows = committed(&f, whole.task->task_id, 3, 0, &n);
    ck_assert_uint_eq(n, 7);
    past = (aq_session_past){rows, n, 0};
    start_resumed(&f, &again, body, 3, &past);
    run_all(&f, 10000);
    ck_assert_str_eq(again.status, "completed");
    ck_assert_uint_eq(mock_requests(&f) - before, 2);
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "ok") - tools_before, 2); /* step 4's again, step 5's */
    ck_assert_int_eq(again.steps, 6);
    assert_close(again.cost, whole.cost, "cost over attempts");
    free(rows);
    run_free(&again);

    /* The final answer was committed, only the status write was lost: it
     * completes with no call at all. */
    before = mock_requests(&f);
    rows = committed(&f, whole.task->task_id, 6, -1, &n);
    past = (aq_session_past){rows, n, 0};
    start_resumed(&f, &again, body, 4, &past);
    run_all(&f, 10000);
    ck_assert_str_eq(again.status, "completed");
    ck_assert_uint_eq(mock_requests(&f), before);
    ck_assert_str_eq(again.result, whole.result);
    free(rows);
    run_free(&again);
    run_free(&whole);
    fx_stop(&f);
}
END_TEST

START_TEST(test_resume_budgets_span_attempts)
{
    fx f;
    fx_start_default(&f);
    run whole;
    start(&f, &whole, "{\"user_id\":\"u1\",\"goal\":\"loop\",\"max_steps\":6}");
    run_all(&f, 10000);
    ck_assert_str_eq(whole.status, "max_steps");
    size_t n;
    aq_task_step *rows = committed(&f, whole.task->task_id, 4, -1, &n);
    /* max_steps counts the earlier attempt's 4: two calls are left */
    uint64_t before = mock_requests(&f);
    aq_session_past past = {rows, n, 0};
    run again;
    start_resumed(&f, &again, "{\"user_id\":\"u1\",\"goal\":\"loop\",\"max_steps\":6}", 2, &past);
    run_all(&f, 10000);
    assert_outcome(&again, "max_steps", false, 6);
    ck_assert_uint_eq(mock_requests(&f) - before, 2);
    run_free(&again);
    free(rows);
    run_free(&whole);
    fx_stop(&f);
}
END_TEST

START_TEST(test_resume_refuses_broken_rows)
{
    fx f;
    fx_start_default(&f);
    const char *body = "{\"user_id\":\"u1\",\"goal\":\"steps=4\"}";
    run whole;
    start(&f, &whole, body);
    run_all(&f, 10000);
    ck_assert_str_eq(whole.status, "completed");
    size_t n;
    aq_task_step *rows = committed(&f, whole.task->task_id, 3, -1, &n);
    ck_assert_uint_eq(n, 6);
    uint64_t before = mock_requests(&f);
    struct {
        size_t drop;          /* the row left out, or n */
        char *message;        /* replaces row 2's message, or NULL */
        const char *error;
    } cases[] = {
        {2, NULL, "step 2 has tool results but no committed LLM reply"}, /* step 2's reply gone */
        {n, "{\"role\":\"assistant\",\"tool_calls\":7}", "step 2: its stored LLM reply does not parse"},
        {3, NULL, "step 2: 1 of its tool calls have no committed result, yet step 3 follows"},
    };
    for (size_t c = 0; c < AQ_ARRAY_LEN(cases); c++) {
        aq_task_step v[8];
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            if (i == cases[c].drop) continue;
            v[k] = rows[i];
            if (i == 2 && cases[c].message) {
                v[k].message = cases[c].message;
                v[k].message_len = strlen(cases[c].message);
            }
            k++;
        }
        aq_session_past past = {v, k, 0};
        run again;
        start_resumed(&f, &again, body, 2, &past);
        run_all(&f, 10000);
        assert_outcome(&again, "failed", false, again.steps);
        ck_assert_msg(strstr(again.error, cases[c].error), "case %zu: %s", c, again.error);
        ck_assert_msg(strstr(again.error, "cannot resume"), "%s", again.error);
        run_free(&again);
    }
    ck_assert_uint_eq(mock_requests(&f), before); /* none of them called the provider */
    free(rows);
    run_free(&whole);
    fx_stop(&f);
}
END_TEST

START_TEST(test_resume_applies_history_cap)
{
    enum { CAP = 2048 };
    fx f;
    aq_mockllm_config mc = mock_defaults();
    fx_init(&f, &mc);
    set(&f.cfg, "agent.max_context_bytes", "2048");
    fx_start(&f);
    const char *body = "{\"user_id\":\"u1\",\"goal\":\"loop tool=big\",\"max_steps\":12}";
    run whole;
    start(&f, &whole, body);
    run_all(&f, 20000);
    ck_assert_str_eq(whole.status, "max_steps");
    size_t n, first = f.nrows;
    /* ten steps of 12 KB results each, rebuilt under a 2 KB cap */
    aq_task_step *rows = committed(&f, whole.task->task_id, 10, -1, &n);
    aq_session_past past = {rows, n, 0};
    run again;
    start_resumed(&f, &again, body, 2, &past);
    run_all(&f, 20000);
    assert_outcome(&again, "max_steps", false, 12);
    size_t llm = 0;
    for (size_t i = first; i < f.nrows; i++) {
        row *w = &f.rows[i];
        if (strcmp(w->kind, "llm")) continue;
        llm++;
        ck_assert_msg(w->prompt_tokens * 4 <= CAP + 512, "a resumed request carried %lld bytes (cap %d)",
                      (long long)w->prompt_tokens * 4, CAP);
    }
    ck_assert_uint_eq(llm, 2);
    free(rows);
    run_free(&again);
    run_free(&whole);
    fx_stop(&f);
}
END_TEST

START_TEST(test_ask_human_waits_then_resumes)
{
    fx f;
    fx_start_default(&f);
    const char *body = "{\"user_id\":\"u1\",\"goal\":\"steps=1 tool=ask_human\","
                       "\"skills\":[\"calculator\",\"ask_human\"]}";
    run r;
    start(&f, &r, body);
    run_all(&f, 10000);
    /* it asked, and waits without a result for the call */
    ck_assert_str_eq(r.status, "waiting");
    ck_assert_int_eq(r.steps, 1);
    ck_assert_uint_eq(count_rows(&f, NULL, "tool", "waiting"), 1);
    ck_assert_ptr_null(f.rows[f.nrows - 1].message);
    ck_assert_str_eq(f.rows[f.nrows - 1].name, "ask_human");
    /* The answer becomes the call's result (what agentq.answer writes):
     * the next attempt resumes with it and finishes. */
    size_t n;
    aq_task_step *rows = committed(&f, r.task->task_id, 0, 0, &n);
    ck_assert_uint_eq(n, 1);
    json_t *d = json_loads(f.rows[f.nrows - 1].detail, 0, NULL);
    json_t *msg = json_pack("{s:s, s:s, s:s, s:s}", "role", "tool", "tool_call_id",
                            json_string_value(json_object_get(d, "tool_call_id")), "name", "ask_human", "content",
                            "blue");
    char *answer = json_dumps(msg, JSON_COMPACT);
    json_decref(msg);
    json_decref(d);
    aq_task_step v[2] = {rows[0], {1, 1, 1, true, answer, strlen(answer), 0, 0, 0}};
    aq_session_past past = {v, 2, 0};
    uint64_t before = mock_requests(&f);
    run again;
    start_resumed(&f, &again, body, 2, &past);
    run_all(&f, 10000);
    ck_assert_str_eq(again.status, "completed");
    ck_assert_uint_eq(mock_requests(&f) - before, 1);
    ck_assert_msg(strstr(again.result, "blue"), "the model saw the answer: %s", again.result);
    free(answer);
    free(rows);
    run_free(&again);
    run_free(&r);

    /* Not listed in the task's skills: never offered, so it never waits. */
    start(&f, &r, "{\"user_id\":\"u1\",\"goal\":\"steps=1 tool=ask_human\"}");
    run_all(&f, 10000);
    ck_assert_str_eq(r.status, "completed");
    ck_assert_uint_eq(count_rows(&f, r.task->task_id, "tool", "waiting"), 0);
    ck_assert_uint_eq(count_rows(&f, r.task->task_id, "tool", NULL), 1);
    for (size_t i = 0; i < f.nrows; i++)
        if (!strcmp(f.rows[i].task_id, r.task->task_id)) ck_assert_str_ne(f.rows[i].name, "ask_human");
    run_free(&r);
    fx_stop(&f);
}
END_TEST

static Suite *agent_suite(void)
{
    const TTest *core[] = {test_completed, test_parallel_tools, test_calculator_verified,
                           test_cancelled, test_max_steps};
    const TTest *limits[] = {test_timeout, test_deadline_passed, test_budget,
                             test_too_many_tool_calls, test_history_cap, test_thousand_sessions};
    const TTest *errors[] = {test_rate_limited, test_server_errors_exhausted, test_client_error,
                             test_api_key, test_key_echo_masked, test_skill_subset,
                             test_connection_refused_retried};
    const TTest *durable[] = {test_resume_after_committed_steps, test_resume_budgets_span_attempts,
                              test_resume_refuses_broken_rows, test_resume_applies_history_cap,
                              test_ask_human_waits_then_resumes};
    const aq_tcase_spec tcases[] = {
        {.name = "durable", .tests = durable, .n_tests = AQ_ARRAY_LEN(durable), .timeout_s = 60},
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 30},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 60},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 30,
         .loop_test = test_faults_retried, .loops = (int)AQ_ARRAY_LEN(fault_cases)},
    };
    return aq_test_suite("agent", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void) { return aq_test_run_http(agent_suite()); }
