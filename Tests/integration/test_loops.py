"""`tandem serve --loops N`: connections spread over N event loops (threads), each with its own
ring; one file, one connection limit, one clean stop."""

import re
import time

import nbd
import pytest

from conftest import MiB, KiB, TANDEM_BIN, pattern, run, run_workers


def loops_of(srv, clients):
    """{client address: loop} from the server's "attached to export" lines (`loop=` metadata)."""
    found = {}
    deadline = time.monotonic() + 10
    while True:
        for line in srv.log_text(since_start=True).splitlines():
            if "attached to export" not in line:
                continue
            m = re.search(r"client=(\S+).*\bloop=(\d+)", line)
            assert m, f"no loop= in a multi-loop server's line: {line}"
            found[m.group(1)] = int(m.group(2))
        if len(found) >= clients or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_clients_spread_over_every_loop_and_share_one_file(serve, engine):
    srv = serve.start(size=32 * MiB, engine=engine, extra=["--loops", "3"])
    assert "3 loops" in srv.log_text(since_start=True)
    handles = [srv.libnbd() for _ in range(3)]
    loops = loops_of(srv, 3)
    assert sorted(loops.values()) == [0, 1, 2], f"3 clients on 3 loops should take one each: {loops}"
    a, b, c = handles
    # A write on one loop, a flush on another, a read on the third: one file underneath.
    data = pattern("loops", 2 * MiB + 8 * KiB)
    a.pwrite(data, 3 * MiB)
    b.flush()
    assert c.pread(len(data), 3 * MiB) == data
    with open(srv.backing, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(len(data)) == data, "a flush on another loop did not cover the write"
    c.zero(MiB, 3 * MiB)
    assert a.pread(MiB, 3 * MiB) == bytes(MiB)
    # A client that leaves frees its loop's place: the next one goes there.
    b.shutdown()
    left = None
    deadline = time.monotonic() + 10
    while left is None:
        m = re.search(r"client=(\S+).*\bloop=(\d+).*NBD client \S+ disconnected", srv.log_text(since_start=True))
        if m:
            left = int(m.group(2))
        else:
            assert time.monotonic() < deadline, "the server did not log the client that left"
            time.sleep(0.05)
    # Its place is given back when its connection has finished closing, a moment after that
    # line: of two new clients, one goes to the freed loop whichever comes first.
    d, e = srv.libnbd(), srv.libnbd()
    later = loops_of(srv, 5)
    new = [later[addr] for addr in later if addr not in loops]
    assert left in new, f"after loop {left}'s client left, neither new client went there: {later}"
    assert d.pread(4096, 3 * MiB + MiB) == data[MiB:MiB + 4096]
    for h in (a, c, d, e):
        h.shutdown()


def test_concurrent_writers_on_several_loops(serve):
    """4 clients from 4 threads on 2 loops, random writes of their own regions, then every
    client reads every region back through its own loop."""
    size = 32 * MiB
    srv = serve.start(size=size, extra=["--loops", "2"], cache="page")
    shadows = [dict() for _ in range(4)]

    def worker(k):
        h = srv.libnbd()
        base = k * (size // 4)
        for i in range(200):
            off = base + (i * 7919 % ((size // 4) // (16 * KiB))) * 16 * KiB
            d = pattern(f"w{k}.{i}", 16 * KiB)
            h.pwrite(d, off, nbd.CMD_FLAG_FUA if i % 50 == 0 else 0)
            shadows[k][off] = d
        h.flush()
        h.shutdown()

    run_workers(worker, 4, timeout=120)
    loops = loops_of(srv, 4)
    assert sorted(loops.values()) == [0, 0, 1, 1], f"4 clients on 2 loops: {loops}"
    readers = [srv.libnbd() for _ in range(2)]
    for r in readers:
        for shadow in shadows:
            for off, d in shadow.items():
                assert r.pread(len(d), off) == d, f"offset {off}"
        r.shutdown()


def test_a_loop_that_runs_out_of_buffers_resumes(serve):
    """One client takes every 1 MiB buffer of its loop's share of the pool; a second client on
    that loop, with nothing in flight, waits for a buffer and must be woken when one comes back,
    on every loop, not only the listening one (the other loops' servers once had no handler id
    there, and such a waiter slept for good)."""
    srv = serve.start(size=64 * MiB, extra=["--loops", "2"], cache="page")
    # The fewest-connections rule alternates: 0, 1, 0, 1.
    handles = [srv.libnbd() for _ in range(4)]
    assert sorted(loops_of(srv, 4).values()) == [0, 0, 1, 1]
    data = pattern("buffers", 48 * MiB)
    for off in range(0, len(data), 16 * MiB):
        handles[0].pwrite(data[off:off + 16 * MiB], off)
    reads = []
    for hog, waiter in ((handles[0], handles[2]), (handles[1], handles[3])):
        for i in range(48):
            buf = nbd.Buffer(MiB)
            reads.append((hog, hog.aio_pread(buf, i * MiB), buf, i * MiB))
        time.sleep(0.2)  # the hog's reads take the buffers first
        buf = nbd.Buffer(MiB)
        reads.append((waiter, waiter.aio_pread(buf, 5 * MiB), buf, 5 * MiB))
    deadline = time.monotonic() + 30
    for h in handles:
        while h.aio_in_flight() > 0:
            assert time.monotonic() < deadline, (
                f"{[x.aio_in_flight() for x in handles]} reads in flight per client after 30 s: a loop stalled")
            h.poll(100)
    for h, cookie, buf, off in reads:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == data[off:off + MiB], f"offset {off}"
    for h in handles:
        h.shutdown()


def test_max_connections_counts_every_loop(serve):
    srv = serve.start(size=4 * MiB, extra=["--loops", "2", "--max-connections", "3"])
    held = [srv.libnbd() for _ in range(3)]
    assert not srv.one_more_served(), "a fourth client was served with --max-connections 3 over 2 loops"
    assert "3 connections already" in srv.log_text(since_start=True)
    # A client refused over and over does not flood the log: one line a minute at most.
    assert not any(srv.one_more_served() for _ in range(20))
    assert srv.log_text(since_start=True).count("connections already") == 1
    held.pop().shutdown()
    srv.served_again("no client served after one of three left")
    for h in held:
        h.shutdown()


def test_stop_drains_every_loop(serve):
    """SIGTERM with clients on both loops, writes in flight on each: every acknowledged write
    is in the file, and the server exits 0."""
    srv = serve.start(size=16 * MiB, extra=["--loops", "2"])
    handles = [srv.libnbd() for _ in range(2)]
    assert sorted(loops_of(srv, 2).values()) == [0, 1]
    sent = []
    for k, h in enumerate(handles):
        for i in range(16):
            d = pattern(f"s{k}.{i}", 64 * KiB)
            off = (k * 16 + i) * 64 * KiB
            sent.append((h, h.aio_pwrite(d, off), off, d))
    srv.stop_clean()
    for h, cookie, off, d in sent:
        while True:
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error:
                break  # answered with an error (ESHUTDOWN) or the connection closed: not acked
            if done:
                with open(srv.backing, "rb") as f:
                    f.seek(off)
                    assert f.read(len(d)) == d, f"acknowledged write at {off} not in the file"
                break
            try:
                h.poll(100)
            except nbd.Error:
                break
    assert "stopped" in srv.log_text(since_start=True)


def test_tls_on_every_loop(serve, certs_dir):
    """Every loop runs its own TLS sessions from the one context."""
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir, extra=["--loops", "2"])
    handles = [srv.libnbd_tls(certs_dir) for _ in range(2)]
    assert sorted(loops_of(srv, 2).values()) == [0, 1]
    for k, h in enumerate(handles):
        d = pattern(f"tls{k}", MiB + 4096)
        h.pwrite(d, k * 2 * MiB)
        h.flush()
        other = handles[1 - k]
        assert other.pread(len(d), k * 2 * MiB) == d
    for h in handles:
        h.shutdown()


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_loops_share_one_pool_size(serve):
    """The loops divide the buffer pool among them: four loops pin about what one does (the
    registered classes, 22 MiB, are pinned at start; each loop pinning its own would add
    66 MiB)."""
    one = serve.start(size=4 * MiB, extra=["--loops", "1"])
    four = serve.start(size=4 * MiB, extra=["--loops", "4"])
    for srv in (one, four):
        h = srv.libnbd()
        h.pread(4096, 0)
        h.shutdown()
    grown = rss_bytes(four.proc.pid) - rss_bytes(one.proc.pid)
    assert grown < 24 * MiB, f"--loops 4 holds {grown} bytes more than --loops 1"


@pytest.mark.parametrize("value", ["0", "17", "two"])
def test_loops_out_of_range_is_refused(tmp_path, value):
    backing = tmp_path / "d.img"
    backing.write_bytes(bytes(MiB))
    r = run([TANDEM_BIN, "serve", backing, "--loops", value], check=False, timeout=30)
    assert r.returncode != 0
    err = r.stderr_text + r.stdout_text
    assert "--loops" in err, err
