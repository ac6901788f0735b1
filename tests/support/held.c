/* held.c — see held.h. */
#include "held.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>

#include <check.h>
#include <stdlib.h>
#include <string.h>

struct aq_test_held {
    aq_test_held_set *set;
    struct evhttp_request *req;
    struct event *ev;
    int code;
    const char *body; /* the caller's; the servers pass literals */
    LIST_ENTRY(aq_test_held) link;
};

static void answer(struct aq_test_held *h, int code, const char *body)
{
    LIST_REMOVE(h, link);
    h->set->now--;
    event_free(h->ev);
    evbuffer_add(evhttp_request_get_output_buffer(h->req), body, strlen(body));
    evhttp_send_reply(h->req, code, code == 200 ? "OK" : "Unavailable", NULL);
    free(h);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct aq_test_held *h = arg;
    answer(h, h->code, h->body);
}

void aq_test_held_init(aq_test_held_set *set, struct event_base *base)
{
    memset(set, 0, sizeof *set);
    set->base = base;
    LIST_INIT(&set->list);
}

void aq_test_hold(aq_test_held_set *set, struct evhttp_request *req, int ms, int code,
                  const char *body)
{
    struct aq_test_held *h = calloc(1, sizeof *h);
    ck_assert_ptr_nonnull(h);
    h->set = set;
    h->req = req;
    h->code = code;
    h->body = body;
    h->ev = evtimer_new(set->base, on_timer, h);
    ck_assert_ptr_nonnull(h->ev);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(h->ev, &tv);
    LIST_INSERT_HEAD(&set->list, h, link);
    set->total++;
    if (++set->now > set->peak)
        set->peak = set->now;
}

void aq_test_held_flush(aq_test_held_set *set, int code, const char *body)
{
    struct aq_test_held *h;
    while ((h = LIST_FIRST(&set->list)) != NULL)
        answer(h, code, body);
}
