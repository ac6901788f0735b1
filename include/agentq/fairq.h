/* fairq.h — the deliveries a worker holds but has not started yet, and
 * which of them starts next.
 *
 * A worker takes a few more deliveries than it has free slots (its
 * lookahead) from several lanes at once, so it can choose: when a slot
 * frees, the next task is
 *   1. of the highest priority held (priority is strict),
 *   2. among those, of the user with the fewest running tasks per unit of
 *      weight (running / weight, as the worker counts them), so a user
 *      that just arrived starts before a user with fifty running,
 *   3. among those, the one held longest (FIFO per user and priority).
 * Users that are blocked (at their cap of running tasks, or over their
 * budget while it waits for the next day) are skipped until unblocked;
 * their items stay held, in order.
 *
 * Items are the caller's (void *); the queue never frees them except
 * through the free function given to aq_fairq_free(). A user's entry
 * (its weight, running count, block) lives only while the user has held
 * items, running tasks or a block: memory stays bounded by the users
 * active at once, not by every user seen. Not thread-safe; one loop. */
#ifndef AGENTQ_FAIRQ_H
#define AGENTQ_FAIRQ_H

#include "agentq/common.h"

typedef struct aq_fairq aq_fairq;
typedef struct aq_fairq_item aq_fairq_item; /* a handle to one held item */

aq_fairq *aq_fairq_new(void);
/* Frees the queue; free_item (may be NULL) is called on each held value. */
void aq_fairq_free(aq_fairq *q, void (*free_item)(void *value));

/* Holds `value` for `user` (copied) at `priority` (0..255). Returns the
 * item's handle, valid until it is popped or removed. */
aq_fairq_item *aq_fairq_push(aq_fairq *q, const char *user, int priority, void *value);

/* Takes the next item to start (see above); NULL when nothing is held or
 * every held item's user is blocked. The caller calls
 * aq_fairq_started() if it starts it. */
void *aq_fairq_pop(aq_fairq *q);

/* Takes any held item, blocked users' included (a drain empties the
 * queue with it); NULL when empty. */
void *aq_fairq_pop_any(aq_fairq *q);

/* Removes a held item (a delivery of a lost connection, a drain); returns
 * its value. */
void *aq_fairq_remove(aq_fairq *q, aq_fairq_item *it);

/* The user's running count, as the worker sees it: one more / one less. */
void aq_fairq_started(aq_fairq *q, const char *user);
void aq_fairq_finished(aq_fairq *q, const char *user);

/* Weight of `user` (>= 1; default 1). Kept while the user has an entry;
 * set it again when the user becomes active. */
void aq_fairq_set_weight(aq_fairq *q, const char *user, int weight);

/* Blocks or unblocks a user: its items are skipped by aq_fairq_pop(). */
void aq_fairq_block(aq_fairq *q, const char *user, bool blocked);
bool aq_fairq_blocked(const aq_fairq *q, const char *user);
/* Unblocks every user (a timer's second try for all of them). */
void aq_fairq_unblock_all(aq_fairq *q);

/* Calls fn for each held item of `user` (or of every user when NULL), in
 * no particular order; fn may not change the queue. */
void aq_fairq_each(const aq_fairq *q, const char *user, void (*fn)(void *value, void *arg), void *arg);

/* Held items; held items whose user is blocked; users with an entry. */
size_t aq_fairq_len(const aq_fairq *q);
size_t aq_fairq_blocked_len(const aq_fairq *q);
size_t aq_fairq_users(const aq_fairq *q);

#endif
