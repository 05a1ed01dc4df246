"""Multi-connection consistency (CAN_MULTI_CONN) and many requests in flight."""

import os
import random
import threading
import time

import nbd
import pytest

from conftest import MiB, KiB, pattern


def test_write_a_flush_b_read_c(serve, engine):
    backing = serve.backing(32 * MiB)
    srv = serve.start(backing, engine=engine)
    a, b, c = srv.libnbd(), srv.libnbd(), srv.libnbd()
    for h in (a, b, c):
        assert h.can_multi_conn()
    data = pattern("abc", 3 * MiB + 4096)
    a.pwrite(data, 5 * MiB)
    b.flush()
    assert c.pread(len(data), 5 * MiB) == data
    # after B's flush the data is in the backing file itself
    with open(backing, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(data)) == data, "flush on another connection did not cover A's write"
    # FUA on A: visible on B and in the file without any flush
    d2 = pattern("fua", 64 * KiB)
    a.pwrite(d2, 20 * MiB, nbd.CMD_FLAG_FUA)
    assert b.pread(len(d2), 20 * MiB) == d2
    with open(backing, "rb") as f:
        f.seek(20 * MiB)
        assert f.read(len(d2)) == d2
    # zero on C is seen by A
    c.zero(MiB, 5 * MiB)
    assert a.pread(MiB, 5 * MiB) == bytes(MiB)
    assert a.pread(4096, 6 * MiB) == data[MiB:MiB + 4096]
    for h in (a, b, c):
        h.shutdown()


def run_aio(h, submit):
    """submit() issues commands; wait (bounded) for all of them and return
    the completion order."""
    order = []
    cookies = submit(order)
    deadline = time.monotonic() + 60
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, (
            f"{h.aio_in_flight()} of {len(cookies)} requests still in flight after 60s (server stalled)")
        h.poll(1000)
    for ck in cookies:
        assert h.aio_command_completed(ck), f"command {ck} not completed"
    return order


@pytest.mark.parametrize("depth", [64, 256])
def test_many_in_flight(serve, engine, depth):
    """`depth` writes of mixed sizes in flight on one connection, then as many
    reads; 256 exceeds the server's 128-per-connection limit, which must only
    slow things down."""
    size = 64 * MiB
    srv = serve.start(size=size, engine=engine)
    h = srv.libnbd()
    rng = random.Random(depth)
    slot = size // depth
    choices = [n for n in (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB) if n <= slot]
    sizes = [rng.choice(choices) for _ in range(depth)]
    offsets = [i * slot for i in range(depth)]
    datas = [pattern(f"io{depth}-{i}", sizes[i]) for i in range(depth)]
    wbufs = [nbd.Buffer.from_bytearray(bytearray(d)) for d in datas]

    def submit_writes(order):
        return [h.aio_pwrite(wbufs[i], offsets[i],
                             completion=lambda *a, i=i: (order.append(i), 0)[1])
                for i in range(depth)]
    worder = run_aio(h, submit_writes)
    assert sorted(worder) == list(range(depth))

    rbufs = [nbd.Buffer(sizes[i]) for i in range(depth)]

    def submit_reads(order):
        return [h.aio_pread(rbufs[i], offsets[i],
                            completion=lambda *a, i=i: (order.append(i), 0)[1])
                for i in range(depth)]
    rorder = run_aio(h, submit_reads)
    assert sorted(rorder) == list(range(depth))
    for i in range(depth):
        assert rbufs[i].to_bytearray() == datas[i], f"read {i} at {offsets[i]} returned wrong data"
    h.shutdown()


def test_concurrent_connections_disjoint_regions(serve, engine):
    """4 connections from 4 threads, random writes and read-back checks."""
    size = 64 * MiB
    srv = serve.start(size=size, engine=engine)
    errors = []

    def worker(k):
        try:
            h = srv.libnbd()
            rng = random.Random(k)
            base = k * (size // 4)
            shadow = {}
            for it in range(150):
                blk = rng.randrange(0, (size // 4) // (64 * KiB))
                off = base + blk * 64 * KiB
                if rng.random() < 0.6:
                    d = os.urandom(rng.choice([4, 8, 16, 64]) * KiB)
                    h.pwrite(d, off, nbd.CMD_FLAG_FUA if it % 10 == 0 else 0)
                    shadow[off] = d + shadow.get(off, b"")[len(d):]
                elif off in shadow:
                    d = shadow[off]
                    got = h.pread(len(d), off)
                    assert got == d, f"worker {k}: stale/wrong data at {off}"
            h.flush()
            for off, d in shadow.items():
                assert h.pread(len(d), off) == d, f"worker {k}: final check at {off}"
            h.shutdown()
        except BaseException as e:  # reported below
            errors.append(f"worker {k}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
        assert not t.is_alive(), "worker thread hung"
    assert not errors, errors


def test_read_your_writes_across_connections_interleaved(serve):
    """Writes on one connection are visible to reads on another as soon as the
    write is acknowledged (same backing file), repeatedly."""
    srv = serve.start(size=8 * MiB, cache="page")
    a, b = srv.libnbd(), srv.libnbd()
    for i in range(200):
        d = pattern(f"ryw{i}", 4096)
        off = (i % 64) * 4096
        a.pwrite(d, off)
        assert b.pread(4096, off) == d, f"iteration {i}"
        a, b = b, a
    a.shutdown()
    b.shutdown()
