/* it_ctl.c — agentqctl as scripts and people use it, against the private
 * RabbitMQ (with its management API) and PostgreSQL of the `servers`
 * fixture: list, status, result, wait, prune, per-command help and every
 * usage error.
 *
 * Each test gets its own database and AMQP names (a prefix). Most write
 * the rows they need with SQL; the wait tests also run a real worker and
 * the mock LLM. agentqctl runs as a child process configured through the
 * environment, its stdout and stderr kept apart in files. */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/migrate.h"
#include "fleet.h"
#include "proc.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static aq_fleet E;
static char out_path[300], err_path[300]; /* the last agentqctl run's stdout and stderr */

/* A fresh database, migrated; AMQP names of our own; agentqctl (and
 * anything in-process reading the config) configured by the environment. */
static void setup_env(const char *name)
{
    aq_fleet_setup(&E, "itc", name);
    snprintf(out_path, sizeof out_path, "%s/ctl.out", E.logdir);
    snprintf(err_path, sizeof err_path, "%s/ctl.err", E.logdir);
    aq_fleet_set("AGENTQ_AMQP_MANAGEMENT_URL", aq_test_env_require("AGENTQ_TEST_MGMT_URL"));
    aq_fleet_set("AGENTQ_AMQP_LANES", "2");
    aq_fleet_set("AGENTQ_AMQP_RETRY_DELAYS", "1s,5s");
    aq_fleet_set("AGENTQ_LOG_LEVEL", "warn");
}

static void teardown_env(void) { aq_fleet_teardown(&E); }

static char *slurp(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, len - 1, f) : 0;
    buf[n] = '\0';
    if (f) fclose(f);
    return buf;
}

/* The last run's stdout and stderr. */
static char *out(void)
{
    static char buf[1 << 20];
    return slurp(out_path, buf, sizeof buf);
}

static char *errs(void)
{
    static char buf[65536];
    return slurp(err_path, buf, sizeof buf);
}

/* Runs agentqctl with the NULL-terminated args; returns its exit status. */
static int ctlv(const char *const *args)
{
    char cmd[4096];
    int n = snprintf(cmd, sizeof cmd, "'%s'", aq_test_bin("agentqctl"));
    for (int i = 0; args[i]; i++) {
        ck_assert_msg(!strchr(args[i], '\''), "no quotes in test arguments");
        n += snprintf(cmd + n, sizeof cmd - (size_t)n, " '%s'", args[i]);
    }
    snprintf(cmd + n, sizeof cmd - (size_t)n, " >'%s' 2>'%s' </dev/null", out_path, err_path);
    int rc = system(cmd);
    ck_assert_msg(WIFEXITED(rc), "agentqctl died: %d", rc);
    return WEXITSTATUS(rc);
}

#define ctl(...) ctlv((const char *const[]){__VA_ARGS__, NULL})

static void sql(const char *fmt, ...) AQ_PRINTF(1, 2);
static void sql(const char *fmt, ...)
{
    char text[8192], err[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    ck_assert_msg(aq_test_pg_exec(E.dsn, text, err, sizeof err) == 0, "%s: %s", text, err);
}

#define value(...) aq_fleet_value(&E, __VA_ARGS__)

/* A task row: enqueued `enq` ago, finished `fin` ago (NULL: not finished). */
static void task(const char *id, const char *user, const char *status, const char *enq, const char *fin,
                 int steps, const char *cost)
{
    char finished[128] = "NULL";
    if (fin) snprintf(finished, sizeof finished, "now() - interval '%s'", fin);
    sql("INSERT INTO agentq.tasks (task_id, user_id, goal, status, steps, cost_usd, enqueued_at, finished_at)"
        " VALUES ('%s', '%s', 'g', '%s', %d, %s, now() - interval '%s', %s)",
        id, user, status, steps, cost, enq, finished);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

/* Line `i` (0-based) of s into buf. */
static const char *line_at(const char *s, int i, char *buf, size_t len)
{
    for (; i > 0 && s; i--) {
        s = strchr(s, '\n');
        if (s) s++;
    }
    ck_assert_ptr_nonnull(s);
    snprintf(buf, len, "%.*s", (int)strcspn(s, "\n"), s);
    return buf;
}

#define ID_A1 "a1000000-0000-4000-8000-000000000001"
#define ID_A2 "a2000000-0000-4000-8000-000000000002"
#define ID_B1 "b1000000-0000-4000-8000-000000000001"
#define ID_B2 "b2000000-0000-4000-8000-000000000002"
#define NO_SUCH_ID "00000000-0000-4000-8000-000000000000"

/* ------------------------------------------------------------------ list */

START_TEST(list_filters_table_and_json)
{
    setup_env("list");
    task(ID_A1, "alice", "completed", "3 hours", "3 hours", 3, "0.00123");
    task(ID_A2, "alice", "failed", "2 days", "2 days", 1, "0");
    task(ID_B1, "bob", "running", "10 minutes", NULL, 2, "0.0005");
    task(ID_B2, "bob", "queued", "5 days", NULL, 0, "0");
    sql("INSERT INTO agentq.tasks (task_id, user_id, goal, status, enqueued_at, finished_at)"
        " SELECT gen_random_uuid(), 'carol', 'g', 'completed', now() - (10 + i) * interval '1 day', now()"
        " FROM generate_series(1, 55) i");
    char l[512];

    /* The table: a header, newest first, 50 rows by default. */
    ck_assert_int_eq(ctl("list"), 0);
    char *o = out();
    ck_assert_int_eq(count_lines(o), 51);
    line_at(o, 0, l, sizeof l);
    const char *cols[] = {"id", "user", "status", "steps", "cost_usd", "enqueued (UTC)", "finished (UTC)"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(cols); i++) ck_assert_msg(strstr(l, cols[i]), "no %s in %s", cols[i], l);
    ck_assert_msg(!strncmp(line_at(o, 1, l, sizeof l), ID_B1, 36), "%s", o);
    ck_assert_msg(strstr(l, "bob") && strstr(l, "running") && strstr(l, "0.000500"), "%s", l);
    ck_assert_msg(!strncmp(line_at(o, 2, l, sizeof l), ID_A1, 36) && strstr(l, "completed"), "%s", o);
    ck_assert_msg(!strncmp(line_at(o, 4, l, sizeof l), ID_B2, 36) && !strcmp(l + strlen(l) - 2, " -"),
                  "unfinished: - (%s)", l);

    ck_assert_int_eq(ctl("list", "--limit", "2"), 0);
    ck_assert_int_eq(count_lines(out()), 3);
    ck_assert_int_eq(ctl("list", "--status", "completed", "--user", "alice"), 0);
    o = out();
    ck_assert_msg(count_lines(o) == 2 && strstr(o, ID_A1), "%s", o);
    ck_assert_int_eq(ctl("list", "--status", "failed,running"), 0);
    o = out();
    ck_assert_msg(count_lines(o) == 3 && !strncmp(line_at(o, 1, l, sizeof l), ID_B1, 36) &&
                      !strncmp(line_at(o, 2, l, sizeof l), ID_A2, 36), "%s", o);
    /* --since and --until: durations before now, or timestamps. */
    ck_assert_int_eq(ctl("list", "--since", "1d"), 0);
    o = out();
    ck_assert_msg(count_lines(o) == 3 && strstr(o, ID_B1) && strstr(o, ID_A1), "%s", o);
    ck_assert_int_eq(ctl("list", "--since", "3d", "--until", "1h"), 0);
    o = out();
    ck_assert_msg(count_lines(o) == 3 && strstr(o, ID_A1) && strstr(o, ID_A2), "%s", o);
    char ts[64];
    snprintf(ts, sizeof ts, "%s",
             value("SELECT to_char(now() AT TIME ZONE 'UTC' - interval '4 days', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"));
    ck_assert_int_eq(ctl("list", "--user", "bob", "--until", ts), 0);
    o = out();
    ck_assert_msg(count_lines(o) == 2 && strstr(o, ID_B2), "%s: %s", ts, o);
    snprintf(ts, sizeof ts, "%s", value("SELECT to_char(now() AT TIME ZONE 'UTC' - interval '1 day', 'YYYY-MM-DD')"));
    ck_assert_int_eq(ctl("list", "--since", ts, "--user", "alice"), 0);
    ck_assert_msg(strstr(out(), ID_A1) && !strstr(out(), ID_A2), "%s: %s", ts, out());

    /* JSON lines, newest first. */
    ck_assert_int_eq(ctl("list", "--user", "alice", "--json"), 0);
    o = out();
    ck_assert_int_eq(count_lines(o), 2);
    json_error_t je;
    json_t *first = json_loads(line_at(o, 0, l, sizeof l), 0, &je);
    ck_assert_msg(first, "%s: %s", l, je.text);
    ck_assert_str_eq(json_string_value(json_object_get(first, "task_id")), ID_A1);
    ck_assert_str_eq(json_string_value(json_object_get(first, "status")), "completed");
    ck_assert_int_eq(json_integer_value(json_object_get(first, "steps")), 3);
    ck_assert(json_is_number(json_object_get(first, "cost_usd")));
    ck_assert(json_is_string(json_object_get(first, "enqueued_at")) && json_is_string(json_object_get(first, "finished_at")));
    json_decref(first);
    json_t *second = json_loads(line_at(o, 1, l, sizeof l), 0, &je);
    ck_assert_msg(second, "%s: %s", l, je.text);
    ck_assert_str_eq(json_string_value(json_object_get(second, "task_id")), ID_A2);
    json_decref(second);

    /* Nothing matching is no error. */
    ck_assert_int_eq(ctl("list", "--user", "nobody"), 0);
    ck_assert_str_eq(out(), "");
    ck_assert_msg(strstr(errs(), "no task matches"), "%s", errs());
    teardown_env();
}
END_TEST

/* ---------------------------------------------------------------- result */

START_TEST(result_table_and_json_without_internal_columns)
{
    setup_env("result");
    sql("INSERT INTO agentq.tasks (task_id, user_id, goal, status, attempt, failures, steps, prompt_tokens,"
        " completion_tokens, cost_usd, result, model, claim_token, lease_owner, lease_until, leased_at, body,"
        " body_sha256, enqueued_at, started_at, finished_at)"
        " VALUES ('" ID_A1 "', 'alice', 'g', 'completed', 2, 1, 2, 130, 25, 0.00012, 'The answer is 391.', 'mock-1',"
        " 'tok-secret-claim', 7, now(), now(), 'secret body', sha256('secret body'), now(), now(), now())");
    sql("INSERT INTO agentq.steps (task_id, attempt, step, seq, kind, name, status, provider, duration_ms,"
        " prompt_tokens, completion_tokens, cost_usd) VALUES"
        " ('" ID_A1 "', 2, 1, 0, 'llm', 'mock-1', 'ok', 'default', 12.4, 100, 20, 0.0001),"
        " ('" ID_A1 "', 2, 1, 1, 'tool', 'calculator', 'ok', NULL, 0.4, NULL, NULL, NULL),"
        " ('" ID_A1 "', 2, 2, 0, 'llm', 'mock-1', 'ok', 'default', 1500, 30, 5, 0.00002)");
    sql("INSERT INTO agentq.tasks (task_id, user_id, goal, status, error, finished_at)"
        " VALUES ('" ID_A2 "', 'bob', 'g', 'failed', 'provider said 400: bad request', now())");

    ck_assert_int_eq(ctl("result", ID_A1), 0);
    char *o = out();
    const char *want[] = {"status     completed", "result     The answer is 391.",
                          "attempts   2 (failures 1, interruptions 0)", "user       alice",
                          "attempt", "step", "seq", "kind", "name", "provider", "duration", "tokens", "cost_usd",
                          "calculator", "12 ms", "1.50 s", "120", "0.000100"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(want); i++) ck_assert_msg(strstr(o, want[i]), "no '%s' in\n%s", want[i], o);
    ck_assert_msg(!strstr(o, "tok-secret") && !strstr(o, "secret body"), "%s", o);
    ck_assert_int_eq(ctl("result", ID_A2), 0);
    ck_assert_msg(strstr(out(), "error      provider said 400: bad request") && strstr(out(), "(no steps)"), "%s",
                  out());

    ck_assert_int_eq(ctl("result", ID_A1, "--json"), 0);
    json_error_t je;
    json_t *doc = json_loads(out(), 0, &je);
    ck_assert_msg(doc, "%s: %s", je.text, out());
    json_t *t = json_object_get(doc, "task");
    ck_assert_str_eq(json_string_value(json_object_get(t, "status")), "completed");
    ck_assert_str_eq(json_string_value(json_object_get(t, "result")), "The answer is 391.");
    const char *internal[] = {"claim_token", "lease_owner", "lease_until", "leased_at", "body", "body_sha256"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(internal); i++)
        ck_assert_msg(!json_object_get(t, internal[i]), "%s shown", internal[i]);
    ck_assert(json_object_get(t, "cost_usd") && json_object_get(t, "finished_at") && json_object_get(t, "attempt"));
    json_t *steps = json_object_get(doc, "steps");
    ck_assert_int_eq(json_array_size(steps), 3);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(steps, 1), "name")), "calculator");
    json_decref(doc);
    ck_assert_msg(!strstr(out(), "tok-secret"), "%s", out());

    ck_assert_int_eq(ctl("result", NO_SUCH_ID), 1);
    ck_assert_msg(strstr(errs(), "no task " NO_SUCH_ID), "%s", errs());
    ck_assert_int_eq(ctl("result", NO_SUCH_ID, "--json"), 1);
    teardown_env();
}
END_TEST

/* ---------------------------------------------------------------- status */

static int deliveries;

static void on_delivery(aq_delivery *d, int channel, uint64_t dtag, void *arg)
{
    deliveries++;
    aq_delivery_free(d);
}

static json_t *queue_named(json_t *doc, const char *name)
{
    json_t *q;
    size_t i;
    json_array_foreach(json_object_get(doc, "queues"), i, q)
        if (!strcmp(json_string_value(json_object_get(q, "name")), name)) return q;
    return NULL;
}

START_TEST(status_json_with_the_management_api)
{
    setup_env("status");
    aq_config cfg;
    char err[1024];
    ck_assert_msg(aq_config_load(&cfg, NULL, err, sizeof err) == 0, "%s", err);
    aq_broker *b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_msg(b, "%s", err);
    ck_assert_msg(aq_broker_declare(b, &cfg, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < 3; i++) {
        aq_publish p = {cfg.amqp_exchange, "task", "{}", 2, NULL, 0, NULL, 0, NULL};
        ck_assert_int_gt(aq_broker_publish(b, &p, NULL, err, sizeof err), 0);
    }
    int64_t nacked;
    ck_assert_msg(aq_broker_wait_confirms(b, 5000, &nacked, err, sizeof err) == 0, "%s", err);
    /* Two of the three held unacked by this consumer: 1 ready, 2 unacked. */
    aq_broker_events ev = {.delivery = on_delivery};
    aq_broker_set_events(b, &ev);
    ck_assert_msg(aq_broker_consume(b, 3, cfg.amqp_queue, 2, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < 100 && deliveries < 2; i++) {
        struct pollfd pfd = {.fd = aq_broker_fd(b), .events = POLLIN};
        if (!aq_broker_buffered(b)) (void)poll(&pfd, 1, 50);
        ck_assert_msg(aq_broker_pump(b, err, sizeof err) == 0, "%s", err);
    }
    ck_assert_int_eq(deliveries, 2);
    task(ID_A1, "alice", "completed", "1 hour", "1 hour", 1, "0");
    task(ID_A2, "alice", "completed", "1 hour", "1 hour", 1, "0");
    task(ID_B1, "bob", "failed", "1 hour", "1 hour", 1, "0");
    sql("INSERT INTO agentq.dead_letters (task_id, reason) VALUES ('" ID_B1 "', 'failed')");

    /* The management API's statistics lag the broker by up to a second. */
    json_t *doc = NULL;
    json_t *ingress = NULL;
    for (int i = 0; i < 50; i++) {
        json_decref(doc);
        ck_assert_int_eq(ctl("status", "--json"), 0);
        json_error_t je;
        doc = json_loads(out(), 0, &je);
        ck_assert_msg(doc, "%s: %s", je.text, out());
        ingress = queue_named(doc, cfg.amqp_queue);
        ck_assert_ptr_nonnull(ingress);
        if (json_integer_value(json_object_get(ingress, "unacked")) == 2) break;
        usleep(200000);
    }
    ck_assert_msg(json_integer_value(json_object_get(ingress, "unacked")) == 2, "%s", out());
    ck_assert_int_eq(json_integer_value(json_object_get(ingress, "ready")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(ingress, "consumers")), 1);
    ck_assert_str_eq(json_string_value(json_object_get(ingress, "role")), "ingress");
    /* Every queue the config names, in order: ingress, lanes, retry tiers, dead. */
    const char *roles[] = {"ingress", "lane", "lane", "retry", "retry", "dead"};
    json_t *queues = json_object_get(doc, "queues");
    ck_assert_int_eq(json_array_size(queues), AQ_ARRAY_LEN(roles));
    for (size_t i = 0; i < AQ_ARRAY_LEN(roles); i++) {
        json_t *q = json_array_get(queues, i);
        ck_assert_str_eq(json_string_value(json_object_get(q, "role")), roles[i]);
        ck_assert_msg(json_is_integer(json_object_get(q, "ready")) && json_is_integer(json_object_get(q, "consumers")),
                      "%s", out());
        ck_assert_ptr_nonnull(json_object_get(q, "unacked"));
    }
    char name[128];
    snprintf(name, sizeof name, "%s.retry.5s", E.prefix);
    ck_assert_ptr_nonnull(queue_named(doc, name));
    snprintf(name, sizeof name, "%s.lane.1", E.prefix);
    ck_assert_ptr_nonnull(queue_named(doc, name));
    json_t *tasks = json_object_get(doc, "tasks");
    ck_assert_int_eq(json_object_size(tasks), 12); /* every status, zeros too */
    ck_assert_int_eq(json_integer_value(json_object_get(tasks, "completed")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(tasks, "failed")), 1);
    ck_assert(json_is_integer(json_object_get(tasks, "waiting")));
    ck_assert_int_eq(json_integer_value(json_object_get(doc, "dead_letters_parked")), 1);
    json_decref(doc);

    /* The text form: ready, unacked, consumers; the tasks below. */
    ck_assert_int_eq(ctl("status"), 0);
    char *o = out();
    const char *row = strstr(o, cfg.amqp_queue);
    ck_assert_ptr_nonnull(row);
    long long ready = -1, unacked = -1, consumers = -1;
    ck_assert_int_eq(sscanf(row + strlen(cfg.amqp_queue), "%lld %lld %lld", &ready, &unacked, &consumers), 3);
    ck_assert_msg(ready == 1 && unacked == 2 && consumers == 1, "%s", o);
    ck_assert_msg(strstr(o, "unacked") && strstr(o, "completed") && strstr(o, "parked dead letters: 1"), "%s", o);

    /* No management API: unacked unknown, null and "-". */
    setenv("AGENTQ_AMQP_MANAGEMENT_URL", "", 1);
    ck_assert_int_eq(ctl("status", "--json"), 0);
    doc = json_loads(out(), 0, NULL);
    ck_assert_ptr_nonnull(doc);
    ingress = queue_named(doc, cfg.amqp_queue);
    ck_assert(json_is_null(json_object_get(ingress, "unacked")));
    ck_assert_int_eq(json_integer_value(json_object_get(ingress, "ready")), 1);
    json_decref(doc);
    ck_assert_int_eq(ctl("status"), 0);
    row = strstr(out(), cfg.amqp_queue);
    char dash[8] = "";
    ck_assert_int_eq(sscanf(row + strlen(cfg.amqp_queue), "%lld %7s %lld", &ready, dash, &consumers), 3);
    ck_assert_str_eq(dash, "-");
    aq_broker_free(b);
    aq_config_free(&cfg);
    teardown_env();
}
END_TEST

START_TEST(status_exits_3_naming_the_server_that_is_down)
{
    setup_env("statusdown");
    int port = 0;
    int fd = aq_test_loopback_socket(0, &port); /* bound, not listening: refused */
    char url[256];
    snprintf(url, sizeof url, "amqp://guest:s3cret@127.0.0.1:%d/%%2f", port);
    const char *good_amqp = aq_test_env_require("AGENTQ_TEST_AMQP_URL");

    /* The broker down: the database part is still shown. */
    setenv("AGENTQ_AMQP_URL", url, 1);
    ck_assert_int_eq(ctl("status"), 3);
    char hostport[64];
    snprintf(hostport, sizeof hostport, "127.0.0.1:%d", port);
    ck_assert_msg(strstr(errs(), "broker") && strstr(errs(), hostport) && !strstr(errs(), "s3cret"), "%s", errs());
    ck_assert_msg(strstr(out(), "the broker cannot be reached") && strstr(out(), "parked dead letters"), "%s", out());
    ck_assert_int_eq(ctl("status", "--json"), 3);
    json_t *doc = json_loads(out(), 0, NULL);
    ck_assert_msg(doc && json_is_null(json_object_get(doc, "queues")) && json_is_object(json_object_get(doc, "tasks")),
                  "%s", out());
    json_decref(doc);
    setenv("AGENTQ_AMQP_URL", good_amqp, 1);

    /* The management API down: the unacked counts cannot be had. */
    snprintf(url, sizeof url, "http://guest:s3cret@127.0.0.1:%d", port);
    setenv("AGENTQ_AMQP_MANAGEMENT_URL", url, 1);
    ck_assert_int_eq(ctl("status", "--json"), 3);
    ck_assert_msg(strstr(errs(), "management API") && !strstr(errs(), "s3cret"), "%s", errs());
    setenv("AGENTQ_AMQP_MANAGEMENT_URL", "", 1);

    /* The database down: the broker part is still shown. */
    char dsn[256];
    snprintf(dsn, sizeof dsn, "host=127.0.0.1 port=%d user=postgres dbname=x connect_timeout=5", port);
    setenv("AGENTQ_POSTGRES_DSN", dsn, 1);
    ck_assert_int_eq(ctl("status"), 3);
    ck_assert_msg(strstr(errs(), "Postgres") && strstr(errs(), dsn), "%s", errs());
    ck_assert_msg(strstr(out(), "the database cannot be reached") && strstr(out(), ".tasks"), "%s", out());
    ck_assert_int_eq(ctl("status", "--json"), 3);
    doc = json_loads(out(), 0, NULL);
    ck_assert_msg(doc && json_is_array(json_object_get(doc, "queues")) && json_is_null(json_object_get(doc, "tasks")),
                  "%s", out());
    json_decref(doc);
    /* And every command that needs it. */
    const char *const cmds[][6] = {{"list", NULL},
                                   {"result", ID_A1, NULL},
                                   {"wait", ID_A1, "--timeout", "5", NULL},
                                   {"prune", "--older-than", "7d", NULL},
                                   {"cancel", ID_A1, NULL}};
    for (size_t i = 0; i < AQ_ARRAY_LEN(cmds); i++) {
        ck_assert_msg(ctlv(cmds[i]) == 3, "agentqctl %s: not 3", cmds[i][0]);
        ck_assert_msg(strstr(errs(), "cannot connect to Postgres"), "%s: %s", cmds[i][0], errs());
    }
    close(fd);
    teardown_env();
}
END_TEST

/* ---------------------------------------------------------------- wait */

/* The mock LLM and a worker for this test's names. */
static aq_test_proc *start_worker(void)
{
    aq_fleet_start_mock(&E, NULL);
    aq_fleet_set("AGENTQ_LLM_MAX_RETRIES", "0");
    aq_fleet_set("AGENTQ_METRICS_LISTEN", "127.0.0.1:0");
    return aq_fleet_worker(&E, "worker", NULL, NULL);
}

/* agentq-producer --record (the row exists before the command returns):
 * the new task's id into id (37 bytes). */
static void produce(const char *goal, char *id)
{
    const char *args[] = {"--record", "--user", "u", "--goal", goal, NULL};
    ck_assert_int_eq(aq_fleet_produce(&E, args, id), 0);
}

START_TEST(wait_exit_status_says_how_tasks_ended)
{
    setup_env("wait");
    aq_test_proc *w = start_worker();
    char ok[40], bad[40];
    produce("add things steps=2", ok);
    produce("refused fail=400", bad);

    ck_assert_int_eq(ctl("wait", ok), 0);
    char want[64];
    snprintf(want, sizeof want, "%s completed\n", ok);
    ck_assert_str_eq(out(), want);
    ck_assert_int_eq(ctl("wait", bad, "--timeout", "30"), 1);
    snprintf(want, sizeof want, "%s failed\n", bad);
    ck_assert_str_eq(out(), want);
    ck_assert_int_eq(ctl("wait", ok, bad), 1); /* both final, one not completed */
    ck_assert_int_eq(ctl("wait", ok, "--timeout", "0"), 0);
    ck_assert_int_eq(ctl("wait", ok, NO_SUCH_ID), 1);
    ck_assert_msg(strstr(errs(), "no task " NO_SUCH_ID), "%s", errs());

    /* A task that stays queued (no message carries it): the timeout. */
    task(ID_B2, "u", "queued", "1 second", NULL, 0, "0");
    int64_t t0 = aq_mono_us();
    ck_assert_int_eq(ctl("wait", ok, ID_B2, "--timeout", "0.5"), 4);
    int64_t took_ms = (aq_mono_us() - t0) / 1000;
    ck_assert_msg(took_ms >= 450 && took_ms < 3000, "took %lld ms", (long long)took_ms);
    ck_assert_msg(strstr(errs(), "timed out") && strstr(errs(), ID_B2 " (queued)"), "%s", errs());
    snprintf(want, sizeof want, "%s completed\n", ok);
    ck_assert_str_eq(out(), want);
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 15000), 0);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

/* Waits until the `agentqctl wait` session is idle in our database. */
static void await_waiting_session(void)
{
    char q[512];
    snprintf(q, sizeof q,
             "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
             " AND application_name = 'agentqctl' AND state = 'idle' AND query ILIKE '%%agentq.tasks%%'");
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, q, "1", 10000), "agentqctl wait did not start waiting");
}

START_TEST(wait_does_not_poll_and_reads_again_after_a_reconnect)
{
    setup_env("waitnotify");
    task(ID_A1, "u", "running", "1 second", NULL, 0, "0");
    char log[300];
    snprintf(log, sizeof log, "%s/wait1.log", E.logdir);
    const char *argv[] = {aq_test_bin("agentqctl"), "wait", ID_A1, NULL};
    aq_test_proc *p = aq_test_spawn(argv, NULL, log);
    await_waiting_session();
    /* No query for a while: it waits on the socket, not on a timer. */
    usleep(1500000);
    ck_assert_str_eq(value("SELECT now() - state_change > interval '1.2 seconds' FROM pg_stat_activity"
                           " WHERE datname = current_database() AND application_name = 'agentqctl'"),
                     "t");
    int64_t t0 = aq_mono_us();
    sql("UPDATE agentq.tasks SET status = 'completed', finished_at = now() WHERE task_id = '" ID_A1 "'");
    int rc = -1;
    while ((rc = aq_test_proc_wait(p, 0)) < 0 && aq_mono_us() - t0 < 5000000) usleep(2000);
    int64_t took_ms = (aq_mono_us() - t0) / 1000;
    ck_assert_int_eq(rc, 0);
    fprintf(stderr, "it_ctl: wait returned %lld ms after the row turned final\n", (long long)took_ms);
    ck_assert_msg(took_ms < 300, "wait returned %lld ms after the row turned final", (long long)took_ms);
    aq_test_proc_free(p);

    /* The connection cut while the row turns final: the notification is
     * lost with it, and the read after the new LISTEN finds the row. */
    task(ID_A2, "u", "running", "1 second", NULL, 0, "0");
    snprintf(log, sizeof log, "%s/wait2.log", E.logdir);
    const char *argv2[] = {aq_test_bin("agentqctl"), "wait", ID_A2, NULL};
    p = aq_test_spawn(argv2, NULL, log);
    await_waiting_session();
    sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'agentqctl';"
        " UPDATE agentq.tasks SET status = 'failed', finished_at = now() WHERE task_id = '" ID_A2 "'");
    rc = aq_test_proc_wait(p, 10000);
    char buf[4096];
    ck_assert_msg(rc == 1, "exit %d: %s", rc, slurp(log, buf, sizeof buf));
    slurp(log, buf, sizeof buf);
    ck_assert_msg(strstr(buf, "lost the database connection") && strstr(buf, ID_A2 " failed"), "%s", buf);
    aq_test_proc_free(p);
    teardown_env();
}
END_TEST

/* ---------------------------------------------------------------- prune */

START_TEST(prune_deletes_old_finished_tasks_and_dead_letters)
{
    setup_env("prune");
    task(ID_A1, "u", "completed", "10 days", "10 days", 2, "0");
    task(ID_A2, "u", "failed", "10 days", "9 days", 1, "0");
    task(ID_B1, "u", "running", "10 days", NULL, 0, "0");
    task(ID_B2, "u", "queued", "10 days", NULL, 0, "0");
    task("c1000000-0000-4000-8000-000000000001", "u", "waiting", "10 days", NULL, 0, "0");
    task("c2000000-0000-4000-8000-000000000002", "u", "completed", "1 hour", "1 hour", 1, "0");
    sql("INSERT INTO agentq.steps (task_id, step, kind) VALUES ('" ID_A1 "', 1, 'llm'), ('" ID_A1 "', 2, 'llm'),"
        " ('" ID_A2 "', 1, 'llm'), ('c2000000-0000-4000-8000-000000000002', 1, 'llm')");
    sql("INSERT INTO agentq.dead_letters (task_id, reason, recorded_at) VALUES"
        " ('" ID_A2 "', 'failed', now() - interval '9 days'), (NULL, 'rejected', now() - interval '30 days'),"
        " (NULL, 'rejected', now() - interval '1 day')");
#define COUNTS "SELECT (SELECT count(*) FROM agentq.tasks) || ' ' || (SELECT count(*) FROM agentq.steps)" \
               " || ' ' || (SELECT count(*) FROM agentq.dead_letters)"

    ck_assert_int_eq(ctl("prune", "--older-than", "7d", "--dry-run"), 0);
    ck_assert_msg(strstr(out(), "would delete 2 tasks (3 steps)") && strstr(out(), "and 2 dead letters"), "%s", out());
    ck_assert_str_eq(value(COUNTS), "6 4 3");

    ck_assert_int_eq(ctl("prune", "--older-than", "7d", "--status", "failed"), 0);
    ck_assert_msg(strstr(out(), "deleted 1 task (1 step)") && strstr(out(), "0 dead letters") &&
                      strstr(out(), "dead letters kept"), "%s", out());
    ck_assert_str_eq(value(COUNTS), "5 3 3");
    ck_assert_str_eq(value("SELECT count(*) FROM agentq.tasks WHERE task_id = '" ID_A2 "'"), "0");

    ck_assert_int_eq(ctl("prune", "--older-than", "1d12h"), 0);
    ck_assert_msg(strstr(out(), "deleted 1 task (2 steps)") && strstr(out(), "2 dead letters") &&
                      strstr(out(), "in 1 batch"), "%s", out());
    ck_assert_str_eq(value(COUNTS), "4 1 1");
    ck_assert_str_eq(value("SELECT string_agg(status, ',' ORDER BY status) FROM agentq.tasks"),
                     "completed,queued,running,waiting");
    ck_assert_str_eq(value("SELECT count(*) FROM agentq.dead_letters WHERE recorded_at > now() - interval '2 days'"),
                     "1");
    ck_assert_int_eq(ctl("prune", "--older-than", "7d"), 0);
    ck_assert_msg(strstr(out(), "deleted 0 tasks"), "%s", out());
    teardown_env();
}
END_TEST

START_TEST(prune_deletes_in_batches_and_is_the_workers_to_call)
{
    setup_env("prunebatch");
#define OLD_ROWS                                                                                                 \
    "INSERT INTO agentq.tasks (task_id, user_id, goal, status, finished_at)"                                     \
    " SELECT gen_random_uuid(), 'u', 'g', 'completed', now() - interval '3 days' FROM generate_series(1, 2500);" \
    " INSERT INTO agentq.steps (task_id, step, kind) SELECT task_id, 1, 'llm' FROM agentq.tasks;"                \
    " INSERT INTO agentq.dead_letters (reason, recorded_at)"                                                     \
    " SELECT 'failed', now() - interval '3 days' FROM generate_series(1, 2500)"
    sql(OLD_ROWS);
    ck_assert_int_eq(ctl("prune", "--older-than", "1d", "--batch", "1000"), 0);
    ck_assert_msg(strstr(out(), "deleted 2500 tasks (2500 steps)") && strstr(out(), "2500 dead letters") &&
                      strstr(out(), "in 3 batches"), "%s", out());
    ck_assert_str_eq(value(COUNTS), "0 0 0");

    /* The function itself: one batch a call, each its own transaction. */
    sql(OLD_ROWS);
    ck_assert_str_eq(value("SELECT tasks || ' ' || steps || ' ' || dead_letters FROM"
                           " agentq.prune(now() - interval '1 day', 1000, NULL, true)"),
                     "2500 2500 2500");
    const char *want[] = {"1000 1000 1000", "1000 1000 1000", "500 500 500", "0 0 0"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(want); i++)
        ck_assert_str_eq(value("SELECT tasks || ' ' || steps || ' ' || dead_letters FROM"
                               " agentq.prune(now() - interval '1 day', 1000)"),
                         want[i]);
    char err[1024];
    ck_assert_int_ne(aq_test_pg_exec(E.dsn, "SELECT * FROM agentq.prune(now(), 10, ARRAY['running'])", err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "'running' is not a final status"), "%s", err);

    /* The writer role may call it; the reader may not. */
    char role[64], *as;
    snprintf(role, sizeof role, "itc_worker_%d", (int)getpid());
    sql("CREATE ROLE %s LOGIN IN ROLE agentq_worker", role);
    as = aq_test_dsn_as(E.dsn, role);
    ck_assert_msg(aq_test_pg_exec(as, "SELECT * FROM agentq.prune(now() - interval '1 day')", err, sizeof err) == 0,
                  "%s", err);
    free(as);
    snprintf(role, sizeof role, "itc_reader_%d", (int)getpid());
    sql("CREATE ROLE %s LOGIN IN ROLE agentq_reader", role);
    as = aq_test_dsn_as(E.dsn, role);
    ck_assert_int_ne(aq_test_pg_exec(as, "SELECT * FROM agentq.prune(now() - interval '1 day')", err, sizeof err), 0);
    ck_assert_msg(strstr(err, "permission denied"), "%s", err);
    free(as);
    teardown_env();
}
END_TEST

/* ------------------------------------------------------- usage and help */

/* Every usage error: exit 2, nothing on stdout, stderr naming the
 * argument at fault (and no server needed: nothing is connected). */
static const struct {
    const char *args[8];
    const char *want;
} bad_usage[] = {
    {{"top", "--interval", "abc"}, "--interval: 'abc' is not a number of seconds"},
    {{"top", "--interval", "0"}, "--interval: '0'"},
    {{"requeue", "--dead", "--limit", "abc"}, "--limit: 'abc' is not a whole number"},
    {{"requeue", "--dead", "--limit", "-3"}, "--limit: '-3'"},
    {{"requeue", ID_A1, "--dead"}, "a task id or --dead, not both"},
    {{"requeue", ID_A1, "--reason", "failed"}, "--reason and --limit go with --dead"},
    {{"requeue"}, "a task id or --dead, one of them"},
    {{"list", "--limit", "0"}, "--limit: '0' is not a whole number from 1"},
    {{"list", "--limit", "10x"}, "--limit: '10x'"},
    {{"list", "--limit"}, "--limit needs a value"},
    {{"list", "--since", "5x"}, "--since: '5x' is neither a duration"},
    {{"list", "--since", "1h1d"}, "--since: '1h1d'"},
    {{"list", "--until", "yesterday"}, "--until: 'yesterday'"},
    {{"list", "--until", "2024-02-30"}, "--until: '2024-02-30'"},
    {{"list", "--status", "done"}, "--status: 'done' is not a status"},
    {{"list", "--json=yes"}, "--json takes no value"},
    {{"list", "--older-than", "7d"}, "unknown option '--older-than' (list takes --status, --user"},
    {{"list", "extra"}, "unexpected argument 'extra'"},
    {{"wait"}, "needs a task id"},
    {{"wait", "not-a-uuid"}, "'not-a-uuid' is not a task id"},
    {{"wait", ID_A1, "--timeout", "-1"}, "--timeout: '-1' is not a number of seconds"},
    {{"wait", ID_A1, "--timeout", "abc"}, "--timeout: 'abc'"},
    {{"wait", ID_A1, "--timeout", "inf"}, "--timeout: 'inf'"},
    {{"prune"}, "--older-than is required"},
    {{"prune", "--older-than", "7"}, "--older-than: '7' is not a duration"},
    {{"prune", "--older-than", "7 days"}, "--older-than: '7 days' is not a duration"},
    {{"prune", "--older-than", "0s"}, "--older-than: '0s': a duration must be longer than 0s"},
    {{"prune", "--older-than", "7d", "--status", "running"}, "--status: 'running' is not a final status"},
    {{"prune", "--older-than", "7d", "--batch", "0"}, "--batch: '0' is not a whole number from 1 to 100000"},
    {{"prune", "--older-than", "7d", "--batch", "abc"}, "--batch: 'abc'"},
    {{"result"}, "needs a task id"},
    {{"result", "42"}, "'42' is not a task id"},
    {{"result", ID_A1, ID_A2}, "unexpected argument '" ID_A2 "'"},
    {{"status", "--limit", "5"}, "unknown option '--limit' (status takes --json)"},
    {{"cancel", ID_A1, "--json"}, "unknown option '--json' (cancel takes no options)"},
    {{"answer", ID_A1}, "needs more arguments (agentqctl answer ID TEXT)"},
    {{"nonsense"}, "unknown command 'nonsense'"},
};

START_TEST(usage_errors_name_the_argument)
{
    snprintf(out_path, sizeof out_path, "/tmp/it_ctl_usage_%d.out", (int)getpid());
    snprintf(err_path, sizeof err_path, "/tmp/it_ctl_usage_%d.err", (int)getpid());
    setenv("AGENTQ_POSTGRES_DSN", "host=127.0.0.1 port=1", 1); /* nothing is reached: no connection tried */
    int rc = ctlv(bad_usage[_i].args);
    char *e = errs();
    ck_assert_msg(rc == 2, "agentqctl %s ...: exit %d, stderr %s", bad_usage[_i].args[0], rc, e);
    ck_assert_msg(strstr(e, bad_usage[_i].want), "agentqctl %s ...: want '%s' in: %s", bad_usage[_i].args[0],
                  bad_usage[_i].want, e);
    ck_assert_str_eq(out(), "");
    unlink(out_path);
    unlink(err_path);
}
END_TEST

START_TEST(help_per_command_names_only_what_applies)
{
    snprintf(out_path, sizeof out_path, "/tmp/it_ctl_help_%d.out", (int)getpid());
    snprintf(err_path, sizeof err_path, "/tmp/it_ctl_help_%d.err", (int)getpid());
    static const struct {
        const char *cmd, *has[6], *lacks[4];
    } cases[] = {
        {"list", {"--status S", "--user U", "--since T", "--until T", "--limit N", "--json"},
         {"--older-than", "--timeout", "--dead", "--batch"}},
        {"prune", {"--older-than DURATION", "--status S", "--dry-run", "--batch N", "agentq.prune", "(default 1000)"},
         {"--json", "--since", "--limit", "--timeout"}},
        {"wait", {"--timeout S", "0 all completed", "4 --timeout", "LISTEN", "unknown", "ID..."},
         {"--json", "--status", "--limit", "--older-than"}},
        {"status", {"--json", "unacked", "amqp.management_url", "3 the broker", "role", "ready"},
         {"--limit", "--timeout", "--older-than", "--status S"}},
        {"result", {"--json", "claim token", "duration", "1 no such task", "provider", "steps"},
         {"--limit", "--timeout", "--since", "--older-than"}},
        {"top", {"--interval S", "(default 2)", "Ctrl-C", "top", "status", "S"}, {"--json", "--limit", "--timeout", "--batch"}},
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(cases); i++) {
        ck_assert_int_eq(ctl(cases[i].cmd, "--help"), 0);
        char *o = out();
        for (int k = 0; k < 6; k++)
            ck_assert_msg(strstr(o, cases[i].has[k]), "%s --help lacks '%s':\n%s", cases[i].cmd, cases[i].has[k], o);
        for (int k = 0; k < 4; k++)
            ck_assert_msg(!strstr(o, cases[i].lacks[k]), "%s --help names '%s':\n%s", cases[i].cmd, cases[i].lacks[k],
                          o);
    }
    ck_assert_int_eq(ctl("--help"), 0);
    const char *all[] = {"migrate", "status", "top", "list", "result", "wait", "cancel", "answer", "requeue", "prune",
                         "4 (wait) timed out"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(all); i++) ck_assert_msg(strstr(out(), all[i]), "--help lacks %s", all[i]);
    unlink(out_path);
    unlink(err_path);
}
END_TEST

int main(void)
{
    const TTest *core[] = {list_filters_table_and_json, result_table_and_json_without_internal_columns,
                           status_json_with_the_management_api, help_per_command_names_only_what_applies};
    const TTest *wait[] = {wait_exit_status_says_how_tasks_ended, wait_does_not_poll_and_reads_again_after_a_reconnect};
    const TTest *prune[] = {prune_deletes_old_finished_tasks_and_dead_letters,
                            prune_deletes_in_batches_and_is_the_workers_to_call};
    const TTest *errors[] = {status_exits_3_naming_the_server_that_is_down};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 60},
        {.name = "wait", .tests = wait, .n_tests = AQ_ARRAY_LEN(wait), .timeout_s = 90},
        {.name = "prune", .tests = prune, .n_tests = AQ_ARRAY_LEN(prune), .timeout_s = 60},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 60,
         .loop_test = usage_errors_name_the_argument, .loops = (int)AQ_ARRAY_LEN(bad_usage)},
    };
    return aq_test_run(aq_test_suite("ctl", tcases, AQ_ARRAY_LEN(tcases)));
}
