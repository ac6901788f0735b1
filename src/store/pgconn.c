/* pgconn.c — connecting to PostgreSQL without blocking (see pgconn.h).
 * Owns nothing beyond a call: no threads, no state between connections. */
#include "agentq/pgconn.h"
#include "agentq/log.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PG_CONNECT_TIMEOUT_DEFAULT_MS 10000
#define PG_POLL_SLICE_MS 100

/* libpq's messages span lines; `out` gets one line. */
static void one_line(char *out, size_t len, const char *in)
{
    size_t o = 0;
    bool space = false;
    for (const char *p = in && *in ? in : "unknown error"; *p && o + 1 < len; p++) {
        if (*p == '\n' || *p == '\r' || *p == '\t' || *p == ' ') {
            space = o > 0;
            continue;
        }
        if (space && o + 2 < len) out[o++] = ' ';
        space = false;
        out[o++] = *p;
    }
    out[o] = '\0';
}

static void on_notice(void *arg, const char *message)
{
    char msg[1024];
    one_line(msg, sizeof msg, message);
    aq_log(AQ_LOG_INFO, "%s: PostgreSQL says: %s", (const char *)arg, msg);
}

PGconn *aq_pg_connect(const char *dsn, const aq_pg_connect_opts *o, char *err, size_t errlen)
{
    aq_pg_connect_opts none = {0};
    if (!o) o = &none;
    const char *app = o->application_name ? o->application_name : "agentq";
    int timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : PG_CONNECT_TIMEOUT_DEFAULT_MS;
    /* Defaults first: with expand_dbname, what the DSN says overrides them. */
    const char *const kw[] = {"application_name", "keepalives", "keepalives_idle", "keepalives_interval",
                              "keepalives_count", "dbname", NULL};
    const char *const val[] = {app, "1", "10", "5", "3", dsn ? dsn : "", NULL};
    int64_t deadline = aq_mono_us() + (int64_t)timeout_ms * 1000;

    PGconn *c = PQconnectStartParams(kw, val, 1);
    if (!c) aq_oom("a PostgreSQL connection");
    PostgresPollingStatusType ps = PQstatus(c) == CONNECTION_BAD ? PGRES_POLLING_FAILED : PGRES_POLLING_WRITING;
    const char *why = NULL;
    while (ps != PGRES_POLLING_OK && ps != PGRES_POLLING_FAILED) {
        struct pollfd pfd = {.fd = PQsocket(c), .events = ps == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        int pr = pfd.fd >= 0 ? poll(&pfd, 1, PG_POLL_SLICE_MS) : 1;
        if (pr < 0 && errno != EINTR) {
            why = strerror(errno);
            break;
        }
        if (o->stop && o->stop(o->stop_arg)) {
            why = "gave up connecting: shutting down";
            break;
        }
        if (aq_mono_us() >= deadline) {
            aq_seterr(err, errlen, "timed out connecting after %d ms", timeout_ms);
            PQfinish(c);
            return NULL;
        }
        if (pr > 0) ps = PQconnectPoll(c);
    }
    if (ps == PGRES_POLLING_OK) {
        PQsetNoticeProcessor(c, on_notice, (void *)app);
        return c;
    }
    char msg[512];
    one_line(msg, sizeof msg, why ? why : PQerrorMessage(c));
    aq_seterr(err, errlen, "%s", msg);
    PQfinish(c);
    return NULL;
}

PGconn *aq_pg_connect_cli(const char *dsn, const char *program)
{
    char why[512];
    aq_pg_connect_opts o = {.application_name = program};
    PGconn *pg = aq_pg_connect(dsn, &o, why, sizeof why);
    if (!pg) {
        char shown[512], msg[1024];
        aq_log_redact(dsn, shown, sizeof shown);
        aq_log_redact(why, msg, sizeof msg);
        fprintf(stderr, "%s: cannot connect to Postgres (%s): %s\n", program, shown, msg);
    }
    return pg;
}

void aq_pg_backoff_init(aq_pg_backoff *b, int min_ms, int max_ms)
{
    b->min_ms = min_ms > 0 ? min_ms : 1;
    b->max_ms = max_ms > b->min_ms ? max_ms : b->min_ms;
    b->cur_ms = 0;
    b->rnd = (unsigned int)(aq_now_us() ^ ((uint64_t)getpid() << 16));
}

int aq_pg_backoff_next(aq_pg_backoff *b)
{
    b->cur_ms = b->cur_ms ? b->cur_ms * 2 : b->min_ms;
    if (b->cur_ms > b->max_ms) b->cur_ms = b->max_ms;
    int half = b->cur_ms / 2;
    return half + (int)(rand_r(&b->rnd) % (unsigned)(b->cur_ms - half + 1));
}

void aq_pg_backoff_reset(aq_pg_backoff *b) { b->cur_ms = 0; }
