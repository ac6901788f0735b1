/* llm.c — the LLM provider client (see llm.h).
 *
 * Owns: the endpoint's URL parts, its key header, and each
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

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct aq_llm {
    aq_http *http;        /* borrowed */
    char *url_head;       /* base_url up to "{model}", or all of it */
    char *url_tail;       /* after "{model}" + "/chat/completions" + "?query" */
    bool has_model;       /* base_url holds {model} */
    char *auth_header;    /* the key's header line, or NULL */
    long timeout_ms;
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

aq_llm *aq_llm_new(const aq_llm_endpoint *ep, aq_http *http, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    aq_llm *llm = aq_xcalloc(1, sizeof *llm);
    llm->http = http;
    llm->timeout_ms = ep->timeout_ms;
    const char *base = ep->base_url;
    const char *hole = strstr(base, "{model}");
    llm->has_model = hole != NULL;
    size_t head = hole ? (size_t)(hole - base) : strlen(base);
    const char *rest = hole ? hole + strlen("{model}") : base + head;
    size_t rl = strlen(rest);
    if (!hole)
        while (head && base[head - 1] == '/') head--;
    else
        while (rl && rest[rl - 1] == '/') rl--;
    llm->url_head = aq_xstrndup(base, head);
    const char *q = ep->query && *ep->query ? ep->query : NULL;
    size_t tn = rl + sizeof "/chat/completions?" + (q ? strlen(q) : 0);
    llm->url_tail = aq_xmalloc(tn);
    snprintf(llm->url_tail, tn, "%.*s/chat/completions%s%s", (int)rl, rest, q ? "?" : "", q ? q : "");
    const char *env = ep->api_key_env && *ep->api_key_env ? ep->api_key_env : NULL;
    const char *key = env ? getenv(env) : NULL;
    if (key && !*key) key = NULL;
    if (ep->warn_no_key && ep->auth != AQ_AUTH_NONE && env && !key)
        aq_log(AQ_LOG_WARN, "%s is not set: calls to %s go without a key", env, llm->url_head);
    if (key && ep->auth != AQ_AUTH_NONE) {
        /* Masked in every log line, and by aq_log_mask_secrets in stored
         * text, from now on. */
        if (aq_log_add_secret(key) != AQ_OK)
            aq_log(AQ_LOG_WARN, "the API key in %s cannot be masked (%s): provider errors that "
                                "echo it will show it", env,
                   strlen(key) < 4 ? "shorter than 4 bytes" : "too many secrets registered");
        const char *name = ep->auth == AQ_AUTH_HEADER ? ep->auth_header : "Authorization";
        const char *scheme = ep->auth == AQ_AUTH_HEADER ? "" : "Bearer ";
        size_t n = strlen(name) + strlen(scheme) + strlen(key) + 3;
        llm->auth_header = aq_xmalloc(n);
        snprintf(llm->auth_header, n, "%s: %s%s", name, scheme, key);
    }
    return llm;
}

void aq_llm_free(aq_llm *llm)
{
    if (!llm) return;
    free(llm->url_head);
    free(llm->url_tail);
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

int64_t aq_llm_parse_duration(const char *text)
{
    if (!text) return -1;
    const char *p = text;
    while (*p == ' ') p++;
    double total = 0;
    bool any = false;
    while (*p && *p != ' ') {
        char *end;
        if (!(*p >= '0' && *p <= '9') && *p != '.') return -1;
        double v = strtod(p, &end);
        if (end == p || !(v >= 0) || v > 1e9) return -1;
        p = end;
        double unit;
        if (!strncmp(p, "ms", 2)) unit = 1, p += 2;
        else if (*p == 's') unit = 1000, p++;
        else if (*p == 'm') unit = 60000, p++;
        else if (*p == 'h') unit = 3600000, p++;
        else if (!*p || *p == ' ') {
            if (any) return -1; /* "1m30" */
            unit = 1000;        /* a bare number: seconds, as Retry-After */
        } else {
            return -1;
        }
        total += v * unit;
        any = true;
    }
    while (*p == ' ') p++;
    if (!any || *p || total > 1e12) return -1;
    return (int64_t)ceil(total);
}

static int64_t header_count(const aq_http_result *res, const char *name)
{
    const char *v = aq_http_result_header(res, name);
    if (!v) return -1;
    char *end;
    double d = strtod(v, &end);
    while (*end == ' ') end++;
    if (end == v || *end || !(d >= 0) || d > 9e15) return -1;
    return (int64_t)d;
}

static void read_limits(const aq_http_result *res, aq_llm_limits *l)
{
    l->limit_requests = header_count(res, "x-ratelimit-limit-requests");
    l->limit_tokens = header_count(res, "x-ratelimit-limit-tokens");
    l->remaining_requests = header_count(res, "x-ratelimit-remaining-requests");
    l->remaining_tokens = header_count(res, "x-ratelimit-remaining-tokens");
    l->reset_requests_ms = aq_llm_parse_duration(aq_http_result_header(res, "x-ratelimit-reset-requests"));
    l->reset_tokens_ms = aq_llm_parse_duration(aq_http_result_header(res, "x-ratelimit-reset-tokens"));
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
        .limits = {-1, -1, -1, -1, -1, -1},
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
    } else {
        read_limits(res, &r.limits);
        if (res->status < 200 || res->status > 299) {
            classify_status(&r, res, msg, reason, sizeof reason);
        } else if (aq_chat_parse_reply(res->body, res->body_len, &r.reply, reason, sizeof reason) != AQ_OK) {
            aq_chat_reply_free(&r.reply);
            r.outcome = AQ_LLM_RETRYABLE;
            r.code = AQ_EPROTO;
            r.message = r.reason = reason;
        } else {
            r.body = res->body;
            r.body_len = res->body_len;
        }
    }
    call->cb(&r, call->arg);
    /* The handle lives until here, so a callback may still cancel it
     * (which does nothing now). */
    free(call);
    aq_chat_reply_free(&r.reply); /* unless the callback took it */
}

int aq_llm_send(aq_llm *llm, const char *model, const char *body, size_t len, aq_llm_cb cb, void *arg,
                aq_llm_call **out, char *err, size_t errlen)
{
    const char *m = llm->has_model && model ? model : "";
    size_t un = strlen(llm->url_head) + strlen(m) + strlen(llm->url_tail) + 1;
    char *url = aq_xmalloc(un);
    snprintf(url, un, "%s%s%s", llm->url_head, m, llm->url_tail);
    const char *headers[2] = {"Content-Type: application/json", llm->auth_header};
    aq_http_request rq = {
        .method = AQ_HTTP_POST,
        .url = url,
        .headers = headers,
        .nheaders = llm->auth_header ? 2 : 1,
        .body = body,
        .body_len = len,
        .timeout_ms = llm->timeout_ms,
    };
    aq_llm_call *call = aq_xmalloc(sizeof *call);
    call->cb = cb;
    call->arg = arg;
    call->cancelled = false;
    int rc = aq_http_submit(llm->http, &rq, on_http, call, &call->req, err, errlen);
    free(url); /* aq_http has its own copies */
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
