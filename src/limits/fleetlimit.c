/* fleetlimit.c — leases from the fleet's shared buckets (see
 * fleetlimit.h). Owns the leasing thread, its connection and the two
 * mailboxes; the local limiter owns the waiting sessions. */
#include "agentq/fleetlimit.h"
#include "agentq/log.h"
#include "agentq/mailbox.h"
#include "agentq/pgconn.h"

#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { MSG_NEED, MSG_PAUSE, MSG_QUIT } msg_kind;

typedef struct msg {
    msg_kind kind;
    int64_t ms;
    bool need_req, need_tok;
    double requests, tokens; /* a grant, thread -> loop */
} msg;

struct aq_fleetlimit {
    char *dsn;
    char req_name[128], tok_name[128];
    int64_t rpm, tpm;
    double lease_req, lease_tok;
    aq_ratelimit *rl;
    pthread_t thread;
    aq_mailbox *to_thread, *to_loop;
    atomic_bool quitting;    /* set before MSG_QUIT: cuts a connect short */
    /* thread-only */
    PGconn *pg;
    bool need_req, need_tok;
    int64_t pause_ms;
};

static bool quitting(void *arg) { return atomic_load(&((aq_fleetlimit *)arg)->quitting); }

/* Runs a one-value query; returns the value as a double, NAN on NULL or
 * error (the connection is dropped on error). */
static double query_value(aq_fleetlimit *f, const char *sql, int n, const char *const *params)
{
    PGresult *r = PQexecParams(f->pg, sql, n, NULL, params, NULL, NULL, 0);
    double v = NAN;
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
        if (PQntuples(r) && !PQgetisnull(r, 0, 0)) v = atof(PQgetvalue(r, 0, 0));
    } else {
        aq_log(AQ_LOG_WARN, "fleet limiter: %s", PQresultErrorMessage(r));
        PQfinish(f->pg);
        f->pg = NULL;
    }
    PQclear(r);
    return v;
}

static bool ensure_conn(aq_fleetlimit *f)
{
    if (f->pg && PQstatus(f->pg) == CONNECTION_OK) return true;
    if (f->pg) PQfinish(f->pg);
    char err[512];
    aq_pg_connect_opts o = {.application_name = "agentq-worker-limits", .stop = quitting, .stop_arg = f};
    if (!(f->pg = aq_pg_connect(f->dsn, &o, err, sizeof err))) {
        aq_log(AQ_LOG_DEBUG, "fleet limiter: cannot connect to PostgreSQL: %s", err);
        return false;
    }
    /* Capacity one second's worth: the fleet never bursts past the limit
     * by more than that in any minute. Every worker defines the same. */
    const char *names[] = {f->req_name, f->tok_name};
    int64_t limits[] = {f->rpm, f->tpm};
    for (int i = 0; i < 2; i++) {
        if (!limits[i]) continue;
        char cap[64], refill[64];
        double per_s = (double)limits[i] / 60.0;
        snprintf(cap, sizeof cap, "%.6f", per_s > 1 ? per_s : 1);
        snprintf(refill, sizeof refill, "%.6f", per_s);
        const char *p[] = {names[i], cap, refill};
        if (isnan(query_value(f, "SELECT 1 FROM agentq.define_bucket($1, $2::float8, $3::float8)", 3, p)) && !f->pg)
            return false;
    }
    return true;
}

static void lease(aq_fleetlimit *f, const char *name, double want, double *got)
{
    char w[64];
    snprintf(w, sizeof w, "%.6f", want);
    const char *p[] = {name, w};
    double v = query_value(f, "SELECT agentq.take_tokens($1, $2::float8)", 2, p);
    *got = isnan(v) ? 0 : v;
}

static void *thread_main(void *arg)
{
    aq_fleetlimit *f = arg;
    bool quit = false;
    int backoff = 20;
    while (!quit) {
        void **items;
        size_t n = aq_mailbox_take(f->to_thread, &items);
        for (size_t i = 0; i < n; i++) {
            msg *m = items[i];
            if (m->kind == MSG_QUIT) quit = true;
            else if (m->kind == MSG_NEED) {
                f->need_req |= m->need_req;
                f->need_tok |= m->need_tok;
            }
            else if (m->kind == MSG_PAUSE && m->ms > f->pause_ms) f->pause_ms = m->ms;
            free(m);
        }
        free(items);
        if (quit) break;
        bool need = f->need_req || f->need_tok;
        if ((need || f->pause_ms) && !ensure_conn(f)) {
            struct pollfd pf = {aq_mailbox_fd(f->to_thread), POLLIN, 0};
            poll(&pf, 1, 500);
            continue;
        }
        if (f->pause_ms) {
            char ms[32];
            snprintf(ms, sizeof ms, "%lld", (long long)f->pause_ms);
            const char *names[] = {f->req_name, f->tok_name};
            int64_t limits[] = {f->rpm, f->tpm};
            for (int i = 0; i < 2; i++) {
                if (!limits[i]) continue;
                const char *p[] = {names[i], ms};
                query_value(f,
                            "SELECT extract(epoch FROM agentq.pause_bucket($1,"
                            " clock_timestamp() + $2::bigint * interval '1 millisecond'))",
                            2, p);
            }
            f->pause_ms = 0;
        }
        if (need) {
            double got_req = 0, got_tok = 0;
            if (f->rpm && f->need_req) lease(f, f->req_name, f->lease_req, &got_req);
            if (f->tpm && f->need_tok) lease(f, f->tok_name, f->lease_tok, &got_tok);
            if (got_req > 0 || got_tok > 0) {
                msg *m = aq_xcalloc(1, sizeof *m);
                m->requests = got_req;
                m->tokens = got_tok;
                aq_mailbox_push(f->to_loop, m);
                /* The limiter asks again for whatever is still short. */
                f->need_req = f->need_tok = false;
                backoff = 20;
            } else {
                /* Empty or paused: come back when a lease has refilled. */
                struct pollfd pf = {aq_mailbox_fd(f->to_thread), POLLIN, 0};
                poll(&pf, 1, backoff);
                backoff = backoff < 200 ? backoff * 2 : 200;
            }
            continue;
        }
        struct pollfd pf = {aq_mailbox_fd(f->to_thread), POLLIN, 0};
        poll(&pf, 1, 1000);
    }
    return NULL;
}

static void on_grant(void *item, void *arg)
{
    aq_fleetlimit *f = arg;
    msg *m = item;
    aq_ratelimit_credit(f->rl, m->requests, m->tokens);
    free(m);
}

static void send_msg(aq_fleetlimit *f, msg_kind kind, int64_t ms, bool req, bool tok)
{
    msg *m = aq_xcalloc(1, sizeof *m);
    m->kind = kind;
    m->ms = ms;
    m->need_req = req;
    m->need_tok = tok;
    aq_mailbox_push(f->to_thread, m);
}

static void on_need(void *arg, bool requests, bool tokens) { send_msg(arg, MSG_NEED, 0, requests, tokens); }
static void on_pause(void *arg, int64_t ms) { send_msg(arg, MSG_PAUSE, ms, false, false); }

aq_fleetlimit *aq_fleetlimit_new(const aq_fleetlimit_config *cfg, aq_ratelimit *rl, struct event_base *base,
                                 char *err, size_t errlen)
{
    aq_fleetlimit *f = aq_xcalloc(1, sizeof *f);
    f->dsn = aq_xstrdup(cfg->dsn);
    snprintf(f->req_name, sizeof f->req_name, "%s:requests", cfg->bucket);
    snprintf(f->tok_name, sizeof f->tok_name, "%s:tokens", cfg->bucket);
    f->rpm = cfg->rpm;
    f->tpm = cfg->tpm;
    /* A lease is a tenth of a second's worth: small enough that workers
     * share fairly, large enough that the database sees few calls. */
    f->lease_req = ceil((double)cfg->rpm / 600.0);
    f->lease_tok = ceil((double)cfg->tpm / 600.0);
    if (f->lease_req < 1) f->lease_req = 1;
    if (f->lease_tok < 1) f->lease_tok = 1;
    f->rl = rl;
    f->to_thread = aq_mailbox_new();
    f->to_loop = aq_mailbox_new();
    if (!f->to_thread || !f->to_loop || aq_mailbox_attach(f->to_loop, base, on_grant, f) != AQ_OK ||
        pthread_create(&f->thread, NULL, thread_main, f) != 0) {
        aq_seterr(err, errlen, "cannot start the fleet rate limiter");
        aq_mailbox_free(f->to_thread, free);
        aq_mailbox_free(f->to_loop, free);
        free(f->dsn);
        free(f);
        return NULL;
    }
    aq_rl_source src = {on_need, on_pause, f};
    aq_ratelimit_set_source(rl, &src);
    return f;
}

void aq_fleetlimit_free(aq_fleetlimit *f)
{
    if (!f) return;
    atomic_store(&f->quitting, true);
    send_msg(f, MSG_QUIT, 0, false, false);
    pthread_join(f->thread, NULL);
    PQfinish(f->pg);
    aq_mailbox_free(f->to_thread, free);
    aq_mailbox_free(f->to_loop, free); /* grants the loop has not taken */
    free(f->dsn);
    free(f);
}
