/* check_router.c — several providers behind one model, as a user configures
 * them: failover while the first answers 429 to everything and while it
 * answers 5xx, its return after the cooldown, a reset header honoured with
 * no 429, Azure-style header auth, limits learned from the provider,
 * weights, max_concurrent, and the response cache (hits cost 0, say
 * "cached", and only deterministic calls are kept). Real sessions on a
 * real loop against in-process simulators (mockllm.h), each a provider. */
#include "agentq/agent.h"
#include "agentq/log.h"
#include "agentq/mockllm.h"
#include "agentq/router.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <event2/event.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_RUNS 64
#define MAX_ROWS 1024

typedef struct row {
    char task_id[40], kind[8], status[16], provider[32];
    int64_t prompt_tokens, completion_tokens;
    double cost;
} row;

typedef struct run {
    aq_task *task;
    aq_session *s;
    char status[32];
    char *error;
    int steps;
    double cost;
    bool done;
} run;

typedef struct cache_entry {
    char *request, *response;
    size_t rlen;
} cache_entry;

typedef struct fx {
    struct event_base *base;
    aq_mockllm *mock[2];
    aq_config cfg;
    aq_http *http;
    aq_skills *skills;
    aq_router *router;
    aq_engine *engine;
    run runs[MAX_RUNS];
    int nruns, ndone;
    row rows[MAX_ROWS];
    int nrows;
    /* an in-memory stand-in for the store's cache verbs */
    aq_llm_cache cache;
    cache_entry entries[64];
    int nentries, gets, puts;
    char conf[64];
} fx;

static void on_step(const aq_step_event *e, void *arg)
{
    fx *f = arg;
    ck_assert_int_lt(f->nrows, MAX_ROWS);
    row *r = &f->rows[f->nrows++];
    snprintf(r->task_id, sizeof r->task_id, "%s", e->task_id);
    snprintf(r->kind, sizeof r->kind, "%s", e->kind);
    snprintf(r->status, sizeof r->status, "%s", e->status ? e->status : "");
    snprintf(r->provider, sizeof r->provider, "%s", e->provider ? e->provider : "");
    r->prompt_tokens = e->prompt_tokens;
    r->completion_tokens = e->completion_tokens;
    r->cost = e->cost_usd;
}

/* The cache answers from the loop, as the store does. */
typedef struct pending_get {
    fx *f;
    aq_cache_done done;
    void *arg;
    const cache_entry *hit;
    struct event *ev;
} pending_get;

static void on_get_ev(evutil_socket_t fd, short what, void *arg)
{
    pending_get *p = arg;
    p->done(p->arg, p->hit ? p->hit->response : NULL, p->hit ? p->hit->rlen : 0);
    event_free(p->ev);
    free(p);
}

static int mem_get(void *ctx, const char *request, size_t len, aq_cache_done done, void *arg)
{
    fx *f = ctx;
    f->gets++;
    pending_get *p = calloc(1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    p->f = f;
    p->done = done;
    p->arg = arg;
    for (int i = 0; i < f->nentries; i++)
        if (strlen(f->entries[i].request) == len && !memcmp(f->entries[i].request, request, len))
            p->hit = &f->entries[i];
    p->ev = event_new(f->base, -1, 0, on_get_ev, p);
    event_active(p->ev, EV_TIMEOUT, 0);
    return AQ_OK;
}

static void mem_put(void *ctx, const char *request, size_t len, const char *model, const char *response,
                    size_t rlen)
{
    fx *f = ctx;
    (void)model;
    f->puts++;
    ck_assert_int_lt(f->nentries, 64);
    cache_entry *e = &f->entries[f->nentries++];
    e->request = strndup(request, len);
    e->response = strndup(response, rlen);
    e->rlen = rlen;
}

static aq_mockllm *mock_new(fx *f, const aq_mockllm_config *mc)
{
    char err[256] = "";
    aq_mockllm *m = aq_mockllm_new(f->base, mc, err, sizeof err);
    ck_assert_msg(m != NULL, "aq_mockllm_new: %s", err);
    return m;
}

static aq_mockllm_config mock_config(void)
{
    aq_mockllm_config mc;
    aq_mockllm_config_defaults(&mc);
    mc.seed = 7;
    mc.latency_ms = 5;
    return mc;
}

/* Two simulators ("a" first, "b" second in the providers list) serving
 * model "m"; `extra_a`, `extra_b` go inside each provider's model entry,
 * `top` before the list. */
static void fx_init(fx *f, const aq_mockllm_config *ma, const aq_mockllm_config *mb, const char *top,
                    const char *provider_a, const char *extra_a, const char *extra_b)
{
    memset(f, 0, sizeof *f);
    f->base = event_base_new();
    f->mock[0] = mock_new(f, ma);
    f->mock[1] = mb ? mock_new(f, mb) : NULL;
    char text[4096];
    int n = snprintf(text, sizeof text,
                     "llm = { model = \"m\"; retry_backoff_ms = 20; max_retries = 2; breaker_cooldown_ms = 400; };\n"
                     "%s\nproviders = (\n"
                     "  { name = \"a\"; base_url = \"http://127.0.0.1:%d/v1\"; %s\n"
                     "    models = ( { name = \"m\"; input_per_mtok = 1.0; output_per_mtok = 2.0; %s } ); }",
                     top ? top : "", aq_mockllm_port(f->mock[0]), provider_a ? provider_a : "",
                     extra_a ? extra_a : "");
    if (mb)
        n += snprintf(text + n, sizeof text - (size_t)n,
                      ",\n  { name = \"b\"; base_url = \"http://127.0.0.1:%d/v1\";\n"
                      "    models = ( { name = \"m\"; input_per_mtok = 3.0; output_per_mtok = 4.0; %s } ); }",
                      aq_mockllm_port(f->mock[1]), extra_b ? extra_b : "");
    snprintf(text + n, sizeof text - (size_t)n, "\n);\n");
    snprintf(f->conf, sizeof f->conf, "/tmp/check_router_XXXXXX");
    int fd = mkstemp(f->conf);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    char err[512] = "";
    ck_assert_msg(aq_config_load(&f->cfg, f->conf, err, sizeof err) == AQ_OK, "%s\n%s", err, text);
}

static void fx_start(fx *f, bool with_cache)
{
    char err[256] = "";
    aq_http_config hc = {.max_connections = 256, .connect_timeout_ms = 2000, .timeout_ms = 10000};
    f->http = aq_http_new(f->base, &hc, err, sizeof err);
    ck_assert_ptr_nonnull(f->http);
    f->skills = aq_skills_new(&f->cfg, f->base, f->http, err, sizeof err);
    ck_assert_ptr_nonnull(f->skills);
    f->cache = (aq_llm_cache){mem_get, mem_put, f};
    aq_router_deps rd = {&f->cfg, f->base, f->http, with_cache ? &f->cache : NULL, false};
    f->router = aq_router_new(&rd, err, sizeof err);
    ck_assert_msg(f->router != NULL, "aq_router_new: %s", err);
    aq_engine_deps deps = {&f->cfg, f->base, f->http, f->skills, f->router, on_step, f, NULL};
    f->engine = aq_engine_new(&deps, err, sizeof err);
    ck_assert_ptr_nonnull(f->engine);
}

static void fx_stop(fx *f)
{
    ck_assert_uint_eq(aq_engine_sessions(f->engine), 0);
    aq_engine_free(f->engine);
    aq_router_free(f->router);
    aq_skills_free(f->skills);
    aq_http_free(f->http);
    for (int i = 0; i < 2; i++) aq_mockllm_free(f->mock[i]);
    for (int i = 0; i < f->nruns; i++) {
        aq_task_free(f->runs[i].task);
        free(f->runs[i].error);
    }
    for (int i = 0; i < f->nentries; i++) {
        free(f->entries[i].request);
        free(f->entries[i].response);
    }
    aq_config_free(&f->cfg);
    unlink(f->conf);
    event_base_free(f->base);
}

static void on_done(aq_session *s, const aq_session_result *res, void *arg)
{
    run *r = arg;
    fx *f = NULL;
    (void)s;
    r->done = true;
    snprintf(r->status, sizeof r->status, "%s", aq_status_name(res->status));
    r->error = res->error ? strdup(res->error) : NULL;
    r->steps = res->totals.steps;
    r->cost = res->totals.cost_usd;
    (void)f;
}

static run *start(fx *f, const char *body)
{
    ck_assert_int_lt(f->nruns, MAX_RUNS);
    run *r = &f->runs[f->nruns++];
    char *models = aq_config_task_models(&f->cfg);
    aq_task_limits lim = {aq_skills_names(f->skills), models, f->cfg.llm_model};
    aq_task_error e;
    ck_assert_msg(aq_task_parse(body, strlen(body), NULL, &lim, &r->task, &e) == AQ_OK, "%s", e.message);
    free(models);
    r->s = aq_session_start(f->engine, r->task, 1, aq_now_us() + 60 * 1000000LL, NULL, on_done, r);
    return r;
}

static bool all_done(const fx *f)
{
    for (int i = 0; i < f->nruns; i++)
        if (!f->runs[i].done) return false;
    return true;
}

static void spin(fx *f, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
}

static void run_all(fx *f, int ms)
{
    for (int waited = 0; !all_done(f) && waited < ms; waited += 10) spin(f, 10);
    ck_assert_msg(all_done(f), "sessions still running after %d ms", ms);
}

static int rows_where(const fx *f, const char *status, const char *provider)
{
    int n = 0;
    for (int i = 0; i < f->nrows; i++)
        if (!strcmp(f->rows[i].kind, "llm") && (!status || !strcmp(f->rows[i].status, status)) &&
            (!provider || !strcmp(f->rows[i].provider, provider)))
            n++;
    return n;
}

static aq_mockllm_stats stats(const fx *f, int i)
{
    aq_mockllm_stats st;
    aq_mockllm_get_stats(f->mock[i], &st);
    return st;
}

static void control(fx *f, int i, const char *body)
{
    char field[32], err[256];
    ck_assert_msg(aq_mockllm_control(f->mock[i], body, strlen(body), field, err, sizeof err) == AQ_OK, "%s", err);
}

static void assert_completed(const fx *f)
{
    for (int i = 0; i < f->nruns; i++)
        ck_assert_msg(!strcmp(f->runs[i].status, "completed"), "run %d: %s (%s)", i, f->runs[i].status,
                      f->runs[i].error ? f->runs[i].error : "");
}

/* The first provider answers 429 to everything: every call goes to the
 * second, none of the sessions waits the storm out, and each 429 was one
 * call (the pause keeps the rest off "a"). */
START_TEST(failover_on_429)
{
    fx f;
    aq_mockllm_config ma = mock_config(), mb = mock_config();
    fx_init(&f, &ma, &mb, NULL, NULL, NULL, NULL);
    fx_start(&f, false);
    control(&f, 0, "{\"storm_seconds\":30,\"retry_after\":30}");
    int64_t t0 = aq_mono_us();
    for (int i = 0; i < 10; i++) start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=2\"}");
    run_all(&f, 10000);
    assert_completed(&f);
    ck_assert_int_lt((int)((aq_mono_us() - t0) / 1000), 5000); /* nobody waited out the 30 s */
    ck_assert_uint_eq(stats(&f, 1).completed, 30);
    ck_assert_int_eq(rows_where(&f, "ok", "b"), 30);
    ck_assert_int_eq(rows_where(&f, "ok", "a"), 0);
    ck_assert_int_eq(rows_where(&f, "rate_limited", "a"), (int)stats(&f, 0).rate_limited);
    ck_assert_uint_le(stats(&f, 0).rate_limited, 10); /* at most the first burst */
    /* each call pays the price of the route that answered it: b's 3 / 4 USD
     * per million tokens, not a's 1 / 2 */
    for (int i = 0; i < f.nrows; i++) {
        const row *w = &f.rows[i];
        if (strcmp(w->kind, "llm") || strcmp(w->status, "ok")) continue;
        double want = ((double)w->prompt_tokens * 3.0 + (double)w->completion_tokens * 4.0) / 1e6;
        ck_assert(w->prompt_tokens > 0);
        ck_assert_msg(fabs(w->cost - want) < 1e-12, "cost %.12g, want %.12g at b's price", w->cost, want);
    }
    fx_stop(&f);
}
END_TEST

/* The first answers 500 to everything: its breaker opens, the rest go to
 * the second; healed, it is probed after the cooldown and answers again. */
START_TEST(failover_on_5xx_and_back)
{
    fx f;
    aq_mockllm_config ma = mock_config(), mb = mock_config();
    ma.fail_rate = 1;
    fx_init(&f, &ma, &mb, NULL, NULL, NULL, NULL);
    fx_start(&f, false);
    for (int i = 0; i < 10; i++) start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=1\"}");
    run_all(&f, 10000);
    assert_completed(&f);
    uint64_t a_fail = stats(&f, 0).failures;
    ck_assert_uint_gt(a_fail, 0);
    /* the breaker stopped the calls to a after a few (llm.breaker_failures 3,
     * plus those already sent) */
    ck_assert_uint_le(a_fail, 12);
    ck_assert_uint_eq(stats(&f, 1).completed, 20);
    ck_assert_int_eq(rows_where(&f, "error", "a"), (int)a_fail);
    /* healed; after the cooldown (400 ms, a failed probe adds 400 more) a probe
     * goes to a, it answers, and a serves again (it is first in order) */
    control(&f, 0, "{\"fail_rate\":0}");
    spin(&f, 1000);
    for (int i = 0; i < 6; i++) start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=1\"}");
    run_all(&f, 10000);
    assert_completed(&f);
    ck_assert_uint_gt(stats(&f, 0).completed, 0);
    ck_assert_int_gt(rows_where(&f, "ok", "a"), 0);
    fx_stop(&f);
}
END_TEST

/* A reply saying x-ratelimit-remaining-requests: 0 and a reset: nothing
 * goes to the provider until the reset, and no call is refused. */
START_TEST(reset_header_honoured)
{
    fx f;
    aq_mockllm_config ma = mock_config();
    ma.window_requests = 2;
    ma.window_ms = 1500;
    fx_init(&f, &ma, NULL, NULL, NULL, "requests_per_minute = 6000;", NULL);
    fx_start(&f, false);
    start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=5\"}"); /* 6 calls, one at a time */
    run_all(&f, 15000);
    assert_completed(&f);
    aq_mockllm_stats st = stats(&f, 0);
    ck_assert_uint_eq(st.rate_limited, 0);
    ck_assert_uint_eq(st.completed, 6);
    ck_assert_int_eq(rows_where(&f, "rate_limited", NULL), 0);
    fx_stop(&f);
}
END_TEST

/* Azure OpenAI's way: api-key header, api-version query, the deployment
 * in the URL; a wrong style would get 401 or 400. */
START_TEST(azure_style_auth)
{
    fx f;
    setenv("CHECK_ROUTER_AZURE_KEY", "azure-key-0123456789", 1);
    aq_mockllm_config ma = mock_config();
    ma.api_key = "azure-key-0123456789";
    ma.auth_header = "api-key";
    ma.require_query = "api-version=2024-10-21";
    fx_init(&f, &ma, NULL, NULL,
            "api_key_env = \"CHECK_ROUTER_AZURE_KEY\"; auth = \"header\"; auth_header = \"api-key\";"
            " query = \"api-version=2024-10-21\";",
            "upstream = \"prod-deployment\";", NULL);
    fx_start(&f, false);
    start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=1\"}");
    run_all(&f, 5000);
    assert_completed(&f);
    ck_assert_uint_eq(stats(&f, 0).completed, 2);
    ck_assert_uint_eq(stats(&f, 0).failures, 0);
    fx_stop(&f);
}
END_TEST

static void find_route(const aq_route_stats *st, void *arg)
{
    aq_route_stats *out = arg;
    if (!strcmp(st->provider, out->provider)) *out = *st;
}

/* A configured limit above the provider's own: the provider's header
 * wins, and the route paces to it. */
START_TEST(limit_learned_from_headers)
{
    fx f;
    aq_mockllm_config ma = mock_config();
    ma.rpm = 600;
    fx_init(&f, &ma, NULL, NULL, NULL, "requests_per_minute = 60000;", NULL);
    fx_start(&f, false);
    start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=1\"}");
    run_all(&f, 5000);
    aq_route_stats st = {.provider = "a"};
    aq_router_each(f.router, find_route, &st);
    ck_assert_int_eq(st.rpm, 600);
    ck_assert_uint_eq(st.answered, 2);
    fx_stop(&f);
}
END_TEST

/* llm.routing = "weight": calls split by the providers' weights. */
START_TEST(weighted_routing)
{
    fx f;
    aq_mockllm_config ma = mock_config(), mb = mock_config();
    fx_init(&f, &ma, &mb, "", "weight = 3;", NULL, NULL);
    char err[256];
    ck_assert_int_eq(aq_config_set(&f.cfg, "llm.routing", "weight", err, sizeof err), AQ_OK);
    fx_start(&f, false);
    for (int i = 0; i < 40; i++) start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=0\"}");
    run_all(&f, 10000);
    assert_completed(&f);
    /* 3:1 of 40 calls: 30 and 10 (smooth weighted round robin is exact) */
    ck_assert_uint_eq(stats(&f, 0).completed, 30);
    ck_assert_uint_eq(stats(&f, 1).completed, 10);
    fx_stop(&f);
}
END_TEST

/* max_concurrent holds a route at that many calls in flight; the rest go
 * to the next provider rather than wait. */
START_TEST(max_concurrent_spills_over)
{
    fx f;
    aq_mockllm_config ma = mock_config(), mb = mock_config();
    ma.latency_ms = mb.latency_ms = 200;
    fx_init(&f, &ma, &mb, NULL, NULL, "max_concurrent = 2;", NULL);
    fx_start(&f, false);
    for (int i = 0; i < 10; i++) start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=0\"}");
    run_all(&f, 5000);
    assert_completed(&f);
    ck_assert_uint_le(stats(&f, 0).peak_in_flight, 2);
    ck_assert_uint_eq(stats(&f, 0).completed + stats(&f, 1).completed, 10);
    ck_assert_uint_ge(stats(&f, 1).completed, 8);
    fx_stop(&f);
}
END_TEST

/* The cache: a deterministic call made twice is answered once by the
 * provider; the hit's row says cached, from "cache", at cost 0. A call
 * without a temperature is never cached. */
START_TEST(cache_hits_deterministic_calls)
{
    fx f;
    aq_mockllm_config ma = mock_config();
    fx_init(&f, &ma, NULL, "cache = { enabled = 1; };", NULL, NULL, NULL);
    fx_start(&f, true);
    start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=2 same\",\"temperature\":0}");
    run_all(&f, 5000);
    ck_assert_uint_eq(stats(&f, 0).completed, 3);
    ck_assert_int_eq(f.puts, 3);
    start(&f, "{\"user_id\":\"v\",\"goal\":\"steps=2 same\",\"temperature\":0}");
    run_all(&f, 5000);
    assert_completed(&f);
    ck_assert_uint_eq(stats(&f, 0).completed, 3); /* nothing new reached the provider */
    ck_assert_int_eq(rows_where(&f, "cached", "cache"), 3);
    for (int i = 0; i < f.nrows; i++)
        if (!strcmp(f.rows[i].status, "cached")) ck_assert(f.rows[i].cost == 0);
    ck_assert(f.runs[1].cost == 0);
    ck_assert_int_eq(f.runs[1].steps, 3);
    /* another temperature is another request; none is not deterministic */
    start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=0 same\",\"temperature\":0.5}");
    start(&f, "{\"user_id\":\"u\",\"goal\":\"steps=0 other\"}");
    run_all(&f, 5000);
    ck_assert_uint_eq(stats(&f, 0).completed, 5);
    ck_assert_int_eq(f.puts, 3); /* 0.5 is above cache.max_temperature 0; none never */
    fx_stop(&f);
}
END_TEST

static Suite *router_suite(void)
{
    const TTest *failover[] = {failover_on_429, failover_on_5xx_and_back, max_concurrent_spills_over,
                               weighted_routing};
    const TTest *limits[] = {reset_header_honoured, limit_learned_from_headers, azure_style_auth};
    const TTest *cache[] = {cache_hits_deterministic_calls};
    const aq_tcase_spec tcases[] = {
        {.name = "failover", .tests = failover, .n_tests = AQ_ARRAY_LEN(failover), .timeout_s = 60},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 60},
        {.name = "cache", .tests = cache, .n_tests = AQ_ARRAY_LEN(cache), .timeout_s = 30},
    };
    return aq_test_suite("router", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void) { return aq_test_run_http(router_suite()); }
