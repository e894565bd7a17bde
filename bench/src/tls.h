/*
 * TLS for the benchmark tools: OpenSSL, loaded at run time.
 *
 * The tools are built with one plain gcc command and no link flags, and run
 * where libssl is absent as long as --tls is not given; so libssl.so.3 is
 * opened with dlopen() when TLS is asked for, and the few functions used
 * are looked up by name. Types and constants come from OpenSSL's headers.
 *
 * tls_ctx_new() makes a client or server context: a certificate and key to
 * present (a server must have them; a client may, for mutual TLS) and a CA
 * file to verify the peer with (a client always verifies when given one; a
 * server then requires a client certificate). Client connections also check
 * that the server's certificate names the IP address dialled.
 */
#ifndef BENCH_TLS_H
#define BENCH_TLS_H

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define TLS_FUNCTIONS(X)                                                                    \
    X(const SSL_METHOD *, TLS_client_method, (void))                                        \
    X(const SSL_METHOD *, TLS_server_method, (void))                                        \
    X(SSL_CTX *, SSL_CTX_new, (const SSL_METHOD *))                                         \
    X(long, SSL_CTX_ctrl, (SSL_CTX *, int, long, void *))                                   \
    X(int, SSL_CTX_use_certificate_chain_file, (SSL_CTX *, const char *))                   \
    X(int, SSL_CTX_use_PrivateKey_file, (SSL_CTX *, const char *, int))                     \
    X(int, SSL_CTX_check_private_key, (const SSL_CTX *))                                    \
    X(int, SSL_CTX_load_verify_locations, (SSL_CTX *, const char *, const char *))          \
    X(void, SSL_CTX_set_verify, (SSL_CTX *, int, SSL_verify_cb))                            \
    X(SSL *, SSL_new, (SSL_CTX *))                                                          \
    X(void, SSL_free, (SSL *))                                                              \
    X(int, SSL_set_fd, (SSL *, int))                                                        \
    X(void, SSL_set_connect_state, (SSL *))                                                 \
    X(void, SSL_set_accept_state, (SSL *))                                                  \
    X(X509_VERIFY_PARAM *, SSL_get0_param, (SSL *))                                         \
    X(int, X509_VERIFY_PARAM_set1_ip_asc, (X509_VERIFY_PARAM *, const char *))              \
    X(int, SSL_do_handshake, (SSL *))                                                       \
    X(int, SSL_read, (SSL *, void *, int))                                                  \
    X(int, SSL_write, (SSL *, const void *, int))                                           \
    X(int, SSL_pending, (const SSL *))                                                      \
    X(int, SSL_get_error, (const SSL *, int))                                               \
    X(unsigned long, ERR_get_error, (void))                                                 \
    X(void, ERR_error_string_n, (unsigned long, char *, size_t))                            \
    X(void, ERR_clear_error, (void))

#define TLS_DECLARE(ret, name, args) static ret(*p_##name) args;
TLS_FUNCTIONS(TLS_DECLARE)
#undef TLS_DECLARE

/* Print OpenSSL's error queue after `what` and exit 1. */
static void tls_die(const char *what) {
    fprintf(stderr, "%s:", what);
    unsigned long e;
    while (p_ERR_get_error && (e = p_ERR_get_error()) != 0) {
        char text[256];
        p_ERR_error_string_n(e, text, sizeof text);
        fprintf(stderr, " %s", text);
    }
    fprintf(stderr, "\n");
    exit(1);
}

/* Open libssl and look up every function; exits 1 when that fails. */
static void tls_load(void) {
    void *lib = dlopen("libssl.so.3", RTLD_NOW);
    if (!lib) lib = dlopen("libssl.so", RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "--tls needs OpenSSL 3 (libssl.so.3): %s\n", dlerror());
        exit(1);
    }
#define TLS_LOOKUP(ret, name, args)                                                         \
    *(void **)&p_##name = dlsym(lib, #name);                                                \
    if (!p_##name) {                                                                        \
        fprintf(stderr, "libssl lacks %s\n", #name);                                        \
        exit(1);                                                                            \
    }
    TLS_FUNCTIONS(TLS_LOOKUP)
#undef TLS_LOOKUP
}

/* A context for one side. cert/key/ca may be NULL (a server needs cert and key). */
static SSL_CTX *tls_ctx_new(int server, const char *cert, const char *key, const char *ca) {
    tls_load();
    SSL_CTX *ctx = p_SSL_CTX_new(server ? p_TLS_server_method() : p_TLS_client_method());
    if (!ctx) tls_die("SSL_CTX_new");
    p_SSL_CTX_ctrl(ctx, SSL_CTRL_MODE,
                   SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
    if (cert && p_SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) tls_die(cert);
    if (key && p_SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) tls_die(key);
    if (cert && key && p_SSL_CTX_check_private_key(ctx) != 1) tls_die("key does not match cert");
    if (ca) {
        if (p_SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) tls_die(ca);
        p_SSL_CTX_set_verify(
            ctx, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
    }
    return ctx;
}

/* A new TLS connection over fd; a client one checks that the server's
 * certificate is for `ip` (when the context verifies at all). */
static SSL *tls_conn_new(SSL_CTX *ctx, int fd, int server, const char *ip) {
    SSL *ssl = p_SSL_new(ctx);
    if (!ssl || p_SSL_set_fd(ssl, fd) != 1) tls_die("SSL_new");
    if (server) {
        p_SSL_set_accept_state(ssl);
    } else {
        p_SSL_set_connect_state(ssl);
        if (ip && p_X509_VERIFY_PARAM_set1_ip_asc(p_SSL_get0_param(ssl), ip) != 1)
            tls_die("X509_VERIFY_PARAM_set1_ip_asc");
    }
    return ssl;
}

#endif
