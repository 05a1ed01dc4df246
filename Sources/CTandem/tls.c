// TLS through OpenSSL over memory BIOs: OpenSSL never touches a socket, the caller's I/O engine
// moves the ciphertext (io_uring or epoll alike). See ctandem.h for the contract.
#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "ctandem.h"

struct ctandem_tls_ctx {
    SSL_CTX *ctx;
    int is_server;
};

// A BIO that moves ciphertext straight between OpenSSL and the caller's buffer (a "window")
// instead of through a memory BIO, which would copy every byte once more on its way in and once
// more on its way out. Bytes the window cannot take or give (it is not set, full, or the caller
// needs its buffer back) go through `overflow`, a memory BIO, in order: while the overflow holds
// bytes, the window is not used.
typedef struct {
    BIO *overflow;
    unsigned char *win;
    size_t win_len; // input: bytes in the window; output: its capacity
    size_t win_pos; // input: bytes OpenSSL took; output: bytes OpenSSL put
    int input;
} window_bio;

struct ctandem_tls {
    SSL *ssl;
    BIO *in;   // ciphertext received, read by OpenSSL
    BIO *out;  // ciphertext produced by OpenSSL, taken by the caller
    window_bio in_window, out_window;
    char error[256];
    char peer_name[256];
};

static int window_read(BIO *b, char *buf, int len) {
    window_bio *w = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0) return 0;
    if (w->win_pos < w->win_len) {
        size_t n = w->win_len - w->win_pos;
        if (n > (size_t)len) n = (size_t)len;
        memcpy(buf, w->win + w->win_pos, n);
        w->win_pos += n;
        return (int)n;
    }
    int n = BIO_read(w->overflow, buf, len);
    if (n <= 0) {
        BIO_set_retry_read(b);
        return -1;
    }
    return n;
}

static int window_write(BIO *b, const char *buf, int len) {
    window_bio *w = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0) return 0;
    if (w->win && BIO_ctrl_pending(w->overflow) == 0 && w->win_len - w->win_pos >= (size_t)len) {
        memcpy(w->win + w->win_pos, buf, (size_t)len);
        w->win_pos += (size_t)len;
        return len;
    }
    return BIO_write(w->overflow, buf, len);
}

// Input windows count what is left in them; an output window's bytes are the caller's already.
static long window_input_left(const window_bio *w) {
    return w->input ? (long)(w->win_len - w->win_pos) : 0;
}

static long window_ctrl(BIO *b, int cmd, long num, void *ptr) {
    window_bio *w = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_PENDING:
        // Input: what OpenSSL may still read. Output: what the caller must still take out (the
        // window's bytes are already in the caller's buffer).
        return (long)BIO_ctrl_pending(w->overflow) + window_input_left(w);
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_EOF:
        return 0; // the end of the stream is the socket's, which the caller watches
    default:
        return BIO_ctrl(w->overflow, cmd, num, ptr);
    }
}

static BIO_METHOD *window_method_made;
static pthread_once_t window_method_once = PTHREAD_ONCE_INIT;

static void make_window_method(void) {
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "tandem window");
    if (!m) return;
    BIO_meth_set_read(m, window_read);
    BIO_meth_set_write(m, window_write);
    BIO_meth_set_ctrl(m, window_ctrl);
    window_method_made = m;
}

static BIO_METHOD *window_method(void) {
    pthread_once(&window_method_once, make_window_method);
    return window_method_made;
}

static BIO *window_bio_new(window_bio *w) {
    BIO_METHOD *m = window_method();
    if (!m) return NULL;
    w->overflow = BIO_new(BIO_s_mem());
    if (!w->overflow) return NULL;
    // An empty memory BIO reports "retry" rather than EOF.
    BIO_set_mem_eof_return(w->overflow, -1);
    BIO *b = BIO_new(m);
    if (!b) {
        BIO_free(w->overflow);
        w->overflow = NULL;
        return NULL;
    }
    BIO_set_data(b, w);
    BIO_set_init(b, 1);
    return b;
}

/// Input bytes still in the window move to the overflow: the caller wants its buffer back.
static int release_input(ctandem_tls *t) {
    window_bio *w = &t->in_window;
    int ok = 1;
    if (w->win_pos < w->win_len)
        ok = BIO_write(w->overflow, w->win + w->win_pos, (int)(w->win_len - w->win_pos)) == (int)(w->win_len - w->win_pos);
    w->win = NULL;
    w->win_len = w->win_pos = 0;
    return ok;
}

static void set_openssl_error(char *buf, size_t len, const char *what) {
    unsigned long e = ERR_get_error();
    char reason[200] = "unknown error";
    if (e) ERR_error_string_n(e, reason, sizeof(reason));
    snprintf(buf, len, "%s: %s", what, reason);
    ERR_clear_error();
}

ctandem_tls_ctx *ctandem_tls_ctx_new(int is_server, const char *cert_file, const char *key_file,
                                     const char *ca_file, int require_peer_cert, int min_tls13,
                                     char *err, size_t err_len) {
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(is_server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        set_openssl_error(err, err_len, "cannot create TLS context");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, min_tls13 ? TLS1_3_VERSION : TLS1_2_VERSION);
    // Large records: fewer record headers and MACs per MiB moved.
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    if (is_server) SSL_CTX_set_num_tickets(ctx, 0);
    if (cert_file && *cert_file) {
        if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
            char what[512];
            snprintf(what, sizeof(what), "cannot load certificate %s", cert_file);
            set_openssl_error(err, err_len, what);
            SSL_CTX_free(ctx);
            return NULL;
        }
    }
    if (key_file && *key_file) {
        if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
            char what[512];
            snprintf(what, sizeof(what), "cannot load private key %s", key_file);
            set_openssl_error(err, err_len, what);
            SSL_CTX_free(ctx);
            return NULL;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            char what[512];
            snprintf(what, sizeof(what), "private key %s does not match certificate %s", key_file,
                     cert_file ? cert_file : "(none)");
            set_openssl_error(err, err_len, what);
            SSL_CTX_free(ctx);
            return NULL;
        }
    }
    if (ca_file && *ca_file) {
        if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
            char what[512];
            snprintf(what, sizeof(what), "cannot load CA %s", ca_file);
            set_openssl_error(err, err_len, what);
            SSL_CTX_free(ctx);
            return NULL;
        }
        int mode = SSL_VERIFY_PEER;
        if (is_server && require_peer_cert) mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
        if (!is_server || require_peer_cert) SSL_CTX_set_verify(ctx, mode, NULL);
    }
    ctandem_tls_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        SSL_CTX_free(ctx);
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    c->ctx = ctx;
    c->is_server = is_server;
    return c;
}

void ctandem_tls_ctx_free(ctandem_tls_ctx *c) {
    if (!c) return;
    SSL_CTX_free(c->ctx);
    free(c);
}

ctandem_tls *ctandem_tls_new(ctandem_tls_ctx *c, const char *expected_peer_name) {
    ctandem_tls *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->ssl = SSL_new(c->ctx);
    t->in_window.input = 1;
    t->in = window_bio_new(&t->in_window);
    t->out = window_bio_new(&t->out_window);
    if (!t->ssl || !t->in || !t->out) {
        if (t->ssl) SSL_free(t->ssl);
        BIO_free(t->in);
        BIO_free(t->out);
        BIO_free(t->in_window.overflow);
        BIO_free(t->out_window.overflow);
        free(t);
        return NULL;
    }
    SSL_set_bio(t->ssl, t->in, t->out);
    if (c->is_server)
        SSL_set_accept_state(t->ssl);
    else
        SSL_set_connect_state(t->ssl);
    if (expected_peer_name && *expected_peer_name) {
        X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
        unsigned char addr[16];
        if (inet_pton(AF_INET, expected_peer_name, addr) == 1 ||
            inet_pton(AF_INET6, expected_peer_name, addr) == 1)
            X509_VERIFY_PARAM_set1_ip_asc(param, expected_peer_name);
        else
            X509_VERIFY_PARAM_set1_host(param, expected_peer_name, 0);
        if (!c->is_server) SSL_set_tlsext_host_name(t->ssl, expected_peer_name);
    }
    return t;
}

void ctandem_tls_free(ctandem_tls *t) {
    if (!t) return;
    SSL_free(t->ssl);  // frees both window BIOs
    BIO_free(t->in_window.overflow);
    BIO_free(t->out_window.overflow);
    free(t);
}

int ctandem_tls_feed(ctandem_tls *t, const void *data, size_t len) {
    if (len == 0) return 0;
    if (!release_input(t)) return -1;
    int n = BIO_write(t->in_window.overflow, data, (int)len);
    return n == (int)len ? n : -1;
}

int ctandem_tls_feed_in_place(ctandem_tls *t, const void *data, size_t len) {
    if (len == 0) return 0;
    if (!release_input(t)) return -1;
    if (BIO_ctrl_pending(t->in_window.overflow) > 0) {
        int n = BIO_write(t->in_window.overflow, data, (int)len);
        return n == (int)len ? n : -1;
    }
    t->in_window.win = (unsigned char *)data;
    t->in_window.win_len = len;
    t->in_window.win_pos = 0;
    return (int)len;
}

int ctandem_tls_release_input(ctandem_tls *t) { return release_input(t) ? 0 : -1; }

void ctandem_tls_set_output_window(ctandem_tls *t, void *buf, size_t capacity) {
    t->out_window.win = buf;
    t->out_window.win_len = capacity;
    t->out_window.win_pos = 0;
}

size_t ctandem_tls_close_output_window(ctandem_tls *t) {
    size_t n = t->out_window.win_pos;
    t->out_window.win = NULL;
    t->out_window.win_len = t->out_window.win_pos = 0;
    return n;
}

static int classify(ctandem_tls *t, int rc, const char *what) {
    int e = SSL_get_error(t->ssl, rc);
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return CTANDEM_TLS_WANT;
    case SSL_ERROR_ZERO_RETURN:
        snprintf(t->error, sizeof(t->error), "peer closed the TLS session");
        ERR_clear_error();
        return CTANDEM_TLS_CLOSED;
    default: {
        long v = SSL_get_verify_result(t->ssl);
        if (v != X509_V_OK) {
            snprintf(t->error, sizeof(t->error), "%s: certificate verification failed: %s", what,
                     X509_verify_cert_error_string(v));
            ERR_clear_error();
        } else {
            set_openssl_error(t->error, sizeof(t->error), what);
        }
        return CTANDEM_TLS_ERROR;
    }
    }
}

int ctandem_tls_handshake(ctandem_tls *t) {
    ERR_clear_error();
    int rc = SSL_do_handshake(t->ssl);
    if (rc == 1) {
        X509 *peer = SSL_get1_peer_certificate(t->ssl);
        if (peer) {
            X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, t->peer_name,
                                      sizeof(t->peer_name));
            X509_free(peer);
        }
        return CTANDEM_TLS_OK;
    }
    return classify(t, rc, "TLS handshake failed");
}

// No ERR_clear_error before each read and write: it costs a thread-local lookup per call (1% of
// a node's time at 4 KiB writes), and every path that leaves an error on the queue clears it
// (set_openssl_error, classify), so the queue is empty whenever SSL_get_error looks at it.
long ctandem_tls_read(ctandem_tls *t, void *buf, size_t len) {
    size_t got = 0;
    int rc = SSL_read_ex(t->ssl, buf, len, &got);
    if (rc == 1) return (long)got;
    return classify(t, 0, "TLS read failed");
}

long ctandem_tls_write(ctandem_tls *t, const void *buf, size_t len) {
    size_t put = 0;
    int rc = SSL_write_ex(t->ssl, buf, len, &put);
    if (rc == 1) return (long)put;
    int c = classify(t, 0, "TLS write failed");
    // Writes into a memory BIO never block; WANT here means a renegotiation-like state we refuse.
    return c == CTANDEM_TLS_WANT ? CTANDEM_TLS_ERROR : c;
}

size_t ctandem_tls_pending_out(ctandem_tls *t) { return BIO_ctrl_pending(t->out_window.overflow); }

size_t ctandem_tls_take_out(ctandem_tls *t, void *buf, size_t len) {
    int n = BIO_read(t->out_window.overflow, buf, (int)(len > 0x7fffffff ? 0x7fffffff : len));
    return n > 0 ? (size_t)n : 0;
}

void ctandem_tls_shutdown(ctandem_tls *t) {
    ERR_clear_error();
    SSL_shutdown(t->ssl);
    ERR_clear_error();
}

const char *ctandem_tls_error(ctandem_tls *t) { return t->error; }
const char *ctandem_tls_peer_name(ctandem_tls *t) { return t->peer_name; }
const char *ctandem_tls_version(ctandem_tls *t) { return SSL_get_version(t->ssl); }
