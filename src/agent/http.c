/* http.c — the asynchronous HTTP client (see http.h for the contract).
 *
 * Owns curl multi handles driven from a libevent base, hiperfifo-style:
 * curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION, one
 * `event` per socket) and when to wake it (CURLMOPT_TIMERFUNCTION, one
 * evtimer per multi); we call curl_multi_socket_action() on either and then
 * collect finished transfers with curl_multi_info_read().
 *
 * Why several multi handles (shards): libcurl 7.88 walks its whole
 * connection pool when a transfer ends and when it looks for a connection
 * to reuse, so with thousands of connections in one multi handle each
 * request costs time in proportion to the pool (measured: 68% of a worker's
 * CPU with 10,000 sessions). Shards of at most SHARD_CONNS connections
 * keep that walk short; a request goes to the least busy shard.
 *
 * Easy handles are kept for reuse (curl_easy_reset keeps their buffers),
 * so a request does not pay for allocating and zeroing a new one.
 *
 * A request lives in exactly one place at a time:
 *   queue   — waiting for a slot (not yet known to curl)
 *   active  — added to the multi handle
 *   done    — has its result, waits for its callback (a cancelled one may
 *             still be attached to the multi handle: see below)
 *   neither — its callback is running; freed when it returns.
 * Callbacks run only from the `done_ev` event (or aq_http_free), never
 * from inside curl: so user code cannot re-enter curl from a curl callback,
 * and curl_multi_remove_handle() for a cancelled transfer is deferred to
 * that event too, which is outside every curl call.
 *
 * The block_private guard (SSRF) lives here too: one table of address
 * ranges judged by longest prefix, plus this host's own addresses, applied
 * to every connection a guarded transfer opens (on_open_socket) and every
 * request it sends on one, new or reused (on_prereq).
 *
 * Not here: retries, rate limiting, JSON, logging of requests (headers
 * carry API keys). */
#include "agentq/http.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <event2/event.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#if LIBCURL_VERSION_NUM < 0x075500
#error "libcurl 7.85 or newer is needed (CURLOPT_PROTOCOLS_STR)"
#endif

#ifndef AGENTQ_VERSION
#define AGENTQ_VERSION "dev"
#endif

enum req_state { REQ_QUEUED, REQ_ACTIVE, REQ_DONE, REQ_DELIVERING };

#define SHARD_CONNS 256   /* connections per multi handle */
#define EASY_POOL_MAX 1024 /* idle easy handles kept for reuse */
/* How long the list of this host's own addresses is trusted. */
#define OWN_ADDRS_TTL_US (5 * 1000000LL)

struct shard {
    struct aq_http *http;
    CURLM *multi;
    struct event *timer;     /* this multi's single timeout */
    uint64_t nactive;
};

struct aq_http_req {
    aq_http *http;
    CURL *easy;
    struct shard *shard;             /* while in_multi */
    enum req_state state;
    bool in_multi;
    TAILQ_ENTRY(aq_http_req) link;   /* queue, active or done list */

    aq_http_cb cb;
    void *arg;

    struct curl_slist *headers;
    char *body;                      /* our copy of the POST body */
    bool block_private;
    char **allowlist;                /* normalised copies */
    size_t nallowlist;

    char *resp;                      /* response body, NUL-terminated */
    size_t resp_len, resp_cap, max_bytes;
    bool too_large;

    int64_t submit_us, start_us, done_us;

    /* the result, filled by complete() */
    int code;
    long status;
    int64_t retry_after_ms;
    char refused[64 + INET6_ADDRSTRLEN + AQ_HTTP_WHY_LEN];
    char curl_err[CURL_ERROR_SIZE];
    char error[CURL_ERROR_SIZE + 64];
};

TAILQ_HEAD(req_list, aq_http_req);

struct aq_http_sock {
    struct event *ev;
    LIST_ENTRY(aq_http_sock) link;
};

/* This host's interface addresses (getifaddrs) for the block_private
 * guard, 16 bytes each (IPv4 mapped); see own_addrs_fresh() for when the
 * list is replaced. */
struct own_addrs {
    unsigned char (*addrs)[16];
    size_t n;
    int64_t fetched_us;      /* monotonic; 0: never asked */
    bool have;               /* a getifaddrs call has succeeded */
};

struct aq_http {
    struct event_base *base;
    struct shard *shards;
    int nshards;
    int shard_cap;           /* connections (= transfers) per shard */
    CURL **easy_pool;        /* reset handles ready for reuse */
    size_t neasy_pool;
    char *last_url;          /* the last URL that passed the scheme check */
    struct event *done_ev;   /* delivers callbacks outside curl */
    LIST_HEAD(, aq_http_sock) socks;
    struct own_addrs own;

    int max_conns;
    long connect_timeout_ms, timeout_ms;
    size_t max_response_bytes;
    char *user_agent;
    char *ca_file;           /* CURLOPT_CAINFO of every transfer; NULL: curl's default */

    struct req_list queue, active, done;
    uint64_t nqueued, nactive, ndone;
    uint64_t submitted, completed, failed;
    uint64_t open_sockets, sockets_opened;

    bool dispatching;        /* inside on_done's callback loop */
    bool free_pending;       /* aq_http_free called from a callback */
    bool closing;            /* teardown under way */
};

/* ---- address policy --------------------------------------------------- */

/* The block_private guard is one table, judged by the most specific range
 * that holds the address (longest prefix wins, as in routing), so the
 * order of the rows does not matter and a narrower row (a metadata host
 * inside link-local, Teredo inside 2001::/23) names the finer reason.
 *
 * Every address is held in 16 bytes: an IPv4 address as its IPv4-mapped
 * form ::ffff:a.b.c.d, which is what it is on a dual-stack socket, so the
 * IPv4 rows (written as IPv4, stored as /96+n) judge both spellings alike.
 * The rows cover the whole IPv6 space except 2000::/3 (global unicast):
 * the IETF-reserved blocks of the IPv6 Address Space registry are refused
 * as well, so an address no row holds is a global unicast one, and
 * ::ffff:0:0/96 (every IPv4 address) is allowed unless an IPv4 row says
 * otherwise.
 *
 * Sources: the IANA IPv4 and IPv6 Special-Purpose Address Registries
 * (2025), the IPv4 and IPv6 multicast spaces, the IANA IPv6 Address Space
 * registry for the blocks "Reserved by IETF", the deprecated IPv6 ranges
 * (::/96 IPv4-compatible, RFC 4291; fec0::/10 site-local, RFC 3879) and
 * the cloud metadata hosts. */
enum range_rule {
    RANGE_REFUSE,    /* refused: "<kind> (<cidr>)" */
    RANGE_ALLOW,     /* allowed unless a narrower row refuses */
    RANGE_NAT64,     /* judged by the IPv4 address in its last 32 bits */
};

static const struct addr_range {
    const char *cidr;
    const char *kind;
    enum range_rule rule;
} ADDR_RANGES[] = {
    /* IPv4 (IANA IPv4 Special-Purpose Address Registry, multicast) */
    {"0.0.0.0/8", "this-network address", RANGE_REFUSE},
    {"10.0.0.0/8", "private address", RANGE_REFUSE},
    {"100.64.0.0/10", "shared (CGNAT) address", RANGE_REFUSE},
    {"127.0.0.0/8", "loopback address", RANGE_REFUSE},
    {"169.254.0.0/16", "link-local address", RANGE_REFUSE},
    {"169.254.169.254/32", "cloud metadata address", RANGE_REFUSE},
    {"172.16.0.0/12", "private address", RANGE_REFUSE},
    {"192.0.0.0/24", "IETF protocol assignment address", RANGE_REFUSE},
    {"192.0.2.0/24", "documentation address", RANGE_REFUSE},
    {"192.31.196.0/24", "AS112 service address", RANGE_REFUSE},
    {"192.52.193.0/24", "AMT relay address", RANGE_REFUSE},
    {"192.88.99.0/24", "deprecated 6to4 relay anycast address", RANGE_REFUSE},
    {"192.168.0.0/16", "private address", RANGE_REFUSE},
    {"192.175.48.0/24", "AS112 direct delegation address", RANGE_REFUSE},
    {"198.18.0.0/15", "benchmarking address", RANGE_REFUSE},
    {"198.51.100.0/24", "documentation address", RANGE_REFUSE},
    {"203.0.113.0/24", "documentation address", RANGE_REFUSE},
    {"224.0.0.0/4", "multicast address", RANGE_REFUSE},
    {"240.0.0.0/4", "reserved address", RANGE_REFUSE},
    {"255.255.255.255/32", "limited broadcast address", RANGE_REFUSE},
    /* Azure's WireServer: public space, but the host platform's endpoint */
    {"168.63.129.16/32", "cloud metadata address", RANGE_REFUSE},

    /* IPv6 (IANA IPv6 Special-Purpose Address Registry, multicast) */
    {"::ffff:0:0/96", "IPv4 address", RANGE_ALLOW},
    {"::/128", "unspecified address", RANGE_REFUSE},
    {"::1/128", "loopback address", RANGE_REFUSE},
    {"::/96", "deprecated IPv4-compatible address", RANGE_REFUSE},
    {"64:ff9b::/96", "NAT64 address", RANGE_NAT64},
    {"64:ff9b:1::/48", "local-use NAT64 address", RANGE_REFUSE},
    {"100::/64", "discard-only address", RANGE_REFUSE},
    {"100:0:0:1::/64", "dummy address", RANGE_REFUSE},
    {"2001::/23", "IETF protocol assignment address", RANGE_REFUSE},
    {"2001::/32", "Teredo address", RANGE_REFUSE},
    {"2001:2::/48", "benchmarking address", RANGE_REFUSE},
    {"2001:10::/28", "deprecated ORCHID address", RANGE_REFUSE},
    {"2001:20::/28", "ORCHIDv2 address", RANGE_REFUSE},
    {"2001:db8::/32", "documentation address", RANGE_REFUSE},
    {"2002::/16", "6to4 address", RANGE_REFUSE},
    {"2620:4f:8000::/48", "AS112 direct delegation address", RANGE_REFUSE},
    {"3fff::/20", "documentation address", RANGE_REFUSE},
    {"5f00::/16", "SRv6 SID address", RANGE_REFUSE},
    {"fc00::/7", "private (unique local) address", RANGE_REFUSE},
    {"fd00:ec2::254/128", "cloud metadata address", RANGE_REFUSE},
    {"fe80::/10", "link-local address", RANGE_REFUSE},
    {"fec0::/10", "deprecated site-local address", RANGE_REFUSE},
    {"ff00::/8", "multicast address", RANGE_REFUSE},
    /* IPv6 Address Space registry: every block "Reserved by IETF" (all but
     * 2000::/3 global unicast and the four blocks above). */
    {"::/8", "reserved IPv6 address", RANGE_REFUSE},
    {"100::/8", "reserved IPv6 address", RANGE_REFUSE},
    {"200::/7", "reserved IPv6 address", RANGE_REFUSE},
    {"400::/6", "reserved IPv6 address", RANGE_REFUSE},
    {"800::/5", "reserved IPv6 address", RANGE_REFUSE},
    {"1000::/4", "reserved IPv6 address", RANGE_REFUSE},
    {"4000::/3", "reserved IPv6 address", RANGE_REFUSE},
    {"6000::/3", "reserved IPv6 address", RANGE_REFUSE},
    {"8000::/3", "reserved IPv6 address", RANGE_REFUSE},
    {"a000::/3", "reserved IPv6 address", RANGE_REFUSE},
    {"c000::/3", "reserved IPv6 address", RANGE_REFUSE},
    {"e000::/4", "reserved IPv6 address", RANGE_REFUSE},
    {"f000::/5", "reserved IPv6 address", RANGE_REFUSE},
    {"f800::/6", "reserved IPv6 address", RANGE_REFUSE},
    {"fe00::/9", "reserved IPv6 address", RANGE_REFUSE},
};

/* ADDR_RANGES in binary, parsed once from the text above. */
static struct {
    unsigned char net[16];
    unsigned bits;
} range_net[AQ_ARRAY_LEN(ADDR_RANGES)];
static pthread_once_t range_once = PTHREAD_ONCE_INIT;

static const unsigned char V4_MAPPED[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

static void v4_to_16(const void *in_addr, unsigned char out[16])
{
    memcpy(out, V4_MAPPED, 12);
    memcpy(out + 12, in_addr, 4);
}

static void parse_ranges(void)
{
    for (size_t i = 0; i < AQ_ARRAY_LEN(ADDR_RANGES); i++) {
        char text[64];
        snprintf(text, sizeof text, "%s", ADDR_RANGES[i].cidr);
        char *slash = strchr(text, '/');
        unsigned char v4[4];
        bool ok = slash != NULL;
        if (ok) *slash = '\0';
        unsigned bits = ok ? (unsigned)strtoul(slash + 1, NULL, 10) : 0;
        if (ok && inet_pton(AF_INET, text, v4) == 1) {
            v4_to_16(v4, range_net[i].net);
            ok = bits <= 32;
            bits += 96;
        } else if (ok) {
            ok = inet_pton(AF_INET6, text, range_net[i].net) == 1 && bits <= 128;
        }
        if (!ok) { /* a typo in the table above: stop rather than guard with it */
            fprintf(stderr, "http: bad address range \"%s\"\n", ADDR_RANGES[i].cidr);
            abort();
        }
        range_net[i].bits = bits;
    }
}

static bool in_prefix(const unsigned char a[16], const unsigned char net[16], unsigned bits)
{
    unsigned whole = bits / 8, rest = bits % 8;
    if (memcmp(a, net, whole) != 0) return false;
    if (!rest) return true;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (a[whole] & mask) == (net[whole] & mask);
}

/* The most specific row holding `a`, or NULL. */
static const struct addr_range *range_of(const unsigned char a[16])
{
    pthread_once(&range_once, parse_ranges);
    const struct addr_range *best = NULL;
    unsigned best_bits = 0;
    for (size_t i = 0; i < AQ_ARRAY_LEN(ADDR_RANGES); i++) {
        if ((!best || range_net[i].bits > best_bits) &&
            in_prefix(a, range_net[i].net, range_net[i].bits)) {
            best = &ADDR_RANGES[i];
            best_bits = range_net[i].bits;
        }
    }
    return best;
}

/* The address a connection to `a` reaches: a NAT64 address reaches the
 * IPv4 address inside it. */
static void reached(const unsigned char a[16], unsigned char out[16])
{
    const struct addr_range *r = range_of(a);
    if (r && r->rule == RANGE_NAT64) v4_to_16(a + 12, out);
    else memcpy(out, a, 16);
}

static bool addr16_forbidden(const unsigned char a[16], char *why, size_t whylen)
{
    const struct addr_range *r = range_of(a);
    if (!r || r->rule == RANGE_ALLOW) return false; /* no row: global unicast */
    if (r->rule == RANGE_NAT64) {
        unsigned char v4[16];
        char inner[AQ_HTTP_WHY_LEN];
        v4_to_16(a + 12, v4);
        if (!addr16_forbidden(v4, inner, sizeof inner)) return false;
        aq_seterr(why, whylen, "%s inside a %s (%s)", inner, r->kind, r->cidr);
        return true;
    }
    aq_seterr(why, whylen, "%s (%s)", r->kind, r->cidr);
    return true;
}

/* `sa` as 16 bytes (IPv4 mapped); false for a family that is not IP. */
static bool sockaddr_to_16(const struct sockaddr *sa, unsigned char out[16])
{
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in in;
        memcpy(&in, sa, sizeof in);
        v4_to_16(&in.sin_addr, out);
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 in6;
        memcpy(&in6, sa, sizeof in6);
        memcpy(out, in6.sin6_addr.s6_addr, 16);
        return true;
    }
    return false;
}

bool aq_http_addr_forbidden(const struct sockaddr *sa, char *why, size_t whylen)
{
    unsigned char a[16];
    if (why && whylen) why[0] = '\0';
    if (!sa) {
        aq_seterr(why, whylen, "no address");
        return true;
    }
    if (!sockaddr_to_16(sa, a)) {
        aq_seterr(why, whylen, "not an IP address");
        return true;
    }
    return addr16_forbidden(a, why, whylen);
}

/* ---- this host's own addresses ---------------------------------------- */

/* Replaces the cached list when it is older than OWN_ADDRS_TTL_US: that is
 * how long a new interface address can go unseen, and what keeps a check
 * at a lookup instead of a netlink round trip. If getifaddrs fails the old
 * list stays (and is tried again after the same interval). Returns false
 * when there is no list at all. */
static bool own_addrs_fresh(aq_http *h)
{
    int64_t now = aq_mono_us();
    struct own_addrs *o = &h->own;
    if (o->fetched_us && now - o->fetched_us < OWN_ADDRS_TTL_US) return o->have;
    o->fetched_us = now;
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs) != 0) return o->have;
    size_t n = 0;
    for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
        if (i->ifa_addr && (i->ifa_addr->sa_family == AF_INET || i->ifa_addr->sa_family == AF_INET6))
            n++;
    unsigned char(*list)[16] = aq_xcalloc(n ? n : 1, sizeof *list);
    size_t k = 0;
    for (struct ifaddrs *i = ifs; i && k < n; i = i->ifa_next)
        if (i->ifa_addr && sockaddr_to_16(i->ifa_addr, list[k])) k++;
    freeifaddrs(ifs);
    free(o->addrs);
    o->addrs = list;
    o->n = k;
    o->have = true;
    return true;
}

/* Is `a` (as a connection reaches it) one of this host's addresses? */
static bool own_addr(aq_http *h, const unsigned char a[16], bool *known)
{
    unsigned char r[16];
    *known = own_addrs_fresh(h);
    reached(a, r);
    for (size_t i = 0; i < h->own.n; i++)
        if (memcmp(h->own.addrs[i], a, 16) == 0 || memcmp(h->own.addrs[i], r, 16) == 0)
            return true;
    return false;
}

/* The whole block_private verdict on an address: this host's own
 * addresses first (whatever range they are in, so a public address of
 * this machine is refused too, and the reason says so), then the ranges.
 * Without a list of our own addresses nothing is allowed. */
static bool guard_refuses(aq_http *h, const struct sockaddr *sa, char *why, size_t whylen)
{
    char range[AQ_HTTP_WHY_LEN];
    bool in_range = aq_http_addr_forbidden(sa, range, sizeof range);
    unsigned char a[16];
    if (!sockaddr_to_16(sa, a)) {
        aq_seterr(why, whylen, "%s", range);
        return true;
    }
    bool known;
    if (own_addr(h, a, &known)) {
        if (in_range) aq_seterr(why, whylen, "this host's own address, %s", range);
        else aq_seterr(why, whylen, "this host's own address");
        return true;
    }
    if (in_range) {
        aq_seterr(why, whylen, "%s", range);
        return true;
    }
    if (!known) {
        aq_seterr(why, whylen, "this host's own addresses are unknown (getifaddrs failed)");
        return true;
    }
    return false;
}

/* Host names are compared without IPv6 brackets and without a trailing dot
 * ("localhost." reaches the same place as "localhost"). */
static char *host_normalise(const char *host)
{
    size_t n = strlen(host);
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        host++;
        n -= 2;
    }
    if (n > 1 && host[n - 1] == '.') n--;
    return aq_xstrndup(host, n);
}

/* Is the host of the URL being connected right now (it changes on a
 * redirect, before the new connection is opened) on the allowlist? */
static bool host_allowlisted(aq_http_req *req)
{
    if (req->nallowlist == 0) return false;
    char *url = NULL;
    if (curl_easy_getinfo(req->easy, CURLINFO_EFFECTIVE_URL, &url) != CURLE_OK || !url)
        return false;
    bool ok = false;
    CURLU *u = curl_url();
    char *host = NULL;
    if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK) {
        char *h = host_normalise(host);
        for (size_t i = 0; i < req->nallowlist && !ok; i++)
            ok = strcasecmp(h, req->allowlist[i]) == 0;
        free(h);
    }
    curl_free(host);
    curl_url_cleanup(u);
    return ok;
}

static void addr_text(const struct sockaddr_storage *ss, char *out, size_t outlen)
{
    const void *src = NULL;
    if (ss->ss_family == AF_INET) src = &((const struct sockaddr_in *)ss)->sin_addr;
    else if (ss->ss_family == AF_INET6) src = &((const struct sockaddr_in6 *)ss)->sin6_addr;
    if (!src || !inet_ntop(ss->ss_family, src, out, (socklen_t)outlen))
        aq_seterr(out, outlen, "address family %d", (int)ss->ss_family);
}

/* ---- curl callbacks (no user code runs here) ------------------------- */

/* block_private on one address a request is about to use: true, with the
 * first refusal of the request kept for its error, when it must not. */
static bool refuse_addr(aq_http_req *req, const struct sockaddr_storage *ss)
{
    char why[AQ_HTTP_WHY_LEN];
    if (!guard_refuses(req->http, (const struct sockaddr *)ss, why, sizeof why) ||
        host_allowlisted(req))
        return false;
    if (!req->refused[0]) {
        char ip[INET6_ADDRSTRLEN];
        addr_text(ss, ip, sizeof ip);
        aq_seterr(req->refused, sizeof req->refused,
                  "refused to connect to %s: %s (not allowlisted)", ip, why);
    }
    return true;
}

/* Every new connection: refused ones never get a socket. */
static curl_socket_t on_open_socket(void *clientp, curlsocktype purpose,
                                    struct curl_sockaddr *a)
{
    aq_http_req *req = clientp;
    aq_http *h = req->http;
    (void)purpose;

    if (req->block_private) {
        /* curl passes a struct sized for the real address family. */
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof ss);
        size_t n = a->addrlen < sizeof ss ? a->addrlen : sizeof ss;
        memcpy(&ss, &a->addr, n);
        if (refuse_addr(req, &ss)) return CURL_SOCKET_BAD;
    }
    curl_socket_t s = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
    if (s == CURL_SOCKET_BAD) return CURL_SOCKET_BAD;
    h->open_sockets++;
    h->sockets_opened++;
    return s;
}

/* Every request a guarded transfer sends, on a new connection or a reused
 * one, before it is sent. FRESH_CONNECT keeps a transfer's first request
 * off pooled connections, but curl ignores it when following a redirect:
 * without this, a redirect to a host an unguarded request (the LLM
 * provider, an HTTP skill) left a connection open to would ride that
 * connection past on_open_socket. */
static int on_prereq(void *clientp, char *primary_ip, char *local_ip, int primary_port,
                     int local_port)
{
    aq_http_req *req = clientp;
    (void)local_ip;
    (void)primary_port;
    (void)local_port;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (primary_ip && inet_pton(AF_INET, primary_ip, &s4->sin_addr) == 1)
        s4->sin_family = AF_INET;
    else if (primary_ip && inet_pton(AF_INET6, primary_ip, &s6->sin6_addr) == 1)
        s6->sin6_family = AF_INET6;
    else
        ss.ss_family = AF_UNSPEC; /* refused as "not an IP address" */
    return refuse_addr(req, &ss) ? CURL_PREREQFUNC_ABORT : CURL_PREREQFUNC_OK;
}

static int on_close_socket(void *clientp, curl_socket_t s)
{
    aq_http *h = clientp;
    if (h->open_sockets > 0) h->open_sockets--;
    return close(s);
}

static size_t on_write(char *data, size_t size, size_t nmemb, void *userp)
{
    aq_http_req *req = userp;
    size_t n = size * nmemb;
    if (req->state != REQ_ACTIVE) return 0; /* cancelled: abort now */
    if (n > req->max_bytes - req->resp_len) {
        req->too_large = true;
        return 0;
    }
    if (req->resp_len + n + 1 > req->resp_cap) {
        size_t cap = req->resp_cap ? req->resp_cap : 4096;
        while (cap < req->resp_len + n + 1) cap *= 2;
        if (cap > req->max_bytes + 1) cap = req->max_bytes + 1;
        req->resp = aq_xrealloc(req->resp, cap);
        req->resp_cap = cap;
    }
    memcpy(req->resp + req->resp_len, data, n);
    req->resp_len += n;
    req->resp[req->resp_len] = '\0';
    return n;
}

static void check_multi_info(struct shard *sh);

static void on_sock_event(evutil_socket_t fd, short what, void *arg)
{
    struct shard *sh = arg;
    int action = ((what & EV_READ) ? CURL_CSELECT_IN : 0) |
                 ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    int running = 0;
    curl_multi_socket_action(sh->multi, fd, action, &running);
    check_multi_info(sh);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct shard *sh = arg;
    int running = 0;
    (void)fd;
    (void)what;
    curl_multi_socket_action(sh->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi_info(sh);
}

static void sock_free(struct aq_http_sock *sk)
{
    LIST_REMOVE(sk, link);
    event_free(sk->ev);
    free(sk);
}

static int on_curl_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *sockp)
{
    struct shard *sh = userp;
    aq_http *h = sh->http;
    struct aq_http_sock *sk = sockp;
    (void)easy;

    if (what == CURL_POLL_REMOVE) {
        if (sk) sock_free(sk);
        return 0;
    }
    short kind = (short)(((what & CURL_POLL_IN) ? EV_READ : 0) |
                         ((what & CURL_POLL_OUT) ? EV_WRITE : 0) | EV_PERSIST);
    if (!sk) {
        sk = aq_xcalloc(1, sizeof *sk);
        sk->ev = event_new(h->base, s, kind, on_sock_event, sh);
        if (!sk->ev) aq_oom("a socket event");
        LIST_INSERT_HEAD(&h->socks, sk, link);
        curl_multi_assign(sh->multi, s, sk);
    } else {
        event_del(sk->ev);
        event_assign(sk->ev, h->base, s, kind, on_sock_event, sh);
    }
    event_add(sk->ev, NULL);
    return 0;
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    struct shard *sh = userp;
    (void)multi;
    if (timeout_ms < 0) {
        evtimer_del(sh->timer);
    } else {
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        evtimer_add(sh->timer, &tv);
    }
    return 0;
}

/* ---- request life cycle ---------------------------------------------- */

static void req_free(aq_http_req *req)
{
    aq_http *h = req->http;
    if (req->easy) {
        if (!h->closing && h->neasy_pool < EASY_POOL_MAX) {
            curl_easy_reset(req->easy);
            h->easy_pool[h->neasy_pool++] = req->easy;
        } else {
            curl_easy_cleanup(req->easy);
        }
    }
    curl_slist_free_all(req->headers);
    free(req->body);
    free(req->resp);
    for (size_t i = 0; i < req->nallowlist; i++) free(req->allowlist[i]);
    free(req->allowlist);
    free(req);
}

/* Outside any curl callback only. */
static void detach(aq_http *h, aq_http_req *req)
{
    if (!req->in_multi) return;
    curl_multi_remove_handle(req->shard->multi, req->easy);
    req->in_multi = false;
    req->shard->nactive--;
    req->shard = NULL;
    h->nactive--;
}

/* Moves a request (already out of the queue/active lists) to the done list
 * with its result; the callback follows from the loop. */
static void complete(aq_http *h, aq_http_req *req, int code, const char *error)
{
    req->state = REQ_DONE;
    req->code = code;
    req->done_us = aq_mono_us();
    aq_seterr(req->error, sizeof req->error, "%s", error ? error : "");
    TAILQ_INSERT_TAIL(&h->done, req, link);
    h->ndone++;
    if (!h->closing) event_active(h->done_ev, EV_TIMEOUT, 0);
}

static void finish_from_curl(aq_http *h, aq_http_req *req, CURLcode rc)
{
    long status = 0;
    curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
    req->status = status;
    req->retry_after_ms = -1;
    struct curl_header *hh = NULL;
    if (curl_easy_header(req->easy, "Retry-After", 0, CURLH_HEADER, -1, &hh) == CURLHE_OK) {
        curl_off_t secs = 0;
        curl_easy_getinfo(req->easy, CURLINFO_RETRY_AFTER, &secs);
        if (secs < 0) secs = 0;
        if (secs > INT64_MAX / 1000) secs = INT64_MAX / 1000;
        req->retry_after_ms = (int64_t)secs * 1000;
    }

    const char *cmsg = req->curl_err[0] ? req->curl_err : curl_easy_strerror(rc);
    char msg[sizeof req->error];
    int code;
    switch (rc) {
    case CURLE_OK:
        code = AQ_OK;
        msg[0] = '\0';
        break;
    case CURLE_OPERATION_TIMEDOUT:
        code = AQ_ETIMEDOUT;
        aq_seterr(msg, sizeof msg, "%s", cmsg);
        break;
    case CURLE_TOO_MANY_REDIRECTS:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_BAD_CONTENT_ENCODING:
    case CURLE_UNSUPPORTED_PROTOCOL: /* a redirect to ftp:, file:, ... */
        code = AQ_EPROTO;
        aq_seterr(msg, sizeof msg, "%s", cmsg);
        break;
    case CURLE_URL_MALFORMAT:
        code = AQ_EINVAL;
        aq_seterr(msg, sizeof msg, "%s", cmsg);
        break;
    default:
        code = AQ_EIO;
        aq_seterr(msg, sizeof msg, "%s", cmsg);
        break;
    }
    /* Our own reasons win over curl's generic wording. */
    if (req->too_large || rc == CURLE_FILESIZE_EXCEEDED) {
        code = AQ_EPROTO;
        aq_seterr(msg, sizeof msg, "response larger than %zu bytes", req->max_bytes);
    } else if (req->refused[0] &&
               (rc == CURLE_COULDNT_CONNECT || rc == CURLE_ABORTED_BY_CALLBACK)) {
        code = AQ_EINVAL;
        aq_seterr(msg, sizeof msg, "%s", req->refused);
    }
    TAILQ_REMOVE(&h->active, req, link);
    complete(h, req, code, msg);
}

/* Hands queued requests to curl while slots are free. Outside any curl
 * callback only. */
static void admit(aq_http *h)
{
    aq_http_req *req;
    while (!h->closing && h->nactive < (uint64_t)h->max_conns &&
           (req = TAILQ_FIRST(&h->queue)) != NULL) {
        /* The least busy shard: it has a free slot, since the total has. */
        struct shard *sh = &h->shards[0];
        for (int i = 1; i < h->nshards; i++)
            if (h->shards[i].nactive < sh->nactive) sh = &h->shards[i];
        if (sh->nactive >= (uint64_t)h->shard_cap) break;
        TAILQ_REMOVE(&h->queue, req, link);
        h->nqueued--;
        req->start_us = aq_mono_us();
        CURLMcode mc = curl_multi_add_handle(sh->multi, req->easy);
        if (mc != CURLM_OK) {
            char msg[128];
            aq_seterr(msg, sizeof msg, "curl_multi_add_handle: %s", curl_multi_strerror(mc));
            complete(h, req, AQ_EIO, msg);
            continue;
        }
        req->in_multi = true;
        req->shard = sh;
        sh->nactive++;
        req->state = REQ_ACTIVE;
        h->nactive++;
        TAILQ_INSERT_TAIL(&h->active, req, link);
    }
}

static void check_multi_info(struct shard *sh)
{
    aq_http *h = sh->http;
    CURLMsg *msg;
    int left = 0;
    while ((msg = curl_multi_info_read(sh->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE) continue;
        /* msg is invalid once the handle is removed: copy first. */
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result;
        char *priv = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        aq_http_req *req = (aq_http_req *)(void *)priv;
        if (!req) continue;
        detach(h, req);
        if (req->state == REQ_ACTIVE) finish_from_curl(h, req, rc);
        /* else: cancelled, already on the done list */
    }
    admit(h);
}

static void deliver(aq_http *h, aq_http_req *req)
{
    req->state = REQ_DELIVERING;
    int64_t start = req->start_us ? req->start_us : req->done_us;
    aq_http_result res = {
        .code = req->code,
        .status = req->status,
        .body = req->resp ? req->resp : "",
        .body_len = req->resp_len,
        .retry_after_ms = req->retry_after_ms,
        .total_ms = (req->done_us - req->submit_us) / 1000,
        .queue_ms = (start - req->submit_us) / 1000,
        .error = req->error,
        .aq__req = req,
    };
    h->completed++;
    if (req->code != AQ_OK) h->failed++;
    req->cb(req, &res, req->arg);
    req_free(req);
}

static void teardown(aq_http *h);

static void on_done(evutil_socket_t fd, short what, void *arg)
{
    aq_http *h = arg;
    aq_http_req *req;
    (void)fd;
    (void)what;

    /* Cancelled transfers leave curl here, outside every curl call. */
    TAILQ_FOREACH(req, &h->done, link) detach(h, req);
    admit(h);

    /* Only what is done now: callbacks that cancel or fail more requests
     * get them delivered on the next activation, so this loop ends. */
    uint64_t n = h->ndone;
    h->dispatching = true;
    while (n-- > 0 && (req = TAILQ_FIRST(&h->done)) != NULL) {
        TAILQ_REMOVE(&h->done, req, link);
        h->ndone--;
        deliver(h, req);
        if (h->free_pending) {
            h->dispatching = false;
            teardown(h);
            return;
        }
    }
    h->dispatching = false;
    if (!TAILQ_EMPTY(&h->done)) event_active(h->done_ev, EV_TIMEOUT, 0);
}

/* ---- public API ------------------------------------------------------- */

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc = CURLE_FAILED_INIT;

static void global_init_once(void)
{
    global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int aq_http_global_init(void)
{
    pthread_once(&global_once, global_init_once);
    return global_rc == CURLE_OK ? AQ_OK : AQ_EIO;
}

aq_http *aq_http_new(struct event_base *base, const aq_http_config *cfg,
                     char *err, size_t errlen)
{
    static const aq_http_config defaults;
    if (!base) {
        aq_seterr(err, errlen, "http: no event base");
        return NULL;
    }
    if (!cfg) cfg = &defaults;
    if (aq_http_global_init() != AQ_OK) {
        aq_seterr(err, errlen, "http: curl_global_init failed");
        return NULL;
    }

    aq_http *h = aq_xcalloc(1, sizeof *h);
    h->base = base;
    h->max_conns = cfg->max_connections > 0 ? cfg->max_connections
                                            : AQ_HTTP_DEFAULT_MAX_CONNECTIONS;
    h->connect_timeout_ms = cfg->connect_timeout_ms > 0 ? cfg->connect_timeout_ms
                                                        : AQ_HTTP_DEFAULT_CONNECT_TIMEOUT_MS;
    h->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : AQ_HTTP_DEFAULT_TIMEOUT_MS;
    h->max_response_bytes = cfg->max_response_bytes ? cfg->max_response_bytes
                                                    : AQ_HTTP_DEFAULT_MAX_RESPONSE_BYTES;
    h->user_agent = aq_xstrdup(cfg->user_agent ? cfg->user_agent : "agentq/" AGENTQ_VERSION);
    h->ca_file = cfg->ca_file && *cfg->ca_file ? aq_xstrdup(cfg->ca_file) : NULL;
    TAILQ_INIT(&h->queue);
    TAILQ_INIT(&h->active);
    TAILQ_INIT(&h->done);
    LIST_INIT(&h->socks);

    h->nshards = (h->max_conns + SHARD_CONNS - 1) / SHARD_CONNS;
    h->shard_cap = (h->max_conns + h->nshards - 1) / h->nshards;
    h->shards = aq_xcalloc((size_t)h->nshards, sizeof *h->shards);
    h->easy_pool = aq_xcalloc(EASY_POOL_MAX, sizeof *h->easy_pool);
    h->done_ev = event_new(base, -1, 0, on_done, h);
    if (!h->done_ev) {
        aq_seterr(err, errlen, "http: cannot create events");
        goto fail;
    }
    long maxc = h->shard_cap;
    for (int i = 0; i < h->nshards; i++) {
        struct shard *sh = &h->shards[i];
        sh->http = h;
        sh->multi = curl_multi_init();
        sh->timer = evtimer_new(base, on_timer, sh);
        if (!sh->multi || !sh->timer) {
            aq_seterr(err, errlen, "http: cannot create a curl multi handle or its timer");
            goto fail;
        }
        if (curl_multi_setopt(sh->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket) ||
            curl_multi_setopt(sh->multi, CURLMOPT_SOCKETDATA, sh) ||
            curl_multi_setopt(sh->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer) ||
            curl_multi_setopt(sh->multi, CURLMOPT_TIMERDATA, sh) ||
            curl_multi_setopt(sh->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, maxc) ||
            curl_multi_setopt(sh->multi, CURLMOPT_MAX_HOST_CONNECTIONS, maxc) ||
            curl_multi_setopt(sh->multi, CURLMOPT_MAXCONNECTS, maxc) ||
            /* One transfer per connection keeps the slot count exact, which
             * is what makes curl's timeout start at the transfer's start. */
            curl_multi_setopt(sh->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_NOTHING)) {
            aq_seterr(err, errlen, "http: curl_multi_setopt failed");
            goto fail;
        }
    }
    return h;

fail:
    for (int i = 0; i < h->nshards; i++) {
        if (h->shards[i].multi) curl_multi_cleanup(h->shards[i].multi);
        if (h->shards[i].timer) event_free(h->shards[i].timer);
    }
    free(h->shards);
    free(h->easy_pool);
    if (h->done_ev) event_free(h->done_ev);
    free(h->user_agent);
    free(h->ca_file);
    free(h);
    return NULL;
}

static void teardown(aq_http *h)
{
    aq_http_req *req;
    h->closing = true;
    h->free_pending = false;

    TAILQ_FOREACH(req, &h->done, link) detach(h, req);
    while ((req = TAILQ_FIRST(&h->active)) != NULL) {
        TAILQ_REMOVE(&h->active, req, link);
        detach(h, req);
        complete(h, req, AQ_ECLOSED, "client closed");
    }
    while ((req = TAILQ_FIRST(&h->queue)) != NULL) {
        TAILQ_REMOVE(&h->queue, req, link);
        h->nqueued--;
        complete(h, req, AQ_ECLOSED, "client closed");
    }
    while ((req = TAILQ_FIRST(&h->done)) != NULL) {
        TAILQ_REMOVE(&h->done, req, link);
        h->ndone--;
        deliver(h, req);
    }

    for (int i = 0; i < h->nshards; i++) curl_multi_cleanup(h->shards[i].multi);
    struct aq_http_sock *sk;
    while ((sk = LIST_FIRST(&h->socks)) != NULL) sock_free(sk);
    for (int i = 0; i < h->nshards; i++) event_free(h->shards[i].timer);
    free(h->shards);
    for (size_t i = 0; i < h->neasy_pool; i++) curl_easy_cleanup(h->easy_pool[i]);
    free(h->easy_pool);
    free(h->last_url);
    free(h->own.addrs);
    event_free(h->done_ev);
    free(h->user_agent);
    free(h->ca_file);
    free(h);
}

void aq_http_free(aq_http *http)
{
    if (!http || http->closing) return;
    if (http->dispatching) {
        http->free_pending = true;
        return;
    }
    teardown(http);
}

static bool header_ok(const char *hdr)
{
    const char *colon = strchr(hdr, ':');
    if (!colon || colon == hdr) return false;
    return strpbrk(hdr, "\r\n") == NULL;
}

#define SETOPT(opt, val)                                                     \
    do {                                                                     \
        CURLcode rc_ = curl_easy_setopt(req->easy, opt, val);                \
        if (rc_ != CURLE_OK) {                                               \
            aq_seterr(err, errlen, "http: %s: %s", #opt, curl_easy_strerror(rc_)); \
            goto fail;                                                       \
        }                                                                    \
    } while (0)

int aq_http_submit(aq_http *http, const aq_http_request *rq, aq_http_cb cb, void *arg,
                   aq_http_req **out, char *err, size_t errlen)
{
    if (out) *out = NULL;
    if (!http || !rq || !cb) {
        aq_seterr(err, errlen, "http: missing client, request or callback");
        return AQ_EINVAL;
    }
    if (http->closing || http->free_pending) {
        aq_seterr(err, errlen, "http: client is closing");
        return AQ_ECLOSED;
    }
    if (rq->method != AQ_HTTP_GET && rq->method != AQ_HTTP_POST) {
        aq_seterr(err, errlen, "http: unknown method %d", (int)rq->method);
        return AQ_EINVAL;
    }
    if (!rq->url) {
        aq_seterr(err, errlen, "http: no URL");
        return AQ_EINVAL;
    }
    if (rq->nheaders && !rq->headers) {
        aq_seterr(err, errlen, "http: %zu headers but no array", rq->nheaders);
        return AQ_EINVAL;
    }
    if (rq->body_len && !rq->body) {
        aq_seterr(err, errlen, "http: body length without a body");
        return AQ_EINVAL;
    }
    for (size_t i = 0; i < rq->nheaders; i++) {
        if (!rq->headers[i] || !header_ok(rq->headers[i])) {
            /* the header itself may be a secret: name its position only */
            aq_seterr(err, errlen, "http: header %zu is not a \"Name: value\" line", i);
            return AQ_EINVAL;
        }
    }
    /* An agent sends every call to the same URL: check it once. */
    if (!http->last_url || strcmp(http->last_url, rq->url) != 0) {
        CURLU *u = curl_url();
        char *scheme = NULL;
        if (!u) aq_oom("a URL parser");
        CURLUcode uc = curl_url_set(u, CURLUPART_URL, rq->url, 0);
        if (uc == CURLUE_OK) uc = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
        bool web = uc == CURLUE_OK && scheme &&
                   (strcmp(scheme, "http") == 0 || strcmp(scheme, "https") == 0);
        curl_free(scheme);
        curl_url_cleanup(u);
        if (uc != CURLUE_OK) {
            aq_seterr(err, errlen, "http: invalid URL: %s", curl_url_strerror(uc));
            return AQ_EINVAL;
        }
        if (!web) {
            aq_seterr(err, errlen, "http: only http and https URLs are allowed");
            return AQ_EINVAL;
        }
        free(http->last_url);
        http->last_url = aq_xstrdup(rq->url);
    }

    aq_http_req *req = aq_xcalloc(1, sizeof *req);
    req->http = http;
    req->cb = cb;
    req->arg = arg;
    req->state = REQ_QUEUED;
    req->retry_after_ms = -1;
    req->submit_us = aq_mono_us();
    req->max_bytes = rq->max_response_bytes ? rq->max_response_bytes : http->max_response_bytes;
    req->block_private = rq->block_private;
    if (rq->block_private && rq->nallowlist) {
        req->allowlist = aq_xcalloc(rq->nallowlist, sizeof *req->allowlist);
        for (size_t i = 0; i < rq->nallowlist; i++)
            if (rq->allowlist[i]) req->allowlist[req->nallowlist++] = host_normalise(rq->allowlist[i]);
    }
    req->easy = http->neasy_pool ? http->easy_pool[--http->neasy_pool] : curl_easy_init();
    if (!req->easy) {
        aq_seterr(err, errlen, "http: curl_easy_init failed");
        goto fail;
    }

    bool user_expect = false;
    for (size_t i = 0; i < rq->nheaders; i++) {
        struct curl_slist *l = curl_slist_append(req->headers, rq->headers[i]);
        if (!l) aq_oom("a header list");
        req->headers = l;
        if (strncasecmp(rq->headers[i], "Expect:", 7) == 0) user_expect = true;
    }
    if (rq->method == AQ_HTTP_POST && !user_expect) {
        /* No "Expect: 100-continue" round trip on large bodies. */
        struct curl_slist *l = curl_slist_append(req->headers, "Expect:");
        if (!l) aq_oom("a header list");
        req->headers = l;
    }

    long timeout = rq->timeout_ms > 0 ? rq->timeout_ms : http->timeout_ms;
    SETOPT(CURLOPT_URL, rq->url);
    SETOPT(CURLOPT_PRIVATE, (void *)req);
    SETOPT(CURLOPT_ERRORBUFFER, req->curl_err);
    SETOPT(CURLOPT_NOSIGNAL, 1L);
    SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
    SETOPT(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    SETOPT(CURLOPT_FOLLOWLOCATION, rq->follow_redirects ? 1L : 0L);
    SETOPT(CURLOPT_MAXREDIRS, (long)AQ_HTTP_MAX_REDIRECTS);
    SETOPT(CURLOPT_TIMEOUT_MS, timeout);
    SETOPT(CURLOPT_CONNECTTIMEOUT_MS, http->connect_timeout_ms);
    SETOPT(CURLOPT_TCP_KEEPALIVE, 1L);
    SETOPT(CURLOPT_USERAGENT, http->user_agent);
    /* Per transfer, because pooled easy handles are reset between uses. */
    if (http->ca_file) SETOPT(CURLOPT_CAINFO, http->ca_file);
    SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)(req->max_bytes > (size_t)INT64_MAX
                                                       ? INT64_MAX : (int64_t)req->max_bytes));
    SETOPT(CURLOPT_WRITEFUNCTION, on_write);
    SETOPT(CURLOPT_WRITEDATA, (void *)req);
    SETOPT(CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
    SETOPT(CURLOPT_OPENSOCKETDATA, (void *)req);
    SETOPT(CURLOPT_CLOSESOCKETFUNCTION, on_close_socket);
    SETOPT(CURLOPT_CLOSESOCKETDATA, (void *)http);
    if (req->headers) SETOPT(CURLOPT_HTTPHEADER, req->headers);
    if (rq->method == AQ_HTTP_POST) {
        req->body = aq_xmalloc(rq->body_len);
        if (rq->body_len) memcpy(req->body, rq->body, rq->body_len);
        SETOPT(CURLOPT_POST, 1L);
        SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
        SETOPT(CURLOPT_POSTFIELDS, req->body);
    } else {
        SETOPT(CURLOPT_HTTPGET, 1L);
    }
    if (rq->block_private) {
        /* A proxy would connect for us (unchecked), and a pooled connection
         * may have been opened by a request without the check. */
        SETOPT(CURLOPT_NOPROXY, "*");
        SETOPT(CURLOPT_FRESH_CONNECT, 1L);
        SETOPT(CURLOPT_FORBID_REUSE, 1L);
        SETOPT(CURLOPT_PREREQFUNCTION, on_prereq);
        SETOPT(CURLOPT_PREREQDATA, (void *)req);
    }

    TAILQ_INSERT_TAIL(&http->queue, req, link);
    http->nqueued++;
    http->submitted++;
    if (out) *out = req;
    admit(http);
    return AQ_OK;

fail:
    req_free(req);
    return AQ_EINVAL;
}

void aq_http_cancel(aq_http_req *req)
{
    if (!req) return;
    aq_http *h = req->http;
    if (h->closing) return;
    if (req->state == REQ_QUEUED) {
        TAILQ_REMOVE(&h->queue, req, link);
        h->nqueued--;
        complete(h, req, AQ_ECLOSED, "cancelled");
    } else if (req->state == REQ_ACTIVE) {
        /* Stays attached to curl until on_done detaches it: this may be
         * reached from code we cannot prove runs outside a curl call. */
        TAILQ_REMOVE(&h->active, req, link);
        complete(h, req, AQ_ECLOSED, "cancelled");
    }
}

const char *aq_http_result_header(const aq_http_result *res, const char *name)
{
    if (!res || !res->aq__req || !res->aq__req->easy || !name) return NULL;
    struct curl_header *hh = NULL;
    if (curl_easy_header(res->aq__req->easy, name, 0, CURLH_HEADER, -1, &hh) != CURLHE_OK)
        return NULL;
    return hh->value;
}

void aq_http_stats_get(const aq_http *http, aq_http_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!http) return;
    out->inflight = http->submitted - http->completed;
    out->queued = http->nqueued;
    out->active = http->nactive;
    out->open_sockets = http->open_sockets;
    out->sockets_opened = http->sockets_opened;
    out->completed = http->completed;
    out->failed = http->failed;
}
