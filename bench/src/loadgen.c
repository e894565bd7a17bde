/*
 * loadgen: the benchmark's Thrift client, fast enough never to be the limit.
 *
 * N client connections on one epoll loop (non-blocking sockets, TCP_NODELAY)
 * make `echo(1: binary data)` calls (bench/bench.thrift) with a fixed
 * payload: binary (strict envelope) or compact protocol (--protocol), framed,
 * buffered or THeader transport (--transport; THeader frames carry the
 * protocol's id, no transforms, no info headers), plaintext or TLS (--tls:
 * the server's certificate must chain to --ca and name the IP address
 * dialled; --cert/--key present a client certificate). One call is in
 * flight per connection, as with an ordinary Thrift client. TLS handshakes
 * happen at connect time, before the clock starts.
 *
 * Two modes:
 * - closed loop (--rate 0, the default): each connection sends its next
 *   call as soon as the previous reply arrives, for --duration seconds after
 *   --warmup seconds; this measures maximum throughput. Latency is from send
 *   to reply.
 * - open loop (--rate R): call i is due at t0 + i/R, on connection i mod N.
 *   A due call goes out as soon as its connection is free; its latency is
 *   counted from the time it was DUE (its intended send time), not from when
 *   it went out, so a target that stalls cannot hide the calls that queued
 *   behind the stall (no coordinated omission). Every call due before the
 *   end is issued; calls still unanswered --drain seconds after the end
 *   count as errors ("unfinished").
 *
 * Every reply is checked: framing (for THeader: the protocol id and no
 * transforms), the protocol, message type REPLY, method name, the
 * seqid of the call (each connection numbers its calls from a distinct
 * base), result field 0 of type binary, and its bytes equal to the payload.
 * Failures are counted by kind; a connection whose bytes cannot be parsed,
 * or that the peer closes, is reconnected (bounded) and its call counted
 * as an error.
 *
 * Calls whose send time (closed) or due time (open) falls within the
 * measured window are the ones measured; `calls_all` counts every good
 * reply, warm-up included, for CPU-per-call figures taken from outside.
 *
 * Output: one JSON object on stdout. Exit 0 when the run completed (errors
 * or not), 2 on bad arguments, 1 when no connection could be made.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "tls.h"
#include "wire.h"

#define MAX_EVENTS 256
#define MAX_RECONNECTS 100
#define NS 1000000000ull
/* Room before a request's body for its transport header and envelope. */
#define PREFIX_MAX 64

enum { TR_FRAMED, TR_BUFFERED, TR_THEADER };
static const char *TR_NAMES[] = {"framed", "buffered", "theader"};
enum { P_BINARY, P_COMPACT };

enum { ERR_CLOSED, ERR_MALFORMED, ERR_TYPE, ERR_NAME, ERR_SEQID, ERR_RESULT, ERR_PAYLOAD,
       ERR_EXTRA, ERR_CONNECT, ERR_UNFINISHED, ERR_TLS, ERR_KINDS };
static const char *ERR_NAMES[ERR_KINDS] = {"closed", "malformed", "type", "name", "seqid",
                                           "result", "payload", "extra_bytes", "connect",
                                           "unfinished", "tls_handshake"};

struct lconn {
    int fd;
    int idx;
    int alive;
    int in_flight;
    int writing;
    int done; /* closed loop: no more calls */
    uint32_t seqid;
    SSL *ssl;
    uint8_t *req; /* PREFIX_MAX bytes of room, then the body (field 1 and stop) */
    size_t req_start, req_len, body_len, wpos; /* bytes req[req_start..req_len) go out */
    uint64_t t_due, t_sent;
    uint8_t *rbuf;
    size_t rlen, rcap;
    uint64_t next_index; /* open loop: global index of this connection's next call */
};

static struct {
    const char *host;
    int port, conns, transport, protocol, tls;
    const char *ca, *cert, *key;
    SSL_CTX *ctx;
    size_t payload;
    double duration, warmup, drain, rate;
    struct sockaddr_in addr;
    int epfd, tfd;
    uint8_t *payload_bytes;
    uint64_t t0, t_measure, t_end, t_hard;
    uint64_t *lat;
    size_t nlat, caplat;
    uint64_t calls_all, sent_all, errors[ERR_KINDS], reconnects;
} G;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void record_latency(uint64_t ns) {
    if (G.nlat == G.caplat) {
        G.caplat = G.caplat ? G.caplat * 2 : 1 << 16;
        G.lat = realloc(G.lat, G.caplat * sizeof *G.lat);
        if (!G.lat) die("realloc");
    }
    G.lat[G.nlat++] = ns;
}

static uint64_t due_time(uint64_t index) {
    return G.t0 + (uint64_t)((double)index * 1e9 / G.rate);
}

/* Build this connection's request body: echo's field 1 (binary) and stop. */
static void build_request(struct lconn *c) {
    c->req = malloc(PREFIX_MAX + G.payload + 16);
    if (!c->req) die("malloc");
    uint8_t *p = c->req + PREFIX_MAX;
    if (G.protocol == P_COMPACT) {
        p[0] = (CT_BINARY | (1 << 4)); /* field id delta 1, type binary */
        size_t at = 1 + wr_varint(p + 1, G.payload);
        memcpy(p + at, G.payload_bytes, G.payload);
        p[at + G.payload] = CT_STOP;
        c->body_len = at + G.payload + 1;
    } else {
        p[0] = T_STRING;
        wr16(p + 1, 1);
        wr32(p + 3, (uint32_t)G.payload);
        memcpy(p + 7, G.payload_bytes, G.payload);
        p[7 + G.payload] = T_STOP;
        c->body_len = 7 + G.payload + 1;
    }
    c->req_len = PREFIX_MAX + c->body_len;
    c->rcap = 2 * c->req_len + 32768;
    c->rbuf = malloc(c->rcap);
    if (!c->rbuf) die("malloc");
}

/* Write the transport header and envelope of the call numbered c->seqid
 * just before the body; sets req_start. */
static void frame_request(struct lconn *c) {
    uint8_t head[PREFIX_MAX];
    size_t env_len = G.protocol == P_COMPACT
                         ? compact_put_envelope(head, M_CALL, (const uint8_t *)"echo", 4, c->seqid)
                         : wire_put_envelope(head, M_CALL, (const uint8_t *)"echo", 4, c->seqid);
    size_t msg_len = env_len + c->body_len;
    uint8_t pre[32];
    size_t pre_len = 0;
    if (G.transport == TR_FRAMED) {
        wr32(pre, (uint32_t)msg_len);
        pre_len = 4;
    } else if (G.transport == TR_THEADER) {
        int proto = G.protocol == P_COMPACT ? THEADER_PROTO_COMPACT : THEADER_PROTO_BINARY;
        pre_len = theader_put(pre, proto, 0, c->seqid, msg_len);
    }
    c->req_start = PREFIX_MAX - env_len - pre_len;
    memcpy(c->req + c->req_start, pre, pre_len);
    memcpy(c->req + c->req_start + pre_len, head, env_len);
}

/* read()/write() or their TLS forms: > 0 bytes, 0 closed, -1 with errno set
 * (EAGAIN: try again when the socket is ready). */
static ssize_t conn_read(struct lconn *c, void *buf, size_t n) {
    if (!c->ssl) return read(c->fd, buf, n);
    int k = p_SSL_read(c->ssl, buf, (int)n);
    if (k > 0) return k;
    int e = p_SSL_get_error(c->ssl, k);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) errno = EAGAIN;
    else if (e == SSL_ERROR_ZERO_RETURN) return 0;
    else errno = EIO;
    return -1;
}

static ssize_t conn_write(struct lconn *c, const void *buf, size_t n) {
    if (!c->ssl) return write(c->fd, buf, n);
    int k = p_SSL_write(c->ssl, buf, (int)n);
    if (k > 0) return k;
    int e = p_SSL_get_error(c->ssl, k);
    errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : EIO;
    return -1;
}

static void count_error(int kind) { G.errors[kind]++; }

static void set_out_interest(struct lconn *c, int want) {
    if (c->writing == want) return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(G.epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->writing = want;
}

static int connect_one(struct lconn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&G.addr, sizeof G.addr) < 0) {
        close(fd);
        count_error(ERR_CONNECT);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->ssl = NULL;
    if (G.tls) { /* handshake while the socket still blocks */
        c->ssl = tls_conn_new(G.ctx, fd, 0, G.host);
        if (p_SSL_do_handshake(c->ssl) != 1) {
            p_ERR_clear_error();
            p_SSL_free(c->ssl);
            c->ssl = NULL;
            close(fd);
            count_error(ERR_TLS);
            return -1;
        }
    }
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) die("fcntl");
    c->fd = fd;
    c->alive = 1;
    c->writing = 0;
    c->rlen = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(G.epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
    return 0;
}

/* Drop the connection after a failure; the call in flight (if any) is lost
 * (already counted by the caller). Reconnect while the budget lasts. */
static void reset_conn(struct lconn *c) {
    epoll_ctl(G.epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) {
        p_ERR_clear_error();
        p_SSL_free(c->ssl);
        c->ssl = NULL;
    }
    close(c->fd);
    c->alive = 0;
    c->in_flight = 0;
    if (G.reconnects >= MAX_RECONNECTS) return;
    G.reconnects++;
    connect_one(c);
}

static void try_write(struct lconn *c) {
    while (c->wpos < c->req_len) {
        ssize_t k = conn_write(c, c->req + c->wpos, c->req_len - c->wpos);
        if (k > 0) {
            c->wpos += (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out_interest(c, 1);
            return;
        }
        count_error(ERR_CLOSED);
        reset_conn(c);
        return;
    }
    set_out_interest(c, 0);
}

static void send_call(struct lconn *c, uint64_t due, uint64_t now) {
    c->seqid++;
    frame_request(c);
    c->wpos = c->req_start;
    c->in_flight = 1;
    c->t_due = due;
    c->t_sent = now;
    G.sent_all++;
    try_write(c);
}

/* Check a complete reply msg[0..len) (framing removed, THeader's header
 * not); returns -1 if good, else an error kind. */
static int check_reply(const struct lconn *c, const uint8_t *msg, size_t len) {
    if (G.transport == TR_THEADER) {
        struct theader th;
        long off = theader_parse(msg, len, &th);
        int proto = G.protocol == P_COMPACT ? THEADER_PROTO_COMPACT : THEADER_PROTO_BINARY;
        if (off <= 0 || th.protocol != proto || th.transforms) return ERR_MALFORMED;
        msg += off;
        len -= (size_t)off;
    }
    struct envelope env;
    long head = G.protocol == P_COMPACT ? compact_envelope(msg, len, &env)
                                        : wire_envelope(msg, len, &env);
    if (head <= 0) return ERR_MALFORMED;
    if (env.type != M_REPLY) return ERR_TYPE;
    if (env.name_len != 4 || memcmp(env.name, "echo", 4) != 0) return ERR_NAME;
    if (env.seqid != c->seqid) return ERR_SEQID;
    const uint8_t *p = msg + head;
    size_t n = len - (size_t)head;
    const uint8_t *data;
    uint64_t dlen;
    if (G.protocol == P_COMPACT) {
        /* result struct: field 0 binary (long form: type, then zigzag id 0), then stop */
        if (n < 4 || p[0] != CT_BINARY || p[1] != 0) return ERR_RESULT;
        long used = rd_varint(p + 2, n - 2, &dlen);
        if (used <= 0) return ERR_RESULT;
        data = p + 2 + used;
        if (dlen != G.payload || n != 2 + (size_t)used + dlen + 1 || data[dlen] != CT_STOP)
            return ERR_RESULT;
    } else {
        /* result struct: field 0 binary, then stop */
        if (n < 8 || p[0] != T_STRING || p[1] != 0 || p[2] != 0) return ERR_RESULT;
        dlen = rd32(p + 3);
        data = p + 7;
        if (dlen != G.payload || n != 7 + (size_t)dlen + 1 || p[7 + dlen] != T_STOP)
            return ERR_RESULT;
    }
    if (memcmp(data, G.payload_bytes, dlen) != 0) return ERR_PAYLOAD;
    return -1;
}

static void on_reply(struct lconn *c, int err, uint64_t now) {
    c->in_flight = 0;
    if (err >= 0) {
        count_error(err);
    } else {
        G.calls_all++;
        int measured;
        if (G.rate > 0)
            measured = c->t_due >= G.t_measure && c->t_due < G.t_end;
        else
            measured = c->t_sent >= G.t_measure && now <= G.t_end;
        if (measured) record_latency(now - c->t_due);
    }
    if (G.rate <= 0) {
        if (now < G.t_end)
            send_call(c, now, now);
        else
            c->done = 1;
    }
}

static void on_readable(struct lconn *c) {
    if (c->rcap - c->rlen < 32768) { /* a whole TLS record fits */
        c->rcap *= 2;
        c->rbuf = realloc(c->rbuf, c->rcap);
        if (!c->rbuf) die("realloc");
    }
    ssize_t k = conn_read(c, c->rbuf + c->rlen, c->rcap - c->rlen);
    if (k < 0 && (errno == EAGAIN || errno == EINTR || errno == EWOULDBLOCK)) return;
    if (k <= 0) {
        count_error(ERR_CLOSED);
        reset_conn(c);
        return;
    }
    c->rlen += (size_t)k;
    uint64_t now = now_ns();
    long total;
    const uint8_t *msg;
    size_t mlen;
    if (G.transport != TR_BUFFERED) {
        total = wire_framed_len(c->rbuf, c->rlen);
        msg = c->rbuf + 4;
        mlen = total > 4 ? (size_t)total - 4 : 0;
    } else {
        struct envelope env;
        total = G.protocol == P_COMPACT ? compact_buffered_len(c->rbuf, c->rlen, &env)
                                        : wire_buffered_len(c->rbuf, c->rlen, &env);
        msg = c->rbuf;
        mlen = total > 0 ? (size_t)total : 0;
    }
    if (total == WIRE_MORE) return;
    if (total == WIRE_BAD || !c->in_flight || c->wpos < c->req_len) {
        count_error(total == WIRE_BAD ? ERR_MALFORMED : ERR_EXTRA);
        reset_conn(c);
        return;
    }
    if ((size_t)total != c->rlen) { /* bytes beyond the one reply we await */
        count_error(ERR_EXTRA);
        reset_conn(c);
        return;
    }
    int err = check_reply(c, msg, mlen);
    c->rlen = 0;
    on_reply(c, err, now);
}

static void arm_timer(uint64_t at) {
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)(at / NS);
    its.it_value.tv_nsec = (long)(at % NS);
    if (timerfd_settime(G.tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(double q) {
    if (!G.nlat) return 0.0;
    size_t rank = (size_t)(q * (double)G.nlat + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > G.nlat) rank = G.nlat;
    return (double)G.lat[rank - 1] / 1000.0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host 127.0.0.1] [--conns 16] [--payload 64]\n"
            "               [--transport framed|buffered|theader] [--protocol binary|compact]\n"
            "               [--tls --ca CA.pem [--cert C.pem --key K.pem]]\n"
            "               [--duration 3] [--warmup 0.5]\n"
            "               [--rate 0 (closed loop) | CALLS_PER_S (open loop)] [--drain 5]\n");
    exit(2);
}

int main(int argc, char **argv) {
    G.host = "127.0.0.1";
    G.conns = 16;
    G.payload = 64;
    G.transport = TR_FRAMED;
    G.protocol = P_BINARY;
    G.duration = 3.0;
    G.warmup = 0.5;
    G.drain = 5.0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--tls")) {
            G.tls = 1;
            continue;
        }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) G.host = v;
        else if (!strcmp(a, "--port")) G.port = atoi(v);
        else if (!strcmp(a, "--conns")) G.conns = atoi(v);
        else if (!strcmp(a, "--payload")) G.payload = (size_t)atol(v);
        else if (!strcmp(a, "--transport")) {
            if (!strcmp(v, "framed")) G.transport = TR_FRAMED;
            else if (!strcmp(v, "buffered")) G.transport = TR_BUFFERED;
            else if (!strcmp(v, "theader")) G.transport = TR_THEADER;
            else usage();
        } else if (!strcmp(a, "--protocol")) {
            if (!strcmp(v, "binary")) G.protocol = P_BINARY;
            else if (!strcmp(v, "compact")) G.protocol = P_COMPACT;
            else usage();
        } else if (!strcmp(a, "--ca")) G.ca = v;
        else if (!strcmp(a, "--cert")) G.cert = v;
        else if (!strcmp(a, "--key")) G.key = v; else if (!strcmp(a, "--duration")) G.duration = atof(v);
        else if (!strcmp(a, "--warmup")) G.warmup = atof(v);
        else if (!strcmp(a, "--rate")) G.rate = atof(v);
        else if (!strcmp(a, "--drain")) G.drain = atof(v);
        else usage();
    }
    if (G.port <= 0 || G.conns < 1 || G.conns > 10000 || G.duration <= 0 || G.warmup < 0 ||
        G.rate < 0 || G.payload > (16u << 20))
        usage();
    /* TLS always verifies the server; a client certificate needs its key. */
    if ((G.tls && !G.ca) || (!G.tls && (G.ca || G.cert || G.key)) || (!G.cert != !G.key))
        usage();
    signal(SIGPIPE, SIG_IGN);
    G.addr.sin_family = AF_INET;
    G.addr.sin_port = htons((uint16_t)G.port);
    if (inet_pton(AF_INET, G.host, &G.addr.sin_addr) != 1) usage();

    G.payload_bytes = malloc(G.payload + 1);
    if (!G.payload_bytes) die("malloc");
    for (size_t i = 0; i < G.payload; i++) G.payload_bytes[i] = (uint8_t)(i * 31 + 7);

    if (G.tls) G.ctx = tls_ctx_new(0, G.cert, G.key, G.ca);

    G.epfd = epoll_create1(EPOLL_CLOEXEC);
    G.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (G.epfd < 0 || G.tfd < 0) die("epoll/timerfd");
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(G.epfd, EPOLL_CTL_ADD, G.tfd, &tev) < 0) die("epoll_ctl timer");

    struct lconn *conns = calloc((size_t)G.conns, sizeof *conns);
    if (!conns) die("calloc");
    int connected = 0;
    for (int i = 0; i < G.conns; i++) {
        conns[i].idx = i;
        conns[i].seqid = (uint32_t)i * 100000000u; /* distinct per connection */
        conns[i].next_index = (uint64_t)i;
        build_request(&conns[i]);
        if (connect_one(&conns[i]) == 0) connected++;
    }
    if (!connected) {
        fprintf(stderr, "loadgen: cannot connect to %s:%d\n", G.host, G.port);
        return 1;
    }

    struct rusage ru0;
    getrusage(RUSAGE_SELF, &ru0);
    G.t0 = now_ns();
    G.t_measure = G.t0 + (uint64_t)(G.warmup * 1e9);
    G.t_end = G.t_measure + (uint64_t)(G.duration * 1e9);
    G.t_hard = G.t_end + (uint64_t)(G.drain * 1e9);
    if (G.rate <= 0)
        for (int i = 0; i < G.conns; i++)
            if (conns[i].alive) send_call(&conns[i], G.t0, G.t0);

    struct epoll_event events[MAX_EVENTS];
    uint64_t armed = 0;
    for (;;) {
        uint64_t now = now_ns();
        uint64_t next_due = G.t_hard;
        int busy = 0;
        for (int i = 0; i < G.conns; i++) {
            struct lconn *c = &conns[i];
            if (c->in_flight) {
                busy = 1;
                continue;
            }
            if (G.rate <= 0) {
                if (c->alive && !c->done) {
                    if (now < G.t_end) {
                        send_call(c, now, now); /* after a reconnect */
                        busy = 1;
                    } else {
                        c->done = 1;
                    }
                }
                continue;
            }
            uint64_t due = due_time(c->next_index);
            if (due >= G.t_end || !c->alive) continue;
            if (due <= now) {
                c->next_index += (uint64_t)G.conns;
                send_call(c, due, now);
                busy = 1;
            } else {
                busy = 1;
                if (due < next_due) next_due = due;
            }
        }
        if (!busy || now >= G.t_hard) break;
        if (next_due != armed) {
            arm_timer(next_due);
            armed = next_due;
        }
        int n = epoll_wait(G.epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct lconn *c = events[i].data.ptr;
            if (!c) {
                uint64_t expirations;
                ssize_t r = read(G.tfd, &expirations, sizeof expirations);
                (void)r;
                armed = 0;
                continue;
            }
            if (!c->alive) continue;
            if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
            if (c->alive && (events[i].events & EPOLLOUT) && c->in_flight) try_write(c);
        }
    }
    uint64_t t_stop = now_ns();

    /* Calls in flight or never sent by the hard deadline: errors. */
    for (int i = 0; i < G.conns; i++) {
        struct lconn *c = &conns[i];
        if (c->in_flight) G.errors[ERR_UNFINISHED]++;
        if (G.rate > 0) {
            while (due_time(c->next_index) < G.t_end) {
                G.errors[ERR_UNFINISHED]++;
                c->next_index += (uint64_t)G.conns;
            }
        }
    }
    struct rusage ru1;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    uint64_t errors = 0;
    for (int k = 0; k < ERR_KINDS; k++) errors += G.errors[k];
    qsort(G.lat, G.nlat, sizeof *G.lat, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < G.nlat; i++) sum += (double)G.lat[i];
    double wall = (double)(t_stop - G.t0) / 1e9;

    printf("{\"mode\": \"%s\", \"transport\": \"%s\", \"protocol\": \"%s\", \"tls\": %s, "
           "\"conns\": %d, \"payload\": %zu, "
           "\"rate\": %.1f, \"duration_s\": %.3f, \"warmup_s\": %.3f, \"wall_s\": %.3f, "
           "\"calls\": %zu, \"calls_all\": %llu, \"sent_all\": %llu, \"errors\": %llu, "
           "\"reconnects\": %llu, \"calls_per_s\": %.1f, ",
           G.rate > 0 ? "open" : "closed", TR_NAMES[G.transport],
           G.protocol == P_COMPACT ? "compact" : "binary", G.tls ? "true" : "false", G.conns, G.payload,
           G.rate, G.duration, G.warmup, wall, G.nlat, (unsigned long long)G.calls_all,
           (unsigned long long)G.sent_all, (unsigned long long)errors,
           (unsigned long long)G.reconnects, (double)G.nlat / G.duration);
    printf("\"error_kinds\": {");
    int first = 1;
    for (int k = 0; k < ERR_KINDS; k++) {
        if (!G.errors[k]) continue;
        printf("%s\"%s\": %llu", first ? "" : ", ", ERR_NAMES[k], (unsigned long long)G.errors[k]);
        first = 0;
    }
    printf("}, \"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"p999\": %.1f, "
           "\"max\": %.1f, \"mean\": %.1f}, \"cpu_s\": %.4f}\n",
           pct_us(0.50), pct_us(0.90), pct_us(0.99), pct_us(0.999),
           G.nlat ? (double)G.lat[G.nlat - 1] / 1000.0 : 0.0,
           G.nlat ? sum / (double)G.nlat / 1000.0 : 0.0, cpu);
    return 0;
}
