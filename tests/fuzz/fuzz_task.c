/* fuzz_task.c — libFuzzer target for the task message parser, the first
 * code that touches a body anyone with queue access can send.
 *
 * Beyond "no crash, no leak", it checks the contract callers rely on: a
 * rejection always names a field and carries a printable message; an
 * accepted task survives aq_task_to_json -> aq_task_parse unchanged. */
#include "agentq/task.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const aq_task_limits limits = {
    .skills = "calculator,http_get,current_time,weather",
    .models = "gpt-4o-mini,llama3",
    .default_model = "gpt-4o-mini",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_task: broken contract: %s\n", what);
        abort();
    }
}

static bool printable(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    for (; *p; p++)
        if (*p < 0x20 || *p == 0x7f) return false;
    /* jansson rejects invalid UTF-8, so this also proves the message is
     * valid UTF-8 */
    json_t *j = json_string(s);
    json_decref(j);
    return j != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    aq_task_props props = {
        .priority = 4, .expiration = "60000",
        .message_id = "0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f", .timestamp = 1700000000,
    };
    aq_task *t;
    aq_task_error err;
    /* A copy of exactly `size` bytes, so ASan catches a read past the end
     * of a body that is not NUL-terminated. */
    char *body = malloc(size ? size : 1);
    if (size) memcpy(body, data, size);
    int rc = aq_task_parse(body, size, &props, &limits, &t, &err);
    free(body);
    if (rc != AQ_OK) {
        check(rc == AQ_EINVAL && t == NULL, "error code");
        check(err.message[0] && err.field[0], "error names a field");
        check(printable(err.message) && printable(err.field), "printable error");
        check(!err.task_id[0] || aq_task_uuid_valid(err.task_id), "error task_id");
        return 0;
    }
    check(aq_task_uuid_valid(t->task_id), "task_id");
    check(t->max_steps >= 1 && t->max_steps <= 100, "max_steps");
    check(t->budget_usd >= 0, "budget_usd");
    check(t->timeout_seconds > 0 && t->timeout_seconds <= AQ_TASK_TIMEOUT_MAX, "timeout_seconds");
    check(t->wait_timeout_seconds > 0 && t->wait_timeout_seconds <= AQ_TASK_WAIT_TIMEOUT_MAX, "wait_timeout_seconds");
    check(strlen(t->goal) >= 1 && strlen(t->goal) <= AQ_TASK_GOAL_MAX, "goal");

    json_t *j = aq_task_to_json(t);
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    check(text != NULL, "to_json dumps");
    aq_task *u;
    rc = aq_task_parse(text, strlen(text), &props, &limits, &u, &err);
    free(text);
    check(rc == AQ_OK, "round trip parses");
    check(strcmp(t->task_id, u->task_id) == 0, "round trip task_id");
    check(strcmp(t->user_id, u->user_id) == 0, "round trip user_id");
    check(strcmp(t->goal, u->goal) == 0, "round trip goal");
    check(t->max_steps == u->max_steps, "round trip max_steps");
    check(t->budget_usd == u->budget_usd, "round trip budget_usd");
    check(t->timeout_seconds == u->timeout_seconds, "round trip timeout_seconds");
    check(t->wait_timeout_seconds == u->wait_timeout_seconds, "round trip wait_timeout_seconds");
    check(t->n_skills == u->n_skills, "round trip skills");
    for (int i = 0; i < t->n_skills; i++)
        check(strcmp(t->skills[i], u->skills[i]) == 0, "round trip skill");
    check(strcmp(t->model, u->model) == 0 && t->model_default == u->model_default,
          "round trip model");
    check(t->metadata ? json_equal(t->metadata, u->metadata) : !u->metadata,
          "round trip metadata");
    aq_task_free(u);
    aq_task_free(t);
    return 0;
}
