/* worker.c — deliveries in, sessions run, rows committed, acks out (see
 * worker.h).
 *
 * Owns: the jobs (one per task in flight, found by task id so a second
 * delivery of a task this process runs is settled here without a claim),
 * the lease timer (renewals and the sweeper), the drain timer, and the
 * modules it wires. Every ack happens in a store callback (after COMMIT)
 * or a publish confirm, never before; a delivery is acked only by the
 * attempt that committed the task's final row, as a duplicate of a task
 * that is final or runs under another live lease, or once a confirmed
 * copy of it exists. Anything else goes back to the queue, where the next
 * claim decides. */
#include "agentq/worker.h"
#include "agentq/agent.h"
#include "agentq/cancelwatch.h"
#include "agentq/consumer.h"
#include "agentq/fairq.h"
#include "agentq/router.h"
#include "agentq/http.h"
#include "agentq/log.h"
#include "agentq/prom.h"
#include "agentq/ratelimit.h"
#include "agentq/retention.h"
#include "agentq/skill.h"
#include "agentq/store.h"
#include "agentq/strmap.h"
#include "agentq/task.h"

#include <dirent.h>
#include <event2/event.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

/* One delivery being handled: a task of a lane (held, then claimed, run
 * and recorded), a message of the ingress queue being routed, or a swept
 * task being published again. */
typedef struct job {
    aq_worker *w;
    aq_delivery *d;        /* NULL for a swept copy's publish */
    char swept[AQ_TASK_ID_LEN + 1]; /* that copy's task id (task is NULL) */
    aq_task *task;
    aq_session *session;
    int attempt;           /* the row's, from the claim */
    int failures;          /* failed attempts before this one, from the claim */
    double run_seconds;    /* earlier attempts' running time, from the claim */
    bool handing_over;     /* its session goes to a new delivery (hand-over) */
    int dup_checks;        /* claims again of a redelivered copy that found a live lease */
    char *error;           /* kept across the retry publish */
    bool in_map;
    bool routing;          /* an ingress message on its way to a lane */
    aq_fairq_item *held;   /* waiting for a slot (or for its user's cap) */
    int64_t held_since_us; /* when it was first held (mono) */
    int64_t started_us;    /* when its session started (mono) */
    aq_status dead_status; /* a dead letter that ends its task so: counted once recorded */
    bool active;           /* holds one of worker.concurrency slots */
    struct job *next_waiting; /* scratch list (collect_job) */
} job;

/* Most rows of the table of unlabelled series (flat_rows). */
#define FLAT_MAX 48

/* The families of /metrics. Those of the first group are recorded as
 * things happen (a step row, a session's start and end, a final status);
 * the others are read from the modules' own counters at each scrape
 * (aq_worker_metrics), which keeps the modules free of the registry. */
typedef struct metric_families {
    aq_prom_family *finished, *queue_wait, *run_time, *llm_requests, *token_usage_total, *op_duration,
        *token_usage, *tool_calls, *tool_duration, *grant_wait;
    aq_prom_family *flat[FLAT_MAX];
    size_t nflat;
    aq_prom_family *route_calls, *route_tokens, *route_cost, *route_open, *route_in_flight, *route_limit,
        *saturation;
    aq_prom_family *build_info, *rss, *open_fds, *max_fds;
} metric_families;

struct aq_worker {
    const aq_config *cfg;
    struct event_base *base;
    char worker_id[256];
    aq_http *http;
    aq_skills *skills;
    aq_router *router;     /* providers, their limits, the cache */
    aq_llm_cache cache;    /* the router's view of the store's cache verbs */
    char *task_models;     /* models tasks may name */
    aq_engine *engine;
    aq_store *store;
    aq_consumer *consumer;
    aq_cancelwatch *cancels;
    aq_retention *retention; /* retention.older_than set: prunes old rows */
    aq_strmap *jobs;       /* task_id -> job, while held, claimed or running */
    aq_fairq *held;        /* lane deliveries waiting for a slot */
    bool *paused;          /* lanes not consumed while their users wait on a cap */
    int npaused;
    int active;            /* jobs holding a slot (claim, run, record) */
    size_t pending;        /* jobs alive (claim, run, finish, publish) */
    long retry_delays[32];
    int nretry_delays;
    char *skill_names;
    bool draining, drain_expired;
    struct event *drain_ev;
    struct event *lease_ev;
    struct event *unblock_ev; /* users at their cap: claim again */
    struct event *start_ev;   /* fills free slots once the deliveries at hand are held */
    struct event *sweep_ev;   /* a sweep soon: a task was answered or cancelled */
    aq_worker_stats st;
    aq_prom *prom;            /* /metrics: the registry of m's families */
    metric_families m;
};

static void start_held(aq_worker *w);
static void count_finished(aq_worker *w, aq_status status);
static void count_step(aq_worker *w, const aq_step_event *e);
static bool metrics_new(aq_worker *w, char *err, size_t errlen);
static void start_soon(aq_worker *w);
static void wait_for_user(aq_worker *w, struct job *keep);
static void hold(struct job *j);
static void route(aq_worker *w, aq_delivery *d, aq_task *t);

static void job_free(job *j)
{
    aq_worker *w = j->w;
    if (j->held) aq_fairq_remove(w->held, j->held);
    if (j->in_map) aq_strmap_del(w->jobs, j->task->task_id);
    if (j->active) {
        /* A slot frees: a user that waited on its cap may fit now. */
        w->active--;
        aq_consumer_running(w->consumer, j->d, false);
        aq_fairq_finished(w->held, j->task->user_id);
        aq_fairq_block(w->held, j->task->user_id, false);
    }
    aq_delivery_free(j->d);
    aq_task_free(j->task);
    free(j->error);
    bool freed_slot = j->active;
    free(j);
    w->pending--;
    if (w->draining && w->pending == 0) {
        aq_log(AQ_LOG_INFO, "drained: no task in flight");
        event_base_loopexit(w->base, NULL);
        return;
    }
    if (freed_slot) start_soon(w);
}

static void ack(job *j) { aq_consumer_ack(j->w->consumer, j->d->tag); }

/* Sends the delivery back to the queue: whoever gets it next claims it,
 * and the row decides (final or running elsewhere: acked; else it runs). */
static void requeue(job *j) { aq_consumer_reject(j->w->consumer, j->d->tag, true); }

static void on_finished(void *arg, int code)
{
    job *j = arg;
    if (code == AQ_OK) {
        ack(j);
    } else {
        /* Not ours to ack: another attempt took the task over
         * (ENOTFOUND), or the write did not commit. */
        if (code == AQ_ENOTFOUND)
            aq_log_task(AQ_LOG_INFO, j->task->task_id, j->task->user_id,
                        "attempt %d lost the task to another attempt; its delivery goes back to the queue",
                        j->attempt);
        else
            aq_log_task(AQ_LOG_ERROR, j->task->task_id, j->task->user_id,
                        "could not record the task's status (%s); its delivery goes back to the queue",
                        aq_strerror(code));
        requeue(j);
    }
    job_free(j);
}

/* Writes the row's new status. A task that ends other than completed
 * (and not through the dead-letter exchange) gets its dead letter in the
 * same statement when `dead`, so every such task is in the parking lot
 * with the reason, and `agentqctl requeue` can send it back. */
static void record(job *j, aq_status status, const aq_session_result *r, const char *error, bool dead,
                   aq_store_done_cb cb)
{
    aq_store_result res = {
        .task_id = j->task->task_id,
        .attempt = j->attempt,
        .status = status,
        .steps = r ? r->totals.steps : 0,
        .prompt_tokens = r ? r->totals.prompt_tokens : 0,
        .completion_tokens = r ? r->totals.completion_tokens : 0,
        .cost_usd = r ? r->totals.cost_usd : 0,
        .result = r ? r->result : NULL,
        .error = error,
        .dead_body = dead ? j->d->body : NULL,
        .dead_len = dead ? j->d->len : 0,
        .run_seconds = r ? r->totals.run_seconds : j->run_seconds,
        .question = r ? r->question : NULL,
        .wait_seconds = j->task->wait_timeout_seconds,
        .handed_over = status == AQ_STATUS_QUEUED && j->handing_over,
    };
    if (aq_store_finish(j->w->store, &res, cb, j) != AQ_OK) {
        aq_log_task(AQ_LOG_ERROR, j->task->task_id, j->task->user_id, "store refused the status write");
        job_free(j);
    }
}

/* Requeue (drain) finishes by rejecting with requeue after the row says
 * queued again. */
static void on_requeued(void *arg, int code)
{
    job *j = arg;
    (void)code; /* requeued either way: the row decides at the next claim */
    requeue(j);
    job_free(j);
}

/* Publishes a copy of the job's message (its body, id, priority and
 * timestamp) with `headers`; the confirm reaches on_retry_published with
 * j as cookie. */
static void publish_copy(job *j, const char *exchange, const char *routing_key, json_t *headers)
{
    aq_publish p = {
        .exchange = exchange,
        .routing_key = routing_key,
        .body = j->d->body,
        .len = j->d->len,
        .message_id = j->task->task_id,
        .priority = j->task->priority,
        .timestamp = j->task->enqueued_at_us / 1000000,
        .headers = headers,
    };
    aq_consumer_publish(j->w->consumer, &p, j);
}

/* A hand-over's row says queued: a copy goes to the ingress queue (routed
 * to its user's lane like any task), and the original is acked once the
 * broker confirms it (on_retry_published). Not written: the original goes
 * back, and its next claim continues the session just the same. */
static void on_handed_over(void *arg, int code)
{
    job *j = arg;
    aq_worker *w = j->w;
    if (code != AQ_OK) {
        on_requeued(j, code);
        return;
    }
    /* The copy may come back here before its confirm: it is the task's
     * next delivery, not a duplicate of this one. */
    if (j->in_map) {
        aq_strmap_del(w->jobs, j->task->task_id);
        j->in_map = false;
    }
    json_t *h = json_pack("{s:s}", "x-agentq-reason", "handover");
    publish_copy(j, w->cfg->amqp_exchange, "task", h);
    json_decref(h);
}

/* Publishes a copy of the task's message to retry tier `tier` (its
 * queue's TTL is the wait) or, with tier < 0, to the dead-letter
 * exchange; headers say which attempt comes next and why, for people
 * (the row, not the headers, decides). The confirm reaches
 * on_retry_published with j as cookie. */
static void send_copy(job *j, int tier, int attempt, const char *error, const char *reason)
{
    aq_worker *w = j->w;
    char queue[256];
    json_t *h = json_object();
    json_object_set_new(h, "x-agentq-attempt", json_integer(attempt));
    if (error) json_object_set_new(h, "x-agentq-error", json_string(error));
    if (reason) json_object_set_new(h, "x-agentq-reason", json_string(reason));
    if (tier < 0) {
        publish_copy(j, w->cfg->amqp_dlx, "task", h);
    } else {
        aq_broker_retry_queue(w->cfg, w->retry_delays[tier < w->nretry_delays ? tier : w->nretry_delays - 1],
                              queue, sizeof queue);
        publish_copy(j, "", queue, h); /* the default exchange routes by queue name */
    }
    json_decref(h);
}

/* True when this failed attempt is the last amqp.max_attempts allow. */
static bool out_of_attempts(const job *j) { return j->failures + 1 >= j->w->cfg->amqp_max_attempts; }

/* Publishes the task again: to the retry tier of its failure count, or
 * (out of attempts) to the dead-letter exchange. The original is acked
 * after the confirm. */
static void republish(job *j, const char *error)
{
    j->error = aq_xstrdup(error ? error : "");
    if (out_of_attempts(j)) send_copy(j, -1, j->attempt, error, "failed");
    else send_copy(j, j->failures, j->attempt + 1, error, NULL);
}

static void on_retry_recorded(void *arg, int code)
{
    job *j = arg;
    /* A confirmed copy exists, so the original may go whatever the write
     * did: if it did not commit, the copy's claim takes the row over once
     * this worker's lease on it expires. */
    if (code != AQ_OK)
        aq_log_task(AQ_LOG_WARN, j->task->task_id, j->task->user_id,
                    "could not record the retry (%s); the published copy carries the task", aq_strerror(code));
    ack(j);
    job_free(j);
}

static void on_retry_published(void *cookie, bool ok, void *arg)
{
    job *j = cookie;
    if (!j->d) { /* a swept task published again */
        if (!ok)
            aq_log_task(AQ_LOG_WARN, j->swept, NULL,
                        "swept task not confirmed by the broker; the sweeper tries again later");
        job_free(j);
        return;
    }
    if (j->handing_over) { /* the continuation is queued: this delivery may go */
        if (ok) {
            ack(j);
            j->w->st.handed_over++;
        } else {
            aq_log_task(AQ_LOG_WARN, j->task->task_id, j->task->user_id,
                        "hand-over copy not confirmed; the delivery goes back to its queue");
            requeue(j);
        }
        job_free(j);
        return;
    }
    if (j->routing) { /* the lane has its copy: the ingress message may go */
        if (ok) {
            ack(j);
            j->w->st.routed++;
        } else {
            aq_log_task(AQ_LOG_WARN, j->task->task_id, j->task->user_id,
                        "lane publish not confirmed; the message goes back to %s", j->w->cfg->amqp_queue);
            requeue(j);
        }
        job_free(j);
        return;
    }
    if (!ok) {
        /* Not confirmed: leave the original unacked; it comes back. */
        aq_log_task(AQ_LOG_WARN, j->task->task_id, j->task->user_id, "retry publish not confirmed; the broker will redeliver");
        job_free(j);
        return;
    }
    bool dead = out_of_attempts(j);
    if (dead) {
        j->w->st.failed++;
        count_finished(j->w, AQ_STATUS_FAILED);
    } else {
        j->w->st.retried++;
    }
    /* out of attempts: the dead-letter consumer records the copy */
    record(j, dead ? AQ_STATUS_FAILED : AQ_STATUS_RETRYING, NULL, j->error, false, on_retry_recorded);
}

static void on_session_done(aq_session *s, const aq_session_result *r, void *arg)
{
    job *j = arg;
    aq_worker *w = j->w;
    j->session = NULL;
    w->st.running--;
    /* The attempt's running time, by how it ended: a retryable failure
     * is retrying, or failed when it was the last attempt (republish). */
    aq_status ended = !r->retryable ? r->status : out_of_attempts(j) ? AQ_STATUS_FAILED : AQ_STATUS_RETRYING;
    aq_prom_observe(aq_prom_with(w->m.run_time, (const char *[]){aq_status_name(ended)}),
                    (double)(aq_mono_us() - j->started_us) / 1e6);
    bool completed = r->status == AQ_STATUS_COMPLETED;
    aq_log_task(r->retryable || !completed ? AQ_LOG_INFO : AQ_LOG_DEBUG, j->task->task_id, j->task->user_id,
                "task %s after %d steps ($%.6f)%s%s", aq_status_name(r->status), r->totals.steps,
                r->totals.cost_usd, r->error ? ": " : "", r->error ? r->error : "");
    if (r->status == AQ_STATUS_QUEUED) {
        if (j->handing_over) { /* near the broker's consumer_timeout: a new delivery goes on */
            record(j, AQ_STATUS_QUEUED, r, NULL, false, on_handed_over);
            return;
        }
        /* drain ran out, or the lease was lost: back to the queue */
        record(j, AQ_STATUS_QUEUED, r, NULL, false, on_requeued);
        return;
    }
    if (r->status == AQ_STATUS_WAITING) { /* its slot is free; agentq.answer() sends it back */
        w->st.waiting++;
        record(j, AQ_STATUS_WAITING, r, NULL, false, on_finished);
        return;
    }
    if (r->retryable) {
        republish(j, r->error);
        return;
    }
    if (completed) w->st.completed++;
    else w->st.failed++;
    count_finished(w, r->status);
    record(j, r->status, r, r->error, !completed, on_finished);
}

/* Runs the claimed task, resuming from `past` (NULL: from the start). Its
 * deadline is what timeout_seconds leaves after the earlier attempts. */
static void start_session(job *j, const aq_session_past *past)
{
    aq_worker *w = j->w;
    w->st.running++;
    if (past && past->n) w->st.resumed++;
    j->started_us = aq_mono_us();
    /* From the enqueue (the message's timestamp: whole seconds) to this
     * attempt's start; a producer's clock ahead of ours reads as 0. */
    double waited = (double)(aq_now_us() - j->task->enqueued_at_us) / 1e6;
    aq_prom_observe(aq_prom_with(w->m.queue_wait, NULL), waited > 0 ? waited : 0);
    double left = j->task->timeout_seconds - j->run_seconds;
    int64_t session_deadline = aq_now_us() + (int64_t)((left > 0 ? left : 0) * 1e6);
    j->session = aq_session_start(w->engine, j->task, j->attempt, session_deadline, past, on_session_done, j);
    if (w->drain_expired) aq_session_cancel(j->session, AQ_STATUS_QUEUED);
}

static void on_session_loaded(void *arg, const aq_task_step *rows, size_t n, int code)
{
    job *j = arg;
    if (code != AQ_OK) {
        if (code != AQ_ECLOSED && code != AQ_ETIMEDOUT) {
            aq_log_task(AQ_LOG_WARN, j->task->task_id, j->task->user_id,
                        "could not read the committed steps (%s); back to the queue", aq_strerror(code));
            requeue(j);
        }
        job_free(j);
        return;
    }
    aq_session_past past = {rows, n, j->run_seconds};
    if (n)
        aq_log_task(AQ_LOG_INFO, j->task->task_id, j->task->user_id,
                    "attempt %d resumes from %zu committed rows (%.1f s run before)", j->attempt, n,
                    j->run_seconds);
    start_session(j, &past);
}

/* A message whose task_id names a task another body defined: recorded as
 * a duplicate dead letter (so a hijack attempt is visible), then acked. */
static void record_conflict(aq_worker *w, aq_delivery *d, const char *task_id, aq_status status);

static void claim(job *j);

/* A redelivered copy that found a live lease is claimed again after
 * DUP_RECHECK_MS, up to DUP_RECHECKS times. */
#define DUP_RECHECKS 5
#define DUP_RECHECK_MS 200

static void on_claim_again(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    claim(arg);
}

static void on_claimed(void *arg, const aq_store_claimed *c, int code)
{
    job *j = arg;
    aq_worker *w = j->w;
    const char *id = j->task->task_id, *user = j->task->user_id;
    if (code != AQ_OK) {
        if (code == AQ_EINVAL) {
            /* PostgreSQL refused the row: the message is not storable as
             * a task; to agentq.dead, where the dead-letter consumer
             * records it. */
            aq_log_task(AQ_LOG_ERROR, id, user, "could not claim the task: PostgreSQL refused it; rejecting");
            aq_consumer_reject(w->consumer, j->d->tag, false);
        } else if (code != AQ_ECLOSED && code != AQ_ETIMEDOUT) {
            aq_log_task(AQ_LOG_WARN, id, user, "could not claim the task (%s); back to the queue",
                        aq_strerror(code));
            requeue(j);
        } /* else: shutting down; unacked deliveries return with the connection */
        job_free(j);
        return;
    }
    switch (c->outcome) {
    case AQ_STORE_FINAL:
        aq_log_task(AQ_LOG_INFO, id, user, "already %s; acked without running", aq_status_name(c->status));
        w->st.redelivered_final++;
        ack(j);
        job_free(j);
        return;
    case AQ_STORE_DUPLICATE:
        if (j->d->redelivered && j->dup_checks < DUP_RECHECKS) {
            /* The broker gave this copy back: it may be the only one, of
             * an owner killed a moment ago whose database session (and so
             * its liveness lock) has not ended yet. Look again shortly
             * rather than ack it and leave the task to the sweeper. */
            j->dup_checks++;
            struct timeval tv = {0, DUP_RECHECK_MS * 1000};
            if (event_base_once(w->base, -1, EV_TIMEOUT, on_claim_again, j, &tv) == 0) return;
        }
        aq_log_task(AQ_LOG_INFO, id, user, "a live worker runs this task (attempt %d); duplicate copy acked",
                    c->attempt);
        w->st.duplicates++;
        ack(j);
        job_free(j);
        return;
    case AQ_STORE_CONFLICT: {
        aq_delivery *d = j->d;
        j->d = NULL;
        record_conflict(w, d, id, c->status);
        job_free(j);
        return;
    }
    case AQ_STORE_ENDED:
        aq_log_task(AQ_LOG_INFO, id, user, "ended as %s without running", aq_status_name(c->status));
        w->st.failed++;
        count_finished(w, c->status);
        ack(j);
        job_free(j);
        return;
    case AQ_STORE_BUSY:
        /* The user may not start now (its cap, or its budget in "wait"
         * mode): the delivery waits here, unrun and without an attempt,
         * and the user's tasks are skipped until one of its tasks here
         * ends or the unblock timer tries again. */
        aq_log_task(AQ_LOG_DEBUG, id, user, "waiting: %s", c->reason);
        w->st.waited++;
        hold(j);
        aq_fairq_block(w->held, user, true);
        wait_for_user(w, j);
        if (!evtimer_pending(w->unblock_ev, NULL)) {
            struct timeval tv = {0, 500000};
            evtimer_add(w->unblock_ev, &tv);
        }
        start_soon(w); /* its slot goes to another user's task */
        return;
    case AQ_STORE_RUN: break;
    }
    j->attempt = c->attempt;
    j->failures = c->failures;
    j->run_seconds = c->run_seconds;
    j->task->user_weight = c->weight > 0 ? c->weight : 1;
    aq_fairq_set_weight(w->held, user, j->task->user_weight);
    if (j->attempt > 1) { /* an earlier attempt may have committed steps */
        if (aq_store_load_session(w->store, id, on_session_loaded, j) != AQ_OK) {
            requeue(j);
            job_free(j);
        }
        return;
    }
    start_session(j, NULL);
}

static aq_task_limits limits_of(const aq_worker *w)
{
    aq_task_limits l = {w->skill_names, w->task_models, w->cfg->llm_model};
    return l;
}

/* The x-agentq-* headers are not read: the row says what attempt and
 * deadline a task is at, so a producer cannot set them. */
static aq_task_props props_of(const aq_delivery *d)
{
    aq_task_props p = {
        .priority = d->priority,
        .expiration = d->expiration,
        .message_id = d->message_id,
        .timestamp = d->timestamp,
    };
    return p;
}

static void on_dead_recorded(void *arg, int code)
{
    job *j = arg;
    if (code == AQ_OK) {
        aq_consumer_ack(j->w->consumer, j->d->tag);
        j->w->st.dead_recorded++;
        if (j->dead_status != AQ_STATUS_NONE) count_finished(j->w, j->dead_status);
    }
    job_free(j);
}

/* A message from the dead-letter queue: record it, set the task's status,
 * ack. */
static void handle_dead(aq_worker *w, aq_delivery *d)
{
    char reason[64] = "dead", error[700] = "";
    const char *hr = json_string_value(json_object_get(d->headers, "x-agentq-reason"));
    json_t *deaths = json_object_get(d->headers, "x-death");
    const char *xr = json_string_value(json_object_get(json_array_get(deaths, 0), "reason"));
    if (hr) snprintf(reason, sizeof reason, "%s", hr);
    else if (xr) snprintf(reason, sizeof reason, "%s", xr);
    const char *herr = json_string_value(json_object_get(d->headers, "x-agentq-error"));
    if (herr) snprintf(error, sizeof error, "%s", herr);

    aq_task_props props = props_of(d);
    props.expiration = NULL; /* the TTL already did its work */
    aq_task_limits limits = limits_of(w);
    aq_task *t = NULL;
    aq_task_error terr;
    memset(&terr, 0, sizeof terr);
    int prc = aq_task_parse(d->body, d->len, &props, &limits, &t, &terr);
    const char *task_id = t ? t->task_id : (*terr.task_id ? terr.task_id : NULL);
    if (!*error) {
        if (!strcmp(reason, "rejected") && prc != AQ_OK) snprintf(error, sizeof error, "%s", terr.message);
        else if (!strcmp(reason, "expired")) {
            /* Dead-lettering moves the TTL into x-death. */
            const char *ttl = json_string_value(json_object_get(json_array_get(deaths, 0), "original-expiration"));
            if (ttl) snprintf(error, sizeof error, "expired while queued (per-message TTL %s ms)", ttl);
            else snprintf(error, sizeof error, "expired while queued (the queue's message TTL)");
        }
        else if (!strcmp(reason, "rejected")) snprintf(error, sizeof error, "rejected by a consumer");
    }
    /* The reasons that are statuses set the row's; others leave it. */
    aq_status status = aq_status_parse(reason);
    if (status != AQ_STATUS_REJECTED && status != AQ_STATUS_EXPIRED && status != AQ_STATUS_FAILED)
        status = AQ_STATUS_NONE;
    char *headers = json_dumps(d->headers, JSON_COMPACT);
    aq_store_dead dl = {
        .task_id = task_id,
        .reason = reason,
        .error = *error ? error : NULL,
        .body = d->body,
        .body_len = d->len,
        .headers = headers,
        .status = status,
        .user_id = t ? t->user_id : NULL,
        .goal = t ? t->goal : NULL,
        .attempt = 1,
    };
    job *j = aq_xcalloc(1, sizeof *j);
    j->w = w;
    j->d = d;
    /* A failed task's copy was counted when its last attempt failed; a
     * rejected or expired task ends here. */
    if (task_id && (status == AQ_STATUS_REJECTED || status == AQ_STATUS_EXPIRED)) j->dead_status = status;
    w->pending++;
    aq_log_task(AQ_LOG_INFO, task_id, t ? t->user_id : NULL, "dead letter (%s): %s", reason, error);
    if (aq_store_dead_letter(w->store, &dl, on_dead_recorded, j) != AQ_OK) job_free(j);
    free(headers);
    aq_task_free(t);
}

static void record_conflict(aq_worker *w, aq_delivery *d, const char *task_id, aq_status status)
{
    char error[256];
    snprintf(error, sizeof error,
             "task_id %s already names a task (now %s) that another message defined; this one differs"
             " from it and was not run", task_id, aq_status_name(status));
    aq_log_task(AQ_LOG_WARN, task_id, NULL, "%s", error);
    w->st.conflicts++;
    char *headers = json_dumps(d->headers, JSON_COMPACT);
    aq_store_dead dl = {.task_id = task_id, .reason = "duplicate", .error = error, .body = d->body,
                        .body_len = d->len, .headers = headers};
    job *j = aq_xcalloc(1, sizeof *j);
    j->w = w;
    j->d = d;
    w->pending++;
    if (aq_store_dead_letter(w->store, &dl, on_dead_recorded, j) != AQ_OK) job_free(j);
    free(headers);
}

/* A second delivery of a task this process runs now. The same body: a
 * duplicate, acked at once — unless the running job's own delivery
 * belongs to a lost connection (the broker put it back, and this is it),
 * in which case this copy becomes the job's. Another body: a conflict. */
static void settle_local_copy(aq_worker *w, job *running, aq_delivery *d)
{
    if (running->d->len != d->len || memcmp(running->d->body, d->body, d->len)) {
        record_conflict(w, d, running->task->task_id, AQ_STATUS_RUNNING);
        return;
    }
    if (!aq_consumer_delivery_current(w->consumer, running->d->tag)) {
        aq_delivery_free(running->d);
        running->d = d;
        return;
    }
    w->st.duplicates++;
    aq_log_task(AQ_LOG_INFO, running->task->task_id, running->task->user_id,
                "this worker runs the task; duplicate copy acked");
    aq_consumer_ack(w->consumer, d->tag);
    aq_delivery_free(d);
}

static void on_delivery(aq_delivery *d, void *arg)
{
    aq_worker *w = arg;
    if (d->source == AQ_FROM_DEAD) {
        handle_dead(w, d);
        return;
    }
    aq_task_props props = props_of(d);
    aq_task_limits limits = limits_of(w);
    aq_task *t = NULL;
    aq_task_error terr;
    if (aq_task_parse(d->body, d->len, &props, &limits, &t, &terr) != AQ_OK) {
        /* To agentq.dead through the queue's dead-letter exchange; the
         * dead-letter consumer records why. */
        aq_log_task(AQ_LOG_WARN, *terr.task_id ? terr.task_id : NULL, NULL, "rejected message: %s", terr.message);
        w->st.rejected++;
        aq_consumer_reject(w->consumer, d->tag, false);
        aq_delivery_free(d);
        return;
    }
    if (d->source == AQ_FROM_INGRESS) {
        if (t->id_generated)
            aq_log_task(AQ_LOG_WARN, t->task_id, t->user_id,
                        "message had no task_id or UUID message_id; generated one");
        route(w, d, t);
        return;
    }
    w->st.received++;

    job *running = aq_strmap_get(w->jobs, t->task_id);
    if (running) {
        aq_task_free(t);
        settle_local_copy(w, running, d);
        return;
    }
    job *j = aq_xcalloc(1, sizeof *j);
    j->w = w;
    j->d = d;
    j->task = t;
    w->pending++;
    aq_strmap_put(w->jobs, t->task_id, j);
    j->in_map = true;
    hold(j);
    start_soon(w);
}

/* The row as the message describes it, for a claim or a route. */
static aq_store_task store_task_of(const job *j)
{
    const aq_task *t = j->task;
    aq_store_task st = {
        .task_id = t->task_id,
        .user_id = t->user_id,
        .goal = t->goal,
        .priority = t->priority,
        .max_steps = t->max_steps,
        .budget_usd = t->budget_usd,
        .timeout_seconds = t->timeout_seconds,
        .model = t->model,
        .body = j->d->body,
        .body_len = j->d->len,
        .has_metadata = t->metadata != NULL,
        .enqueued_at_us = t->enqueued_at_us,
        /* Used only by the message that defines the task (routed or
         * claimed first): the broker enforces the TTL while this first
         * copy is queued, the row after that. */
        .deadline_us = t->expiration_ms >= 0 ? t->enqueued_at_us + t->expiration_ms * 1000 : 0,
    };
    return st;
}

static void claim(job *j)
{
    aq_store_task st = store_task_of(j);
    if (aq_store_claim(j->w->store, &st, on_claimed, j) != AQ_OK) job_free(j);
}

/* Puts a lane delivery (back) among the held ones, giving up its slot if
 * it had one. */
static void hold(job *j)
{
    aq_worker *w = j->w;
    if (j->active) {
        j->active = false;
        w->active--;
        aq_consumer_running(w->consumer, j->d, false);
        aq_fairq_finished(w->held, j->task->user_id);
    }
    if (!j->held_since_us) j->held_since_us = aq_mono_us();
    j->held = aq_fairq_push(w->held, j->task->user_id, j->task->priority, j);
}

/* Fills free slots from the held deliveries, best first (fairq.h). */
static void start_held(aq_worker *w)
{
    while (!w->draining && w->active < w->cfg->worker_concurrency) {
        job *j = aq_fairq_pop(w->held);
        if (!j) break;
        j->held = NULL;
        if (!aq_consumer_delivery_current(w->consumer, j->d->tag)) {
            job_free(j); /* its connection is gone: the broker has it back */
            continue;
        }
        j->active = true;
        w->active++;
        aq_consumer_running(w->consumer, j->d, true);
        aq_fairq_started(w->held, j->task->user_id);
        claim(j);
    }
}

/* The lane a delivery came from (its routing key), or -1. */
static int lane_of(const aq_worker *w, const aq_delivery *d)
{
    return aq_broker_lane_of(w->cfg, d->routing_key, NULL);
}

static void collect_job(void *value, void *arg)
{
    job **list = arg;
    job *j = value;
    j->next_waiting = *list;
    *list = j;
}

/* A user waits on its cap (or budget): this worker keeps one of its
 * deliveries to try again and sends the rest back to their lane, and
 * stops consuming that lane meanwhile. Held deliveries of a waiting user
 * would otherwise fill the prefetch, and this worker's slots would sit
 * idle while other users' tasks wait in their lanes. */
static void wait_for_user(aq_worker *w, job *keep)
{
    int lane = lane_of(w, keep->d);
    if (lane >= 0 && !w->paused[lane]) {
        w->paused[lane] = true;
        w->npaused++;
        aq_consumer_pause_lane(w->consumer, lane, true);
    }
    job *list = NULL;
    aq_fairq_each(w->held, keep->task->user_id, collect_job, &list);
    while (list) {
        job *j = list;
        list = j->next_waiting;
        if (j == keep) continue;
        requeue(j);
        job_free(j);
    }
}

static void on_start(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    start_held(arg);
}

/* Slots are filled from a loop callback of their own, after the
 * callback at hand: deliveries that arrived together (a burst, several
 * lanes at once) are all held before the best of them is chosen, so a
 * high-priority task that came a moment after a low one still goes first. */
static void start_soon(aq_worker *w)
{
    if (!event_pending(w->start_ev, EV_TIMEOUT, NULL)) event_active(w->start_ev, EV_TIMEOUT, 0);
}

static void on_unblock_tick(evutil_socket_t fd, short what, void *arg)
{
    aq_worker *w = arg;
    (void)fd;
    (void)what;
    for (int i = 0; i < w->cfg->amqp_lanes && w->npaused; i++) {
        if (!w->paused[i]) continue;
        w->paused[i] = false;
        w->npaused--;
        if (!w->draining) aq_consumer_pause_lane(w->consumer, i, false);
    }
    aq_fairq_unblock_all(w->held);
    start_held(w);
}

static void on_routed(void *arg, const aq_store_routed *r, int code)
{
    job *j = arg;
    aq_worker *w = j->w;
    if (code != AQ_OK) {
        if (code == AQ_EINVAL) {
            aq_log_task(AQ_LOG_ERROR, j->task->task_id, j->task->user_id,
                        "could not record the task: PostgreSQL refused it; rejecting");
            aq_consumer_reject(w->consumer, j->d->tag, false);
        } else if (code != AQ_ECLOSED && code != AQ_ETIMEDOUT) {
            requeue(j);
        }
        job_free(j);
        return;
    }
    if (r->final) {
        aq_log_task(AQ_LOG_INFO, j->task->task_id, j->task->user_id, "already final; acked without routing");
        w->st.redelivered_final++;
        ack(j);
        job_free(j);
        return;
    }
    char queue[256], ttl[32];
    aq_broker_lane_queue(w->cfg, r->lane, aq_config_band_of(w->cfg, j->task->priority), queue, sizeof queue);
    snprintf(ttl, sizeof ttl, "%lld", (long long)r->ttl_ms);
    aq_publish p = {
        .exchange = "", /* the default exchange routes by queue name */
        .routing_key = queue,
        .body = j->d->body,
        .len = j->d->len,
        .message_id = j->task->task_id,
        .priority = j->task->priority,
        .expiration = r->ttl_ms >= 0 ? ttl : NULL,
        .timestamp = j->task->enqueued_at_us / 1000000,
        .headers = j->d->headers,
    };
    j->routing = true;
    aq_consumer_publish(w->consumer, &p, j);
}

/* A message of the ingress queue: recorded as queued (so SQL sees it at
 * once), then moved to its user's lane; acked once the lane's copy is
 * confirmed. */
static void route(aq_worker *w, aq_delivery *d, aq_task *t)
{
    job *j = aq_xcalloc(1, sizeof *j);
    j->w = w;
    j->d = d;
    j->task = t;
    w->pending++;
    aq_store_task st = store_task_of(j);
    if (aq_store_route(w->store, &st, on_routed, j) != AQ_OK) job_free(j);
}

static void on_broker_state(bool connected, void *arg)
{
    aq_worker *w = arg;
    w->st.broker_connected = connected;
}

/* ---- the fleet's response cache, over the store ---------------------- */

typedef struct cache_wait {
    aq_cache_done done;
    void *arg;
} cache_wait;

static void on_cache_got(void *arg, const char *response, size_t len, int code)
{
    cache_wait *cw = arg;
    /* A lookup that failed is a miss: one more LLM call, never a stall. */
    cw->done(cw->arg, code == AQ_OK ? response : NULL, code == AQ_OK ? len : 0);
    free(cw);
}

static int cache_get(void *ctx, const char *request, size_t len, aq_cache_done done, void *arg)
{
    aq_worker *w = ctx;
    cache_wait *cw = aq_xmalloc(sizeof *cw);
    cw->done = done;
    cw->arg = arg;
    int rc = aq_store_cache_get(w->store, request, len, on_cache_got, cw);
    if (rc != AQ_OK) free(cw);
    return rc;
}

static void cache_put(void *ctx, const char *request, size_t len, const char *model, const char *response,
                      size_t rlen)
{
    aq_worker *w = ctx;
    if (aq_store_cache_put(w->store, request, len, model, response, rlen, w->cfg->cache_ttl_seconds,
                           (int64_t)w->cfg->cache_max_mb << 20) != AQ_OK)
        aq_log(AQ_LOG_DEBUG, "a reply was not cached: the store is not accepting");
}

static void on_step(const aq_step_event *e, void *arg)
{
    aq_worker *w = arg;
    aq_store_step_row row = {.task_id = e->task_id, .attempt = e->attempt, .step = e->step, .seq = e->seq,
                             .kind = e->kind, .name = e->name, .provider = e->provider, .status = e->status,
                             .started_at_us = e->started_at_us, .duration_ms = e->duration_ms,
                             .prompt_tokens = e->prompt_tokens, .completion_tokens = e->completion_tokens,
                             .cost_usd = e->cost_usd, .detail = e->detail, .message = e->message,
                             .message_len = e->message_len};
    if (aq_store_step(w->store, &row) != AQ_OK)
        aq_log_task(AQ_LOG_WARN, e->task_id, NULL, "step row dropped: store not accepting");
    count_step(w, e);
}

static void on_progress(void *arg, int code)
{
    job *j = arg;
    if (code != AQ_OK)
        aq_log_task(AQ_LOG_WARN, j->task->task_id, j->task->user_id,
                    code == AQ_ENOTFOUND ? "attempt %d no longer holds the task; stopping it"
                                         : "could not record attempt %d's progress; stopping it",
                    j->attempt);
    aq_session_checkpointed(j->session, code == AQ_OK);
}

/* A step is over: its rows are queued before this, so the progress
 * write's commit says they are all in (store.h), and the next LLM call
 * may go out. */
static void on_checkpoint(aq_session *s, const aq_session_totals *t, void *arg)
{
    job *j = arg;
    aq_store_progress p = {j->task->task_id, j->attempt, t->steps, t->prompt_tokens, t->completion_tokens,
                           t->cost_usd, t->run_seconds};
    if (aq_store_progress_write(j->w->store, &p, on_progress, j) != AQ_OK) aq_session_checkpointed(s, false);
}

static void on_sweep_soon(evutil_socket_t fd, short what, void *arg);

/* NOTIFY agentq_cancel: a task was cancelled, or answered (sql/014). A
 * session here stops; any other task may be one a sweep ends or sends
 * back (a waiting one), so a sweep runs soon. */
static void on_cancel_request(const char *task_id, void *arg)
{
    aq_worker *w = arg;
    job *j = aq_strmap_get(w->jobs, task_id);
    if (j && j->session) {
        aq_log_task(AQ_LOG_INFO, task_id, j->task->user_id, "cancel requested; stopping the session");
        aq_session_cancel(j->session, AQ_STATUS_CANCELLED);
        return;
    }
    if (!evtimer_pending(w->sweep_ev, NULL)) {
        struct timeval tv = {0, 50000}; /* one sweep for a burst of them */
        evtimer_add(w->sweep_ev, &tv);
    }
}

static void cancel_one(const char *key, void *value, void *arg)
{
    job *j = value;
    if (j->session) aq_session_cancel(j->session, AQ_STATUS_QUEUED);
}

/* Most rows one sweep republishes; the rest wait for the next tick. */
#define SWEEP_LIMIT 100
/* A swept row still running unclaimed is swept again after this many
 * leases: its copy may simply wait behind a long queue. */
#define RESWEEP_LEASES 10

static void on_swept(void *arg, const aq_store_swept *rows, size_t n, int code)
{
    aq_worker *w = arg;
    if (code != AQ_OK) return;
    for (size_t i = 0; i < n; i++) {
        aq_log_task(AQ_LOG_INFO, rows[i].task_id, NULL,
                    "no message carries it (an answered task, or a running one with an expired lease and no"
                    " live worker); publishing it again");
        job *j = aq_xcalloc(1, sizeof *j);
        j->w = w;
        snprintf(j->swept, sizeof j->swept, "%s", rows[i].task_id);
        w->pending++;
        w->st.swept++;
        json_t *h = json_pack("{s:s}", "x-agentq-reason", "swept");
        aq_publish p = {
            .exchange = w->cfg->amqp_exchange,
            .routing_key = "task",
            .body = (const char *)rows[i].body,
            .len = rows[i].body_len,
            .message_id = rows[i].task_id,
            .priority = rows[i].priority,
            .headers = h,
        };
        aq_consumer_publish(w->consumer, &p, j);
        json_decref(h);
    }
}

typedef struct id_list {
    const char **ids;
    size_t n;
} id_list;

/* Tasks that hold a slot: claimed or running (held ones have no lease). */
static void collect_active(const char *key, void *value, void *arg)
{
    id_list *l = arg;
    const job *j = value;
    if (j->active) l->ids[l->n++] = key;
}

/* Tasks another attempt took over (this worker was taken for gone: its
 * database connection was away longer than a lease): their sessions stop
 * rather than pay for calls whose result can no longer be recorded. */
static void on_leases_renewed(void *arg, const char *const *lost, size_t n, int code)
{
    aq_worker *w = arg;
    for (size_t i = 0; code == AQ_OK && i < n; i++) {
        job *j = aq_strmap_get(w->jobs, lost[i]);
        if (!j || !j->session) continue;
        aq_log_task(AQ_LOG_WARN, lost[i], j->task->user_id,
                    "another attempt took this task over (this worker's lease lapsed); stopping attempt %d",
                    j->attempt);
        aq_session_cancel(j->session, AQ_STATUS_QUEUED);
    }
}

/* Sessions whose delivery nears the broker's consumer_timeout hand
 * themselves over (aq_config_handover_ms): asked at the soft age, stopped
 * at the hard one. */
static void hand_over_old(const char *key, void *value, void *arg)
{
    (void)key;
    job *j = value;
    const int64_t *age_ms = arg; /* soft, hard */
    if (!j->session || !j->held_since_us) return;
    int64_t age = (aq_mono_us() - j->held_since_us) / 1000;
    if (age < age_ms[0]) return;
    if (!j->handing_over)
        aq_log_task(AQ_LOG_INFO, j->task->task_id, j->task->user_id,
                    "delivered %lld s ago (amqp.consumer_timeout_ms nears): handing the session over",
                    (long long)(age / 1000));
    j->handing_over = true;
    if (age >= age_ms[1]) aq_session_cancel(j->session, AQ_STATUS_QUEUED);
    else aq_session_hand_over(j->session);
}

/* Held deliveries that waited a fifth of the broker's consumer_timeout go
 * back to their lane (the broker would close the channel on the whole
 * prefetch once one passed it); whichever worker has room takes them. */
static void return_stale_held(aq_worker *w)
{
    job *list = NULL;
    aq_fairq_each(w->held, NULL, collect_job, &list);
    int64_t oldest_ok = aq_mono_us() - aq_config_max_hold_ms(w->cfg) * 1000;
    while (list) {
        job *j = list;
        list = j->next_waiting;
        if (j->held_since_us > oldest_ok) continue;
        aq_log_task(AQ_LOG_INFO, j->task->task_id, j->task->user_id,
                    "held %lld s without a start (a fifth of amqp.consumer_timeout_ms); back to its lane",
                    (long long)((aq_mono_us() - j->held_since_us) / 1000000));
        requeue(j);
        job_free(j);
    }
}

/* Publishes again what nobody holds: running tasks with an expired lease
 * and answered ones; ends waiting tasks cancelled or out of time. */
static void sweep(aq_worker *w)
{
    if (!w->draining && aq_consumer_connected(w->consumer) &&
        aq_store_sweep(w->store, SWEEP_LIMIT, (double)w->cfg->worker_lease_seconds * RESWEEP_LEASES, on_swept,
                       w) != AQ_OK)
        aq_log(AQ_LOG_WARN, "store refused the lease sweep");
}

/* Every third of a lease: renew the leases of every task this process
 * holds (one statement), hand over sessions near the broker's
 * consumer_timeout, then sweep. */
static void on_lease_tick(evutil_socket_t fd, short what, void *arg)
{
    aq_worker *w = arg;
    (void)fd;
    (void)what;
    id_list l = {aq_xcalloc(aq_strmap_size(w->jobs) + 1, sizeof *l.ids), 0};
    aq_strmap_each(w->jobs, collect_active, &l);
    if (aq_store_renew(w->store, l.ids, l.n, on_leases_renewed, w) != AQ_OK)
        aq_log(AQ_LOG_WARN, "store refused the lease renewal");
    free(l.ids);
    return_stale_held(w);
    int64_t age_ms[2];
    aq_config_handover_ms(w->cfg, &age_ms[0], &age_ms[1]);
    aq_strmap_each(w->jobs, hand_over_old, age_ms);
    sweep(w);
}

static void on_sweep_soon(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    sweep(arg);
}

/* Seconds the requeue writes may take after the drain time is up before
 * the worker exits anyway (what is unacked returns to the queue). */
#define DRAIN_GRACE_SECONDS 5

static void on_drain_timeout(evutil_socket_t fd, short what, void *arg)
{
    aq_worker *w = arg;
    if (w->drain_expired) {
        aq_log(AQ_LOG_WARN, "%zu tasks still being recorded after the drain; exiting, the broker redelivers them",
               w->pending);
        event_base_loopexit(w->base, NULL);
        return;
    }
    w->drain_expired = true;
    aq_log(AQ_LOG_WARN, "drain time is up; requeueing %zu running tasks", (size_t)w->st.running);
    aq_strmap_each(w->jobs, cancel_one, w);
    struct timeval tv = {DRAIN_GRACE_SECONDS, 0};
    event_add(w->drain_ev, &tv);
}

void aq_worker_drain(aq_worker *w)
{
    if (w->draining) return;
    w->draining = true;
    w->st.draining = true;
    aq_log(AQ_LOG_INFO, "draining: stopped consuming; %zu tasks in flight, waiting up to %d s", w->pending,
           w->cfg->worker_drain_seconds);
    aq_consumer_stop_consuming(w->consumer);
    /* Held deliveries never started: back to their lanes now. */
    job *j;
    while ((j = aq_fairq_pop_any(w->held))) {
        j->held = NULL;
        requeue(j);
        job_free(j);
    }
    if (w->pending == 0) {
        event_base_loopexit(w->base, NULL);
        return;
    }
    struct timeval tv = {w->cfg->worker_drain_seconds, 0};
    event_add(w->drain_ev, &tv);
}

aq_worker *aq_worker_new(const aq_config *cfg, struct event_base *base, char *err, size_t errlen)
{
    aq_worker *w = aq_xcalloc(1, sizeof *w);
    w->cfg = cfg;
    w->base = base;
    if (*cfg->worker_id) {
        snprintf(w->worker_id, sizeof w->worker_id, "%s", cfg->worker_id);
    } else {
        char host[128] = "worker";
        gethostname(host, sizeof host - 1);
        snprintf(w->worker_id, sizeof w->worker_id, "%s-%d", host, (int)getpid());
    }
    aq_log_set_worker_id(w->worker_id);
    w->nretry_delays = aq_config_retry_delays(cfg, w->retry_delays, 32);
    w->jobs = aq_strmap_new();
    w->drain_ev = evtimer_new(base, on_drain_timeout, w);
    w->lease_ev = event_new(base, -1, EV_PERSIST, on_lease_tick, w);
    w->unblock_ev = evtimer_new(base, on_unblock_tick, w);
    w->start_ev = event_new(base, -1, 0, on_start, w);
    w->sweep_ev = evtimer_new(base, on_sweep_soon, w);
    w->held = aq_fairq_new();
    w->paused = aq_xcalloc((size_t)cfg->amqp_lanes, sizeof *w->paused);
    if (!metrics_new(w, err, errlen)) goto fail;

    if (aq_http_global_init() != AQ_OK) {
        aq_seterr(err, errlen, "cannot initialise libcurl");
        goto fail;
    }
    aq_http_config hc = {.max_connections = cfg->llm_max_connections,
                         .connect_timeout_ms = cfg->llm_connect_timeout_ms,
                         .timeout_ms = cfg->llm_timeout_ms,
                         .ca_file = cfg->llm_ca_file};
    if (!(w->http = aq_http_new(base, &hc, err, errlen))) goto fail;
    if (!(w->skills = aq_skills_new(cfg, base, w->http, err, errlen))) goto fail;
    w->skill_names = aq_xstrdup(aq_skills_names(w->skills));
    w->task_models = aq_config_task_models(cfg);
    w->cache = (aq_llm_cache){cache_get, cache_put, w};
    aq_router_deps rd = {cfg, base, w->http, &w->cache, !strcmp(cfg->limits_mode, "fleet")};
    if (!(w->router = aq_router_new(&rd, err, errlen))) goto fail;
    aq_engine_deps deps = {cfg, base, w->http, w->skills, w->router, on_step, w, on_checkpoint};
    if (!(w->engine = aq_engine_new(&deps, err, errlen))) goto fail;
    aq_store_config sc = {.dsn = cfg->pg_dsn,
                          .worker_id = w->worker_id,
                          .batch_max = cfg->pg_batch_max,
                          .flush_ms = cfg->pg_flush_ms,
                          .max_inflight_per_user = cfg->limits_max_inflight_per_user,
                          .over_budget = cfg->limits_over_budget,
                          .lanes = cfg->amqp_lanes,
                          .lease_seconds = cfg->worker_lease_seconds,
                          .max_interruptions = cfg->amqp_max_interruptions,
                          .transaction_pool = aq_config_pg_transaction_pool(cfg),
                          .session_dsn = aq_config_listen_dsn(cfg)};
    if (!(w->store = aq_store_new(&sc, base, err, errlen))) goto fail;
    struct timeval lease_tick = {cfg->worker_lease_seconds / 3, (cfg->worker_lease_seconds % 3) * 333333};
    event_add(w->lease_ev, &lease_tick);
    if (!(w->cancels = aq_cancelwatch_new(aq_config_listen_dsn(cfg), w->worker_id, base, on_cancel_request, w, err,
                                          errlen)))
        goto fail;
    long long keep;
    if (*cfg->retention_older_than &&
        aq_config_parse_duration(cfg->retention_older_than, &keep, err, errlen) == AQ_OK &&
        !(w->retention = aq_retention_new(cfg->pg_dsn, keep, cfg->retention_interval_seconds, cfg->retention_batch,
                                          err, errlen)))
        goto fail;
    /* The worker publishes only retries and dead tasks: every confirm is one. */
    aq_consumer_callbacks cb = {on_delivery, on_retry_published, on_broker_state, w};
    if (!(w->consumer = aq_consumer_new(cfg, base, &cb, true, err, errlen))) goto fail;
    aq_log(AQ_LOG_INFO, "worker started: concurrency %d, models %s (default %s), skills %s%s",
           cfg->worker_concurrency, w->task_models, cfg->llm_model, w->skill_names,
           cfg->cache_enabled ? ", response cache on" : "");
    return w;
fail:
    aq_worker_free(w);
    return NULL;
}

void aq_worker_free(aq_worker *w)
{
    if (!w) return;
    /* The consumer goes first: no new deliveries, and unacked ones return
     * to the queue with its connection. */
    aq_consumer_free(w->consumer);
    w->consumer = NULL;
    aq_cancelwatch_free(w->cancels);
    aq_retention_free(w->retention);
    aq_engine_free(w->engine);
    /* Before the store: a cache lookup the store answers while it closes
     * finds the call detached. */
    aq_router_free(w->router);
    aq_store_free(w->store);
    aq_skills_free(w->skills);
    aq_http_free(w->http);
    if (w->drain_ev) event_free(w->drain_ev);
    if (w->lease_ev) event_free(w->lease_ev);
    if (w->unblock_ev) event_free(w->unblock_ev);
    if (w->start_ev) event_free(w->start_ev);
    if (w->sweep_ev) event_free(w->sweep_ev);
    aq_strmap_free(w->jobs);
    aq_fairq_free(w->held, NULL); /* its jobs are gone with the map's */
    free(w->paused);
    aq_prom_free(w->prom);
    free(w->skill_names);
    free(w->task_models);
    free(w);
}

void aq_worker_stats_get(const aq_worker *w, aq_worker_stats *out)
{
    *out = w->st;
    out->held = aq_fairq_len(w->held);
    out->held_blocked = aq_fairq_blocked_len(w->held);
    out->lanes_paused = (uint64_t)w->npaused;
    aq_store_counters sc;
    aq_store_stats(w->store, &sc);
    out->db_connected = sc.connected;
    out->broker_connected = aq_consumer_connected(w->consumer);
}

bool aq_worker_ready(const aq_worker *w)
{
    aq_worker_stats s;
    aq_worker_stats_get(w, &s);
    return s.broker_connected && s.db_connected && !s.draining;
}

/* ---- /metrics ------------------------------------------------------------ */

/* Bucket bounds, in seconds unless named otherwise. The gen_ai ones are
 * OpenTelemetry's advice for its GenAI client metrics. */
static const double genai_seconds[] = {0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                                       1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92};
static const double genai_tokens[] = {1,      4,       16,      64,       256,      1024,     4096,
                                      16384,  65536,   262144,  1048576,  4194304,  16777216, 67108864};
static const double queue_seconds[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200};
static const double run_seconds[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};
static const double tool_seconds[] = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
static const double grant_seconds[] = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};

typedef struct flat_row {
    const char *name;
    aq_prom_type type;
    const char *help;
    double value;
} flat_row;

/* The unlabelled series read from the modules' counters: one table of
 * name, type, help and value, used both to make the families (with
 * zeroed counters) and to fill them at each scrape, so the two cannot
 * drift apart. Returns the row count. */
static size_t flat_rows(const aq_worker_stats *s, const aq_store_counters *sc, const aq_http_stats *hs,
                        size_t waiting, size_t users, flat_row *out)
{
    const aq_prom_type C = AQ_PROM_COUNTER, G = AQ_PROM_GAUGE;
    const flat_row rows[] = {
        {"agentq_tasks_received_total", C, "Task deliveries received.", (double)s->received},
        {"agentq_tasks_completed_total", C, "Tasks completed.", (double)s->completed},
        {"agentq_tasks_failed_total", C, "Tasks that ended in any other final status.", (double)s->failed},
        {"agentq_tasks_retried_total", C, "Attempts republished to a retry tier.", (double)s->retried},
        {"agentq_tasks_rejected_total", C, "Messages rejected as invalid.", (double)s->rejected},
        {"agentq_tasks_already_final_total", C, "Redeliveries acked without running (row already final).",
         (double)s->redelivered_final},
        {"agentq_dead_letters_recorded_total", C, "Dead letters written to Postgres.", (double)s->dead_recorded},
        {"agentq_tasks_duplicates_total", C,
         "Copies of a task that is running (here or under another live lease) acked without running.",
         (double)s->duplicates},
        {"agentq_tasks_conflicts_total", C,
         "Messages whose task_id names a task another body defined (recorded as duplicate dead letters).",
         (double)s->conflicts},
        {"agentq_tasks_swept_total", C, "Running tasks with an expired lease published again by this worker.",
         (double)s->swept},
        {"agentq_tasks_routed_total", C, "Messages of the ingress queue recorded and moved to a lane.",
         (double)s->routed},
        {"agentq_tasks_waited_total", C,
         "Claims told to wait: the user was at its cap of running tasks or over its daily budget.",
         (double)s->waited},
        {"agentq_sessions_resumed_total", C, "Sessions that went on from the steps an earlier attempt committed.",
         (double)s->resumed},
        {"agentq_sessions_waiting_total", C, "Sessions that ended waiting for a person's answer (ask_human).",
         (double)s->waiting},
        {"agentq_sessions_handed_over_total", C,
         "Sessions handed to a new delivery before the broker's consumer_timeout.", (double)s->handed_over},
        {"agentq_sessions_running", G, "Agent sessions running now.", (double)s->running},
        {"agentq_tasks_held", G, "Lane deliveries held for a free slot (the lookahead).", (double)s->held},
        {"agentq_tasks_held_blocked", G, "Held deliveries whose user is at its cap or over budget.",
         (double)s->held_blocked},
        {"agentq_lanes_paused", G, "Lanes this worker stopped consuming while their users wait on a cap.",
         (double)s->lanes_paused},
        {"agentq_ratelimit_waiting", G, "Sessions waiting for an LLM rate-limit grant.", (double)waiting},
        {"agentq_ratelimit_waiting_users", G, "Users with sessions waiting for a grant.", (double)users},
        {"agentq_http_inflight", G, "HTTP requests in flight (LLM and skills).", (double)hs->inflight},
        {"agentq_http_open_connections", G, "Open HTTP connections, idle kept-alive ones included.",
         (double)hs->open_sockets},
        {"agentq_http_sockets_opened_total", C, "HTTP connections opened (LLM and skills).",
         (double)hs->sockets_opened},
        {"agentq_http_completed_total", C, "HTTP requests completed.", (double)hs->completed},
        {"agentq_http_failed_total", C, "HTTP requests that failed (network, timeout, size).", (double)hs->failed},
        {"agentq_store_pending", G, "Rows queued for Postgres.", (double)sc->pending},
        {"agentq_store_transactions_total", C, "Transactions committed by the store.", (double)sc->transactions},
        {"agentq_store_reconnects_total", C, "Postgres reconnections.", (double)sc->reconnects},
        {"agentq_broker_connected", G, "1 while the broker connection is up.", s->broker_connected},
        {"agentq_db_connected", G, "1 while the Postgres connection is up.", s->db_connected},
        {"agentq_draining", G, "1 while the worker drains after SIGTERM.", s->draining},
    };
    _Static_assert(AQ_ARRAY_LEN(rows) <= FLAT_MAX, "FLAT_MAX is too small for the table");
    memcpy(out, rows, sizeof rows);
    return AQ_ARRAY_LEN(rows);
}

/* Makes the registry and every family; false (err filled) only when a
 * definition is wrong, which is this file's bug. */
static bool metrics_new(aq_worker *w, char *err, size_t errlen)
{
    metric_families *m = &w->m;
    w->prom = aq_prom_new();
    flat_row rows[FLAT_MAX];
    aq_worker_stats s0 = {0};
    aq_store_counters sc0 = {0};
    aq_http_stats hs0 = {0};
    m->nflat = flat_rows(&s0, &sc0, &hs0, 0, 0, rows);
    for (size_t i = 0; i < m->nflat; i++)
        if (!(m->flat[i] = aq_prom_family_new(w->prom, rows[i].type, rows[i].name, rows[i].help, NULL, NULL, 0))) {
            aq_seterr(err, errlen, "metrics: family %s is defined wrong", rows[i].name);
            return false;
        }
    const aq_prom_type C = AQ_PROM_COUNTER, G = AQ_PROM_GAUGE, H = AQ_PROM_HISTOGRAM;
#define BOUNDS(b) b, AQ_ARRAY_LEN(b)
    const struct {
        aq_prom_family **f;
        aq_prom_type type;
        const char *name, *labels;
        const double *bounds;
        size_t nbounds;
        const char *help;
    } defs[] = {
        /* the routes' (aq_router_each), read at each scrape */
        {&m->route_calls, C, "agentq_llm_calls_total", "provider,model,outcome", NULL, 0,
         "LLM calls by the provider and model that took them, and how they ended (cache hits: provider cache)."},
        {&m->route_tokens, C, "agentq_llm_tokens_total", "provider,model,kind", NULL, 0,
         "Tokens the providers reported, by provider, model and kind."},
        {&m->route_cost, C, "agentq_llm_cost_usd_total", "provider,model", NULL, 0,
         "Cost of the answered calls at the configured prices."},
        {&m->route_open, G, "agentq_llm_route_open", "provider,model", NULL, 0,
         "1 while a provider+model is cooled down (its circuit breaker is open)."},
        {&m->route_in_flight, G, "agentq_llm_route_in_flight", "provider,model", NULL, 0,
         "Calls in flight to a provider+model from this worker."},
        {&m->route_limit, G, "agentq_llm_route_limit", "provider,model,per_minute", NULL, 0,
         "Limits in force per provider+model (0: none), lowered when the provider reports lower ones."},
        {&m->saturation, G, "agentq_ratelimit_saturation", "provider,model", NULL, 0,
         "Fraction of the provider+model's requests/min limit this worker's grants used over the last minute"
         " (0 when unlimited; in fleet mode the limit is the fleet's: sum over workers)."},
        /* recorded as tasks and calls end */
        {&m->finished, C, "agentq_tasks_finished_total", "status", NULL, 0,
         "Tasks that reached a final status here, by status."},
        {&m->queue_wait, H, "agentq_task_queue_wait_seconds", NULL, BOUNDS(queue_seconds),
         "From a task's enqueue (its message timestamp, whole seconds) to the start of an attempt."},
        {&m->run_time, H, "agentq_task_run_seconds", "status", BOUNDS(run_seconds),
         "One attempt's running time, by how the attempt ended."},
        {&m->llm_requests, C, "agentq_llm_requests_total", "model,provider,code", NULL, 0,
         "LLM requests by model, provider and HTTP status (error: no response; aborted: stopped by the session)."},
        {&m->token_usage_total, C, "agentq_llm_token_usage_total", "model,type", NULL, 0,
         "Tokens of the answered LLM calls, by model and type (input, output)."},
        {&m->op_duration, H, "gen_ai_client_operation_duration_seconds",
         "gen_ai_operation_name,gen_ai_request_model,gen_ai_provider_name,error_type", BOUNDS(genai_seconds),
         "Duration of GenAI client operations (OpenTelemetry gen_ai.client.operation.duration)."},
        {&m->token_usage, H, "gen_ai_client_token_usage",
         "gen_ai_operation_name,gen_ai_token_type,gen_ai_request_model,gen_ai_provider_name", BOUNDS(genai_tokens),
         "Tokens per answered GenAI call, by type (OpenTelemetry gen_ai.client.token.usage)."},
        {&m->tool_calls, C, "agentq_tool_calls_total", "skill,status", NULL, 0,
         "Tool calls by skill (unknown: a name the LLM made up) and how they ended."},
        {&m->tool_duration, H, "agentq_tool_duration_seconds", "skill", BOUNDS(tool_seconds),
         "Duration of the tool calls that ran, by skill."},
        {&m->grant_wait, H, "agentq_ratelimit_wait_seconds", NULL, BOUNDS(grant_seconds),
         "How long an LLM call waited for its rate-limit grant."},
        /* the process */
        {&m->build_info, G, "agentq_build_info", "version", NULL, 0, "The worker's version; always 1."},
        {&m->rss, G, "process_resident_memory_bytes", NULL, NULL, 0, "Resident memory size in bytes."},
        {&m->open_fds, G, "process_open_fds", NULL, NULL, 0, "Open file descriptors."},
        {&m->max_fds, G, "process_max_fds", NULL, NULL, 0, "The limit of open file descriptors (RLIMIT_NOFILE)."},
    };
#undef BOUNDS
    for (size_t i = 0; i < AQ_ARRAY_LEN(defs); i++)
        if (!(*defs[i].f = aq_prom_family_new(w->prom, defs[i].type, defs[i].name, defs[i].help, defs[i].labels,
                                              defs[i].bounds, defs[i].nbounds))) {
            aq_seterr(err, errlen, "metrics: family %s is defined wrong", defs[i].name);
            return false;
        }
    /* Every final status from the start, so that a rate over it is 0
     * rather than absent before the first such task. */
    for (aq_status st = AQ_STATUS_NONE; st < AQ_STATUS_COUNT; st++)
        if (aq_status_final(st)) aq_prom_with(m->finished, (const char *[]){aq_status_name(st)});
    aq_prom_set(aq_prom_with(m->build_info, (const char *[]){AGENTQ_VERSION}), 1);
    return true;
}

static void count_finished(aq_worker *w, aq_status status)
{
    aq_prom_add(aq_prom_with(w->m.finished, (const char *[]){aq_status_name(status)}), 1);
}

/* What one LLM or tool call adds. Label values from outside the
 * configuration are mapped to known ones first, so every label set stays
 * bounded: a tool name the LLM made up is "unknown", and an LLM call is
 * labelled with the model its task asked for (a reply names its own,
 * e.g. with a date), which the task's validation bounds to the
 * configured models. */
static void count_step(aq_worker *w, const aq_step_event *e)
{
    const metric_families *m = &w->m;
    double seconds = e->duration_ms / 1000.0;
    if (!strcmp(e->kind, "tool")) {
        const char *skill = aq_skills_has(w->skills, e->name) ? e->name : "unknown";
        const char *status = e->status ? e->status : "";
        aq_prom_add(aq_prom_with(m->tool_calls, (const char *[]){skill, status}), 1);
        if (strcmp(status, "waiting")) /* ask_human's: no call ran */
            aq_prom_observe(aq_prom_with(m->tool_duration, (const char *[]){skill}), seconds);
        return;
    }
    /* A cache hit reached no provider: agentq_llm_calls_total counts it. */
    if (!e->provider || !strcmp(e->provider, "cache")) return;
    const job *j = aq_strmap_get(w->jobs, e->task_id);
    const char *model = j && j->task->model ? j->task->model : e->name;
    const char *provider = e->provider;
    char code[16];
    if (e->http_status) snprintf(code, sizeof code, "%d", e->http_status);
    else snprintf(code, sizeof code, "%s", e->error_type && !strcmp(e->error_type, "aborted") ? "aborted" : "error");
    aq_prom_add(aq_prom_with(m->llm_requests, (const char *[]){model, provider, code}), 1);
    aq_prom_observe(aq_prom_with(m->op_duration, (const char *[]){"chat", model, provider, e->error_type}), seconds);
    aq_prom_observe(aq_prom_with(m->grant_wait, NULL), e->wait_ms / 1000.0);
    if (e->error_type) return; /* only an answered call has tokens */
    static const char *const types[] = {"input", "output"};
    const int64_t tokens[] = {e->prompt_tokens, e->completion_tokens};
    for (int i = 0; i < 2; i++) {
        aq_prom_add(aq_prom_with(m->token_usage_total, (const char *[]){model, types[i]}), (double)tokens[i]);
        aq_prom_observe(aq_prom_with(m->token_usage, (const char *[]){"chat", types[i], model, provider}),
                        (double)tokens[i]);
    }
}

static void put_route(const aq_route_stats *st, void *arg)
{
    const metric_families *m = arg;
    const char *p = st->provider, *mo = st->model;
#define AT(...) ((const char *[]){__VA_ARGS__})
    if (!strcmp(p, "cache") && !*mo) {
        aq_prom_set(aq_prom_with(m->route_calls, AT(p, mo, "cached")), (double)st->cached);
        return;
    }
    aq_prom_set(aq_prom_with(m->route_calls, AT(p, mo, "answered")), (double)st->answered);
    aq_prom_set(aq_prom_with(m->route_calls, AT(p, mo, "rate_limited")), (double)st->rate_limited);
    aq_prom_set(aq_prom_with(m->route_calls, AT(p, mo, "failed")), (double)st->failed);
    aq_prom_set(aq_prom_with(m->route_tokens, AT(p, mo, "prompt")), (double)st->prompt_tokens);
    aq_prom_set(aq_prom_with(m->route_tokens, AT(p, mo, "completion")), (double)st->completion_tokens);
    aq_prom_set(aq_prom_with(m->route_cost, AT(p, mo)), st->cost_usd);
    aq_prom_set(aq_prom_with(m->route_open, AT(p, mo)), st->open ? 1 : 0);
    aq_prom_set(aq_prom_with(m->route_in_flight, AT(p, mo)), st->in_flight);
    aq_prom_set(aq_prom_with(m->route_limit, AT(p, mo, "requests")), (double)st->rpm);
    aq_prom_set(aq_prom_with(m->route_limit, AT(p, mo, "tokens")), (double)st->tpm);
    double used = st->rpm > 0 ? fmin(1, (double)st->granted_last_minute / (double)st->rpm) : 0;
    aq_prom_set(aq_prom_with(m->saturation, AT(p, mo)), used);
#undef AT
}

/* Resident memory, open descriptors and their limit, from /proc/self
 * and getrlimit; what cannot be read keeps its last value. */
static void put_process(const metric_families *m)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size, resident;
    if (f && fscanf(f, "%ld %ld", &size, &resident) == 2)
        aq_prom_set(aq_prom_with(m->rss, NULL), (double)resident * (double)sysconf(_SC_PAGESIZE));
    if (f) fclose(f);
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        long n = 0;
        for (struct dirent *de; (de = readdir(d));)
            if (de->d_name[0] != '.') n++;
        aq_prom_set(aq_prom_with(m->open_fds, NULL), (double)(n - 1)); /* not the directory's own */
        closedir(d);
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
        aq_prom_set(aq_prom_with(m->max_fds, NULL), rl.rlim_cur == RLIM_INFINITY ? INFINITY : (double)rl.rlim_cur);
}

char *aq_worker_metrics(const aq_worker *w)
{
    aq_worker_stats s;
    aq_worker_stats_get(w, &s);
    aq_store_counters sc;
    aq_store_stats(w->store, &sc);
    aq_http_stats hs;
    aq_http_stats_get(w->http, &hs);
    size_t users = 0, waiting = aq_router_waiting_calls(w->router, &users);
    flat_row rows[FLAT_MAX];
    size_t n = flat_rows(&s, &sc, &hs, waiting, users, rows);
    for (size_t i = 0; i < n && i < w->m.nflat; i++) aq_prom_set(aq_prom_with(w->m.flat[i], NULL), rows[i].value);
    aq_router_each(w->router, put_route, (void *)&w->m);
    put_process(&w->m);
    return aq_prom_text(w->prom);
}
