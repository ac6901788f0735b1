/* prom.c — the metrics registry and its text exposition (see prom.h).
 *
 * Owns: the families (a list in the order they were made) and their
 * series. A family keeps its series in an array, in the order first seen
 * (the exposition's), and an open-addressing index over it keyed by the
 * hash of the label values, so finding a series allocates nothing and
 * costs one hash and a probe or two. Does not own: what the numbers mean,
 * or when they are read (the caller's). */
#include "agentq/prom.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct aq_prom_series {
    const aq_prom_family *f;               /* a histogram's bounds */
    uint64_t hash;
    double value;                          /* counter, gauge */
    double sum;                            /* histogram */
    uint64_t count;
    const char *values[AQ_PROM_LABELS_MAX]; /* into the text after buckets[] */
    uint64_t buckets[];                    /* histogram: each bucket's own count, +Inf last */
};

struct aq_prom_family {
    aq_prom_family *next;
    aq_prom_type type;
    char *name, *help;
    char *label_text;                      /* the labels argument, split in place */
    const char *labels[AQ_PROM_LABELS_MAX];
    int nlabels;
    double bounds[AQ_PROM_BOUNDS_MAX];
    size_t nbounds;
    aq_prom_series **series;
    size_t nseries, cap;
    uint32_t *index;                       /* series position + 1; 0: empty slot */
    size_t index_cap;                      /* a power of two, at least twice nseries */
};

struct aq_prom {
    aq_prom_family *first, *last;
};

static const char *const type_names[] = {"counter", "gauge", "histogram"};

aq_prom *aq_prom_new(void) { return aq_xcalloc(1, sizeof(aq_prom)); }

static void family_free(aq_prom_family *f)
{
    for (size_t i = 0; i < f->nseries; i++) free(f->series[i]);
    free(f->series);
    free(f->index);
    free(f->name);
    free(f->help);
    free(f->label_text);
    free(f);
}

void aq_prom_free(aq_prom *p)
{
    if (!p) return;
    for (aq_prom_family *f = p->first, *n; f; f = n) {
        n = f->next;
        family_free(f);
    }
    free(p);
}

/* [a-zA-Z_][a-zA-Z0-9_]*, and ':' too in a metric name. */
static bool valid_name(const char *s, bool metric)
{
    if (!s || !*s || (*s >= '0' && *s <= '9')) return false;
    for (; *s; s++) {
        char c = *s;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                  (metric && c == ':');
        if (!ok) return false;
    }
    return true;
}

static bool valid_label(const aq_prom_family *f, const char *l)
{
    if (!valid_name(l, false) || !strncmp(l, "__", 2)) return false;
    if (f->type == AQ_PROM_HISTOGRAM && !strcmp(l, "le")) return false;
    for (int i = 0; i < f->nlabels; i++)
        if (!strcmp(f->labels[i], l)) return false;
    return true;
}

aq_prom_family *aq_prom_family_new(aq_prom *p, aq_prom_type type, const char *name, const char *help,
                                   const char *labels, const double *bounds, size_t nbounds)
{
    if (!valid_name(name, true) || (unsigned)type > AQ_PROM_HISTOGRAM) return NULL;
    if ((type == AQ_PROM_HISTOGRAM) != (nbounds > 0) || nbounds > AQ_PROM_BOUNDS_MAX) return NULL;
    for (size_t i = 0; i < nbounds; i++)
        if (!isfinite(bounds[i]) || (i && !(bounds[i] > bounds[i - 1]))) return NULL;
    for (const aq_prom_family *o = p->first; o; o = o->next)
        if (!strcmp(o->name, name)) return NULL;

    aq_prom_family *f = aq_xcalloc(1, sizeof *f);
    f->type = type;
    f->label_text = aq_xstrdup(labels ? labels : "");
    for (char *l = f->label_text; *f->label_text; l++) { /* "a,,b" and "a," name an empty label */
        char *end = l + strcspn(l, ",");
        bool last = !*end;
        *end = '\0';
        if (f->nlabels == AQ_PROM_LABELS_MAX || !valid_label(f, l)) {
            family_free(f);
            return NULL;
        }
        f->labels[f->nlabels++] = l;
        if (last) break;
        l = end;
    }
    f->name = aq_xstrdup(name);
    f->help = aq_xstrdup(help ? help : "");
    if (nbounds) memcpy(f->bounds, bounds, nbounds * sizeof *bounds);
    f->nbounds = nbounds;
    f->index_cap = 8;
    f->index = aq_xcalloc(f->index_cap, sizeof *f->index);
    if (p->last) p->last->next = f;
    else p->first = f;
    p->last = f;
    /* A family without labels is one series: there from the start, so
     * that a scrape shows it at 0 before anything happened. */
    if (!f->nlabels) aq_prom_with(f, NULL);
    return f;
}

static const char *value_at(const aq_prom_family *f, const char *const *values, int i)
{
    return values && values[i] ? values[i] : "";
}

/* FNV-1a over the values, each with its NUL: ("ab", "") and ("a", "b")
 * hash apart. */
static uint64_t hash_values(const aq_prom_family *f, const char *const *values)
{
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < f->nlabels; i++) {
        const char *v = value_at(f, values, i);
        do h = (h ^ (unsigned char)*v) * 1099511628211ULL;
        while (*v++);
    }
    return h;
}

static bool same_values(const aq_prom_family *f, const aq_prom_series *s, const char *const *values)
{
    for (int i = 0; i < f->nlabels; i++)
        if (strcmp(s->values[i], value_at(f, values, i))) return false;
    return true;
}

static void index_put(aq_prom_family *f, size_t pos)
{
    size_t mask = f->index_cap - 1;
    size_t i = (size_t)f->series[pos]->hash & mask;
    while (f->index[i]) i = (i + 1) & mask;
    f->index[i] = (uint32_t)(pos + 1);
}

static aq_prom_series *series_new(aq_prom_family *f, const char *const *values, uint64_t hash)
{
    size_t nb = f->type == AQ_PROM_HISTOGRAM ? f->nbounds + 1 : 0, text = 0;
    for (int i = 0; i < f->nlabels; i++) text += strlen(value_at(f, values, i)) + 1;
    aq_prom_series *s = aq_xcalloc(1, sizeof *s + nb * sizeof s->buckets[0] + text);
    s->f = f;
    s->hash = hash;
    char *at = (char *)&s->buckets[nb];
    for (int i = 0; i < f->nlabels; i++) {
        size_t n = strlen(value_at(f, values, i)) + 1;
        memcpy(at, value_at(f, values, i), n);
        s->values[i] = at;
        at += n;
    }
    if (f->nseries == f->cap) {
        f->cap = f->cap ? f->cap * 2 : 4;
        f->series = aq_xrealloc(f->series, f->cap * sizeof *f->series);
    }
    f->series[f->nseries++] = s;
    if (f->nseries * 2 > f->index_cap) { /* keep probes short: rebuild at half full */
        free(f->index);
        f->index_cap *= 2;
        f->index = aq_xcalloc(f->index_cap, sizeof *f->index);
        for (size_t i = 0; i < f->nseries; i++) index_put(f, i);
    } else {
        index_put(f, f->nseries - 1);
    }
    return s;
}

aq_prom_series *aq_prom_with(aq_prom_family *f, const char *const *values)
{
    uint64_t h = hash_values(f, values);
    size_t mask = f->index_cap - 1;
    for (size_t i = (size_t)h & mask; f->index[i]; i = (i + 1) & mask) {
        aq_prom_series *s = f->series[f->index[i] - 1];
        if (s->hash == h && same_values(f, s, values)) return s;
    }
    return series_new(f, values, h);
}

void aq_prom_add(aq_prom_series *s, double v) { s->value += v; }

void aq_prom_set(aq_prom_series *s, double v) { s->value = v; }

void aq_prom_observe(aq_prom_series *s, double v)
{
    if (isnan(v)) return;
    const aq_prom_family *f = s->f;
    size_t i = 0;
    while (i < f->nbounds && v > f->bounds[i]) i++;
    s->buckets[i]++;
    s->sum += v;
    s->count++;
}

/* ---- exposition ---------------------------------------------------------- */

/* The shortest of %.15g..%.17g that reads back as v; NaN and the
 * infinities as Prometheus spells them. */
static const char *number(char *buf, size_t len, double v)
{
    if (isnan(v)) return "NaN";
    if (isinf(v)) return v > 0 ? "+Inf" : "-Inf";
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    return buf;
}

/* `s` with \ and newline escaped, and " too in a label value. */
static void put_escaped(FILE *out, const char *s, bool label)
{
    for (; *s; s++) {
        if (*s == '\\') fputs("\\\\", out);
        else if (*s == '\n') fputs("\\n", out);
        else if (*s == '"' && label) fputs("\\\"", out);
        else fputc(*s, out);
    }
}

/* {a="x",b="y"[,le="bound"]}, without the labels whose value is empty,
 * and nothing at all when none is left. */
static void put_labels(FILE *out, const aq_prom_family *f, const aq_prom_series *s, const char *le)
{
    bool any = false;
    for (int i = 0; i < f->nlabels; i++) {
        if (!*s->values[i]) continue;
        fprintf(out, "%s%s=\"", any ? "," : "{", f->labels[i]);
        put_escaped(out, s->values[i], true);
        fputc('"', out);
        any = true;
    }
    if (le) {
        fprintf(out, "%sle=\"%s\"", any ? "," : "{", le);
        any = true;
    }
    if (any) fputc('}', out);
}

static void put_histogram(FILE *out, const aq_prom_family *f, const aq_prom_series *s)
{
    char num[40], le[40];
    uint64_t cum = 0;
    for (size_t i = 0; i <= f->nbounds; i++) {
        cum += s->buckets[i];
        fprintf(out, "%s_bucket", f->name);
        put_labels(out, f, s, i < f->nbounds ? number(le, sizeof le, f->bounds[i]) : "+Inf");
        fprintf(out, " %llu\n", (unsigned long long)cum);
    }
    fprintf(out, "%s_sum", f->name);
    put_labels(out, f, s, NULL);
    fprintf(out, " %s\n", number(num, sizeof num, s->sum));
    fprintf(out, "%s_count", f->name);
    put_labels(out, f, s, NULL);
    fprintf(out, " %llu\n", (unsigned long long)s->count);
}

void aq_prom_write(const aq_prom *p, FILE *out)
{
    char num[40];
    for (const aq_prom_family *f = p->first; f; f = f->next) {
        fprintf(out, "# HELP %s ", f->name);
        put_escaped(out, f->help, false);
        fprintf(out, "\n# TYPE %s %s\n", f->name, type_names[f->type]);
        for (size_t i = 0; i < f->nseries; i++) {
            const aq_prom_series *s = f->series[i];
            if (f->type == AQ_PROM_HISTOGRAM) {
                put_histogram(out, f, s);
                continue;
            }
            fputs(f->name, out);
            put_labels(out, f, s, NULL);
            fprintf(out, " %s\n", number(num, sizeof num, s->value));
        }
    }
}

char *aq_prom_text(const aq_prom *p)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) aq_oom("the metrics text");
    aq_prom_write(p, f);
    if (fclose(f) != 0 || !buf) aq_oom("the metrics text");
    return buf;
}
