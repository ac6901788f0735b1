/* pgbouncer.c — a real PgBouncer for integration tests (see pgbouncer.h). */
#include "pgbouncer.h"
#include "proc.h"
#include "testenv.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <pwd.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agentq/common.h"

struct aq_test_pgbouncer {
    pid_t pid;
    int port;
    char dir[64];  /* its config and auth file until it has read them; "" after */
    char log[512];
};

const char *aq_test_pgbouncer_bin(void)
{
    static char path[512];
    const char *env = getenv("AGENTQ_TEST_PGBOUNCER");
    if (env && *env) return access(env, X_OK) == 0 ? env : NULL;
    if (access("/usr/sbin/pgbouncer", X_OK) == 0) return "/usr/sbin/pgbouncer";
    const char *p = getenv("PATH");
    while (p && *p) {
        size_t n = strcspn(p, ":");
        snprintf(path, sizeof path, "%.*s/pgbouncer", (int)n, p);
        if (n && access(path, X_OK) == 0) return path;
        p += n + (p[n] == ':');
    }
    return NULL;
}

int aq_test_pgbouncer_port(const aq_test_pgbouncer *b) { return b->port; }

static void put_value(char *out, size_t len, size_t *o, const char *v)
{
    *o += (size_t)snprintf(out + *o, *o < len ? len - *o : 0, "'");
    for (; *v; v++) {
        if (*v == '\'' || *v == '\\') *o += (size_t)snprintf(out + *o, *o < len ? len - *o : 0, "\\");
        *o += (size_t)snprintf(out + *o, *o < len ? len - *o : 0, "%c", *v);
    }
    *o += (size_t)snprintf(out + *o, *o < len ? len - *o : 0, "'");
}

/* `dsn` with host and port set to 127.0.0.1:port and dbname to `dbname`
 * when that is not NULL; malloc'd. */
static char *dsn_to(const char *dsn, int port, const char *dbname)
{
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(dsn, &perr);
    ck_assert_msg(opts != NULL, "cannot parse DSN: %s", perr ? perr : "?");
    char out[4096];
    size_t o = 0;
    for (PQconninfoOption *k = opts; k->keyword; k++) {
        if (!k->val || !*k->val || !strcmp(k->keyword, "host") || !strcmp(k->keyword, "hostaddr") ||
            !strcmp(k->keyword, "port") || (dbname && !strcmp(k->keyword, "dbname")))
            continue;
        o += (size_t)snprintf(out + o, o < sizeof out ? sizeof out - o : 0, "%s=", k->keyword);
        put_value(out, sizeof out, &o, k->val);
        o += (size_t)snprintf(out + o, o < sizeof out ? sizeof out - o : 0, " ");
    }
    PQconninfoFree(opts);
    if (dbname) {
        o += (size_t)snprintf(out + o, o < sizeof out ? sizeof out - o : 0, "dbname=");
        put_value(out, sizeof out, &o, dbname);
        o += (size_t)snprintf(out + o, o < sizeof out ? sizeof out - o : 0, " ");
    }
    snprintf(out + o, o < sizeof out ? sizeof out - o : 0, "host=127.0.0.1 port=%d", port);
    ck_assert_msg(o + 32 < sizeof out, "DSN too long");
    return strdup(out);
}

char *aq_test_pgbouncer_dsn(const aq_test_pgbouncer *b, const char *dsn, const char *alias)
{
    return dsn_to(dsn, b->port, alias);
}

const char *aq_test_dsn_dbname(const char *dsn, char *buf, size_t len)
{
    PQconninfoOption *opts = PQconninfoParse(dsn, NULL);
    ck_assert_ptr_nonnull(opts);
    buf[0] = '\0';
    for (PQconninfoOption *k = opts; k->keyword; k++)
        if (!strcmp(k->keyword, "dbname") && k->val) snprintf(buf, len, "%s", k->val);
    PQconninfoFree(opts);
    return buf;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    fputs(text, f);
    ck_assert_int_eq(fclose(f), 0);
    ck_assert_int_eq(chmod(path, 0644), 0);
}

/* The admin console's connection, or NULL if it does not answer yet. */
static PGconn *admin(const aq_test_pgbouncer *b)
{
    char dsn[128];
    snprintf(dsn, sizeof dsn, "host=127.0.0.1 port=%d user=postgres dbname=pgbouncer connect_timeout=2", b->port);
    PGconn *c = PQconnectdb(dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        PQfinish(c);
        return NULL;
    }
    return c;
}

static void remove_dir(aq_test_pgbouncer *b)
{
    if (!b->dir[0]) return;
    char path[128];
    snprintf(path, sizeof path, "%s/pgbouncer.ini", b->dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/users.txt", b->dir);
    unlink(path);
    rmdir(b->dir);
    b->dir[0] = '\0';
}

aq_test_pgbouncer *aq_test_pgbouncer_start(const char *pool_mode, int pool_size, const aq_test_pgb_db *dbs,
                                           size_t n, const char *log_path)
{
    const char *bin = aq_test_pgbouncer_bin();
    ck_assert_msg(bin != NULL, "pgbouncer is not installed (scripts/install-deps)");
    const char *pg_host = aq_test_env_require("AGENTQ_TEST_PG_HOST");
    const char *pg_port = aq_test_env_require("AGENTQ_TEST_PG_PORT");
    aq_test_pgbouncer *b = calloc(1, sizeof *b);
    ck_assert_ptr_nonnull(b);
    snprintf(b->log, sizeof b->log, "%s", log_path);
    /* /tmp, not the build tree: the postgres user must read it. */
    snprintf(b->dir, sizeof b->dir, "/tmp/aq-pgbouncer.XXXXXX");
    ck_assert_msg(mkdtemp(b->dir) != NULL, "mkdtemp: %s", strerror(errno));
    ck_assert_int_eq(chmod(b->dir, 0755), 0);

    /* A free port: bound, then let go for pgbouncer to take. */
    int fd = aq_test_loopback_socket(0, &b->port);
    close(fd);

    char ini[4096], path[128], users[128];
    size_t o = (size_t)snprintf(ini, sizeof ini, "[databases]\n");
    for (size_t i = 0; i < n; i++)
        o += (size_t)snprintf(ini + o, sizeof ini - o, "%s = host=%s port=%s dbname=%s pool_size=%d\n", dbs[i].alias,
                              pg_host, pg_port, dbs[i].dbname, dbs[i].pool_size);
    snprintf(users, sizeof users, "%s/users.txt", b->dir);
    o += (size_t)snprintf(ini + o, sizeof ini - o,
                          "* = host=%s port=%s\n"
                          "[pgbouncer]\n"
                          "listen_addr = 127.0.0.1\n"
                          "listen_port = %d\n"
                          "unix_socket_dir =\n"
                          "auth_type = trust\n"
                          "auth_file = %s\n"
                          "admin_users = postgres\n"
                          "pool_mode = %s\n"
                          "default_pool_size = %d\n"
                          "max_client_conn = 500\n"
                          "log_connections = 0\n"
                          "log_disconnections = 0\n",
                          pg_host, pg_port, b->port, users, pool_mode, pool_size);
    ck_assert_msg(o < sizeof ini, "pgbouncer.ini too long");
    snprintf(path, sizeof path, "%s/pgbouncer.ini", b->dir);
    write_file(path, ini);
    write_file(users, "\"postgres\" \"\"\n");

    /* Looked up before the fork: the child calls only what is safe there. */
    struct passwd *pw = getuid() == 0 ? getpwnam("postgres") : NULL;
    ck_assert_msg(getuid() != 0 || pw, "running as root and there is no postgres user to run pgbouncer as");
    uid_t uid = pw ? pw->pw_uid : 0;
    gid_t gid = pw ? pw->pw_gid : 0;
    fflush(NULL);
    pid_t parent = getpid();
    b->pid = fork();
    ck_assert_int_ge(b->pid, 0);
    if (b->pid == 0) {
        setpgid(0, 0);
        int lf = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (lf >= 0) {
            dup2(lf, 1);
            dup2(lf, 2);
        }
        if (uid && (setgroups(0, NULL) != 0 || setgid(gid) != 0 || setuid(uid) != 0)) {
            fprintf(stderr, "cannot become the postgres user: %s\n", strerror(errno));
            _exit(127);
        }
        /* After setuid, which clears it: die with the test. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        execl(bin, bin, path, (char *)NULL);
        fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    for (int waited = 0; waited < 10000; waited += 50) {
        int st;
        if (waitpid(b->pid, &st, WNOHANG) == b->pid) {
            b->pid = 0;
            remove_dir(b);
            aq_test_dump_log(log_path, 20);
            ck_abort_msg("pgbouncer exited at start (status %d)", st);
        }
        PGconn *c = admin(b);
        if (c) {
            PQfinish(c);
            remove_dir(b); /* read at start: nothing is left behind if the test dies */
            return b;
        }
        usleep(50000);
    }
    aq_test_dump_log(log_path, 20);
    ck_abort_msg("pgbouncer did not answer on port %d", b->port);
    return NULL;
}

void aq_test_pgbouncer_pool(const aq_test_pgbouncer *b, const char *db, int *clients, int *servers)
{
    PGconn *c = admin(b);
    ck_assert_msg(c != NULL, "pgbouncer's admin console does not answer");
    PGresult *r = PQexec(c, "SHOW POOLS");
    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "SHOW POOLS: %s", PQerrorMessage(c));
    static const char *const cl[] = {"cl_active", "cl_waiting"};
    static const char *const sv[] = {"sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"};
    *clients = *servers = 0;
    int dbcol = PQfnumber(r, "database");
    for (int i = 0; i < PQntuples(r); i++) {
        if (strcmp(PQgetvalue(r, i, dbcol), db)) continue;
        for (size_t k = 0; k < AQ_ARRAY_LEN(cl); k++)
            if (PQfnumber(r, cl[k]) >= 0) *clients += atoi(PQgetvalue(r, i, PQfnumber(r, cl[k])));
        for (size_t k = 0; k < AQ_ARRAY_LEN(sv); k++)
            if (PQfnumber(r, sv[k]) >= 0) *servers += atoi(PQgetvalue(r, i, PQfnumber(r, sv[k])));
    }
    PQclear(r);
    PQfinish(c);
}

void aq_test_pgbouncer_stop(aq_test_pgbouncer *b)
{
    if (!b) return;
    if (b->pid > 0) {
        kill(b->pid, SIGTERM);
        int st;
        bool gone = false;
        for (int waited = 0; waited < 3000 && !gone; waited += 20) {
            gone = waitpid(b->pid, &st, WNOHANG) == b->pid;
            if (!gone) usleep(20000);
        }
        if (!gone) {
            kill(b->pid, SIGKILL);
            waitpid(b->pid, &st, 0);
        }
    }
    remove_dir(b);
    free(b);
}
