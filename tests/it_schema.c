/* it_schema.c — integration suite for the SQL schema and the migrator,
 * against the private PostgreSQL (and a first handshake with the private
 * RabbitMQ) that the `servers` fixture starts. Every test works in a
 * database of its own (aq_test_fresh_db), so tests never see each other's
 * rows; roles are cluster-wide, so role names carry the test's pid. */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include "agentq/log.h"
#include "agentq/migrate.h"
#include "suite.h"
#include "testenv.h"

static char *dsn; /* the current test's migrated database */

/* Number of NNN_*.sql files the migrator should find, counted here
 * independently of migrate.c. */
static int count_sql_files(void)
{
    DIR *d = opendir(aq_migrate_default_dir());
    ck_assert_msg(d != NULL, "cannot open %s", aq_migrate_default_dir());
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len > 8 && de->d_name[0] >= '0' && de->d_name[0] <= '9' &&
            strcmp(de->d_name + len - 4, ".sql") == 0)
            n++;
    }
    closedir(d);
    return n;
}

static void migrated_db(void)
{
    dsn = aq_test_fresh_db("it_schema");
    char err[1024] = "";
    int applied = -1;
    int rc = aq_migrate_apply(dsn, NULL, &applied, err, sizeof err);
    ck_assert_msg(rc == 0, "migrate: %s", err);
    ck_assert_int_eq(applied, count_sql_files());
}

static void drop_dsn(void)
{
    free(dsn);
    dsn = NULL;
}

/* Asserts that `sql` yields `want` as text (NULL: SQL NULL / no row). */
#define assert_sql(sql, want)                                                  \
    do {                                                                       \
        char *got_ = aq_test_pg_value(dsn, (sql));                             \
        const char *want_ = (want);                                            \
        if (want_ == NULL)                                                     \
            ck_assert_msg(got_ == NULL, "%s\n  got '%s', want NULL", (sql),    \
                          got_);                                               \
        else                                                                   \
            ck_assert_msg(got_ && strcmp(got_, want_) == 0,                    \
                          "%s\n  got '%s', want '%s'", (sql),                  \
                          got_ ? got_ : "NULL", want_);                        \
        free(got_);                                                            \
    } while (0)

#define exec_ok(sql)                                                           \
    do {                                                                       \
        char err_[1024] = "";                                                  \
        ck_assert_msg(aq_test_pg_exec(dsn, (sql), err_, sizeof err_) == 0,     \
                      "%s\n  %s", (sql), err_);                                \
    } while (0)

/* ------------------------------------------------------------ core --- */

START_TEST(test_migrate_records_every_version_once)
{
    dsn = aq_test_fresh_db("it_schema_mig");
    int nfiles = count_sql_files();
    ck_assert_int_ge(nfiles, 3);

    char err[1024] = "";
    int applied = -1;
    ck_assert_msg(aq_migrate_apply(dsn, NULL, &applied, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(applied, nfiles);

    char want[16];
    snprintf(want, sizeof want, "%d", nfiles);
    assert_sql("SELECT count(*) FROM agentq.schema_migrations", want);
    assert_sql("SELECT string_agg(version, ',' ORDER BY version) FROM agentq.schema_migrations"
               " WHERE version IN ('001', '002', '003')",
               "001,002,003");
    assert_sql("SELECT count(*) FROM unnest(ARRAY['agentq.tasks', 'agentq.steps',"
               " 'agentq.dead_letters', 'agentq.rate_limits', 'agentq.usage_by_user',"
               " 'agentq.throughput_per_minute', 'agentq.latency_percentiles',"
               " 'agentq.status_counts', 'agentq.dead_letters_text']) AS t(n)"
               " WHERE to_regclass(n) IS NOT NULL",
               "9");

    applied = -1;
    ck_assert_msg(aq_migrate_apply(dsn, NULL, &applied, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(applied, 0);
    assert_sql("SELECT count(*) FROM agentq.schema_migrations", want);

    aq_migration *list = NULL;
    size_t n = 0;
    ck_assert_msg(aq_migrate_status(dsn, NULL, &list, &n, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(n, (size_t)nfiles);
    ck_assert_str_eq(list[0].version, "001");
    ck_assert_str_eq(list[0].file, "001_schema.sql");
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(list[i].applied, "%s not applied", list[i].version);
        ck_assert_ptr_nonnull(list[i].applied_at);
        ck_assert_msg(!list[i].changed, "%s reported changed", list[i].version);
    }
    aq_migrate_list_free(list, n);
    drop_dsn();
}
END_TEST

START_TEST(test_status_lists_pending_on_a_new_database)
{
    dsn = aq_test_fresh_db("it_schema_new");
    aq_migration *list = NULL;
    size_t n = 0;
    char err[1024] = "";
    ck_assert_msg(aq_migrate_status(dsn, NULL, &list, &n, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(n, (size_t)count_sql_files());
    for (size_t i = 0; i < n; i++) {
        ck_assert(!list[i].applied);
        ck_assert_ptr_null(list[i].applied_at);
    }
    aq_migrate_list_free(list, n);
    drop_dsn();
}
END_TEST

START_TEST(test_task_row_round_trips)
{
    migrated_db();
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, priority, status, attempt,"
            " max_steps, budget_usd, timeout_seconds, model, steps, prompt_tokens,"
            " completion_tokens, cost_usd, result, error, worker_id, metadata, enqueued_at,"
            " started_at, finished_at, updated_at, cancel_requested) VALUES ("
            " '6f1c2b8e-3d4a-4b5c-9d6e-7f8091a2b3c4', 'alice', 'Résumé the ☃ report', 7,"
            " 'completed', 2, 15, 0.5, 60.25, 'gpt-4o-mini', 3, 1234567890123, 42,"
            " 0.01234567, 'the answer', 'none', 'worker-1', '{\"k\": [1, 2], \"s\": \"x\"}',"
            " '2024-01-02 03:04:05.123456+00', '2024-01-02 03:04:06+00',"
            " '2024-01-02 03:05:00.5+00', '2024-01-02 03:05:01+00', true)");
    assert_sql("SET TIME ZONE 'UTC';"
               " SELECT concat_ws('|', task_id, user_id, goal, priority, status, attempt,"
               " max_steps, budget_usd, timeout_seconds, model, steps, prompt_tokens,"
               " completion_tokens, cost_usd, result, error, worker_id, metadata, enqueued_at,"
               " started_at, finished_at, updated_at, cancel_requested)"
               " FROM agentq.tasks",
               "6f1c2b8e-3d4a-4b5c-9d6e-7f8091a2b3c4|alice|Résumé the ☃ report|7|completed|2|"
               "15|0.500000|60.25|gpt-4o-mini|3|1234567890123|42|0.01234567|the answer|none|"
               "worker-1|{\"k\": [1, 2], \"s\": \"x\"}|2024-01-02 03:04:05.123456+00|"
               "2024-01-02 03:04:06+00|2024-01-02 03:05:00.5+00|2024-01-02 03:05:01+00|t");

    /* The defaults a worker relies on when it inserts only what it knows. */
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
            " VALUES ('00000000-0000-0000-0000-000000000002', 'bob', 'g', 'queued')");
    assert_sql("SELECT concat_ws('|', priority, attempt, steps, prompt_tokens, completion_tokens,"
               " cost_usd, cancel_requested, updated_at IS NOT NULL) FROM agentq.tasks"
               " WHERE user_id = 'bob'",
               "0|1|0|0|0|0.00000000|f|t");

    /* updated_at follows every update. */
    exec_ok("UPDATE agentq.tasks SET status = 'running'"
            " WHERE task_id = '6f1c2b8e-3d4a-4b5c-9d6e-7f8091a2b3c4'");
    assert_sql("SELECT updated_at > '2024-01-02 03:05:01+00' FROM agentq.tasks"
               " WHERE task_id = '6f1c2b8e-3d4a-4b5c-9d6e-7f8091a2b3c4'",
               "t");
    drop_dsn();
}
END_TEST

START_TEST(test_steps_and_dead_letters_store_what_workers_write)
{
    migrated_db();
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
            " VALUES ('00000000-0000-0000-0000-000000000001', 'u', 'g', 'running')");
    exec_ok("INSERT INTO agentq.steps (task_id, attempt, step, kind, name, status, started_at,"
            " duration_ms, prompt_tokens, completion_tokens, cost_usd, detail) VALUES"
            " ('00000000-0000-0000-0000-000000000001', 1, 1, 'llm', 'gpt', 'ok', now(), 812.5,"
            "  100, 20, 0.0001, '{\"finish\": \"tool_calls\"}'),"
            " ('00000000-0000-0000-0000-000000000001', 1, 1, 'tool', 'calculator', 'ok', now(),"
            "  0.25, NULL, NULL, NULL, '{\"args\": \"1+1\"}')");
    assert_sql("SELECT string_agg(kind || ':' || name, ',' ORDER BY id) FROM agentq.steps"
               " WHERE task_id = '00000000-0000-0000-0000-000000000001' AND attempt = 1",
               "llm:gpt,tool:calculator");
    /* Steps go with their task. */
    exec_ok("DELETE FROM agentq.tasks WHERE task_id = '00000000-0000-0000-0000-000000000001'");
    assert_sql("SELECT count(*) FROM agentq.steps", "0");

    /* A body that is not UTF-8 is kept byte for byte; the text view shows
     * it as NULL instead of failing the whole query. */
    exec_ok("INSERT INTO agentq.dead_letters (reason, error, body, headers) VALUES"
            " ('rejected', 'not JSON', '\\xff00fe41'::bytea, '{\"x-death\": []}'),"
            " ('rejected', 'missing field user_id', convert_to('{\"goal\": \"ü\"}', 'UTF8'),"
            "  NULL)");
    assert_sql("SELECT encode(body, 'hex') FROM agentq.dead_letters WHERE error = 'not JSON'",
               "ff00fe41");
    assert_sql("SELECT coalesce(body_text, '<null>') FROM agentq.dead_letters_text"
               " WHERE error = 'not JSON'",
               "<null>");
    assert_sql("SELECT body_text FROM agentq.dead_letters_text"
               " WHERE error = 'missing field user_id'",
               "{\"goal\": \"ü\"}");
    assert_sql("SELECT count(*) FROM agentq.dead_letters"
               " WHERE recorded_at IS NOT NULL AND requeued_at IS NULL AND task_id IS NULL",
               "2");
    drop_dsn();
}
END_TEST

/* Rows whose counts and latencies are known: alice 2 completed + 1
 * failed, bob 1 running + 1 timeout, all within the last hour; carol 1
 * completed two days ago (only in the `all` period). */
static void insert_view_rows(void)
{
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status, prompt_tokens,"
            " completion_tokens, cost_usd, enqueued_at, started_at, finished_at)"
            " SELECT v.id::uuid, v.u, 'g', v.st, v.pt, v.ct, v.cost,"
            "        b.t, b.t + v.wait * interval '1 s',"
            "        b.t + (v.wait + v.run) * interval '1 s'"
            "   FROM (SELECT date_trunc('minute', now()) - interval '30 min' AS t) b,"
            "        (VALUES ('00000000-0000-0000-0000-00000000000a', 'alice', 'completed',"
            "                 100, 50, 0.01, 1, 10),"
            "                ('00000000-0000-0000-0000-00000000000b', 'alice', 'completed',"
            "                 200, 100, 0.02, 2, 20),"
            "                ('00000000-0000-0000-0000-00000000000c', 'alice', 'failed',"
            "                 10, 0, 0.001, 3, 30),"
            "                ('00000000-0000-0000-0000-00000000000d', 'bob', 'timeout',"
            "                 5, 5, 0.002, 5, 60))"
            "        AS v(id, u, st, pt, ct, cost, wait, run)");
    /* bob's running task: started, not finished. */
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status, enqueued_at, started_at)"
            " SELECT '00000000-0000-0000-0000-00000000000e', 'bob', 'g', 'running',"
            "        t, t + interval '4 s'"
            "   FROM (SELECT date_trunc('minute', now()) - interval '30 min' AS t) b");
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status, prompt_tokens,"
            " completion_tokens, cost_usd, enqueued_at, started_at, finished_at)"
            " VALUES ('00000000-0000-0000-0000-00000000000f', 'carol', 'g', 'completed', 1, 1,"
            " 0.5, now() - interval '2 days', now() - interval '2 days' + interval '100 s',"
            " now() - interval '2 days' + interval '1100 s')");
}

START_TEST(test_views_count_what_was_inserted)
{
    migrated_db();
    insert_view_rows();
    assert_sql("SELECT string_agg(concat_ws(',', user_id, tasks, completed, failed, in_flight,"
               " tokens, cost_usd), ';' ORDER BY user_id) FROM agentq.usage_by_user",
               "alice,3,2,1,0,460,0.03100000;bob,2,0,1,1,10,0.00200000;"
               "carol,1,1,0,0,2,0.50000000");

    /* alice's three finished in the same minute (base + 11/22/33 s), bob's
     * timeout in the next (base + 65 s). */
    assert_sql("SELECT string_agg(concat_ws(',', minute - (date_trunc('minute', now())"
               " - interval '30 min'), status, tasks), ';' ORDER BY minute, status)"
               " FROM agentq.throughput_per_minute WHERE minute > now() - interval '1 hour'",
               "00:00:00,completed,2;00:00:00,failed,1;00:01:00,timeout,1");
    assert_sql("SELECT sum(tasks) FROM agentq.throughput_per_minute", "5");

    /* Waits 1,2,3,5 and 4 (running) s; runs 10,20,30,60 s; carol adds a
     * 100 s wait and a 1000 s run to `all` only. */
    assert_sql("SELECT string_agg(concat_ws(',', period, started,"
               " round(queue_wait_p50_s::numeric, 2), finished,"
               " round(run_time_p50_s::numeric, 2), round(run_time_p95_s::numeric, 2)), ';')"
               " FROM agentq.latency_percentiles WHERE period = 'last_hour'",
               "last_hour,5,3.00,4,25.00,55.50");
    /* `all` reads 1 % buckets: within 1 % of percentile_cont's 3.5, 30
     * and 812 (60 + 0.8 * (1000 - 60)). */
    assert_sql("SELECT concat_ws(',', started, finished, abs(queue_wait_p50_s / 3.5 - 1) < 0.01,"
               " abs(run_time_p50_s / 30 - 1) < 0.01, abs(run_time_p95_s / 812 - 1) < 0.01)"
               " FROM agentq.latency_percentiles WHERE period = 'all'",
               "6,5,t,t,t");
    assert_sql("SELECT string_agg(period, ',') FROM agentq.latency_percentiles", "last_hour,all");
    assert_sql("SELECT queue_wait_p99_s BETWEEN 4.9 AND 5 FROM agentq.latency_percentiles"
               " WHERE period = 'last_hour'",
               "t");

    assert_sql("SELECT string_agg(status || '=' || tasks, ',' ORDER BY status)"
               " FROM agentq.status_counts WHERE tasks > 0",
               "completed=3,failed=1,running=1,timeout=1");
    assert_sql("SELECT count(*) || '/' || count(*) FILTER (WHERE final)"
               " FROM agentq.status_counts",
               "12/8");
    drop_dsn();
}
END_TEST

START_TEST(test_take_tokens_refills_and_takes)
{
    migrated_db();
    exec_ok("SELECT agentq.define_bucket('b', 10, 0)");
    assert_sql("SELECT agentq.take_tokens('b', 4)", "4");
    /* Partial grants are whole tokens; fractional wants are met in full. */
    assert_sql("SELECT agentq.take_tokens('b', 2.5)", "2.5");
    assert_sql("SELECT agentq.take_tokens('b', 10)", "3");
    assert_sql("SELECT agentq.take_tokens('b', 1)", "0");
    assert_sql("SELECT tokens < 1 AND tokens >= 0 FROM agentq.rate_limits WHERE name = 'b'", "t");
    assert_sql("SELECT agentq.take_tokens('b', -5)", "0");
    assert_sql("SELECT agentq.take_tokens('nope', 1)", NULL);

    /* Refill at 5/s: a second's worth after one second... */
    exec_ok("SELECT agentq.define_bucket('r', 10, 5)");
    assert_sql("SELECT agentq.take_tokens('r', 10)", "10");
    exec_ok("UPDATE agentq.rate_limits SET updated_at = clock_timestamp() - interval '1 s'"
            " WHERE name = 'r'");
    assert_sql("SELECT agentq.take_tokens('r', 10)", "5");
    /* ...and never beyond the capacity after a long idle time. */
    exec_ok("UPDATE agentq.rate_limits SET updated_at = now() - interval '1 hour'"
            " WHERE name = 'r'");
    assert_sql("SELECT agentq.take_tokens('r', 3)", "3");
    assert_sql("SELECT tokens BETWEEN 7 AND 7.01 FROM agentq.rate_limits WHERE name = 'r'", "t");

    /* Redefining keeps the tokens, capped at the new capacity. */
    exec_ok("SELECT agentq.define_bucket('r', 2, 5)");
    assert_sql("SELECT tokens || '/' || capacity FROM agentq.rate_limits WHERE name = 'r'",
               "2/2");

    /* A pause (429 Retry-After) grants nothing until it ends, then the
     * bucket refills from empty. */
    exec_ok("SELECT agentq.define_bucket('p', 10, 1000)");
    exec_ok("SELECT agentq.pause_bucket('p', now() + interval '1 hour')");
    assert_sql("SELECT agentq.take_tokens('p', 1)", "0");
    exec_ok("SELECT agentq.pause_bucket('p', now() + interval '1 minute')");
    assert_sql("SELECT paused_until > now() + interval '59 minutes' FROM agentq.rate_limits"
               " WHERE name = 'p'",
               "t");
    exec_ok("UPDATE agentq.rate_limits SET paused_until = now() - interval '1 s',"
            " updated_at = now() - interval '1 s' WHERE name = 'p'");
    assert_sql("SELECT agentq.take_tokens('p', 5)", "5");

    /* Leased tokens given back, up to the capacity. */
    exec_ok("SELECT agentq.define_bucket('g', 10, 0)");
    assert_sql("SELECT agentq.take_tokens('g', 8)", "8");
    assert_sql("SELECT agentq.return_tokens('g', 3)", "5");
    assert_sql("SELECT agentq.return_tokens('g', 100)", "10");
    drop_dsn();
}
END_TEST

/* The next notification on `conn` within `ms` milliseconds, or NULL
 * (caller frees with PQfreemem). */
static PGnotify *wait_notify(PGconn *conn, int ms)
{
    for (int waited = 0;; waited += 50) {
        ck_assert_int_eq(PQconsumeInput(conn), 1);
        PGnotify *n = PQnotifies(conn);
        if (n || waited >= ms)
            return n;
        struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
        (void)poll(&pfd, 1, 50);
    }
}

START_TEST(test_cancel_request_notifies_listeners)
{
    migrated_db();
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
            " VALUES ('00000000-0000-0000-0000-0000000000cc', 'u', 'g', 'running')");
    PGconn *listener = PQconnectdb(dsn);
    ck_assert_int_eq(PQstatus(listener), CONNECTION_OK);
    PGresult *res = PQexec(listener, "LISTEN agentq_cancel");
    ck_assert_int_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);

    exec_ok("UPDATE agentq.tasks SET cancel_requested = true"
            " WHERE task_id = '00000000-0000-0000-0000-0000000000cc'");
    /* A second request for the same task does not notify again. */
    exec_ok("UPDATE agentq.tasks SET cancel_requested = true"
            " WHERE task_id = '00000000-0000-0000-0000-0000000000cc'");

    PGnotify *n = wait_notify(listener, 5000);
    ck_assert_ptr_nonnull(n);
    ck_assert_str_eq(n->relname, "agentq_cancel");
    ck_assert_str_eq(n->extra, "00000000-0000-0000-0000-0000000000cc");
    PQfreemem(n);
    ck_assert_ptr_null(wait_notify(listener, 300));
    PQfinish(listener);
    drop_dsn();
}
END_TEST

/* agentq_final (016's contract, sent by 018's trigger): once for a row
 * inserted final and once each time a row becomes final; not for a
 * final row that changes again, nor for a requeue. */
START_TEST(test_final_status_notifies_listeners)
{
    migrated_db();
    PGconn *listener = PQconnectdb(dsn);
    ck_assert_int_eq(PQstatus(listener), CONNECTION_OK);
    PGresult *res = PQexec(listener, "LISTEN agentq_final");
    ck_assert_int_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);

    static const struct {
        const char *sql, *notified; /* the task_id, or NULL: none */
    } steps[] = {
        {"INSERT INTO agentq.tasks (task_id, user_id, goal, status, finished_at)"
         " VALUES ('00000000-0000-0000-0000-0000000000f1', 'u', 'g', 'rejected', now())",
         "00000000-0000-0000-0000-0000000000f1"},
        {"INSERT INTO agentq.tasks (task_id, user_id, goal, status, started_at)"
         " VALUES ('00000000-0000-0000-0000-0000000000f2', 'u', 'g', 'running', now())",
         NULL},
        {"UPDATE agentq.tasks SET steps = 3 WHERE task_id = '00000000-0000-0000-0000-0000000000f2'", NULL},
        {"UPDATE agentq.tasks SET status = 'completed', finished_at = now()"
         " WHERE task_id = '00000000-0000-0000-0000-0000000000f2'",
         "00000000-0000-0000-0000-0000000000f2"},
        {"UPDATE agentq.tasks SET cost_usd = 1 WHERE task_id = '00000000-0000-0000-0000-0000000000f2'", NULL},
        {"UPDATE agentq.tasks SET status = 'queued', finished_at = NULL"
         " WHERE task_id = '00000000-0000-0000-0000-0000000000f2'",
         NULL},
        {"UPDATE agentq.tasks SET status = 'failed', finished_at = now()"
         " WHERE task_id = '00000000-0000-0000-0000-0000000000f2'",
         "00000000-0000-0000-0000-0000000000f2"},
        {"DELETE FROM agentq.tasks WHERE task_id = '00000000-0000-0000-0000-0000000000f1'", NULL},
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(steps); i++) {
        exec_ok(steps[i].sql);
        PGnotify *n = wait_notify(listener, steps[i].notified ? 5000 : 300);
        if (steps[i].notified) {
            ck_assert_msg(n != NULL, "no notification after %s", steps[i].sql);
            ck_assert_str_eq(n->relname, "agentq_final");
            ck_assert_str_eq(n->extra, steps[i].notified);
            PQfreemem(n);
            n = wait_notify(listener, 300);
        }
        ck_assert_msg(n == NULL, "a notification too many after %s: %s", steps[i].sql, n ? n->extra : "");
    }
    PQfinish(listener);
    drop_dsn();
}
END_TEST

/* sql/015_providers.sql: the provider column, the cache's table, its
 * running total and the functions, with the signatures the store and the
 * fleet limiter call. */
START_TEST(test_provider_objects_exist)
{
    migrated_db();
    assert_sql("SELECT format_type(atttypid, atttypmod) || ',' || NOT attnotnull FROM pg_attribute"
               " WHERE attrelid = 'agentq.steps'::regclass AND attname = 'provider'",
               "text,true");
    assert_sql("SELECT col_description('agentq.steps'::regclass,"
               " (SELECT attnum FROM pg_attribute WHERE attrelid = 'agentq.steps'::regclass"
               "  AND attname = 'provider')) LIKE '%cache%'",
               "t");
    assert_sql("SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod)"
               " || CASE WHEN attnotnull THEN '!' ELSE '' END, ',' ORDER BY attnum)"
               " FROM pg_attribute WHERE attrelid = 'agentq.llm_cache'::regclass AND attnum > 0"
               " AND NOT attisdropped",
               "key:bytea!,model:text,response:text!,bytes:integer,hits:bigint!,"
               "created_at:timestamp with time zone!,expires_at:timestamp with time zone!");
    assert_sql("SELECT string_agg(indexdef, ';' ORDER BY indexname) FROM pg_indexes"
               " WHERE schemaname = 'agentq' AND tablename = 'llm_cache' AND indexname <> 'llm_cache_pkey'",
               "CREATE INDEX llm_cache_created_idx ON agentq.llm_cache USING btree (created_at);"
               "CREATE INDEX llm_cache_expires_idx ON agentq.llm_cache USING btree (expires_at)");
    assert_sql("SELECT bytes FROM agentq.llm_cache_size", "0");
    assert_sql("SELECT string_agg(to_regprocedure(f)::text || '->' ||"
               " pg_get_function_result(to_regprocedure(f)), ';')"
               " FROM unnest(ARRAY['agentq.cache_get(text)',"
               " 'agentq.cache_put(text, text, text, integer, bigint)',"
               " 'agentq.clamp_bucket(text, double precision)',"
               " 'agentq.pause_bucket(text, timestamptz)']) AS f",
               "agentq.cache_get(text)->text;"
               "agentq.cache_put(text,text,text,integer,bigint)->void;"
               "agentq.clamp_bucket(text,double precision)->double precision;"
               "agentq.pause_bucket(text,timestamp with time zone)->timestamp with time zone");
    drop_dsn();
}
END_TEST

/* The response under request `req` as the cache holds it: "resp/hits". */
#define CACHE_ROW(req)                                                         \
    "SELECT response || '/' || hits FROM agentq.llm_cache"                     \
    " WHERE key = sha256(convert_to(" req ", 'UTF8'))"

START_TEST(test_cache_get_and_put)
{
    migrated_db();
    /* A miss, then a put and its hits. */
    assert_sql("SELECT agentq.cache_get('{\"q\": 1}')", NULL);
    exec_ok("SELECT agentq.cache_put('{\"q\": 1}', 'm-1', '{\"a\": \"☃\"}', 60, 1000)");
    assert_sql("SELECT agentq.cache_get('{\"q\": 1}')", "{\"a\": \"☃\"}");
    assert_sql("SELECT agentq.cache_get('{\"q\": 1}')", "{\"a\": \"☃\"}");
    assert_sql(CACHE_ROW("'{\"q\": 1}'"), "{\"a\": \"☃\"}/2");
    assert_sql("SELECT model || ',' || bytes || ',' || (expires_at - created_at)"
               " FROM agentq.llm_cache", "m-1,12,00:01:00");
    /* The key is the request's sha256, to the byte. */
    assert_sql("SELECT agentq.cache_get('{\"q\":1}')", NULL);

    /* A second put of a live key is no error and keeps the first answer
     * (another worker may have served it already) and its hits. */
    exec_ok("SELECT agentq.cache_put('{\"q\": 1}', 'm-2', 'second', 60, 1000)");
    assert_sql(CACHE_ROW("'{\"q\": 1}'"), "{\"a\": \"☃\"}/2");

    /* An expired row is a miss (and no hit), and the next put replaces it. */
    exec_ok("UPDATE agentq.llm_cache SET expires_at = now() - interval '1 s'");
    assert_sql("SELECT agentq.cache_get('{\"q\": 1}')", NULL);
    assert_sql(CACHE_ROW("'{\"q\": 1}'"), "{\"a\": \"☃\"}/2");
    exec_ok("SELECT agentq.cache_put('{\"q\": 1}', 'm-2', 'second', 60, 1000)");
    assert_sql(CACHE_ROW("'{\"q\": 1}'"), "second/0");
    assert_sql("SELECT agentq.cache_get('{\"q\": 1}')", "second");
    assert_sql("SELECT bytes FROM agentq.llm_cache_size", "6");

    /* Nothing stored: no TTL, a response larger than the bound, NULLs. */
    exec_ok("SELECT agentq.cache_put('t0', 'm', 'x', 0, 1000),"
            " agentq.cache_put('big', 'm', repeat('x', 1001), 60, 1000),"
            " agentq.cache_put(NULL, 'm', 'x', 60, 1000), agentq.cache_put('n', 'm', NULL, 60, 1000)");
    assert_sql("SELECT count(*) FROM agentq.llm_cache", "1");
    /* A NULL model is allowed. */
    exec_ok("SELECT agentq.cache_put('nomodel', NULL, 'x', 60, 1000)");
    assert_sql("SELECT agentq.cache_get('nomodel')", "x");
    drop_dsn();
}
END_TEST

/* The byte bound: a put that goes over it evicts expired rows first, then
 * the oldest, only as many as it takes; the running total stays the sum,
 * also under deletes and TRUNCATE by hand. */
START_TEST(test_cache_bound_evicts_expired_then_oldest)
{
    migrated_db();
    /* Five rows of 10 bytes, r1 the oldest; a bound of 50 holds them. */
    for (int i = 1; i <= 5; i++) {
        char sql[256];
        snprintf(sql, sizeof sql,
                 "SELECT agentq.cache_put('r%d', 'm', 'response-%d', 60, 50);"
                 " UPDATE agentq.llm_cache SET created_at = now() - interval '1 hour' * (10 - %d)"
                 " WHERE key = sha256(convert_to('r%d', 'UTF8'))",
                 i, i, i, i);
        exec_ok(sql);
    }
    assert_sql("SELECT count(*) || '/' || sum(bytes) || '/' || (SELECT bytes FROM agentq.llm_cache_size)"
               " FROM agentq.llm_cache", "5/50/50");
    /* r6 (10 bytes) at 50: the oldest, r1, goes. */
    exec_ok("SELECT agentq.cache_put('r6', 'm', 'response-6', 60, 50)");
    assert_sql("SELECT string_agg(response, ',' ORDER BY response) FROM agentq.llm_cache",
               "response-2,response-3,response-4,response-5,response-6");
    /* An expired row goes before any older live one. */
    exec_ok("UPDATE agentq.llm_cache SET expires_at = now() - interval '1 s'"
            " WHERE key = sha256(convert_to('r4', 'UTF8'))");
    exec_ok("SELECT agentq.cache_put('r7', 'm', 'response-7', 60, 50)");
    assert_sql("SELECT string_agg(response, ',' ORDER BY response) FROM agentq.llm_cache",
               "response-2,response-3,response-5,response-6,response-7");
    /* A put of 25 bytes at 50 takes three rows, the oldest three. */
    exec_ok("SELECT agentq.cache_put('r8', 'm', repeat('8', 25), 60, 50)");
    assert_sql("SELECT string_agg(left(response, 10), ',' ORDER BY response) FROM agentq.llm_cache",
               "8888888888,response-6,response-7");
    assert_sql("SELECT sum(bytes) || '/' || (SELECT bytes FROM agentq.llm_cache_size)"
               " FROM agentq.llm_cache", "45/45");
    /* A smaller bound (another worker's configuration) trims to it, and
     * never evicts the row just put. */
    exec_ok("SELECT agentq.cache_put('r9', 'm', 'response-9', 60, 12)");
    assert_sql("SELECT string_agg(response, ',') FROM agentq.llm_cache", "response-9");
    assert_sql("SELECT bytes FROM agentq.llm_cache_size", "10");

    /* The total follows deletes and TRUNCATE made by hand. */
    exec_ok("SELECT agentq.cache_put('a', 'm', 'aaaa', 60, 100), agentq.cache_put('b', 'm', 'bbbbbb', 60, 100)");
    assert_sql("SELECT bytes FROM agentq.llm_cache_size", "20");
    exec_ok("DELETE FROM agentq.llm_cache WHERE response IN ('aaaa', 'response-9')");
    assert_sql("SELECT bytes FROM agentq.llm_cache_size", "6");
    exec_ok("TRUNCATE agentq.llm_cache");
    assert_sql("SELECT bytes FROM agentq.llm_cache_size", "0");
    drop_dsn();
}
END_TEST

START_TEST(test_clamp_bucket_lowers_and_never_raises)
{
    migrated_db();
    exec_ok("SELECT agentq.define_bucket('c', 10, 0)");
    assert_sql("SELECT agentq.clamp_bucket('c', 4)", "4");
    assert_sql("SELECT agentq.clamp_bucket('c', 8)", "4"); /* never raises */
    assert_sql("SELECT agentq.take_tokens('c', 10)", "4");
    assert_sql("SELECT agentq.clamp_bucket('c', -3)", "0");
    assert_sql("SELECT agentq.clamp_bucket('nope', 1)", NULL);
    /* It refills first, as take_tokens would: 1/s for five seconds (the
     * upper bounds leave a second for slow connections). */
    exec_ok("SELECT agentq.define_bucket('r', 10, 1)");
    assert_sql("SELECT agentq.take_tokens('r', 10)", "10");
    exec_ok("UPDATE agentq.rate_limits SET updated_at = clock_timestamp() - interval '5 s'"
            " WHERE name = 'r'");
    assert_sql("SELECT agentq.clamp_bucket('r', 100) BETWEEN 5 AND 6", "t");
    assert_sql("SELECT agentq.clamp_bucket('r', 3)", "3");
    assert_sql("SELECT tokens FROM agentq.rate_limits WHERE name = 'r'", "3");
    /* NULL only refills; a paused bucket stays empty until its pause ends. */
    assert_sql("SELECT agentq.clamp_bucket('r', NULL) BETWEEN 3 AND 4", "t");
    exec_ok("SELECT agentq.pause_bucket('r', now() + interval '1 hour')");
    assert_sql("SELECT agentq.clamp_bucket('r', 100)", "0");
    assert_sql("SELECT updated_at > now() + interval '59 minutes' FROM agentq.rate_limits"
               " WHERE name = 'r'", "t");
    drop_dsn();
}
END_TEST

/* A pause tells every worker at once: agentq_limits, '<name> <epoch>'. */
START_TEST(test_pause_bucket_notifies_limits)
{
    migrated_db();
    exec_ok("SELECT agentq.define_bucket('fleet llm', 10, 1)");
    PGconn *listener = PQconnectdb(dsn);
    ck_assert_int_eq(PQstatus(listener), CONNECTION_OK);
    PGresult *res = PQexec(listener, "LISTEN agentq_limits");
    ck_assert_int_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);

    assert_sql("SELECT extract(epoch FROM agentq.pause_bucket('fleet llm',"
               " timestamptz '2100-01-01 00:00:00.5+00'))",
               "4102444800.500000");
    PGnotify *n = wait_notify(listener, 5000);
    ck_assert_ptr_nonnull(n);
    ck_assert_str_eq(n->relname, "agentq_limits");
    ck_assert_str_eq(n->extra, "fleet llm 4102444800.500000");
    PQfreemem(n);
    /* 001's semantics: a shorter pause keeps the longer one, which is
     * what it announces; a bucket that does not exist announces nothing. */
    assert_sql("SELECT agentq.pause_bucket('fleet llm', now() + interval '1 minute')",
               "2100-01-01 00:00:00.5+00");
    n = wait_notify(listener, 5000);
    ck_assert_ptr_nonnull(n);
    ck_assert_str_eq(n->extra, "fleet llm 4102444800.500000");
    PQfreemem(n);
    assert_sql("SELECT agentq.pause_bucket('nope', now())", NULL);
    assert_sql("SELECT tokens || ',' || (updated_at = paused_until) FROM agentq.rate_limits", "0,true");
    ck_assert_ptr_null(wait_notify(listener, 300));
    PQfinish(listener);
    drop_dsn();
}
END_TEST

START_TEST(test_worker_role_can_write)
{
    migrated_db();
    char sql[512], user[64];
    snprintf(user, sizeof user, "it_worker_%ld", (long)getpid());
    snprintf(sql, sizeof sql, "CREATE ROLE %s LOGIN IN ROLE agentq_worker", user);
    exec_ok(sql);
    char *super = dsn;
    dsn = aq_test_dsn_as(super, user);

    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
            " VALUES ('00000000-0000-0000-0000-000000000077', 'u', 'g', 'queued')");
    exec_ok("UPDATE agentq.tasks SET status = 'running', attempt = 2"
            " WHERE task_id = '00000000-0000-0000-0000-000000000077'");
    exec_ok("INSERT INTO agentq.steps (task_id, step, kind)"
            " VALUES ('00000000-0000-0000-0000-000000000077', 1, 'llm')");
    exec_ok("INSERT INTO agentq.dead_letters (reason, body) VALUES ('expired', 'x')");
    exec_ok("SELECT agentq.define_bucket('w', 5, 1)");
    assert_sql("SELECT agentq.take_tokens('w', 2)", "2");
    assert_sql("SELECT count(*) FROM agentq.usage_by_user", "1");
    /* Ending the task appends its roll-up row, which the worker may fold. */
    exec_ok("UPDATE agentq.tasks SET status = 'completed', finished_at = now()"
            " WHERE task_id = '00000000-0000-0000-0000-000000000077'");
    assert_sql("SELECT agentq.rollups_flush()", "1");
    assert_sql("SELECT completed FROM agentq.usage_by_user", "1");
    exec_ok("UPDATE agentq.steps SET provider = 'openai'"
            " WHERE task_id = '00000000-0000-0000-0000-000000000077'");
    /* The cache and the limits of sql/015_providers.sql. */
    exec_ok("SELECT agentq.cache_put('req', 'm', 'resp', 60, 100)");
    assert_sql("SELECT agentq.cache_get('req')", "resp");
    exec_ok("DELETE FROM agentq.llm_cache");
    assert_sql("SELECT agentq.clamp_bucket('w', 1)", "1");
    assert_sql("SELECT agentq.pause_bucket('w', now()) IS NOT NULL", "t");

    char err[1024] = "";
    ck_assert_int_ne(aq_test_pg_exec(dsn, "CREATE TABLE agentq.mine (x int)", err, sizeof err), 0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    ck_assert_int_ne(aq_test_pg_exec(dsn, "DELETE FROM agentq.schema_migrations", err,
                                     sizeof err), 0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    free(dsn);
    dsn = super;
    drop_dsn();
}
END_TEST

/* Runs `sql` on the thread's own connection; false, with the server's
 * message in `err`, when it fails. */
static bool exec_on(PGconn *c, const char *sql, char *err, size_t errlen)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    bool ok = st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
    if (!ok)
        snprintf(err, errlen, "%s", PQresultErrorMessage(r));
    PQclear(r);
    return ok;
}

/* --------------------------------------------------------- rollups --- */

/* sql/018_rollups.sql keeps the views on roll-ups. What they must say is
 * what the whole-history queries they replaced say:
 * tests/sql/views_oracle.sql defines those (schema agentq_oracle) and a
 * view, agentq_oracle.diff, counting the rows where each view differs. */
static void load_oracle(void)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/sql/views_oracle.sql", AGENTQ_SOURCE_DIR);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    static char text[16384];
    size_t n = fread(text, 1, sizeof text - 1, f);
    ck_assert_msg(feof(f), "%s is over %zu bytes", path, sizeof text - 1);
    fclose(f);
    text[n] = '\0';
    exec_ok(text);
}

#define DIFF_SQL "SELECT string_agg(view || '=' || n, ' ' ORDER BY view) FROM agentq_oracle.diff"
#define NO_DIFF                                                                \
    "latency_percentiles=0 status_counts=0 throughput_per_minute=0 usage_by_user=0"

/* `n` tasks of 12 users as the fleet writes them: inserted queued, claimed
 * (running, started_at), then most ended, each in its own statement, so
 * the triggers see the updates the worker makes. Waits from -0.5 s (a
 * producer's clock ahead) through under 1 ms to 20 s; a tenth still
 * running, a tenth queued. */
static void load_history(int n)
{
    char sql[4096];
    snprintf(sql, sizeof sql,
             "SELECT setseed(0.25);"
             "INSERT INTO agentq.tasks (task_id, user_id, goal, status, enqueued_at)"
             " SELECT md5('t' || i)::uuid, 'user-' || (i * 7 %% 12), 'g', 'queued',"
             "        now() - (3 * 3600 - i * 10800.0 / %d) * interval '1 s'"
             "   FROM generate_series(1, %d) i;"
             "UPDATE agentq.tasks SET status = 'running', attempt = 1,"
             "       started_at = enqueued_at + (CASE WHEN random() < 0.05 THEN -0.5"
             "                                        WHEN random() < 0.1 THEN 0.0004"
             "                                        ELSE random() * 20 END) * interval '1 s'"
             " WHERE random() < 0.9;"
             "UPDATE agentq.tasks SET steps = 1 + (random() * 6)::int,"
             "       prompt_tokens = (random() * 5000)::int, completion_tokens = (random() * 500)::int,"
             "       cost_usd = round((random() * 0.02)::numeric, 8)"
             " WHERE status = 'running';"
             "UPDATE agentq.tasks SET status = (ARRAY['completed', 'completed', 'completed', 'failed',"
             "           'timeout', 'budget_exceeded', 'max_steps', 'cancelled', 'expired'])"
             "           [1 + (random() * 8)::int],"
             "       finished_at = started_at + random() * interval '600 s'"
             " WHERE status = 'running' AND random() < 0.89;"
             /* rejected before any claim: final on insert, no enqueued_at */
             "INSERT INTO agentq.tasks (task_id, user_id, goal, status, finished_at)"
             " SELECT md5('r' || i)::uuid, 'user-' || (i %% 3), 'g', 'rejected',"
             "        now() - i * interval '1 min' FROM generate_series(1, %d) i;",
             n, n, n / 20 + 1);
    exec_ok(sql);
}

START_TEST(test_views_match_whole_history_queries)
{
    migrated_db();
    load_oracle();
    assert_sql(DIFF_SQL, NO_DIFF);
    load_history(3000);
    /* The triggers folded as they went: what is pending is under two
     * folds' worth, and the roll-ups hold the rest. */
    assert_sql("SELECT (SELECT count(*) FROM agentq.rollup_pending) < 2048"
               " AND (SELECT sum(tasks) FROM agentq.rollup_status) > 1000",
               "t");
    assert_sql(DIFF_SQL, NO_DIFF);

    static const char *const changes[] = {
        /* a final row changed again (a late cost correction) */
        "UPDATE agentq.tasks SET cost_usd = cost_usd + 0.5, steps = steps + 1 WHERE status = 'failed'",
        /* requeued, as agentqctl requeue does it, then run and ended again */
        "UPDATE agentq.tasks SET status = 'queued', finished_at = NULL, started_at = NULL"
        " WHERE status = 'timeout'",
        "UPDATE agentq.tasks SET status = 'running', started_at = now() WHERE status = 'queued'"
        " AND enqueued_at < now() - interval '2 hours'",
        "UPDATE agentq.tasks SET status = 'completed', finished_at = now() + interval '3 s'"
        " WHERE status = 'running' AND started_at > now() - interval '1 minute'",
        /* a user renamed by hand */
        "UPDATE agentq.tasks SET user_id = 'user-renamed' WHERE user_id = 'user-5'",
        /* a row that changes nothing the views read */
        "UPDATE agentq.tasks SET metadata = '{\"note\": 1}' WHERE status = 'completed'",
        /* retention: batches of agentq.prune, then one status only */
        "SELECT agentq.prune(now() - interval '2 hours', 300)",
        "SELECT agentq.prune(now() - interval '1 hour', 5000, ARRAY['expired'])",
        /* a user's rows deleted by hand, final or not */
        "DELETE FROM agentq.tasks WHERE user_id = 'user-7'",
        "SELECT agentq.rollups_flush()",
        "SELECT agentq.rollups_rebuild()",
        /* a task inserted final with its latencies */
        "INSERT INTO agentq.tasks (task_id, user_id, goal, status, steps, cost_usd, enqueued_at,"
        " started_at, finished_at) VALUES (gen_random_uuid(), 'user-new', 'g', 'completed', 2, 0.1,"
        " now() - interval '9 s', now() - interval '8 s', now())",
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(changes); i++) {
        exec_ok(changes[i]);
        char *got = aq_test_pg_value(dsn, DIFF_SQL);
        ck_assert_msg(got && strcmp(got, NO_DIFF) == 0, "after %s:\n  %s", changes[i], got);
        free(got);
    }
    assert_sql("SELECT count(*) FROM agentq.rollup_pending", "1");
    assert_sql("SELECT count(*) FROM agentq.usage_by_user WHERE user_id IN ('user-5', 'user-7')", "0");

    /* A TRUNCATE (triggers of its own kind) empties the roll-ups. */
    exec_ok("TRUNCATE agentq.tasks CASCADE");
    assert_sql("SELECT (SELECT count(*) FROM agentq.rollup_usage) + (SELECT count(*) FROM agentq.rollup_pending)"
               " + (SELECT count(*) FROM agentq.rollup_latency)",
               "0");
    assert_sql("SELECT sum(tasks) FROM agentq.status_counts", "0");
    load_history(200);
    assert_sql(DIFF_SQL, NO_DIFF);
    drop_dsn();
}
END_TEST

/* The oracle is not blind: a roll-up that is off by one task, one
 * microdollar or one latency, or a trigger that was off, shows, and a
 * rebuild mends it. */
START_TEST(test_a_wrong_roll_up_shows_and_a_rebuild_mends_it)
{
    migrated_db();
    load_oracle();
    load_history(1500);
    exec_ok("SELECT agentq.rollups_flush()");
    static const struct {
        const char *sql, *diff;
    } wrongs[] = {
        {"UPDATE agentq.rollup_usage SET cost_usd = cost_usd + 0.000001 WHERE user_id = 'user-1'",
         "latency_percentiles=0 status_counts=0 throughput_per_minute=0 usage_by_user=2"},
        {"UPDATE agentq.rollup_throughput SET tasks = tasks + 1"
         " WHERE (minute, status) IN (SELECT minute, status FROM agentq.rollup_throughput LIMIT 1)",
         "latency_percentiles=0 status_counts=0 throughput_per_minute=2 usage_by_user=0"},
        {"UPDATE agentq.rollup_status SET tasks = tasks - 1 WHERE status = 'completed'",
         "latency_percentiles=0 status_counts=2 throughput_per_minute=0 usage_by_user=0"},
        {"UPDATE agentq.rollup_latency SET tasks = tasks + 1"
         " WHERE kind = 'run' AND bucket = (SELECT max(bucket) FROM agentq.rollup_latency WHERE kind = 'run')",
         "latency_percentiles=1 status_counts=0 throughput_per_minute=0 usage_by_user=0"},
        {"ALTER TABLE agentq.tasks DISABLE TRIGGER tasks_final_update;"
         " UPDATE agentq.tasks SET status = 'completed', finished_at = now() WHERE status = 'running';"
         " ALTER TABLE agentq.tasks ENABLE TRIGGER tasks_final_update",
         NULL},
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(wrongs); i++) {
        exec_ok(wrongs[i].sql);
        char *got = aq_test_pg_value(dsn, DIFF_SQL);
        if (wrongs[i].diff)
            ck_assert_msg(got && strcmp(got, wrongs[i].diff) == 0, "after %s:\n  got %s\n  want %s",
                          wrongs[i].sql, got, wrongs[i].diff);
        else /* every view counts the running tasks that ended unseen */
            ck_assert_msg(got && strstr(got, "=0") == NULL, "after %s:\n  %s", wrongs[i].sql, got);
        free(got);
        exec_ok("SELECT agentq.rollups_rebuild()");
        assert_sql(DIFF_SQL, NO_DIFF);
    }
    drop_dsn();
}
END_TEST

/* Writers ending tasks at once, with folds in between, each in its own
 * transaction: every delta lands once, and none waits on another. */
#define ENDERS 4
#define ENDS_EACH 400

struct ender {
    const char *dsn;
    int id;
    int failures;
    char err[512];
};

static void *end_loop(void *arg)
{
    struct ender *t = arg;
    PGconn *c = PQconnectdb(t->dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        t->failures++;
        snprintf(t->err, sizeof t->err, "%s", PQerrorMessage(c));
        PQfinish(c);
        return NULL;
    }
    for (int i = 0; i < ENDS_EACH && t->failures == 0; i++) {
        char sql[1024];
        /* A task claimed and ended (or, one in ten, ended and pruned). */
        snprintf(sql, sizeof sql,
                 "INSERT INTO agentq.tasks (task_id, user_id, goal, status, enqueued_at)"
                 " VALUES (md5('e%d-%d')::uuid, 'racer-%d', 'g', 'queued', now() - interval '2 s');"
                 "UPDATE agentq.tasks SET status = 'running', started_at = now() - interval '1 s'"
                 " WHERE task_id = md5('e%d-%d')::uuid;"
                 "UPDATE agentq.tasks SET status = '%s', finished_at = now(), steps = %d,"
                 " prompt_tokens = %d, cost_usd = 0.001 WHERE task_id = md5('e%d-%d')::uuid;"
                 "%s",
                 t->id, i, i % 5, t->id, i, i % 3 ? "completed" : "failed", i % 7, i, t->id, i,
                 i % 10 == 9 ? "SELECT agentq.prune(now() + interval '1 s', 1);" : "");
        if (!exec_on(c, sql, t->err, sizeof t->err))
            t->failures++;
        else if (t->id == 0 && i % 50 == 0 &&
                 !exec_on(c, "SELECT agentq.rollups_flush()", t->err, sizeof t->err))
            t->failures++;
    }
    PQfinish(c);
    return NULL;
}

START_TEST(test_rollups_stay_exact_under_concurrent_writers)
{
    migrated_db();
    load_oracle();
    load_history(500);
    pthread_t th[ENDERS];
    struct ender en[ENDERS];
    for (int i = 0; i < ENDERS; i++) {
        en[i] = (struct ender){.dsn = dsn, .id = i};
        ck_assert_int_eq(pthread_create(&th[i], NULL, end_loop, &en[i]), 0);
    }
    for (int i = 0; i < ENDERS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(en[i].failures == 0, "writer %d: %s", i, en[i].err);
    }
    /* 526 tasks of history and 1,600 ended here, 160 of the oldest
     * pruned meanwhile; folds ran under the load. */
    assert_sql("SELECT count(*) FROM agentq.tasks", "1966");
    assert_sql("SELECT sum(tasks) FROM agentq.usage_by_user", "1966");
    assert_sql(DIFF_SQL, NO_DIFF);
    drop_dsn();
}
END_TEST

/* ---------------------------------------------------------- limits --- */

#define TAKERS 4
#define TAKES_EACH 60

struct taker {
    const char *dsn;
    double granted;
    int failures;
};

static void *take_loop(void *arg)
{
    struct taker *t = arg;
    PGconn *c = PQconnectdb(t->dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        t->failures++;
        PQfinish(c);
        return NULL;
    }
    for (int i = 0; i < TAKES_EACH; i++) {
        PGresult *r = PQexec(c, "SELECT agentq.take_tokens('c', 1)");
        if (PQresultStatus(r) == PGRES_TUPLES_OK)
            t->granted += atof(PQgetvalue(r, 0, 0));
        else
            t->failures++;
        PQclear(r);
    }
    PQfinish(c);
    return NULL;
}

START_TEST(test_take_tokens_never_overgrants_under_contention)
{
    migrated_db();
    exec_ok("SELECT agentq.define_bucket('c', 100, 0)");
    pthread_t th[TAKERS];
    struct taker tk[TAKERS];
    for (int i = 0; i < TAKERS; i++) {
        tk[i] = (struct taker){.dsn = dsn};
        ck_assert_int_eq(pthread_create(&th[i], NULL, take_loop, &tk[i]), 0);
    }
    double total = 0;
    for (int i = 0; i < TAKERS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(tk[i].failures, 0);
        total += tk[i].granted;
    }
    /* 240 asks for a bucket of 100 that does not refill: exactly 100. */
    ck_assert_double_eq(total, 100.0);
    assert_sql("SELECT tokens FROM agentq.rate_limits WHERE name = 'c'", "0");
    drop_dsn();
}
END_TEST

/* Racing puts: several workers putting the same keys and new ones at
 * once neither fail nor break the bound. */
#define PUTTERS 4
#define PUTS_EACH 40

struct putter {
    const char *dsn;
    int id;
    int failures;
    char err[512];
};

static void *put_loop(void *arg)
{
    struct putter *t = arg;
    PGconn *c = PQconnectdb(t->dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        t->failures++;
        PQfinish(c);
        return NULL;
    }
    for (int i = 0; i < PUTS_EACH; i++) {
        char sql[256];
        /* Even i: a key every putter puts; odd: one of its own. */
        snprintf(sql, sizeof sql,
                 "SELECT agentq.cache_put('k%d-%d', 'm', repeat('x', 100 + %d), 60, 2000)",
                 i % 2 ? t->id : 0, i, i);
        if (!exec_on(c, sql, t->err, sizeof t->err))
            t->failures++;
    }
    PQfinish(c);
    return NULL;
}

START_TEST(test_racing_cache_puts_keep_the_bound)
{
    migrated_db();
    pthread_t th[PUTTERS];
    struct putter pt[PUTTERS];
    for (int i = 0; i < PUTTERS; i++) {
        pt[i] = (struct putter){.dsn = dsn, .id = i + 1};
        ck_assert_int_eq(pthread_create(&th[i], NULL, put_loop, &pt[i]), 0);
    }
    for (int i = 0; i < PUTTERS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(pt[i].failures == 0, "putter %d: %d failures: %s", i, pt[i].failures, pt[i].err);
    }
    assert_sql("SELECT sum(bytes) <= 2000 AND sum(bytes) > 1800"
               " AND sum(bytes) = (SELECT bytes FROM agentq.llm_cache_size) FROM agentq.llm_cache",
               "t");
    drop_dsn();
}
END_TEST

struct migrator {
    const char *dsn;
    int rc, applied;
    char err[512];
};

static void *migrate_thread(void *arg)
{
    struct migrator *m = arg;
    m->rc = aq_migrate_apply(m->dsn, NULL, &m->applied, m->err, sizeof m->err);
    return NULL;
}

START_TEST(test_concurrent_migrators_apply_each_file_once)
{
    dsn = aq_test_fresh_db("it_schema_race");
    enum { N = 3 };
    pthread_t th[N];
    struct migrator m[N];
    for (int i = 0; i < N; i++) {
        m[i] = (struct migrator){.dsn = dsn};
        ck_assert_int_eq(pthread_create(&th[i], NULL, migrate_thread, &m[i]), 0);
    }
    int total = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(m[i].rc == 0, "migrator %d: %s", i, m[i].err);
        total += m[i].applied;
    }
    ck_assert_int_eq(total, count_sql_files());
    drop_dsn();
}
END_TEST

START_TEST(test_task_counters_cannot_go_negative)
{
    migrated_db();
    char err[1024] = "";
    ck_assert_int_ne(aq_test_pg_exec(dsn,
                                     "INSERT INTO agentq.tasks (task_id, user_id, goal, status,"
                                     " cost_usd) VALUES (gen_random_uuid(), 'u', 'g', 'failed',"
                                     " -1)",
                                     err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "check constraint") != NULL, "%s", err);
    ck_assert_int_ne(aq_test_pg_exec(dsn,
                                     "INSERT INTO agentq.rate_limits (name, capacity, tokens,"
                                     " refill_per_sec) VALUES ('n', 1, -1, 0)",
                                     err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "check constraint") != NULL, "%s", err);
    drop_dsn();
}
END_TEST

/* ---------------------------------------------------------- errors --- */

START_TEST(test_status_check_rejects_unknown_status)
{
    migrated_db();
    char err[1024] = "";
    ck_assert_int_ne(aq_test_pg_exec(dsn,
                                     "INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
                                     " VALUES (gen_random_uuid(), 'u', 'g', 'done')",
                                     err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "tasks_status_check") != NULL, "%s", err);
    ck_assert_int_ne(aq_test_pg_exec(dsn,
                                     "INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
                                     " VALUES (gen_random_uuid(), 'u', 'g', NULL)",
                                     err, sizeof err),
                     0);
    ck_assert_int_ne(aq_test_pg_exec(dsn,
                                     "INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
                                     " VALUES (gen_random_uuid(), 'u', 'g', 'queued');"
                                     " INSERT INTO agentq.steps (task_id, step, kind)"
                                     " SELECT task_id, 1, 'think' FROM agentq.tasks",
                                     err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "steps_kind_check") != NULL, "%s", err);
    /* Every documented status is accepted. */
    exec_ok("INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
            " SELECT gen_random_uuid(), 'u', 'g', s FROM unnest(ARRAY['queued', 'running',"
            " 'retrying', 'completed', 'failed', 'timeout', 'budget_exceeded', 'max_steps',"
            " 'cancelled', 'expired', 'rejected']) AS s");
    drop_dsn();
}
END_TEST

START_TEST(test_reader_role_cannot_write)
{
    migrated_db();
    insert_view_rows();
    char sql[512], user[64];
    snprintf(user, sizeof user, "it_reader_%ld", (long)getpid());
    snprintf(sql, sizeof sql, "CREATE ROLE %s LOGIN IN ROLE agentq_reader", user);
    exec_ok(sql);
    char *super = dsn;
    dsn = aq_test_dsn_as(super, user);

    char err[1024] = "";
    ck_assert_int_ne(aq_test_pg_exec(dsn,
                                     "INSERT INTO agentq.tasks (task_id, user_id, goal, status)"
                                     " VALUES (gen_random_uuid(), 'u', 'g', 'queued')",
                                     err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    ck_assert_int_ne(aq_test_pg_exec(dsn, "UPDATE agentq.tasks SET cancel_requested = true",
                                     err, sizeof err), 0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    ck_assert_int_ne(aq_test_pg_exec(dsn, "DELETE FROM agentq.dead_letters", err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    ck_assert_int_ne(aq_test_pg_exec(dsn, "SELECT agentq.take_tokens('x', 1)", err, sizeof err),
                     0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    /* so are the roll-ups' folds and rebuilds */
    ck_assert_int_ne(aq_test_pg_exec(dsn, "SELECT agentq.rollups_flush()", err, sizeof err), 0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    ck_assert_int_ne(aq_test_pg_exec(dsn, "SELECT agentq.rollups_rebuild()", err, sizeof err), 0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    /* answering a waiting task is the writer's */
    ck_assert_int_ne(aq_test_pg_exec(dsn, "SELECT agentq.answer(gen_random_uuid(), 'yes')", err, sizeof err), 0);
    ck_assert_msg(strstr(err, "permission denied") != NULL, "%s", err);
    /* The cache and the limits are the writer's too: not even a lookup
     * (it counts its hit). */
    static const char *const refused[] = {
        "SELECT agentq.cache_put('r', 'm', 'x', 60, 100)",
        "SELECT agentq.cache_get('r')",
        "SELECT agentq.clamp_bucket('x', 1)",
        "SELECT agentq.pause_bucket('x', now())",
        "INSERT INTO agentq.llm_cache (key, response, expires_at) VALUES ('\\x00', 'x', now())",
        "UPDATE agentq.llm_cache SET hits = 0",
        "DELETE FROM agentq.llm_cache",
        "TRUNCATE agentq.llm_cache",
        "UPDATE agentq.llm_cache_size SET bytes = 0",
        /* the views' roll-ups */
        "UPDATE agentq.rollup_usage SET tasks = 0",
        "INSERT INTO agentq.rollup_pending VALUES (1, 'u', 'completed', now(), 0, 0, 0, 0, 0, 0)",
        "DELETE FROM agentq.rollup_latency",
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(refused); i++) {
        ck_assert_msg(aq_test_pg_exec(dsn, refused[i], err, sizeof err) != 0, "%s was allowed", refused[i]);
        ck_assert_msg(strstr(err, "permission denied") != NULL, "%s: %s", refused[i], err);
    }

    /* Reading every table and view works. */
    assert_sql("SELECT count(*) FROM agentq.tasks", "6");
    assert_sql("SELECT count(*) FROM agentq.steps", "0");
    assert_sql("SELECT count(*) FROM agentq.dead_letters", "0");
    assert_sql("SELECT count(*) FROM agentq.rate_limits", "0");
    assert_sql("SELECT count(*) FROM agentq.usage_by_user", "3");
    assert_sql("SELECT sum(tasks) FROM agentq.throughput_per_minute", "5");
    assert_sql("SELECT count(queue_wait_p50_s) + count(run_time_p99_s) FROM agentq.latency_percentiles", "4");
    assert_sql("SELECT sum(tasks) FROM agentq.status_counts", "6");
    assert_sql("SELECT count(*) FROM agentq.dead_letters_text", "0");
    assert_sql("SELECT count(*) FROM agentq.llm_cache", "0");
    assert_sql("SELECT bytes FROM agentq.llm_cache_size", "0");
    free(dsn);
    dsn = super;
    drop_dsn();
}
END_TEST

static char *make_sql_dir(void)
{
    char *dir = aq_xstrdup("/tmp/agentq-it-sql.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    return dir;
}

static void write_file(const char *dir, const char *name, const char *content)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    fputs(content, f);
    fclose(f);
}

static void remove_sql_dir(char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    while (d && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        unlink(path);
    }
    if (d)
        closedir(d);
    rmdir(dir);
    free(dir);
}

START_TEST(test_failing_migration_names_file_and_line_and_rolls_back)
{
    dsn = aq_test_fresh_db("it_schema_bad");
    char *dir = make_sql_dir();
    write_file(dir, "001_ok.sql", "CREATE TABLE agentq.t1 (x int);\n");
    write_file(dir, "002_bad.sql", "CREATE TABLE agentq.t2 (x int);\n"
                                   "SELECT 1;\n"
                                   "INSERT INTO agentq.nope VALUES (1);\n");
    write_file(dir, "003_after.sql", "CREATE TABLE agentq.t3 (x int);\n");
    write_file(dir, "README.md", "not a migration");
    write_file(dir, "04_short.sql", "not a migration either: two digits");

    char err[1024] = "";
    int applied = -1;
    int rc = aq_migrate_apply(dsn, dir, &applied, err, sizeof err);
    ck_assert_int_eq(rc, AQ_EINVAL);
    ck_assert_int_eq(applied, 1);
    ck_assert_msg(strstr(err, "002_bad.sql") != NULL, "%s", err);
    ck_assert_msg(strstr(err, "agentq.nope") != NULL, "%s", err);
    ck_assert_msg(strstr(err, "LINE 3") != NULL, "%s", err);
    assert_sql("SELECT string_agg(version, ',' ORDER BY version) FROM agentq.schema_migrations",
               "001");
    /* The failing file's transaction left nothing; later files did not run. */
    assert_sql("SELECT concat_ws(',', to_regclass('agentq.t1') IS NOT NULL,"
               " to_regclass('agentq.t2') IS NOT NULL, to_regclass('agentq.t3') IS NOT NULL)",
               "t,f,f");

    write_file(dir, "002_bad.sql", "CREATE TABLE agentq.t2 (x int);\n");
    ck_assert_msg(aq_migrate_apply(dsn, dir, &applied, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(applied, 2);

    /* An applied file edited afterwards shows up as changed. */
    write_file(dir, "001_ok.sql", "CREATE TABLE agentq.t1 (x bigint);\n");
    aq_migration *list = NULL;
    size_t n = 0;
    ck_assert_msg(aq_migrate_status(dsn, dir, &list, &n, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(n, 3);
    ck_assert(list[0].changed);
    ck_assert(!list[1].changed);
    aq_migrate_list_free(list, n);

    /* Two files with one version are refused before anything runs. */
    write_file(dir, "003_twin.sql", "SELECT 1;\n");
    rc = aq_migrate_apply(dsn, dir, &applied, err, sizeof err);
    ck_assert_int_eq(rc, AQ_EINVAL);
    ck_assert_msg(strstr(err, "003_after.sql") && strstr(err, "003_twin.sql"), "%s", err);

    remove_sql_dir(dir);
    drop_dsn();
}
END_TEST

START_TEST(test_migrate_reports_missing_dir_and_unreachable_db)
{
    char err[1024] = "";
    int applied = -1;
    int rc = aq_migrate_apply("host=127.0.0.1 port=1", "/nonexistent/agentq-sql", &applied, err,
                              sizeof err);
    ck_assert_int_eq(rc, AQ_ENOTFOUND);
    ck_assert_int_eq(applied, 0);
    ck_assert_msg(strstr(err, "/nonexistent/agentq-sql") != NULL, "%s", err);

    char *dir = make_sql_dir();
    rc = aq_migrate_apply("host=127.0.0.1 port=1", dir, &applied, err, sizeof err);
    ck_assert_int_eq(rc, AQ_ENOTFOUND);
    ck_assert_msg(strstr(err, "no migrations") != NULL, "%s", err);
    remove_sql_dir(dir);

    /* Port 1 on loopback refuses at once. */
    rc = aq_migrate_apply("host=127.0.0.1 port=1 connect_timeout=5", NULL, &applied, err,
                          sizeof err);
    ck_assert_int_eq(rc, AQ_EIO);
    ck_assert_msg(strstr(err, "cannot connect") != NULL, "%s", err);
}
END_TEST

/* ------------------------------------------------------- rabbitmq --- */

START_TEST(test_rabbitmq_answers)
{
    const char *port = aq_test_env_require("AGENTQ_TEST_AMQP_PORT");
    const char *ctl = aq_test_env_require("AGENTQ_TEST_RABBITMQCTL");
    ck_assert_ptr_nonnull(aq_test_env_require("AGENTQ_TEST_AMQP_URL"));

    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    ck_assert_ptr_nonnull(sock);
    struct timeval tv = {.tv_sec = 10};
    int rc = amqp_socket_open_noblock(sock, "127.0.0.1", atoi(port), &tv);
    ck_assert_msg(rc == AMQP_STATUS_OK, "connect to %s: %s", port, amqp_error_string2(rc));
    amqp_rpc_reply_t r = amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest",
                                    "guest");
    ck_assert_int_eq(r.reply_type, AMQP_RESPONSE_NORMAL);
    amqp_channel_open(conn, 1);
    ck_assert_int_eq(amqp_get_rpc_reply(conn).reply_type, AMQP_RESPONSE_NORMAL);

    char qname[64];
    snprintf(qname, sizeof qname, "it_schema.%ld", (long)getpid());
    amqp_queue_declare(conn, 1, amqp_cstring_bytes(qname), 0, 0, 0, 0, amqp_empty_table);
    ck_assert_int_eq(amqp_get_rpc_reply(conn).reply_type, AMQP_RESPONSE_NORMAL);

    /* The rabbitmqctl the env names talks to this very broker. */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s -q list_queues name 2>&1", ctl);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char line[512];
    bool found = false;
    while (fgets(line, sizeof line, p)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (strcmp(line, qname) == 0)
            found = true;
    }
    int status = pclose(p);
    ck_assert_msg(status == 0, "%s exited with %d", cmd, status);
    ck_assert_msg(found, "queue %s not listed by %s", qname, cmd);

    amqp_queue_delete(conn, 1, amqp_cstring_bytes(qname), 0, 0);
    ck_assert_int_eq(amqp_get_rpc_reply(conn).reply_type, AMQP_RESPONSE_NORMAL);
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
}
END_TEST

static Suite *schema_suite(void)
{
    const TTest *core[] = {test_migrate_records_every_version_once,
                           test_status_lists_pending_on_a_new_database, test_task_row_round_trips,
                           test_steps_and_dead_letters_store_what_workers_write,
                           test_views_count_what_was_inserted, test_take_tokens_refills_and_takes,
                           test_cancel_request_notifies_listeners,
                           test_final_status_notifies_listeners, test_worker_role_can_write,
                           test_provider_objects_exist, test_cache_get_and_put,
                           test_cache_bound_evicts_expired_then_oldest,
                           test_clamp_bucket_lowers_and_never_raises, test_pause_bucket_notifies_limits,
                           test_rabbitmq_answers};
    const TTest *rollups[] = {test_views_match_whole_history_queries,
                              test_a_wrong_roll_up_shows_and_a_rebuild_mends_it,
                              test_rollups_stay_exact_under_concurrent_writers};
    const TTest *limits[] = {test_take_tokens_never_overgrants_under_contention,
                             test_racing_cache_puts_keep_the_bound,
                             test_concurrent_migrators_apply_each_file_once,
                             test_task_counters_cannot_go_negative};
    const TTest *errors[] = {test_status_check_rejects_unknown_status,
                             test_reader_role_cannot_write,
                             test_failing_migration_names_file_and_line_and_rolls_back,
                             test_migrate_reports_missing_dir_and_unreachable_db};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 120},
        {.name = "rollups", .tests = rollups, .n_tests = AQ_ARRAY_LEN(rollups), .timeout_s = 120},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .timeout_s = 120},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 120},
    };
    return aq_test_suite("schema", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void)
{
    /* The migrator logs each file it applies; keep the test output to
     * failures. */
    aq_log_set_level(AQ_LOG_WARN);
    return aq_test_run(schema_suite());
}
