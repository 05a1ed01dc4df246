"""A peer that passes TLS with a valid certificate and then sends well-formed frames with values
a real node never sends: ids past 2^63, ranges past the end of the device, data the node is in
no state to take. Each is a protocol error: the link drops with a clear log line, the node keeps
serving, holds no buffer for it and writes nothing."""

import os
import ssl
import re
import urllib.request

import peerwire as W
from conftest import TANDEM_BIN, free_port, make_backing, run
from nodes import NodeProcesses
from test_replication import SIZE, make_pair, pair, qemu_io, status  # noqa: F401 (fixtures)


def replication_buffers(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(float(re.search(r"^tandem_replication_buffers\{[^}]*\} (\S+)$", text, re.M).group(1)))


def test_a_peer_frame_with_a_huge_id_is_a_protocol_error_on_the_primary(pair, tmp_path):
    pair.up("alpha", "--primary")
    text = pair.wait_for("alpha", r"listening for beta on 127.0.0.1:(\d+)")
    port = int(re.search(r"listening for beta on 127.0.0.1:(\d+)", text).group(1))
    qemu_io(pair.uri, "write -P 0x5a 0 64k")
    for id_ in (1 << 63, (1 << 64) - 1):
        s = W.dial(port, tmp_path / "pki", "beta")
        type_, _, hello = W.read_frame(s)
        assert type_ == W.HELLO
        # After a hello: before one, any frame is refused for its order alone.
        s.sendall(W.hello_as(hello, 1) + W.verify_digest(id_))
        # The id was converted to an Int before it was checked: 2^63 and up trapped.
        assert W.until_closed(s), "the node drops the link"
        assert pair.procs["alpha"].poll() is None, pair.log("alpha")
    pair.wait_for("alpha", rf"link to beta down: protocol error: unexpected verifyDigest {1 << 63}")
    qemu_io(pair.uri, "read -P 0x5a 0 64k", "write -P 0x5b 64k 64k", "flush", "read -P 0x5b 64k 64k")
    assert status(pair, "alpha")["role"] == "Primary"


def test_hostile_frames_to_the_secondary_are_protocol_errors_and_leak_nothing(pair, tmp_path):
    metrics = free_port()
    text = pair.resource.read_text()
    meta = f'metadata = "{tmp_path}/beta.meta"\n'
    text = text.replace(meta, meta + f'metrics = "127.0.0.1:{metrics}"\n')
    pair.resource.write_text(text)
    alpha_port = int(re.search(r'name = "alpha"\nid = 0\naddress = "127.0.0.1:(\d+)"', text).group(1))
    # This test plays alpha: beta dials it (the higher id dials).
    alpha = W.Listener(alpha_port, tmp_path / "pki", "alpha")
    try:
        pair.up("beta")
        cases = [
            # Not a resync target: the payload's buffer was kept under the id and leaked.
            (W.resync_data(7, 0, os.urandom(4096)), r"resync data outside a resync"),
            # The id was an Int key before anything checked it: 2^63 trapped.
            (W.resync_data(1 << 63, 0, os.urandom(4096)), r"resync data outside a resync"),
            # Past the end of the device: the backing file grew (a block device would have failed
            # the write and detached the disk). Large enough to be received into its own buffer.
            (W.data(1, SIZE - 4096, os.urandom(128 * 1024)), r"past the end of the device"),
            (W.data(2, SIZE, os.urandom(4096)), r"past the end of the device"),
        ]
        for frame, reason in cases:
            since = pair.mark("beta")
            s = _accept_with_hello(alpha)
            s.sendall(frame)
            assert W.until_closed(s), f"the node drops the link ({reason})"
            assert pair.procs["beta"].poll() is None, pair.log("beta")
            pair.wait_for("beta", rf"dropping the link: protocolError\(.*{reason}", since=since)
            assert replication_buffers(metrics) == 0, f"the refused payload's buffer went back to the pool ({reason})"
    finally:
        alpha.close()
    assert (tmp_path / "beta.img").stat().st_size == SIZE, "nothing was written past the device"
    _real_primary_still_replicates(pair, tmp_path)


def _beta_with_alpha_played(pair, tmp_path):
    """Starts beta as secondary; the test plays alpha (beta dials it: the higher id dials)."""
    text = pair.resource.read_text()
    alpha_port = int(re.search(r'name = "alpha"\nid = 0\naddress = "127.0.0.1:(\d+)"', text).group(1))
    alpha = W.Listener(alpha_port, tmp_path / "pki", "alpha")
    pair.up("beta")
    return alpha


def _accept_with_hello(alpha):
    s = alpha.accept()
    type_, _, hello = W.read_frame(s)
    assert type_ == W.HELLO
    s.sendall(W.hello_as(hello, 0))
    return s


def _real_primary_still_replicates(pair, tmp_path):
    """beta is still a working secondary: the real primary connects and replicates."""
    st = status(pair, "beta")
    assert st["role"] == "Secondary" and st["disk"] != "Failed", st
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    qemu_io(pair.uri, "write -P 0x71 1M 1M", "flush")
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_frames_before_hello_and_a_second_hello_are_protocol_errors(pair, tmp_path):
    """peer.md "Frame order": they were acted on (a write before any generation was compared)."""
    alpha = _beta_with_alpha_played(pair, tmp_path)
    try:
        cases = [
            (lambda hello: W.trim(1, 0, 4096), r"protocol error: trim before hello"),
            (lambda hello: W.hello_as(hello, 0) + W.hello_as(hello, 0), r"protocol error: a second hello on the same link"),
        ]
        for make, reason in cases:
            since = pair.mark("beta")
            s = alpha.accept()
            type_, _, hello = W.read_frame(s)
            assert type_ == W.HELLO
            s.sendall(make(hello))
            assert W.until_closed(s), f"the node drops the link ({reason})"
            assert pair.procs["beta"].poll() is None, pair.log("beta")
            pair.wait_for("beta", rf"link to alpha down: {reason}", since=since)
    finally:
        alpha.close()
    _real_primary_still_replicates(pair, tmp_path)


def test_a_burst_of_flushes_is_answered_under_back_pressure(pair, tmp_path):
    """More flushes than the node has operation slots (8,192): it trapped in `submitNow`. Now it
    stops reading at Limits.peerRequestsPendingMax and answers every one."""
    alpha = _beta_with_alpha_played(pair, tmp_path)
    count = 9000
    try:
        s = _accept_with_hello(alpha)
        s.sendall(W.trim(1 << 40, 0, 4096) + b"".join(W.flush(i) for i in range(count)))
        acks = set()
        s.settimeout(60)
        while len(acks) < count:
            try:
                type_, seq, payload = W.read_frame(s)
            except ConnectionError:
                assert pair.procs["beta"].poll() is None, pair.log("beta")[-3000:]
                raise
            if type_ == W.FLUSH_ACK:
                assert payload[:4] == b"\0\0\0\0" or len(payload) == 0, payload
                acks.add(seq)
        assert acks == set(range(count))
        assert pair.procs["beta"].poll() is None, pair.log("beta")
        s.close()
    finally:
        alpha.close()
    _real_primary_still_replicates(pair, tmp_path)


def test_a_peer_that_never_reads_is_dropped_not_fatal(pair, tmp_path):
    """Pings from a peer that never reads fill the send queue with answers: it trapped there."""
    alpha = _beta_with_alpha_played(pair, tmp_path)
    since = pair.mark("beta")
    try:
        s = _accept_with_hello(alpha)
        chunk = W.ping(7) * 20000
        closed = False
        for _ in range(200):
            try:
                s.sendall(chunk)
            except (ConnectionError, ssl.SSLError, OSError):
                closed = True
                break
            if pair.procs["beta"].poll() is not None:
                break
        assert pair.procs["beta"].poll() is None, pair.log("beta")
        assert closed, "the node closed the link"
        pair.wait_for("beta", r"link to alpha down: protocol error: send queue full", since=since)
    finally:
        alpha.close()
    _real_primary_still_replicates(pair, tmp_path)


class _WitnessAlone(NodeProcesses):
    """A witness of a loopback resource, run alone: the test dials it as a data node."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.procs, self.logs = {}, {}
        run([TANDEM_BIN, "certs", "--dir", str(tmp_path / "pki"), "--node", "alpha", "--node", "beta", "--node", "witness"])
        self.port = free_port()
        text = f'resource = "r0"\n\n[tls]\nca = "{tmp_path}/pki/ca-cert.pem"\n'
        for i, name in enumerate(("alpha", "beta", "witness")):
            port = self.port if name == "witness" else free_port()
            text += (f'\n[[node]]\nname = "{name}"\nid = {i}\naddress = "127.0.0.1:{port}"\n'
                     f'control = "{tmp_path}/{name}.sock"\ncert = "{tmp_path}/pki/{name}-cert.pem"\n'
                     f'key = "{tmp_path}/pki/{name}-key.pem"\n')
            if name == "witness":
                text += 'role = "witness"\n'
            else:
                make_backing(tmp_path / f"{name}.img", SIZE)
                text += f'device = "{tmp_path}/{name}.img"\nmetadata = "{tmp_path}/{name}.meta"\nnbd = "127.0.0.1:{free_port()}"\n'
        self.resource = tmp_path / "r0.toml"
        self.resource.write_text(text)


def test_a_witness_refuses_frames_out_of_order_or_of_the_wrong_kind(tmp_path):
    """A witness acted on pings before the hello and ignored replication frames: now each is a
    protocol error (peer.md 11.1), and the witness goes on serving."""
    w = _WitnessAlone(tmp_path)
    w.start("witness", ())
    try:
        w.wait_for("witness", r"witness .*listening|listening")
        cases = [
            (lambda hello: W.ping(1), r'dropped a link from "alpha" before its hello: protocol error: ping before hello'),
            (lambda hello: W.trim(1, 0, 4096), r'dropped a link from "alpha" before its hello: protocol error: trim frame on a witness link'),
            (lambda hello: W.hello_as(hello, 0) + W.data(1, 0, b"\x5a" * 4096), r"lost alpha: protocol error: data frame on a witness link"),
            (lambda hello: W.hello_as(hello, 0) + W.hello_as(hello, 0), r'lost alpha: protocol error: a second hello from "alpha"'),
        ]
        for make, reason in cases:
            since = w.mark("witness")
            s = W.dial(w.port, tmp_path / "pki", "alpha")
            type_, _, hello = W.read_frame(s)
            assert type_ == W.HELLO
            s.sendall(make(hello))
            assert W.until_closed(s), f"the witness drops the link ({reason})"
            assert w.procs["witness"].poll() is None, w.log("witness")
            w.wait_for("witness", reason, since=since)
        # Still a witness: a proper hello and a ping are answered.
        s = W.dial(w.port, tmp_path / "pki", "alpha")
        _, _, hello = W.read_frame(s)
        s.sendall(W.hello_as(hello, 0) + W.ping(7))
        type_, sequence, _ = W.read_frame(s)
        assert (type_, sequence) == (W.PING_ACK, 7)
        s.close()
    finally:
        for p in w.procs.values():
            p.kill()
            p.wait()
