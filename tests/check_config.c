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
                               "llm = { model = \"m1\"; price_input_per_mtok = 2; price_output_per_mtok = 8; };\n");
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
    /* The llm.* keys make one provider, "default", whose models share
     * its limits; a listed price prices its model. */
    ck_assert_int_eq(aq_config_set(&cfg, "llm.models", "big,mock-1", err, sizeof err), AQ_OK);
    ck_assert_msg(aq_config_check(&cfg, err, sizeof err) == AQ_OK, "%s", err);
    int n;
    aq_provider *pv = aq_config_providers(&cfg, &n);
    ck_assert_int_eq(n, 1);
    ck_assert_str_eq(pv[0].name, "default");
    ck_assert(pv[0].shared_limits);
    ck_assert_int_eq(pv[0].n_models, 2); /* llm.model (mock-1) once, then big */
    ck_assert_str_eq(pv[0].models[0].name, "mock-1");
    ck_assert_double_eq(pv[0].models[0].price_in, 0.0); /* the simulator's */
    ck_assert_str_eq(pv[0].models[1].name, "big");
    ck_assert_double_eq(pv[0].models[1].price_in, 5.0);
    ck_assert_double_eq(pv[0].models[1].price_out, 15.0);
    aq_config_providers_free(pv, n);
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

/* amqp.url as a list of a cluster's nodes: each one is read, and a bad
 * one is named by its place and its URL (the password masked). */
START_TEST(amqp_url_lists_nodes)
{
    aq_config cfg;
    char err[256] = "", node[200];
    ck_assert_int_eq(aq_config_load(&cfg, write_conf("amqp = { url = \" amqp://u:p@a:1/v,amqp://u:p@b:2/v \t"
                                                      "amqp://u:p@c:3/v \"; };\n"), err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_config_amqp_nodes(&cfg), 3);
    ck_assert(aq_config_amqp_node(&cfg, 0, node, sizeof node));
    ck_assert_str_eq(node, "amqp://u:p@a:1/v");
    ck_assert(aq_config_amqp_node(&cfg, 2, node, sizeof node));
    ck_assert_str_eq(node, "amqp://u:p@c:3/v");
    ck_assert(!aq_config_amqp_node(&cfg, 3, node, sizeof node));
    ck_assert(!aq_config_amqp_node(&cfg, 0, node, 5)); /* does not fit */
    aq_config_free(&cfg);
    teardown();
    const char *e = load_error("amqp = { url = \"amqp://u:secret@a/v, a-host:5672\"; };\n");
    ck_assert_msg(strstr(e, "key 'amqp.url': node 2 of 2, 'a-host:5672', is not an amqp:// or amqps:// URL"), "%s", e);
    teardown();
    e = load_error("amqp = { url = \"amqp://u:secret@a/v, amqp:///v\"; };\n");
    ck_assert_msg(strstr(e, "node 2 of 2, 'amqp:///v', names no host"), "%s", e);
    teardown();
    e = load_error("amqp = { url = \"amqps://u:secret@a/v, amqp://u:secret@b/v\"; ca_file = \"/x\"; };\n");
    ck_assert_msg(strstr(e, "mixes amqp:// and amqps://") && !strstr(e, "secret"), "%s", e);
    teardown();
    e = load_error("amqp = { url = \" , \"; };\n");
    ck_assert_msg(strstr(e, "key 'amqp.url': must be an amqp:// or amqps:// URL"), "%s", e);
}
END_TEST

/* amqp.queue_type, and the lane queues' priority bands it brings. */
START_TEST(queue_type_and_bands)
{
    const char *e = load_error("amqp = { queue_type = \"mirrored\"; };\n");
    ck_assert_msg(strstr(e, "key 'amqp.queue_type': 'mirrored' must be 'classic' or 'quorum'"), "%s", e);
    teardown();
    e = load_error("amqp = { queue_type = \"quorum\"; priority_bands = 11; };\n");
    ck_assert_msg(strstr(e, "amqp.priority_bands"), "%s", e);
    teardown();
    aq_config cfg;
    char err[256] = "";
    ck_assert_int_eq(aq_config_load(&cfg, write_conf("amqp = { lanes = 2; };\n"), err, sizeof err), AQ_OK);
    ck_assert(!aq_config_quorum(&cfg));
    ck_assert_int_eq(aq_config_bands(&cfg), 1); /* classic: each lane is a priority queue */
    ck_assert_int_eq(aq_config_band_of(&cfg, 9), 0);
    aq_config_free(&cfg);
    teardown();
    ck_assert_int_eq(aq_config_load(&cfg, write_conf("amqp = { queue_type = \"quorum\"; };\n"), err, sizeof err),
                     AQ_OK);
    ck_assert_int_eq(aq_config_bands(&cfg), 3);
    int bands[10];
    for (int p = 0; p < 10; p++) bands[p] = aq_config_band_of(&cfg, p);
    ck_assert_int_eq(bands[0], 0);
    ck_assert_int_eq(bands[3], 0);
    ck_assert_int_eq(bands[4], 1);
    ck_assert_int_eq(bands[6], 1);
    ck_assert_int_eq(bands[7], 2);
    ck_assert_int_eq(bands[9], 2);
    ck_assert_int_eq(aq_config_band_of(&cfg, 42), 2); /* clamped */
    aq_config_free(&cfg);
}
END_TEST


/* A fleet of providers: OpenAI (bearer), Azure OpenAI (api-key header,
 * api-version, {model} deployments) and a local server (no key). */
static const char providers_conf[] =
    "llm = { model = \"gpt-4o\"; };\n"
    "providers = (\n"
    "  { name = \"openai\"; base_url = \"https://api.openai.com/v1\"; api_key_env = \"OPENAI_API_KEY\";\n"
    "    models = ( { name = \"gpt-4o\"; requests_per_minute = 500; tokens_per_minute = 30000;\n"
    "                 input_per_mtok = 2.5; output_per_mtok = 10.0; },\n"
    "               { name = \"gpt-4o-mini\"; input_per_mtok = 0.15; output_per_mtok = 0.6; } ); },\n"
    "  { name = \"azure\"; base_url = \"https://r.openai.azure.com/openai/deployments/{model}\";\n"
    "    api_key_env = \"AZURE_OPENAI_API_KEY\"; auth = \"header\"; auth_header = \"api-key\";\n"
    "    query = \"api-version=2024-10-21\"; weight = 3;\n"
    "    models = ( { name = \"gpt-4o\"; upstream = \"gpt4o-prod\"; max_concurrent = 20;\n"
    "                 input_per_mtok = 2.5; output_per_mtok = 10; } ); },\n"
    "  { name = \"local\"; base_url = \"http://127.0.0.1:8000/v1\"; auth = \"none\";\n"
    "    models = ( { name = \"llama-3.1-8b\"; upstream = \"meta-llama/Llama-3.1-8B-Instruct\";\n"
    "                 input_per_mtok = 0.0; output_per_mtok = 0.0; } ); }\n"
    ");\n";

START_TEST(providers_list)
{
    aq_config cfg;
    char err[512] = "";
    ck_assert_msg(aq_config_load(&cfg, write_conf(providers_conf), err, sizeof err) == AQ_OK, "%s", err);
    int n;
    aq_provider *pv = aq_config_providers(&cfg, &n);
    ck_assert_int_eq(n, 3);
    ck_assert_str_eq(pv[0].name, "openai");
    ck_assert_int_eq(pv[0].auth, AQ_AUTH_BEARER);
    ck_assert(!pv[0].shared_limits);
    ck_assert_int_eq(pv[0].n_models, 2);
    ck_assert_int_eq(pv[0].models[0].rpm, 500);
    ck_assert_int_eq(pv[0].models[0].tpm, 30000);
    ck_assert_str_eq(pv[0].models[0].upstream, "gpt-4o"); /* upstream defaults to the name */
    ck_assert_int_eq(pv[1].auth, AQ_AUTH_HEADER);
    ck_assert_str_eq(pv[1].auth_header, "api-key");
    ck_assert_str_eq(pv[1].query, "api-version=2024-10-21");
    ck_assert_int_eq(pv[1].weight, 3);
    ck_assert_str_eq(pv[1].models[0].upstream, "gpt4o-prod");
    ck_assert_int_eq(pv[1].models[0].max_concurrent, 20);
    ck_assert_double_eq(pv[1].models[0].price_out, 10.0); /* an integer price reads as a number */
    ck_assert_int_eq(pv[2].auth, AQ_AUTH_NONE);
    aq_config_providers_free(pv, n);
    char *models = aq_config_task_models(&cfg);
    ck_assert_str_eq(models, "gpt-4o,gpt-4o-mini,llama-3.1-8b");
    free(models);
    aq_config_free(&cfg);
}
END_TEST

/* Each mistake stops the program naming file, line and key. */
START_TEST(providers_errors)
{
    struct {
        const char *text, *want1, *want2;
    } cases[] = {
        {"providers = ( { name = \"a\"; base_url = \"http://x/v1\"; models = ( { name = \"m\"; input_per_mtok = 1.0;"
         " output_per_mtok = 1.0; } ); },\n"
         "  { name = \"a\"; base_url = \"http://y/v1\"; models = ( { name = \"m\"; input_per_mtok = 1.0;"
         " output_per_mtok = 1.0; } ); } );\n",
         ":2: key 'providers[1].name'", "declared twice"},
        {"providers = ( { name = \"a\"; base_url = \"http://x/v1\";\n auth = \"basic\";\n"
         " models = ( { name = \"m\"; input_per_mtok = 1.0; output_per_mtok = 1.0; } ); } );\n",
         ":2: key 'providers[0].auth'", "unknown auth style 'basic'"},
        {"providers = ( { name = \"a\"; base_url = \"http://x/v1\";\n"
         " models = ( { name = \"m\";\n requests_per_minute = -5; input_per_mtok = 1.0; output_per_mtok = 1.0; } );"
         " } );\n",
         ":3: key 'providers[0].models[0].requests_per_minute'", "must be from 0"},
        {"providers = ( { name = \"a\"; base_url = \"http://x/v1\";\n"
         " models = (\n { name = \"gpt-4o\"; input_per_mtok = 2.5; } ); } );\n",
         ":3: key 'providers[0].models[0]'", "model 'gpt-4o' of provider 'a' has no price"},
        {"llm = { model = \"nowhere\"; };\n"
         "providers = ( { name = \"a\"; base_url = \"http://x/v1\";\n"
         " models = ( { name = \"m\"; input_per_mtok = 1.0; output_per_mtok = 1.0; } ); } );\n",
         "key 'llm.model'", "model 'nowhere' is served by no provider"},
        {"providers = ( { name = \"a\"; base_url = \"http://x/v1\";\n keys = 3;\n"
         " models = ( { name = \"m\"; input_per_mtok = 1.0; output_per_mtok = 1.0; } ); } );\n",
         ":2: key 'providers[0].keys'", "unknown (known: name, base_url"},
        {"llm = { model = \"gpt-4o\"; };\n", "key 'llm.prices'", "model 'gpt-4o' has no price"},
        {"retention = { older_than = \"30 days\"; };\n", "key 'retention.older_than'", "'30 days' is not a duration"},
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(cases); i++) {
        const char *err = load_error(cases[i].text);
        ck_assert_msg(strstr(err, cases[i].want1) && strstr(err, cases[i].want2) && strstr(err, path),
                      "case %zu: %s", i, err);
        teardown();
    }
}
END_TEST

/* A price of 0 is a price when it is said; a model without one is not
 * silently priced. */
START_TEST(prices_are_explicit)
{
    aq_config cfg;
    char err[512] = "";
    ck_assert_msg(aq_config_load(&cfg, write_conf("llm = { model = \"local\"; price_input_per_mtok = 0.0;"
                                                  " price_output_per_mtok = 0.0; };\n"),
                                 err, sizeof err) == AQ_OK, "%s", err);
    aq_config_free(&cfg);
    teardown();
    ck_assert_ptr_nonnull(strstr(load_error("llm = { model = \"x\"; price_input_per_mtok = 1.0; };\n"),
                                 "set both or neither"));
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

/* postgres.pool_mode and postgres.listen_dsn: the defaults leave both as
 * before; a file or the environment sets them; the listen DSN falls back
 * to postgres.dsn and is masked in the dump like it. */
START_TEST(pool_mode_and_listen_dsn)
{
    aq_config cfg;
    char err[256] = "";
    ck_assert_int_eq(aq_config_load(&cfg, NULL, err, sizeof err), AQ_OK);
    ck_assert_str_eq(cfg.pg_pool_mode, "session");
    ck_assert_str_eq(cfg.pg_listen_dsn, "");
    ck_assert(!aq_config_pg_transaction_pool(&cfg));
    ck_assert_ptr_eq(aq_config_listen_dsn(&cfg), cfg.pg_dsn);
    aq_config_free(&cfg);

    const char *conf = write_conf("postgres: { dsn = \"host=pgbouncer port=6432 dbname=agentq\";"
                                  " pool_mode = \"transaction\";"
                                  " listen_dsn = \"host=pg dbname=agentq password=listen9\"; };\n");
    ck_assert_msg(aq_config_load(&cfg, conf, err, sizeof err) == AQ_OK, "%s", err);
    ck_assert(aq_config_pg_transaction_pool(&cfg));
    ck_assert_str_eq(aq_config_listen_dsn(&cfg), "host=pg dbname=agentq password=listen9");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    aq_config_dump(&cfg, f);
    fclose(f);
    ck_assert_ptr_null(strstr(buf, "listen9"));
    ck_assert_ptr_nonnull(strstr(buf, "pool_mode = \"transaction\""));
    free(buf);
    aq_config_free(&cfg);

    setenv("AGENTQ_POSTGRES_POOL_MODE", "session", 1);
    setenv("AGENTQ_POSTGRES_LISTEN_DSN", "host=other", 1);
    ck_assert_msg(aq_config_load(&cfg, conf, err, sizeof err) == AQ_OK, "%s", err);
    ck_assert(!aq_config_pg_transaction_pool(&cfg));
    ck_assert_str_eq(aq_config_listen_dsn(&cfg), "host=other");
    unsetenv("AGENTQ_POSTGRES_POOL_MODE");
    unsetenv("AGENTQ_POSTGRES_LISTEN_DSN");
    aq_config_free(&cfg);
}
END_TEST

/* A pool_mode that is neither, or "transaction" with nowhere to LISTEN,
 * stops the program naming the key and the value. */
START_TEST(pool_mode_errors)
{
    const char *err = load_error("postgres: { pool_mode = \"statement\"; };\n");
    ck_assert_msg(strstr(err, "postgres.pool_mode") && strstr(err, "'statement'") && strstr(err, "'session'"), "%s",
                  err);
    err = load_error("postgres: { pool_mode = \"transaction\"; };\n");
    ck_assert_msg(strstr(err, "postgres.pool_mode") && strstr(err, "'transaction'") && strstr(err, "postgres.listen_dsn"),
                  "%s", err);
    aq_config cfg;
    char e[256] = "";
    setenv("AGENTQ_POSTGRES_POOL_MODE", "Transaction", 1);
    ck_assert_int_eq(aq_config_load(&cfg, NULL, e, sizeof e), AQ_EINVAL);
    ck_assert_msg(strstr(e, "postgres.pool_mode") && strstr(e, "'Transaction'"), "%s", e);
    unsetenv("AGENTQ_POSTGRES_POOL_MODE");
    aq_config_free(&cfg);
}
END_TEST

static Suite *config_suite(void)
{
    const TTest *core[] = {defaults_without_file, file_then_env_then_set, lists_and_prices,
                           list_membership, example_parses_back, dump_masks_passwords, pool_mode_and_listen_dsn};
    const TTest *limits[] = {bounds_name_file_line_key, cross_checks, providers_list, providers_errors,
                             prices_are_explicit};
    const TTest *errors[] = {unknown_key_named, syntax_error_has_line, wrong_types, amqp_url_lists_nodes, queue_type_and_bands,
                             bad_env_value_named, missing_file, pool_mode_errors};
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
