/* agentqctl — operate agentq from a shell or a script: schema migrations,
 * queue and task status, listing tasks, one task's result, waiting for
 * tasks to end, cancelling, answering, requeueing dead letters, pruning
 * old rows.
 *
 * Wires config, migrate, broker (queue depths, requeue publishes), a plain
 * blocking libpq connection and, for `status` and `top`, libcurl's easy
 * interface to RabbitMQ's management API: this is a command-line tool, not
 * the worker's loop, so every call blocks.
 *
 * One table, commands[], says each command's arguments, options and help;
 * one parser reads every command line from it, before the configuration
 * is loaded or anything is connected. So an option's value is checked the
 * same way wherever it appears, a bad one is a usage error (exit 2) naming
 * the option and the value, and `agentqctl CMD --help` lists exactly the
 * options CMD takes. */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/dashboard.h"
#include "agentq/log.h"
#include "agentq/migrate.h"
#include "agentq/pgconn.h"
#include "agentq/status.h"
#include "agentq/task.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* Exit statuses, one meaning each, the same for every command. */
enum {
    CTL_OK = 0,
    CTL_NOT_DONE = 1,    /* not found, nothing to do; wait: a task ended other than completed */
    CTL_USAGE = 2,       /* a bad command line or configuration */
    CTL_UNREACHABLE = 3, /* the broker or the database cannot be reached, or refused a request */
    CTL_TIMEOUT = 4,     /* wait --timeout ran out */
    CTL_HELP = -1,       /* the parser printed --help: exit 0 */
};

#define CTL_ERR_LEN 1024
/* A DURATION is at most 100 years: beyond that it is a typo, and the
 * seconds stay far from overflowing anything. */

/* ------------------------------------------------------------ arguments */

/* A time on the command line: a DURATION before now (the database's
 * clock) or an absolute TIMESTAMP. */
typedef struct time_bound {
    bool set;
    bool ago;     /* value is seconds before now(); else seconds since the epoch */
    double value;
} time_bound;

/* Everything any command's options can set; each option row names its
 * field. Positional arguments are borrowed from argv. */
typedef struct ctl_args {
    const struct ctl_cmd *cmd;
    char **pos;
    int npos;
    bool json, dry_run, dead, list_migrations;
    const char *user, *reason;
    char *statuses; /* a Postgres text[] literal, "{completed,failed}"; NULL: any; owned */
    time_bound since, until;
    long long limit, batch, older_than;
    double interval, timeout;
} ctl_args;

typedef enum {
    OPT_FLAG,           /* bool */
    OPT_TEXT,           /* const char *, not empty */
    OPT_COUNT,          /* long long, a whole number in [min, max] */
    OPT_SECONDS,        /* double, a decimal number of seconds in [min, max] */
    OPT_DURATION,       /* long long seconds: 30s, 15m, 12h, 7d, 1d12h */
    OPT_TIME,           /* time_bound: a DURATION ago, or a TIMESTAMP */
    OPT_STATUSES,       /* char *: comma-separated statuses */
    OPT_FINAL_STATUSES, /* the same, final statuses only */
} opt_kind;

typedef struct ctl_opt {
    const char *name;    /* "--limit" */
    const char *metavar; /* "N"; NULL for a flag */
    opt_kind kind;
    size_t offset;       /* of its field in ctl_args */
    const char *def;     /* default, parsed as a value is; NULL: none */
    double min, max;     /* OPT_COUNT, OPT_SECONDS */
    bool required;
    const char *help;
} ctl_opt;

typedef struct ctl_cmd {
    const char *name;
    const char *synopsis; /* after "agentqctl NAME " */
    const char *summary;  /* one line for agentqctl --help */
    const char *about;    /* the rest of NAME --help: what it prints, its exit statuses */
    int min_pos, max_pos; /* positional arguments; max -1: no bound */
    int id_args;          /* how many leading ones are task ids; -1: all */
    const ctl_opt *opts;
    size_t n_opts;
    int (*run)(const aq_config *cfg, const ctl_args *a);
    /* A command that reads its own arguments (argv[0] is its name) instead
     * of opts and run: the dashboard. */
    int (*main)(const aq_config *cfg, int argc, char **argv);
} ctl_cmd;

#define ARG(f) offsetof(ctl_args, f)

static int usage_error(const ctl_cmd *c, const char *fmt, ...) AQ_PRINTF(2, 3);
static int usage_error(const ctl_cmd *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "agentqctl %s: ", c->name);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'agentqctl %s --help'.\n", c->name);
    return CTL_USAGE;
}

/* Whole number in [min, max]: digits only (no sign, no spaces). */
static int parse_count(const char *s, double min, double max, long long *out, char *err, size_t errlen)
{
    long long v = 0;
    bool ok = *s != '\0';
    for (const char *p = s; ok && *p; p++) {
        if (!isdigit((unsigned char)*p) || v > (long long)max) ok = false;
        else v = v * 10 + (*p - '0');
    }
    if (!ok || v < (long long)min || v > (long long)max) {
        aq_seterr(err, errlen, "'%s' is not a whole number from %.0f to %.0f", s, min, max);
        return -1;
    }
    *out = v;
    return 0;
}

/* Decimal number of seconds in [min, max]: digits with an optional
 * fraction ("2", "0.5", ".25"); no sign, exponent, hex, inf or nan. */
static int parse_seconds(const char *s, double min, double max, double *out, char *err, size_t errlen)
{
    size_t digits = strspn(s, "0123456789"), frac = 0;
    if (s[digits] == '.') frac = strspn(s + digits + 1, "0123456789");
    size_t len = digits + (s[digits] == '.' ? 1 + frac : 0);
    double v = (digits || frac) && s[len] == '\0' ? strtod(s, NULL) : -1;
    if (v < min || v > max) {
        aq_seterr(err, errlen, "'%s' is not a number of seconds from %g to %g", s, min, max);
        return -1;
    }
    *out = v;
    return 0;
}

/* DURATION: see aq_config_parse_duration. */
static int parse_duration(const char *s, long long *out, char *err, size_t errlen)
{
    return aq_config_parse_duration(s, out, err, errlen) == AQ_OK ? 0 : -1;
}

/* Reads exactly `n` digits at *p into *v and moves *p past them. */
static bool digits(const char **p, int n, int *v)
{
    *v = 0;
    for (int i = 0; i < n; i++, (*p)++) {
        if (!isdigit((unsigned char)**p)) return false;
        *v = *v * 10 + (**p - '0');
    }
    return true;
}

/* Days from 1970-01-01 to y-m-d of the proleptic Gregorian calendar. */
static long long days_from_civil(int y, int m, int d)
{
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* TIMESTAMP: YYYY-MM-DD, then optionally T (or a space) and
 * HH:MM[:SS[.fraction]], then optionally Z or an offset ±HH[:MM]; no zone
 * means UTC. Into seconds since the epoch. */
static bool parse_timestamp(const char *s, double *epoch)
{
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    const char *p = s;
    int y, mo, d, h = 0, mi = 0, sec = 0, zh = 0, zm = 0, zsign = 0;
    double frac = 0;
    if (!digits(&p, 4, &y) || *p++ != '-' || !digits(&p, 2, &mo) || *p++ != '-' || !digits(&p, 2, &d))
        return false;
    if (*p == 'T' || *p == 't' || *p == ' ') {
        p++;
        if (!digits(&p, 2, &h) || *p++ != ':' || !digits(&p, 2, &mi)) return false;
        if (*p == ':') {
            p++;
            if (!digits(&p, 2, &sec)) return false;
            if (*p == '.') {
                const char *f = p;
                size_t n = strspn(++p, "0123456789");
                if (!n) return false;
                frac = strtod(f, NULL);
                p += n;
            }
        }
        if (*p == 'Z' || *p == 'z') {
            p++;
        } else if (*p == '+' || *p == '-') {
            zsign = *p++ == '+' ? 1 : -1;
            if (!digits(&p, 2, &zh)) return false;
            if (*p == ':') p++;
            if (*p && !digits(&p, 2, &zm)) return false;
        }
    }
    if (*p) return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] + (mo == 2 && leap) || h > 23 || mi > 59 || sec > 59 ||
        zh > 23 || zm > 59)
        return false;
    *epoch = (double)(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec) + frac -
             zsign * (zh * 3600 + zm * 60);
    return true;
}

static int parse_time(const char *s, time_bound *out, char *err, size_t errlen)
{
    long long secs;
    char ignored[8];
    if (parse_duration(s, &secs, ignored, sizeof ignored) == 0) {
        *out = (time_bound){true, true, (double)secs};
        return 0;
    }
    double epoch;
    if (parse_timestamp(s, &epoch)) {
        *out = (time_bound){true, false, epoch};
        return 0;
    }
    aq_seterr(err, errlen,
              "'%s' is neither a duration before now (30s, 15m, 12h, 7d, 1d12h) nor a timestamp"
              " (2024-05-01, 2024-05-01T12:00:00Z, 2024-05-01 12:00+02:00; no zone: UTC)", s);
    return -1;
}

/* The statuses' names, ", "-separated, for messages: all or the final ones. */
static void status_names(bool final_only, char *buf, size_t len)
{
    size_t n = 0;
    buf[0] = '\0';
    for (int s = AQ_STATUS_QUEUED; s < AQ_STATUS_COUNT && n < len; s++)
        if (!final_only || aq_status_final((aq_status)s))
            n += (size_t)snprintf(buf + n, len - n, "%s%s", n ? ", " : "", aq_status_name((aq_status)s));
}

/* Comma-separated statuses into a Postgres text[] literal (malloc'd). */
static int parse_statuses(const char *s, bool final_only, char **out, char *err, size_t errlen)
{
    size_t cap = strlen(s) + 3, n = 1;
    char *lit = aq_xmalloc(cap);
    lit[0] = '{';
    for (const char *p = s;;) {
        size_t len = strcspn(p, ",");
        char name[32];
        snprintf(name, sizeof name, "%.*s", (int)(len < sizeof name ? len : sizeof name - 1), p);
        aq_status st = len < sizeof name ? aq_status_parse(name) : AQ_STATUS_NONE;
        if (st == AQ_STATUS_NONE || (final_only && !aq_status_final(st))) {
            char names[256];
            status_names(final_only, names, sizeof names);
            aq_seterr(err, errlen, "'%.*s' is not a%s status (%s)", (int)len, p,
                      final_only ? " final" : "", names);
            free(lit);
            return -1;
        }
        n += (size_t)snprintf(lit + n, cap - n, "%s%s", n > 1 ? "," : "", name);
        if (!p[len]) break;
        p += len + 1;
    }
    snprintf(lit + n, cap - n, "}");
    free(*out);
    *out = lit;
    return 0;
}

static int parse_value(const ctl_opt *o, const char *v, ctl_args *a, char *err, size_t errlen)
{
    void *field = (char *)a + o->offset;
    switch (o->kind) {
    case OPT_FLAG: *(bool *)field = true; return 0;
    case OPT_TEXT:
        if (!*v) {
            aq_seterr(err, errlen, "must not be empty");
            return -1;
        }
        *(const char **)field = v;
        return 0;
    case OPT_COUNT: return parse_count(v, o->min, o->max, field, err, errlen);
    case OPT_SECONDS: return parse_seconds(v, o->min, o->max, field, err, errlen);
    case OPT_DURATION: return parse_duration(v, field, err, errlen);
    case OPT_TIME: return parse_time(v, field, err, errlen);
    case OPT_STATUSES: return parse_statuses(v, false, field, err, errlen);
    case OPT_FINAL_STATUSES: return parse_statuses(v, true, field, err, errlen);
    }
    return -1;
}

static void print_cmd_help(const ctl_cmd *c, FILE *out)
{
    fprintf(out, "Usage: agentqctl [-c FILE] %s%s%s\n\n%s\n", c->name, *c->synopsis ? " " : "", c->synopsis,
            c->about);
    fputs("\nOptions:\n", out);
    for (size_t i = 0; i < c->n_opts; i++) {
        const ctl_opt *o = &c->opts[i];
        char left[64];
        snprintf(left, sizeof left, "%s%s%s", o->name, o->metavar ? " " : "", o->metavar ? o->metavar : "");
        fprintf(out, "  %-22s %s", left, o->help);
        if (o->def) fprintf(out, " (default %s)", o->def);
        fputc('\n', out);
    }
    fputs("  -h, --help             this help\n", out);
}

/* Reads the command's arguments (argv[0] is the command) into a (its
 * defaults first). Returns CTL_OK, CTL_HELP (help printed) or CTL_USAGE
 * (the error printed). The caller frees a with args_free(). */
static int parse_args(const ctl_cmd *c, int argc, char **argv, ctl_args *a)
{
    char err[CTL_ERR_LEN];
    memset(a, 0, sizeof *a);
    a->cmd = c;
    a->timeout = -1;
    a->pos = aq_xcalloc((size_t)argc + 1, sizeof *a->pos);
    for (size_t i = 0; i < c->n_opts; i++)
        if (c->opts[i].def && parse_value(&c->opts[i], c->opts[i].def, a, err, sizeof err) != 0) {
            fprintf(stderr, "agentqctl: bad default of %s %s: %s\n", c->name, c->opts[i].name, err);
            abort(); /* a programming error, found by any test of the command */
        }
    bool seen[16] = {0};
    bool options_done = false;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!options_done && !strcmp(arg, "--")) {
            options_done = true;
            continue;
        }
        if (!options_done && (!strcmp(arg, "-h") || !strcmp(arg, "--help"))) {
            print_cmd_help(c, stdout);
            return CTL_HELP;
        }
        if (options_done || arg[0] != '-' || arg[1] == '\0') { /* "-": a value (answer's stdin) */
            a->pos[a->npos++] = argv[i];
            continue;
        }
        size_t nlen = strcspn(arg, "="), k = 0;
        while (k < c->n_opts && (strlen(c->opts[k].name) != nlen || strncmp(c->opts[k].name, arg, nlen))) k++;
        const ctl_opt *o = k < c->n_opts ? &c->opts[k] : NULL;
        if (!o) {
            char names[512] = "";
            size_t n = 0;
            for (size_t j = 0; j < c->n_opts; j++)
                n += (size_t)snprintf(names + n, sizeof names - n, "%s%s", j ? ", " : "", c->opts[j].name);
            return usage_error(c, "unknown option '%.*s' (%s takes %s)", (int)nlen, arg, c->name,
                               c->n_opts ? names : "no options");
        }
        seen[k] = true;
        const char *value = arg[nlen] == '=' ? arg + nlen + 1 : NULL;
        if (o->kind == OPT_FLAG && value) return usage_error(c, "%s takes no value", o->name);
        if (o->kind != OPT_FLAG && !value) {
            if (i + 1 >= argc) return usage_error(c, "%s needs a value (%s %s)", o->name, o->name, o->metavar);
            value = argv[++i];
        }
        if (parse_value(o, value ? value : "", a, err, sizeof err) != 0)
            return usage_error(c, "%s: %s", o->name, err);
    }
    for (size_t k = 0; k < c->n_opts; k++)
        if (c->opts[k].required && !seen[k])
            return usage_error(c, "%s is required (%s %s)", c->opts[k].name, c->opts[k].name, c->opts[k].metavar);
    if (a->npos < c->min_pos)
        return usage_error(c, "needs %s (agentqctl %s %s)", a->npos == 0 && c->id_args ? "a task id" : "more arguments",
                           c->name, c->synopsis);
    if (c->max_pos >= 0 && a->npos > c->max_pos)
        return usage_error(c, "unexpected argument '%s' (agentqctl %s %s)", a->pos[c->max_pos], c->name,
                           c->synopsis);
    for (int i = 0; i < a->npos && (c->id_args < 0 || i < c->id_args); i++)
        if (!aq_task_uuid_valid(a->pos[i]))
            return usage_error(c, "'%s' is not a task id (a UUID like 6f1c2a9e-0b7d-4c3e-9a51-2f8e4d6b7c10)",
                               a->pos[i]);
    return CTL_OK;
}

static void args_free(ctl_args *a)
{
    free(a->pos);
    free(a->statuses);
}

/* ------------------------------------------------------------- database */

/* A session whose times read and print in UTC, as the tables say. */
static PGconn *db(const aq_config *cfg)
{
    PGconn *pg = aq_pg_connect_cli(cfg->pg_dsn, "agentqctl");
    if (pg) PQclear(PQexec(pg, "SET TimeZone TO 'UTC'"));
    return pg;
}

static PGresult *q(PGconn *pg, const char *sql, int n, const char *const *params, ExecStatusType want)
{
    PGresult *r = PQexecParams(pg, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != want) {
        fprintf(stderr, "agentqctl: %s", PQresultErrorMessage(r));
        PQclear(r);
        return NULL;
    }
    return r;
}

/* The SQL for a time bound, its value appended to params (as text in
 * buf, which must outlive the query). */
static void bound_sql(const time_bound *b, char *sql, size_t len, const char **params, int *n, char *buf,
                      size_t buflen)
{
    snprintf(buf, buflen, "%.6f", b->value);
    params[*n] = buf;
    (*n)++;
    if (b->ago) snprintf(sql, len, "now() - $%d::float8 * interval '1 second'", *n);
    else snprintf(sql, len, "to_timestamp($%d::float8)", *n);
}

/* Characters, not bytes, of UTF-8 text: what a terminal column counts. */
static int text_width(const char *s)
{
    int w = 0;
    for (; *s; s++) w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

/* Prints columns cols[0..n-1] of every row of r as a table under
 * `headers`, each column as wide as its widest value, NULL as "-";
 * `right` columns (numbers) aligned right. */
static void print_table(const PGresult *r, const int *cols, const char *const *headers, const bool *right, int n)
{
    int width[16];
    int rows = PQntuples(r);
    for (int c = 0; c < n; c++) {
        width[c] = text_width(headers[c]);
        for (int i = 0; i < rows; i++) {
            int w = PQgetisnull(r, i, cols[c]) ? 1 : text_width(PQgetvalue(r, i, cols[c]));
            if (w > width[c]) width[c] = w;
        }
    }
    for (int i = -1; i < rows; i++) {
        for (int c = 0; c < n; c++) {
            const char *v = i < 0 ? headers[c] : PQgetisnull(r, i, cols[c]) ? "-" : PQgetvalue(r, i, cols[c]);
            int pad = width[c] - text_width(v);
            if (right[c]) printf("%*s%s", pad, "", v);
            else printf("%s%*s", v, c + 1 < n ? pad : 0, "");
            if (c + 1 < n) fputs("  ", stdout);
        }
        fputc('\n', stdout);
    }
}

/* --------------------------------------------------------------- status */

/* RabbitMQ's management API, read for unacked counts (a passive
 * queue.declare tells only ready messages): one easy handle for every
 * queue, so one kept-alive connection. */
typedef struct mgmt_api {
    CURL *curl;
    char *base;      /* amqp.management_url without a trailing '/'; owned */
    char *vhost;     /* amqp.url's vhost, escaped as a path segment; curl_free */
    char shown[512]; /* the URL with its password masked */
    char *body;      /* the last reply; owned */
    size_t len;
} mgmt_api;

#define MGMT_MAX_REPLY (1u << 20)

static size_t mgmt_collect(char *data, size_t size, size_t n, void *arg)
{
    mgmt_api *m = arg;
    size_t add = size * n;
    if (m->len + add > MGMT_MAX_REPLY) return 0; /* not a queue's JSON: abort the transfer */
    m->body = aq_xrealloc(m->body, m->len + add + 1);
    memcpy(m->body + m->len, data, add);
    m->len += add;
    m->body[m->len] = '\0';
    return add;
}

/* The vhost amqp.url names, as rabbitmq-c reads it: the percent-decoded
 * path after the host, "/" when there is none; escaped again for a path. */
static char *mgmt_vhost(CURL *curl, const char *amqp_url)
{
    const char *host = strstr(amqp_url, "://");
    const char *path = host ? strchr(host + 3, '/') : NULL;
    int len = 0;
    char *decoded = path ? curl_easy_unescape(curl, path + 1, 0, &len) : NULL;
    char *escaped = curl_easy_escape(curl, decoded ? decoded : "/", decoded ? len : 1);
    curl_free(decoded);
    if (!escaped) aq_oom("a vhost");
    return escaped;
}

static void mgmt_open(mgmt_api *m, const aq_config *cfg)
{
    memset(m, 0, sizeof *m);
    m->curl = curl_easy_init();
    if (!m->curl) aq_oom("a curl handle");
    m->base = aq_xstrdup(cfg->amqp_management_url);
    for (size_t n = strlen(m->base); n && m->base[n - 1] == '/'; n--) m->base[n - 1] = '\0';
    char node[1024] = "";
    aq_config_amqp_node(cfg, 0, node, sizeof node); /* every node serves the same vhost */
    m->vhost = mgmt_vhost(m->curl, node);
    aq_log_redact(m->base, m->shown, sizeof m->shown);
    curl_easy_setopt(m->curl, CURLOPT_WRITEFUNCTION, mgmt_collect);
    curl_easy_setopt(m->curl, CURLOPT_WRITEDATA, m);
    curl_easy_setopt(m->curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(m->curl, CURLOPT_CONNECTTIMEOUT_MS, 3000L);
    curl_easy_setopt(m->curl, CURLOPT_TIMEOUT_MS, 5000L);
}

static void mgmt_close(mgmt_api *m)
{
    if (m->curl) curl_easy_cleanup(m->curl);
    curl_free(m->vhost);
    free(m->base);
    free(m->body);
}

/* GETs /api/queues/<vhost>/<queue>. Returns 1 with *unacked, 0 when the
 * API does not know it (no such queue, or no statistics yet for a queue
 * just declared), or -1 when the API cannot be read (err says why). */
static int mgmt_unacked(mgmt_api *m, const char *queue, int64_t *unacked, char *err, size_t errlen)
{
    char *name = curl_easy_escape(m->curl, queue, 0);
    if (!name) aq_oom("a queue name");
    size_t ulen = strlen(m->base) + strlen(m->vhost) + strlen(name) + 32;
    char *url = aq_xmalloc(ulen);
    snprintf(url, ulen, "%s/api/queues/%s/%s", m->base, m->vhost, name);
    curl_free(name);
    m->len = 0;
    curl_easy_setopt(m->curl, CURLOPT_URL, url);
    CURLcode rc = curl_easy_perform(m->curl);
    free(url);
    long code = 0;
    curl_easy_getinfo(m->curl, CURLINFO_RESPONSE_CODE, &code);
    if (rc != CURLE_OK) {
        aq_seterr(err, errlen, "cannot read the RabbitMQ management API (amqp.management_url %s): %s", m->shown,
                  curl_easy_strerror(rc));
        return -1;
    }
    if (code == 404) return 0;
    if (code != 200) {
        aq_seterr(err, errlen, "the RabbitMQ management API (amqp.management_url %s) answered HTTP %ld%s", m->shown,
                  code, code == 401 ? " (check the user and password in the URL)" : "");
        return -1;
    }
    json_t *doc = json_loadb(m->body ? m->body : "", m->len, 0, NULL);
    json_t *v = json_object_get(doc, "messages_unacknowledged");
    int known = json_is_integer(v);
    if (known) *unacked = json_integer_value(v);
    json_decref(doc);
    return known;
}

typedef enum { Q_INGRESS, Q_LANE, Q_RETRY, Q_DEAD } queue_role;
static const char *const queue_role_names[] = {"ingress", "lane", "retry", "dead"};

typedef struct queue_row {
    char name[256];
    queue_role role;
    bool read;       /* the passive declare answered */
    int64_t ready, consumers;
    bool unacked_known;
    int64_t unacked;
    char error[256]; /* why not read */
} queue_row;

/* What status, status --json and top show, read once. */
typedef struct snapshot {
    queue_row *queues;
    int nq;
    bool broker_ok, mgmt_ok, db_ok;
    char broker_err[CTL_ERR_LEN], mgmt_err[CTL_ERR_LEN], db_err[CTL_ERR_LEN];
    int64_t tasks[AQ_STATUS_COUNT];
    char cost[AQ_STATUS_COUNT][32];
    int64_t tokens[AQ_STATUS_COUNT];
    int64_t parked;
} snapshot;

/* The task queue, each lane, the retry tiers, the dead queue. */
static void snapshot_queues(const aq_config *cfg, snapshot *s)
{
    long delays[32];
    int ndelays = aq_config_retry_delays(cfg, delays, 32);
    if (ndelays < 0) ndelays = 0;
    s->nq = 2 + cfg->amqp_lanes * aq_config_bands(cfg) + ndelays;
    s->queues = aq_xcalloc((size_t)s->nq, sizeof *s->queues);
    int i = 0;
    s->queues[i].role = Q_INGRESS;
    snprintf(s->queues[i++].name, sizeof s->queues[0].name, "%s", cfg->amqp_queue);
    for (int l = 0; l < cfg->amqp_lanes; l++) {
        for (int band = 0; band < aq_config_bands(cfg); band++, i++) {
            s->queues[i].role = Q_LANE;
            aq_broker_lane_queue(cfg, l, band, s->queues[i].name, sizeof s->queues[i].name);
        }
    }
    for (int d = 0; d < ndelays; d++, i++) {
        s->queues[i].role = Q_RETRY;
        aq_broker_retry_queue(cfg, delays[d], s->queues[i].name, sizeof s->queues[i].name);
    }
    s->queues[i].role = Q_DEAD;
    snprintf(s->queues[i].name, sizeof s->queues[0].name, "%s", cfg->amqp_dead_queue);
}

static void snapshot_broker(const aq_config *cfg, snapshot *s)
{
    char err[CTL_ERR_LEN];
    aq_broker *b = aq_broker_connect(cfg, 0, 5000, s->broker_err, sizeof s->broker_err);
    s->broker_ok = b != NULL;
    for (int i = 0; b && i < s->nq; i++) {
        queue_row *r = &s->queues[i];
        if (aq_broker_queue_depth(b, r->name, &r->ready, &r->consumers, err, sizeof err) == AQ_OK) {
            r->read = true;
            continue;
        }
        /* A queue not declared yet (no worker has started with this
         * config) closes the channel with 404: the others are read on a
         * new connection. */
        if (strstr(err, "NOT_FOUND")) snprintf(r->error, sizeof r->error, "not declared (no queue of this name yet)");
        else snprintf(r->error, sizeof r->error, "%.*s", (int)sizeof r->error - 1, err);
        aq_broker_free(b);
        b = aq_broker_connect(cfg, 0, 5000, s->broker_err, sizeof s->broker_err);
        s->broker_ok = b != NULL;
    }
    aq_broker_free(b);
    if (!s->broker_ok || !*cfg->amqp_management_url) return;
    mgmt_api m;
    mgmt_open(&m, cfg);
    s->mgmt_ok = true;
    for (int i = 0; s->mgmt_ok && i < s->nq; i++) {
        queue_row *r = &s->queues[i];
        int rc = mgmt_unacked(&m, r->name, &r->unacked, s->mgmt_err, sizeof s->mgmt_err);
        r->unacked_known = rc == 1;
        s->mgmt_ok = rc >= 0;
    }
    mgmt_close(&m);
}

static void snapshot_db(const aq_config *cfg, snapshot *s)
{
    char why[CTL_ERR_LEN], shown[512];
    aq_pg_connect_opts o = {.application_name = "agentqctl"};
    PGconn *pg = aq_pg_connect(cfg->pg_dsn, &o, why, sizeof why);
    if (!pg) {
        aq_log_redact(cfg->pg_dsn, shown, sizeof shown);
        aq_seterr(s->db_err, sizeof s->db_err, "cannot connect to Postgres (%s): %s", shown, why);
        return;
    }
    PGresult *r = PQexec(pg, "SELECT status, count(*), coalesce(sum(cost_usd), 0)::numeric(14,6),"
                             " coalesce(sum(prompt_tokens + completion_tokens), 0)"
                             " FROM agentq.tasks GROUP BY status");
    PGresult *d = PQexec(pg, "SELECT count(*) FROM agentq.dead_letters WHERE requeued_at IS NULL");
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQresultStatus(d) != PGRES_TUPLES_OK) {
        const char *msg = PQresultStatus(r) != PGRES_TUPLES_OK ? PQresultErrorMessage(r) : PQresultErrorMessage(d);
        aq_seterr(s->db_err, sizeof s->db_err, "reading the task counts: %.*s", (int)strcspn(msg, "\n"), msg);
    } else {
        s->db_ok = true;
        for (int st = 0; st < AQ_STATUS_COUNT; st++) snprintf(s->cost[st], sizeof s->cost[st], "0.000000");
        for (int i = 0; i < PQntuples(r); i++) {
            aq_status st = aq_status_parse(PQgetvalue(r, i, 0));
            s->tasks[st] += strtoll(PQgetvalue(r, i, 1), NULL, 10);
            snprintf(s->cost[st], sizeof s->cost[st], "%s", PQgetvalue(r, i, 2));
            s->tokens[st] += strtoll(PQgetvalue(r, i, 3), NULL, 10);
        }
        s->parked = strtoll(PQgetvalue(d, 0, 0), NULL, 10);
    }
    PQclear(r);
    PQclear(d);
    PQfinish(pg);
}

static void snapshot_read(const aq_config *cfg, snapshot *s)
{
    memset(s, 0, sizeof *s);
    snapshot_queues(cfg, s);
    snapshot_broker(cfg, s);
    snapshot_db(cfg, s);
}

static void snapshot_free(snapshot *s) { free(s->queues); }

/* 3 when a server the snapshot needed could not be read; the messages
 * on stderr. */
static int snapshot_report(const aq_config *cfg, const snapshot *s)
{
    if (!s->broker_ok) fprintf(stderr, "agentqctl status: %s\n", s->broker_err);
    else if (*cfg->amqp_management_url && !s->mgmt_ok) fprintf(stderr, "agentqctl status: %s\n", s->mgmt_err);
    if (!s->db_ok) fprintf(stderr, "agentqctl status: %s\n", s->db_err);
    return s->broker_ok && s->db_ok && (!*cfg->amqp_management_url || s->mgmt_ok) ? CTL_OK : CTL_UNREACHABLE;
}

static void fmt_count(char *buf, size_t len, bool known, int64_t v)
{
    if (known) snprintf(buf, len, "%lld", (long long)v);
    else snprintf(buf, len, "-");
}

static void print_queue_row(const queue_row *r)
{
    char ready[24], unacked[24], consumers[24];
    if (!r->read) {
        printf("%-28s %s\n", r->name, r->error);
        return;
    }
    fmt_count(ready, sizeof ready, true, r->ready);
    fmt_count(unacked, sizeof unacked, r->unacked_known, r->unacked);
    fmt_count(consumers, sizeof consumers, true, r->consumers);
    printf("%-28s %10s %10s %10s\n", r->name, ready, unacked, consumers);
}

/* The lanes as one line: their sum is the backlog waiting to run; the
 * busiest lane says whether one user's burst is behind it. */
static void print_lanes(const aq_config *cfg, const snapshot *s)
{
    int64_t ready = 0, unacked = 0, busiest = 0, consumers = 0;
    int read = 0, unacked_known = 0;
    const char *error = NULL;
    for (int i = 0; i < s->nq; i++) {
        const queue_row *r = &s->queues[i];
        if (r->role != Q_LANE) continue;
        if (!r->read) {
            if (!error) error = r->error;
            continue;
        }
        read++;
        ready += r->ready;
        if (r->ready > busiest) busiest = r->ready;
        if (r->consumers > consumers) consumers = r->consumers;
        unacked_known += r->unacked_known;
        unacked += r->unacked;
    }
    char label[300], t_ready[24], t_unacked[24], t_consumers[24];
    snprintf(label, sizeof label, "%s0..%d", cfg->amqp_lane_prefix, cfg->amqp_lanes - 1);
    if (!read) {
        printf("%-28s %s\n", label, error ? error : "");
        return;
    }
    fmt_count(t_ready, sizeof t_ready, true, ready);
    fmt_count(t_unacked, sizeof t_unacked, unacked_known == read, unacked);
    fmt_count(t_consumers, sizeof t_consumers, true, consumers);
    printf("%-28s %10s %10s %10s   (busiest lane %lld", label, t_ready, t_unacked, t_consumers, (long long)busiest);
    if (read < cfg->amqp_lanes) printf("; %d not declared", cfg->amqp_lanes - read);
    printf(")\n");
}

/* The text form. `inline_errors`: say in the text why a part is missing
 * (top, which redraws the screen); else a short note, the reason being
 * on stderr. */
static void print_snapshot_text(const aq_config *cfg, const snapshot *s, bool inline_errors)
{
    printf("%-28s %10s %10s %10s\n", "queue", "ready", "unacked", "consumers");
    if (!s->broker_ok) {
        printf("  (%s)\n", inline_errors ? s->broker_err : "the broker cannot be reached");
    } else {
        for (int i = 0; i < s->nq; i++)
            if (s->queues[i].role == Q_INGRESS) print_queue_row(&s->queues[i]);
        print_lanes(cfg, s);
        for (int i = 0; i < s->nq; i++)
            if (s->queues[i].role == Q_RETRY || s->queues[i].role == Q_DEAD) print_queue_row(&s->queues[i]);
        if (*cfg->amqp_management_url && !s->mgmt_ok)
            printf("  (unacked: %s)\n", inline_errors ? s->mgmt_err : "the management API cannot be read");
    }
    printf("\n%-16s %10s %14s %14s\n", "status", "tasks", "cost_usd", "tokens");
    if (!s->db_ok) {
        printf("  (%s)\n", inline_errors ? s->db_err : "the database cannot be reached");
        return;
    }
    /* Most tasks first; statuses without tasks left out. */
    bool shown[AQ_STATUS_COUNT] = {0};
    for (;;) {
        int best = -1;
        for (int st = AQ_STATUS_QUEUED; st < AQ_STATUS_COUNT; st++)
            if (!shown[st] && s->tasks[st] > 0 && (best < 0 || s->tasks[st] > s->tasks[best])) best = st;
        if (best < 0) break;
        shown[best] = true;
        printf("%-16s %10lld %14s %14lld\n", aq_status_name((aq_status)best), (long long)s->tasks[best],
               s->cost[best], (long long)s->tokens[best]);
    }
    printf("\nparked dead letters: %lld\n", (long long)s->parked);
}

static json_t *json_count(bool known, int64_t v) { return known ? json_integer(v) : json_null(); }

static void print_snapshot_json(const snapshot *s)
{
    json_t *doc = json_object();
    json_t *queues = s->broker_ok ? json_array() : json_null();
    for (int i = 0; s->broker_ok && i < s->nq; i++) {
        const queue_row *r = &s->queues[i];
        json_t *o = json_pack("{s:s, s:s, s:o, s:o, s:o}", "name", r->name, "role", queue_role_names[r->role],
                              "ready", json_count(r->read, r->ready), "unacked",
                              json_count(r->unacked_known, r->unacked), "consumers",
                              json_count(r->read, r->consumers));
        if (!o) aq_oom("status JSON");
        if (!r->read) json_object_set_new(o, "error", json_string(r->error));
        json_array_append_new(queues, o);
    }
    json_object_set_new(doc, "queues", queues);
    json_t *tasks = s->db_ok ? json_object() : json_null();
    for (int st = AQ_STATUS_QUEUED; s->db_ok && st < AQ_STATUS_COUNT; st++)
        json_object_set_new(tasks, aq_status_name((aq_status)st), json_integer(s->tasks[st]));
    json_object_set_new(doc, "tasks", tasks);
    json_object_set_new(doc, "dead_letters_parked", json_count(s->db_ok, s->parked));
    char *text = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!text) aq_oom("status JSON");
    puts(text);
    free(text);
    json_decref(doc);
}

static int cmd_status(const aq_config *cfg, const ctl_args *a)
{
    snapshot s;
    snapshot_read(cfg, &s);
    if (a->json) print_snapshot_json(&s);
    else print_snapshot_text(cfg, &s, false);
    fflush(stdout);
    int rc = snapshot_report(cfg, &s);
    snapshot_free(&s);
    return rc;
}

/* Outages are shown, not fatal: top is for watching one pass. */
static int cmd_top(const aq_config *cfg, const ctl_args *a)
{
    for (;;) {
        snapshot s;
        snapshot_read(cfg, &s);
        printf("\033[H\033[2J");
        print_snapshot_text(cfg, &s, true);
        snapshot_free(&s);
        fflush(stdout);
        usleep((useconds_t)(a->interval * 1e6));
    }
    return CTL_OK;
}

/* ----------------------------------------------------------------- list */

static int cmd_list(const aq_config *cfg, const ctl_args *a)
{
    char sql[2048], cond[256], limit[32], since[32], until[32];
    const char *params[5];
    int n = 0;
    size_t len = (size_t)snprintf(sql, sizeof sql,
        "SELECT task_id, user_id, status, steps, round(cost_usd, 6),"
        " to_char(enqueued_at, 'YYYY-MM-DD HH24:MI:SS'), to_char(finished_at, 'YYYY-MM-DD HH24:MI:SS'),"
        " json_build_object('task_id', task_id, 'user_id', user_id, 'status', status, 'priority', priority,"
        "   'attempt', attempt, 'steps', steps, 'prompt_tokens', prompt_tokens,"
        "   'completion_tokens', completion_tokens, 'cost_usd', cost_usd, 'model', model,"
        "   'enqueued_at', enqueued_at, 'started_at', started_at, 'finished_at', finished_at)"
        " FROM agentq.tasks WHERE true");
    if (a->statuses) {
        params[n++] = a->statuses;
        len += (size_t)snprintf(sql + len, sizeof sql - len, " AND status = ANY ($%d::text[])", n);
    }
    if (a->user) {
        params[n++] = a->user;
        len += (size_t)snprintf(sql + len, sizeof sql - len, " AND user_id = $%d", n);
    }
    if (a->since.set) {
        bound_sql(&a->since, cond, sizeof cond, params, &n, since, sizeof since);
        len += (size_t)snprintf(sql + len, sizeof sql - len, " AND enqueued_at >= %s", cond);
    }
    if (a->until.set) {
        bound_sql(&a->until, cond, sizeof cond, params, &n, until, sizeof until);
        len += (size_t)snprintf(sql + len, sizeof sql - len, " AND enqueued_at < %s", cond);
    }
    snprintf(limit, sizeof limit, "%lld", a->limit);
    params[n++] = limit;
    snprintf(sql + len, sizeof sql - len, " ORDER BY enqueued_at DESC NULLS LAST, task_id LIMIT $%d::bigint", n);

    PGconn *pg = db(cfg);
    if (!pg) return CTL_UNREACHABLE;
    PGresult *r = q(pg, sql, n, params, PGRES_TUPLES_OK);
    PQfinish(pg);
    if (!r) return CTL_UNREACHABLE;
    if (a->json) {
        for (int i = 0; i < PQntuples(r); i++) puts(PQgetvalue(r, i, 7));
    } else if (PQntuples(r) == 0) {
        fprintf(stderr, "agentqctl list: no task matches\n");
    } else {
        static const int cols[] = {0, 1, 2, 3, 4, 5, 6};
        static const char *const headers[] = {"id", "user", "status", "steps", "cost_usd", "enqueued (UTC)",
                                              "finished (UTC)"};
        static const bool right[] = {false, false, false, true, true, false, false};
        print_table(r, cols, headers, right, 7);
    }
    PQclear(r);
    return CTL_OK;
}

/* --------------------------------------------------------------- result */

/* What `result --json` leaves out of the row: the writer's replay guard,
 * the lease, the defining message and its hash (sql/010, sql/012). */
#define RESULT_INTERNAL_COLUMNS \
    "ARRAY['claim_token', 'lease_owner', 'lease_until', 'leased_at', 'swept_at', 'body', 'body_sha256']"

/* "label  value", a multi-line value indented under its first line. */
static void print_field(const char *label, const char *value)
{
    printf("%-10s ", label);
    for (const char *p = value; *p; p++) {
        putchar(*p);
        if (*p == '\n' && p[1]) printf("%-10s ", "");
    }
    putchar('\n');
}

static int result_json(PGconn *pg, const char *id)
{
    const char *p[] = {id};
    PGresult *r = q(pg,
                    "SELECT json_build_object('task', to_jsonb(t) - " RESULT_INTERNAL_COLUMNS ","
                    " 'steps', coalesce((SELECT jsonb_agg(to_jsonb(s) ORDER BY s.attempt, s.step, s.id)"
                    " FROM agentq.steps s WHERE s.task_id = t.task_id), '[]'::jsonb))"
                    " FROM agentq.tasks t WHERE t.task_id = $1::uuid",
                    1, p, PGRES_TUPLES_OK);
    if (!r) return CTL_UNREACHABLE;
    int found = PQntuples(r) > 0;
    if (found) puts(PQgetvalue(r, 0, 0));
    else fprintf(stderr, "agentqctl result: no task %s\n", id);
    PQclear(r);
    return found ? CTL_OK : CTL_NOT_DONE;
}

static int result_text(PGconn *pg, const char *id)
{
    const char *p[] = {id};
    PGresult *t = q(pg,
                    "SELECT user_id, status, result, error, question, attempt, failures, interruptions,"
                    " steps, prompt_tokens, completion_tokens, round(cost_usd, 6), round(run_seconds::numeric, 1),"
                    " coalesce(model, '-'), to_char(enqueued_at, 'YYYY-MM-DD HH24:MI:SS'),"
                    " to_char(started_at, 'YYYY-MM-DD HH24:MI:SS'), to_char(finished_at, 'YYYY-MM-DD HH24:MI:SS')"
                    " FROM agentq.tasks WHERE task_id = $1::uuid",
                    1, p, PGRES_TUPLES_OK);
    if (!t) return CTL_UNREACHABLE;
    if (PQntuples(t) == 0) {
        fprintf(stderr, "agentqctl result: no task %s\n", id);
        PQclear(t);
        return CTL_NOT_DONE;
    }
    PGresult *s = q(pg,
                    "SELECT attempt, step, seq, kind, name, provider, status,"
                    " CASE WHEN duration_ms IS NULL THEN NULL"
                    "      WHEN duration_ms < 1000 THEN round(duration_ms::numeric) || ' ms'"
                    "      ELSE round(duration_ms::numeric / 1000, 2) || ' s' END,"
                    " CASE WHEN prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL"
                    "      THEN coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) END,"
                    " round(cost_usd, 6)"
                    " FROM agentq.steps WHERE task_id = $1::uuid ORDER BY attempt, step, id",
                    1, p, PGRES_TUPLES_OK);
    if (!s) {
        PQclear(t);
        return CTL_UNREACHABLE;
    }
    char line[512];
    print_field("task", id);
    print_field("user", PQgetvalue(t, 0, 0));
    print_field("status", PQgetvalue(t, 0, 1));
    if (!PQgetisnull(t, 0, 2)) print_field("result", PQgetvalue(t, 0, 2));
    if (!PQgetisnull(t, 0, 3)) print_field("error", PQgetvalue(t, 0, 3));
    if (!PQgetisnull(t, 0, 4)) print_field("question", PQgetvalue(t, 0, 4));
    snprintf(line, sizeof line, "%s (failures %s, interruptions %s)", PQgetvalue(t, 0, 5), PQgetvalue(t, 0, 6),
             PQgetvalue(t, 0, 7));
    print_field("attempts", line);
    snprintf(line, sizeof line, "%s; tokens %s prompt + %s completion; cost %s USD; running time %s s",
             PQgetvalue(t, 0, 8), PQgetvalue(t, 0, 9), PQgetvalue(t, 0, 10), PQgetvalue(t, 0, 11),
             PQgetvalue(t, 0, 12));
    print_field("steps", line);
    print_field("model", PQgetvalue(t, 0, 13));
    static const char *const when[] = {"enqueued", "started", "finished"};
    for (int i = 0; i < 3; i++) {
        snprintf(line, sizeof line, "%s UTC", PQgetvalue(t, 0, 14 + i));
        if (!PQgetisnull(t, 0, 14 + i)) print_field(when[i], line);
    }
    putchar('\n');
    if (PQntuples(s) == 0) {
        puts("(no steps)");
    } else {
        static const int cols[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
        static const char *const headers[] = {"attempt", "step",   "seq",      "kind",   "name",
                                              "provider", "status", "duration", "tokens", "cost_usd"};
        static const bool right[] = {true, true, true, false, false, false, false, true, true, true};
        print_table(s, cols, headers, right, 10);
    }
    PQclear(s);
    PQclear(t);
    return CTL_OK;
}

static int cmd_result(const aq_config *cfg, const ctl_args *a)
{
    PGconn *pg = db(cfg);
    if (!pg) return CTL_UNREACHABLE;
    int rc = a->json ? result_json(pg, a->pos[0]) : result_text(pg, a->pos[0]);
    PQfinish(pg);
    return rc;
}

/* ----------------------------------------------------------------- wait */

typedef enum { W_PENDING, W_FINAL, W_UNKNOWN } wait_state;

typedef struct wait_task {
    const char *id;
    wait_state state;
    bool notified;  /* its row turned final since it was last read */
    char status[32];
} wait_task;

/* Reads the rows of the pending tasks (only the notified ones, or all)
 * and settles those that are final or gone, printing "ID STATUS" for
 * each final one. Returns 0, -1 if the connection was lost, or
 * CTL_UNREACHABLE if the database refused the query. */
static int wait_check(PGconn *pg, wait_task *t, int n, bool only_notified)
{
    size_t cap = (size_t)n * 40 + 3, len = 1;
    char *ids = aq_xmalloc(cap);
    ids[0] = '{';
    for (int i = 0; i < n; i++)
        if (t[i].state == W_PENDING && (!only_notified || t[i].notified))
            len += (size_t)snprintf(ids + len, cap - len, "%s%s", len > 1 ? "," : "", t[i].id);
    snprintf(ids + len, cap - len, "}");
    const char *p[] = {ids};
    PGresult *r = PQexecParams(pg,
                               "SELECT task_id::text, status, agentq.is_final(status) FROM agentq.tasks"
                               " WHERE task_id = ANY ($1::uuid[])",
                               1, NULL, p, NULL, NULL, 0);
    free(ids);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        int rc = PQstatus(pg) == CONNECTION_OK ? CTL_UNREACHABLE : -1;
        if (rc == CTL_UNREACHABLE) fprintf(stderr, "agentqctl wait: %s", PQresultErrorMessage(r));
        PQclear(r);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        if (t[i].state != W_PENDING || (only_notified && !t[i].notified)) continue;
        t[i].notified = false;
        int row = -1;
        for (int k = 0; k < PQntuples(r) && row < 0; k++)
            if (!strcasecmp(PQgetvalue(r, k, 0), t[i].id)) row = k;
        if (row < 0) {
            t[i].state = W_UNKNOWN;
            fprintf(stderr, "agentqctl wait: no task %s (a task has a row once a worker routed it,"
                            " or at once with agentq-producer --record)\n", t[i].id);
            continue;
        }
        snprintf(t[i].status, sizeof t[i].status, "%s", PQgetvalue(r, row, 1));
        if (!strcmp(PQgetvalue(r, row, 2), "t")) {
            t[i].state = W_FINAL;
            printf("%s %s\n", t[i].id, t[i].status);
            fflush(stdout);
        }
    }
    PQclear(r);
    return 0;
}

/* LISTEN first, then read the rows: a task that turns final between the
 * two is seen by the read, one that turns final after it is notified.
 * Same returns as wait_check. */
static int wait_listen_and_check(PGconn *pg, wait_task *t, int n)
{
    PGresult *r = PQexec(pg, "LISTEN agentq_final");
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok) return PQstatus(pg) == CONNECTION_OK ? CTL_UNREACHABLE : -1;
    return wait_check(pg, t, n, false);
}

/* Marks the pending tasks whose notification libpq holds; true if any. */
static bool wait_take_notifies(PGconn *pg, wait_task *t, int n)
{
    bool any = false;
    PGnotify *nt;
    while ((nt = PQnotifies(pg))) {
        for (int i = 0; i < n; i++)
            if (t[i].state == W_PENDING && !strcasecmp(nt->extra, t[i].id)) any = t[i].notified = true;
        PQfreemem(nt);
    }
    return any;
}

static int wait_pending(const wait_task *t, int n)
{
    int k = 0;
    for (int i = 0; i < n; i++) k += t[i].state == W_PENDING;
    return k;
}

/* Blocks on the connection's socket until a notification, the deadline
 * or a lost connection: no polling of the table. A lost connection is
 * made again with backoff, and every pending row read again after the
 * new LISTEN (a NOTIFY sent meanwhile is not replayed). */
static int cmd_wait(const aq_config *cfg, const ctl_args *a)
{
    int n = a->npos;
    wait_task *t = aq_xcalloc((size_t)n, sizeof *t);
    for (int i = 0; i < n; i++) t[i].id = a->pos[i];
    int64_t deadline = a->timeout >= 0 ? aq_mono_us() + (int64_t)(a->timeout * 1e6) : INT64_MAX;
    /* LISTEN needs a session of its own: postgres.listen_dsn when set. */
    const char *dsn = aq_config_listen_dsn(cfg);
    PGconn *pg = aq_pg_connect_cli(dsn, "agentqctl");
    if (pg) PQclear(PQexec(pg, "SET TimeZone TO 'UTC'"));
    int rc = pg ? wait_listen_and_check(pg, t, n) : CTL_UNREACHABLE;
    bool lost = rc == -1;
    aq_pg_backoff backoff;
    aq_pg_backoff_init(&backoff, 100, 5000);
    char why[CTL_ERR_LEN] = "";
    while (rc != CTL_UNREACHABLE && wait_pending(t, n) > 0) {
        int64_t left_us = deadline - aq_mono_us();
        if (left_us <= 0) break;
        int left_ms = deadline == INT64_MAX ? -1 : (int)(left_us / 1000 < INT_MAX ? left_us / 1000 + 1 : INT_MAX);
        if (lost) {
            if (pg) {
                fprintf(stderr, "agentqctl wait: lost the database connection (%.*s); connecting again\n",
                        (int)strcspn(PQerrorMessage(pg), "\n"), PQerrorMessage(pg));
                PQfinish(pg);
                pg = NULL;
            }
            int pause = aq_pg_backoff_next(&backoff);
            usleep((useconds_t)(left_ms >= 0 && left_ms < pause ? left_ms : pause) * 1000);
            aq_pg_connect_opts o = {.application_name = "agentqctl",
                                    .timeout_ms = left_ms >= 0 && left_ms < 10000 ? left_ms : 10000};
            pg = aq_pg_connect(dsn, &o, why, sizeof why);
            if (!pg) continue;
            PQclear(PQexec(pg, "SET TimeZone TO 'UTC'"));
            aq_pg_backoff_reset(&backoff);
            rc = wait_listen_and_check(pg, t, n);
            lost = rc == -1;
            continue;
        }
        /* libpq may hold notifications read along with a query's reply:
         * the socket would not wake for those. */
        if (wait_take_notifies(pg, t, n)) {
            rc = wait_check(pg, t, n, true);
            lost = rc == -1;
            continue;
        }
        struct pollfd pfd = {.fd = PQsocket(pg), .events = POLLIN};
        int ready = poll(&pfd, 1, left_ms);
        if (ready < 0 && errno != EINTR) {
            fprintf(stderr, "agentqctl wait: poll: %s\n", strerror(errno));
            rc = CTL_UNREACHABLE;
        } else if (ready > 0 && (!PQconsumeInput(pg) || PQstatus(pg) != CONNECTION_OK)) {
            lost = true;
        }
    }
    int pending = wait_pending(t, n);
    if (rc == CTL_UNREACHABLE) {
        /* said already */
    } else if (pending && lost) {
        char shown[512];
        aq_log_redact(dsn, shown, sizeof shown);
        fprintf(stderr, "agentqctl wait: cannot connect to Postgres (%s): %s\n", shown,
                *why ? why : "the connection was lost");
        rc = CTL_UNREACHABLE;
    } else if (pending) {
        fprintf(stderr, "agentqctl wait: timed out after %g s; not final:", a->timeout);
        for (int i = 0; i < n; i++)
            if (t[i].state == W_PENDING) fprintf(stderr, " %s (%s)", t[i].id, t[i].status);
        fputc('\n', stderr);
        rc = CTL_TIMEOUT;
    } else {
        rc = CTL_OK;
        for (int i = 0; i < n; i++)
            if (t[i].state == W_UNKNOWN || strcmp(t[i].status, "completed")) rc = CTL_NOT_DONE;
    }
    if (pg) PQfinish(pg);
    free(t);
    return rc;
}

/* ---------------------------------------------------------------- prune */

/* agentq.prune (sql/016_visibility.sql) deletes one batch per call, each
 * call its own transaction; the cutoff is fixed once, so every batch and
 * a dry run agree on what is old. */
static int cmd_prune(const aq_config *cfg, const ctl_args *a)
{
    PGconn *pg = db(cfg);
    if (!pg) return CTL_UNREACHABLE;
    char secs[32], batch[32];
    snprintf(secs, sizeof secs, "%lld", a->older_than);
    snprintf(batch, sizeof batch, "%lld", a->batch);
    const char *p0[] = {secs};
    PGresult *c = q(pg, "SELECT now() - $1::float8 * interval '1 second'", 1, p0, PGRES_TUPLES_OK);
    if (!c) {
        PQfinish(pg);
        return CTL_UNREACHABLE;
    }
    char cutoff[64];
    snprintf(cutoff, sizeof cutoff, "%s", PQgetvalue(c, 0, 0));
    PQclear(c);
    const char *p[] = {cutoff, batch, a->statuses, a->dry_run ? "t" : "f"};
    long long tasks = 0, steps = 0, dead = 0, batches = 0;
    int rc = CTL_OK;
    for (;;) {
        PGresult *r = q(pg, "SELECT tasks, steps, dead_letters FROM agentq.prune($1::timestamptz, $2::int,"
                            " $3::text[], $4::bool)",
                        4, p, PGRES_TUPLES_OK);
        if (!r) {
            rc = CTL_UNREACHABLE;
            break;
        }
        long long bt = strtoll(PQgetvalue(r, 0, 0), NULL, 10), bd = strtoll(PQgetvalue(r, 0, 2), NULL, 10);
        tasks += bt;
        steps += strtoll(PQgetvalue(r, 0, 1), NULL, 10);
        dead += bd;
        batches++;
        PQclear(r);
        /* A batch that was not full was the last of its kind. */
        if (a->dry_run || (bt < a->batch && bd < a->batch)) break;
    }
    PQfinish(pg);
    printf("prune%s: %s %lld task%s (%lld step%s) finished before %s and %lld dead letter%s recorded before it",
           a->dry_run ? " --dry-run" : "", a->dry_run ? "would delete" : "deleted", tasks, tasks == 1 ? "" : "s", steps,
           steps == 1 ? "" : "s", cutoff, dead, dead == 1 ? "" : "s");
    if (!a->dry_run) printf(" in %lld batch%s", batches, batches == 1 ? "" : "es");
    if (a->statuses) printf(" (dead letters kept: --status)");
    if (rc != CTL_OK) printf(", then stopped by the error above");
    putchar('\n');
    return rc;
}

/* ------------------------------------------------------ migrate, cancel */

static int cmd_migrate(const aq_config *cfg, const ctl_args *a)
{
    const char *dir = aq_migrate_default_dir();
    char err[2048];
    if (a->list_migrations) {
        aq_migration *list;
        size_t n;
        if (aq_migrate_status(cfg->pg_dsn, dir, &list, &n, err, sizeof err) != AQ_OK) {
            fprintf(stderr, "agentqctl: %s\n", err);
            return CTL_UNREACHABLE;
        }
        for (size_t i = 0; i < n; i++)
            printf("%-5s %-28s %s%s\n", list[i].version, list[i].file ? list[i].file : "(file missing)",
                   list[i].applied ? list[i].applied_at : "not applied", list[i].changed ? "  (file changed since)" : "");
        aq_migrate_list_free(list, n);
        return CTL_OK;
    }
    int applied = 0;
    if (aq_migrate_apply(cfg->pg_dsn, dir, &applied, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: migrate: %s\n", err);
        return CTL_UNREACHABLE;
    }
    printf("migrate: %d migration%s applied from %s\n", applied, applied == 1 ? "" : "s", dir);
    return CTL_OK;
}

static int cmd_cancel(const aq_config *cfg, const ctl_args *a)
{
    const char *id = a->pos[0];
    PGconn *pg = db(cfg);
    if (!pg) return CTL_UNREACHABLE;
    const char *p[] = {id};
    PGresult *r = q(pg,
                    "UPDATE agentq.tasks SET cancel_requested = true WHERE task_id = $1::uuid"
                    " RETURNING status, agentq.is_final(status)",
                    1, p, PGRES_TUPLES_OK);
    PQfinish(pg);
    if (!r) return CTL_UNREACHABLE;
    int rc = CTL_OK;
    if (PQntuples(r) == 0) {
        fprintf(stderr, "agentqctl: no task %s (a task gets a row when a worker first takes it, or with agentq-producer --record)\n", id);
        rc = CTL_NOT_DONE;
    } else if (!strcmp(PQgetvalue(r, 0, 1), "t")) {
        printf("task %s is already %s\n", id, PQgetvalue(r, 0, 0));
    } else {
        /* A trigger NOTIFYs agentq_cancel; the worker running it stops it. */
        printf("cancel requested for task %s (now %s)\n", id, PQgetvalue(r, 0, 0));
    }
    PQclear(r);
    return rc;
}

/* agentq.answer (sql/014_sessions.sql) says what is wrong: not waiting,
 * answered already, no such task. */
static int cmd_answer(const aq_config *cfg, const ctl_args *a)
{
    const char *id = a->pos[0], *text = a->pos[1];
    char *owned = NULL;
    if (!strcmp(text, "-")) { /* a long answer, or one with quotes, from stdin */
        size_t len = 0;
        FILE *m = open_memstream(&owned, &len);
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) fwrite(buf, 1, n, m);
        fclose(m);
        while (len && (owned[len - 1] == '\n' || owned[len - 1] == '\r')) owned[--len] = '\0';
        text = owned;
    }
    PGconn *pg = db(cfg);
    if (!pg) {
        free(owned);
        return CTL_UNREACHABLE;
    }
    const char *p[] = {id, text};
    PGresult *r = PQexecParams(pg, "SELECT agentq.answer($1::uuid, $2::text)", 2, NULL, p, NULL, NULL, 0);
    int rc = CTL_OK;
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
        printf("task %s answered; it resumes with the answer (now %s)\n", id, PQgetvalue(r, 0, 0));
    } else {
        const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
        const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
        fprintf(stderr, "agentqctl: %s\n", msg ? msg : PQresultErrorMessage(r));
        /* no such task, or not waiting: nothing done; anything else is the database's */
        rc = state && (!strcmp(state, "P0002") || !strcmp(state, "55000")) ? CTL_NOT_DONE : CTL_UNREACHABLE;
    }
    PQclear(r);
    PQfinish(pg);
    free(owned);
    return rc;
}

/* -------------------------------------------------------------- requeue */

/* Marks dead letters requeued and their tasks queued with fresh failure
 * and interruption counts (or, with on = false, parks them again with the
 * status the dead letter gave). A task row changes only for a dead letter
 * of the body that defined it: requeueing a twin that was refused never
 * reopens the task it collided with. The attempt number goes on, so the
 * new run's steps do not collide with the old ones. One transaction.
 * Returns 0 or 3. */
static int mark_requeued(PGconn *pg, char **ids, int n, bool on)
{
    PQclear(PQexec(pg, "BEGIN"));
    for (int i = 0; i < n; i++) {
        const char *p[] = {ids[i]};
        PGresult *r = q(pg,
                        on ? "WITH d AS (UPDATE agentq.dead_letters SET requeued_at = now() WHERE id = $1::bigint"
                             " RETURNING task_id, body)"
                             " UPDATE agentq.tasks t SET status = 'queued', failures = 0, interruptions = 0,"
                             " error = NULL, finished_at = NULL, cancel_requested = false, deadline = NULL"
                             " FROM d WHERE t.task_id = d.task_id"
                             " AND (t.body_sha256 IS NULL OR t.body_sha256 = sha256(d.body))"
                           : "WITH d AS (UPDATE agentq.dead_letters SET requeued_at = NULL WHERE id = $1::bigint"
                             " RETURNING task_id, reason, error, body)"
                             " UPDATE agentq.tasks t SET status = CASE d.reason WHEN 'expired' THEN 'expired'"
                             " WHEN 'rejected' THEN 'rejected' ELSE 'failed' END, error = d.error, finished_at = now()"
                             " FROM d WHERE t.task_id = d.task_id AND t.status = 'queued'"
                             " AND (t.body_sha256 IS NULL OR t.body_sha256 = sha256(d.body))",
                        1, p, PGRES_COMMAND_OK);
        if (!r) {
            PQclear(PQexec(pg, "ROLLBACK"));
            return CTL_UNREACHABLE;
        }
        PQclear(r);
    }
    PGresult *r = q(pg, "COMMIT", 0, NULL, PGRES_COMMAND_OK);
    if (!r) return CTL_UNREACHABLE;
    PQclear(r);
    return CTL_OK;
}

/* Publishes each dead letter selected by `where` back to the task queue
 * with a fresh attempt count, then marks it requeued. */
static int requeue(const aq_config *cfg, PGconn *pg, const char *where, int n, const char *const *params)
{
    char sql[1024], err[512];
    snprintf(sql, sizeof sql,
             "SELECT id, body, coalesce(task_id::text, ''), (SELECT priority FROM agentq.tasks t WHERE t.task_id = d.task_id)"
             " FROM agentq.dead_letters d WHERE requeued_at IS NULL AND %s ORDER BY id",
             where);
    PGresult *r = PQexecParams(pg, sql, n, NULL, params, NULL, NULL, 1); /* binary: body is bytea */
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "agentqctl: %s", PQresultErrorMessage(r));
        PQclear(r);
        return CTL_UNREACHABLE;
    }
    int rows = PQntuples(r);
    if (rows == 0) {
        fprintf(stderr, "agentqctl: nothing to requeue\n");
        PQclear(r);
        return CTL_NOT_DONE;
    }
    aq_broker *b = aq_broker_connect(cfg, 0, 10000, err, sizeof err);
    if (!b || aq_broker_declare(b, cfg, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: %s\n", err);
        aq_broker_free(b);
        PQclear(r);
        return CTL_UNREACHABLE;
    }
    /* The rows say queued (attempt 1) before the messages exist: a worker
     * that takes one at once must not find the old final status and ack it
     * unrun. If the broker does not confirm, the rows are put back. */
    char **ids = aq_xcalloc((size_t)rows, sizeof *ids);
    for (int i = 0; i < rows; i++) {
        const unsigned char *v = (const unsigned char *)PQgetvalue(r, i, 0);
        long long id = 0;
        for (int k = 0; k < 8; k++) id = (id << 8) | v[k];
        ids[i] = aq_xmalloc(32);
        snprintf(ids[i], 32, "%lld", id);
    }
    int rc = mark_requeued(pg, ids, rows, true);
    for (int i = 0; rc == 0 && i < rows; i++) {
        const char *tid = PQgetvalue(r, i, 2);
        int prio = 0;
        if (!PQgetisnull(r, i, 3)) {
            const unsigned char *v = (const unsigned char *)PQgetvalue(r, i, 3);
            prio = (v[0] << 8) | v[1]; /* smallint, network order */
        }
        aq_publish p = {cfg->amqp_exchange, "task", PQgetvalue(r, i, 1), (size_t)PQgetlength(r, i, 1),
                        *tid ? tid : NULL, prio, NULL, 0, NULL};
        if (aq_broker_publish(b, &p, NULL, err, sizeof err) < 0) {
            fprintf(stderr, "agentqctl: %s\n", err);
            rc = CTL_UNREACHABLE;
        }
    }
    int64_t nacked = 0;
    if (rc == 0 && aq_broker_wait_confirms(b, 30000, &nacked, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: %s\n", err);
        rc = CTL_UNREACHABLE;
    }
    aq_broker_free(b);
    if (rc != 0) {
        fprintf(stderr, "agentqctl: not confirmed by the broker; the dead letters stay parked\n");
        (void)mark_requeued(pg, ids, rows, false);
    }
    for (int i = 0; i < rows; i++) free(ids[i]);
    free(ids);
    if (rc != 0) {
        PQclear(r);
        return rc;
    }
    printf("requeued %d dead letter%s\n", rows, rows == 1 ? "" : "s");
    PQclear(r);
    return CTL_OK;
}

static int cmd_requeue(const aq_config *cfg, const ctl_args *a)
{
    if (a->dead == (a->npos == 1))
        return usage_error(a->cmd, "takes a task id or --dead, %s", a->dead ? "not both" : "one of them");
    if (!a->dead && (a->reason || a->limit))
        return usage_error(a->cmd, "--reason and --limit go with --dead");
    PGconn *pg = db(cfg);
    if (!pg) return CTL_UNREACHABLE;
    int rc;
    if (!a->dead) {
        const char *p[] = {a->pos[0]};
        /* Not the duplicates: they are refused twins, not the task. */
        rc = requeue(cfg, pg, "task_id = $1::uuid AND reason <> 'duplicate'", 1, p);
    } else {
        char limit[32];
        snprintf(limit, sizeof limit, "%lld", a->limit);
        const char *p[] = {a->reason ? a->reason : "", a->limit ? limit : NULL};
        /* Duplicates only when asked for by name; no --limit: all. */
        rc = requeue(cfg, pg,
                     "id IN (SELECT id FROM agentq.dead_letters WHERE requeued_at IS NULL"
                     " AND (($1 = '' AND reason <> 'duplicate') OR reason = $1) ORDER BY id LIMIT $2::bigint)",
                     2, p);
    }
    PQfinish(pg);
    return rc;
}

/* ------------------------------------------------------------- commands */

static const ctl_opt migrate_opts[] = {
    {"--status", NULL, OPT_FLAG, ARG(list_migrations), NULL, 0, 0, false,
     "list the migrations and whether each is applied; apply none"},
};
static const ctl_opt status_opts[] = {
    {"--json", NULL, OPT_FLAG, ARG(json), NULL, 0, 0, false, "one JSON object instead of the tables"},
};
static const ctl_opt top_opts[] = {
    {"--interval", "S", OPT_SECONDS, ARG(interval), "2", 0.1, 86400, false, "seconds between refreshes"},
};
static const ctl_opt list_opts[] = {
    {"--status", "S", OPT_STATUSES, ARG(statuses), NULL, 0, 0, false,
     "only tasks of status S (a comma-separated list: failed,timeout)"},
    {"--user", "U", OPT_TEXT, ARG(user), NULL, 0, 0, false, "only user U's tasks"},
    {"--since", "T", OPT_TIME, ARG(since), NULL, 0, 0, false, "only tasks enqueued at or after T"},
    {"--until", "T", OPT_TIME, ARG(until), NULL, 0, 0, false, "only tasks enqueued before T"},
    {"--limit", "N", OPT_COUNT, ARG(limit), "50", 1, 1000000, false, "at most N tasks"},
    {"--json", NULL, OPT_FLAG, ARG(json), NULL, 0, 0, false, "one JSON object a line instead of the table"},
};
static const ctl_opt result_opts[] = {
    {"--json", NULL, OPT_FLAG, ARG(json), NULL, 0, 0, false,
     "{\"task\": the row, \"steps\": [its step rows]} instead of the tables"},
};
static const ctl_opt wait_opts[] = {
    {"--timeout", "S", OPT_SECONDS, ARG(timeout), NULL, 0, 31536000, false,
     "give up after S seconds (0: look once; default: no limit)"},
};
static const ctl_opt requeue_opts[] = {
    {"--dead", NULL, OPT_FLAG, ARG(dead), NULL, 0, 0, false, "every parked dead letter instead of one task's"},
    {"--reason", "R", OPT_TEXT, ARG(reason), NULL, 0, 0, false,
     "with --dead: only dead letters of reason R ('duplicate' ones only when named)"},
    {"--limit", "N", OPT_COUNT, ARG(limit), NULL, 1, 1000000, false, "with --dead: at most N (default all)"},
};
static const ctl_opt prune_opts[] = {
    {"--older-than", "DURATION", OPT_DURATION, ARG(older_than), NULL, 0, 0, true,
     "delete what finished (tasks) or was recorded (dead letters) longer ago than DURATION"},
    {"--status", "S", OPT_FINAL_STATUSES, ARG(statuses), NULL, 0, 0, false,
     "only tasks of final status S (a comma-separated list); dead letters are then kept"},
    {"--dry-run", NULL, OPT_FLAG, ARG(dry_run), NULL, 0, 0, false, "count what would be deleted; delete nothing"},
    {"--batch", "N", OPT_COUNT, ARG(batch), "1000", 1, 100000, false,
     "tasks (and dead letters) deleted per transaction"},
};

#define TIMES_HELP                                                                                            \
    "T is a DURATION before now (30s, 15m, 12h, 7d, 1d12h: whole numbers, units largest first) or a\n"        \
    "TIMESTAMP (2024-05-01, 2024-05-01T12:00:00Z, 2024-05-01 12:00:00+02:00; no zone: UTC)."

static const ctl_cmd commands[] = {
    {"migrate", "[--status]", "apply the SQL migrations not yet applied (safe to repeat)",
     "Applies the migrations of the SQL directory not yet applied, each in its own transaction.\n"
     "Exit status: 0 done, 2 usage, 3 the database cannot be reached or refused a migration.",
     0, 0, 0, migrate_opts, AQ_ARRAY_LEN(migrate_opts), cmd_migrate, NULL},
    {"status", "[--json]", "ready and unacked messages and consumers of each queue; tasks by status",
     "Each queue (the task queue, every lane, the retry tiers, the dead queue): ready messages and\n"
     "consumers (a passive queue.declare) and unacked messages (RabbitMQ's management API, when\n"
     "amqp.management_url is set; else '-', null in JSON); then tasks by status and parked dead letters.\n"
     "--json: {\"queues\": [{\"name\", \"role\" (ingress, lane, retry, dead), \"ready\", \"unacked\",\n"
     "\"consumers\"}], \"tasks\": {STATUS: count, ...every status}, \"dead_letters_parked\"}; a part that\n"
     "cannot be read is null.\n"
     "Exit status: 0 ok, 2 usage, 3 the broker, its management API or the database cannot be reached\n"
     "(stderr names which; the rest is still shown).",
     0, 0, 0, status_opts, AQ_ARRAY_LEN(status_opts), cmd_status, NULL},
    {"top", "[--interval S]", "status, refreshed every S seconds until Ctrl-C",
     "The text form of status, redrawn every S seconds until Ctrl-C; an outage is shown, not fatal.\n"
     "Exit status: 2 usage.",
     0, 0, 0, top_opts, AQ_ARRAY_LEN(top_opts), cmd_top, NULL},
    {"list", "[--status S] [--user U] [--since T] [--until T] [--limit N] [--json]",
     "tasks, newest first, as a table or JSON lines",
     "Tasks, newest first (by enqueued_at): id, user, status, steps, cost_usd, enqueued and finished\n"
     "(UTC). --json: one object a line with task_id, user_id, status, priority, attempt, steps,\n"
     "prompt_tokens, completion_tokens, cost_usd, model, enqueued_at, started_at, finished_at.\n" TIMES_HELP "\n"
     "Exit status: 0 ok (no task matching is no error), 2 usage, 3 the database cannot be reached.",
     0, 0, 0, list_opts, AQ_ARRAY_LEN(list_opts), cmd_list, NULL},
    {"result", "ID [--json]", "one task: its summary and a table of its steps",
     "The task's summary (status, result or error, attempts, totals, times) and a table of its steps\n"
     "(attempt, step, seq, kind, name, provider, status, duration, tokens, cost). --json: the row\n"
     "without internal columns (claim token, lease, body) and every step row.\n"
     "Exit status: 0 ok, 1 no such task, 2 usage, 3 the database cannot be reached.",
     1, 1, 1, result_opts, AQ_ARRAY_LEN(result_opts), cmd_result, NULL},
    {"wait", "ID... [--timeout S]", "wait until every task is final; the exit status says how they ended",
     "Returns once every task is final, printing \"ID STATUS\" as each becomes final. It does not poll:\n"
     "it LISTENs for agentq_final (sent when a status becomes final) before reading the rows, and\n"
     "reads them again after a reconnect. An id with no row counts as unknown (a task has a row once\n"
     "a worker routed it, or at once with agentq-producer --record).\n"
     "Exit status: 0 all completed; 1 some ended otherwise (failed, timeout, ...) or are unknown;\n"
     "2 usage; 3 the database cannot be reached; 4 --timeout ran out first.",
     1, -1, -1, wait_opts, AQ_ARRAY_LEN(wait_opts), cmd_wait, NULL},
    {"cancel", "ID", "ask for a task to stop (it ends as 'cancelled')",
     "Sets the task's cancel_requested; the worker running it stops it.\n"
     "Exit status: 0 asked (or final already), 1 no such task, 2 usage, 3 the database cannot be reached.",
     1, 1, 1, NULL, 0, cmd_cancel, NULL},
    {"answer", "ID TEXT", "answer the question of a 'waiting' task (ask_human; TEXT '-': stdin)",
     "Answers the question of a task that is 'waiting' (ask_human); it resumes with TEXT as the answer.\n"
     "TEXT '-' reads it from standard input; put -- before a TEXT that starts with '-'.\n"
     "Exit status: 0 answered, 1 no such task or not waiting, 2 usage, 3 the database cannot be reached.",
     2, 2, 1, NULL, 0, cmd_answer, NULL},
    {"requeue", "ID | --dead [--reason R] [--limit N]", "send dead letters back to the task queue",
     "Sends a task's dead letter, or with --dead every parked one, back to the task queue with fresh\n"
     "failure and interruption counts. 'duplicate' dead letters (refused twins of a task) go only with\n"
     "--reason duplicate.\n"
     "Exit status: 0 requeued, 1 nothing to requeue, 2 usage, 3 the broker or the database cannot be\n"
     "reached.",
     0, 1, 1, requeue_opts, AQ_ARRAY_LEN(requeue_opts), cmd_requeue, NULL},
    {"prune", "--older-than DURATION [--status S] [--dry-run] [--batch N]",
     "delete old finished tasks with their steps, and old dead letters",
     "Deletes finished tasks (final status) whose finished_at is older than DURATION, with their steps,\n"
     "and dead letters recorded longer ago, N per transaction (agentq.prune, which a worker can call\n"
     "too), so no lock is held long. Queued, running, retrying and waiting tasks are never deleted.\n"
     "DURATION: 30s, 15m, 12h, 7d, 1d12h (whole numbers, units largest first).\n"
     "Exit status: 0 done (also when nothing was old enough), 2 usage, 3 the database cannot be\n"
     "reached or failed (what was deleted before stays deleted).",
     0, 0, 0, prune_opts, AQ_ARRAY_LEN(prune_opts), cmd_prune, NULL},
    {"dashboard", "[--listen HOST:PORT] [--admin-token-env NAME]", "the web dashboard (docs/dashboard.md)",
     NULL, 0, 0, 0, NULL, 0, NULL, aq_dashboard_main},
};

static void usage(FILE *out)
{
    fputs("Usage: agentqctl [-c FILE] COMMAND [ARGS]\n\nCommands:\n", out);
    for (size_t i = 0; i < AQ_ARRAY_LEN(commands); i++) {
        const ctl_cmd *c = &commands[i];
        char left[128];
        snprintf(left, sizeof left, "%s %s", c->name, c->synopsis);
        if (strlen(left) > 24) fprintf(out, "  %s\n  %-24s %s\n", left, "", c->summary);
        else fprintf(out, "  %-24s %s\n", left, c->summary);
    }
    fputs("\n'agentqctl COMMAND --help' says what a command prints and takes.\n"
          "\n"
          "Options:\n"
          "  -c, --config FILE        configuration file\n"
          "  -h, --help               this help\n"
          "  -V, --version            version\n"
          "\n"
          "Exit status: 0 ok; 1 not found, nothing done, or (wait) a task that did not complete;\n"
          "2 usage or configuration error (naming the argument or key); 3 the broker or the\n"
          "database cannot be reached or refused; 4 (wait) timed out.\n\n",
          out);
    aq_config_print_env_help(out);
}

int main(int argc, char **argv)
{
    const char *config_path = NULL;
    static const struct option longopts[] = {{"config", required_argument, 0, 'c'},
                                             {"help", no_argument, 0, 'h'},
                                             {"version", no_argument, 0, 'V'},
                                             {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "+c:hV", longopts, NULL)) != -1) {
        switch (ch) {
        case 'c': config_path = optarg; break;
        case 'h': usage(stdout); return CTL_OK;
        case 'V': printf("agentqctl %s\n", AGENTQ_VERSION); return CTL_OK;
        default: fprintf(stderr, "Try 'agentqctl --help'.\n"); return CTL_USAGE;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return CTL_USAGE;
    }
    const ctl_cmd *cmd = NULL;
    for (size_t i = 0; i < AQ_ARRAY_LEN(commands) && !cmd; i++)
        if (!strcmp(commands[i].name, argv[optind])) cmd = &commands[i];
    if (!cmd) {
        fprintf(stderr, "agentqctl: unknown command '%s'. Try 'agentqctl --help'.\n", argv[optind]);
        return CTL_USAGE;
    }
    if (cmd->main) {
        aq_config cfg;
        char err[CTL_ERR_LEN];
        if (aq_config_load(&cfg, config_path, err, sizeof err) != AQ_OK) {
            fprintf(stderr, "agentqctl: %s\n", err);
            aq_config_free(&cfg);
            return CTL_USAGE;
        }
        aq_log_set_level((aq_log_level)aq_log_level_parse(cfg.log_level));
        int rc = cmd->main(&cfg, argc - optind, argv + optind);
        aq_config_free(&cfg);
        return rc;
    }
    ctl_args args;
    int rc = parse_args(cmd, argc - optind, argv + optind, &args);
    if (rc != CTL_OK) {
        args_free(&args);
        return rc == CTL_HELP ? CTL_OK : rc;
    }
    aq_config cfg;
    char err[CTL_ERR_LEN];
    if (aq_config_load(&cfg, config_path, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: %s\n", err);
        aq_config_free(&cfg);
        args_free(&args);
        return CTL_USAGE;
    }
    aq_log_set_level((aq_log_level)aq_log_level_parse(cfg.log_level));
    curl_global_init(CURL_GLOBAL_DEFAULT);
    rc = cmd->run(&cfg, &args);
    curl_global_cleanup();
    aq_config_free(&cfg);
    args_free(&args);
    return rc;
}
