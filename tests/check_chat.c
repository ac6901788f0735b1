/* check_chat.c — the chat module: the request bodies a provider gets (valid
 * JSON, messages in order, its own tool_call ids back), the history cap
 * (oldest whole turns go first, never an orphan tool message, the size
 * rule), tool result truncation, and what parsing a reply or an error body
 * yields for good, odd and malformed input. */
#include "agentq/chat.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SYS "You are a careful agent."
#define GOAL "What is 6*7?"

/* A reply with n tool calls, ids "<prefix>_<i>", calculator with {"expr":"i"}. */
static char *reply_with_calls(const char *prefix, int n)
{
    char *b = malloc(512 + (size_t)n * 200);
    ck_assert_ptr_nonnull(b);
    int o = sprintf(b, "{\"model\":\"m\",\"choices\":[{\"index\":0,\"message\":{\"role\":"
                       "\"assistant\",\"content\":null,\"tool_calls\":[");
    for (int i = 0; i < n; i++)
        o += sprintf(b + o, "%s{\"id\":\"%s_%d\",\"type\":\"function\",\"function\":"
                            "{\"name\":\"calculator\",\"arguments\":\"{\\\"expr\\\":\\\"%d\\\"}\"}}",
                     i ? "," : "", prefix, i, i);
    sprintf(b + o, "]},\"finish_reason\":\"tool_calls\"}],"
                   "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5}}");
    return b;
}

static void parse_ok(const char *body, aq_chat_reply *r)
{
    char err[256] = "";
    int rc = aq_chat_parse_reply(body, strlen(body), r, err, sizeof err);
    ck_assert_msg(rc == AQ_OK, "parse failed: %s", err);
}

/* Adds to c a reply with n tool calls (ids "<prefix>_<i>"), parsed into
 * *r for the test to read; the caller frees *r (the chat keeps copies). */
static void add_calls(aq_chat *c, const char *prefix, int n, aq_chat_reply *r)
{
    char *body = reply_with_calls(prefix, n);
    parse_ok(body, r);
    char err[128] = "";
    ck_assert_msg(aq_chat_add_reply(c, r, err, sizeof err) == AQ_OK, "add_reply: %s", err);
    free(body);
}

/* Parses the request body and returns its "messages" (caller decrefs root). */
static json_t *request_json(const aq_chat *c, const char *tools, json_t **messages)
{
    char *body = NULL;
    size_t len = 0;
    ck_assert_int_eq(aq_chat_request(c, "gpt-test", tools, NULL, &body, &len), AQ_OK);
    ck_assert_uint_eq(len, strlen(body));
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    ck_assert_msg(root != NULL, "request is not JSON: %s: %s", je.text, body);
    *messages = json_object_get(root, "messages");
    ck_assert(json_is_array(*messages));
    free(body);
    return root;
}

static const char *str_at(json_t *msgs, size_t i, const char *key)
{
    json_t *v = json_object_get(json_array_get(msgs, i), key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* Adds a one-call turn with id "t<k>" and a result of `n` bytes. */
static void add_turn(aq_chat *c, int k, size_t n)
{
    char prefix[16];
    snprintf(prefix, sizeof prefix, "t%d", k);
    aq_chat_reply r;
    add_calls(c, prefix, 1, &r);
    char err[128] = "";
    char id[24];
    snprintf(id, sizeof id, "t%d_0", k);
    char *content = malloc(n + 1);
    memset(content, 'a' + k % 26, n);
    ck_assert_int_eq(aq_chat_add_tool_result(c, id, "calculator", content, n, err, sizeof err),
                     AQ_OK);
    free(content);
    aq_chat_reply_free(&r);
}

/* Checks every tool message follows an assistant message that made its call,
 * and every call has its result. Returns the number of assistant messages. */
static size_t check_pairing(json_t *msgs)
{
    size_t assistants = 0;
    json_t *open_calls = NULL;
    size_t answered = 0;
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        const char *role = str_at(msgs, i, "role");
        ck_assert_ptr_nonnull(role);
        if (strcmp(role, "tool") == 0) {
            ck_assert_msg(open_calls != NULL, "orphan tool message at %zu", i);
            const char *id = str_at(msgs, i, "tool_call_id");
            bool found = false;
            for (size_t j = 0; j < json_array_size(open_calls); j++) {
                json_t *tc = json_array_get(open_calls, j);
                if (strcmp(json_string_value(json_object_get(tc, "id")), id) == 0) found = true;
            }
            ck_assert_msg(found, "tool message %s answers no call", id);
            answered++;
            continue;
        }
        if (open_calls) ck_assert_uint_eq(answered, json_array_size(open_calls));
        open_calls = NULL;
        answered = 0;
        if (strcmp(role, "assistant") == 0) {
            assistants++;
            open_calls = json_object_get(json_array_get(msgs, i), "tool_calls");
        }
    }
    if (open_calls) ck_assert_uint_eq(answered, json_array_size(open_calls));
    return assistants;
}

/* ---- core --------------------------------------------------------------- */

START_TEST(test_request_order_and_tools)
{
    aq_chat *c = aq_chat_new(SYS, GOAL, 65536);
    ck_assert_ptr_nonnull(c);
    aq_chat_reply r;
    add_calls(c, "call", 2, &r);
    char err[128] = "";
    ck_assert_uint_eq(aq_chat_pending(c), 2);
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_1", NULL, "1", 1, err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_0", "calculator", "0", 1, err, sizeof err),
                     AQ_OK);
    ck_assert_uint_eq(aq_chat_pending(c), 0);

    aq_chat_tool_def defs[] = {{"calculator", "Evaluates arithmetic.",
                                "{\"type\":\"object\",\"properties\":{\"expr\":{\"type\":\"string\"}},"
                                "\"required\":[\"expr\"]}"},
                               {"current_time", NULL, NULL}};
    char *tools = NULL;
    ck_assert_int_eq(aq_chat_tools_json(defs, 2, &tools, err, sizeof err), AQ_OK);

    json_t *msgs;
    json_t *root = request_json(c, tools, &msgs);
    ck_assert_str_eq(json_string_value(json_object_get(root, "model")), "gpt-test");
    ck_assert_str_eq(json_string_value(json_object_get(root, "tool_choice")), "auto");
    json_t *t = json_object_get(root, "tools");
    ck_assert_uint_eq(json_array_size(t), 2);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(t, 0), "type")), "function");
    json_t *fn1 = json_object_get(json_array_get(t, 1), "function");
    ck_assert_str_eq(json_string_value(json_object_get(fn1, "name")), "current_time");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(fn1, "parameters"),
                                                       "type")), "object");

    ck_assert_uint_eq(json_array_size(msgs), 5);
    ck_assert_str_eq(str_at(msgs, 0, "role"), "system");
    ck_assert_str_eq(str_at(msgs, 0, "content"), SYS);
    ck_assert_str_eq(str_at(msgs, 1, "role"), "user");
    ck_assert_str_eq(str_at(msgs, 1, "content"), GOAL);
    ck_assert_str_eq(str_at(msgs, 2, "role"), "assistant");
    ck_assert(json_is_null(json_object_get(json_array_get(msgs, 2), "content")));
    ck_assert_str_eq(str_at(msgs, 3, "role"), "tool");
    ck_assert_str_eq(str_at(msgs, 3, "tool_call_id"), "call_1");
    ck_assert_str_eq(str_at(msgs, 3, "name"), "calculator");
    ck_assert_str_eq(str_at(msgs, 3, "content"), "1");
    ck_assert_str_eq(str_at(msgs, 4, "tool_call_id"), "call_0");
    ck_assert_uint_eq(check_pairing(msgs), 1);
    json_decref(root);

    /* aq_chat_bytes is exactly the messages array of the body. */
    char *req = NULL;
    ck_assert_int_eq(aq_chat_request(c, "gpt-test", tools, NULL, &req, NULL), AQ_OK);
    const char *m = strstr(req, "\"messages\":") + strlen("\"messages\":");
    const char *end = strstr(req, ",\"tools\":");
    ck_assert_uint_eq((size_t)(end - m), aq_chat_bytes(c));
    free(req);

    /* Without tools there is no "tools" nor "tool_choice". */
    root = request_json(c, NULL, &msgs);
    ck_assert_ptr_null(json_object_get(root, "tools"));
    ck_assert_ptr_null(json_object_get(root, "tool_choice"));
    json_decref(root);
    root = request_json(c, " [ ] ", &msgs);
    ck_assert_ptr_null(json_object_get(root, "tools"));
    json_decref(root);

    free(tools);
    aq_chat_reply_free(&r);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_round_trip_ids)
{
    /* Odd but legal ids and argument text come back byte for byte. */
    const char *body =
        "{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":\"Let me \\\"check\\\".\","
        "\"tool_calls\":[{\"id\":\"call_\\u00e9/\\\\x\",\"type\":\"function\",\"function\":"
        "{\"name\":\"http_get\",\"arguments\":\"{ \\\"url\\\" : \\\"http://a/\\\\u00e9\\\" }\"}},"
        "{\"id\":\"call_B\",\"type\":\"function\",\"function\":{\"name\":\"current_time\","
        "\"arguments\":\"{}\"}}]},\"finish_reason\":\"tool_calls\"}]}";
    aq_chat_reply r;
    parse_ok(body, &r);
    aq_chat *c = aq_chat_new(NULL, GOAL, 65536);
    char err[128] = "";
    ck_assert_int_eq(aq_chat_add_reply(c, &r, err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_B", NULL, "12:00", 5, err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_chat_add_tool_result(c, r.tool_calls[0].id, NULL, "ok", 2, err, sizeof err),
                     AQ_OK);

    json_t *msgs;
    json_t *root = request_json(c, NULL, &msgs);
    ck_assert_uint_eq(json_array_size(msgs), 4); /* no system prompt */
    ck_assert_str_eq(str_at(msgs, 0, "role"), "user");
    json_t *a = json_array_get(msgs, 1);
    ck_assert_str_eq(json_string_value(json_object_get(a, "content")), "Let me \"check\".");
    json_t *calls = json_object_get(a, "tool_calls");
    ck_assert_uint_eq(json_array_size(calls), 2);
    for (size_t i = 0; i < 2; i++) {
        json_t *tc = json_array_get(calls, i);
        ck_assert_str_eq(json_string_value(json_object_get(tc, "id")), r.tool_calls[i].id);
        json_t *fn = json_object_get(tc, "function");
        ck_assert_str_eq(json_string_value(json_object_get(fn, "name")), r.tool_calls[i].name);
        ck_assert_str_eq(json_string_value(json_object_get(fn, "arguments")), r.tool_calls[i].args);
    }
    ck_assert_str_eq(r.tool_calls[0].id, "call_\xc3\xa9/\\x");
    ck_assert_str_eq(r.tool_calls[0].args, "{ \"url\" : \"http://a/\\u00e9\" }");
    ck_assert_str_eq(str_at(msgs, 2, "tool_call_id"), "call_B");
    ck_assert_str_eq(str_at(msgs, 3, "tool_call_id"), "call_\xc3\xa9/\\x");
    ck_assert_uint_eq(check_pairing(msgs), 1);
    json_decref(root);

    /* A final answer after that is the next turn. */
    aq_chat_reply fin;
    parse_ok("{\"choices\":[{\"message\":{\"content\":\"42\"},\"finish_reason\":\"stop\"}]}", &fin);
    ck_assert_int_eq(aq_chat_add_reply(c, &fin, err, sizeof err), AQ_OK);
    ck_assert_uint_eq(aq_chat_turns(c), 2);
    root = request_json(c, NULL, &msgs);
    ck_assert_str_eq(str_at(msgs, 4, "content"), "42");
    ck_assert_ptr_null(json_object_get(json_array_get(msgs, 4), "tool_calls"));
    json_decref(root);

    aq_chat_reply_free(&fin);
    aq_chat_reply_free(&r);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_user_turn_and_escaping)
{
    /* Control characters, quotes and invalid UTF-8 in any text still make a
     * valid body; invalid bytes become U+FFFD. */
    aq_chat *c = aq_chat_new("sys \"q\"\n", "goal\t\x01", 4096);
    char err[128] = "";
    const char *bad = "bad \xff\xc3(\xed\xa0\x80 end";
    ck_assert_int_eq(aq_chat_add_user(c, bad, strlen(bad), err, sizeof err), AQ_OK);
    json_t *msgs;
    json_t *root = request_json(c, NULL, &msgs);
    ck_assert_str_eq(str_at(msgs, 0, "content"), "sys \"q\"\n");
    ck_assert_str_eq(str_at(msgs, 1, "content"), "goal\t\x01");
    ck_assert_str_eq(str_at(msgs, 2, "role"), "user");
    ck_assert_str_eq(str_at(msgs, 2, "content"),
                     "bad \xef\xbf\xbd\xef\xbf\xbd(\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd end");
    json_decref(root);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_parse_content_reply)
{
    const char *body =
        "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"gpt-4o-mini-2024\","
        "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"The answer is 42.\","
        "\"refusal\":null},\"logprobs\":null,\"finish_reason\":\"stop\"}],"
        "\"usage\":{\"prompt_tokens\":57,\"completion_tokens\":7,\"total_tokens\":64}}";
    aq_chat_reply r;
    parse_ok(body, &r);
    ck_assert_str_eq(r.content, "The answer is 42.");
    ck_assert_uint_eq(r.content_len, 17);
    ck_assert_uint_eq(r.n_tool_calls, 0);
    ck_assert_str_eq(r.finish_reason, "stop");
    ck_assert_str_eq(r.model, "gpt-4o-mini-2024");
    ck_assert(r.has_usage);
    ck_assert_int_eq(r.prompt_tokens, 57);
    ck_assert_int_eq(r.completion_tokens, 7);
    ck_assert_str_eq(r.message_json, "{\"role\":\"assistant\",\"content\":\"The answer is 42.\"}");
    aq_chat_reply_free(&r);
    ck_assert_ptr_null(r.content);
    aq_chat_reply_free(&r); /* twice is harmless */
}
END_TEST

START_TEST(test_parse_two_tool_calls)
{
    char *body = reply_with_calls("call", 2);
    aq_chat_reply r;
    parse_ok(body, &r);
    ck_assert_ptr_null(r.content);
    ck_assert_uint_eq(r.n_tool_calls, 2);
    ck_assert_str_eq(r.tool_calls[0].id, "call_0");
    ck_assert_str_eq(r.tool_calls[1].id, "call_1");
    ck_assert_str_eq(r.tool_calls[1].name, "calculator");
    ck_assert_str_eq(r.tool_calls[1].args, "{\"expr\":\"1\"}");
    ck_assert_uint_eq(r.tool_calls[1].args_len, 12);
    ck_assert_ptr_null(r.tool_calls[0].args_error);
    ck_assert_ptr_null(r.tool_calls[1].args_error);
    ck_assert_str_eq(r.finish_reason, "tool_calls");
    ck_assert_str_eq(r.model, "m");
    aq_chat_reply_free(&r);
    free(body);
}
END_TEST

START_TEST(test_parse_missing_usage)
{
    aq_chat_reply r;
    parse_ok("{\"choices\":[{\"message\":{\"content\":\"hi\"}}]}", &r);
    ck_assert(!r.has_usage);
    ck_assert_int_eq(r.prompt_tokens, 0);
    ck_assert_int_eq(r.completion_tokens, 0);
    ck_assert_ptr_null(r.finish_reason);
    ck_assert_ptr_null(r.model);
    aq_chat_reply_free(&r);

    parse_ok("{\"choices\":[{\"message\":{\"content\":\"hi\"}}],\"usage\":null}", &r);
    ck_assert(!r.has_usage);
    aq_chat_reply_free(&r);

    /* Half a usage is not usage, but the count that is there is kept. */
    parse_ok("{\"choices\":[{\"message\":{\"content\":\"hi\"}}],\"usage\":{\"prompt_tokens\":3}}", &r);
    ck_assert(!r.has_usage);
    ck_assert_int_eq(r.prompt_tokens, 3);
    aq_chat_reply_free(&r);
}
END_TEST

START_TEST(test_parse_bad_arguments)
{
    /* Arguments that are not an object are the model's mistake: the reply
     * parses, the call carries an error the model will see. */
    const char *body =
        "{\"choices\":[{\"message\":{\"content\":null,\"tool_calls\":["
        "{\"id\":\"a\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"x\\\":\"}},"
        "{\"id\":\"b\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"[1,2]\"}},"
        "{\"id\":\"c\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"x\\\":1,\\\"x\\\":2}\"}},"
        "{\"id\":\"d\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"  \"}},"
        "{\"id\":\"e\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":{\"y\":[true]}}},"
        "{\"id\":\"f\",\"function\":{\"name\":\"f\"}},"
        "{\"id\":\"g\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"7\"}}"
        "]}}]}";
    aq_chat_reply r;
    parse_ok(body, &r);
    ck_assert_uint_eq(r.n_tool_calls, 7);
    ck_assert_str_eq(r.tool_calls[0].args, "{\"x\":");
    ck_assert_ptr_nonnull(r.tool_calls[0].args_error);
    ck_assert_msg(strncmp(r.tool_calls[0].args_error, "arguments are not valid JSON: ", 30) == 0,
                  "%s", r.tool_calls[0].args_error);
    ck_assert_str_eq(r.tool_calls[1].args_error, "arguments are not a JSON object (got an array)");
    ck_assert_ptr_nonnull(r.tool_calls[2].args_error);
    ck_assert_msg(strstr(r.tool_calls[2].args_error, "duplicate") != NULL, "%s",
                  r.tool_calls[2].args_error);
    ck_assert_str_eq(r.tool_calls[3].args, "{}");
    ck_assert_ptr_null(r.tool_calls[3].args_error);
    ck_assert_str_eq(r.tool_calls[4].args, "{\"y\":[true]}");
    ck_assert_ptr_null(r.tool_calls[4].args_error);
    ck_assert_str_eq(r.tool_calls[5].args, "{}");
    ck_assert_ptr_null(r.tool_calls[5].args_error);
    ck_assert_str_eq(r.tool_calls[6].args_error, "arguments are not a JSON object (got an integer)");

    /* The history carries the bad text as it was, still valid JSON. */
    json_error_t je;
    json_t *m = json_loadb(r.message_json, r.message_len, JSON_REJECT_DUPLICATES, &je);
    ck_assert_msg(m != NULL, "%s", je.text);
    json_t *fn = json_object_get(json_array_get(json_object_get(m, "tool_calls"), 0), "function");
    ck_assert_str_eq(json_string_value(json_object_get(fn, "arguments")), "{\"x\":");
    json_decref(m);
    aq_chat_reply_free(&r);
}
END_TEST

START_TEST(test_parse_lenient_servers)
{
    /* A server that sends no tool call ids gets call_<index>, and the tool
     * results can answer them. */
    const char *body = "{\"choices\":[{\"message\":{\"tool_calls\":["
                       "{\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}},"
                       "{\"id\":\"\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}]}}]}";
    aq_chat_reply r;
    parse_ok(body, &r);
    ck_assert_str_eq(r.tool_calls[0].id, "call_0");
    ck_assert_str_eq(r.tool_calls[1].id, "call_1");
    aq_chat *c = aq_chat_new(NULL, GOAL, 65536);
    char err[128];
    ck_assert_int_eq(aq_chat_add_reply(c, &r, err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_0", "f", "x", 1, err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_1", "g", "y", 1, err, sizeof err), AQ_OK);
    aq_chat_free(c);
    aq_chat_reply_free(&r);

    /* "\u0000" in content is kept, with its length. */
    const char *nul = "{\"choices\":[{\"message\":{\"content\":\"a\\u0000b\"}}]}";
    parse_ok(nul, &r);
    ck_assert_uint_eq(r.content_len, 3);
    ck_assert(memcmp(r.content, "a\0b", 3) == 0);
    ck_assert_str_eq(r.message_json, "{\"role\":\"assistant\",\"content\":\"a\\u0000b\"}");
    aq_chat_reply_free(&r);

    /* A null content without tool calls still makes a valid history entry. */
    parse_ok("{\"choices\":[{\"message\":{\"content\":null},\"finish_reason\":\"length\"}]}", &r);
    ck_assert_str_eq(r.message_json, "{\"role\":\"assistant\",\"content\":\"\"}");
    aq_chat_reply_free(&r);
}
END_TEST

START_TEST(test_tools_json)
{
    aq_chat_tool_def defs[] = {{"calc-1_x", "d\xc3\xa9",
                                "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"number\"}}}"}};
    char *out = NULL;
    char err[128] = "";
    ck_assert_int_eq(aq_chat_tools_json(defs, 1, &out, err, sizeof err), AQ_OK);
    ck_assert_str_eq(out, "[{\"type\":\"function\",\"function\":{\"name\":\"calc-1_x\","
                          "\"description\":\"d\xc3\xa9\",\"parameters\":{\"type\":\"object\","
                          "\"properties\":{\"a\":{\"type\":\"number\"}}}}}]");
    free(out);
    ck_assert_int_eq(aq_chat_tools_json(NULL, 0, &out, err, sizeof err), AQ_OK);
    ck_assert_str_eq(out, "[]");
    free(out);
}
END_TEST

/* ---- limits ------------------------------------------------------------- */

START_TEST(test_cap_drops_oldest_turns)
{
    const size_t cap = 4096;
    aq_chat *c = aq_chat_new(SYS, GOAL, cap);
    for (int k = 0; k < 40; k++) {
        add_turn(c, k, 300);
        ck_assert_msg(aq_chat_bytes(c) <= cap, "turn %d: %zu bytes > cap", k, aq_chat_bytes(c));
    }
    ck_assert_uint_gt(aq_chat_dropped(c), 0);
    ck_assert_uint_eq(aq_chat_dropped(c) + aq_chat_turns(c), 40);

    json_t *msgs;
    json_t *root = request_json(c, NULL, &msgs);
    ck_assert_str_eq(str_at(msgs, 0, "content"), SYS);
    ck_assert_str_eq(str_at(msgs, 1, "content"), GOAL);
    /* What is left is the newest turns, consecutive, in order. */
    size_t kept = aq_chat_turns(c);
    ck_assert_uint_eq(json_array_size(msgs), 2 + 2 * kept);
    for (size_t i = 0; i < kept; i++) {
        char want[24];
        snprintf(want, sizeof want, "t%zu_0", 40 - kept + i);
        ck_assert_str_eq(str_at(msgs, 2 + 2 * i + 1, "tool_call_id"), want);
    }
    ck_assert_uint_eq(check_pairing(msgs), kept);
    /* And it drops no more than it must: one more turn would not fit. */
    ck_assert_uint_gt(aq_chat_bytes(c) + 300 + 200, cap);
    json_decref(root);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_cap_keeps_multi_call_turn_whole)
{
    /* A turn of 3 calls is dropped with all 3 results, never split. */
    aq_chat *c = aq_chat_new(SYS, GOAL, 2048);
    char err[128];
    for (int k = 0; k < 6; k++) {
        char prefix[16];
        snprintf(prefix, sizeof prefix, "m%d", k);
        aq_chat_reply r;
        add_calls(c, prefix, 3, &r);
        for (int i = 0; i < 3; i++) {
            char content[150];
            memset(content, 'z', sizeof content);
            ck_assert_int_eq(aq_chat_add_tool_result(c, r.tool_calls[i].id, NULL, content,
                                                     sizeof content, err, sizeof err), AQ_OK);
            ck_assert_uint_le(aq_chat_bytes(c), 2048);
        }
        json_t *msgs;
        json_t *root = request_json(c, NULL, &msgs);
        ck_assert_uint_eq(check_pairing(msgs), aq_chat_turns(c));
        json_decref(root);
        aq_chat_reply_free(&r);
    }
    ck_assert_uint_gt(aq_chat_dropped(c), 0);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_cap_newest_turn_alone_may_exceed)
{
    /* The rule: bytes <= cap, or only the newest turn is left. A reply
     * larger than the cap on its own is kept (the model needs it). */
    const size_t cap = 1024;
    aq_chat *c = aq_chat_new(SYS, GOAL, cap);
    add_turn(c, 0, 100);
    add_turn(c, 1, 100);
    ck_assert_uint_eq(aq_chat_turns(c), 2);

    char *big = malloc(3000);
    memset(big, 'q', 3000);
    char err[128];
    ck_assert_int_eq(aq_chat_add_user(c, big, 3000, err, sizeof err), AQ_OK);
    ck_assert_uint_eq(aq_chat_turns(c), 1);
    ck_assert_uint_eq(aq_chat_dropped(c), 2);
    ck_assert_uint_gt(aq_chat_bytes(c), cap);
    json_t *msgs;
    json_t *root = request_json(c, NULL, &msgs);
    ck_assert_uint_eq(json_array_size(msgs), 3);
    ck_assert_uint_eq(strlen(str_at(msgs, 2, "content")), 3000);
    json_decref(root);

    /* The next small turn pushes the big one out and the cap holds again. */
    add_turn(c, 2, 10);
    ck_assert_uint_eq(aq_chat_turns(c), 1);
    ck_assert_uint_le(aq_chat_bytes(c), cap);

    /* A goal beyond the cap is kept too; the history then holds one turn. */
    memset(big, 'g', 2999);
    big[2999] = '\0';
    aq_chat *g = aq_chat_new(NULL, big, cap);
    add_turn(g, 0, 10);
    add_turn(g, 1, 10);
    ck_assert_uint_eq(aq_chat_turns(g), 1);
    root = request_json(g, NULL, &msgs);
    ck_assert_uint_eq(strlen(str_at(msgs, 0, "content")), 2999);
    ck_assert_str_eq(str_at(msgs, 2, "tool_call_id"), "t1_0");
    json_decref(root);
    aq_chat_free(g);
    free(big);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_huge_tool_result_truncated)
{
    const size_t cap = 65536;
    aq_chat *c = aq_chat_new(SYS, GOAL, cap);
    aq_chat_reply r;
    add_calls(c, "h", 1, &r);
    char err[128];
    size_t n = 10 * 1024 * 1024;
    char *huge = malloc(n);
    /* Multi-byte characters throughout, so a cut inside one would show. */
    for (size_t i = 0; i + 2 < n; i += 3) memcpy(huge + i, "\xe2\x82\xac", 3);
    memset(huge + n - n % 3, 'x', n % 3);
    ck_assert_int_eq(aq_chat_add_tool_result(c, "h_0", NULL, huge, n, err, sizeof err), AQ_OK);
    ck_assert_uint_le(aq_chat_bytes(c), cap);

    json_t *msgs;
    json_t *root = request_json(c, NULL, &msgs);
    const char *got = str_at(msgs, 3, "content");
    size_t glen = strlen(got);
    size_t mlen = strlen(AQ_CHAT_TRUNCATED);
    ck_assert_uint_le(glen, cap / 4);
    ck_assert_uint_gt(glen, cap / 4 - 8);
    ck_assert_str_eq(got + glen - mlen, AQ_CHAT_TRUNCATED);
    ck_assert_uint_eq((glen - mlen) % 3, 0); /* whole euro signs only */
    ck_assert(memcmp(got, huge, glen - mlen) == 0);
    json_decref(root);

    /* A result that fits is not marked. */
    add_turn(c, 1, 100);
    root = request_json(c, NULL, &msgs);
    ck_assert_ptr_null(strstr(str_at(msgs, json_array_size(msgs) - 1, "content"), "[truncated]"));
    json_decref(root);

    free(huge);
    aq_chat_reply_free(&r);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_results_share_the_quarter)
{
    /* Eight calls in one turn split the quarter between them, so a turn's
     * results stay near cap/4 however many calls it made. */
    const size_t cap = 65536;
    aq_chat *c = aq_chat_new(NULL, GOAL, cap);
    aq_chat_reply r;
    add_calls(c, "s", 8, &r);
    char err[128];
    size_t before = aq_chat_bytes(c);
    char *big = malloc(100000);
    memset(big, '\n', 100000); /* escapes to 2 bytes each */
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(aq_chat_add_tool_result(c, r.tool_calls[i].id, NULL, big, 100000, err,
                                                 sizeof err), AQ_OK);
    size_t results = aq_chat_bytes(c) - before;
    ck_assert_uint_le(results, cap / 4 + 8 * 100);
    json_t *msgs;
    json_t *root = request_json(c, NULL, &msgs);
    const char *got = str_at(msgs, 2, "content");
    ck_assert_uint_eq(strlen(got), (cap / 4 / 8 - strlen(AQ_CHAT_TRUNCATED)) / 2
                                       + strlen(AQ_CHAT_TRUNCATED));
    json_decref(root);
    aq_chat_reply_free(&r);
    aq_chat_free(c);

    /* Many calls against a small cap still leave each result the floor. */
    c = aq_chat_new(NULL, GOAL, 4096);
    add_calls(c, "f", 8, &r);
    memset(big, 'a', 1000);
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(aq_chat_add_tool_result(c, r.tool_calls[i].id, NULL, big, 1000, err,
                                                 sizeof err), AQ_OK);
    root = request_json(c, NULL, &msgs);
    ck_assert_uint_eq(strlen(str_at(msgs, 9, "content")), AQ_CHAT_RESULT_MIN);
    json_decref(root);
    free(big);
    aq_chat_reply_free(&r);
    aq_chat_free(c);
}
END_TEST

START_TEST(test_tool_call_cap)
{
    char *body = reply_with_calls("x", AQ_CHAT_MAX_TOOL_CALLS);
    aq_chat_reply r;
    parse_ok(body, &r);
    ck_assert_uint_eq(r.n_tool_calls, AQ_CHAT_MAX_TOOL_CALLS);
    aq_chat_reply_free(&r);
    free(body);

    body = reply_with_calls("x", AQ_CHAT_MAX_TOOL_CALLS + 1);
    char err[128] = "";
    ck_assert_int_eq(aq_chat_parse_reply(body, strlen(body), &r, err, sizeof err), AQ_EPROTO);
    ck_assert_str_eq(err, "choices[0].message.tool_calls has 129 entries (limit 128)");
    free(body);
}
END_TEST

/* ---- errors ------------------------------------------------------------- */

#define PARSE_ERR(body, want) do {                                            \
        aq_chat_reply r_;                                                     \
        char e_[256] = "";                                                    \
        int rc_ = aq_chat_parse_reply((body), strlen(body), &r_, e_, sizeof e_); \
        ck_assert_msg(rc_ == AQ_EPROTO, "accepted: %s", (body));              \
        ck_assert_str_eq(e_, (want));                                         \
        ck_assert_ptr_null(r_.content);                                       \
        ck_assert_ptr_null(r_.tool_calls);                                    \
        ck_assert_ptr_null(r_.message_json);                                  \
        aq_chat_reply_free(&r_);                                              \
    } while (0)

START_TEST(test_parse_malformed)
{
    aq_chat_reply r;
    char e[256] = "";
    ck_assert_int_eq(aq_chat_parse_reply("{\"choices\":", 11, &r, e, sizeof e), AQ_EPROTO);
    ck_assert_msg(strncmp(e, "reply is not valid JSON: ", 25) == 0, "%s", e);
    ck_assert_int_eq(aq_chat_parse_reply("<html>502</html>", 16, &r, e, sizeof e), AQ_EPROTO);
    ck_assert_msg(strncmp(e, "reply is not valid JSON: ", 25) == 0, "%s", e);
    ck_assert_int_eq(aq_chat_parse_reply("", 0, &r, e, sizeof e), AQ_EPROTO);

    /* The length counts, not a NUL: a good body cut short is refused. */
    const char *good = "{\"choices\":[{\"message\":{\"content\":\"hi\"}}]}";
    ck_assert_int_eq(aq_chat_parse_reply(good, strlen(good) - 1, &r, e, sizeof e), AQ_EPROTO);

    PARSE_ERR("[1]", "reply is an array, not an object");
    PARSE_ERR("{\"id\":\"x\"}", "reply has no \"choices\"");
    PARSE_ERR("{\"choices\":{}}", "choices is an object, not an array");
    PARSE_ERR("{\"choices\":[]}", "choices is empty");
    PARSE_ERR("{\"choices\":[7]}", "choices[0] is an integer, not an object");
    PARSE_ERR("{\"choices\":[{\"finish_reason\":\"stop\"}]}", "choices[0].message is missing");
    PARSE_ERR("{\"choices\":[{\"message\":{\"content\":[\"part\"]}}]}",
              "choices[0].message.content is an array, not a string");
    PARSE_ERR("{\"choices\":[{\"message\":{\"content\":\"x\",\"tool_calls\":{}}}]}",
              "choices[0].message.tool_calls is an object, not an array");
    PARSE_ERR("{\"choices\":[{\"message\":{\"tool_calls\":[{\"id\":\"a\",\"function\":{}}]}}]}",
              "choices[0].message.tool_calls[0].function.name is missing");
    PARSE_ERR("{\"choices\":[{\"message\":{\"tool_calls\":[{\"id\":\"a\",\"function\":"
              "{\"name\":\"\"}}]}}]}",
              "choices[0].message.tool_calls[0].function.name is empty");
    PARSE_ERR("{\"choices\":[{\"message\":{\"tool_calls\":[{\"id\":\"a\",\"function\":{\"name\":"
              "\"f\",\"arguments\":\"{}\"}},{\"id\":5,\"function\":{\"name\":\"f\"}}]}}]}",
              "choices[0].message.tool_calls[1].id is an integer, not a string");
    PARSE_ERR("{\"choices\":[{\"message\":{\"tool_calls\":[{\"id\":\"a\"}]}}]}",
              "choices[0].message.tool_calls[0].function is missing");
    PARSE_ERR("{\"choices\":[{\"message\":{\"tool_calls\":[{\"id\":\"a\",\"type\":\"custom\","
              "\"function\":{\"name\":\"f\"}}]}}]}",
              "choices[0].message.tool_calls[0].type is \"custom\", not \"function\"");
    PARSE_ERR("{\"choices\":[{\"message\":{\"tool_calls\":[{\"function\":{\"name\":\"f\","
              "\"arguments\":12}}]}}]}",
              "choices[0].message.tool_calls[0].function.arguments is an integer, not a string");
    PARSE_ERR("{\"choices\":[{\"message\":{\"tool_calls\":[{\"function\":{\"name\":\"f\\u0000g\"}}]}}]}",
              "choices[0].message.tool_calls[0].function.name contains a NUL character");
    PARSE_ERR("{\"choices\":[{\"message\":{\"content\":\"x\"},\"finish_reason\":1}]}",
              "choices[0].finish_reason is an integer, not a string");
    PARSE_ERR("{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":[]}",
              "usage is an array, not an object");
    PARSE_ERR("{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":-1}}",
              "usage.prompt_tokens is not a non-negative integer");
    PARSE_ERR("{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":"
              "{\"prompt_tokens\":1,\"completion_tokens\":\"2\"}}",
              "usage.completion_tokens is not a non-negative integer");
    PARSE_ERR("{\"error\":{\"message\":\"You exceeded your current quota.\",\"type\":\"x\"}}",
              "reply is an error: You exceeded your current quota.");
}
END_TEST

START_TEST(test_parse_duplicate_keys)
{
    aq_chat_reply r;
    char e[256] = "";
    const char *dup = "{\"choices\":[{\"message\":{\"content\":\"a\",\"content\":\"b\"}}]}";
    ck_assert_int_eq(aq_chat_parse_reply(dup, strlen(dup), &r, e, sizeof e), AQ_EPROTO);
    ck_assert_msg(strstr(e, "duplicate") != NULL, "%s", e);
    const char *dup2 = "{\"choices\":[],\"choices\":[{\"message\":{\"content\":\"b\"}}]}";
    ck_assert_int_eq(aq_chat_parse_reply(dup2, strlen(dup2), &r, e, sizeof e), AQ_EPROTO);
}
END_TEST

START_TEST(test_history_misuse)
{
    aq_chat *c = aq_chat_new(SYS, GOAL, 65536);
    char err[128] = "";
    ck_assert_ptr_null(aq_chat_new(SYS, NULL, 100));
    ck_assert_ptr_null(aq_chat_new(SYS, GOAL, 0));

    /* No calls yet: any tool result is refused. */
    ck_assert_int_eq(aq_chat_add_tool_result(c, "x", NULL, "r", 1, err, sizeof err), AQ_EINVAL);
    ck_assert_str_eq(err, "no tool call x in the last reply");

    aq_chat_reply r;
    add_calls(c, "call", 2, &r);
    size_t bytes = aq_chat_bytes(c);

    /* Unanswered calls block the next request and the next turn. */
    char *req = (char *)"sentinel";
    ck_assert_int_eq(aq_chat_request(c, "m", NULL, NULL, &req, NULL), AQ_EINVAL);
    ck_assert_ptr_null(req);
    ck_assert_int_eq(aq_chat_add_user(c, "more", 4, err, sizeof err), AQ_EINVAL);
    ck_assert_str_eq(err, "tool call call_0 (calculator) of the last reply has no result yet");
    ck_assert_int_eq(aq_chat_add_reply(c, &r, err, sizeof err), AQ_EINVAL);

    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_0", "http_get", "r", 1, err, sizeof err),
                     AQ_EINVAL);
    ck_assert_str_eq(err, "tool call call_0 is for calculator, not http_get");
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_0", NULL, "r", 1, err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_0", NULL, "r", 1, err, sizeof err), AQ_EINVAL);
    ck_assert_str_eq(err, "tool call call_0 already has a result");
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_9", NULL, "r", 1, err, sizeof err), AQ_EINVAL);
    ck_assert_int_eq(aq_chat_request(c, "m", NULL, NULL, &req, NULL), AQ_EINVAL);
    ck_assert_uint_gt(aq_chat_bytes(c), bytes);

    /* A NULL content is an empty result. */
    ck_assert_int_eq(aq_chat_add_tool_result(c, "call_1", NULL, NULL, 5, err, sizeof err), AQ_OK);
    ck_assert_int_eq(aq_chat_request(c, "", NULL, NULL, &req, NULL), AQ_EINVAL);
    ck_assert_int_eq(aq_chat_request(c, "m", NULL, NULL, &req, NULL), AQ_OK);
    free(req);

    /* A zeroed reply (a failed parse) cannot be appended. */
    aq_chat_reply z;
    memset(&z, 0, sizeof z);
    ck_assert_int_eq(aq_chat_add_reply(c, &z, err, sizeof err), AQ_EINVAL);

    aq_chat_reply_free(&r);
    aq_chat_free(c);
    aq_chat_free(NULL);
}
END_TEST

START_TEST(test_parse_error_body)
{
    char m[128];
    const char *openai = "{\"error\":{\"message\":\"Incorrect API key provided: sk-***.\","
                         "\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"invalid_api_key\"}}";
    ck_assert_int_eq(aq_chat_parse_error(openai, strlen(openai), m, sizeof m), AQ_OK);
    ck_assert_str_eq(m, "Incorrect API key provided: sk-***.");

    const char *flat = "{\"error\":\"model 'x' not found\"}";
    ck_assert_int_eq(aq_chat_parse_error(flat, strlen(flat), m, sizeof m), AQ_OK);
    ck_assert_str_eq(m, "model 'x' not found");

    const char *vllm = "{\"object\":\"error\",\"message\":\"max_tokens too large\",\"code\":400}";
    ck_assert_int_eq(aq_chat_parse_error(vllm, strlen(vllm), m, sizeof m), AQ_OK);
    ck_assert_str_eq(m, "max_tokens too large");

    const char *gemini = "[{\"error\":{\"code\":400,\"message\":\"bad\\nrequest\"}}]";
    ck_assert_int_eq(aq_chat_parse_error(gemini, strlen(gemini), m, sizeof m), AQ_OK);
    ck_assert_str_eq(m, "bad request");

    const char *html = "\n<html><body>502 Bad\tGateway</body></html>\n";
    ck_assert_int_eq(aq_chat_parse_error(html, strlen(html), m, sizeof m), AQ_ENOTFOUND);
    ck_assert_str_eq(m, "<html><body>502 Bad Gateway</body></html>");

    ck_assert_int_eq(aq_chat_parse_error("", 0, m, sizeof m), AQ_ENOTFOUND);
    ck_assert_str_eq(m, "");

    /* Cut to the buffer, on a character boundary, invalid bytes replaced. */
    char small[6];
    ck_assert_int_eq(aq_chat_parse_error("ab\xe2\x82\xac\xff", 6, small, sizeof small),
                     AQ_ENOTFOUND);
    ck_assert_str_eq(small, "ab\xe2\x82\xac");
    char tiny[5];
    ck_assert_int_eq(aq_chat_parse_error("ab\xe2\x82\xac", 5, tiny, sizeof tiny), AQ_ENOTFOUND);
    ck_assert_str_eq(tiny, "ab");
    ck_assert_int_eq(aq_chat_parse_error("x\xff", 2, m, sizeof m), AQ_ENOTFOUND);
    ck_assert_str_eq(m, "x\xef\xbf\xbd");

    /* A message of only control bytes and blanks is no message: the body is
     * shown instead (found by fuzz_chat). */
    const char *blank = "[{\"error\":{\"code\":400,\"message\":\"\x7f \\t\"}}]";
    ck_assert_int_eq(aq_chat_parse_error(blank, strlen(blank), m, sizeof m), AQ_ENOTFOUND);
    ck_assert_str_eq(m, "[{\"error\":{\"code\":400,\"message\":\"  \\t\"}}]");
}
END_TEST

START_TEST(test_tools_json_errors)
{
    char *out = (char *)"sentinel";
    char err[160] = "";
    aq_chat_tool_def bad_name[] = {{"has space", NULL, NULL}};
    ck_assert_int_eq(aq_chat_tools_json(bad_name, 1, &out, err, sizeof err), AQ_EINVAL);
    ck_assert_ptr_null(out);
    ck_assert_str_eq(err, "tool 0: name \"has space\" is not 1-64 of [A-Za-z0-9_-]");

    aq_chat_tool_def twice[] = {{"a", NULL, NULL}, {"a", NULL, NULL}};
    ck_assert_int_eq(aq_chat_tools_json(twice, 2, &out, err, sizeof err), AQ_EINVAL);
    ck_assert_str_eq(err, "tool a is defined twice");

    aq_chat_tool_def arr[] = {{"a", NULL, "[]"}};
    ck_assert_int_eq(aq_chat_tools_json(arr, 1, &out, err, sizeof err), AQ_EINVAL);
    ck_assert_str_eq(err, "tool a: parameters are an array, not a JSON object");

    aq_chat_tool_def broken[] = {{"a", NULL, "{\"type\":"}};
    ck_assert_int_eq(aq_chat_tools_json(broken, 1, &out, err, sizeof err), AQ_EINVAL);
    ck_assert_msg(strncmp(err, "tool a: parameters are not valid JSON", 37) == 0, "%s", err);

    char longname[66];
    memset(longname, 'n', 65);
    longname[65] = '\0';
    aq_chat_tool_def toolong[] = {{longname, NULL, NULL}};
    ck_assert_int_eq(aq_chat_tools_json(toolong, 1, &out, err, sizeof err), AQ_EINVAL);
    longname[64] = '\0';
    ck_assert_int_eq(aq_chat_tools_json(toolong, 1, &out, err, sizeof err), AQ_OK);
    free(out);

    aq_chat_tool_def badutf[] = {{"a", "\xff", NULL}};
    ck_assert_int_eq(aq_chat_tools_json(badutf, 1, &out, err, sizeof err), AQ_EINVAL);
    ck_assert_str_eq(err, "tool a: description is not valid UTF-8");
}
END_TEST

/* What a step row stores (the newest message as the history holds it)
 * rebuilds the same history in another chat: the same request, byte for
 * byte, under the same cap. */
START_TEST(test_last_message_rebuilds_the_history)
{
    enum { CAP = 1200 };
    aq_chat *a = aq_chat_new(SYS, GOAL, CAP), *b = aq_chat_new(SYS, GOAL, CAP);
    size_t len;
    ck_assert_ptr_null(aq_chat_last_message(a, &len));
    ck_assert_uint_eq(len, 0);
    char err[256] = "", big[900];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    for (int turn = 0; turn < 4; turn++) {
        char prefix[16];
        snprintf(prefix, sizeof prefix, "t%d", turn);
        aq_chat_reply r;
        add_calls(a, prefix, 2, &r);
        const char *m = aq_chat_last_message(a, &len);
        ck_assert_ptr_nonnull(m);
        aq_chat_reply again;
        ck_assert_msg(aq_chat_parse_message(m, len, &again, err, sizeof err) == AQ_OK, "%s", err);
        ck_assert_uint_eq(again.n_tool_calls, 2);
        ck_assert_str_eq(again.tool_calls[1].id, r.tool_calls[1].id);
        ck_assert_int_eq(aq_chat_add_reply(b, &again, err, sizeof err), AQ_OK);
        for (int i = 0; i < 2; i++) {
            /* a result over its share: the stored text is the cut one */
            ck_assert_int_eq(aq_chat_add_tool_result(a, r.tool_calls[i].id, NULL, big, strlen(big), err, sizeof err),
                             AQ_OK);
            m = aq_chat_last_message(a, &len);
            json_t *j = json_loadb(m, len, 0, NULL);
            ck_assert_ptr_nonnull(j);
            json_t *content = json_object_get(j, "content");
            ck_assert_msg(strstr(json_string_value(content), "[truncated]"), "%.*s", (int)len, m);
            ck_assert_str_eq(json_string_value(json_object_get(j, "tool_call_id")), r.tool_calls[i].id);
            ck_assert_int_eq(aq_chat_add_tool_result(b, r.tool_calls[i].id, NULL, json_string_value(content),
                                                     json_string_length(content), err, sizeof err),
                             AQ_OK);
            json_decref(j);
        }
        aq_chat_reply_free(&again);
        aq_chat_reply_free(&r);
    }
    ck_assert_uint_gt(aq_chat_dropped(a), 0);
    ck_assert_uint_eq(aq_chat_dropped(b), aq_chat_dropped(a));
    char *ra = NULL, *rb = NULL;
    ck_assert_int_eq(aq_chat_request(a, "m", NULL, NULL, &ra, NULL), AQ_OK);
    ck_assert_int_eq(aq_chat_request(b, "m", NULL, NULL, &rb, NULL), AQ_OK);
    ck_assert_str_eq(ra, rb);
    free(ra);
    free(rb);
    /* a stored message that is not an assistant message is refused, named */
    const char *bad = "{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{}}]}";
    aq_chat_reply r;
    ck_assert_int_eq(aq_chat_parse_message(bad, strlen(bad), &r, err, sizeof err), AQ_EPROTO);
    ck_assert_msg(strstr(err, "tool_calls[0].function.name"), "%s", err);
    aq_chat_reply_free(&r);
    aq_chat_free(a);
    aq_chat_free(b);
}
END_TEST

static Suite *chat_suite(void)
{
    const TTest *core[] = {test_request_order_and_tools, test_round_trip_ids, test_last_message_rebuilds_the_history,
                           test_user_turn_and_escaping, test_parse_content_reply,
                           test_parse_two_tool_calls, test_parse_missing_usage,
                           test_parse_bad_arguments, test_parse_lenient_servers, test_tools_json};
    const TTest *limits[] = {test_cap_drops_oldest_turns, test_cap_keeps_multi_call_turn_whole,
                             test_cap_newest_turn_alone_may_exceed, test_huge_tool_result_truncated,
                             test_results_share_the_quarter, test_tool_call_cap};
    const TTest *errors[] = {test_parse_malformed, test_parse_duplicate_keys, test_history_misuse,
                             test_parse_error_body, test_tools_json_errors};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core)},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits)},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors)},
    };
    return aq_test_suite("chat", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void)
{
    return aq_test_run(chat_suite());
}
