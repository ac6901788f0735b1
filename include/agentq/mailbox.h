/* mailbox.h — hands items from one thread to another and wakes the
 * receiver through an eventfd.
 *
 * Any thread may push; one receiver drains. The receiver is either a
 * libevent loop (aq_mailbox_attach: the handler runs on the loop for every
 * item) or a thread that polls aq_mailbox_fd() and calls aq_mailbox_take().
 * Items are opaque pointers: ownership passes with the push. */
#ifndef AGENTQ_MAILBOX_H
#define AGENTQ_MAILBOX_H

#include "agentq/common.h"

struct event_base;
typedef struct aq_mailbox aq_mailbox;
typedef void (*aq_mailbox_fn)(void *item, void *arg);

/* Returns NULL if no eventfd can be made (fd limit). Free with
 * aq_mailbox_free(). */
aq_mailbox *aq_mailbox_new(void);
/* Frees the mailbox, passing each item still queued to free_item (NULL:
 * the caller has drained it). NULL m is a no-op. */
void aq_mailbox_free(aq_mailbox *m, void (*free_item)(void *item));

/* Thread-safe. Takes ownership of `item` (non-NULL). */
void aq_mailbox_push(aq_mailbox *m, void *item);

/* Moves every queued item into *items (caller frees the array with free()
 * and owns the items); returns how many. Clears the wake-up. */
size_t aq_mailbox_take(aq_mailbox *m, void ***items);

/* The fd that becomes readable when items are queued. Borrowed. */
int aq_mailbox_fd(const aq_mailbox *m);

/* Calls fn(item, arg) on `base`'s loop for every item pushed from now on.
 * Returns 0 or AQ_EIO. */
int aq_mailbox_attach(aq_mailbox *m, struct event_base *base, aq_mailbox_fn fn, void *arg) AQ_MUSTCHECK;

#endif
