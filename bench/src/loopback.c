/*
 * loopback: what the kernel charges for the system calls any proxy makes per
 * call, with no proxy in the way.
 *
 * One thread, one TCP connection on 127.0.0.1 (TCP_NODELAY both ends): write
 * SIZE bytes on one end, read them on the other, COUNT times; then the same
 * with sendto/recvfrom. A proxied call is two such pairs (the call one way,
 * the reply the other), whatever the proxy: this is the floor under every
 * target of bench/speed.py. uvloop reads and writes with read/write, HAProxy
 * with recvfrom/sendto: the two lines say what that difference costs.
 * The reader never sleeps here (the bytes are there when it reads), so a
 * proxy's wake-ups of its peers come on top.
 *
 * Usage: loopback SIZE COUNT [REPS]
 * Prints one JSON object per repetition:
 *   {"size": N, "count": N, "write_read_us": F, "sendto_recvfrom_us": F}
 * (microseconds per pair, wall clock; the process is the only one working).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_BYTES (1 << 20)

static char out[BUF_BYTES], in[BUF_BYTES];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int read_all(int fd, long size, int use_recv) {
    long got = 0;
    while (got < size) {
        ssize_t n = use_recv ? recvfrom(fd, in, sizeof in, 0, NULL, NULL) : read(fd, in, sizeof in);
        if (n <= 0) return -1;
        got += n;
    }
    return 0;
}

static double pairs(int writer, int reader, long size, long count, int use_send) {
    double start = now();
    for (long i = 0; i < count; i++) {
        ssize_t n = use_send ? sendto(writer, out, (size_t)size, 0, NULL, 0)
                             : write(writer, out, (size_t)size);
        if (n != size || read_all(reader, size, use_send) != 0) {
            perror("loopback: a write or read failed");
            exit(1);
        }
    }
    return (now() - start) / (double)count * 1e6;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: loopback SIZE COUNT [REPS]\n");
        return 2;
    }
    long size = atol(argv[1]), count = atol(argv[2]);
    int reps = argc > 3 ? atoi(argv[3]) : 3;
    if (size <= 0 || size > BUF_BYTES / 4 || count <= 0 || reps <= 0) {
        fprintf(stderr, "loopback: SIZE must be 1..%d, COUNT and REPS positive\n", BUF_BYTES / 4);
        return 2;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(listener, 1) != 0 || getsockname(listener, (struct sockaddr *)&addr, &len) != 0) {
        perror("loopback: listen");
        return 1;
    }
    int client = socket(AF_INET, SOCK_STREAM, 0);
    if (client < 0 || connect(client, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("loopback: connect");
        return 1;
    }
    int server = accept(listener, NULL, NULL);
    if (server < 0) {
        perror("loopback: accept");
        return 1;
    }
    int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    memset(out, 'x', sizeof out);
    for (int rep = 0; rep < reps; rep++) {
        double rw = pairs(client, server, size, count, 0);
        double sr = pairs(client, server, size, count, 1);
        printf("{\"size\": %ld, \"count\": %ld, \"write_read_us\": %.4f, \"sendto_recvfrom_us\": %.4f}\n",
               size, count, rw, sr);
        fflush(stdout);
    }
    close(client);
    close(server);
    close(listener);
    return 0;
}
