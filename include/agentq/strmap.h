/* strmap.h — a hash map from NUL-terminated strings to pointers.
 *
 * Keys are copied; values are borrowed (the map never frees them).
 * Chained buckets, doubling at load factor 1. Not thread-safe. */
#ifndef AGENTQ_STRMAP_H
#define AGENTQ_STRMAP_H

#include "agentq/common.h"

typedef struct aq_strmap aq_strmap;

aq_strmap *aq_strmap_new(void);
/* Frees the map and its key copies, not the values. */
void aq_strmap_free(aq_strmap *m);

/* The value stored under `key`, or NULL. */
void *aq_strmap_get(const aq_strmap *m, const char *key);
/* Stores `value` (non-NULL) under `key`, replacing any value; returns the
 * value replaced, or NULL. */
void *aq_strmap_put(aq_strmap *m, const char *key, void *value);
/* Removes `key`; returns its value, or NULL. */
void *aq_strmap_del(aq_strmap *m, const char *key);
size_t aq_strmap_size(const aq_strmap *m);

/* Calls fn for every entry; fn must not change the map. */
void aq_strmap_each(const aq_strmap *m, void (*fn)(const char *key, void *value, void *arg), void *arg);

#endif
