/* agent.h — the agent engine: runs agent sessions as state machines on one
 * event loop.
 *
 * A session is one attempt of one task: system prompt + goal, then steps
 * of (rate-limit grant -> LLM call -> tool calls in parallel -> results
 * appended) until a final answer or a stop: max_steps, timeout (the
 * wall-clock deadline aborts whatever is in flight), budget_exceeded (a
 * step that would start at or past the budget is not started), cancelled.
 *
 * Provider errors: 429 waits Retry-After (pausing the limiter for every
 * session) and does not use a step; 5xx, 408, network errors, timeouts and
 * malformed replies are retried llm.max_retries times with backoff, then
 * the attempt fails as retryable; any other 4xx (400/401/403/404/422...)
 * fails the task with the provider's message, not retryable.
 *
 * Step rows (deps.on_step): the LLM call that makes step N is (N, seq 0);
 * tool call i of its reply is (N, seq i+1) in the tool kind; a call that
 * did not make step N (error, rate_limited, aborted by a stop) is
 * (N, seq 1, 2, ...) in the llm kind, so no two rows of an attempt share
 * the store's key (task, attempt, step, kind, seq).
 *
 * Memory: a session costs its struct (~300 bytes), its history (capped
 * at agent.max_context_bytes, see chat.h) and, while a call is in flight,
 * the request body and curl's transfer state. */
#ifndef AGENTQ_AGENT_H
#define AGENTQ_AGENT_H

#include "agentq/config.h"
#include "agentq/http.h"
#include "agentq/ratelimit.h"
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
    const char *status;    /* "ok", "error", "rate_limited", "aborted"; may be NULL */
    int64_t started_at_us; /* epoch microseconds */
    double duration_ms;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
    const char *detail;    /* JSON text, secrets masked; may be NULL */
} aq_step_event;

typedef struct aq_engine_deps {
    const aq_config *cfg;      /* borrowed; outlives the engine */
    struct event_base *base;
    aq_http *http;             /* borrowed */
    aq_skills *skills;         /* borrowed */
    aq_ratelimit *ratelimit;   /* borrowed */
    /* Every LLM and tool call, as it ends. Row borrowed for the call. */
    void (*on_step)(const aq_step_event *step, void *arg);
    void *step_arg;
} aq_engine_deps;

typedef struct aq_session_result {
    aq_status status;     /* completed, failed, timeout, budget_exceeded, max_steps, cancelled, or
                           * the status a cancel gave (the worker's drain: queued) */
    bool retryable;       /* failed, and another attempt may succeed */
    int steps;            /* LLM calls made */
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
    const char *result;   /* final answer, or NULL */
    const char *error;    /* why it stopped, or NULL */
} aq_session_result;

/* Called exactly once per started session, from the loop (never from
 * inside aq_session_start or aq_session_cancel). `r` is borrowed for the
 * call; the session is freed after the callback returns. */
typedef void (*aq_session_done_cb)(aq_session *s, const aq_session_result *r, void *arg);

aq_engine *aq_engine_new(const aq_engine_deps *deps, char *err, size_t errlen);
void aq_engine_free(aq_engine *e);

/* Starts a session for `task` (borrowed: must outlive the session) as
 * attempt `attempt`, with an absolute wall-clock deadline in epoch
 * microseconds. */
aq_session *aq_session_start(aq_engine *e, const aq_task *task, int attempt, int64_t deadline_us,
                             aq_session_done_cb cb, void *arg);

/* Stops a session: in-flight calls are aborted and the callback reports
 * `status` (AQ_STATUS_NONE: cancelled). The first stop decided wins. */
void aq_session_cancel(aq_session *s, aq_status status);

/* Sessions running now. */
size_t aq_engine_sessions(const aq_engine *e);

#endif
