"""qemu's NBD client (qemu-io) against every io engine: pattern writes, zeroes,
discard, FUA, flush; then the backing file must match a model of what was written."""

import pytest

from conftest import MiB, KiB, run

SIZE = 16 * MiB


def qemu_io(uri, *cmds, timeout=120, expect_ok=True, opts=()):
    argv = ["qemu-io", "-f", "raw", *opts]
    for c in cmds:
        argv += ["-c", c]
    argv.append(uri)
    cp = run(argv, timeout=timeout, check=False)
    out = cp.stdout_text + cp.stderr_text
    if expect_ok:
        bad = [l for l in out.splitlines()
               if "failed" in l.lower() or "error" in l.lower() or "verification" in l.lower()]
        assert cp.returncode == 0 and not bad, (
            f"qemu-io exit {cp.returncode}; commands {list(cmds)}\n{out}")
    return cp.returncode, out


class Model:
    def __init__(self, size):
        self.buf = bytearray(size)

    def write(self, off, data):
        self.buf[off:off + len(data)] = data

    def fill(self, off, length, byte):
        self.buf[off:off + length] = bytes([byte]) * length


def assert_backing_equals(path, model):
    data = path.read_bytes()
    assert len(data) == len(model.buf), f"backing file size changed: {len(data)}"
    if data != bytes(model.buf):
        first = next(i for i in range(len(data)) if data[i] != model.buf[i])
        raise AssertionError(f"backing file differs from what was written, first at offset {first}: "
                             f"{data[first:first + 16].hex()} vs expected {bytes(model.buf[first:first + 16]).hex()}")


@pytest.mark.parametrize("cache", ["direct", "page"])
def test_qemu_io_operations(serve, engine, cache):
    backing = serve.backing(SIZE)
    srv = serve.start(backing, engine=engine, cache=cache)
    uri = srv.uri()
    m = Model(SIZE)

    # 1. pattern write/read
    qemu_io(uri, "write -P 0xab 0 1M", "read -P 0xab 0 1M")
    m.fill(0, MiB, 0xAB)
    # a read with the wrong pattern must fail: the check is real
    rc, out = qemu_io(uri, "read -P 0xcd 0 4k", expect_ok=False)
    assert "Pattern verification failed" in out, out

    # 2. write zeroes over part of a pattern
    qemu_io(uri, "write -P 0xcd 1M 1M", "write -z 1M 512k",
            "read -P 0 1M 512k", "read -P 0xcd 1536k 512k")
    m.fill(MiB, MiB, 0xCD)
    m.fill(MiB, 512 * KiB, 0)

    # 3. write zeroes, unmap allowed (NBD_CMD_WRITE_ZEROES without NO_HOLE)
    qemu_io(uri, "write -P 0x11 2M 1M", "write -z -u 2M 1M", "read -P 0 2M 1M")
    m.fill(2 * MiB, MiB, 0)

    # 4. discard (trim): reads back as zeroes on this server
    qemu_io(uri, "write -P 0x22 3M 1M", "discard 3M 1M", "read -P 0 3M 1M")
    m.fill(3 * MiB, MiB, 0)

    # 5. FUA writes and flush
    qemu_io(uri, "write -f -P 0x33 4M 64k", "write -f -P 0x34 5M 4k", "flush",
            "read -P 0x33 4M 64k", "read -P 0x34 5M 4k")
    m.fill(4 * MiB, 64 * KiB, 0x33)
    m.fill(5 * MiB, 4 * KiB, 0x34)

    # 6. zeroes with FUA, unaligned ranges within the pattern
    qemu_io(uri, "write -P 0x44 6M 64k", "write -z -f 6M 8k", "read -P 0 6M 8k",
            "read -P 0x44 6152k 56k")
    m.fill(6 * MiB, 64 * KiB, 0x44)
    m.fill(6 * MiB, 8 * KiB, 0)

    # 7. sub-block I/O: qemu honours the advertised minimum block size
    #    (read-modify-write at 512 with --cache direct, byte granular with page)
    qemu_io(uri, "write -P 0x55 7M 4k", "write -P 0x66 7340132 7", "read -P 0x66 7340132 7",
            "read -P 0x55 7M 100", "read -P 0x55 7340139 3989")
    m.fill(7 * MiB, 4 * KiB, 0x55)
    m.fill(7 * MiB + 100, 7, 0x66)

    # 8. fast zero (NBD_CMD_FLAG_FAST_ZERO): either done, or refused quickly
    #    with ENOTSUP leaving the data alone.
    qemu_io(uri, "write -P 0x77 8M 1M")
    m.fill(8 * MiB, MiB, 0x77)
    rc, out = qemu_io(uri, "write -z -n 8M 1M", expect_ok=False)
    if rc == 0 and "failed" not in out:
        qemu_io(uri, "read -P 0 8M 1M")
        m.fill(8 * MiB, MiB, 0)
    else:
        assert "Operation not supported" in out, f"fast zero failed unexpectedly:\n{out}"
        qemu_io(uri, "read -P 0x77 8M 1M")

    # 9. the rest of the disk is still zero; the written areas are still intact
    qemu_io(uri, "read -P 0 9M 7M", "read -P 0xab 0 1M", "read -P 0 1M 512k",
            "read -P 0xcd 1536k 512k", "read -P 0 2M 2M")

    srv.stop_clean()
    assert_backing_equals(backing, m)


def test_qemu_io_read_only(serve):
    backing = serve.backing(SIZE, fill=b"\x99" * MiB)
    srv = serve.start(backing, read_only=True)
    qemu_io(srv.uri(), "read -P 0x99 0 1M", "read -P 0 1M 1M", opts=["-r"])
    # qemu refuses to open a read-only export read-write
    rc, out = qemu_io(srv.uri(), "write -P 0x01 0 4k", expect_ok=False)
    assert rc != 0 and "Permission denied" in out, out
    srv.stop_clean()
    assert backing.read_bytes()[:MiB] == b"\x99" * MiB
