/* proc.c — see proc.h. */
#include "proc.h"
#include "testenv.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct aq_test_proc {
    pid_t pid;
    int status;
    bool exited;
};

aq_test_proc *aq_test_spawn(const char *const *argv, const char *const *env, const char *log_path)
{
    aq_test_proc *p = calloc(1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    fflush(NULL);
    pid_t parent = getpid();
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        /* Die with the test: a failed assertion exits the test process
         * without running any teardown, and must not leave a worker or a
         * mock behind. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        setpgid(0, 0);
        int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        for (size_t i = 0; env && env[i]; i++) putenv((char *)env[i]);
        execv(argv[0], (char *const *)argv);
        fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    p->pid = pid;
    return p;
}

void aq_test_proc_signal(aq_test_proc *p, int sig)
{
    if (!p->exited) kill(p->pid, sig);
}

int aq_test_proc_wait(aq_test_proc *p, int timeout_ms)
{
    for (int waited = 0;; waited += 20) {
        if (p->exited) break;
        int st;
        pid_t r = waitpid(p->pid, &st, WNOHANG);
        if (r == p->pid) {
            p->exited = true;
            p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            break;
        }
        if (waited >= timeout_ms) return -1;
        usleep(20000);
    }
    return p->status;
}

pid_t aq_test_proc_pid(const aq_test_proc *p) { return p->pid; }

void aq_test_proc_free(aq_test_proc *p)
{
    if (!p) return;
    if (!p->exited) {
        kill(p->pid, SIGKILL);
        aq_test_proc_wait(p, 5000);
    }
    free(p);
}

aq_test_proc *aq_test_start_mock(const char *const *flags, const char *log_path, int *port)
{
    char port_file[256];
    snprintf(port_file, sizeof port_file, "%s.port", log_path);
    unlink(port_file);
    const char *argv[32];
    int n = 0;
    argv[n++] = aq_test_bin("agentq-mockllm");
    argv[n++] = "--listen";
    argv[n++] = "127.0.0.1:0";
    argv[n++] = "--port-file";
    argv[n++] = port_file;
    for (size_t i = 0; flags && flags[i] && n < 30; i++) argv[n++] = flags[i];
    argv[n] = NULL;
    aq_test_proc *p = aq_test_spawn(argv, NULL, log_path);
    for (int i = 0; i < 250; i++) {
        FILE *f = fopen(port_file, "r");
        if (f) {
            int v = 0;
            int ok = fscanf(f, "%d", &v);
            fclose(f);
            if (ok == 1 && v > 0) {
                *port = v;
                return p;
            }
        }
        usleep(20000);
    }
    aq_test_dump_log(log_path, 20);
    ck_abort_msg("agentq-mockllm did not start");
    return NULL;
}

bool aq_test_pg_wait_value(const char *dsn, const char *sql, const char *want, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 50) {
        char *v = aq_test_pg_value(dsn, sql);
        bool eq = v && !strcmp(v, want);
        free(v);
        if (eq) return true;
        usleep(50000);
    }
    return false;
}

void aq_test_dump_log(const char *path, int lines)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "tail -n %d '%s' >&2", lines, path);
    fprintf(stderr, "---- %s ----\n", path);
    if (system(cmd) != 0) fprintf(stderr, "(no log)\n");
}
