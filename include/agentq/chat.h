/* chat.h — one agent session's conversation and the OpenAI Chat Completions
 * wire format: the history with its byte cap, the request body built from
 * it, the parsed reply, the provider's error text, and the tools array.
 *
 * Pure code: no I/O, no clock, no globals. It does not know about skills,
 * budgets or retries; the agent drives it and the llm module sends what it
 * builds. Out of memory aborts (common.h's policy).
 *
 * History. A conversation is the system prompt (optional) and the goal (the
 * first user message), which are always kept, followed by turns. A turn is
 * either one assistant message (aq_chat_add_reply) with the tool results
 * that answer its tool calls (aq_chat_add_tool_result), or one user message
 * (aq_chat_add_user). Only the newest turn takes tool results, and a new
 * turn may start only once every tool call of the newest turn has a result,
 * so the history never holds an unanswered or orphan tool call.
 *
 * Cap. aq_chat_bytes() is the size of the serialised "messages" array. After
 * every append, while it is above max_bytes, the OLDEST whole turn is
 * dropped — an assistant message together with all its tool results — but
 * the newest turn is never dropped. So after any append:
 *     aq_chat_bytes() <= max_bytes, or the history holds only the newest
 *     turn (the system prompt and goal plus that turn alone exceed the cap).
 * The cap cannot make a provider see a tool message whose tool call is gone.
 *
 * Tool results. The results of one turn share a quarter of the cap: each
 * result's content, as escaped JSON, is cut to
 *     max(max_bytes / 4 / (tool calls in the turn), AQ_CHAT_RESULT_MIN)
 * bytes at a character boundary, ending with AQ_CHAT_TRUNCATED. Bytes that
 * are not valid UTF-8 (a web page, say) become U+FFFD, never an error.
 *
 * Memory. A session holds no jansson tree: every message is kept as its
 * serialised JSON text in one growing buffer, so a request is a
 * concatenation. What one conversation costs:
 *     system prompt + goal (escaped JSON, a few dozen bytes of framing)
 *   + history: at most max_bytes, or the newest turn when it alone is
 *     larger — that is its assistant message as received plus at most
 *     max(max_bytes / 4, calls * AQ_CHAT_RESULT_MIN) of tool results and
 *     ~100 bytes of framing per message — with up to 50% buffer slack
 *   + 8 bytes per kept turn, plus the id and name of each tool call of the
 *     newest turn, plus ~100 bytes of struct.
 * So with the default cap (64 KiB) and a typical system prompt and goal, a
 * session holds at most ~100 KiB, and usually just its history's size.
 *
 * Threads: an aq_chat is not locked; use one from one thread at a time.
 * aq_chat_parse_reply and friends hold no state and are thread-safe. */
#ifndef AGENTQ_CHAT_H
#define AGENTQ_CHAT_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#include "agentq/common.h"

/* Most tool calls one reply may carry; more is a protocol error. */
#define AQ_CHAT_MAX_TOOL_CALLS 128
/* Least room a tool result's escaped content gets, however many calls
 * share its turn. */
#define AQ_CHAT_RESULT_MIN 256
/* What ends a tool result that was cut to its share of the cap. */
#define AQ_CHAT_TRUNCATED "\xe2\x80\xa6[truncated]" /* "…[truncated]" */

typedef struct aq_chat aq_chat;

/* ---- history ---------------------------------------------------------- */

/* A new conversation. system_prompt (NULL or "" for none) and goal are
 * borrowed and copied; max_bytes is agent.max_context_bytes. Returns NULL
 * only when goal is NULL or max_bytes is 0. The caller frees with
 * aq_chat_free(). */
aq_chat *aq_chat_new(const char *system_prompt, const char *goal, size_t max_bytes);

/* Frees the conversation; NULL is allowed. */
void aq_chat_free(aq_chat *c);

struct aq_chat_reply;

/* Appends the assistant message of a parsed reply as a new turn: its content
 * and tool calls exactly as received (ids, names, argument text byte for
 * byte), so the provider sees its own tool_call ids. `r` is borrowed; the
 * chat copies what it keeps. Fails with AQ_EINVAL (and a message) when a
 * tool call of the newest turn still has no result. */
AQ_MUSTCHECK int aq_chat_add_reply(aq_chat *c, const struct aq_chat_reply *r,
                                   char *err, size_t errlen);

/* Appends the result of one tool call of the newest turn. tool_call_id
 * must name a call of that turn that has no result yet. name is the tool's
 * name, or NULL to use the one the call named. content[0..len) is any bytes
 * (borrowed; need not be NUL-terminated) and is cut to its share of the cap
 * (see the top of this file). AQ_EINVAL with a message for an unknown or
 * already answered id, or a name that does not match the call. */
AQ_MUSTCHECK int aq_chat_add_tool_result(aq_chat *c, const char *tool_call_id,
                                         const char *name, const char *content,
                                         size_t len, char *err, size_t errlen);

/* Appends a user message as a new turn (e.g. "give your final answer now").
 * text[0..len) is borrowed. It is not cut: the caller writes it. AQ_EINVAL
 * when a tool call of the newest turn has no result yet. */
AQ_MUSTCHECK int aq_chat_add_user(aq_chat *c, const char *text, size_t len,
                                  char *err, size_t errlen);

/* The newest message as the history holds it (an assistant message, a
 * tool result as cut to its share, or a user message): JSON text of
 * *len bytes, borrowed until the next append. What a step row stores so
 * that a later attempt rebuilds the same history (aq_chat_parse_message,
 * aq_chat_add_tool_result). NULL (and *len 0) before the first turn. */
const char *aq_chat_last_message(const aq_chat *c, size_t *len);

/* Parses an assistant message (JSON text, as aq_chat_last_message gave it
 * after aq_chat_add_reply) back into a reply that aq_chat_add_reply takes,
 * with the rules and errors of aq_chat_parse_reply; the fields a message
 * does not hold (finish_reason, model, usage) stay empty. */
AQ_MUSTCHECK int aq_chat_parse_message(const char *message, size_t len, struct aq_chat_reply *out,
                                       char *err, size_t errlen);

/* Size in bytes of the serialised "messages" array, system prompt and goal
 * included: what the cap measures. */
size_t aq_chat_bytes(const aq_chat *c);

/* Turns kept now (system prompt and goal not counted), and turns the cap
 * has dropped since aq_chat_new. */
size_t aq_chat_turns(const aq_chat *c);
size_t aq_chat_dropped(const aq_chat *c);

/* Tool calls of the newest turn that still have no result. */
size_t aq_chat_pending(const aq_chat *c);

/* ---- request ---------------------------------------------------------- */

/* Sampling parameters of a request: part of what it asks, so part of
 * what a cached reply is keyed on. */
typedef struct aq_chat_sampling {
    double temperature;  /* < 0: not sent (the provider's default) */
    int max_tokens;      /* 0: not sent */
} aq_chat_sampling;

/* Builds the POST body
 *     {"model":M,"messages":[...],"tools":T,"tool_choice":"auto",
 *      "temperature":X,"max_tokens":N}
 * by concatenating the stored messages (no parsing). model is borrowed and
 * must be non-empty. tools_json is borrowed JSON array text as
 * aq_chat_tools_json() builds it, inserted as is; NULL or an empty array
 * leaves out "tools" and "tool_choice", which providers reject empty.
 * `sampling` NULL sends neither temperature nor max_tokens.
 * On success *out is NUL-terminated, the caller frees it with free(), and
 * *outlen (if not NULL) is its length. AQ_EINVAL when model is empty or a
 * tool call of the newest turn has no result yet (providers reject that);
 * *out is then NULL. */
AQ_MUSTCHECK int aq_chat_request(const aq_chat *c, const char *model, const char *tools_json,
                                 const aq_chat_sampling *sampling, char **out, size_t *outlen);

/* ---- reply ------------------------------------------------------------ */

/* One tool call of a reply. All strings are NUL-terminated and owned by the
 * reply. */
typedef struct aq_chat_tool_call {
    char *id;         /* as received; "call_<index>" when the reply had none */
    char *name;       /* function.name, non-empty */
    char *args;       /* function.arguments text as received; "{}" when it was
                         empty, only whitespace, null or missing; an object
                         (some servers send one) as its compact text. The
                         history holds this same text. */
    size_t args_len;
    char *args_error; /* NULL when args parse as a JSON object; otherwise what
                         is wrong, for the tool error the model sees, e.g.
                         "arguments are not a JSON object (got array)" */
} aq_chat_tool_call;

/* A parsed chat.completion (choices[0] only). Free with aq_chat_reply_free. */
typedef struct aq_chat_reply {
    char *content;       /* message.content, or NULL when null or absent */
    size_t content_len;  /* may hold "\u0000" bytes: use the length */
    aq_chat_tool_call *tool_calls;
    size_t n_tool_calls; /* 0..AQ_CHAT_MAX_TOOL_CALLS */
    char *finish_reason; /* e.g. "stop", "tool_calls", "length"; or NULL */
    char *model;         /* the model that answered, or NULL */
    int64_t prompt_tokens;     /* 0 when not reported */
    int64_t completion_tokens; /* 0 when not reported */
    bool has_usage;      /* usage reported both counts */
    char *message_json;  /* the assistant message, serialised for the history */
    size_t message_len;
} aq_chat_reply;

/* Parses a chat.completion body (borrowed; need not be NUL-terminated).
 * Duplicate keys are refused. A tool call whose arguments are not a JSON
 * object is not an error here: it sets that call's args_error. Anything
 * else malformed — not JSON, no or empty "choices", wrong types, a tool call
 * without a function name, more than AQ_CHAT_MAX_TOOL_CALLS tool calls, a
 * body that is an {"error":...} — returns AQ_EPROTO with a message naming
 * the field, e.g. "choices[0].message.tool_calls[2].function.name is
 * missing". `out` is always initialised: free it with aq_chat_reply_free()
 * whatever the result. Tolerated for servers that stray from OpenAI: a
 * missing "type" or id of a tool call, and arguments that are missing or
 * sent as an object (see aq_chat_tool_call.args). */
AQ_MUSTCHECK int aq_chat_parse_reply(const char *body, size_t len, aq_chat_reply *out,
                                     char *err, size_t errlen);

/* Frees what the reply owns and zeroes it; NULL is allowed. */
void aq_chat_reply_free(aq_chat_reply *r);

/* Pulls the provider's error text out of an error reply (a 4xx body):
 * {"error":{"message":M}}, {"error":M} or {"message":M} (vLLM's older form).
 * Returns AQ_OK with M in msg; otherwise AQ_ENOTFOUND, with msg holding the
 * start of the body (for an HTML page from a proxy, say) or "" when empty.
 * msg is always valid UTF-8 without control characters, cut to msglen. */
int aq_chat_parse_error(const char *body, size_t len, char *msg, size_t msglen);

/* ---- tools ------------------------------------------------------------ */

/* A tool definition; all fields borrowed. */
typedef struct aq_chat_tool_def {
    const char *name;            /* 1-64 of [A-Za-z0-9_-], unique */
    const char *description;     /* or NULL */
    const char *parameters_json; /* JSON Schema object text; NULL for none */
} aq_chat_tool_def;

/* Builds the "tools" array text
 *     [{"type":"function","function":{"name","description","parameters"}}]
 * for aq_chat_request(). Done once per skill set, so it validates: AQ_EINVAL
 * with a message naming the tool for a bad or repeated name, or parameters
 * that are not a JSON object. The caller frees *out with free(). */
AQ_MUSTCHECK int aq_chat_tools_json(const aq_chat_tool_def *defs, size_t n, char **out,
                                    char *err, size_t errlen);

#endif
