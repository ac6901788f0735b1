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
#include "suite.h"
#include "testenv.h"

static char *dsn;                /* the current test's migrated database */
static struct event_base *base;
static int claims_done, dones;   /* callbacks seen in this test */
static int caches_done;          /* cache lookups answered in this test */

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
    claims_done = dones = caches_done = 0;
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

/* What the tests' stores share: worker "w-test", a 3 s flush timeout and
 * reconnects at most 300 ms apart; a test adds its limits to it. */
static aq_store_config store_config(const char *d, int batch_max, int flush_ms)
{
    aq_store_config cfg = {.dsn = d, .worker_id = "w-test", .batch_max = batch_max,
                           .flush_ms = flush_ms, .flush_timeout_ms = 3000,
                           .reconnect_max_ms = 300};
    return cfg;
}

static aq_store *store_new(const aq_store_config *cfg)
{
    char err[512] = "";
    aq_store *s = aq_store_new(cfg, base, err, sizeof err);
    ck_assert_msg(s != NULL, "aq_store_new: %s", err);
    return s;
}

static aq_store *store_open(const char *d, int batch_max, int flush_ms)
{
    aq_store_config cfg = store_config(d, batch_max, flush_ms);
    return store_new(&cfg);
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
    int failures;
    char status[32];
    char reason[256];
    int code;
} claim_rec;

static void on_claim(void *arg, const aq_store_claimed *cl, int code)
{
    claim_rec *c = arg;
    c->calls++;
    if (cl) {
        c->outcome = cl->outcome;
        c->attempt = cl->attempt;
        c->failures = cl->failures;
        snprintf(c->status, sizeof c->status, "%s", aq_status_name(cl->status));
        snprintf(c->reason, sizeof c->reason, "%s", cl->reason ? cl->reason : "");
    }
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

typedef struct sweep_rec {
    int calls, code;
    size_t n;
    char task_id[AQ_TASK_ID_LEN + 1];
    char body[512];
    int priority;
} sweep_rec;

static void on_sweep(void *arg, const aq_store_swept *rows, size_t n, int code)
{
    sweep_rec *r = arg;
    r->calls++;
    r->code = code;
    r->n = n;
    if (n) {
        snprintf(r->task_id, sizeof r->task_id, "%s", rows[0].task_id);
        snprintf(r->body, sizeof r->body, "%.*s", (int)rows[0].body_len, (const char *)rows[0].body);
        r->priority = rows[0].priority;
    }
}

typedef struct renew_rec {
    int calls, code;
    size_t n;
    char first[AQ_TASK_ID_LEN + 1];
} renew_rec;

static void on_renew(void *arg, const char *const *lost, size_t n, int code)
{
    renew_rec *r = arg;
    r->calls++;
    r->code = code;
    r->n = n;
    if (n) snprintf(r->first, sizeof r->first, "%s", lost[0]);
}

typedef struct cache_rec {
    int calls, code;
    char *response;  /* a copy (NULL: none); the test frees it */
    size_t len;
    bool terminated; /* the store's text ended in a NUL at len */
    int64_t at_us;   /* when it came (monotonic) */
} cache_rec;

static void on_cache(void *arg, const char *response, size_t len, int code)
{
    cache_rec *c = arg;
    c->calls++;
    c->code = code;
    c->len = len;
    free(c->response);
    c->response = NULL;
    if (response) {
        c->response = aq_xmalloc(len + 1);
        memcpy(c->response, response, len + 1);
        c->terminated = response[len] == '\0';
    }
    c->at_us = aq_mono_us();
    caches_done++;
}

/* A lookup, waited for; asserts it came back once, and not inside the
 * call. The caller frees r.response. */
static cache_rec cache_get_sync(aq_store *s, const char *request, size_t len)
{
    cache_rec c = {0};
    int before = caches_done;
    ck_assert_int_eq(aq_store_cache_get(s, request, len, on_cache, &c), 0);
    ck_assert_int_eq(c.calls, 0);
    ck_assert_msg(aq_test_loop_until(base, &caches_done, before + 1, 10000), "cache callback never came");
    ck_assert_int_eq(c.calls, 1);
    return c;
}

/* Runs the loop until the store has written `n` puts. */
static void wait_cache_puts(aq_store *s, uint64_t n)
{
    aq_store_counters k;
    for (int i = 0; i < 500; i++) {
        aq_store_stats(s, &k);
        if (k.cache_puts >= n) return;
        aq_test_loop_for(base, 10);
    }
    ck_abort_msg("%llu cache puts written, want %llu (%llu dropped)", (unsigned long long)k.cache_puts,
                 (unsigned long long)n, (unsigned long long)k.cache_dropped);
}

/* Runs the loop until the store is connected (or not), up to 10 s. */
static void wait_connected(aq_store *s, bool want)
{
    aq_store_counters k;
    for (int i = 0; i < 1000; i++) {
        aq_store_stats(s, &k);
        if (k.connected == want) return;
        aq_test_loop_for(base, 10);
    }
    ck_abort_msg("the store never became %s", want ? "connected" : "disconnected");
}

/* The body the worker would have parsed these fields from. */
static const char task_body[] =
    "{\"user_id\": \"alice\", \"goal\": \"add 2 and 3\", \"metadata\": {\"batch\": 7, \"pi\": 3.14159}}";

static aq_store_task task_of(const char *id)
{
    aq_store_task t = {.task_id = id, .user_id = "alice", .goal = "add 2 and 3",
                       .priority = 4, .max_steps = 15,
                       .budget_usd = 0.5, .timeout_seconds = 60, .model = "mock-1",
                       .body = task_body, .body_len = sizeof task_body - 1, .has_metadata = true,
                       .enqueued_at_us = 1700000000123456LL};
    return t;
}

static claim_rec claim_task(aq_store *s, const aq_store_task *t)
{
    claim_rec c = {0};
    int before = claims_done;
    ck_assert_int_eq(aq_store_claim(s, t, on_claim, &c), 0);
    ck_assert_msg(aq_test_loop_until(base, &claims_done, before + 1, 10000), "claim callback never came");
    ck_assert_int_eq(c.calls, 1);
    return c;
}

static claim_rec claim_sync(aq_store *s, const char *id)
{
    claim_rec c = {0};
    aq_store_task t = task_of(id);
    int before = claims_done;
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), 0);
    ck_assert_msg(aq_test_loop_until(base, &claims_done, before + 1, 10000), "claim callback never came");
    ck_assert_int_eq(c.calls, 1);
    return c;
}

static void new_id(char id[AQ_TASK_ID_LEN + 1]) { aq_task_uuid_generate(id); }

/* new_id() for each buffer of a NULL-terminated list. */
static void new_ids(char *id, ...)
{
    va_list ap;
    va_start(ap, id);
    for (; id; id = va_arg(ap, char *)) new_id(id);
    va_end(ap);
}

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
    claim_rec c = claim_sync(s, id);
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
    claim_rec c = claim_sync(s, id);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);

    done_rec d = {.task_id = id};
    aq_store_result r = {.task_id = id, .attempt = c.attempt, .status = AQ_STATUS_COMPLETED, .steps = 3,
                         .prompt_tokens = 1200, .completion_tokens = 345, .cost_usd = 0.0123,
                         .result = "5", .error = NULL};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done_peek, &d), 0);
    ck_assert(aq_test_loop_until(base, &dones, 1, 10000));
    ck_assert_int_eq(d.calls, 1);
    ck_assert_int_eq(d.code, 0);
    ck_assert_str_eq(d.seen, "completed,3,1200,345,0.01230000,true");
    ck_assert_str_eq(val(sqlf("SELECT result FROM agentq.tasks WHERE task_id = '%s'", id)), "5");

    /* The redelivery of a finished task: acked without running. */
    claim_rec again = claim_sync(s, id);
    ck_assert_int_eq(again.code, 0);
    ck_assert_int_eq(again.outcome, AQ_STORE_FINAL);
    ck_assert_str_eq(again.status, "completed");
    ck_assert_int_eq(again.attempt, 1);
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "completed");

    /* A late finish of a final row changes nothing but is not an error. */
    done_rec late = {0};
    aq_store_result r2 = {.task_id = id, .attempt = 1, .status = AQ_STATUS_FAILED, .error = "late"};
    ck_assert_int_eq(aq_store_finish(s, &r2, on_done, &late), 0);
    ck_assert(aq_test_loop_until(base, &dones, 2, 10000));
    ck_assert_int_eq(late.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "completed");
    aq_store_free(s);
}
END_TEST

START_TEST(test_claim_attempt_rules)
{
    aq_store *s = store_open(dsn, 0, 0);
    char lost[AQ_TASK_ID_LEN + 1], queued[AQ_TASK_ID_LEN + 1], retrying[AQ_TASK_ID_LEN + 1],
        recorded[AQ_TASK_ID_LEN + 1];
    new_ids(lost, queued, retrying, recorded, NULL);
    /* A row left running by a worker that is gone (its lease key's lock is
     * held by nobody, its lease written since the server started), one a
     * drain put back after attempt 3, one retrying after two failures, and
     * one a producer recorded before anything ran it. */
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt, failures,"
                 " worker_id, started_at, lease_owner, lease_until, leased_at) VALUES"
                 " ('%s', 'alice', 'g', 'running', 1, 0, 'w-dead', now(), 4242, now() + interval '1 hour', now()),"
                 " ('%s', 'alice', 'g', 'queued', 3, 0, NULL, now(), NULL, NULL, NULL),"
                 " ('%s', 'alice', 'g', 'retrying', 2, 2, 'w-other', now(), NULL, NULL, NULL),"
                 " ('%s', 'alice', 'recorded', 'queued', 1, 0, NULL, NULL, NULL, NULL, NULL)",
                 lost, queued, retrying, recorded));

    claim_rec c = claim_sync(s, lost);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 2);
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, attempt, worker_id, interruptions, failures,"
                              " lease_until > now())"
                              " FROM agentq.tasks WHERE task_id = '%s'", lost)),
                     "running,2,w-test,1,0,t");

    c = claim_sync(s, queued);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 4);

    c = claim_sync(s, retrying);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 3);
    ck_assert_int_eq(c.failures, 2);

    /* Nothing ran the recorded one yet: attempt 1, and the message defines it. */
    c = claim_sync(s, recorded);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 1);
    ck_assert_str_eq(val(sqlf("SELECT goal || ',' || (body_sha256 IS NOT NULL)"
                              " FROM agentq.tasks WHERE task_id = '%s'", recorded)),
                     "add 2 and 3,true");
    aq_store_free(s);
}
END_TEST

/* Two workers, one task: a copy that reaches the second while the first
 * holds a live lease is a duplicate and changes nothing. */
START_TEST(test_copy_of_a_task_under_a_live_lease_is_a_duplicate)
{
    aq_store *a = store_open(dsn, 0, 0), *b = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = claim_sync(a, id);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    c = claim_sync(b, id);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_DUPLICATE);
    ck_assert_int_eq(c.attempt, 1);
    /* The same worker getting it again (a second publish) too. */
    ck_assert_int_eq(claim_sync(a, id).outcome, AQ_STORE_DUPLICATE);
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, attempt, interruptions)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "running,1,0");
    aq_store_free(b);
    aq_store_free(a);
}
END_TEST

/* Waits until nobody holds the lease lock of task `id`'s owner (a freed
 * store's backend has exited). */
static void wait_owner_gone(const char *id)
{
    for (int i = 0; i < 200; i++) {
        if (!strcmp(val(sqlf("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1634169969"
                             " AND objid = (SELECT lease_owner FROM agentq.tasks WHERE task_id = '%s')::oid", id)),
                    "0"))
            return;
        aq_test_loop_for(base, 25);
    }
    ck_abort_msg("a freed store's lease lock is still held");
}

START_TEST(test_takeover_when_the_owner_is_gone_or_the_lease_expired)
{
    aq_store *a = store_open(dsn, 0, 0), *b = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1], other[AQ_TASK_ID_LEN + 1];
    new_ids(id, other, NULL);
    ck_assert_int_eq(claim_sync(a, id).outcome, AQ_STORE_RUN);
    ck_assert_int_eq(claim_sync(a, other).outcome, AQ_STORE_RUN);
    /* The owner dies (its connection closes): its lease counts for nothing. */
    aq_store_free(a);
    wait_owner_gone(id);
    claim_rec c = claim_sync(b, id);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 2);
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, attempt, interruptions, failures)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "running,2,1,0");
    /* A live owner whose lease ran out (it stopped renewing: it lost the
     * task) is taken over as well. */
    aq_store *d = store_open(dsn, 0, 0);
    ck_assert_int_eq(claim_sync(d, id).outcome, AQ_STORE_DUPLICATE);
    exec_ok(sqlf("UPDATE agentq.tasks SET lease_until = now() - interval '1 second' WHERE task_id = '%s'", id));
    c = claim_sync(d, id);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 3);
    /* The first owner's late finish changes nothing and says so. */
    done_rec late = {0};
    aq_store_result r = {.task_id = id, .attempt = 2, .status = AQ_STATUS_COMPLETED, .result = "late"};
    ck_assert_int_eq(aq_store_finish(b, &r, on_done, &late), 0);
    ck_assert(aq_test_loop_until(base, &dones, 1, 10000));
    ck_assert_int_eq(late.code, AQ_ENOTFOUND);
    ck_assert_str_eq(val(sqlf("SELECT status || ',' || attempt FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "running,3");
    aq_store_free(d);
    aq_store_free(b);
}
END_TEST

START_TEST(test_twin_with_another_body_changes_nothing)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    ck_assert_int_eq(claim_sync(s, id).outcome, AQ_STORE_RUN);
    static const char twin_body[] = "{\"user_id\": \"mallory\", \"goal\": \"send me the data\"}";
    aq_store_task twin = task_of(id);
    twin.user_id = "mallory";
    twin.goal = "send me the data";
    twin.body = twin_body;
    twin.body_len = sizeof twin_body - 1;
    twin.has_metadata = false;
    claim_rec c = claim_task(s, &twin);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_CONFLICT);
    ck_assert_str_eq(c.status, "running");
    /* Once final, still a conflict (the worker records it), never a rerun. */
    done_rec d = {0};
    aq_store_result r = {.task_id = id, .attempt = 1, .status = AQ_STATUS_COMPLETED, .result = "5"};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &d), 0);
    ck_assert(aq_test_loop_until(base, &dones, 1, 10000));
    c = claim_task(s, &twin);
    ck_assert_int_eq(c.outcome, AQ_STORE_CONFLICT);
    ck_assert_str_eq(c.status, "completed");
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, user_id, goal, attempt, metadata->>'batch')"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "completed,alice,add 2 and 3,1,7");
    aq_store_free(s);
}
END_TEST

START_TEST(test_metadata_is_stored_as_sent)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    ck_assert_int_eq(claim_sync(s, id).outcome, AQ_STORE_RUN);
    /* Parsed by PostgreSQL from the body: no trip through a double. */
    ck_assert_str_eq(val(sqlf("SELECT metadata->>'pi' FROM agentq.tasks WHERE task_id = '%s'", id)), "3.14159");
    ck_assert_str_eq(val(sqlf("SELECT convert_from(body, 'UTF8') FROM agentq.tasks WHERE task_id = '%s'", id)),
                     task_body);
    aq_store_free(s);
}
END_TEST

START_TEST(test_claim_ends_cancelled_expired_and_too_often_interrupted_tasks)
{
    aq_store_config cfg = store_config(dsn, 0, 0);
    cfg.max_interruptions = 2;
    aq_store *s = store_new(&cfg);
    char cancelled[AQ_TASK_ID_LEN + 1], expired[AQ_TASK_ID_LEN + 1], poison[AQ_TASK_ID_LEN + 1];
    new_ids(cancelled, expired, poison, NULL);
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt, cancel_requested,"
                 " deadline, interruptions, started_at, body) VALUES"
                 " ('%s', 'alice', 'g', 'queued', 1, true, NULL, 0, NULL, NULL),"
                 " ('%s', 'alice', 'g', 'retrying', 1, false, now() - interval '1 second', 0, now(), NULL),"
                 " ('%s', 'alice', 'g', 'running', 3, false, NULL, 2, now(), 'poison')",
                 cancelled, expired, poison));
    claim_rec c = claim_sync(s, cancelled);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_ENDED);
    ck_assert_str_eq(c.status, "cancelled");
    c = claim_sync(s, expired);
    ck_assert_int_eq(c.outcome, AQ_STORE_ENDED);
    ck_assert_str_eq(c.status, "expired");
    /* A third lost execution, with amqp.max_interruptions = 2. */
    c = claim_sync(s, poison);
    ck_assert_int_eq(c.outcome, AQ_STORE_ENDED);
    ck_assert_str_eq(c.status, "failed");
    ck_assert_str_eq(val(sqlf("SELECT string_agg(concat_ws(',', status, finished_at IS NOT NULL,"
                              " lease_owner IS NULL), ';' ORDER BY ord) FROM agentq.tasks"
                              " JOIN unnest(ARRAY['%s', '%s', '%s']::uuid[]) WITH ORDINALITY AS u(id, ord)"
                              " ON task_id = u.id", cancelled, expired, poison)),
                     "cancelled,t,t;expired,t,t;failed,t,t");
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', interruptions, error LIKE 'interrupted 3 times%%')"
                              " FROM agentq.tasks WHERE task_id = '%s'", poison)), "3,t");
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', reason, convert_from(body, 'UTF8'), error LIKE '%%max_interruptions = 2%%')"
                              " FROM agentq.dead_letters WHERE task_id = '%s'", poison)),
                     "interrupted,poison,t");
    ck_assert_str_eq(val(sqlf("SELECT error FROM agentq.tasks WHERE task_id = '%s'", cancelled)),
                     "cancelled before it ran");
    aq_store_free(s);
}
END_TEST

START_TEST(test_finish_counts_failures_and_interruptions_apart)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = claim_sync(s, id);
    done_rec d = {0};
    aq_store_result r = {.task_id = id, .attempt = c.attempt, .status = AQ_STATUS_RETRYING,
                         .error = "HTTP 503"};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &d), 0);
    ck_assert(aq_test_loop_until(base, &dones, 1, 10000));
    ck_assert_int_eq(d.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, error, finished_at IS NULL, failures,"
                              " interruptions, lease_owner IS NULL) FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "retrying,HTTP 503,t,1,0,t");

    /* The retry runs attempt 2 whatever its headers said; a writer of
     * attempt 1 cannot touch it. */
    c = claim_sync(s, id);
    ck_assert_int_eq(c.attempt, 2);
    ck_assert_int_eq(c.failures, 1);
    done_rec stale = {0};
    aq_store_result old = {.task_id = id, .attempt = 1, .status = AQ_STATUS_FAILED, .error = "stale"};
    ck_assert_int_eq(aq_store_finish(s, &old, on_done, &stale), 0);
    ck_assert(aq_test_loop_until(base, &dones, 2, 10000));
    ck_assert_int_eq(stale.code, AQ_ENOTFOUND);

    /* A drain puts it back: an interruption, not a failure. */
    done_rec dq = {0};
    aq_store_result q = {.task_id = id, .attempt = 2, .status = AQ_STATUS_QUEUED};
    ck_assert_int_eq(aq_store_finish(s, &q, on_done, &dq), 0);
    ck_assert(aq_test_loop_until(base, &dones, 3, 10000));
    ck_assert_int_eq(dq.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, attempt, failures, interruptions)"
                              " FROM agentq.tasks WHERE task_id = '%s'", id)),
                     "queued,2,1,1");
    c = claim_sync(s, id);
    ck_assert_int_eq(c.attempt, 3);
    ck_assert_int_eq(c.failures, 1);
    aq_store_free(s);
}
END_TEST

/* A task that ends other than completed gets its dead letter with the
 * finish, once, and only if the finish took effect. */
START_TEST(test_finish_records_the_dead_letter_of_a_task_that_did_not_complete)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    ck_assert_int_eq(claim_sync(s, id).outcome, AQ_STORE_RUN);
    done_rec d = {0}, late = {0};
    aq_store_result r = {.task_id = id, .attempt = 1, .status = AQ_STATUS_MAX_STEPS, .error = "stopped after 15 steps",
                         .dead_body = task_body, .dead_len = sizeof task_body - 1};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &d), 0);
    aq_store_result again = r;
    again.attempt = 2; /* not this attempt's: changes nothing, records nothing */
    ck_assert_int_eq(aq_store_finish(s, &again, on_done, &late), 0);
    ck_assert(aq_test_loop_until(base, &dones, 2, 10000));
    ck_assert_int_eq(d.code, 0);
    ck_assert_str_eq(val(sqlf("SELECT string_agg(concat_ws(',', reason, error, convert_from(body, 'UTF8') = '%s'), ';')"
                              " FROM agentq.dead_letters WHERE task_id = '%s'", task_body, id)),
                     "max_steps,stopped after 15 steps,t");
    aq_store_free(s);
}
END_TEST

START_TEST(test_renew_and_sweep)
{
    aq_store *a = store_open(dsn, 0, 0), *b = store_open(dsn, 0, 0);
    char mine[AQ_TASK_ID_LEN + 1], theirs[AQ_TASK_ID_LEN + 1], orphan[AQ_TASK_ID_LEN + 1];
    new_ids(mine, theirs, orphan, NULL);
    ck_assert_int_eq(claim_sync(a, mine).outcome, AQ_STORE_RUN);
    ck_assert_int_eq(claim_sync(b, theirs).outcome, AQ_STORE_RUN);
    ck_assert_int_eq(claim_sync(b, orphan).outcome, AQ_STORE_RUN);
    exec_ok("UPDATE agentq.tasks SET lease_until = now() - interval '1 second'");
    /* a renews its own task only, even when it names the others, and
     * hears that it does not hold the other one. */
    const char *ids[] = {mine, theirs};
    renew_rec ra = {0}, rb = {0};
    ck_assert_int_eq(aq_store_renew(a, ids, 2, on_renew, &ra), 0);
    const char *ids_b[] = {theirs};
    ck_assert_int_eq(aq_store_renew(b, ids_b, 1, on_renew, &rb), 0);
    ck_assert(aq_test_loop_until(base, &rb.calls, 1, 10000));
    ck_assert(aq_test_loop_until(base, &ra.calls, 1, 10000));
    ck_assert_int_eq(ra.code, 0);
    ck_assert_int_eq(ra.n, 1);
    ck_assert_str_eq(ra.first, theirs);
    ck_assert_int_eq(rb.n, 0);
    for (int i = 0; i < 200 && strcmp(val("SELECT count(*) FROM agentq.tasks WHERE lease_until > now()"), "2"); i++)
        aq_test_loop_for(base, 25);
    ck_assert_str_eq(val(sqlf("SELECT string_agg(task_id::text, ',') FROM agentq.tasks"
                              " WHERE lease_until < now()")), orphan);

    /* The orphan (b stopped renewing it) is swept once, with its body. */
    sweep_rec sw = {0};
    ck_assert_int_eq(aq_store_sweep(a, 10, 300, on_sweep, &sw), 0);
    ck_assert(aq_test_loop_until(base, &sw.calls, 1, 10000));
    ck_assert_int_eq(sw.code, 0);
    ck_assert_int_eq(sw.n, 1);
    ck_assert_str_eq(sw.task_id, orphan);
    ck_assert_str_eq(sw.body, task_body);
    ck_assert_int_eq(sw.priority, 4);
    sweep_rec again = {0};
    ck_assert_int_eq(aq_store_sweep(b, 10, 300, on_sweep, &again), 0);
    ck_assert(aq_test_loop_until(base, &again.calls, 1, 10000));
    ck_assert_int_eq(again.n, 0);
    /* Its copy comes back: the lease expired, so it runs again. */
    claim_rec c = claim_sync(a, orphan);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    ck_assert_int_eq(c.attempt, 2);
    ck_assert_str_eq(val(sqlf("SELECT swept_at IS NULL FROM agentq.tasks WHERE task_id = '%s'", orphan)), "t");
    aq_store_free(b);
    aq_store_free(a);
}
END_TEST

START_TEST(test_steps_round_trip_and_are_written_once)
{
    aq_store *s = store_open(dsn, 0, 0);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec c = claim_sync(s, id);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    aq_store_step_row llm = {.task_id = id, .attempt = 1, .step = 1, .seq = 0, .kind = "llm",
                             .name = "mock-1", .status = "ok",
                             .started_at_us = 1700000001000001LL, .duration_ms = 812.5,
                             .prompt_tokens = 100, .completion_tokens = 20, .cost_usd = 0.0001,
                             .detail = "{\"finish\": \"tool_calls\"}", .provider = "openai-eu"};
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
    aq_store_result r = {.task_id = id, .attempt = 1, .status = AQ_STATUS_COMPLETED, .steps = 1};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &d), 0);
    ck_assert(aq_test_loop_until(base, &dones, 1, 10000));
    ck_assert_str_eq(val(sqlf("SELECT string_agg(concat_ws(':', kind, seq, name, status,"
                              " duration_ms, prompt_tokens, completion_tokens, cost_usd,"
                              " detail->>'args', detail->>'finish',"
                              " (extract(epoch FROM started_at) * 1000000)::bigint), '|'"
                              " ORDER BY kind, seq) FROM agentq.steps WHERE task_id = '%s'", id)),
                     "llm:0:mock-1:ok:812.5:100:20:0.00010000:tool_calls:1700000001000001|"
                     "tool:0:calculator:ok:0.25:0:0:0.00000000:2+3|"
                     "tool:1:calculator:ok:0.25:0:0:0.00000000:4*5");
    /* steps.provider: the llm row's, NULL for tool rows. */
    ck_assert_str_eq(val(sqlf("SELECT string_agg(kind || '=' || coalesce(provider, 'NULL'), ','"
                              " ORDER BY kind, seq) FROM agentq.steps WHERE task_id = '%s'", id)),
                     "llm=openai-eu,tool=NULL,tool=NULL");
    aq_store_free(s);
}
END_TEST

/* The fleet's response cache through the store: what a put stores a get
 * returns byte for byte (multibyte UTF-8, 100 KB), a missing key is a
 * miss (code 0, NULL), and the counters say so. */
START_TEST(test_cache_put_then_get_returns_the_same_bytes)
{
    aq_store *s = store_open(dsn, 0, 0);
    wait_connected(s, true);
    static const char req1[] = "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"2+3\"}]}";
    static const char resp1[] = "{\"id\": \"c-1\", \"choices\": [{\"message\": {\"content\": \"5\"}}]}";
    static const char req2[] = "{\"messages\": [{\"content\": \"Grüße, ☃\"}]}";
    static const char resp2[] = "{\"choices\": [{\"message\": {\"content\": \"☃ é 𝄞 — \\u0000 kept as text\"}}]}";
    /* 100 KB of a reply, multibyte characters all through it. */
    size_t big_len = 0, cap = 100 * 1024 + 64;
    char *big = aq_xmalloc(cap + 1);
    static const char unit[] = "{\"k\": \"é☃𝄞\"},";
    while (big_len + sizeof unit - 1 <= cap) {
        memcpy(big + big_len, unit, sizeof unit - 1);
        big_len += sizeof unit - 1;
    }
    big[big_len] = '\0';
    ck_assert_uint_ge(big_len, 100 * 1024);
    char bigreq[64];
    snprintf(bigreq, sizeof bigreq, "{\"big\": %zu}", big_len);

    /* The texts are not NUL-terminated: only len counts. */
    char *r1 = aq_xmalloc(sizeof req1 - 1);
    memcpy(r1, req1, sizeof req1 - 1);
    ck_assert_int_eq(aq_store_cache_put(s, r1, sizeof req1 - 1, "m", resp1, sizeof resp1 - 1, 60, 1 << 20), 0);
    free(r1);
    ck_assert_int_eq(aq_store_cache_put(s, req2, sizeof req2 - 1, NULL, resp2, sizeof resp2 - 1, 60, 1 << 20), 0);
    ck_assert_int_eq(aq_store_cache_put(s, bigreq, strlen(bigreq), "m", big, big_len, 60, 1 << 20), 0);
    wait_cache_puts(s, 3);
    ck_assert_str_eq(val("SELECT count(*) || ',' || sum(bytes) FROM agentq.llm_cache"),
                     sqlf("3,%zu", sizeof resp1 - 1 + sizeof resp2 - 1 + big_len));
    /* The key is the request text's sha256, the response the bytes put. */
    ck_assert_str_eq(val(sqlf("SELECT response = '%s' FROM agentq.llm_cache"
                              " WHERE key = sha256(convert_to('%s', 'UTF8'))", resp2, req2)), "t");

    cache_rec c = cache_get_sync(s, req1, sizeof req1 - 1);
    ck_assert_int_eq(c.code, 0);
    ck_assert_uint_eq(c.len, sizeof resp1 - 1);
    ck_assert_mem_eq(c.response, resp1, c.len);
    ck_assert(c.terminated);
    free(c.response);
    c = cache_get_sync(s, req2, sizeof req2 - 1);
    ck_assert_int_eq(c.code, 0);
    ck_assert_uint_eq(c.len, sizeof resp2 - 1);
    ck_assert_mem_eq(c.response, resp2, c.len);
    free(c.response);
    c = cache_get_sync(s, bigreq, strlen(bigreq));
    ck_assert_int_eq(c.code, 0);
    ck_assert_uint_eq(c.len, big_len);
    ck_assert_mem_eq(c.response, big, big_len);
    ck_assert(c.terminated);
    free(c.response);
    /* A request one byte off is another key: a miss. */
    c = cache_get_sync(s, req1, sizeof req1 - 2);
    ck_assert_int_eq(c.code, 0);
    ck_assert_ptr_null(c.response);
    ck_assert_uint_eq(c.len, 0);
    c = cache_get_sync(s, "{}", 2);
    ck_assert_int_eq(c.code, 0);
    ck_assert_ptr_null(c.response);

    ck_assert_str_eq(val("SELECT sum(hits) FROM agentq.llm_cache"), "3");
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert_uint_eq(k.cache_hits, 3);
    ck_assert_uint_eq(k.cache_misses, 2);
    ck_assert_uint_eq(k.cache_errors, 0);
    ck_assert_uint_eq(k.cache_dropped, 0);
    ck_assert_uint_eq(k.failed, 0);
    ck_assert_uint_eq(aq_store_pending(s), 0);

    /* The store's bound is the put's: a put over it evicts the oldest. */
    ck_assert_int_eq(aq_store_cache_put(s, "{\"q\": 4}", 8, "m", big, big_len, 60, (int64_t)big_len + 100), 0);
    wait_cache_puts(s, 4);
    ck_assert_str_eq(val("SELECT string_agg(bytes::text, ',') FROM agentq.llm_cache"), sqlf("%zu", big_len));
    free(big);
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
                        .headers = "{\"x-death\": [{\"count\": 1}]}", .status = AQ_STATUS_REJECTED};
    done_rec d = {0};
    ck_assert_int_eq(aq_store_dead_letter(s, &dl, on_done, &d), 0);
    /* And one with no task id at all, and an empty body. */
    aq_store_dead anon = {.task_id = NULL, .reason = "expired", .body = "", .body_len = 0};
    done_rec d2 = {0};
    ck_assert_int_eq(aq_store_dead_letter(s, &anon, on_done, &d2), 0);
    ck_assert(aq_test_loop_until(base, &dones, 2, 10000));
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

/* A dead letter sets the status of a task that waits (queued, retrying)
 * and was defined by the same body; it leaves alone a final row, a row a
 * worker runs, and a row another body defined (a malformed twin). */
START_TEST(test_dead_letter_finalises_only_a_waiting_task_of_its_body)
{
    aq_store *s = store_open(dsn, 0, 0);
    char waiting[AQ_TASK_ID_LEN + 1], done_id[AQ_TASK_ID_LEN + 1], running[AQ_TASK_ID_LEN + 1];
    new_ids(waiting, done_id, running, NULL);
    ck_assert_int_eq(claim_sync(s, waiting).outcome, AQ_STORE_RUN);
    ck_assert_int_eq(claim_sync(s, running).outcome, AQ_STORE_RUN);
    done_rec r0 = {0};
    aq_store_result retry = {.task_id = waiting, .attempt = 1, .status = AQ_STATUS_RETRYING, .error = "HTTP 500"};
    ck_assert_int_eq(aq_store_finish(s, &retry, on_done, &r0), 0);
    ck_assert(aq_test_loop_until(base, &dones, 1, 10000));
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, result)"
                 " VALUES ('%s', 'bob', 'g', 'completed', '42')", done_id));
    aq_store_dead out = {.task_id = waiting, .reason = "expired", .error = "TTL",
                         .body = task_body, .body_len = sizeof task_body - 1, .status = AQ_STATUS_EXPIRED};
    aq_store_dead twin = {.task_id = waiting, .reason = "rejected", .error = "user_id: must be a string",
                          .body = "{\"user_id\": 5}", .body_len = 14, .status = AQ_STATUS_REJECTED};
    aq_store_dead late = {.task_id = done_id, .reason = "expired", .error = "TTL",
                          .body = "{}", .body_len = 2, .status = AQ_STATUS_EXPIRED};
    aq_store_dead copy = {.task_id = running, .reason = "expired", .error = "TTL",
                          .body = task_body, .body_len = sizeof task_body - 1, .status = AQ_STATUS_EXPIRED};
    done_rec d[4] = {{0}};
    ck_assert_int_eq(aq_store_dead_letter(s, &twin, on_done, &d[0]), 0);
    ck_assert_int_eq(aq_store_dead_letter(s, &late, on_done, &d[1]), 0);
    ck_assert_int_eq(aq_store_dead_letter(s, &copy, on_done, &d[2]), 0);
    ck_assert(aq_test_loop_until(base, &dones, 4, 10000));
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", waiting)), "retrying");
    ck_assert_int_eq(aq_store_dead_letter(s, &out, on_done, &d[3]), 0);
    ck_assert(aq_test_loop_until(base, &dones, 5, 10000));
    for (int i = 0; i < 4; i++) ck_assert_int_eq(d[i].code, 0);
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, error, user_id)"
                              " FROM agentq.tasks WHERE task_id = '%s'", waiting)),
                     "expired,TTL,alice");
    ck_assert_str_eq(val(sqlf("SELECT concat_ws(',', status, result) FROM agentq.tasks"
                              " WHERE task_id = '%s'", done_id)),
                     "completed,42");
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", running)), "running");
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.dead_letters"), "4");
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
        aq_store_task t = task_of(ids[i]);
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[i]), 0);
    }
    ck_assert_msg(aq_test_loop_until(base, &claims_done, MANY, 30000), "%d claims of %d", claims_done, MANY);
    aq_store_counters k0;
    aq_store_stats(s, &k0);

    for (int i = 0; i < MANY; i++) {
        ck_assert_int_eq(cl[i].outcome, AQ_STORE_RUN);
        aq_store_step_row row = {.task_id = ids[i], .attempt = 1, .step = 1, .kind = "llm",
                                 .name = "mock-1", .status = "ok", .duration_ms = 1,
                                 .prompt_tokens = 10, .completion_tokens = 2,
                                 .cost_usd = 0.001, .detail = "{}"};
        ck_assert_int_eq(aq_store_step(s, &row), 0);
        aq_store_result r = {.task_id = ids[i], .attempt = 1, .status = AQ_STATUS_COMPLETED,
                             .steps = 1, .prompt_tokens = 10, .completion_tokens = 2,
                             .cost_usd = 0.001, .result = "ok"};
        ck_assert_int_eq(aq_store_finish(s, &r, on_done, &fin[i]), 0);
    }
    ck_assert_uint_ge(aq_store_pending(s), 1);
    ck_assert_msg(aq_test_loop_until(base, &dones, MANY, 30000), "%d finishes of %d", dones, MANY);
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
        aq_store_task t = task_of(ids[i]);
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[i]), 0);
        aq_store_step_row row = {.task_id = ids[i], .attempt = 1, .step = 1, .kind = "llm",
                                 .duration_ms = 1};
        ck_assert_int_eq(aq_store_step(s, &row), 0);
    }
    /* The database is unreachable: everything waits, nothing is lost. */
    aq_test_loop_for(base, 800);
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert(!k.connected);
    ck_assert_int_eq(claims_done, 0);
    ck_assert_uint_eq(aq_store_pending(s), 2 * N);
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.tasks"), "0");

    proxy_set(p, P_UP, false);
    ck_assert_msg(aq_test_loop_until(base, &claims_done, N, 15000), "%d claims after the outage", claims_done);
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(cl[i].code, 0);
        ck_assert_int_eq(cl[i].outcome, AQ_STORE_RUN);
        ck_assert_int_eq(cl[i].attempt, 1);
    }

    /* An outage in the middle: connections cut, new ones refused. */
    proxy_set(p, P_DOWN, true);
    for (int i = 0; i < N; i++) {
        aq_store_result r = {.task_id = ids[i], .attempt = 1, .status = AQ_STATUS_COMPLETED,
                             .steps = 1, .result = "ok"};
        ck_assert_int_eq(aq_store_finish(s, &r, on_done, &fin[i]), 0);
        new_id(ids[N + i]);
        aq_store_task t = task_of(ids[N + i]);
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[N + i]), 0);
    }
    aq_test_loop_for(base, 1000);
    ck_assert_int_eq(dones, 0);
    proxy_set(p, P_UP, false);
    ck_assert_msg(aq_test_loop_until(base, &dones, N, 15000), "%d finishes after the outage", dones);
    ck_assert(aq_test_loop_until(base, &claims_done, 2 * N, 15000));
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
    new_ids(running, other, NULL);
    exec_ok(sqlf("INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt)"
                 " VALUES ('%s', 'alice', 'g', 'running', 1), ('%s', 'bob', 'g', 'running', 1)",
                 running, other));
    aq_test_loop_for(base, 300); /* connected, statements prepared */
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert(k.connected);

    /* From now on the server's replies are lost. */
    proxy_set(p, P_BLACKHOLE, false);
    claim_rec c = {0};
    aq_store_task t = task_of(running);
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), 0);
    aq_store_step_row row = {.task_id = other, .attempt = 1, .step = 1, .kind = "llm",
                             .duration_ms = 1};
    ck_assert_int_eq(aq_store_step(s, &row), 0);
    done_rec fin = {0}, dl = {0};
    aq_store_result r = {.task_id = other, .attempt = 1, .status = AQ_STATUS_COMPLETED, .steps = 1};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &fin), 0);
    aq_store_dead dead = {.task_id = NULL, .reason = "rejected", .error = "body: not JSON",
                          .body = "\xff", .body_len = 1};
    ck_assert_int_eq(aq_store_dead_letter(s, &dead, on_done, &dl), 0);

    /* Wait until the transaction is committed on the server. */
    const char *seen = "";
    for (int i = 0; i < 200; i++) {
        aq_test_loop_for(base, 25);
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
    ck_assert_msg(aq_test_loop_until(base, &dones, 2, 15000), "dones %d", dones);
    ck_assert(aq_test_loop_until(base, &claims_done, 1, 15000));
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
    aq_store_task t = task_of("not-a-uuid");
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), AQ_EINVAL);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    aq_store_result r = {.task_id = id, .status = AQ_STATUS_NONE};
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, NULL), AQ_EINVAL);
    aq_store_step_row row = {.task_id = id, .step = 1, .kind = "think"};
    ck_assert_int_eq(aq_store_step(s, &row), AQ_EINVAL);
    aq_store_dead d = {.reason = "rejected", .status = AQ_STATUS_RUNNING};
    ck_assert_int_eq(aq_store_dead_letter(s, &d, on_done, NULL), AQ_EINVAL);
    /* The cache's: no callback, a NUL in a text, no TTL or bound. */
    cache_rec cr = {0};
    ck_assert_int_eq(aq_store_cache_get(s, "q", 1, NULL, NULL), AQ_EINVAL);
    ck_assert_int_eq(aq_store_cache_get(s, "q\0r", 3, on_cache, &cr), AQ_EINVAL);
    ck_assert_int_eq(aq_store_cache_get(s, NULL, 1, on_cache, &cr), AQ_EINVAL);
    ck_assert_int_eq(aq_store_cache_put(s, "q", 1, "m", "r\0", 2, 60, 100), AQ_EINVAL);
    ck_assert_int_eq(aq_store_cache_put(s, "q", 1, "m", NULL, 0, 60, 100), AQ_EINVAL);
    ck_assert_int_eq(aq_store_cache_put(s, "q", 1, "m", "r", 1, 0, 100), AQ_EINVAL);
    ck_assert_int_eq(aq_store_cache_put(s, "q", 1, "m", "r", 1, 60, 0), AQ_EINVAL);
    aq_test_loop_for(base, 200);
    ck_assert_int_eq(cr.calls, 0);
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
        aq_store_task t = task_of(ids[i]);
        if (i == 4) { /* PostgreSQL refuses this one */
            t.body = "{not json";
            t.body_len = 9;
        }
        if (i == 7) t.priority = 999;         /* and this one (CHECK) */
        ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl[i]), 0);
    }
    /* A step for a task that has no row breaks the foreign key: dropped. */
    char ghost[AQ_TASK_ID_LEN + 1];
    new_id(ghost);
    aq_store_step_row row = {.task_id = ghost, .step = 1, .kind = "llm"};
    ck_assert_int_eq(aq_store_step(s, &row), 0);
    ck_assert(aq_test_loop_until(base, &claims_done, N, 15000));
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
    for (int i = 0; i < 50 && aq_store_pending(s); i++) aq_test_loop_for(base, 20);
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert_uint_eq(k.failed, 3);
    ck_assert_uint_eq(k.requests, N - 2);
    ck_assert_str_eq(val("SELECT count(*) FROM agentq.steps"), "0");
    aq_store_free(s);
}
END_TEST

/* A lookup never makes a session wait out an outage: with the database
 * unreachable, gone, or not answering, it is answered with an error
 * within moments (the timeout at most), exactly once, and never replayed;
 * puts meanwhile are dropped. */
START_TEST(test_cache_lookup_never_waits_out_an_outage)
{
    /* A store pointed at a port where nothing listens. */
    int dead_port = 0;
    int dead_fd = aq_test_loopback_socket(0, &dead_port);
    char dead_dsn[256];
    snprintf(dead_dsn, sizeof dead_dsn, "host=127.0.0.1 port=%d user=postgres dbname=postgres connect_timeout=2",
             dead_port);
    aq_store *s = store_open(dead_dsn, 0, 0);
    aq_test_loop_for(base, 100);
    int64_t t0 = aq_mono_us();
    cache_rec c = cache_get_sync(s, "{\"q\": 1}", 8);
    ck_assert_int_eq(c.code, AQ_EIO);
    ck_assert_ptr_null(c.response);
    ck_assert_msg(c.at_us - t0 < 2000000, "answered after %.1f s", (double)(c.at_us - t0) / 1e6);
    ck_assert_int_eq(aq_store_cache_put(s, "{\"q\": 1}", 8, "m", "r", 1, 60, 100), 0);
    aq_store_counters k;
    aq_store_stats(s, &k);
    ck_assert_uint_eq(k.cache_dropped, 1);
    ck_assert_uint_eq(k.cache_errors, 1);
    aq_store_free(s);
    close(dead_fd);

    /* Through the proxy: up, then not answering, then gone, then back. */
    proxy *p = proxy_start(P_UP);
    char *pdsn = proxied_dsn(p);
    aq_store_config cfg = store_config(pdsn, 0, 0);
    cfg.cache_timeout_ms = 500;
    s = store_new(&cfg);
    wait_connected(s, true);
    ck_assert_int_eq(aq_store_cache_put(s, "{\"q\": 2}", 8, "m", "cached", 6, 60, 100), 0);
    wait_cache_puts(s, 1);
    c = cache_get_sync(s, "{\"q\": 2}", 8);
    ck_assert_int_eq(c.code, 0);
    ck_assert_str_eq(c.response, "cached");
    free(c.response);

    /* The server's replies are lost: the lookup and one behind it are
     * answered at their deadline, though the writer still waits. */
    proxy_set(p, P_BLACKHOLE, false);
    cache_rec slow[2] = {{0}};
    t0 = aq_mono_us();
    ck_assert_int_eq(aq_store_cache_get(s, "{\"q\": 2}", 8, on_cache, &slow[0]), 0);
    aq_test_loop_for(base, 100);
    ck_assert_int_eq(aq_store_cache_get(s, "{\"q\": 2}", 8, on_cache, &slow[1]), 0);
    ck_assert(aq_test_loop_until(base, &caches_done, 4, 3000));
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(slow[i].calls, 1);
        ck_assert_int_eq(slow[i].code, AQ_ETIMEDOUT);
        ck_assert_ptr_null(slow[i].response);
        ck_assert_msg(slow[i].at_us - t0 < 2000000, "answered after %.1f s", (double)(slow[i].at_us - t0) / 1e6);
    }
    ck_assert_msg(slow[0].at_us - t0 >= 450000, "answered before its timeout");

    /* The connection goes: its late results call nobody back again, and
     * while the store reconnects a lookup is answered at once, also with
     * a claim waiting for the database. */
    proxy_set(p, P_DOWN, true);
    wait_connected(s, false);
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    claim_rec cl = {0};
    aq_store_task t = task_of(id);
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &cl), 0);
    t0 = aq_mono_us();
    c = cache_get_sync(s, "{\"q\": 2}", 8);
    ck_assert_int_eq(c.code, AQ_EIO);
    ck_assert_msg(c.at_us - t0 < 1000000, "answered after %.1f s", (double)(c.at_us - t0) / 1e6);
    ck_assert_int_eq(aq_store_cache_put(s, "{\"q\": 3}", 8, "m", "dropped", 7, 60, 100), 0);
    ck_assert_int_eq(slow[0].calls + slow[1].calls, 2);
    ck_assert_int_eq(cl.calls, 0);

    /* Back: the claim is written, the cache answers again, and nothing
     * of the outage was replayed (the dropped put is not there). */
    proxy_set(p, P_UP, false);
    ck_assert(aq_test_loop_until(base, &claims_done, 1, 10000));
    ck_assert_int_eq(cl.code, 0);
    c = cache_get_sync(s, "{\"q\": 2}", 8);
    ck_assert_int_eq(c.code, 0);
    ck_assert_str_eq(c.response, "cached");
    free(c.response);
    c = cache_get_sync(s, "{\"q\": 3}", 8);
    ck_assert_int_eq(c.code, 0);
    ck_assert_ptr_null(c.response);
    ck_assert_int_eq(slow[0].calls + slow[1].calls, 2);
    /* Three hits: the lookup whose answer the black hole swallowed ran
     * on the server; the one behind it was past its deadline and not sent. */
    ck_assert_str_eq(val("SELECT count(*) || ',' || sum(hits) FROM agentq.llm_cache"), "1,3");
    aq_store_stats(s, &k);
    ck_assert_uint_eq(k.cache_errors, 3);
    ck_assert_uint_eq(k.cache_dropped, 1);
    ck_assert_uint_eq(k.failed, 0);
    aq_store_free(s);

    /* Freed with a lookup in flight on a server that does not answer:
     * called back once, with an error, within the flush timeout. */
    cfg.cache_timeout_ms = 60000;
    cfg.flush_timeout_ms = 500;
    s = store_new(&cfg);
    wait_connected(s, true);
    proxy_set(p, P_BLACKHOLE, false);
    cache_rec last = {0};
    ck_assert_int_eq(aq_store_cache_get(s, "{\"q\": 2}", 8, on_cache, &last), 0);
    aq_test_loop_for(base, 200);
    ck_assert_int_eq(last.calls, 0);
    t0 = aq_mono_us();
    aq_store_free(s);
    ck_assert_int_eq(last.calls, 1);
    ck_assert_int_lt(last.code, 0);
    ck_assert_msg(aq_mono_us() - t0 < 3000000, "free took %.1f s", (double)(aq_mono_us() - t0) / 1e6);
    proxy_stop(p);
    free(pdsn);
}
END_TEST

static aq_store *closing_store;
static int closed_calls, closed_code = 1, reentry_rc = 1;

static void on_claim_at_close(void *arg, const aq_store_claimed *c, int code)
{
    (void)arg;
    (void)c;
    closed_calls++;
    closed_code = code;
    /* A callback run by aq_store_free may not queue more work. */
    char id[AQ_TASK_ID_LEN + 1];
    new_id(id);
    aq_store_task t = task_of(id);
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
    aq_store_task t = task_of(id);
    ck_assert_int_eq(aq_store_claim(closing_store, &t, on_claim_at_close, NULL), 0);
    aq_test_loop_for(base, 300);
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
    aq_store_task t = task_of(id);
    ck_assert_int_eq(aq_store_claim(s, &t, on_claim, &c), 0);
    aq_test_loop_for(base, 500);
    ck_assert_int_eq(c.calls, 0); /* no schema yet: held, not failed */
    migrate(raw);
    ck_assert(aq_test_loop_until(base, &claims_done, 1, 10000));
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_RUN);
    aq_store_free(s);
    free(raw);
}
END_TEST

/* agentq.users settings, changed in SQL while the store runs: the user's
 * own cap wins over the fleet's; a daily budget spent ends the next task
 * (over_budget 'fail') or holds it (over_budget 'wait'). */
START_TEST(test_user_settings_cap_and_budget)
{
    aq_store_config cfg = store_config(dsn, 0, 0);
    cfg.max_inflight_per_user = 5;
    aq_store *s = store_new(&cfg);
    char a[AQ_TASK_ID_LEN + 1], b[AQ_TASK_ID_LEN + 1];
    new_ids(a, b, NULL);
    exec_ok("INSERT INTO agentq.users (user_id, max_inflight) VALUES ('alice', 1)");
    ck_assert_int_eq(claim_sync(s, a).outcome, AQ_STORE_RUN);
    claim_rec c = claim_sync(s, b);
    ck_assert_int_eq(c.outcome, AQ_STORE_BUSY);
    ck_assert_msg(strstr(c.reason, "agentq.users.max_inflight = 1") != NULL, "%s", c.reason);
    exec_ok("UPDATE agentq.users SET max_inflight = 2 WHERE user_id = 'alice'");
    ck_assert_int_eq(claim_sync(s, b).outcome, AQ_STORE_RUN);

    /* Both finish having spent $0.03; the budget is $0.05: one more
     * starts, and once it has spent too the next one ends unstarted. */
    exec_ok("UPDATE agentq.users SET max_inflight = NULL, daily_budget_usd = 0.05 WHERE user_id = 'alice'");
    const char *ids[] = {a, b};
    for (int i = 0; i < 2; i++) {
        done_rec dr = {0};
        aq_store_result r = {.task_id = ids[i], .attempt = 1, .status = AQ_STATUS_COMPLETED, .cost_usd = 0.03};
        int before = dones;
        ck_assert_int_eq(aq_store_finish(s, &r, on_done, &dr), 0);
        ck_assert(aq_test_loop_until(base, &dones, before + 1, 10000));
    }
    char d[AQ_TASK_ID_LEN + 1], e[AQ_TASK_ID_LEN + 1];
    new_ids(d, e, NULL);
    c = claim_sync(s, d);
    ck_assert_int_eq(c.outcome, AQ_STORE_ENDED);
    ck_assert_str_eq(c.status, "budget_exceeded");
    ck_assert_str_eq(val(sqlf("SELECT status || '|' || (error LIKE '%%daily_budget_usd = 0.05%%')"
                              " || '|' || (SELECT count(*) FROM agentq.dead_letters l WHERE l.task_id = t.task_id"
                              "            AND l.reason = 'budget_exceeded')"
                              " FROM agentq.tasks t WHERE task_id = '%s'", d)),
                     "budget_exceeded|true|1");
    /* 'wait': the task stays queued and unstarted instead, until the
     * budget is raised. */
    exec_ok("UPDATE agentq.users SET over_budget = 'wait' WHERE user_id = 'alice'");
    c = claim_sync(s, e);
    ck_assert_int_eq(c.outcome, AQ_STORE_BUSY);
    ck_assert_msg(strstr(c.reason, "daily budget") != NULL, "%s", c.reason);
    ck_assert_str_eq(val(sqlf("SELECT status FROM agentq.tasks WHERE task_id = '%s'", e)), "queued");
    exec_ok("UPDATE agentq.users SET daily_budget_usd = 1 WHERE user_id = 'alice'");
    ck_assert_int_eq(claim_sync(s, e).outcome, AQ_STORE_RUN);
    aq_store_free(s);
}
END_TEST

typedef struct route_rec {
    int calls, code, lane;
    bool final;
    int64_t ttl_ms;
} route_rec;

static int routes_done;

static void on_route(void *arg, const aq_store_routed *r, int code)
{
    route_rec *rr = arg;
    rr->calls++;
    rr->code = code;
    if (r) {
        rr->final = r->final;
        rr->lane = r->lane;
        rr->ttl_ms = r->ttl_ms;
    }
    routes_done++;
}

static route_rec route_sync(aq_store *s, const aq_store_task *t)
{
    route_rec r = {0};
    int before = routes_done;
    ck_assert_int_eq(aq_store_route(s, t, on_route, &r), 0);
    ck_assert_msg(aq_test_loop_until(base, &routes_done, before + 1, 10000), "route callback never came");
    ck_assert_int_eq(r.code, 0);
    return r;
}

/* Routing records the task as queued at once and keeps a user in one
 * lane while it has work; a user arriving while another's burst fills a
 * lane takes its other candidate when that one is the burst's lane. */
START_TEST(test_route_records_queued_and_picks_lanes)
{
    aq_store_config cfg = store_config(dsn, 0, 0);
    cfg.lanes = 8;
    aq_store *s = store_new(&cfg);
    char id[AQ_TASK_ID_LEN + 1];
    aq_store_task t = task_of(id);
    t.deadline_us = aq_now_us() + 60 * 1000000LL;
    int lane = -1;
    for (int i = 0; i < 20; i++) {
        new_id(id);
        route_rec r = route_sync(s, &t);
        ck_assert(!r.final);
        ck_assert(r.lane >= 0 && r.lane < 8);
        if (lane < 0) lane = r.lane;
        ck_assert_int_eq(r.lane, lane); /* one lane for alice's burst */
        ck_assert(r.ttl_ms > 50000 && r.ttl_ms <= 60000);
    }
    ck_assert_str_eq(val(sqlf("SELECT count(*) || ',' || min(lane) || ',' || bool_and(body IS NOT NULL)"
                              " FROM agentq.tasks WHERE user_id = 'alice' AND status = 'queued'")),
                     sqlf("20,%d,true", lane));
    /* A final task with its own body: nothing to route. */
    exec_ok(sqlf("UPDATE agentq.tasks SET status = 'completed' WHERE task_id = '%s'", id));
    ck_assert(route_sync(s, &t).final);
    /* Every other user whose two candidates include alice's lane avoids
     * it (its other candidate holds nothing). */
    int avoided = 0, could = 0;
    for (int u = 0; u < 40; u++) {
        char user[32];
        snprintf(user, sizeof user, "late%d", u);
        int ca = atoi(val(sqlf("SELECT agentq.lane_candidate('%s', 0, 'a', 8)", user)));
        int cb = atoi(val(sqlf("SELECT agentq.lane_candidate('%s', 0, 'b', 8)", user)));
        if (ca == cb || (ca != lane && cb != lane)) continue;
        could++;
        aq_store_task o = t;
        o.user_id = user;
        new_id(id);
        if (route_sync(s, &o).lane != lane) avoided++;
    }
    ck_assert_int_gt(could, 0);
    ck_assert_int_eq(avoided, could);
    /* A user of weight 3 spreads its tasks over three lane slots (fewer
     * lanes only if two slots hash to the same lane): three shares. */
    exec_ok("INSERT INTO agentq.users (user_id, weight) VALUES ('heavy', 3)");
    aq_store_task hv = t;
    hv.user_id = "heavy";
    for (int i = 0; i < 30; i++) {
        new_id(id);
        route_sync(s, &hv);
    }
    int lanes = atoi(val("SELECT count(DISTINCT lane) FROM agentq.tasks WHERE user_id = 'heavy'"));
    ck_assert_msg(lanes >= 2 && lanes <= 3, "weight 3 used %d lanes", lanes);
    aq_store_free(s);
}
END_TEST

START_TEST(test_user_cap_refuses_claims_past_it)
{
    aq_store_config cfg = store_config(dsn, 0, 0);
    cfg.max_inflight_per_user = 2;
    aq_store *s = store_new(&cfg);
    char a[AQ_TASK_ID_LEN + 1], b[AQ_TASK_ID_LEN + 1], c3[AQ_TASK_ID_LEN + 1];
    new_ids(a, b, c3, NULL);
    ck_assert_int_eq(claim_sync(s, a).outcome, AQ_STORE_RUN);
    ck_assert_int_eq(claim_sync(s, b).outcome, AQ_STORE_RUN);
    /* The third of the same user waits: queued (SQL sees it), no attempt
     * started, and the claim says which setting holds it. */
    claim_rec c = claim_sync(s, c3);
    ck_assert_int_eq(c.code, 0);
    ck_assert_int_eq(c.outcome, AQ_STORE_BUSY);
    ck_assert_msg(strstr(c.reason, "limits.max_inflight_per_user = 2") != NULL, "%s", c.reason);
    ck_assert_str_eq(val(sqlf("SELECT status || ',' || (started_at IS NULL) FROM agentq.tasks WHERE task_id = '%s'", c3)),
                     "queued,true");
    /* Another user is not held back by it. */
    aq_store_task other = task_of(c3);
    char d[AQ_TASK_ID_LEN + 1];
    new_id(d);
    other.task_id = d;
    other.user_id = "bob";
    claim_rec co = {0};
    int before = claims_done;
    ck_assert_int_eq(aq_store_claim(s, &other, on_claim, &co), 0);
    ck_assert(aq_test_loop_until(base, &claims_done, before + 1, 10000));
    ck_assert_int_eq(co.outcome, AQ_STORE_RUN);
    /* When one of the user's tasks ends, the waiting one gets its slot. */
    done_rec dr = {0};
    aq_store_result r = {.task_id = a, .attempt = 1, .status = AQ_STATUS_COMPLETED};
    before = dones;
    ck_assert_int_eq(aq_store_finish(s, &r, on_done, &dr), 0);
    ck_assert(aq_test_loop_until(base, &dones, before + 1, 10000));
    ck_assert_int_eq(claim_sync(s, c3).outcome, AQ_STORE_RUN);
    aq_store_free(s);
}
END_TEST

static Suite *store_suite(void)
{
    const TTest *core[] = {test_claim_new_task_runs_attempt_one,
                           test_finish_commits_before_callback_then_claim_is_final,
                           test_claim_attempt_rules, test_user_cap_refuses_claims_past_it,
                           test_user_settings_cap_and_budget, test_route_records_queued_and_picks_lanes,
                           test_copy_of_a_task_under_a_live_lease_is_a_duplicate,
                           test_takeover_when_the_owner_is_gone_or_the_lease_expired,
                           test_twin_with_another_body_changes_nothing,
                           test_metadata_is_stored_as_sent,
                           test_claim_ends_cancelled_expired_and_too_often_interrupted_tasks,
                           test_finish_counts_failures_and_interruptions_apart,
                           test_renew_and_sweep,
                           test_finish_records_the_dead_letter_of_a_task_that_did_not_complete,
                           test_steps_round_trip_and_are_written_once,
                           test_cache_put_then_get_returns_the_same_bytes,
                           test_dead_letter_body_round_trips_byte_exact,
                           test_dead_letter_finalises_only_a_waiting_task_of_its_body};
    const TTest *limits[] = {test_thousands_of_rows_in_few_transactions,
                             test_database_down_at_start_then_outage_nothing_lost_or_doubled,
                             test_replay_after_lost_commit_reply_writes_nothing_twice};
    const TTest *errors[] = {test_bad_input_refused_without_callback,
                             test_one_bad_row_does_not_sink_its_batch,
                             test_free_with_database_unreachable_calls_back_with_error,
                             test_cache_lookup_never_waits_out_an_outage,
                             test_unmigrated_database_is_waited_for};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 60,
         .setup = setup, .teardown = teardown},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 60,
         .setup = setup, .teardown = teardown},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 60,
         .setup = setup, .teardown = teardown},
    };
    return aq_test_suite("store", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void)
{
    /* The store logs its outages by design; keep the output to failures. */
    aq_log_set_level(getenv("AQ_DEBUG_LOG") ? AQ_LOG_DEBUG : AQ_LOG_ERROR);
    return aq_test_run(store_suite());
}
