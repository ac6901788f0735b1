/* fuzz_chat.c — libFuzzer harness for the chat module's readers of provider
 * output (aq_chat_parse_reply, aq_chat_parse_error) and for what the agent
 * does next with a reply: append it, answer its calls with arbitrary bytes,
 * build the request. Beyond "no crash, no sanitizer report" it checks the
 * contract the agent relies on: an accepted reply yields a history entry and
 * a request body that are valid JSON with every tool call answered and no
 * orphan tool message, the cap rule holds, a refusal always names the
 * problem and leaves the reply empty, and the error text is clean UTF-8. */
#include "agentq/chat.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CAP 2048

static json_t *load_strict(const char *s, size_t n)
{
    return json_loadb(s, n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
}

/* Valid UTF-8 (jansson agrees) with no control characters. */
static void check_clean(const char *s)
{
    json_t *j = json_string(s);
    if (!j) abort();
    json_decref(j);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p < 0x20 || *p == 0x7f) abort();
}

/* The messages of a request: every tool message answers a call of the
 * assistant message before it, and every such call is answered. */
static void check_request(const aq_chat *c, const char *model)
{
    char *body = NULL;
    size_t len = 0;
    if (aq_chat_request(c, model, "[]", NULL, &body, &len) != AQ_OK) abort();
    json_t *root = load_strict(body, len);
    if (!root) abort();
    json_t *msgs = json_object_get(root, "messages");
    if (!json_is_array(msgs) || json_array_size(msgs) < 1) abort();
    json_t *calls = NULL;
    size_t answered = 0;
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        const char *role = json_string_value(json_object_get(m, "role"));
        if (!role) abort();
        if (strcmp(role, "tool") == 0) {
            if (!calls || answered >= json_array_size(calls)) abort();
            answered++;
            continue;
        }
        if (calls && answered != json_array_size(calls)) abort();
        calls = strcmp(role, "assistant") == 0 ? json_object_get(m, "tool_calls") : NULL;
        answered = 0;
    }
    if (calls && answered != json_array_size(calls)) abort();
    free(body);
    json_decref(root);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size heap copy, so ASan catches any read past `size`. */
    char *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);

    aq_chat_reply r;
    char err[160];
    err[0] = '\0';
    int rc = aq_chat_parse_reply(buf, size, &r, err, sizeof err);
    if (rc != AQ_OK) {
        if (rc != AQ_EPROTO || err[0] == '\0') abort();
        check_clean(err);
        if (r.message_json || r.tool_calls || r.content || r.n_tool_calls) abort();
    } else {
        if (r.n_tool_calls > AQ_CHAT_MAX_TOOL_CALLS || !r.message_json) abort();
        if (strlen(r.message_json) != r.message_len) abort();
        json_t *m = load_strict(r.message_json, r.message_len);
        if (!json_is_object(m)) abort();
        json_decref(m);
        for (size_t i = 0; i < r.n_tool_calls; i++) {
            const aq_chat_tool_call *tc = &r.tool_calls[i];
            if (!tc->id[0] || !tc->name[0] || !tc->args) abort();
            json_t *a = json_loadb(tc->args, tc->args_len, JSON_REJECT_DUPLICATES, NULL);
            if ((tc->args_error == NULL) != json_is_object(a)) abort();
            json_decref(a);
        }

        /* What the agent does with it: two rounds of reply + results, with
         * the input itself as result text and as a user message. */
        aq_chat *c = aq_chat_new("sys", "goal", CAP);
        for (int round = 0; round < 2; round++) {
            if (aq_chat_add_reply(c, &r, err, sizeof err) != AQ_OK) abort();
            for (size_t i = 0; i < r.n_tool_calls; i++) {
                int trc = aq_chat_add_tool_result(c, r.tool_calls[i].id, NULL, buf, size, err,
                                                  sizeof err);
                /* Only a repeated id may be refused: its first call took it. */
                if (trc != AQ_OK) {
                    bool dup = false;
                    for (size_t j = 0; j < i; j++)
                        if (strcmp(r.tool_calls[j].id, r.tool_calls[i].id) == 0) dup = true;
                    if (!dup) abort();
                }
            }
            if (aq_chat_pending(c) == 0) check_request(c, "m");
            if (aq_chat_bytes(c) > CAP && aq_chat_turns(c) != 1) abort();
        }
        if (aq_chat_pending(c) == 0) {
            if (aq_chat_add_user(c, buf, size, err, sizeof err) != AQ_OK) abort();
            check_request(c, "m");
        }
        aq_chat_free(c);
    }
    aq_chat_reply_free(&r);

    char msg[200];
    rc = aq_chat_parse_error(buf, size, msg, sizeof msg);
    if (rc != AQ_OK && rc != AQ_ENOTFOUND) abort();
    if (rc == AQ_OK && msg[0] == '\0') abort();
    check_clean(msg);

    free(buf);
    return 0;
}
