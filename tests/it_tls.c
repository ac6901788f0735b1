/* it_tls.c — TLS to every peer, verified: the broker (amqps://, a client
 * certificate), PostgreSQL (sslmode=verify-full) and HTTPS through the
 * shared HTTP client (llm.ca_file), with a throw-away CA.
 *
 * It starts servers of its own, in a temp dir on free ports, so it shares
 * nothing with the `servers` fixture (whose env file it reads only for the
 * PostgreSQL binaries): a RabbitMQ with a TLS listener only (plain TCP
 * off) that wants a client certificate, a PostgreSQL with ssl = on that
 * takes TCP clients over TLS only (hostssl), and, per test, `openssl
 * s_server` for certificates a real server should not have and a small
 * TLS terminator in front of the mock LLM. RabbitMQ and PostgreSQL start
 * once, in main(), before the tests fork; they get a parent-death signal,
 * so a killed test run does not leave them behind.
 *
 * The certificates: a CA; a server certificate for localhost (DNS and
 * 127.0.0.1) that RabbitMQ, PostgreSQL and the terminator serve; one for
 * wrong.example, signed by the same CA; a client certificate (and its key
 * encrypted, for the config check); and another CA that signed nothing we
 * serve. */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/http.h"
#include "agentq/migrate.h"
#include "proc.h"
#include "suite.h"
#include "testenv.h"

#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <glob.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define BOOT_TIMEOUT_S 60

static struct {
    char dir[64];
    char failed[1024]; /* why the servers did not start; "" when they did */
    int amqp_port, pg_port, epmd_port;
    pid_t epmd, rabbit, pg;
    char pg_dsn[512]; /* superuser, database postgres, verify-full */
} S;

/* DIR/name in one of 8 rotating buffers: enough for the arguments of one
 * call, not for keeping (copy it). */
static const char *in_dir(const char *name)
{
    static char bufs[8][256];
    static int next;
    char *b = bufs[next++ % 8];
    snprintf(b, sizeof bufs[0], "%s/%s", S.dir, name);
    return b;
}

/* Records why the servers are not there (the first reason wins); false. */
static bool fail_setup(const char *fmt, ...) AQ_PRINTF(1, 2);
static bool fail_setup(const char *fmt, ...)
{
    if (*S.failed) return false;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(S.failed, sizeof S.failed, fmt, ap);
    va_end(ap);
    return false;
}

static void require_servers(void) { ck_assert_msg(!*S.failed, "TLS test servers: %s", S.failed); }

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) {
        if (fd >= 0) close(fd);
        return 0;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static bool port_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (fd >= 0) close(fd);
    return ok;
}

static bool wait_port(int port, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        if (port_open(port)) return true;
        usleep(50000);
    }
    return port_open(port);
}

static bool write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f) return false;
    bool ok = fputs(text, f) >= 0;
    return fclose(f) == 0 && ok;
}

/* Copies src to dst with `mode`, owned by uid (when >= 0). */
static bool copy_file(const char *src, const char *dst, mode_t mode, int uid, int gid)
{
    char buf[65536];
    FILE *in = fopen(src, "r");
    if (!in) return false;
    size_t n = fread(buf, 1, sizeof buf, in);
    fclose(in);
    int fd = open(dst, O_WRONLY | O_CREAT | O_TRUNC, mode);
    if (fd < 0) return false;
    bool ok = write(fd, buf, n) == (ssize_t)n && fchmod(fd, mode) == 0;
    if (uid >= 0 && fchown(fd, (uid_t)uid, (gid_t)gid)) ok = false;
    return close(fd) == 0 && ok;
}

/* Starts argv[0] with the current environment plus `env`, output to
 * `log`, as uid/gid when uid >= 0, with `deathsig` sent to it should this
 * process die first (servers must not outlive the test run). */
static pid_t spawn(const char *const *argv, const char *const *env, const char *log, int uid, int gid,
                   int deathsig)
{
    fflush(NULL);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0) return pid;
    setpgid(0, 0);
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    int nul = open("/dev/null", O_RDONLY);
    if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
    }
    if (nul >= 0) dup2(nul, 0);
    for (size_t i = 0; env && env[i]; i++) putenv((char *)env[i]);
    if (uid >= 0 && (setgid((gid_t)gid) || setuid((uid_t)uid))) _exit(126);
    /* After the uid change, which would clear it. */
    prctl(PR_SET_PDEATHSIG, deathsig);
    if (getppid() != parent) _exit(127);
    execv(argv[0], (char *const *)argv);
    fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* Runs argv to completion; returns its exit status or -1. */
static int run(const char *const *argv, const char *log, int uid, int gid)
{
    pid_t pid = spawn(argv, NULL, log, uid, gid, SIGKILL);
    int st;
    if (pid < 0 || waitpid(pid, &st, 0) != pid) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void stop(pid_t *pid, int sig)
{
    if (*pid <= 0) return;
    kill(*pid, sig);
    for (int i = 0; i < 300; i++) {
        if (waitpid(*pid, NULL, WNOHANG) == *pid) {
            *pid = 0;
            return;
        }
        usleep(50000);
    }
    kill(-*pid, SIGKILL);
    kill(*pid, SIGKILL);
    waitpid(*pid, NULL, 0);
    *pid = 0;
}

/* ------------------------------------------------------ certificates */

static const char CERTS_SH[] =
    "set -e\n"
    "cd \"$1\"\n"
    "key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out \"$1\" 2>/dev/null; }\n"
    "ca() {\n"
    "  key \"$1.key\"\n"
    "  openssl req -x509 -new -key \"$1.key\" -out \"$1.pem\" -days 2 -subj \"/CN=$2\" \\\n"
    "    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign\n"
    "}\n"
    "leaf() {\n"
    "  key \"$1.key\"\n"
    "  openssl req -new -key \"$1.key\" -out \"$1.csr\" -subj \"/CN=$2\"\n"
    "  printf 'subjectAltName=%s\\nextendedKeyUsage=%s\\nbasicConstraints=CA:FALSE\\n' \"$3\" \"$4\" >\"$1.ext\"\n"
    "  openssl x509 -req -in \"$1.csr\" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \\\n"
    "    -extfile \"$1.ext\" -out \"$1.pem\" 2>/dev/null\n"
    "}\n"
    "ca ca 'agentq test CA'\n"
    "ca other-ca 'some other CA'\n"
    "leaf server localhost DNS:localhost,IP:127.0.0.1 serverAuth\n"
    "leaf wrong wrong.example DNS:wrong.example serverAuth\n"
    "leaf client agentq-worker DNS:agentq-worker clientAuth\n"
    "openssl pkey -in client.key -aes256 -passout pass:secret -out client-encrypted.key\n"
    "chmod 644 *.pem\n";

static bool make_certs(void)
{
    const char *sh = in_dir("certs.sh");
    if (!write_file(sh, CERTS_SH)) return false;
    const char *argv[] = {"/bin/sh", sh, S.dir, NULL};
    return run(argv, in_dir("certs.log"), -1, -1) == 0;
}

/* ---------------------------------------------------------- RabbitMQ */

static const char *find_epmd(void)
{
    static char path[256];
    const char *cands[] = {"/usr/bin/epmd", "/usr/lib/erlang/bin/epmd"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(cands); i++)
        if (access(cands[i], X_OK) == 0) return cands[i];
    glob_t g;
    if (glob("/usr/lib/erlang/erts-*/bin/epmd", 0, NULL, &g) == 0 && g.gl_pathc) {
        snprintf(path, sizeof path, "%s", g.gl_pathv[g.gl_pathc - 1]);
        globfree(&g);
        return path;
    }
    return NULL;
}

static bool start_rabbit(void)
{
    const char *epmd = find_epmd();
    if (!epmd) return fail_setup("%s", "epmd not found (is rabbitmq-server installed?)");
    mkdir(in_dir("rabbit"), 0755);
    mkdir(in_dir("rabbit/home"), 0700);
    mkdir(in_dir("rabbit/mnesia"), 0755);
    mkdir(in_dir("rabbit/log"), 0755);
    char cookie[40];
    snprintf(cookie, sizeof cookie, "TLSCOOKIE%08x%08x", (unsigned)getpid(), (unsigned)random());
    if (!write_file(in_dir("rabbit/home/.erlang.cookie"), cookie) ||
        chmod(in_dir("rabbit/home/.erlang.cookie"), 0400))
        return fail_setup("%s", "cannot write the Erlang cookie");
    char conf[2048];
    /* TLS only: no plain listener, and a client certificate required. */
    snprintf(conf, sizeof conf,
             "listeners.tcp = none\n"
             "listeners.ssl.default = 127.0.0.1:%d\n"
             "ssl_options.cacertfile = %s\n"
             "ssl_options.certfile = %s\n"
             "ssl_options.keyfile = %s\n"
             "ssl_options.verify = verify_peer\n"
             "ssl_options.fail_if_no_peer_cert = true\n"
             "loopback_users = none\n"
             "disk_free_limit.absolute = 10MB\n"
             "log.file.level = info\n"
             "log.console = false\n",
             S.amqp_port, in_dir("ca.pem"), in_dir("server.pem"), in_dir("server.key"));
    if (!write_file(in_dir("rabbit/rabbitmq.conf"), conf) || !write_file(in_dir("rabbit/rabbitmq-env.conf"), "") ||
        !write_file(in_dir("rabbit/enabled_plugins"), "[].\n"))
        return fail_setup("%s", "cannot write the RabbitMQ config");

    char ep[32];
    snprintf(ep, sizeof ep, "%d", S.epmd_port);
    const char *eargv[] = {epmd, "-port", ep, NULL};
    const char *eenv[] = {"ERL_EPMD_ADDRESS=127.0.0.1", NULL};
    S.epmd = spawn(eargv, eenv, in_dir("rabbit/epmd.log"), -1, -1, SIGTERM);
    if (!wait_port(S.epmd_port, 5000)) return fail_setup("epmd did not listen (%s)", in_dir("rabbit/epmd.log"));

    static char env[16][512];
    int n = 0;
    snprintf(env[n++], 512, "HOME=%s", in_dir("rabbit/home"));
    snprintf(env[n++], 512, "RABBITMQ_NODENAME=agentqtls-%d@localhost", S.amqp_port);
    snprintf(env[n++], 512, "RABBITMQ_DIST_PORT=%d", free_port());
    snprintf(env[n++], 512, "ERL_EPMD_PORT=%d", S.epmd_port);
    snprintf(env[n++], 512, "RABBITMQ_MNESIA_BASE=%s", in_dir("rabbit/mnesia"));
    snprintf(env[n++], 512, "RABBITMQ_LOG_BASE=%s", in_dir("rabbit/log"));
    snprintf(env[n++], 512, "RABBITMQ_CONFIG_FILE=%s", in_dir("rabbit/rabbitmq.conf"));
    snprintf(env[n++], 512, "RABBITMQ_CONF_ENV_FILE=%s", in_dir("rabbit/rabbitmq-env.conf"));
    snprintf(env[n++], 512, "RABBITMQ_ENABLED_PLUGINS_FILE=%s", in_dir("rabbit/enabled_plugins"));
    snprintf(env[n++], 512, "RABBITMQ_PID_FILE=%s", in_dir("rabbit/rabbit.pid"));
    snprintf(env[n++], 512, "ERL_CRASH_DUMP=%s", in_dir("rabbit/erl_crash.dump"));
    snprintf(env[n++], 512, "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}");
    /* The script then execs the VM instead of waiting on it as a child,
     * so the parent-death signal reaches the VM itself. */
    snprintf(env[n++], 512, "RUNNING_UNDER_SYSTEMD=true");
    const char *envp[17];
    for (int i = 0; i < n; i++) envp[i] = env[i];
    envp[n] = NULL;
    const char *argv[] = {"/usr/lib/rabbitmq/bin/rabbitmq-server", NULL};
    if (access(argv[0], X_OK)) return fail_setup("%s not found (is rabbitmq-server installed?)", argv[0]);
    S.rabbit = spawn(argv, envp, in_dir("rabbit/server.log"), -1, -1, SIGTERM);
    return S.rabbit > 0 || fail_setup("%s", "cannot fork");
}

/* -------------------------------------------------------- PostgreSQL */

static const char *pg_bindir(void)
{
    static char dir[256];
    const char *d = aq_test_env("AGENTQ_TEST_PG_BINDIR");
    if (d && *d) return d;
    glob_t g;
    if (glob("/usr/lib/postgresql/*/bin/initdb", 0, NULL, &g) == 0 && g.gl_pathc) {
        snprintf(dir, sizeof dir, "%s", g.gl_pathv[g.gl_pathc - 1]);
        *strrchr(dir, '/') = '\0';
        globfree(&g);
        return dir;
    }
    return NULL;
}

static bool start_pg(void)
{
    const char *bin = pg_bindir();
    if (!bin) return fail_setup("%s", "PostgreSQL server binaries not found");
    int uid = -1, gid = -1;
    if (getuid() == 0) { /* initdb and postgres refuse root */
        struct passwd *pw = getpwnam("postgres");
        if (!pw) return fail_setup("%s", "running as root and there is no postgres user");
        uid = (int)pw->pw_uid;
        gid = (int)pw->pw_gid;
    }
    char base[256], data[256];
    snprintf(base, sizeof base, "%s", in_dir("pg"));
    snprintf(data, sizeof data, "%s", in_dir("pg/data"));
    mkdir(base, 0755);
    if (uid >= 0 && chown(base, (uid_t)uid, (gid_t)gid)) return fail_setup("cannot chown %s", base);
    char initdb[300], postgres[300];
    snprintf(initdb, sizeof initdb, "%s/initdb", bin);
    snprintf(postgres, sizeof postgres, "%s/postgres", bin);
    const char *iargv[] = {initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                           "--locale=C.UTF-8", NULL};
    if (run(iargv, in_dir("initdb.log"), uid, gid) != 0) return fail_setup("initdb failed (%s)", in_dir("initdb.log"));
    if (!copy_file(in_dir("server.pem"), in_dir("pg/data/server.pem"), 0644, uid, gid) ||
        !copy_file(in_dir("server.key"), in_dir("pg/data/server.key"), 0600, uid, gid))
        return fail_setup("%s", "cannot copy the server certificate into the data directory");
    char conf[1024];
    snprintf(conf, sizeof conf,
             "\n# it_tls\nssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n"
             "listen_addresses = '127.0.0.1'\nport = %d\nunix_socket_directories = '%s'\n"
             "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
             S.pg_port, base);
    FILE *f = fopen(in_dir("pg/data/postgresql.conf"), "a");
    bool ok = f && fputs(conf, f) >= 0;
    if (f) ok = fclose(f) == 0 && ok;
    /* TCP only over TLS: a client that does not ask for TLS is refused. */
    ok = ok && write_file(in_dir("pg/data/pg_hba.conf"), "local all all trust\n"
                                                         "hostssl all all 127.0.0.1/32 trust\n"
                                                         "hostnossl all all 0.0.0.0/0 reject\n");
    if (!ok) return fail_setup("%s", "cannot write postgresql.conf / pg_hba.conf");
    const char *pargv[] = {postgres, "-D", data, NULL};
    /* SIGINT: a fast shutdown. */
    S.pg = spawn(pargv, NULL, in_dir("pg/server.log"), uid, gid, SIGINT);
    snprintf(S.pg_dsn, sizeof S.pg_dsn,
             "host=localhost port=%d user=postgres dbname=postgres sslmode=verify-full sslrootcert=%s", S.pg_port,
             in_dir("ca.pem"));
    return S.pg > 0 || fail_setup("%s", "cannot fork");
}

/* The broker config every AMQP test starts from: TLS, the client
 * certificate, verification on. */
static void tls_config(aq_config *cfg, int port)
{
    char err[512], url[128];
    aq_config_init(cfg);
    snprintf(url, sizeof url, "amqps://guest:guest@localhost:%d/%%2f", port);
    ck_assert(aq_config_set(cfg, "amqp.url", url, err, sizeof err) == 0);
    ck_assert(aq_config_set(cfg, "amqp.ca_file", in_dir("ca.pem"), err, sizeof err) == 0);
    ck_assert(aq_config_set(cfg, "amqp.cert_file", in_dir("client.pem"), err, sizeof err) == 0);
    ck_assert(aq_config_set(cfg, "amqp.key_file", in_dir("client.key"), err, sizeof err) == 0);
    ck_assert_msg(aq_config_check(cfg, err, sizeof err) == 0, "%s", err);
}

static bool broker_up(int timeout_s)
{
    aq_config cfg;
    char err[512] = "";
    aq_config_init(&cfg);
    char url[128];
    snprintf(url, sizeof url, "amqps://guest:guest@localhost:%d/%%2f", S.amqp_port);
    bool ok = aq_config_set(&cfg, "amqp.url", url, err, sizeof err) == 0 &&
              aq_config_set(&cfg, "amqp.ca_file", in_dir("ca.pem"), err, sizeof err) == 0 &&
              aq_config_set(&cfg, "amqp.cert_file", in_dir("client.pem"), err, sizeof err) == 0 &&
              aq_config_set(&cfg, "amqp.key_file", in_dir("client.key"), err, sizeof err) == 0;
    bool up = false;
    for (int i = 0; ok && !up && i < timeout_s * 5; i++) {
        aq_broker *b = aq_broker_connect(&cfg, 0, 2000, err, sizeof err);
        up = b != NULL;
        aq_broker_free(b);
        if (!up) usleep(200000);
    }
    if (!up) fail_setup("RabbitMQ over TLS did not answer: %s", err);
    aq_config_free(&cfg);
    return up;
}

static bool start_servers(void)
{
    snprintf(S.dir, sizeof S.dir, "/tmp/agentq-tls.XXXXXX");
    if (!mkdtemp(S.dir) || chmod(S.dir, 0755)) return fail_setup("%s", "cannot make a temp dir");
    if (!make_certs()) return fail_setup("openssl could not make the certificates (%s)", in_dir("certs.log"));
    S.amqp_port = free_port();
    S.pg_port = free_port();
    S.epmd_port = free_port();
    /* RabbitMQ boots while PostgreSQL is initialised. */
    if (!start_rabbit() || !start_pg()) return false;
    bool pg_up = false;
    char err[512] = "";
    for (int i = 0; i < BOOT_TIMEOUT_S * 10 && !pg_up; i++) {
        pg_up = aq_test_pg_exec(S.pg_dsn, "SELECT 1", err, sizeof err) == 0;
        if (!pg_up) usleep(100000);
    }
    if (!pg_up) return fail_setup("PostgreSQL over TLS did not answer: %s", err);
    if (!wait_port(S.amqp_port, BOOT_TIMEOUT_S * 1000))
        return fail_setup("RabbitMQ did not open its TLS port (%s)", in_dir("rabbit/log"));
    return broker_up(20);
}

static void stop_servers(bool keep)
{
    stop(&S.rabbit, SIGTERM);
    stop(&S.pg, SIGINT);
    stop(&S.epmd, SIGTERM);
    if (!*S.dir) return;
    if (keep) {
        fprintf(stderr, "it_tls: servers' files and logs kept in %s\n", S.dir);
        return;
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", S.dir);
    if (system(cmd) != 0) fprintf(stderr, "it_tls: could not remove %s\n", S.dir);
}

/* ------------------------------------------------------ helper servers */

/* `openssl s_server -www` on a free port serving cert/key. */
static aq_test_proc *s_server(const char *cert, const char *key, int *port)
{
    char p[16];
    *port = free_port();
    snprintf(p, sizeof p, "%d", *port);
    const char *argv[] = {"/usr/bin/openssl", "s_server", "-quiet", "-www", "-accept", p, "-cert", cert, "-key", key,
                          NULL};
    aq_test_proc *proc = aq_test_spawn(argv, NULL, in_dir("s_server.log"));
    ck_assert_msg(wait_port(*port, 5000), "openssl s_server did not listen");
    return proc;
}

/* A TLS terminator in front of a plain HTTP server on 127.0.0.1:target:
 * the mock LLM speaks plain HTTP only. asyncio does the TLS (one thread,
 * no SSL object shared between threads). */
static const char TERMINATOR_PY[] =
    "import asyncio, ssl, sys\n"
    "port, target, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]\n"
    "ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)\n"
    "ctx.load_cert_chain(cert, key)\n"
    "async def pipe(r, w):\n"
    "    try:\n"
    "        while True:\n"
    "            d = await r.read(65536)\n"
    "            if not d:\n"
    "                break\n"
    "            w.write(d)\n"
    "            await w.drain()\n"
    "    except Exception:\n"
    "        pass\n"
    "    finally:\n"
    "        w.close()\n"
    "async def handle(cr, cw):\n"
    "    try:\n"
    "        ur, uw = await asyncio.open_connection('127.0.0.1', target)\n"
    "    except OSError:\n"
    "        cw.close()\n"
    "        return\n"
    "    await asyncio.gather(pipe(cr, uw), pipe(ur, cw))\n"
    "async def main():\n"
    "    srv = await asyncio.start_server(handle, '127.0.0.1', port, ssl=ctx)\n"
    "    async with srv:\n"
    "        await srv.serve_forever()\n"
    "asyncio.run(main())\n";

static aq_test_proc *terminator(int target, int *port)
{
    const char *py = in_dir("terminator.py");
    ck_assert(write_file(py, TERMINATOR_PY));
    char p[16], t[16];
    *port = free_port();
    snprintf(p, sizeof p, "%d", *port);
    snprintf(t, sizeof t, "%d", target);
    const char *argv[] = {"/usr/bin/python3", py, p, t, in_dir("server.pem"), in_dir("server.key"), NULL};
    aq_test_proc *proc = aq_test_spawn(argv, NULL, in_dir("terminator.log"));
    if (!wait_port(*port, 10000)) {
        aq_test_dump_log(in_dir("terminator.log"), 20);
        ck_abort_msg("the TLS terminator did not listen");
    }
    return proc;
}

/* ------------------------------------------------------------- tests */

/* A worker, the mock LLM behind HTTPS and agentq-producer, every one of
 * them over TLS to every peer: amqps:// with a client certificate, Postgres
 * with verify-full, the LLM through llm.ca_file. A task completes. */
START_TEST(task_completes_over_tls)
{
    require_servers();
    char err[512];
    ck_assert_msg(aq_test_pg_exec(S.pg_dsn, "CREATE DATABASE agentq", err, sizeof err) == 0, "%s", err);
    char dsn[512];
    snprintf(dsn, sizeof dsn,
             "host=localhost port=%d user=postgres dbname=agentq sslmode=verify-full sslrootcert=%s", S.pg_port,
             in_dir("ca.pem"));
    int applied = 0;
    ck_assert_msg(aq_migrate_apply(dsn, aq_migrate_default_dir(), &applied, err, sizeof err) == 0, "%s", err);
    /* The server takes no TCP client without TLS. */
    char plain[256];
    snprintf(plain, sizeof plain, "host=127.0.0.1 port=%d user=postgres dbname=agentq sslmode=disable", S.pg_port);
    ck_assert_int_ne(aq_test_pg_exec(plain, "SELECT 1", err, sizeof err), 0);
    ck_assert_msg(strstr(err, "no encryption") != NULL, "%s", err);

    int mock_port, llm_port;
    const char *flags[] = {"--latency-ms", "10", NULL};
    aq_test_proc *mock = aq_test_start_mock(flags, in_dir("mock.log"), &mock_port);
    aq_test_proc *term = terminator(mock_port, &llm_port);

    static char vars[12][600];
    int n = 0;
    snprintf(vars[n++], 600, "AGENTQ_AMQP_URL=amqps://guest:guest@localhost:%d/%%2f", S.amqp_port);
    snprintf(vars[n++], 600, "AGENTQ_AMQP_CA_FILE=%s", in_dir("ca.pem"));
    snprintf(vars[n++], 600, "AGENTQ_AMQP_CERT_FILE=%s", in_dir("client.pem"));
    snprintf(vars[n++], 600, "AGENTQ_AMQP_KEY_FILE=%s", in_dir("client.key"));
    snprintf(vars[n++], 600, "AGENTQ_AMQP_LANES=2");
    snprintf(vars[n++], 600, "AGENTQ_POSTGRES_DSN=%s", dsn);
    snprintf(vars[n++], 600, "AGENTQ_LLM_BASE_URL=https://localhost:%d/v1", llm_port);
    snprintf(vars[n++], 600, "AGENTQ_LLM_CA_FILE=%s", in_dir("ca.pem"));
    snprintf(vars[n++], 600, "AGENTQ_LLM_MAX_RETRIES=0");
    snprintf(vars[n++], 600, "AGENTQ_METRICS_LISTEN=127.0.0.1:0");
    snprintf(vars[n++], 600, "AGENTQ_WORKER_ID=tls-worker");
    const char *env[13];
    for (int i = 0; i < n; i++) env[i] = vars[i];
    env[n] = NULL;

    const char *wargv[] = {aq_test_bin("agentq-worker"), NULL};
    aq_test_proc *w = aq_test_spawn(wargv, env, in_dir("worker.log"));
    const char *pargv[] = {aq_test_bin("agentq-producer"), "--user", "alice", "--goal", "over tls steps=1",
                           "--wait", "--wait-timeout", "30", NULL};
    aq_test_proc *prod = aq_test_spawn(pargv, env, in_dir("producer.log"));
    int rc = aq_test_proc_wait(prod, 40000);
    if (rc != 0) {
        aq_test_dump_log(in_dir("producer.log"), 20);
        aq_test_dump_log(in_dir("worker.log"), 40);
        aq_test_dump_log(in_dir("terminator.log"), 20);
    }
    ck_assert_int_eq(rc, 0); /* published, confirmed and followed to completed */
    char *v = aq_test_pg_value(dsn, "SELECT status || ' ' || steps FROM agentq.tasks WHERE user_id = 'alice'");
    ck_assert_msg(v && !strcmp(v, "completed 2"), "task row: %s", v ? v : "(none)");
    free(v);
    /* Both LLM calls were answered: they came through the terminator. */
    v = aq_test_pg_value(dsn, "SELECT count(*) FROM agentq.steps WHERE kind = 'llm' AND status <> 'error'");
    ck_assert_msg(v && !strcmp(v, "2"), "LLM steps: %s", v ? v : "(none)");
    free(v);
    /* The worker's own Postgres connections (store, cancel watcher) are TLS. */
    v = aq_test_pg_value(dsn, "SELECT count(*) FILTER (WHERE s.ssl) || '/' || count(*) FROM pg_stat_activity a"
                              " JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'agentq-worker%'");
    int tls = -1, all = -1;
    ck_assert_msg(v && sscanf(v, "%d/%d", &tls, &all) == 2 && tls == all && all >= 2,
                  "worker connections over TLS / all: %s", v ? v : "(none)");
    free(v);
    aq_test_proc_signal(w, SIGTERM);
    ck_assert_int_eq(aq_test_proc_wait(w, 15000), 0);
    aq_test_proc_free(w);
    aq_test_proc_free(prod);
    aq_test_proc_free(term);
    aq_test_proc_free(mock);
}
END_TEST

/* A server whose certificate the CA signed, but for another host: the
 * connection is refused, and the error names the host we asked for. */
START_TEST(wrong_host_refused)
{
    require_servers();
    int port;
    aq_test_proc *srv = s_server(in_dir("wrong.pem"), in_dir("wrong.key"), &port);
    aq_config cfg;
    tls_config(&cfg, port);
    char err[512];
    aq_broker *b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_ptr_null(b);
    ck_assert_msg(strstr(err, "not valid for host 'localhost'") != NULL, "%s", err);
    ck_assert_msg(strstr(err, "guest:guest") == NULL, "password shown: %s", err);
    aq_config_free(&cfg);
    aq_test_proc_free(srv);
}
END_TEST

/* The real broker, but a CA bundle that did not sign its certificate. */
START_TEST(untrusted_ca_refused)
{
    require_servers();
    aq_config cfg;
    char err[512];
    tls_config(&cfg, S.amqp_port);
    ck_assert(aq_config_set(&cfg, "amqp.ca_file", in_dir("other-ca.pem"), err, sizeof err) == 0);
    ck_assert_ptr_null(aq_broker_connect(&cfg, 0, 5000, err, sizeof err));
    ck_assert_msg(strstr(err, "was not verified") && strstr(err, "other-ca.pem"), "%s", err);
    /* verify_peer = 0 takes it (encrypted, unauthenticated): the switch works. */
    ck_assert(aq_config_set(&cfg, "amqp.verify_peer", "0", err, sizeof err) == 0);
    aq_broker *b = aq_broker_connect(&cfg, 0, 5000, err, sizeof err);
    ck_assert_msg(b != NULL, "%s", err);
    aq_broker_free(b);
    aq_config_free(&cfg);
}
END_TEST

/* The broker wants a client certificate: without one, no connection. */
START_TEST(no_client_cert_refused)
{
    require_servers();
    aq_config cfg;
    char err[512];
    tls_config(&cfg, S.amqp_port);
    ck_assert(aq_config_set(&cfg, "amqp.cert_file", "", err, sizeof err) == 0);
    ck_assert(aq_config_set(&cfg, "amqp.key_file", "", err, sizeof err) == 0);
    int64_t t0 = aq_mono_us();
    ck_assert_ptr_null(aq_broker_connect(&cfg, 0, 5000, err, sizeof err));
    ck_assert_msg(aq_mono_us() - t0 < 6000000, "took %lld ms", (long long)((aq_mono_us() - t0) / 1000));
    ck_assert_msg(strstr(err, "amqp.cert_file") != NULL, "%s", err);
    aq_config_free(&cfg);
}
END_TEST

/* amqp:// to the TLS-only listener: a clear error, in bounded time. */
START_TEST(plain_amqp_to_tls_port_fails_fast)
{
    require_servers();
    aq_config cfg;
    char err[512], url[128];
    aq_config_init(&cfg);
    snprintf(url, sizeof url, "amqp://guest:guest@localhost:%d/%%2f", S.amqp_port);
    ck_assert(aq_config_set(&cfg, "amqp.url", url, err, sizeof err) == 0);
    int64_t t0 = aq_mono_us();
    ck_assert_ptr_null(aq_broker_connect(&cfg, 0, 3000, err, sizeof err));
    int64_t ms = (aq_mono_us() - t0) / 1000;
    ck_assert_msg(ms < 4000, "took %lld ms: %s", (long long)ms, err);
    ck_assert_msg(strstr(err, "amqps://") != NULL, "%s", err);
    aq_config_free(&cfg);
}
END_TEST

typedef struct {
    int done, code;
    long status;
    char error[512];
} fetch_result;

static void on_fetched(aq_http_req *req, const aq_http_result *res, void *arg)
{
    fetch_result *r = arg;
    r->code = res->code;
    r->status = res->status;
    snprintf(r->error, sizeof r->error, "%s", res->error);
    r->done++;
}

/* GETs url through the shared HTTP client made as the worker makes it
 * (llm.ca_file, "" for the system store). */
static fetch_result fetch(const char *url, const char *ca_file)
{
    aq_config cfg;
    char err[512];
    aq_config_init(&cfg);
    ck_assert(aq_config_set(&cfg, "llm.ca_file", ca_file, err, sizeof err) == 0);
    ck_assert_msg(aq_config_check(&cfg, err, sizeof err) == 0, "%s", err);
    struct event_base *base = event_base_new();
    aq_http_config hc = {.connect_timeout_ms = 3000, .timeout_ms = 5000, .ca_file = cfg.llm_ca_file};
    aq_http *http = aq_http_new(base, &hc, err, sizeof err);
    ck_assert_msg(http != NULL, "%s", err);
    fetch_result r = {0};
    aq_http_request rq = {.method = AQ_HTTP_GET, .url = url};
    ck_assert_msg(aq_http_submit(http, &rq, on_fetched, &r, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert(aq_test_loop_until(base, &r.done, 1, 10000));
    aq_http_free(http);
    event_base_free(base);
    aq_config_free(&cfg);
    return r;
}

/* llm.ca_file: HTTPS to a server the test CA signed works with it and not
 * without it (not in the system store), and a certificate for another
 * host is refused even so. */
START_TEST(llm_ca_file_verifies_https)
{
    require_servers();
    int port, wport;
    aq_test_proc *good = s_server(in_dir("server.pem"), in_dir("server.key"), &port);
    aq_test_proc *wrong = s_server(in_dir("wrong.pem"), in_dir("wrong.key"), &wport);
    char url[128], wurl[128];
    snprintf(url, sizeof url, "https://localhost:%d/", port);
    snprintf(wurl, sizeof wurl, "https://localhost:%d/", wport);
    fetch_result r = fetch(url, in_dir("ca.pem"));
    ck_assert_msg(r.code == 0 && r.status == 200, "with llm.ca_file: code %d status %ld: %s", r.code, r.status, r.error);
    r = fetch(url, "");
    ck_assert_msg(r.code == AQ_EIO && strstr(r.error, "certificate"), "system store: code %d: %s", r.code, r.error);
    r = fetch(wurl, in_dir("ca.pem"));
    ck_assert_msg(r.code == AQ_EIO && strstr(r.error, "localhost"), "wrong host: code %d: %s", r.code, r.error);
    aq_test_proc_free(good);
    aq_test_proc_free(wrong);
}
END_TEST

/* aq_config_check on the TLS keys: each bad input is refused with the key
 * and the value named. */
static const struct {
    const char *set[4][2]; /* key, value ("@name": a file of the temp dir) */
    const char *want;      /* in the error; NULL: accepted */
    const char *want2;     /* also in the error; NULL: nothing more */
} check_cases[] = {
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}}, "key 'amqp.ca_file': required", "system CA store"},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}, {"amqp.verify_peer", "0"}}, NULL, NULL},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}, {"amqp.ca_file", "@ca.pem"}}, NULL, NULL},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}, {"amqp.ca_file", "@ca.pem"}, {"amqp.cert_file", "@client.pem"}},
     "set both or neither", "client.pem', key_file '')"},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}, {"amqp.ca_file", "@ca.pem"}, {"amqp.key_file", "@client.key"}},
     "set both or neither", "key_file '/tmp/agentq-tls."},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}, {"amqp.ca_file", "@missing.pem"}},
     "key 'amqp.ca_file': '/tmp/agentq-tls.", "missing.pem' cannot be read: No such file or directory"},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}, {"amqp.ca_file", "@pg"}}, "Is a directory", NULL},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"}, {"amqp.ca_file", "@certs.sh"}}, "not a PEM file", NULL},
    {{{"amqp.url", "amqps://u:p@localhost/%2f"},
      {"amqp.ca_file", "@ca.pem"},
      {"amqp.cert_file", "@client.pem"},
      {"amqp.key_file", "@client-encrypted.key"}},
     "encrypted private key", NULL},
    {{{"amqp.ca_file", "@ca.pem"}}, "not an amqps:// URL", NULL},
    {{{"llm.ca_file", "@missing.pem"}}, "key 'llm.ca_file'", "No such file"},
    {{{"llm.ca_file", "@ca.pem"}}, NULL, NULL},
};

START_TEST(config_check_tls_keys)
{
    require_servers();
    aq_config cfg;
    char err[512] = "";
    aq_config_init(&cfg);
    for (int k = 0; k < 4 && check_cases[_i].set[k][0]; k++) {
        const char *v = check_cases[_i].set[k][1];
        ck_assert(aq_config_set(&cfg, check_cases[_i].set[k][0], v[0] == '@' ? in_dir(v + 1) : v, err, sizeof err) == 0);
    }
    int rc = aq_config_check(&cfg, err, sizeof err);
    const char *want = check_cases[_i].want;
    if (!want) {
        ck_assert_msg(rc == 0, "case %d refused: %s", _i, err);
    } else {
        const char *want2 = check_cases[_i].want2 ? check_cases[_i].want2 : "";
        ck_assert_msg(rc == AQ_EINVAL && strstr(err, want) && strstr(err, want2),
                      "case %d: rc %d, error '%s', want '%s' and '%s'", _i, rc, err, want, want2);
    }
    aq_config_free(&cfg);
}
END_TEST

int main(void)
{
    srandom((unsigned)getpid());
    if (!start_servers()) fprintf(stderr, "it_tls: %s\n", S.failed);
    const TTest *core[] = {task_completes_over_tls, llm_ca_file_verifies_https};
    const TTest *errors[] = {wrong_host_refused, untrusted_ca_refused, no_client_cert_refused,
                             plain_amqp_to_tls_port_fails_fast};
    const aq_tcase_spec tcases[] = {
        {.name = "core", .tests = core, .n_tests = AQ_ARRAY_LEN(core), .timeout_s = 60},
        {.name = "errors", .tests = errors, .n_tests = AQ_ARRAY_LEN(errors), .timeout_s = 30,
         .loop_test = config_check_tls_keys, .loops = (int)AQ_ARRAY_LEN(check_cases)},
    };
    int rc = aq_test_run_http(aq_test_suite("tls", tcases, AQ_ARRAY_LEN(tcases)));
    stop_servers(rc != 0 || *S.failed);
    return rc;
}
