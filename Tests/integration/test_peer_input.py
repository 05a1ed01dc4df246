"""A peer that passes TLS with a valid certificate and then sends well-formed frames with values
a real node never sends: ids past 2^63, ranges past the end of the device, data the node is in
no state to take. Each is a protocol error: the link drops with a clear log line, the node keeps
serving, holds no buffer for it and writes nothing."""

import os
import re
import urllib.request

import peerwire as W
from conftest import free_port
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
        s.sendall(W.verify_digest(id_))
        # The id was converted to an Int before it was checked: 2^63 and up trapped.
        assert W.until_closed(s), "the node drops the link"
        assert pair.procs["alpha"].poll() is None, pair.log("alpha")
    # Logged once: the same failure again (no hello ever came) is logged at debug level.
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
            s = alpha.accept()
            assert W.read_frame(s)[0] == W.HELLO
            s.sendall(frame)
            assert W.until_closed(s), f"the node drops the link ({reason})"
            assert pair.procs["beta"].poll() is None, pair.log("beta")
            pair.wait_for("beta", rf"dropping the link: protocolError\(.*{reason}", since=since)
            assert replication_buffers(metrics) == 0, f"the refused payload's buffer went back to the pool ({reason})"
    finally:
        alpha.close()
    assert (tmp_path / "beta.img").stat().st_size == SIZE, "nothing was written past the device"
    st = status(pair, "beta")
    assert st["role"] == "Secondary" and st["disk"] != "Failed", st
    # The real primary still connects, and replication works.
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    qemu_io(pair.uri, "write -P 0x71 1M 1M", "flush")
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()
