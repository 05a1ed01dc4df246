// libaio for disk reads and writes where io_uring is unavailable. See ctandem.h.
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <libaio.h>

#include "ctandem.h"

struct ctandem_aio {
    io_context_t ctx;
    unsigned slots;
    int eventfd;
    struct iocb *iocbs;
    struct io_event *events;
};

int ctandem_aio_create(unsigned slots, int eventfd, ctandem_aio **out) {
    ctandem_aio *a = calloc(1, sizeof(*a));
    if (!a) return -ENOMEM;
    a->iocbs = calloc(slots, sizeof(struct iocb));
    a->events = calloc(slots, sizeof(struct io_event));
    if (!a->iocbs || !a->events) {
        free(a->iocbs);
        free(a->events);
        free(a);
        return -ENOMEM;
    }
    int rc = io_setup((int)slots, &a->ctx);
    if (rc < 0) {
        free(a->iocbs);
        free(a->events);
        free(a);
        return rc;
    }
    a->slots = slots;
    a->eventfd = eventfd;
    *out = a;
    return 0;
}

void ctandem_aio_destroy(ctandem_aio *a) {
    if (!a) return;
    io_destroy(a->ctx);
    free(a->iocbs);
    free(a->events);
    free(a);
}

int ctandem_aio_submit_rw(ctandem_aio *a, unsigned slot, int is_write, int fd, void *buf,
                          size_t len, uint64_t offset, int rw_flags, uint64_t user_data) {
    if (slot >= a->slots) return -EINVAL;
    struct iocb *cb = &a->iocbs[slot];
    if (is_write)
        io_prep_pwrite(cb, fd, buf, len, (long long)offset);
    else
        io_prep_pread(cb, fd, buf, len, (long long)offset);
    cb->aio_rw_flags = rw_flags;
    io_set_eventfd(cb, a->eventfd);
    cb->data = (void *)(uintptr_t)user_data;
    struct iocb *list[1] = {cb};
    for (;;) {
        int rc = io_submit(a->ctx, 1, list);
        if (rc == 1) return 0;
        if (rc == -EINTR) continue;
        return rc < 0 ? rc : -EAGAIN;
    }
}

int ctandem_aio_reap(ctandem_aio *a, ctandem_cqe *out, unsigned max) {
    if (max > a->slots) max = a->slots;
    struct timespec zero = {0, 0};
    for (;;) {
        int n = io_getevents(a->ctx, 0, (long)max, a->events, &zero);
        if (n == -EINTR) continue;
        if (n < 0) return n;
        for (int i = 0; i < n; i++) {
            out[i].user_data = (uint64_t)(uintptr_t)a->events[i].data;
            // res holds bytes or -errno; res2 is unused by file I/O.
            out[i].res = (int32_t)(long)a->events[i].res;
            out[i].flags = 0;
        }
        return n;
    }
}
