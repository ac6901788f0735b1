/* agentq-worker — consumes agent tasks and runs them.
 *
 * Wires config, log, the worker (worker.h) and the metrics endpoints onto
 * one libevent loop; SIGTERM/SIGINT start a drain, a second one exits at
 * once (unacked tasks return to the queue). */
#include "agentq/config.h"
#include "agentq/log.h"
#include "agentq/metrics.h"
#include "agentq/worker.h"

#include <event2/event.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static void usage(FILE *out)
{
    fputs("Usage: agentq-worker [OPTIONS]\n"
          "\n"
          "Consumes agent tasks from RabbitMQ, runs each as an agent session (LLM calls with\n"
          "tool calling), and records every task's status and steps in PostgreSQL.\n"
          "\n"
          "  -c, --config FILE      configuration file (libconfig; see --example-config)\n"
          "  -n, --concurrency N    sessions at once, also the AMQP prefetch (worker.concurrency)\n"
          "      --set KEY=VALUE    override any key, e.g. --set llm.model=gpt-4o-mini\n"
          "      --print-config     print the effective configuration (secrets masked) and exit\n"
          "      --example-config   print an example file with every key and its default, and exit\n"
          "  -h, --help             this help\n"
          "  -V, --version          version\n"
          "\n"
          "Signals: SIGTERM or SIGINT drains (stop consuming, let running tasks finish for\n"
          "worker.drain_seconds, requeue the rest); a second one exits at once.\n"
          "Endpoints on metrics.listen: /metrics, /healthz, /readyz.\n"
          "The API key is read from the variable llm.api_key_env names (default AGENTQ_LLM_API_KEY).\n\n",
          out);
    aq_config_print_env_help(out);
}

typedef struct app {
    struct event_base *base;
    aq_worker *worker;
    int signals;
} app;

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    app *a = arg;
    if (++a->signals == 1) {
        aq_log(AQ_LOG_INFO, "signal %d: draining (send again to exit now)", (int)sig);
        aq_worker_drain(a->worker);
    } else {
        aq_log(AQ_LOG_WARN, "signal %d again: exiting now; unacked tasks return to the queue", (int)sig);
        event_base_loopbreak(a->base);
    }
}

static char *metrics_text(void *arg) { return aq_worker_metrics(arg); }
static bool metrics_ready(void *arg) { return aq_worker_ready(arg); }

/* Thousands of sessions need thousands of sockets: take the hard limit. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    const char *config_path = NULL, *concurrency = NULL;
    bool print_config = false;
    char **sets = aq_xcalloc((size_t)argc + 1, sizeof *sets);
    int nsets = 0;
    static const struct option longopts[] = {
        {"config", required_argument, 0, 'c'},  {"concurrency", required_argument, 0, 'n'},
        {"set", required_argument, 0, 's'},     {"print-config", no_argument, 0, 'P'},
        {"example-config", no_argument, 0, 'E'}, {"help", no_argument, 0, 'h'},
        {"version", no_argument, 0, 'V'},       {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "c:n:hV", longopts, NULL)) != -1) {
        switch (ch) {
        case 'c': config_path = optarg; break;
        case 'n': concurrency = optarg; break;
        case 's': sets[nsets++] = optarg; break;
        case 'P': print_config = true; break;
        case 'E': aq_config_write_example(stdout); free(sets); return 0;
        case 'h': usage(stdout); free(sets); return 0;
        case 'V': printf("agentq-worker %s\n", AGENTQ_VERSION); free(sets); return 0;
        default: fprintf(stderr, "Try 'agentq-worker --help'.\n"); free(sets); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "agentq-worker: unexpected argument '%s'. Try --help.\n", argv[optind]);
        free(sets);
        return 2;
    }
    aq_config cfg;
    char err[1024];
    int rc = aq_config_load(&cfg, config_path, err, sizeof err);
    if (rc == AQ_OK && concurrency) rc = aq_config_set(&cfg, "worker.concurrency", concurrency, err, sizeof err);
    for (int i = 0; rc == AQ_OK && i < nsets; i++) {
        char *eq = strchr(sets[i], '=');
        if (!eq) {
            snprintf(err, sizeof err, "--set '%s': expected KEY=VALUE", sets[i]);
            rc = AQ_EINVAL;
            break;
        }
        *eq = '\0';
        rc = aq_config_set(&cfg, sets[i], eq + 1, err, sizeof err);
    }
    if (rc == AQ_OK) rc = aq_config_check(&cfg, err, sizeof err);
    free(sets);
    if (rc != AQ_OK) {
        fprintf(stderr, "agentq-worker: %s\n", err);
        aq_config_free(&cfg);
        return 2;
    }
    if (print_config) {
        aq_config_dump(&cfg, stdout);
        aq_config_free(&cfg);
        return 0;
    }
    aq_log_set_level((aq_log_level)aq_log_level_parse(cfg.log_level));
    const char *key = aq_config_api_key(&cfg);
    if (key) aq_log_add_secret(key);
    raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);

    app a = {0};
    a.base = event_base_new();
    a.worker = aq_worker_new(&cfg, a.base, err, sizeof err);
    if (!a.worker) {
        aq_log(AQ_LOG_FATAL, "cannot start: %s", err);
        event_base_free(a.base);
        aq_config_free(&cfg);
        return 1;
    }
    aq_metrics *metrics = NULL;
    if (*cfg.metrics_listen) {
        aq_metrics_source src = {metrics_text, metrics_ready, a.worker};
        metrics = aq_metrics_new(a.base, cfg.metrics_listen, &src, err, sizeof err);
        if (!metrics) aq_log(AQ_LOG_WARN, "metrics disabled: %s", err);
        else aq_log(AQ_LOG_INFO, "metrics on port %d", aq_metrics_port(metrics));
    }
    struct event *sigterm = evsignal_new(a.base, SIGTERM, on_signal, &a);
    struct event *sigint = evsignal_new(a.base, SIGINT, on_signal, &a);
    event_add(sigterm, NULL);
    event_add(sigint, NULL);

    event_base_dispatch(a.base);

    aq_log(AQ_LOG_INFO, "worker stopping");
    aq_metrics_free(metrics);
    aq_worker_free(a.worker);
    event_free(sigterm);
    event_free(sigint);
    event_base_free(a.base);
    aq_config_free(&cfg);
    return 0;
}
