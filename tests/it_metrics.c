/* it_metrics.c — what a real agentq-worker serves on /metrics, against
 * the private RabbitMQ and PostgreSQL of the `servers` fixture and an
 * agentq-mockllm: after tasks that complete (one with a tool call), fail
 * at once (a 400), fail retryably (a 500, a timeout) and run out of
 * attempts, or are rejected as invalid, every family is there and its counts are what ran; and the
 * text passes `promtool check metrics` when promtool is installed
 * (Debian's prometheus package). */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/migrate.h"
#include "fleet.h"
#include "proc.h"
#include "suite.h"
#include "testenv.h"

#include <check.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static aq_fleet E;

/* A database, AMQP names of the test's own and a mock LLM (20 ms). */
static void setup_env(const char *name)
{
    aq_fleet_setup(&E, "itm", name);
    const char *mock[] = {"--latency-ms", "20", NULL};
    aq_fleet_start_mock(&E, mock);
    aq_fleet_set("AGENTQ_AMQP_MAX_ATTEMPTS", "2");
    aq_fleet_set("AGENTQ_LLM_MAX_RETRIES", "0");
    aq_fleet_set("AGENTQ_LLM_TIMEOUT_MS", "1000");
    /* a limit, so that the saturation has something to be a fraction of */
    aq_fleet_set("AGENTQ_LLM_REQUESTS_PER_MINUTE", "6000");
    aq_fleet_set("AGENTQ_LLM_PRICE_INPUT_PER_MTOK", "0.15");
    aq_fleet_set("AGENTQ_LLM_PRICE_OUTPUT_PER_MTOK", "0.60");
    aq_fleet_set("AGENTQ_METRICS_LISTEN", "127.0.0.1:0");
    aq_fleet_set("AGENTQ_LOG_LEVEL", "debug");
}

static void teardown_env(void) { aq_fleet_teardown(&E); }

static aq_test_proc *start_worker(const char *name) { return aq_fleet_worker(&E, name, NULL, NULL); }

/* Enqueues one task for user `user` with `goal`; its id into id (37 bytes). */
static void produce(const char *user, const char *goal, char *id)
{
    const char *args[] = {"--user", user, "--goal", goal, NULL};
    ck_assert_int_eq(aq_fleet_produce(&E, args, id), 0);
}

/* Publishes `body` to the test's exchange as any AMQP client would. */
static void publish_raw(const char *body)
{
    aq_config cfg;
    char err[512];
    ck_assert_msg(aq_config_load(&cfg, NULL, err, sizeof err) == 0, "%s", err);
    aq_broker *b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_msg(b != NULL, "%s", err);
    ck_assert_msg(aq_broker_declare(b, &cfg, err, sizeof err) == 0, "%s", err);
    aq_publish p = {cfg.amqp_exchange, "task", body, strlen(body), NULL, 0, NULL, 0, NULL};
    ck_assert_int_gt(aq_broker_publish(b, &p, NULL, err, sizeof err), 0);
    int64_t nacked;
    ck_assert_msg(aq_broker_wait_confirms(b, 5000, &nacked, err, sizeof err) == 0, "%s", err);
    aq_broker_free(b);
    aq_config_free(&cfg);
}

static void wait_status(const char *id, const char *want, int timeout_ms)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT status FROM agentq.tasks WHERE task_id = '%s'", id);
    if (!aq_test_pg_wait_value(E.dsn, sql, want, timeout_ms)) {
        char log[300];
        snprintf(log, sizeof log, "%s/worker.log", E.logdir);
        aq_test_dump_log(log, 40);
        char *got = aq_test_pg_value(E.dsn, sql);
        ck_abort_msg("task %s: status %s, want %s", id, got ? got : "(no row)", want);
    }
}

/* The metrics port the worker logged at start. */
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

/* GETs /metrics into `path`; returns the text (caller frees). */
static char *scrape(int port, const char *path)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "curl -sf -o '%s' http://127.0.0.1:%d/metrics", path, port);
    ck_assert_int_eq(system(cmd), 0);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return strdup(buf);
}

/* The sum of the samples of series `name` (exactly: "name{" or "name ")
 * whose labels hold every `k="v"` of the NULL-terminated list; -1 when no
 * sample matched. */
static double sum_of(const char *text, const char *name, ...)
{
    double sum = -1;
    size_t nl = strlen(name);
    for (const char *line = text; *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : line + strlen(line)) {
        if (strncmp(line, name, nl) || (line[nl] != '{' && line[nl] != ' ')) continue;
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        char l[4096];
        snprintf(l, sizeof l, "%.*s", (int)len, line);
        char *value = strrchr(l, ' ');
        *value++ = '\0';
        bool all = true;
        va_list ap;
        va_start(ap, name);
        for (const char *want; (want = va_arg(ap, const char *));)
            if (!strstr(l, want)) all = false;
        va_end(ap);
        if (all) sum = (sum < 0 ? 0 : sum) + strtod(value, NULL);
    }
    return sum;
}

#define ASSERT_SUM(want, text, ...)                                                                  \
    do {                                                                                             \
        double got_ = sum_of(text, __VA_ARGS__, NULL);                                               \
        ck_assert_msg(got_ == (want), "%s: %g, want %g", #__VA_ARGS__, got_, (double)(want));       \
    } while (0)

START_TEST(metrics_count_what_ran_and_pass_promtool)
{
    setup_env("count");
    aq_test_proc *w = start_worker("worker");
    int port = worker_metrics_port("worker");
    char hello[40], calc[40], bad[40], down[40], slow[40];
    produce("alice", "hello", hello);
    produce("alice", "calc", calc);                   /* one calculator call, then the answer */
    produce("bob", "always fail=400", bad);           /* fatal: failed at once */
    produce("bob", "always fail=500", down);          /* retryable: two attempts, then failed */
    produce("carol", "too slow sleep=3000", slow);    /* times out (1 s): two attempts, then failed */
    const char *invalid = "0b6f4d1e-3c2a-4e5f-9a8b-7c6d5e4f3a2b"; /* max_steps 0: rejected */
    publish_raw("{\"task_id\":\"0b6f4d1e-3c2a-4e5f-9a8b-7c6d5e4f3a2b\",\"user_id\":\"u\",\"goal\":\"g\","
                "\"max_steps\":0}");
    wait_status(hello, "completed", 15000);
    wait_status(calc, "completed", 15000);
    wait_status(bad, "failed", 15000);
    wait_status(down, "failed", 20000);
    wait_status(slow, "failed", 20000);
    wait_status(invalid, "rejected", 15000);
    /* A session's end is counted before its status is written, a dead
     * letter once it is committed: its callback may reach the worker's
     * loop a moment after the row shows it. */
    char path[300];
    snprintf(path, sizeof path, "%s/metrics.txt", E.logdir);
    char *t = scrape(port, path);
    for (int i = 0; i < 50 && sum_of(t, "agentq_dead_letters_recorded_total", NULL) < 3; i++) {
        free(t);
        usleep(100000);
        t = scrape(port, path);
    }

    /* every family is there, with its type */
    static const char *const families[] = {
        "counter agentq_tasks_received_total", "counter agentq_tasks_completed_total",
        "counter agentq_tasks_failed_total", "counter agentq_tasks_retried_total",
        "counter agentq_tasks_rejected_total", "counter agentq_tasks_already_final_total",
        "counter agentq_dead_letters_recorded_total", "counter agentq_tasks_duplicates_total",
        "counter agentq_tasks_conflicts_total", "counter agentq_tasks_swept_total",
        "counter agentq_tasks_routed_total", "counter agentq_tasks_waited_total",
        "counter agentq_sessions_resumed_total", "counter agentq_sessions_waiting_total",
        "counter agentq_sessions_handed_over_total", "gauge agentq_sessions_running", "gauge agentq_tasks_held",
        "gauge agentq_tasks_held_blocked", "gauge agentq_lanes_paused", "gauge agentq_ratelimit_waiting",
        "gauge agentq_ratelimit_waiting_users", "gauge agentq_http_inflight", "gauge agentq_http_open_connections",
        "counter agentq_http_sockets_opened_total", "counter agentq_http_completed_total",
        "counter agentq_http_failed_total", "gauge agentq_store_pending", "counter agentq_store_transactions_total",
        "counter agentq_store_reconnects_total", "gauge agentq_broker_connected", "gauge agentq_db_connected",
        "gauge agentq_draining", "counter agentq_llm_calls_total", "counter agentq_llm_tokens_total",
        "counter agentq_llm_cost_usd_total", "gauge agentq_llm_route_open", "gauge agentq_llm_route_in_flight",
        "gauge agentq_llm_route_limit", "gauge agentq_ratelimit_saturation", "counter agentq_tasks_finished_total",
        "histogram agentq_task_queue_wait_seconds", "histogram agentq_task_run_seconds",
        "counter agentq_llm_requests_total", "counter agentq_llm_token_usage_total",
        "histogram gen_ai_client_operation_duration_seconds", "histogram gen_ai_client_token_usage",
        "counter agentq_tool_calls_total", "histogram agentq_tool_duration_seconds",
        "histogram agentq_ratelimit_wait_seconds", "gauge agentq_build_info", "gauge process_resident_memory_bytes",
        "gauge process_open_fds", "gauge process_max_fds",
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(families); i++) {
        const char *sp = strchr(families[i], ' ');
        char want[200];
        snprintf(want, sizeof want, "# TYPE %s %.*s\n", sp + 1, (int)(sp - families[i]), families[i]);
        ck_assert_msg(strstr(t, want) != NULL, "no '%.*s' in:\n%s", (int)strlen(want) - 1, want, t);
    }

    /* tasks: 2 completed, 3 failed, 1 rejected; 7 attempts (two of them retried) */
    ASSERT_SUM(2, t, "agentq_tasks_completed_total");
    ASSERT_SUM(3, t, "agentq_tasks_failed_total");
    ASSERT_SUM(1, t, "agentq_tasks_rejected_total");
    ASSERT_SUM(3, t, "agentq_dead_letters_recorded_total"); /* the failed ones' and the rejected one's */
    ASSERT_SUM(1, t, "agentq_tasks_finished_total", "status=\"rejected\"");
    ASSERT_SUM(2, t, "agentq_tasks_finished_total", "status=\"completed\"");
    ASSERT_SUM(3, t, "agentq_tasks_finished_total", "status=\"failed\"");
    ASSERT_SUM(0, t, "agentq_tasks_finished_total", "status=\"budget_exceeded\"");
    ASSERT_SUM(6, t, "agentq_tasks_finished_total");
    ASSERT_SUM(7, t, "agentq_task_queue_wait_seconds_count");
    ASSERT_SUM(2, t, "agentq_task_run_seconds_count", "status=\"completed\"");
    ASSERT_SUM(3, t, "agentq_task_run_seconds_count", "status=\"failed\"");
    ASSERT_SUM(2, t, "agentq_task_run_seconds_count", "status=\"retrying\"");
    ASSERT_SUM(7, t, "agentq_task_run_seconds_bucket", "le=\"+Inf\"");

    /* LLM requests: hello 1 and calc 2 answered, one 400, two 500s, two timeouts */
    ASSERT_SUM(3, t, "agentq_llm_requests_total", "code=\"200\"");
    ASSERT_SUM(1, t, "agentq_llm_requests_total", "code=\"400\"");
    ASSERT_SUM(2, t, "agentq_llm_requests_total", "code=\"500\"");
    ASSERT_SUM(2, t, "agentq_llm_requests_total", "code=\"error\"");
    ASSERT_SUM(8, t, "agentq_llm_requests_total");
    ASSERT_SUM(3, t, "agentq_llm_calls_total", "outcome=\"answered\"");
    ASSERT_SUM(5, t, "agentq_llm_calls_total", "outcome=\"failed\"");
    ASSERT_SUM(8, t, "gen_ai_client_operation_duration_seconds_count", "gen_ai_operation_name=\"chat\"");
    ASSERT_SUM(1, t, "gen_ai_client_operation_duration_seconds_count", "error_type=\"400\"");
    ASSERT_SUM(2, t, "gen_ai_client_operation_duration_seconds_count", "error_type=\"500\"");
    ASSERT_SUM(2, t, "gen_ai_client_operation_duration_seconds_count", "error_type=\"timeout\"");
    ASSERT_SUM(8, t, "agentq_ratelimit_wait_seconds_count");
    ASSERT_SUM(3, t, "gen_ai_client_token_usage_count", "gen_ai_token_type=\"input\"");
    ASSERT_SUM(3, t, "gen_ai_client_token_usage_count", "gen_ai_token_type=\"output\"");
    /* the timeouts took their 1 s each, the rest far less */
    double slow_s = sum_of(t, "gen_ai_client_operation_duration_seconds_sum", "error_type=\"timeout\"", NULL);
    ck_assert_msg(slow_s >= 1.9 && slow_s < 4, "timeouts took %g s", slow_s);

    /* tokens: the same totals as the rows, by every family that counts them */
    char *prompt = aq_test_pg_value(E.dsn, "SELECT sum(prompt_tokens) FROM agentq.tasks");
    char *completion = aq_test_pg_value(E.dsn, "SELECT sum(completion_tokens) FROM agentq.tasks");
    ck_assert_double_gt(atof(prompt), 0);
    ASSERT_SUM(atof(prompt), t, "agentq_llm_token_usage_total", "type=\"input\"");
    ASSERT_SUM(atof(completion), t, "agentq_llm_token_usage_total", "type=\"output\"");
    ASSERT_SUM(atof(prompt), t, "agentq_llm_tokens_total", "kind=\"prompt\"");
    ASSERT_SUM(atof(prompt), t, "gen_ai_client_token_usage_sum", "gen_ai_token_type=\"input\"");
    free(prompt);
    free(completion);

    /* the tool call */
    ASSERT_SUM(1, t, "agentq_tool_calls_total", "skill=\"calculator\"", "status=\"ok\"");
    ASSERT_SUM(1, t, "agentq_tool_calls_total");
    ASSERT_SUM(1, t, "agentq_tool_duration_seconds_count", "skill=\"calculator\"");

    /* gauges: 8 grants of 6000/min in the last minute; the process; the build */
    double sat = sum_of(t, "agentq_ratelimit_saturation", NULL);
    ck_assert_msg(sat > 8.0 / 6000 * 0.99 && sat < 8.0 / 6000 * 1.01, "saturation %g", sat);
    ASSERT_SUM(6000, t, "agentq_llm_route_limit", "per_minute=\"requests\"");
    ck_assert_double_gt(sum_of(t, "process_resident_memory_bytes", NULL), 1 << 20);
    ck_assert_double_gt(sum_of(t, "process_open_fds", NULL), 3);
    ASSERT_SUM(1, t, "agentq_build_info", "version=\"" AGENTQ_VERSION "\"");
    ASSERT_SUM(0, t, "agentq_store_reconnects_total");
    ck_assert_double_ge(sum_of(t, "agentq_store_pending", NULL), 0);
    ASSERT_SUM(1, t, "agentq_db_connected");

    /* promtool, when installed: no complaint at all */
    if (system("command -v promtool >/dev/null 2>&1") == 0) {
        char cmd[900], out[300];
        snprintf(out, sizeof out, "%s/promtool.out", E.logdir);
        snprintf(cmd, sizeof cmd, "promtool check metrics <'%s' >'%s' 2>&1", path, out);
        int rc = WEXITSTATUS(system(cmd));
        FILE *f = fopen(out, "r");
        char said[4096] = "";
        size_t n = f ? fread(said, 1, sizeof said - 1, f) : 0;
        said[n] = '\0';
        if (f) fclose(f);
        ck_assert_msg(rc == 0 && n == 0, "promtool check metrics exited %d:\n%s", rc, said);
    } else {
        fprintf(stderr, "it_metrics: promtool not installed (Debian package prometheus); format check skipped\n");
    }
    free(t);
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 10000), 0);
    aq_test_proc_free(w);
    teardown_env();
}
END_TEST

int main(void)
{
    const TTest *core[] = {metrics_count_what_ran_and_pass_promtool};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 120},
    };
    return aq_test_run(aq_test_suite("metrics", tcases, AQ_ARRAY_LEN(tcases)));
}
