/* it_store.c — integration suite for the store (the worker's PostgreSQL
 * writer) against the private PostgreSQL the `servers` fixture starts.
 * Every test gets a freshly migrated database of its own and runs an
 * event loop to receive the store's callbacks, as the worker does.
 *
 * Outages are real: the store talks to PostgreSQL through a small TCP
 * proxy in this process that a test can take down (connections cut, new
 * ones closed at once) or turn into a black hole (the server's replies
 * never arrive, so a COMMIT takes effect while the store cannot know). */
#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agentq/log.h"
#include "agentq/migrate.h"
#include "agentq/store.h"
#include "agentq/task.h"
#include "testenv.h"

static char *dsn;                /* the current test's migrated database */
static struct event_base *base;
static int claims_done, dones;   /* callbacks seen in this test */

static void migrate(const char *d)
{
    char err[1024] = "";
    int applied = 0;
    int rc = aq_migrate_apply(d, NULL, &applied, err, sizeof err);
    ck_assert_msg(rc == 0, "migrate: %s", err);
}

static void setup(void)
{
    /* Reset here too, so the suite also runs with CK_FORK=no. */
    claims_done = dones = 0;
    dsn = aq_test_fresh_db("it_store");
    migrate(dsn);
    base = event_base_new();
    ck_assert_ptr_nonnull(base);
}

static void teardown(void)
{
    event_base_free(base);
    base = NULL;
    free(dsn);
    dsn = NULL;
}

/* Runs the loop until *count reaches want or timeout_ms passes. */
static bool run_until(const int *count, int want, int timeout_ms)
{
    int64_t end = aq_mono_us() + (int64_t)timeout_ms * 1000;
    struct timeval slice = {0, 5000};
    while (*count < want) {
        if (aq_mono_us() > end) return false;
        event_base_loopexit(base, &slice);
        event_base_dispatch(base);
    }
    return true;
}

/* Runs the loop for ms milliseconds. */
static void run_for(int ms)
{
    int never = 0;
    (void)run_until(&never, 1, ms);
}

static aq_store *store_open(const char *d, int batch_max, int flush_ms)
{
    aq_store_config cfg = {.dsn = d, .worker_id = "w-test", .batch_max = batch_max,
                           .flush_ms = flush_ms, .flush_timeout_ms = 3000,
                           .reconnect_max_ms = 300};
    char err[512] = "";
    aq_store *s = aq_store_new(&cfg, base, err, sizeof err);
    ck_assert_msg(s != NULL, "aq_store_new: %s", err);
    return s;
}

static char *sqlf(const char *fmt, ...) AQ_PRINTF(1, 2);
static char *sqlf(const char *fmt, ...)
{
    static char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

/* The first value of a query as text ("" for NULL); static buffer. */
static const char *val(const char *sql)
{
    static char out[4096];
    char *v = aq_test_pg_value(dsn, sql);
    snprintf(out, sizeof out, "%s", v ? v : "");
    free(v);
    return out;
}

static void exec_ok(const char *sql)
{
    char err[1024] = "";
    ck_assert_msg(aq_test_pg_exec(dsn, sql, err, sizeof err) == 0, "%s: %s", sql, err);
}

/* ---------------------------------------------------------- callbacks */

typedef struct claim_rec {
    int calls;
    aq_store_outcome outcome;
    int attempt;
    char status[32];
    int code;
} claim_rec;

static void on_claim(void *arg, aq_store_outcome outcome, int attempt, const char *status, int code)
{
    claim_rec *c = arg;
    c->calls++;
    c->outcome = outcome;
    c->attempt = attempt;
    snprintf(c->status, sizeof c->status, "%s", code == 0 && status ? status : "");
    c->code = code;
    claims_done++;
}

typedef struct done_rec {
    int calls;
    int code;
    char seen[256]; /* what a separate connection saw inside the callback */
    const char *task_id;
} done_rec;

static void on_done(void *arg, int code)
{
    done_rec *d = arg;
    d->calls++;
    d->code = code;
    dones++;
}

/* Reads the row from a second connection while still inside the
 * callback: the row must already be committed. */
static void on_done_peek(void *arg, int code)
{
    done_rec *d = arg;
    char *v = aq_test_pg_value(dsn, sqlf("SELECT status || ',' || steps || ',' || prompt_tokens"
                                         " || ',' || completion_tokens || ',' || cost_usd"
                                         " || ',' || (finished_at IS NOT NULL)"
                                         " FROM agentq.tasks WHERE task_id = '%s'",
                                         d->task_id));
    snprintf(d->seen, sizeof d->seen, "%s", v ? v : "(no row)");
    free(v);
    on_done(arg, code);
}

static aq_store_task task_of(const char *id, int attempt)
{
    aq_store_task t = {.task_id = id, .user_id = "alice", .goal = "add 2 and 3",
                       .priority = 4, .attempt = attempt, .max_steps = 15,
                       .budget_usd = 0.5, .timeout_seconds = 60, .model = "mock-1",
                       .metadata = "{\"batch\": 7}", .enqueued_at_us = 1700000000123456LL};
    return t;
}

static claim_rec claim_sync(aq_store *s, const char *id, int attempt)
{
    claim_rec c = {0};
    aq_store_task t = task_of(id, attempt);
    int before = claims_done;
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), 0);
    ck_assert_msg(run_until(&claims_done, before + 1, 10000), "claim callback never came");
    ck_assert_int_eq(c.calls, 1);
    return c;
}

static void new_id(char id[AQ_TASK_ID_LEN + 1]) { aq_task_uuid_generate(id); }

/* ---------------------------------------------------------------- proxy */

enum { P_UP, P_DOWN, P_BLACKHOLE };
#define P_MAX_CONNS 32

typedef struct proxy {
    int lfd;
    int port;
    int target_port;
    pthread_t th;
    pthread_mutex_t mu;
    int mode;
    bool kill;   /* cut every connection, then clear the flag */
    bool quit;
    int client[P_MAX_CONNS];
    int server[P_MAX_CONNS];
    int n;
    int accepted;
} proxy;

static int connect_local(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return fd;
    if (fd >= 0) close(fd);
    return -1;
}

static void proxy_close(proxy *p, int i)
{
    close(p->client[i]);
    close(p->server[i]);
    p->client[i] = p->client[p->n - 1];
    p->server[i] = p->server[p->n - 1];
    p->n--;
}

static bool pump(int from, int to, bool drop)
{
    char buf[65536];
    ssize_t r = read(from, buf, sizeof buf);
    if (r <= 0) return false;
    if (drop) return true;
    for (ssize_t off = 0; off < r;) {
        ssize_t w = write(to, buf + off, (size_t)(r - off));
        if (w <= 0) return false;
        off += w;
    }
    return true;
}

static void *proxy_main(void *arg)
{
    proxy *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        bool quit = p->quit;
        int mode = p->mode;
        if (p->kill || quit) {
            while (p->n) proxy_close(p, 0);
            p->kill = false;
        }
        pthread_mutex_unlock(&p->mu);
        if (quit) return NULL;

        struct pollfd pfd[1 + 2 * P_MAX_CONNS];
        int n = 0;
        pfd[n++] = (struct pollfd){.fd = p->lfd, .events = POLLIN};
        for (int i = 0; i < p->n; i++) {
            pfd[n++] = (struct pollfd){.fd = p->client[i], .events = POLLIN};
            pfd[n++] = (struct pollfd){.fd = p->server[i], .events = POLLIN};
        }
        if (poll(pfd, (nfds_t)n, 20) <= 0) continue;
        if (pfd[0].revents & POLLIN) {
            int c = accept(p->lfd, NULL, NULL);
            int sfd = c >= 0 && mode != P_DOWN && p->n < P_MAX_CONNS
                          ? connect_local(p->target_port) : -1;
            if (sfd < 0) {
                if (c >= 0) close(c); /* down: the peer sees the server hang up */
            } else {
                p->client[p->n] = c;
                p->server[p->n] = sfd;
                p->n++;
                p->accepted++;
            }
        }
        /* Walk the pairs polled this round, last first, so closing one
         * (which moves the last pair into its slot) skips nothing. */
        int polled = (n - 1) / 2;
        for (int i = polled - 1; i >= 0; i--) {
            bool ok = true;
            if (pfd[1 + 2 * i].revents & (POLLIN | POLLHUP | POLLERR))
                ok = pump(p->client[i], p->server[i], false);
            if (ok && (pfd[2 + 2 * i].revents & (POLLIN | POLLHUP | POLLERR)))
                ok = pump(p->server[i], p->client[i], mode == P_BLACKHOLE);
            if (!ok) proxy_close(p, i);
        }
    }
}

static proxy *proxy_start(int mode)
{
    proxy *p = aq_xcalloc(1, sizeof *p);
    p->target_port = atoi(aq_test_env_require("AGENTQ_TEST_PG_PORT"));
    p->mode = mode;
    pthread_mutex_init(&p->mu, NULL);
    p->lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(p->lfd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(listen(p->lfd, 16), 0);
    socklen_t len = sizeof a;
    ck_assert_int_eq(getsockname(p->lfd, (struct sockaddr *)&a, &len), 0);
    p->port = ntohs(a.sin_port);
    ck_assert_int_eq(pthread_create(&p->th, NULL, proxy_main, p), 0);
    return p;
}

/* Sets the mode; with cut, also closes every open connection and waits
 * until that is done. */
static void proxy_set(proxy *p, int mode, bool cut)
{
    pthread_mutex_lock(&p->mu);
    p->mode = mode;
    p->kill = cut;
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; cut && i < 500; i++) {
        pthread_mutex_lock(&p->mu);
        bool pending = p->kill;
        pthread_mutex_unlock(&p->mu);
        if (!pending) break;
        usleep(10000);
    }
}

static void proxy_stop(proxy *p)
{
    pthread_mutex_lock(&p->mu);
    p->quit = true;
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->th, NULL);
    close(p->lfd);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* The test database's DSN, through the proxy. */
static char *proxied_dsn(const proxy *p)
{
    const char *dbname = strstr(dsn, "dbname=");
    ck_assert_ptr_nonnull(dbname);
    char buf[512];
    snprintf(buf, sizeof buf, "host=127.0.0.1 port=%d user=postgres %s connect_timeout=5",
             p->port, dbname);
    return aq_xstrdup(buf);
}

/* ----------------------------------------------------------------- core */

START_TEST(test_claim_new_task_runs_attempt_one)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = claim_sync(s, id, 1);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 1);
    ck_assert_str_eq(c.status, "running");
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, attempt, worker_id, user_id, goal,"
                              " priority, max_steps, budget_usd, timeout_seconds, model,"
                              " metadata->>'batch', started_at IS NOT NULL, finished_at IS NULL,"
                              " (extract(epoch FROM enqueued_at) * 1000000)::bigint)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "running,1,w-test,alice,add 2 and 3,4,15,0.500000,60,mock-1,7,t,t,"
                     "1700000000123456");
    aq_store_free(s);
}
END_TEST

START_TEST(test_finish_commits_before_callback_then_claim_is_final)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = claim_sync(s, id, 1);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);

    done_rec d = {.task_id = id};
    aq_store_result r = {.task_id = id, .attempt = c.attempt, .status = "completed", .steps = 3,
                         .prompt_tokens = 1200, .completion_tokens = 345, .cost_usd = 0.0123,
                         .result = "5", .error = NULL};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done_peek, &d), 0);
    ck_assert(run_until(&dones, 1, 10000));
    ck_assert_int_eq(d.calls, 1);
    ck_assert_int_eq(d.code, 0);
    ck_assert_str_eq(d.seen, "completed,3,1200,345,0.01230000,true");
    ck_assert_str_eq(val(sqlf("SELECT result FROM agentq.tasks WHERE task_id = '%s'", id)), "5");

    /* The redelivery of a finished task: acked without running. */
    claim_rec again = claim_sync(s, id, 1);
    ck_assert_int_eq(again.code, 0);
    ck_assert_int_eq(again.outcome, AQ_STORE_FINAL);
    ck_assert_str_eq(again.status, "completed");
    ck_assert_int_eq(again.attempt, 1);
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "completed");

    /* A late finish of a final row changes nothing but is not an error. */
    done_rec late = {0};
    aq_store_result r2 = {.task_id = id, .attempt = 1, .status = "failed", .error = "late"};
    ck_assert_int_eq(aq_store_finish(s, &r2, on_done, &late), 0);
    ck_assert(run_until(&dones, 2, 10000));
    ck_assert_int_eq(late.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "completed");
    aq_store_free(s);
}
END_TEST

START_TEST(test_claim_attempt_rules)
{
    aq_store *s = store_open(dsn, 0, 0);
    char dead[AQ_TASK_ID_LEN + 1], queued[AQ_TASK_ID_LEN + 1], retrying[AQ_TASK_ID_LEN + 1];
    new_id(dead);
    new_id(queued);
    new_id(retrying);
    /* A row another worker left running (it died), one queued with a
     * higher attempt than the delivery says, one retrying with a lower. */
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt, worker_id)"
                 " VALUES ('%s', 'alice', 'g', 'running', 1, 'w-dead'),"
                 " ('%s', 'alice', 'g', 'queued', 3, NULL),"
                 " ('%s', 'alice', 'g', 'retrying', 2, 'w-other')",
                 dead, queued, retrying));

    claim_rec c = claim_sync(s, dead, 1);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 2);
    ck_assert_str_eq(val(sqlf("SELECT status || ',' || attempt || ',' || worker_id"
                              " FROM agentq.tasks WHERE task_id = '%s'", dead)),
                     "running,2,w-test");

    c = claim_sync(s, queued, 1);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 3);

    /* A copy of attempt 2 (the original redelivered after it handed over
     * to its retry) is stale: not run, row untouched. */
    c = claim_sync(s, retrying, 2);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_STALE);
    ck_assert_str_eq(val(sqlf("SELECT status || ',' || attempt FROM agentq.tasks WHERE task_id = '%s'", retrying)),
                     "retrying,2");

    c = claim_sync(s, retrying, 3);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 3);

    /* Our own running row redelivered (e.g. a channel reset): a new attempt. */
    c = claim_sync(s, dead, 1);
    ck_assert_int_eq(c.attempt, 3);
    aq_store_free(s);
}
END_TEST

START_TEST(test_cancel_requested_is_reported_not_run)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt,"
                 " cancel_requested) VALUES ('%s', 'alice', 'g', 'queued', 1, true)", id));
    claim_rec c = claim_sync(s, id, 1);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_CANCELLED);
    ck_assert_int_eq(c.attempt, 1);
    /* Not made running. */
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "queued");

    done_rec d = {0};
    aq_store_result r = {.task_id = id, .attempt = c.attempt, .status = "cancelled",
                         .error = "cancelled by request"};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &d), 0);
    ck_assert(run_until(&dones, 1, 10000));
    ck_assert_int_eq(d.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT status || ',' || (finished_at IS NOT NULL)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "cancelled,true");
    aq_store_free(s);
}
END_TEST

START_TEST(test_retrying_status_is_not_final_and_attempt_guarded)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = claim_sync(s, id, 1);
    done_rec d = {0};
    aq_store_result r = {.task_id = id, .attempt = c.attempt, .status = "retrying",
                         .error = "HTTP 503"};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &d), 0);
    ck_assert(run_until(&dones, 1, 10000));
    ck_assert_int_eq(d.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT status || ',' || error || ',' || (finished_at IS NULL)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "retrying,HTTP 503,true");

    /* The retry runs attempt 2; a stale writer of attempt 1 cannot touch it. */
    c = claim_sync(s, id, 2);
    ck_assert_int_eq(c.attempt, 2);
    done_rec stale = {0};
    aq_store_result old = {.task_id = id, .attempt = 1, .status = "failed", .error = "stale"};
    ck_assert_int_eq(aq_store_finish(s, &old, on_done, &stale), 0);
    ck_assert(run_until(&dones, 2, 10000));
    ck_assert_int_eq(stale.code, AQ_ENOTFOUND);
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "running");
    aq_store_free(s);
}
END_TEST

START_TEST(test_steps_round_trip_and_are_written_once)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = claim_sync(s, id, 1);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    aq_store_step_row llm = {.task_id = id, .attempt = 1, .step = 1, .seq = 0, .kind = "llm",
                             .name = "mock-1", .status = "ok",
                             .started_at_us = 1700000001000001LL, .duration_ms = 812.5,
                             .prompt_tokens = 100, .completion_tokens = 20, .cost_usd = 0.0001,
                             .detail = "{\"finish\": \"tool_calls\"}"};
    aq_store_step_row t0 = {.task_id = id, .attempt = 1, .step = 1, .seq = 0, .kind = "tool",
                            .name = "calculator", .status = "ok", .duration_ms = 0.25,
                            .detail = "{\"args\": \"2+3\"}"};
    aq_store_step_row t1 = t0;
    t1.seq = 1;
    t1.detail = "{\"args\": \"4*5\"}";
    ck_assert_int_eq(aq_store_step(s, &llm), 0);
    ck_assert_int_eq(aq_store_step(s, &t0), 0);
    ck_assert_int_eq(aq_store_step(s, &t1), 0);
    ck_assert_int_eq(aq_store_step(s, &t1), 0); /* a replay keeps the first */
    /* Steps have no callback: a finish queued after them commits after. */
    done_rec d = {0};
    aq_store_result r = {.task_id = id, .attempt = 1, .status = "completed", .steps = 1};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &d), 0);
    ck_assert(run_until(&dones, 1, 10000));
    ck_assert_str_eq(val(sqlf("SELECT string_agg(concat_ws(':', kind, seq, name, status,"
                              " duration_ms, prompt_tokens, completion_tokens, cost_usd,"
                              " detail->>'args', detail->>'finish',"
                              " (extract(epoch FROM started_at) * 1000000)::bigint), '|'"
                              " ORDER BY kind, seq) FROM agentq.steps WHERE task_id = '%s'", id)),
                     "llm:0:mock-1:ok:812.5:100:20:0.00010000:tool_calls:1700000001000001|"
                     "tool:0:calculator:ok:0.25:0:0:0.00000000:2+3|"
                     "tool:1:calculator:ok:0.25:0:0:0.00000000:4*5");
    aq_store_free(s);
}
END_TEST

START_TEST(test_dead_letter_body_round_trips_byte_exact)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    /* Not UTF-8, with a NUL and a quote: only a binary parameter keeps it. */
    static const unsigned char body[] = {0xff, 0xfe, 0x00, 'x', 0xc3, 0x28, '\'', '\\', 0x80, 0x0a};
    aq_store_dead dl = {.task_id = id, .reason = "rejected", .error = "body: not JSON",
                        .body = body, .body_len = sizeof body,
                        .headers = "{\"x-death\": [{\"count\": 1}]}", .status = "rejected"};
    done_rec d = {0};
    ck_assert_int_eq(aq_store_dead_letter(s, &dl, on_done, &d), 0);
    /* And one with no task id at all, and an empty body. */
    aq_store_dead anon = {.task_id = NULL, .reason = "expired", .body = "", .body_len = 0};
    done_rec d2 = {0};
    ck_assert_int_eq(aq_store_dead_letter(s, &anon, on_done, &d2), 0);
    ck_assert(run_until(&dones, 2, 10000));
    ck_assert_int_eq(d.code, 0);
    ck_assert_int_eq(d2.code, 0);

    ck_assert_str_eq(val(sqlf("SELECT encode(body, 'hex') || ',' || reason || ',' || error"
                              " || ',' || (headers->'x-death'->0->>'count')"
                              " FROM agentq.dead_letters WHERE task_id = '%s'", id)),
                     "fffe0078c328275c800a,rejected,body: not JSON,1");
    ck_assert_str_eq(val("SELECT count(*) || ',' || coalesce(max(length(body)), -1)"
                         " FROM agentq.dead_letters WHERE task_id IS NULL"),
                     "1,0");
    /* The task row was made, final, with what is known. */
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, error, user_id = '', goal = '',"
                              " attempt, finished_at IS NOT NULL)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "rejected,body: not JSON,t,t,1,t");
    aq_store_free(s);
}
END_TEST

START_TEST(test_dead_letter_finalises_a_running_row_but_not_a_final_one)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1], done_id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    new_id(done_id);
    claim_rec c = claim_sync(s, id, 3);
    ck_assert_int_eq(c.attempt, 3);
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, result)"
                 " VALUES ('%s', 'bob', 'g', 'completed', '42')", done_id));
    aq_store_dead out = {.task_id = id, .reason = "failed", .error = "out of attempts: HTTP 500",
                         .body = "{}", .body_len = 2, .status = "failed", .attempt = 3};
    aq_store_dead dup = {.task_id = done_id, .reason = "expired", .error = "TTL",
                         .body = "{}", .body_len = 2, .status = "expired"};
    done_rec d1 = {0}, d2 = {0};
    ck_assert_int_eq(aq_store_dead_letter(s, &out, on_done, &d1), 0);
    ck_assert_int_eq(aq_store_dead_letter(s, &dup, on_done, &d2), 0);
    ck_assert(run_until(&dones, 2, 10000));
    ck_assert_int_eq(d1.code, 0);
    ck_assert_int_eq(d2.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, error, attempt, user_id)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "failed,out of attempts: HTTP 500,3,alice");
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, result) FROM agentq.tasks"
                              " WHERE task_id = '%s'", done_id)),
                     "completed,42");
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.dead_letters"), "2");
    aq_store_free(s);
}
END_TEST

/* --------------------------------------------------------------- limits */

#define MANY 1000

START_TEST(test_thousands_of_rows_in_few_transactions)
{
    aq_store *s = store_open(dsn, 500, 5);
    static char ids[MANY][AQ_TASK_ID_LEN + 1];
    static claim_rec cl[MANY];
    static done_rec fin[MANY];
    int64_t t0 = aq_mono_us();
    for (int i = 0; i < MANY; i++) {
        new_id(ids[i]);
        aq_store_task t = task_of(ids[i], 1);
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[i]), 0);
    }
    ck_assert_msg(run_until(&claims_done, MANY, 30000), "%d claims of %d", claims_done, MANY);
    aq_store_counters k0;
    aq_store_stats(s, &k0);

    for (int i = 0; i < MANY; i++) {
        ck_assert_int_eq(cl[i].outcome, AQ_STORE_RUN);
        aq_store_step_row row = {.task_id = ids[i], .attempt = 1, .step = 1, .kind = "llm",
                                 .name = "mock-1", .status = "ok", .duration_ms = 1,
                                 .prompt_tokens = 10, .completion_tokens = 2,
                                 .cost_usd = 0.001, .detail = "{}"};
        ck_assert_int_eq(aq_store_step(s, &row), 0);
        aq_store_result r = {.task_id = ids[i], .attempt = 1, .status = "completed",
                             .steps = 1, .prompt_tokens = 10, .completion_tokens = 2,
                             .cost_usd = 0.001, .result = "ok"};
        ck_assert_int_eq(aq_store_finish(s, &r, on_done, &fin[i]), 0);
    }
    ck_assert_uint_ge(aq_store_pending(s), 1);
    ck_assert_msg(run_until(&dones, MANY, 30000), "%d finishes of %d", dones, MANY);
    double secs = (double)(aq_mono_us() - t0) / 1e6;
    aq_store_counters k1;
    aq_store_stats(s, &k1);
    for (int i = 0; i < MANY; i++) ck_assert_int_eq(fin[i].code, 0);

    /* 2,000 requests at up to 500 per transaction: a handful of commits,
     * not one per row. */
    uint64_t txns = k1.transactions - k0.transactions;
    ck_assert_msg(txns <= 12, "%llu transactions for %d rows", (unsigned long long)txns, 2 * MANY);
    ck_assert_uint_eq(k1.requests, 3 * MANY);
    ck_assert_uint_eq(k1.failed, 0);
    ck_assert_uint_eq(aq_store_pending(s), 0);
    ck_assert_msg(secs < 20, "took %.1f s", secs);
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.tasks WHERE status = 'completed'"
                         " AND finished_at IS NOT NULL"), "1000");
    ck_assert_str_eq(val("SELECT count(*) || ',' || count(DISTINCT task_id) FROM agentq.steps"),
                     "1000,1000");
    aq_store_free(s);
}
END_TEST

START_TEST(test_database_down_at_start_then_outage_nothing_lost_or_doubled)
{
    proxy *p = proxy_start(P_DOWN);
    char *pdsn = proxied_dsn(p);
    aq_store *s = store_open(pdsn, 100, 0);

    enum { N = 20 };
    static char ids[2 * N][AQ_TASK_ID_LEN + 1];
    static claim_rec cl[2 * N];
    static done_rec fin[2 * N];
    for (int i = 0; i < N; i++) {
        new_id(ids[i]);
        aq_store_task t = task_of(ids[i], 1);
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[i]), 0);
        aq_store_step_row row = {.task_id = ids[i], .attempt = 1, .step = 1, .kind = "llm",
                                 .duration_ms = 1};
        ck_assert_int_eq(aq_store_step(s, &row), 0);
    }
    /* The database is unreachable: everything waits, nothing is lost. */
    run_for(800);
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert(!k.connected);
    ck_assert_int_eq(claims_done, 0);
    ck_assert_uint_eq(aq_store_pending(s), 2 * N);
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.tasks"), "0");

    proxy_set(p, P_UP, false);
    ck_assert_msg(run_until(&claims_done, N, 15000), "%d claims after the outage", claims_done);
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(cl[i].code, 0);
        ck_assert_int_eq(cl[i].outcome, AQ_STORE_RUN);
        ck_assert_int_eq(cl[i].attempt, 1);
    }

    /* An outage in the middle: connections cut, new ones refused. */
    proxy_set(p, P_DOWN, true);
    for (int i = 0; i < N; i++) {
        aq_store_result r = {.task_id = ids[i], .attempt = 1, .status = "completed",
                             .steps = 1, .result = "ok"};
        ck_assert_int_eq(aq_store_finish(s, &r, on_done, &fin[i]), 0);
        new_id(ids[N + i]);
        aq_store_task t = task_of(ids[N + i], 1);
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[N + i]), 0);
    }
    run_for(1000);
    ck_assert_int_eq(dones, 0);
    proxy_set(p, P_UP, false);
    ck_assert_msg(run_until(&dones, N, 15000), "%d finishes after the outage", dones);
    ck_assert(run_until(&claims_done, 2 * N, 15000));
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(fin[i].calls, 1);
        ck_assert_int_eq(fin[i].code, 0);
        ck_assert_int_eq(cl[N + i].attempt, 1);
    }
    aq_store_stats(s, &k);
    ck_assert(k.connected);
    ck_assert_uint_ge(k.reconnects, 1);
    ck_assert_uint_eq(k.failed, 0);
    ck_assert_str_eq(val("SELECT count(*) FILTER (WHERE status = 'completed') || ','"
                         " || count(*) FILTER (WHERE status = 'running' AND attempt = 1)"
                         " FROM agentq.tasks"), "20,20");
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.steps"), "20");
    aq_store_free(s);
    proxy_stop(p);
    free(pdsn);
}
END_TEST

START_TEST(test_replay_after_lost_commit_reply_writes_nothing_twice)
{
    proxy *p = proxy_start(P_UP);
    char *pdsn = proxied_dsn(p);
    /* A wide flush window: all of the requests below make one batch. */
    aq_store *s = store_open(pdsn, 100, 300);
    char running[AQ_TASK_ID_LEN + 1], other[AQ_TASK_ID_LEN + 1];
    new_id(running);
    new_id(other);
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt)"
                 " VALUES ('%s', 'alice', 'g', 'running', 1), ('%s', 'bob', 'g', 'running', 1)",
                 running, other));
    run_for(300); /* connected, statements prepared */
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert(k.connected);

    /* From now on the server's replies are lost. */
    proxy_set(p, P_BLACKHOLE, false);
    claim_rec c = {0};
    aq_store_task t = task_of(running, 1);
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), 0);
    aq_store_step_row row = {.task_id = other, .attempt = 1, .step = 1, .kind = "llm",
                             .duration_ms = 1};
    ck_assert_int_eq(aq_store_step(s, &row), 0);
    done_rec fin = {0}, dl = {0};
    aq_store_result r = {.task_id = other, .attempt = 1, .status = "completed", .steps = 1};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &fin), 0);
    aq_store_dead dead = {.task_id = NULL, .reason = "rejected", .error = "body: not JSON",
                          .body = "\xff", .body_len = 1};
    ck_assert_int_eq(aq_store_dead_letter(s, &dead, on_done, &dl), 0);

    /* Wait until the transaction is committed on the server. */
    const char *seen = "";
    for (int i = 0; i < 200; i++) {
        run_for(25);
        seen = val(sqlf("SELECT (SELECT attempt FROM agentq.tasks WHERE task_id = '%s')"
                        " || ',' || (SELECT count(*) FROM agentq.dead_letters)"
                        " || ',' || (SELECT count(*) FROM agentq.steps)"
                        " || ',' || (SELECT status FROM agentq.tasks WHERE task_id = '%s')",
                        running, other));
        if (!strcmp(seen, "2,1,1,completed")) break;
    }
    ck_assert_str_eq(seen, "2,1,1,completed");
    ck_assert_int_eq(claims_done + dones, 0); /* the store cannot know yet */

    /* Cut the connection: the store must replay the batch. */
    proxy_set(p, P_UP, true);
    ck_assert_msg(run_until(&dones, 2, 15000), "dones %d", dones);
    ck_assert(run_until(&claims_done, 1, 15000));
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 2); /* not 3: the replayed claim recognised itself */
    ck_assert_int_eq(fin.code, 0);
    ck_assert_int_eq(dl.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT (SELECT attempt FROM agentq.tasks WHERE task_id = '%s')"
                              " || ',' || (SELECT count(*) FROM agentq.dead_letters)"
                              " || ',' || (SELECT count(*) FROM agentq.steps)",
                              running)),
                     "2,1,1");
    aq_store_stats(s, &k);
    ck_assert_uint_ge(k.reconnects, 1);
    aq_store_free(s);
    proxy_stop(p);
    free(pdsn);
}
END_TEST

/* --------------------------------------------------------------- errors */

START_TEST(test_bad_input_refused_without_callback)
{
    aq_store *s = store_open(dsn, 0, 0);
    claim_rec c = {0};
    aq_store_task t = task_of("not-a-uuid", 1);
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), AQ_EINVAL);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    aq_store_result r = {.task_id = id, .status = "done"};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, NULL), AQ_EINVAL);
    aq_store_step_row row = {.task_id = id, .step = 1, .kind = "think"};
    ck_assert_int_eq(aq_store_step(s, &row), AQ_EINVAL);
    aq_store_dead d = {.reason = "rejected", .status = "running"};
    ck_assert_int_eq(aq_store_dead_letter(s, &d, on_done, NULL), AQ_EINVAL);
    run_for(200);
    ck_assert_int_eq(c.calls, 0);
    ck_assert_int_eq(dones, 0);
    ck_assert_uint_eq(aq_store_pending(s), 0);
    aq_store_free(s);

    char err[512] = "";
    aq_store_config bad = {.dsn = "host=127.0.0.1 port=notaport = ="};
    ck_assert_ptr_null(aq_store_new(&bad, base, err, sizeof err));
    ck_assert_msg(strstr(err, "postgres.dsn") != NULL, "%s", err);
}
END_TEST

START_TEST(test_one_bad_row_does_not_sink_its_batch)
{
    aq_store *s = store_open(dsn, 100, 200);
    enum { N = 10 };
    char ids[N][AQ_TASK_ID_LEN + 1];
    claim_rec cl[N];
    memset(cl, 0, sizeof cl);
    for (int i = 0; i < N; i++) {
        new_id(ids[i]);
        aq_store_task t = task_of(ids[i], 1);
        if (i == 4) t.metadata = "{not json"; /* PostgreSQL refuses this one */
        if (i == 7) t.priority = 999;         /* and this one (CHECK) */
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[i]), 0);
    }
    /* A step for a task that has no row breaks the foreign key: dropped. */
    char ghost[AQ_TASK_ID_LEN + 1];
    new_id(ghost);
    aq_store_step_row row = {.task_id = ghost, .step = 1, .kind = "llm"};
    ck_assert_int_eq(aq_store_step(s, &row), 0);
    ck_assert(run_until(&claims_done, N, 15000));
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(cl[i].calls, 1);
        if (i == 4 || i == 7) {
            ck_assert_int_eq(cl[i].code, AQ_EINVAL);
        } else {
            ck_assert_int_eq(cl[i].code, 0);
            ck_assert_int_eq(cl[i].outcome, AQ_STORE_RUN);
        }
    }
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.tasks"), "8");
    for (int i = 0; i < 50 && aq_store_pending(s); i++) run_for(20);
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert_uint_eq(k.failed, 3);
    ck_assert_uint_eq(k.requests, N - 2);
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.steps"), "0");
    aq_store_free(s);
}
END_TEST

static aq_store *closing_store;
static int closed_calls, closed_code = 1, reentry_rc = 1;

static void on_claim_at_close(void *arg, aq_store_outcome outcome, int attempt, const char *status,
                              int code)
{
    (void)arg;
    (void)outcome;
    (void)attempt;
    (void)status;
    closed_calls++;
    closed_code = code;
    /* A callback run by aq_store_free may not queue more work. */
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    aq_store_task t = task_of(id, 1);
    reentry_rc = aq_store_claim(closing_store, &t, on_claim, NULL);
}

START_TEST(test_free_with_database_unreachable_calls_back_with_error)
{
    proxy *p = proxy_start(P_DOWN);
    char *pdsn = proxied_dsn(p);
    aq_store_config cfg = {.dsn = pdsn, .flush_timeout_ms = 500, .reconnect_max_ms = 200};
    char err[512] = "";
    closing_store = aq_store_new(&cfg, base, err, sizeof err);
    ck_assert_ptr_nonnull(closing_store);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    aq_store_task t = task_of(id, 1);
    ck_assert_int_eq(aq_store_claim(closing_store, &t, on_claim_at_close, NULL), 0);
    run_for(300);
    ck_assert_int_eq(closed_calls, 0);
    int64_t t0 = aq_mono_us();
    aq_store_free(closing_store);
    double secs = (double)(aq_mono_us() - t0) / 1e6;
    ck_assert_int_eq(closed_calls, 1);
    ck_assert_int_eq(closed_code, AQ_ECLOSED);
    ck_assert_int_eq(reentry_rc, AQ_ECLOSED);
    ck_assert_msg(secs < 3.0, "free took %.1f s", secs);
    proxy_stop(p);
    free(pdsn);
}
END_TEST

START_TEST(test_unmigrated_database_is_waited_for)
{
    char *raw = aq_test_fresh_db("it_store_raw");
    aq_store *s = store_open(raw, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = {0};
    aq_store_task t = task_of(id, 1);
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), 0);
    run_for(500);
    ck_assert_int_eq(c.calls, 0); /* no schema yet: held, not failed */
    migrate(raw);
    ck_assert(run_until(&claims_done, 1, 10000));
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    aq_store_free(s);
    free(raw);
}
END_TEST

START_TEST(test_user_cap_refuses_claims_past_it)
{
    aq_store_config cfg = {.dsn = dsn, .worker_id = "w-test", .flush_timeout_ms = 3000,
                           .reconnect_max_ms = 300, .max_inflight_per_user = 2};
    char err[512] = "";
    aq_store *s = aq_store_new(&cfg, base, err, sizeof err);
    ck_assert_msg(s != NULL, "%s", err);
    char a[AQ_TASK_ID_LEN + 1], b[AQ_TASK_ID_LEN + 1], c3[AQ_TASK_ID_LEN + 1];
    new_id(a);
    new_id(b);
    new_id(c3);
    ck_assert_int_eq(claim_sync(s, a, 1).outcome, AQ_STORE_RUN);
    ck_assert_int_eq(claim_sync(s, b, 1).outcome, AQ_STORE_RUN);
    /* The third of the same user waits, and nothing is written for it. */
    claim_rec c = claim_sync(s, c3, 1);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_BUSY);
    ck_assert_str_eq(val(sqlf("SELECT count(*) FROM agentq.tasks WHERE task_id = '%s'", c3)), "0");
    /* Another user is not held back by it. */
    aq_store_task other = task_of(c3, 1);
    char d[AQ_TASK_ID_LEN + 1];
    new_id(d);
    other.task_id = d;
    other.user_id = "bob";
    claim_rec co = {0};
    int before = claims_done;
    ck_assert_int_eq(aq_store_claim(s, &other, on_claim, &co), 0);
    ck_assert(run_until(&claims_done, before + 1, 10000));
    ck_assert_int_eq(co.outcome, AQ_STORE_RUN);
    /* When one of the user's tasks ends, the waiting one gets its slot. */
    done_rec dr = {0};
    aq_store_result r = {.task_id = a, .attempt = 1, .status = "completed"};
    before = dones;
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &dr), 0);
    ck_assert(run_until(&dones, before + 1, 10000));
    ck_assert_int_eq(claim_sync(s, c3, 1).outcome, AQ_STORE_RUN);
    aq_store_free(s);
}
END_TEST

static Suite *store_suite(void)
{
    Suite *s = suite_create("store");

    TCase *core = tcase_create("core");
    tcase_set_timeout(core, 60);
    tcase_add_checked_fixture(core, setup, teardown);
    tcase_add_test(core, test_claim_new_task_runs_attempt_one);
    tcase_add_test(core, test_finish_commits_before_callback_then_claim_is_final);
    tcase_add_test(core, test_claim_attempt_rules);
    tcase_add_test(core, test_user_cap_refuses_claims_past_it);
    tcase_add_test(core, test_cancel_requested_is_reported_not_run);
    tcase_add_test(core, test_retrying_status_is_not_final_and_attempt_guarded);
    tcase_add_test(core, test_steps_round_trip_and_are_written_once);
    tcase_add_test(core, test_dead_letter_body_round_trips_byte_exact);
    tcase_add_test(core, test_dead_letter_finalises_a_running_row_but_not_a_final_one);
    suite_add_tcase(s, core);

    TCase *limits = tcase_create("limits");
    tcase_set_timeout(limits, 60);
    tcase_add_checked_fixture(limits, setup, teardown);
    tcase_add_test(limits, test_thousands_of_rows_in_few_transactions);
    tcase_add_test(limits, test_database_down_at_start_then_outage_nothing_lost_or_doubled);
    tcase_add_test(limits, test_replay_after_lost_commit_reply_writes_nothing_twice);
    suite_add_tcase(s, limits);

    TCase *errors = tcase_create("errors");
    tcase_set_timeout(errors, 60);
    tcase_add_checked_fixture(errors, setup, teardown);
    tcase_add_test(errors, test_bad_input_refused_without_callback);
    tcase_add_test(errors, test_one_bad_row_does_not_sink_its_batch);
    tcase_add_test(errors, test_free_with_database_unreachable_calls_back_with_error);
    tcase_add_test(errors, test_unmigrated_database_is_waited_for);
    suite_add_tcase(s, errors);
    return s;
}

int main(void)
{
    /* The store logs its outages by design; keep the output to failures. */
    aq_log_set_level(AQ_LOG_ERROR);
    return aq_test_run(store_suite());
}
