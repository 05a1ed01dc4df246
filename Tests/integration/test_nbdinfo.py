"""What the server advertises, as seen by nbdinfo and by a raw handshake."""

import os

import pytest

from conftest import HOST, MiB, KiB, nbdinfo_json, run
import nbdproto as P

RW_FLAGS = (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM
            | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO | P.TF_SEND_CACHE
            | P.TF_CAN_MULTI_CONN)


def only_export(info):
    exports = info["exports"]
    assert len(exports) == 1, exports
    return exports[0]


@pytest.mark.parametrize("cache,minimum", [("direct", 512), ("page", 1)])
def test_flags_and_block_sizes(serve, cache, minimum):
    size = 48 * MiB
    srv = serve.start(size=size, cache=cache)
    info = nbdinfo_json(srv.uri())
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    assert info["structured"] is True, "structured replies should be negotiated"
    e = only_export(info)
    assert e["export-name"] == "tandem"
    assert e["export-size"] == size
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df",
                 "can_cache", "can_multi_conn"):
        assert e.get(flag) is True, f"{flag} should be true: {e}"
    assert e["is_read_only"] is False
    assert "base:allocation" in e.get("contexts", []), e
    assert e.get("block_size_minimum") == minimum, e
    assert e.get("block_size_preferred") == 4096, e
    assert e.get("block_size_maximum") == 32 * MiB, e


def test_read_only_flags(serve):
    srv = serve.start(size=8 * MiB, read_only=True)
    e = only_export(nbdinfo_json(srv.uri()))
    assert e["is_read_only"] is True
    assert e["can_trim"] is False
    assert e["can_zero"] is False
    assert e["can_fast_zero"] is False
    assert e["can_multi_conn"] is True
    assert e["export-size"] == 8 * MiB
    # the same through the shorthand query interface
    assert run(["nbdinfo", "--is", "readonly", srv.uri()], check=False).returncode == 0
    assert run(["nbdinfo", "--can", "trim", srv.uri()], check=False).returncode == 2


def raw_flags(srv, structured, name="tandem"):
    with P.RawNBD(HOST, srv.port) as c:
        c.handshake()
        if structured:
            c.structured_reply()
        assert c.go(name) == P.REP_ACK
        flags, bs = c.transmission_flags, c.block_size_info()
        c.disconnect()
    return flags, bs


@pytest.mark.parametrize("cache,minimum", [("direct", 512), ("page", 1)])
def test_raw_transmission_flags(serve, cache, minimum):
    srv = serve.start(size=8 * MiB, cache=cache)
    flags, bs = raw_flags(srv, structured=True)
    assert flags == RW_FLAGS | P.TF_SEND_DF, f"flags {flags:#x} != {RW_FLAGS | P.TF_SEND_DF:#x}"
    assert bs == (minimum, 4096, 32 * MiB), f"NBD_INFO_BLOCK_SIZE {bs}"
    # Without structured replies the server MUST NOT advertise SEND_DF.
    flags, _ = raw_flags(srv, structured=False)
    assert flags == RW_FLAGS, f"flags without structured replies {flags:#x} != {RW_FLAGS:#x}"


def test_raw_transmission_flags_read_only(serve):
    srv = serve.start(size=8 * MiB, read_only=True)
    flags, _ = raw_flags(srv, structured=True)
    assert flags & P.TF_HAS_FLAGS
    assert flags & P.TF_READ_ONLY
    assert flags & P.TF_CAN_MULTI_CONN
    for bit, name in ((P.TF_SEND_TRIM, "SEND_TRIM"), (P.TF_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
                      (P.TF_SEND_FAST_ZERO, "SEND_FAST_ZERO")):
        assert not flags & bit, f"{name} must not be set on a read-only export ({flags:#x})"


def test_info_then_go_same_answers(serve):
    srv = serve.start(size=12 * MiB)
    with P.RawNBD(HOST, srv.port) as c:
        c.handshake()
        c.structured_reply()
        assert c.go("tandem", opt=P.OPT_INFO) == P.REP_ACK
        info = (c.export_size, c.transmission_flags, c.block_size_info())
        c.export_size = c.transmission_flags = None
        c.infos.clear()
        assert c.go("tandem") == P.REP_ACK
        assert (c.export_size, c.transmission_flags, c.block_size_info()) == info
        assert c.export_size == 12 * MiB
        # and the connection is usable
        err, data = c.request(P.CMD_READ, 0, 4096)
        assert err == 0 and data == bytes(4096)
        c.disconnect()


def test_list(serve):
    srv = serve.start(size=4 * MiB, description="Tandem test disk")
    info = nbdinfo_json(srv.uri(), "--list")
    names = [e["export-name"] for e in info["exports"]]
    assert names == ["tandem"], names
    assert info["exports"][0].get("description") == "Tandem test disk", info
    # plain-text --list also works
    cp = run(["nbdinfo", "--list", srv.uri()])
    assert "tandem" in cp.stdout_text


def test_list_custom_name(serve):
    srv = serve.start(size=4 * MiB, export_name="disk1")
    info = nbdinfo_json(srv.uri(), "--list")
    assert [e["export-name"] for e in info["exports"]] == ["disk1"]


def test_description(serve):
    srv = serve.start(size=4 * MiB, description="hello from tandem")
    e = only_export(nbdinfo_json(srv.uri()))
    assert e.get("description") == "hello from tandem", e


def test_export_names(serve):
    srv = serve.start(size=4 * MiB)
    for name in ("", "tandem"):
        e = only_export(nbdinfo_json(srv.uri(export=name)))
        assert e["export-size"] == 4 * MiB
    cp = run(["nbdinfo", srv.uri(export="nope")], check=False)
    assert cp.returncode != 0, f"unknown export 'nope' was served:\n{cp.stdout_text}"
    # The server's answer must be NBD_REP_ERR_UNKNOWN, and the client may try again.
    with P.RawNBD(HOST, srv.port) as c:
        c.handshake()
        rtype = c.go("nope")
        assert rtype == P.REP_ERR_UNKNOWN, f"GO unknown export -> {rtype:#x}, want ERR_UNKNOWN"
        assert c.go("") == P.REP_ACK
        assert c.export_size == 4 * MiB
        c.disconnect()
    srv.assert_alive()


def test_custom_export_name(serve):
    srv = serve.start(size=4 * MiB, export_name="disk1")
    only_export(nbdinfo_json(srv.uri(export="disk1")))
    only_export(nbdinfo_json(srv.uri(export="")))
    cp = run(["nbdinfo", srv.uri(export="tandem")], check=False)
    assert cp.returncode != 0, "export 'tandem' must not exist when --export-name disk1"


def test_map_sparse(serve):
    size = 16 * MiB
    backing = serve.backing(size)
    data_ranges = [(1 * MiB, 1 * MiB), (5 * MiB, 64 * KiB), (size - 4 * KiB, 4 * KiB)]
    hole_ranges = [(0, 1 * MiB), (3 * MiB, 2 * MiB), (6 * MiB, 9 * MiB)]
    fd = os.open(backing, os.O_WRONLY)
    try:
        for off, length in data_ranges:
            os.pwrite(fd, b"\xa5" * length, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    srv = serve.start(backing)
    cp = run(["nbdinfo", "--map", "--json", srv.uri()])
    import json
    extents = json.loads(cp.stdout_text)
    # contiguous, covering the whole export
    pos = 0
    for x in extents:
        assert x["offset"] == pos, f"gap/overlap at {pos}: {extents}"
        assert x["length"] > 0
        pos += x["length"]
    assert pos == size, f"map covers {pos} of {size}: {extents}"

    def types_in(off, length):
        return {x["type"] for x in extents
                if x["offset"] < off + length and off < x["offset"] + x["length"]}

    for off, length in data_ranges:
        t = types_in(off, length)
        assert all(ty & 1 == 0 for ty in t), f"written range {off}+{length} reported as hole: {extents}"
    for off, length in hole_ranges:
        t = types_in(off, length)
        assert t == {3}, f"hole {off}+{length} should be hole,zero (type 3), got {t}: {extents}"


def test_block_status_after_write_and_trim(serve):
    """Extents reflect writes/trims made through the server itself."""
    size = 8 * MiB
    srv = serve.start(size=size)
    h = srv.libnbd()
    h.pwrite(b"\x5a" * MiB, 2 * MiB)
    h.flush()

    import nbd
    h2 = nbd.NBD()
    h2.add_meta_context("base:allocation")
    h2.connect_uri(srv.uri())
    assert h2.can_meta_context("base:allocation")

    def status(off, length):
        out = []

        def cb(ctx, offset, entries, err):
            if ctx == "base:allocation":
                out.extend(zip(entries[0::2], entries[1::2]))
            return 0
        h2.block_status(length, off, cb)
        return out

    ents = status(2 * MiB, MiB)
    assert ents and ents[0][1] & 1 == 0, f"written MiB at 2M reported as hole: {ents}"
    covered = 0
    for length, flags in ents:
        if covered >= MiB:
            break
        assert flags & 1 == 0, f"hole inside written range: {ents}"
        covered += length
    ents = status(5 * MiB, MiB)
    assert ents[0][1] == 3, f"never-written range should be hole,zero: {ents}"
    h.trim(MiB, 2 * MiB)
    h.flush()
    assert h.pread(4096, 2 * MiB) == bytes(4096)
    h.shutdown()
    h2.shutdown()


def test_ipv6_loopback(serve):
    srv = serve.start(size=4 * MiB, host="::1")
    e = only_export(nbdinfo_json(srv.uri()))
    assert e["export-size"] == 4 * MiB
    # and only there: nothing listens on the IPv4 loopback at that port
    import socket
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((HOST, srv.port)) != 0, "server also listens on 127.0.0.1"
