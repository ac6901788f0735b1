/* pgconn.h — how agentq connects to PostgreSQL, in one place: the store,
 * the cancel watcher, the fleet limiter, migrations, agentqctl and the
 * producer all connect through aq_pg_connect().
 *
 * A connection is made without blocking (PQconnectStartParams and poll)
 * and within a deadline, so a database address that drops packets never
 * hangs its caller, and a caller that is shutting down cuts the attempt
 * short through its stop callback. Defaults the DSN can override: an
 * application_name, TCP keepalives (a peer that went away is noticed
 * within about 25 s instead of the kernel's two hours). Server notices go
 * to the log as one line instead of raw to stderr.
 *
 * aq_pg_backoff spaces out reconnects: doubling from min to max, half of
 * each delay fixed and half random, so replicas that lost the same server
 * do not come back in step.
 *
 * What it does not own: what a caller does with the connection (pipeline
 * mode, LISTEN, prepared statements), its threads, or when to give up. */
#ifndef AGENTQ_PGCONN_H
#define AGENTQ_PGCONN_H

#include "agentq/common.h"

#include <libpq-fe.h>

typedef struct aq_pg_connect_opts {
    const char *application_name; /* a string that outlives the connection
                                   * (it names the notices in the log);
                                   * NULL: "agentq" */
    int timeout_ms;               /* the whole attempt; <= 0: 10000 */
    bool (*stop)(void *arg);      /* polled every 100 ms while connecting:
                                   * true gives up; NULL: never */
    void *stop_arg;
} aq_pg_connect_opts;

/* Connects to `dsn` (a libpq connection string or URI). Returns a
 * connection in CONNECTION_OK state, in blocking mode, that the caller
 * frees with PQfinish(); or NULL with `err` saying why (libpq's message on
 * one line; it names the host, never the password). `o` may be NULL. */
PGconn *aq_pg_connect(const char *dsn, const aq_pg_connect_opts *o, char *err,
                      size_t errlen);

/* aq_pg_connect for a command-line program: on failure prints
 * "PROGRAM: cannot connect to Postgres (DSN without its password): why"
 * to stderr and returns NULL. `program` also names the connection. */
PGconn *aq_pg_connect_cli(const char *dsn, const char *program);

typedef struct aq_pg_backoff {
    int min_ms, max_ms;
    int cur_ms;        /* 0 until the first delay */
    unsigned int rnd;  /* rand_r state */
} aq_pg_backoff;

/* Starts a backoff at min_ms, doubling to max_ms (both clamped to >= 1). */
void aq_pg_backoff_init(aq_pg_backoff *b, int min_ms, int max_ms);

/* The delay before the next attempt, in ms: the current step's half plus a
 * random part of the other half; then the step doubles. */
int aq_pg_backoff_next(aq_pg_backoff *b);

/* Back to min_ms (after a connection was made). */
void aq_pg_backoff_reset(aq_pg_backoff *b);

#endif
