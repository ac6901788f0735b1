/* fleetlimit.c — leases from the fleet's shared buckets (see
 * fleetlimit.h). Owns the leasing thread, its connection and the two
 * mailboxes; the local limiter owns the waiting sessions.
 *
 * The connection LISTENs, so it needs a session of its own: the worker
 * gives it postgres.listen_dsn (aq_config_listen_dsn), which behind a
 * pooler in transaction mode names Postgres itself or a session-mode
 * pool. Nothing else here keeps session state: every other statement is
 * unnamed and its own transaction. */
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

typedef enum { MSG_NEED, MSG_PAUSE, MSG_LIMITS, MSG_CLAMP, MSG_QUIT, /* loop -> thread */
               MSG_GRANT, MSG_PAUSED /* thread -> loop */ } msg_kind;

typedef struct msg {
    msg_kind kind;
    int64_t ms;
    bool need_req, need_tok;
    double requests, tokens; /* a grant; a clamp (< 0: none); new limits */
    double until_epoch;      /* MSG_PAUSED: when the fleet's pause ends (database clock) */
} msg;

struct aq_fleetlimit {
    char *dsn;
    char req_name[128], tok_name[128];
    int64_t rpm, tpm;
    double lease_req, lease_tok;
    aq_ratelimit *rl;
    int pool;
    int64_t known_until_us;  /* loop: the fleet pause already in force (mono) */
    pthread_t thread;
    aq_mailbox *to_thread, *to_loop;
    atomic_bool quitting;    /* set before MSG_QUIT: cuts a connect short */
    /* thread-only */
    PGconn *pg;
    bool need_req, need_tok;
    int64_t pause_ms;
    bool define;             /* the buckets' limits changed: define them again */
    double clamp_req, clamp_tok; /* < 0: none pending */
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

/* Makes the buckets carry the limits now known. Every worker defines the
 * same at start; a lower limit a provider reported lowers them for all. */
static bool define_buckets(aq_fleetlimit *f)
{
    /* Capacity one second's worth: the fleet never bursts past the limit
     * by more than that in any minute. */
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
    f->define = false;
    return true;
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
    /* Pauses other workers set reach this one at once; one missed while
     * the connection was down ends by itself (take_tokens grants nothing
     * while the bucket is paused). */
    PGresult *r = PQexec(f->pg, "LISTEN agentq_limits");
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok) {
        aq_log(AQ_LOG_WARN, "fleet limiter: LISTEN agentq_limits: %s", PQerrorMessage(f->pg));
        PQfinish(f->pg);
        f->pg = NULL;
        return false;
    }
    return define_buckets(f);
}

/* Hands the loop every pause of this bucket the fleet announced. */
static void read_notifies(aq_fleetlimit *f)
{
    if (!f->pg) return;
    PQconsumeInput(f->pg);
    PGnotify *n;
    while ((n = PQnotifies(f->pg))) {
        /* payload: "<bucket name> <paused_until as epoch seconds>" */
        const char *sp = strrchr(n->extra, ' ');
        size_t nl = sp ? (size_t)(sp - n->extra) : 0;
        bool mine = sp && ((strlen(f->req_name) == nl && !strncmp(n->extra, f->req_name, nl)) ||
                           (strlen(f->tok_name) == nl && !strncmp(n->extra, f->tok_name, nl)));
        if (mine) {
            msg *m = aq_xcalloc(1, sizeof *m);
            m->kind = MSG_PAUSED;
            m->until_epoch = atof(sp + 1);
            aq_mailbox_push(f->to_loop, m);
        }
        PQfreemem(n);
    }
}

/* Waits up to `ms` for the loop's next message or a notification. */
static void wait_input(aq_fleetlimit *f, int ms)
{
    struct pollfd pf[2] = {{aq_mailbox_fd(f->to_thread), POLLIN, 0}, {-1, POLLIN, 0}};
    int n = 1;
    if (f->pg && PQsocket(f->pg) >= 0) {
        pf[1].fd = PQsocket(f->pg);
        n = 2;
    }
    poll(pf, (nfds_t)n, ms);
    if (n == 2 && pf[1].revents) read_notifies(f);
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
            } else if (m->kind == MSG_PAUSE && m->ms > f->pause_ms) {
                f->pause_ms = m->ms;
            } else if (m->kind == MSG_LIMITS) {
                if (m->requests >= 0) f->rpm = (int64_t)m->requests;
                if (m->tokens >= 0) f->tpm = (int64_t)m->tokens;
                f->define = true;
            } else if (m->kind == MSG_CLAMP) {
                if (m->requests >= 0 && (f->clamp_req < 0 || m->requests < f->clamp_req)) f->clamp_req = m->requests;
                if (m->tokens >= 0 && (f->clamp_tok < 0 || m->tokens < f->clamp_tok)) f->clamp_tok = m->tokens;
            }
            free(m);
        }
        free(items);
        if (quit) break;
        if (!ensure_conn(f)) {
            wait_input(f, 500);
            continue;
        }
        if (f->define && !define_buckets(f)) continue;
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
        if (f->clamp_req >= 0 || f->clamp_tok >= 0) {
            const char *names[] = {f->req_name, f->tok_name};
            double vals[] = {f->clamp_req, f->clamp_tok};
            int64_t limits[] = {f->rpm, f->tpm};
            for (int i = 0; i < 2; i++) {
                if (!limits[i] || vals[i] < 0) continue;
                char v[64];
                snprintf(v, sizeof v, "%.6f", vals[i]);
                const char *p[] = {names[i], v};
                query_value(f, "SELECT agentq.clamp_bucket($1, $2::float8)", 2, p);
            }
            f->clamp_req = f->clamp_tok = -1;
        }
        read_notifies(f); /* those that came in with the replies */
        bool need = f->need_req || f->need_tok;
        if (need && f->pg) {
            double got_req = 0, got_tok = 0;
            if (f->rpm && f->need_req) lease(f, f->req_name, f->lease_req, &got_req);
            if (f->tpm && f->need_tok) lease(f, f->tok_name, f->lease_tok, &got_tok);
            if (got_req > 0 || got_tok > 0) {
                msg *m = aq_xcalloc(1, sizeof *m);
                m->kind = MSG_GRANT;
                m->requests = got_req;
                m->tokens = got_tok;
                aq_mailbox_push(f->to_loop, m);
                /* The limiter asks again for whatever is still short. */
                f->need_req = f->need_tok = false;
                backoff = 20;
            } else {
                /* Empty or paused: come back when a lease has refilled. */
                wait_input(f, backoff);
                backoff = backoff < 200 ? backoff * 2 : 200;
            }
            continue;
        }
        wait_input(f, 1000);
    }
    return NULL;
}

static void on_grant(void *item, void *arg)
{
    aq_fleetlimit *f = arg;
    msg *m = item;
    if (m->kind == MSG_GRANT) {
        aq_ratelimit_credit(f->rl, f->pool, m->requests, m->tokens);
    } else if (m->kind == MSG_PAUSED) {
        int64_t ms = (int64_t)(m->until_epoch * 1000.0 - (double)aq_now_us() / 1000.0);
        if (ms > 0) {
            /* Known now: on_pause does not send it back. */
            f->known_until_us = aq_mono_us() + ms * 1000;
            aq_ratelimit_pause(f->rl, f->pool, ms);
        }
    }
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

static void on_pause(void *arg, int64_t ms)
{
    aq_fleetlimit *f = arg;
    /* A pause the fleet announced (MSG_PAUSED) comes back through the
     * limiter; sending it again would announce it again, for ever. */
    if (aq_mono_us() + ms * 1000 <= f->known_until_us + 50000) return;
    send_msg(f, MSG_PAUSE, ms, false, false);
}

void aq_fleetlimit_set_limits(aq_fleetlimit *f, int64_t rpm, int64_t tpm)
{
    msg *m = aq_xcalloc(1, sizeof *m);
    m->kind = MSG_LIMITS;
    m->requests = (double)rpm;
    m->tokens = (double)tpm;
    aq_mailbox_push(f->to_thread, m);
}

void aq_fleetlimit_clamp(aq_fleetlimit *f, double requests, double tokens)
{
    msg *m = aq_xcalloc(1, sizeof *m);
    m->kind = MSG_CLAMP;
    m->requests = requests;
    m->tokens = tokens;
    aq_mailbox_push(f->to_thread, m);
}

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
    f->pool = cfg->pool;
    f->clamp_req = f->clamp_tok = -1;
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
    aq_ratelimit_set_source(rl, cfg->pool, &src);
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
