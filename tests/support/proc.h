/* proc.h — child processes for integration tests: the real agentq
 * programs, started with their own environment, logged to a file, signalled
 * and reaped. A process still running when its handle is freed is killed. */
#ifndef AGENTQ_TEST_PROC_H
#define AGENTQ_TEST_PROC_H

#include <stdbool.h>
#include <sys/types.h>

typedef struct aq_test_proc aq_test_proc;

/* Starts argv[0] (a path) with the current environment plus `env`
 * ("KEY=VALUE" strings, NULL-terminated, may be NULL); stdout and stderr
 * go to `log_path`. Fails the current test if it cannot start. */
aq_test_proc *aq_test_spawn(const char *const *argv, const char *const *env, const char *log_path);

/* Sends `sig`. */
void aq_test_proc_signal(aq_test_proc *p, int sig);

/* Waits up to timeout_ms for the process to exit; returns its exit status
 * (or 128 + signal), or -1 if it is still running. */
int aq_test_proc_wait(aq_test_proc *p, int timeout_ms);

pid_t aq_test_proc_pid(const aq_test_proc *p);

/* Kills (SIGKILL) if still running, reaps, frees. */
void aq_test_proc_free(aq_test_proc *p);

/* Starts agentq-mockllm on a free port with extra flags (NULL-terminated,
 * may be NULL) and waits until it listens; *port receives the port. */
aq_test_proc *aq_test_start_mock(const char *const *flags, const char *log_path, int *port);

/* Polls `sql` on `dsn` every 50 ms until its first value equals `want`
 * (text), for up to timeout_ms. Returns true if it did. */
bool aq_test_pg_wait_value(const char *dsn, const char *sql, const char *want, int timeout_ms);

/* Dumps the tail of a log file to stderr (for a failing test's output). */
void aq_test_dump_log(const char *path, int lines);

#endif
