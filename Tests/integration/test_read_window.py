"""The read window: a connection's large READs of cached data wait while 2 MiB of them are read and
not yet answered (NBDConnection.largeReadIsCached). Pipelined clients must still get every reply
right, the requests behind waiting reads must go on, and reads of data the page cache lacks must
not be held to the window (they need their queue depth for the disk)."""

import os
import platform
import random
import re
import struct

import pytest

from conftest import MiB, pattern
from nbdproto import CMD_FLUSH, CMD_READ, CMD_WRITE, REQUEST_MAGIC, RawNBD

SIZE = 64 * MiB
READS = 40


def kernel_has_cachestat():
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    return (major, minor) >= (6, 5)


pytestmark = pytest.mark.skipif(not kernel_has_cachestat(), reason="no cachestat(2) before Linux 6.5: no read window")


def read_counts(srv):
    """(reads, windowed, not cached) summed over the closing lines of the server's connections."""
    total = [0, 0, 0]
    for m in re.finditer(r"after (\d+) reads? \((\d+) windowed, (\d+) large not cached\)", srv.log_text(since_start=True)):
        for i in range(3):
            total[i] += int(m.group(i + 1))
    return tuple(total)


def pipelined(srv, offsets, write_at=None):
    """Sends a 1 MiB READ at each offset, then a 4 KiB WRITE at `write_at` and a FLUSH, all before
    reading any reply; returns {offset: data} and the write's and flush's errors."""
    c = RawNBD(srv.host, srv.port, timeout=60).connect()
    requests = b""
    for i, off in enumerate(offsets):
        requests += _header(CMD_READ, i + 1, off, MiB)
    write_data = pattern(99, 4096)
    if write_at is not None:
        requests += _header(CMD_WRITE, 0x1000, write_at, 4096) + write_data
    requests += _header(CMD_FLUSH, 0x1001, 0, 0)
    c.send(requests)
    lengths = {i + 1: MiB for i in range(len(offsets))}
    got, errors = {}, {}
    for _ in range(len(offsets) + (2 if write_at is not None else 1)):
        r = c.recv_reply(lengths)
        if r["cookie"] in lengths:
            assert r["error"] == 0, f"READ {r['cookie']} failed: {r['error']}"
            got[offsets[r["cookie"] - 1]] = r["data"]
        else:
            errors[r["cookie"]] = r["error"]
    c.disconnect()
    return got, errors, write_data


def _header(cmd, cookie, offset, length):
    """A request header (RawNBD.send_request sends at once; these go out together)."""
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length)


@pytest.mark.parametrize("engine", ["uring", "threads"])
def test_pipelined_cached_reads_are_all_answered_through_the_window(serve, engine):
    data = os.urandom(SIZE)
    backing = serve.backing(SIZE, fill=data)
    srv = serve.start(backing, engine=engine, cache="page")
    backing.read_bytes()  # cached whole
    offsets = [i * MiB for i in range(READS)]
    random.Random(7).shuffle(offsets)
    # 40 MiB of reads, then a write and a flush behind them: the window (2 MiB) holds the reads
    # from the third on until replies go out, and starts each as room comes.
    got, errors, write_data = pipelined(srv, offsets, write_at=60 * MiB)
    for off in offsets:
        assert got[off] == data[off:off + MiB], f"READ at {off} returned wrong data"
    assert errors == {0x1000: 0, 0x1001: 0}
    srv.stop_clean()
    assert backing.read_bytes()[60 * MiB:60 * MiB + 4096] == write_data
    reads, windowed, not_cached = read_counts(srv)
    assert reads == READS
    # All were cached, but the kernel may reclaim a few pages behind our back.
    assert windowed >= READS // 2 and windowed + not_cached == READS, (reads, windowed, not_cached)


def test_reads_the_page_cache_lacks_bypass_the_window(serve):
    data = os.urandom(SIZE)
    backing = serve.backing(SIZE, fill=data)
    srv = serve.start(backing, engine="uring", cache="page")
    fd = os.open(backing, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    # Parsed in one go before any is read: none of these ranges is in the page cache then.
    offsets = [i * MiB for i in range(16)]
    got, errors, _ = pipelined(srv, offsets)
    for off in offsets:
        assert got[off] == data[off:off + MiB], f"READ at {off} returned wrong data"
    assert errors == {0x1001: 0}
    srv.stop_clean()
    reads, windowed, not_cached = read_counts(srv)
    assert reads == 16 and not_cached >= 8, (reads, windowed, not_cached)


def test_direct_io_reads_have_no_window(serve):
    data = os.urandom(SIZE)
    backing = serve.backing(SIZE, fill=data)
    srv = serve.start(backing, engine="uring", cache="direct")
    offsets = [i * MiB for i in range(8)]
    got, errors, _ = pipelined(srv, offsets)
    for off in offsets:
        assert got[off] == data[off:off + MiB]
    srv.stop_clean()
    assert read_counts(srv) == (8, 0, 0)
