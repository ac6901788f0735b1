/* skill.h — the tools an agent session can call: the built-ins
 * (`calculator`, `current_time`, `http_get`) and the HTTP skills declared in
 * the config file, their OpenAI tool definitions, and running one call.
 *
 * One aq_skills per worker process, built from the config at start-up; it
 * validates the skill set once (names, schemas, URLs) so a task never meets
 * a broken tool. It does not know about sessions, budgets or the history:
 * the agent decides which calls to make and what to do with the output.
 *
 * Calls (libuv style): aq_skills_call() never fails and never calls back
 * from inside itself. Its callback runs exactly once, later, from the event
 * loop — unless aq_skill_call_cancel() comes first, in which case it never
 * runs. Anything the model got wrong (an unknown tool, arguments that are
 * not a JSON object, a missing argument, a refused URL, a server error) is a
 * tool error: the callback gets is_error = true and a message the model can
 * read and correct itself by, e.g.
 *     "unknown tool 'foo'; available: calculator, http_get"
 *     "calculator: missing string argument 'expression'"
 *     "http_get: refused to connect to 10.0.0.1: private address (10.0.0.0/8) (not allowlisted)"
 *
 * Outputs are text for the model, capped at AQ_SKILL_MAX_OUTPUT bytes: a
 * longer body is cut at a UTF-8 character boundary and ends with a marker
 * saying how much was shown.
 *
 * http_get is the SSRF-exposed one: it fetches with the http module's
 * block_private guard (see http.h: every IANA special-purpose and reserved
 * range and this host's own addresses are refused, checked on the address
 * of every connection the fetch uses, redirects included) and
 * skills.http_get_allow as the allowlist, the one way to let such an
 * address through, under skills.http_get_max_bytes and
 * skills.http_get_timeout_ms. HTTP skills run
 * without the guard: the operator chose their URLs. The worker POSTs
 *     {"arguments": <the call's arguments>, "task_id": ..., "user_id": ...}
 * as application/json and hands the reply body to the model; a non-2xx
 * reply is a tool error carrying the status and the start of the body, and
 * a reply over 1 MiB is a tool error too.
 *
 * current_time answers "YYYY-MM-DDTHH:MM:SSZ", or with the offset asked for
 * ("+02:00"); it takes "UTC"/"GMT"/"Z" and fixed offsets "+HH:MM", "+HHMM",
 * "+HH" (optionally after "UTC"), up to 14 hours. Named zones are a tool
 * error: their rules need the tz database.
 *
 * ask_human ({"question": text}) is in every set, offered only to a task
 * that lists it in its `skills` (not in aq_skills_tools_json): the agent
 * handles its calls itself (the session waits for a person's answer), so
 * aq_skills_call never runs one.
 *
 * Threads: an aq_skills and its calls belong to the thread running its
 * event loop. */
#ifndef AGENTQ_SKILL_H
#define AGENTQ_SKILL_H

#include <stddef.h>
#include <stdbool.h>

#include "agentq/common.h"
#include "agentq/config.h"
#include "agentq/http.h"

struct event_base;

/* The built-in skill through which a session asks a person (agent.h). */
#define AQ_SKILL_ASK_HUMAN "ask_human"

/* Largest tool output handed to the callback, marker included. */
#define AQ_SKILL_MAX_OUTPUT 16384

typedef struct aq_skills aq_skills;
typedef struct aq_skill_call aq_skill_call;

/* `output` is borrowed until the callback returns (NUL-terminated; it may
 * itself hold NULs, so use `len`); `arg` is what aq_skills_call got. The
 * callback may start new calls, cancel other calls and free the set. */
typedef void (*aq_skill_cb)(const char *output, size_t len, bool is_error, void *arg);

/* Builds the skill set from cfg->skills_enabled (built-ins, in that order)
 * and cfg->http_skills (after them). `cfg`, `base` and `http` are borrowed
 * and must outlive the set; `http` may be NULL when neither http_get nor an
 * HTTP skill is configured. Returns NULL with a message in err for an
 * unknown built-in name, an HTTP skill whose name clashes with a built-in or
 * another HTTP skill, an HTTP skill with a bad parameters schema or a
 * non-http(s) URL. The caller frees with aq_skills_free(). */
aq_skills *aq_skills_new(const aq_config *cfg, struct event_base *base, aq_http *http,
                         char *err, size_t errlen);

/* Frees the set. Calls still outstanding are cancelled: their callbacks
 * are never called and their handles become invalid. NULL is ignored. */
void aq_skills_free(aq_skills *s);

/* Every configured skill, comma-separated without spaces ("calculator,
 * http_get,weather"): what a task's `skills` may choose from. Borrowed,
 * valid as long as the set. */
const char *aq_skills_names(const aq_skills *s);

/* True when `name` (borrowed) is a configured skill. */
bool aq_skills_has(const aq_skills *s, const char *name);

/* The OpenAI "tools" array text for every skill but ask_human, as aq_chat_request()
 * takes it; "[]" when there are none. Built once; borrowed, valid as long
 * as the set. */
const char *aq_skills_tools_json(const aq_skills *s);

/* The tools array for a task's subset: the skills named in names[0..n)
 * (borrowed), in configured order, repeats ignored. Returns NULL when a
 * name is not configured (the task module checks names before this); "[]"
 * for n == 0. The caller frees the result with free(). */
char *aq_skills_tools_json_for(const aq_skills *s, char *const *names, int n);

/* Runs the tool `name` (borrowed) with the arguments args_json[0..args_len)
 * (borrowed, need not be NUL-terminated; empty means {}). task_id and
 * user_id (borrowed, may be NULL) are sent to HTTP skills, and so is
 * idempotency_key (borrowed, may be NULL), as the Idempotency-Key header:
 * the same call made again (after a crash, a drain, a resume) carries the
 * same key, so a skill server can answer it without doing it twice. `cb` is called
 * once, later, from the loop (see the top of this file), with `arg`.
 * Never returns NULL. The handle is valid until the callback starts or
 * aq_skill_call_cancel() returns. */
aq_skill_call *aq_skills_call(aq_skills *s, const char *name, const char *args_json,
                              size_t args_len, const char *task_id, const char *user_id,
                              const char *idempotency_key, aq_skill_cb cb, void *arg);

/* Abandons a call: an in-flight HTTP transfer is aborted, and the callback
 * is never called. The handle is invalid afterwards. Must not be called
 * once the callback has started. NULL is ignored. */
void aq_skill_call_cancel(aq_skill_call *c);

#endif
