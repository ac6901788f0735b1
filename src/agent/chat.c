/* chat.c — one session's conversation and the Chat Completions wire format
 * (see chat.h for the contract: turns, the cap rule, what memory costs).
 *
 * The history is kept as text, never as a jansson tree: each message is
 * written once, escaped, into one buffer as ",{...}", and a request is the
 * head (system prompt and goal) and that buffer copied between two fixed
 * strings. Dropping the oldest turns is one memmove. jansson is used only to
 * read what comes from outside (replies, error bodies, tool schemas). */
#include "agentq/chat.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- growing text buffer ---------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static void sb_reserve(sbuf *b, size_t more)
{
    if (b->cap - b->len >= more) return;
    size_t need = b->len + more;
    if (need < b->len) aq_oom("a chat buffer");
    /* 1.5x growth: amortised appends without doubling a session's slack. */
    size_t cap = b->cap + b->cap / 2;
    if (cap < need) cap = need;
    if (cap < 256) cap = 256;
    b->p = aq_xrealloc(b->p, cap);
    b->cap = cap;
}

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (n == 0) return;
    sb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_putc(sbuf *b, char ch)
{
    sb_reserve(b, 1);
    b->p[b->len++] = ch;
}

/* NUL-terminates and hands the text over; the buffer is left empty. */
static char *sb_take(sbuf *b, size_t *len)
{
    sb_putc(b, '\0');
    char *p = b->p;
    if (len) *len = b->len - 1;
    b->p = NULL;
    b->len = b->cap = 0;
    return p;
}

/* ---- UTF-8 and JSON string escaping ----------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if there is none
 * (overlong forms, surrogates and code points above U+10FFFF are invalid,
 * as in RFC 3629). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t want;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        want = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        want = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        want = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (n < want) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < want; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return want;
}

#define REPLACEMENT "\\ufffd"
#define NO_LIMIT ((size_t)-1)

/* Escapes s[0..n) as the body of a JSON string (no quotes) into b, or only
 * counts when b is NULL. Stops before the output would pass `limit` bytes,
 * always at a character boundary. Returns the output size; *used gets the
 * input bytes consumed. Invalid UTF-8 becomes U+FFFD, so the output is
 * always valid JSON whatever the input. */
static size_t json_escape(sbuf *b, const char *s, size_t n, size_t limit, size_t *used)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, out = 0;
    if (b && limit == NO_LIMIT) sb_reserve(b, n);
    while (i < n) {
        /* Runs of plain ASCII, the common case, go in one copy. */
        size_t j = i;
        while (j < n && u[j] >= 0x20 && u[j] < 0x80 && u[j] != '"' && u[j] != '\\') j++;
        if (j > i) {
            size_t run = j - i;
            if (run > limit - out) run = limit - out;
            if (b) sb_put(b, s + i, run);
            out += run;
            i += run;
            if (i < j) break; /* limit reached */
            continue;
        }
        char esc[8];
        const char *piece;
        size_t plen, adv;
        unsigned c = u[i];
        if (c < 0x80) {
            adv = 1;
            piece = esc;
            switch (c) {
            case '"': piece = "\\\""; plen = 2; break;
            case '\\': piece = "\\\\"; plen = 2; break;
            case '\n': piece = "\\n"; plen = 2; break;
            case '\r': piece = "\\r"; plen = 2; break;
            case '\t': piece = "\\t"; plen = 2; break;
            case '\b': piece = "\\b"; plen = 2; break;
            case '\f': piece = "\\f"; plen = 2; break;
            default:
                snprintf(esc, sizeof esc, "\\u%04x", c);
                plen = 6;
            }
        } else {
            adv = utf8_seq(u + i, n - i);
            if (adv) {
                piece = s + i;
                plen = adv;
            } else {
                adv = 1;
                piece = REPLACEMENT;
                plen = sizeof REPLACEMENT - 1;
            }
        }
        if (plen > limit - out) break;
        if (b) sb_put(b, piece, plen);
        out += plen;
        i += adv;
    }
    if (used) *used = i;
    return out;
}

static void put_jstr(sbuf *b, const char *s, size_t n)
{
    sb_putc(b, '"');
    json_escape(b, s, n, NO_LIMIT, NULL);
    sb_putc(b, '"');
}

static void put_jstrz(sbuf *b, const char *s) { put_jstr(b, s, strlen(s)); }

/* Like put_jstr, but the escaped body is cut to `limit` bytes, the marker
 * included. Returns true when it cut. */
static bool put_jstr_cut(sbuf *b, const char *s, size_t n, size_t limit)
{
    const size_t mlen = sizeof AQ_CHAT_TRUNCATED - 1; /* needs no escaping */
    sb_putc(b, '"');
    bool cut = json_escape(NULL, s, n, NO_LIMIT, NULL) > limit;
    if (cut) {
        json_escape(b, s, n, limit > mlen ? limit - mlen : 0, NULL);
        sb_put(b, AQ_CHAT_TRUNCATED, mlen);
    } else {
        json_escape(b, s, n, NO_LIMIT, NULL);
    }
    sb_putc(b, '"');
    return cut;
}

/* Copies src[0..n) into dst as one line of valid UTF-8: control characters
 * become spaces, invalid bytes U+FFFD, trailing whitespace goes; cut at a
 * character boundary to fit dstlen. For text from a peer that ends up in
 * logs, error columns and the model's view. */
static void clean_text(char *dst, size_t dstlen, const char *src, size_t n)
{
    if (!dst || dstlen == 0) return;
    const unsigned char *u = (const unsigned char *)src;
    size_t o = 0, i = 0;
    while (i < n) {
        size_t adv = u[i] < 0x80 ? 1 : utf8_seq(u + i, n - i);
        const char *piece = src + i;
        size_t plen = adv;
        if (adv == 0) {
            adv = 1;
            piece = "\xef\xbf\xbd";
            plen = 3;
        } else if (u[i] < 0x20 || u[i] == 0x7f) {
            piece = " ";
        }
        if (o + plen >= dstlen) break;
        memcpy(dst + o, piece, plen);
        o += plen;
        i += adv;
    }
    while (o > 0 && dst[o - 1] == ' ') o--;
    dst[o] = '\0';
}

/* ---- history ---------------------------------------------------------- */

typedef struct pending_call {
    char *id;
    char *name;
    bool answered;
} pending_call;

struct aq_chat {
    size_t max_bytes;
    char *head;           /* {system},{goal}: always sent, never dropped */
    size_t head_len;
    sbuf hist;            /* ",{msg}" per message, oldest first */
    size_t *turns;        /* offset in hist where each kept turn starts */
    size_t nturns, turns_cap;
    size_t dropped;
    pending_call *calls;  /* the tool calls of the newest turn */
    size_t ncalls, nanswered;
    size_t last_len;      /* the newest message's length in hist, comma included */
};

aq_chat *aq_chat_new(const char *system_prompt, const char *goal, size_t max_bytes)
{
    if (!goal || max_bytes == 0) return NULL;
    aq_chat *c = aq_xcalloc(1, sizeof *c);
    c->max_bytes = max_bytes;
    sbuf h = {0};
    if (system_prompt && system_prompt[0]) {
        sb_puts(&h, "{\"role\":\"system\",\"content\":");
        put_jstrz(&h, system_prompt);
        sb_puts(&h, "},");
    }
    sb_puts(&h, "{\"role\":\"user\",\"content\":");
    put_jstrz(&h, goal);
    sb_putc(&h, '}');
    c->head = sb_take(&h, &c->head_len);
    /* The take left it NUL-terminated with slack; sessions are many. */
    c->head = aq_xrealloc(c->head, c->head_len + 1);
    return c;
}

static void clear_calls(aq_chat *c)
{
    for (size_t i = 0; i < c->ncalls; i++) {
        free(c->calls[i].id);
        free(c->calls[i].name);
    }
    free(c->calls);
    c->calls = NULL;
    c->ncalls = c->nanswered = 0;
}

void aq_chat_free(aq_chat *c)
{
    if (!c) return;
    clear_calls(c);
    free(c->head);
    free(c->hist.p);
    free(c->turns);
    free(c);
}

size_t aq_chat_bytes(const aq_chat *c)
{
    return c->head_len + c->hist.len + 2; /* the array's brackets */
}

size_t aq_chat_turns(const aq_chat *c) { return c->nturns; }
size_t aq_chat_dropped(const aq_chat *c) { return c->dropped; }
size_t aq_chat_pending(const aq_chat *c) { return c->ncalls - c->nanswered; }

static int check_answered(const aq_chat *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < c->ncalls; i++) {
        if (!c->calls[i].answered) {
            aq_seterr(err, errlen, "tool call %s (%s) of the last reply has no result yet",
                      c->calls[i].id, c->calls[i].name);
            return AQ_EINVAL;
        }
    }
    return AQ_OK;
}

static void start_turn(aq_chat *c)
{
    if (c->nturns == c->turns_cap) {
        c->turns_cap = c->turns_cap ? c->turns_cap * 2 : 8;
        c->turns = aq_xrealloc(c->turns, c->turns_cap * sizeof *c->turns);
    }
    c->turns[c->nturns++] = c->hist.len;
}

/* Drops the oldest whole turns until the cap holds, never the newest. The
 * first kept turn always starts at offset 0, so dropping k turns removes
 * exactly turns[k] bytes. */
static void enforce_cap(aq_chat *c)
{
    size_t total = aq_chat_bytes(c);
    if (total <= c->max_bytes || c->nturns <= 1) return;
    size_t over = total - c->max_bytes;
    size_t k = 1;
    while (k < c->nturns - 1 && c->turns[k] < over) k++;
    size_t cut = c->turns[k];
    memmove(c->hist.p, c->hist.p + cut, c->hist.len - cut);
    c->hist.len -= cut;
    for (size_t i = k; i < c->nturns; i++) c->turns[i - k] = c->turns[i] - cut;
    c->nturns -= k;
    c->dropped += k;
    /* Give back a burst's memory: a session may idle for minutes. */
    if (c->hist.cap > 4096 && c->hist.cap > 2 * c->hist.len) {
        c->hist.cap = c->hist.len + c->hist.len / 2 + 256;
        c->hist.p = aq_xrealloc(c->hist.p, c->hist.cap);
    }
}

int aq_chat_add_reply(aq_chat *c, const aq_chat_reply *r, char *err, size_t errlen)
{
    if (!r || !r->message_json) {
        aq_seterr(err, errlen, "no parsed reply to append");
        return AQ_EINVAL;
    }
    int rc = check_answered(c, err, errlen);
    if (rc) return rc;
    clear_calls(c);
    if (r->n_tool_calls) {
        c->calls = aq_xcalloc(r->n_tool_calls, sizeof *c->calls);
        for (size_t i = 0; i < r->n_tool_calls; i++) {
            c->calls[i].id = aq_xstrdup(r->tool_calls[i].id);
            c->calls[i].name = aq_xstrdup(r->tool_calls[i].name);
        }
        c->ncalls = r->n_tool_calls;
    }
    start_turn(c);
    size_t start = c->hist.len;
    sb_putc(&c->hist, ',');
    sb_put(&c->hist, r->message_json, r->message_len);
    c->last_len = c->hist.len - start;
    enforce_cap(c);
    return AQ_OK;
}

int aq_chat_add_tool_result(aq_chat *c, const char *tool_call_id, const char *name,
                            const char *content, size_t len, char *err, size_t errlen)
{
    if (!tool_call_id) {
        aq_seterr(err, errlen, "tool result without a tool_call_id");
        return AQ_EINVAL;
    }
    pending_call *pc = NULL;
    bool seen = false;
    for (size_t i = 0; i < c->ncalls && !pc; i++) {
        if (strcmp(c->calls[i].id, tool_call_id) != 0) continue;
        seen = true;
        if (!c->calls[i].answered) pc = &c->calls[i];
    }
    if (!pc) {
        aq_seterr(err, errlen, seen ? "tool call %s already has a result"
                                    : "no tool call %s in the last reply", tool_call_id);
        return AQ_EINVAL;
    }
    if (name && strcmp(name, pc->name) != 0) {
        aq_seterr(err, errlen, "tool call %s is for %s, not %s", tool_call_id, pc->name, name);
        return AQ_EINVAL;
    }
    /* The turn's results share a quarter of the cap, so the one turn that
     * is never dropped stays bounded however many calls it made; the floor
     * keeps each result readable. */
    size_t limit = c->max_bytes / 4 / c->ncalls;
    if (limit < AQ_CHAT_RESULT_MIN) limit = AQ_CHAT_RESULT_MIN;

    sbuf *h = &c->hist;
    size_t start = h->len;
    sb_puts(h, ",{\"role\":\"tool\",\"tool_call_id\":");
    put_jstrz(h, pc->id);
    sb_puts(h, ",\"name\":");
    put_jstrz(h, pc->name);
    sb_puts(h, ",\"content\":");
    put_jstr_cut(h, content ? content : "", content ? len : 0, limit);
    sb_putc(h, '}');
    c->last_len = h->len - start;
    pc->answered = true;
    c->nanswered++;
    enforce_cap(c);
    return AQ_OK;
}

int aq_chat_add_user(aq_chat *c, const char *text, size_t len, char *err, size_t errlen)
{
    int rc = check_answered(c, err, errlen);
    if (rc) return rc;
    clear_calls(c);
    start_turn(c);
    size_t start = c->hist.len;
    sb_puts(&c->hist, ",{\"role\":\"user\",\"content\":");
    put_jstr(&c->hist, text ? text : "", text ? len : 0);
    sb_putc(&c->hist, '}');
    c->last_len = c->hist.len - start;
    enforce_cap(c);
    return AQ_OK;
}

const char *aq_chat_last_message(const aq_chat *c, size_t *len)
{
    /* The newest turn is never dropped, so the newest message is still
     * the end of hist; its leading comma is not part of it. */
    if (!c->last_len || c->last_len > c->hist.len) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = c->last_len - 1;
    return c->hist.p + c->hist.len - c->last_len + 1;
}

int aq_chat_parse_message(const char *message, size_t len, aq_chat_reply *out, char *err, size_t errlen)
{
    /* The reply parser is the one judge of what an assistant message may
     * hold: wrap the message as the reply it came in. */
    static const char pre[] = "{\"choices\":[{\"index\":0,\"message\":", post[] = "}]}";
    size_t n = sizeof pre - 1 + len + sizeof post - 1;
    char *body = aq_xmalloc(n + 1);
    memcpy(body, pre, sizeof pre - 1);
    if (len) memcpy(body + sizeof pre - 1, message, len);
    memcpy(body + sizeof pre - 1 + len, post, sizeof post);
    int rc = aq_chat_parse_reply(body, n, out, err, errlen);
    free(body);
    return rc;
}

/* ---- request ---------------------------------------------------------- */

static bool tools_empty(const char *t)
{
    if (!t) return true;
    while (*t == ' ' || *t == '\t' || *t == '\n' || *t == '\r') t++;
    if (*t != '[') return *t == '\0';
    t++;
    while (*t == ' ' || *t == '\t' || *t == '\n' || *t == '\r') t++;
    return *t == ']';
}

int aq_chat_request(const aq_chat *c, const char *model, const char *tools_json,
                    const aq_chat_sampling *sampling, char **out, size_t *outlen)
{
    *out = NULL;
    if (outlen) *outlen = 0;
    if (!model || !model[0] || check_answered(c, NULL, 0) != AQ_OK) return AQ_EINVAL;
    bool tools = !tools_empty(tools_json);
    size_t tlen = tools ? strlen(tools_json) : 0;
    sbuf b = {0};
    sb_reserve(&b, aq_chat_bytes(c) + tlen + strlen(model) + 96);
    sb_puts(&b, "{\"model\":");
    put_jstrz(&b, model);
    sb_puts(&b, ",\"messages\":[");
    sb_put(&b, c->head, c->head_len);
    sb_put(&b, c->hist.p, c->hist.len);
    sb_putc(&b, ']');
    if (tools) {
        sb_puts(&b, ",\"tools\":");
        sb_put(&b, tools_json, tlen);
        sb_puts(&b, ",\"tool_choice\":\"auto\"");
    }
    if (sampling && sampling->temperature >= 0) {
        char num[48];
        /* %.17g round-trips, and a fixed text keeps the cache key stable */
        snprintf(num, sizeof num, ",\"temperature\":%.17g", sampling->temperature);
        sb_puts(&b, num);
    }
    if (sampling && sampling->max_tokens > 0) {
        char num[48];
        snprintf(num, sizeof num, ",\"max_tokens\":%d", sampling->max_tokens);
        sb_puts(&b, num);
    }
    sb_putc(&b, '}');
    *out = sb_take(&b, outlen);
    return AQ_OK;
}

/* ---- reply ------------------------------------------------------------ */

void aq_chat_reply_free(aq_chat_reply *r)
{
    if (!r) return;
    for (size_t i = 0; i < r->n_tool_calls; i++) {
        free(r->tool_calls[i].id);
        free(r->tool_calls[i].name);
        free(r->tool_calls[i].args);
        free(r->tool_calls[i].args_error);
    }
    free(r->tool_calls);
    free(r->content);
    free(r->finish_reason);
    free(r->model);
    free(r->message_json);
    memset(r, 0, sizeof *r);
}

static const char *type_name(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "a value";
}

/* A string field that is absent or null gives NULL in *out; anything but a
 * string, or a string with a NUL in it, is a protocol error naming `path`. */
static int opt_str(const json_t *obj, const char *key, const char *path, char **out,
                   char *err, size_t errlen)
{
    const json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v)) return AQ_OK;
    if (!json_is_string(v)) {
        aq_seterr(err, errlen, "%s is %s, not a string", path, type_name(v));
        return AQ_EPROTO;
    }
    size_t n = json_string_length(v);
    if (memchr(json_string_value(v), '\0', n)) {
        aq_seterr(err, errlen, "%s contains a NUL character", path);
        return AQ_EPROTO;
    }
    *out = aq_xstrndup(json_string_value(v), n);
    return AQ_OK;
}

static int opt_count(const json_t *usage, const char *key, int64_t *out, bool *have,
                     char *err, size_t errlen)
{
    const json_t *v = json_object_get(usage, key);
    *out = 0;
    *have = false;
    if (!v || json_is_null(v)) return AQ_OK;
    if (!json_is_integer(v) || json_integer_value(v) < 0) {
        aq_seterr(err, errlen, "usage.%s is not a non-negative integer", key);
        return AQ_EPROTO;
    }
    *out = json_integer_value(v);
    *have = true;
    return AQ_OK;
}

static bool only_space(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r') return false;
    return true;
}

/* Sets tc->args_error when tc->args is not a JSON object: the model gets
 * that back as its tool's error and can correct itself. */
static void check_args(aq_chat_tool_call *tc)
{
    json_error_t je;
    json_t *a = json_loadb(tc->args, tc->args_len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    char buf[256];
    if (!a) {
        char why[160];
        clean_text(why, sizeof why, je.text, strlen(je.text));
        snprintf(buf, sizeof buf, "arguments are not valid JSON: %s (at byte %d)", why,
                 je.position);
    } else if (!json_is_object(a)) {
        snprintf(buf, sizeof buf, "arguments are not a JSON object (got %s)", type_name(a));
    } else {
        json_decref(a);
        return;
    }
    json_decref(a);
    tc->args_error = aq_xstrdup(buf);
}

static int parse_tool_call(const json_t *t, size_t i, aq_chat_tool_call *tc,
                           char *err, size_t errlen)
{
    char path[96];
#define AT(field) (snprintf(path, sizeof path, "choices[0].message.tool_calls[%zu]%s", i, field), path)
    if (!json_is_object(t)) {
        aq_seterr(err, errlen, "%s is %s, not an object", AT(""), type_name(t));
        return AQ_EPROTO;
    }
    char *type = NULL;
    int rc = opt_str(t, "type", AT(".type"), &type, err, errlen);
    if (rc) return rc;
    if (type && strcmp(type, "function") != 0) {
        aq_seterr(err, errlen, "%s is \"%.40s\", not \"function\"", AT(".type"), type);
        free(type);
        return AQ_EPROTO;
    }
    free(type);
    rc = opt_str(t, "id", AT(".id"), &tc->id, err, errlen);
    if (rc) return rc;
    if (!tc->id || !tc->id[0]) {
        /* Some local servers send no ids; the tool messages need one. */
        free(tc->id);
        snprintf(path, sizeof path, "call_%zu", i);
        tc->id = aq_xstrdup(path);
    }
    const json_t *fn = json_object_get(t, "function");
    if (!json_is_object(fn)) {
        if (!fn) aq_seterr(err, errlen, "%s is missing", AT(".function"));
        else aq_seterr(err, errlen, "%s is %s, not an object", AT(".function"), type_name(fn));
        return AQ_EPROTO;
    }
    rc = opt_str(fn, "name", AT(".function.name"), &tc->name, err, errlen);
    if (rc) return rc;
    if (!tc->name || !tc->name[0]) {
        aq_seterr(err, errlen, "%s is %s", AT(".function.name"), tc->name ? "empty" : "missing");
        return AQ_EPROTO;
    }
    const json_t *args = json_object_get(fn, "arguments");
    if (json_is_string(args) && !only_space(json_string_value(args), json_string_length(args))) {
        tc->args_len = json_string_length(args);
        /* Every byte, a NUL included, so the history is exact. */
        tc->args = aq_xmalloc(tc->args_len + 1);
        memcpy(tc->args, json_string_value(args), tc->args_len);
        tc->args[tc->args_len] = '\0';
    } else if (json_is_object(args)) {
        tc->args = json_dumps(args, JSON_COMPACT);
        if (!tc->args) aq_oom("tool call arguments");
        tc->args_len = strlen(tc->args);
    } else if (!args || json_is_null(args) || json_is_string(args)) {
        tc->args = aq_xstrdup("{}");
        tc->args_len = 2;
    } else {
        aq_seterr(err, errlen, "%s is %s, not a string", AT(".function.arguments"),
                  type_name(args));
        return AQ_EPROTO;
    }
#undef AT
    check_args(tc);
    return AQ_OK;
}

static void build_message_json(aq_chat_reply *r)
{
    sbuf b = {0};
    sb_puts(&b, "{\"role\":\"assistant\",\"content\":");
    if (r->content) put_jstr(&b, r->content, r->content_len);
    /* An assistant message needs content or tool calls; "" stands in for a
     * null content (a refusal, a cut-off reply) so the next request is valid. */
    else sb_puts(&b, r->n_tool_calls ? "null" : "\"\"");
    if (r->n_tool_calls) {
        sb_puts(&b, ",\"tool_calls\":[");
        for (size_t i = 0; i < r->n_tool_calls; i++) {
            const aq_chat_tool_call *tc = &r->tool_calls[i];
            if (i) sb_putc(&b, ',');
            sb_puts(&b, "{\"id\":");
            put_jstrz(&b, tc->id);
            sb_puts(&b, ",\"type\":\"function\",\"function\":{\"name\":");
            put_jstrz(&b, tc->name);
            sb_puts(&b, ",\"arguments\":");
            put_jstr(&b, tc->args, tc->args_len);
            sb_puts(&b, "}}");
        }
        sb_putc(&b, ']');
    }
    sb_putc(&b, '}');
    r->message_json = sb_take(&b, &r->message_len);
}

static int error_message(const json_t *root, char *msg, size_t msglen);

static int parse_reply(const json_t *root, aq_chat_reply *out, char *err, size_t errlen)
{
    int rc;
    if (!json_is_object(root)) {
        aq_seterr(err, errlen, "reply is %s, not an object", type_name(root));
        return AQ_EPROTO;
    }
    const json_t *choices = json_object_get(root, "choices");
    if (!choices && json_object_get(root, "error")) {
        char m[256];
        if (error_message(root, m, sizeof m) == AQ_OK)
            aq_seterr(err, errlen, "reply is an error: %s", m);
        else
            aq_seterr(err, errlen, "reply is an error without a message");
        return AQ_EPROTO;
    }
    if (!json_is_array(choices)) {
        if (!choices) aq_seterr(err, errlen, "reply has no \"choices\"");
        else aq_seterr(err, errlen, "choices is %s, not an array", type_name(choices));
        return AQ_EPROTO;
    }
    if (json_array_size(choices) == 0) {
        aq_seterr(err, errlen, "choices is empty");
        return AQ_EPROTO;
    }
    const json_t *c0 = json_array_get(choices, 0);
    if (!json_is_object(c0)) {
        aq_seterr(err, errlen, "choices[0] is %s, not an object", type_name(c0));
        return AQ_EPROTO;
    }
    const json_t *msg = json_object_get(c0, "message");
    if (!json_is_object(msg)) {
        if (!msg) aq_seterr(err, errlen, "choices[0].message is missing");
        else aq_seterr(err, errlen, "choices[0].message is %s, not an object", type_name(msg));
        return AQ_EPROTO;
    }

    const json_t *content = json_object_get(msg, "content");
    if (json_is_string(content)) {
        out->content_len = json_string_length(content);
        out->content = aq_xmalloc(out->content_len + 1);
        memcpy(out->content, json_string_value(content), out->content_len);
        out->content[out->content_len] = '\0';
    } else if (content && !json_is_null(content)) {
        aq_seterr(err, errlen, "choices[0].message.content is %s, not a string",
                  type_name(content));
        return AQ_EPROTO;
    }

    const json_t *calls = json_object_get(msg, "tool_calls");
    if (calls && !json_is_null(calls)) {
        if (!json_is_array(calls)) {
            aq_seterr(err, errlen, "choices[0].message.tool_calls is %s, not an array",
                      type_name(calls));
            return AQ_EPROTO;
        }
        size_t n = json_array_size(calls);
        if (n > AQ_CHAT_MAX_TOOL_CALLS) {
            aq_seterr(err, errlen, "choices[0].message.tool_calls has %zu entries (limit %d)",
                      n, AQ_CHAT_MAX_TOOL_CALLS);
            return AQ_EPROTO;
        }
        if (n) out->tool_calls = aq_xcalloc(n, sizeof *out->tool_calls);
        for (size_t i = 0; i < n; i++) {
            /* Count it first so aq_chat_reply_free sees a half-filled one. */
            out->n_tool_calls = i + 1;
            rc = parse_tool_call(json_array_get(calls, i), i, &out->tool_calls[i], err, errlen);
            if (rc) return rc;
        }
    }

    rc = opt_str(c0, "finish_reason", "choices[0].finish_reason", &out->finish_reason, err, errlen);
    if (rc) return rc;
    rc = opt_str(root, "model", "model", &out->model, err, errlen);
    if (rc) return rc;

    const json_t *usage = json_object_get(root, "usage");
    if (usage && !json_is_null(usage)) {
        if (!json_is_object(usage)) {
            aq_seterr(err, errlen, "usage is %s, not an object", type_name(usage));
            return AQ_EPROTO;
        }
        bool hp, hc;
        rc = opt_count(usage, "prompt_tokens", &out->prompt_tokens, &hp, err, errlen);
        if (rc) return rc;
        rc = opt_count(usage, "completion_tokens", &out->completion_tokens, &hc, err, errlen);
        if (rc) return rc;
        out->has_usage = hp && hc;
    }

    build_message_json(out);
    return AQ_OK;
}

int aq_chat_parse_reply(const char *body, size_t len, aq_chat_reply *out, char *err,
                        size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!body) {
        aq_seterr(err, errlen, "reply is empty");
        return AQ_EPROTO;
    }
    json_error_t je;
    /* NUL is allowed inside strings: a model may emit "\u0000" in its text
     * and that should not lose the whole step. Fields that must be C
     * strings are checked one by one. */
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &je);
    if (!root) {
        char why[160];
        clean_text(why, sizeof why, je.text, strlen(je.text));
        aq_seterr(err, errlen, "reply is not valid JSON: %s (at byte %d)", why, je.position);
        return AQ_EPROTO;
    }
    int rc = parse_reply(root, out, err, errlen);
    json_decref(root);
    if (rc) {
        aq_chat_reply_free(out);
        /* Messages quote the peer's strings, cut by byte count: keep them
         * valid UTF-8 for the logs and the error column. */
        if (err && errlen) {
            char *raw = aq_xstrdup(err);
            clean_text(err, errlen, raw, strlen(raw));
            free(raw);
        }
    }
    return rc;
}

/* ---- provider errors -------------------------------------------------- */

/* Finds the message of an error body already parsed; AQ_ENOTFOUND if none. */
static int error_message(const json_t *root, char *msg, size_t msglen)
{
    /* Gemini's OpenAI endpoint wraps the error object in an array. */
    if (json_is_array(root)) root = json_array_get(root, 0);
    if (!json_is_object(root)) return AQ_ENOTFOUND;
    const json_t *e = json_object_get(root, "error");
    const json_t *m = NULL;
    if (json_is_object(e)) m = json_object_get(e, "message");
    else if (json_is_string(e)) m = e;
    if (!json_is_string(m)) m = json_object_get(root, "message");
    if (!json_is_string(m) || json_string_length(m) == 0) return AQ_ENOTFOUND;
    clean_text(msg, msglen, json_string_value(m), json_string_length(m));
    /* A message of nothing but blanks and control bytes says nothing: the
     * caller then shows the body instead. */
    if (msg && msglen && msg[0] == '\0') return AQ_ENOTFOUND;
    return AQ_OK;
}

int aq_chat_parse_error(const char *body, size_t len, char *msg, size_t msglen)
{
    if (msg && msglen) msg[0] = '\0';
    if (!body || len == 0) return AQ_ENOTFOUND;
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, NULL);
    int rc = root ? error_message(root, msg, msglen) : AQ_ENOTFOUND;
    json_decref(root);
    if (rc != AQ_OK) {
        /* Skip leading whitespace so a snippet of a page starts with text. */
        size_t i = 0;
        while (i < len && (body[i] == ' ' || body[i] == '\t' || body[i] == '\n' || body[i] == '\r'))
            i++;
        clean_text(msg, msglen, body + i, len - i);
    }
    return rc;
}

/* ---- tools ------------------------------------------------------------ */

static bool valid_tool_name(const char *s)
{
    size_t n = 0;
    for (; s[n]; n++) {
        char ch = s[n];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '_' || ch == '-';
        if (!ok || n >= 64) return false;
    }
    return n > 0;
}

int aq_chat_tools_json(const aq_chat_tool_def *defs, size_t n, char **out, char *err,
                       size_t errlen)
{
    *out = NULL;
    json_t *arr = json_array();
    if (!arr) aq_oom("a tools array");
    int rc = AQ_OK;
    for (size_t i = 0; i < n && rc == AQ_OK; i++) {
        const aq_chat_tool_def *d = &defs[i];
        const char *name = d->name ? d->name : "";
        if (!valid_tool_name(name)) {
            aq_seterr(err, errlen, "tool %zu: name \"%.80s\" is not 1-64 of [A-Za-z0-9_-]", i,
                      name);
            rc = AQ_EINVAL;
            break;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(defs[j].name, name) == 0) {
                aq_seterr(err, errlen, "tool %s is defined twice", name);
                rc = AQ_EINVAL;
            }
        }
        if (rc) break;

        json_t *params;
        if (d->parameters_json) {
            json_error_t je;
            params = json_loads(d->parameters_json, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
            if (!params || !json_is_object(params)) {
                if (params) aq_seterr(err, errlen, "tool %s: parameters are %s, not a JSON object",
                                      name, type_name(params));
                else aq_seterr(err, errlen, "tool %s: parameters are not valid JSON: %s (at byte %d)",
                               name, je.text, je.position);
                json_decref(params);
                rc = AQ_EINVAL;
                break;
            }
        } else {
            params = json_pack("{s:s, s:{}}", "type", "object", "properties");
        }
        json_t *fn = json_pack("{s:s}", "name", name);
        if (!fn || !params) aq_oom("a tool definition");
        if (d->description) {
            json_t *desc = json_string(d->description);
            if (!desc) {
                aq_seterr(err, errlen, "tool %s: description is not valid UTF-8", name);
                json_decref(fn);
                json_decref(params);
                rc = AQ_EINVAL;
                break;
            }
            json_object_set_new(fn, "description", desc);
        }
        json_object_set_new(fn, "parameters", params);
        json_t *tool = json_pack("{s:s, s:o}", "type", "function", "function", fn);
        if (!tool || json_array_append_new(arr, tool) != 0) aq_oom("a tool definition");
    }
    if (rc == AQ_OK) {
        *out = json_dumps(arr, JSON_COMPACT);
        if (!*out) aq_oom("the tools array");
    }
    json_decref(arr);
    return rc;
}
