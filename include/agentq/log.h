/* log.h — JSON-lines logging on stderr.
 *
 * Each line is one JSON object: {"ts","level","msg"} plus "worker_id",
 * "task_id" and "user_id" where known. A line is written with one write(2),
 * so lines from several threads never interleave.
 *
 * Secrets never reach a line: every string registered with
 * aq_log_add_secret() is replaced by "***" wherever it appears — as itself
 * or JSON-escaped ("\/" for "/", as some servers write it), and also when
 * a text ends in its first bytes (a secret cut off by a length limit) —
 * and the password part of any URL (scheme://user:PASSWORD@host) or libpq
 * `password=` setting in a message is masked as well. Register API keys
 * and connection-string passwords at start-up; registering is safe
 * against threads that log at the same time.
 *
 * Text that is stored rather than logged (a provider's error in a task
 * row, a step's detail) goes through aq_log_mask_secrets(): the same
 * registered secrets, and nothing else changed.
 *
 * The macros do not evaluate their arguments below the current level. */
#ifndef AGENTQ_LOG_H
#define AGENTQ_LOG_H

#include "agentq/common.h"

typedef enum {
    AQ_LOG_DEBUG = 0,
    AQ_LOG_INFO,
    AQ_LOG_WARN,
    AQ_LOG_ERROR,
    AQ_LOG_FATAL,
} aq_log_level;

extern int aq__log_min_level;

/* Parses "debug", "info", "warn"/"warning", "error"; returns -1 if unknown. */
int aq_log_level_parse(const char *name);
const char *aq_log_level_name(aq_log_level level);
void aq_log_set_level(aq_log_level level);
/* Copies `id`; NULL clears it. */
void aq_log_set_worker_id(const char *id);
/* Copies `secret` (and its JSON-escaped forms) into the process-wide list
 * of masked strings. Returns AQ_OK (also when it was registered already),
 * AQ_EINVAL for NULL or a string shorter than 4 bytes (masking "a"
 * everywhere would garble every line), AQ_ENOMEM when the list (64 forms)
 * is full; the secret is not masked then. */
int aq_log_add_secret(const char *secret);
/* Sends lines to `fd` instead of stderr (tests). */
void aq_log_set_fd(int fd);

/* Masks secrets (registered ones, URL and DSN passwords) in `in`, writing
 * a NUL-terminated result of at most outlen bytes into `out`. */
void aq_log_redact(const char *in, char *out, size_t outlen);

/* Masks the registered secrets — and nothing else — in in[0..len) (which
 * need not be NUL-terminated and may hold NULs), in full: no length limit,
 * no URL or DSN heuristics, so text that is stored (a model's answer with
 * a sample connection string, JSON) keeps its meaning. Returns a
 * NUL-terminated copy, never longer than `len`, that the caller frees with
 * free(); its length goes to *out_len when out_len is not NULL. */
char *aq_log_mask_secrets(const char *in, size_t len, size_t *out_len);

/* True if `len` bytes of `in` hold a registered secret (or a cut-off tail
 * of one) that aq_log_mask_secrets would mask: callers on a hot path copy
 * a text only when it needs masking. */
bool aq_log_has_secret(const char *in, size_t len);

void aq__log(aq_log_level level, const char *task_id, const char *user_id,
             const char *fmt, ...) AQ_PRINTF(4, 5);

#define aq_log(level, ...)                                                   \
    do {                                                                     \
        if ((int)(level) >= aq__log_min_level)                               \
            aq__log((level), NULL, NULL, __VA_ARGS__);                       \
    } while (0)

/* The same, with the task's ids attached (either may be NULL). */
#define aq_log_task(level, task_id, user_id, ...)                            \
    do {                                                                     \
        if ((int)(level) >= aq__log_min_level)                               \
            aq__log((level), (task_id), (user_id), __VA_ARGS__);             \
    } while (0)

#endif
