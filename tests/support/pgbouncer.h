/* pgbouncer.h — a real PgBouncer in front of the `servers` fixture's
 * PostgreSQL, for tests that run agentq through a pooler: one process per
 * call, on a free 127.0.0.1 port, with its config and auth file in a
 * directory of its own under AGENTQ_TEST_DIR and its log where the test
 * says. Every database of the test PostgreSQL is served under its own
 * name (user postgres, auth_type trust, as the fixture's server has it),
 * plus the aliases a test asks for, each with a pool size of its own.
 *
 * PgBouncer refuses to run as root: a test running as root starts it as
 * the postgres user (the fixture's servers run as that user too). It dies
 * with the test process, whatever way that ends. */
#ifndef AGENTQ_TEST_PGBOUNCER_H
#define AGENTQ_TEST_PGBOUNCER_H

#include <stdbool.h>
#include <stddef.h>

typedef struct aq_test_pgbouncer aq_test_pgbouncer;

/* An extra [databases] entry: `alias` served by database `dbname` with a
 * pool of `pool_size` server connections. */
typedef struct aq_test_pgb_db {
    const char *alias;
    const char *dbname;
    int pool_size;
} aq_test_pgb_db;

/* The pgbouncer executable ($AGENTQ_TEST_PGBOUNCER, else
 * /usr/sbin/pgbouncer, else `pgbouncer` on PATH), or NULL when there is
 * none. Static buffer. */
const char *aq_test_pgbouncer_bin(void);

/* Starts pgbouncer with `pool_mode` ("transaction", "session") and
 * default_pool_size `pool_size`, plus the `n` entries of `dbs` (may be
 * NULL), logging to `log_path`, and waits until it answers. Fails the
 * current test if it cannot. The caller stops it with
 * aq_test_pgbouncer_stop(). */
aq_test_pgbouncer *aq_test_pgbouncer_start(const char *pool_mode, int pool_size, const aq_test_pgb_db *dbs,
                                           size_t n, const char *log_path);

int aq_test_pgbouncer_port(const aq_test_pgbouncer *b);

/* `dsn` (a DSN of the test PostgreSQL) through pgbouncer: its host and
 * port replaced, and its dbname by `alias` when that is not NULL. The
 * caller frees it with free(). */
char *aq_test_pgbouncer_dsn(const aq_test_pgbouncer *b, const char *dsn, const char *alias);

/* The database name `dsn` names, into buf (NUL-terminated); returns buf. */
const char *aq_test_dsn_dbname(const char *dsn, char *buf, size_t len);

/* What SHOW POOLS says of database `db`'s pools: client connections
 * (active and waiting) and server connections (in any state). Fails the
 * current test if the admin console does not answer. */
void aq_test_pgbouncer_pool(const aq_test_pgbouncer *b, const char *db, int *clients, int *servers);

/* Stops pgbouncer (immediate shutdown), reaps it and frees. NULL is a no-op. */
void aq_test_pgbouncer_stop(aq_test_pgbouncer *b);

#endif
