/* fairq.c — the held deliveries and the choice of the next one (see
 * fairq.h). Owns the items' bookkeeping and the users' entries, never the
 * items' values.
 *
 * Shape: a user has one lane per priority it holds items at (a FIFO of
 * items); each priority level keeps a list of the lanes of unblocked users
 * at that level, and a bitmap says which levels have any. A blocked user's
 * lanes are taken off their levels' lists, so pop never walks past them:
 * pop finds the highest level with a lane in O(1) (four words of bitmap)
 * and then scans that level's lanes, O(unblocked users at that level).
 * Push and remove are O(lanes of the user), at most one per priority and
 * in practice one or two; block and unblock are the same.
 *
 * Eviction rule: a user's entry is freed the moment it holds no items,
 * has nothing running and is not blocked (user_release()), so entries
 * are bounded by the users active at once. */
#include "agentq/fairq.h"
#include "agentq/strmap.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define NLEVELS 256

typedef struct lane lane;
typedef struct user user;

struct aq_fairq_item {
    aq_fairq_item *prev, *next; /* in the lane's FIFO */
    lane *lane;
    uint64_t seq; /* push order across the whole queue: the tie-break */
    void *value;
};

/* One user's items at one priority. */
struct lane {
    lane *lprev, *lnext; /* in its level's list, while the user is unblocked */
    lane *uprev, *unext; /* in its user's list */
    user *user;
    aq_fairq_item *head, *tail;
    int priority;
};

struct user {
    lane *lanes;
    size_t held;
    unsigned running;
    unsigned weight;
    bool blocked;
    char name[]; /* the map's key, kept here to delete the entry by */
};

struct aq_fairq {
    aq_strmap *users; /* name -> user */
    lane *levels[NLEVELS];
    uint64_t nonempty[NLEVELS / 64]; /* bit p set iff levels[p] != NULL */
    size_t len, blocked_len;
    uint64_t seq;
};

aq_fairq *aq_fairq_new(void)
{
    aq_fairq *q = aq_xcalloc(1, sizeof *q);
    q->users = aq_strmap_new();
    return q;
}

/* ---- levels --------------------------------------------------------- */

static void level_link(aq_fairq *q, lane *l)
{
    int p = l->priority;
    l->lprev = NULL;
    l->lnext = q->levels[p];
    if (l->lnext) l->lnext->lprev = l;
    q->levels[p] = l;
    q->nonempty[p / 64] |= UINT64_C(1) << (p % 64);
}

static void level_unlink(aq_fairq *q, lane *l)
{
    int p = l->priority;
    if (l->lprev) l->lprev->lnext = l->lnext;
    else q->levels[p] = l->lnext;
    if (l->lnext) l->lnext->lprev = l->lprev;
    l->lprev = l->lnext = NULL;
    if (!q->levels[p]) q->nonempty[p / 64] &= ~(UINT64_C(1) << (p % 64));
}

/* The highest level with an unblocked lane, or -1. */
static int top_level(const aq_fairq *q)
{
    for (int w = NLEVELS / 64 - 1; w >= 0; w--)
        if (q->nonempty[w]) return w * 64 + 63 - __builtin_clzll(q->nonempty[w]);
    return -1;
}

/* ---- users ---------------------------------------------------------- */

/* A NULL user name is the empty one, so that a delivery without a user
 * still has a place. */
static user *user_get(const aq_fairq *q, const char *name)
{
    return aq_strmap_get(q->users, name ? name : "");
}

static user *user_get_or_add(aq_fairq *q, const char *name)
{
    if (!name) name = "";
    user *u = aq_strmap_get(q->users, name);
    if (u) return u;
    size_t n = strlen(name) + 1;
    u = aq_xcalloc(1, sizeof *u + n);
    memcpy(u->name, name, n);
    u->weight = 1;
    aq_strmap_put(q->users, name, u);
    return u;
}

/* Frees u's entry if nothing keeps it: the eviction rule above. */
static void user_release(aq_fairq *q, user *u)
{
    if (u->held || u->running || u->blocked) return;
    aq_strmap_del(q->users, u->name);
    free(u);
}

/* ---- lanes ---------------------------------------------------------- */

static lane *lane_get_or_add(aq_fairq *q, user *u, int priority)
{
    for (lane *l = u->lanes; l; l = l->unext)
        if (l->priority == priority) return l;
    lane *l = aq_xcalloc(1, sizeof *l);
    l->user = u;
    l->priority = priority;
    l->unext = u->lanes;
    if (u->lanes) u->lanes->uprev = l;
    u->lanes = l;
    if (!u->blocked) level_link(q, l);
    return l;
}

static void lane_drop(aq_fairq *q, lane *l)
{
    user *u = l->user;
    if (!u->blocked) level_unlink(q, l);
    if (l->uprev) l->uprev->unext = l->unext;
    else u->lanes = l->unext;
    if (l->unext) l->unext->uprev = l->uprev;
    free(l);
}

/* ---- items ---------------------------------------------------------- */

aq_fairq_item *aq_fairq_push(aq_fairq *q, const char *user_name, int priority, void *value)
{
    if (priority < 0) priority = 0;
    if (priority >= NLEVELS) priority = NLEVELS - 1;
    user *u = user_get_or_add(q, user_name);
    lane *l = lane_get_or_add(q, u, priority);
    aq_fairq_item *it = aq_xcalloc(1, sizeof *it);
    it->lane = l;
    it->seq = q->seq++;
    it->value = value;
    it->prev = l->tail;
    if (l->tail) l->tail->next = it;
    else l->head = it;
    l->tail = it;
    u->held++;
    q->len++;
    if (u->blocked) q->blocked_len++;
    return it;
}

void *aq_fairq_remove(aq_fairq *q, aq_fairq_item *it)
{
    lane *l = it->lane;
    user *u = l->user;
    void *value = it->value;
    if (it->prev) it->prev->next = it->next;
    else l->head = it->next;
    if (it->next) it->next->prev = it->prev;
    else l->tail = it->prev;
    free(it);
    u->held--;
    q->len--;
    if (u->blocked) q->blocked_len--;
    if (!l->head) lane_drop(q, l);
    user_release(q, u);
    return value;
}

/* Whether a's user should start before b's: fewer running per unit of
 * weight (cross-multiplied, so no floats and no rounding), then the
 * older head item. */
static bool lane_before(const lane *a, const lane *b)
{
    uint64_t ra = (uint64_t)a->user->running * b->user->weight;
    uint64_t rb = (uint64_t)b->user->running * a->user->weight;
    if (ra != rb) return ra < rb;
    return a->head->seq < b->head->seq;
}

void *aq_fairq_pop(aq_fairq *q)
{
    int p = top_level(q);
    if (p < 0) return NULL;
    lane *best = q->levels[p];
    for (lane *l = best->lnext; l; l = l->lnext)
        if (lane_before(l, best)) best = l;
    return aq_fairq_remove(q, best->head);
}

/* ---- running, weight, block ----------------------------------------- */

void aq_fairq_started(aq_fairq *q, const char *user_name)
{
    user *u = user_get_or_add(q, user_name);
    if (u->running < UINT_MAX) u->running++;
}

void aq_fairq_finished(aq_fairq *q, const char *user_name)
{
    user *u = user_get(q, user_name);
    if (!u) return; /* nothing running as far as we know: stays at 0 */
    if (u->running) u->running--;
    user_release(q, u);
}

void aq_fairq_set_weight(aq_fairq *q, const char *user_name, int weight)
{
    /* No entry means an inactive user: making one here would outlive the
     * eviction rule, so the weight is set again when the user is active. */
    user *u = user_get(q, user_name);
    if (!u) return;
    u->weight = weight < 1 ? 1 : (unsigned)weight;
}

void aq_fairq_block(aq_fairq *q, const char *user_name, bool blocked)
{
    user *u = blocked ? user_get_or_add(q, user_name) : user_get(q, user_name);
    if (!u || u->blocked == blocked) return;
    u->blocked = blocked;
    for (lane *l = u->lanes; l; l = l->unext) {
        if (blocked) level_unlink(q, l);
        else level_link(q, l);
    }
    if (blocked) q->blocked_len += u->held;
    else q->blocked_len -= u->held;
    user_release(q, u);
}

struct blocked_list {
    char **names;
    size_t n, cap;
};

static void collect_blocked(const char *key, void *value, void *arg)
{
    struct blocked_list *b = arg;
    const user *u = value;
    if (!u->blocked) return;
    if (b->n == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 16;
        b->names = aq_xrealloc(b->names, b->cap * sizeof *b->names);
    }
    b->names[b->n++] = aq_xstrdup(key);
}

void aq_fairq_unblock_all(aq_fairq *q)
{
    /* Unblocking may free an entry: collect first, change the map after. */
    struct blocked_list b = {0};
    aq_strmap_each(q->users, collect_blocked, &b);
    for (size_t i = 0; i < b.n; i++) {
        aq_fairq_block(q, b.names[i], false);
        free(b.names[i]);
    }
    free(b.names);
}

static void find_held(const char *key, void *value, void *arg)
{
    (void)key;
    user *u = value;
    aq_fairq_item **found = arg;
    if (!*found && u->lanes) *found = u->lanes->head;
}

void *aq_fairq_pop_any(aq_fairq *q)
{
    if (!q->len) return NULL;
    if (top_level(q) >= 0) return aq_fairq_pop(q);
    aq_fairq_item *it = NULL; /* every held item is a blocked user's */
    aq_strmap_each(q->users, find_held, &it);
    return it ? aq_fairq_remove(q, it) : NULL;
}

bool aq_fairq_blocked(const aq_fairq *q, const char *user_name)
{
    const user *u = user_get(q, user_name);
    return u && u->blocked;
}

/* ---- walking -------------------------------------------------------- */

struct each_ctx {
    void (*fn)(void *value, void *arg);
    void *arg;
};

static void each_of_user(const user *u, const struct each_ctx *c)
{
    for (const lane *l = u->lanes; l; l = l->unext)
        for (const aq_fairq_item *it = l->head; it; it = it->next) c->fn(it->value, c->arg);
}

static void each_entry(const char *key, void *value, void *arg)
{
    each_of_user(value, arg);
}

void aq_fairq_each(const aq_fairq *q, const char *user_name, void (*fn)(void *value, void *arg), void *arg)
{
    struct each_ctx c = {fn, arg};
    if (user_name) {
        const user *u = user_get(q, user_name);
        if (u) each_of_user(u, &c);
    } else {
        aq_strmap_each(q->users, each_entry, &c);
    }
}

size_t aq_fairq_len(const aq_fairq *q)
{
    return q->len;
}

size_t aq_fairq_blocked_len(const aq_fairq *q)
{
    return q->blocked_len;
}

size_t aq_fairq_users(const aq_fairq *q)
{
    return aq_strmap_size(q->users);
}

/* ---- freeing -------------------------------------------------------- */

static void free_entry(const char *key, void *value, void *arg)
{
    void (*free_item)(void *) = *(void (**)(void *))arg;
    user *u = value;
    for (lane *l = u->lanes, *ln; l; l = ln) {
        ln = l->unext;
        for (aq_fairq_item *it = l->head, *next; it; it = next) {
            next = it->next;
            if (free_item) free_item(it->value);
            free(it);
        }
        free(l);
    }
    free(u); /* the map only borrows it; the map itself goes next */
}

void aq_fairq_free(aq_fairq *q, void (*free_item)(void *value))
{
    if (!q) return;
    aq_strmap_each(q->users, free_entry, &free_item);
    aq_strmap_free(q->users);
    free(q);
}
