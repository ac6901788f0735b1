/* dashboard.h — the web dashboard behind `agentqctl dashboard`: an evhttp
 * server on the caller's event loop that serves one page (HTML, CSS and
 * JS compiled into the program) and the JSON API the page's script reads:
 * queue depths, throughput, running tasks, today's LLM calls and the rate
 * limits; the task list, one task with its step timeline; dead letters.
 * With an admin token it also cancels tasks and requeues dead letters.
 *
 * Threads: the server runs on the loop of the event_base it is given and
 * never blocks it. The database reads, the broker's passive declares and
 * the actions run on a few threads of its own, each with its own
 * connections (made when first needed, made again after a failure); a
 * finished request is handed back to the loop (mailbox.h) and answered
 * there. The management API is read on the loop (http.h).
 *
 * Connections and roles: reads go through postgres.dsn, which should log
 * in as a member of agentq_reader (the connection is also set read-only);
 * actions go through the writer DSN given as `admin_dsn` (a member of
 * agentq_worker), and only for a request whose `Authorization: Bearer`
 * token equals `admin_token` (compared in constant time). Without a token
 * every action answers 403. Actions are agentqctl's own statements
 * (src/dash/dashboard.sql): a cancel sets cancel_requested, a requeue
 * publishes the dead letter's body to the task exchange with publisher
 * confirms, as `agentqctl requeue` does.
 *
 * What the page may contain is user text (goals, results, errors, dead
 * letter bodies): the JSON answers escape <, > and & as well, every
 * answer carries a Content-Security-Policy without inline script and
 * X-Content-Type-Options: nosniff, and the page's script only ever sets
 * textContent. docs/dashboard.md describes the pages and the API. */
#ifndef AGENTQ_DASHBOARD_H
#define AGENTQ_DASHBOARD_H

#include "agentq/common.h"
#include "agentq/config.h"

#include <stdio.h>

struct event_base;

typedef struct aq_dashboard aq_dashboard;

/* All strings borrowed for the aq_dashboard_new() call (copied). */
typedef struct aq_dashboard_opts {
    const char *listen;         /* HOST:PORT (an IP literal or a name; port 0:
                                 * any free one, see aq_dashboard_port) */
    const char *admin_token;    /* NULL or "": read-only, every action 403 */
    const char *admin_dsn;      /* the writer DSN actions use; NULL or "":
                                 * postgres.dsn */
    const char *management_url; /* RabbitMQ management API base URL; NULL:
                                 * amqp.management_url; "": none (ready
                                 * counts from passive declares, no unacked) */
    const char *allow_host;     /* a Host name (without port) accepted on a
                                 * loopback listener besides loopback
                                 * addresses and "localhost"; NULL: none */
    int threads;                /* backend threads; <= 0: 2 */
} aq_dashboard_opts;

/* Listens and serves on `base` (borrowed: it must outlive the dashboard).
 * `cfg` is borrowed and must outlive the dashboard too (queue names,
 * postgres.dsn, amqp.url). Returns NULL and fills err when the address
 * cannot be listened on or the options are wrong. No database or broker is
 * contacted here: a page that finds either away says so and asks again on
 * its next refresh. The caller frees with aq_dashboard_free(). */
aq_dashboard *aq_dashboard_new(struct event_base *base, const aq_config *cfg, const aq_dashboard_opts *opts,
                               char *err, size_t errlen);

/* The port it listens on (the one picked when asked for port 0). */
int aq_dashboard_port(const aq_dashboard *d);

/* Stops listening, waits for the backend threads (a statement in flight
 * ends within its statement_timeout, 10 s), answers every request still
 * open with 503 (its client may see the connection close first: the
 * connections close here, without running the loop again) and frees
 * everything. Call on the loop's thread, outside the loop's callbacks of
 * this dashboard. NULL is ignored. */
void aq_dashboard_free(aq_dashboard *d);

/* `agentqctl dashboard [--listen HOST:PORT] [--admin-token-env NAME]
 * [--admin-dsn-env NAME] [--allow-host NAME] [--port-file FILE]`: parses
 * its flags (argv[0] is the command's name, as in main), runs the
 * dashboard on a loop of its own until SIGINT or SIGTERM, and returns the
 * exit status: 0 after a signal, 2 for a usage or configuration error
 * (unknown flag, a token variable that is unset or shorter than 16 bytes,
 * an address that cannot be listened on). --help prints the usage to
 * stdout and returns 0. `cfg` is borrowed. */
int aq_dashboard_main(const aq_config *cfg, int argc, char **argv);

/* Prints the usage of aq_dashboard_main to `out`. */
void aq_dashboard_usage(FILE *out);

/* ---- the pure parts, public for tests (tests/check_dashboard.c) ---- */

/* True when `authorization` (the request's Authorization header, NULL if
 * absent) is "Bearer TOKEN" (the scheme in any case, one or more spaces)
 * with TOKEN equal to `want`. Always false when `want` is NULL or "".
 * The comparison takes the same time whatever the bytes are. */
bool aq_dashboard_authorized(const char *want, const char *authorization);

/* `json` (valid JSON text, len bytes) with <, > and & written as \u003c,
 * \u003e, \u0026 and the line separators U+2028 and U+2029 as \u2028 and
 * \u2029: the same value, which no HTML or script parser can take for
 * markup even if a browser were to sniff the answer. They can only occur
 * inside strings, so the bytes are replaced wherever they are. Returns a
 * NUL-terminated copy the caller frees with free(); *outlen (may be NULL)
 * gets its length. */
char *aq_dashboard_json_harden(const char *json, size_t len, size_t *outlen);

/* Whether a loopback listener answers a request with this Host header
 * (NULL: none, as HTTP/1.0 allows): a loopback address (127.0.0.0/8,
 * ::1, with or without a port), "localhost", or `allow` (may be NULL),
 * in any case. A page on another name that resolves to 127.0.0.1 (DNS
 * rebinding) would otherwise read the API as if it were the dashboard's. */
bool aq_dashboard_host_allowed(const char *host, const char *allow);

#define AQ_DASHBOARD_PAGE_DEFAULT 50
#define AQ_DASHBOARD_PAGE_MAX 200

/* GET /api/tasks: status, user, from, to, before, limit. Empty strings
 * are "not given". */
typedef struct aq_dashboard_task_query {
    char status[32];     /* a status name (status.h) */
    char user[129];      /* a user_id, 1-128 bytes */
    char from[48];       /* ISO 8601 time: listed at or after */
    char to[48];         /* ISO 8601 time: listed before */
    char before_at[48];  /* the cursor: the last row's listed_at ... */
    char before_id[40];  /* ... and task_id */
    int limit;           /* 1..AQ_DASHBOARD_PAGE_MAX, default _DEFAULT */
} aq_dashboard_task_query;

/* GET /api/dead-letters: reason, parked (1/0/true/false), before (an id), limit. */
typedef struct aq_dashboard_dead_query {
    char reason[33];     /* [a-z_], 1-32 bytes */
    bool parked;         /* only those not requeued; default false */
    int64_t before;      /* id below which the page starts; 0: newest */
    int limit;
} aq_dashboard_dead_query;

/* Parse a query string (without the '?'; NULL or "" for none; percent
 * and '+' decoding done here). Unknown names are ignored (a cache buster
 * is harmless); a known one with a bad value fails: AQ_EINVAL and err
 * names the parameter and the rule, e.g. "status: no status 'done'". */
int aq_dashboard_parse_task_query(const char *query, aq_dashboard_task_query *q, char *err,
                                  size_t errlen) AQ_MUSTCHECK;
int aq_dashboard_parse_dead_query(const char *query, aq_dashboard_dead_query *q, char *err,
                                  size_t errlen) AQ_MUSTCHECK;

/* The SQL of the section `-- name: NAME` of src/dash/dashboard.sql as
 * compiled in, or NULL. Borrowed, valid for the process's lifetime. */
const char *aq_dashboard_sql(const char *name);

/* An asset the server would answer `path` with ("/", "/app.js", ...):
 * its bytes (borrowed, static) and *len and *content_type; NULL when
 * there is none. */
const char *aq_dashboard_asset(const char *path, size_t *len, const char **content_type);

#endif
