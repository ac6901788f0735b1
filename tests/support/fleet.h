/* fleet.h — one integration test's own agentq on the `servers` fixture:
 * a fresh database with every migration, AMQP names of its own (a prefix
 * on the exchange and every queue, so tests never see each other's
 * messages), a log directory, an optional agentq-mockllm, and the
 * environment (AGENTQ_*) that the test's workers, producer and agentqctl,
 * and the test's own in-process aq_config_load, all read.
 *
 * The settings go into this process's environment with setenv, which the
 * programs a test spawns inherit; Check runs each test in a child of its
 * own, so one test's settings end with it. */
#ifndef AGENTQ_TEST_FLEET_H
#define AGENTQ_TEST_FLEET_H

#include "agentq/common.h" /* AQ_PRINTF */
#include "proc.h"

#include <stddef.h>

typedef struct aq_fleet {
    char *dsn;           /* the test's database */
    char prefix[48];     /* its database, exchange and queue-name prefix */
    char logdir[256];    /* its programs' logs: <AGENTQ_TEST_DIR>/logs/<prefix> */
    int mock_port;       /* 0 until aq_fleet_start_mock */
    aq_test_proc *mock;
} aq_fleet;

/* Makes the database (prefix "<tag><pid>_<n>_<name>"), the log directory
 * and the AMQP names: exchange, queue, dlx, dead queue, retry and lane
 * prefixes, 4 lanes, a 1 s retry tier, the fixture's broker and database. */
void aq_fleet_setup(aq_fleet *f, const char *tag, const char *name);

/* Starts agentq-mockllm with `flags` (NULL-terminated, may be NULL) and
 * points AGENTQ_LLM_BASE_URL at it. */
void aq_fleet_start_mock(aq_fleet *f, const char *const *flags);

/* Stops the mock and frees; the database and logs stay for a post-mortem. */
void aq_fleet_teardown(aq_fleet *f);

/* Sets one AGENTQ_* variable (or any other) for the test and its programs. */
void aq_fleet_set(const char *name, const char *value);

/* The path of log `name` (<logdir>/<name>.log) in buf. */
const char *aq_fleet_log(const aq_fleet *f, const char *name, char *buf, size_t len);

/* Starts agentq-worker (`--config conf` when conf is not NULL) with the
 * test's environment plus `extra_env`, logging to log `name`. */
aq_test_proc *aq_fleet_worker(const aq_fleet *f, const char *name, const char *conf,
                              const char *const *extra_env);

/* Runs agentq-producer with `args`, its stderr appended to log
 * "producer"; returns its exit status and the first task id it printed
 * in id (37 bytes; may be NULL). */
int aq_fleet_produce(const aq_fleet *f, const char *const *args, char *id);

/* The first value of a query (printf-style) on the test's database, as
 * text ("" for NULL or no row), in a static buffer; and an assertion that
 * it is `want`, naming the query and both values when it is not. */
const char *aq_fleet_value(const aq_fleet *f, const char *fmt, ...) AQ_PRINTF(2, 3);
void aq_fleet_assert_pg(const aq_fleet *f, const char *want, const char *fmt, ...) AQ_PRINTF(3, 4);

#endif
