/* metrics.h — the worker's HTTP endpoints: /metrics (Prometheus text),
 * /healthz (the loop is alive) and /readyz (ready to take work), served by
 * libevent's evhttp on the worker's loop. */
#ifndef AGENTQ_METRICS_H
#define AGENTQ_METRICS_H

#include "agentq/common.h"

struct event_base;
typedef struct aq_metrics aq_metrics;

typedef struct aq_metrics_source {
    char *(*text)(void *arg);  /* exposition text; the server frees it */
    bool (*ready)(void *arg);
    void *arg;
} aq_metrics_source;

/* Listens on "host:port" (port 0 picks one). Returns NULL and fills err if
 * the address is bad or taken. Free with aq_metrics_free(). */
aq_metrics *aq_metrics_new(struct event_base *base, const char *listen, const aq_metrics_source *src,
                           char *err, size_t errlen);
int aq_metrics_port(const aq_metrics *m);
void aq_metrics_free(aq_metrics *m);

#endif
