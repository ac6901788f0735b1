/* testenv.h — what tests share: paths of built programs and the private
 * RabbitMQ and PostgreSQL started by scripts/testenv (integration tests).
 *
 * The servers' coordinates come from the env file scripts/testenv writes
 * (the build's testenv/env, or $AGENTQ_TEST_ENV_FILE); a variable of the
 * same name in the process environment wins, so a test can be pointed at
 * other servers by hand. */
#ifndef AGENTQ_TESTENV_H
#define AGENTQ_TESTENV_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>

/* Runs every test of `s` (forked, as Check does by default), frees the
 * runner and returns the process exit status: what every suite's main()
 * returns. */
int aq_test_run(Suite *s);

/* aq_test_run for suites that make HTTP requests to servers they start on
 * 127.0.0.1: no proxy from the environment may carry those elsewhere,
 * SIGPIPE is ignored (servers write to clients that went away), logs show
 * warnings and worse, and libcurl is initialised. */
int aq_test_run_http(Suite *s);

struct event_base;

/* Runs `base` until *count reaches want or timeout_ms pass (a 10 ms tick
 * keeps it waking to look); true if the count was reached. */
bool aq_test_loop_until(struct event_base *base, const int *count, int want, int timeout_ms);

/* Runs `base` for ms milliseconds. */
void aq_test_loop_for(struct event_base *base, int ms);

/* The port a socket is bound to (tests listen on 127.0.0.1:0). */
int aq_test_bound_port(int fd);

/* A TCP socket on 127.0.0.1 at a free port (into *port); the caller
 * closes it. With backlog > 0 it listens and never accepts: a connection
 * completes the handshake and then nothing ever answers. With backlog 0
 * it is only bound: a connect to the port is refused, and while the
 * socket is open nothing else can take the port. Fails the current test
 * if it cannot. */
int aq_test_loopback_socket(int backlog, int *port);

struct event_base;
struct evhttp;
struct evhttp_request;
/* An in-process HTTP server on 127.0.0.1:0 taking GET and POST: cb(req,
 * arg) runs for every request; *port gets the port. Caller frees with
 * evhttp_free(). Fails the current test if it cannot listen. */
struct evhttp *aq_test_httpd(struct event_base *base, void (*cb)(struct evhttp_request *, void *), void *arg,
                             int *port);

/* The same on `host`, an IP literal ("127.0.0.1", "fd00::2"). */
struct evhttp *aq_test_httpd_on(struct event_base *base, const char *host,
                                void (*cb)(struct evhttp_request *, void *), void *arg, int *port);

/* The first address of this machine's own interfaces that is not loopback
 * (getifaddrs order; an IPv6 link-local one is skipped, as it needs a
 * scope to connect), as text into buf. Returns false, with why the
 * search failed in buf, when there is none: a test then skips. */
bool aq_test_own_addr(char *buf, size_t len);

/* "http://HOST:PORT" + path into buf, with HOST in brackets when it is an
 * IPv6 literal; returns buf. */
const char *aq_test_url(char *buf, size_t len, const char *host, int port, const char *path);

/* Path of a built executable (e.g. "agentq-mockllm"); static buffer. */
const char *aq_test_bin(const char *name);

/* The value of `key` (e.g. "AGENTQ_TEST_PG_DSN"), or NULL when the
 * servers are not running. Borrowed; valid for the process's lifetime. */
const char *aq_test_env(const char *key);

/* Like aq_test_env(), but fails the current Check test with a message
 * saying how to start the servers when the key is missing. */
const char *aq_test_env_require(const char *key);

/* Creates an empty database with a unique name starting with `prefix`
 * (lower-cased, non-alphanumerics become '_') on the test PostgreSQL and
 * returns a superuser DSN for it (caller frees with free()). Fails the
 * current Check test if it cannot. The database is left behind: the
 * whole cluster goes away with `scripts/testenv stop`. */
char *aq_test_fresh_db(const char *prefix);

/* The same DSN as `dsn` (a key=value string) but logging in as `user`
 * (caller frees with free()). */
char *aq_test_dsn_as(const char *dsn, const char *user);

/* Runs `sql` on `dsn` (its own short connection) and returns the first
 * column of the first row as text (caller frees with free()), or NULL
 * when there is no row or the value is NULL. Fails the current Check test
 * if the statement fails. */
char *aq_test_pg_value(const char *dsn, const char *sql);

/* Runs `sql` on `dsn`; returns 0, or -1 with PostgreSQL's message in
 * `err` (may be NULL) — for statements a test expects to be refused. */
int aq_test_pg_exec(const char *dsn, const char *sql, char *err, size_t errlen);

#endif
