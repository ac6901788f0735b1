/* fleet.c — a test's own agentq on the `servers` fixture (see fleet.h). */
#include "fleet.h"
#include "agentq/migrate.h"
#include "testenv.h"

#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

void aq_fleet_set(const char *name, const char *value) { ck_assert_int_eq(setenv(name, value, 1), 0); }

/* AGENTQ_<key> = <prefix><suffix> */
static void set_name(const aq_fleet *f, const char *var, const char *suffix)
{
    char v[160];
    snprintf(v, sizeof v, "%s%s", f->prefix, suffix);
    aq_fleet_set(var, v);
}

void aq_fleet_setup(aq_fleet *f, const char *tag, const char *name)
{
    static int seq;
    memset(f, 0, sizeof *f);
    snprintf(f->prefix, sizeof f->prefix, "%s%d_%d_%s", tag, (int)getpid(), ++seq, name);
    f->dsn = aq_test_fresh_db(f->prefix);
    int applied = 0;
    char err[1024], cmd[400];
    ck_assert_msg(aq_migrate_apply(f->dsn, aq_migrate_default_dir(), &applied, err, sizeof err) == 0, "%s", err);
    snprintf(f->logdir, sizeof f->logdir, "%s/logs/%s", aq_test_env_require("AGENTQ_TEST_DIR"), f->prefix);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", f->logdir);
    ck_assert_int_eq(system(cmd), 0);

    aq_fleet_set("AGENTQ_AMQP_URL", aq_test_env_require("AGENTQ_TEST_AMQP_URL"));
    aq_fleet_set("AGENTQ_POSTGRES_DSN", f->dsn);
    set_name(f, "AGENTQ_AMQP_EXCHANGE", "");
    set_name(f, "AGENTQ_AMQP_QUEUE", ".tasks");
    set_name(f, "AGENTQ_AMQP_DLX", ".dlx");
    set_name(f, "AGENTQ_AMQP_DEAD_QUEUE", ".dead");
    set_name(f, "AGENTQ_AMQP_RETRY_PREFIX", ".retry.");
    set_name(f, "AGENTQ_AMQP_LANE_PREFIX", ".lane.");
    aq_fleet_set("AGENTQ_AMQP_LANES", "4");
    aq_fleet_set("AGENTQ_AMQP_RETRY_DELAYS", "1s");
}

void aq_fleet_start_mock(aq_fleet *f, const char *const *flags)
{
    char log[300], url[128];
    f->mock = aq_test_start_mock(flags, aq_fleet_log(f, "mock", log, sizeof log), &f->mock_port);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", f->mock_port);
    aq_fleet_set("AGENTQ_LLM_BASE_URL", url);
}

void aq_fleet_teardown(aq_fleet *f)
{
    aq_test_proc_free(f->mock);
    f->mock = NULL;
    free(f->dsn);
    f->dsn = NULL;
}

const char *aq_fleet_log(const aq_fleet *f, const char *name, char *buf, size_t len)
{
    snprintf(buf, len, "%s/%s.log", f->logdir, name);
    return buf;
}

aq_test_proc *aq_fleet_worker(const aq_fleet *f, const char *name, const char *conf,
                              const char *const *extra_env)
{
    char log[300];
    const char *argv[] = {aq_test_bin("agentq-worker"), conf ? "--config" : NULL, conf, NULL};
    return aq_test_spawn(argv, extra_env, aq_fleet_log(f, name, log, sizeof log));
}

int aq_fleet_produce(const aq_fleet *f, const char *const *args, char *id)
{
    char log[300], out[300], cmd[4096];
    aq_fleet_log(f, "producer", log, sizeof log);
    snprintf(out, sizeof out, "%s/producer.out", f->logdir);
    int n = snprintf(cmd, sizeof cmd, "'%s'", aq_test_bin("agentq-producer"));
    for (int i = 0; args[i]; i++) n += snprintf(cmd + n, sizeof cmd - (size_t)n, " '%s'", args[i]);
    snprintf(cmd + n, sizeof cmd - (size_t)n, " >'%s' 2>>'%s'", out, log);
    int rc = system(cmd);
    if (id) {
        FILE *o = fopen(out, "r");
        ck_assert_ptr_nonnull(o);
        ck_assert_msg(fscanf(o, "%36s", id) == 1, "producer printed no id");
        fclose(o);
    }
    return WEXITSTATUS(rc);
}

const char *aq_fleet_value(const aq_fleet *f, const char *fmt, ...)
{
    static char buf[4096];
    char sql[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    char *v = aq_test_pg_value(f->dsn, sql);
    snprintf(buf, sizeof buf, "%s", v ? v : "");
    free(v);
    return buf;
}

void aq_fleet_assert_pg(const aq_fleet *f, const char *want, const char *fmt, ...)
{
    char sql[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    char *v = aq_test_pg_value(f->dsn, sql);
    ck_assert_msg(v && !strcmp(v, want), "%s: got '%s', want '%s'", sql, v ? v : "(null)", want);
    free(v);
}
