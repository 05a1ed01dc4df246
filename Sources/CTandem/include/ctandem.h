// CTandem: the C shim under Tandem's I/O layer.
//
// Swift sees only this header. liburing.h, libaio.h and OpenSSL's headers are included by the .c
// files alone: liburing.h defines _GNU_SOURCE/_XOPEN_SOURCE and would clash with SwiftGlibc, and
// OpenSSL's API is mostly macros. Every function returns a negative errno (or NULL) on failure and
// never aborts; every name carries the ctandem_ prefix.
#ifndef CTANDEM_H
#define CTANDEM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/socket.h>

#include "ctandem_certs.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------------------------------------
// Completions, shared by the io_uring and libaio engines.

typedef struct ctandem_cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
} ctandem_cqe;

// ---------------------------------------------------------------------------------------------
// io_uring (liburing).

typedef struct ctandem_ring ctandem_ring;

/// Creates a ring with `entries` submission entries. Returns 0 or -errno (-ENOSYS where the kernel
/// has no io_uring, -EPERM where `kernel.io_uring_disabled` or seccomp forbids it).
int ctandem_ring_create(unsigned entries, ctandem_ring **out);
void ctandem_ring_destroy(ctandem_ring *ring);
/// 1 when the kernel supports opcode `op` (IORING_OP_*), 0 when not, -errno when probing failed.
int ctandem_ring_supports(ctandem_ring *ring, int op);
/// Opcode numbers, so Swift need not see liburing's enum.
enum {
    CTANDEM_OP_READ = 0, CTANDEM_OP_WRITE, CTANDEM_OP_FSYNC, CTANDEM_OP_FALLOCATE, CTANDEM_OP_ACCEPT,
    CTANDEM_OP_RECV, CTANDEM_OP_SEND, CTANDEM_OP_SENDMSG, CTANDEM_OP_POLL, CTANDEM_OP_READ_FIXED,
    CTANDEM_OP_WRITE_FIXED, CTANDEM_OP_COUNT
};
int ctandem_ring_supports_op(ctandem_ring *ring, int ctandem_op);
int ctandem_ring_register_buffers(ctandem_ring *ring, const struct iovec *iovecs, unsigned count);
/// Free submission entries right now; a prep call fails with -EBUSY when this is 0.
unsigned ctandem_ring_sq_space(ctandem_ring *ring);

// Each prep returns 0, or -EBUSY when the submission queue is full (submit, then retry).
// `buf_index` >= 0 selects a registered buffer (READ_FIXED/WRITE_FIXED). A read with `async`
// set goes to an io-wq worker at once (IOSQE_ASYNC) instead of being tried inline first.
int ctandem_prep_read(ctandem_ring *ring, int fd, void *buf, unsigned len, uint64_t offset,
                      int buf_index, int async, uint64_t user_data);
int ctandem_prep_write(ctandem_ring *ring, int fd, const void *buf, unsigned len, uint64_t offset,
                       int buf_index, int rw_flags, uint64_t user_data);
int ctandem_prep_fsync(ctandem_ring *ring, int fd, int datasync, uint64_t user_data);
int ctandem_prep_fallocate(ctandem_ring *ring, int fd, int mode, uint64_t offset, uint64_t len,
                           uint64_t user_data);
int ctandem_prep_accept(ctandem_ring *ring, int fd, uint64_t user_data);
/// `flags` are MSG_* recv flags (MSG_WAITALL: complete only when `len` bytes arrived or the peer
/// closed).
int ctandem_prep_recv(ctandem_ring *ring, int fd, void *buf, unsigned len, int flags,
                      uint64_t user_data);
int ctandem_prep_sendmsg(ctandem_ring *ring, int fd, const struct msghdr *msg, int flags,
                         uint64_t user_data);
int ctandem_prep_connect(ctandem_ring *ring, int fd, const struct sockaddr *addr, socklen_t len,
                         uint64_t user_data);
int ctandem_prep_poll(ctandem_ring *ring, int fd, unsigned poll_mask, uint64_t user_data);
int ctandem_prep_cancel_fd(ctandem_ring *ring, int fd, uint64_t user_data);
/// IORING_OP_NOP: completes with 0 and does nothing, so timing it measures the ring alone.
int ctandem_prep_nop(ctandem_ring *ring, uint64_t user_data);

/// Submits what is prepared and waits for at least `wait_nr` completions or `timeout_ns`
/// (negative: no timeout). Returns the number submitted or -errno (-ETIME on timeout is not an
/// error for the caller).
int ctandem_ring_submit_wait(ctandem_ring *ring, unsigned wait_nr, int64_t timeout_ns);
/// Submits what is prepared, then polls without sleeping for up to `budget_ns`: each round runs
/// the completions the kernel deferred to this thread (DEFER_TASKRUN) and looks at the
/// completion queue. Returns the nanoseconds spent once `wait_nr` completions are ready, -1
/// when the budget ran out first, or -errno when the submission failed.
int64_t ctandem_ring_poll(ctandem_ring *ring, unsigned wait_nr, int64_t budget_ns);
/// Compares Tandem's AES-GCM (gcm.c, used by the TLS record layer where the CPU has VAES and
/// VPCLMULQDQ) with OpenSSL's over `cases` random keys, nonces, AAD and lengths from `seed`,
/// and checks that tampered input is refused. Returns the failures (the first described in
/// `why`), or -1 when this CPU does not run it.
int ctandem_gcm_check(uint64_t seed, int cases, char *why, size_t why_len);
/// Involuntary context switches of the calling thread so far (getrusage RUSAGE_THREAD).
long ctandem_thread_preemptions(void);
/// Copies up to `max` completions into `out` and marks them seen. Never blocks.
unsigned ctandem_ring_reap(ctandem_ring *ring, ctandem_cqe *out, unsigned max);

// ---------------------------------------------------------------------------------------------
// libaio, for disk reads and writes where io_uring is unavailable.

typedef struct ctandem_aio ctandem_aio;

/// `slots` iocbs are allocated up front; `eventfd` is signalled on each completion.
int ctandem_aio_create(unsigned slots, int eventfd, ctandem_aio **out);
void ctandem_aio_destroy(ctandem_aio *aio);
/// Submits one read (is_write = 0) or write in iocb `slot`; `rw_flags` are RWF_* (RWF_DSYNC).
int ctandem_aio_submit_rw(ctandem_aio *aio, unsigned slot, int is_write, int fd, void *buf,
                          size_t len, uint64_t offset, int rw_flags, uint64_t user_data);
/// Reaps finished events without blocking.
int ctandem_aio_reap(ctandem_aio *aio, ctandem_cqe *out, unsigned max);

// ---------------------------------------------------------------------------------------------
// TLS (OpenSSL) over memory BIOs: the caller moves ciphertext with its own I/O engine.

typedef struct ctandem_tls_ctx ctandem_tls_ctx;
typedef struct ctandem_tls ctandem_tls;

/// The TLS 1.3 suites of TLS 1.3-only contexts (the replication link), most preferred first.
#define CTANDEM_TLS13_SUITES "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

/// A context for servers (`is_server` = 1) or clients. `ca` may be NULL (no peer verification).
/// With a CA, `require_peer_cert` makes a server demand a client certificate. `min_tls13` forbids
/// TLS 1.2. On failure returns NULL and writes a message to `err`.
ctandem_tls_ctx *ctandem_tls_ctx_new(int is_server, const char *cert_file, const char *key_file,
                                     const char *ca_file, int require_peer_cert, int min_tls13,
                                     char *err, size_t err_len);
void ctandem_tls_ctx_free(ctandem_tls_ctx *ctx);
/// Replaces the TLS 1.3 suites (OpenSSL's list syntax). 0 or -1.
int ctandem_tls_ctx_set_suites(ctandem_tls_ctx *ctx, const char *suites);

/// A session. `expected_peer_name` (NULL: any name the CA signed) is checked against the peer
/// certificate's subject alternative names / common name during the handshake.
ctandem_tls *ctandem_tls_new(ctandem_tls_ctx *ctx, const char *expected_peer_name);
void ctandem_tls_free(ctandem_tls *tls);

/// Before the handshake: once it is done, run the TLS 1.3 record layer here instead of in OpenSSL
/// (records sealed straight into the output window and opened straight into the reader's buffer;
/// the same records on the wire). Falls back to OpenSSL's when it cannot (TLS 1.2, other suites).
void ctandem_tls_set_record_offload(ctandem_tls *tls, int on);
/// Whether the record layer runs here (after the handshake).
int ctandem_tls_record_offloaded(ctandem_tls *tls);
/// Send a KeyUpdate after this many records under one key (tests use small numbers).
void ctandem_tls_set_key_update_records(ctandem_tls *tls, uint64_t records);

/// Sends a KeyUpdate now and moves to the next sending key (`request_peer`: the peer updates
/// its key too). 0 or -1.
int ctandem_tls_key_update(ctandem_tls *tls, int request_peer);

/// Result codes of the calls below.
enum { CTANDEM_TLS_OK = 1, CTANDEM_TLS_WANT = 0, CTANDEM_TLS_ERROR = -1, CTANDEM_TLS_CLOSED = -2 };

/// Hands received ciphertext to the session (copied). Returns bytes taken (all of them) or -1.
int ctandem_tls_feed(ctandem_tls *tls, const void *data, size_t len);
/// Hands received ciphertext over without copying it: OpenSSL reads it where it is. The caller
/// keeps `data` unchanged until `ctandem_tls_release_input` (or the next feed), which copies
/// whatever OpenSSL has not read yet. Returns bytes taken (all of them) or -1.
int ctandem_tls_feed_in_place(ctandem_tls *tls, const void *data, size_t len);
/// Copies unread in-place ciphertext into the session, so the caller may reuse its buffer. 0 or -1.
int ctandem_tls_release_input(ctandem_tls *tls);
/// Until closed, ciphertext goes straight into `buf` (up to `capacity`; beyond, into the session's
/// queue that `ctandem_tls_take_out` drains). Closing returns the bytes put into `buf`.
void ctandem_tls_set_output_window(ctandem_tls *tls, void *buf, size_t capacity);
size_t ctandem_tls_close_output_window(ctandem_tls *tls);
/// Advances the handshake: OK when complete, WANT when it needs more ciphertext, ERROR.
int ctandem_tls_handshake(ctandem_tls *tls);
/// Reads plaintext: > 0 bytes read, 0 (WANT) when more ciphertext is needed, CLOSED, ERROR.
long ctandem_tls_read(ctandem_tls *tls, void *buf, size_t len);
/// Encrypts plaintext: bytes taken (> 0) or ERROR.
long ctandem_tls_write(ctandem_tls *tls, const void *buf, size_t len);
/// Ciphertext waiting to be sent (not counting an output window's), and taking it out.
size_t ctandem_tls_pending_out(ctandem_tls *tls);
size_t ctandem_tls_take_out(ctandem_tls *tls, void *buf, size_t len);
/// Sends close_notify (the ciphertext lands in the out queue).
void ctandem_tls_shutdown(ctandem_tls *tls);
/// The last error, in words (certificate verification failures name the reason).
const char *ctandem_tls_error(ctandem_tls *tls);
/// The peer certificate's common name, or "" when there is none. Valid until the session is freed.
const char *ctandem_tls_peer_name(ctandem_tls *tls);
const char *ctandem_tls_version(ctandem_tls *tls);
/// The negotiated cipher suite ("TLS_AES_128_GCM_SHA256"), or "" before the handshake.
const char *ctandem_tls_cipher(ctandem_tls *tls);

// ---------------------------------------------------------------------------------------------
// Small helpers for what Swift cannot import (variadic ioctl, macros).

/// Size in bytes of a block device (BLKGETSIZE64), or -errno.
int64_t ctandem_blockdev_size(int fd);
/// Logical block size of a block device (BLKSSZGET), or -errno.
int ctandem_blockdev_logical_block_size(int fd);
int ctandem_errno(void);
/// fcntl(F_SETFL, O_NONBLOCK) and friends without the variadic signature.
int ctandem_set_nonblocking(int fd, int on);
/// pwritev2/preadv2 with RWF_* flags for one buffer; returns bytes or -errno (EINTR retried).
long ctandem_pwrite_flags(int fd, const void *buf, size_t len, uint64_t offset, int flags);
long ctandem_pread(int fd, void *buf, size_t len, uint64_t offset);
/// fallocate(2); returns 0 or -errno.
int ctandem_fallocate(int fd, int mode, uint64_t offset, uint64_t len);
/// accept4 with SOCK_CLOEXEC (and SOCK_NONBLOCK when asked); returns fd or -errno.
int ctandem_accept(int fd, int nonblocking);
/// connect(2) on a non-blocking socket: 0, -EINPROGRESS, or -errno.
int ctandem_connect(int fd, const struct sockaddr *addr, socklen_t len);
/// The pending error of a socket (SO_ERROR) as -errno, or 0.
int ctandem_socket_error(int fd);
/// An eventfd (non-blocking, close-on-exec) or -errno; signal adds 1, drain reads it to zero.
int ctandem_eventfd(void);
void ctandem_eventfd_signal(int fd);
void ctandem_eventfd_drain(int fd);
/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and threads it starts later) and
/// returns a signalfd for them, or -errno. SIGPIPE is ignored.
int ctandem_signalfd_for_termination(void);
/// Reads one signal from a signalfd: the signal number, 0 when none is pending, or -errno.
int ctandem_signalfd_read(int fd);
/// lseek SEEK_DATA / SEEK_HOLE: offset or -errno (-ENXIO past the last data).
int64_t ctandem_seek_data(int fd, int64_t offset);
int64_t ctandem_seek_hole(int fd, int64_t offset);
/// epoll, which Swift's Glibc module does not carry.
typedef struct ctandem_epoll_event {
    uint32_t events;
    uint64_t data;
} ctandem_epoll_event;
enum { CTANDEM_EPOLLIN = 0x001, CTANDEM_EPOLLOUT = 0x004, CTANDEM_EPOLLERR = 0x008, CTANDEM_EPOLLHUP = 0x010 };
enum { CTANDEM_EPOLL_ADD = 1, CTANDEM_EPOLL_DEL = 2, CTANDEM_EPOLL_MOD = 3 };
int ctandem_epoll_create(void);
/// epoll_ctl: returns 0 or -errno.
int ctandem_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/// epoll_wait: the number of events or -errno (EINTR is returned as 0 events).
int ctandem_epoll_wait(int epfd, ctandem_epoll_event *out, int max, int timeout_ms);
/// Pages of [offset, offset + len) of `fd` in the page cache (cachestat(2), Linux 6.5), or -errno
/// (-ENOSYS on older kernels).
int64_t ctandem_cached_pages(int fd, uint64_t offset, uint64_t len);
/// Flag constants whose headers Swift would otherwise need.
extern const int ctandem_RWF_DSYNC;
extern const int ctandem_FALLOC_FL_PUNCH_HOLE;
extern const int ctandem_FALLOC_FL_KEEP_SIZE;
extern const int ctandem_FALLOC_FL_ZERO_RANGE;
extern const int ctandem_O_DIRECT;

#ifdef __cplusplus
}
#endif
#endif
