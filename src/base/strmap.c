/* strmap.c — chained hash map with FNV-1a (see strmap.h). */
#include "agentq/strmap.h"

#include <stdlib.h>
#include <string.h>

typedef struct entry {
    struct entry *next;
    uint64_t hash;
    void *value;
    char key[];
} entry;

struct aq_strmap {
    entry **buckets;
    size_t nbuckets, size;
};

static uint64_t fnv(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

aq_strmap *aq_strmap_new(void)
{
    aq_strmap *m = aq_xcalloc(1, sizeof *m);
    m->nbuckets = 16;
    m->buckets = aq_xcalloc(m->nbuckets, sizeof *m->buckets);
    return m;
}

void aq_strmap_free(aq_strmap *m)
{
    if (!m) return;
    for (size_t i = 0; i < m->nbuckets; i++)
        for (entry *e = m->buckets[i], *n; e; e = n) {
            n = e->next;
            free(e);
        }
    free(m->buckets);
    free(m);
}

static entry **find(const aq_strmap *m, const char *key, uint64_t h)
{
    entry **pp = &m->buckets[h & (m->nbuckets - 1)];
    while (*pp && ((*pp)->hash != h || strcmp((*pp)->key, key))) pp = &(*pp)->next;
    return pp;
}

void *aq_strmap_get(const aq_strmap *m, const char *key)
{
    entry *e = *find(m, key, fnv(key));
    return e ? e->value : NULL;
}

static void grow(aq_strmap *m)
{
    size_t nb = m->nbuckets * 2;
    entry **b = aq_xcalloc(nb, sizeof *b);
    for (size_t i = 0; i < m->nbuckets; i++)
        for (entry *e = m->buckets[i], *n; e; e = n) {
            n = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
        }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = nb;
}

void *aq_strmap_put(aq_strmap *m, const char *key, void *value)
{
    uint64_t h = fnv(key);
    entry **pp = find(m, key, h);
    if (*pp) {
        void *old = (*pp)->value;
        (*pp)->value = value;
        return old;
    }
    size_t kl = strlen(key);
    entry *e = aq_xmalloc(sizeof *e + kl + 1);
    e->next = NULL;
    e->hash = h;
    e->value = value;
    memcpy(e->key, key, kl + 1);
    *pp = e;
    if (++m->size > m->nbuckets) grow(m);
    return NULL;
}

void *aq_strmap_del(aq_strmap *m, const char *key)
{
    entry **pp = find(m, key, fnv(key));
    entry *e = *pp;
    if (!e) return NULL;
    *pp = e->next;
    void *v = e->value;
    free(e);
    m->size--;
    return v;
}

size_t aq_strmap_size(const aq_strmap *m) { return m->size; }

void aq_strmap_each(const aq_strmap *m, void (*fn)(const char *key, void *value, void *arg), void *arg)
{
    for (size_t i = 0; i < m->nbuckets; i++)
        for (entry *e = m->buckets[i]; e; e = e->next) fn(e->key, e->value, arg);
}
