/* llm.h — the LLM provider client: sends one OpenAI-style chat completion
 * request over aq_http and sorts what came back into a typed outcome.
 *
 * It owns the provider's URL (llm.base_url + "/chat/completions"), the
 * Authorization header made from the API key, the request (built from a
 * conversation by chat.h) and the reading of the reply: HTTP status,
 * Retry-After, the error body, the chat.completion. It keeps no session
 * state: no retry count, no backoff, no clock, no limiter. What to do
 * about an outcome is the caller's (the agent's, see agent.h).
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
 * Secrets: aq_llm_new() registers the API key with aq_log_add_secret(), so
 * every log line masks it. The text in a result is the provider's own,
 * unmasked: whoever stores it masks it (aq_log_mask_secrets), as the
 * agent does for a session's error and its step rows. This module logs
 * nothing the provider said, nor the URL or headers.
 *
 * Cost: one small allocation per call besides the request body, which is
 * built once, handed to aq_http (which copies it) and freed; the reply is
 * parsed once and moved, not copied, to the caller.
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

typedef struct aq_llm_result {
    aq_llm_outcome outcome;
    int code;             /* the kind within the outcome: see the top */
    long http_status;     /* of the response; 0 when none arrived */
    int64_t total_ms;     /* from the hand-off to aq_http to the end, queueing included */
    /* ANSWERED: the parsed reply, owned by the result until the callback
     * takes it with aq_llm_take_reply(); any other outcome: all zero. */
    aq_chat_reply reply;
    /* RATE_LIMITED: the wait Retry-After asks for, in ms, or -1 when the
     * response named none (the caller picks a default). -1 otherwise. */
    int64_t retry_after_ms;
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

/* A client for the provider llm.base_url names. `cfg` and `http` are
 * borrowed and must outlive the client; the API key (aq_config_api_key)
 * is read now and registered as a secret (a warning is logged when it
 * cannot be masked). Returns NULL and fills err only when the client
 * cannot be made. The caller frees it with aq_llm_free(). */
aq_llm *aq_llm_new(const aq_config *cfg, aq_http *http, char *err, size_t errlen);

/* Frees the client; NULL is allowed. Calls in flight are not touched:
 * they call back as usual (their callbacks do not use the client). */
void aq_llm_free(aq_llm *llm);

/* Builds the request for `chat` (borrowed) as `model` offering
 * `tools_json` (borrowed; NULL or "[]" for none; see aq_chat_request) and
 * sends it with llm.timeout_ms. On success the handle is stored in *out
 * (when not NULL), valid until the callback returns. Fails, never calling
 * back, with
 *   AQ_EINVAL  the request cannot be built (empty model, a tool call of
 *              the newest turn without a result): the same chat fails the
 *              same way;
 *   AQ_EAGAIN  aq_http_submit refused it (err says why): may pass later. */
AQ_MUSTCHECK int aq_llm_send(aq_llm *llm, const aq_chat *chat, const char *model,
                             const char *tools_json, aq_llm_cb cb, void *arg,
                             aq_llm_call **out, char *err, size_t errlen);

/* Aborts a call; its callback then runs once, from the loop, with
 * AQ_LLM_ABORTED, even if the response had already arrived. Must not be
 * called after the callback has returned (the handle is freed then). */
void aq_llm_cancel(aq_llm_call *call);

/* Moves the reply of an ANSWERED result into *out, which the caller then
 * owns and frees with aq_chat_reply_free(); res->reply is left zeroed.
 * Only inside the callback that received `res`. */
void aq_llm_take_reply(aq_llm_result *res, aq_chat_reply *out);

#endif
