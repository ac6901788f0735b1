/* check_llm.c — the provider client against a scripted evhttp server on
 * 127.0.0.1 sharing the client's event_base: the request it sends (URL,
 * headers, body), and how every kind of reply is classified — answered
 * (content, tool calls, usage), rate-limited (with and without
 * Retry-After), retryable (5xx, 408, a redirect, a malformed body, a 200
 * that is an error object, connection refused, timeout) and fatal (4xx
 * with the provider's message) — plus cancel, send failures, and the
 * secrets contract (the key is registered; provider text comes back
 * unmasked for the one place that stores it to mask). */
#include "agentq/llm.h"
#include "agentq/log.h"

#include <arpa/inet.h>
#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define KEY "sk-check-llm-0123456789"

#define OPENAI_ERROR(msg, type) \
    "{\"error\":{\"message\":\"" msg "\",\"type\":\"" type "\",\"param\":null,\"code\":null}}"

#define CONTENT_REPLY                                                                            \
    "{\"id\":\"c1\",\"object\":\"chat.completion\",\"model\":\"gpt-test\",\"choices\":[{\"index\":0," \
    "\"message\":{\"role\":\"assistant\",\"content\":\"Paris.\"},\"finish_reason\":\"stop\"}],"     \
    "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15}}"

#define TOOLS_REPLY                                                                              \
    "{\"id\":\"c2\",\"object\":\"chat.completion\",\"model\":\"gpt-test\",\"choices\":[{\"index\":0," \
    "\"message\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":["                       \
    "{\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"calculator\","              \
    "\"arguments\":\"{\\\"expression\\\":\\\"1+1\\\"}\"}},"                                        \
    "{\"id\":\"call_b\",\"type\":\"function\",\"function\":{\"name\":\"current_time\","            \
    "\"arguments\":\"{}\"}}]},\"finish_reason\":\"tool_calls\"}],"                                  \
    "\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":17}}"

/* ---- the scripted provider ---------------------------------------------- */

/* What /v1/<name>/chat/completions answers. */
typedef struct script {
    const char *name;
    int status;
    const char *retry_after; /* Retry-After header, or NULL */
    const char *body;
} script;

static const script scripts[] = {
    {"content", 200, NULL, CONTENT_REPLY},
    {"limits", 200, NULL, CONTENT_REPLY},
    {"tools", 200, NULL, TOOLS_REPLY},
    {"429", 429, "7", OPENAI_ERROR("Rate limit reached for requests", "requests")},
    {"429-bare", 429, NULL, "slow down"},
    {"500", 500, NULL, OPENAI_ERROR("The server had an error while processing your request.",
                                    "server_error")},
    {"503", 503, NULL, "upstream overloaded"},
    {"408", 408, NULL, ""},
    {"302", 302, NULL, "moved"},
    {"malformed", 200, NULL, "{\"choices\":[{\"message\":"},
    {"ok-error", 200, NULL, OPENAI_ERROR("The model is overloaded", "server_error")},
    {"400", 400, NULL,
     OPENAI_ERROR("Invalid value for 'tool_choice': no tools given.", "invalid_request_error")},
    {"401", 401, NULL,
     OPENAI_ERROR("Incorrect API key provided: " KEY ". You can find your API key at "
                  "https://platform.openai.com/account/api-keys.",
                  "invalid_request_error")},
    {"403", 403, NULL, "{\"error\":\"Project does not have access to model\"}"},
    {"404", 404, NULL, "{\"message\":\"The model `nope` does not exist\"}"},
    {"422", 422, NULL, ""},
};

typedef struct srv {
    struct event_base *base;
    struct evhttp *http;
    int port;
    int requests;
    /* the last request, copied */
    char path[256];
    char query[256];
    char auth[256];
    char api_key[256];
    char content_type[64];
    bool had_auth;
    char *body;
    size_t body_len;
    struct evhttp_request *held; /* /v1/hold/...: unanswered until its client leaves */
    int holds;                   /* requests held so far */
} srv;

/* The held request's client went away: libevent frees the request. */
static void on_held_close(struct evhttp_connection *conn, void *arg)
{
    (void)conn;
    ((srv *)arg)->held = NULL;
}

static void srv_handle(struct evhttp_request *r, void *arg)
{
    srv *s = arg;
    s->requests++;
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(r));
    struct evkeyvalq *in_h = evhttp_request_get_input_headers(r);
    snprintf(s->path, sizeof s->path, "%s", path);
    const char *q = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(r));
    snprintf(s->query, sizeof s->query, "%s", q ? q : "");
    const char *ak = evhttp_find_header(in_h, "api-key");
    snprintf(s->api_key, sizeof s->api_key, "%s", ak ? ak : "");
    const char *auth = evhttp_find_header(in_h, "Authorization");
    s->had_auth = auth != NULL;
    snprintf(s->auth, sizeof s->auth, "%s", auth ? auth : "");
    const char *ct = evhttp_find_header(in_h, "Content-Type");
    snprintf(s->content_type, sizeof s->content_type, "%s", ct ? ct : "");
    struct evbuffer *in = evhttp_request_get_input_buffer(r);
    free(s->body);
    s->body_len = evbuffer_get_length(in);
    s->body = malloc(s->body_len + 1);
    ck_assert_ptr_nonnull(s->body);
    evbuffer_copyout(in, s->body, s->body_len);
    s->body[s->body_len] = '\0';

    struct evkeyvalq *out_h = evhttp_request_get_output_headers(r);
    if (!strcmp(path, "/v1/hold/chat/completions")) {
        s->held = r;
        s->holds++;
        evhttp_connection_set_closecb(evhttp_request_get_connection(r), on_held_close, s);
        return;
    }
    for (size_t i = 0; i < AQ_ARRAY_LEN(scripts); i++) {
        char want[128];
        snprintf(want, sizeof want, "/v1/%s/chat/completions", scripts[i].name);
        if (strcmp(path, want)) continue;
        evhttp_add_header(out_h, "Content-Type", "application/json");
        if (scripts[i].retry_after) evhttp_add_header(out_h, "Retry-After", scripts[i].retry_after);
        if (!strcmp(scripts[i].name, "limits") || !strcmp(scripts[i].name, "429")) {
            /* OpenAI's headers, as it sends them with every reply */
            evhttp_add_header(out_h, "x-ratelimit-limit-requests", "500");
            evhttp_add_header(out_h, "x-ratelimit-limit-tokens", "30000");
            evhttp_add_header(out_h, "x-ratelimit-remaining-requests", "499");
            evhttp_add_header(out_h, "x-ratelimit-remaining-tokens", "29900");
            evhttp_add_header(out_h, "x-ratelimit-reset-requests", "120ms");
            evhttp_add_header(out_h, "x-ratelimit-reset-tokens", "6m0s");
        }
        evbuffer_add(evhttp_request_get_output_buffer(r), scripts[i].body, strlen(scripts[i].body));
        evhttp_send_reply(r, scripts[i].status, "Scripted", NULL);
        return;
    }
    evbuffer_add(evhttp_request_get_output_buffer(r), "no such path", 12);
    evhttp_send_reply(r, 404, "Not Found", NULL);
}

/* ---- the fixture ---------------------------------------------------------- */

/* What a callback got, copied out of the borrowed result. */
typedef struct got {
    int calls;
    bool in_call;    /* set around aq_llm_send / aq_llm_cancel */
    bool cb_inside;  /* the callback ran inside one of them */
    aq_llm_outcome outcome;
    int code;
    long http_status;
    int64_t total_ms, retry_after_ms;
    char *message, *reason;
    bool take;       /* take the reply (else the client frees it) */
    aq_chat_reply reply;
    aq_llm_limits limits;
    char *body;      /* ANSWERED: the body as sent */
} got;

typedef struct fx {
    struct event_base *base;
    srv *srv;
    aq_config cfg;
    aq_http *http;
    aq_llm *llm;
    aq_chat *chat;
    /* the endpoint's key style (the base URL and key variable are the cfg's) */
    aq_auth_style auth;
    const char *auth_header;
    const char *query;
} fx;

static void set(aq_config *cfg, const char *key, const char *value)
{
    char err[256] = "";
    ck_assert_msg(aq_config_set(cfg, key, value, err, sizeof err) == AQ_OK, "%s: %s", key, err);
}

/* Base, server, config pointing at /v1/<name>/ (trailing slash: the
 * client must not double it), no client yet. */
static void fx_init(fx *f, const char *name)
{
    memset(f, 0, sizeof *f);
    f->base = event_base_new();
    ck_assert_ptr_nonnull(f->base);
    f->srv = calloc(1, sizeof *f->srv);
    ck_assert_ptr_nonnull(f->srv);
    f->srv->base = f->base;
    f->srv->http = aq_test_httpd(f->base, srv_handle, f->srv, &f->srv->port);
    aq_config_init(&f->cfg);
    char url[160];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/%s/", f->srv->port, name);
    set(&f->cfg, "llm.base_url", url);
    set(&f->cfg, "llm.timeout_ms", "5000");
    set(&f->cfg, "llm.api_key_env", "CHECK_LLM_KEY");
    setenv("CHECK_LLM_KEY", KEY, 1);
    f->chat = aq_chat_new("Be brief.", "What is the capital of France?", 65536);
    ck_assert_ptr_nonnull(f->chat);
}

static void fx_start(fx *f)
{
    char err[256] = "";
    aq_http_config hc = {.connect_timeout_ms = 2000, .timeout_ms = 10000, .user_agent = "check_llm"};
    f->http = aq_http_new(f->base, &hc, err, sizeof err);
    ck_assert_msg(f->http != NULL, "aq_http_new: %s", err);
    aq_llm_endpoint ep = {f->cfg.llm_base_url, f->query, f->auth, f->auth_header, f->cfg.llm_api_key_env,
                          f->cfg.llm_timeout_ms, true};
    f->llm = aq_llm_new(&ep, f->http, err, sizeof err);
    ck_assert_msg(f->llm != NULL, "aq_llm_new: %s", err);
}


static void got_free(got *g)
{
    free(g->message);
    free(g->reason);
    free(g->body);
    aq_chat_reply_free(&g->reply);
}

static void fx_stop(fx *f)
{
    aq_llm_free(f->llm);
    aq_http_free(f->http);
    if (f->srv->held) evhttp_send_reply(f->srv->held, 500, "Bye", NULL);
    evhttp_free(f->srv->http);
    free(f->srv->body);
    free(f->srv);
    aq_chat_free(f->chat);
    aq_config_free(&f->cfg);
    unsetenv("CHECK_LLM_KEY");
    event_base_free(f->base);
}

static void on_result(aq_llm_result *res, void *arg)
{
    got *g = arg;
    g->calls++;
    g->cb_inside = g->cb_inside || g->in_call;
    g->outcome = res->outcome;
    g->code = res->code;
    g->http_status = res->http_status;
    g->total_ms = res->total_ms;
    g->retry_after_ms = res->retry_after_ms;
    ck_assert_ptr_nonnull(res->message);
    ck_assert_ptr_nonnull(res->reason);
    g->message = strdup(res->message);
    g->reason = strdup(res->reason);
    g->limits = res->limits;
    if (res->body) g->body = strndup(res->body, res->body_len);
    if (res->outcome != AQ_LLM_ANSWERED) {
        /* nothing to take, nothing to free */
        ck_assert_ptr_null(res->reply.content);
        ck_assert_ptr_null(res->reply.message_json);
        ck_assert_uint_eq(res->reply.n_tool_calls, 0);
    }
    if (g->take) aq_llm_take_reply(res, &g->reply);
}

/* Builds the request for `chat` as aq_chat_request does and sends it:
 * AQ_EINVAL (err "cannot build the LLM request") when it cannot be built. */
static int llm_send(fx *f, const aq_chat *chat, const char *model, const char *tools, got *g, aq_llm_call **c,
                    char *err, size_t errlen)
{
    char *body = NULL;
    size_t len = 0;
    if (aq_chat_request(chat, model, tools, NULL, &body, &len) != AQ_OK) {
        snprintf(err, errlen, "cannot build the LLM request");
        return AQ_EINVAL;
    }
    int rc = aq_llm_send(f->llm, model, body, len, on_result, g, c, err, errlen);
    free(body);
    return rc;
}

static void on_expire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    *(bool *)arg = true;
}

/* Runs the loop until g has been called back; fails after `ms`. */
static void wait_for(fx *f, got *g, int ms)
{
    bool expired = false;
    struct event *t = evtimer_new(f->base, on_expire, &expired);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(t, &tv);
    while (!g->calls && !expired) event_base_loop(f->base, EVLOOP_ONCE);
    event_free(t);
    ck_assert_msg(g->calls == 1, "no callback within %d ms", ms);
}

/* Sends the fixture's chat (no tools) and waits for its one callback. */
static void call(fx *f, got *g, int ms)
{
    char err[256] = "";
    g->in_call = true;
    int rc = llm_send(f, f->chat, "gpt-test", NULL, g, NULL, err, sizeof err);
    g->in_call = false;
    ck_assert_msg(rc == AQ_OK, "aq_llm_send: %s", err);
    ck_assert_int_eq(g->calls, 0); /* never from inside send */
    wait_for(f, g, ms);
    ck_assert(!g->cb_inside);
}

/* Starts the fixture on /v1/<name>/ and makes one call there for g (which
 * takes the reply if g->take). */
static void call_script(fx *f, const char *name, got *g)
{
    fx_init(f, name);
    fx_start(f);
    call(f, g, 5000);
}

/* ---- core ------------------------------------------------------------------ */

START_TEST(test_answered_content)
{
    fx f;
    got g = {.take = true};
    call_script(&f, "content", &g);
    ck_assert_int_eq(g.outcome, AQ_LLM_ANSWERED);
    ck_assert_int_eq(g.code, AQ_OK);
    ck_assert_int_eq(g.http_status, 200);
    ck_assert_int_eq(g.retry_after_ms, -1);
    ck_assert_str_eq(g.message, "");
    ck_assert_str_eq(g.reason, "");
    ck_assert(g.total_ms >= 0);
    ck_assert_uint_eq(g.reply.content_len, 6);
    ck_assert_str_eq(g.reply.content, "Paris.");
    ck_assert_uint_eq(g.reply.n_tool_calls, 0);
    ck_assert_str_eq(g.reply.finish_reason, "stop");
    ck_assert_str_eq(g.reply.model, "gpt-test");
    ck_assert(g.reply.has_usage);
    ck_assert_int_eq(g.reply.prompt_tokens, 12);
    ck_assert_int_eq(g.reply.completion_tokens, 3);
    ck_assert_ptr_nonnull(g.reply.message_json);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

START_TEST(test_answered_tool_calls)
{
    fx f;
    got g = {.take = true};
    call_script(&f, "tools", &g);
    ck_assert_int_eq(g.outcome, AQ_LLM_ANSWERED);
    ck_assert_int_eq(g.http_status, 200);
    ck_assert_ptr_null(g.reply.content);
    ck_assert_str_eq(g.reply.finish_reason, "tool_calls");
    ck_assert_uint_eq(g.reply.n_tool_calls, 2);
    ck_assert_str_eq(g.reply.tool_calls[0].id, "call_a");
    ck_assert_str_eq(g.reply.tool_calls[0].name, "calculator");
    ck_assert_str_eq(g.reply.tool_calls[0].args, "{\"expression\":\"1+1\"}");
    ck_assert_ptr_null(g.reply.tool_calls[0].args_error);
    ck_assert_str_eq(g.reply.tool_calls[1].id, "call_b");
    ck_assert_str_eq(g.reply.tool_calls[1].name, "current_time");
    ck_assert_int_eq(g.reply.prompt_tokens, 40);
    ck_assert_int_eq(g.reply.completion_tokens, 17);
    /* the taken reply is the caller's and goes into the history as is */
    char err[256] = "";
    ck_assert_int_eq(aq_chat_add_reply(f.chat, &g.reply, err, sizeof err), AQ_OK);
    ck_assert_uint_eq(aq_chat_pending(f.chat), 2);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* An answer the callback does not take is freed by the client (the
 * sanitizer build catches a leak or a double free). */
START_TEST(test_answered_not_taken)
{
    fx f;
    got g = {.take = false};
    call_script(&f, "tools", &g);
    ck_assert_int_eq(g.outcome, AQ_LLM_ANSWERED);
    ck_assert_ptr_null(g.reply.tool_calls);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* What goes out: POST to base_url + /chat/completions (one slash), JSON,
 * the bearer key, and exactly the body chat.h builds. */
START_TEST(test_request)
{
    fx f;
    fx_init(&f, "content");
    fx_start(&f);
    static const aq_chat_tool_def defs[] = {
        {"calculator", "Evaluates arithmetic", "{\"type\":\"object\"}"}};
    char *tools = NULL, err[256] = "";
    ck_assert_int_eq(aq_chat_tools_json(defs, 1, &tools, err, sizeof err), AQ_OK);
    got g = {0};
    aq_llm_call *c = NULL;
    ck_assert_int_eq(llm_send(&f, f.chat, "gpt-test", tools, &g, &c, err, sizeof err),
                     AQ_OK);
    ck_assert_ptr_nonnull(c);
    wait_for(&f, &g, 5000);
    ck_assert_int_eq(g.outcome, AQ_LLM_ANSWERED);
    ck_assert_int_eq(f.srv->requests, 1);
    ck_assert_str_eq(f.srv->path, "/v1/content/chat/completions");
    ck_assert_str_eq(f.srv->auth, "Bearer " KEY);
    ck_assert_str_eq(f.srv->content_type, "application/json");
    char *want = NULL;
    size_t want_len = 0;
    ck_assert_int_eq(aq_chat_request(f.chat, "gpt-test", tools, NULL, &want, &want_len), AQ_OK);
    ck_assert_uint_eq(f.srv->body_len, want_len);
    ck_assert_str_eq(f.srv->body, want);
    free(want);
    free(tools);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* No key in the environment: no Authorization header at all. */
START_TEST(test_request_without_key)
{
    fx f;
    fx_init(&f, "content");
    unsetenv("CHECK_LLM_KEY");
    fx_start(&f);
    got g = {0};
    call(&f, &g, 5000);
    ck_assert_int_eq(g.outcome, AQ_LLM_ANSWERED);
    ck_assert(!f.srv->had_auth);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* ---- errors: one table of scripted replies -------------------------------- */

typedef struct outcome_case {
    const char *script;
    aq_llm_outcome outcome;
    int code;
    long http_status;
    int64_t retry_after_ms;
    const char *message; /* exact */
    const char *reason;  /* exact */
} outcome_case;

static const outcome_case outcome_cases[] = {
    {"429", AQ_LLM_RATE_LIMITED, AQ_EAGAIN, 429, 7000, "Rate limit reached for requests",
     "Rate limit reached for requests"},
    {"429-bare", AQ_LLM_RATE_LIMITED, AQ_EAGAIN, 429, -1, "slow down", "slow down"},
    {"500", AQ_LLM_RETRYABLE, AQ_EAGAIN, 500, -1,
     "The server had an error while processing your request.",
     "HTTP 500: The server had an error while processing your request."},
    {"503", AQ_LLM_RETRYABLE, AQ_EAGAIN, 503, -1, "upstream overloaded",
     "HTTP 503: upstream overloaded"},
    {"408", AQ_LLM_RETRYABLE, AQ_EAGAIN, 408, -1, "", "HTTP 408"},
    {"302", AQ_LLM_RETRYABLE, AQ_EAGAIN, 302, -1, "moved", "HTTP 302: moved"},
    {"malformed", AQ_LLM_RETRYABLE, AQ_EPROTO, 200, -1, NULL, NULL},
    {"ok-error", AQ_LLM_RETRYABLE, AQ_EPROTO, 200, -1, "reply is an error: The model is overloaded",
     "reply is an error: The model is overloaded"},
    {"400", AQ_LLM_FATAL, AQ_EINVAL, 400, -1, "Invalid value for 'tool_choice': no tools given.",
     "Invalid value for 'tool_choice': no tools given."},
    {"401", AQ_LLM_FATAL, AQ_EINVAL, 401, -1,
     "Incorrect API key provided: " KEY ". You can find your API key at "
     "https://platform.openai.com/account/api-keys.",
     NULL},
    {"403", AQ_LLM_FATAL, AQ_EINVAL, 403, -1, "Project does not have access to model", NULL},
    {"404", AQ_LLM_FATAL, AQ_EINVAL, 404, -1, "The model `nope` does not exist", NULL},
    {"422", AQ_LLM_FATAL, AQ_EINVAL, 422, -1, "", ""},
};

START_TEST(test_outcome)
{
    const outcome_case *c = &outcome_cases[_i];
    fx f;
    got g = {.take = true};
    call_script(&f, c->script, &g);
    ck_assert_msg(g.outcome == c->outcome, "%s: outcome %s, want %s", c->script,
                  aq_llm_outcome_name(g.outcome), aq_llm_outcome_name(c->outcome));
    ck_assert_msg(g.code == c->code, "%s: code %s, want %s", c->script, aq_strerror(g.code),
                  aq_strerror(c->code));
    ck_assert_int_eq(g.http_status, c->http_status);
    ck_assert_int_eq(g.retry_after_ms, c->retry_after_ms);
    if (c->message) ck_assert_str_eq(g.message, c->message);
    else ck_assert_msg(*g.message, "%s: no message", c->script);
    ck_assert_str_eq(g.reason, c->reason ? c->reason : g.message);
    /* nothing answered, nothing to own */
    ck_assert_ptr_null(g.reply.message_json);
    ck_assert_int_eq(f.srv->requests, 1); /* the client never retries by itself */
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* A port nobody listens on: refused at connect, no status. */
START_TEST(test_connection_refused)
{
    int port;
    int fd = aq_test_loopback_socket(0, &port); /* bound, never listening: connect is refused */
    fx f;
    fx_init(&f, "content");
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", port);
    set(&f.cfg, "llm.base_url", url);
    fx_start(&f);
    got g = {0};
    call(&f, &g, 5000);
    close(fd);
    ck_assert_int_eq(g.outcome, AQ_LLM_RETRYABLE);
    ck_assert_msg(g.code == AQ_EIO, "code %s", aq_strerror(g.code));
    ck_assert_int_eq(g.http_status, 0);
    ck_assert_msg(*g.message, "no reason given");
    ck_assert_str_eq(g.reason, g.message);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* A listener that completes the handshake and never answers: the call
 * ends at llm.timeout_ms, retryable. */
START_TEST(test_timeout)
{
    int port;
    int fd = aq_test_loopback_socket(16, &port);
    fx f;
    fx_init(&f, "content");
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", port);
    set(&f.cfg, "llm.base_url", url);
    set(&f.cfg, "llm.timeout_ms", "300");
    fx_start(&f);
    got g = {0};
    int64_t t0 = aq_mono_us();
    call(&f, &g, 5000);
    int64_t took_ms = (aq_mono_us() - t0) / 1000;
    close(fd);
    ck_assert_int_eq(g.outcome, AQ_LLM_RETRYABLE);
    ck_assert_msg(g.code == AQ_ETIMEDOUT, "code %s (%s)", aq_strerror(g.code), g.reason);
    ck_assert_int_eq(g.http_status, 0);
    ck_assert_msg(*g.reason, "no reason given");
    ck_assert_msg(took_ms >= 250 && took_ms < 3000, "timed out after %lld ms", (long long)took_ms);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

static void do_cancel(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    void **pair = arg;
    got *g = pair[1];
    g->in_call = true;
    aq_llm_cancel(pair[0]);
    g->in_call = false;
    ck_assert_int_eq(g->calls, 0); /* never from inside cancel */
}

/* Starts the fixture on /v1/hold/, where the provider answers nothing
 * until its client leaves, and sends the chat there for g; returns the
 * call's handle. */
static aq_llm_call *send_held(fx *f, got *g)
{
    fx_init(f, "hold");
    fx_start(f);
    aq_llm_call *c = NULL;
    char err[256] = "";
    ck_assert_int_eq(llm_send(f, f->chat, "gpt-test", NULL, g, &c, err, sizeof err),
                     AQ_OK);
    return c;
}

/* A cancel while the provider holds the request: ABORTED, once, later. */
START_TEST(test_cancel)
{
    fx f;
    got g = {0};
    aq_llm_call *c = send_held(&f, &g);
    void *pair[2] = {c, &g};
    struct event *ev = evtimer_new(f.base, do_cancel, pair);
    struct timeval tv = {0, 100000};
    evtimer_add(ev, &tv);
    wait_for(&f, &g, 5000);
    event_free(ev);
    ck_assert(!g.cb_inside);
    ck_assert_int_eq(f.srv->holds, 1); /* it did reach the provider */
    ck_assert_int_eq(g.outcome, AQ_LLM_ABORTED);
    ck_assert_int_eq(g.code, AQ_ECLOSED);
    ck_assert_str_eq(g.message, "");
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* Freeing the HTTP client calls an outstanding call back: retryable,
 * "client closed". */
START_TEST(test_http_closed)
{
    fx f;
    got g = {0};
    send_held(&f, &g);
    while (!f.srv->held) event_base_loop(f.base, EVLOOP_ONCE);
    aq_http_free(f.http);
    f.http = NULL;
    ck_assert_int_eq(g.calls, 1);
    ck_assert_int_eq(g.outcome, AQ_LLM_RETRYABLE);
    ck_assert_int_eq(g.code, AQ_ECLOSED);
    ck_assert_str_eq(g.reason, "client closed");
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* ---- limits ----------------------------------------------------------------- */

/* A request that cannot be built fails at once, AQ_EINVAL, no callback. */
START_TEST(test_send_unbuildable)
{
    fx f;
    fx_init(&f, "tools");
    fx_start(&f);
    got g = {0};
    char err[256] = "";
    ck_assert_int_eq(llm_send(&f, f.chat, "", NULL, &g, NULL, err, sizeof err),
                     AQ_EINVAL);
    ck_assert_str_eq(err, "cannot build the LLM request");
    /* a tool call without its result: providers reject that history */
    got a = {.take = true};
    call(&f, &a, 5000);
    ck_assert_int_eq(aq_chat_add_reply(f.chat, &a.reply, err, sizeof err), AQ_OK);
    ck_assert_int_eq(llm_send(&f, f.chat, "gpt-test", NULL, &g, NULL, err, sizeof err),
                     AQ_EINVAL);
    event_base_loop(f.base, EVLOOP_NONBLOCK);
    ck_assert_int_eq(g.calls, 0);
    ck_assert_int_eq(f.srv->requests, 1);
    got_free(&a);
    fx_stop(&f);
}
END_TEST

/* A URL aq_http refuses: AQ_EAGAIN (as the agent retries it), no callback. */
START_TEST(test_send_refused)
{
    fx f;
    fx_init(&f, "content");
    set(&f.cfg, "llm.base_url", "ftp://127.0.0.1/v1");
    fx_start(&f);
    got g = {0};
    char err[256] = "";
    ck_assert_int_eq(llm_send(&f, f.chat, "gpt-test", NULL, &g, NULL, err, sizeof err),
                     AQ_EAGAIN);
    ck_assert_msg(*err, "no reason given");
    event_base_loop(f.base, EVLOOP_NONBLOCK);
    ck_assert_int_eq(g.calls, 0);
    fx_stop(&f);
}
END_TEST

/* The key is a registered secret once the client has read it, but the
 * provider's text comes back as the provider wrote it: the agent, which
 * stores it, is the one place that masks it (test_key_echo_masked). */
START_TEST(test_key_registered_text_unmasked)
{
    fx f;
    fx_init(&f, "401");
    fx_start(&f);
    char *m = aq_log_mask_secrets("key=" KEY, strlen("key=" KEY), NULL);
    ck_assert_str_eq(m, "key=***");
    free(m);
    got g = {0};
    call(&f, &g, 5000);
    ck_assert_int_eq(g.outcome, AQ_LLM_FATAL);
    ck_assert_ptr_nonnull(strstr(g.message, KEY));
    got_free(&g);
    fx_stop(&f);
}
END_TEST


/* Azure OpenAI's style: the key in api-key (no Authorization), the
 * api-version query on every request, the deployment in the path. */
START_TEST(test_header_auth_and_query)
{
    fx f;
    fx_init(&f, "content");
    char url[160];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/{model}/", f.srv->port);
    set(&f.cfg, "llm.base_url", url);
    f.auth = AQ_AUTH_HEADER;
    f.auth_header = "api-key";
    f.query = "api-version=2024-10-21";
    fx_start(&f);
    got g = {0};
    char err[256] = "";
    /* the provider's name for the model fills {model}: here the script */
    ck_assert_int_eq(llm_send(&f, f.chat, "content", NULL, &g, NULL, err, sizeof err), AQ_OK);
    wait_for(&f, &g, 5000);
    ck_assert_int_eq(g.outcome, AQ_LLM_ANSWERED);
    ck_assert_str_eq(f.srv->path, "/v1/content/chat/completions");
    ck_assert_str_eq(f.srv->query, "api-version=2024-10-21");
    ck_assert_str_eq(f.srv->api_key, KEY);
    ck_assert(!f.srv->had_auth);
    ck_assert_ptr_nonnull(g.body); /* the body as sent, for the cache */
    ck_assert_ptr_nonnull(strstr(g.body, "\"Paris.\""));
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* A local server that takes no key gets none, even when one is set. */
START_TEST(test_no_auth)
{
    fx f;
    fx_init(&f, "content");
    f.auth = AQ_AUTH_NONE;
    fx_start(&f);
    got g = {0};
    call(&f, &g, 5000);
    ck_assert_int_eq(g.outcome, AQ_LLM_ANSWERED);
    ck_assert(!f.srv->had_auth);
    ck_assert_str_eq(f.srv->api_key, "");
    got_free(&g);
    fx_stop(&f);
}
END_TEST

/* The x-ratelimit-* headers come back with the outcome, answered or not. */
START_TEST(test_ratelimit_headers)
{
    const char *paths[] = {"limits", "429"};
    for (int i = 0; i < 2; i++) {
        fx f;
        got g = {0};
        fx_init(&f, paths[i]);
        fx_start(&f);
        call(&f, &g, 5000);
        ck_assert_int_eq(g.outcome, i == 0 ? AQ_LLM_ANSWERED : AQ_LLM_RATE_LIMITED);
        ck_assert_int_eq(g.limits.limit_requests, 500);
        ck_assert_int_eq(g.limits.limit_tokens, 30000);
        ck_assert_int_eq(g.limits.remaining_requests, 499);
        ck_assert_int_eq(g.limits.remaining_tokens, 29900);
        ck_assert_int_eq(g.limits.reset_requests_ms, 120);
        ck_assert_int_eq(g.limits.reset_tokens_ms, 360000);
        got_free(&g);
        fx_stop(&f);
    }
    /* none sent: all -1 */
    fx f;
    got g = {0};
    fx_init(&f, "content");
    fx_start(&f);
    call(&f, &g, 5000);
    ck_assert_int_eq(g.limits.remaining_requests, -1);
    ck_assert_int_eq(g.limits.reset_tokens_ms, -1);
    got_free(&g);
    fx_stop(&f);
}
END_TEST

START_TEST(test_parse_duration)
{
    struct {
        const char *text;
        int64_t ms;
    } cases[] = {
        {"20ms", 20}, {"1s", 1000}, {"1.5s", 1500}, {"6m0s", 360000}, {"1h2m3s", 3723000}, {"7", 7000},
        {"0s", 0}, {" 2s ", 2000}, {"0.001ms", 1},
        {"", -1}, {"soon", -1}, {"-1s", -1}, {"1m30", -1}, {"5x", -1}, {"1s junk", -1}, {NULL, -1},
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(cases); i++)
        ck_assert_msg(aq_llm_parse_duration(cases[i].text) == cases[i].ms, "'%s': got %lld, want %lld",
                      cases[i].text ? cases[i].text : "(null)", (long long)aq_llm_parse_duration(cases[i].text),
                      (long long)cases[i].ms);
}
END_TEST

static Suite *llm_suite(void)
{
    const TTest *core[] = {test_answered_content, test_answered_tool_calls, test_answered_not_taken,
                           test_request, test_request_without_key, test_header_auth_and_query, test_no_auth,
                           test_ratelimit_headers, test_parse_duration};
    const TTest *limits[] = {test_send_unbuildable, test_send_refused,
                             test_key_registered_text_unmasked};
    const TTest *errors[] = {test_connection_refused, test_timeout, test_cancel, test_http_closed};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 20},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 20},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 20,
         .loop_test = test_outcome, .loops = (int)AQ_ARRAY_LEN(outcome_cases)},
    };
    return aq_test_suite("llm", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void) { return aq_test_run_http(llm_suite()); }
