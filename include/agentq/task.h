/* task.h — the task message model: turns a message body (JSON) and its
 * AMQP properties into a validated aq_task, and back into a body.
 *
 * This module owns the rules of design.md's message table and nothing
 * else: it does no I/O besides reading random bytes for generated ids, and
 * it does not know about queues, retries or the database. The worker parses
 * every delivery with aq_task_parse(); on AQ_EINVAL it dead-letters the
 * message and records the aq_task_error (message, field, and the task id
 * when one was readable).
 *
 * The producer builds a body as a json_t (from flags or a JSON line), checks
 * it with aq_task_from_json() (same rules as aq_task_parse, which catches
 * problems before they reach the queue and fixes the task id), then
 * publishes aq_task_to_json() with message_id = task_id.
 *
 * Rules beyond the table, so a reader need not guess:
 * - Field names are case-sensitive; any other top-level field is an error.
 * - JSON null is not absence: "model": null is a type error.
 * - max_steps must be a JSON integer; 3.0 is rejected as a real number.
 * - task_id must be the canonical 8-4-4-4-12 hex form (either case; kept in
 *   lower case). The body's task_id wins over the message_id property;
 *   a message_id that is not a UUID is ignored; with neither, a random v4
 *   UUID is generated and id_generated is set so the caller can log it.
 * - skills: an empty array is rejected (omit the field to allow every
 *   configured skill); a name listed twice is rejected.
 * - model: allowed if it is in limits->models or equals
 *   limits->default_model.
 * - A NULL limits, or a NULL list inside it, means "do not check names"
 *   (the producer may not know the worker's configuration); an empty list
 *   allows nothing.
 * - Error messages are valid UTF-8 with control characters replaced, so
 *   they can go to logs and a PostgreSQL text column as they are. */
#ifndef AGENTQ_TASK_H
#define AGENTQ_TASK_H

#include "agentq/common.h"
#include <jansson.h>

#define AQ_TASK_ID_LEN 36            /* canonical UUID text, without NUL */
#define AQ_TASK_USER_ID_MAX 128      /* bytes */
#define AQ_TASK_GOAL_MAX 262144      /* bytes: a 60k-token prompt */
#define AQ_TASK_MAX_STEPS_MAX 100
#define AQ_TASK_MAX_STEPS_DEFAULT 15
#define AQ_TASK_BUDGET_DEFAULT 0.50  /* USD; 0 means no budget */
#define AQ_TASK_TIMEOUT_MAX 86400.0  /* seconds of running time, over all attempts */
#define AQ_TASK_TIMEOUT_DEFAULT 60.0
#define AQ_TASK_WAIT_TIMEOUT_DEFAULT 86400.0 /* seconds a task waits for an answer */
#define AQ_TASK_WAIT_TIMEOUT_MAX 2592000.0   /* 30 days */
#define AQ_TASK_PRIORITY_MAX 9       /* the queue's x-max-priority */
#define AQ_TASK_MAX_SKILLS 256       /* only reachable when names are unchecked */
#define AQ_TASK_TEMPERATURE_MAX 2.0  /* OpenAI's range */

/* What the caller allows; all strings borrowed for the call only. */
typedef struct aq_task_limits {
    const char *skills;        /* configured skills, comma-separated */
    const char *models;        /* configured models, comma-separated */
    const char *default_model; /* used when the body names none */
} aq_task_limits;

/* The AMQP properties and agentq headers of a delivery. A zeroed struct
 * means "none of them": priority 0, no expiration, no message_id,
 * enqueued now. Strings borrowed for the call. (A task's attempt and
 * deadline are the store's to say, never the message's.) */
typedef struct aq_task_props {
    int priority;           /* clamped to 0..AQ_TASK_PRIORITY_MAX */
    const char *expiration; /* per-message TTL in ms as text, or NULL */
    const char *message_id; /* or NULL */
    int64_t timestamp;      /* seconds since the epoch; 0 = absent */
} aq_task_props;

/* A validated task. A plain value record, read directly by the agent, the
 * store and the producer; build it only through aq_task_parse or
 * aq_task_from_json, free it with aq_task_free. */
typedef struct aq_task {
    char task_id[AQ_TASK_ID_LEN + 1]; /* lower-case canonical UUID */
    bool id_generated;                /* neither body nor message_id had one */
    char *user_id;
    char *goal;
    int max_steps;
    double budget_usd;
    double timeout_seconds;
    double wait_timeout_seconds; /* how long a question (ask_human) waits */
    double temperature; /* sampling temperature, 0..AQ_TASK_TEMPERATURE_MAX; < 0: not set */
    char **skills;      /* NULL with n_skills 0: every configured skill */
    int n_skills;
    char *model;        /* never NULL when limits->default_model was set */
    bool model_default; /* model came from limits->default_model */
    json_t *metadata;   /* object the task owns a reference to, or NULL */
    int priority;
    int64_t expiration_ms;  /* -1 when the message had no expiration */
    int64_t enqueued_at_us; /* from the timestamp property, else parse time */
    int user_weight;    /* the user's share (agentq.users.weight) from the
                         * claim that started it; 1 until then */
} aq_task;

/* One committed change to a task's conversation — an agentq.steps row
 * with a message — as an earlier attempt stored it: what a new attempt
 * resumes from. The store reads them (aq_store_load_session) and the
 * engine rebuilds the conversation from them (aq_session_start). */
typedef struct aq_task_step {
    int attempt;
    int step;
    int seq;
    bool tool;             /* a tool result; else the LLM's reply */
    char *message;         /* JSON text of the message, NUL-terminated */
    size_t message_len;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double cost_usd;
} aq_task_step;

/* Why a message is not a task. */
typedef struct aq_task_error {
    char message[512]; /* "max_steps: must be an integer from 1 to 100 (got 0)" */
    char field[64];    /* the field named first in message: "max_steps",
                        * "body" (not JSON, not an object), "expiration",
                        * or the unknown field's own name */
    char task_id[AQ_TASK_ID_LEN + 1]; /* from body or message_id if either
                                       * was a valid UUID, else "" */
} aq_task_error;

/* Parses `len` bytes of `body` (not NUL-terminated; NULL allowed when len
 * is 0). props and limits are borrowed and may be NULL (defaults; no name
 * checks). On success returns AQ_OK and sets *out, which the caller frees
 * with aq_task_free(). On a bad message returns AQ_EINVAL, sets *out to
 * NULL and fills *err (which may be NULL) with the first problem found:
 * unknown fields first, then fields in table order, then properties. */
int aq_task_parse(const char *body, size_t len, const aq_task_props *props,
                  const aq_task_limits *limits, aq_task **out,
                  aq_task_error *err) AQ_MUSTCHECK;

/* aq_task_parse for a body that is already JSON. `body` is borrowed; the
 * task keeps its own copy of metadata. Duplicate keys cannot be detected
 * here, since a json_t cannot hold them. */
int aq_task_from_json(const json_t *body, const aq_task_props *props,
                      const aq_task_limits *limits, aq_task **out,
                      aq_task_error *err) AQ_MUSTCHECK;

/* The body form of `t` (borrowed): every field except a defaulted model
 * and an absent skills list, with task_id always set. Parsing it again
 * gives the same task. Returns a new reference the caller releases with
 * json_decref(); never NULL (out of memory aborts). */
json_t *aq_task_to_json(const aq_task *t);

/* True if the task may use skill `name` (borrowed). */
bool aq_task_skill_allowed(const aq_task *t, const char *name);

/* Frees a task and drops its metadata reference; NULL is a no-op. */
void aq_task_free(aq_task *t);

/* True if `s` is a NUL-terminated UUID in canonical 8-4-4-4-12 hex form
 * (either case). */
bool aq_task_uuid_valid(const char *s);

/* Writes a random (version 4) UUID in lower case and its NUL to `out`. */
void aq_task_uuid_generate(char out[AQ_TASK_ID_LEN + 1]);

#endif
