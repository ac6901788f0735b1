/* config.h — the one configuration of every agentq program.
 *
 * One table of keys (type, default, bounds, doc) drives everything: the
 * defaults, reading a libconfig file, AGENTQ_<SECTION>_<KEY> environment
 * overrides, command-line overrides, the example file and the dump of the
 * effective configuration. Order of precedence, lowest first: defaults,
 * file, environment, command line (aq_config_set after aq_config_load).
 *
 * API keys are never configuration values: llm.api_key_env names the
 * environment variable that holds the key, and aq_config_api_key() reads it.
 *
 * The config is a plain struct passed explicitly; there is no global. */
#ifndef AGENTQ_CONFIG_H
#define AGENTQ_CONFIG_H

#include "agentq/common.h"
#include <stdio.h>

/* A skill declared in the config file: the worker POSTs the arguments to
 * `url` and hands the reply to the model. */
typedef struct aq_http_skill {
    char *name;
    char *description;
    char *parameters; /* JSON Schema object, as JSON text */
    char *url;
    int timeout_ms;
} aq_http_skill;

/* Price of a model in USD per million tokens. */
typedef struct aq_model_price {
    char *model;
    double input_per_mtok;
    double output_per_mtok;
} aq_model_price;

/* How a provider wants its API key. */
typedef enum aq_auth_style {
    AQ_AUTH_BEARER = 0, /* Authorization: Bearer KEY (OpenAI, vLLM, llama.cpp, most) */
    AQ_AUTH_HEADER,     /* <auth_header>: KEY (Azure OpenAI's api-key) */
    AQ_AUTH_NONE,       /* no key is sent */
} aq_auth_style;

/* One model a provider serves, with its limits and price. */
typedef struct aq_provider_model {
    char *name;          /* the model as tasks name it */
    char *upstream;      /* as the provider names it: the request's "model",
                          * and {model} in base_url (an Azure deployment) */
    int64_t rpm, tpm;    /* requests and tokens per minute; 0: no limit */
    int max_concurrent;  /* requests in flight from one worker; 0: no limit */
    double price_in, price_out; /* USD per million prompt / completion tokens */
} aq_provider_model;

/* An LLM endpoint (aq_config_providers). */
typedef struct aq_provider {
    char *name;
    char *base_url;      /* OpenAI-style ".../v1"; may hold {model} */
    char *api_key_env;   /* the variable holding its key; "": none */
    aq_auth_style auth;
    char *auth_header;   /* AQ_AUTH_HEADER: the header's name */
    char *query;         /* "name=value&..." added to every request's URL; "" none */
    int weight;          /* share of the calls under llm.routing = "weight" */
    bool shared_limits;  /* one rpm/tpm bucket for all its models (the llm.* provider) */
    aq_provider_model *models;
    int n_models;
} aq_provider;

/* The model the defaults name: the simulator, priced 0 unless llm.prices
 * or llm.price_* say otherwise. */
#define AQ_DEFAULT_MODEL "mock-1"

typedef struct aq_config {
    /* amqp */
    char *amqp_url;
    int amqp_heartbeat;
    char *amqp_exchange;
    char *amqp_queue;
    char *amqp_dlx;
    char *amqp_dead_queue;
    char *amqp_retry_prefix;
    char *amqp_retry_delays;
    int amqp_max_attempts;
    int amqp_max_interruptions;
    int amqp_consumer_timeout_ms;
    char *amqp_lane_prefix;
    int amqp_lanes;
    int amqp_route_prefetch;
    char *amqp_management_url;         /* "": not configured */
    char *amqp_ca_file;                /* amqps: PEM CA bundle; "": none */
    char *amqp_cert_file;              /* amqps: client certificate; "": none */
    char *amqp_key_file;               /* amqps: its private key; "": none */
    int amqp_verify_peer;              /* amqps: 1 verify chain and host, 0 neither */
    char *amqp_queue_type;             /* "classic" or "quorum" */
    int amqp_priority_bands;           /* quorum: lane queues per lane, by priority */
    int amqp_delivery_limit;           /* quorum: deliveries of an ingress message */
    /* postgres */
    char *pg_dsn;
    int pg_batch_max;
    int pg_flush_ms;
    char *pg_pool_mode;                /* "session" or "transaction" */
    char *pg_listen_dsn;               /* "": postgres.dsn (aq_config_listen_dsn) */
    /* llm */
    char *llm_base_url;
    char *llm_api_key_env;
    char *llm_model;
    char *llm_models;
    int llm_timeout_ms;
    int llm_connect_timeout_ms;
    int llm_max_connections;
    int llm_max_retries;
    int llm_retry_backoff_ms;
    int llm_requests_per_minute;
    int llm_tokens_per_minute;
    double llm_price_input_per_mtok;   /* < 0: not set */
    double llm_price_output_per_mtok;
    char *llm_routing;
    int llm_breaker_failures;
    int llm_breaker_cooldown_ms;
    double llm_temperature;            /* < 0: not sent */
    int llm_max_tokens;                /* 0: not sent */
    char *llm_ca_file;                 /* CA bundle of every HTTPS transfer; "": system store */
    /* cache */
    int cache_enabled;
    int cache_ttl_seconds;
    int cache_max_mb;
    double cache_max_temperature;
    /* worker */
    char *worker_id;
    int worker_concurrency;
    int worker_lookahead;
    int worker_drain_seconds;
    int worker_lease_seconds;
    /* agent */
    char *agent_system_prompt;
    int agent_max_context_bytes;
    int agent_max_tool_calls;
    /* skills */
    char *skills_enabled;
    char *skills_http_get_allow;
    int skills_http_get_max_bytes;
    int skills_http_get_timeout_ms;
    /* limits */
    char *limits_mode;
    char *limits_bucket;
    int limits_max_inflight_per_user;
    char *limits_over_budget;
    /* retention */
    char *retention_older_than;         /* DURATION; "": off */
    int retention_interval_seconds;
    int retention_batch;
    /* metrics */
    char *metrics_listen;
    /* log */
    char *log_level;

    /* lists, file only */
    aq_http_skill *http_skills;
    int n_http_skills;
    aq_model_price *prices;
    int n_prices;
    aq_provider *providers; /* the file's providers list; NULL: the llm.* keys make one */
    int n_providers;
} aq_config;

/* Fills every key with its default. The caller frees with aq_config_free(). */
void aq_config_init(aq_config *cfg);

/* aq_config_init, then the file at `path` (NULL: none), then the
 * environment. On error returns AQ_EINVAL and writes a message naming the
 * file, line and key into err; cfg is then still safe to free. */
int aq_config_load(aq_config *cfg, const char *path, char *err, size_t errlen) AQ_MUSTCHECK;

/* Sets "section.key" from text, with the same checks as the file. */
int aq_config_set(aq_config *cfg, const char *key, const char *value,
                  char *err, size_t errlen) AQ_MUSTCHECK;

/* Cross-key checks (e.g. a task timeout the broker's consumer_timeout
 * allows). Called by aq_config_load; call again after aq_config_set. */
int aq_config_check(const aq_config *cfg, char *err, size_t errlen) AQ_MUSTCHECK;

void aq_config_free(aq_config *cfg);

/* Prints the effective configuration as a libconfig file (secrets masked). */
void aq_config_dump(const aq_config *cfg, FILE *out);
/* Prints an example file: every key, its default and its doc. */
void aq_config_write_example(FILE *out);
/* Prints the environment variables that override keys, for --help. */
void aq_config_print_env_help(FILE *out);

/* The API key from the variable llm.api_key_env names, or NULL. Borrowed
 * from the environment. */
const char *aq_config_api_key(const aq_config *cfg);

/* The providers a worker routes to: the file's `providers` list, or else
 * one provider named "default" made of the llm.* keys (base_url,
 * api_key_env, requests_per_minute and tokens_per_minute shared by all its
 * models, which are llm.model and llm.models, priced by llm.prices, else
 * llm.price_*). A deep copy the caller frees with aq_config_providers_free;
 * *n gets the count. aq_config_check has checked it: every model priced,
 * llm.model served. */
aq_provider *aq_config_providers(const aq_config *cfg, int *n);
void aq_config_providers_free(aq_provider *p, int n);

/* The models tasks may name, comma-separated (malloc'd): llm.models (or
 * llm.model) of the llm.* provider, or every model the providers serve. */
char *aq_config_task_models(const aq_config *cfg);

/* Parses amqp.retry_delays into up to `max` delays in ms; returns how
 * many, or AQ_EINVAL. */
int aq_config_retry_delays(const aq_config *cfg, long *ms, int max);

/* How long a session runs on one delivery before it hands itself over
 * (agent.h, "Hand-over"): a delivery must be acked before the broker's
 * consumer_timeout or the broker closes the channel, and it may first
 * have waited held (aq_config_max_hold_ms). At *soft_ms of a delivery's
 * age the session is asked to stop at its next step boundary; at
 * *hard_ms (a tenth of consumer_timeout, at least 10 s, before the broker
 * would act, less the hold) it is stopped whatever it is doing. */
void aq_config_handover_ms(const aq_config *cfg, int64_t *soft_ms, int64_t *hard_ms);

/* How long a worker holds a delivery it has not started (its user at a
 * cap, or every slot busy) before sending it back to its lane: a fifth of
 * amqp.consumer_timeout_ms, so holding never runs into the broker's limit. */
int64_t aq_config_max_hold_ms(const aq_config *cfg);

/* The deliveries a worker holds at most: worker.concurrency running plus
 * the lookahead (worker.lookahead, or concurrency/4 and at least 8), the
 * prefetch shared by its lanes; at most 65535 (AMQP's 16 bits). */
int aq_config_lane_prefetch(const aq_config *cfg);

/* The broker nodes of amqp.url, a list separated by commas or blanks:
 * how many there are, and node `i`'s URL copied into buf (NUL-terminated;
 * false if i is out of range or the URL does not fit). */
int aq_config_amqp_nodes(const aq_config *cfg);
bool aq_config_amqp_node(const aq_config *cfg, int i, char *buf, size_t len);

/* Priority bands of the lane queues: 1 for classic queues (each lane is
 * one priority queue), amqp.priority_bands for quorum ones, which have no
 * priorities; and the band that priority 0-9 falls in (0 lowest). */
int aq_config_bands(const aq_config *cfg);
int aq_config_band_of(const aq_config *cfg, int priority);
bool aq_config_quorum(const aq_config *cfg);

/* The DSN of the connections that need a session of their own (LISTEN;
 * with pool_mode "transaction", a worker's liveness lock):
 * postgres.listen_dsn, or postgres.dsn when that is empty. Borrowed. */
const char *aq_config_listen_dsn(const aq_config *cfg);

/* postgres.pool_mode is "transaction": postgres.dsn is a pooler that may
 * run each transaction in another server session. */
bool aq_config_pg_transaction_pool(const aq_config *cfg);

/* Reads a DURATION: whole numbers each followed by a unit, d, h, m or s,
 * each unit at most once and the largest first (30s, 15m, 12h, 7d, 1d12h,
 * 2h30m), more than 0 s and at most AQ_DURATION_MAX, into *secs. AQ_EINVAL
 * with err naming the text otherwise. */
#define AQ_DURATION_MAX (36500LL * 86400)
int aq_config_parse_duration(const char *s, long long *secs, char *err, size_t errlen) AQ_MUSTCHECK;

/* True if `name` is in the comma-separated list `list`. */
bool aq_config_list_has(const char *list, const char *name);

#endif
