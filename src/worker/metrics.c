/* metrics.c — /metrics, /healthz, /readyz on evhttp (see metrics.h). Owns
 * the listener; what the numbers are is the source's business. */
#include "agentq/metrics.h"

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct aq_metrics {
    struct evhttp *http;
    struct evhttp_bound_socket *sock;
    aq_metrics_source src;
    int port;
};

static void reply(struct evhttp_request *req, int code, const char *reason, const char *ctype, const char *body)
{
    struct evbuffer *b = evbuffer_new();
    evbuffer_add(b, body, strlen(body));
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", ctype);
    evhttp_send_reply(req, code, reason, b);
    evbuffer_free(b);
}

static void on_request(struct evhttp_request *req, void *arg)
{
    aq_metrics *m = arg;
    const char *uri = evhttp_request_get_uri(req);
    size_t pl = strcspn(uri, "?");
    if (pl == 8 && !strncmp(uri, "/metrics", 8)) {
        char *text = m->src.text(m->src.arg);
        reply(req, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", text ? text : "");
        free(text);
    } else if (pl == 8 && !strncmp(uri, "/healthz", 8)) {
        reply(req, 200, "OK", "text/plain", "ok\n");
    } else if (pl == 7 && !strncmp(uri, "/readyz", 7)) {
        bool ready = m->src.ready(m->src.arg);
        reply(req, ready ? 200 : 503, ready ? "OK" : "Service Unavailable", "text/plain",
              ready ? "ready\n" : "not ready: broker or database not connected, or draining\n");
    } else {
        reply(req, 404, "Not Found", "text/plain", "not found: try /metrics, /healthz or /readyz\n");
    }
}

aq_metrics *aq_metrics_new(struct event_base *base, const char *listen, const aq_metrics_source *src, char *err,
                           size_t errlen)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    char *end;
    long port = colon ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || colon == listen || (size_t)(colon - listen) >= sizeof host || *end || port < 0 || port > 65535) {
        aq_seterr(err, errlen, "metrics.listen '%s' must be HOST:PORT", listen);
        return NULL;
    }
    memcpy(host, listen, (size_t)(colon - listen));
    host[colon - listen] = '\0';
    aq_metrics *m = aq_xcalloc(1, sizeof *m);
    m->src = *src;
    m->http = evhttp_new(base);
    if (!m->http || !(m->sock = evhttp_bind_socket_with_handle(m->http, host, (uint16_t)port))) {
        aq_seterr(err, errlen, "cannot listen on %s for /metrics (address in use?)", listen);
        aq_metrics_free(m);
        return NULL;
    }
    evhttp_set_gencb(m->http, on_request, m);
    evhttp_set_allowed_methods(m->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(evhttp_bound_socket_get_fd(m->sock), (struct sockaddr *)&ss, &sl) == 0)
        m->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
    return m;
}

int aq_metrics_port(const aq_metrics *m) { return m->port; }

void aq_metrics_free(aq_metrics *m)
{
    if (!m) return;
    if (m->http) evhttp_free(m->http);
    free(m);
}
