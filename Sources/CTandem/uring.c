// io_uring through liburing. See ctandem.h for the contract of each function.
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <liburing.h>

#include "ctandem.h"

struct ctandem_ring {
    struct io_uring ring;
    struct io_uring_probe *probe;
    // The kernel raises IORING_SQ_TASKRUN in the shared flags when completions wait as task work
    // for this thread, so a poll can watch memory instead of entering the kernel.
    int taskrun_flag;
};

int ctandem_ring_create(unsigned entries, ctandem_ring **out) {
    ctandem_ring *r = calloc(1, sizeof(*r));
    if (!r) return -ENOMEM;
    struct io_uring_params params;
    memset(&params, 0, sizeof(params));
    // A completion queue four times the submission queue: sockets and disk share the ring, and
    // a full CQ makes the kernel drop completions on older kernels.
    // One thread submits and reaps, so completions can run as deferred task work when that
    // thread waits (6.1+), instead of interrupting it; older kernels get the plain ring.
    static const unsigned tries[] = {
        IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN,
        IORING_SETUP_CQSIZE,
    };
    int rc = -EINVAL;
    for (unsigned i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
        memset(&params, 0, sizeof(params));
        params.flags = tries[i];
        params.cq_entries = entries * 4;
        rc = io_uring_queue_init_params(entries, &r->ring, &params);
        r->taskrun_flag = (tries[i] & IORING_SETUP_TASKRUN_FLAG) != 0;
        if (rc != -EINVAL) break;
    }
    if (rc < 0) {
        free(r);
        return rc;
    }
    // Registering the ring's own descriptor saves a file lookup on every io_uring_enter.
    (void)io_uring_register_ring_fd(&r->ring);
    r->probe = io_uring_get_probe_ring(&r->ring);
    *out = r;
    return 0;
}

void ctandem_ring_destroy(ctandem_ring *r) {
    if (!r) return;
    if (r->probe) io_uring_free_probe(r->probe);
    io_uring_queue_exit(&r->ring);
    free(r);
}

int ctandem_ring_supports(ctandem_ring *r, int op) {
    if (!r->probe) return -EOPNOTSUPP;
    return io_uring_opcode_supported(r->probe, op) ? 1 : 0;
}

int ctandem_ring_supports_op(ctandem_ring *r, int op) {
    static const int map[CTANDEM_OP_COUNT] = {
        [CTANDEM_OP_READ] = IORING_OP_READ,
        [CTANDEM_OP_WRITE] = IORING_OP_WRITE,
        [CTANDEM_OP_FSYNC] = IORING_OP_FSYNC,
        [CTANDEM_OP_FALLOCATE] = IORING_OP_FALLOCATE,
        [CTANDEM_OP_ACCEPT] = IORING_OP_ACCEPT,
        [CTANDEM_OP_RECV] = IORING_OP_RECV,
        [CTANDEM_OP_SEND] = IORING_OP_SEND,
        [CTANDEM_OP_SENDMSG] = IORING_OP_SENDMSG,
        [CTANDEM_OP_POLL] = IORING_OP_POLL_ADD,
        [CTANDEM_OP_READ_FIXED] = IORING_OP_READ_FIXED,
        [CTANDEM_OP_WRITE_FIXED] = IORING_OP_WRITE_FIXED,
    };
    if (op < 0 || op >= CTANDEM_OP_COUNT) return -EINVAL;
    return ctandem_ring_supports(r, map[op]);
}

int ctandem_ring_register_buffers(ctandem_ring *r, const struct iovec *iovecs, unsigned count) {
    return io_uring_register_buffers(&r->ring, iovecs, count);
}

unsigned ctandem_ring_sq_space(ctandem_ring *r) { return io_uring_sq_space_left(&r->ring); }

static inline struct io_uring_sqe *sqe_or_null(ctandem_ring *r) { return io_uring_get_sqe(&r->ring); }

int ctandem_prep_read(ctandem_ring *r, int fd, void *buf, unsigned len, uint64_t offset,
                      int buf_index, int async, uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    if (buf_index >= 0)
        io_uring_prep_read_fixed(sqe, fd, buf, len, offset, buf_index);
    else
        io_uring_prep_read(sqe, fd, buf, len, offset);
    if (async) sqe->flags |= IOSQE_ASYNC;
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_write(ctandem_ring *r, int fd, const void *buf, unsigned len, uint64_t offset,
                       int buf_index, int rw_flags, uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    if (buf_index >= 0)
        io_uring_prep_write_fixed(sqe, fd, buf, len, offset, buf_index);
    else
        io_uring_prep_write(sqe, fd, buf, len, offset);
    sqe->rw_flags = rw_flags;
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_fsync(ctandem_ring *r, int fd, int datasync, uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_fsync(sqe, fd, datasync ? IORING_FSYNC_DATASYNC : 0);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_fallocate(ctandem_ring *r, int fd, int mode, uint64_t offset, uint64_t len,
                           uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_fallocate(sqe, fd, mode, (off_t)offset, (off_t)len);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_accept(ctandem_ring *r, int fd, uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_recv(ctandem_ring *r, int fd, void *buf, unsigned len, int flags,
                      uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_recv(sqe, fd, buf, len, flags);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_sendmsg(ctandem_ring *r, int fd, const struct msghdr *msg, int flags,
                         uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_sendmsg(sqe, fd, msg, (unsigned)flags | MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_connect(ctandem_ring *r, int fd, const struct sockaddr *addr, socklen_t len,
                         uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_connect(sqe, fd, addr, len);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_nop(ctandem_ring *r, uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_poll(ctandem_ring *r, int fd, unsigned poll_mask, uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_poll_add(sqe, fd, poll_mask);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_prep_cancel_fd(ctandem_ring *r, int fd, uint64_t user_data) {
    struct io_uring_sqe *sqe = sqe_or_null(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_cancel_fd(sqe, fd, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ctandem_ring_submit_wait(ctandem_ring *r, unsigned wait_nr, int64_t timeout_ns) {
    for (;;) {
        int rc;
        if (wait_nr == 0) {
            rc = io_uring_submit(&r->ring);
        } else if (timeout_ns < 0) {
            rc = io_uring_submit_and_wait(&r->ring, wait_nr);
        } else {
            struct __kernel_timespec ts = {
                .tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL};
            struct io_uring_cqe *cqe = NULL;
            rc = io_uring_submit_and_wait_timeout(&r->ring, &cqe, wait_nr, &ts, NULL);
        }
        if (rc == -EINTR) continue;
        return rc;
    }
}

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield" ::: "memory")
#else
#define cpu_relax() __asm__ volatile("" ::: "memory")
#endif

static int64_t monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

long ctandem_thread_preemptions(void) {
    struct rusage u;
    if (getrusage(RUSAGE_THREAD, &u) != 0) return 0;
    return u.ru_nivcsw;
}

int64_t ctandem_ring_poll(ctandem_ring *r, unsigned wait_nr, int64_t budget_ns) {
    int rc;
    do {
        rc = io_uring_submit(&r->ring);
    } while (rc == -EINTR);
    if (rc < 0 && rc != -EAGAIN && rc != -EBUSY) return rc;
    int64_t start = monotonic_ns(), now = start;
    // Bounded by the budget: every round reads the clock.
    for (;;) {
        if (io_uring_cq_ready(&r->ring) >= wait_nr) return now - start;
        if (!r->taskrun_flag || (IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_TASKRUN)) {
            // io_uring_enter(GETEVENTS) with nothing to wait for: completions that arrived as
            // task work for this thread are posted, and the call returns at once.
            (void)io_uring_get_events(&r->ring);
            if (io_uring_cq_ready(&r->ring) >= wait_nr) return monotonic_ns() - start;
        } else {
            // Nothing yet: watch the shared flags, yielding the core's pipeline to a sibling
            // hyperthread meanwhile.
            for (int i = 0; i < 32; i++) cpu_relax();
        }
        now = monotonic_ns();
        if (now - start >= budget_ns) return -1;
    }
}

unsigned ctandem_ring_reap(ctandem_ring *r, ctandem_cqe *out, unsigned max) {
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (n == max) break;
        out[n].user_data = cqe->user_data;
        out[n].res = cqe->res;
        out[n].flags = cqe->flags;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return n;
}
