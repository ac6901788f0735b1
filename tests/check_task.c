/* check_task.c — the task message model: what a producer may send, what
 * the worker makes of it, and the exact errors a rejected message gets. */
#include "agentq/task.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const aq_task_limits LIM = {
    .skills = "calculator,http_get,current_time,weather",
    .models = "gpt-4o-mini, llama3",
    .default_model = "gpt-4o-mini",
};

static aq_task *parse_ok_props(const char *body, const aq_task_props *props)
{
    aq_task *t = (aq_task *)1;
    aq_task_error e;
    int rc = aq_task_parse(body, strlen(body), props, &LIM, &t, &e);
    ck_assert_msg(rc == AQ_OK, "rejected %.200s: %s", body, e.message);
    ck_assert_ptr_nonnull(t);
    return t;
}

static aq_task *parse_ok(const char *body)
{
    return parse_ok_props(body, NULL);
}

/* Asserts the body is rejected, the error records `field` and the message
 * contains `want`; returns the error for further checks. */
static aq_task_error parse_bad_n(const char *body, size_t len, const aq_task_props *props,
                                 const char *field, const char *want)
{
    aq_task *t = (aq_task *)1;
    aq_task_error e;
    int rc = aq_task_parse(body, len, props, &LIM, &t, &e);
    ck_assert_msg(rc == AQ_EINVAL, "accepted %.200s", body);
    ck_assert_ptr_null(t);
    ck_assert_str_eq(e.field, field);
    ck_assert_msg(strstr(e.message, want), "message '%s' lacks '%s'", e.message, want);
    return e;
}

static aq_task_error parse_bad(const char *body, const char *field, const char *want)
{
    return parse_bad_n(body, strlen(body), NULL, field, want);
}

/* A valid body whose goal is n bytes of `fill`; caller frees. */
static char *goal_body(char fill, size_t n)
{
    char *s = malloc(n + 64);
    ck_assert_ptr_nonnull(s);
    int off = sprintf(s, "{\"user_id\":\"u\",\"goal\":\"");
    memset(s + off, fill, n);
    strcpy(s + off + n, "\"}");
    return s;
}

static bool printable_utf8(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p < 0x20 || *p == 0x7f || *p >= 0x80) return false;
    return true;
}

/* ---- core -------------------------------------------------------------- */

START_TEST(test_defaults)
{
    int64_t before = aq_now_us();
    aq_task *t = parse_ok("{\"user_id\":\"alice\",\"goal\":\"What is 2+2?\"}");
    ck_assert_str_eq(t->user_id, "alice");
    ck_assert_str_eq(t->goal, "What is 2+2?");
    ck_assert_int_eq(t->max_steps, 15);
    ck_assert_double_eq(t->budget_usd, 0.50);
    ck_assert_double_eq(t->timeout_seconds, 60.0);
    ck_assert_ptr_null(t->skills);
    ck_assert_int_eq(t->n_skills, 0);
    ck_assert_str_eq(t->model, "gpt-4o-mini");
    ck_assert(t->model_default);
    ck_assert_ptr_null(t->metadata);
    ck_assert_int_eq(t->priority, 0);
    ck_assert_int_eq(t->expiration_ms, -1);
    ck_assert(t->enqueued_at_us >= before && t->enqueued_at_us <= aq_now_us());
    ck_assert(t->id_generated);
    ck_assert(aq_task_uuid_valid(t->task_id));
    ck_assert(aq_task_skill_allowed(t, "weather"));
    aq_task_free(t);
}
END_TEST

START_TEST(test_all_fields)
{
    aq_task *t = parse_ok(
        "{\"task_id\":\"0B9E2A4C-6C1E-4D2A-9F3B-7D8E5A1C2B3F\",\"user_id\":\"bob\","
        "\"goal\":\"Weather in Oslo, then \xc3\xa5 convert\",\"max_steps\":7,"
        "\"budget_usd\":2,\"timeout_seconds\":12.5,"
        "\"skills\":[\"weather\",\"calculator\"],\"model\":\"llama3\","
        "\"metadata\":{\"batch\":\"b1\",\"n\":[1,2]}}");
    ck_assert_str_eq(t->task_id, "0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f");
    ck_assert(!t->id_generated);
    ck_assert_str_eq(t->goal, "Weather in Oslo, then \xc3\xa5 convert");
    ck_assert_int_eq(t->max_steps, 7);
    ck_assert_double_eq(t->budget_usd, 2.0);
    ck_assert_double_eq(t->timeout_seconds, 12.5);
    ck_assert_int_eq(t->n_skills, 2);
    ck_assert_str_eq(t->skills[0], "weather");
    ck_assert_str_eq(t->skills[1], "calculator");
    ck_assert(aq_task_skill_allowed(t, "calculator"));
    ck_assert(!aq_task_skill_allowed(t, "http_get"));
    ck_assert_str_eq(t->model, "llama3");
    ck_assert(!t->model_default);
    ck_assert_str_eq(json_string_value(json_object_get(t->metadata, "batch")), "b1");
    aq_task_free(t);
}
END_TEST

START_TEST(test_task_id_sources)
{
    const char *min = "{\"user_id\":\"u\",\"goal\":\"g\"}";
    aq_task_props p = {.message_id = "AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE"};
    aq_task *t = parse_ok_props(min, &p);
    ck_assert_str_eq(t->task_id, "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee");
    ck_assert(!t->id_generated);
    aq_task_free(t);

    /* the body's id wins over message_id */
    t = parse_ok_props("{\"task_id\":\"11111111-2222-4333-8444-555555555555\","
                       "\"user_id\":\"u\",\"goal\":\"g\"}", &p);
    ck_assert_str_eq(t->task_id, "11111111-2222-4333-8444-555555555555");
    aq_task_free(t);

    /* a message_id that is not a UUID is ignored, not an error */
    p.message_id = "order-42";
    t = parse_ok_props(min, &p);
    ck_assert(t->id_generated);
    char first[37];
    strcpy(first, t->task_id);
    ck_assert(aq_task_uuid_valid(first));
    ck_assert_int_eq(first[14], '4');
    ck_assert(strchr("89ab", first[19]));
    aq_task_free(t);
    t = parse_ok_props(min, &p);
    ck_assert_str_ne(t->task_id, first);
    aq_task_free(t);
}
END_TEST

START_TEST(test_props)
{
    const char *min = "{\"user_id\":\"u\",\"goal\":\"g\"}";
    aq_task_props p = {.priority = 5, .expiration = "60000", .timestamp = 1700000000};
    aq_task *t = parse_ok_props(min, &p);
    ck_assert_int_eq(t->priority, 5);
    ck_assert_int_eq(t->expiration_ms, 60000);
    ck_assert_int_eq(t->enqueued_at_us, 1700000000000000);
    aq_task_free(t);
}
END_TEST

static void assert_same_task(const aq_task *a, const aq_task *b)
{
    ck_assert_str_eq(a->task_id, b->task_id);
    ck_assert_str_eq(a->user_id, b->user_id);
    ck_assert_str_eq(a->goal, b->goal);
    ck_assert_int_eq(a->max_steps, b->max_steps);
    ck_assert_double_eq(a->budget_usd, b->budget_usd);
    ck_assert_double_eq(a->timeout_seconds, b->timeout_seconds);
    ck_assert_int_eq(a->n_skills, b->n_skills);
    for (int i = 0; i < a->n_skills; i++) ck_assert_str_eq(a->skills[i], b->skills[i]);
    ck_assert_str_eq(a->model, b->model);
    ck_assert_int_eq(a->model_default, b->model_default);
    ck_assert(a->metadata ? json_equal(a->metadata, b->metadata) : !b->metadata);
}

static aq_task *reparse(const aq_task *t)
{
    json_t *j = aq_task_to_json(t);
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    aq_task *u = parse_ok(text);
    free(text);
    return u;
}

START_TEST(test_round_trip)
{
    aq_task *t = parse_ok(
        "{\"user_id\":\"u\\u00e9\",\"goal\":\"line1\\nline2 \\\"q\\\"\",\"max_steps\":100,"
        "\"budget_usd\":0.1,\"timeout_seconds\":0.3,\"skills\":[\"http_get\"],"
        "\"model\":\"gpt-4o-mini\",\"metadata\":{\"k\":{\"deep\":[null,true,1.5]}}}");
    aq_task *u = reparse(t);
    assert_same_task(t, u);
    ck_assert(!u->id_generated); /* the id travels in the body */
    aq_task_free(u);
    aq_task_free(t);

    /* a defaulted model stays a default: it is not pinned into the body */
    t = parse_ok("{\"user_id\":\"u\",\"goal\":\"g\"}");
    json_t *j = aq_task_to_json(t);
    ck_assert_ptr_null(json_object_get(j, "model"));
    ck_assert_ptr_null(json_object_get(j, "skills"));
    ck_assert_ptr_null(json_object_get(j, "metadata"));
    ck_assert_str_eq(json_string_value(json_object_get(j, "task_id")), t->task_id);
    json_decref(j);
    u = reparse(t);
    assert_same_task(t, u);
    aq_task_free(u);
    aq_task_free(t);
}
END_TEST

START_TEST(test_from_json_copies_metadata)
{
    json_t *body = json_pack("{s:s, s:s, s:{s:i}}", "user_id", "u", "goal", "g",
                             "metadata", "n", 1);
    aq_task *t;
    aq_task_error e;
    ck_assert_int_eq(aq_task_from_json(body, NULL, &LIM, &t, &e), AQ_OK);
    json_object_set_new(json_object_get(body, "metadata"), "n", json_integer(2));
    json_decref(body);
    ck_assert_int_eq(json_integer_value(json_object_get(t->metadata, "n")), 1);
    aq_task_free(t);
}
END_TEST

START_TEST(test_body_not_nul_terminated)
{
    /* bytes after len belong to someone else and must not be read as JSON */
    const char buf[] = "{\"user_id\":\"u\",\"goal\":\"g\"}garbage";
    aq_task *t;
    aq_task_error e;
    ck_assert_int_eq(aq_task_parse(buf, sizeof buf - 1 - 7, NULL, &LIM, &t, &e), AQ_OK);
    aq_task_free(t);
    ck_assert_int_eq(aq_task_parse(buf, sizeof buf - 1, NULL, &LIM, &t, &e), AQ_EINVAL);
    ck_assert_str_eq(e.field, "body");
}
END_TEST

START_TEST(test_unchecked_names)
{
    /* the producer may not know the worker's configuration */
    const char *b = "{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[\"teleport\"],\"model\":\"m9\"}";
    aq_task *t;
    aq_task_error e;
    ck_assert_int_eq(aq_task_parse(b, strlen(b), NULL, NULL, &t, &e), AQ_OK);
    ck_assert_str_eq(t->skills[0], "teleport");
    ck_assert_str_eq(t->model, "m9");
    aq_task_free(t);
    /* no default and no body model: no model */
    const char *m = "{\"user_id\":\"u\",\"goal\":\"g\"}";
    ck_assert_int_eq(aq_task_parse(m, strlen(m), NULL, NULL, &t, &e), AQ_OK);
    ck_assert_ptr_null(t->model);
    aq_task_free(t);
}
END_TEST

START_TEST(test_uuid)
{
    ck_assert(aq_task_uuid_valid("0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f"));
    ck_assert(aq_task_uuid_valid("0B9E2A4C-6C1E-4D2A-9F3B-7D8E5A1C2B3F"));
    ck_assert(aq_task_uuid_valid("00000000-0000-0000-0000-000000000000"));
    ck_assert(!aq_task_uuid_valid(NULL));
    ck_assert(!aq_task_uuid_valid(""));
    ck_assert(!aq_task_uuid_valid("0b9e2a4c6c1e4d2a9f3b7d8e5a1c2b3f"));
    ck_assert(!aq_task_uuid_valid("{0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f}"));
    ck_assert(!aq_task_uuid_valid("0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f0"));
    ck_assert(!aq_task_uuid_valid("0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3g"));
    ck_assert(!aq_task_uuid_valid("0b9e2a4c-6c1e4-d2a-9f3b-7d8e5a1c2b3f"));
    char a[37], b[37];
    aq_task_uuid_generate(a);
    aq_task_uuid_generate(b);
    ck_assert(aq_task_uuid_valid(a));
    ck_assert_str_ne(a, b);
}
END_TEST

/* ---- limits ------------------------------------------------------------ */

/* The number fields at and past their bounds, a value a row: accepted
 * (error NULL), it parses to `want`; refused, the message holds `error`. */
static const struct bound_case {
    const char *field;
    const char *json;
    double want;
    const char *error;
} bound_cases[] = {
    {"max_steps", "1", 1, NULL},
    {"max_steps", "100", 100, NULL},
    {"max_steps", "101", 0, "from 1 to 100 (got 101)"},
    {"max_steps", "-5", 0, "(got -5)"},
    {"max_steps", "9223372036854775807", 0, "(got 9223372036854775807)"},
    {"budget_usd", "0", 0.0, NULL},
    {"budget_usd", "0.0", 0.0, NULL},
    {"budget_usd", "1000", 1000.0, NULL},
    {"budget_usd", "-0.01", 0, "budget_usd: must be a number >= 0 (got -0.01)"},
    {"budget_usd", "-1", 0, "(got -1)"},
    {"timeout_seconds", "86400", 86400.0, NULL},
    {"timeout_seconds", "0.001", 0.001, NULL},
    {"timeout_seconds", "0", 0, "timeout_seconds: must be a number > 0 and <= 86400 (got 0)"},
    {"timeout_seconds", "86400.5", 0, "(got 86400.5)"},
    {"wait_timeout_seconds", "60", 60.0, NULL},
    {"wait_timeout_seconds", "2592000", 2592000.0, NULL},
    {"wait_timeout_seconds", "0", 0, "wait_timeout_seconds: must be a number > 0 and <= 2592000 (got 0)"},
    {"wait_timeout_seconds", "2592001", 0, "(got 2592001)"},
    {"timeout_seconds", "-1.0", 0, "(got -1.0)"},
};

static double number_field(const aq_task *t, const char *field)
{
    if (!strcmp(field, "max_steps")) return t->max_steps;
    if (!strcmp(field, "budget_usd")) return t->budget_usd;
    if (!strcmp(field, "wait_timeout_seconds")) return t->wait_timeout_seconds;
    ck_assert_str_eq(field, "timeout_seconds");
    return t->timeout_seconds;
}

/* Checks every row of bound_cases for `field`. */
static void check_bounds(const char *field)
{
    size_t rows = 0;
    for (size_t i = 0; i < AQ_ARRAY_LEN(bound_cases); i++) {
        const struct bound_case *c = &bound_cases[i];
        if (strcmp(c->field, field)) continue;
        rows++;
        char body[128];
        snprintf(body, sizeof body, "{\"user_id\":\"u\",\"goal\":\"g\",\"%s\":%s}", field, c->json);
        if (c->error) {
            parse_bad(body, field, c->error);
            continue;
        }
        aq_task *t = parse_ok(body);
        double got = number_field(t, field);
        ck_assert_msg(got == c->want, "%s %s: parsed as %.17g, want %.17g", field, c->json, got,
                      c->want);
        aq_task_free(t);
    }
    ck_assert_uint_gt(rows, 0);
}

START_TEST(test_wait_timeout_bounds)
{
    check_bounds("wait_timeout_seconds");
    aq_task *t = parse_ok("{\"user_id\":\"u\",\"goal\":\"g\"}");
    ck_assert_double_eq(t->wait_timeout_seconds, AQ_TASK_WAIT_TIMEOUT_DEFAULT); /* a day */
    aq_task_free(t);
}
END_TEST

START_TEST(test_max_steps_bounds)
{
    check_bounds("max_steps");
    /* one message in full */
    aq_task_error e = parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"max_steps\":0}",
                                "max_steps", "");
    ck_assert_str_eq(e.message, "max_steps: must be an integer from 1 to 100 (got 0)");
}
END_TEST

START_TEST(test_budget_bounds)
{
    check_bounds("budget_usd");
}
END_TEST

START_TEST(test_timeout_bounds)
{
    check_bounds("timeout_seconds");
}
END_TEST

START_TEST(test_user_id_bounds)
{
    char body[400];
    char id[200];
    memset(id, 'x', 128);
    id[128] = '\0';
    snprintf(body, sizeof body, "{\"user_id\":\"%s\",\"goal\":\"g\"}", id);
    aq_task *t = parse_ok(body);
    ck_assert_uint_eq(strlen(t->user_id), 128);
    aq_task_free(t);
    strcat(id, "x");
    snprintf(body, sizeof body, "{\"user_id\":\"%s\",\"goal\":\"g\"}", id);
    parse_bad(body, "user_id", "user_id: must be a string of 1 to 128 bytes (got 129 bytes)");
    parse_bad("{\"user_id\":\"\",\"goal\":\"g\"}", "user_id", "(got 0 bytes)");
}
END_TEST

START_TEST(test_goal_bounds)
{
    char *b = goal_body('a', 262144);
    aq_task *t = parse_ok(b);
    ck_assert_uint_eq(strlen(t->goal), 262144);
    aq_task_free(t);
    free(b);

    b = goal_body('a', 262145);
    parse_bad(b, "goal", "goal: must be a string of 1 to 262144 bytes (got 262145 bytes)");
    free(b);

    /* the limit counts bytes, not characters: 262143 + a 2-byte letter */
    b = goal_body('a', 262145);
    char *end = strstr(b, "\"}");
    memcpy(end - 2, "\xc3\xa9", 2);
    parse_bad(b, "goal", "(got 262145 bytes)");
    free(b);

    parse_bad("{\"user_id\":\"u\",\"goal\":\"\"}", "goal", "(got 0 bytes)");
}
END_TEST

START_TEST(test_skills_bounds)
{
    aq_task *t = parse_ok("{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":"
                          "[\"calculator\",\"http_get\",\"current_time\",\"weather\"]}");
    ck_assert_int_eq(t->n_skills, 4);
    aq_task_free(t);
    parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[]}", "skills",
              "skills: must name at least one skill");

    /* unchecked names still have a ceiling */
    size_t cap = 300 * 12 + 64;
    char *body = malloc(cap);
    size_t off = (size_t)sprintf(body, "{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[");
    for (int i = 0; i < 257; i++) off += (size_t)sprintf(body + off, "%s\"s%d\"", i ? "," : "", i);
    strcpy(body + off, "]}");
    aq_task *t2;
    aq_task_error e;
    ck_assert_int_eq(aq_task_parse(body, strlen(body), NULL, NULL, &t2, &e), AQ_EINVAL);
    ck_assert_str_eq(e.message, "skills: must name at most 256 skills (got 257)");
    free(body);
}
END_TEST

START_TEST(test_priority_clamp)
{
    const char *min = "{\"user_id\":\"u\",\"goal\":\"g\"}";
    int in[] = {0, 9, 10, 255, -3};
    int want[] = {0, 9, 9, 9, 0};
    for (size_t i = 0; i < AQ_ARRAY_LEN(in); i++) {
        aq_task_props p = {.priority = in[i]};
        aq_task *t = parse_ok_props(min, &p);
        ck_assert_int_eq(t->priority, want[i]);
        aq_task_free(t);
    }
}
END_TEST

START_TEST(test_expiration_bounds)
{
    const char *min = "{\"user_id\":\"u\",\"goal\":\"g\"}";
    aq_task_props p = {.expiration = "0"};
    aq_task *t = parse_ok_props(min, &p);
    ck_assert_int_eq(t->expiration_ms, 0);
    aq_task_free(t);
    p.expiration = "9223372036854775807";
    t = parse_ok_props(min, &p);
    ck_assert_int_eq(t->expiration_ms, INT64_MAX);
    aq_task_free(t);
    p.expiration = "9223372036854775808";
    parse_bad_n(min, strlen(min), &p, "expiration", "expiration: must be a whole number");
}
END_TEST

/* ---- errors ------------------------------------------------------------ */

START_TEST(test_type_errors)
{
    static const struct { const char *field, *value, *message; } cases[] = {
        {"task_id", "42", "task_id: must be a UUID like 0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f (got number)"},
        {"user_id", "7", "user_id: must be a string of 1 to 128 bytes (got number)"},
        {"goal", "1", "goal: must be a string of 1 to 262144 bytes (got number)"},
        {"goal", "null", "goal: must be a string of 1 to 262144 bytes (got null)"},
        {"max_steps", "\"5\"", "max_steps: must be an integer from 1 to 100 (got string)"},
        {"max_steps", "3.0", "max_steps: must be an integer from 1 to 100 (got 3.0)"},
        {"max_steps", "1e1", "max_steps: must be an integer from 1 to 100 (got 10.0)"},
        {"max_steps", "true", "max_steps: must be an integer from 1 to 100 (got boolean)"},
        {"budget_usd", "\"1\"", "budget_usd: must be a number >= 0 (got string)"},
        {"timeout_seconds", "null", "timeout_seconds: must be a number > 0 and <= 86400 (got null)"},
        {"skills", "\"calculator\"", "skills: must be an array of skill names (got string)"},
        {"skills", "[\"weather\",1]", "skills[1]: must be a skill name string (got number)"},
        {"skills", "[{}]", "skills[0]: must be a skill name string (got object)"},
        {"model", "5", "model: must be a model name string (got number)"},
        {"model", "null", "model: must be a model name string (got null)"},
        {"metadata", "[1]", "metadata: must be an object (got array)"},
        {"metadata", "\"{}\"", "metadata: must be an object (got string)"},
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(cases); i++) {
        char body[256];
        if (strcmp(cases[i].field, "user_id") == 0)
            snprintf(body, sizeof body, "{\"user_id\":%s,\"goal\":\"g\"}", cases[i].value);
        else if (strcmp(cases[i].field, "goal") == 0)
            snprintf(body, sizeof body, "{\"user_id\":\"u\",\"goal\":%s}", cases[i].value);
        else
            snprintf(body, sizeof body, "{\"user_id\":\"u\",\"goal\":\"g\",\"%s\":%s}",
                     cases[i].field, cases[i].value);
        aq_task_error e = parse_bad(body, cases[i].field, "");
        ck_assert_str_eq(e.message, cases[i].message);
    }
}
END_TEST

START_TEST(test_bad_task_id)
{
    parse_bad("{\"task_id\":\"abc\",\"user_id\":\"u\",\"goal\":\"g\"}", "task_id",
              "task_id: must be a UUID like 0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f (got 'abc')");
    parse_bad("{\"task_id\":\"0b9e2a4c6c1e4d2a9f3b7d8e5a1c2b3f\",\"user_id\":\"u\",\"goal\":\"g\"}",
              "task_id", "(got '0b9e2a4c6c1e4d2a9f3b7d8e5a1c2b3f')");
    parse_bad("{\"task_id\":\"{0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f}\",\"user_id\":\"u\",\"goal\":\"g\"}",
              "task_id", "must be a UUID");
}
END_TEST

START_TEST(test_missing_fields)
{
    aq_task_error e = parse_bad("{\"goal\":\"g\"}", "user_id", "");
    ck_assert_str_eq(e.message, "user_id: required field is missing");
    e = parse_bad("{\"user_id\":\"u\"}", "goal", "");
    ck_assert_str_eq(e.message, "goal: required field is missing");
    parse_bad("{}", "user_id", "user_id: required field is missing");
}
END_TEST

START_TEST(test_unknown_field)
{
    aq_task_error e = parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"foo\":1}", "foo", "");
    ck_assert_msg(strncmp(e.message, "unknown field 'foo'", 19) == 0, "%s", e.message);
    /* names are case-sensitive, and unknown fields are reported first */
    parse_bad("{\"user_id\":\"u\",\"Goal\":\"g\"}", "Goal", "unknown field 'Goal'");
    parse_bad("{\"max_steps\":0,\"priority\":3}", "priority", "unknown field 'priority'");
    /* a hostile name is cut short and made printable */
    e = parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"a\\nb\\u0007c\":1}", "a?b?c",
                  "unknown field 'a?b?c'");
    parse_bad("{\"\":1}", "(empty name)", "unknown field ''");
    char body[400];
    char key[201];
    memset(key, 'k', 200);
    key[200] = '\0';
    snprintf(body, sizeof body, "{\"%s\":1}", key);
    e = parse_bad(body, "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...", "kkk...'");
}
END_TEST

START_TEST(test_not_json)
{
    aq_task_error e = parse_bad("{\"user_id\":", "body", "body is not valid JSON: ");
    ck_assert_msg(strstr(e.message, " at line 1 column 11"), "%s", e.message);
    parse_bad("hello", "body", "body is not valid JSON: ");
    parse_bad("{} x", "body", "body is not valid JSON: end of file expected");
    parse_bad_n(NULL, 0, NULL, "body", "body is not valid JSON: the body is empty");
    parse_bad("{\"user_id\":\"u\",\n\"goal\":\"g\",}", "body", "at line 2 column");
}
END_TEST

START_TEST(test_top_level_not_object)
{
    parse_bad("[]", "body", "body: must be a JSON object (got array)");
    parse_bad("42", "body", "body: must be a JSON object (got number)");
    parse_bad("\"task\"", "body", "body: must be a JSON object (got string)");
    parse_bad("null", "body", "body: must be a JSON object (got null)");
}
END_TEST

START_TEST(test_invalid_utf8)
{
    /* a raw 0xff, an overlong '/', a lone surrogate escape */
    const char *bodies[] = {
        "{\"user_id\":\"u\",\"goal\":\"a\xff\"}",
        "{\"user_id\":\"u\",\"goal\":\"\xc0\xaf\"}",
        "{\"user_id\":\"u\",\"goal\":\"\\ud800\"}",
        "{\"user_id\":\"u\xed\xa0\x80\",\"goal\":\"g\"}",
    };
    for (size_t i = 0; i < AQ_ARRAY_LEN(bodies); i++) {
        /* bytes that are not UTF-8 say so; an escape naming no character
         * is a JSON error */
        aq_task_error e = parse_bad(bodies[i], "body", i == 2 ? "body is not valid JSON: " : "body is not valid UTF-8: ");
        /* jansson quotes the bad bytes; the message must not carry them */
        ck_assert_msg(printable_utf8(e.message), "%s", e.message);
    }
    /* a json_t built in memory without checks is caught too */
    json_t *body = json_pack("{s:s}", "user_id", "u");
    json_object_set_new(body, "goal", json_stringn_nocheck("a\xff", 2));
    aq_task *t;
    aq_task_error e;
    ck_assert_int_eq(aq_task_from_json(body, NULL, &LIM, &t, &e), AQ_EINVAL);
    ck_assert_str_eq(e.message, "goal: must be valid UTF-8");
    json_object_set_new(body, "goal", json_stringn("a\0b", 3));
    ck_assert_int_eq(aq_task_from_json(body, NULL, &LIM, &t, &e), AQ_EINVAL);
    ck_assert_str_eq(e.message, "goal: must not contain NUL characters");
    json_decref(body);
    parse_bad("{\"user_id\":\"u\",\"goal\":\"a\\u0000b\"}", "body", "body is not valid JSON");
}
END_TEST

START_TEST(test_duplicate_keys)
{
    parse_bad("{\"user_id\":\"a\",\"user_id\":\"b\",\"goal\":\"g\"}", "body",
              "duplicate object key");
    parse_bad("{\"user_id\":\"a\",\"goal\":\"g\",\"metadata\":{\"x\":1,\"x\":2}}", "body",
              "duplicate object key");
}
END_TEST

START_TEST(test_unknown_skill_and_model)
{
    aq_task_error e = parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[\"calculator\",\"teleport\"]}",
                                "skills", "");
    ck_assert_str_eq(e.message, "skills: 'teleport' is not a configured skill "
                     "(configured: calculator,http_get,current_time,weather)");
    parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[\"weather\",\"weather\"]}",
              "skills", "skills: 'weather' is listed more than once");
    parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[\"\"]}",
              "skills", "skills[0]: must be a skill name (got an empty string)");
    /* entries of the configured list are whole names, not prefixes */
    parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[\"calc\"]}",
              "skills", "'calc' is not a configured skill");
    e = parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"model\":\"gpt-5\"}", "model", "");
    ck_assert_str_eq(e.message, "model: 'gpt-5' is not a configured model "
                     "(configured: gpt-4o-mini, llama3)");
    parse_bad("{\"user_id\":\"u\",\"goal\":\"g\",\"model\":\"\"}", "model",
              "model: must be a model name (got an empty string)");
}
END_TEST

START_TEST(test_bad_expiration)
{
    const char *min = "{\"user_id\":\"u\",\"goal\":\"g\"}";
    const char *bad[] = {"abc", "-5", "", "12a", " 12", "1.5"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(bad); i++) {
        aq_task_props p = {.expiration = bad[i]};
        aq_task_error e = parse_bad_n(min, strlen(min), &p, "expiration", "");
        char want[128];
        snprintf(want, sizeof want,
                 "expiration: must be a whole number of milliseconds (got '%s')", bad[i]);
        ck_assert_str_eq(e.message, want);
    }
}
END_TEST

START_TEST(test_error_carries_task_id)
{
    /* the worker records a rejected task under the id the message names */
    aq_task_error e = parse_bad("{\"task_id\":\"0B9E2A4C-6C1E-4D2A-9F3B-7D8E5A1C2B3F\",\"goal\":\"g\"}",
                                "user_id", "required");
    ck_assert_str_eq(e.task_id, "0b9e2a4c-6c1e-4d2a-9f3b-7d8e5a1c2b3f");
    aq_task_props p = {.message_id = "11111111-2222-4333-8444-555555555555"};
    e = parse_bad_n("not json", 8, &p, "body", "not valid JSON");
    ck_assert_str_eq(e.task_id, "11111111-2222-4333-8444-555555555555");
    e = parse_bad_n("{\"task_id\":\"nope\"}", 18, &p, "task_id", "must be a UUID");
    ck_assert_str_eq(e.task_id, "");
    e = parse_bad("{\"goal\":\"g\"}", "user_id", "required");
    ck_assert_str_eq(e.task_id, "");
}
END_TEST

START_TEST(test_null_error_buffer)
{
    aq_task *t = (aq_task *)1;
    ck_assert_int_eq(aq_task_parse("[", 1, NULL, &LIM, &t, NULL), AQ_EINVAL);
    ck_assert_ptr_null(t);
    ck_assert_int_eq(aq_task_parse("{\"skills\":[1]}", 14, NULL, &LIM, &t, NULL), AQ_EINVAL);
    const char *b = "{\"user_id\":\"u\",\"goal\":\"g\",\"skills\":[\"x\"]}";
    ck_assert_int_eq(aq_task_parse(b, strlen(b), NULL, &LIM, &t, NULL), AQ_EINVAL);
}
END_TEST

static Suite *task_suite(void)
{
    const TTest *core[] = {test_defaults, test_all_fields, test_task_id_sources, test_props,
                           test_round_trip, test_from_json_copies_metadata,
                           test_body_not_nul_terminated, test_unchecked_names, test_uuid};
    const TTest *limits[] = {test_max_steps_bounds, test_budget_bounds, test_timeout_bounds,
                             test_wait_timeout_bounds, test_user_id_bounds, test_goal_bounds,
                             test_skills_bounds, test_priority_clamp, test_expiration_bounds};
    const TTest *errors[] = {test_type_errors, test_bad_task_id, test_missing_fields,
                             test_unknown_field, test_not_json, test_top_level_not_object,
                             test_invalid_utf8, test_duplicate_keys, test_unknown_skill_and_model,
                             test_bad_expiration, test_error_carries_task_id,
                             test_null_error_buffer};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core)},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits)},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors)},
    };
    return aq_test_suite("task", tcases, AQ_ARRAY_LEN(tcases));
}

int main(void)
{
    return aq_test_run(task_suite());
}
