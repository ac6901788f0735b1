/* it_cluster.c — a fleet on a three-node RabbitMQ cluster: amqp.url lists
 * the nodes, and the node the worker is connected to stops mid-run.
 *
 * The cluster is the test's own (scripts/testenv with
 * AGENTQ_TESTENV_RABBIT_ONLY and AGENTQ_TESTENV_JOIN, started and stopped
 * by main around the suite); PostgreSQL is the `servers` fixture's. With
 * classic queues (declared through node 1, so they live there) node 2,
 * the worker's, stops: the client side of a cluster. With quorum queues
 * node 1 stops, the worker's and the queues' leaders' both. Either way
 * nothing is lost or run twice. */
#include "agentq/common.h"
#include "fleet.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NODES 3

static char cluster_dir[300];
static char node_url[NODES][200];
static aq_fleet E;

/* scripts/testenv `verb` on node i (0-based), RabbitMQ only; its output
 * appended to the cluster's log. Returns the exit status. */
static int testenv(const char *verb, int i, bool join)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd,
             "AGENTQ_TESTENV_RABBIT_ONLY=1 %s%s%s '%s/scripts/testenv' %s '%s/n%d' >>'%s/testenv.log' 2>&1",
             join ? "AGENTQ_TESTENV_JOIN='" : "", join ? cluster_dir : "", join ? "/n1'" : "", AGENTQ_SOURCE_DIR,
             verb, cluster_dir, i + 1, cluster_dir);
    return WEXITSTATUS(system(cmd));
}

/* AGENTQ_TEST_AMQP_URL of node i's env file. */
static void read_url(int i)
{
    char path[400], line[400];
    snprintf(path, sizeof path, "%s/n%d/env", cluster_dir, i + 1);
    FILE *f = fopen(path, "r");
    if (!f) return;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "AGENTQ_TEST_AMQP_URL=%199s", node_url[i]) == 1) break;
    fclose(f);
}

static bool cluster_start(void)
{
    for (int i = 0; i < NODES; i++) {
        if (testenv("start", i, i > 0) != 0) return false;
        read_url(i);
        if (!node_url[i][0]) return false;
    }
    return true;
}

static void cluster_stop(void)
{
    for (int i = NODES - 1; i >= 0; i--) testenv("stop", i, false); /* node 1 last: its epmd */
}

static long http_get_json_sum(int port, const char *path, long *max)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "curl -s http://127.0.0.1:%d%s", port, path);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    json_error_t jerr;
    json_t *o = json_loadf(p, 0, &jerr);
    pclose(p);
    ck_assert_msg(o != NULL, "GET %s: %s", path, jerr.text);
    long sum = 0;
    *max = 0;
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        long n = (long)json_integer_value(v);
        sum += n;
        if (n > *max) *max = n;
    }
    json_decref(o);
    return sum;
}

static char *value(const char *sql)
{
    char *v = aq_test_pg_value(E.dsn, sql);
    ck_assert_msg(v != NULL, "no value for %s", sql);
    return v;
}

/* 40 tasks enqueued through node 1 (which declares the queues); a worker
 * given the nodes from `first` on runs them through node `first`, which
 * stops once a few have completed: the worker goes on through the next
 * node, and every task completes, each LLM call of each made and recorded
 * once. */
static void stop_mid_run(const char *queue_type, int first)
{
    enum { TASKS = 40 };
    aq_fleet_setup(&E, "itk", queue_type);
    aq_fleet_set("AGENTQ_AMQP_QUEUE_TYPE", queue_type);
    const char *mock[] = {"--latency-ms", "150", NULL};
    aq_fleet_start_mock(&E, mock);
    aq_fleet_set("AGENTQ_LLM_MAX_RETRIES", "0");
    aq_fleet_set("AGENTQ_LOG_LEVEL", "info");
    aq_fleet_set("AGENTQ_WORKER_CONCURRENCY", "4");
    aq_fleet_set("AGENTQ_AMQP_HEARTBEAT", "2");

    aq_fleet_set("AGENTQ_AMQP_URL", node_url[0]);
    char file[400];
    snprintf(file, sizeof file, "%s/tasks.jsonl", E.logdir);
    FILE *f = fopen(file, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < TASKS; i++) fprintf(f, "{\"user_id\":\"u%d\",\"goal\":\"cluster task %d steps=1\"}\n", i % 5, i);
    fclose(f);
    const char *args[] = {"--file", file, NULL};
    ck_assert_int_eq(aq_fleet_produce(&E, args, NULL), 0);

    char urls[700] = "";
    for (int i = first; i < NODES; i++)
        snprintf(urls + strlen(urls), sizeof urls - strlen(urls), "%s%s", i > first ? "," : "", node_url[i]);
    aq_fleet_set("AGENTQ_AMQP_URL", urls);
    aq_test_proc *w = aq_fleet_worker(&E, "worker", NULL, NULL);
    ck_assert_msg(aq_test_pg_wait_value(E.dsn, "SELECT count(*) >= 6 FROM agentq.tasks WHERE status = 'completed'",
                                        "t", 30000), "tasks did not start completing through node %d", first + 1);
    ck_assert_int_eq(testenv("rabbit-stop", first, false), 0);
    char want[16];
    snprintf(want, sizeof want, "%d", TASKS);
    bool done = aq_test_pg_wait_value(E.dsn, "SELECT count(*) FROM agentq.tasks WHERE status = 'completed'", want, 60000);
    char log[300];
    aq_fleet_log(&E, "worker", log, sizeof log);
    if (!done) aq_test_dump_log(log, 40);
    ck_assert_msg(done, "not every task completed after node %d stopped", first + 1);
    char *v = value("SELECT count(*) FROM agentq.tasks WHERE steps = 2");
    ck_assert_str_eq(v, want);
    free(v);
    v = value("SELECT count(*) FROM (SELECT task_id, step FROM agentq.steps WHERE kind = 'llm' AND status = 'ok'"
              " GROUP BY 1, 2 HAVING count(*) > 1) twice");
    ck_assert_msg(!strcmp(v, "0"), "%s LLM replies recorded twice", v);
    free(v);
    long max, sum = http_get_json_sum(E.mock_port, "/calls", &max);
    ck_assert_msg(sum == 2 * TASKS && max == 2, "the provider got %ld calls (want %d), at most %ld for a task", sum,
                  2 * TASKS, max);
    /* The worker said where it went. */
    FILE *lf = fopen(log, "r");
    ck_assert_ptr_nonnull(lf);
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof text - 1, lf);
    text[n] = '\0';
    fclose(lf);
    ck_assert_msg(strstr(text, "broker connection lost"), "the worker did not lose its connection");
    char next[64];
    snprintf(next, sizeof next, "broker: connected to node 2 of %d", NODES - first);
    ck_assert_msg(strstr(text, next), "the worker did not go on through node %d", first + 2);
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 15000), 0);
    aq_test_proc_free(w);
    ck_assert_int_eq(testenv("rabbit-start", first, false), 0);
    aq_fleet_teardown(&E);
}

/* Classic queues live on node 1: the worker's node 2 stops. */
START_TEST(node_the_worker_uses_stops_mid_run) { stop_mid_run("classic", 1); }
END_TEST

/* Quorum queues, replicated on the three nodes and declared through node
 * 1, which the worker uses too: node 1 stops, taking the queues' leaders
 * and the worker's connection; the other two elect new leaders and the
 * worker goes on through node 2. */
START_TEST(quorum_leader_and_worker_node_stops_mid_run) { stop_mid_run("quorum", 0); }
END_TEST

int main(void)
{
    const char *dir = aq_test_env("AGENTQ_TEST_DIR"); /* no ck_assert outside a test */
    if (!dir) {
        fprintf(stderr, "it_cluster: AGENTQ_TEST_DIR is not set: the `servers` fixture is not running\n");
        return 1;
    }
    snprintf(cluster_dir, sizeof cluster_dir, "%s/cluster-%d", dir, (int)getpid());
    char cmd[400];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", cluster_dir);
    if (system(cmd) != 0) return 1;
    /* A node has been seen to exit during start-up on a loaded machine,
     * leaving an empty log: start the cluster anew, up to three times. */
    bool up = false;
    for (int attempt = 1; attempt <= 3 && !up; attempt++) {
        up = cluster_start();
        if (!up) {
            fprintf(stderr, "it_cluster: the cluster did not start (attempt %d of 3); see %s/testenv.log\n", attempt,
                    cluster_dir);
            cluster_stop();
            memset(node_url, 0, sizeof node_url);
        }
    }
    if (!up) return 1;
    const TTest *cluster[] = {node_the_worker_uses_stops_mid_run, quorum_leader_and_worker_node_stops_mid_run};
    const aq_tcase_spec tcases[] = {
        {.name = "cluster", .tests = cluster, .n_tests = AQ_ARRAY_LEN(cluster), .timeout_s = 180},
    };
    int rc = aq_test_run(aq_test_suite("cluster", tcases, AQ_ARRAY_LEN(tcases)));
    cluster_stop();
    return rc;
}
