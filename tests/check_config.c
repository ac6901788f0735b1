/* check_config.c — the configuration a user writes: defaults, file,
 * environment overrides and the errors that name file, line and key. */
#include "agentq/config.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char path[64];

static const char *write_conf(const char *text)
{
    snprintf(path, sizeof path, "/tmp/check_config_XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

static void teardown(void)
{
    if (path[0]) unlink(path);
    path[0] = '\0';
}

/* Loads a config file holding `text`, which must be refused, and returns
 * the error (valid until the next call). */
static const char *load_error(const char *text)
{
    static char err[256];
    err[0] = '\0';
    aq_config cfg;
    ck_assert_int_eq(aq_config_load(&cfg, write_conf(text), err, sizeof err), AQ_EINVAL);
    aq_config_free(&cfg);
    return err;
}

START_TEST(defaults_without_file)
{
    aq_config cfg;
    char err[256] = "";
    unsetenv("AGENTQ_WORKER_CONCURRENCY");
    ck_assert_int_eq(aq_config_load(&cfg, NULL, err, sizeof err), AQ_OK);
    ck_assert_int_eq(cfg.worker_concurrency, 256);
    ck_assert_str_eq(cfg.amqp_queue, "agentq.tasks");
    ck_assert_int_eq(cfg.agent_max_context_bytes, 65536);
    ck_assert_str_eq(cfg.llm_api_key_env, "AGENTQ_LLM_API_KEY");
    aq_config_free(&cfg);
}
END_TEST

START_TEST(file_then_env_then_set)
{
    aq_config cfg;
    char err[256] = "";
    const char *p = write_conf("worker = { concurrency = 50; drain_seconds = 7; };\n"
                               "llm = { model = \"m1\"; price_input_per_mtok = 2; };\n");
    setenv("AGENTQ_WORKER_CONCURRENCY", "70", 1);
    setenv("AGENTQ_AMQP_URL", "amqp://u:p@h:1/v", 1);
    ck_assert_int_eq(aq_config_load(&cfg, p, err, sizeof err), AQ_OK);
    ck_assert_int_eq(cfg.worker_concurrency, 70);   /* env beats file */
    ck_assert_int_eq(cfg.worker_drain_seconds, 7);  /* file beats default */
    ck_assert_str_eq(cfg.llm_model, "m1");
    ck_assert_double_eq(cfg.llm_price_input_per_mtok, 2.0);
    ck_assert_str_eq(cfg.amqp_url, "amqp://u:p@h:1/v");
    ck_assert_int_eq(aq_config_set(&cfg, "worker.concurrency", "90", err, sizeof err), AQ_OK);
    ck_assert_int_eq(cfg.worker_concurrency, 90);   /* flag beats env */
    unsetenv("AGENTQ_WORKER_CONCURRENCY");
    unsetenv("AGENTQ_AMQP_URL");
    aq_config_free(&cfg);
}
END_TEST

START_TEST(lists_and_prices)
{
    aq_config cfg;
    char err[256] = "";
    const char *p = write_conf(
        "skills = { http = ( { name = \"weather\"; url = \"http://w/x\"; timeout_ms = 500; } ); };\n"
        "llm = { prices = ( { model = \"big\"; input_per_mtok = 5.0; output_per_mtok = 15.0; } ); };\n");
    ck_assert_int_eq(aq_config_load(&cfg, p, err, sizeof err), AQ_OK);
    ck_assert_int_eq(cfg.n_http_skills, 1);
    ck_assert_str_eq(cfg.http_skills[0].name, "weather");
    ck_assert_int_eq(cfg.http_skills[0].timeout_ms, 500);
    double in, out;
    aq_config_price(&cfg, "big", &in, &out);
    ck_assert_double_eq(in, 5.0);
    ck_assert_double_eq(out, 15.0);
    aq_config_price(&cfg, "other", &in, &out);
    ck_assert_double_eq(in, 0.15);
    /* A session hands itself over at half the broker's consumer_timeout
     * (2 h here), and is stopped at the latest a tenth (at least 10 s)
     * plus the longest hold (a fifth) before the broker would act. */
    int64_t soft, hard;
    aq_config_handover_ms(&cfg, &soft, &hard);
    ck_assert_int_eq(soft, 3600000);
    ck_assert_int_eq(hard, 5040000);
    ck_assert_int_eq(aq_config_max_hold_ms(&cfg), 1440000);
    cfg.amqp_consumer_timeout_ms = 60000;
    aq_config_handover_ms(&cfg, &soft, &hard);
    ck_assert_int_eq(soft, 30000);
    ck_assert_int_eq(hard, 38000);
    ck_assert_int_eq(aq_config_max_hold_ms(&cfg), 12000);
    long d[8];
    ck_assert_int_eq(aq_config_retry_delays(&cfg, d, 8), 4);
    ck_assert_int_eq(d[0], 5000);
    ck_assert_int_eq(d[3], 600000);
    aq_config_free(&cfg);
}
END_TEST

START_TEST(list_membership)
{
    ck_assert(aq_config_list_has("a, bb ,c", "bb"));
    ck_assert(aq_config_list_has("a,bb,c", "c"));
    ck_assert(!aq_config_list_has("a,bb,c", "b"));
    ck_assert(!aq_config_list_has("", "a"));
}
END_TEST

START_TEST(bounds_name_file_line_key)
{
    const char *err = load_error("worker = {\n  concurrency = 0;\n};\n");
    ck_assert_ptr_nonnull(strstr(err, path));
    ck_assert_ptr_nonnull(strstr(err, ":2:"));
    ck_assert_ptr_nonnull(strstr(err, "worker.concurrency"));
}
END_TEST

START_TEST(unknown_key_named)
{
    const char *err = load_error("worker = { concurency = 5; };\n");
    ck_assert_ptr_nonnull(strstr(err, "unknown key 'worker.concurency'"));
}
END_TEST

START_TEST(syntax_error_has_line)
{
    ck_assert_ptr_nonnull(strstr(load_error("worker = {\n concurrency = ;\n};\n"), ":2:"));
}
END_TEST

START_TEST(wrong_types)
{
    ck_assert_ptr_nonnull(strstr(load_error("worker = { concurrency = \"ten\"; };\n"),
                                 "worker.concurrency"));
    teardown();
    ck_assert_ptr_nonnull(strstr(load_error("amqp = { url = 5; };\n"), "amqp.url"));
}
END_TEST

START_TEST(bad_env_value_named)
{
    aq_config cfg;
    char err[256] = "";
    setenv("AGENTQ_WORKER_DRAIN_SECONDS", "soon", 1);
    ck_assert_int_eq(aq_config_load(&cfg, NULL, err, sizeof err), AQ_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "AGENTQ_WORKER_DRAIN_SECONDS"));
    unsetenv("AGENTQ_WORKER_DRAIN_SECONDS");
    aq_config_free(&cfg);
}
END_TEST

START_TEST(missing_file)
{
    aq_config cfg;
    char err[256] = "";
    ck_assert_int_eq(aq_config_load(&cfg, "/nonexistent/agentq.conf", err, sizeof err), AQ_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "/nonexistent/agentq.conf"));
    aq_config_free(&cfg);
}
END_TEST

START_TEST(cross_checks)
{
    aq_config cfg;
    char err[256] = "";
    aq_config_init(&cfg);
    ck_assert_int_eq(aq_config_set(&cfg, "amqp.retry_delays", "5s,soon", err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_config_check(&cfg, err, sizeof err), AQ_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "amqp.retry_delays"));
    ck_assert_int_eq(aq_config_set(&cfg, "amqp.retry_delays", "5s", err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_config_set(&cfg, "limits.mode", "galaxy", err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_config_check(&cfg, err, sizeof err), AQ_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "limits.mode"));
    ck_assert_int_eq(aq_config_set(&cfg, "no.such", "1", err, sizeof err), AQ_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "no.such"));
    aq_config_free(&cfg);
}
END_TEST

START_TEST(example_parses_back)
{
    /* The shipped example must itself be a valid config. */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    aq_config_write_example(f);
    fclose(f);
    const char *p = write_conf(buf);
    free(buf);
    aq_config cfg;
    char err[256] = "";
    ck_assert_msg(aq_config_load(&cfg, p, err, sizeof err) == AQ_OK, "%s", err);
    aq_config_free(&cfg);
}
END_TEST

START_TEST(dump_masks_passwords)
{
    aq_config cfg;
    char err[256];
    aq_config_init(&cfg);
    ck_assert_int_eq(aq_config_set(&cfg, "amqp.url", "amqp://bob:hunter22@h/v", err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_config_set(&cfg, "postgres.dsn", "host=x password=sekrit9 dbname=y", err, sizeof err), AQ_OK);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    aq_config_dump(&cfg, f);
    fclose(f);
    ck_assert_ptr_null(strstr(buf, "hunter22"));
    ck_assert_ptr_null(strstr(buf, "sekrit9"));
    ck_assert_ptr_nonnull(strstr(buf, "amqp://bob:***@h/v"));
    free(buf);
    aq_config_free(&cfg);
}
END_TEST

static Suite *config_suite(void)
{
    const TTest *core[] = {defaults_without_file, file_then_env_then_set, lists_and_prices,
                           list_membership, example_parses_back, dump_masks_passwords};
    const TTest *limits[] = {bounds_name_file_line_key, cross_checks};
    const TTest *errors[] = {unknown_key_named, syntax_error_has_line, wrong_types,
                             bad_env_value_named, missing_file};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .teardown = teardown},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits), .teardown = teardown},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .teardown = teardown},
    };
    return aq_test_suite("config", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void)
{
    return aq_test_run(config_suite());
}
