/* agent.c — agent sessions as state machines on the loop (see agent.h).
 *
 * Owns: each session's history, its timers, its in-flight LLM call and
 * tool calls, and the provider client (llm.h) all sessions share. Does not
 * own: the task (the worker's), the HTTP client, the skills, the limiter,
 * or where step rows go (deps->on_step). What a reply means (answered,
 * rate-limited, retryable, fatal) is llm's to say; what to do about it
 * (wait, retry with backoff, stop) is decided here.
 *
 * Every path that ends a session goes through finish(), and finish() is
 * only ever reached from a loop callback, so the done callback never runs
 * inside a caller's call.
 *
 * Secrets: the stored text a session makes from what the provider (or a
 * tool, or curl) said is made in three places only — set_stop() (the
 * session's error), emit_step() (every step row: its name, and its detail
 * through detail_text()) and the final answer in on_llm() — and each
 * masks the registered secrets there (aq_log_mask_secrets), so a provider
 * echoing the API key in an error body ("Incorrect API key provided:
 * sk-...") stores "***". llm hands the provider's text over unmasked, so
 * these three are the only places masking happens. The key is registered
 * when llm reads it (aq_llm_new, from aq_engine_new); log lines are
 * masked by the logger itself. */
#include "agentq/agent.h"
#include "agentq/chat.h"
#include "agentq/llm.h"
#include "agentq/log.h"
#include "agentq/router.h"

#include <event2/event.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* S_LLM: the router has the call, waiting for a grant or sent. */
typedef enum { S_LLM, S_TOOLS, S_COMMIT, S_BACKOFF, S_STOPPING, S_DONE } sstate;
static const char *const state_names[] = {"llm", "tools", "commit", "backoff", "stopping", "done"};

typedef struct tool_slot {
    aq_skill_call *call;
    void *ctx;              /* the callback's argument, freed by whoever ends the call */
    char *output;
    size_t len;
    bool is_error;
    bool done;
    bool restored;          /* its result came from an earlier attempt's row */
    bool added;             /* its result is in the history and its row made */
    bool asks;              /* an ask_human call: no result until a person answers */
    int64_t started_us, mono_start, mono_end;
} tool_slot;

struct aq_engine {
    aq_engine_deps d;
    size_t sessions;
    unsigned rng;
};

struct aq_session {
    aq_engine *e;
    const aq_task *task;
    int attempt;
    sstate state;
    aq_chat *chat;
    char *tools_owned;      /* a task's subset of tools, or NULL */
    const char *tools;      /* the tools JSON offered */
    aq_chat_sampling sampling;
    struct event *deadline_ev;
    int64_t deadline_us;    /* epoch microseconds */
    struct event *wake_ev;  /* backoff, and deferred finish */
    aq_router_call *call;   /* the LLM call (waiting or in flight), or NULL */
    uint64_t avoid;         /* routes that failed the coming step (router.h) */
    int retries;
    int tries;              /* calls of the coming step that did not make it (row seq) */
    int steps;              /* over all attempts, as the totals below */
    int64_t prompt_tokens, completion_tokens;
    double cost;
    double run_base;        /* seconds earlier attempts ran */
    int64_t mono_start;     /* when this attempt started */
    bool committing;        /* deps.on_checkpoint has not answered yet */
    bool hand_over;         /* stop at the next step boundary (QUEUED) */
    char *question;         /* an ask_human call of the newest reply waits for it */
    aq_chat_reply reply;    /* the reply whose tool calls are running */
    bool have_reply;
    tool_slot *tools_run;
    size_t ntools, tools_left;
    size_t next_add;        /* results go into the history in call order from here */
    /* the outcome, once known */
    aq_status stop_status;  /* AQ_STATUS_NONE until a stop is decided */
    bool stop_retryable;
    char *stop_error;
    char *result;
    aq_session_done_cb cb;
    void *cb_arg;
};

static void next_step(aq_session *s);
static void tools_done(aq_session *s);
static void run_tools(aq_session *s);

static unsigned jitter(aq_engine *e, unsigned max)
{
    e->rng = e->rng * 1103515245u + 12345u;
    return max ? (e->rng >> 8) % max : 0;
}

aq_engine *aq_engine_new(const aq_engine_deps *deps, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    aq_engine *e = aq_xcalloc(1, sizeof *e);
    e->d = *deps;
    e->rng = (unsigned)aq_now_us();
    return e;
}

void aq_engine_free(aq_engine *e)
{
    if (!e) return;
    free(e);
}

size_t aq_engine_sessions(const aq_engine *e) { return e->sessions; }

/* Every change of a session's state goes through here and is logged at
 * debug level (curl's multi.c does the same with its states): a session's
 * life can be read from the log. */
static void set_state(aq_session *s, sstate to)
{
    aq_log_task(AQ_LOG_DEBUG, s->task->task_id, s->task->user_id, "session %s -> %s (step %d)",
                state_names[s->state], state_names[to], s->steps + 1);
    s->state = to;
}

static void set_stop(aq_session *s, aq_status status, bool retryable, const char *fmt, ...) AQ_PRINTF(4, 5);

static void set_stop(aq_session *s, aq_status status, bool retryable, const char *fmt, ...)
{
    if (s->stop_status != AQ_STATUS_NONE) return; /* the first reason wins */
    s->stop_status = status;
    s->stop_retryable = retryable;
    if (fmt) {
        /* In full, so a secret is masked whole rather than cut first. */
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(NULL, 0, fmt, ap);
        va_end(ap);
        size_t len = n > 0 ? (size_t)n : 0;
        char *buf = aq_xmalloc(len + 1);
        va_start(ap, fmt);
        vsnprintf(buf, len + 1, fmt, ap);
        va_end(ap);
        s->stop_error = aq_log_mask_secrets(buf, strlen(buf), NULL);
        free(buf);
    }
}

static void free_tools(aq_session *s)
{
    for (size_t i = 0; i < s->ntools; i++) {
        if (s->tools_run[i].call && !s->tools_run[i].done) {
            aq_skill_call_cancel(s->tools_run[i].call); /* its callback never runs */
            free(s->tools_run[i].ctx);
        }
        free(s->tools_run[i].output);
    }
    free(s->tools_run);
    s->tools_run = NULL;
    s->ntools = s->tools_left = s->next_add = 0;
    if (s->have_reply) aq_chat_reply_free(&s->reply);
    s->have_reply = false;
}

static void session_free(aq_session *s)
{
    free_tools(s);
    event_free(s->deadline_ev);
    event_free(s->wake_ev);
    aq_chat_free(s->chat);
    free(s->tools_owned);
    free(s->stop_error);
    free(s->result);
    free(s->question);
    s->e->sessions--;
    free(s);
}

static aq_session_totals totals_of(const aq_session *s)
{
    aq_session_totals t = {s->steps, s->prompt_tokens, s->completion_tokens, s->cost,
                           s->run_base + (double)(aq_mono_us() - s->mono_start) / 1e6};
    return t;
}

/* Reports the outcome and frees the session. Only from loop callbacks. */
static void finish(aq_session *s)
{
    set_state(s, S_DONE);
    aq_session_result r = {
        .status = s->stop_status != AQ_STATUS_NONE ? s->stop_status : AQ_STATUS_FAILED,
        .retryable = s->stop_retryable,
        .totals = totals_of(s),
        .result = s->result,
        .error = s->stop_error,
        .question = s->stop_status == AQ_STATUS_WAITING ? s->question : NULL,
    };
    s->cb(s, &r, s->cb_arg);
    session_free(s);
}

/* Stops whatever is in flight; finishes now or when the aborted LLM
 * call calls back. */
static void stop_now(aq_session *s)
{
    free_tools(s);
    event_del(s->wake_ev);
    event_del(s->deadline_ev);
    if (s->call) { /* on_route finishes, ABORTED */
        set_state(s, S_STOPPING);
        aq_router_cancel(s->call);
        return;
    }
    if (s->committing) { /* aq_session_checkpointed finishes */
        set_state(s, S_STOPPING);
        return;
    }
    finish(s);
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    aq_session *s = arg;
    set_stop(s, AQ_STATUS_TIMEOUT, false, "timed out after %g s (timeout_seconds)", s->task->timeout_seconds);
    stop_now(s);
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    aq_session *s = arg;
    if (s->stop_status != AQ_STATUS_NONE) {
        stop_now(s);
        return;
    }
    if (s->state == S_BACKOFF) next_step(s);
    else if (s->state == S_TOOLS && s->tools_left == 0) tools_done(s);
}

/* Masks the registered secrets in every string of `j`, keys included. */
static void mask_json(json_t *j)
{
    if (json_is_string(j)) {
        if (!aq_log_has_secret(json_string_value(j), json_string_length(j))) return; /* the usual case */
        size_t n;
        char *m = aq_log_mask_secrets(json_string_value(j), json_string_length(j), &n);
        if (json_string_setn(j, m, n) != 0) json_string_set(j, "(not UTF-8)");
        free(m);
    } else if (json_is_array(j)) {
        size_t i;
        json_t *v;
        json_array_foreach(j, i, v) mask_json(v);
    } else if (json_is_object(j)) {
        const char *k;
        json_t *v;
        void *tmp;
        json_object_foreach_safe(j, tmp, k, v) {
            mask_json(v);
            if (!aq_log_has_secret(k, strlen(k))) continue;
            char *mk = aq_log_mask_secrets(k, strlen(k), NULL);
            if (strcmp(mk, k) != 0) {
                json_object_set(j, mk, v);
                json_object_del(j, k);
            }
            free(mk);
        }
    }
}

/* The one place a step row's detail text is made: takes the reference to `d`
 * (NULL gives NULL), masks the secrets in it and returns its text, which
 * the caller frees. */
static char *detail_text(json_t *d)
{
    if (!d) return NULL;
    mask_json(d);
    char *text = json_dumps(d, JSON_COMPACT);
    json_decref(d);
    return text;
}

/* The one place a step row is made; takes the reference to `detail_json`
 * (may be NULL). `rr` is an llm row's call (its HTTP status and grant
 * wait), NULL for a tool row; `error_type` says why an llm call failed
 * (agent.h), NULL when it did not. */
static void emit_step(aq_session *s, int step, int seq, const char *kind, const char *name, const char *provider,
                      const char *status, int64_t started_us, double duration_ms, int64_t ptok, int64_t ctok,
                      double cost, json_t *detail_json, const char *message, size_t message_len,
                      const aq_router_result *rr, const char *error_type)
{
    if (!s->e->d.on_step) {
        json_decref(detail_json);
        return;
    }
    char *detail = detail_text(detail_json);
    /* a model name can come from the reply too */
    char *shown_name = name && aq_log_has_secret(name, strlen(name)) ? aq_log_mask_secrets(name, strlen(name), NULL)
                                                                       : NULL;
    aq_step_event row = {
        .task_id = s->task->task_id,
        .attempt = s->attempt,
        .step = step,
        .seq = seq,
        .kind = kind,
        .name = shown_name ? shown_name : name,
        .provider = provider,
        .status = status,
        .started_at_us = started_us,
        .duration_ms = duration_ms,
        .http_status = rr ? (int)rr->llm->http_status : 0,
        .error_type = error_type,
        .wait_ms = rr ? rr->wait_ms : 0,
        .prompt_tokens = ptok,
        .completion_tokens = ctok,
        .cost_usd = cost,
        .detail = detail,
        .message = message,
        .message_len = message_len,
    };
    s->e->d.on_step(&row, s->e->d.step_arg);
    free(detail);
    free(shown_name);
}

/* A row for an LLM call that did not make its step: it belongs to the
 * step it tried (s->steps + 1) and takes seq 1, 2, ... in that step, so the
 * store's key (task, attempt, step, kind, seq) never clashes with the call
 * that does make it (seq 0) nor with another failed try. */
static void emit_llm_failure(aq_session *s, const aq_router_result *rr, const char *status, const char *why)
{
    long http_status = rr->llm->http_status;
    if (!s->e->d.on_step) return;
    /* error_type (agent.h): a status that is not a 2xx says it all; a
     * 2xx that failed was no chat.completion */
    char code[24];
    const char *error_type = "error";
    if (!strcmp(status, "aborted")) {
        error_type = "aborted";
    } else if (http_status && (http_status < 200 || http_status > 299)) {
        snprintf(code, sizeof code, "%ld", http_status);
        error_type = code;
    } else if (rr->llm->code == AQ_ETIMEDOUT) {
        error_type = "timeout";
    } else if (rr->llm->code == AQ_EPROTO) {
        error_type = "invalid_response";
    }
    json_t *d = json_object();
    if (http_status) json_object_set_new(d, "http_status", json_integer(http_status));
    if (why && *why) {
        json_t *w = json_string(why);
        json_object_set_new(d, "error", w ? w : json_string("(not UTF-8)"));
    }
    emit_step(s, s->steps + 1, ++s->tries, "llm", s->task->model, rr->provider, status, rr->started_us,
              rr->duration_ms, 0, 0, 0, d, NULL, 0, rr, error_type);
}

static void backoff(aq_session *s, int64_t ms)
{
    set_state(s, S_BACKOFF);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_add(s->wake_ev, &tv);
}

/* A failed LLM call that may succeed if repeated. */
static void retry_or_fail(aq_session *s, const char *why)
{
    aq_engine *e = s->e;
    if (s->retries >= e->d.cfg->llm_max_retries) {
        set_stop(s, AQ_STATUS_FAILED, true, "LLM call failed after %d retries: %s", s->retries, why);
        stop_now(s);
        return;
    }
    int64_t ms = (int64_t)e->d.cfg->llm_retry_backoff_ms << (s->retries < 16 ? s->retries : 16);
    ms = ms / 2 + jitter(e, (unsigned)(ms / 2 + 1));
    s->retries++;
    aq_log_task(AQ_LOG_INFO, s->task->task_id, s->task->user_id, "LLM call failed (%s); retry %d in %lld ms", why,
                s->retries, (long long)ms);
    backoff(s, ms);
}

/* Hands the step's totals over to be made durable; the next step starts
 * in aq_session_checkpointed. */
static void checkpoint(aq_session *s)
{
    if (!s->e->d.on_checkpoint) {
        next_step(s);
        return;
    }
    set_state(s, S_COMMIT);
    s->committing = true;
    aq_session_totals t = totals_of(s);
    s->e->d.on_checkpoint(s, &t, s->cb_arg);
}

/* Every call of the reply has its result (ask_human's aside). */
static void tools_done(aq_session *s)
{
    free_tools(s);
    if (s->question) { /* the reply's other calls are in: wait for the person */
        set_stop(s, AQ_STATUS_WAITING, false, NULL);
        stop_now(s);
        return;
    }
    checkpoint(s);
}

static void on_tool(const char *output, size_t len, bool is_error, void *arg);

typedef struct tool_ctx {
    aq_session *s;
    size_t index;
} tool_ctx;

/* The one place a tool call's row is made. `message` is the result as the
 * history holds it (NULL: no result yet). */
static void record_tool(aq_session *s, size_t i, const char *status, const char *message, size_t message_len)
{
    tool_slot *t = &s->tools_run[i];
    aq_chat_tool_call *tc = &s->reply.tool_calls[i];
    json_t *d = json_object();
    json_object_set_new(d, "tool_call_id", json_string(tc->id));
    json_t *args = json_loadb(tc->args, tc->args_len, 0, NULL);
    json_object_set_new(d, "arguments", args ? args : json_stringn_nocheck(tc->args, tc->args_len));
    size_t shown = t->len < 2048 ? t->len : 2048;
    /* cut on a character boundary, or a long UTF-8 output shows as not UTF-8 */
    while (shown && shown < t->len && ((unsigned char)t->output[shown] & 0xC0) == 0x80) shown--;
    json_t *out = json_stringn(t->output ? t->output : "", shown);
    json_object_set_new(d, "output", out ? out : json_string("(not UTF-8)"));
    double ms = t->mono_end > t->mono_start ? (double)(t->mono_end - t->mono_start) / 1000.0 : 0;
    emit_step(s, s->steps, (int)i + 1, "tool", tc->name, NULL, status, t->started_us, ms, 0, 0, 0, d, message,
              message_len, NULL, NULL);
}

/* Puts the results that are in into the history, in call order (the
 * same calls give the same history, whatever order they end in), making
 * each one's row as it goes in: the row carries the result as the history
 * holds it, so a later attempt need not run that call again. False when
 * the history refused one: the session is stopping. */
static bool add_results(aq_session *s)
{
    char err[256];
    for (; s->next_add < s->ntools; s->next_add++) {
        size_t i = s->next_add;
        tool_slot *t = &s->tools_run[i];
        if (t->restored || t->asks || t->added) continue;
        if (!t->done) break;
        aq_chat_tool_call *tc = &s->reply.tool_calls[i];
        if (aq_chat_add_tool_result(s->chat, tc->id, tc->name, t->output, t->len, err, sizeof err)) {
            set_stop(s, AQ_STATUS_FAILED, false, "cannot record a tool result: %s", err);
            return false;
        }
        t->added = true;
        size_t mlen;
        const char *m = aq_chat_last_message(s->chat, &mlen);
        record_tool(s, i, t->is_error ? "error" : "ok", m, mlen);
    }
    return true;
}

/* Call i ended with `output`. */
static bool tool_result(aq_session *s, size_t i, const char *output, size_t len, bool is_error)
{
    tool_slot *t = &s->tools_run[i];
    t->done = true;
    t->call = NULL;
    t->ctx = NULL;
    t->mono_end = aq_mono_us();
    t->output = aq_xstrndup(output ? output : "", len);
    t->len = len;
    t->is_error = is_error;
    return add_results(s);
}

static void on_tool(const char *output, size_t len, bool is_error, void *arg)
{
    tool_ctx *c = arg;
    aq_session *s = c->s;
    size_t i = c->index;
    free(c);
    if (!tool_result(s, i, output, len, is_error)) {
        stop_now(s);
        return;
    }
    if (--s->tools_left == 0) tools_done(s);
}

/* Why ask_human call `tc` cannot wait for a person, or NULL when it can
 * (then *question is its question, which the caller frees). */
static const char *refuse_question(aq_session *s, const aq_chat_tool_call *tc, char **question, char *why,
                                   size_t whylen)
{
    *question = NULL;
    const aq_task *t = s->task;
    /* A task that did not list it was not offered it: it never waits. */
    if (t->n_skills == 0 || !aq_task_skill_allowed(t, AQ_SKILL_ASK_HUMAN)) {
        snprintf(why, whylen, "tool '%s' is not available to this task", tc->name);
        return why;
    }
    if (s->question) {
        snprintf(why, whylen, "%s: ask one question at a time (another call of this reply waits for its answer)",
                 tc->name);
        return why;
    }
    json_t *args = json_loadb(tc->args, tc->args_len, 0, NULL);
    const char *q = json_string_value(json_object_get(args, "question"));
    if (!q || !*q) {
        json_decref(args);
        snprintf(why, whylen, "%s: missing string argument 'question'", tc->name);
        return why;
    }
    *question = aq_log_mask_secrets(q, strlen(q), NULL);
    json_decref(args);
    return NULL;
}

/* Runs every tool call of s->reply at once, but those an earlier attempt
 * has the results of (slots restored by restore()). */
static void run_tools(aq_session *s)
{
    aq_engine *e = s->e;
    size_t n = s->reply.n_tool_calls;
    set_state(s, S_TOOLS);
    if (!s->tools_run) s->tools_run = aq_xcalloc(n, sizeof *s->tools_run);
    s->ntools = n;
    s->tools_left = 0;
    for (size_t i = 0; i < n; i++)
        if (!s->tools_run[i].restored) s->tools_left++;
    size_t immediate = 0;
    for (size_t i = 0; i < n && s->stop_status == AQ_STATUS_NONE; i++) {
        aq_chat_tool_call *tc = &s->reply.tool_calls[i];
        tool_slot *t = &s->tools_run[i];
        if (t->restored) continue;
        t->started_us = aq_now_us();
        t->mono_start = aq_mono_us();
        const char *refuse = NULL;
        char why[512];
        if ((int)i >= e->d.cfg->agent_max_tool_calls) {
            snprintf(why, sizeof why, "too many tool calls in one reply (limit %d); call it again in the next turn",
                     e->d.cfg->agent_max_tool_calls);
            refuse = why;
        } else if (tc->args_error) {
            snprintf(why, sizeof why, "%s: %s", tc->name, tc->args_error);
            refuse = why;
        } else if (!strcmp(tc->name, AQ_SKILL_ASK_HUMAN)) {
            char *question;
            refuse = refuse_question(s, tc, &question, why, sizeof why);
            if (!refuse) { /* no result until a person answers */
                s->question = question;
                t->done = t->asks = true;
                record_tool(s, i, "waiting", NULL, 0);
                immediate++;
                continue;
            }
        } else if (!aq_task_skill_allowed(s->task, tc->name)) {
            snprintf(why, sizeof why, "tool '%s' is not available to this task", tc->name);
            refuse = why;
        }
        if (!refuse) {
            tool_ctx *c = aq_xmalloc(sizeof *c);
            c->s = s;
            c->index = i;
            t->ctx = c;
            /* task, step, call: what names this call in every attempt */
            char key[AQ_TASK_ID_LEN + 32];
            snprintf(key, sizeof key, "%s/%d/%zu", s->task->task_id, s->steps, i + 1);
            t->call = aq_skills_call(e->d.skills, tc->name, tc->args, tc->args_len, s->task->task_id,
                                     s->task->user_id, key, on_tool, c);
            if (t->call) continue;
            free(c);
            t->ctx = NULL;
            refuse = "tool could not be started";
        }
        tool_result(s, i, refuse, strlen(refuse), true);
        immediate++;
    }
    s->tools_left -= immediate;
    /* Every call was refused, or the history refused a result: go on from
     * the loop (on_wake). */
    if (s->tools_left == 0 || s->stop_status != AQ_STATUS_NONE) event_active(s->wake_ev, EV_TIMEOUT, 0);
}

/* Acts on the outcome the router reports. Every call that went out and
 * did not make its step leaves a row. What a route's failure does to the
 * route (a pause, its breaker, its tokens back) the router has done. */
static void on_route(const aq_router_result *rr, void *arg)
{
    aq_session *s = arg;
    aq_llm_result *res = rr->llm;
    s->call = NULL;
    if (s->state == S_STOPPING || res->outcome == AQ_LLM_ABORTED) {
        /* Aborted by a stop (stop_now's cancel: nothing was read, even if
         * it ended just before): the time a sent one took is still worth
         * a row. */
        if (rr->sent) emit_llm_failure(s, rr, "aborted", aq_status_name(s->stop_status));
        finish(s);
        return;
    }
    uint64_t bit = rr->route >= 0 ? (uint64_t)1 << rr->route : 0;
    switch (res->outcome) {
    case AQ_LLM_ANSWERED:
        break;
    case AQ_LLM_RATE_LIMITED:
        emit_llm_failure(s, rr, "rate_limited", res->message);
        aq_log_task(AQ_LOG_DEBUG, s->task->task_id, s->task->user_id, "LLM rate limited at %s; asking again",
                    rr->provider ? rr->provider : "?");
        s->avoid |= bit;
        next_step(s); /* another route, or this one after its pause; uses no step */
        return;
    case AQ_LLM_RETRYABLE:
        emit_llm_failure(s, rr, "error", res->message);
        if (rr->other_route) {
            /* Fail over now; the retries count once every route failed. */
            aq_log_task(AQ_LOG_INFO, s->task->task_id, s->task->user_id, "LLM call to %s failed (%s); failing over",
                        rr->provider ? rr->provider : "?", res->reason);
            s->avoid |= bit;
            next_step(s);
            return;
        }
        s->avoid = 0;
        retry_or_fail(s, res->reason);
        return;
    case AQ_LLM_FATAL:
    default:
        emit_llm_failure(s, rr, "error", res->message);
        set_stop(s, AQ_STATUS_FAILED, false, "LLM provider refused the request (HTTP %ld): %s", res->http_status,
                 *res->message ? res->message : "no message");
        stop_now(s);
        return;
    }
    char err[512];
    aq_chat_reply reply;
    aq_llm_take_reply(res, &reply);
    s->retries = 0;
    s->tries = 0;
    s->avoid = 0;
    s->steps++;
    s->prompt_tokens += reply.prompt_tokens;
    s->completion_tokens += reply.completion_tokens;
    s->cost += rr->cost_usd;
    /* finish_reason is the provider's text: jansson escapes it (detail is jsonb) */
    json_t *dj = json_pack("{s:s?, s:I, s:I}", "finish_reason", reply.finish_reason, "tool_calls",
                           (json_int_t)reply.n_tool_calls, "http_ms", (json_int_t)res->total_ms);
    /* The reply as the history keeps it: what a later attempt resumes from. */
    emit_step(s, s->steps, 0, "llm", reply.model ? reply.model : s->task->model, rr->provider,
              rr->cached ? "cached" : "ok", rr->started_us, rr->duration_ms, reply.prompt_tokens,
              reply.completion_tokens, rr->cost_usd, dj, reply.message_json, reply.message_len, rr, NULL);
    if (reply.n_tool_calls == 0) {
        /* the model's words, stored as the task's result */
        char *content = aq_xstrndup(reply.content ? reply.content : "", reply.content_len);
        s->result = aq_log_mask_secrets(content, strlen(content), NULL);
        free(content);
        aq_chat_reply_free(&reply);
        set_stop(s, AQ_STATUS_COMPLETED, false, NULL);
        stop_now(s);
        return;
    }
    if (s->stop_status != AQ_STATUS_NONE) { /* a cancel is pending on wake_ev: start no tools */
        aq_chat_reply_free(&reply);
        stop_now(s);
        return;
    }
    if (aq_chat_add_reply(s->chat, &reply, err, sizeof err) != AQ_OK) {
        aq_chat_reply_free(&reply);
        set_stop(s, AQ_STATUS_FAILED, false, "cannot record the reply: %s", err);
        stop_now(s);
        return;
    }
    s->reply = reply;
    s->have_reply = true;
    run_tools(s);
}

/* Starts the next LLM call, unless a limit says stop. */
static void next_step(aq_session *s)
{
    const aq_task *t = s->task;
    if (s->stop_status != AQ_STATUS_NONE) { /* a cancel came in while the tools ran */
        stop_now(s);
        return;
    }
    if (s->hand_over) {
        set_stop(s, AQ_STATUS_QUEUED, false, "handed over after step %d", s->steps);
        stop_now(s);
        return;
    }
    if (s->steps >= t->max_steps) {
        set_stop(s, AQ_STATUS_MAX_STEPS, false, "stopped after %d steps (max_steps) without a final answer", s->steps);
        stop_now(s);
        return;
    }
    if (t->budget_usd > 0 && s->cost >= t->budget_usd) {
        set_stop(s, AQ_STATUS_BUDGET_EXCEEDED, false, "spent $%.6f of a $%.6f budget (budget_usd)", s->cost, t->budget_usd);
        stop_now(s);
        return;
    }
    set_state(s, S_LLM);
    char err[256];
    aq_router_ask ask = {t->model, t->user_id, t->user_weight, s->chat, s->tools, s->sampling, s->avoid};
    if (aq_router_send(s->e->d.router, &ask, on_route, s, &s->call, err, sizeof err) != AQ_OK) {
        /* the same history, or model, would fail the same way */
        s->call = NULL;
        set_stop(s, AQ_STATUS_FAILED, false, "%s", err);
        stop_now(s);
    }
}

/* A resume that cannot go on: the task fails (another attempt would read
 * the same rows), naming the step. */
static bool resume_fail(aq_session *s, const char *fmt, ...) AQ_PRINTF(2, 3);

static bool resume_fail(aq_session *s, const char *fmt, ...)
{
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    set_stop(s, AQ_STATUS_FAILED, false, "cannot resume from the committed steps: %s", why);
    return false;
}

/* The result of call `id` among the tool rows rows[0..n), parsed (the
 * caller decrefs), or NULL. Rows of calls another reply made (a worker
 * that lost its lease and kept writing) match no call and are skipped. */
static json_t *find_result(const aq_task_step *rows, size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_loadb(rows[i].message, rows[i].message_len, 0, NULL);
        const char *mid = json_string_value(json_object_get(m, "tool_call_id"));
        if (mid && !strcmp(mid, id) && json_is_string(json_object_get(m, "content"))) return m;
        json_decref(m);
    }
    return NULL;
}

/* Rebuilds the conversation from what earlier attempts committed (see
 * "Durable sessions" in agent.h): each step's reply (the earliest
 * attempt's) and the results of its calls, through the same appends as
 * the run, so the history cap applies as it did. A newest step with calls
 * still open leaves them in s->reply for run_tools; a committed final
 * answer completes the session. False (the stop set) when the rows
 * cannot be resumed from. */
static bool restore(aq_session *s, const aq_session_past *past)
{
    const aq_task_step *r = past->rows;
    size_t n = past->n, i = 0;
    char err[256];
    while (i < n) {
        int step = r[i].step;
        if (r[i].tool)
            return resume_fail(s, "step %d has tool results but no committed LLM reply", step);
        if (step != s->steps + 1)
            return resume_fail(s, "step %d has no committed LLM reply (the next committed step is %d)",
                               s->steps + 1, step);
        const aq_task_step *llm = &r[i];
        while (i < n && r[i].step == step && !r[i].tool) i++;
        size_t from = i;
        while (i < n && r[i].step == step) i++;
        aq_chat_reply reply;
        if (aq_chat_parse_message(llm->message, llm->message_len, &reply, err, sizeof err) != AQ_OK) {
            aq_chat_reply_free(&reply);
            return resume_fail(s, "step %d: its stored LLM reply does not parse: %s", step, err);
        }
        s->steps = step;
        s->prompt_tokens += llm->prompt_tokens;
        s->completion_tokens += llm->completion_tokens;
        s->cost += llm->cost_usd;
        if (reply.n_tool_calls == 0) { /* the answer was in; only its status write was lost */
            bool last = i == n;
            if (last) {
                s->result = aq_log_mask_secrets(reply.content ? reply.content : "", reply.content_len, NULL);
                set_stop(s, AQ_STATUS_COMPLETED, false, NULL);
            }
            aq_chat_reply_free(&reply);
            return last ? true : resume_fail(s, "step %d is a final answer, yet step %d follows", step, r[i].step);
        }
        if (aq_chat_add_reply(s->chat, &reply, err, sizeof err) != AQ_OK) {
            aq_chat_reply_free(&reply);
            return resume_fail(s, "step %d: %s", step, err);
        }
        tool_slot *slots = aq_xcalloc(reply.n_tool_calls, sizeof *slots);
        size_t open = 0;
        for (size_t c = 0; c < reply.n_tool_calls; c++) {
            aq_chat_tool_call *tc = &reply.tool_calls[c];
            json_t *m = find_result(r + from, i - from, tc->id);
            if (!m) {
                open++;
                continue;
            }
            json_t *content = json_object_get(m, "content");
            int rc = aq_chat_add_tool_result(s->chat, tc->id, tc->name, json_string_value(content),
                                             json_string_length(content), err, sizeof err);
            json_decref(m);
            if (rc != AQ_OK) {
                free(slots);
                aq_chat_reply_free(&reply);
                return resume_fail(s, "step %d: %s", step, err);
            }
            slots[c].restored = slots[c].done = true;
        }
        if (open && i < n) {
            free(slots);
            aq_chat_reply_free(&reply);
            return resume_fail(s, "step %d: %zu of its tool calls have no committed result, yet step %d follows",
                               step, open, r[i].step);
        }
        if (!open) {
            free(slots);
            aq_chat_reply_free(&reply);
            continue;
        }
        s->reply = reply; /* run_tools runs the open calls */
        s->have_reply = true;
        s->tools_run = slots;
        s->ntools = reply.n_tool_calls;
    }
    return true;
}

static void on_start(evutil_socket_t fd, short what, void *arg)
{
    aq_session *s = arg;
    event_assign(s->wake_ev, s->e->d.base, -1, 0, on_wake, s);
    if (s->stop_status != AQ_STATUS_NONE) { /* resumed to its end, or not resumable */
        stop_now(s);
        return;
    }
    /* A redelivered task may arrive past its deadline: this event runs
     * before the deadline timer does, so look first, or a call goes out
     * only to be aborted. */
    if (aq_now_us() >= s->deadline_us) {
        on_deadline(-1, EV_TIMEOUT, s);
        return;
    }
    if (s->have_reply) run_tools(s); /* resumed in the middle of a step */
    else next_step(s);
}

aq_session *aq_session_start(aq_engine *e, const aq_task *task, int attempt, int64_t deadline_us,
                             const aq_session_past *past, aq_session_done_cb cb, void *arg)
{
    aq_session *s = aq_xcalloc(1, sizeof *s);
    s->e = e;
    s->stop_status = AQ_STATUS_NONE;
    s->task = task;
    s->attempt = attempt;
    s->cb = cb;
    s->cb_arg = arg;
    s->chat = aq_chat_new(e->d.cfg->agent_system_prompt, task->goal, (size_t)e->d.cfg->agent_max_context_bytes);
    if (task->n_skills) {
        s->tools_owned = aq_skills_tools_json_for(e->d.skills, task->skills, task->n_skills);
        s->tools = s->tools_owned;
    } else {
        s->tools = aq_skills_tools_json(e->d.skills);
    }
    s->sampling.temperature = task->temperature >= 0 ? task->temperature : e->d.cfg->llm_temperature;
    s->sampling.max_tokens = e->d.cfg->llm_max_tokens;
    s->mono_start = aq_mono_us();
    if (past) {
        s->run_base = past->run_seconds > 0 ? past->run_seconds : 0;
        if (past->n) restore(s, past); /* a failure sets the stop, which on_start reports */
    }
    s->deadline_ev = evtimer_new(e->d.base, on_deadline, s);
    s->wake_ev = evtimer_new(e->d.base, on_start, s);
    if (!s->deadline_ev || !s->wake_ev) aq_oom("session timers");
    s->deadline_us = deadline_us;
    int64_t left = deadline_us - aq_now_us();
    if (left < 0) left = 0;
    struct timeval tv = {left / 1000000, left % 1000000};
    event_add(s->deadline_ev, &tv);
    /* Start from the loop so the callback can never run inside this call. */
    event_active(s->wake_ev, EV_TIMEOUT, 0);
    e->sessions++;
    return s;
}

void aq_session_cancel(aq_session *s, aq_status status)
{
    if (s->state == S_DONE || s->state == S_STOPPING) return;
    set_stop(s, status != AQ_STATUS_NONE ? status : AQ_STATUS_CANCELLED, false, "cancelled");
    /* Finish from the loop: the wake event sees stop_status. */
    event_del(s->wake_ev);
    event_assign(s->wake_ev, s->e->d.base, -1, 0, on_wake, s);
    event_active(s->wake_ev, EV_TIMEOUT, 0);
}

void aq_session_checkpointed(aq_session *s, bool ok)
{
    if (!s->committing) return;
    s->committing = false;
    if (!ok) set_stop(s, AQ_STATUS_QUEUED, false, "its step %d could not be recorded", s->steps);
    if (s->state == S_STOPPING) { /* a stop came while the rows were written */
        finish(s);
        return;
    }
    next_step(s);
}

void aq_session_hand_over(aq_session *s)
{
    if (s->state == S_DONE || s->state == S_STOPPING) return;
    s->hand_over = true;
    /* Nothing in flight to lose: stop now rather than at the boundary. */
    if ((s->state == S_LLM && s->call && aq_router_waiting(s->call)) || s->state == S_BACKOFF) {
        set_stop(s, AQ_STATUS_QUEUED, false, "handed over before step %d", s->steps + 1);
        event_del(s->wake_ev);
        event_assign(s->wake_ev, s->e->d.base, -1, 0, on_wake, s);
        event_active(s->wake_ev, EV_TIMEOUT, 0);
    }
}
