// Small helpers for what Swift cannot import directly (variadic ioctl/fcntl, some macros).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <pthread.h>

#include "ctandem.h"

int64_t ctandem_blockdev_size(int fd) {
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) return -errno;
    return (int64_t)size;
}

int ctandem_blockdev_logical_block_size(int fd) {
    int size = 0;
    if (ioctl(fd, BLKSSZGET, &size) < 0) return -errno;
    return size;
}

int ctandem_errno(void) { return errno; }

int ctandem_set_nonblocking(int fd, int on) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -errno;
    flags = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
    if (fcntl(fd, F_SETFL, flags) < 0) return -errno;
    return 0;
}

// Declared here: Debian 12's kernel headers predate cachestat (451 on every architecture).
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct ctandem_cachestat_range { uint64_t off, len; };
struct ctandem_cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

int64_t ctandem_cached_pages(int fd, uint64_t offset, uint64_t len) {
    struct ctandem_cachestat_range range = { offset, len };
    struct ctandem_cachestat cs;
    if (syscall(__NR_cachestat, fd, &range, &cs, 0) < 0) return -errno;
    return (int64_t)cs.nr_cache;
}

const int ctandem_RWF_DSYNC = RWF_DSYNC;
const int ctandem_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int ctandem_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int ctandem_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const int ctandem_O_DIRECT = O_DIRECT;

#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

long ctandem_pwrite_flags(int fd, const void *buf, size_t len, uint64_t offset, int flags) {
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    for (;;) {
        ssize_t n = pwritev2(fd, &iov, 1, (off_t)offset, flags);
        if (n >= 0) return (long)n;
        if (errno != EINTR) return -errno;
    }
}

long ctandem_pread(int fd, void *buf, size_t len, uint64_t offset) {
    for (;;) {
        ssize_t n = pread(fd, buf, len, (off_t)offset);
        if (n >= 0) return (long)n;
        if (errno != EINTR) return -errno;
    }
}

int ctandem_fallocate(int fd, int mode, uint64_t offset, uint64_t len) {
    for (;;) {
        if (fallocate(fd, mode, (off_t)offset, (off_t)len) == 0) return 0;
        if (errno != EINTR) return -errno;
    }
}

int ctandem_accept(int fd, int nonblocking) {
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0));
        if (c >= 0) return c;
        if (errno != EINTR) return -errno;
    }
}

int ctandem_eventfd(void) {
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

void ctandem_eventfd_signal(int fd) {
    uint64_t one = 1;
    while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
}

void ctandem_eventfd_drain(int fd) {
    uint64_t value;
    while (read(fd, &value, sizeof(value)) < 0 && errno == EINTR) {
    }
}

int ctandem_signalfd_for_termination(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -EINVAL;
    signal(SIGPIPE, SIG_IGN);
    int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ctandem_signalfd_read(int fd) {
    struct signalfd_siginfo info;
    for (;;) {
        ssize_t n = read(fd, &info, sizeof(info));
        if (n == (ssize_t)sizeof(info)) return (int)info.ssi_signo;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return 0;
        return n < 0 ? -errno : -EIO;
    }
}

int64_t ctandem_seek_data(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_DATA);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t ctandem_seek_hole(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_HOLE);
    return r < 0 ? -errno : (int64_t)r;
}

#include <sys/epoll.h>

int ctandem_epoll_create(void) {
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ctandem_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = {.events = events, .data.u64 = data};
    return epoll_ctl(epfd, op, fd, &ev) == 0 ? 0 : -errno;
}

int ctandem_epoll_wait(int epfd, ctandem_epoll_event *out, int max, int timeout_ms) {
    struct epoll_event evs[256];
    if (max > 256) max = 256;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) {
        out[i].events = evs[i].events;
        out[i].data = evs[i].data.u64;
    }
    return n;
}

int ctandem_connect(int fd, const struct sockaddr *addr, socklen_t len) {
    for (;;) {
        if (connect(fd, addr, len) == 0) return 0;
        if (errno == EINTR) continue;
        return -errno;
    }
}

int ctandem_socket_error(int fd) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return -errno;
    return -err;
}
