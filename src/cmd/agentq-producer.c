/* agentq-producer — enqueues agent tasks.
 *
 * Wires config, task (validation with the worker's own parser), broker
 * (persistent publishes with a window of confirms in flight) and, for
 * --record and --wait, a plain libpq connection. */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/log.h"
#include "agentq/pgconn.h"
#include "agentq/skill.h"
#include "agentq/status.h"
#include "agentq/task.h"

#include <errno.h>
#include <getopt.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct opts {
    const char *config, *user, *goal, *skills, *model, *metadata, *task_id, *file;
    const char *max_steps, *budget, *timeout, *ask_timeout, *temperature, *ttl;
    int priority;
    int window;
    bool strict, json, record, wait, quiet;
    double wait_timeout;
} opts;

typedef struct ids {
    char (*id)[AQ_TASK_ID_LEN + 1];
    size_t n, cap;
} ids;

static void usage(FILE *out)
{
    fputs("Usage: agentq-producer [OPTIONS] --user U --goal TEXT\n"
          "       agentq-producer [OPTIONS] --file TASKS.jsonl   (- for stdin)\n"
          "\n"
          "Enqueues agent tasks on RabbitMQ with publisher confirms and prints their ids.\n"
          "\n"
          "One task from flags:\n"
          "  --user ID            user the task runs for (required)\n"
          "  --goal TEXT          what the agent should do (required)\n"
          "  --priority N         0-9, higher runs first (default 0)\n"
          "  --ttl MS             drop the task if still queued after MS milliseconds\n"
          "  --max-steps N        1-100 (default 15)\n"
          "  --budget USD         cost budget, 0 = none (default 0.50)\n"
          "  --timeout S          running time in seconds over all attempts, <= 86400 (default 60)\n"
          "  --ask-timeout S      how long a question (skill ask_human) waits for its answer\n"
          "                       (default 86400; then the task expires)\n"
          "  --temperature T      sampling temperature 0-2 (default llm.temperature; 0 with\n"
          "                       cache.enabled: the fleet answers a repeat from its cache)\n"
          "  --skills A,B         only these skills\n"
          "  --model NAME         a model a provider serves (default llm.model)\n"
          "  --metadata JSON      object stored with the task\n"
          "  --task-id UUID       use this id (default: a new UUID)\n"
          "\n"
          "Many tasks from JSON lines:\n"
          "  --file PATH          one task body per line, or an envelope\n"
          "                       {\"task\": {...}, \"priority\": N, \"ttl_ms\": MS}\n"
          "  --strict             stop at the first bad line (default: report and skip it)\n"
          "\n"
          "Output and follow-up:\n"
          "  --json               print {\"task_id\":...,\"line\":N} per task\n"
          "  --record             also write a 'queued' row to Postgres for each task\n"
          "  --wait               follow the tasks to their final status; exit 0 only if all completed\n"
          "  --wait-timeout S     give up waiting after S seconds (default: none)\n"
          "  --window N           publishes awaiting confirms at once (default 1000)\n"
          "  -q, --quiet          do not print task ids\n"
          "  -c, --config FILE    configuration file (see docs/agentq.conf.example)\n"
          "  -h, --help           this help\n"
          "  -V, --version        version\n"
          "\n"
          "Exit status: 0 all published (and with --wait all completed), 1 some task did not\n"
          "complete or a line was bad, 2 usage or configuration error, 3 broker/database error.\n",
          out);
    fputc('\n', out);
    aq_config_print_env_help(out);
}

static int publish_one(aq_broker *b, const aq_config *cfg, aq_task *t, const char *ttl, char *err, size_t errlen)
{
    json_t *body = aq_task_to_json(t);
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    aq_publish p = {cfg->amqp_exchange, "task", text, strlen(text), t->task_id, t->priority, ttl,
                    (int64_t)(t->enqueued_at_us / 1000000), NULL};
    int64_t seq = aq_broker_publish(b, &p, NULL, err, errlen);
    free(text);
    return seq < 0 ? (int)seq : AQ_OK;
}

static int record_rows(PGconn *pg, aq_task **tasks, size_t n, char *err, size_t errlen)
{
    PGresult *r = PQexec(pg, "BEGIN");
    PQclear(r);
    for (size_t i = 0; i < n; i++) {
        aq_task *t = tasks[i];
        char prio[16], steps[16], budget[32], timeout[32], enq[32];
        snprintf(prio, sizeof prio, "%d", t->priority);
        snprintf(steps, sizeof steps, "%d", t->max_steps);
        snprintf(budget, sizeof budget, "%.6f", t->budget_usd);
        snprintf(timeout, sizeof timeout, "%.3f", t->timeout_seconds);
        snprintf(enq, sizeof enq, "%.6f", (double)t->enqueued_at_us / 1e6);
        char *meta = t->metadata ? json_dumps(t->metadata, JSON_COMPACT) : NULL;
        const char *params[] = {t->task_id, t->user_id, t->goal, prio, steps, budget, timeout, t->model, meta, enq};
        r = PQexecParams(pg,
                         "INSERT INTO agentq.tasks (task_id, user_id, goal, priority, status, attempt, max_steps,"
                         " budget_usd, timeout_seconds, model, metadata, enqueued_at)"
                         " VALUES ($1, $2, $3, $4, 'queued', 1, $5, $6, $7, $8, $9::jsonb, to_timestamp($10))"
                         " ON CONFLICT (task_id) DO NOTHING",
                         10, NULL, params, NULL, NULL, 0);
        free(meta);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            aq_seterr(err, errlen, "recording task %s: %s", t->task_id, PQresultErrorMessage(r));
            PQclear(r);
            PQclear(PQexec(pg, "ROLLBACK"));
            return AQ_EIO;
        }
        PQclear(r);
    }
    r = PQexec(pg, "COMMIT");
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok) aq_seterr(err, errlen, "recording tasks: %s", PQresultErrorMessage(r));
    PQclear(r);
    return ok ? AQ_OK : AQ_EIO;
}

/* Records (with --record), publishes and waits for the confirms of a
 * batch, then frees it. Returns 0 or the exit status. */
static int flush(aq_broker *b, PGconn *pg, const aq_config *cfg, aq_task **batch, char **batch_ttl, size_t *nbatch)
{
    char err[1024];
    int rc = 0;
    if (pg && record_rows(pg, batch, *nbatch, err, sizeof err) != AQ_OK) rc = 3;
    for (size_t i = 0; rc == 0 && i < *nbatch; i++)
        if (publish_one(b, cfg, batch[i], batch_ttl[i], err, sizeof err) != AQ_OK) rc = 3;
    int64_t nacked = 0;
    if (rc == 0 && aq_broker_wait_confirms(b, 30000, &nacked, err, sizeof err) != AQ_OK) rc = 3;
    if (rc) fprintf(stderr, "agentq-producer: %s\n", err);
    for (size_t i = 0; i < *nbatch; i++) {
        aq_task_free(batch[i]);
        free(batch_ttl[i]);
        batch[i] = NULL;
        batch_ttl[i] = NULL;
    }
    *nbatch = 0;
    return rc;
}

static PGconn *db_connect(const aq_config *cfg) { return aq_pg_connect_cli(cfg->pg_dsn, "agentq-producer"); }

/* Polls the rows of `list` until all are final; prints progress and a
 * summary. Returns 0 if every task completed. */
static int wait_for(const aq_config *cfg, const ids *list, double timeout_s)
{
    PGconn *pg = db_connect(cfg);
    if (!pg) return 3;
    /* One array parameter: '{id,id,...}' */
    size_t cap = list->n * (AQ_TASK_ID_LEN + 1) + 3;
    char *arr = aq_xmalloc(cap), *p = arr;
    *p++ = '{';
    for (size_t i = 0; i < list->n; i++) {
        if (i) *p++ = ',';
        memcpy(p, list->id[i], AQ_TASK_ID_LEN);
        p += AQ_TASK_ID_LEN;
    }
    *p++ = '}';
    *p = '\0';
    bool tty = isatty(2);
    int64_t start = aq_mono_us(), last_print = 0;
    int rc = 1;
    for (;;) {
        const char *params[] = {arr};
        PGresult *r = PQexecParams(pg,
                                   "SELECT status, count(*) FROM agentq.tasks WHERE task_id = ANY($1::uuid[])"
                                   " GROUP BY status ORDER BY status",
                                   1, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            fprintf(stderr, "agentq-producer: %s", PQresultErrorMessage(r));
            PQclear(r);
            rc = 3;
            break;
        }
        long final = 0, completed = 0, seen = 0;
        char summary[1024] = "";
        size_t sl = 0;
        for (int i = 0; i < PQntuples(r); i++) {
            const char *st = PQgetvalue(r, i, 0);
            long c = atol(PQgetvalue(r, i, 1));
            seen += c;
            bool is_final = aq_status_final(aq_status_parse(st));
            if (is_final) final += c;
            if (!strcmp(st, "completed")) completed = c;
            sl += (size_t)snprintf(summary + sl, sl < sizeof summary ? sizeof summary - sl : 0, "%s%s=%ld",
                                   sl ? " " : "", st, c);
        }
        PQclear(r);
        long total = (long)list->n;
        if (seen < total)
            snprintf(summary + sl, sl < sizeof summary ? sizeof summary - sl : 0, "%sunseen=%ld", sl ? " " : "",
                     total - seen);
        double elapsed = (double)(aq_mono_us() - start) / 1e6;
        bool done = final >= total;
        bool timed_out = timeout_s > 0 && elapsed > timeout_s;
        if (tty) {
            int width = 30, filled = total ? (int)(width * final / total) : width;
            fprintf(stderr, "\r[%.*s%*s] %ld/%ld final  %.1fs  %s\033[K", filled,
                    "##############################", width - filled, "", final, total, elapsed, summary);
        } else if (done || timed_out || aq_mono_us() - last_print > 5000000) {
            fprintf(stderr, "progress: %ld/%ld final after %.1fs: %s\n", final, total, elapsed, summary);
            last_print = aq_mono_us();
        }
        if (done || timed_out) {
            if (tty) fputc('\n', stderr);
            printf("summary: %s\n", summary);
            rc = (done && completed == total) ? 0 : 1;
            if (timed_out && !done) fprintf(stderr, "agentq-producer: gave up waiting after %.0fs\n", timeout_s);
            break;
        }
        usleep(tty ? 200000 : 500000);
    }
    free(arr);
    PQfinish(pg);
    return rc;
}

/* Reads one line of any length; returns NULL at EOF. Caller frees. */
static char *read_line(FILE *f, size_t *len)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, f);
    if (n < 0) {
        free(line);
        return NULL;
    }
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
    *len = (size_t)n;
    return line;
}

/* Parses the command line into o. Returns -1 to go on, else the exit
 * status (0 after --help or --version, 2 for a usage error). */
static int parse_args(int argc, char **argv, opts *o)
{
    static const struct option longopts[] = {
        {"config", required_argument, 0, 'c'}, {"user", required_argument, 0, 'u'},
        {"goal", required_argument, 0, 'g'},   {"priority", required_argument, 0, 'p'},
        {"ttl", required_argument, 0, 't'},    {"max-steps", required_argument, 0, 's'},
        {"budget", required_argument, 0, 'b'}, {"timeout", required_argument, 0, 'T'},
        {"ask-timeout", required_argument, 0, 'A'}, {"temperature", required_argument, 0, 'E'},
        {"skills", required_argument, 0, 'k'}, {"model", required_argument, 0, 'm'},
        {"metadata", required_argument, 0, 'M'}, {"task-id", required_argument, 0, 'i'},
        {"file", required_argument, 0, 'f'},   {"strict", no_argument, 0, 'S'},
        {"json", no_argument, 0, 'j'},         {"record", no_argument, 0, 'r'},
        {"wait", no_argument, 0, 'w'},         {"wait-timeout", required_argument, 0, 'W'},
        {"window", required_argument, 0, 'n'}, {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},         {"version", no_argument, 0, 'V'},
        {0, 0, 0, 0}};
    int ch;
    char *end;
    while ((ch = getopt_long(argc, argv, "c:qhV", longopts, NULL)) != -1) {
        switch (ch) {
        case 'c': o->config = optarg; break;
        case 'u': o->user = optarg; break;
        case 'g': o->goal = optarg; break;
        case 'p':
            o->priority = (int)strtol(optarg, &end, 10);
            if (*end || o->priority < 0 || o->priority > 9) {
                fprintf(stderr, "agentq-producer: --priority must be an integer from 0 to 9 (got '%s')\n", optarg);
                return 2;
            }
            break;
        case 't': o->ttl = optarg; break;
        case 's': o->max_steps = optarg; break;
        case 'b': o->budget = optarg; break;
        case 'T': o->timeout = optarg; break;
        case 'A': o->ask_timeout = optarg; break;
        case 'E': o->temperature = optarg; break;
        case 'k': o->skills = optarg; break;
        case 'm': o->model = optarg; break;
        case 'M': o->metadata = optarg; break;
        case 'i': o->task_id = optarg; break;
        case 'f': o->file = optarg; break;
        case 'S': o->strict = true; break;
        case 'j': o->json = true; break;
        case 'r': o->record = true; break;
        case 'w': o->wait = true; break;
        case 'W': o->wait_timeout = strtod(optarg, NULL); break;
        case 'n':
            o->window = (int)strtol(optarg, &end, 10);
            if (*end || o->window < 1) {
                fprintf(stderr, "agentq-producer: --window must be a positive integer\n");
                return 2;
            }
            break;
        case 'q': o->quiet = true; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("agentq-producer %s\n", AGENTQ_VERSION); return 0;
        default: fprintf(stderr, "Try 'agentq-producer --help'.\n"); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "agentq-producer: unexpected argument '%s'. Try --help.\n", argv[optind]);
        return 2;
    }
    if (!o->file && (!o->user || !o->goal)) {
        fprintf(stderr, "agentq-producer: give --user and --goal, or --file. Try --help.\n");
        return 2;
    }
    return -1;
}

/* The worker's skills (built-in + HTTP, comma-separated); caller frees. */
static char *worker_skills(const aq_config *cfg)
{
    /* ask_human is every worker's (skill.h) */
    size_t sl = strlen(cfg->skills_enabled) + sizeof "," AQ_SKILL_ASK_HUMAN;
    for (int i = 0; i < cfg->n_http_skills; i++) sl += strlen(cfg->http_skills[i].name) + 1;
    char *skills = aq_xmalloc(sl + 1);
    strcpy(skills, cfg->skills_enabled);
    strcat(skills, *skills ? "," AQ_SKILL_ASK_HUMAN : AQ_SKILL_ASK_HUMAN);
    for (int i = 0; i < cfg->n_http_skills; i++) {
        strcat(skills, ",");
        strcat(skills, cfg->http_skills[i].name);
    }
    return skills;
}

/* The task body the flags describe, or NULL (the message printed) when
 * --metadata is not JSON. */
static json_t *body_from_flags(const opts *o)
{
    json_t *body = json_object();
    json_object_set_new(body, "user_id", json_string(o->user));
    json_object_set_new(body, "goal", json_string(o->goal));
    if (o->task_id) json_object_set_new(body, "task_id", json_string(o->task_id));
    if (o->model) json_object_set_new(body, "model", json_string(o->model));
    const char *nums[][2] = {{"max_steps", o->max_steps}, {"budget_usd", o->budget}, {"timeout_seconds", o->timeout},
                             {"wait_timeout_seconds", o->ask_timeout}, {"temperature", o->temperature}};
    for (size_t i = 0; i < AQ_ARRAY_LEN(nums); i++) {
        if (!nums[i][1]) continue;
        json_error_t jerr;
        json_t *v = json_loads(nums[i][1], JSON_DECODE_ANY, &jerr);
        json_object_set_new(body, nums[i][0], v ? v : json_string(nums[i][1]));
    }
    if (o->skills) {
        json_t *a = json_array();
        char *copy = aq_xstrdup(o->skills), *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
            json_array_append_new(a, json_string(tok));
        free(copy);
        json_object_set_new(body, "skills", a);
    }
    if (o->metadata) {
        json_error_t jerr;
        json_t *m = json_loads(o->metadata, 0, &jerr);
        if (!m) {
            fprintf(stderr, "agentq-producer: --metadata is not valid JSON: %s\n", jerr.text);
            json_decref(body);
            return NULL;
        }
        json_object_set_new(body, "metadata", m);
    }
    return body;
}

/* The task body of one JSON line (a task, or an envelope {"task", "priority",
 * "ttl_ms"} whose settings go to props and ttlbuf), or NULL (the message
 * printed) when the line is not JSON. */
static json_t *body_from_line(const char *line, size_t len, long lineno, aq_task_props *props, char *ttlbuf,
                              size_t ttllen, const char **ttl)
{
    json_error_t jerr;
    json_t *body = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!body) {
        fprintf(stderr, "agentq-producer: line %ld: not valid JSON: %s (column %d)\n", lineno, jerr.text, jerr.column);
        return NULL;
    }
    json_t *task = json_object_get(body, "task");
    if (!json_is_object(task)) return body;
    json_t *pr = json_object_get(body, "priority"), *tl = json_object_get(body, "ttl_ms");
    if (pr) props->priority = (int)json_integer_value(pr);
    if (tl) {
        snprintf(ttlbuf, ttllen, "%lld", (long long)json_integer_value(tl));
        *ttl = ttlbuf;
    }
    json_incref(task);
    json_decref(body);
    return task;
}

/* Tasks published so far, and the window waiting for its confirms. */
typedef struct run {
    const opts *o;
    aq_config *cfg;
    aq_broker *b;
    PGconn *pg;
    ids list;
    aq_task **batch;
    char **batch_ttl;
    size_t nbatch;
    long bad, lineno;
} run;

/* Takes one body (its reference): checks it as the worker will and adds
 * it to the window, publishing the window when it is full. Returns 0, 1
 * (a bad task: stop when strict or from flags) or the exit status of a
 * failed publish (>= 2). */
static int add_task(run *r, json_t *body, aq_task_props *props, const aq_task_limits *limits, const char *ttl,
                    bool from_file)
{
    const opts *o = r->o;
    if (ttl) {
        char *e;
        long long v = strtoll(ttl, &e, 10);
        if (*e || v < 0) {
            fprintf(stderr, "agentq-producer: %s%ld%sttl must be milliseconds >= 0 (got '%s')\n",
                    from_file ? "line " : "", r->lineno, from_file ? ": " : "", ttl);
            json_decref(body);
            r->bad++;
            return 1;
        }
    }
    aq_task *t = NULL;
    aq_task_error terr;
    int prc = aq_task_from_json(body, props, limits, &t, &terr);
    json_decref(body);
    if (prc != AQ_OK) {
        if (from_file) fprintf(stderr, "agentq-producer: line %ld: %s\n", r->lineno, terr.message);
        else fprintf(stderr, "agentq-producer: %s\n", terr.message);
        r->bad++;
        return 1;
    }
    r->batch[r->nbatch] = t;
    r->batch_ttl[r->nbatch] = ttl ? aq_xstrdup(ttl) : NULL;
    r->nbatch++;
    if (r->list.n == r->list.cap) {
        r->list.cap = r->list.cap ? r->list.cap * 2 : 256;
        r->list.id = aq_xrealloc(r->list.id, r->list.cap * sizeof *r->list.id);
    }
    memcpy(r->list.id[r->list.n++], t->task_id, AQ_TASK_ID_LEN + 1);
    if (!o->quiet) {
        if (o->json) printf("{\"task_id\":\"%s\",\"line\":%ld}\n", t->task_id, from_file ? r->lineno : 0);
        else puts(t->task_id);
    }
    if (r->nbatch == (size_t)o->window || !from_file)
        return flush(r->b, r->pg, r->cfg, r->batch, r->batch_ttl, &r->nbatch);
    return 0;
}

/* Publishes the tasks of o's file (or stdin), a line each. Returns 0, 2
 * (the file cannot be opened) or a publish's exit status. */
static int publish_file(run *r, const aq_task_limits *limits)
{
    const opts *o = r->o;
    FILE *in = strcmp(o->file, "-") ? fopen(o->file, "r") : stdin;
    if (!in) {
        fprintf(stderr, "agentq-producer: cannot open %s: %s\n", o->file, strerror(errno));
        return 2;
    }
    int rc = 0;
    size_t len;
    char *line;
    while (rc == 0 && (line = read_line(in, &len))) {
        r->lineno++;
        aq_task_props props = {.priority = o->priority, .timestamp = time(NULL)};
        char ttlbuf[32] = "";
        const char *ttl = o->ttl;
        json_t *body = NULL;
        if (len && line[strspn(line, " \t")] != '\0') {
            body = body_from_line(line, len, r->lineno, &props, ttlbuf, sizeof ttlbuf, &ttl);
            if (!body) r->bad++;
        }
        free(line);
        if (!body) {
            if (o->strict && r->bad) break;
            continue;
        }
        int arc = add_task(r, body, &props, limits, ttl, true);
        if (arc == 1 && o->strict) break;
        if (arc > 1) rc = arc;
    }
    if (in != stdin) fclose(in);
    if (rc == 0 && r->nbatch) rc = flush(r->b, r->pg, r->cfg, r->batch, r->batch_ttl, &r->nbatch);
    return rc;
}

int main(int argc, char **argv)
{
    opts o = {.priority = 0, .window = 1000};
    int rc = parse_args(argc, argv, &o);
    if (rc >= 0) return rc;

    aq_config cfg;
    char err[1024];
    if (aq_config_load(&cfg, o.config, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentq-producer: %s\n", err);
        aq_config_free(&cfg);
        return 2;
    }
    aq_log_set_level((aq_log_level)aq_log_level_parse(cfg.log_level));

    /* The worker's limits: its skills (built-in + HTTP) and models. */
    char *skills = worker_skills(&cfg);
    char *models = aq_config_task_models(&cfg);
    aq_task_limits limits = {skills, models, cfg.llm_model};
    run r = {.o = &o, .cfg = &cfg};
    r.b = aq_broker_connect(&cfg, 0, 10000, err, sizeof err);
    if (!r.b || aq_broker_declare(r.b, &cfg, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentq-producer: %s\n", err);
        rc = 3;
        goto out;
    }
    if (o.record && !(r.pg = db_connect(&cfg))) {
        rc = 3;
        goto out;
    }
    r.batch = aq_xcalloc((size_t)o.window, sizeof *r.batch);
    r.batch_ttl = aq_xcalloc((size_t)o.window, sizeof *r.batch_ttl);
    rc = 0;
    if (o.file) {
        rc = publish_file(&r, &limits);
    } else {
        aq_task_props props = {.priority = o.priority, .timestamp = time(NULL)};
        json_t *body = body_from_flags(&o);
        if (!body) rc = 2;
        else if ((rc = add_task(&r, body, &props, &limits, o.ttl, false)) == 1) rc = 0; /* counted in r.bad */
    }
    if (rc != 0) goto out;
    fflush(stdout);
    if (r.bad) rc = 1;
    if (o.file) fprintf(stderr, "agentq-producer: published %zu tasks, %ld bad lines\n", r.list.n, r.bad);
    if (rc == 0 && o.wait && r.list.n) rc = wait_for(&cfg, &r.list, o.wait_timeout);
    else if (rc == 1 && o.wait && r.list.n) (void)wait_for(&cfg, &r.list, o.wait_timeout);
out:
    for (size_t i = 0; i < r.nbatch; i++) {
        aq_task_free(r.batch[i]);
        free(r.batch_ttl[i]);
    }
    free(r.batch);
    free(r.batch_ttl);
    free(r.list.id);
    if (r.pg) PQfinish(r.pg);
    aq_broker_free(r.b);
    free(skills);
    free(models);
    aq_config_free(&cfg);
    return rc;
}
