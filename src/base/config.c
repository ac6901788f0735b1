/* config.c — the key table and everything it drives (see config.h).
 *
 * Every scalar key is one row of config_keys[]: its section and name, its
 * type, where it lives in struct aq_config, its default as text, its bounds
 * and its doc. Defaults go through the same parser as file, environment and
 * flag values, so a default can never be out of its own bounds unnoticed.
 * The lists (skills.http, llm.prices, providers) are file-only and parsed
 * by hand; a providers list is checked in full as it is read, so each
 * error names the file and line of the entry at fault. */
#include "agentq/config.h"
#include "agentq/log.h"

#include <ctype.h>
#include <errno.h>
#include <libconfig.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef enum { K_STR, K_INT, K_DBL } key_type;

typedef struct config_key {
    const char *section;
    const char *name;
    key_type type;
    size_t offset;
    const char *def;
    double min, max;  /* for K_INT / K_DBL */
    bool secret_url;  /* mask the password when dumped */
    const char *doc;
} config_key;

#define OFF(f) offsetof(aq_config, f)

static const config_key config_keys[] = {
    {"amqp", "url", K_STR, OFF(amqp_url), "amqp://guest:guest@127.0.0.1:5672/%2f", 0, 0, true,
     "Broker URL: amqp://user:pass@host:port/vhost (vhost '/' is %2f). The nodes of a cluster: several URLs"
     " separated by commas, tried in turn from the one that last took a connection."},
    {"amqp", "queue_type", K_STR, OFF(amqp_queue_type), "classic", 0, 0, false,
     "Type of the queues agentq declares: classic (one node's, priority queues) or quorum (replicated over"
     " a cluster's nodes; each lane becomes amqp.priority_bands queues, drained highest band first)."},
    {"amqp", "priority_bands", K_INT, OFF(amqp_priority_bands), "3", 1, 10, false,
     "With quorum queues, which have no priorities: lane queues per lane (prefix + lane + '.b' + band),"
     " priorities 0-9 split evenly over them; a worker starts a higher band's task first."},
    {"amqp", "delivery_limit", K_INT, OFF(amqp_delivery_limit), "20", 1, 100000, false,
     "With quorum queues: deliveries of one message of amqp.queue before the broker dead-letters it (a"
     " message that brings workers down before it is recorded). Lanes have none: the store counts a"
     " recorded task's interruptions (amqp.max_interruptions)."},
    {"amqp", "heartbeat", K_INT, OFF(amqp_heartbeat), "30", 0, 600, false,
     "AMQP heartbeat in seconds (0 disables)."},
    {"amqp", "exchange", K_STR, OFF(amqp_exchange), "agentq", 0, 0, false,
     "Direct exchange tasks are published to (routing key 'task')."},
    {"amqp", "queue", K_STR, OFF(amqp_queue), "agentq.tasks", 0, 0, false,
     "Task queue (classic, durable, x-max-priority 9)."},
    {"amqp", "dlx", K_STR, OFF(amqp_dlx), "agentq.dlx", 0, 0, false,
     "Fanout exchange for dead letters."},
    {"amqp", "dead_queue", K_STR, OFF(amqp_dead_queue), "agentq.dead", 0, 0, false,
     "Queue bound to the dead-letter exchange."},
    {"amqp", "retry_prefix", K_STR, OFF(amqp_retry_prefix), "agentq.retry.", 0, 0, false,
     "Prefix of the retry tier queues (prefix + delay, e.g. agentq.retry.5s)."},
    {"amqp", "retry_delays", K_STR, OFF(amqp_retry_delays), "5s,30s,120s,600s", 0, 0, false,
     "Retry tiers: delay before attempt 2, 3, ... (units ms, s, m); the last repeats."},
    {"amqp", "max_attempts", K_INT, OFF(amqp_max_attempts), "4", 1, 100, false,
     "Failed attempts (LLM or skill errors out of retries) before a task goes to the dead-letter queue;"
     " a lost worker or a drain does not count here."},
    {"amqp", "max_interruptions", K_INT, OFF(amqp_max_interruptions), "10", 1, 1000, false,
     "Executions cut short by a lost worker (killed, cut off) or a drain before a task ends as failed"
     " with a dead letter of reason 'interrupted' (a task that brings workers down stops here)."},
    {"amqp", "lane_prefix", K_STR, OFF(amqp_lane_prefix), "agentq.lane.", 0, 0, false,
     "Prefix of the lane queues (prefix + number): workers route each task from amqp.queue into its"
     " user's lane and consume every lane under one prefetch, so users share the fleet fairly."},
    {"amqp", "lanes", K_INT, OFF(amqp_lanes), "32", 1, 1000, false,
     "Number of lane queues. A user's tasks stay in one lane (a user of weight w in w) while it has"
     " work; a newly active user takes the shorter of two lanes its name hashes to. Every worker of"
     " a fleet must use the same number."},
    {"amqp", "route_prefetch", K_INT, OFF(amqp_route_prefetch), "256", 1, 65535, false,
     "Prefetch of the routing consumer on amqp.queue (messages being recorded and moved to lanes)."},
    {"amqp", "consumer_timeout_ms", K_INT, OFF(amqp_consumer_timeout_ms), "7200000", 60000, 2147483647, false,
     "The broker's consumer_timeout: say what the broker does. A delivery held unstarted for a fifth of it goes"
     " back to its lane, and a session on one delivery for half of it hands itself over to a new one."},
    {"amqp", "management_url", K_STR, OFF(amqp_management_url), "", 0, 0, true,
     "RabbitMQ management HTTP API, http://user:pass@host:15672 (empty: none). Only agentqctl status and top"
     " read it, for each queue's unacked count (a passive queue.declare tells only ready messages)."},
    {"amqp", "ca_file", K_STR, OFF(amqp_ca_file), "", 0, 0, false,
     "PEM CA bundle that verifies an amqps:// broker's certificate; required while amqp.verify_peer is 1"
     " (rabbitmq-c does not read the system store: for a public CA, as Amazon MQ's, give"
     " /etc/ssl/certs/ca-certificates.crt)."},
    {"amqp", "cert_file", K_STR, OFF(amqp_cert_file), "", 0, 0, false,
     "PEM client certificate (chain) for a broker that asks for one (empty: none); needs amqp.key_file."},
    {"amqp", "key_file", K_STR, OFF(amqp_key_file), "", 0, 0, false,
     "Unencrypted PEM private key of amqp.cert_file (empty: none); needs amqp.cert_file."},
    {"amqp", "verify_peer", K_INT, OFF(amqp_verify_peer), "1", 0, 1, false,
     "1: an amqps:// broker's certificate must chain to amqp.ca_file and name the URL's host;"
     " 0: neither is checked (encrypted, but anyone can pose as the broker)."},

    {"postgres", "dsn", K_STR, OFF(pg_dsn), "postgresql://agentq@127.0.0.1:5432/agentq", 0, 0, true,
     "libpq connection string or URI of the result store."},
    {"postgres", "batch_max", K_INT, OFF(pg_batch_max), "500", 1, 100000, false,
     "Most status/step rows written in one transaction."},
    {"postgres", "flush_ms", K_INT, OFF(pg_flush_ms), "0", 0, 10000, false,
     "How long a write may wait to be batched with others (0: write at once; under load, writes that queue"
     " while a transaction is in flight are batched anyway)."},
    {"postgres", "pool_mode", K_STR, OFF(pg_pool_mode), "session", 0, 0, false,
     "How postgres.dsn reaches the database: 'session' (Postgres itself, or a pooler in session mode) or"
     " 'transaction' (a pooler that may run each transaction in another server session, as PgBouncer's"
     " pool_mode = transaction: statements are sent unnamed, and what needs a session of its own goes"
     " through postgres.listen_dsn, which must then be set)."},
    {"postgres", "listen_dsn", K_STR, OFF(pg_listen_dsn), "", 0, 0, true,
     "libpq connection string or URI of the connections that need a session of their own: LISTEN (a"
     " worker's cancel watcher and fleet limiter, agentqctl wait) and, with pool_mode 'transaction', a"
     " worker's liveness lock. Postgres itself or a session-mode pool; empty: postgres.dsn."},

    {"llm", "base_url", K_STR, OFF(llm_base_url), "http://127.0.0.1:8080/v1", 0, 0, true,
     "OpenAI-compatible API base URL (…/v1)."},
    {"llm", "api_key_env", K_STR, OFF(llm_api_key_env), "AGENTQ_LLM_API_KEY", 0, 0, false,
     "Name of the environment variable that holds the API key (never the key itself)."},
    {"llm", "model", K_STR, OFF(llm_model), "mock-1", 0, 0, false,
     "Default model for tasks that name none."},
    {"llm", "models", K_STR, OFF(llm_models), "", 0, 0, false,
     "Comma-separated models tasks may ask for (empty: only llm.model)."},
    {"llm", "timeout_ms", K_INT, OFF(llm_timeout_ms), "120000", 100, 3600000, false,
     "Timeout of one LLM request once it is sent."},
    {"llm", "connect_timeout_ms", K_INT, OFF(llm_connect_timeout_ms), "10000", 100, 600000, false,
     "Timeout to connect to the provider."},
    {"llm", "max_connections", K_INT, OFF(llm_max_connections), "1024", 1, 100000, false,
     "Most open connections to the provider (kept alive and reused)."},
    {"llm", "max_retries", K_INT, OFF(llm_max_retries), "3", 0, 100, false,
     "Retries of a 5xx, network error or malformed reply within one step."},
    {"llm", "retry_backoff_ms", K_INT, OFF(llm_retry_backoff_ms), "500", 1, 600000, false,
     "First retry backoff; doubles each retry, with jitter."},
    {"llm", "requests_per_minute", K_INT, OFF(llm_requests_per_minute), "0", 0, 100000000, false,
     "Provider request limit for this fleet (0: unlimited)."},
    {"llm", "tokens_per_minute", K_INT, OFF(llm_tokens_per_minute), "0", 0, 2000000000, false,
     "Provider token limit for this fleet (0: unlimited)."},
    {"llm", "price_input_per_mtok", K_DBL, OFF(llm_price_input_per_mtok), "-1", -1, 1e6, false,
     "USD per million prompt tokens of the models llm.prices does not list (-1: not set; then every"
     " model but the simulator's mock-1 needs an llm.prices entry, and a worker refuses to start without)."},
    {"llm", "price_output_per_mtok", K_DBL, OFF(llm_price_output_per_mtok), "-1", -1, 1e6, false,
     "USD per million completion tokens of the models llm.prices does not list (-1: not set)."},
    {"llm", "routing", K_STR, OFF(llm_routing), "order", 0, 0, false,
     "Which provider serves a model several serve: 'order' (the first in the providers list with capacity)"
     " or 'weight' (spread by the providers' weight among those with capacity)."},
    {"llm", "breaker_failures", K_INT, OFF(llm_breaker_failures), "3", 1, 1000, false,
     "Failures in a row (5xx, connect errors, timeouts, malformed replies; a 429 pauses the provider+model for its"
     " Retry-After instead) after which a provider+model is cooled down:"
     " no call goes to it until a probe after llm.breaker_cooldown_ms succeeds."},
    {"llm", "breaker_cooldown_ms", K_INT, OFF(llm_breaker_cooldown_ms), "2000", 100, 3600000, false,
     "How long a failing provider+model is cooled down before one probe call; a failed probe cools it down"
     " as long again (a provider back is noticed within this)."},
    {"llm", "temperature", K_DBL, OFF(llm_temperature), "-1", -1, 2, false,
     "Sampling temperature sent with every call of tasks that set none (-1: not sent, the provider's default)."},
    {"llm", "max_tokens", K_INT, OFF(llm_max_tokens), "0", 0, 10000000, false,
     "max_tokens sent with every call (0: not sent); also what a call reserves of tokens/min for its reply"
     " (256 when not sent)."},
    {"llm", "ca_file", K_STR, OFF(llm_ca_file), "", 0, 0, false,
     "PEM CA bundle for every HTTPS request a worker makes: LLM providers, HTTP skills and http_get"
     " (empty: the system store). It replaces the system store: for a private CA and public sites"
     " alike, give a bundle holding both."},

    {"cache", "enabled", K_INT, OFF(cache_enabled), "0", 0, 1, false,
     "1: replies to deterministic calls (temperature at most cache.max_temperature) are kept in Postgres"
     " (agentq.llm_cache) and an identical call anywhere in the fleet is answered from there: no grant, cost 0."},
    {"cache", "ttl_seconds", K_INT, OFF(cache_ttl_seconds), "86400", 1, 31536000, false,
     "How long a cached reply is used."},
    {"cache", "max_mb", K_INT, OFF(cache_max_mb), "256", 1, 1048576, false,
     "Most MiB of cached replies; the oldest go first."},
    {"cache", "max_temperature", K_DBL, OFF(cache_max_temperature), "0", 0, 2, false,
     "Highest temperature a call may have and be cached (a call that sends none is never cached)."},

    {"worker", "id", K_STR, OFF(worker_id), "", 0, 0, false,
     "Worker id in rows and logs (empty: hostname-pid)."},
    {"worker", "concurrency", K_INT, OFF(worker_concurrency), "256", 1, 65535, false,
     "Sessions run at once; also the AMQP prefetch (a 16-bit count in AMQP 0-9-1)."},
    {"worker", "lookahead", K_INT, OFF(worker_lookahead), "0", 0, 65535, false,
     "Deliveries held beyond worker.concurrency, so the worker can choose what starts next (higher"
     " priority first, then the user with the fewest running per weight); 0: concurrency/4, at least 8."},
    {"worker", "drain_seconds", K_INT, OFF(worker_drain_seconds), "30", 0, 86400, false,
     "On SIGTERM, how long in-flight sessions may finish before they are requeued."},
    {"worker", "lease_seconds", K_INT, OFF(worker_lease_seconds), "30", 3, 3600, false,
     "Lease of a running task, renewed every third of it: a copy of the task delivered elsewhere runs"
     " only once the lease expired or its worker is gone; the sweeper republishes running tasks whose"
     " lease expired."},

    {"agent", "system_prompt", K_STR, OFF(agent_system_prompt),
     "You are a capable assistant. Use the tools when they help, then answer concisely.", 0, 0, false,
     "System prompt of every session."},
    {"agent", "max_context_bytes", K_INT, OFF(agent_max_context_bytes), "65536", 1024, 16777216, false,
     "Cap on a session's history; the oldest tool turns are dropped first."},
    {"agent", "max_tool_calls", K_INT, OFF(agent_max_tool_calls), "8", 1, 128, false,
     "Most tool calls run from one LLM reply."},

    {"skills", "enabled", K_STR, OFF(skills_enabled), "calculator,http_get,current_time", 0, 0, false,
     "Built-in skills offered to the model (HTTP skills in skills.http are added)."},
    {"skills", "http_get_allow", K_STR, OFF(skills_http_get_allow), "", 0, 0, false,
     "Hosts http_get may reach even when they resolve to an address the SSRF guard refuses (IANA"
     " special-purpose ranges, this host's own addresses)."},
    {"skills", "http_get_max_bytes", K_INT, OFF(skills_http_get_max_bytes), "65536", 1024, 16777216, false,
     "Largest http_get response read; the text given to the model is truncated."},
    {"skills", "http_get_timeout_ms", K_INT, OFF(skills_http_get_timeout_ms), "10000", 100, 600000, false,
     "Timeout of one http_get."},

    {"limits", "mode", K_STR, OFF(limits_mode), "local", 0, 0, false,
     "'local': each process holds llm.*_per_minute itself; 'fleet': the whole fleet shares them through "
     "Postgres (agentq.rate_limits)."},
    {"limits", "bucket", K_STR, OFF(limits_bucket), "llm", 0, 0, false,
     "Name of the fleet's shared buckets in agentq.rate_limits (<bucket>:requests, <bucket>:tokens)."},
    {"limits", "max_inflight_per_user", K_INT, OFF(limits_max_inflight_per_user), "0", 0, 1000000, false,
     "Most running tasks per user across the fleet (0: no cap; agentq.users.max_inflight overrides it"
     " per user); a task of a user past it waits, held by a worker or in its lane, unrun and without using an attempt."},

    {"limits", "over_budget", K_STR, OFF(limits_over_budget), "fail", 0, 0, false,
     "What a task of a user over its daily budget (agentq.users) does: 'fail' ends it as budget_exceeded"
     " with a dead letter naming the budget (requeue it with agentqctl once raised); 'wait' leaves it"
     " waiting, unrun, until the next UTC day or a raised budget (agentq.users.over_budget overrides)."},

    {"retention", "older_than", K_STR, OFF(retention_older_than), "", 0, 0, false,
     "Workers delete finished tasks (with their steps) and dead letters older than this, e.g. 30d"
     " (agentq.prune; DURATION: 30s, 15m, 12h, 7d, 1d12h); empty: keep everything."},
    {"retention", "interval_seconds", K_INT, OFF(retention_interval_seconds), "3600", 1, 604800, false,
     "How often a worker prunes (every worker may: rows another holds are skipped)."},
    {"retention", "batch", K_INT, OFF(retention_batch), "1000", 1, 100000, false,
     "Tasks (and dead letters) deleted per transaction: short ones, so no long lock is held."},

    {"metrics", "listen", K_STR, OFF(metrics_listen), "0.0.0.0:9464", 0, 0, false,
     "Address of /metrics, /healthz and /readyz (empty: off)."},

    {"log", "level", K_STR, OFF(log_level), "info", 0, 0, false,
     "debug, info, warn or error."},
};

#define STR_AT(cfg, k) ((char **)((char *)(cfg) + (k)->offset))
#define INT_AT(cfg, k) ((int *)((char *)(cfg) + (k)->offset))
#define DBL_AT(cfg, k) ((double *)((char *)(cfg) + (k)->offset))

static const config_key *find_key(const char *section, size_t seclen, const char *name)
{
    for (size_t i = 0; i < AQ_ARRAY_LEN(config_keys); i++) {
        const config_key *k = &config_keys[i];
        if (strlen(k->section) == seclen && !strncmp(k->section, section, seclen) &&
            !strcmp(k->name, name))
            return k;
    }
    return NULL;
}

/* Checks bounds and stores; `where` prefixes the message ("file:3: "). */
static int set_value(aq_config *cfg, const config_key *k, const char *text, const char *where,
                     char *err, size_t errlen)
{
    char *end;
    switch (k->type) {
    case K_STR:
        free(*STR_AT(cfg, k));
        *STR_AT(cfg, k) = aq_xstrdup(text);
        return AQ_OK;
    case K_INT: {
        errno = 0;
        long long v = strtoll(text, &end, 10);
        while (isspace((unsigned char)*end)) end++;
        if (errno || end == text || *end) {
            aq_seterr(err, errlen, "%skey '%s.%s': expected an integer, got '%s'", where,
                      k->section, k->name, text);
            return AQ_EINVAL;
        }
        if ((double)v < k->min || (double)v > k->max) {
            aq_seterr(err, errlen, "%skey '%s.%s': must be from %.0f to %.0f (got %lld)", where,
                      k->section, k->name, k->min, k->max, v);
            return AQ_EINVAL;
        }
        *INT_AT(cfg, k) = (int)v;
        return AQ_OK;
    }
    case K_DBL: {
        errno = 0;
        double v = strtod(text, &end);
        while (isspace((unsigned char)*end)) end++;
        if (errno || end == text || *end || !isfinite(v)) {
            aq_seterr(err, errlen, "%skey '%s.%s': expected a number, got '%s'", where,
                      k->section, k->name, text);
            return AQ_EINVAL;
        }
        if (v < k->min || v > k->max) {
            aq_seterr(err, errlen, "%skey '%s.%s': must be from %g to %g (got %g)", where,
                      k->section, k->name, k->min, k->max, v);
            return AQ_EINVAL;
        }
        *DBL_AT(cfg, k) = v;
        return AQ_OK;
    }
    }
    return AQ_EINVAL;
}

void aq_config_init(aq_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    for (size_t i = 0; i < AQ_ARRAY_LEN(config_keys); i++) {
        int rc = set_value(cfg, &config_keys[i], config_keys[i].def, "", NULL, 0);
        if (rc != AQ_OK) abort(); /* a default outside its own bounds is a build bug */
    }
}

int aq_config_set(aq_config *cfg, const char *key, const char *value, char *err, size_t errlen)
{
    const char *dot = strchr(key, '.');
    const config_key *k = dot ? find_key(key, (size_t)(dot - key), dot + 1) : NULL;
    if (!k) {
        aq_seterr(err, errlen, "unknown configuration key '%s'", key);
        return AQ_EINVAL;
    }
    return set_value(cfg, k, value, "", err, errlen);
}

static char *dup_setting_string(const config_setting_t *s, const char *name)
{
    const char *v = NULL;
    if (!config_setting_lookup_string(s, name, &v)) return NULL;
    return aq_xstrdup(v);
}

static int where_prefix(const config_setting_t *s, const char *path, char *buf, size_t len)
{
    const char *file = config_setting_source_file(s);
    return snprintf(buf, len, "%s:%d: ", file ? file : path, config_setting_source_line(s));
}

static int parse_http_skills(aq_config *cfg, config_setting_t *list, const char *path,
                             char *err, size_t errlen)
{
    char where[512];
    if (!config_setting_is_list(list) && !config_setting_is_array(list)) {
        where_prefix(list, path, where, sizeof where);
        aq_seterr(err, errlen, "%skey 'skills.http': must be a list of groups ( { name = ...; }, ... )", where);
        return AQ_EINVAL;
    }
    int n = config_setting_length(list);
    cfg->http_skills = aq_xcalloc((size_t)n, sizeof *cfg->http_skills);
    for (int i = 0; i < n; i++) {
        config_setting_t *g = config_setting_get_elem(list, (unsigned)i);
        aq_http_skill *sk = &cfg->http_skills[cfg->n_http_skills++];
        where_prefix(g, path, where, sizeof where);
        if (!config_setting_is_group(g)) {
            aq_seterr(err, errlen, "%skey 'skills.http[%d]': must be a group { ... }", where, i);
            return AQ_EINVAL;
        }
        sk->name = dup_setting_string(g, "name");
        sk->description = dup_setting_string(g, "description");
        sk->parameters = dup_setting_string(g, "parameters");
        sk->url = dup_setting_string(g, "url");
        sk->timeout_ms = 10000;
        int t;
        if (config_setting_lookup_int(g, "timeout_ms", &t)) sk->timeout_ms = t;
        const char *missing = !sk->name ? "name" : !sk->url ? "url" : NULL;
        if (missing) {
            aq_seterr(err, errlen, "%skey 'skills.http[%d].%s': required", where, i, missing);
            return AQ_EINVAL;
        }
        for (const char *p = sk->name; *p; p++)
            if (!isalnum((unsigned char)*p) && *p != '_' && *p != '-') {
                aq_seterr(err, errlen, "%skey 'skills.http[%d].name': '%s' may hold only letters, digits, '_' and '-'",
                          where, i, sk->name);
                return AQ_EINVAL;
            }
        if (sk->timeout_ms < 100 || sk->timeout_ms > 600000) {
            aq_seterr(err, errlen, "%skey 'skills.http[%d].timeout_ms': must be from 100 to 600000", where, i);
            return AQ_EINVAL;
        }
        if (!sk->description) sk->description = aq_xstrdup(sk->name);
        if (!sk->parameters) sk->parameters = aq_xstrdup("{\"type\":\"object\",\"properties\":{}}");
    }
    return AQ_OK;
}

static int parse_prices(aq_config *cfg, config_setting_t *list, const char *path, char *err, size_t errlen)
{
    char where[512];
    int n = config_setting_length(list);
    cfg->prices = aq_xcalloc((size_t)n, sizeof *cfg->prices);
    for (int i = 0; i < n; i++) {
        config_setting_t *g = config_setting_get_elem(list, (unsigned)i);
        aq_model_price *p = &cfg->prices[cfg->n_prices++];
        where_prefix(g, path, where, sizeof where);
        p->model = g ? dup_setting_string(g, "model") : NULL;
        if (!p->model || !config_setting_lookup_float(g, "input_per_mtok", &p->input_per_mtok) ||
            !config_setting_lookup_float(g, "output_per_mtok", &p->output_per_mtok) ||
            p->input_per_mtok < 0 || p->output_per_mtok < 0) {
            aq_seterr(err, errlen,
                      "%skey 'llm.prices[%d]': needs model (string), input_per_mtok and output_per_mtok (numbers >= 0, written with a decimal point)",
                      where, i);
            return AQ_EINVAL;
        }
    }
    return AQ_OK;
}

/* ---- providers ---------------------------------------------------- */

/* Refuses a setting of group `g` not in `allowed` (a typo must not pass as
 * a default). */
static int only_keys(const config_setting_t *g, const char *const *allowed, const char *path, const char *what,
                     char *err, size_t errlen)
{
    for (int i = 0; i < config_setting_length(g); i++) {
        config_setting_t *s = config_setting_get_elem(g, (unsigned)i);
        const char *name = config_setting_name(s);
        bool ok = false;
        for (const char *const *a = allowed; *a && !ok; a++) ok = name && !strcmp(*a, name);
        if (!ok) {
            char where[512];
            where_prefix(s, path, where, sizeof where);
            aq_seterr(err, errlen, "%skey '%s.%s': unknown (known: ", where, what, name ? name : "?");
            size_t l = strlen(err);
            for (const char *const *a = allowed; *a && l + 1 < errlen; a++)
                l += (size_t)snprintf(err + l, errlen - l, "%s%s", a == allowed ? "" : ", ", *a);
            if (l + 1 < errlen) snprintf(err + l, errlen - l, ")");
            return AQ_EINVAL;
        }
    }
    return AQ_OK;
}

/* A number written as an integer or with a decimal point; false if absent. */
static bool lookup_number(const config_setting_t *g, const char *name, double *v, bool *is_number)
{
    config_setting_t *s = config_setting_get_member(g, name);
    *is_number = true;
    if (!s) return false;
    switch (config_setting_type(s)) {
    case CONFIG_TYPE_INT: *v = config_setting_get_int(s); return true;
    case CONFIG_TYPE_INT64: *v = (double)config_setting_get_int64(s); return true;
    case CONFIG_TYPE_FLOAT: *v = config_setting_get_float(s); return true;
    default: *is_number = false; return true;
    }
}

/* Reads the number `name` of `g` into *v within [min, max]; absent leaves
 * *v as it is unless `required`. */
static int group_number(const config_setting_t *g, const char *name, double min, double max, bool required,
                        double *v, const char *path, const char *what, char *err, size_t errlen)
{
    char where[512];
    double x;
    bool is_number;
    if (!lookup_number(g, name, &x, &is_number)) {
        if (!required) return AQ_OK;
        where_prefix(g, path, where, sizeof where);
        aq_seterr(err, errlen, "%skey '%s.%s': required", where, what, name);
        return AQ_EINVAL;
    }
    where_prefix(config_setting_get_member(g, name), path, where, sizeof where);
    if (!is_number) {
        aq_seterr(err, errlen, "%skey '%s.%s': expected a number", where, what, name);
        return AQ_EINVAL;
    }
    if (!isfinite(x) || x < min || x > max) {
        aq_seterr(err, errlen, "%skey '%s.%s': must be from %g to %g (got %g)", where, what, name, min, max, x);
        return AQ_EINVAL;
    }
    *v = x;
    return AQ_OK;
}

/* The string `name` of `g`, copied, or `def` (copied; NULL: required). */
static int group_string(const config_setting_t *g, const char *name, const char *def, char **out, const char *path,
                        const char *what, char *err, size_t errlen)
{
    char where[512];
    config_setting_t *s = config_setting_get_member(g, name);
    if (!s) {
        if (def) {
            *out = aq_xstrdup(def);
            return AQ_OK;
        }
        where_prefix(g, path, where, sizeof where);
        aq_seterr(err, errlen, "%skey '%s.%s': required", where, what, name);
        return AQ_EINVAL;
    }
    where_prefix(s, path, where, sizeof where);
    if (config_setting_type(s) != CONFIG_TYPE_STRING) {
        aq_seterr(err, errlen, "%skey '%s.%s': expected a string in double quotes", where, what, name);
        return AQ_EINVAL;
    }
    *out = aq_xstrdup(config_setting_get_string(s));
    return AQ_OK;
}

static bool name_ok(const char *n)
{
    if (!*n || strlen(n) > 100) return false;
    for (const char *p = n; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("_-.:/@", *p)) return false;
    return true;
}

static int parse_model(aq_provider *pv, aq_provider_model *m, const config_setting_t *g, const char *path,
                       const char *what, char *err, size_t errlen)
{
    static const char *const keys[] = {"name", "upstream", "requests_per_minute", "tokens_per_minute",
                                       "max_concurrent", "input_per_mtok", "output_per_mtok", NULL};
    char where[512];
    where_prefix(g, path, where, sizeof where);
    if (!config_setting_is_group(g)) {
        aq_seterr(err, errlen, "%skey '%s': must be a group { name = ...; }", where, what);
        return AQ_EINVAL;
    }
    int rc = only_keys(g, keys, path, what, err, errlen);
    if (rc == AQ_OK) rc = group_string(g, "name", NULL, &m->name, path, what, err, errlen);
    if (rc == AQ_OK && !name_ok(m->name)) {
        aq_seterr(err, errlen, "%skey '%s.name': '%s' must be 1 to 100 letters, digits or _-.:/@", where, what,
                  m->name);
        rc = AQ_EINVAL;
    }
    if (rc == AQ_OK) rc = group_string(g, "upstream", m->name, &m->upstream, path, what, err, errlen);
    double rpm = 0, tpm = 0, conc = 0;
    m->price_in = m->price_out = -1;
    if (rc == AQ_OK) rc = group_number(g, "requests_per_minute", 0, 1e8, false, &rpm, path, what, err, errlen);
    if (rc == AQ_OK) rc = group_number(g, "tokens_per_minute", 0, 2e9, false, &tpm, path, what, err, errlen);
    if (rc == AQ_OK) rc = group_number(g, "max_concurrent", 0, 100000, false, &conc, path, what, err, errlen);
    if (rc == AQ_OK && (rpm != floor(rpm) || tpm != floor(tpm) || conc != floor(conc))) {
        aq_seterr(err, errlen, "%skey '%s': requests_per_minute, tokens_per_minute and max_concurrent are whole numbers",
                  where, what);
        rc = AQ_EINVAL;
    }
    /* A price is never assumed: a wrong one makes every budget wrong. */
    if (rc == AQ_OK) rc = group_number(g, "input_per_mtok", 0, 1e6, false, &m->price_in, path, what, err, errlen);
    if (rc == AQ_OK) rc = group_number(g, "output_per_mtok", 0, 1e6, false, &m->price_out, path, what, err, errlen);
    if (rc == AQ_OK && (m->price_in < 0 || m->price_out < 0)) {
        aq_seterr(err, errlen,
                  "%skey '%s': model '%s' of provider '%s' has no price: set input_per_mtok and output_per_mtok"
                  " (USD per million tokens; 0.0 for a free model)",
                  where, what, m->name, pv->name);
        rc = AQ_EINVAL;
    }
    m->rpm = (int64_t)rpm;
    m->tpm = (int64_t)tpm;
    m->max_concurrent = (int)conc;
    return rc;
}

static int parse_provider(aq_provider *pv, const config_setting_t *g, int index, const char *path, char *err,
                          size_t errlen)
{
    static const char *const keys[] = {"name", "base_url", "api_key_env", "auth", "auth_header", "query",
                                       "weight", "models", NULL};
    char where[512], what[64];
    snprintf(what, sizeof what, "providers[%d]", index);
    where_prefix(g, path, where, sizeof where);
    if (!config_setting_is_group(g)) {
        aq_seterr(err, errlen, "%skey '%s': must be a group { name = ...; base_url = ...; models = (...); }", where,
                  what);
        return AQ_EINVAL;
    }
    int rc = only_keys(g, keys, path, what, err, errlen);
    if (rc == AQ_OK) rc = group_string(g, "name", NULL, &pv->name, path, what, err, errlen);
    if (rc == AQ_OK && !name_ok(pv->name)) {
        aq_seterr(err, errlen, "%skey '%s.name': '%s' must be 1 to 100 letters, digits or _-.:/@", where, what,
                  pv->name);
        return AQ_EINVAL;
    }
    if (rc == AQ_OK) rc = group_string(g, "base_url", NULL, &pv->base_url, path, what, err, errlen);
    if (rc == AQ_OK && strncmp(pv->base_url, "http://", 7) && strncmp(pv->base_url, "https://", 8)) {
        aq_seterr(err, errlen, "%skey '%s.base_url': '%s' must be an http:// or https:// URL", where, what,
                  pv->base_url);
        return AQ_EINVAL;
    }
    if (rc == AQ_OK) rc = group_string(g, "api_key_env", "", &pv->api_key_env, path, what, err, errlen);
    char *auth = NULL;
    if (rc == AQ_OK) rc = group_string(g, "auth", "bearer", &auth, path, what, err, errlen);
    if (rc == AQ_OK) {
        if (!strcmp(auth, "bearer")) pv->auth = AQ_AUTH_BEARER;
        else if (!strcmp(auth, "header")) pv->auth = AQ_AUTH_HEADER;
        else if (!strcmp(auth, "none")) pv->auth = AQ_AUTH_NONE;
        else {
            config_setting_t *s = config_setting_get_member(g, "auth");
            where_prefix(s, path, where, sizeof where);
            aq_seterr(err, errlen, "%skey '%s.auth': unknown auth style '%s' (bearer, header or none)", where, what,
                      auth);
            rc = AQ_EINVAL;
        }
    }
    free(auth);
    if (rc == AQ_OK) rc = group_string(g, "auth_header", "api-key", &pv->auth_header, path, what, err, errlen);
    if (rc == AQ_OK && pv->auth_header[strcspn(pv->auth_header, ": \t\r\n")]) {
        aq_seterr(err, errlen, "%skey '%s.auth_header': '%s' is not a header name", where, what, pv->auth_header);
        rc = AQ_EINVAL;
    }
    if (rc == AQ_OK) rc = group_string(g, "query", "", &pv->query, path, what, err, errlen);
    if (rc == AQ_OK && pv->query[strcspn(pv->query, " #?\r\n")]) {
        aq_seterr(err, errlen, "%skey '%s.query': '%s' must be name=value pairs joined by '&'", where, what,
                  pv->query);
        rc = AQ_EINVAL;
    }
    double weight = 1;
    if (rc == AQ_OK) rc = group_number(g, "weight", 1, 1000, false, &weight, path, what, err, errlen);
    pv->weight = (int)weight;
    if (rc != AQ_OK) return rc;
    config_setting_t *models = config_setting_get_member(g, "models");
    if (!models || !(config_setting_is_list(models) || config_setting_is_array(models)) ||
        config_setting_length(models) == 0) {
        if (models) where_prefix(models, path, where, sizeof where);
        aq_seterr(err, errlen, "%skey '%s.models': must list the models it serves ( { name = ...; ... }, ... )",
                  where, what);
        return AQ_EINVAL;
    }
    int n = config_setting_length(models);
    pv->models = aq_xcalloc((size_t)n, sizeof *pv->models);
    for (int i = 0; i < n; i++) {
        config_setting_t *mg = config_setting_get_elem(models, (unsigned)i);
        char mwhat[96];
        snprintf(mwhat, sizeof mwhat, "%s.models[%d]", what, i);
        aq_provider_model *m = &pv->models[pv->n_models++];
        if ((rc = parse_model(pv, m, mg, path, mwhat, err, errlen)) != AQ_OK) return rc;
        for (int j = 0; j < i; j++)
            if (!strcmp(pv->models[j].name, m->name)) {
                where_prefix(mg, path, where, sizeof where);
                aq_seterr(err, errlen, "%skey '%s.name': provider '%s' lists model '%s' twice", where, mwhat,
                          pv->name, m->name);
                return AQ_EINVAL;
            }
    }
    return AQ_OK;
}

static int parse_providers(aq_config *cfg, config_setting_t *list, const char *path, char *err, size_t errlen)
{
    char where[512];
    where_prefix(list, path, where, sizeof where);
    if (!(config_setting_is_list(list) || config_setting_is_array(list)) || config_setting_length(list) == 0) {
        aq_seterr(err, errlen, "%skey 'providers': must be a list of groups ( { name = ...; }, ... )", where);
        return AQ_EINVAL;
    }
    aq_config_providers_free(cfg->providers, cfg->n_providers);
    int n = config_setting_length(list);
    cfg->providers = aq_xcalloc((size_t)n, sizeof *cfg->providers);
    cfg->n_providers = 0;
    for (int i = 0; i < n; i++) {
        config_setting_t *g = config_setting_get_elem(list, (unsigned)i);
        aq_provider *pv = &cfg->providers[cfg->n_providers++];
        int rc = parse_provider(pv, g, i, path, err, errlen);
        if (rc != AQ_OK) return rc;
        for (int j = 0; j < i; j++)
            if (!strcmp(cfg->providers[j].name, pv->name)) {
                config_setting_t *s = config_setting_get_member(g, "name");
                where_prefix(s ? s : g, path, where, sizeof where);
                aq_seterr(err, errlen, "%skey 'providers[%d].name': provider '%s' is declared twice", where, i,
                          pv->name);
                return AQ_EINVAL;
            }
    }
    return AQ_OK;
}

static int load_file(aq_config *cfg, const char *path, char *err, size_t errlen)
{
    config_t lc;
    config_init(&lc);
    int rc = AQ_OK;
    if (!config_read_file(&lc, path)) {
        if (config_error_type(&lc) == CONFIG_ERR_FILE_IO)
            aq_seterr(err, errlen, "%s: cannot read configuration file: %s", path, strerror(errno));
        else
            aq_seterr(err, errlen, "%s:%d: %s", config_error_file(&lc) ? config_error_file(&lc) : path,
                      config_error_line(&lc), config_error_text(&lc));
        config_destroy(&lc);
        return AQ_EINVAL;
    }
    config_setting_t *root = config_root_setting(&lc);
    char where[512];
    for (int i = 0; rc == AQ_OK && i < config_setting_length(root); i++) {
        config_setting_t *sec = config_setting_get_elem(root, (unsigned)i);
        const char *sname = config_setting_name(sec);
        where_prefix(sec, path, where, sizeof where);
        if (sname && !strcmp(sname, "providers")) {
            rc = parse_providers(cfg, sec, path, err, errlen);
            continue;
        }
        if (!config_setting_is_group(sec)) {
            aq_seterr(err, errlen, "%s'%s': expected a section { ... }", where, sname);
            rc = AQ_EINVAL;
            break;
        }
        for (int j = 0; rc == AQ_OK && j < config_setting_length(sec); j++) {
            config_setting_t *s = config_setting_get_elem(sec, (unsigned)j);
            const char *kname = config_setting_name(s);
            where_prefix(s, path, where, sizeof where);
            if (!strcmp(sname, "skills") && !strcmp(kname, "http")) {
                rc = parse_http_skills(cfg, s, path, err, errlen);
                continue;
            }
            if (!strcmp(sname, "llm") && !strcmp(kname, "prices")) {
                rc = parse_prices(cfg, s, path, err, errlen);
                continue;
            }
            const config_key *k = find_key(sname, strlen(sname), kname);
            if (!k) {
                aq_seterr(err, errlen, "%sunknown key '%s.%s'", where, sname, kname);
                rc = AQ_EINVAL;
                break;
            }
            char text[64];
            const char *val = text;
            switch (config_setting_type(s)) {
            case CONFIG_TYPE_STRING: val = config_setting_get_string(s); break;
            case CONFIG_TYPE_INT: snprintf(text, sizeof text, "%d", config_setting_get_int(s)); break;
            case CONFIG_TYPE_INT64:
                snprintf(text, sizeof text, "%lld", config_setting_get_int64(s));
                break;
            case CONFIG_TYPE_FLOAT: snprintf(text, sizeof text, "%.17g", config_setting_get_float(s)); break;
            case CONFIG_TYPE_BOOL: snprintf(text, sizeof text, "%d", config_setting_get_bool(s)); break;
            default:
                aq_seterr(err, errlen, "%skey '%s.%s': expected a single value", where, sname, kname);
                rc = AQ_EINVAL;
                continue;
            }
            if (k->type == K_STR && config_setting_type(s) != CONFIG_TYPE_STRING) {
                aq_seterr(err, errlen, "%skey '%s.%s': expected a string in double quotes", where, sname, kname);
                rc = AQ_EINVAL;
            } else if (k->type != K_STR && config_setting_type(s) == CONFIG_TYPE_STRING) {
                aq_seterr(err, errlen, "%skey '%s.%s': expected a number, got a string", where, sname, kname);
                rc = AQ_EINVAL;
            } else if (k->type == K_INT && config_setting_type(s) == CONFIG_TYPE_FLOAT) {
                aq_seterr(err, errlen, "%skey '%s.%s': expected an integer, got %s", where, sname, kname, text);
                rc = AQ_EINVAL;
            } else {
                rc = set_value(cfg, k, val, where, err, errlen);
            }
        }
    }
    config_destroy(&lc);
    return rc;
}

/* AGENTQ_<SECTION>_<KEY>, upper-cased. */
static void env_name(const config_key *k, char *buf, size_t len)
{
    snprintf(buf, len, "AGENTQ_%s_%s", k->section, k->name);
    for (char *p = buf; *p; p++) *p = (char)toupper((unsigned char)*p);
}

static int load_env(aq_config *cfg, char *err, size_t errlen)
{
    for (size_t i = 0; i < AQ_ARRAY_LEN(config_keys); i++) {
        char name[128], where[160];
        env_name(&config_keys[i], name, sizeof name);
        const char *v = getenv(name);
        if (!v) continue;
        snprintf(where, sizeof where, "environment %s: ", name);
        int rc = set_value(cfg, &config_keys[i], v, where, err, errlen);
        if (rc != AQ_OK) return rc;
    }
    return AQ_OK;
}

/* Parses one delay like "5s", "500ms", "2m"; returns ms or -1. */
static long parse_delay_ms(const char *s, size_t n)
{
    char buf[32];
    if (n == 0 || n >= sizeof buf) return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *end;
    long v = strtol(buf, &end, 10);
    if (end == buf || v <= 0) return -1;
    if (!strcmp(end, "ms")) return v;
    if (!strcmp(end, "s") || !*end) return v * 1000;
    if (!strcmp(end, "m")) return v * 60000;
    if (!strcmp(end, "h")) return v * 3600000;
    return -1;
}

int aq_config_retry_delays(const aq_config *cfg, long *ms, int max)
{
    int n = 0;
    const char *p = cfg->amqp_retry_delays;
    while (*p) {
        size_t len = strcspn(p, ",");
        const char *s = p;
        size_t l = len;
        while (l && isspace((unsigned char)*s)) { s++; l--; }
        while (l && isspace((unsigned char)s[l - 1])) l--;
        long v = parse_delay_ms(s, l);
        if (v < 0 || n >= max) return AQ_EINVAL;
        ms[n++] = v;
        p += len;
        if (*p == ',') p++;
    }
    return n > 0 ? n : AQ_EINVAL;
}

/* The price of a model of the llm.* provider: its llm.prices entry, else
 * llm.price_* when set, else 0 for the simulator's default model; false
 * when it has none. */
static bool legacy_price(const aq_config *cfg, const char *model, double *in, double *out)
{
    for (int i = 0; i < cfg->n_prices; i++)
        if (!strcmp(cfg->prices[i].model, model)) {
            *in = cfg->prices[i].input_per_mtok;
            *out = cfg->prices[i].output_per_mtok;
            return true;
        }
    if (cfg->llm_price_input_per_mtok >= 0 && cfg->llm_price_output_per_mtok >= 0) {
        *in = cfg->llm_price_input_per_mtok;
        *out = cfg->llm_price_output_per_mtok;
        return true;
    }
    *in = *out = 0;
    return !strcmp(model, AQ_DEFAULT_MODEL);
}

static bool served(const aq_config *cfg, const char *model, void *arg)
{
    (void)arg;
    for (int i = 0; i < cfg->n_providers; i++)
        for (int j = 0; j < cfg->providers[i].n_models; j++)
            if (!strcmp(cfg->providers[i].models[j].name, model)) return true;
    return false;
}

/* Calls fn(model) for llm.model and each of llm.models; stops at the
 * first that returns false and gives its name. */
typedef bool (*model_fn)(const aq_config *cfg, const char *model, void *arg);

static bool each_listed_model(const aq_config *cfg, model_fn fn, void *arg, char *bad, size_t badlen)
{
    if (!fn(cfg, cfg->llm_model, arg)) {
        snprintf(bad, badlen, "%s", cfg->llm_model);
        return false;
    }
    const char *p = cfg->llm_models;
    while (*p) {
        while (*p == ' ' || *p == ',') p++;
        size_t len = strcspn(p, ",");
        size_t l = len;
        while (l && p[l - 1] == ' ') l--;
        if (l) {
            snprintf(bad, badlen, "%.*s", (int)l, p);
            if (!fn(cfg, bad, arg)) return false;
        }
        p += len;
    }
    return true;
}

static bool priced(const aq_config *cfg, const char *model, void *arg)
{
    (void)arg;
    double in, out;
    return legacy_price(cfg, model, &in, &out);
}

/* Every model a task may name has a provider and a price. */
static int check_models(const aq_config *cfg, char *err, size_t errlen)
{
    char bad[256];
    if (cfg->n_providers) {
        if (!each_listed_model(cfg, served, NULL, bad, sizeof bad)) {
            aq_seterr(err, errlen, "key '%s': model '%s' is served by no provider (add it to a provider's models)",
                      !strcmp(bad, cfg->llm_model) ? "llm.model" : "llm.models", bad);
            return AQ_EINVAL;
        }
        return AQ_OK;
    }
    if (!each_listed_model(cfg, priced, NULL, bad, sizeof bad)) {
        aq_seterr(err, errlen,
                  "key 'llm.prices': model '%s' has no price: add { model = \"%s\"; input_per_mtok = ...;"
                  " output_per_mtok = ...; } to llm.prices (USD per million tokens; 0.0 for a free model), or set"
                  " llm.price_input_per_mtok and llm.price_output_per_mtok",
                  bad, bad);
        return AQ_EINVAL;
    }
    return AQ_OK;
}

static void copy_provider(aq_provider *d, const aq_provider *s)
{
    *d = *s;
    d->name = aq_xstrdup(s->name);
    d->base_url = aq_xstrdup(s->base_url);
    d->api_key_env = aq_xstrdup(s->api_key_env);
    d->auth_header = aq_xstrdup(s->auth_header);
    d->query = aq_xstrdup(s->query);
    d->models = aq_xcalloc((size_t)s->n_models, sizeof *d->models);
    for (int i = 0; i < s->n_models; i++) {
        d->models[i] = s->models[i];
        d->models[i].name = aq_xstrdup(s->models[i].name);
        d->models[i].upstream = aq_xstrdup(s->models[i].upstream);
    }
}

/* Appends `model` to the llm.* provider `arg` (each_listed_model's callback). */
static bool add_legacy_model(const aq_config *cfg, const char *model, void *arg)
{
    aq_provider *pv = arg;
    for (int i = 0; i < pv->n_models; i++)
        if (!strcmp(pv->models[i].name, model)) return true;
    pv->models = aq_xrealloc(pv->models, (size_t)(pv->n_models + 1) * sizeof *pv->models);
    aq_provider_model *m = &pv->models[pv->n_models++];
    memset(m, 0, sizeof *m);
    m->name = aq_xstrdup(model);
    m->upstream = aq_xstrdup(model);
    m->rpm = cfg->llm_requests_per_minute;
    m->tpm = cfg->llm_tokens_per_minute;
    legacy_price(cfg, model, &m->price_in, &m->price_out);
    return true;
}

aq_provider *aq_config_providers(const aq_config *cfg, int *n)
{
    if (cfg->n_providers) {
        aq_provider *p = aq_xcalloc((size_t)cfg->n_providers, sizeof *p);
        for (int i = 0; i < cfg->n_providers; i++) copy_provider(&p[i], &cfg->providers[i]);
        *n = cfg->n_providers;
        return p;
    }
    aq_provider *pv = aq_xcalloc(1, sizeof *pv);
    pv->name = aq_xstrdup("default");
    pv->base_url = aq_xstrdup(cfg->llm_base_url);
    pv->api_key_env = aq_xstrdup(cfg->llm_api_key_env);
    pv->auth = AQ_AUTH_BEARER;
    pv->auth_header = aq_xstrdup("");
    pv->query = aq_xstrdup("");
    pv->weight = 1;
    pv->shared_limits = true; /* llm.requests_per_minute was always the provider's, not a model's */
    char bad[256];
    each_listed_model(cfg, add_legacy_model, pv, bad, sizeof bad);
    *n = 1;
    return pv;
}

void aq_config_providers_free(aq_provider *p, int n)
{
    for (int i = 0; p && i < n; i++) {
        free(p[i].name);
        free(p[i].base_url);
        free(p[i].api_key_env);
        free(p[i].auth_header);
        free(p[i].query);
        for (int j = 0; j < p[i].n_models; j++) {
            free(p[i].models[j].name);
            free(p[i].models[j].upstream);
        }
        free(p[i].models);
    }
    free(p);
}

char *aq_config_task_models(const aq_config *cfg)
{
    if (!cfg->n_providers) return aq_xstrdup(*cfg->llm_models ? cfg->llm_models : cfg->llm_model);
    size_t cap = 1;
    for (int i = 0; i < cfg->n_providers; i++)
        for (int j = 0; j < cfg->providers[i].n_models; j++) cap += strlen(cfg->providers[i].models[j].name) + 1;
    char *list = aq_xmalloc(cap);
    list[0] = '\0';
    for (int i = 0; i < cfg->n_providers; i++)
        for (int j = 0; j < cfg->providers[i].n_models; j++) {
            const char *m = cfg->providers[i].models[j].name;
            if (aq_config_list_has(list, m)) continue;
            if (*list) strcat(list, ",");
            strcat(list, m);
        }
    return list;
}

/* A file a TLS key names must be there and readable now: a worker that
 * starts and then fails every connection says less than one that refuses
 * to start. An encrypted key is refused too: rabbitmq-c would ask for its
 * passphrase on the terminal. */
static int check_tls_file(const char *key, const char *path, bool private_key, char *err, size_t errlen)
{
    if (!*path) return AQ_OK;
    char buf[4096];
    FILE *f = fopen(path, "r");
    int e = f ? 0 : errno;
    size_t n = 0;
    if (f) {
        errno = 0;
        n = fread(buf, 1, sizeof buf - 1, f); /* the first PEM header is near the top */
        if (ferror(f)) e = errno ? errno : EIO; /* a directory opens, then fails here */
        fclose(f);
    }
    if (e) {
        aq_seterr(err, errlen, "key '%s': '%s' cannot be read: %s", key, path, strerror(e));
        return AQ_EINVAL;
    }
    buf[n] = '\0';
    if (!strstr(buf, "-----BEGIN ")) {
        aq_seterr(err, errlen, "key '%s': '%s' is not a PEM file (no -----BEGIN line)", key, path);
        return AQ_EINVAL;
    }
    if (private_key && strstr(buf, "ENCRYPTED")) {
        aq_seterr(err, errlen, "key '%s': '%s' is an encrypted private key; give it unencrypted"
                  " (openssl pkey -in KEY -out KEY.plain), readable by the worker only", key, path);
        return AQ_EINVAL;
    }
    return AQ_OK;
}

/* The TLS keys against each other and the URLs they apply to. */
static int check_tls(const aq_config *cfg, char *err, size_t errlen)
{
    bool amqps = !strncmp(cfg->amqp_url, "amqps://", 8);
    if (amqps && cfg->amqp_verify_peer && !*cfg->amqp_ca_file) {
        aq_seterr(err, errlen, "key 'amqp.ca_file': required for an amqps:// amqp.url while amqp.verify_peer = 1:"
                  " rabbitmq-c does not use the system CA store (for a public CA, as Amazon MQ's, set it to"
                  " /etc/ssl/certs/ca-certificates.crt)");
        return AQ_EINVAL;
    }
    if (!*cfg->amqp_cert_file != !*cfg->amqp_key_file) {
        aq_seterr(err, errlen, "keys 'amqp.cert_file' and 'amqp.key_file': set both or neither (cert_file '%s',"
                  " key_file '%s')", cfg->amqp_cert_file, cfg->amqp_key_file);
        return AQ_EINVAL;
    }
    const char *set = *cfg->amqp_ca_file ? "amqp.ca_file" : *cfg->amqp_cert_file ? "amqp.cert_file" : NULL;
    if (set && !amqps) {
        /* Someone meant TLS; a plain URL would quietly go without it. */
        aq_seterr(err, errlen, "key '%s': set, but amqp.url is not an amqps:// URL, so the connection would not"
                  " use TLS: make the URL amqps:// or clear the TLS keys", set);
        return AQ_EINVAL;
    }
    if (check_tls_file("amqp.ca_file", cfg->amqp_ca_file, false, err, errlen) ||
        check_tls_file("amqp.cert_file", cfg->amqp_cert_file, false, err, errlen) ||
        check_tls_file("amqp.key_file", cfg->amqp_key_file, true, err, errlen) ||
        check_tls_file("llm.ca_file", cfg->llm_ca_file, false, err, errlen))
        return AQ_EINVAL;
    return AQ_OK;
}

int aq_config_check(const aq_config *cfg, char *err, size_t errlen)
{
    long delays[32];
    if (aq_config_retry_delays(cfg, delays, 32) < 0) {
        aq_seterr(err, errlen, "key 'amqp.retry_delays': '%s' must be a comma-separated list of delays like 5s,30s,2m (at most 32)",
                  cfg->amqp_retry_delays);
        return AQ_EINVAL;
    }
    if (aq_log_level_parse(cfg->log_level) < 0) {
        aq_seterr(err, errlen, "key 'log.level': '%s' must be debug, info, warn or error", cfg->log_level);
        return AQ_EINVAL;
    }
    if (strcmp(cfg->limits_mode, "local") && strcmp(cfg->limits_mode, "fleet")) {
        aq_seterr(err, errlen, "key 'limits.mode': '%s' must be 'local' or 'fleet'", cfg->limits_mode);
        return AQ_EINVAL;
    }
    if (strcmp(cfg->limits_over_budget, "fail") && strcmp(cfg->limits_over_budget, "wait")) {
        aq_seterr(err, errlen, "key 'limits.over_budget': '%s' must be 'fail' or 'wait'", cfg->limits_over_budget);
        return AQ_EINVAL;
    }
    if (strcmp(cfg->pg_pool_mode, "session") && strcmp(cfg->pg_pool_mode, "transaction")) {
        aq_seterr(err, errlen, "key 'postgres.pool_mode': '%s' must be 'session' or 'transaction'", cfg->pg_pool_mode);
        return AQ_EINVAL;
    }
    if (aq_config_pg_transaction_pool(cfg) && !*cfg->pg_listen_dsn) {
        aq_seterr(err, errlen, "key 'postgres.pool_mode': 'transaction' needs postgres.listen_dsn, the DSN of Postgres"
                  " itself or of a session-mode pool (LISTEN and a worker's liveness lock need a session of their own)");
        return AQ_EINVAL;
    }
    if (!*cfg->amqp_lane_prefix || strlen(cfg->amqp_lane_prefix) > 200) {
        aq_seterr(err, errlen, "key 'amqp.lane_prefix': must be a queue name prefix of 1 to 200 bytes");
        return AQ_EINVAL;
    }
    if (!*cfg->limits_bucket || strlen(cfg->limits_bucket) > 100) {
        aq_seterr(err, errlen, "key 'limits.bucket': must be a name of 1 to 100 bytes");
        return AQ_EINVAL;
    }
    int nodes = aq_config_amqp_nodes(cfg);
    if (nodes == 0) {
        aq_seterr(err, errlen, "key 'amqp.url': must be an amqp:// or amqps:// URL, or several separated by"
                  " commas");
        return AQ_EINVAL;
    }
    for (int i = 0; i < nodes; i++) {
        char node[1024], shown[1024];
        if (!aq_config_amqp_node(cfg, i, node, sizeof node)) {
            aq_seterr(err, errlen, "key 'amqp.url': node %d of %d is longer than %zu bytes", i + 1, nodes,
                      sizeof node - 1);
            return AQ_EINVAL;
        }
        aq_log_redact(node, shown, sizeof shown);
        const char *host = strstr(node, "://");
        if (strncmp(node, "amqp://", 7) && strncmp(node, "amqps://", 8)) {
            aq_seterr(err, errlen, "key 'amqp.url': node %d of %d, '%s', is not an amqp:// or amqps:// URL",
                      i + 1, nodes, shown);
            return AQ_EINVAL;
        }
        if (!host || !host[3] || host[3] == '/' || host[3] == ':') {
            aq_seterr(err, errlen, "key 'amqp.url': node %d of %d, '%s', names no host", i + 1, nodes, shown);
            return AQ_EINVAL;
        }
        if (i > 0 && !strncmp(node, "amqps://", 8) != !strncmp(cfg->amqp_url, "amqps://", 8)) {
            aq_seterr(err, errlen, "key 'amqp.url': node %d of %d, '%s', mixes amqp:// and amqps:// with node 1:"
                      " one set of TLS keys serves every node", i + 1, nodes, shown);
            return AQ_EINVAL;
        }
    }
    if (strcmp(cfg->amqp_queue_type, "classic") && strcmp(cfg->amqp_queue_type, "quorum")) {
        aq_seterr(err, errlen, "key 'amqp.queue_type': '%s' must be 'classic' or 'quorum'", cfg->amqp_queue_type);
        return AQ_EINVAL;
    }
    if (*cfg->amqp_management_url && strncmp(cfg->amqp_management_url, "http://", 7) &&
        strncmp(cfg->amqp_management_url, "https://", 8)) {
        aq_seterr(err, errlen, "key 'amqp.management_url': must be empty or an http:// or https:// URL");
        return AQ_EINVAL;
    }
    if (!cfg->n_providers && strncmp(cfg->llm_base_url, "http://", 7) && strncmp(cfg->llm_base_url, "https://", 8)) {
        aq_seterr(err, errlen, "key 'llm.base_url': must be an http:// or https:// URL");
        return AQ_EINVAL;
    }
    if (!*cfg->llm_model) {
        aq_seterr(err, errlen, "key 'llm.model': must name a model");
        return AQ_EINVAL;
    }
    if (strcmp(cfg->llm_routing, "order") && strcmp(cfg->llm_routing, "weight")) {
        aq_seterr(err, errlen, "key 'llm.routing': '%s' must be 'order' or 'weight'", cfg->llm_routing);
        return AQ_EINVAL;
    }
    if ((cfg->llm_price_input_per_mtok < 0) != (cfg->llm_price_output_per_mtok < 0)) {
        aq_seterr(err, errlen, "keys 'llm.price_input_per_mtok' and 'llm.price_output_per_mtok': set both or neither");
        return AQ_EINVAL;
    }
    if (check_models(cfg, err, errlen) != AQ_OK) return AQ_EINVAL;
    long long keep;
    char why[256];
    if (*cfg->retention_older_than &&
        aq_config_parse_duration(cfg->retention_older_than, &keep, why, sizeof why) != AQ_OK) {
        aq_seterr(err, errlen, "key 'retention.older_than': %s", why);
        return AQ_EINVAL;
    }
    if (check_tls(cfg, err, errlen) != AQ_OK) return AQ_EINVAL;
    for (int i = 0; i < cfg->n_http_skills; i++)
        for (int j = 0; j < i; j++)
            if (!strcmp(cfg->http_skills[i].name, cfg->http_skills[j].name)) {
                aq_seterr(err, errlen, "key 'skills.http': skill '%s' is declared twice", cfg->http_skills[i].name);
                return AQ_EINVAL;
            }
    return AQ_OK;
}

int aq_config_load(aq_config *cfg, const char *path, char *err, size_t errlen)
{
    aq_config_init(cfg);
    int rc = path ? load_file(cfg, path, err, errlen) : AQ_OK;
    if (rc == AQ_OK) rc = load_env(cfg, err, errlen);
    if (rc == AQ_OK && (rc = aq_config_check(cfg, err, errlen)) != AQ_OK && path && err && errlen) {
        /* A check across keys has no one line: name the file at least. */
        char *why = aq_xstrdup(err);
        aq_seterr(err, errlen, "%s: %s", path, why);
        free(why);
    }
    return rc;
}

void aq_config_free(aq_config *cfg)
{
    if (!cfg) return;
    for (size_t i = 0; i < AQ_ARRAY_LEN(config_keys); i++)
        if (config_keys[i].type == K_STR) {
            free(*STR_AT(cfg, &config_keys[i]));
            *STR_AT(cfg, &config_keys[i]) = NULL;
        }
    for (int i = 0; i < cfg->n_http_skills; i++) {
        aq_http_skill *s = &cfg->http_skills[i];
        free(s->name);
        free(s->description);
        free(s->parameters);
        free(s->url);
    }
    free(cfg->http_skills);
    aq_config_providers_free(cfg->providers, cfg->n_providers);
    cfg->providers = NULL;
    cfg->n_providers = 0;
    for (int i = 0; i < cfg->n_prices; i++) free(cfg->prices[i].model);
    free(cfg->prices);
    cfg->http_skills = NULL;
    cfg->prices = NULL;
    cfg->n_http_skills = cfg->n_prices = 0;
}

static void print_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', out);
        if (*s == '\n') { fputs("\\n", out); continue; }
        fputc(*s, out);
    }
    fputc('"', out);
}

static void print_value(FILE *out, const config_key *k, const aq_config *cfg, bool mask)
{
    char buf[2048];
    switch (k->type) {
    case K_STR:
        if (mask && k->secret_url) {
            aq_log_redact(*STR_AT(cfg, k), buf, sizeof buf);
            print_string(out, buf);
        } else {
            print_string(out, *STR_AT(cfg, k));
        }
        break;
    case K_INT: fprintf(out, "%d", *INT_AT(cfg, k)); break;
    case K_DBL: fprintf(out, "%.6f", *DBL_AT(cfg, k)); break;
    }
}

static void dump(FILE *out, const aq_config *cfg, bool with_docs)
{
    const char *section = NULL;
    for (size_t i = 0; i < AQ_ARRAY_LEN(config_keys); i++) {
        const config_key *k = &config_keys[i];
        if (!section || strcmp(section, k->section)) {
            if (section) fputs("};\n\n", out);
            section = k->section;
            fprintf(out, "%s = {\n", section);
        }
        if (with_docs) {
            char env[128];
            env_name(k, env, sizeof env);
            fprintf(out, "  # %s (env %s)\n", k->doc, env);
        }
        fprintf(out, "  %s = ", k->name);
        print_value(out, k, cfg, !with_docs); /* the example holds only defaults: nothing secret */
        fputs(";\n", out);
        if (with_docs && !strcmp(k->section, "llm") && !strcmp(k->name, "price_output_per_mtok"))
            fputs("  # Per-model prices (file only):\n"
                  "  # prices = ( { model = \"gpt-4o-mini\"; input_per_mtok = 0.15; output_per_mtok = 0.60; } );\n",
                  out);
        if (with_docs && !strcmp(k->section, "skills") && !strcmp(k->name, "http_get_timeout_ms"))
            fputs("  # HTTP skills (file only): the worker POSTs {\"arguments\",\"task_id\",\"user_id\"} to url\n"
                  "  # and gives the reply to the model.\n"
                  "  # http = ( { name = \"weather\"; description = \"Weather for a city\";\n"
                  "  #            parameters = \"{\\\"type\\\":\\\"object\\\",\\\"properties\\\":{\\\"city\\\":{\\\"type\\\":\\\"string\\\"}}}\";\n"
                  "  #            url = \"http://weather.internal/v1/skill\"; timeout_ms = 5000; } );\n",
                  out);
    }
    if (section) fputs("};\n", out);
}

void aq_config_dump(const aq_config *cfg, FILE *out)
{
    dump(out, cfg, false);
    for (int i = 0; i < cfg->n_http_skills; i++)
        fprintf(out, "# skills.http: %s -> %s\n", cfg->http_skills[i].name, cfg->http_skills[i].url);
    for (int i = 0; i < cfg->n_prices; i++)
        fprintf(out, "# llm.prices: %s in %.4f out %.4f per Mtok\n", cfg->prices[i].model,
                cfg->prices[i].input_per_mtok, cfg->prices[i].output_per_mtok);
    static const char *const auth_names[] = {"bearer", "header", "none"};
    for (int i = 0; i < cfg->n_providers; i++) {
        const aq_provider *pv = &cfg->providers[i];
        char url[2048];
        aq_log_redact(pv->base_url, url, sizeof url);
        fprintf(out, "# provider %s: %s auth %s%s%s key from %s weight %d\n", pv->name, url, auth_names[pv->auth],
                pv->auth == AQ_AUTH_HEADER ? " " : "", pv->auth == AQ_AUTH_HEADER ? pv->auth_header : "",
                *pv->api_key_env ? pv->api_key_env : "(none)", pv->weight);
        for (int j = 0; j < pv->n_models; j++) {
            const aq_provider_model *m = &pv->models[j];
            fprintf(out, "#   model %s (upstream %s): %lld rpm, %lld tpm, %d concurrent, in %.4f out %.4f per Mtok\n",
                    m->name, m->upstream, (long long)m->rpm, (long long)m->tpm, m->max_concurrent, m->price_in,
                    m->price_out);
        }
    }
}

void aq_config_write_example(FILE *out)
{
    aq_config cfg;
    aq_config_init(&cfg);
    fputs("# agentq configuration (libconfig syntax). Every key is shown with its default.\n"
          "# Every key can be overridden by AGENTQ_<SECTION>_<KEY> in the environment.\n"
          "# API keys are never written here: llm.api_key_env names the variable holding it.\n\n",
          out);
    dump(out, &cfg, true);
    fputs("\n# Several LLM providers (file only; docs/providers.md). Without this list the llm.*\n"
          "# keys make one provider, \"default\". Every model needs its price (0.0 for a free one).\n"
          "# providers = (\n"
          "#   { name = \"openai\"; base_url = \"https://api.openai.com/v1\"; api_key_env = \"OPENAI_API_KEY\";\n"
          "#     models = ( { name = \"gpt-4o-mini\"; requests_per_minute = 5000; tokens_per_minute = 4000000;\n"
          "#                  input_per_mtok = 0.15; output_per_mtok = 0.60; } ); },\n"
          "#   { name = \"azure\"; base_url = \"https://RESOURCE.openai.azure.com/openai/deployments/{model}\";\n"
          "#     api_key_env = \"AZURE_OPENAI_API_KEY\"; auth = \"header\"; auth_header = \"api-key\";\n"
          "#     query = \"api-version=2024-10-21\"; weight = 1;\n"
          "#     models = ( { name = \"gpt-4o-mini\"; upstream = \"DEPLOYMENT\"; max_concurrent = 100;\n"
          "#                  input_per_mtok = 0.15; output_per_mtok = 0.60; } ); }\n"
          "# );\n",
          out);
    aq_config_free(&cfg);
}

void aq_config_print_env_help(FILE *out)
{
    fputs("Environment (overrides the file; every key has one):\n", out);
    for (size_t i = 0; i < AQ_ARRAY_LEN(config_keys); i++) {
        char env[128];
        env_name(&config_keys[i], env, sizeof env);
        fprintf(out, "  %-36s %s\n", env, config_keys[i].doc);
    }
}

const char *aq_config_api_key(const aq_config *cfg)
{
    const char *v = *cfg->llm_api_key_env ? getenv(cfg->llm_api_key_env) : NULL;
    return v && *v ? v : NULL;
}


int aq_config_lane_prefetch(const aq_config *cfg)
{
    long ahead = cfg->worker_lookahead;
    if (ahead <= 0) ahead = cfg->worker_concurrency / 4 > 8 ? cfg->worker_concurrency / 4 : 8;
    long n = (long)cfg->worker_concurrency + ahead;
    return n > 65535 ? 65535 : (int)n;
}

int64_t aq_config_max_hold_ms(const aq_config *cfg) { return cfg->amqp_consumer_timeout_ms / 5; }

/* amqp.url's nodes: runs of characters other than commas and blanks. */
static const char *node_at(const char *s, int i, size_t *len)
{
    for (int k = 0;; k++) {
        s += strspn(s, ", \t\n");
        if (!*s) return NULL;
        size_t n = strcspn(s, ", \t\n");
        if (k == i) {
            *len = n;
            return s;
        }
        s += n;
    }
}

int aq_config_amqp_nodes(const aq_config *cfg)
{
    int n = 0;
    size_t len;
    while (cfg->amqp_url && node_at(cfg->amqp_url, n, &len)) n++;
    return n;
}

bool aq_config_amqp_node(const aq_config *cfg, int i, char *buf, size_t len)
{
    size_t n;
    const char *s = i >= 0 && cfg->amqp_url ? node_at(cfg->amqp_url, i, &n) : NULL;
    if (!s || n >= len) return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return true;
}

bool aq_config_quorum(const aq_config *cfg) { return !strcmp(cfg->amqp_queue_type, "quorum"); }

const char *aq_config_listen_dsn(const aq_config *cfg)
{
    return *cfg->pg_listen_dsn ? cfg->pg_listen_dsn : cfg->pg_dsn;
}

bool aq_config_pg_transaction_pool(const aq_config *cfg) { return !strcmp(cfg->pg_pool_mode, "transaction"); }

int aq_config_bands(const aq_config *cfg) { return aq_config_quorum(cfg) ? cfg->amqp_priority_bands : 1; }

int aq_config_band_of(const aq_config *cfg, int priority)
{
    if (priority < 0) priority = 0;
    if (priority > 9) priority = 9;
    return priority * aq_config_bands(cfg) / 10;
}

void aq_config_handover_ms(const aq_config *cfg, int64_t *soft_ms, int64_t *hard_ms)
{
    /* Keep a tenth (at least 10 s) for the claim, the last write and the
     * ack, and the time a delivery may wait held before it starts. */
    int64_t limit = cfg->amqp_consumer_timeout_ms;
    int64_t margin = limit / 10 > 10000 ? limit / 10 : 10000;
    *hard_ms = limit - margin - aq_config_max_hold_ms(cfg);
    *soft_ms = limit / 2 < *hard_ms ? limit / 2 : *hard_ms;
}

/* DURATION: whole numbers each followed by a unit, d, h, m or s, each
 * unit at most once and the largest first (30s, 15m, 12h, 7d, 1d12h,
 * 2h30m). More than 0 s, at most AQ_DURATION_MAX (see config.h). */
int aq_config_parse_duration(const char *s, long long *out, char *err, size_t errlen)
{
    static const struct {
        char unit;
        long long secs;
    } units[] = {{'d', 86400}, {'h', 3600}, {'m', 60}, {'s', 1}};
    size_t next = 0;
    long long total = 0;
    const char *p = s;
    bool ok = *p != '\0';
    while (ok && *p) {
        long long n = 0;
        if (!isdigit((unsigned char)*p)) ok = false;
        while (ok && isdigit((unsigned char)*p)) {
            n = n * 10 + (*p++ - '0');
            if (n > AQ_DURATION_MAX) ok = false;
        }
        size_t u = next; /* a unit already used, or a smaller one before, is no match */
        while (ok && u < AQ_ARRAY_LEN(units) && units[u].unit != *p) u++;
        if (!ok || u == AQ_ARRAY_LEN(units)) {
            ok = false;
            break;
        }
        p++;
        total += n * units[u].secs;
        next = u + 1;
        if (total > AQ_DURATION_MAX) ok = false;
    }
    if (!ok) {
        aq_seterr(err, errlen,
                  "'%s' is not a duration: whole numbers with units d, h, m, s, largest first"
                  " (30s, 15m, 12h, 7d, 1d12h)", s);
        return AQ_EINVAL;
    }
    if (total == 0) {
        aq_seterr(err, errlen, "'%s': a duration must be longer than 0s", s);
        return AQ_EINVAL;
    }
    *out = total;
    return AQ_OK;
}

bool aq_config_list_has(const char *list, const char *name)
{
    size_t n = strlen(name);
    const char *p = list;
    while (p && *p) {
        while (*p == ' ' || *p == ',') p++;
        size_t len = strcspn(p, ",");
        size_t l = len;
        while (l && p[l - 1] == ' ') l--;
        if (l == n && !strncmp(p, name, n)) return true;
        p += len;
    }
    return false;
}
