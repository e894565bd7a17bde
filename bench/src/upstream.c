/*
 * upstream: the benchmark's Thrift server, fast enough never to be the limit.
 *
 * It serves `bench/bench.thrift`: `binary echo(1: binary data)` returns its
 * argument; any other method gets TApplicationException(UNKNOWN_METHOD);
 * oneway calls get no reply. Binary protocol, strict or non-strict
 * envelopes (the reply uses the request's form), framed or buffered
 * transport detected per connection from the first byte (0x80 = buffered
 * strict; anything else = framed, whose 4-byte length starts with 0x00 for
 * any frame under 16 MiB). Buffered message ends are found by skipping the
 * argument struct field by field (wire.h), so any argument shape works.
 * Replies carry the request's seqid and name. Requests on one connection are
 * answered in order, pipelined or not.
 *
 * Plan: one epoll loop per thread (--threads N, default 1), each with its
 * own SO_REUSEPORT listener on the same port; level-triggered; per
 * connection a read buffer and a write buffer; while a write is blocked the
 * connection stops reading (backpressure). Bytes that are not Thrift close
 * that connection only.
 *
 * Usage: upstream [--host 127.0.0.1] [--port 0] [--threads 1]
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

#include "wire.h"

#define READ_CHUNK (64 * 1024)
#define MAX_EVENTS 256
#define TAPP_UNKNOWN_METHOD 1

enum { TR_UNKNOWN = 0, TR_FRAMED = 1, TR_BUFFERED = 2 };

struct buf {
    uint8_t *data;
    size_t len, cap;
};

struct conn {
    int fd;
    int transport;
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

/* Append one reply message (framed if the connection is) to c->out. */
static void put_reply(struct conn *c, const struct envelope *env, int type, const uint8_t *body,
                      size_t body_len, const uint8_t *data, size_t data_len,
                      const uint8_t *tail, size_t tail_len) {
    size_t header_max = 4 + 13 + env->name_len;
    buf_reserve(&c->out, header_max + body_len + data_len + tail_len);
    uint8_t *start = c->out.data + c->out.len;
    uint8_t *p = start + (c->transport == TR_FRAMED ? 4 : 0);
    if (env->strict)
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
    c->out.len += total;
}

/* Answer one complete message msg[0..len). Returns 0, or -1 to drop the connection. */
static int handle_message(struct conn *c, const uint8_t *msg, size_t len) {
    struct envelope env;
    long head = wire_envelope(msg, len, &env);
    if (head <= 0) return -1;
    if (env.type == M_ONEWAY) return 0;
    if (env.type != M_CALL) return -1;
    if (env.name_len == 4 && memcmp(env.name, "echo", 4) == 0) {
        /* Find field 1 (binary) in the argument struct. */
        const uint8_t *data = NULL;
        uint32_t data_len = 0;
        size_t at = (size_t)head;
        for (;;) {
            if (at >= len) return -1;
            int ftype = msg[at];
            if (ftype == T_STOP) break;
            if (at + 3 > len) return -1;
            int fid = (msg[at + 1] << 8) | msg[at + 2];
            at += 3;
            long used = wire_skip(msg + at, len - at, ftype, 1);
            if (used <= 0) return -1;
            if (fid == 1 && ftype == T_STRING) {
                data = msg + at + 4;
                data_len = (uint32_t)used - 4;
            }
            at += (size_t)used;
        }
        uint8_t field[7] = {T_STRING, 0, 0};
        wr32(field + 3, data_len);
        uint8_t stop = T_STOP;
        put_reply(c, &env, M_REPLY, field, sizeof field, data, data_len, &stop, 1);
        return 0;
    }
    /* TApplicationException {1: string message, 2: i32 type} */
    char text[128];
    int tlen = snprintf(text, sizeof text, "unknown method %.*s", (int)(env.name_len > 64 ? 64 : env.name_len),
                        (const char *)env.name);
    uint8_t head1[7] = {T_STRING, 0, 1};
    wr32(head1 + 3, (uint32_t)tlen);
    uint8_t tail[8] = {T_I32, 0, 2, 0, 0, 0, TAPP_UNKNOWN_METHOD, T_STOP};
    put_reply(c, &env, M_EXCEPTION, head1, sizeof head1, (const uint8_t *)text, (size_t)tlen,
              tail, sizeof tail);
    return 0;
}

/* Consume every complete message in c->in. Returns 0, or -1 to drop the connection. */
static int process_input(struct conn *c) {
    size_t off = 0;
    while (off < c->in.len) {
        const uint8_t *p = c->in.data + off;
        size_t n = c->in.len - off;
        if (c->transport == TR_UNKNOWN) c->transport = p[0] == 0x80 ? TR_BUFFERED : TR_FRAMED;
        long total;
        if (c->transport == TR_FRAMED) {
            total = wire_framed_len(p, n);
            if (total == WIRE_BAD) return -1;
            if (total == WIRE_MORE) break;
            struct envelope env;
            long body = wire_buffered_len(p + 4, (size_t)total - 4, &env);
            if (body != total - 4) return -1; /* frame and message must agree */
            if (handle_message(c, p + 4, (size_t)total - 4) < 0) return -1;
        } else {
            struct envelope env;
            total = wire_buffered_len(p, n, &env);
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

/* Write what is pending. Returns 0, or -1 on a dead connection. */
static int flush_output(struct worker *w, struct conn *c) {
    while (c->out_pos < c->out.len) {
        ssize_t k = write(c->fd, c->out.data + c->out_pos, c->out.len - c->out_pos);
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
    buf_reserve(&c->in, READ_CHUNK);
    ssize_t k = read(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR && errno != EWOULDBLOCK)) {
        conn_close(w, c);
        return;
    }
    if (k < 0) return;
    c->in.len += (size_t)k;
    if (process_input(c) < 0 || flush_output(w, c) < 0) conn_close(w, c);
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
    int port = 0, threads = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: upstream [--host H] [--port P] [--threads N]\n");
            return 2;
        }
    }
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
