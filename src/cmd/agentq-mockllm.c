/* agentq-mockllm — runs the OpenAI-compatible LLM simulator (mockllm.h) on
 * its own event loop for the demo, the tests and load tests. This file only
 * parses flags, raises the descriptor limit, handles SIGINT/SIGTERM through
 * the loop and reports the bound address; the behaviour lives in the
 * module. */
#include "agentq/common.h"
#include "agentq/log.h"
#include "agentq/mockllm.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <event2/event.h>

static const char usage_text[] =
    "Usage: agentq-mockllm [OPTIONS]\n"
    "\n"
    "An OpenAI-compatible chat completions server that simulates an LLM provider:\n"
    "latency, rate limits (429 + Retry-After), failures and scripted tool calls.\n"
    "Point llm.base_url at http://HOST:PORT/v1.\n"
    "\n"
    "Options:\n"
    "  --listen HOST:PORT     address to listen on (default 127.0.0.1:8080; port 0\n"
    "                         picks a free port, logged at start)\n"
    "  --port-file PATH       write the bound port to PATH once listening\n"
    "  --latency-ms MS        reply latency (default 0)\n"
    "  --jitter-ms MS         uniform +/- jitter around the latency (default 0)\n"
    "  --rpm N                requests per minute before 429 (default 0 = unlimited)\n"
    "  --tpm N                tokens per minute before 429 (default 0 = unlimited)\n"
    "  --window-requests N    a fixed-window quota as many providers count: the first\n"
    "                         request opens a window of --window-ms in which N\n"
    "                         requests pass and the rest get 429; replies carry\n"
    "                         x-ratelimit-remaining-requests and -reset-requests\n"
    "                         (no -limit-) instead of the --rpm ones (default 0 = off;\n"
    "                         applies on top of --rpm/--tpm)\n"
    "  --window-ms MS         the window's length (default 1000)\n"
    "  --fail-rate P          fraction of requests answered with 500 (0..1)\n"
    "  --malformed-rate P     fraction answered 200 with truncated JSON (0..1)\n"
    "  --hang-rate P          fraction never answered until the client leaves (0..1)\n"
    "  --mode MODE            script (default) or calc\n"
    "  --seed N               seed of the random choices (default: from the clock)\n"
    "  --api-key-env NAME     require 'Authorization: Bearer $NAME' when NAME is set\n"
    "  --auth-header HEADER   with --api-key-env: the key must come as 'HEADER: $NAME'\n"
    "                         (Azure OpenAI: --auth-header api-key); Authorization\n"
    "                         does not do then\n"
    "  --require-query N=V    every chat request must carry the query parameter N=V\n"
    "                         (Azure OpenAI: --require-query api-version=2024-10-21);\n"
    "                         without it, or with another value: 400 naming N\n"
    "  --echo-key             a 401 quotes the key the client presented, as OpenAI's\n"
    "                         does (\"Incorrect API key provided: <key>...\"), so tests\n"
    "                         can prove a client keeps it out of its logs and rows\n"
    "  --log-level LEVEL      debug, info (default), warn or error\n"
    "  --help                 show this help and exit\n"
    "  --version              show the version and exit\n"
    "\n"
    "Directives in the goal (the first user message) script the model:\n"
    "  steps=N      make N tool-call turns, then answer \"done: ...\"\n"
    "  parallel=K   ask for K tool calls per turn\n"
    "  tool=NAME    call this offered tool (default: the first one offered)\n"
    "  loop         call a tool every turn and never finish\n"
    "  calc         call `calculator` with a random expression and check the\n"
    "               result: answers \"correct: EXPR = VALUE\" or \"WRONG: ...\"\n"
    "  fail=CODE    answer with HTTP CODE (e.g. 400, 429, 500) and an error body\n"
    "  tokens=N     report N completion tokens\n"
    "  sleep=MS     this request's latency is MS\n"
    "  url=URL      the tool call's arguments are {\"url\": \"URL\"} (with tool=http_get;\n"
    "               the URL runs to the next space)\n"
    "\n"
    "Faults while running: POST /control with a JSON object of any of\n"
    "  fail_rate, malformed_rate, hang_rate   0..1, as the flags above\n"
    "  latency_ms, jitter_ms                  integers, as the flags above\n"
    "  storm_seconds S    answer every chat request 429 for S seconds (0 ends it)\n"
    "  retry_after N      with storm_seconds: the storm's Retry-After (default:\n"
    "                     the seconds it has left)\n"
    "  window_requests N  the fixed window's quota (0 = off), as --window-requests\n"
    "  window_ms MS       its length, 1..3600000 (either one starts a new window)\n"
    "  reset true         back to the flags' settings, then apply the rest\n"
    "{} resets too. The reply is the faults now in force (also GET /control);\n"
    "a bad body gets 400 naming the field and changes nothing. Examples:\n"
    "  curl -d '{\"fail_rate\":0.5}' http://127.0.0.1:PORT/control\n"
    "  curl -d '{\"storm_seconds\":10,\"retry_after\":2}' http://127.0.0.1:PORT/control\n"
    "  curl -d '{}' http://127.0.0.1:PORT/control\n"
    "\n"
    "Endpoints: POST /v1/chat/completions, POST and GET /control, GET /stats\n"
    "(counters as JSON), GET /calls (chat requests per goal), GET /requests (every\n"
    "chat request's arrival, [{\"at_ms\": aq_mono_us()/1000, \"status\": S}, ...], the\n"
    "first 100000; S is the status sent or decided, 0 for never answered), GET\n"
    "/healthz. Only the chat endpoint asks for a key or a query parameter: listen\n"
    "on loopback.\n";

enum {
    OPT_LISTEN = 256,
    OPT_PORT_FILE,
    OPT_LATENCY,
    OPT_JITTER,
    OPT_RPM,
    OPT_TPM,
    OPT_FAIL_RATE,
    OPT_MALFORMED_RATE,
    OPT_HANG_RATE,
    OPT_MODE,
    OPT_SEED,
    OPT_API_KEY_ENV,
    OPT_AUTH_HEADER,
    OPT_REQUIRE_QUERY,
    OPT_WINDOW_REQUESTS,
    OPT_WINDOW_MS,
    OPT_ECHO_KEY,
    OPT_LOG_LEVEL,
    OPT_HELP,
    OPT_VERSION,
};

static const struct option long_opts[] = {
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"port-file", required_argument, NULL, OPT_PORT_FILE},
    {"latency-ms", required_argument, NULL, OPT_LATENCY},
    {"jitter-ms", required_argument, NULL, OPT_JITTER},
    {"rpm", required_argument, NULL, OPT_RPM},
    {"tpm", required_argument, NULL, OPT_TPM},
    {"fail-rate", required_argument, NULL, OPT_FAIL_RATE},
    {"malformed-rate", required_argument, NULL, OPT_MALFORMED_RATE},
    {"hang-rate", required_argument, NULL, OPT_HANG_RATE},
    {"mode", required_argument, NULL, OPT_MODE},
    {"seed", required_argument, NULL, OPT_SEED},
    {"api-key-env", required_argument, NULL, OPT_API_KEY_ENV},
    {"auth-header", required_argument, NULL, OPT_AUTH_HEADER},
    {"require-query", required_argument, NULL, OPT_REQUIRE_QUERY},
    {"window-requests", required_argument, NULL, OPT_WINDOW_REQUESTS},
    {"window-ms", required_argument, NULL, OPT_WINDOW_MS},
    {"echo-key", no_argument, NULL, OPT_ECHO_KEY},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"help", no_argument, NULL, OPT_HELP},
    {"version", no_argument, NULL, OPT_VERSION},
    {NULL, 0, NULL, 0},
};

static AQ_NORETURN AQ_PRINTF(1, 2) void die_usage(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "agentq-mockllm: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'agentq-mockllm --help'.\n");
    exit(2);
}

static long long parse_int(const char *opt, const char *s, long long lo, long long hi)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) {
        fprintf(stderr, "agentq-mockllm: %s wants an integer in %lld..%lld, not '%s'\n", opt, lo,
                hi, s);
        exit(2);
    }
    return v;
}

static double parse_rate(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !(v >= 0 && v <= 1)) {
        fprintf(stderr, "agentq-mockllm: %s wants a fraction in 0..1, not '%s'\n", opt, s);
        exit(2);
    }
    return v;
}

/* Splits "HOST:PORT", "[V6]:PORT" or ":PORT" (all interfaces) in place. */
static void parse_listen(char *s, const char **host, int *port)
{
    char *colon = strrchr(s, ':');
    if (!colon) die_usage("--listen wants HOST:PORT, not '%s'", s);
    *colon = '\0';
    *port = (int)parse_int("--listen port", colon + 1, 0, 65535);
    if (s[0] == '[') {
        size_t n = strlen(s);
        if (n < 2 || s[n - 1] != ']') die_usage("--listen: unbalanced '[' in '%s'", s);
        s[n - 1] = '\0';
        s++;
    }
    *host = *s ? s : "0.0.0.0";
}

/* Thousands of concurrent clients need thousands of descriptors. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rlim_t want = rl.rlim_max;
        rl.rlim_cur = want;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            aq_log(AQ_LOG_WARN, "cannot raise the open-file limit: %s", strerror(errno));
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < 10240)
        aq_log(AQ_LOG_WARN, "open-file limit is %llu: fewer concurrent requests can be held",
               (unsigned long long)rl.rlim_cur);
}

/* Writes the port through a temporary file and a rename, so a reader
 * polling for the file never sees it half-written. */
static int write_port_file(const char *path, int port)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return -1;
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    fprintf(f, "%d\n", port);
    if (fclose(f) != 0) return -1;
    return rename(tmp, path);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    struct event_base *base = arg;
    aq_log(AQ_LOG_INFO, "agentq-mockllm: signal %d, stopping", (int)sig);
    event_base_loopexit(base, NULL);
}

int main(int argc, char **argv)
{
    aq_mockllm_config cfg;
    aq_mockllm_config_defaults(&cfg);
    cfg.port = 8080;
    char *listen_arg = NULL;
    const char *port_file = NULL, *key_env = NULL;
    int opt;

    while ((opt = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (opt) {
        case OPT_LISTEN:
            free(listen_arg);
            listen_arg = aq_xstrdup(optarg);
            parse_listen(listen_arg, &cfg.host, &cfg.port);
            break;
        case OPT_PORT_FILE: port_file = optarg; break;
        case OPT_LATENCY: cfg.latency_ms = (int)parse_int("--latency-ms", optarg, 0, 3600000); break;
        case OPT_JITTER: cfg.jitter_ms = (int)parse_int("--jitter-ms", optarg, 0, 3600000); break;
        case OPT_RPM: cfg.rpm = parse_int("--rpm", optarg, 0, LLONG_MAX / 2); break;
        case OPT_TPM: cfg.tpm = parse_int("--tpm", optarg, 0, LLONG_MAX / 2); break;
        case OPT_FAIL_RATE: cfg.fail_rate = parse_rate("--fail-rate", optarg); break;
        case OPT_MALFORMED_RATE: cfg.malformed_rate = parse_rate("--malformed-rate", optarg); break;
        case OPT_HANG_RATE: cfg.hang_rate = parse_rate("--hang-rate", optarg); break;
        case OPT_MODE: {
            int mode = aq_mockllm_mode_parse(optarg);
            if (mode < 0) die_usage("--mode wants script or calc, not '%s'", optarg);
            cfg.mode = (aq_mockllm_mode)mode;
            break;
        }
        case OPT_SEED: cfg.seed = (uint64_t)parse_int("--seed", optarg, 0, LLONG_MAX); break;
        case OPT_API_KEY_ENV: key_env = optarg; break;
        case OPT_AUTH_HEADER:
            if (!*optarg || strchr(optarg, ':'))
                die_usage("--auth-header wants a header name such as api-key, not '%s'", optarg);
            cfg.auth_header = optarg;
            break;
        case OPT_REQUIRE_QUERY:
            if (!strchr(optarg, '=') || optarg[0] == '=')
                die_usage("--require-query wants NAME=VALUE, not '%s'", optarg);
            cfg.require_query = optarg;
            break;
        case OPT_WINDOW_REQUESTS:
            cfg.window_requests = (int)parse_int("--window-requests", optarg, 0, 1000000);
            break;
        case OPT_WINDOW_MS:
            cfg.window_ms = (int)parse_int("--window-ms", optarg, 1, 3600000);
            break;
        case OPT_ECHO_KEY: cfg.echo_key = true; break;
        case OPT_LOG_LEVEL: {
            int level = aq_log_level_parse(optarg);
            if (level < 0) die_usage("--log-level wants debug, info, warn or error, not '%s'", optarg);
            aq_log_set_level((aq_log_level)level);
            break;
        }
        case 'h':
        case OPT_HELP: fputs(usage_text, stdout); return 0;
        case OPT_VERSION: printf("agentq-mockllm %s\n", AGENTQ_VERSION); return 0;
        default: fprintf(stderr, "Try 'agentq-mockllm --help'.\n"); return 2;
        }
    }
    if (optind < argc) die_usage("unexpected argument '%s'", argv[optind]);
    if (cfg.auth_header && !key_env) die_usage("--auth-header needs --api-key-env");
    if (key_env) {
        const char *key = getenv(key_env);
        if (key && *key) {
            aq_log_add_secret(key);
            cfg.api_key = key;
        } else {
            aq_log(AQ_LOG_WARN, "%s is not set: not requiring an API key", key_env);
        }
    }

    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    struct event_base *base = event_base_new();
    if (!base) {
        aq_log(AQ_LOG_FATAL, "cannot create an event loop");
        return 1;
    }
    char err[256];
    aq_mockllm *m = aq_mockllm_new(base, &cfg, err, sizeof err);
    if (!m) {
        aq_log(AQ_LOG_FATAL, "%s", err);
        event_base_free(base);
        free(listen_arg);
        return 1;
    }
    struct event *sigint = evsignal_new(base, SIGINT, on_signal, base);
    struct event *sigterm = evsignal_new(base, SIGTERM, on_signal, base);
    if (!sigint || !sigterm || evsignal_add(sigint, NULL) || evsignal_add(sigterm, NULL)) {
        aq_log(AQ_LOG_FATAL, "cannot install signal handlers");
        return 1;
    }
    int port = aq_mockllm_port(m);
    if (port_file && write_port_file(port_file, port) != 0) {
        aq_log(AQ_LOG_FATAL, "cannot write port file %s: %s", port_file, strerror(errno));
        return 1;
    }
    const char *host = cfg.host;
    bool v6 = strchr(host, ':') != NULL;
    aq_log(AQ_LOG_INFO,
           "agentq-mockllm listening on http://%s%s%s:%d/v1 (port %d, mode %s, latency %d+-%d ms, "
           "rpm %lld, tpm %lld, window %d per %d ms, fail %g, malformed %g, hang %g, "
           "auth %s%s%s%s)",
           v6 ? "[" : "", host, v6 ? "]" : "", port, port,
           cfg.mode == AQ_MOCKLLM_CALC ? "calc" : "script", cfg.latency_ms, cfg.jitter_ms,
           (long long)cfg.rpm, (long long)cfg.tpm, cfg.window_requests,
           cfg.window_ms ? cfg.window_ms : 1000, cfg.fail_rate, cfg.malformed_rate,
           cfg.hang_rate,
           !cfg.api_key ? "off" : cfg.auth_header ? cfg.auth_header : "bearer",
           cfg.echo_key ? ", echoing keys" : "", cfg.require_query ? ", query " : "",
           cfg.require_query ? cfg.require_query : "");

    event_base_dispatch(base);

    aq_mockllm_stats st;
    aq_mockllm_get_stats(m, &st);
    aq_log(AQ_LOG_INFO,
           "agentq-mockllm stopped: requests %llu, completed %llu, rate_limited %llu, "
           "failures %llu, peak_in_flight %llu",
           (unsigned long long)st.requests, (unsigned long long)st.completed,
           (unsigned long long)st.rate_limited, (unsigned long long)st.failures,
           (unsigned long long)st.peak_in_flight);
    event_free(sigint);
    event_free(sigterm);
    aq_mockllm_free(m);
    event_base_free(base);
    free(listen_arg);
    return 0;
}
