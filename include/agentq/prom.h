/* prom.h — a Prometheus metrics registry: counters, gauges and histograms
 * with labels, and their text exposition (format 0.0.4).
 *
 * A family is a name, a help text, a type, its label names and, for a
 * histogram, its bucket bounds; a series is one combination of label
 * values of a family. One mechanism serves all three types: find the
 * series (aq_prom_with), then add, set or observe.
 *
 * Cost: finding a series is a hash of its label values and one probe;
 * add and set are one store; observe is a walk over the bounds and three
 * stores. A series is allocated once, when its combination is first seen,
 * and lives as long as the registry: label sets must be bounded (map
 * outside text — an LLM's tool name, a provider's model string — to known
 * values before it becomes a label value). Only the exposition allocates
 * afterwards.
 *
 * Exposition: families in the order they were made, each with # HELP and
 * # TYPE, then its series in the order they were first seen. Label values
 * are escaped (\\, \", \n), help texts too (\\, \n); a label whose value is
 * empty is left out of its series (Prometheus reads the two alike). A
 * histogram writes _bucket{le} cumulatively up to le="+Inf", then _sum and
 * _count. Values print as the shortest text that reads back the same, and
 * NaN and the infinities as Prometheus spells them.
 *
 * Threads: none of its own; one thread uses a registry (the worker's
 * loop). */
#ifndef AGENTQ_PROM_H
#define AGENTQ_PROM_H

#include "agentq/common.h"

#include <stdio.h>

typedef struct aq_prom aq_prom;
typedef struct aq_prom_family aq_prom_family;
typedef struct aq_prom_series aq_prom_series;

typedef enum aq_prom_type {
    AQ_PROM_COUNTER,
    AQ_PROM_GAUGE,
    AQ_PROM_HISTOGRAM,
} aq_prom_type;

/* Most labels a family has, and most bounds a histogram has. */
#define AQ_PROM_LABELS_MAX 8
#define AQ_PROM_BOUNDS_MAX 32

/* An empty registry. The caller frees it with aq_prom_free(). */
aq_prom *aq_prom_new(void);
/* Frees the registry with its families and series; NULL is allowed. */
void aq_prom_free(aq_prom *p);

/* Makes a family of `p` and returns it (owned by the registry). `labels`
 * names its labels, comma-separated ("provider,model"; NULL or "" for
 * none); a family without labels has its one series from the start, at 0.
 * A histogram takes `nbounds` upper bounds, strictly increasing and
 * finite (copied; +Inf is implied), others none (NULL, 0). Strings are
 * copied. Returns NULL when the definition is wrong: a name or label name
 * that is not [a-zA-Z_][a-zA-Z0-9_]* (a label starting "__" included), a
 * name the registry already has, too many labels or bounds, bounds that
 * do not increase, or a histogram label named "le". */
aq_prom_family *aq_prom_family_new(aq_prom *p, aq_prom_type type, const char *name, const char *help,
                                   const char *labels, const double *bounds, size_t nbounds);

/* The series of `f` whose label values are `values` (one per label, in
 * the family's order; NULL reads as ""; the array may be NULL for a
 * family without labels), made on first use with the values copied. The
 * series stays valid as long as the registry. */
aq_prom_series *aq_prom_with(aq_prom_family *f, const char *const *values);

/* Adds `v` to a counter's or a gauge's value (a counter takes v >= 0). */
void aq_prom_add(aq_prom_series *s, double v);
/* Sets a gauge's value, or a counter's when it mirrors a total that is
 * kept elsewhere (and never goes down). */
void aq_prom_set(aq_prom_series *s, double v);
/* Counts `v` into a histogram: the first bucket whose bound is >= v, the
 * sum and the count. A NaN is not counted. */
void aq_prom_observe(aq_prom_series *s, double v);

/* Writes the exposition of every family to `f`. */
void aq_prom_write(const aq_prom *p, FILE *f);
/* The exposition as a string; the caller frees it. */
char *aq_prom_text(const aq_prom *p);

#endif
