"""Malformed, hostile and edge-case traffic, from raw sockets and from libnbd
with strict mode off.  After every case the server must still be running and
must still serve a good client the data it served before (see `healthcheck`)."""

import errno
import os
import socket
import struct
import time

import pytest

from conftest import ENGINES, HOST, KiB, MiB, pattern
import nbdproto as P
from nbdproto import Closed, RawNBD

SIZE = 64 * MiB
RO_SIZE = 8 * MiB
SENTINEL = pattern("sentinel", 64 * KiB)  # lives at offset 0 of every export here


def prime(srv):
    h = srv.libnbd()
    if h.is_read_only():  # the read-only export has the sentinel in its backing file
        h.shutdown()
        return
    h.pwrite(SENTINEL, 0)
    h.flush()
    h.shutdown()


def healthy(srv, size):
    """The server is alive and serves the sentinel to a fresh, well-behaved
    client.  If not, the failure is raised for this test and the server is
    restarted / the sentinel restored, so later cases are judged on their own."""
    if not srv.alive():
        log = srv.log_text()[-8000:]
        rc = srv.proc.poll()
        srv.stopped_at = None
        srv.start()
        prime(srv)
        raise AssertionError(f"tandem serve died (exit {rc}) during this case; restarted it. log:\n{log}")
    h = srv.libnbd()
    try:
        assert h.get_size() == size
        got = h.pread(len(SENTINEL), 0)
    finally:
        h.shutdown()
    if got != SENTINEL:
        prime(srv)
        raise AssertionError("sentinel data at offset 0 was changed by this case (restored it)")
    srv.assert_alive()


@pytest.fixture(scope="module")
def hs(serve_module):
    """Server for handshake-phase cases."""
    srv = serve_module.start(size=SIZE)
    prime(srv)
    return srv


@pytest.fixture(scope="module", params=ENGINES)
def tx(request, serve_module):
    """Server for transmission-phase cases, one per io engine."""
    srv = serve_module.start(size=SIZE, engine=request.param)
    prime(srv)
    return srv


@pytest.fixture(scope="module")
def ro(serve_module):
    backing = serve_module.backing(RO_SIZE, fill=SENTINEL)
    return serve_module.start(backing, read_only=True)


@pytest.fixture(autouse=True)
def healthcheck(request):
    yield
    for name, size in (("hs", SIZE), ("tx", SIZE), ("ro", RO_SIZE)):
        if name in request.fixturenames:
            healthy(request.getfixturevalue(name), size)


def raw(srv, timeout=10.0):
    return RawNBD(HOST, srv.port, timeout=timeout)


def connected(srv, structured=False, name="tandem"):
    return raw(srv).connect(name, structured=structured)


def expect_closed_or_error(c, fn):
    """fn() sends something; returns 'closed' or the reply type/error."""
    try:
        return fn()
    except Closed:
        return "closed"


# ---------------------------------------------------------------------------
# handshake phase


def test_greeting(hs):
    with raw(hs) as c:
        flags = c.read_greeting()
        assert flags & P.FLAG_FIXED_NEWSTYLE and flags & P.FLAG_NO_ZEROES, f"{flags:#x}"
        assert flags & ~3 == 0, f"unknown handshake flags {flags:#x}"


def test_unknown_client_flags_close(hs):
    with raw(hs) as c:
        c.read_greeting()
        c.send_client_flags(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES | (1 << 7))
        c.wait_closed(10)


def test_client_flags_without_fixed_newstyle(hs):
    """Non-fixed newstyle: the server may refuse it; it must not misbehave."""
    with raw(hs) as c:
        c.read_greeting()
        c.send_client_flags(0)
        try:
            c.send_option(P.OPT_GO, c.go_payload("tandem"))
            c.sock.settimeout(5)
            c.sock.recv(4096)
        except (Closed, OSError):
            pass


def test_bad_option_magic_closes(hs):
    with raw(hs) as c:
        c.handshake()
        c.send_option(P.OPT_GO, c.go_payload("tandem"), magic=0x1122334455667788)
        c.wait_closed(10)


def test_unknown_option_then_go(hs):
    with raw(hs) as c:
        c.handshake()
        for opt in (0x4242, 11, 0x7FFFFFFF):  # 11 = EXTENDED_HEADERS, not supported here
            rtype, _ = c.option(opt, b"some payload")
            assert rtype == P.REP_ERR_UNSUP, f"unknown option {opt:#x} -> {rtype:#x}"
        assert c.go("tandem") == P.REP_ACK
        err, data = c.request(P.CMD_READ, 0, 4096)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_option_at_16k_accepted(hs):
    with raw(hs) as c:
        c.handshake()
        rtype, _ = c.option(0x4243, b"x" * 16384)
        assert rtype == P.REP_ERR_UNSUP, f"{rtype:#x}"
        assert c.go("tandem") == P.REP_ACK
        c.disconnect()


@pytest.mark.parametrize("length", [16 * KiB + 1, 1 << 30, 0xFFFFFFFF])
def test_oversized_option_closes(hs, length):
    """The server must close without trying to read the (never sent) payload."""
    with raw(hs) as c:
        c.handshake()
        c.send_option(P.OPT_GO, b"", length=length)
        t0 = time.monotonic()
        c.wait_closed(10)
        assert time.monotonic() - t0 < 10


def test_option_flood_closes(hs):
    with raw(hs) as c:
        c.handshake()
        answered = 0
        closed_at = None
        for i in range(1, 201):
            try:
                rtype, _ = c.option(0x4244)
            except Closed:
                closed_at = i
                break
            if rtype != P.REP_ERR_UNSUP:
                # the server may answer the over-limit option with an error
                # before closing; it must close right after.
                c.wait_closed(10)
                closed_at = i
                break
            answered += 1
        assert closed_at is not None, "server accepted 200 options in one handshake"
        assert answered >= 128, f"server closed after only {answered} options (limit is 128)"
        assert closed_at <= 130, f"server closed only at option {closed_at}"


def test_export_name_too_long(hs):
    with raw(hs) as c:
        c.handshake()
        rtype = expect_closed_or_error(c, lambda: c.go("x" * 5000))
        if rtype == "closed":
            return
        assert rtype & P.REP_FLAG_ERROR, f"GO with a 5000-byte name -> {rtype:#x}"
        assert c.go("tandem") == P.REP_ACK
        c.disconnect()


def test_export_name_4096_is_just_unknown(hs):
    with raw(hs) as c:
        c.handshake()
        assert c.go("y" * 4096) == P.REP_ERR_UNKNOWN
        assert c.go("") == P.REP_ACK
        c.disconnect()


def test_export_name_option_too_long_closes(hs):
    with raw(hs) as c:
        c.handshake()
        c.send_option(P.OPT_EXPORT_NAME, b"z" * 5000)
        c.wait_closed(10)


def test_export_name_option_unknown_closes(hs):
    with raw(hs) as c:
        c.handshake()
        c.send_option(P.OPT_EXPORT_NAME, b"nope")
        c.wait_closed(10)


def test_export_name_option_works(hs):
    """Old-style NBD_OPT_EXPORT_NAME still gets a usable export."""
    for client_flags, tail in ((P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 0), (P.FLAG_FIXED_NEWSTYLE, 124)):
        with raw(hs) as c:
            c.handshake(client_flags)
            c.send_option(P.OPT_EXPORT_NAME, b"tandem")
            size, flags = struct.unpack(">QH", c.recv_exact(10))
            assert size == SIZE and flags & P.TF_HAS_FLAGS
            if tail:
                assert c.recv_exact(tail) == bytes(tail)
            err, data = c.request(P.CMD_READ, 0, 512)
            assert err == 0 and data == SENTINEL[:512]
            c.disconnect()


def test_go_with_truncated_name(hs):
    with raw(hs) as c:
        c.handshake()
        bad = struct.pack(">I", 100) + b"tandem" + struct.pack(">H", 0)
        rtype = expect_closed_or_error(c, lambda: c.option(P.OPT_GO, bad)[0])
        if rtype == "closed":
            return
        assert rtype == P.REP_ERR_INVALID, f"{rtype:#x}"
        assert c.go("tandem") == P.REP_ACK
        c.disconnect()


def test_go_with_unknown_info_request(hs):
    with raw(hs) as c:
        c.handshake()
        assert c.go("tandem", infos=(0x7777, P.INFO_BLOCK_SIZE, 0x1234)) == P.REP_ACK
        assert c.export_size == SIZE
        c.disconnect()


def test_list_with_data_invalid(hs):
    with raw(hs) as c:
        c.handshake()
        rtype, _ = c.option(P.OPT_LIST, b"junk")
        assert rtype == P.REP_ERR_INVALID, f"{rtype:#x}"
        rtype, replies = c.option(P.OPT_LIST)
        assert rtype == P.REP_ACK
        names = [d[4:4 + struct.unpack(">I", d[:4])[0]] for t, d in replies if t == P.REP_SERVER]
        assert names == [b"tandem"], names
        c.disconnect()


def test_structured_reply_with_payload_invalid(hs):
    with raw(hs) as c:
        c.handshake()
        rtype, _ = c.option(P.OPT_STRUCTURED_REPLY, b"x")
        assert rtype == P.REP_ERR_INVALID, f"{rtype:#x}"
        c.structured_reply()
        assert c.go("tandem") == P.REP_ACK
        c.disconnect()


def test_set_meta_context_needs_structured_replies(hs):
    with raw(hs) as c:
        c.handshake()
        ctx = b"base:allocation"
        payload = struct.pack(">I", 6) + b"tandem" + struct.pack(">I", 1) + struct.pack(">I", len(ctx)) + ctx
        rtype, _ = c.option(P.OPT_SET_META_CONTEXT, payload)
        assert rtype & P.REP_FLAG_ERROR, f"SET_META_CONTEXT before STRUCTURED_REPLY -> {rtype:#x}"
        c.structured_reply()
        rtype, replies = c.option(P.OPT_SET_META_CONTEXT, payload)
        assert rtype == P.REP_ACK
        assert [d[4:] for t, d in replies if t == P.REP_META_CONTEXT] == [ctx]
        c.disconnect()


def test_abort(hs):
    with raw(hs) as c:
        c.handshake()
        try:
            rtype, _ = c.option(P.OPT_ABORT)
            assert rtype == P.REP_ACK
        except Closed:
            pass
        c.wait_closed(10)


@pytest.mark.parametrize("cut", ["greeting", "flags", "option-header", "option-payload"])
def test_disconnect_mid_handshake(hs, cut):
    c = raw(hs)
    try:
        if cut == "greeting":
            c.sock.recv(5)
        else:
            c.read_greeting()
            if cut == "flags":
                c.send(b"\x00\x00")
            else:
                c.send_client_flags(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
                if cut == "option-header":
                    c.send(struct.pack(">Q", P.IHAVEOPT) + b"\x00\x00")
                else:
                    c.send_option(P.OPT_GO, c.go_payload("tandem")[:5], length=14)
    finally:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        c.close()
    time.sleep(0.1)


def test_many_idle_connections_then_good_client(hs):
    socks = [raw(hs) for _ in range(16)]
    try:
        healthy(hs, SIZE)  # a good client is not held up by 16 idle handshakes
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------
# transmission phase (simple replies)


def test_bad_request_magic_closes(tx):
    with connected(tx) as c:
        c.send_request(P.CMD_READ, 0, 512, magic=0xDEADBEEF)
        c.wait_closed(10)


def test_unknown_command(tx):
    with connected(tx) as c:
        err, _ = c.request(0x99, 0, 0, cookie=7)
        assert err == P.EINVAL, P.errname(err)
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=8)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_flush_with_length(tx):
    with connected(tx) as c:
        err, _ = c.request(P.CMD_FLUSH, 0, 4096)
        assert err == P.EINVAL, P.errname(err)
        err, _ = c.request(P.CMD_FLUSH, 0, 0, cookie=2)
        assert err == 0
        c.disconnect()


def test_read_too_big(tx):
    with connected(tx) as c:
        c.send_request(P.CMD_READ, 0, 64 * MiB, cookie=3)
        try:
            err, cookie, _ = c.recv_simple_reply(0)
        except Closed:
            return
        assert cookie == 3 and err == P.EINVAL, P.errname(err)
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=4)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_read_max_size_ok(tx):
    with connected(tx) as c:
        err, data = c.request(P.CMD_READ, 0, 32 * MiB)
        assert err == 0 and data[:len(SENTINEL)] == SENTINEL and len(data) == 32 * MiB
        c.disconnect()


@pytest.mark.parametrize("offset,length", [
    (SIZE, 4096), (SIZE - 4096, 8192), (1 << 62, 4096), ((1 << 64) - 4096, 8192)])
def test_read_past_end(tx, offset, length):
    with connected(tx) as c:
        err, _ = c.request(P.CMD_READ, offset, length, cookie=offset & 0xFFFF | 1)
        assert err == P.EINVAL, P.errname(err)
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=9)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


@pytest.mark.parametrize("offset,length", [(SIZE, 4096), (SIZE - 4096, 8192), ((1 << 64) - 4096, 8192)])
def test_write_past_end_consumes_payload(tx, offset, length):
    with connected(tx) as c:
        # payload that would look like a request header if not consumed
        payload = (struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 66, 0, 4096) * (length // 28 + 1))[:length]
        assert len(payload) == length
        err, _ = c.request(P.CMD_WRITE, offset, length, payload=payload, cookie=5)
        if offset + length > 1 << 64:
            assert err in (P.ENOSPC, P.EINVAL), P.errname(err)
        else:
            assert err == P.ENOSPC, P.errname(err)
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=6)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_write_too_big_not_applied(tx):
    """A 33 MiB write at offset 0 is over the limit: an error (payload
    skipped) or a closed connection, but never applied to the sentinel."""
    with connected(tx) as c:
        n = 33 * MiB
        c.send_request(P.CMD_WRITE, 0, n, cookie=11)
        try:
            c.send(b"\xff" * n)
            err, cookie, _ = c.recv_simple_reply(0)
        except (Closed, socket.timeout):
            return
        assert cookie == 11 and err != 0, "33 MiB write (over the 32 MiB limit) succeeded"
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=12)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_write_too_big_from_libnbd_is_refused_and_the_connection_lives(serve):
    """libnbd sends a 33 MiB write whole (a client may ignore the advertised maximum): the
    error comes after the payload, and the same connection goes on. Answered before the
    payload was read, libnbd found no request for the reply's cookie and dropped the link."""
    import nbd
    srv = serve.start(size=64 * MiB, cache="page")
    h = srv.libnbd()
    for n in (33 * MiB, 48 * MiB):
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"\xab" * n, 0)
        assert e.value.errnum == errno.EINVAL, e.value
    h.pwrite(b"\xcd" * MiB, 0)
    assert h.pread(MiB, 0) == b"\xcd" * MiB
    h.shutdown()


@pytest.mark.parametrize("cmd", [P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_CACHE])
def test_other_commands_past_end(tx, cmd):
    with connected(tx) as c:
        err, _ = c.request(cmd, SIZE - 4096, 8192)
        if cmd == P.CMD_WRITE_ZEROES:
            assert err in (P.ENOSPC, P.EINVAL), P.errname(err)
        else:
            assert err == P.EINVAL, P.errname(err)
        c.disconnect()


def test_unknown_command_flags(tx):
    with connected(tx) as c:
        err, _ = c.request(P.CMD_READ, 0, 4096, flags=1 << 12, cookie=21)
        assert err == P.EINVAL, P.errname(err)
        payload = b"\x01" * 4096
        err, _ = c.request(P.CMD_WRITE, MiB, 4096, flags=1 << 13, payload=payload, cookie=22)
        assert err == P.EINVAL, P.errname(err)
        err, _ = c.request(P.CMD_FLUSH, 0, 0, flags=1 << 14, cookie=23)
        assert err == P.EINVAL, P.errname(err)
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=24)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_block_status_without_meta_context(tx):
    with connected(tx) as c:
        err, _ = c.request(P.CMD_BLOCK_STATUS, 0, 4096)
        assert err == P.EINVAL, P.errname(err)
        c.disconnect()


@pytest.mark.parametrize("offset,length", [(100, 512), (0, 100), (512, 1000), (4095, 4097)])
def test_unaligned_direct_rejected(tx, offset, length):
    with connected(tx) as c:
        err, _ = c.request(P.CMD_READ, offset, length, cookie=31)
        assert err == P.EINVAL, f"unaligned read {offset}+{length} in direct mode -> {P.errname(err)}"
        err, _ = c.request(P.CMD_WRITE, MiB + offset, length, payload=b"\x02" * length, cookie=32)
        assert err == P.EINVAL, f"unaligned write {offset}+{length} in direct mode -> {P.errname(err)}"
        err, data = c.request(P.CMD_READ, MiB, 4096, cookie=33)
        assert err == 0 and b"\x02" not in data, "rejected unaligned write changed the data"
        c.disconnect()


def test_unaligned_page_cache_ok(serve):
    srv = serve.start(size=4 * MiB, cache="page")
    with connected(srv) as c:
        payload = os.urandom(1000)
        err, _ = c.request(P.CMD_WRITE, 12345, len(payload), payload=payload)
        assert err == 0
        err, data = c.request(P.CMD_READ, 12340, 1010, cookie=2)
        assert err == 0 and data[5:1005] == payload and data[:5] == bytes(5)
        c.disconnect()


def test_zero_length_requests_survive(tx):
    with connected(tx) as c:
        for i, cmd in enumerate((P.CMD_READ, P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES)):
            try:
                c.request(cmd, 0, 0, cookie=40 + i)
            except Closed:
                return
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=50)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_disc_closes(tx):
    with connected(tx) as c:
        c.send_request(P.CMD_DISC, cookie=99)
        c.wait_closed(10)


def test_pipelined_requests_beyond_in_flight_limit(tx):
    """512 reads sent back to back without reading replies (the server caps
    in-flight requests at 128 and must apply back-pressure, not fail)."""
    with connected(tx) as c:
        n = 512
        reqs = b"".join(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, 1000 + i,
                                    (i % 16) * 4096, 4096) for i in range(n))
        c.send(reqs)
        seen = set()
        for _ in range(n):  # a failure here raises Closed/timeout with the count in `seen`
            err, cookie, data = c.recv_simple_reply(4096)
            assert err == 0, P.errname(err)
            assert 1000 <= cookie < 1000 + n and cookie not in seen, f"bad/duplicate cookie {cookie}"
            seen.add(cookie)
            i = cookie - 1000
            off = (i % 16) * 4096
            assert data == SENTINEL[off:off + 4096], f"wrong data for cookie {cookie}"
        c.disconnect()


def test_pipelined_writes_then_reads(tx):
    with connected(tx) as c:
        base = 4 * MiB
        n = 300
        blocks = [pattern(f"pw{i}", 4096) for i in range(n)]
        c.send(b"".join(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, i, base + i * 4096, 4096)
                        + blocks[i] for i in range(n)))
        got = set()
        try:
            for _ in range(n):
                err, cookie, _ = c.recv_simple_reply()
                assert err == 0, P.errname(err)
                assert cookie < n and cookie not in got, f"bad/duplicate cookie {cookie}"
                got.add(cookie)
            for i in range(0, n, 37):
                err, data = c.request(P.CMD_READ, base + i * 4096, 4096, cookie=10000 + i)
                assert err == 0 and data == blocks[i], f"block {i} reads back wrong"
        except (Closed, socket.timeout) as e:
            raise AssertionError(f"{n} pipelined 4 KiB writes: connection failed after {len(got)} "
                                 f"replies: {e!r}") from None
        c.disconnect()


@pytest.mark.parametrize("cut", ["header", "payload", "unread-replies"])
def test_disconnect_mid_request(tx, cut):
    c = connected(tx)
    try:
        if cut == "header":
            c.send(struct.pack(">IHHQ", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1))
        elif cut == "payload":
            c.send_request(P.CMD_WRITE, 2 * MiB, MiB, cookie=2)
            c.send(b"\x03" * (100 * KiB))
        else:
            c.send(b"".join(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, i, 0, 64 * KiB)
                            for i in range(128)))
            time.sleep(0.05)
    finally:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    time.sleep(0.2)


# ---------------------------------------------------------------------------
# structured replies


def test_structured_read_error_is_structured(tx):
    with connected(tx, structured=True) as c:
        c.send_request(P.CMD_READ, SIZE, 4096, cookie=77)
        r = c.recv_reply({77: 4096})
        assert r["kind"] == "structured", "READ error sent as a simple reply after STRUCTURED_REPLY"
        assert r["cookie"] == 77 and r["error"] == P.EINVAL, r
        assert any(t in (P.RT_ERROR, P.RT_ERROR_OFFSET) for t, _ in r["chunks"])
        err, data = c.request(P.CMD_READ, 0, 64 * KiB, cookie=78)
        assert err == 0 and data == SENTINEL
        c.disconnect()


def test_structured_read_df_single_chunk(tx):
    with connected(tx, structured=True) as c:
        # 0..64K is data, 64K.. is (probably) a hole: DF forbids fragmenting
        c.send_request(P.CMD_READ, 0, MiB, flags=P.CMD_FLAG_DF, cookie=80)
        r = c.recv_reply()
        assert r["error"] == 0
        content = [t for t, _ in r["chunks"] if t in (P.RT_OFFSET_DATA, P.RT_OFFSET_HOLE)]
        assert len(content) == 1, f"DF read came in {len(content)} content chunks"
        data = c.assemble_read(0, MiB, r["chunks"])
        assert data[:len(SENTINEL)] == SENTINEL
        c.disconnect()


def libnbd_errno(fn):
    import nbd
    try:
        fn()
    except nbd.Error as e:
        return e.errnum
    return 0


def test_libnbd_out_of_bounds(tx):
    import errno
    import nbd
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.add_meta_context("base:allocation")
    h.connect_uri(tx.uri())
    try:
        assert libnbd_errno(lambda: h.pread(4096, SIZE)) == errno.EINVAL
        assert libnbd_errno(lambda: h.pread(8192, SIZE - 4096)) == errno.EINVAL
        assert libnbd_errno(lambda: h.pwrite(b"\x04" * 4096, SIZE)) == errno.ENOSPC
        assert libnbd_errno(lambda: h.trim(4096, SIZE)) == errno.EINVAL
        assert libnbd_errno(lambda: h.zero(4096, SIZE)) in (errno.ENOSPC, errno.EINVAL)
        assert libnbd_errno(lambda: h.block_status(4096, SIZE, lambda *a: 0)) == errno.EINVAL
        assert libnbd_errno(lambda: h.cache(4096, SIZE)) == errno.EINVAL
        # unaligned in direct mode
        assert libnbd_errno(lambda: h.pread(100, 7)) == errno.EINVAL
        # and the connection is still good
        assert h.pread(len(SENTINEL), 0) == SENTINEL
    finally:
        h.shutdown()


def test_block_status_req_one(tx):
    import nbd
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(tx.uri())
    try:
        out = []

        def cb(ctx, offset, entries, err):
            out.append((ctx, list(entries)))
            return 0
        h.block_status(SIZE, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        assert len(out) == 1 and out[0][0] == "base:allocation"
        assert len(out[0][1]) == 2, f"REQ_ONE returned {len(out[0][1]) // 2} extents"
        length, flags = out[0][1]
        assert 0 < length <= SIZE and flags & 1 == 0, "offset 0 holds data"
    finally:
        h.shutdown()


# ---------------------------------------------------------------------------
# read-only export


def test_read_only_rejects_writes(ro):
    with connected(ro) as c:
        assert c.transmission_flags & P.TF_READ_ONLY
        err, _ = c.request(P.CMD_WRITE, 0, 4096, payload=b"\x05" * 4096, cookie=1)
        assert err == P.EPERM, P.errname(err)
        err, _ = c.request(P.CMD_TRIM, 0, 4096, cookie=2)
        assert err == P.EPERM, P.errname(err)
        err, _ = c.request(P.CMD_WRITE_ZEROES, 0, 4096, cookie=3)
        assert err == P.EPERM, P.errname(err)
        err, _ = c.request(P.CMD_WRITE, 0, 4096, flags=P.CMD_FLAG_FUA, payload=b"\x05" * 4096, cookie=4)
        assert err == P.EPERM, P.errname(err)
        err, data = c.request(P.CMD_READ, 0, 4096, cookie=5)
        assert err == 0 and data == SENTINEL[:4096]
        c.disconnect()


def test_read_only_libnbd(ro):
    import errno
    import nbd
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(ro.uri())
    try:
        assert h.is_read_only()
        assert libnbd_errno(lambda: h.pwrite(b"\x06" * 4096, 0)) == errno.EPERM
        assert libnbd_errno(lambda: h.zero(4096, 0)) == errno.EPERM
        assert h.pread(4096, 0) == SENTINEL[:4096]
    finally:
        h.shutdown()


# ---------------------------------------------------------------------------
# seeded fuzz over the wire


def fuzzed_session(rng):
    """Client flags, a few options, usually GO or EXPORT_NAME, then request headers (writes with
    their payloads), with one to three mutations: a flipped bit, an overwritten byte, a field set
    to an extreme, a cut, random bytes inserted, a part repeated. Half the sessions mutate only
    what follows the handshake, so that many reach the transmission phase."""
    def option(code, data=b""):
        return struct.pack(">QII", P.IHAVEOPT, code, len(data)) + data

    name = rng.choice([b"", b"tandem", b"tandem", b"other", b"x" * 300])
    queries = [b"", b"base:", b"base:allocation", b"qemu:", b"qemu:dirty-bitmap:", b"qemu:dirty-bitmap:x", b"odd:thing"]

    def meta():
        chosen = [rng.choice(queries) for _ in range(rng.randint(0, 3))]
        return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(chosen))
                + b"".join(struct.pack(">I", len(q)) + q for q in chosen))

    def name_infos():
        infos = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)

    out = struct.pack(">I", rng.choice([3, 3, 3, 3, 3, 1, 2]))
    for _ in range(rng.randint(0, 5)):
        out += rng.choice([
            lambda: option(P.OPT_LIST), lambda: option(P.OPT_STRUCTURED_REPLY), lambda: option(P.OPT_STRUCTURED_REPLY),
            lambda: option(P.OPT_SET_META_CONTEXT, meta()), lambda: option(P.OPT_LIST_META_CONTEXT, meta()),
            lambda: option(P.OPT_INFO, name_infos()), lambda: option(P.OPT_STARTTLS),
            lambda: option(rng.randint(11, 40)),
        ])()
    out += rng.choice([lambda: option(P.OPT_GO, name_infos())] * 3 + [lambda: option(P.OPT_EXPORT_NAME, name), lambda: b""])()
    handshake = len(out)
    for _ in range(rng.randint(0, 6)):
        cmd = rng.choice([P.CMD_READ, P.CMD_READ, P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_FLUSH,
                          P.CMD_CACHE, P.CMD_BLOCK_STATUS, P.CMD_DISC, 9])
        length = rng.choice([4096, 512, 0, 1 << 20, RO_SIZE])
        offset = rng.choice([0, 4096, RO_SIZE - 4096, RO_SIZE, 1 << 62])
        out += struct.pack(">IHHQQI", P.REQUEST_MAGIC, rng.choice([0, 0, P.CMD_FLAG_FUA, 0x1F]), cmd, rng.getrandbits(64), offset, length)
        if cmd == P.CMD_WRITE and length <= 1 << 20:
            out += bytes([rng.randint(0, 255)]) * length
    b = bytearray(out)
    lo = 0 if rng.random() < 0.5 else handshake
    for _ in range(rng.randint(1, 3)):
        if len(b) <= lo:
            break
        at = rng.randrange(lo, len(b))
        kind = rng.randrange(6)
        if kind == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[at] = rng.randrange(256)
        elif kind == 2:
            width = min(rng.choice([1, 2, 4, 8]), len(b) - at)
            b[at:at + width] = bytes([rng.choice([0, 0xFF, 0x7F])]) * width
        elif kind == 3:
            del b[at:]
        elif kind == 4:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        else:
            end = rng.randrange(at, len(b) + 1)
            b[end:end] = b[at:end]
    return bytes(b)


def test_mutated_sessions_leave_the_server_serving_and_the_data_intact(ro):
    """400 mutated sessions from a fixed seed, each on its own connection, sent whole (sometimes
    in small pieces) with the write side then shut: the server answers or closes every one, stays
    up, serves a good client after each fifty, and the read-only export's data is unchanged
    (the healthcheck after the test reads the sentinel again)."""
    import random
    rng = random.Random(0x7A4D_F022)
    answered = closed_by_server = 0
    for i in range(400):
        data = fuzzed_session(rng)
        s = socket.create_connection((HOST, ro.port), timeout=10)
        try:
            greeting = b""
            while len(greeting) < 18:
                chunk = s.recv(18 - len(greeting))
                assert chunk, f"session {i}: closed before the greeting"
                greeting += chunk
            assert struct.unpack(">QQH", greeting)[:2] == (P.NBDMAGIC, P.IHAVEOPT)
            try:
                if i % 4 == 0:
                    for at in range(0, len(data), 7):
                        s.send(data[at:at + 7])
                else:
                    s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server closed first (EPIPE, ECONNRESET, ENOTCONN): what it read was enough to refuse
            got = 0
            while True:
                try:
                    chunk = s.recv(1 << 20)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed_by_server += 1
                    break
                got += len(chunk)
            answered += got > 0
        finally:
            s.close()
        if i % 50 == 49:
            healthy(ro, RO_SIZE)
    # Every session ended with the server closing the connection (the recv loop above only ends
    # there, or on the 10 s timeout, which fails the test), and most got some answer first.
    assert closed_by_server == 400
    assert answered > 100, answered
    assert "fatal" not in ro.log_text().lower()


def test_an_export_name_cannot_forge_a_log_line(hs):
    """EXPORT_NAME with a newline, a fake log line and a terminal escape: the server closes the
    connection and logs the name escaped, on its own line."""
    name = b"evil\n2026-11-27T00:00:00+0000 critical forged\x1b[31m"
    s = socket.create_connection((HOST, hs.port), timeout=10)
    try:
        s.recv(18)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
        assert s.recv(100) == b""
    finally:
        s.close()
    deadline = time.monotonic() + 10
    while "unknown export" not in hs.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = hs.log_text()
    assert 'unknown export "evil\\n2026-11-27T00:00:00+0000 critical forged\\u{1B}[31m"' in log, log[-2000:]
    assert not any(line.startswith("2026-11-27T00:00:00+0000 critical") for line in log.splitlines())
    assert "\x1b" not in log
