/* http.h — the asynchronous HTTP client the LLM provider client and the
 * HTTP skills run on.
 *
 * One aq_http drives libcurl's multi socket interface from the caller's
 * libevent base (the hiperfifo model): thousands of transfers run at once
 * on one thread, and connections are kept alive and reused between
 * requests through one connection cache. It owns no global state; the
 * program calls aq_http_global_init() once at start-up, before it starts
 * threads, and raises RLIMIT_NOFILE itself if it wants thousands of
 * connections.
 *
 * Contract (libuv style):
 *  - aq_http_submit() either fails (negative AQ_E*, err filled) and the
 *    callback is never called, or succeeds and the callback is called
 *    exactly once, later, from the event loop — never from inside
 *    aq_http_submit() or aq_http_cancel(). The one exception is
 *    aq_http_free(), which calls the callbacks of every request still
 *    outstanding before it returns.
 *  - The request handle is valid from submit until its callback returns;
 *    the client frees it then.
 *
 * Slots and timeouts: at most cfg.max_connections transfers are handed to
 * curl at a time (one connection each; HTTP/2 multiplexing is off), the
 * rest wait in a FIFO queue inside this module. Because curl itself never
 * has to queue a transfer behind its connection limit, curl's own
 * CURLOPT_TIMEOUT_MS — which would otherwise count time spent queued —
 * measures exactly from the moment a transfer starts (resolving and
 * connecting) to its end. Time spent waiting for a slot is reported as
 * res->queue_ms and is not limited here: the owner of a wall-clock deadline
 * (the agent session) aborts with aq_http_cancel(). The slots are spread
 * over several curl multi handles of at most 256 connections each (libcurl
 * 7.88 walks a multi handle's whole pool per request); connections are
 * kept alive and reused within a multi handle.
 *
 * Secrets: request headers (API keys) and URLs are never logged by this
 * module. */
#ifndef AGENTQ_HTTP_H
#define AGENTQ_HTTP_H

#include "agentq/common.h"

#include <sys/socket.h>

struct event_base;

typedef struct aq_http aq_http;
typedef struct aq_http_req aq_http_req;

#define AQ_HTTP_DEFAULT_MAX_CONNECTIONS 64
#define AQ_HTTP_DEFAULT_CONNECT_TIMEOUT_MS 10000L
#define AQ_HTTP_DEFAULT_TIMEOUT_MS 60000L
#define AQ_HTTP_DEFAULT_MAX_RESPONSE_BYTES ((size_t)8 << 20)
/* Redirects followed when a request asks for it. */
#define AQ_HTTP_MAX_REDIRECTS 3

/* Zero-initialise, then set what you need; zero fields take the defaults
 * above. */
typedef struct aq_http_config {
    /* Transfers running at once, which is also the limit of open
     * connections in total and per host, and the size of the keep-alive
     * cache (CURLMOPT_MAX_TOTAL_CONNECTIONS, _MAX_HOST_CONNECTIONS,
     * _MAXCONNECTS). <= 0: AQ_HTTP_DEFAULT_MAX_CONNECTIONS. */
    int max_connections;
    long connect_timeout_ms;    /* resolve + TCP + TLS; <= 0: default */
    long timeout_ms;            /* default for requests that set none */
    size_t max_response_bytes;  /* default for requests that set none */
    const char *user_agent;     /* borrowed, copied; NULL: "agentq/VERSION" */
    /* PEM CA bundle that verifies every HTTPS peer of this client
     * (CURLOPT_CAINFO on every transfer: LLM providers, HTTP skills,
     * http_get); borrowed, copied. NULL or "": libcurl's default, the
     * system store. It replaces that store rather than adding to it. Peer
     * and host verification are always on. */
    const char *ca_file;
} aq_http_config;

typedef enum aq_http_method {
    AQ_HTTP_GET = 0,
    AQ_HTTP_POST,
} aq_http_method;

/* Everything is borrowed for the duration of aq_http_submit() only: the
 * URL, the headers, the body and the allowlist are copied, so the caller
 * may free or reuse them as soon as submit returns. */
typedef struct aq_http_request {
    aq_http_method method;
    const char *url;             /* http:// or https:// only */
    const char *const *headers;  /* "Name: value" lines, no CR/LF */
    size_t nheaders;
    const void *body;            /* POST body (may be NULL with len 0) */
    size_t body_len;
    /* The response body is limited to this many bytes (after any content
     * decoding); more ends the request with AQ_EPROTO. 0: client default. */
    size_t max_response_bytes;
    /* From the moment the transfer starts (see the top of this file) to
     * its end, covering redirects. <= 0: client default. */
    long timeout_ms;
    /* Follow up to AQ_HTTP_MAX_REDIRECTS redirects (http/https only). */
    bool follow_redirects;
    /* SSRF guard for fetches a model asked for. When set, every connection
     * of this request (redirects included) is checked on the address
     * actually being connected, after DNS, so DNS rebinding cannot dodge
     * it, and refused before any packet is sent:
     *  - every IANA special-purpose range, IPv4 and IPv6 (loopback,
     *    private, shared/CGNAT, link-local, documentation, benchmarking,
     *    protocol assignments, AS112, AMT, 6to4, Teredo, ORCHID, discard,
     *    SRv6, unique local, ...), multicast, reserved space (240/4 and
     *    every IPv6 block outside 2000::/3), limited broadcast, and cloud
     *    metadata hosts; an IPv4-mapped address (::ffff:a.b.c.d) is judged
     *    as its IPv4 address, a NAT64 one (64:ff9b::a.b.c.d) by the IPv4
     *    address inside it (see aq_http_addr_forbidden);
     *  - any address of this host's own interfaces (getifaddrs, re-read
     *    at most every 5 s), whatever range it is in (if they cannot be
     *    listed at all, every address outside the ranges is refused too);
     * unless the URL's host name is on the allowlist (exact,
     * case-insensitive match; an IP literal matches itself), which is the
     * one way to allow such an address. Such a request ignores proxy
     * environment variables and never shares a connection with another
     * request, and every request it sends (each redirect hop) is checked
     * again on the address of the connection it goes out on, new or
     * reused, so it cannot ride on a connection opened without the check.
     * A refusal ends the request with AQ_EINVAL and an error such as
     * "refused to connect to 192.0.2.7: documentation address
     * (192.0.2.0/24) (not allowlisted)" or "refused to connect to
     * 203.0.113.9: this host's own address, documentation address
     * (203.0.113.0/24) (not allowlisted)". */
    bool block_private;
    const char *const *allowlist;
    size_t nallowlist;
} aq_http_request;

typedef struct aq_http_result {
    /* 0: a response arrived, whatever its HTTP status (check `status`).
     * AQ_ETIMEDOUT: connect or request timeout.
     * AQ_EIO: network failure (resolve, connect, reset, TLS); see `error`.
     * AQ_EPROTO: response over max_response_bytes, too many redirects, or
     *   a malformed response.
     * AQ_EINVAL: refused by block_private, or a URL curl rejects.
     * AQ_ECLOSED: aborted by aq_http_cancel() (error "cancelled") or by
     *   aq_http_free() (error "client closed"). */
    int code;
    long status;          /* HTTP status of the last response; 0 if none */
    /* Borrowed until the callback returns. NUL-terminated for convenience
     * (the body may itself hold NULs); never NULL. On an error it holds
     * whatever had arrived. */
    const char *body;
    size_t body_len;
    /* From the last response's Retry-After header (seconds or HTTP date,
     * via CURLINFO_RETRY_AFTER), in milliseconds; -1 if there is none. */
    int64_t retry_after_ms;
    int64_t total_ms;     /* from submit to completion */
    int64_t queue_ms;     /* part of total_ms spent waiting for a slot */
    const char *error;    /* "" when code == 0; borrowed like body */
    aq_http_req *aq__req; /* internal */
} aq_http_result;

/* `req` is the handle submit returned; `res` and everything it points to
 * is borrowed until the callback returns, after which `req` is freed.
 * The callback may submit, cancel other requests, and free the client. */
typedef void (*aq_http_cb)(aq_http_req *req, const aq_http_result *res, void *arg);

typedef struct aq_http_stats {
    uint64_t inflight;           /* submitted, callback not yet called */
    uint64_t queued;             /* of which waiting for a slot */
    uint64_t active;             /* of which handed to curl */
    uint64_t open_sockets;       /* open connections, idle kept-alive ones included */
    uint64_t sockets_opened;     /* connections opened since aq_http_new */
    uint64_t completed;          /* callbacks called */
    uint64_t failed;             /* of which with code != 0 */
} aq_http_stats;

/* curl_global_init(), once per process however often it is called
 * (pthread_once). Call it from main before starting threads. Returns 0 or
 * AQ_EIO. */
AQ_MUSTCHECK int aq_http_global_init(void);

/* Creates a client on `base` (borrowed; it must outlive the client).
 * `cfg` is borrowed and may be NULL for all defaults. Returns NULL and fills
 * err if curl cannot be set up. The caller frees it with aq_http_free(). */
aq_http *aq_http_new(struct event_base *base, const aq_http_config *cfg,
                     char *err, size_t errlen);

/* Aborts every outstanding request, calling its callback with AQ_ECLOSED
 * ("client closed") before returning (a request that had already finished
 * but whose callback had not run yet gets its own result), closes all
 * connections and frees the client. During those callbacks submit fails
 * with AQ_ECLOSED and cancel does nothing. When called from inside one of
 * its callbacks, the teardown happens as soon as that callback returns.
 * NULL is ignored. */
void aq_http_free(aq_http *http);

/* Starts a request (see the contract at the top). `rq` is borrowed (its
 * contents are copied); `arg` is passed to `cb` untouched. On success, the
 * handle is stored in *out when out is not NULL; it stays valid until the
 * callback returns. Fails with AQ_EINVAL for a bad URL, scheme, method or
 * header, AQ_ECLOSED while the client is being freed. */
AQ_MUSTCHECK int aq_http_submit(aq_http *http, const aq_http_request *rq,
                                aq_http_cb cb, void *arg, aq_http_req **out,
                                char *err, size_t errlen);

/* Aborts a request, queued or in flight; its callback is then called once,
 * from the event loop, with AQ_ECLOSED and error "cancelled". Doing so on a
 * request that has already finished (callback pending) does nothing: the
 * callback gets the real result. Must not be called after the callback has
 * returned (the handle is freed then). */
void aq_http_cancel(aq_http_req *req);

/* Value of a response header of the last response (after redirects), or
 * NULL; `name` is case-insensitive, the first occurrence wins. Only valid
 * inside the callback that received `res`; the string is borrowed until
 * the callback returns. Reads curl's own header store, so nothing has to
 * be asked for in advance. */
const char *aq_http_result_header(const aq_http_result *res, const char *name);

/* Fills *out (borrowed) with the client's counters. */
void aq_http_stats_get(const aq_http *http, aq_http_stats *out);

/* A reason from aq_http_addr_forbidden() always fits in this many bytes. */
#define AQ_HTTP_WHY_LEN 128

/* The range half of block_private: true when `sa` is in a refused range,
 * with the reason naming the range written into why (may be NULL), e.g.
 * "loopback address (127.0.0.0/8)", "documentation address
 * (2001:db8::/32)", "private address (10.0.0.0/8) inside a NAT64 address
 * (64:ff9b::/96)". The most specific range decides ("cloud metadata
 * address (169.254.169.254/32)" rather than link-local). Pure: this host's
 * own addresses, which block_private refuses as well, are not looked at
 * here. AF_INET and AF_INET6 are judged, any other family is forbidden
 * ("not an IP address"). */
bool aq_http_addr_forbidden(const struct sockaddr *sa, char *why, size_t whylen);

#endif
