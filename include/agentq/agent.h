/* agent.h — the agent engine: runs agent sessions as state machines on one
 * event loop.
 *
 * A session is one attempt of one task: system prompt + goal, then steps
 * of (rate-limit grant -> LLM call -> tool calls in parallel -> results
 * appended) until a final answer or a stop: max_steps, timeout (the
 * wall-clock deadline aborts whatever is in flight), budget_exceeded (a
 * step that would start at or past the budget is not started), cancelled.
 *
 * Provider errors (router.h routes the call and acts on what a reply says
 * about its route): a 429 asks again at once — another route of the
 * model, or this one after its pause — and does not use a step; 5xx, 408,
 * network errors, timeouts and malformed replies fail over at once to a
 * route of the model not yet tried in this step, and once every route has
 * failed they are retried llm.max_retries times with backoff, then the
 * attempt fails as retryable; any other 4xx (400/401/403/404/422...)
 * fails the task with the provider's message, not retryable. A reply from
 * the fleet's cache makes its step like any other, at cost 0.
 *
 * Step rows (deps.on_step): the LLM call that makes step N is (N, seq 0);
 * tool call i of its reply is (N, seq i+1) in the tool kind; a call that
 * did not make step N (error, rate_limited, aborted by a stop) is
 * (N, seq 1, 2, ...) in the llm kind (status error, rate_limited or
 * aborted; a cache hit's row says "cached"), so no two rows of an attempt share
 * the store's key (task, attempt, step, kind, seq).
 *
 * Durable sessions. Every row that changes the conversation carries the
 * change (aq_step_event.message): the LLM's reply, or a tool result as the
 * history holds it. A new attempt given the rows earlier attempts
 * committed (aq_session_past) rebuilds the conversation from them — the
 * history cap applies as it did during the run — and goes on from there:
 * a reply whose tool calls all have results is not asked again, a tool
 * call without a result runs again (HTTP skills get the same
 * Idempotency-Key), and a committed final answer completes the task with
 * no call at all. Steps, tokens, cost and running time count over all
 * attempts, so max_steps, budget_usd and timeout_seconds mean the same
 * with or without crashes. Before each LLM call after the first, the
 * session hands its totals to deps.on_checkpoint and waits for
 * aq_session_checkpointed(): once the rows of a step are committed, a
 * crash repeats at most the one LLM call in flight.
 *
 * Waiting for a person. A task that lists ask_human in its skills may
 * call it ({"question": ...}); once the reply's other calls are done the
 * session ends as AQ_STATUS_WAITING with the question (its tool row says
 * "waiting" and has no result: the answer becomes that result, and the
 * next attempt resumes with it).
 *
 * Hand-over. aq_session_hand_over() asks a session to stop at its next
 * step boundary (after a checkpoint, or at once while it waits for a
 * grant or a backoff) with AQ_STATUS_QUEUED, for a new attempt to resume.
 *
 * Memory: a session costs its struct (~300 bytes), its history (capped
 * at agent.max_context_bytes, see chat.h) and, while a call is in flight,
 * the request body and curl's transfer state. */
#ifndef AGENTQ_AGENT_H
#define AGENTQ_AGENT_H

#include "agentq/config.h"
#include "agentq/http.h"
#include "agentq/router.h"
#include "agentq/skill.h"
#include "agentq/status.h"
#include "agentq/task.h"

struct event_base;
typedef struct aq_engine aq_engine;
typedef struct aq_session aq_session;

/* One LLM or tool call, as it ended (the worker stores it as an
 * agentq.steps row). Strings borrowed for the call. */
typedef struct aq_step_event {
    const char *task_id;
    int attempt;
    int step;              /* step number, 1 for the first LLM call */
    int seq;               /* see "Step rows" above */
    const char *kind;      /* "llm" or "tool" */
    const char *name;      /* model or skill name; may be NULL */
    const char *provider;  /* llm: who answered ("cache" for a cache hit), NULL for a call
                            * that never went out and for tool rows */
    const char *status;    /* "ok", "error", "rate_limited", "aborted"; may be NULL */
    int64_t started_at_us; /* epoch microseconds */
    double duration_ms;
    int http_status;       /* llm: the response's HTTP status (200 for an answered call);
                            * 0 when none arrived, and for tool rows */
    const char *error_type; /* llm: why a call failed, as OpenTelemetry's error.type: the HTTP
                             * status of a response that was not a 2xx ("429", "503"), else
                             * "timeout", "invalid_response", "aborted" or "error" (no
                             * response: network, refused); NULL when it answered, and for
                             * tool rows */
    double wait_ms;        /* llm: how long the call waited for its rate-limit grant; 0 for a
                            * cache hit and for tool rows */
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
    const char *detail;    /* JSON text, secrets masked; may be NULL */
    const char *message;   /* what the call added to the conversation (JSON
                            * text, message_len bytes, not NUL-terminated),
                            * or NULL: see "Durable sessions" */
    size_t message_len;
} aq_step_event;

/* A session's counts over all its task's attempts. */
typedef struct aq_session_totals {
    int steps;            /* LLM calls that made a step */
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
    double run_seconds;   /* running time: earlier attempts' and this one's */
} aq_session_totals;

/* What earlier attempts committed: the rows (ordered by step, the llm
 * kind before tool, then attempt and seq, as agentq.session_log gives
 * them) and their running time. Borrowed for aq_session_start. */
typedef struct aq_session_past {
    const aq_task_step *rows;
    size_t n;
    double run_seconds;
} aq_session_past;

typedef struct aq_engine_deps {
    const aq_config *cfg;      /* borrowed; outlives the engine */
    struct event_base *base;
    aq_http *http;             /* borrowed */
    aq_skills *skills;         /* borrowed */
    aq_router *router;         /* borrowed: providers, limits, the cache */
    /* Every LLM and tool call, as it ends. Row borrowed for the call. */
    void (*on_step)(const aq_step_event *step, void *arg);
    void *step_arg;
    /* A step is over (its tool results are in): make its rows durable and
     * record `totals` on the task, then call aq_session_checkpointed(s, ok)
     * — exactly once, from the loop, later. NULL: no waiting. `arg` is the
     * session's own (aq_session_start). */
    void (*on_checkpoint)(aq_session *s, const aq_session_totals *totals, void *arg);
} aq_engine_deps;

typedef struct aq_session_result {
    aq_status status;     /* completed, failed, timeout, budget_exceeded, max_steps, cancelled, or
                           * the status a cancel gave (the worker's drain: queued) */
    bool retryable;       /* failed, and another attempt may succeed */
    aq_session_totals totals; /* over all attempts */
    const char *result;   /* final answer, or NULL */
    const char *error;    /* why it stopped, or NULL */
    const char *question; /* AQ_STATUS_WAITING: what it asks (ask_human) */
} aq_session_result;

/* Called exactly once per started session, from the loop (never from
 * inside aq_session_start or aq_session_cancel). `r` is borrowed for the
 * call; the session is freed after the callback returns. */
typedef void (*aq_session_done_cb)(aq_session *s, const aq_session_result *r, void *arg);

aq_engine *aq_engine_new(const aq_engine_deps *deps, char *err, size_t errlen);
void aq_engine_free(aq_engine *e);

/* Starts a session for `task` (borrowed: must outlive the session) as
 * attempt `attempt`, with an absolute wall-clock deadline in epoch
 * microseconds, resuming from `past` (NULL or no rows: from the start; the
 * rows are copied). Rows that cannot be resumed from (a step missing, a
 * message that does not parse, a result for no call) fail the task with
 * an error naming the step. */
aq_session *aq_session_start(aq_engine *e, const aq_task *task, int attempt, int64_t deadline_us,
                             const aq_session_past *past, aq_session_done_cb cb, void *arg);

/* The checkpoint deps.on_checkpoint asked for is over: committed (`ok`),
 * or not (the session stops: AQ_STATUS_QUEUED, for the next claim to
 * decide). */
void aq_session_checkpointed(aq_session *s, bool ok);

/* Asks the session to stop at its next step boundary with
 * AQ_STATUS_QUEUED (see "Hand-over"). */
void aq_session_hand_over(aq_session *s);

/* Stops a session: in-flight calls are aborted and the callback reports
 * `status` (AQ_STATUS_NONE: cancelled). The first stop decided wins. */
void aq_session_cancel(aq_session *s, aq_status status);

/* Sessions running now. */
size_t aq_engine_sessions(const aq_engine *e);

#endif
