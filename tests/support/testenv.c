/* testenv.c — see testenv.h. Owns the parsed env file (read once per
 * process) and the short-lived libpq connections behind the SQL helpers. */
#include "testenv.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <event2/http.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <check.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agentq/common.h"
#include "agentq/http.h"
#include "agentq/log.h"
#include <signal.h>

#define MAX_ENV 64

static struct {
    char *key;
    char *value;
} env_items[MAX_ENV];
static size_t env_n;
static pthread_once_t env_once = PTHREAD_ONCE_INIT;

const char *aq_test_bin(const char *name)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", AGENTQ_BIN_DIR, name);
    return path;
}

static void env_load(void)
{
    const char *path = getenv("AGENTQ_TEST_ENV_FILE");
    if (!path || !*path)
        path = AGENTQ_TEST_ENV_FILE;
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char line[4096];
    while (env_n < MAX_ENV && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        char *eq = strchr(line, '=');
        if (!eq || eq == line || line[0] == '#')
            continue;
        *eq = '\0';
        env_items[env_n].key = aq_xstrdup(line);
        env_items[env_n].value = aq_xstrdup(eq + 1);
        env_n++;
    }
    fclose(f);
}

const char *aq_test_env(const char *key)
{
    const char *v = getenv(key);
    if (v && *v)
        return v;
    pthread_once(&env_once, env_load);
    for (size_t i = 0; i < env_n; i++)
        if (strcmp(env_items[i].key, key) == 0)
            return env_items[i].value;
    return NULL;
}

const char *aq_test_env_require(const char *key)
{
    const char *v = aq_test_env(key);
    ck_assert_msg(v != NULL,
                  "%s is not set and not in %s: the test servers are not running "
                  "(ctest starts them through the `servers` fixture; by hand: "
                  "scripts/testenv start <build>/testenv)",
                  key, AGENTQ_TEST_ENV_FILE);
    return v;
}

static PGconn *connect_or_fail(const char *dsn)
{
    PGconn *conn = PQconnectdb(dsn);
    if (!conn)
        aq_oom("libpq connection");
    if (PQstatus(conn) != CONNECTION_OK) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", PQerrorMessage(conn));
        PQfinish(conn);
        ck_abort_msg("cannot connect to %s: %s", dsn, msg);
    }
    return conn;
}

char *aq_test_fresh_db(const char *prefix)
{
    const char *admin = aq_test_env_require("AGENTQ_TEST_PG_DSN");
    const char *host = aq_test_env_require("AGENTQ_TEST_PG_HOST");
    const char *port = aq_test_env_require("AGENTQ_TEST_PG_PORT");

    /* pid + counter + clock: unique across the forked Check children and
     * across reruns against one cluster; 63 bytes is PostgreSQL's limit. */
    static unsigned counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char name[64];
    int len = snprintf(name, sizeof name, "%.30s", prefix && *prefix ? prefix : "t");
    for (int i = 0; i < len; i++) {
        char c = name[i];
        if (c >= 'A' && c <= 'Z')
            name[i] = (char)(c - 'A' + 'a');
        else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')))
            name[i] = '_';
    }
    snprintf(name + len, sizeof name - (size_t)len, "_%ld_%u_%lx", (long)getpid(), counter++,
             (unsigned long)(ts.tv_nsec ^ (ts.tv_sec << 20)) & 0xffffffu);

    char sql[256];
    snprintf(sql, sizeof sql, "CREATE DATABASE \"%s\"", name);
    char err[1024];
    if (aq_test_pg_exec(admin, sql, err, sizeof err) != 0)
        ck_abort_msg("%s: %s", sql, err);

    char dsn[512];
    snprintf(dsn, sizeof dsn, "host=%s port=%s user=postgres dbname=%s", host, port, name);
    return aq_xstrdup(dsn);
}

char *aq_test_dsn_as(const char *dsn, const char *user)
{
    /* In a key=value conninfo string the last setting of a key wins. */
    size_t n = strlen(dsn) + strlen(user) + 16;
    char *out = aq_xmalloc(n);
    snprintf(out, n, "%s user=%s", dsn, user);
    return out;
}

char *aq_test_pg_value(const char *dsn, const char *sql)
{
    PGconn *conn = connect_or_fail(dsn);
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(res));
        PQclear(res);
        PQfinish(conn);
        ck_abort_msg("SQL failed: %s\n%s", sql, msg);
    }
    char *out = NULL;
    if (st == PGRES_TUPLES_OK && PQntuples(res) > 0 && PQnfields(res) > 0 &&
        !PQgetisnull(res, 0, 0))
        out = aq_xstrdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    PQfinish(conn);
    return out;
}

int aq_test_pg_exec(const char *dsn, const char *sql, char *err, size_t errlen)
{
    PGconn *conn = PQconnectdb(dsn);
    if (!conn)
        aq_oom("libpq connection");
    if (PQstatus(conn) != CONNECTION_OK) {
        aq_seterr(err, errlen, "cannot connect: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return -1;
    }
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    int rc = 0;
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK && st != PGRES_EMPTY_QUERY) {
        aq_seterr(err, errlen, "%s", PQresultErrorMessage(res));
        rc = -1;
    }
    PQclear(res);
    PQfinish(conn);
    return rc;
}

int aq_test_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

int aq_test_run_http(Suite *s)
{
    const char *proxies[] = {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"};
    for (size_t i = 0; i < AQ_ARRAY_LEN(proxies); i++) unsetenv(proxies[i]);
    signal(SIGPIPE, SIG_IGN);
    aq_log_set_level(getenv("CHECK_LOG_DEBUG") ? AQ_LOG_DEBUG : AQ_LOG_WARN);
    if (aq_http_global_init() != AQ_OK) {
        fprintf(stderr, "curl_global_init failed\n");
        return EXIT_FAILURE;
    }
    return aq_test_run(s);
}

static void tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

bool aq_test_loop_until(struct event_base *base, const int *count, int want, int timeout_ms)
{
    struct event *t = event_new(base, -1, EV_PERSIST, tick, NULL);
    struct timeval tv = {0, 10000};
    event_add(t, &tv);
    int64_t end = aq_mono_us() + (int64_t)timeout_ms * 1000;
    while (*count < want && aq_mono_us() < end) event_base_loop(base, EVLOOP_ONCE);
    event_free(t);
    return *count >= want;
}

void aq_test_loop_for(struct event_base *base, int ms)
{
    int never = 0;
    (void)aq_test_loop_until(base, &never, 1, ms);
}

int aq_test_bound_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&ss, &len), 0);
    return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
}

int aq_test_loopback_socket(int backlog, int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sin, sizeof sin), 0);
    if (backlog > 0)
        ck_assert_int_eq(listen(fd, backlog), 0);
    *port = aq_test_bound_port(fd);
    return fd;
}

struct evhttp *aq_test_httpd(struct event_base *base, void (*cb)(struct evhttp_request *, void *), void *arg,
                             int *port)
{
    return aq_test_httpd_on(base, "127.0.0.1", cb, arg, port);
}

struct evhttp *aq_test_httpd_on(struct event_base *base, const char *host,
                                void (*cb)(struct evhttp_request *, void *), void *arg, int *port)
{
    struct evhttp *http = evhttp_new(base);
    ck_assert_ptr_nonnull(http);
    evhttp_set_gencb(http, cb, arg);
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST);
    struct evhttp_bound_socket *bs = evhttp_bind_socket_with_handle(http, host, 0);
    ck_assert_msg(bs != NULL, "cannot listen on %s", host);
    *port = aq_test_bound_port(evhttp_bound_socket_get_fd(bs));
    return http;
}

bool aq_test_own_addr(char *buf, size_t len)
{
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs) != 0) {
        snprintf(buf, len, "getifaddrs failed");
        return false;
    }
    bool found = false;
    for (struct ifaddrs *i = ifs; i && !found; i = i->ifa_next) {
        if (!i->ifa_addr || (i->ifa_flags & IFF_LOOPBACK) || !(i->ifa_flags & IFF_UP)) continue;
        if (i->ifa_addr->sa_family == AF_INET) {
            const struct sockaddr_in *s4 = (const struct sockaddr_in *)(const void *)i->ifa_addr;
            found = inet_ntop(AF_INET, &s4->sin_addr, buf, (socklen_t)len) != NULL;
        } else if (i->ifa_addr->sa_family == AF_INET6) {
            const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)(const void *)i->ifa_addr;
            if (IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr)) continue;
            found = inet_ntop(AF_INET6, &s6->sin6_addr, buf, (socklen_t)len) != NULL;
        }
    }
    freeifaddrs(ifs);
    if (!found) snprintf(buf, len, "no interface address but loopback and link-local");
    return found;
}

const char *aq_test_url(char *buf, size_t len, const char *host, int port, const char *path)
{
    bool v6 = strchr(host, ':') != NULL;
    snprintf(buf, len, "http://%s%s%s:%d%s", v6 ? "[" : "", host, v6 ? "]" : "", port, path);
    return buf;
}
