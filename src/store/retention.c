/* retention.c — agentq.prune() on a timer, on a thread of its own (see
 * retention.h). Owns the thread and its connection; shares nothing with
 * the loop but the stop mailbox. */
#include "agentq/retention.h"
#include "agentq/log.h"
#include "agentq/mailbox.h"
#include "agentq/pgconn.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct aq_retention {
    char *dsn;
    long long older_than_s;
    int interval_s, batch;
    pthread_t thread;
    aq_mailbox *stop; /* loop -> thread: wake up to quit */
    atomic_bool quit;
    PGconn *pg;       /* thread only */
};

static bool quitting(void *arg) { return atomic_load(&((aq_retention *)arg)->quit); }

/* One batch: what it deleted, in t[0..2] (tasks, steps, dead letters).
 * false when the database refused or went away. */
static bool prune_batch(aq_retention *r, const char *cutoff, long long *t)
{
    char batch[16];
    snprintf(batch, sizeof batch, "%d", r->batch);
    const char *p[] = {cutoff, batch};
    PGresult *res = PQexecParams(r->pg, "SELECT tasks, steps, dead_letters FROM agentq.prune($1::timestamptz, $2::int)",
                                 2, NULL, p, NULL, NULL, 0);
    bool ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
    if (ok)
        for (int i = 0; i < 3; i++) t[i] = atoll(PQgetvalue(res, 0, i));
    else
        aq_log(AQ_LOG_WARN, "retention: agentq.prune: %s", PQresultErrorMessage(res));
    PQclear(res);
    return ok;
}

/* A round: the cutoff is fixed once, then batches until one is short. */
static void round_once(aq_retention *r)
{
    if (!r->pg || PQstatus(r->pg) != CONNECTION_OK) {
        PQfinish(r->pg);
        char err[512];
        aq_pg_connect_opts o = {.application_name = "agentq-worker-retention", .stop = quitting, .stop_arg = r};
        if (!(r->pg = aq_pg_connect(r->dsn, &o, err, sizeof err))) {
            aq_log(AQ_LOG_DEBUG, "retention: cannot connect to PostgreSQL: %s", err);
            return;
        }
    }
    char secs[32];
    snprintf(secs, sizeof secs, "%lld", r->older_than_s);
    const char *p[] = {secs};
    PGresult *res = PQexecParams(r->pg, "SELECT (now() - $1::bigint * interval '1 second')::text", 1, NULL, p, NULL,
                                 NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        aq_log(AQ_LOG_WARN, "retention: %s", PQresultErrorMessage(res));
        PQclear(res);
        PQfinish(r->pg);
        r->pg = NULL;
        return;
    }
    char *cutoff = aq_xstrdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    long long total[3] = {0, 0, 0}, t[3];
    while (!quitting(r) && prune_batch(r, cutoff, t)) {
        for (int i = 0; i < 3; i++) total[i] += t[i];
        if (t[0] < r->batch && t[2] < r->batch) break;
    }
    if (total[0] || total[2])
        aq_log(AQ_LOG_INFO, "retention: deleted %lld tasks (%lld steps) finished before %s and %lld dead letters",
               total[0], total[1], cutoff, total[2]);
    free(cutoff);
}

static void *thread_main(void *arg)
{
    aq_retention *r = arg;
    while (!quitting(r)) {
        struct pollfd pf = {aq_mailbox_fd(r->stop), POLLIN, 0};
        long long ms = (long long)r->interval_s * 1000;
        poll(&pf, 1, ms > 0x7fffffff ? 0x7fffffff : (int)ms);
        if (quitting(r)) break;
        round_once(r);
    }
    return NULL;
}

aq_retention *aq_retention_new(const char *dsn, long long older_than_s, int interval_s, int batch, char *err,
                               size_t errlen)
{
    aq_retention *r = aq_xcalloc(1, sizeof *r);
    r->dsn = aq_xstrdup(dsn);
    r->older_than_s = older_than_s;
    r->interval_s = interval_s;
    r->batch = batch > 0 ? batch : 1000;
    if (!(r->stop = aq_mailbox_new()) || pthread_create(&r->thread, NULL, thread_main, r) != 0) {
        aq_seterr(err, errlen, "cannot start the retention thread");
        aq_mailbox_free(r->stop, free);
        free(r->dsn);
        free(r);
        return NULL;
    }
    return r;
}

void aq_retention_free(aq_retention *r)
{
    if (!r) return;
    atomic_store(&r->quit, true);
    aq_mailbox_push(r->stop, aq_xstrdup("quit"));
    pthread_join(r->thread, NULL);
    PQfinish(r->pg);
    aq_mailbox_free(r->stop, free);
    free(r->dsn);
    free(r);
}
