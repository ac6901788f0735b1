/* llm.c — the LLM provider client (see llm.h).
 *
 * Owns: the chat completions URL, the Authorization header, and each
 * call's small handle (callback, argument, cancelled flag). Does not own:
 * the HTTP client, the conversation, or anything a session decides
 * (retries, waits, steps); and it stores no text, so masking what the
 * provider said is left to whoever stores it (agent.c).
 *
 * The classification is by HTTP status first, then by the body: only a
 * 2xx body is parsed as a chat.completion; any other body is read for the
 * provider's message alone. */
#include "agentq/llm.h"
#include "agentq/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct aq_llm {
    const aq_config *cfg; /* borrowed: llm.timeout_ms is read per call */
    aq_http *http;        /* borrowed */
    char *url;
    char *auth_header;    /* "Authorization: Bearer ..." or NULL */
};

struct aq_llm_call {
    aq_llm_cb cb;
    void *arg;
    aq_http_req *req;
    bool cancelled;
};

static const char *const outcome_names[] = {
    [AQ_LLM_ANSWERED] = "answered",
    [AQ_LLM_RATE_LIMITED] = "rate_limited",
    [AQ_LLM_RETRYABLE] = "retryable",
    [AQ_LLM_FATAL] = "fatal",
    [AQ_LLM_ABORTED] = "aborted",
};

const char *aq_llm_outcome_name(aq_llm_outcome o)
{
    return (unsigned)o < AQ_ARRAY_LEN(outcome_names) ? outcome_names[o] : "?";
}

aq_llm *aq_llm_new(const aq_config *cfg, aq_http *http, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    aq_llm *llm = aq_xcalloc(1, sizeof *llm);
    llm->cfg = cfg;
    llm->http = http;
    const char *base = cfg->llm_base_url;
    size_t bl = strlen(base);
    while (bl && base[bl - 1] == '/') bl--;
    llm->url = aq_xmalloc(bl + sizeof "/chat/completions");
    memcpy(llm->url, base, bl);
    strcpy(llm->url + bl, "/chat/completions");
    const char *key = aq_config_api_key(cfg);
    if (key) {
        /* Masked in every log line, and by aq_log_mask_secrets in stored
         * text, from now on. */
        if (aq_log_add_secret(key) != AQ_OK)
            aq_log(AQ_LOG_WARN, "the API key in %s cannot be masked (%s): provider errors that "
                                "echo it will show it", cfg->llm_api_key_env,
                   strlen(key) < 4 ? "shorter than 4 bytes" : "too many secrets registered");
        size_t n = strlen(key) + sizeof "Authorization: Bearer ";
        llm->auth_header = aq_xmalloc(n);
        snprintf(llm->auth_header, n, "Authorization: Bearer %s", key);
    }
    return llm;
}

void aq_llm_free(aq_llm *llm)
{
    if (!llm) return;
    free(llm->url);
    free(llm->auth_header);
    free(llm);
}

void aq_llm_take_reply(aq_llm_result *res, aq_chat_reply *out)
{
    *out = res->reply;
    memset(&res->reply, 0, sizeof res->reply);
}

/* Sorts a response that is not a 2xx. msg gets the provider's message,
 * reason (reasonlen bytes) the line a retry is logged and failed with. */
static void classify_status(aq_llm_result *r, const aq_http_result *res, char *msg, char *reason,
                            size_t reasonlen)
{
    aq_chat_parse_error(res->body, res->body_len, msg, AQ_LLM_MESSAGE_LEN);
    r->message = r->reason = msg;
    if (res->status == 429) {
        r->outcome = AQ_LLM_RATE_LIMITED;
        r->code = AQ_EAGAIN;
        r->retry_after_ms = res->retry_after_ms;
        return;
    }
    /* 5xx, a redirect we do not follow, or the server's own timeout (408)
     * may pass if repeated; any other 4xx is about the request. */
    if (res->status >= 500 || res->status < 400 || res->status == 408) {
        r->outcome = AQ_LLM_RETRYABLE;
        r->code = AQ_EAGAIN;
        snprintf(reason, reasonlen, "HTTP %ld%s%s", res->status, *msg ? ": " : "", msg);
        r->reason = reason;
        return;
    }
    r->outcome = AQ_LLM_FATAL;
    r->code = AQ_EINVAL;
}

static void on_http(aq_http_req *req, const aq_http_result *res, void *arg)
{
    aq_llm_call *call = arg;
    char msg[AQ_LLM_MESSAGE_LEN] = "", reason[512] = "";
    aq_llm_result r = {
        .outcome = AQ_LLM_ANSWERED,
        .code = AQ_OK,
        .http_status = res->status,
        .total_ms = res->total_ms,
        .retry_after_ms = -1,
        .message = "",
        .reason = "",
    };
    if (call->cancelled) {
        /* Whatever arrived (it may have ended just before the cancel) is
         * not read: the caller has stopped wanting it. */
        r.outcome = AQ_LLM_ABORTED;
        r.code = AQ_ECLOSED;
    } else if (res->code != AQ_OK) {
        r.outcome = AQ_LLM_RETRYABLE;
        r.code = res->code;
        r.message = r.reason = res->error && *res->error ? res->error : aq_strerror(res->code);
    } else if (res->status < 200 || res->status > 299) {
        classify_status(&r, res, msg, reason, sizeof reason);
    } else if (aq_chat_parse_reply(res->body, res->body_len, &r.reply, reason, sizeof reason) != AQ_OK) {
        aq_chat_reply_free(&r.reply);
        r.outcome = AQ_LLM_RETRYABLE;
        r.code = AQ_EPROTO;
        r.message = r.reason = reason;
    }
    call->cb(&r, call->arg);
    /* The handle lives until here, so a callback may still cancel it
     * (which does nothing now). */
    free(call);
    aq_chat_reply_free(&r.reply); /* unless the callback took it */
}

int aq_llm_send(aq_llm *llm, const aq_chat *chat, const char *model, const char *tools_json,
                aq_llm_cb cb, void *arg, aq_llm_call **out, char *err, size_t errlen)
{
    char *body = NULL;
    size_t len = 0;
    if (aq_chat_request(chat, model, tools_json, &body, &len) != AQ_OK) {
        aq_seterr(err, errlen, "cannot build the LLM request");
        return AQ_EINVAL;
    }
    const char *headers[2] = {"Content-Type: application/json", llm->auth_header};
    aq_http_request rq = {
        .method = AQ_HTTP_POST,
        .url = llm->url,
        .headers = headers,
        .nheaders = llm->auth_header ? 2 : 1,
        .body = body,
        .body_len = len,
        .timeout_ms = llm->cfg->llm_timeout_ms,
    };
    aq_llm_call *call = aq_xmalloc(sizeof *call);
    call->cb = cb;
    call->arg = arg;
    call->cancelled = false;
    int rc = aq_http_submit(llm->http, &rq, on_http, call, &call->req, err, errlen);
    free(body); /* aq_http has its own copy */
    if (rc != AQ_OK) {
        free(call);
        return AQ_EAGAIN;
    }
    if (out) *out = call;
    return AQ_OK;
}

void aq_llm_cancel(aq_llm_call *call)
{
    call->cancelled = true;
    aq_http_cancel(call->req);
}
