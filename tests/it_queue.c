/* it_queue.c — the queue layer end to end, against the private RabbitMQ
 * and PostgreSQL of the `servers` fixture, with real agentq-worker,
 * agentq-producer and agentq-mockllm processes.
 *
 * Each test gets its own database and its own AMQP names (a prefix on the
 * exchange and queues), so tests do not see each other's messages. */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/migrate.h"
#include "fleet.h"
#include "proc.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <stdarg.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <netinet/in.h>

static aq_fleet E;

/* Sets NAME=VALUE for the test's programs (and in-process config). */
static void set_var(const char *name, const char *v) { aq_fleet_set(name, v); }

/* A database, AMQP names and a mock LLM started with `mock_flags`. */
static void setup_env(const char *name, const char *const *mock_flags)
{
    aq_fleet_setup(&E, "it", name);
    aq_fleet_start_mock(&E, mock_flags);
    set_var("AGENTQ_AMQP_MAX_ATTEMPTS", "3");
    set_var("AGENTQ_LLM_MAX_RETRIES", "0");
    /* gpt-4o-mini's prices: the simulator's model is free by default, and
     * the tests account for cost */
    set_var("AGENTQ_LLM_PRICE_INPUT_PER_MTOK", "0.15");
    set_var("AGENTQ_LLM_PRICE_OUTPUT_PER_MTOK", "0.60");
    set_var("AGENTQ_METRICS_LISTEN", "127.0.0.1:0");
    set_var("AGENTQ_LOG_LEVEL", "debug");
    /* The whole suite on quorum queues: AGENTQ_TEST_QUEUE_TYPE=quorum. */
    const char *type = getenv("AGENTQ_TEST_QUEUE_TYPE");
    if (type && *type) set_var("AGENTQ_AMQP_QUEUE_TYPE", type);
}

static void teardown_env(void) { aq_fleet_teardown(&E); }

/* Starts agentq-worker with the test's environment, `extra_env` on top,
 * and `--config conf` when conf is not NULL. */
static aq_test_proc *start_worker_conf(const char *name, const char *conf, const char *const *extra_env)
{
    return aq_fleet_worker(&E, name, conf, extra_env);
}

static aq_test_proc *start_worker(const char *name, const char *const *extra_env)
{
    return start_worker_conf(name, NULL, extra_env);
}

/* Runs agentq-producer with args; returns its exit status and the first
 * task id it printed in id (37 bytes). */
static int produce(const char *const *args, char *id) { return aq_fleet_produce(&E, args, id); }

/* Publishes body as any AMQP client would; headers_json (an object, or
 * NULL) becomes the message's headers. */
static void publish_raw(const char *body, const char *message_id, int priority, const char *headers_json)
{
    aq_config cfg;
    char err[512];
    ck_assert_msg(aq_config_load(&cfg, NULL, err, sizeof err) == 0, "%s", err);
    aq_broker *b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_msg(b != NULL, "%s", err);
    ck_assert_msg(aq_broker_declare(b, &cfg, err, sizeof err) == 0, "%s", err);
    json_t *headers = headers_json ? json_loads(headers_json, 0, NULL) : NULL;
    ck_assert(!headers_json || headers);
    aq_publish p = {cfg.amqp_exchange, "task", body, strlen(body), message_id, priority, NULL, 0, headers};
    ck_assert_int_gt(aq_broker_publish(b, &p, NULL, err, sizeof err), 0);
    json_decref(headers);
    int64_t nacked;
    ck_assert_msg(aq_broker_wait_confirms(b, 5000, &nacked, err, sizeof err) == 0, "%s", err);
    aq_broker_free(b);
    aq_config_free(&cfg);
}

static char *task_value(const char *id, const char *expr)
{
    char sql[512];
    snprintf(sql, sizeof sql, "SELECT %s FROM agentq.tasks WHERE task_id = '%s'", expr, id);
    return aq_test_pg_value(E.dsn, sql);
}

static void wait_status(const char *id, const char *want, int timeout_ms, aq_test_proc *w, const char *wname)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT status FROM agentq.tasks WHERE task_id = '%s'", id);
    if (!aq_test_pg_wait_value(E.dsn, sql, want, timeout_ms)) {
        char log[300];
        snprintf(log, sizeof log, "%s/%s.log", E.logdir, wname);
        aq_test_dump_log(log, 40);
        char *got = aq_test_pg_value(E.dsn, sql);
        ck_abort_msg("task %s: status %s, want %s", id, got ? got : "(no row)", want);
    }
    (void)w;
}

/* GETs http://127.0.0.1:port/path; returns the HTTP status, body in buf. */
static long http_get(int port, const char *path, char *buf, size_t len)
{
    char cmd[512], out[300];
    snprintf(out, sizeof out, "%s/http.out", E.logdir);
    snprintf(cmd, sizeof cmd, "curl -s -o '%s' -w '%%{http_code}' http://127.0.0.1:%d%s", out, port, path);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    long code = 0;
    if (fscanf(p, "%ld", &code) != 1) code = 0;
    pclose(p);
    FILE *f = fopen(out, "r");
    size_t n = f ? fread(buf, 1, len - 1, f) : 0;
    buf[n] = '\0';
    if (f) fclose(f);
    return code;
}

/* The metrics port a worker logged at start. */
static int worker_metrics_port(const char *name)
{
    char log[300];
    snprintf(log, sizeof log, "%s/%s.log", E.logdir, name);
    for (int i = 0; i < 100; i++) {
        FILE *f = fopen(log, "r");
        char line[2048];
        int port = 0;
        while (f && fgets(line, sizeof line, f))
            if (sscanf(line, "{\"ts\":\"%*[^\"]\",\"level\":\"info\",\"msg\":\"metrics on port %d", &port) == 1) break;
        if (f) fclose(f);
        if (port > 0) return port;
        usleep(50000);
    }
    ck_abort_msg("worker logged no metrics port");
    return 0;
}

/* Messages ready in the test's task queue (unacked ones are not counted:
 * call with no worker running to count every copy left). */
static int64_t tasks_left(void)
{
    aq_config cfg;
    char err[512];
    ck_assert_msg(aq_config_load(&cfg, NULL, err, sizeof err) == 0, "%s", err);
    aq_broker *b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_msg(b != NULL, "%s", err);
    int64_t messages = -1, consumers = -1;
    ck_assert_msg(aq_broker_queue_depth(b, cfg.amqp_queue, &messages, &consumers, err, sizeof err) == 0, "%s", err);
    aq_broker_free(b);
    aq_config_free(&cfg);
    return messages;
}

/* Checks that `expr` over task `id`'s row is `want`. */
static void assert_task(const char *id, const char *expr, const char *want)
{
    char *v = task_value(id, expr);
    ck_assert_msg(v && !strcmp(v, want), "task %s: %s is '%s', want '%s'", id, expr, v ? v : "(null)",
                  want);
    free(v);
}

#define assert_pg(...) aq_fleet_assert_pg(&E, __VA_ARGS__)

START_TEST(producer_to_completed_row)
{
    const char *mock[] = {"--latency-ms", "20", NULL};
    setup_env("basic", mock);
    aq_test_proc *w = start_worker("worker", NULL);
    char id[40];
    const char *args[] = {"--user", "alice", "--goal", "add things steps=2", "--metadata", "{\"k\":1}", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "completed", 15000, w, "worker");
    assert_task(id, "steps || ' ' || attempt || ' ' || (metadata->>'k') || ' ' || (cost_usd > 0)", "3 1 1 true");
    assert_task(id, "(SELECT count(*) FROM agentq.steps s WHERE s.task_id = tasks.task_id)", "5"); /* 3 LLM calls + 2 tool calls */
    /* agentqctl result --json: the row and every step. */
    char cmd[1024], out[300];
    snprintf(out, sizeof out, "%s/result.json", E.logdir);
    snprintf(cmd, sizeof cmd, "'%s' result --json %s >'%s' 2>&1", aq_test_bin("agentqctl"), id, out);
    ck_assert_int_eq(system(cmd), 0);
    json_error_t jerr;
    json_t *res = json_load_file(out, 0, &jerr);
    ck_assert_msg(res != NULL, "agentqctl result printed no JSON: %s", jerr.text);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(res, "task"), "status")), "completed");
    ck_assert_int_eq(json_array_size(json_object_get(res, "steps")), 5);
    json_decref(res);
    snprintf(cmd, sizeof cmd, "'%s' result 00000000-0000-4000-8000-000000000000 >/dev/null 2>&1", aq_test_bin("agentqctl"));
    ck_assert_int_eq(WEXITSTATUS(system(cmd)), 1); /* no such task */
    int port = worker_metrics_port("worker");
    static char body[65536];
    ck_assert_int_eq(http_get(port, "/healthz", body, sizeof body), 200);
    ck_assert_int_eq(http_get(port, "/readyz", body, sizeof body), 200);
    ck_assert_int_eq(http_get(port, "/metrics", body, sizeof body), 200);
    ck_assert_msg(strstr(body, "\nagentq_tasks_completed_total 1\n") != NULL, "%s", body);
    ck_assert_msg(strstr(body, "# TYPE agentq_sessions_running gauge") != NULL, "%s", body);
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 10000), 0);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* The user of the log line that ends at `end` in buf if it says "waiting:"
 * (a claim told to wait), else NULL. */
static const char *waiting_user(const char *buf, const char *end, char *user, size_t len)
{
    const char *start = end;
    while (start > buf && start[-1] != '\n') start--;
    size_t n = (size_t)(end - start);
    char line[1024];
    if (n >= sizeof line) return NULL;
    memcpy(line, start, n);
    line[n] = '\0';
    const char *u = strstr(line, "\"user_id\":\"");
    if (!strstr(line, "\"msg\":\"waiting:") || !u) return NULL;
    u += strlen("\"user_id\":\"");
    size_t k = strcspn(u, "\"");
    if (k >= len) return NULL;
    memcpy(user, u, k);
    user[k] = '\0';
    return user;
}

/* Waits until a worker's log has just gained, as its last two "waiting:"
 * lines, user a's then user b's: both users' held deliveries were just
 * claimed and told to wait, in priority order, and the next such round
 * (the unblock timer) is half a second away. Changing the users then
 * cannot fall between the two claims of one round. */
static void wait_claim_round(const char *name, const char *a, const char *b, int timeout_ms)
{
    char path[300];
    snprintf(path, sizeof path, "%s/%s.log", E.logdir, name);
    long seen = -1; /* the size at the last look; a round counts only if newer */
    for (int waited = 0; waited < timeout_ms; waited += 2, usleep(2000)) {
        FILE *f = fopen(path, "r");
        ck_assert_ptr_nonnull(f);
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        static char buf[8192];
        long from = size > (long)sizeof buf - 1 ? size - (long)sizeof buf + 1 : 0;
        fseek(f, from, SEEK_SET);
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = '\0';
        fclose(f);
        /* The last two complete lines that say "waiting:", and where the
         * last one ends. */
        char u1[64] = "", u2[64] = "";
        long last_end = -1;
        int found = 0;
        for (char *end = buf + n; end > buf && found < 2; end--) {
            if (end[-1] != '\n') continue;
            char u[64];
            if (!waiting_user(buf, end - 1, u, sizeof u)) continue;
            if (found++ == 0) {
                snprintf(u2, sizeof u2, "%s", u);
                last_end = from + (long)(end - buf);
            } else {
                snprintf(u1, sizeof u1, "%s", u);
            }
        }
        bool fresh = seen >= 0 && last_end > seen;
        seen = from + (long)n;
        if (fresh && found == 2 && !strcmp(u1, a) && !strcmp(u2, b)) return;
    }
    ck_abort_msg("%s never logged a round of claims told to wait (%s, then %s)", name, a, b);
}

/* A backlog of low-priority tasks of one user and a high-priority task of
 * another, all waiting (their users may run nothing yet, so the worker
 * holds them or they wait in their lanes); once they may run, the high
 * one starts first. (Priority is strict among what a worker holds and
 * within a lane; an idle worker starts what reaches it first.) */
static char *slurp(const char *path);

static void priority_case(bool quorum)
{
    const char *mock[] = {"--latency-ms", "30", NULL};
    setup_env(quorum ? "qprio" : "prio", mock);
    if (quorum) {
        set_var("AGENTQ_AMQP_QUEUE_TYPE", "quorum");
        set_var("AGENTQ_AMQP_PRIORITY_BANDS", "3");
    }
    char cmd[1024], file[300], err[512];
    ck_assert_msg(aq_test_pg_exec(E.dsn, "INSERT INTO agentq.users (user_id, max_inflight)"
                                         " VALUES ('low', 0), ('vip', 0)", err, sizeof err) == 0, "%s", err);
    const char *one[] = {"AGENTQ_WORKER_CONCURRENCY=1", NULL};
    aq_test_proc *w = start_worker("worker", one);
    snprintf(file, sizeof file, "%s/low.jsonl", E.logdir);
    FILE *f = fopen(file, "w");
    for (int i = 0; i < 15; i++) fprintf(f, "{\"user_id\":\"low\",\"goal\":\"low %d\"}\n", i);
    fclose(f);
    const char *low[] = {"--file", file, "--priority", "0", NULL};
    ck_assert_int_eq(produce(low, NULL), 0);
    char high[40];
    const char *hi[] = {"--user", "vip", "--goal", "urgent", "--priority", "9", NULL};
    ck_assert_int_eq(produce(hi, high), 0);
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'queued'", "16", 10000));
    /* Both held, claimed and told to wait; lift the caps between rounds. */
    wait_claim_round("worker", "vip", "low", 10000);
    ck_assert_msg(aq_test_pg_exec(E.dsn, "UPDATE agentq.users SET max_inflight = NULL", err, sizeof err) == 0, "%s",
                  err);
    wait_status(high, "completed", 15000, w, "worker");
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "16", 20000));
    snprintf(cmd, sizeof cmd,
             "SELECT count(*) FROM agentq.tasks WHERE user_id = 'low' AND started_at < (SELECT started_at FROM agentq.tasks WHERE task_id = '%s')",
             high);
    char *v = aq_test_pg_value(E.dsn, cmd);
    ck_assert_msg(!strcmp(v, "0"), "%s low-priority tasks started before the high one", v);
    free(v);
    aq_test_proc_free(w);
    teardown_env();
}

START_TEST(priority_runs_first) { priority_case(false); }
END_TEST

/* Quorum queues have no priorities: the lanes' bands keep them. */
START_TEST(quorum_priority_band_runs_first) { priority_case(true); }
END_TEST

/* One user's tasks, all in one lane, fill every slot of a worker: with
 * quorum queues (a prefetch per consumer, here 2) the lane queue gets
 * more consumers as its sessions start. */
START_TEST(quorum_one_user_fills_every_slot)
{
    const char *mock[] = {"--latency-ms", "400", NULL};
    setup_env("qfill", mock);
    set_var("AGENTQ_AMQP_QUEUE_TYPE", "quorum");
    const char *six[] = {"AGENTQ_WORKER_CONCURRENCY=6", NULL};
    aq_test_proc *w = start_worker("worker", six);
    char file[300];
    snprintf(file, sizeof file, "%s/one.jsonl", E.logdir);
    FILE *f = fopen(file, "w");
    for (int i = 0; i < 18; i++) fprintf(f, "{\"user_id\":\"solo\",\"goal\":\"solo %d steps=1\"}\n", i);
    fclose(f);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, NULL), 0);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'running'", "6", 15000),
                  "the user's tasks never ran 6 at once");
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "18", 30000));
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* A port nothing listens on (bound, then closed). */
static int closed_port(void)
{
    int port;
    int fd = aq_test_loopback_socket(1, &port);
    ck_assert_int_ge(fd, 0);
    close(fd);
    return port;
}

/* amqp.url lists two nodes, the first one down; amqp.queue_type quorum:
 * the worker connects through the second, declares replicated queues
 * (the ingress with a delivery limit, three bands a lane) and runs tasks
 * of every band. */
START_TEST(quorum_queues_through_the_second_listed_node)
{
    const char *mock[] = {"--latency-ms", "10", NULL};
    setup_env("quorum", mock);
    char urls[600];
    snprintf(urls, sizeof urls, "amqp://guest:guest@127.0.0.1:%d/%%2f, %s", closed_port(),
             aq_test_env_require("AGENTQ_TEST_AMQP_URL"));
    set_var("AGENTQ_AMQP_URL", urls);
    set_var("AGENTQ_AMQP_QUEUE_TYPE", "quorum");
    set_var("AGENTQ_AMQP_PRIORITY_BANDS", "3");
    set_var("AGENTQ_AMQP_DELIVERY_LIMIT", "7");
    aq_test_proc *w = start_worker("worker", NULL);
    char ids[3][40];
    const char *prio[] = {"0", "5", "9"};
    for (int i = 0; i < 3; i++) {
        const char *args[] = {"--user", "q", "--goal", "add things steps=1", "--priority", prio[i], NULL};
        ck_assert_int_eq(produce(args, ids[i]), 0);
    }
    for (int i = 0; i < 3; i++) wait_status(ids[i], "completed", 20000, w, "worker");
    /* The queues, as the broker has them. */
    char cmd[1024], out[300];
    snprintf(out, sizeof out, "%s/queues.txt", E.logdir);
    snprintf(cmd, sizeof cmd, "'%s' -q list_queues name type arguments 2>&1 | grep '%s' >'%s'",
             aq_test_env_require("AGENTQ_TEST_RABBITMQCTL"), E.prefix, out);
    ck_assert_int_eq(system(cmd), 0);
    const char *q = slurp(out);
    char want[200];
    snprintf(want, sizeof want, "%s.lane.3.b2\tquorum", E.prefix);
    ck_assert_msg(strstr(q, want), "no quorum band queue %s in:\n%s", want, q);
    snprintf(want, sizeof want, "%s.tasks\tquorum", E.prefix);
    ck_assert_msg(strstr(q, want), "the ingress queue is not a quorum queue:\n%s", q);
    ck_assert_msg(strstr(q, "{\"x-delivery-limit\",7}"), "no delivery limit 7 on the ingress queue:\n%s", q);
    snprintf(out, sizeof out, "%s/worker.log", E.logdir);
    ck_assert_msg(strstr(slurp(out), "connected to node 2 of 2"), "the worker did not say which node it took");
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 10000), 0);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST


/* amqp.url lists a cluster's nodes, the first one down: the worker and
 * the producer connect through the second, say so, and tasks run. */
START_TEST(listed_nodes_tried_in_turn)
{
    const char *mock[] = {"--latency-ms", "10", NULL};
    setup_env("nodes", mock);
    char urls[600];
    snprintf(urls, sizeof urls, "amqp://guest:guest@127.0.0.1:%d/%%2f, %s", closed_port(),
             aq_test_env_require("AGENTQ_TEST_AMQP_URL"));
    set_var("AGENTQ_AMQP_URL", urls);
    aq_test_proc *w = start_worker("worker", NULL);
    char id[40];
    const char *args[] = {"--user", "n", "--goal", "add things steps=1", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "completed", 20000, w, "worker");
    char log[300];
    snprintf(log, sizeof log, "%s/worker.log", E.logdir);
    ck_assert_msg(strstr(slurp(log), "\"broker: connected to node 2 of 2, amqp://guest:***@127.0.0.1:"),
                  "the worker did not say which node it took");
    snprintf(log, sizeof log, "%s/producer.log", E.logdir);
    ck_assert_msg(strstr(slurp(log), "connected to node 2 of 2"), "the producer did not take node 2");
    /* Every node down: the error names each one. */
    char one[80], two[80];
    snprintf(one, sizeof one, "amqp://guest:guest@127.0.0.1:%d/%%2f", closed_port());
    snprintf(two, sizeof two, "amqp://guest:guest@127.0.0.1:%d/%%2f", closed_port());
    snprintf(urls, sizeof urls, "%s,%s", one, two);
    set_var("AGENTQ_AMQP_URL", urls);
    aq_config cfg;
    char err[1024];
    ck_assert_msg(aq_config_load(&cfg, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_null(aq_broker_connect(&cfg, 0, 2000, err, sizeof err));
    ck_assert_msg(strstr(err, "node 1 of 2: cannot connect to broker") && strstr(err, "; node 2 of 2: cannot connect"),
                  "%s", err);
    aq_config_free(&cfg);
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 10000), 0);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(ttl_expiry_recorded)
{
    setup_env("ttl", NULL);
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "too late", "--ttl", "300", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    sleep(1); /* expires while no worker consumes the task queue */
    aq_test_proc *w = start_worker("worker", NULL);
    wait_status(id, "expired", 15000, w, "worker");
    assert_pg("expired|true|expired while queued (per-message TTL 300 ms)",
              "SELECT reason || '|' || (headers ? 'x-death') || '|' || error FROM agentq.dead_letters WHERE task_id = '%s'", id);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(retries_through_tiers_then_failed)
{
    setup_env("retry", NULL);
    aq_test_proc *w = start_worker("worker", NULL);
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "always fail=500", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "failed", 30000, w, "worker");
    assert_task(id, "attempt || '|' || (error LIKE '%HTTP 500%')", "3|true");
    /* One errored LLM call per attempt, and the dead letter with reason failed. */
    assert_pg("1,2,3",
              "SELECT string_agg(attempt::text, ',' ORDER BY attempt) FROM agentq.steps WHERE task_id = '%s' AND status = 'error'", id);
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT reason FROM agentq.dead_letters WHERE task_id = '%s'", id);
    ck_assert(aq_test_pg_wait_value(E.dsn, sql, "failed", 10000));
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(malformed_and_invalid_rejected)
{
    setup_env("reject", NULL);
    aq_test_proc *w = start_worker("worker", NULL);
    publish_raw("this is not json", NULL, 0, NULL);
    const char *id = "0b6f4d1e-3c2a-4e5f-9a8b-7c6d5e4f3a2b";
    char body[256];
    snprintf(body, sizeof body, "{\"task_id\":\"%s\",\"user_id\":\"u\",\"goal\":\"g\",\"max_steps\":0}", id);
    publish_raw(body, NULL, 0, NULL);
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.dead_letters WHERE reason = 'rejected'", "2", 15000));
    char *v = aq_test_pg_value(E.dsn, "SELECT error FROM agentq.dead_letters WHERE task_id IS NULL");
    ck_assert_msg(strstr(v, "not valid JSON") != NULL, "%s", v);
    free(v);
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT error FROM agentq.dead_letters WHERE task_id = '%s'", id);
    v = aq_test_pg_value(E.dsn, sql);
    ck_assert_msg(strstr(v, "max_steps") != NULL, "%s", v);
    free(v);
    wait_status(id, "rejected", 5000, w, "worker");
    /* The worker goes on: a good task after them completes. */
    char good[40];
    const char *args[] = {"--user", "u", "--goal", "fine", NULL};
    ck_assert_int_eq(produce(args, good), 0);
    wait_status(good, "completed", 10000, w, "worker");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(plain_amqp_client_task_runs)
{
    setup_env("pika", NULL);
    aq_test_proc *w = start_worker("worker", NULL);
    const char *id = "5a0c7a9e-1d52-4c8e-a0e6-2b9c6f1e7d30";
    char script[300], cmd[1200];
    snprintf(script, sizeof script, "%s/pub.py", E.logdir);
    FILE *f = fopen(script, "w");
    fprintf(f,
            "import json, os, pika\n"
            "params = pika.URLParameters(os.environ['AGENTQ_AMQP_URL'])\n"
            "conn = pika.BlockingConnection(params)\n"
            "ch = conn.channel()\n"
            "ch.confirm_delivery()\n"
            "body = json.dumps({'task_id': '%s', 'user_id': 'py', 'goal': 'from python steps=1'})\n"
            "ch.basic_publish(exchange=os.environ['AGENTQ_AMQP_EXCHANGE'], routing_key='task', body=body,\n"
            "    properties=pika.BasicProperties(content_type='application/json', delivery_mode=2, priority=3))\n"
            "conn.close()\n",
            id);
    fclose(f);
    sleep(1); /* the worker declares the topology */
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 '%s' >>'%s/pub.log' 2>&1", script, E.logdir);
    int rc = system(cmd);
    if (rc != 0) {
        snprintf(cmd, sizeof cmd, "%s/pub.log", E.logdir);
        aq_test_dump_log(cmd, 20);
    }
    ck_assert_int_eq(rc, 0);
    wait_status(id, "completed", 15000, w, "worker");
    assert_task(id, "priority", "3");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(kill9_redelivers_and_completes_once)
{
    const char *mock[] = {"--latency-ms", "1500", NULL};
    setup_env("kill9", mock);
    aq_test_proc *a = start_worker("worker-a", NULL);
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "slow steps=1", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "running", 10000, a, "worker-a");
    usleep(300000);
    aq_test_proc_signal(a, SIGKILL);
    aq_test_proc_wait(a, 5000);
    aq_test_proc *b = start_worker("worker-b", NULL);
    wait_status(id, "completed", 20000, b, "worker-b");
    assert_task(id, "attempt", "2");
    /* Exactly one completed attempt: attempt 2's two LLM calls, no more. */
    assert_pg("2", "SELECT count(*) FROM agentq.steps WHERE task_id = '%s' AND attempt = 2 AND kind = 'llm'", id);
    sleep(1);
    assert_task(id, "status", "completed");
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

START_TEST(sigterm_drains_then_requeues)
{
    const char *mock[] = {"--latency-ms", "1000", NULL};
    setup_env("drain", mock);
    const char *drain[] = {"AGENTQ_WORKER_DRAIN_SECONDS=10", NULL};
    aq_test_proc *w = start_worker("worker", drain);
    char file[300];
    snprintf(file, sizeof file, "%s/five.jsonl", E.logdir);
    FILE *f = fopen(file, "w");
    for (int i = 0; i < 5; i++) fprintf(f, "{\"user_id\":\"d\",\"goal\":\"drain me %d\"}\n", i);
    fclose(f);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, NULL), 0);
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'running'", "5", 10000));
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 15000), 0);
    assert_pg("5", "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'"); /* they finished during the drain */
    aq_test_proc_free(w);

    /* A drain too short for the work: tasks go back to the queue as
     * queued, and another worker completes them. */
    const char *mock_slow[] = {"--latency-ms", "4000", NULL};
    aq_test_proc_free(E.mock);
    char log[300];
    snprintf(log, sizeof log, "%s/mock2.log", E.logdir);
    E.mock = aq_test_start_mock(mock_slow, log, &E.mock_port);
    char url[128], var[160];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", E.mock_port);
    snprintf(var, sizeof var, "AGENTQ_LLM_BASE_URL=%s", url);
    const char *short_drain[] = {"AGENTQ_WORKER_DRAIN_SECONDS=1", var, NULL};
    w = start_worker("worker-2", short_drain);
    char id[40];
    const char *one[] = {"--user", "d", "--goal", "requeue me", NULL};
    ck_assert_int_eq(produce(one, id), 0);
    wait_status(id, "running", 10000, w, "worker-2");
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 10000), 0);
    assert_task(id, "status || ',' || interruptions || ',' || failures", "queued,1,0"); /* a drain is an interruption, not a failure */
    aq_test_proc_free(w);
    const char *fast_env[] = {var, NULL};
    (void)fast_env;
    aq_test_proc *w3 = start_worker("worker-3", short_drain);
    wait_status(id, "completed", 20000, w3, "worker-3");
    aq_test_proc_free(w3);
    teardown_env();
}
END_TEST

/* Runs agentqctl with args; returns its exit status. */
static int ctl(const char *const *args)
{
    char cmd[2048], log[300];
    snprintf(log, sizeof log, "%s/agentqctl.log", E.logdir);
    int n = snprintf(cmd, sizeof cmd, "'%s'", aq_test_bin("agentqctl"));
    for (int i = 0; args[i]; i++) n += snprintf(cmd + n, sizeof cmd - (size_t)n, " '%s'", args[i]);
    snprintf(cmd + n, sizeof cmd - (size_t)n, " >>'%s' 2>&1", log);
    return WEXITSTATUS(system(cmd));
}

START_TEST(cancel_stops_running_task)
{
    const char *mock[] = {"--latency-ms", "300", NULL};
    setup_env("cancel", mock);
    aq_test_proc *w = start_worker("worker", NULL);
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "loop forever", "--max-steps", "100", "--timeout", "120", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "running", 10000, w, "worker");
    usleep(500000);
    const char *cancel[] = {"cancel", id, NULL};
    ck_assert_int_eq(ctl(cancel), 0);
    wait_status(id, "cancelled", 5000, w, "worker");
    assert_task(id, "steps < 100", "t");
    /* Every task that ends other than completed is in the parking lot,
     * with its reason and its body, so it can be sent back. */
    assert_pg("cancelled|true|true",
              "SELECT reason || '|' || (error IS NOT NULL) || '|' || (convert_from(body, 'UTF8')::jsonb ? 'goal')"
              " FROM agentq.dead_letters WHERE task_id = '%s'", id);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(requeue_dead_letters)
{
    setup_env("requeue", NULL);
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "second chance", "--ttl", "200", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    sleep(1);
    aq_test_proc *w = start_worker("worker", NULL);
    wait_status(id, "expired", 15000, w, "worker");
    const char *rq[] = {"requeue", "--dead", "--reason", "expired", NULL};
    ck_assert_int_eq(ctl(rq), 0);
    wait_status(id, "completed", 15000, w, "worker");
    assert_pg("t", "SELECT requeued_at IS NOT NULL FROM agentq.dead_letters WHERE task_id = '%s'", id);
    /* Nothing left to requeue: says so and exits 1. */
    ck_assert_int_eq(ctl(rq), 1);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

static void write_tasks(const char *file, int n, const char *goal)
{
    FILE *f = fopen(file, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < n; i++) fprintf(f, "{\"user_id\":\"u%d\",\"goal\":\"%s %d\"}\n", i % 3, goal, i);
    fclose(f);
}

/* Sets up the test `name` with six tasks (goals "<goal> N") running on
 * one worker, slow enough (800 ms an LLM call) for a connection to be cut
 * under them; returns the worker. */
static aq_test_proc *six_tasks_running(const char *name, const char *goal)
{
    const char *mock[] = {"--latency-ms", "800", NULL};
    setup_env(name, mock);
    aq_test_proc *w = start_worker("worker", NULL);
    char file[300];
    snprintf(file, sizeof file, "%s/tasks.jsonl", E.logdir);
    write_tasks(file, 6, goal);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, NULL), 0);
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'running'", "6", 10000));
    return w;
}

START_TEST(broker_connection_loss_loses_nothing)
{
    aq_test_proc *w = six_tasks_running("amqploss", "survive steps=1");
    char cmd[600];
    snprintf(cmd, sizeof cmd, "'%s' close_all_connections 'test: broker connection loss' >/dev/null 2>&1",
             aq_test_env_require("AGENTQ_TEST_RABBITMQCTL"));
    ck_assert_int_eq(system(cmd), 0);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "6", 30000),
                  "not every task completed after the broker connection was lost");
    /* Each ran to one final row, and nothing is left in the queue. */
    assert_pg("6", "SELECT count(*) FROM agentq.tasks");
    aq_config cfg;
    char err[256];
    ck_assert(aq_config_load(&cfg, NULL, err, sizeof err) == 0);
    int64_t depth = -1;
    for (int i = 0; i < 100 && depth != 0; i++) {
        aq_broker *b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
        ck_assert_msg(b != NULL, "%s", err);
        ck_assert(aq_broker_queue_depth(b, cfg.amqp_queue, &depth, NULL, err, sizeof err) == 0);
        aq_broker_free(b);
        if (depth) usleep(100000);
    }
    ck_assert_int_eq(depth, 0);
    aq_config_free(&cfg);
    ck_assert_int_eq(aq_test_proc_wait(w, 0), -1); /* the worker lives on */
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(database_connection_loss_loses_nothing)
{
    aq_test_proc *w = six_tasks_running("pgloss", "persist steps=1");
    /* Cut every connection the worker has to this database. */
    char *dbname = aq_test_pg_value(E.dsn, "SELECT current_database()");
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '%s' AND pid <> pg_backend_pid()",
             dbname);
    free(aq_test_pg_value(E.dsn, sql));
    free(dbname);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "6", 30000),
                  "not every task completed after the database connection was cut");
    assert_pg("12", "SELECT count(*) FROM agentq.steps WHERE kind = 'llm'"); /* two LLM calls each, none written twice */
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(ttl_carries_across_retries)
{
    setup_env("ttlretry", NULL);
    aq_test_proc *w = start_worker("worker", NULL);
    sleep(1); /* topology declared, consumer ready: attempt 1 starts within the TTL */
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "fail=500", "--ttl", "700", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    /* Attempt 1 fails at once; the retry comes back after 1 s, past the TTL. */
    wait_status(id, "expired", 15000, w, "worker");
    /* Attempt 1 ran; attempt 2 never started. */
    char *v = task_value(id, "attempt || '|' || (error LIKE 'its TTL passed (at %) before attempt 2 could start')");
    ck_assert_msg(!strcmp(v, "1|true"), "%s", v);
    free(v);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    static char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

START_TEST(producer_reports_bad_lines)
{
    setup_env("prodlines", NULL);
    char file[300], log[300];
    snprintf(file, sizeof file, "%s/mixed.jsonl", E.logdir);
    snprintf(log, sizeof log, "%s/producer.log", E.logdir);
    FILE *f = fopen(file, "w");
    fprintf(f, "{\"user_id\":\"a\",\"goal\":\"one\"}\n"
               "{\"user_id\":\"a\",\"goal\":\"two\",\"max_steps\":500}\n"
               "not json at all\n"
               "\n"
               "{\"task\":{\"user_id\":\"b\",\"goal\":\"three\"},\"priority\":7}\n");
    fclose(f);
    /* Default: bad lines reported with their numbers and skipped, exit 1. */
    const char *args[] = {"--file", file, "--record", "--json", NULL};
    ck_assert_int_eq(produce(args, NULL), 1);
    char *errs = slurp(log);
    ck_assert_msg(strstr(errs, "line 2: max_steps") != NULL, "%s", errs);
    ck_assert_msg(strstr(errs, "line 3: not valid JSON") != NULL, "%s", errs);
    char out[300];
    snprintf(out, sizeof out, "%s/producer.out", E.logdir);
    char *printed = slurp(out);
    ck_assert_msg(strstr(printed, "\"line\":1") && strstr(printed, "\"line\":5"), "%s", printed);
    /* --record wrote queued rows for the two good ones, priority kept. */
    assert_pg("queued:0,queued:7", "SELECT string_agg(status || ':' || priority, ',' ORDER BY priority) FROM agentq.tasks");
    /* --strict stops at the first bad line. */
    truncate(log, 0);
    const char *strict[] = {"--file", file, "--strict", NULL};
    ck_assert_int_eq(produce(strict, NULL), 1);
    errs = slurp(log);
    ck_assert_msg(strstr(errs, "line 2") && !strstr(errs, "line 3"), "%s", errs);
    teardown_env();
}
END_TEST

START_TEST(producer_wait_exit_code_and_ctl_status)
{
    setup_env("wait", NULL);
    aq_test_proc *w = start_worker("worker", NULL);
    /* --wait follows the tasks to their final status: 0 when all completed... */
    const char *ok[] = {"--user", "u", "--goal", "fine steps=1", "--wait", "--wait-timeout", "20", NULL};
    ck_assert_int_eq(produce(ok, NULL), 0);
    char out[300];
    snprintf(out, sizeof out, "%s/producer.out", E.logdir);
    ck_assert_msg(strstr(slurp(out), "summary: completed=1") != NULL, "%s", slurp(out));
    /* ...1 when one did not. */
    const char *bad[] = {"--user", "u", "--goal", "refused fail=400", "--wait", "--wait-timeout", "20", NULL};
    ck_assert_int_eq(produce(bad, NULL), 1);
    ck_assert_msg(strstr(slurp(out), "summary: failed=1") != NULL, "%s", slurp(out));
    /* agentqctl status shows the queues and the counts by status. */
    char cmd[1024], log[300];
    snprintf(log, sizeof log, "%s/status.out", E.logdir);
    snprintf(cmd, sizeof cmd, "'%s' status >'%s' 2>&1", aq_test_bin("agentqctl"), log);
    ck_assert_int_eq(system(cmd), 0);
    char *st = slurp(log);
    ck_assert_msg(strstr(st, ".tasks") && strstr(st, "completed") && strstr(st, "failed"), "%s", st);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

START_TEST(fleet_rate_limit_shared_by_two_workers)
{
    setup_env("fleet", NULL);
    /* The fleet may make 1,200 LLM calls a minute (20/s, 1 s of burst),
     * whatever the number of workers: two workers together must take about
     * (100 - 20) / 20 = 4 s for 100 one-call tasks, not half that. */
    const char *fleet[] = {"AGENTQ_LIMITS_MODE=fleet", "AGENTQ_LLM_REQUESTS_PER_MINUTE=1200", NULL};
    aq_test_proc *a = start_worker("worker-a", fleet);
    aq_test_proc *b = start_worker("worker-b", fleet);
    char file[300];
    snprintf(file, sizeof file, "%s/tasks.jsonl", E.logdir);
    write_tasks(file, 100, "quick answer");
    sleep(1); /* both consuming, so both share the work */
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, NULL), 0);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "100", 30000),
                  "not all tasks completed");
    char *v = aq_test_pg_value(E.dsn, "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM agentq.tasks");
    double span = atof(v);
    free(v);
    ck_assert_msg(span >= 3.4 && span <= 8.0, "100 calls at a fleet limit of 20/s took %.2f s", span);
    assert_pg("2", "SELECT count(DISTINCT worker_id) FROM agentq.tasks"); /* both workers took part */
    assert_pg("20", "SELECT refill_per_sec FROM agentq.rate_limits WHERE name = 'llm:requests'");
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* The most of `user`'s tasks that ran at once (from the rows' start and
 * finish times), as text. */
#define MAX_CONCURRENT_SQL                                                                                  \
    "SELECT coalesce(max(n), 0) FROM (SELECT (SELECT count(*) FROM agentq.tasks y"                        \
    "   WHERE y.user_id = x.user_id AND y.started_at <= x.started_at AND x.started_at < y.finished_at) n" \
    " FROM agentq.tasks x WHERE x.user_id = '%s' AND x.started_at IS NOT NULL) m"

/* Enqueues n tasks of `user` (goals "<goal> N") through the producer. */
static void produce_user_tasks(const char *user, int n, const char *goal)
{
    char file[300];
    snprintf(file, sizeof file, "%s/%s.jsonl", E.logdir, user);
    FILE *f = fopen(file, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < n; i++) fprintf(f, "{\"user_id\":\"%s\",\"goal\":\"%s %d\"}\n", user, goal, i);
    fclose(f);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, NULL), 0);
}

START_TEST(user_cap_holds_fleet_wide)
{
    const char *mock[] = {"--latency-ms", "300", NULL};
    setup_env("usercap", mock);
    /* One user may run two tasks at a time, across two workers. */
    const char *cap[] = {"AGENTQ_LIMITS_MAX_INFLIGHT_PER_USER=2", NULL};
    aq_test_proc *a = start_worker("worker-a", cap);
    aq_test_proc *b = start_worker("worker-b", cap);
    sleep(1);
    produce_user_tasks("burst", 10, "mine");
    produce_user_tasks("other", 1, "not held back");
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "11", 30000),
                  "not all tasks completed");
    /* Never more than two of the burst at once, fleet-wide, and the cap
     * was used (two did run together)... */
    assert_pg("2", MAX_CONCURRENT_SQL, "burst");
    /* ...each task ran once, with no attempt used up by waiting and no
     * trip through a retry tier... */
    assert_pg("10|1|0", "SELECT count(*) || '|' || max(attempt) || '|' || max(failures) FROM agentq.tasks"
                        " WHERE user_id = 'burst'");
    /* ...and the other user did not wait for them. */
    assert_pg("t", "SELECT extract(epoch FROM finished_at - enqueued_at) < 3 FROM agentq.tasks WHERE user_id = 'other'");
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* A capped user's backlog must not fill a worker's prefetch: with the
 * user at its cap of 1, another user's tasks still get the other slots
 * (the worker sends the capped user's extra deliveries back to its lane
 * and stops consuming that lane while it waits). */
START_TEST(capped_user_does_not_take_the_slots)
{
    const char *mock[] = {"--latency-ms", "300", NULL};
    setup_env("capslots", mock);
    char err[512];
    ck_assert_msg(aq_test_pg_exec(E.dsn, "INSERT INTO agentq.users (user_id, max_inflight) VALUES ('capped', 1)", err,
                                  sizeof err) == 0, "%s", err);
    const char *four[] = {"AGENTQ_WORKER_CONCURRENCY=4", NULL};
    aq_test_proc *w = start_worker("worker", four);
    sleep(1);
    produce_user_tasks("capped", 20, "quick answer");
    sleep(1); /* the capped user's tasks reach the worker first */
    int64_t t0 = aq_now_us();
    produce_user_tasks("free", 9, "quick answer");
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE user_id = 'free'"
                                               " AND status = 'completed'", "9", 15000),
                  "the other user's tasks did not complete");
    double took = (double)(aq_now_us() - t0) / 1e6;
    /* 9 tasks on the 3 slots the capped user leaves: about 1 s. */
    ck_assert_msg(took < 4.0, "the other user's 9 tasks took %.2f s", took);
    assert_pg("t", "SELECT count(*) < 20 FROM agentq.tasks WHERE user_id = 'capped' AND status = 'completed'");
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "29", 30000));
    assert_pg("1", MAX_CONCURRENT_SQL, "capped");
    assert_pg("1|0", "SELECT max(attempt) || '|' || max(failures) FROM agentq.tasks WHERE user_id = 'capped'");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* A delivery held unstarted (its user may run nothing) goes back to its
 * lane before it could reach the broker's consumer_timeout, which would
 * close the channel under the whole prefetch; it still runs, once, when
 * its user may run again. */
START_TEST(held_delivery_goes_back_before_consumer_timeout)
{
    setup_env("heldlong", NULL);
    char err[512];
    ck_assert_msg(aq_test_pg_exec(E.dsn, "INSERT INTO agentq.users (user_id, max_inflight) VALUES ('paused', 0)", err,
                                  sizeof err) == 0, "%s", err);
    /* consumer_timeout 60 s: a delivery is held at most 12 s */
    const char *short_timeout[] = {"AGENTQ_AMQP_CONSUMER_TIMEOUT_MS=60000", "AGENTQ_WORKER_LEASE_SECONDS=3", NULL};
    aq_test_proc *w = start_worker("worker", short_timeout);
    sleep(1);
    const char *id = "6e2f4a10-3b5c-4d7e-8f90-a1b2c3d4e5f6";
    publish_raw("{\"task_id\":\"6e2f4a10-3b5c-4d7e-8f90-a1b2c3d4e5f6\",\"user_id\":\"paused\","
                "\"goal\":\"quick answer\",\"timeout_seconds\":20}",
                NULL, 0, NULL);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "grep -q 'back to its lane' '%s/worker.log'", E.logdir);
    int found = 0;
    for (int i = 0; i < 250 && !found; i++) {
        found = WEXITSTATUS(system(cmd)) == 0;
        if (!found) usleep(100 * 1000);
    }
    ck_assert_msg(found, "the held delivery was not sent back within 25 s");
    assert_task(id, "status || ',' || (started_at IS NULL)", "queued,true");
    ck_assert_msg(aq_test_pg_exec(E.dsn, "UPDATE agentq.users SET max_inflight = NULL", err, sizeof err) == 0, "%s",
                  err);
    wait_status(id, "completed", 15000, w, "worker");
    assert_task(id, "attempt || ',' || failures", "1,0");
    snprintf(cmd, sizeof cmd, "grep -q 'broker connection lost' '%s/worker.log'", E.logdir);
    ck_assert_msg(WEXITSTATUS(system(cmd)) == 1, "the worker lost its broker connection");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* Seconds since the epoch, from this machine's clock (PostgreSQL's now()
 * reads the same one). */
static double wall_now(void) { return (double)aq_now_us() / 1e6; }

/* The burst scenario, small: one user's 600 tasks, then three users' two
 * tasks each, on two workers of 10 slots. FIFO would make the late users
 * wait behind the whole burst (about 5 s); with lanes they start as slots
 * free, and no slot idles while the burst waits. */
START_TEST(burst_does_not_hold_back_late_users)
{
    const char *mock[] = {"--latency-ms", "200", NULL};
    setup_env("burst", mock);
    const char *ten[] = {"AGENTQ_WORKER_CONCURRENCY=10", NULL};
    aq_test_proc *a = start_worker("worker-a", ten);
    aq_test_proc *b = start_worker("worker-b", ten);
    sleep(1);
    produce_user_tasks("burst", 600, "quick answer");
    double t_burst = wall_now();
    usleep(500 * 1000);
    double t_late = wall_now();
    for (int u = 0; u < 3; u++) {
        char user[16];
        snprintf(user, sizeof user, "late%d", u);
        produce_user_tasks(user, 2, "quick answer");
    }
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "606",
                                        60000),
                  "not all tasks completed");
    /* Late users: done within 2 s of their publish (a task is ~0.2 s; behind
     * the burst they would wait about 5 s). */
    assert_pg("t", "SELECT max(extract(epoch FROM finished_at)) - %.3f < 2 FROM agentq.tasks"
                   " WHERE user_id LIKE 'late%%'", t_late);
    /* Work-conserving: 606 tasks × ~0.2 s / 20 slots ≈ 6 s; allow 2×. */
    assert_pg("t", "SELECT max(extract(epoch FROM finished_at)) - %.3f < 12 FROM agentq.tasks", t_burst);
    assert_pg("2", "SELECT count(DISTINCT worker_id) FROM agentq.tasks");
    /* Hundreds of acks, several to a frame, and the broker never closed
     * a channel over one (an ack of a tag it no longer holds would). */
    const char *names[] = {"worker-a", "worker-b"};
    for (int i = 0; i < 2; i++) {
        char cmd[400];
        snprintf(cmd, sizeof cmd, "grep -q 'broker connection lost' '%s/%s.log'", E.logdir, names[i]);
        ck_assert_msg(WEXITSTATUS(system(cmd)) == 1, "%s lost its broker connection (see %s/%s.log)", names[i],
                      E.logdir, names[i]);
    }
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* agentq.users changed in SQL while the fleet runs: a cap of 0 holds the
 * user's task (queued, visible, cancellable before any worker starts it,
 * whatever client published it); raising the cap lets the rest run, with
 * the new cap honoured. */
START_TEST(user_settings_take_effect_while_running)
{
    const char *mock[] = {"--latency-ms", "300", NULL};
    setup_env("settings", mock);
    char err[512];
    char sql[256];
    snprintf(sql, sizeof sql, "INSERT INTO agentq.users (user_id, max_inflight) VALUES ('paced', 0)");
    ck_assert_msg(aq_test_pg_exec(E.dsn, sql, err, sizeof err) == 0, "%s", err);
    aq_test_proc *w = start_worker("worker", NULL);
    sleep(1);
    const char *doomed = "5d1c3b6e-0f43-4c1e-9a59-4c5d8e6f7a01";
    publish_raw("{\"task_id\":\"5d1c3b6e-0f43-4c1e-9a59-4c5d8e6f7a01\",\"user_id\":\"paced\",\"goal\":\"wait\"}",
                NULL, 0, NULL);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT status FROM agentq.tasks", "queued", 1500),
                  "a published task was not visible as queued within 1.5 s");
    const char *cancel[] = {"cancel", doomed, NULL};
    ck_assert_int_eq(ctl(cancel), 0);
    produce_user_tasks("paced", 6, "quick answer");
    sleep(2);
    assert_pg("0", "SELECT count(*) FROM agentq.tasks WHERE started_at IS NOT NULL");
    assert_pg("6|1", "SELECT count(*) || '|' || max(attempt) FROM agentq.tasks WHERE status = 'queued'");
    snprintf(sql, sizeof sql, "UPDATE agentq.users SET max_inflight = 2 WHERE user_id = 'paced'");
    ck_assert_msg(aq_test_pg_exec(E.dsn, sql, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "6",
                                        20000),
                  "the raised cap did not let the tasks run");
    assert_task(doomed, "status || ',' || (started_at IS NULL)", "cancelled,true");
    assert_pg("2", MAX_CONCURRENT_SQL, "paced");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* Two workers; a task published three times as a producer does after an
 * uncertain confirm, a twin from another user with the same task_id, and a
 * malformed twin. The task runs once (one attempt's LLM calls), the twins
 * change nothing and are recorded, and no copy is left. */
START_TEST(duplicates_and_twins_never_rerun_or_change_a_task)
{
    const char *mock[] = {"--latency-ms", "600", NULL};
    setup_env("dupes", mock);
    const char *ea[] = {"AGENTQ_WORKER_ID=wa", NULL}, *eb[] = {"AGENTQ_WORKER_ID=wb", NULL};
    aq_test_proc *a = start_worker("worker-a", ea), *b = start_worker("worker-b", eb);
    sleep(1);
    const char *id = "0b5e2c1a-7f3d-4e8a-9c6b-1d2e3f4a5b6c";
    char body[512], twin[512], bad[512];
    snprintf(body, sizeof body,
             "{\"task_id\": \"%s\", \"user_id\": \"alice\", \"goal\": \"mine steps=2\", \"metadata\": {\"pi\": 3.14159}}",
             id);
    snprintf(twin, sizeof twin, "{\"task_id\": \"%s\", \"user_id\": \"mallory\", \"goal\": \"hijack steps=0\"}", id);
    snprintf(bad, sizeof bad, "{\"task_id\": \"%s\", \"user_id\": 5, \"goal\": \"x\"}", id);
    publish_raw(body, NULL, 0, NULL);
    wait_status(id, "running", 10000, a, "worker-a");
    publish_raw(body, NULL, 0, NULL);
    publish_raw(body, NULL, 0, NULL);
    publish_raw(twin, NULL, 0, NULL);
    publish_raw(bad, NULL, 0, NULL);
    wait_status(id, "completed", 20000, a, "worker-a");
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT string_agg(reason, ',' ORDER BY reason) FROM agentq.dead_letters",
                                        "duplicate,rejected", 10000),
                  "the twins were not both recorded");
    assert_pg("completed,alice,mine steps=2,1,0,0,3.14159", "SELECT concat_ws(',', status, user_id, goal, attempt, interruptions, failures, metadata->>'pi')"
              " FROM agentq.tasks WHERE task_id = '%s'", id);
    /* One attempt of three LLM calls (two tool turns and the answer). */
    assert_pg("3,1", "SELECT count(*) || ',' || count(DISTINCT attempt) FROM agentq.steps"
              " WHERE task_id = '%s' AND kind = 'llm'", id);
    assert_pg("task_id 0b5e2c1a-7f3d-4e8a-9c6b-1d2e3f4a5b6c already names a task (now running) that another"
              " message defined; this one differs from it and was not run", "SELECT error FROM agentq.dead_letters WHERE reason = 'duplicate' AND task_id = '%s'", id);
    /* Every copy was settled: with the workers gone, nothing comes back. */
    aq_test_proc_signal(a, SIGTERM);
    aq_test_proc_signal(b, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(a, 10000), 0);
    ck_assert_int_eq(aq_test_proc_wait(b, 10000), 0);
    ck_assert_int_eq(tasks_left(), 0);
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* The history that lost tasks: worker A runs a task, a second copy reaches
 * worker B (a duplicate: acked), A is killed. A's own copy comes back, B
 * takes the task over and completes it once. */
START_TEST(duplicate_then_owner_killed_completes_once)
{
    const char *mock[] = {"--latency-ms", "1200", NULL};
    setup_env("dupkill", mock);
    const char *ea[] = {"AGENTQ_WORKER_ID=wa", NULL}, *eb[] = {"AGENTQ_WORKER_ID=wb", NULL};
    aq_test_proc *a = start_worker("worker-a", ea);
    sleep(1);
    const char *id = "7c1d9e2f-3a4b-4c5d-8e6f-0a1b2c3d4e5f";
    char body[256];
    snprintf(body, sizeof body, "{\"task_id\": \"%s\", \"user_id\": \"alice\", \"goal\": \"slow steps=1\"}", id);
    publish_raw(body, NULL, 0, NULL);
    wait_status(id, "running", 10000, a, "worker-a");
    aq_test_proc *b = start_worker("worker-b", eb);
    sleep(1);
    publish_raw(body, NULL, 0, NULL);
    usleep(500000); /* the copy is settled (acked) by whichever worker got it */
    aq_test_proc_signal(a, SIGKILL);
    aq_test_proc_wait(a, 5000);
    wait_status(id, "completed", 20000, b, "worker-b");
    assert_pg("wb,2,1,0,2", "SELECT concat_ws(',', worker_id, attempt, interruptions, failures, steps)"
              " FROM agentq.tasks WHERE task_id = '%s'", id);
    /* attempt 2 went on from what attempt 1 committed: each step's reply once */
    assert_pg("1,2", "SELECT string_agg(step::text, ',' ORDER BY step) FROM agentq.steps WHERE task_id = '%s'"
              " AND kind = 'llm' AND status = 'ok'", id);
    aq_test_proc_signal(b, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(b, 10000), 0);
    ck_assert_int_eq(tasks_left(), 0);
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* Starts another mock LLM; writes the AGENTQ_LLM_BASE_URL=... entry for it
 * to var (160 bytes). */
static aq_test_proc *extra_mock(const char *const *flags, const char *name, char *var)
{
    char log[300];
    int port = 0;
    snprintf(log, sizeof log, "%s/%s.log", E.logdir, name);
    aq_test_proc *m = aq_test_start_mock(flags, log, &port);
    snprintf(var, 160, "AGENTQ_LLM_BASE_URL=http://127.0.0.1:%d/v1", port);
    return m;
}

/* Killed twice, then one failed attempt: with amqp.max_attempts = 2 the
 * task still has its retry, because crashes are interruptions. */
START_TEST(crashes_do_not_use_up_attempts)
{
    const char *mock[] = {"--latency-ms", "1500", NULL};
    setup_env("crashes", mock);
    const char *two[] = {"AGENTQ_AMQP_MAX_ATTEMPTS=2", NULL};
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "steady steps=1", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    for (int kill = 0; kill < 2; kill++) {
        aq_test_proc *w = start_worker(kill ? "worker-2" : "worker-1", two);
        char sql[256], want[32];
        snprintf(sql, sizeof sql, "SELECT status || ',' || attempt FROM agentq.tasks WHERE task_id = '%s'", id);
        snprintf(want, sizeof want, "running,%d", kill + 1);
        ck_assert_msg(aq_test_pg_wait_value(E.dsn, sql, want, 10000), "attempt %d never ran", kill + 1);
        aq_test_proc_signal(w, SIGKILL);
        aq_test_proc_wait(w, 5000);
        aq_test_proc_free(w);
    }
    /* Attempt 3 meets a provider that fails. */
    char failing[160];
    const char *fail_flags[] = {"--fail-rate", "1", NULL};
    aq_test_proc *fm = extra_mock(fail_flags, "mock-failing", failing);
    const char *fail_env[] = {"AGENTQ_AMQP_MAX_ATTEMPTS=2", failing, NULL};
    aq_test_proc *w3 = start_worker("worker-3", fail_env);
    wait_status(id, "retrying", 15000, w3, "worker-3");
    aq_test_proc_signal(w3, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w3, 10000), 0);
    aq_test_proc_free(w3);
    aq_test_proc_free(fm);
    /* The retry (after the 1 s tier) completes on a good provider. */
    aq_test_proc *w4 = start_worker("worker-4", two);
    wait_status(id, "completed", 20000, w4, "worker-4");
    assert_pg("4,2,1", "SELECT concat_ws(',', attempt, interruptions, failures) FROM agentq.tasks WHERE task_id = '%s'", id);
    aq_test_proc_free(w4);
    teardown_env();
}
END_TEST

/* x-agentq-* headers on a first publish are not the producer's to set. */
START_TEST(spoofed_retry_headers_are_ignored)
{
    setup_env("spoof", NULL);
    aq_test_proc *w = start_worker("worker", NULL);
    sleep(1);
    const char *id = "2f4e6a8c-1b3d-4f5a-9b7c-8d9e0f1a2b3c";
    char body[256];
    snprintf(body, sizeof body, "{\"task_id\": \"%s\", \"user_id\": \"eve\", \"goal\": \"plain steps=0\"}", id);
    publish_raw(body, NULL, 0, "{\"x-agentq-attempt\": 99, \"x-agentq-deadline\": 1}");
    wait_status(id, "completed", 15000, w, "worker");
    assert_pg("1,0,t", "SELECT concat_ws(',', attempt, failures, deadline IS NULL) FROM agentq.tasks WHERE task_id = '%s'", id);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* A running row whose message is gone (acked by mistake, purged, a
 * consumer_timeout) and whose lease expired: the sweeper publishes it
 * again and it completes. */
START_TEST(sweeper_republishes_running_tasks_nobody_holds)
{
    setup_env("sweep", NULL);
    const char *id = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
    char sql[1024], err[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt, started_at, worker_id, body,"
             " body_sha256, lease_owner, lease_until, leased_at)"
             " SELECT '%s', 'sam', 'lost steps=1', 'running', 1, now(), 'w-gone', b, sha256(b), 77,"
             " now() - interval '1 minute', now() - interval '2 minutes'"
             " FROM convert_to('{\"user_id\": \"sam\", \"goal\": \"lost steps=1\"}', 'UTF8') AS b",
             id);
    ck_assert_msg(aq_test_pg_exec(E.dsn, sql, err, sizeof err) == 0, "%s", err);
    const char *lease[] = {"AGENTQ_WORKER_LEASE_SECONDS=3", NULL};
    aq_test_proc *w = start_worker("worker", lease);
    wait_status(id, "completed", 20000, w, "worker");
    assert_pg("2,1,t,t", "SELECT concat_ws(',', attempt, interruptions, worker_id <> 'w-gone', swept_at IS NULL)"
              " FROM agentq.tasks WHERE task_id = '%s'", id);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* A database address that answers nothing (a listener that never accepts:
 * the TCP handshake completes, no byte ever comes back, as with a server
 * behind a firewall that drops packets). The worker still stops within
 * drain_seconds + 5 s of SIGTERM: no connection attempt blocks it. */
START_TEST(sigterm_with_an_unreachable_database_exits_in_time)
{
    setup_env("pgdown", NULL);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(listen(fd, 64), 0);
    char dsn[200];
    snprintf(dsn, sizeof dsn, "AGENTQ_POSTGRES_DSN=host=127.0.0.1 port=%d dbname=agentq user=agentq",
             aq_test_bound_port(fd));
    const char *vars[] = {dsn, "AGENTQ_WORKER_DRAIN_SECONDS=1", "AGENTQ_LIMITS_MODE=fleet",
                          "AGENTQ_LLM_REQUESTS_PER_MINUTE=600", NULL};
    aq_test_proc *w = start_worker("worker", vars);
    sleep(2); /* every connection attempt to the database is under way */
    int64_t t0 = aq_mono_us();
    aq_test_proc_signal(w, SIGTERM);
    int rc = aq_test_proc_wait(w, 15000);
    double secs = (double)(aq_mono_us() - t0) / 1e6;
    ck_assert_msg(rc == 0, "worker exit status %d after %.1f s", rc, secs);
    ck_assert_msg(secs < 1 + 5, "the worker took %.1f s to stop (drain_seconds 1)", secs);
    close(fd);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* ---- durable sessions ---------------------------------------------------- */

/* Chat requests the mock got for `goal` (GET /calls): what the task paid. */
static long mock_calls(const char *goal)
{
    char buf[1 << 16];
    ck_assert_int_eq(http_get(E.mock_port, "/calls", buf, sizeof buf), 200);
    json_t *o = json_loads(buf, 0, NULL);
    ck_assert_ptr_nonnull(o);
    long n = (long)json_integer_value(json_object_get(o, goal));
    json_decref(o);
    return n;
}

/* Every task of the test completed with `steps` steps, each step's LLM
 * reply recorded once over all its attempts, and its totals the sum of
 * those replies: cost and steps as an uninterrupted run's. */
static void assert_each_step_paid_once(int ntasks, int steps)
{
    char want[64];
    snprintf(want, sizeof want, "%d", ntasks);
    assert_pg(want, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed' AND steps = %d", steps);
    assert_pg("0", "SELECT count(*) FROM (SELECT task_id, step FROM agentq.steps WHERE kind = 'llm' AND status = 'ok'"
              " GROUP BY 1, 2 HAVING count(*) > 1) twice");
    assert_pg("0", "SELECT count(*) FROM agentq.tasks t WHERE cost_usd::float8 <> (SELECT round(sum(cost_usd), 8)::float8"
              " FROM agentq.steps s WHERE s.task_id = t.task_id AND kind = 'llm' AND status = 'ok')"
              " OR prompt_tokens <> (SELECT sum(prompt_tokens) FROM agentq.steps s WHERE s.task_id = t.task_id"
              " AND kind = 'llm' AND status = 'ok')");
}

/* Tasks of 6 LLM calls, killed at step 3: the next attempt goes on from
 * the committed steps, and no task paid for more than one call twice. */
START_TEST(kill9_mid_task_resumes_at_the_last_committed_step)
{
    const char *mock[] = {"--latency-ms", "700", NULL};
    setup_env("resume9", mock);
    aq_test_proc *a = start_worker("worker-a", NULL);
    char file[300];
    snprintf(file, sizeof file, "%s/tasks.jsonl", E.logdir);
    FILE *f = fopen(file, "w");
    for (int i = 0; i < 4; i++) fprintf(f, "{\"user_id\":\"u%d\",\"goal\":\"steps=5 resume %d\"}\n", i, i);
    fclose(f);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, NULL), 0);
    /* live progress: the rows count steps while the tasks run */
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'running'"
                                               " AND steps >= 3", "4", 20000),
                  "the running rows did not show 3 steps");
    aq_test_proc_signal(a, SIGKILL);
    aq_test_proc_wait(a, 5000);
    aq_test_proc *b = start_worker("worker-b", NULL);
    ck_assert(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "4", 30000));
    for (int i = 0; i < 4; i++) {
        char goal[64];
        snprintf(goal, sizeof goal, "steps=5 resume %d", i);
        long calls = mock_calls(goal);
        ck_assert_msg(calls >= 6 && calls <= 7, "%s: %ld LLM calls (6 without the crash)", goal, calls);
    }
    assert_each_step_paid_once(4, 6);
    assert_pg("4", "SELECT count(*) FROM agentq.tasks WHERE attempt = 2 AND interruptions = 1 AND failures = 0");
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* A drain that runs out, and a retry after a provider's 5xx: both go on
 * from the committed steps. */
START_TEST(drained_and_retried_tasks_resume)
{
    const char *mock[] = {"--latency-ms", "600", NULL};
    setup_env("resumedrain", mock);
    const char *short_drain[] = {"AGENTQ_WORKER_DRAIN_SECONDS=1", NULL};
    aq_test_proc *w = start_worker("worker", short_drain);
    char id[40];
    const char *one[] = {"--user", "d", "--goal", "steps=5 drained", NULL};
    ck_assert_int_eq(produce(one, id), 0);
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT steps >= 3 FROM agentq.tasks WHERE task_id = '%s'", id);
    ck_assert(aq_test_pg_wait_value(E.dsn, sql, "t", 20000));
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 10000), 0);
    assert_task(id, "status", "queued");
    aq_test_proc_free(w);
    w = start_worker("worker-2", NULL);
    wait_status(id, "completed", 20000, w, "worker-2");
    long calls = mock_calls("steps=5 drained");
    ck_assert_msg(calls >= 6 && calls <= 7, "drained: %ld LLM calls", calls);

    /* 5xx to everything for a while: the attempt fails (llm.max_retries 0)
     * and its retry, a second later, goes on from step 3. */
    const char *two[] = {"--user", "r", "--goal", "steps=5 retried", NULL};
    ck_assert_int_eq(produce(two, id), 0);
    snprintf(sql, sizeof sql, "SELECT steps >= 3 FROM agentq.tasks WHERE task_id = '%s'", id);
    ck_assert(aq_test_pg_wait_value(E.dsn, sql, "t", 20000));
    char cmd[512];
    snprintf(cmd, sizeof cmd, "curl -s -o /dev/null -d '{\"fail_rate\": 1}' http://127.0.0.1:%d/control",
             E.mock_port);
    ck_assert_int_eq(system(cmd), 0);
    snprintf(sql, sizeof sql, "SELECT status FROM agentq.tasks WHERE task_id = '%s'", id);
    ck_assert(aq_test_pg_wait_value(E.dsn, sql, "retrying", 10000));
    snprintf(cmd, sizeof cmd, "curl -s -o /dev/null -d '{}' http://127.0.0.1:%d/control", E.mock_port);
    ck_assert_int_eq(system(cmd), 0);
    wait_status(id, "completed", 20000, w, "worker-2");
    assert_task(id, "attempt || ',' || failures || ',' || steps", "2,1,6");
    assert_each_step_paid_once(2, 6);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* ask_human: the task waits without a slot, is answered through SQL and
 * through agentqctl, resumes with the answer; a waiting task can be
 * cancelled, and one nobody answers expires. */
START_TEST(ask_human_waits_and_resumes_with_the_answer)
{
    const char *mock[] = {"--latency-ms", "100", NULL};
    setup_env("askhuman", mock);
    const char *one_slot[] = {"AGENTQ_WORKER_CONCURRENCY=1", "AGENTQ_WORKER_LEASE_SECONDS=3", NULL};
    aq_test_proc *w = start_worker("worker", one_slot);
    const char *ids[] = {"0b7c1a52-6d3e-4f80-9a1b-2c3d4e5f6071", "0b7c1a52-6d3e-4f80-9a1b-2c3d4e5f6072",
                         "0b7c1a52-6d3e-4f80-9a1b-2c3d4e5f6073", "0b7c1a52-6d3e-4f80-9a1b-2c3d4e5f6074"};
    const char *extra[] = {"", "", "", ",\"wait_timeout_seconds\":1"};
    for (int i = 0; i < 4; i++) {
        char body[400];
        snprintf(body, sizeof body,
                 "{\"task_id\":\"%s\",\"user_id\":\"h\",\"goal\":\"steps=1 tool=ask_human ask %d\","
                 "\"skills\":[\"ask_human\",\"calculator\"]%s}", ids[i], i, extra[i]);
        publish_raw(body, NULL, 0, NULL);
    }
    /* one slot, four questions: each frees the slot for the next */
    for (int i = 0; i < 3; i++) wait_status(ids[i], "waiting", 15000, w, "worker");
    assert_task(ids[0], "question || ',' || (wait_until > now() + interval '23 hours')", "mock input,true");
    assert_pg("3", "SELECT count(*) FROM agentq.steps WHERE kind = 'tool' AND name = 'ask_human' AND status = 'waiting'"
              " AND task_id <> '%s'", ids[3]);
    /* the one with a 1 s wait expires at the next sweep */
    wait_status(ids[3], "expired", 15000, w, "worker");
    assert_task(ids[3], "error LIKE '%wait_timeout_seconds%'", "t");
    assert_pg("expired", "SELECT reason FROM agentq.dead_letters WHERE task_id = '%s'", ids[3]);

    /* answered through SQL, as an application would */
    char sql[300], err[512];
    snprintf(sql, sizeof sql, "SELECT agentq.answer('%s', 'blue')", ids[0]);
    ck_assert_msg(aq_test_pg_exec(E.dsn, sql, err, sizeof err) == 0, "%s", err);
    wait_status(ids[0], "completed", 15000, w, "worker");
    assert_task(ids[0], "attempt || ',' || steps || ',' || (result LIKE '%blue%')", "2,2,true");
    /* a second answer is refused, naming the status */
    ck_assert(aq_test_pg_exec(E.dsn, sql, err, sizeof err) != 0);
    ck_assert_msg(strstr(err, "is completed, not waiting"), "%s", err);
    snprintf(sql, sizeof sql, "SELECT agentq.answer('0b7c1a52-6d3e-4f80-9a1b-2c3d4e5f6079', 'x')");
    ck_assert(aq_test_pg_exec(E.dsn, sql, err, sizeof err) != 0);
    ck_assert_msg(strstr(err, "no task"), "%s", err);

    /* answered through agentqctl */
    const char *answer[] = {"answer", ids[1], "green", NULL};
    ck_assert_int_eq(ctl(answer), 0);
    wait_status(ids[1], "completed", 15000, w, "worker");
    assert_task(ids[1], "result LIKE '%green%'", "t");
    ck_assert_int_eq(ctl(answer), 1); /* not waiting any more */

    /* cancelled while waiting */
    const char *cancel[] = {"cancel", ids[2], NULL};
    ck_assert_int_eq(ctl(cancel), 0);
    wait_status(ids[2], "cancelled", 15000, w, "worker");
    assert_task(ids[2], "error", "cancelled while waiting for an answer");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* The broker's consumer_timeout set to 60 s (the least the worker's
 * config takes), and a task of ~36 s: at 30 s on its delivery the session
 * hands itself over to a new delivery and completes there, each step paid
 * once, and the channel is never closed under it. */
START_TEST(long_task_hands_itself_over_before_consumer_timeout)
{
    const char *mock[] = {"--latency-ms", "1000", NULL};
    setup_env("handover", mock);
    char cmd[600];
    const char *ctl_bin = aq_test_env_require("AGENTQ_TEST_RABBITMQCTL");
    snprintf(cmd, sizeof cmd, "'%s' -q eval 'application:set_env(rabbit, consumer_timeout, 60000).' >/dev/null",
             ctl_bin);
    ck_assert_int_eq(system(cmd), 0);
    const char *short_timeout[] = {"AGENTQ_AMQP_CONSUMER_TIMEOUT_MS=60000", "AGENTQ_WORKER_LEASE_SECONDS=3", NULL};
    aq_test_proc *w = start_worker("worker", short_timeout);
    char id[40];
    const char *args[] = {"--user", "long", "--goal", "steps=35 long haul", "--max-steps", "50", "--timeout",
                          "300", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    char sql[200];
    snprintf(sql, sizeof sql, "SELECT status FROM agentq.tasks WHERE task_id = '%s'", id);
    bool done = aq_test_pg_wait_value(E.dsn, sql, "completed", 150000);
    snprintf(cmd, sizeof cmd, "'%s' -q eval 'application:set_env(rabbit, consumer_timeout, 7200000).' >/dev/null",
             ctl_bin);
    ck_assert_int_eq(system(cmd), 0);
    if (!done) wait_status(id, "completed", 1, w, "worker");
    assert_task(id, "steps || ',' || failures || ',' || interruptions || ',' || (attempt >= 2)", "36,0,0,true");
    assert_each_step_paid_once(1, 36);
    ck_assert_int_eq(mock_calls("steps=35 long haul"), 36);
    snprintf(cmd, sizeof cmd, "grep -q 'handing the session over' '%s/worker.log'", E.logdir);
    ck_assert_msg(WEXITSTATUS(system(cmd)) == 0, "no hand-over logged");
    snprintf(cmd, sizeof cmd, "grep -q 'broker connection lost' '%s/worker.log'", E.logdir);
    ck_assert_msg(WEXITSTATUS(system(cmd)) == 1, "the worker lost its broker connection");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* ---- providers ------------------------------------------------------------ */

/* Writes a config file holding `text` into the test's log dir; returns
 * its path (static). */
static const char *write_conf(const char *name, const char *text)
{
    static char path[300];
    snprintf(path, sizeof path, "%s/%s.conf", E.logdir, name);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    return path;
}

/* Two providers of 600 calls a minute each for model "m", two workers in
 * fleet mode: the fleet's 1,200 a minute is both providers' sum, and
 * each provider's own limit holds across the workers. */
START_TEST(provider_limits_hold_fleet_wide)
{
    setup_env("providers", NULL);
    char var[160];
    aq_test_proc *mock_b = extra_mock(NULL, "mock-b", var);
    const char *port_b = strrchr(var, ':') + 1;
    char text[2048];
    snprintf(text, sizeof text,
             "llm = { model = \"m\"; };\nlimits = { mode = \"fleet\"; };\n"
             "providers = (\n"
             " { name = \"a\"; base_url = \"http://127.0.0.1:%d/v1\";\n"
             "   models = ( { name = \"m\"; requests_per_minute = 600; input_per_mtok = 1.0; output_per_mtok = 2.0; } ); },\n"
             " { name = \"b\"; base_url = \"http://127.0.0.1:%.*s/v1\";\n"
             "   models = ( { name = \"m\"; requests_per_minute = 600; input_per_mtok = 1.0; output_per_mtok = 2.0; } ); }\n"
             ");\n",
             E.mock_port, (int)strcspn(port_b, "/"), port_b);
    const char *conf = write_conf("providers", text);
    aq_test_proc *a = start_worker_conf("worker-a", conf, NULL);
    aq_test_proc *b = start_worker_conf("worker-b", conf, NULL);
    char file[300];
    snprintf(file, sizeof file, "%s/tasks.jsonl", E.logdir);
    write_tasks(file, 120, "quick answer");
    sleep(1);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, NULL), 0);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", "120",
                                        40000),
                  "not all tasks completed");
    /* 120 calls at 2 x 10/s with 2 x 1 s of burst: at least (120-20)/20 = 5 s */
    char *v = aq_test_pg_value(E.dsn, "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM agentq.tasks");
    double span = atof(v);
    free(v);
    ck_assert_msg(span >= 4.4 && span <= 12.0, "120 calls at 2 providers of 10/s took %.2f s", span);
    /* each provider served its share, within its own limit */
    for (int i = 0; i < 2; i++) {
        char sql[400];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) <= 10 + 10 * extract(epoch FROM max(started_at) - min(started_at)) + 1"
                 " AND count(*) >= 20 FROM agentq.steps WHERE kind = 'llm' AND status = 'ok' AND provider = '%s'",
                 i ? "b" : "a");
        assert_pg("t", "%s", sql);
    }
    assert_pg("2", "SELECT count(DISTINCT worker_id) FROM agentq.tasks");
    assert_pg("10,10", "SELECT string_agg(refill_per_sec::text, ',' ORDER BY name) FROM agentq.rate_limits"
                       " WHERE name IN ('llm:a:m:requests', 'llm:b:m:requests')");
    aq_test_proc_free(a);
    aq_test_proc_free(b);
    aq_test_proc_free(mock_b);
    teardown_env();
}
END_TEST

/* A reply saying nothing is left until a reset pauses the fleet's bucket:
 * a worker started afterwards sends nothing until the reset, and no call
 * is refused. */
START_TEST(reset_header_pauses_the_fleet)
{
    const char *mock[] = {"--window-requests", "1", "--window-ms", "8000", NULL};
    setup_env("resetpause", mock);
    const char *fleet[] = {"AGENTQ_LIMITS_MODE=fleet", "AGENTQ_LLM_REQUESTS_PER_MINUTE=6000", NULL};
    aq_test_proc *a = start_worker("worker-a", fleet);
    char id[40];
    const char *first[] = {"--user", "u", "--goal", "quick one", NULL};
    ck_assert_int_eq(produce(first, id), 0);
    wait_status(id, "completed", 20000, a, "worker-a");
    aq_test_proc_free(a); /* its pause must outlive it, in the database */
    aq_test_proc *b = start_worker("worker-b", fleet);
    const char *second[] = {"--user", "u", "--goal", "quick two", NULL};
    ck_assert_int_eq(produce(second, id), 0);
    wait_status(id, "completed", 20000, b, "worker-b");
    char buf[4096];
    ck_assert_int_eq(http_get(E.mock_port, "/requests", buf, sizeof buf), 200);
    json_t *arr = json_loads(buf, 0, NULL);
    ck_assert_ptr_nonnull(arr);
    ck_assert_uint_eq(json_array_size(arr), 2); /* nothing refused, nothing in between */
    json_int_t t0 = json_integer_value(json_object_get(json_array_get(arr, 0), "at_ms"));
    json_int_t t1 = json_integer_value(json_object_get(json_array_get(arr, 1), "at_ms"));
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(arr, 1), "status")), 200);
    ck_assert_msg(t1 - t0 >= 7900, "the second call went %lld ms after the first, inside the reset",
                  (long long)(t1 - t0));
    json_decref(arr);
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* cache.enabled: a deterministic task run on one worker answers the same
 * task on another from Postgres — no call reaches the provider, the rows
 * say cached at cost 0. */
START_TEST(cache_shared_by_two_workers)
{
    setup_env("cache", NULL);
    const char *cached[] = {"AGENTQ_CACHE_ENABLED=1", NULL};
    aq_test_proc *a = start_worker("worker-a", cached);
    char file[300], id[40];
    snprintf(file, sizeof file, "%s/one.jsonl", E.logdir);
    FILE *f = fopen(file, "w");
    ck_assert_ptr_nonnull(f);
    fputs("{\"user_id\":\"alice\",\"goal\":\"steps=2 cached twice\",\"temperature\":0}\n", f);
    fclose(f);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "completed", 20000, a, "worker-a");
    ck_assert_int_eq(mock_calls("steps=2 cached twice"), 3);
    aq_test_proc_free(a);
    aq_test_proc *b = start_worker("worker-b", cached);
    f = fopen(file, "w");
    ck_assert_ptr_nonnull(f);
    fputs("{\"user_id\":\"bob\",\"goal\":\"steps=2 cached twice\",\"temperature\":0}\n", f);
    fclose(f);
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "completed", 20000, b, "worker-b");
    ck_assert_int_eq(mock_calls("steps=2 cached twice"), 3); /* all three from the cache */
    assert_task(id, "steps || ',' || cost_usd::float8", "3,0");
    char sql[300];
    snprintf(sql, sizeof sql,
             "SELECT string_agg(status || '/' || provider || '/' || cost_usd::float8, ',' ORDER BY step)"
             " FROM agentq.steps WHERE task_id = '%s' AND kind = 'llm'", id);
    assert_pg("cached/cache/0,cached/cache/0,cached/cache/0", "%s", sql);
    assert_pg("3", "SELECT count(*) FROM agentq.llm_cache WHERE hits >= 1");
    aq_test_proc_free(b);
    teardown_env();
}
END_TEST

/* A model without a price stops the worker at start, naming the file,
 * the line and the key. */
START_TEST(unpriced_model_stops_the_worker)
{
    setup_env("unpriced", NULL);
    char text[512];
    snprintf(text, sizeof text,
             "llm = { model = \"gpt-4o\"; };\n"
             "providers = ( { name = \"openai\"; base_url = \"http://127.0.0.1:%d/v1\";\n"
             "  models = ( { name = \"gpt-4o\"; requests_per_minute = 500; } ); } );\n",
             E.mock_port);
    const char *conf = write_conf("unpriced", text);
    aq_test_proc *w = start_worker_conf("worker", conf, NULL);
    int rc = aq_test_proc_wait(w, 10000);
    ck_assert_msg(rc > 0, "worker exit status %d", rc);
    char cmd[900];
    snprintf(cmd, sizeof cmd,
             "grep -q \"%s:3: key 'providers\\[0\\].models\\[0\\]': model 'gpt-4o' of provider 'openai' has no price\" "
             "'%s/worker.log'",
             conf, E.logdir);
    ck_assert_msg(WEXITSTATUS(system(cmd)) == 0, "the error does not name file, line, key and model");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* retention.older_than: the worker deletes a finished task with its steps
 * once it is older than that, by itself. */
START_TEST(retention_prunes_old_finished_tasks)
{
    setup_env("retention", NULL);
    const char *keep[] = {"AGENTQ_RETENTION_OLDER_THAN=2s", "AGENTQ_RETENTION_INTERVAL_SECONDS=1", NULL};
    aq_test_proc *w = start_worker("worker", keep);
    char id[40];
    const char *args[] = {"--user", "u", "--goal", "steps=1 short-lived", NULL};
    ck_assert_int_eq(produce(args, id), 0);
    wait_status(id, "completed", 20000, w, "worker");
    char sql[200];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM agentq.steps WHERE task_id = '%s'", id);
    assert_pg("3", "%s", sql); /* kept while younger than 2 s */
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks", "0", 15000),
                  "the finished task was not pruned");
    assert_pg("0", "%s", sql);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "grep -q 'retention: deleted 1 tasks (3 steps)' '%s/worker.log'", E.logdir);
    ck_assert_msg(WEXITSTATUS(system(cmd)) == 0, "the worker did not log what it pruned");
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

int main(void)
{
    const TTest *core[] = {producer_to_completed_row, priority_runs_first,
                           plain_amqp_client_task_runs, producer_wait_exit_code_and_ctl_status,
                           listed_nodes_tried_in_turn,
                           retention_prunes_old_finished_tasks};
    const TTest *limits[] = {ttl_expiry_recorded, ttl_carries_across_retries,
                             retries_through_tiers_then_failed, sigterm_drains_then_requeues,
                             cancel_stops_running_task, requeue_dead_letters,
                             fleet_rate_limit_shared_by_two_workers, user_cap_holds_fleet_wide,
                             burst_does_not_hold_back_late_users, user_settings_take_effect_while_running,
                             capped_user_does_not_take_the_slots, held_delivery_goes_back_before_consumer_timeout};
    const TTest *errors[] = {malformed_and_invalid_rejected, producer_reports_bad_lines,
                             kill9_redelivers_and_completes_once,
                             broker_connection_loss_loses_nothing,
                             database_connection_loss_loses_nothing,
                             duplicates_and_twins_never_rerun_or_change_a_task,
                             duplicate_then_owner_killed_completes_once,
                             crashes_do_not_use_up_attempts, spoofed_retry_headers_are_ignored,
                             sweeper_republishes_running_tasks_nobody_holds,
                             sigterm_with_an_unreachable_database_exits_in_time};
    const TTest *durable[] = {kill9_mid_task_resumes_at_the_last_committed_step, drained_and_retried_tasks_resume,
                              ask_human_waits_and_resumes_with_the_answer,
                              long_task_hands_itself_over_before_consumer_timeout};
    const TTest *quorum[] = {quorum_queues_through_the_second_listed_node, quorum_priority_band_runs_first,
                             quorum_one_user_fills_every_slot};
    const TTest *providers[] = {provider_limits_hold_fleet_wide, reset_header_pauses_the_fleet,
                                cache_shared_by_two_workers, unpriced_model_stops_the_worker};
    const aq_tcase_spec tcases[] = {
        {.name = "quorum", .tests = quorum, .n_tests = AQ_ARRAY_LEN(quorum), .timeout_s = 120},
        {.name = "providers", .tests = providers, .n_tests = AQ_ARRAY_LEN(providers), .timeout_s = 120},
        {.name = "durable", .tests = durable, .n_tests = AQ_ARRAY_LEN(durable), .timeout_s = 200},
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 120},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 120},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 120},
    };
    return aq_test_run(aq_test_suite("queue", tcases, AQ_ARRAY_LEN(tcases)));
}
