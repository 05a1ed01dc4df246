"""Bulk copies with nbdcopy (multi-conn, 64 requests in flight per connection)."""

import os

from conftest import MiB, run

SIZE = 64 * MiB


def make_source(path):
    """64 MiB of random data with a few all-zero stretches (so that nbdcopy
    also sends zero/trim requests, not just writes)."""
    data = bytearray(os.urandom(SIZE))
    for off, length in ((8 * MiB, 4 * MiB), (30 * MiB + 4096, 256 * 1024), (SIZE - MiB, MiB)):
        data[off:off + length] = bytes(length)
    path.write_bytes(data)
    return bytes(data)


def cmp(a, b):
    cp = run(["cmp", a, b], check=False, timeout=60)
    assert cp.returncode == 0, f"{a} and {b} differ: {cp.stdout_text}{cp.stderr_text}"


def test_nbdcopy_roundtrip(serve, engine, tmp_path):
    src = tmp_path / "src.img"
    make_source(src)
    # Pre-fill the export with junk so that the zero stretches must really be zeroed.
    backing = serve.backing(SIZE, fill=b"\xee" * SIZE)
    srv = serve.start(backing, engine=engine)
    run(["nbdcopy", "--flush", src, srv.uri()], timeout=180)
    dst = tmp_path / "dst.img"
    run(["nbdcopy", srv.uri(), dst], timeout=180)
    cmp(src, dst)
    srv.stop_clean()
    cmp(src, backing)


def test_nbdcopy_nbd_to_nbd(serve, tmp_path):
    """Server to server (two exports, two io engines), then back to a file."""
    src = tmp_path / "src.img"
    make_source(src)
    a = serve.start(serve.backing(SIZE), engine="uring")
    b = serve.start(serve.backing(SIZE), engine="threads", cache="page")
    run(["nbdcopy", src, a.uri()], timeout=180)
    run(["nbdcopy", "--flush", a.uri(), b.uri()], timeout=180)
    dst = tmp_path / "dst.img"
    run(["nbdcopy", b.uri(), dst], timeout=180)
    cmp(src, dst)
    b.stop_clean()
    cmp(src, b.backing)
