"""A replicated pair on loopback (`tandem up`): writes reach both disks, a killed secondary is
resynced with only what changed, and peers that cannot prove who they are get nothing."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import MiB, TANDEM_BIN, free_port, make_backing, run
from nodes import NodeProcesses
from nbdproto import CMD_WRITE, RawNBD

SIZE = 64 * MiB


class Pair(NodeProcesses):
    def __init__(self, tmp_path, tuning="", size=SIZE):
        self.dir = tmp_path
        run([TANDEM_BIN, "certs", "--dir", str(tmp_path / "pki"), "--node", "alpha", "--node", "beta"])
        self.nbd_port = free_port()
        ports = [free_port(), free_port()]
        text = f'resource = "r0"\n\n[tls]\nca = "{tmp_path}/pki/ca-cert.pem"\n\n[tuning]\nconnect-retry-ms = 100\n{tuning}'
        for i, name in enumerate(("alpha", "beta")):
            make_backing(tmp_path / f"{name}.img", size)
            text += (f'\n[[node]]\nname = "{name}"\nid = {i}\naddress = "127.0.0.1:{ports[i]}"\n'
                     f'device = "{tmp_path}/{name}.img"\nmetadata = "{tmp_path}/{name}.meta"\n'
                     f'nbd = "127.0.0.1:{self.nbd_port if i == 0 else free_port()}"\ncontrol = "{tmp_path}/{name}.sock"\n'
                     f'cert = "{tmp_path}/pki/{name}-cert.pem"\nkey = "{tmp_path}/pki/{name}-key.pem"\n')
        self.resource = tmp_path / "r0.toml"
        self.resource.write_text(text)
        for name in ("alpha", "beta"):
            run([TANDEM_BIN, "init", str(self.resource), "--node", name])
        self.procs = {}
        self.logs = {}

    def up(self, name, *extra):
        return self.start(name, extra)

    def wait_in_sync(self, since=0):
        self.wait_for("alpha", r"link connected, established, 0 bytes out of sync", since=since)
        if "beta" in self.procs:
            # The secondary too: it may still be adopting the generation or finishing a resync.
            self.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync")

    @property
    def uri(self):
        return f"nbd://127.0.0.1:{self.nbd_port}/r0"

    def stop(self, name, sig=signal.SIGTERM):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.send_signal(sig)
            try:
                return p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise AssertionError(f"{name} did not stop:\n{self.log(name)}")

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name, signal.SIGKILL)


@pytest.fixture
def make_pair(tmp_path):
    """Makes a pair (with extra [tuning] lines); every process is killed at teardown."""
    made = []

    def make(tuning="", size=SIZE):
        made.append(Pair(tmp_path, tuning, size))
        return made[-1]

    yield make
    for p in made:
        p.stop_all()


@pytest.fixture
def pair(make_pair):
    return make_pair()


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw", uri]
    for c in cmds:
        args += ["-c", c]
    cp = run(args, check=False, timeout=120)
    assert cp.returncode == 0 and "error" not in (cp.stdout_text + cp.stderr_text).lower(), cp.stdout_text + cp.stderr_text


def test_writes_reach_both_disks(pair, tmp_path):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_for("alpha", "connected to beta: skipInitialSync")
    pair.wait_in_sync()
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(16 * MiB))
    run(["nbdcopy", "--flush", str(data), pair.uri], timeout=120)
    qemu_io(pair.uri, "write -P 0x3c 40M 1M", "write -z 41M 1M", "discard 42M 1M", "write -f -P 0x3d 43M 64k", "flush")
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    a = (tmp_path / "alpha.img").read_bytes()
    b = (tmp_path / "beta.img").read_bytes()
    assert a[:16 * MiB] == data.read_bytes()
    assert a == b, "the secondary's disk equals the primary's"


def test_killed_secondary_resyncs_only_what_changed(pair, tmp_path):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    qemu_io(pair.uri, "write -P 0x11 0 8M", "flush")
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down")
    # The primary keeps serving alone; what it writes now is out of sync.
    qemu_io(pair.uri, "write -P 0x22 20M 3M", "write -P 0x23 50M 1M", "flush")
    since = pair.mark("alpha")
    pair.up("beta")
    text = pair.wait_for("alpha", r"syncSource, (\d+) bytes out of sync", since=since)
    moved = int(re.findall(r"syncSource, (\d+) bytes out of sync", text)[-1])
    assert 4 * MiB <= moved <= 4 * MiB + 64 * 4096, f"resync should move about the 4 MiB written alone, moved {moved}"
    pair.wait_in_sync(since=since)
    pair.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes", since=0)
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_a_bitmap_of_many_scattered_blocks_crosses_the_link(make_pair, tmp_path):
    """12,000 dirty blocks 1.5 MiB apart make 12,000 bitmap chunks, more than the link queue's
    items: the primary once crashed on such a reconnect."""
    pair = make_pair(size=18 * 1024 * MiB)  # sparse
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down")
    blocks = 12000
    stride = 6 * 64 * 4096
    import nbd
    h = nbd.NBD()
    h.connect_uri(pair.uri)
    for i in range(blocks):
        h.pwrite(bytes([i % 251 + 1]) * 4096, i * stride)
    h.flush()
    h.shutdown()
    since = pair.mark("alpha")
    pair.up("beta")
    text = pair.wait_for("alpha", r"syncSource, (\d+) bytes out of sync", since=since)
    moved = int(re.findall(r"syncSource, (\d+) bytes out of sync", text)[-1])
    assert moved >= blocks * 4096, f"every block written alone is resynced, moved {moved}"
    pair.wait_in_sync(since=since)
    with open(tmp_path / "beta.img", "rb") as f:
        for i in range(0, blocks, 997):
            f.seek(i * stride)
            assert f.read(4096) == bytes([i % 251 + 1]) * 4096, f"block {i} reached the secondary"


def test_peer_with_a_certificate_from_another_ca_is_refused(pair, tmp_path):
    # beta presents a certificate from a CA alpha does not trust.
    run([TANDEM_BIN, "certs", "--dir", str(tmp_path / "evil"), "--node", "beta"])
    text = pair.resource.read_text()
    text = text.replace(f'cert = "{tmp_path}/pki/beta-cert.pem"', f'cert = "{tmp_path}/evil/beta-cert.pem"')
    text = text.replace(f'key = "{tmp_path}/pki/beta-key.pem"', f'key = "{tmp_path}/evil/beta-key.pem"')
    evil = tmp_path / "evil.toml"
    evil.write_text(text)
    pair.up("alpha", "--primary")
    pair.wait_for("alpha", "up as primary")
    log = tmp_path / "evil-beta.log"
    proc = subprocess.Popen([TANDEM_BIN, "up", str(evil), "--node", "beta"], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        text = pair.wait_for("alpha", r"TLS with beta failed: .*certificate", timeout=20)
        assert "connected to beta" not in text
        qemu_io(pair.uri, "write -P 0x55 0 64k", "read -P 0x55 0 64k")
    finally:
        proc.kill()
        proc.wait()


def test_plaintext_and_garbage_peers_are_dropped(pair):
    pair.up("alpha", "--primary")
    pair.wait_for("alpha", "listening for beta on")
    port = int(re.search(r"listening for beta on 127.0.0.1:(\d+)", pair.log("alpha")).group(1))
    import socket
    for payload in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096)):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(payload)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass
        finally:
            s.close()
    pair.wait_for("alpha", r"TLS with beta failed")
    qemu_io(pair.uri, "write -P 0x66 0 64k", "read -P 0x66 0 64k")
    assert pair.procs["alpha"].poll() is None


def status(pair, name, json_output=True):
    import json
    args = [TANDEM_BIN, "status", str(pair.resource), "--node", name] + (["--json"] if json_output else [])
    cp = run(args, check=False, timeout=30)
    assert cp.returncode == 0, cp.stderr_text
    return json.loads(cp.stdout_text) if json_output else cp.stdout_text


def test_status_shows_roles_states_and_out_of_sync(pair):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    a, b = status(pair, "alpha"), status(pair, "beta")
    assert (a["role"], a["disk"]) == ("Primary", "UpToDate")
    assert (b["role"], b["disk"]) == ("Secondary", "UpToDate")
    assert a["peer"] == {"node": "beta", "connection": "Connected", "role": "Secondary", "disk": "UpToDate", "replication": "Established",
                         "out_of_sync_bytes": 0, "resync_done_bytes": 0}
    text = status(pair, "alpha", json_output=False)
    assert text.splitlines()[0] == "r0 role:Primary" and "beta connection:Connected" in text
    since = pair.mark("alpha")
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down", since=since)
    qemu_io(pair.uri, "write -P 0x42 0 1M")
    a = status(pair, "alpha")
    assert a["peer"]["connection"] == "Connecting" and a["peer"]["disk"] is None
    assert a["peer"]["out_of_sync_bytes"] == 1 * MiB
    cp = run([TANDEM_BIN, "status", str(pair.resource), "--node", "beta"], check=False, timeout=30)
    assert cp.returncode != 0 and "not running" in cp.stderr_text


def test_the_secondary_refuses_nbd_writes(pair):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    port = int(re.search(r"read-only on 127.0.0.1:(\d+)", pair.wait_for("beta", "read-only on")).group(1))
    import errno
    import nbd
    h = nbd.NBD()
    h.set_strict_mode(0)  # send the write anyway: the server itself must refuse it
    h.connect_uri(f"nbd://127.0.0.1:{port}/r0")
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as refused:
        h.pwrite(b"\x01" * 4096, 0)
    assert refused.value.errno in (errno.EPERM, "EPERM"), refused.value  # libnbd gives the name
    assert h.pread(4096, 0) == bytes(4096), "reads of the secondary's copy still work"
    h.shutdown()


def test_an_interrupted_resync_resumes_where_it_stopped(make_pair, tmp_path):
    pair = make_pair('resync-rate-min = "1MiB"\nresync-rate-max = "2MiB"\n')
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    since = pair.mark("alpha")
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down", since=since)
    qemu_io(pair.uri, "write -P 0x5e 0 8M", "flush")
    since = pair.mark("alpha")
    pair.up("beta")
    first = int(re.findall(r"syncSource, (\d+) bytes", pair.wait_for("alpha", r"syncSource, (\d+) bytes", since=since))[-1])
    assert first >= 8 * MiB
    # At 2 MiB/s the resync takes seconds: interrupt it part-way.
    deadline = time.monotonic() + 20
    while status(pair, "alpha")["peer"]["out_of_sync_bytes"] > first - 4 * MiB:
        assert time.monotonic() < deadline, "the resync made no progress"
        time.sleep(0.1)
    since = pair.mark("alpha")
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down", since=since)
    left = status(pair, "alpha")["peer"]["out_of_sync_bytes"]
    assert 0 < left < first, (left, first)
    since = pair.mark("alpha")
    pair.up("beta")
    second = int(re.findall(r"syncSource, (\d+) bytes", pair.wait_for("alpha", r"syncSource, (\d+) bytes", since=since))[-1])
    # The target checkpoints its progress every second, so it may re-copy up to a second's worth.
    assert left <= second < first, f"the second resync ({second}) resumes from what was left ({left}), not from scratch ({first})"
    pair.wait_in_sync(since=since)
    pair.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes")
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_verify_finds_exactly_the_blocks_changed_behind_the_secondarys_back(pair, tmp_path):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    qemu_io(pair.uri, "write -P 0x71 0 16M", "flush")
    # Flip bytes in three 4 KiB blocks of beta's file, bypassing Tandem.
    flipped = [5 * 4096, 1 * MiB + 3 * 4096, 12 * MiB]
    with open(tmp_path / "beta.img", "r+b") as f:
        for offset in flipped:
            f.seek(offset + 100)
            f.write(b"\x00\xff\x00")
        f.flush()
        os.fsync(f.fileno())
    since = pair.mark("alpha")
    cp = run([TANDEM_BIN, "verify", str(pair.resource), "--node", "alpha", "--wait"], timeout=120)
    assert f"{len(flipped) * 4096} bytes differ" in cp.stdout_text, cp.stdout_text
    st = status(pair, "alpha")
    assert st["verify"]["mismatched_bytes"] == len(flipped) * 4096 and st["verify"]["checked_bytes"] == SIZE
    # The resync that follows repairs them.
    pair.wait_for("alpha", r"syncSource, 12288 bytes out of sync", since=since)
    pair.wait_in_sync(since=since)
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_verify_under_writes_reports_no_false_differences(pair, tmp_path):
    """Random writes run through the whole of three verify passes: data changing under a pass
    must not be taken for a difference (writes to the chunks being compared wait)."""
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    out = tmp_path / "fio.json"
    fio = subprocess.Popen(["fio", "--name=load", "--ioengine=nbd", f"--uri={pair.uri}", "--rw=randwrite", "--bs=4k",
                            "--iodepth=16", "--time_based", "--runtime=120", "--output-format=json", f"--output={out}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        pair.wait_for("alpha", r"NBD client .* attached")
        time.sleep(0.5)
        for _ in range(3):
            cp = run([TANDEM_BIN, "verify", str(pair.resource), "--node", "alpha", "--wait", "--no-progress"], timeout=120)
            assert fio.poll() is None, fio.stderr.read().decode()
            assert f"{SIZE} bytes checked, 0 bytes differ" in cp.stdout_text, cp.stdout_text
            st = status(pair, "alpha")["verify"]
            assert (st["checked_bytes"], st["mismatched_bytes"], st["unreadable_bytes"]) == (SIZE, 0, 0), st
    finally:
        fio.send_signal(signal.SIGINT)
        fio.wait(timeout=60)
    report = json.loads(out.read_text()[out.read_text().find("{"):])
    assert report["jobs"][0]["error"] == 0 and report["jobs"][0]["write"]["total_ios"] > 1000, report["jobs"][0]["write"]
    # Nothing was marked, nothing resynced: the pair stays in sync and the copies are equal.
    assert status(pair, "alpha")["peer"]["out_of_sync_bytes"] == 0
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_verify_reports_a_failed_read_as_unreadable_not_as_differing(pair, tmp_path):
    pair.up("beta")
    # alpha's disk fails every read in [4 MiB, 8 MiB): the verify's second chunk.
    pair.up("alpha", "--primary", "--inject-fault", "read:EIO:offset=4M-8M")
    pair.wait_in_sync()
    cp = run([TANDEM_BIN, "verify", str(pair.resource), "--node", "alpha", "--wait", "--no-progress"], timeout=120)
    assert f"{SIZE - 4 * MiB} bytes checked, 0 bytes differ, {4 * MiB} bytes unreadable" in cp.stdout_text, cp.stdout_text
    st = status(pair, "alpha")
    assert st["verify"]["unreadable_bytes"] == 4 * MiB and st["peer"]["out_of_sync_bytes"] == 0, st
    assert re.search(r"verify: the local read of 4194304 bytes at 4194304 failed", pair.log("alpha"))


def test_a_demotion_stops_a_running_verify_and_the_link_stays_up(make_pair, tmp_path):
    """A verify runs on the primary; once it demotes, the peer may be promoted and write, and a
    pass going on would take those writes for differences. The demotion stops it; the digests
    the peer still owes arrive after and are dropped, not taken for protocol errors."""
    size = 4 << 30  # sparse: long enough a pass that the demotion lands inside it
    pair = make_pair(size=size)
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    since = pair.mark("alpha")
    run([TANDEM_BIN, "verify", str(pair.resource), "--node", "alpha"], timeout=30)
    assert status(pair, "alpha")["verify"]["running"], "the pass ended before the demotion: make the device larger"
    run([TANDEM_BIN, "secondary", str(pair.resource), "--node", "alpha"], timeout=30)
    pair.wait_for("alpha", r"verify: stopped by the demotion after \d+ bytes", since=since)
    time.sleep(1)
    log = pair.log("alpha")[since:] + pair.log("beta")
    assert "protocol error" not in log, log[-3000:]
    st = status(pair, "alpha")
    assert not st["verify"]["running"] and st["verify"]["checked_bytes"] < size, st["verify"]
    assert st["peer"]["connection"] == "Connected", st
    # beta takes over and a full pass from it finds nothing.
    run([TANDEM_BIN, "primary", str(pair.resource), "--node", "beta"], timeout=30)
    cp = run([TANDEM_BIN, "verify", str(pair.resource), "--node", "beta", "--wait", "--no-progress"], timeout=300)
    assert f"{size} bytes checked, 0 bytes differ" in cp.stdout_text, cp.stdout_text


def test_verify_is_refused_on_the_secondary(pair):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    cp = run([TANDEM_BIN, "verify", str(pair.resource), "--node", "beta"], check=False, timeout=30)
    assert cp.returncode != 0 and "primary" in cp.stderr_text


def test_a_failing_local_disk_is_served_through_the_peer(pair, tmp_path):
    pair.up("beta")
    # alpha's disk fails every read in its first 4 MiB and every write at 8-9 MiB.
    pair.up("alpha", "--primary", "--inject-fault", "read:EIO:offset=0-4M", "--inject-fault", "write:EIO:offset=8M-9M")
    pair.wait_in_sync()
    qemu_io(pair.uri, "write -P 0x61 0 2M", "flush")
    # A read of the failing range: the client sees the data, no error (served by beta).
    qemu_io(pair.uri, "read -P 0x61 0 2M", "read -P 0x61 512k 4k")
    st = status(pair, "alpha")
    assert st["disk"] == "Failed" and st["peer"]["disk"] == "UpToDate", st
    assert "detached" in pair.log("alpha")
    # Writes go on through the peer; reads anywhere now come from it.
    qemu_io(pair.uri, "write -P 0x62 8M 64k", "write -P 0x63 20M 1M", "flush", "read -P 0x62 8M 64k", "read -P 0x63 20M 1M")
    beta = (tmp_path / "beta.img").read_bytes()
    assert beta[8 * MiB:8 * MiB + 65536] == b"\x62" * 65536
    assert beta[20 * MiB:21 * MiB] == b"\x63" * MiB


def test_a_page_cache_pair_mirrors_small_writes_and_their_faults(pair, tmp_path):
    """With --cache page, small whole-page writes are copied into the page cache on the loop
    (no trip through the engine), on both nodes: they must still reach both files, and an
    injected fault must still fail them (alpha detaches and serves through beta)."""
    pair.up("beta", "--cache", "page")
    pair.up("alpha", "--primary", "--cache", "page", "--inject-fault", "write:EIO:offset=8M-9M")
    pair.wait_in_sync()
    rep = subprocess.run(["fio", "--name=v", "--ioengine=nbd", f"--uri={pair.uri}", "--rw=randwrite", "--bs=4k",
                          "--iodepth=16", "--size=6M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                          "--verify_state_save=0", "--output-format=json"], capture_output=True, timeout=120, cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr.decode()
    assert status(pair, "alpha")["disk"] == "UpToDate"
    qemu_io(pair.uri, "write -P 0x64 8M 4k", "write -P 0x65 12M 8k", "flush", "read -P 0x64 8M 4k")
    st = status(pair, "alpha")
    assert st["disk"] == "Failed" and st["peer"]["disk"] == "UpToDate", st
    assert "role primary, disk failed, peer disk upToDate" in pair.log("alpha")
    beta = (tmp_path / "beta.img").read_bytes()
    assert beta[8 * MiB:8 * MiB + 4096] == b"\x64" * 4096 and beta[12 * MiB:12 * MiB + 8192] == b"\x65" * 8192
    # What fio wrote before the fault is on both files.
    alpha = (tmp_path / "alpha.img").read_bytes()
    assert alpha[:6 * MiB] == beta[:6 * MiB] and alpha[:6 * MiB].count(0) < 6 * MiB


def test_a_failed_flush_on_the_primary_detaches_its_disk_and_marks_its_hot_extents(pair, tmp_path):
    """A client FLUSH that fails on the primary's disk while the peer's succeeds: the writes it
    covers may not be on the local disk, so the disk detaches (the peer's answer goes to the
    client), and the extents the activity log holds hot are marked, since nothing syncs a
    detached disk again (simulator seed 103288). Its next attach resyncs them from the peer."""
    pair.up("beta")
    pair.up("alpha", "--primary", "--inject-fault", "flush:EIO:count=1")
    pair.wait_in_sync()
    qemu_io(pair.uri, "write -P 0x66 8M 64k", "flush")
    st = status(pair, "alpha")
    assert st["disk"] == "Failed" and st["peer"]["disk"] == "UpToDate", st
    # At least the 4 MiB extent written into is marked (the log's other hot extents too).
    assert st["peer"]["out_of_sync_bytes"] >= 4 * MiB, st
    qemu_io(pair.uri, "read -P 0x66 8M 64k")
    # The operator demotes alpha (its marks are what it lacks, not what beta lacks: no resync
    # from a detached disk holds the demotion up) and restarts it: it attaches as a resync target
    # of beta and catches up.
    cp = run([TANDEM_BIN, "secondary", str(pair.resource), "--node", "alpha"], check=False, timeout=30)
    assert cp.returncode == 0, cp.stderr_text
    assert pair.stop("alpha") == 0
    since = pair.mark("beta")
    pair.up("alpha")
    pair.wait_for("beta", r"syncSource, \d+ bytes out of sync", since=since)
    pair.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", since=since)
    assert pair.stop("alpha") == 0 and pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


@pytest.mark.parametrize("fault,sync", [
    ("flush:EIO:after=1:count=1", "the resync checkpoint"),
    ("flush:EIO:count=1", "the resync source's flush"),
], ids=["checkpoint", "source-flush"])
def test_a_writeback_error_taken_by_a_sync_of_no_request_reaches_the_next_flush(make_pair, tmp_path, fault, sync):
    """Linux reports a writeback error to one fsync per open file description, so a sync that
    no client request waits for must pass its error on. alpha is a resync source: its first
    flush through the I/O engine is the one before its first resync read, the second the
    resync checkpoint's (once a second); one of them fails once. Its peer is no full copy to
    detach to: alpha keeps its disk, its next client flush reports the error, and the resync
    goes on (a retried flush does not swallow it)."""
    pair = make_pair('resync-rate-min = "1MiB"\nresync-rate-max = "1MiB"\n')
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down")
    qemu_io(pair.uri, "write -P 0x5e 0 8M", "flush")
    assert pair.stop("alpha") == 0
    pair.up("alpha", "--primary", "--inject-fault", fault)
    pair.wait_for("alpha", "listening for beta")
    pair.up("beta")
    pair.wait_for("alpha", r"syncSource, \d+ bytes out of sync")
    pair.wait_for("alpha", r"local disk: %s failed to sync .*: the next flush reports the error" % re.escape(sync), timeout=20)
    st = status(pair, "alpha")
    assert st["disk"] == "UpToDate" and st["peer"]["replication"] == "SyncSource", st
    cp = run(["qemu-io", "-f", "raw", pair.uri, "-c", "write -P 0x61 60M 64k", "-c", "flush"], check=False, timeout=60)
    # qemu-io's flush prints nothing; its failure is the exit status.
    assert cp.returncode != 0, cp.stdout_text + cp.stderr_text
    # Reported once; the data is there, and the resync goes on to its end.
    qemu_io(pair.uri, "flush", "read -P 0x61 60M 64k", "read -P 0x5e 0 8M")
    pair.wait_in_sync()
    assert pair.procs["alpha"].poll() is None


def test_a_silent_peer_times_out_and_the_primary_goes_on(make_pair, tmp_path):
    pair = make_pair("ping-interval-ms = 200\npeer-timeout-ms = 1000\n")
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    since = pair.mark("alpha")
    # A stopped process keeps its socket open and sends nothing: like a cut cable.
    pair.procs["beta"].send_signal(signal.SIGSTOP)
    # The write completes: its peer ack never comes, the link times out, the primary goes on.
    qemu_io(pair.uri, "write -P 0x7a 0 1M", "flush")
    text = pair.wait_for("alpha", "peer timed out", since=since)
    assert "link to beta down" in text
    pair.procs["beta"].send_signal(signal.SIGCONT)
    since = pair.mark("alpha")
    pair.wait_in_sync(since=since)
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_a_crashed_primary_resyncs_only_its_hot_extents(pair, tmp_path):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    # Two regions in two 4 MiB activity-log extents (2 and 10) of the 64 MiB device.
    qemu_io(pair.uri, "write -P 0x31 8M 1M", "write -P 0x32 40M 512k", "flush")
    pair.stop("alpha", signal.SIGKILL)
    pair.up("alpha", "--primary")
    text = pair.wait_for("alpha", r"crashed as primary: (\d+) bytes of hot extents")
    marked = int(re.search(r"crashed as primary: (\d+) bytes", text).group(1))
    assert marked == 2 * 4 * MiB, f"the activity log names the 2 hot extents, not the whole device: {marked}"
    text = pair.wait_for("alpha", r"syncSource, (\d+) bytes out of sync")
    assert int(re.findall(r"syncSource, (\d+) bytes out of sync", text)[-1]) == marked
    pair.wait_in_sync()
    qemu_io(pair.uri, "read -P 0x31 8M 1M", "read -P 0x32 40M 512k")
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_a_clean_stop_of_the_primary_leaves_nothing_to_resync(pair, tmp_path):
    """Writes with no flush after them, then SIGTERM: the primary flushes both sides before the
    link goes, so nothing is marked out of sync and the restart needs no resync (before, the
    writes of the open epoch were marked and the peer became a resync target for them)."""
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    with RawNBD("127.0.0.1", pair.nbd_port).connect("r0") as c:
        for i in range(32):
            err, _ = c.request(CMD_WRITE, i * 2 * MiB, 64 * 1024, payload=bytes([i + 1]) * (64 * 1024), cookie=i + 1)
            assert err == 0
        c.disconnect()
    since = pair.mark("alpha")
    assert pair.stop("alpha") == 0
    text = pair.log("alpha")[since:]
    assert re.search(r"link to beta down: node stopping\n.*established, 0 bytes out of sync", text), text
    since_b = pair.mark("beta")
    pair.up("alpha", "--primary")
    text = pair.wait_for("beta", r"connected to alpha: (\w+)", since=since_b)
    assert "connected to alpha: noSync" in text, text
    pair.wait_in_sync()
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_a_clean_stop_does_not_wait_for_a_frozen_peer_for_ever(pair, tmp_path):
    """The flush before stopping is bounded: with the secondary frozen (SIGSTOP) the primary
    stops anyway, and what the peer did not acknowledge is marked for the next connect."""
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    qemu_io(pair.uri, "write -P 0x5a 0 1M")
    pair.procs["beta"].send_signal(signal.SIGSTOP)
    try:
        since = pair.mark("alpha")
        assert pair.stop("alpha") == 0  # fails after 30 s if the stop hangs
        text = pair.log("alpha")[since:]
        assert re.search(r"flush before stopping took over 5 s: stopping anyway", text), text
    finally:
        pair.procs["beta"].send_signal(signal.SIGCONT)
    pair.up("alpha", "--primary")
    pair.wait_in_sync(since=0)
    assert pair.stop("alpha") == 0
    assert pair.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_link_and_export_sockets_get_the_send_buffers_of_the_resource_file(make_pair):
    """`link-send-buffer` sets SO_SNDBUF on both ends of the replication link, `nbd-send-buffer`
    on the export's client sockets (ss shows what the kernel keeps: twice the value)."""
    pair = make_pair('link-send-buffer = "128KiB"\nnbd-send-buffer = "64KiB"\n')
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    link_port = int(re.search(r'address = "127\.0\.0\.1:(\d+)"', pair.resource.read_text()).group(1))

    def send_buffers(selector):
        out = run(["ss", "-tmnH", "state", "established", f"( {selector} )"]).stdout_text
        return sorted(int(x) for x in re.findall(r"\btb(\d+)", out))

    # alpha (the lower id) listens, beta dials: both ends are tandem's.
    assert send_buffers(f"sport = :{link_port} or dport = :{link_port}") == [256 * 1024, 256 * 1024]
    c = RawNBD("127.0.0.1", pair.nbd_port, timeout=30).connect(name="r0")
    try:
        assert c.request(CMD_WRITE, 0, 4096, cookie=1, payload=bytes(4096))[0] == 0
        assert send_buffers(f"sport = :{pair.nbd_port}") == [128 * 1024]
    finally:
        c.close()
