/*
 * upstream: the benchmark's Thrift server, fast enough never to be the limit.
 *
 * It serves `bench/bench.thrift`: `binary echo(1: binary data)` returns its
 * argument; any other method gets TApplicationException(UNKNOWN_METHOD);
 * oneway calls get no reply. Binary protocol (strict or non-strict
 * envelopes; the reply uses the request's form) or compact protocol; framed,
 * buffered or THeader transport (no transforms; info headers are skipped,
 * the reply has none). Protocol and transport are detected per connection
 * from its first bytes: 0x80 = buffered binary strict, 0x82 = buffered
 * compact, anything else = framed (a 4-byte length that starts with 0x00 for
 * any frame under 16 MiB), then 0x0FFF after the length = THeader, 0x82 =
 * framed compact, else framed binary. --protocol and --transport restrict
 * what is accepted: a connection speaking anything else is closed, with a
 * line on stderr, so a benchmark can prove what a proxy sent.
 * Buffered message ends are found by skipping the argument struct field by
 * field (wire.h), so any argument shape works. Replies carry the request's
 * seqid and name. Requests on one connection are answered in order,
 * pipelined or not.
 *
 * TLS (--tls --cert C --key K, optionally --ca CA to require client
 * certificates signed by it): handshakes run in the event loop.
 *
 * Plan: one epoll loop per thread (--threads N, default 1), each with its
 * own SO_REUSEPORT listener on the same port; level-triggered; per
 * connection a read buffer and a write buffer; while a write is blocked the
 * connection stops reading (backpressure). Bytes that are not Thrift close
 * that connection only.
 *
 * Usage: upstream [--host 127.0.0.1] [--port 0] [--threads 1]
 *                 [--protocol any|binary|compact] [--transport any|framed|buffered|theader]
 *                 [--tls --cert C --key K [--ca CA]]
 * Prints "LISTENING <port>" on stdout once every listener is bound; runs
 * until killed (SIGTERM/SIGINT take the default action).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tls.h"
#include "wire.h"

#define READ_CHUNK (64 * 1024)
#define MAX_EVENTS 256
#define TAPP_UNKNOWN_METHOD 1

enum { TR_UNKNOWN = 0, TR_FRAMED = 1, TR_BUFFERED = 2, TR_THEADER = 3 };
enum { P_ANY = -1, P_BINARY = 0, P_COMPACT = 1 };

static struct {
    int protocol;  /* P_ANY or the one accepted */
    int transport; /* TR_UNKNOWN (any) or the one accepted */
    SSL_CTX *ctx;  /* TLS when set */
} O = {P_ANY, TR_UNKNOWN, NULL};

struct buf {
    uint8_t *data;
    size_t len, cap;
};

struct conn {
    int fd;
    int transport;
    int protocol;
    SSL *ssl;
    int handshaking;
    struct theader th; /* THeader: the last request's header, for the reply */
    int reading; /* EPOLLIN registered */
    struct buf in;
    struct buf out;
    size_t out_pos;
};

struct worker {
    int listen_fd;
    int epfd;
};

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : READ_CHUNK;
    while (cap < b->len + extra) cap *= 2;
    uint8_t *data = realloc(b->data, cap);
    if (!data) die("realloc");
    b->data = data;
    b->cap = cap;
}

static void conn_close(struct worker *w, struct conn *c) {
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) {
        p_ERR_clear_error();
        p_SSL_free(c->ssl);
    }
    close(c->fd);
    free(c->in.data);
    free(c->out.data);
    free(c);
}

static void set_events(struct worker *w, struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->reading = (events & EPOLLIN) != 0;
}

/* Append one reply message (in the connection's transport and protocol)
 * to c->out: the envelope, then body, data and tail bytes as given. */
static void put_reply(struct conn *c, const struct envelope *env, int type, const uint8_t *body,
                      size_t body_len, const uint8_t *data, size_t data_len,
                      const uint8_t *tail, size_t tail_len) {
    size_t pre = c->transport == TR_THEADER ? 18 : c->transport == TR_FRAMED ? 4 : 0;
    buf_reserve(&c->out, pre + 16 + env->name_len + body_len + data_len + tail_len);
    uint8_t *start = c->out.data + c->out.len;
    uint8_t *p = start + pre;
    if (c->protocol == P_COMPACT)
        p += compact_put_envelope(p, type, env->name, env->name_len, env->seqid);
    else if (env->strict)
        p += wire_put_envelope(p, type, env->name, env->name_len, env->seqid);
    else
        p += wire_put_envelope_old(p, type, env->name, env->name_len, env->seqid);
    memcpy(p, body, body_len);
    p += body_len;
    if (data_len) memcpy(p, data, data_len);
    p += data_len;
    memcpy(p, tail, tail_len);
    p += tail_len;
    size_t total = (size_t)(p - start);
    if (c->transport == TR_FRAMED) wr32(start, (uint32_t)(total - 4));
    if (c->transport == TR_THEADER)
        theader_put(start, c->th.protocol, c->th.flags, c->th.seqid, total - 18);
    c->out.len += total;
}

/* Find echo's field 1 (binary) in the argument struct at msg[at..len).
 * Returns 0 (data NULL when absent) or -1 when the struct is malformed. */
static int find_data(const struct conn *c, const uint8_t *msg, size_t len, size_t at,
                     const uint8_t **data, uint32_t *data_len) {
    *data = NULL;
    *data_len = 0;
    int last_fid = 0;
    for (;;) {
        if (at >= len) return -1;
        int fid, ftype;
        long used;
        if (c->protocol == P_COMPACT) {
            int head = msg[at++];
            if (head == CT_STOP) return 0;
            ftype = head & 0x0f;
            if (head >> 4) {
                fid = last_fid + (head >> 4);
            } else {
                uint64_t zz;
                used = rd_varint(msg + at, len - at, &zz);
                if (used <= 0) return -1;
                at += (size_t)used;
                fid = (int)((zz >> 1) ^ (~(zz & 1) + 1));
            }
            last_fid = fid;
            used = compact_skip(msg + at, len - at, ftype, 1, 1);
            if (used < 0 || (used == 0 && ftype != CT_TRUE && ftype != CT_FALSE)) return -1;
            if (fid == 1 && ftype == CT_BINARY) {
                uint64_t n = 0;
                long vl = rd_varint(msg + at, len - at, &n);
                if (vl <= 0) return -1;
                *data = msg + at + vl;
                *data_len = (uint32_t)n;
            }
        } else {
            ftype = msg[at];
            if (ftype == T_STOP) return 0;
            if (at + 3 > len) return -1;
            fid = (msg[at + 1] << 8) | msg[at + 2];
            at += 3;
            used = wire_skip(msg + at, len - at, ftype, 1);
            if (used <= 0) return -1;
            if (fid == 1 && ftype == T_STRING) {
                *data = msg + at + 4;
                *data_len = (uint32_t)used - 4;
            }
        }
        at += (size_t)used;
    }
}

/* Answer one complete message msg[0..len). Returns 0, or -1 to drop the connection. */
static int handle_message(struct conn *c, const uint8_t *msg, size_t len) {
    struct envelope env;
    long head = c->protocol == P_COMPACT ? compact_envelope(msg, len, &env)
                                         : wire_envelope(msg, len, &env);
    if (head <= 0) return -1;
    if (env.type == M_ONEWAY) return 0;
    if (env.type != M_CALL) return -1;
    int compact = c->protocol == P_COMPACT;
    if (env.name_len == 4 && memcmp(env.name, "echo", 4) == 0) {
        const uint8_t *data;
        uint32_t data_len;
        if (find_data(c, msg, len, (size_t)head, &data, &data_len) < 0) return -1;
        uint8_t field[16] = {T_STRING, 0, 0};
        size_t field_len = 7;
        if (compact) { /* field 0 in the long form: type, zigzag id 0, varint length */
            field[0] = CT_BINARY;
            field[1] = 0;
            field_len = 2 + wr_varint(field + 2, data_len);
        } else {
            wr32(field + 3, data_len);
        }
        uint8_t stop = T_STOP;
        put_reply(c, &env, M_REPLY, field, field_len, data, data_len, &stop, 1);
        return 0;
    }
    /* TApplicationException {1: string message, 2: i32 type} */
    char text[128];
    int tlen = snprintf(text, sizeof text, "unknown method %.*s", (int)(env.name_len > 64 ? 64 : env.name_len),
                        (const char *)env.name);
    uint8_t head1[8] = {T_STRING, 0, 1};
    size_t head1_len = 7;
    uint8_t tail[8] = {T_I32, 0, 2, 0, 0, 0, TAPP_UNKNOWN_METHOD, T_STOP};
    size_t tail_len = 8;
    if (compact) {
        head1[0] = (1 << 4) | CT_BINARY;
        head1_len = 1 + wr_varint(head1 + 1, (uint32_t)tlen);
        tail[0] = (1 << 4) | CT_I32;
        tail[1] = 2 * TAPP_UNKNOWN_METHOD; /* zigzag */
        tail[2] = CT_STOP;
        tail_len = 3;
    } else {
        wr32(head1 + 3, (uint32_t)tlen);
    }
    put_reply(c, &env, M_EXCEPTION, head1, head1_len, (const uint8_t *)text, (size_t)tlen, tail,
              tail_len);
    return 0;
}

/* Say on stderr that a connection spoke what --protocol/--transport exclude. */
static void refused(const struct conn *c) {
    static const char *tr[] = {"?", "framed", "buffered", "theader"};
    fprintf(stderr, "upstream: refused a %s %s connection\n", tr[c->transport],
            c->protocol == P_COMPACT ? "compact" : "binary");
}

/* Tell the connection's transport and protocol from its first bytes p[0..n).
 * Returns 1 when known, 0 when more bytes are needed, -1 when refused. */
static int detect(struct conn *c, const uint8_t *p, size_t n) {
    if (p[0] == 0x80 || p[0] == COMPACT_ID) {
        c->transport = TR_BUFFERED;
        c->protocol = p[0] == 0x80 ? P_BINARY : P_COMPACT;
    } else {
        if (n < 6) return 0;
        c->transport = (p[4] == 0x0f && p[5] == 0xff) ? TR_THEADER : TR_FRAMED;
        c->protocol = p[4] == COMPACT_ID ? P_COMPACT : P_BINARY;
    }
    if ((O.transport != TR_UNKNOWN && c->transport != O.transport) ||
        (O.protocol != P_ANY && c->transport != TR_THEADER && c->protocol != O.protocol)) {
        refused(c);
        return -1;
    }
    return 1;
}

/* Consume every complete message in c->in. Returns 0, or -1 to drop the connection. */
static int process_input(struct conn *c) {
    size_t off = 0;
    while (off < c->in.len) {
        const uint8_t *p = c->in.data + off;
        size_t n = c->in.len - off;
        if (c->transport == TR_UNKNOWN) {
            int known = detect(c, p, n);
            if (known < 0) return -1;
            if (known == 0) break;
        }
        long total;
        if (c->transport == TR_THEADER) {
            total = wire_framed_len(p, n);
            if (total == WIRE_BAD) return -1;
            if (total == WIRE_MORE) break;
            long off = theader_parse(p + 4, (size_t)total - 4, &c->th);
            if (off <= 0 || c->th.transforms) return -1;
            if (c->th.protocol != THEADER_PROTO_BINARY && c->th.protocol != THEADER_PROTO_COMPACT)
                return -1;
            c->protocol = c->th.protocol == THEADER_PROTO_COMPACT ? P_COMPACT : P_BINARY;
            if (O.protocol != P_ANY && c->protocol != O.protocol) {
                refused(c);
                return -1;
            }
            const uint8_t *msg = p + 4 + off;
            size_t mlen = (size_t)total - 4 - (size_t)off;
            struct envelope env;
            long body = c->protocol == P_COMPACT ? compact_buffered_len(msg, mlen, &env)
                                                 : wire_buffered_len(msg, mlen, &env);
            if (body != (long)mlen) return -1;
            if (handle_message(c, msg, mlen) < 0) return -1;
        } else if (c->transport == TR_FRAMED) {
            total = wire_framed_len(p, n);
            if (total == WIRE_BAD) return -1;
            if (total == WIRE_MORE) break;
            struct envelope env;
            long body = c->protocol == P_COMPACT ? compact_buffered_len(p + 4, (size_t)total - 4, &env)
                                                 : wire_buffered_len(p + 4, (size_t)total - 4, &env);
            if (body != total - 4) return -1; /* frame and message must agree */
            if (handle_message(c, p + 4, (size_t)total - 4) < 0) return -1;
        } else {
            struct envelope env;
            total = c->protocol == P_COMPACT ? compact_buffered_len(p, n, &env)
                                             : wire_buffered_len(p, n, &env);
            if (total == WIRE_BAD) return -1;
            if (total == WIRE_MORE) break;
            if (handle_message(c, p, (size_t)total) < 0) return -1;
        }
        off += (size_t)total;
    }
    if (off) {
        memmove(c->in.data, c->in.data + off, c->in.len - off);
        c->in.len -= off;
    }
    return 0;
}

/* read()/write() or their TLS forms: > 0 bytes, 0 closed, -1 with errno
 * set (EAGAIN: try again when the socket is ready). */
static ssize_t conn_read(struct conn *c, void *buf, size_t n) {
    if (!c->ssl) return read(c->fd, buf, n);
    int k = p_SSL_read(c->ssl, buf, (int)n);
    if (k > 0) return k;
    int e = p_SSL_get_error(c->ssl, k);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) errno = EAGAIN;
    else if (e == SSL_ERROR_ZERO_RETURN) return 0;
    else errno = EIO;
    return -1;
}

static ssize_t conn_write(struct conn *c, const void *buf, size_t n) {
    if (!c->ssl) return write(c->fd, buf, n);
    int k = p_SSL_write(c->ssl, buf, (int)n);
    if (k > 0) return k;
    int e = p_SSL_get_error(c->ssl, k);
    errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : EIO;
    return -1;
}

/* Write what is pending. Returns 0, or -1 on a dead connection. */
static int flush_output(struct worker *w, struct conn *c) {
    while (c->out_pos < c->out.len) {
        ssize_t k = conn_write(c, c->out.data + c->out_pos, c->out.len - c->out_pos);
        if (k > 0) {
            c->out_pos += (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (c->reading) set_events(w, c, EPOLLOUT); /* stop reading until drained */
            return 0;
        }
        return -1;
    }
    c->out.len = 0;
    c->out_pos = 0;
    if (!c->reading) set_events(w, c, EPOLLIN);
    return 0;
}

static void on_readable(struct worker *w, struct conn *c) {
    do { /* once, or until OpenSSL holds no decrypted bytes back */
        buf_reserve(&c->in, READ_CHUNK); /* a whole TLS record (16 KiB) fits */
        ssize_t k = conn_read(c, c->in.data + c->in.len, c->in.cap - c->in.len);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR && errno != EWOULDBLOCK)) {
            conn_close(w, c);
            return;
        }
        if (k < 0) return;
        c->in.len += (size_t)k;
        if (process_input(c) < 0 || flush_output(w, c) < 0) {
            conn_close(w, c);
            return;
        }
    } while (c->ssl && c->reading && p_SSL_pending(c->ssl) > 0);
}

/* One step of a TLS handshake. Returns 0, or -1 to drop the connection. */
static int handshake_step(struct worker *w, struct conn *c) {
    int r = p_SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->handshaking = 0;
        set_events(w, c, EPOLLIN);
        return 0;
    }
    int e = p_SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) set_events(w, c, EPOLLIN);
    else if (e == SSL_ERROR_WANT_WRITE) set_events(w, c, EPOLLOUT);
    else return -1;
    return 0;
}

static void on_accept(struct worker *w) {
    for (;;) {
        int fd = accept4(w->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return; /* EAGAIN, or out of descriptors: try again on the next event */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        c->protocol = P_BINARY;
        if (O.ctx) {
            c->ssl = tls_conn_new(O.ctx, fd, 1, NULL);
            c->handshaking = 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
        c->reading = 1;
    }
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(w->epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {
                on_accept(w);
            } else if (c->handshaking) {
                if (handshake_step(w, c) < 0) conn_close(w, c);
            } else if (events[i].events & EPOLLOUT) {
                if (flush_output(w, c) < 0) conn_close(w, c);
            } else {
                on_readable(w, c);
            }
        }
    }
    return NULL;
}

static int listen_on(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "upstream: bad host %s\n", host);
        exit(2);
    }
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(fd, 1024) < 0) die("listen");
    return fd;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, threads = 1, tls = 0;
    const char *cert = NULL, *key = NULL, *ca = NULL;
    int bad = 0;
    for (int i = 1; i < argc && !bad; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--tls")) {
            tls = 1;
            continue;
        }
        if (!v) {
            bad = 1;
            break;
        }
        i++;
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--cert")) cert = v;
        else if (!strcmp(a, "--key")) key = v;
        else if (!strcmp(a, "--ca")) ca = v;
        else if (!strcmp(a, "--protocol")) {
            if (!strcmp(v, "any")) O.protocol = P_ANY;
            else if (!strcmp(v, "binary")) O.protocol = P_BINARY;
            else if (!strcmp(v, "compact")) O.protocol = P_COMPACT;
            else bad = 1;
        } else if (!strcmp(a, "--transport")) {
            if (!strcmp(v, "any")) O.transport = TR_UNKNOWN;
            else if (!strcmp(v, "framed")) O.transport = TR_FRAMED;
            else if (!strcmp(v, "buffered")) O.transport = TR_BUFFERED;
            else if (!strcmp(v, "theader")) O.transport = TR_THEADER;
            else bad = 1;
        } else bad = 1;
    }
    if (bad || tls != (cert && key) || (!tls && ca) || (!cert != !key)) {
        fprintf(stderr, "usage: upstream [--host H] [--port P] [--threads N]\n"
                        "                [--protocol any|binary|compact]\n"
                        "                [--transport any|framed|buffered|theader]\n"
                        "                [--tls --cert C --key K [--ca CA]]\n");
        return 2;
    }
    if (tls) O.ctx = tls_ctx_new(1, cert, key, ca);
    if (threads < 1 || threads > 64) threads = 1;
    signal(SIGPIPE, SIG_IGN);
    struct worker *workers = calloc((size_t)threads, sizeof *workers);
    if (!workers) die("calloc");
    for (int t = 0; t < threads; t++) {
        workers[t].listen_fd = listen_on(host, port);
        if (port == 0) {
            struct sockaddr_in bound;
            socklen_t blen = sizeof bound;
            getsockname(workers[t].listen_fd, (struct sockaddr *)&bound, &blen);
            port = ntohs(bound.sin_port);
        }
        workers[t].epfd = epoll_create1(EPOLL_CLOEXEC);
        if (workers[t].epfd < 0) die("epoll_create1");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        if (epoll_ctl(workers[t].epfd, EPOLL_CTL_ADD, workers[t].listen_fd, &ev) < 0)
            die("epoll_ctl listener");
    }
    printf("LISTENING %d\n", port);
    fflush(stdout);
    for (int t = 1; t < threads; t++) {
        pthread_t tid;
        if (pthread_create(&tid, NULL, worker_main, &workers[t]) != 0) die("pthread_create");
    }
    worker_main(&workers[0]);
    return 0;
}
