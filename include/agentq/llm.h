/* llm.h — the client of one LLM provider endpoint: sends one OpenAI-style
 * chat completion request over aq_http and sorts what came back into a
 * typed outcome, with the provider's rate-limit headers.
 *
 * It owns the endpoint's URL (base_url, its {model} filled with the
 * model the provider knows, + "/chat/completions", + "?" query), the key
 * header (Authorization: Bearer KEY, or <auth_header>: KEY, or none) made
 * from the key in the environment, and the reading of the reply: HTTP
 * status, Retry-After, the x-ratelimit-* headers, the error body, the
 * chat.completion. It keeps no session state: no retry count, no backoff,
 * no clock, no limiter, and it does not build the request (aq_chat_request
 * does: the router keys its cache on the same text). What to do about an
 * outcome is the caller's (router.h, agent.h).
 *
 * Outcomes, and what res->code says inside each:
 *   AQ_LLM_ANSWERED      a 2xx whose body is a chat.completion: res->reply
 *                        (content, tool calls, usage). code AQ_OK.
 *   AQ_LLM_RATE_LIMITED  HTTP 429: res->retry_after_ms from Retry-After
 *                        (seconds or an HTTP date), -1 when it has none.
 *                        code AQ_EAGAIN.
 *   AQ_LLM_RETRYABLE     may pass if repeated, res->reason says why:
 *                        AQ_EAGAIN  5xx, 408 (the server's own timeout),
 *                                   or a 1xx/3xx (a redirect is not
 *                                   followed);
 *                        AQ_EPROTO  a 2xx that is not a chat.completion
 *                                   (an {"error":...} body included), or a
 *                                   response aq_http refused (too big);
 *                        AQ_ETIMEDOUT, AQ_EIO, AQ_EINVAL, AQ_ECLOSED
 *                                   as aq_http reported them (timeout,
 *                                   network, a URL curl rejects, the HTTP
 *                                   client closed).
 *   AQ_LLM_FATAL         any other 4xx (400, 401, 403, 404, 422, ...): the
 *                        request itself is wrong and the same one fails
 *                        the same way. code AQ_EINVAL.
 *   AQ_LLM_ABORTED       aq_llm_cancel() was called; nothing was read.
 *                        code AQ_ECLOSED.
 *
 * Contract (aq_http's): aq_llm_send() either fails (negative AQ_E*, err
 * filled) and the callback is never called, or succeeds and the callback
 * is called exactly once, later, from the event loop — never from inside
 * aq_llm_send() or aq_llm_cancel(). aq_http_free() calls back every call
 * still outstanding (RETRYABLE, AQ_ECLOSED, "client closed").
 *
 * Secrets: aq_llm_new() registers the endpoint's key with aq_log_add_secret(), so
 * every log line masks it. The text in a result is the provider's own,
 * unmasked: whoever stores it masks it (aq_log_mask_secrets), as the
 * agent does for a session's error and its step rows. This module logs
 * nothing the provider said, nor the URL or headers.
 *
 * Cost: two small allocations per call (the handle, the URL); aq_http
 * copies the body; the reply is parsed once and moved, not copied, to the
 * caller.
 *
 * Threads: the loop thread of the aq_http it was made with. */
#ifndef AGENTQ_LLM_H
#define AGENTQ_LLM_H

#include "agentq/chat.h"
#include "agentq/common.h"
#include "agentq/config.h"
#include "agentq/http.h"

typedef struct aq_llm aq_llm;
typedef struct aq_llm_call aq_llm_call;

typedef enum aq_llm_outcome {
    AQ_LLM_ANSWERED = 0,
    AQ_LLM_RATE_LIMITED,
    AQ_LLM_RETRYABLE,
    AQ_LLM_FATAL,
    AQ_LLM_ABORTED,
} aq_llm_outcome;

/* Its name, e.g. "rate_limited"; "?" for a value out of range. */
const char *aq_llm_outcome_name(aq_llm_outcome o);

/* What the provider's rate-limit headers said (OpenAI's names, also
 * sent by Azure OpenAI, vLLM's gateways and most proxies); -1 where a
 * header was absent or unreadable. */
typedef struct aq_llm_limits {
    int64_t limit_requests, limit_tokens;         /* x-ratelimit-limit-*: per minute */
    int64_t remaining_requests, remaining_tokens; /* x-ratelimit-remaining-* */
    int64_t reset_requests_ms, reset_tokens_ms;   /* x-ratelimit-reset-*: "1s", "6m0s", "20ms" */
} aq_llm_limits;

typedef struct aq_llm_result {
    aq_llm_outcome outcome;
    int code;             /* the kind within the outcome: see the top */
    long http_status;     /* of the response; 0 when none arrived */
    int64_t total_ms;     /* from the hand-off to aq_http to the end, queueing included */
    /* ANSWERED: the parsed reply, owned by the result until the callback
     * takes it with aq_llm_take_reply(); any other outcome: all zero. */
    aq_chat_reply reply;
    /* ANSWERED: the body as the provider sent it (what a cache keeps);
     * borrowed until the callback returns. NULL otherwise. */
    const char *body;
    size_t body_len;
    /* RATE_LIMITED: the wait Retry-After asks for, in ms, or -1 when the
     * response named none (the caller picks a default). -1 otherwise. */
    int64_t retry_after_ms;
    /* Any response: its rate-limit headers. */
    aq_llm_limits limits;
    /* What the provider said, for the record: its error message (from
     * {"error":{"message":M}}, {"error":M}, {"message":M}, else the start
     * of the body) for a non-2xx; what went wrong for a network error, a
     * timeout or a reply that is not a chat.completion; "" for ANSWERED
     * and ABORTED. A provider's message is valid UTF-8 without control
     * characters, cut to AQ_LLM_MESSAGE_LEN - 1 bytes (aq_chat_parse_error).
     * Never NULL; unmasked (see Secrets above). */
    const char *message;
    /* One line saying why: for RETRYABLE after an HTTP status,
     * "HTTP <status>" and ": <message>" when there is one, e.g.
     * "HTTP 503: overloaded"; otherwise the same text as message. Never
     * NULL; unmasked. */
    const char *reason;
} aq_llm_result;

/* Most bytes of a provider's message in res->message, its NUL included. */
#define AQ_LLM_MESSAGE_LEN 400

/* `res` and the strings it points to are borrowed until the callback
 * returns; a reply not taken is freed then. The callback may send, cancel
 * other calls, and free the client. */
typedef void (*aq_llm_cb)(aq_llm_result *res, void *arg);

/* Where a client sends and how it presents its key. Strings borrowed for
 * aq_llm_new (copied). */
typedef struct aq_llm_endpoint {
    const char *base_url;    /* ".../v1"; "{model}" in it is replaced per call */
    const char *query;       /* "api-version=..." or NULL/"" */
    aq_auth_style auth;
    const char *auth_header; /* AQ_AUTH_HEADER: the header's name */
    const char *api_key_env; /* the variable holding the key; NULL/"": none */
    long timeout_ms;         /* of one request once sent */
    bool warn_no_key;        /* log a warning when api_key_env is unset */
} aq_llm_endpoint;

/* A client for `ep`. `http` is borrowed and must outlive the client; the
 * key is read from the environment now and registered as a secret (a
 * warning is logged when it cannot be masked, and, with warn_no_key,
 * when the variable is unset: the provider will answer 401).
 * Returns NULL and fills err only when the client cannot be made. The
 * caller frees it with aq_llm_free(). */
aq_llm *aq_llm_new(const aq_llm_endpoint *ep, aq_http *http, char *err, size_t errlen);

/* Frees the client; NULL is allowed. Calls in flight are not touched:
 * they call back as usual (their callbacks do not use the client). */
void aq_llm_free(aq_llm *llm);

/* Sends `body` (borrowed, `len` bytes: a request aq_chat_request built)
 * for `model` (the provider's name for it: fills {model} in the URL). On
 * success the handle is stored in *out (when not NULL), valid until the
 * callback returns. Fails, never calling back, with AQ_EAGAIN when
 * aq_http_submit refused it (err says why): may pass later. */
AQ_MUSTCHECK int aq_llm_send(aq_llm *llm, const char *model, const char *body, size_t len, aq_llm_cb cb,
                             void *arg, aq_llm_call **out, char *err, size_t errlen);

/* Milliseconds in a rate-limit reset header: "20ms", "1s", "1.5s",
 * "6m0s", "1h2m3s", or a plain number of seconds ("7"); -1 when the text
 * is none of these. */
int64_t aq_llm_parse_duration(const char *text);

/* Aborts a call; its callback then runs once, from the loop, with
 * AQ_LLM_ABORTED, even if the response had already arrived. Must not be
 * called after the callback has returned (the handle is freed then). */
void aq_llm_cancel(aq_llm_call *call);

/* Moves the reply of an ANSWERED result into *out, which the caller then
 * owns and frees with aq_chat_reply_free(); res->reply is left zeroed.
 * Only inside the callback that received `res`. */
void aq_llm_take_reply(aq_llm_result *res, aq_chat_reply *out);

#endif
