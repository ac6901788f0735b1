/* check_log.c — log lines are JSON, carry the ids, and never a secret. */
#include "agentq/log.h"

#include <check.h>
#include "suite.h"
#include "testenv.h"
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Runs one log call with the logger pointed at a pipe; returns the line. */
static char line[16384];

static void capture_begin(int fds[2])
{
    ck_assert_int_eq(pipe(fds), 0);
    aq_log_set_fd(fds[1]);
}

static json_t *capture_end(int fds[2])
{
    close(fds[1]);
    ssize_t n = read(fds[0], line, sizeof line - 1);
    close(fds[0]);
    aq_log_set_fd(2);
    ck_assert_int_gt(n, 0);
    line[n] = '\0';
    ck_assert_int_eq(line[n - 1], '\n');
    json_error_t jerr;
    json_t *j = json_loads(line, 0, &jerr);
    ck_assert_msg(j != NULL, "not JSON: %s (%s)", line, jerr.text);
    return j;
}

START_TEST(json_line_with_ids)
{
    int fds[2];
    aq_log_set_worker_id("w-1");
    capture_begin(fds);
    aq_log_task(AQ_LOG_WARN, "t-9", "alice", "quote \" and newline \n and tab \t %d", 42);
    json_t *j = capture_end(fds);
    ck_assert_str_eq(json_string_value(json_object_get(j, "level")), "warn");
    ck_assert_str_eq(json_string_value(json_object_get(j, "msg")), "quote \" and newline \n and tab \t 42");
    ck_assert_str_eq(json_string_value(json_object_get(j, "worker_id")), "w-1");
    ck_assert_str_eq(json_string_value(json_object_get(j, "task_id")), "t-9");
    ck_assert_str_eq(json_string_value(json_object_get(j, "user_id")), "alice");
    ck_assert_ptr_nonnull(json_object_get(j, "ts"));
    json_decref(j);
    aq_log_set_worker_id(NULL);
}
END_TEST

static int evaluated;
static int touch(void) { return ++evaluated; }

START_TEST(below_level_not_evaluated)
{
    aq_log_set_level(AQ_LOG_WARN);
    evaluated = 0;
    aq_log(AQ_LOG_DEBUG, "%d", touch());
    ck_assert_int_eq(evaluated, 0);
    aq_log_set_level(AQ_LOG_INFO);
}
END_TEST

START_TEST(secrets_masked)
{
    int fds[2];
    aq_log_add_secret("sk-live-abcdef123456");
    capture_begin(fds);
    aq_log(AQ_LOG_ERROR, "key sk-live-abcdef123456 url amqp://bob:hunter2@host:5672/%%2f dsn host=db password=pw123 user=x");
    json_t *j = capture_end(fds);
    const char *msg = json_string_value(json_object_get(j, "msg"));
    ck_assert_ptr_null(strstr(msg, "sk-live-abcdef123456"));
    ck_assert_ptr_null(strstr(msg, "hunter2"));
    ck_assert_ptr_null(strstr(msg, "pw123"));
    ck_assert_ptr_nonnull(strstr(msg, "amqp://bob:***@host"));
    ck_assert_ptr_nonnull(strstr(msg, "user=x"));
    json_decref(j);
}
END_TEST

START_TEST(redact_keeps_plain_text)
{
    char out[128];
    aq_log_redact("http://host:8080/v1 ratio 3:2", out, sizeof out);
    ck_assert_str_eq(out, "http://host:8080/v1 ratio 3:2");
    aq_log_redact("password='a b\\'c' next", out, sizeof out);
    ck_assert_str_eq(out, "password=*** next");
}
END_TEST

START_TEST(long_message_truncated_still_json)
{
    int fds[2];
    static char big[20000];
    memset(big, 'x', sizeof big - 1);
    capture_begin(fds);
    aq_log(AQ_LOG_INFO, "%s", big);
    json_t *j = capture_end(fds);
    ck_assert_ptr_nonnull(json_object_get(j, "msg"));
    json_decref(j);
}
END_TEST

/* Stored text: the registered secret in every spelling JSON gives it,
 * through NULs, and nothing else touched. */
/* The hot path's test: true exactly when masking would change the text. */
START_TEST(has_secret_says_when_masking_changes_the_text)
{
    ck_assert(!aq_log_has_secret("nothing registered yet: sk-abc-123", 34));
    ck_assert_int_eq(aq_log_add_secret("sk-abc-123"), AQ_OK);
    static const char *const texts[] = {"plain text", "key sk-abc-123 inside", "escaped sk-abc-123\" tail",
                                        "cut off at the end: sk-ab", "sk-a", "sk-", ""};
    for (size_t i = 0; i < AQ_ARRAY_LEN(texts); i++) {
        size_t len = strlen(texts[i]), n;
        char *m = aq_log_mask_secrets(texts[i], len, &n);
        bool changed = n != len || memcmp(m, texts[i], len) != 0;
        ck_assert_msg(aq_log_has_secret(texts[i], len) == changed, "'%s': has_secret says %d", texts[i], !changed);
        free(m);
    }
    ck_assert(aq_log_has_secret("key sk-abc-123 inside", 21));
    ck_assert(!aq_log_has_secret("plain text", 10));
}
END_TEST

START_TEST(mask_secrets_stored_text)
{
    ck_assert_int_eq(aq_log_add_secret("sk-live-0123/abcd\"ef"), AQ_OK);
    static const char in[] =
        "raw sk-live-0123/abcd\"ef, jansson sk-live-0123/abcd\\\"ef, "
        "php sk-live-0123\\/abcd\\\"ef\0after NUL sk-live-0123/abcd\"ef; "
        "kept: amqp://bob:hunter2@host password=pw123 ***";
    size_t n = 0;
    char *out = aq_log_mask_secrets(in, sizeof in - 1, &n);
    static const char want[] = "raw ***, jansson ***, php ***\0after NUL ***; "
                               "kept: amqp://bob:hunter2@host password=pw123 ***";
    ck_assert_uint_eq(n, sizeof want - 1);
    ck_assert_int_eq(memcmp(out, want, n), 0);
    ck_assert_int_eq(out[n], '\0');
    free(out);
    /* nothing registered matches: a plain copy */
    out = aq_log_mask_secrets("plain text", 10, NULL);
    ck_assert_str_eq(out, "plain text");
    free(out);
    out = aq_log_mask_secrets("", 0, &n);
    ck_assert_str_eq(out, "");
    ck_assert_uint_eq(n, 0);
    free(out);
}
END_TEST

/* A secret cut off at the end of a text (by some length limit upstream) is
 * masked too, down to 4 bytes; the longest registered secret wins. */
START_TEST(secret_cut_off_and_longest)
{
    ck_assert_int_eq(aq_log_add_secret("sk-proj-abcdefghijkl"), AQ_OK);
    ck_assert_int_eq(aq_log_add_secret("sk-proj-abcd"), AQ_OK);
    char out[256];
    aq_log_redact("key: sk-proj-abcdefghijkl.", out, sizeof out);
    ck_assert_str_eq(out, "key: ***."); /* not "***efghijkl." */
    aq_log_redact("cut at the end: sk-proj-abcdefg", out, sizeof out);
    ck_assert_str_eq(out, "cut at the end: ***");
    aq_log_redact("four bytes: sk-p", out, sizeof out);
    ck_assert_str_eq(out, "four bytes: ***");
    aq_log_redact("three bytes: sk-", out, sizeof out);
    ck_assert_str_eq(out, "three bytes: sk-");
    aq_log_redact("sk-proj-abcdefghijkX in the middle is not cut", out, sizeof out);
    ck_assert_str_eq(out, "***efghijkX in the middle is not cut");
    char *m = aq_log_mask_secrets("Incorrect API key provided: sk-proj-abcde", 41, NULL);
    ck_assert_str_eq(m, "Incorrect API key provided: ***");
    free(m);

    /* a log line cut at its length limit in the middle of the key */
    int fds[2];
    static char big[4096 + 64];
    memset(big, 'x', sizeof big);
    memcpy(big + 4095 - 10, "sk-proj-abcdefghijkl", 20); /* "sk-proj-ab" survives the cut */
    big[sizeof big - 1] = '\0';
    capture_begin(fds);
    aq_log(AQ_LOG_INFO, "%s", big);
    json_t *j = capture_end(fds);
    const char *msg = json_string_value(json_object_get(j, "msg"));
    ck_assert_ptr_null(strstr(msg, "sk-proj"));
    ck_assert_ptr_nonnull(strstr(msg, "xxx***"));
    json_decref(j);
}
END_TEST

START_TEST(add_secret_limits)
{
    ck_assert_int_eq(aq_log_add_secret(NULL), AQ_EINVAL);
    ck_assert_int_eq(aq_log_add_secret(""), AQ_EINVAL);
    ck_assert_int_eq(aq_log_add_secret("abc"), AQ_EINVAL);
    char out[64];
    aq_log_redact("abc", out, sizeof out);
    ck_assert_str_eq(out, "abc");
    ck_assert_int_eq(aq_log_add_secret("abcd"), AQ_OK);
    ck_assert_int_eq(aq_log_add_secret("abcd"), AQ_OK); /* again: still fine */
    int rc = AQ_OK, added = 0;
    for (int i = 0; i < 100 && rc == AQ_OK; i++) {
        char sec[32];
        snprintf(sec, sizeof sec, "key/%02d/secret", i); /* three forms each */
        rc = aq_log_add_secret(sec);
        if (rc == AQ_OK) added++;
    }
    ck_assert_int_eq(rc, AQ_ENOMEM);
    ck_assert_int_ge(added, 15);
    ck_assert_int_eq(aq_log_add_secret("abcd"), AQ_OK); /* known ones still are */
    aq_log_redact("key/00/secret abcd", out, sizeof out);
    ck_assert_str_eq(out, "*** ***");
}
END_TEST

START_TEST(level_names)
{
    ck_assert_int_eq(aq_log_level_parse("debug"), AQ_LOG_DEBUG);
    ck_assert_int_eq(aq_log_level_parse("WARNING"), AQ_LOG_WARN);
    ck_assert_int_eq(aq_log_level_parse("error"), AQ_LOG_ERROR);
    ck_assert_int_eq(aq_log_level_parse("loud"), -1);
}
END_TEST

int main(void)
{
    const TTest *core[] = {json_line_with_ids, below_level_not_evaluated, secrets_masked,
                           redact_keeps_plain_text, mask_secrets_stored_text,
                           has_secret_says_when_masking_changes_the_text,
                           secret_cut_off_and_longest};
    const TTest *limits[] = {long_message_truncated_still_json, add_secret_limits};
    const TTest *errors[] = {level_names};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core)},
        {.name = "limits", .tests = limits, .n_tests = AQ_ARRAY_LEN(limits)},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors)},
    };
    return aq_test_run(aq_test_suite("log", tcases, AQ_ARRAY_LEN(tcases)));
}
