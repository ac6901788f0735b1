/* check_http.c — the HTTP client against an in-process evhttp server on
 * 127.0.0.1 sharing the client's event_base: bodies and headers both ways,
 * concurrency and connection reuse on one thread, timeouts that start when
 * the transfer starts, cancel and free calling back exactly once, response
 * size limits, Retry-After, and the block_private address guard: the range
 * table edge by edge, this host's own address with a real listener on it,
 * redirects, pooled connections (no packet leaves this host: refused
 * addresses are refused before the socket exists). */
#include "agentq/http.h"

#include <arpa/inet.h>
#include <check.h>
#include "held.h"
#include "suite.h"
#include "testenv.h"
#include <event2/buffer.h>
#include <event2/bufferevent.h>
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

#define BIG_LEN (1024 * 1024)

/* ---- the test server ------------------------------------------------- */

struct srv {
    struct evhttp *http;
    int port;
    int accepted;       /* TCP connections accepted */
    int requests;       /* requests received */
    aq_test_held_set held; /* the /slow requests */
};

static struct bufferevent *srv_new_conn(struct event_base *base, void *arg)
{
    struct srv *s = arg;
    s->accepted++;
    return bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
}

static void reply(struct evhttp_request *r, int code, const char *reason, const char *body)
{
    evbuffer_add(evhttp_request_get_output_buffer(r), body, strlen(body));
    evhttp_send_reply(r, code, reason, NULL);
}

static void srv_handle(struct evhttp_request *r, void *arg)
{
    struct srv *s = arg;
    s->requests++;
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(r);
    const char *path = evhttp_uri_get_path(u);
    const char *query = evhttp_uri_get_query(u);
    struct evkeyvalq *out_h = evhttp_request_get_output_headers(r);
    char loc[128];

    if (strcmp(path, "/ok") == 0) {
        evhttp_add_header(out_h, "X-Server", "agentq-test");
        reply(r, 200, "OK", "hello from ok");
    } else if (strcmp(path, "/slow") == 0) {
        int ms = 200;
        if (query && strncmp(query, "ms=", 3) == 0) ms = atoi(query + 3);
        aq_test_hold(&s->held, r, ms, 200, "slow reply");
    } else if (strcmp(path, "/big") == 0 || strcmp(path, "/bigchunked") == 0) {
        char *big = malloc(BIG_LEN);
        ck_assert_ptr_nonnull(big);
        memset(big, 'b', BIG_LEN);
        if (strcmp(path, "/big") == 0) {
            evbuffer_add(evhttp_request_get_output_buffer(r), big, BIG_LEN);
            evhttp_send_reply(r, 200, "OK", NULL);
        } else {
            /* no Content-Length: only the running count can stop it */
            struct evbuffer *chunk = evbuffer_new();
            evhttp_send_reply_start(r, 200, "OK");
            for (int i = 0; i < 16; i++) {
                evbuffer_add(chunk, big + i * (BIG_LEN / 16), BIG_LEN / 16);
                evhttp_send_reply_chunk(r, chunk);
            }
            evhttp_send_reply_end(r);
            evbuffer_free(chunk);
        }
        free(big);
    } else if (strcmp(path, "/status/429") == 0) {
        evhttp_add_header(out_h, "Retry-After", "2");
        reply(r, 429, "Too Many Requests", "slow down");
    } else if (strcmp(path, "/echo") == 0) {
        struct evkeyvalq *in_h = evhttp_request_get_input_headers(r);
        const char *t = evhttp_find_header(in_h, "X-Test");
        evhttp_add_header(out_h, "X-Echo", t ? t : "(none)");
        evhttp_add_header(out_h, "X-Method",
                          evhttp_request_get_command(r) == EVHTTP_REQ_POST ? "POST" : "other");
        evbuffer_add_buffer(evhttp_request_get_output_buffer(r),
                            evhttp_request_get_input_buffer(r));
        evhttp_send_reply(r, 200, "OK", NULL);
    } else if (strcmp(path, "/redirect") == 0) {
        evhttp_add_header(out_h, "Location", "/ok");
        reply(r, 302, "Found", "go to /ok");
    } else if (strcmp(path, "/redirect-ip") == 0) {
        snprintf(loc, sizeof loc, "http://127.0.0.1:%d/ok", s->port);
        evhttp_add_header(out_h, "Location", loc);
        reply(r, 302, "Found", "go");
    } else if (strcmp(path, "/redirect-ftp") == 0) {
        snprintf(loc, sizeof loc, "ftp://127.0.0.1:%d/file", s->port);
        evhttp_add_header(out_h, "Location", loc);
        reply(r, 302, "Found", "go");
    } else if (strcmp(path, "/goto") == 0 && query) {
        evhttp_add_header(out_h, "Location", query); /* /goto?<absolute URL> */
        reply(r, 302, "Found", "go");
    } else if (strcmp(path, "/redirect-loop") == 0) {
        evhttp_add_header(out_h, "Location", "/redirect-loop");
        reply(r, 302, "Found", "again");
    } else {
        reply(r, 404, "Not Found", "no such path");
    }
}

static struct srv *srv_start_on(struct event_base *base, const char *host)
{
    struct srv *s = calloc(1, sizeof *s);
    ck_assert_ptr_nonnull(s);
    aq_test_held_init(&s->held, base);
    s->http = aq_test_httpd_on(base, host, srv_handle, s, &s->port);
    /* Counts accepted connections (the reuse tests). */
    evhttp_set_bevcb(s->http, srv_new_conn, s);
    return s;
}

static struct srv *srv_start(struct event_base *base)
{
    return srv_start_on(base, "127.0.0.1");
}

static void srv_stop(struct srv *s)
{
    aq_test_held_flush(&s->held, 503, "slow reply");
    evhttp_free(s->http);
    free(s);
}

/* ---- the client side ------------------------------------------------- */

struct fx {
    struct event_base *base;
    struct srv *srv;
    aq_http *http;
    char url[128];
};

static void fx_start(struct fx *f, int max_connections)
{
    memset(f, 0, sizeof *f);
    f->base = event_base_new();
    ck_assert_ptr_nonnull(f->base);
    f->srv = srv_start(f->base);
    aq_http_config cfg = {.max_connections = max_connections, .connect_timeout_ms = 2000,
                          .timeout_ms = 10000, .user_agent = "check_http"};
    char err[256] = "";
    f->http = aq_http_new(f->base, &cfg, err, sizeof err);
    ck_assert_msg(f->http != NULL, "aq_http_new: %s", err);
}

static void fx_stop(struct fx *f)
{
    aq_http_free(f->http);
    srv_stop(f->srv);
    event_base_free(f->base);
}

static const char *url(struct fx *f, const char *host, const char *path)
{
    snprintf(f->url, sizeof f->url, "http://%s:%d%s", host, f->srv->port, path);
    return f->url;
}

/* What one callback saw, copied out of the borrowed result. */
struct got {
    int calls;
    int code;
    long status;
    char *body;
    size_t len;
    int64_t retry_after_ms, total_ms, queue_ms;
    char error[512];
    char hdr[3][128];     /* X-Server, X-Echo, X-Method */
    int *counter;         /* bumped on every call when set */
    aq_http *free_me;     /* freed from inside the callback when set */
};

static void copy_hdr(char *dst, const aq_http_result *res, const char *name)
{
    const char *v = aq_http_result_header(res, name);
    snprintf(dst, 128, "%s", v ? v : "");
}

static void got_cb(aq_http_req *req, const aq_http_result *res, void *arg)
{
    struct got *g = arg;
    (void)req;
    g->calls++;
    g->code = res->code;
    g->status = res->status;
    free(g->body);
    g->body = malloc(res->body_len + 1);
    ck_assert_ptr_nonnull(g->body);
    memcpy(g->body, res->body, res->body_len + 1); /* includes the NUL */
    g->len = res->body_len;
    g->retry_after_ms = res->retry_after_ms;
    g->total_ms = res->total_ms;
    g->queue_ms = res->queue_ms;
    snprintf(g->error, sizeof g->error, "%s", res->error);
    copy_hdr(g->hdr[0], res, "x-server");
    copy_hdr(g->hdr[1], res, "X-Echo");
    copy_hdr(g->hdr[2], res, "X-Method");
    if (g->counter) (*g->counter)++;
    if (g->free_me) aq_http_free(g->free_me);
}


static aq_http_req *submit(struct fx *f, const aq_http_request *rq, struct got *g)
{
    aq_http_req *req = NULL;
    char err[256] = "";
    int rc = aq_http_submit(f->http, rq, got_cb, g, &req, err, sizeof err);
    ck_assert_msg(rc == AQ_OK, "submit %s: %s", rq->url, err);
    ck_assert_ptr_nonnull(req);
    return req;
}

static void get_one(struct fx *f, const aq_http_request *rq, struct got *g)
{
    submit(f, rq, g);
    ck_assert_int_eq(g->calls, 0); /* never from inside submit */
    aq_test_loop_until(f->base, &g->calls, 1, 10000);
    ck_assert_int_eq(g->calls, 1);
}

/* Submits A (to path_a) then B (to /ok), each with its own timeout (0:
 * the client's), both counting their callbacks into *done; returns B's
 * handle. On a client with one slot, B waits for A. */
static aq_http_req *submit_a_then_b(struct fx *f, const char *path_a, int timeout_a_ms,
                                    int timeout_b_ms, struct got *a, struct got *b, int *done)
{
    a->counter = b->counter = done;
    char ua[128];
    snprintf(ua, sizeof ua, "%s", url(f, "127.0.0.1", path_a));
    aq_http_request ra = {.url = ua, .timeout_ms = timeout_a_ms};
    aq_http_request rb = {.url = url(f, "127.0.0.1", "/ok"), .timeout_ms = timeout_b_ms};
    submit(f, &ra, a);
    return submit(f, &rb, b);
}

/* ---- core -------------------------------------------------------------- */

START_TEST(test_get)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/ok")};
    get_one(&f, &rq, &g);
    ck_assert_msg(g.code == AQ_OK, "%s", g.error);
    ck_assert_int_eq(g.status, 200);
    ck_assert_str_eq(g.body, "hello from ok");
    ck_assert_uint_eq(g.len, strlen("hello from ok"));
    ck_assert_str_eq(g.hdr[0], "agentq-test"); /* case-insensitive lookup */
    ck_assert_str_eq(g.hdr[1], "");            /* absent header */
    ck_assert_int_eq(g.retry_after_ms, -1);
    ck_assert_str_eq(g.error, "");

    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_uint_eq(st.completed, 1);
    ck_assert_uint_eq(st.failed, 0);
    ck_assert_uint_eq(st.inflight, 0);
    ck_assert_uint_eq(st.sockets_opened, 1);
    ck_assert_uint_eq(st.open_sockets, 1); /* kept alive */
    free(g.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_post_echo)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0};
    static const char payload[] = "{\"a\":1}\0binary tail";
    char *body = malloc(sizeof payload);
    memcpy(body, payload, sizeof payload);
    const char *hdrs[] = {"X-Test: abc 123", "Authorization: Bearer sk-not-a-real-key",
                          "Content-Type: application/json"};
    aq_http_request rq = {.method = AQ_HTTP_POST, .url = url(&f, "127.0.0.1", "/echo"),
                          .headers = hdrs, .nheaders = 3,
                          .body = body, .body_len = sizeof payload};
    submit(&f, &rq, &g);
    /* the body was copied: scribbling on ours changes nothing */
    memset(body, 'X', sizeof payload);
    free(body);
    aq_test_loop_until(f.base, &g.calls, 1, 10000);
    ck_assert_int_eq(g.calls, 1);
    ck_assert_msg(g.code == AQ_OK, "%s", g.error);
    ck_assert_int_eq(g.status, 200);
    ck_assert_uint_eq(g.len, sizeof payload);
    ck_assert(memcmp(g.body, payload, sizeof payload) == 0);
    ck_assert_str_eq(g.hdr[1], "abc 123");
    ck_assert_str_eq(g.hdr[2], "POST");
    free(g.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_redirect)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/redirect"), .follow_redirects = true};
    get_one(&f, &rq, &g);
    ck_assert_msg(g.code == AQ_OK, "%s", g.error);
    ck_assert_int_eq(g.status, 200);
    ck_assert_str_eq(g.body, "hello from ok");
    ck_assert_str_eq(g.hdr[0], "agentq-test"); /* headers of the last response */

    struct got g2 = {0};
    rq.follow_redirects = false;
    get_one(&f, &rq, &g2);
    ck_assert_int_eq(g2.code, AQ_OK);
    ck_assert_int_eq(g2.status, 302);
    ck_assert_str_eq(g2.body, "go to /ok");
    free(g.body);
    free(g2.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_retry_after)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/status/429")};
    get_one(&f, &rq, &g);
    ck_assert_int_eq(g.code, AQ_OK); /* an HTTP error status is still a response */
    ck_assert_int_eq(g.status, 429);
    ck_assert_int_eq(g.retry_after_ms, 2000);
    ck_assert_str_eq(g.body, "slow down");
    free(g.body);
    fx_stop(&f);
}
END_TEST

/* Each request is submitted from the previous one's callback: all ride on
 * one kept-alive connection. */
struct chain {
    struct fx *f;
    int left, done, failures;
};

static void chain_cb(aq_http_req *req, const aq_http_result *res, void *arg)
{
    struct chain *c = arg;
    (void)req;
    c->done++;
    if (res->code != AQ_OK || res->status != 200) c->failures++;
    if (--c->left > 0) {
        aq_http_request rq = {.url = c->f->url};
        char err[128];
        ck_assert_int_eq(aq_http_submit(c->f->http, &rq, chain_cb, c, NULL, err, sizeof err), 0);
    }
}

START_TEST(test_keepalive_reuse)
{
    struct fx f;
    fx_start(&f, 4);
    struct chain c = {.f = &f, .left = 5};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/ok")};
    char err[128];
    ck_assert_int_eq(aq_http_submit(f.http, &rq, chain_cb, &c, NULL, err, sizeof err), 0);
    aq_test_loop_until(f.base, &c.done, 5, 10000);
    ck_assert_int_eq(c.done, 5);
    ck_assert_int_eq(c.failures, 0);
    ck_assert_int_eq(f.srv->accepted, 1);
    ck_assert_int_eq(f.srv->requests, 5);
    fx_stop(&f);
}
END_TEST

/* ---- limits ------------------------------------------------------------ */

START_TEST(test_concurrency_one_thread)
{
    enum { N = 500, SLOTS = 50, SLOW_MS = 200 };
    struct fx f;
    fx_start(&f, SLOTS);
    static struct got g[N];
    memset(g, 0, sizeof g);
    int done = 0;
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/slow?ms=200")};
    int64_t t0 = aq_mono_us();
    for (int i = 0; i < N; i++) {
        g[i].counter = &done;
        submit(&f, &rq, &g[i]);
    }
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_uint_eq(st.inflight, N);
    ck_assert_uint_eq(st.active, SLOTS);
    ck_assert_uint_eq(st.queued, N - SLOTS);

    aq_test_loop_until(f.base, &done, N, 20000);
    int64_t ms = (aq_mono_us() - t0) / 1000;
    ck_assert_int_eq(done, N);
    for (int i = 0; i < N; i++) {
        ck_assert_msg(g[i].calls == 1 && g[i].code == AQ_OK && g[i].status == 200,
                      "request %d: calls %d code %d status %ld %s", i, g[i].calls,
                      g[i].code, g[i].status, g[i].error);
        free(g[i].body);
    }
    /* Sequentially this is 100 s; 50 at a time it is 10 rounds of 200 ms. */
    ck_assert_msg(ms < 5000, "took %lld ms", (long long)ms);
    ck_assert_msg(ms >= (N / SLOTS) * SLOW_MS - 50, "only %lld ms: slot limit not kept",
                  (long long)ms);
    ck_assert_msg(f.srv->held.peak <= SLOTS && f.srv->held.peak >= SLOTS / 2,
                  "server saw %d at once", f.srv->held.peak);
    ck_assert_msg(f.srv->accepted <= SLOTS, "%d connections for %d slots",
                  f.srv->accepted, SLOTS);
    ck_assert_int_eq(f.srv->requests, N);
    aq_http_stats_get(f.http, &st);
    ck_assert_uint_le(st.sockets_opened, SLOTS);
    ck_assert_uint_le(st.open_sockets, SLOTS);
    ck_assert_uint_eq(st.completed, N);
    ck_assert_uint_eq(st.inflight, 0);
    fx_stop(&f);
}
END_TEST

START_TEST(test_timeout_silent_server)
{
    struct fx f;
    fx_start(&f, 4);
    int port;
    int lfd = aq_test_loopback_socket(16, &port); /* completes handshakes, never answers */
    char u[128];
    snprintf(u, sizeof u, "http://127.0.0.1:%d/never", port);
    struct got g = {0};
    aq_http_request rq = {.url = u, .timeout_ms = 300};
    get_one(&f, &rq, &g);
    ck_assert_int_eq(g.code, AQ_ETIMEDOUT);
    ck_assert_int_eq(g.status, 0);
    ck_assert_msg(strstr(g.error, "timed out") != NULL, "%s", g.error);
    ck_assert_msg(g.total_ms >= 280 && g.total_ms < 3000, "total %lld ms",
                  (long long)g.total_ms);
    close(lfd);
    free(g.body);
    fx_stop(&f);
}
END_TEST

/* With one slot, B waits ~600 ms behind A; its 300 ms timeout must not
 * count that wait (curl's CURLOPT_TIMEOUT_MS would, if curl queued it). */
START_TEST(test_timeout_starts_at_transfer)
{
    struct fx f;
    fx_start(&f, 1);
    struct got a = {0}, b = {0};
    int done = 0;
    submit_a_then_b(&f, "/slow?ms=600", 5000, 300, &a, &b, &done);
    aq_test_loop_until(f.base, &done, 2, 10000);
    ck_assert_int_eq(done, 2);
    ck_assert_msg(a.code == AQ_OK, "%s", a.error);
    ck_assert_msg(b.code == AQ_OK, "B: %s", b.error);
    ck_assert_str_eq(b.body, "hello from ok");
    ck_assert_msg(b.queue_ms >= 500, "B queued %lld ms", (long long)b.queue_ms);
    ck_assert_int_ge(b.total_ms, b.queue_ms);
    ck_assert_int_eq(f.srv->accepted, 1);
    free(a.body);
    free(b.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_max_response_bytes)
{
    struct fx f;
    fx_start(&f, 4);
    const char *paths[] = {"/big", "/bigchunked"}; /* Content-Length, then counted */
    for (size_t i = 0; i < 2; i++) {
        char u[128];
        snprintf(u, sizeof u, "%s", url(&f, "127.0.0.1", paths[i]));
        struct got small = {0}, fits = {0};
        aq_http_request rq = {.url = u, .max_response_bytes = 1000};
        get_one(&f, &rq, &small);
        ck_assert_msg(small.code == AQ_EPROTO, "%s: code %d", paths[i], small.code);
        ck_assert_str_eq(small.error, "response larger than 1000 bytes");
        ck_assert_uint_le(small.len, 1000);

        rq.max_response_bytes = BIG_LEN; /* exactly the size: allowed */
        get_one(&f, &rq, &fits);
        ck_assert_msg(fits.code == AQ_OK, "%s: %s", paths[i], fits.error);
        ck_assert_uint_eq(fits.len, BIG_LEN);
        ck_assert(fits.body[0] == 'b' && fits.body[BIG_LEN - 1] == 'b' && fits.body[BIG_LEN] == 0);
        free(small.body);
        free(fits.body);
    }
    fx_stop(&f);
}
END_TEST

START_TEST(test_too_many_redirects)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/redirect-loop"), .follow_redirects = true};
    get_one(&f, &rq, &g);
    ck_assert_int_eq(g.code, AQ_EPROTO);
    ck_assert_int_eq(f.srv->requests, 1 + AQ_HTTP_MAX_REDIRECTS);
    free(g.body);
    fx_stop(&f);
}
END_TEST

/* ---- errors ------------------------------------------------------------ */

static void cancel_later(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    aq_http_cancel(arg);
}

START_TEST(test_cancel_in_flight)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/slow?ms=3000")};
    aq_http_req *req = submit(&f, &rq, &g);
    struct event *t = evtimer_new(f.base, cancel_later, req);
    struct timeval tv = {0, 100000};
    evtimer_add(t, &tv);
    aq_test_loop_until(f.base, &g.calls, 1, 5000);
    ck_assert_int_eq(g.calls, 1);
    ck_assert_int_eq(g.code, AQ_ECLOSED);
    ck_assert_str_eq(g.error, "cancelled");
    ck_assert_msg(g.total_ms >= 90 && g.total_ms < 1500, "total %lld ms", (long long)g.total_ms);
    ck_assert_int_eq(f.srv->requests, 1); /* it was really in flight */
    aq_test_loop_for(f.base, 200);
    ck_assert_int_eq(g.calls, 1);
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_uint_eq(st.inflight, 0);
    ck_assert_uint_eq(st.active, 0);
    ck_assert_uint_eq(st.failed, 1);
    event_free(t);
    free(g.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_cancel_queued)
{
    struct fx f;
    fx_start(&f, 1);
    struct got a = {0}, b = {0};
    int done = 0;
    aq_http_req *rqb = submit_a_then_b(&f, "/slow?ms=300", 0, 0, &a, &b, &done);
    aq_http_cancel(rqb);
    ck_assert_int_eq(b.calls, 0); /* never from inside cancel */
    aq_test_loop_until(f.base, &done, 2, 5000);
    ck_assert_int_eq(b.calls, 1);
    ck_assert_int_eq(b.code, AQ_ECLOSED);
    ck_assert_str_eq(b.error, "cancelled");
    ck_assert_int_eq(a.calls, 1);
    ck_assert_msg(a.code == AQ_OK, "%s", a.error);
    aq_test_loop_for(f.base, 100);
    ck_assert_int_eq(f.srv->requests, 1); /* B never reached the server */
    ck_assert_int_eq(b.calls, 1);
    free(a.body);
    free(b.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_free_calls_back_once)
{
    struct fx f;
    fx_start(&f, 2);
    struct got g[4] = {{0}};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/slow?ms=5000")};
    for (int i = 0; i < 4; i++) submit(&f, &rq, &g[i]); /* 2 active, 2 queued */
    aq_test_loop_for(f.base, 100);
    for (int i = 0; i < 4; i++) ck_assert_int_eq(g[i].calls, 0);
    aq_http_free(f.http);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(g[i].calls, 1);
        ck_assert_int_eq(g[i].code, AQ_ECLOSED);
        ck_assert_str_eq(g[i].error, "client closed");
        free(g[i].body);
    }
    f.http = NULL;
    fx_stop(&f);
}
END_TEST

START_TEST(test_free_from_callback)
{
    struct fx f;
    fx_start(&f, 4);
    struct got first = {0}, other = {0};
    first.free_me = f.http;
    char u1[128];
    snprintf(u1, sizeof u1, "%s", url(&f, "127.0.0.1", "/ok"));
    aq_http_request r1 = {.url = u1};
    aq_http_request r2 = {.url = url(&f, "127.0.0.1", "/slow?ms=5000")};
    submit(&f, &r1, &first);
    submit(&f, &r2, &other);
    aq_test_loop_until(f.base, &first.calls, 1, 5000);
    ck_assert_int_eq(first.calls, 1);
    ck_assert_int_eq(first.code, AQ_OK);
    ck_assert_int_eq(other.calls, 1);
    ck_assert_int_eq(other.code, AQ_ECLOSED);
    f.http = NULL;
    aq_test_loop_for(f.base, 50);
    ck_assert_int_eq(other.calls, 1);
    free(first.body);
    free(other.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_network_errors)
{
    struct fx f;
    fx_start(&f, 4);
    /* a port nobody listens on */
    int port;
    close(aq_test_loopback_socket(16, &port));
    char u[128];
    snprintf(u, sizeof u, "http://127.0.0.1:%d/", port);
    struct got g = {0};
    aq_http_request rq = {.url = u};
    get_one(&f, &rq, &g);
    ck_assert_int_eq(g.code, AQ_EIO);
    ck_assert_msg(g.error[0] != '\0', "no error text");

    /* a redirect to a scheme other than http/https is not followed */
    struct got g2 = {0};
    aq_http_request r2 = {.url = url(&f, "127.0.0.1", "/redirect-ftp"), .follow_redirects = true};
    get_one(&f, &r2, &g2);
    ck_assert_int_eq(g2.code, AQ_EPROTO);
    free(g.body);
    free(g2.body);
    fx_stop(&f);
}
END_TEST

START_TEST(test_submit_rejects)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0};
    char err[256];
    const char *bad_urls[] = {"not a url", "ftp://127.0.0.1/x", "file:///etc/passwd",
                              "gopher://127.0.0.1/", ""};
    for (size_t i = 0; i < AQ_ARRAY_LEN(bad_urls); i++) {
        aq_http_request rq = {.url = bad_urls[i]};
        aq_http_req *out = (aq_http_req *)&g; /* must be cleared */
        err[0] = '\0';
        ck_assert_msg(aq_http_submit(f.http, &rq, got_cb, &g, &out, err, sizeof err) == AQ_EINVAL,
                      "accepted %s", bad_urls[i]);
        ck_assert_ptr_null(out);
        ck_assert_msg(err[0] != '\0', "no message for %s", bad_urls[i]);
    }
    const char *inject[] = {"X-A: 1\r\nX-Injected: 2"};
    const char *noname[] = {"just words"};
    aq_http_request rh = {.url = url(&f, "127.0.0.1", "/ok"), .headers = inject, .nheaders = 1};
    ck_assert_int_eq(aq_http_submit(f.http, &rh, got_cb, &g, NULL, err, sizeof err), AQ_EINVAL);
    ck_assert_ptr_null(strstr(err, "X-Injected")); /* headers may be secrets */
    rh.headers = noname;
    ck_assert_int_eq(aq_http_submit(f.http, &rh, got_cb, &g, NULL, err, sizeof err), AQ_EINVAL);
    aq_http_request rm = {.url = url(&f, "127.0.0.1", "/ok"), .method = (aq_http_method)7};
    ck_assert_int_eq(aq_http_submit(f.http, &rm, got_cb, &g, NULL, err, sizeof err), AQ_EINVAL);
    ck_assert_int_eq(aq_http_submit(f.http, &rm, NULL, &g, NULL, err, sizeof err), AQ_EINVAL);
    aq_http_cancel(NULL);
    aq_test_loop_for(f.base, 50);
    ck_assert_int_eq(g.calls, 0); /* a failed submit never calls back */
    ck_assert_int_eq(f.srv->requests, 0);
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_uint_eq(st.inflight, 0);
    fx_stop(&f);
}
END_TEST

/* block_private: every one of these is refused before a socket exists. */
START_TEST(test_block_private_refuses)
{
    struct fx f;
    fx_start(&f, 4);
    char u[5][128];
    snprintf(u[0], 128, "http://127.0.0.1:%d/ok", f.srv->port);
    snprintf(u[1], 128, "http://10.0.0.1:%d/ok", f.srv->port);
    snprintf(u[2], 128, "http://169.254.169.254/latest/meta-data/");
    snprintf(u[3], 128, "http://[::1]:%d/ok", f.srv->port);
    snprintf(u[4], 128, "http://localhost:%d/ok", f.srv->port);
    /* loopback is this host's own address too where lo carries it, so
     * the reason is matched from the range on */
    const char *want[] = {
        "loopback address (127.0.0.0/8) (not allowlisted)",
        "refused to connect to 10.0.0.1: private address (10.0.0.0/8) (not allowlisted)",
        "refused to connect to 169.254.169.254: cloud metadata address (169.254.169.254/32) "
        "(not allowlisted)",
        "loopback address (::1/128) (not allowlisted)",
        "loopback address (", /* ::1 or 127.0.0.1, whichever first */
    };
    const char *who[] = {"127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", ""};
    const char *other_host[] = {"example.com"}; /* an allowlist that does not match */
    for (int i = 0; i < 5; i++) {
        struct got g = {0};
        aq_http_request rq = {.url = u[i], .block_private = true, .timeout_ms = 3000,
                              .allowlist = other_host, .nallowlist = 1};
        get_one(&f, &rq, &g);
        ck_assert_msg(g.code == AQ_EINVAL, "%s: code %d (%s)", u[i], g.code, g.error);
        ck_assert_msg(strstr(g.error, want[i]) != NULL, "%s: %s", u[i], g.error);
        char head[64];
        snprintf(head, sizeof head, "refused to connect to %s", who[i]);
        ck_assert_msg(strncmp(g.error, head, strlen(head)) == 0, "%s: %s", u[i], g.error);
        free(g.body);
    }
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_uint_eq(st.sockets_opened, 0);
    ck_assert_int_eq(f.srv->accepted, 0);
    fx_stop(&f);
}
END_TEST

START_TEST(test_block_private_allowlist)
{
    struct fx f;
    fx_start(&f, 4);
    const char *allow[] = {"LocalHost.", "127.0.0.1"};
    char u[128];
    snprintf(u, sizeof u, "%s", url(&f, "localhost", "/ok"));
    struct got g = {0};
    aq_http_request rq = {.url = u, .block_private = true, .allowlist = allow, .nallowlist = 1};
    get_one(&f, &rq, &g);
    ck_assert_msg(g.code == AQ_OK, "%s", g.error);
    ck_assert_str_eq(g.body, "hello from ok");

    struct got g2 = {0};
    rq.url = url(&f, "127.0.0.1", "/ok");
    rq.nallowlist = 2;
    get_one(&f, &rq, &g2);
    ck_assert_msg(g2.code == AQ_OK, "%s", g2.error);

    /* only "localhost" allowed: the redirect's new connection to 127.0.0.1
     * is checked again and refused */
    struct got g3 = {0};
    snprintf(u, sizeof u, "%s", url(&f, "localhost", "/redirect-ip"));
    rq.url = u;
    rq.nallowlist = 1;
    rq.follow_redirects = true;
    int before = f.srv->requests;
    get_one(&f, &rq, &g3);
    ck_assert_int_eq(g3.code, AQ_EINVAL);
    ck_assert_msg(strncmp(g3.error, "refused to connect to 127.0.0.1: ", 33) == 0 &&
                      strstr(g3.error, "loopback address (127.0.0.0/8) (not allowlisted)"),
                  "%s", g3.error);
    ck_assert_int_eq(f.srv->requests, before + 1); /* the redirect, not /ok */
    free(g.body);
    free(g2.body);
    free(g3.body);
    fx_stop(&f);
}
END_TEST

/* curl ignores FRESH_CONNECT when it follows a redirect: a redirect to a
 * host an unguarded request left a kept-alive connection to must still be
 * judged (on the connection's address) and refused. */
START_TEST(test_block_private_redirect_no_pooled_connection)
{
    struct fx f;
    fx_start(&f, 4);
    struct got plain = {0}, g = {0};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/ok")};
    get_one(&f, &rq, &plain); /* leaves a kept-alive connection to 127.0.0.1 */
    ck_assert_int_eq(plain.code, AQ_OK);
    int oks = f.srv->requests;

    const char *allow[] = {"localhost"};
    char u[128];
    snprintf(u, sizeof u, "%s", url(&f, "localhost", "/redirect-ip"));
    aq_http_request guarded = {.url = u, .block_private = true, .follow_redirects = true,
                               .allowlist = allow, .nallowlist = 1, .timeout_ms = 3000};
    get_one(&f, &guarded, &g);
    ck_assert_msg(g.code == AQ_EINVAL, "code %d (%s), body %s", g.code, g.error,
                  g.body ? g.body : "");
    ck_assert_msg(strncmp(g.error, "refused to connect to 127.0.0.1: ", 33) == 0, "%s", g.error);
    ck_assert_int_eq(f.srv->requests, oks + 1); /* /redirect-ip, never /ok */
    free(plain.body);
    free(g.body);
    fx_stop(&f);
}
END_TEST

/* This host's own address is refused whatever its range (on a host whose
 * address is public just the same): a real listener on the first
 * non-loopback interface address answers an unguarded request, and a
 * guarded one never reaches it, directly or through a redirect from an
 * allowlisted server. The allowlist still lets it through. */
START_TEST(test_block_private_own_address)
{
    char ip[INET6_ADDRSTRLEN + 64];
    if (!aq_test_own_addr(ip, sizeof ip)) {
        printf("test_block_private_own_address skipped: %s\n", ip);
        return;
    }
    struct fx f;
    fx_start(&f, 4);
    struct srv *own = srv_start_on(f.base, ip);
    char own_url[128], head[256];
    aq_test_url(own_url, sizeof own_url, ip, own->port, "/ok");
    snprintf(head, sizeof head, "refused to connect to %s: this host's own address", ip);

    struct got plain = {0};
    aq_http_request rq = {.url = own_url, .timeout_ms = 3000};
    get_one(&f, &rq, &plain);
    ck_assert_msg(plain.code == AQ_OK && plain.status == 200, "the listener on %s: %s", ip,
                  plain.error);
    int reached = own->requests;

    const char *other_host[] = {"example.com"};
    struct got g = {0};
    rq.block_private = true;
    rq.allowlist = other_host;
    rq.nallowlist = 1;
    aq_http_stats before, after;
    aq_http_stats_get(f.http, &before);
    get_one(&f, &rq, &g);
    aq_http_stats_get(f.http, &after);
    ck_assert_msg(g.code == AQ_EINVAL, "%s: code %d (%s)", own_url, g.code, g.error);
    ck_assert_msg(strncmp(g.error, head, strlen(head)) == 0, "%s", g.error);
    ck_assert_msg(strstr(g.error, "(not allowlisted)"), "%s", g.error);
    ck_assert_uint_eq(after.sockets_opened, before.sockets_opened);

    /* an allowlisted server redirecting to it */
    const char *allow_lo[] = {"127.0.0.1"};
    char via[256];
    snprintf(via, sizeof via, "http://127.0.0.1:%d/goto?%s", f.srv->port, own_url);
    struct got r = {0};
    aq_http_request rr = {.url = via, .block_private = true, .follow_redirects = true,
                          .allowlist = allow_lo, .nallowlist = 1, .timeout_ms = 3000};
    get_one(&f, &rr, &r);
    ck_assert_msg(r.code == AQ_EINVAL, "%s: code %d (%s)", via, r.code, r.error);
    ck_assert_msg(strncmp(r.error, head, strlen(head)) == 0, "%s", r.error);
    ck_assert_int_eq(own->requests, reached);

    /* the allowlist is the one way in */
    const char *allow_own[] = {ip};
    struct got ok = {0};
    rq.allowlist = allow_own;
    get_one(&f, &rq, &ok);
    ck_assert_msg(ok.code == AQ_OK, "%s", ok.error);
    ck_assert_str_eq(ok.body, "hello from ok");
    free(plain.body);
    free(g.body);
    free(r.body);
    free(ok.body);
    srv_stop(own);
    fx_stop(&f);
}
END_TEST

/* A redirect from an allowlisted server is judged again on the address the
 * new connection goes to, in every refused range and spelling; none of
 * these gets a socket. */
START_TEST(test_block_private_redirect_ranges)
{
    struct fx f;
    fx_start(&f, 4);
    static const struct {
        const char *target;
        const char *want;
    } cases[] = {
        {"http://203.0.113.5/x", "refused to connect to 203.0.113.5: documentation address "
                                 "(203.0.113.0/24) (not allowlisted)"},
        {"http://198.18.0.1/x", "benchmarking address (198.18.0.0/15)"},
        {"http://192.0.0.170/x", "IETF protocol assignment address (192.0.0.0/24)"},
        {"http://[2001:db8::1]/x", "refused to connect to 2001:db8::1: documentation address "
                                   "(2001:db8::/32) (not allowlisted)"},
        {"http://[64:ff9b::a00:1]/x", "private address (10.0.0.0/8) inside a NAT64 address"},
        {"http://[::ffff:a9fe:a9fe]/x", "cloud metadata address (169.254.169.254/32)"},
        {"http://[2002:a00:1::1]/x", "6to4 address (2002::/16)"},
    };
    const char *allow[] = {"127.0.0.1"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(cases); i++) {
        char via[256];
        snprintf(via, sizeof via, "http://127.0.0.1:%d/goto?%s", f.srv->port, cases[i].target);
        struct got g = {0};
        aq_http_request rq = {.url = via, .block_private = true, .follow_redirects = true,
                              .allowlist = allow, .nallowlist = 1, .timeout_ms = 3000};
        get_one(&f, &rq, &g);
        ck_assert_msg(g.code == AQ_EINVAL, "%s: code %d (%s)", cases[i].target, g.code, g.error);
        ck_assert_msg(strstr(g.error, cases[i].want), "%s: %s", cases[i].target, g.error);
        free(g.body);
    }
    aq_http_stats st;
    aq_http_stats_get(f.http, &st);
    ck_assert_uint_eq(st.sockets_opened, AQ_ARRAY_LEN(cases)); /* the allowlisted hops only */
    ck_assert_int_eq(f.srv->requests, (int)AQ_ARRAY_LEN(cases));
    fx_stop(&f);
}
END_TEST

/* A guarded request never rides a connection an unguarded one left open. */
START_TEST(test_block_private_no_shared_connection)
{
    struct fx f;
    fx_start(&f, 4);
    struct got g = {0}, g2 = {0};
    aq_http_request rq = {.url = url(&f, "127.0.0.1", "/ok")};
    get_one(&f, &rq, &g);
    ck_assert_int_eq(g.code, AQ_OK);
    rq.block_private = true;
    get_one(&f, &rq, &g2);
    ck_assert_int_eq(g2.code, AQ_EINVAL);
    ck_assert_int_eq(f.srv->requests, 1);
    free(g.body);
    free(g2.body);
    fx_stop(&f);
}
END_TEST

static bool forbidden(const char *ip, char *why, size_t whylen)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    if (strchr(ip, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        ck_assert_msg(inet_pton(AF_INET6, ip, &s6->sin6_addr) == 1, "bad test address %s", ip);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        ck_assert_msg(inet_pton(AF_INET, ip, &s4->sin_addr) == 1, "bad test address %s", ip);
    }
    return aq_http_addr_forbidden((const struct sockaddr *)&ss, why, whylen);
}

/* `ip` gets exactly `want` as its reason (NULL: allowed). */
static void expect_addr(const char *ip, const char *want, const char *what)
{
    char why[AQ_HTTP_WHY_LEN] = "unchanged";
    bool f = forbidden(ip, why, sizeof why);
    if (want) {
        ck_assert_msg(f, "%s: %s allowed, want \"%s\"", what, ip, want);
        ck_assert_msg(strcmp(why, want) == 0, "%s: %s: \"%s\", want \"%s\"", what, ip, why, want);
    } else {
        ck_assert_msg(!f, "%s: %s forbidden: %s", what, ip, why);
        ck_assert_str_eq(why, "");
    }
}

#define NAT64_SUFFIX " inside a NAT64 address (64:ff9b::/96)"

/* An IPv4 address is judged the same in its IPv4-mapped form, and through
 * NAT64 by the address inside. */
static void expect_v4_everywhere(const char *ip, const char *want, const char *what)
{
    char alt[64], nat[AQ_HTTP_WHY_LEN];
    expect_addr(ip, want, what);
    snprintf(alt, sizeof alt, "::ffff:%s", ip);
    expect_addr(alt, want, what);
    snprintf(alt, sizeof alt, "64:ff9b::%s", ip);
    if (want) snprintf(nat, sizeof nat, "%s" NAT64_SUFFIX, want);
    expect_addr(alt, want ? nat : NULL, what);
}

#define NONE "-" /* no such neighbour: the range touches the end of the space */
#define RSV(c) "reserved IPv6 address (" c ")"
#define ALONE(cidr, why) {cidr, why, why, NULL, NULL}

/* The guard's ranges as the registries state them, and what lies next to
 * each: its first and last address and the address just below and just
 * above it (NULL: allowed). */
static const struct range_case {
    const char *cidr;
    const char *first, *last, *below, *above;
} RANGE_CASES[] = {
    /* IPv4 Special-Purpose Address Registry, multicast, metadata hosts */
    {"0.0.0.0/8", "this-network address (0.0.0.0/8)", "this-network address (0.0.0.0/8)", NONE, NULL},
    ALONE("10.0.0.0/8", "private address (10.0.0.0/8)"),
    ALONE("100.64.0.0/10", "shared (CGNAT) address (100.64.0.0/10)"),
    ALONE("127.0.0.0/8", "loopback address (127.0.0.0/8)"),
    ALONE("169.254.0.0/16", "link-local address (169.254.0.0/16)"),
    {"169.254.169.254/32", "cloud metadata address (169.254.169.254/32)",
     "cloud metadata address (169.254.169.254/32)", "link-local address (169.254.0.0/16)",
     "link-local address (169.254.0.0/16)"},
    ALONE("172.16.0.0/12", "private address (172.16.0.0/12)"),
    ALONE("192.0.0.0/24", "IETF protocol assignment address (192.0.0.0/24)"),
    ALONE("192.0.2.0/24", "documentation address (192.0.2.0/24)"),
    ALONE("192.31.196.0/24", "AS112 service address (192.31.196.0/24)"),
    ALONE("192.52.193.0/24", "AMT relay address (192.52.193.0/24)"),
    ALONE("192.88.99.0/24", "deprecated 6to4 relay anycast address (192.88.99.0/24)"),
    ALONE("192.168.0.0/16", "private address (192.168.0.0/16)"),
    ALONE("192.175.48.0/24", "AS112 direct delegation address (192.175.48.0/24)"),
    ALONE("198.18.0.0/15", "benchmarking address (198.18.0.0/15)"),
    ALONE("198.51.100.0/24", "documentation address (198.51.100.0/24)"),
    ALONE("203.0.113.0/24", "documentation address (203.0.113.0/24)"),
    {"224.0.0.0/4", "multicast address (224.0.0.0/4)", "multicast address (224.0.0.0/4)", NULL,
     "reserved address (240.0.0.0/4)"},
    {"240.0.0.0/4", "reserved address (240.0.0.0/4)",
     "limited broadcast address (255.255.255.255/32)", "multicast address (224.0.0.0/4)", NONE},
    {"255.255.255.255/32", "limited broadcast address (255.255.255.255/32)",
     "limited broadcast address (255.255.255.255/32)", "reserved address (240.0.0.0/4)", NONE},
    ALONE("168.63.129.16/32", "cloud metadata address (168.63.129.16/32)"),

    /* IPv6 Special-Purpose Address Registry, multicast, deprecated blocks */
    {"::ffff:0:0/96", "this-network address (0.0.0.0/8)",
     "limited broadcast address (255.255.255.255/32)", RSV("::/8"), RSV("::/8")},
    {"::/128", "unspecified address (::/128)", "unspecified address (::/128)", NONE,
     "loopback address (::1/128)"},
    {"::1/128", "loopback address (::1/128)", "loopback address (::1/128)",
     "unspecified address (::/128)", "deprecated IPv4-compatible address (::/96)"},
    {"::/96", "unspecified address (::/128)", "deprecated IPv4-compatible address (::/96)", NONE,
     RSV("::/8")},
    {"64:ff9b::/96", "this-network address (0.0.0.0/8)" NAT64_SUFFIX,
     "limited broadcast address (255.255.255.255/32)" NAT64_SUFFIX, RSV("::/8"), RSV("::/8")},
    {"64:ff9b:1::/48", "local-use NAT64 address (64:ff9b:1::/48)",
     "local-use NAT64 address (64:ff9b:1::/48)", RSV("::/8"), RSV("::/8")},
    {"100::/64", "discard-only address (100::/64)", "discard-only address (100::/64)", RSV("::/8"),
     "dummy address (100:0:0:1::/64)"},
    {"100:0:0:1::/64", "dummy address (100:0:0:1::/64)", "dummy address (100:0:0:1::/64)",
     "discard-only address (100::/64)", RSV("100::/8")},
    {"2001::/23", "Teredo address (2001::/32)", "IETF protocol assignment address (2001::/23)", NULL,
     NULL},
    {"2001::/32", "Teredo address (2001::/32)", "Teredo address (2001::/32)", NULL,
     "IETF protocol assignment address (2001::/23)"},
    {"2001:2::/48", "benchmarking address (2001:2::/48)", "benchmarking address (2001:2::/48)",
     "IETF protocol assignment address (2001::/23)", "IETF protocol assignment address (2001::/23)"},
    {"2001:10::/28", "deprecated ORCHID address (2001:10::/28)",
     "deprecated ORCHID address (2001:10::/28)", "IETF protocol assignment address (2001::/23)",
     "ORCHIDv2 address (2001:20::/28)"},
    {"2001:20::/28", "ORCHIDv2 address (2001:20::/28)", "ORCHIDv2 address (2001:20::/28)",
     "deprecated ORCHID address (2001:10::/28)", "IETF protocol assignment address (2001::/23)"},
    ALONE("2001:db8::/32", "documentation address (2001:db8::/32)"),
    ALONE("2002::/16", "6to4 address (2002::/16)"),
    ALONE("2620:4f:8000::/48", "AS112 direct delegation address (2620:4f:8000::/48)"),
    ALONE("3fff::/20", "documentation address (3fff::/20)"),
    {"5f00::/16", "SRv6 SID address (5f00::/16)", "SRv6 SID address (5f00::/16)", RSV("4000::/3"),
     RSV("4000::/3")},
    {"fc00::/7", "private (unique local) address (fc00::/7)",
     "private (unique local) address (fc00::/7)", RSV("f800::/6"), RSV("fe00::/9")},
    {"fd00:ec2::254/128", "cloud metadata address (fd00:ec2::254/128)",
     "cloud metadata address (fd00:ec2::254/128)", "private (unique local) address (fc00::/7)",
     "private (unique local) address (fc00::/7)"},
    {"fe80::/10", "link-local address (fe80::/10)", "link-local address (fe80::/10)",
     RSV("fe00::/9"), "deprecated site-local address (fec0::/10)"},
    {"fec0::/10", "deprecated site-local address (fec0::/10)",
     "deprecated site-local address (fec0::/10)", "link-local address (fe80::/10)",
     "multicast address (ff00::/8)"},
    {"ff00::/8", "multicast address (ff00::/8)", "multicast address (ff00::/8)",
     "deprecated site-local address (fec0::/10)", NONE},

    /* IPv6 Address Space registry: the blocks reserved by the IETF */
    {"::/8", "unspecified address (::/128)", RSV("::/8"), NONE, "discard-only address (100::/64)"},
    {"100::/8", "discard-only address (100::/64)", RSV("100::/8"), RSV("::/8"), RSV("200::/7")},
    {"200::/7", RSV("200::/7"), RSV("200::/7"), RSV("100::/8"), RSV("400::/6")},
    {"400::/6", RSV("400::/6"), RSV("400::/6"), RSV("200::/7"), RSV("800::/5")},
    {"800::/5", RSV("800::/5"), RSV("800::/5"), RSV("400::/6"), RSV("1000::/4")},
    {"1000::/4", RSV("1000::/4"), RSV("1000::/4"), RSV("800::/5"), NULL},
    {"4000::/3", RSV("4000::/3"), RSV("4000::/3"), NULL, RSV("6000::/3")},
    {"6000::/3", RSV("6000::/3"), RSV("6000::/3"), RSV("4000::/3"), RSV("8000::/3")},
    {"8000::/3", RSV("8000::/3"), RSV("8000::/3"), RSV("6000::/3"), RSV("a000::/3")},
    {"a000::/3", RSV("a000::/3"), RSV("a000::/3"), RSV("8000::/3"), RSV("c000::/3")},
    {"c000::/3", RSV("c000::/3"), RSV("c000::/3"), RSV("a000::/3"), RSV("e000::/4")},
    {"e000::/4", RSV("e000::/4"), RSV("e000::/4"), RSV("c000::/3"), RSV("f000::/5")},
    {"f000::/5", RSV("f000::/5"), RSV("f000::/5"), RSV("e000::/4"), RSV("f800::/6")},
    {"f800::/6", RSV("f800::/6"), RSV("f800::/6"), RSV("f000::/5"),
     "private (unique local) address (fc00::/7)"},
    {"fe00::/9", RSV("fe00::/9"), RSV("fe00::/9"), "private (unique local) address (fc00::/7)",
     "link-local address (fe80::/10)"},
};

/* Adds `delta` (+1 or -1) to the big-endian number a[0..n); false when it
 * would leave the space. */
static bool step_addr(unsigned char *a, size_t n, int delta)
{
    unsigned char edge = delta > 0 ? 0xff : 0x00;
    size_t i = n;
    while (i > 0 && a[i - 1] == edge) i--;
    if (i == 0) return false;
    a[i - 1] = (unsigned char)(a[i - 1] + delta);
    for (size_t j = i; j < n; j++) a[j] = (unsigned char)(0xff - edge);
    return true;
}

static void check_point(const struct range_case *c, int family, const unsigned char *a,
                        bool exists, const char *want, const char *which)
{
    char what[96];
    snprintf(what, sizeof what, "%s, %s", c->cidr, which);
    if (want && strcmp(want, NONE) == 0) {
        ck_assert_msg(!exists, "%s: the test table says none, but there is one", what);
        return;
    }
    ck_assert_msg(exists, "%s: the end of the address space; the table must say NONE", what);
    char ip[INET6_ADDRSTRLEN];
    ck_assert_ptr_nonnull(inet_ntop(family, a, ip, sizeof ip));
    if (family == AF_INET) expect_v4_everywhere(ip, want, what);
    else expect_addr(ip, want, what);
}

START_TEST(test_addr_ranges)
{
    for (size_t i = 0; i < AQ_ARRAY_LEN(RANGE_CASES); i++) {
        const struct range_case *c = &RANGE_CASES[i];
        char net[64];
        snprintf(net, sizeof net, "%s", c->cidr);
        char *slash = strchr(net, '/');
        ck_assert_ptr_nonnull(slash);
        *slash = '\0';
        unsigned bits = (unsigned)atoi(slash + 1);
        int family = strchr(net, ':') ? AF_INET6 : AF_INET;
        size_t n = family == AF_INET ? 4 : 16;
        unsigned char first[16], last[16];
        ck_assert_int_eq(inet_pton(family, net, first), 1);
        for (size_t b = 0; b < n; b++) {
            unsigned keep = bits >= (b + 1) * 8 ? 8 : bits > b * 8 ? bits - (unsigned)b * 8 : 0;
            unsigned char mask = (unsigned char)(keep ? 0xff << (8 - keep) : 0);
            first[b] &= mask;
            last[b] = (unsigned char)(first[b] | (unsigned char)~mask);
        }
        unsigned char below[16], above[16];
        memcpy(below, first, n);
        memcpy(above, last, n);
        bool has_below = step_addr(below, n, -1), has_above = step_addr(above, n, +1);
        check_point(c, family, first, true, c->first, "first address");
        check_point(c, family, last, true, c->last, "last address");
        check_point(c, family, below, has_below, c->below, "address below");
        check_point(c, family, above, has_above, c->above, "address above");
    }
}
END_TEST

/* What lies outside every range, odd spellings, and the API's edges. */
START_TEST(test_addr_forbidden)
{
    static const struct {
        const char *ip;
        const char *why; /* NULL: allowed */
    } cases[] = {
        {"8.8.8.8", NULL},
        {"93.184.216.34", NULL},
        {"::ffff:8.8.8.8", NULL},
        {"64:ff9b::8.8.8.8", NULL},
        {"2606:4700:4700::1111", NULL},
        {"2a00:1450::1", NULL},
        {"::ffff:127.0.0.1", "loopback address (127.0.0.0/8)"},
        {"::ffff:169.254.169.254", "cloud metadata address (169.254.169.254/32)"},
        {"::127.0.0.1", "deprecated IPv4-compatible address (::/96)"},
        {"::8.8.8.8", "deprecated IPv4-compatible address (::/96)"},
        {"::ffff:0:127.0.0.1", RSV("::/8")}, /* IPv4-translated (SIIT) */
        {"64:ff9b::a9fe:a9fe", "cloud metadata address (169.254.169.254/32)" NAT64_SUFFIX},
        {"2002:a9fe:a9fe::1", "6to4 address (2002::/16)"},
        {"2002:808:808::1", "6to4 address (2002::/16)"},
        {"2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo address (2001::/32)"},
        {"2001:4:112::1", "IETF protocol assignment address (2001::/23)"},
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(cases); i++) expect_addr(cases[i].ip, cases[i].why, "case");
    struct sockaddr un = {.sa_family = AF_UNIX};
    char why[AQ_HTTP_WHY_LEN];
    ck_assert(aq_http_addr_forbidden(&un, why, sizeof why));
    ck_assert_str_eq(why, "not an IP address");
    ck_assert(aq_http_addr_forbidden(NULL, why, sizeof why));
    ck_assert(forbidden("127.0.0.1", NULL, 0)); /* why is optional */
    /* the longest reason fits in AQ_HTTP_WHY_LEN */
    char small[AQ_HTTP_WHY_LEN];
    ck_assert(forbidden("64:ff9b::c058:6301", small, sizeof small));
    ck_assert_str_eq(small,
                     "deprecated 6to4 relay anycast address (192.88.99.0/24)" NAT64_SUFFIX);
}
END_TEST

static Suite *http_suite(void)
{
    const TTest *core[] = {test_get, test_post_echo, test_redirect, test_retry_after,
                           test_keepalive_reuse, test_addr_ranges, test_addr_forbidden};
    const TTest *limits[] = {test_concurrency_one_thread, test_timeout_silent_server,
                             test_timeout_starts_at_transfer, test_max_response_bytes,
                             test_too_many_redirects};
    const TTest *errors[] = {test_cancel_in_flight, test_cancel_queued, test_free_calls_back_once,
                             test_free_from_callback, test_network_errors, test_submit_rejects,
                             test_block_private_refuses, test_block_private_allowlist,
                             test_block_private_no_shared_connection,
                             test_block_private_redirect_no_pooled_connection,
                             test_block_private_own_address, test_block_private_redirect_ranges};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 30},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 60},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 30},
    };
    return aq_test_suite("http", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void) { return aq_test_run_http(http_suite()); }
