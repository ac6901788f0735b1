/* mailbox.c — a mutex-protected vector of pointers plus an eventfd (see
 * mailbox.h). Draining swaps the vector out under the lock, so a burst of
 * thousands of items costs one lock round and one wake-up, not one each. */
#include "agentq/mailbox.h"

#include <event2/event.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct aq_mailbox {
    pthread_mutex_t lock;
    void **items;
    size_t n, cap;
    int fd;
    bool signalled; /* an eventfd write is outstanding: skip further writes */
    struct event *ev;
    aq_mailbox_fn fn;
    void *arg;
};

aq_mailbox *aq_mailbox_new(void)
{
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) return NULL;
    aq_mailbox *m = aq_xcalloc(1, sizeof *m);
    pthread_mutex_init(&m->lock, NULL);
    m->fd = fd;
    return m;
}

void aq_mailbox_free(aq_mailbox *m, void (*free_item)(void *item))
{
    if (!m) return;
    for (size_t i = 0; free_item && i < m->n; i++) free_item(m->items[i]);
    if (m->ev) event_free(m->ev);
    close(m->fd);
    pthread_mutex_destroy(&m->lock);
    free(m->items);
    free(m);
}

void aq_mailbox_push(aq_mailbox *m, void *item)
{
    bool wake;
    pthread_mutex_lock(&m->lock);
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 64;
        m->items = aq_xrealloc(m->items, m->cap * sizeof *m->items);
    }
    m->items[m->n++] = item;
    wake = !m->signalled;
    m->signalled = true;
    pthread_mutex_unlock(&m->lock);
    if (wake) {
        uint64_t one = 1;
        ssize_t w = write(m->fd, &one, sizeof one);
        (void)w; /* EAGAIN means the counter is already non-zero: awake anyway */
    }
}

size_t aq_mailbox_take(aq_mailbox *m, void ***items)
{
    uint64_t v;
    ssize_t r = read(m->fd, &v, sizeof v);
    (void)r;
    pthread_mutex_lock(&m->lock);
    size_t n = m->n;
    *items = m->items;
    m->items = NULL;
    m->n = m->cap = 0;
    m->signalled = false;
    pthread_mutex_unlock(&m->lock);
    return n;
}

int aq_mailbox_fd(const aq_mailbox *m) { return m->fd; }

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    aq_mailbox *m = arg;
    void **items;
    size_t n = aq_mailbox_take(m, &items);
    for (size_t i = 0; i < n; i++) m->fn(items[i], m->arg);
    free(items);
}

int aq_mailbox_attach(aq_mailbox *m, struct event_base *base, aq_mailbox_fn fn, void *arg)
{
    m->fn = fn;
    m->arg = arg;
    m->ev = event_new(base, m->fd, EV_READ | EV_PERSIST, on_wake, m);
    if (!m->ev || event_add(m->ev, NULL) < 0) return AQ_EIO;
    return AQ_OK;
}
