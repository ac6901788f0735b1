/* held.h — requests an in-process test HTTP server holds back (its "slow"
 * endpoints): each is answered when its timer fires, or at once when the
 * server stops and flushes them, so that no request is left unanswered
 * and no timer outlives the event_base. */
#ifndef AGENTQ_TEST_HELD_H
#define AGENTQ_TEST_HELD_H

#include <sys/queue.h>

struct event_base;
struct evhttp_request;
struct aq_test_held;

typedef struct aq_test_held_set {
    struct event_base *base;
    int now;   /* held at the moment */
    int peak;  /* held at most at once */
    int total; /* held ever */
    LIST_HEAD(, aq_test_held) list;
} aq_test_held_set;

void aq_test_held_init(aq_test_held_set *set, struct event_base *base);

/* Holds `req` for `ms` milliseconds, then answers it `code` with `body`. */
void aq_test_hold(aq_test_held_set *set, struct evhttp_request *req, int ms, int code,
                  const char *body);

/* Answers every request still held, at once, `code` with `body`. */
void aq_test_held_flush(aq_test_held_set *set, int code, const char *body);

#endif
