/* cancelwatch.c — LISTEN agentq_cancel on a thread of its own (see
 * cancelwatch.h). Owns the thread and its connection; hands task ids to
 * the loop through a mailbox. The connection is a session of its own
 * (the worker gives it postgres.listen_dsn): through a pooler in
 * transaction mode a LISTEN would stay behind in a server session that
 * the pooler hands to others, and its notifications reach nobody. */
#include "agentq/cancelwatch.h"
#include "agentq/log.h"
#include "agentq/mailbox.h"
#include "agentq/pgconn.h"

#include <poll.h>
#include <stdatomic.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct aq_cancelwatch {
    char *dsn, *worker_id;
    pthread_t thread;
    aq_mailbox *ids;   /* thread -> loop: task ids (strings) */
    aq_mailbox *stop;  /* loop -> thread: wake-up to quit */
    atomic_bool quit;
    void (*cb)(const char *, void *);
    void *arg;
};

static void deliver(void *item, void *arg)
{
    aq_cancelwatch *w = arg;
    w->cb(item, w->arg);
    free(item);
}

/* Waits up to ms, waking early when asked to quit. */
static void nap(aq_cancelwatch *w, int ms)
{
    struct pollfd pf = {aq_mailbox_fd(w->stop), POLLIN, 0};
    poll(&pf, 1, ms);
}

static bool quitting(void *arg) { return atomic_load(&((aq_cancelwatch *)arg)->quit); }

static PGconn *connect_and_listen(aq_cancelwatch *w)
{
    char err[512];
    aq_pg_connect_opts o = {.application_name = "agentq-worker-cancel", .stop = quitting, .stop_arg = w};
    PGconn *pg = aq_pg_connect(w->dsn, &o, err, sizeof err);
    if (!pg) {
        aq_log(AQ_LOG_DEBUG, "cancel watcher: cannot connect to PostgreSQL: %s", err);
        return NULL;
    }
    PGresult *r = PQexec(pg, "LISTEN agentq_cancel");
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok) {
        PQfinish(pg);
        return NULL;
    }
    /* Requests made while nobody listened. */
    const char *params[] = {w->worker_id};
    r = PQexecParams(pg,
                     "SELECT task_id::text FROM agentq.tasks WHERE cancel_requested AND status = 'running'"
                     " AND worker_id = $1",
                     1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) == PGRES_TUPLES_OK)
        for (int i = 0; i < PQntuples(r); i++) aq_mailbox_push(w->ids, aq_xstrdup(PQgetvalue(r, i, 0)));
    PQclear(r);
    return pg;
}

static void *thread_main(void *arg)
{
    aq_cancelwatch *w = arg;
    PGconn *pg = NULL;
    aq_pg_backoff backoff;
    aq_pg_backoff_init(&backoff, 100, 5000);
    while (!atomic_load(&w->quit)) {
        if (!pg) {
            pg = connect_and_listen(w);
            if (!pg) {
                nap(w, aq_pg_backoff_next(&backoff));
                continue;
            }
            aq_pg_backoff_reset(&backoff);
        }
        struct pollfd pf[2] = {{PQsocket(pg), POLLIN, 0}, {aq_mailbox_fd(w->stop), POLLIN, 0}};
        poll(pf, 2, 5000);
        if (atomic_load(&w->quit)) break;
        if (!PQconsumeInput(pg) || PQstatus(pg) != CONNECTION_OK) {
            PQfinish(pg);
            pg = NULL;
            continue;
        }
        PGnotify *n;
        while ((n = PQnotifies(pg))) {
            if (n->extra && *n->extra) aq_mailbox_push(w->ids, aq_xstrdup(n->extra));
            PQfreemem(n);
        }
    }
    PQfinish(pg);
    return NULL;
}

aq_cancelwatch *aq_cancelwatch_new(const char *dsn, const char *worker_id, struct event_base *base,
                                   void (*cb)(const char *, void *), void *arg, char *err, size_t errlen)
{
    aq_cancelwatch *w = aq_xcalloc(1, sizeof *w);
    w->dsn = aq_xstrdup(dsn);
    w->worker_id = aq_xstrdup(worker_id);
    w->cb = cb;
    w->arg = arg;
    w->ids = aq_mailbox_new();
    w->stop = aq_mailbox_new();
    if (!w->ids || !w->stop || aq_mailbox_attach(w->ids, base, deliver, w) != AQ_OK ||
        pthread_create(&w->thread, NULL, thread_main, w) != 0) {
        aq_seterr(err, errlen, "cannot start the cancel watcher");
        aq_mailbox_free(w->ids, free);
        aq_mailbox_free(w->stop, free);
        free(w->dsn);
        free(w->worker_id);
        free(w);
        return NULL;
    }
    return w;
}

void aq_cancelwatch_free(aq_cancelwatch *w)
{
    if (!w) return;
    atomic_store(&w->quit, true);
    aq_mailbox_push(w->stop, aq_xstrdup("quit"));
    pthread_join(w->thread, NULL);
    aq_mailbox_free(w->ids, free); /* ids the loop has not taken */
    aq_mailbox_free(w->stop, free);
    free(w->dsn);
    free(w->worker_id);
    free(w);
}
