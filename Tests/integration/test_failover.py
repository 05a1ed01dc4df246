"""Roles, failover and split brain with several hosts: every node in its own network namespace
(netns.py), real `tandem up` processes, kill -9, and links cut with iproute2.

The writers record which writes the NBD server acknowledged; after a switchover or a crash,
every acknowledged block must be on the node that serves next."""

import os
import re
import signal
import struct
import subprocess
import threading
import time

import pytest

import netns
from conftest import MiB, TANDEM_BIN, run, read_export, _die_with_parent

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))

BLOCK = 64 * 1024


@pytest.fixture
def make_cluster(tmp_path):
    made = []

    def make(**kwargs):
        made.append(netns.Cluster(tmp_path, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def block_content(offset, tag):
    return struct.pack("<QQ", offset, tag) * (BLOCK // 16)


class Writer(threading.Thread):
    """Writes 64 KiB blocks one after the other through its own NBD connection, over
    [start, end) again and again (each pass with new contents) until stopped or refused.
    `acked` maps each block to the contents the server last acknowledged; a block whose write
    failed is dropped from it (it may hold either version)."""

    def __init__(self, uri, start, end, tag, passes=1000):
        super().__init__(daemon=True)
        import nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.start_offset, self.end, self.tag, self.passes = start, end, tag, passes
        self.acked = {}
        self.count = 0
        self.error = None
        self.halt = threading.Event()

    def run(self):
        for p in range(self.passes):
            for offset in range(self.start_offset, self.end, BLOCK):
                if self.halt.is_set():
                    return
                tag = self.tag * 100000 + p
                try:
                    self.h.pwrite(block_content(offset, tag), offset)
                except Exception as e:  # the server refused (ESHUTDOWN) or went away
                    self.acked.pop(offset, None)
                    self.error = e
                    return
                self.acked[offset] = tag
                self.count += 1

    def stop(self):
        self.halt.set()
        self.join(timeout=60)
        try:
            self.h.shutdown()
        except Exception:
            pass


def check_acked(uri, writers):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        missing = [(o, t) for w in writers for o, t in w.acked.items() if h.pread(BLOCK, o) != block_content(o, t)]
    finally:
        h.shutdown()
    assert not missing, f"{len(missing)} acknowledged blocks missing, first {missing[:5]}"
    return sum(len(w.acked) for w in writers)


def partition_pair(c):
    """Cuts alpha from beta and waits until both have noticed."""
    c.partition("alpha", "beta")
    c.wait_for("beta", "link to alpha down")
    c.wait_for("alpha", "link to beta down")


def start_writers(uri, regions, tag, passes=1000):
    writers = [Writer(uri, start, end, tag + i, passes) for i, (start, end) in enumerate(regions)]
    for w in writers:
        w.start()
    return writers


def wait_acked(writers, count, timeout=30):
    deadline = time.monotonic() + timeout
    while sum(w.count for w in writers) < count:
        assert time.monotonic() < deadline, f"writers stalled: {[w.count for w in writers]} {[w.error for w in writers]}"
        time.sleep(0.02)


def test_planned_switchover_under_load(make_cluster, tmp_path):
    c = make_cluster()
    c.up("beta")
    c.up("alpha", "--primary")
    c.wait_connected()
    writers = start_writers(c.uri("alpha"), [(0, 16 * MiB), (16 * MiB, 32 * MiB)], tag=100)
    fio = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={c.uri('alpha')}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
         "--offset=32M", "--size=32M", "--time_based", "--runtime=30", "--continue_on_error=all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        wait_acked(writers, 40)
        started = time.monotonic()
        demoted = c.tandem("secondary", "--node", "alpha").stdout_text
        promoted = c.tandem("primary", "--node", "beta").stdout_text
        switch = time.monotonic() - started
        print(f"planned switchover: {switch * 1000:.0f} ms end to end (two CLI calls); {demoted.strip()}; {promoted.strip()}")
        assert "is secondary" in demoted and "is primary" in promoted
        for w in writers:
            w.join(timeout=30)
            assert not w.is_alive(), "a writer kept writing to a demoted node"
            # Refused with ESHUTDOWN if a request was in flight, else the idle connection closed.
            assert w.error is not None and ("ESHUTDOWN" in str(w.error) or "ENOTCONN" in str(w.error)), w.error
    finally:
        os.killpg(fio.pid, signal.SIGKILL)  # fio's job processes too
        fio.wait()
    assert c.status("alpha")["role"] == "Secondary" and c.status("beta")["role"] == "Primary"
    n = check_acked(c.uri("beta"), writers)
    assert n >= 40
    # The new primary writes and replicates back to the old one.
    more = start_writers(c.uri("beta"), [(40 * MiB, 44 * MiB)], tag=300, passes=1)
    more[0].join(timeout=60)
    assert more[0].error is None and len(more[0].acked) == 64
    c.tandem("secondary", "--node", "beta")
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_killed_primary_survivor_is_promoted_and_the_returning_node_resyncs_little(make_cluster, tmp_path):
    c = make_cluster()
    c.up("beta")
    c.up("alpha", "--primary")
    c.wait_connected()
    writers = start_writers(c.uri("alpha"), [(0, 24 * MiB), (24 * MiB, 48 * MiB)], tag=500)
    wait_acked(writers, 60)
    since = c.mark("beta")
    c.kill("alpha")
    for w in writers:
        w.join(timeout=30)
    c.wait_for("beta", "link to alpha down", since=since)
    c.tandem("primary", "--node", "beta")
    assert check_acked(c.uri("beta"), writers) >= 60
    # The survivor goes on alone: 2 MiB the returning node lacks.
    after = start_writers(c.uri("beta"), [(50 * MiB, 52 * MiB)], tag=700, passes=1)
    after[0].join(timeout=60)
    assert after[0].error is None
    since = c.mark("beta")
    c.up("alpha")
    text = c.wait_for("beta", r"syncSource, (\d+) bytes out of sync", since=since)
    moved = int(re.findall(r"syncSource, (\d+) bytes out of sync", text)[-1])
    # The survivor's 2 MiB plus the crashed primary's hot activity-log extents (4 MiB each).
    assert 2 * MiB <= moved <= 2 * MiB + 6 * 4 * MiB, f"resynced {moved} bytes: more than the survivor's writes and a few hot extents"
    c.wait_connected("beta", "alpha", since=(since, 0))
    assert c.status("alpha")["role"] == "Secondary"
    check_acked(c.uri("beta"), writers + after)
    c.tandem("secondary", "--node", "beta")
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_split_brain_is_detected_and_discard_my_data_resolves_it(make_cluster, tmp_path):
    calls = tmp_path / "handler-calls"
    script = tmp_path / "handler.sh"
    script.write_text(f'#!/bin/sh\necho "$@ | $TANDEM_EVENT $TANDEM_NODE" >> {calls}\n')
    script.chmod(0o755)
    failing = tmp_path / "failing.sh"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    c = make_cluster(handlers={"split-brain": script, "role-change": script, "peer-lost": script,
                               "resync-done": script, "quorum-lost": failing})
    c.up("beta")
    c.up("alpha", "--primary")
    c.wait_connected()
    partition_pair(c)
    # Both sides write while apart: alpha as the primary it was, beta promoted by force.
    c.tandem("primary", "--node", "beta", "--force")
    a = start_writers(c.uri("alpha"), [(0, 2 * MiB)], tag=900, passes=1)
    b = start_writers(c.uri("beta"), [(8 * MiB, 9 * MiB)], tag=950, passes=1)
    for w in a + b:
        w.join(timeout=60)
        assert w.error is None
    since = (c.mark("alpha"), c.mark("beta"))
    c.heal("alpha", "beta")
    c.wait_for("alpha", "SPLIT BRAIN", since=since[0])
    c.wait_for("beta", "SPLIT BRAIN", since=since[1])
    sa, sb = c.status("alpha"), c.status("beta")
    assert sa["split_brain"] and sb["split_brain"]
    assert sa["peer"]["connection"] == "Standalone" and sb["peer"]["connection"] == "Standalone"
    # Nothing was merged: each still has its own writes only.
    check_acked(c.uri("alpha"), a)
    check_acked(c.uri("beta"), b)
    # Give up beta's changes.
    cp = c.tandem("connect", "--node", "beta", "--discard-my-data", check=False)
    assert cp.returncode != 0 and "demote it first" in cp.stderr_text
    c.tandem("secondary", "--node", "beta")
    since = (c.mark("alpha"), c.mark("beta"))
    # alpha first: it keeps trying to connect, and wait-sync waits for that rather than giving
    # up on the split brain being resolved (it gave up at once, found by tools/chaos).
    c.tandem("connect", "--node", "alpha")
    waiter = subprocess.Popen([TANDEM_BIN, "wait-sync", str(c.resource), "--node", "alpha", "--no-progress", "--timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    assert waiter.poll() is None, f"wait-sync gave up while alpha was reconnecting: {waiter.communicate()}"
    c.tandem("connect", "--node", "beta", "--discard-my-data")
    out, err = waiter.communicate(timeout=130)
    assert waiter.returncode == 0, out + err
    text = c.wait_for("alpha", r"syncSource, (\d+) bytes out of sync", since=since[0])
    moved = int(re.findall(r"syncSource, (\d+) bytes out of sync", text)[-1])
    assert 3 * MiB <= moved <= 3 * MiB + 2 * 4 * MiB, f"resync moved {moved} bytes, expected both sides' 3 MiB of changes"
    c.wait_connected(since=since)
    check_acked(c.uri("alpha"), a)
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()
    lines = calls.read_text().splitlines()
    assert "split-brain r0 alpha beta | split-brain alpha" in lines and "split-brain r0 beta alpha | split-brain beta" in lines
    assert "role-change r0 beta primary | role-change beta" in lines
    assert "peer-lost r0 alpha beta | peer-lost alpha" in lines
    assert any(line.startswith("resync-done r0 beta target") for line in lines), lines


def test_a_primary_older_than_its_returning_peer_is_named_and_resyncs_once_demoted(make_cluster, tmp_path):
    c = make_cluster()
    c.up("beta")
    c.up("alpha", "--primary")
    c.wait_connected()
    partition_pair(c)
    # alpha writes alone, then goes away; beta is promoted without those writes and writes nothing.
    a = start_writers(c.uri("alpha"), [(0, 2 * MiB)], tag=300, passes=1)
    a[0].join(timeout=60)
    assert a[0].error is None
    c.tandem("secondary", "--node", "alpha")
    c.tandem("primary", "--node", "beta", "--force")
    since = c.mark("beta")
    c.heal("alpha", "beta")
    # Connecting would resync alpha's newer data into beta under its clients: refused, and said.
    c.wait_for("beta", "role conflict: the peer holds newer data; demote this node", since=since)
    conflict = c.status("beta")["role_conflict"]
    assert conflict["reason"] == "the peer holds newer data" and "tandem secondary" in conflict["remedy"], conflict
    assert c.status("beta")["peer"]["connection"] != "Connected"
    assert "ROLE-CONFLICT" in c.tandem("status", "--node", "beta").stdout_text
    # Said once, though the link is retried.
    time.sleep(1)
    assert c.log("beta")[since:].count("role conflict") == 1
    since = (c.mark("alpha"), c.mark("beta"))
    c.tandem("secondary", "--node", "beta")
    c.wait_for("beta", r"syncTarget, \d+ bytes out of sync", since=since[1])
    c.wait_connected(since=since)
    assert c.status("beta")["role_conflict"] is None
    c.tandem("primary", "--node", "beta")
    check_acked(c.uri("beta"), a)
    c.tandem("secondary", "--node", "beta")
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_a_disconnected_primary_outdates_its_secondary(make_cluster):
    c = make_cluster()
    c.up("beta")
    c.up("alpha", "--primary")
    c.wait_connected()
    since = c.mark("beta")
    c.tandem("disconnect", "--node", "alpha")
    c.wait_for("beta", "disk outdated", since=since)
    assert c.status("beta")["disk"] == "Outdated"
    assert c.status("alpha")["peer"]["connection"] == "Standalone"
    cp = c.tandem("primary", "--node", "beta", check=False)
    assert cp.returncode != 0 and "outdated" in cp.stderr_text and "--force" in cp.stderr_text
    # Outdated survives a restart.
    c.stop("beta")
    c.up("beta")
    c.wait_for("beta", "up as secondary")
    assert c.status("beta")["disk"] == "Outdated"
    # alpha writes alone, then reconnects: beta catches up and is UpToDate again.
    w = start_writers(c.uri("alpha"), [(0, 1 * MiB)], tag=1, passes=1)
    w[0].join(timeout=60)
    since = (c.mark("alpha"), c.mark("beta"))
    c.tandem("connect", "--node", "alpha")
    c.wait_connected(since=since)
    assert c.status("beta")["disk"] == "UpToDate"
    c.tandem("secondary", "--node", "alpha")
    c.tandem("primary", "--node", "beta")
    check_acked(c.uri("beta"), w)


def test_promotion_is_refused_while_the_peer_is_primary(make_cluster):
    c = make_cluster()
    c.up("beta")
    c.up("alpha", "--primary")
    c.wait_connected()
    cp = c.tandem("primary", "--node", "beta", check=False)
    assert cp.returncode != 0 and "peer is primary" in cp.stderr_text
    assert c.status("beta")["role"] == "Secondary"
    cp = c.tandem("primary", "--node", "alpha")
    assert "already" in cp.stdout_text


def write_fails(uri):
    import nbd
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        if h.is_read_only():
            return True
        h.pwrite(b"\x55" * 4096, 60 * MiB)
        return False
    except Exception:
        return True
    finally:
        try:
            h.shutdown()
        except Exception:
            pass


def test_witness_promotes_the_survivor_and_the_isolated_primary_stops_writing(make_cluster, tmp_path):
    failing = tmp_path / "failing.sh"
    failing.write_text("#!/bin/sh\necho quorum-lost-ran >&2\nexit 3\n")
    failing.chmod(0o755)
    c = make_cluster(witness=True, handlers={"quorum-lost": failing})
    _up_with_witness(c)
    cp = c.tandem("check", "--node", "witness", check=False)
    assert cp.returncode == 0 and "alpha connected, beta connected" in cp.stdout_text, cp.stdout_text
    writers = start_writers(c.uri("alpha"), [(0, 8 * MiB), (8 * MiB, 16 * MiB)], tag=2000)
    wait_acked(writers, 40)
    since = (c.mark("alpha"), c.mark("beta"))
    started = time.monotonic()
    c.isolate("alpha")
    c.wait_for("beta", "automatic failover: .* promoting", timeout=30, since=since[1])
    deadline = time.monotonic() + 10
    while c.status("beta")["role"] != "Primary":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    failover = time.monotonic() - started
    print(f"automatic failover: beta primary {failover:.2f} s after alpha was cut off (peer-timeout-ms 1500)")
    c.wait_for("alpha", "quorum lost", timeout=30, since=since[0])
    # The monitoring probe calls it what it is.
    cp = c.tandem("check", "--node", "alpha", check=False)
    assert cp.returncode == 2 and "no quorum" in cp.stdout_text, cp.stdout_text
    assert c.status("alpha")["quorum"] is False and c.status("beta")["quorum"] is True
    deadline = time.monotonic() + 20
    while (cp := c.tandem("check", "--node", "witness", check=False)).returncode != 1:
        assert time.monotonic() < deadline, cp.stdout_text
        time.sleep(0.2)
    assert "does not see alpha" in cp.stdout_text, cp.stdout_text
    # Exactly one side accepts writes: alpha refuses them (a client inside its namespace sees
    # EIO), beta takes them. The writers outside cannot reach alpha at all any more.
    for w in writers:
        w.halt.set()
    cp = run(["ip", "netns", "exec", c.ns["alpha"], "qemu-io", "-f", "raw", c.uri("alpha"), "-c", "write -P 0x77 0 4k"],
             check=False, timeout=60)
    assert "Input/output error" in cp.stdout_text + cp.stderr_text, cp.stdout_text + cp.stderr_text
    # The quorum-lost handler ran and failed; the node only logged it.
    c.wait_for("alpha", r"handler quorum-lost: exited with status 3", since=since[0])
    assert check_acked(c.uri("beta"), writers) >= 40
    ok = start_writers(c.uri("beta"), [(20 * MiB, 21 * MiB)], tag=2100, passes=1)
    ok[0].join(timeout=60)
    assert ok[0].error is None
    # alpha comes back: the witness tells it it was replaced; it demotes and resyncs from beta.
    since = (c.mark("alpha"), c.mark("beta"))
    c.reconnect("alpha")
    c.wait_for("alpha", "demoted after being deposed", timeout=30, since=since[0])
    c.wait_connected("beta", "alpha", timeout=60, since=(since[1], since[0]))
    check_acked(c.uri("beta"), writers + ok)
    c.tandem("secondary", "--node", "beta")
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def test_a_partition_between_the_data_nodes_leaves_exactly_one_writer(make_cluster, tmp_path):
    c = make_cluster(witness=True)
    _up_with_witness(c)
    since = (c.mark("alpha"), c.mark("beta"))
    c.partition("alpha", "beta")
    c.wait_for("alpha", "link to beta down", since=since[0])
    # alpha still reaches the witness: it fences beta and goes on writing.
    c.wait_for("alpha", "witness recorded beta as outdated", since=since[0])
    w = start_writers(c.uri("alpha"), [(0, 2 * MiB)], tag=3000, passes=1)
    w[0].join(timeout=60)
    assert w[0].error is None
    # beta asks to take over and is refused: alpha is primary and alive.
    c.wait_for("witness", "refused to let beta become primary", timeout=30)
    assert c.status("beta")["role"] == "Secondary"
    assert write_fails(c.uri("beta"))
    cp = c.tandem("primary", "--node", "beta", check=False)
    assert cp.returncode != 0 and "witness refused" in cp.stderr_text
    since = (c.mark("alpha"), c.mark("beta"))
    c.heal("alpha", "beta")
    c.wait_connected(timeout=60, since=since)
    check_acked(c.uri("alpha"), w)
    c.tandem("secondary", "--node", "alpha")
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    assert (tmp_path / "alpha.img").read_bytes() == (tmp_path / "beta.img").read_bytes()


def rollback_cluster(make_cluster, tmp_path, failover=""):
    """A pair with undo stores and a witness; alpha wrote, beta keeps barrier 'good', alpha wrote
    over it (the damage a rollback undoes), then demoted. Returns the cluster, the barrier id and
    the device's image at the barrier."""
    c = make_cluster(witness=True, failover=failover)
    text = c.resource.read_text()
    for name in ("alpha", "beta"):
        meta = f'metadata = "{tmp_path}/{name}.meta"\n'
        text = text.replace(meta, meta + f'undo = "{tmp_path}/{name}.undo"\n')
    c.resource.write_text(text)
    run([TANDEM_BIN, "config", "check", str(c.resource)])
    _up_with_witness(c)
    writers = start_writers(c.uri("alpha"), [(0, 24 * MiB)], tag=3000, passes=1)
    writers[0].join(timeout=120)
    assert writers[0].error is None
    since = c.mark("beta")
    out = run([TANDEM_BIN, "barrier", "create", str(c.resource), "--node", "alpha", "--label", "good"]).stdout_text
    good = int(re.search(r"barrier (\d+)", out).group(1))
    c.wait_for("beta", rf"barrier {good} 'good' recorded", since=since)
    image = read_export(c.uri("alpha"), 64 * MiB)
    # Damage after the barrier: what the rollback undoes.
    later = start_writers(c.uri("alpha"), [(8 * MiB, 56 * MiB)], tag=3100, passes=1)
    later[0].join(timeout=120)
    assert later[0].error is None
    c.wait_connected()
    c.tandem("secondary", "--node", "alpha")
    return c, good, image


def run_rollback(c, good, *extra):
    return run([TANDEM_BIN, "rollback", str(c.resource), "--node", "beta", str(good), "--yes-destroy-newer-data", *extra],
               check=False, timeout=180)


def witness_nodes(c):
    import json
    return json.loads(c.tandem("status", "--node", "witness", "--json").stdout_text)["nodes"]


def test_a_rollback_with_a_witness_is_not_raced_by_a_failover(make_cluster, tmp_path):
    """`tandem rollback` on the secondary while a witness runs: the rolling-back node tells its
    peer why it leaves (`disconnect(rollback)`), so the demoted node marks itself Outdated and
    never asks the witness to take over, and `tandem primary` refuses it while the rollback
    lasts. The pair ends with the barrier's image on both nodes."""
    c, good, image = rollback_cluster(make_cluster, tmp_path)
    since = (c.mark("alpha"), c.mark("beta"), c.mark("witness"))
    # beta rolls back; alpha is cut off from beta as soon as it was told (so the rollback's end
    # does not reconnect them at once): the window in which the witness used to promote alpha.
    rollback = subprocess.Popen([TANDEM_BIN, "rollback", str(c.resource), "--node", "beta", str(good), "--yes-destroy-newer-data"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    c.wait_for("alpha", r"role secondary, disk outdated", timeout=30, since=since[0])
    c.partition("alpha", "beta")
    cp = c.tandem("primary", "--node", "alpha", check=False)
    assert cp.returncode != 0 and "rolling back" in cp.stderr_text, cp.stderr_text
    out, err = rollback.communicate(timeout=120)
    assert rollback.returncode == 0, err
    c.wait_for("beta", "rolled back to barrier", since=since[1])
    # Longer than the peer timeout and many failover ticks: alpha stays secondary.
    _alpha_stays_secondary_then_heals(c, since, wait_s=4)
    assert c.status("alpha")["role"] == "Secondary"
    # beta holds the newest data: the witness may have let it take over meanwhile (safe); demote it.
    c.tandem("secondary", "--node", "beta")
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    a, b = (tmp_path / "alpha.img").read_bytes(), (tmp_path / "beta.img").read_bytes()
    assert a == image and b == image, "both devices hold the barrier's image"


def test_a_rollback_cut_off_from_its_peer_waits_for_the_witness(make_cluster, tmp_path):
    """beta is cut off from alpha (both still reach the witness) before it rolls back, so its
    `disconnect(rollback)` cannot reach alpha. The witness records the rollback first; from then
    on it refuses to promote alpha, whose data is about to be older, and its refusal tells alpha
    it is Outdated. Once the link is back alpha resyncs from beta, and the record ends.
    (auto-promote is off: otherwise alpha and beta, both secondaries alone, race to ask the
    witness the moment the link goes, and the rollback is refused if alpha wins.)"""
    c, good, image = rollback_cluster(make_cluster, tmp_path, failover="auto-promote = false")
    since = (c.mark("alpha"), c.mark("beta"), c.mark("witness"))
    c.partition("alpha", "beta")
    c.wait_for("beta", "replication: link to alpha down", since=since[1])
    c.wait_for("alpha", "replication: link to beta down", since=since[0])
    cp = run_rollback(c, good)
    assert cp.returncode == 0, cp.stderr_text
    c.wait_for("beta", "the witness recorded the rollback to barrier", since=since[1])
    c.wait_for("beta", "rolled back to barrier", since=since[1])
    c.wait_for("witness", "beta rolls back to a barrier: alpha is not promoted", since=since[2])
    assert witness_nodes(c)["beta"]["rolling_back"] is True
    # alpha never got the notice and is UpToDate: the witness refuses it, naming the rollback,
    # and alpha marks itself Outdated.
    assert c.status("alpha")["disk"] == "UpToDate"
    cp = c.tandem("primary", "--node", "alpha", check=False)
    assert cp.returncode != 0 and "rolling back to a barrier (the witness recorded it)" in cp.stderr_text, cp.stderr_text
    c.wait_for("witness", "refused to let alpha become primary: beta rolls back to a barrier", since=since[2])
    c.wait_for("alpha", "the witness says beta rolls back to a barrier", since=since[0])
    assert c.status("alpha")["disk"] == "Outdated" and c.status("alpha")["role"] == "Secondary"
    assert "alpha may become primary" not in c.log("witness")[since[2]:]
    # The link returns: alpha resyncs from beta, and beta withdraws the record.
    c.heal("alpha", "beta")
    c.wait_for("alpha", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", timeout=60, since=since[0])
    c.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", timeout=60, since=since[1])
    c.wait_for("witness", "beta no longer rolls back", timeout=30, since=since[2])
    assert witness_nodes(c)["beta"]["rolling_back"] is False
    assert c.status("alpha")["role"] == "Secondary" and c.status("beta")["role"] == "Secondary"
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    a, b = (tmp_path / "alpha.img").read_bytes(), (tmp_path / "beta.img").read_bytes()
    assert a == image and b == image, "both devices hold the barrier's image"


def test_a_rollback_as_the_link_breaks_is_not_raced_by_an_automatic_failover(make_cluster, tmp_path):
    """The link between the data nodes breaks as beta starts its rollback, so its
    `disconnect(rollback)` is lost (the case the simulator found: `--witness --barriers`, seeds
    37 and 232). The witness recorded the rollback before beta restored anything, so alpha's
    automatic failover is refused: for the rollback, or, once beta (holding the newest data)
    took over itself when its short rollback ended, because beta is primary."""
    c, good, image = rollback_cluster(make_cluster, tmp_path)
    since = (c.mark("alpha"), c.mark("beta"), c.mark("witness"))
    c.partition("alpha", "beta")
    cp = run_rollback(c, good)
    assert cp.returncode == 0, cp.stderr_text
    c.wait_for("beta", "the witness recorded the rollback to barrier", since=since[1])
    c.wait_for("witness", "beta rolls back to a barrier: alpha is not promoted", since=since[2])
    c.wait_for("alpha", "replication: link to beta down", since=since[0])
    c.wait_for("witness", "refused to let alpha become primary", timeout=30, since=since[2])
    _alpha_stays_secondary_then_heals(c, since, wait_s=3)
    # beta holds the newest data: the witness may have let it take over meanwhile (safe); demote it.
    c.tandem("secondary", "--node", "beta")
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    a, b = (tmp_path / "alpha.img").read_bytes(), (tmp_path / "beta.img").read_bytes()
    assert a == image and b == image, "both devices hold the barrier's image"


def test_a_rollback_cut_off_from_its_peer_and_the_witness_is_refused(make_cluster, tmp_path):
    """beta is cut off from everyone before it rolls back: neither the witness nor alpha can
    record that alpha's data is about to be outdated, so the rollback is refused, with the
    reason, and nothing is restored. With the links back it rolls back."""
    c, good, image = rollback_cluster(make_cluster, tmp_path, failover="auto-promote = false")
    since = (c.mark("alpha"), c.mark("beta"), c.mark("witness"))
    damaged = (tmp_path / "beta.img").read_bytes()
    c.isolate("beta")
    c.wait_for("beta", "replication: link to alpha down", since=since[1])
    c.wait_for("beta", "witness: link to witness down", since=since[1])
    cp = run_rollback(c, good)
    assert cp.returncode != 0, cp.stdout_text
    assert "cannot roll back: the witness is unreachable and alpha is not connected" in cp.stderr_text, cp.stderr_text
    assert "--force" in cp.stderr_text
    assert "rolling back to barrier" not in c.log("beta")[since[1]:]
    status = c.status("beta")
    assert status["rollback"]["running"] is False and status["role"] == "Secondary"
    assert (tmp_path / "beta.img").read_bytes() == damaged, "nothing restored"
    # Back in touch, the same rollback is recorded and runs.
    since = (c.mark("alpha"), c.mark("beta"), c.mark("witness"))
    c.reconnect("beta")
    c.wait_for("beta", "witness: link to witness up", timeout=30, since=since[1])
    c.wait_connected(timeout=60, since=since[:2])
    since = (c.mark("alpha"), c.mark("beta"), c.mark("witness"))
    cp = run_rollback(c, good)
    assert cp.returncode == 0, cp.stderr_text
    c.wait_for("beta", "the witness recorded the rollback to barrier", since=since[1])
    c.wait_for("beta", "rolled back to barrier", since=since[1])
    c.wait_for("alpha", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", timeout=60, since=since[0])
    c.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", timeout=60, since=since[1])
    assert c.stop("alpha") == 0 and c.stop("beta") == 0
    a, b = (tmp_path / "alpha.img").read_bytes(), (tmp_path / "beta.img").read_bytes()
    assert a == image and b == image, "both devices hold the barrier's image"


def _alpha_stays_secondary_then_heals(c, since, wait_s):
    """During beta's rollback, `wait_s` seconds of failover ticks leave alpha secondary and the
    witness never lets it take over; then the link heals and both resync to established."""
    time.sleep(wait_s)
    assert c.status("alpha")["role"] == "Secondary"
    assert "automatic failover" not in c.log("alpha")[since[0]:]
    assert "alpha may become primary" not in c.log("witness")[since[2]:]
    c.heal("alpha", "beta")
    c.wait_for("alpha", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", timeout=60, since=since[0])
    c.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", timeout=60, since=since[1])


def _up_with_witness(c):
    """The witness, then beta, then alpha as primary; returns once the pair is connected and
    both data nodes reach the witness."""
    c.up("witness")
    c.up("beta")
    c.up("alpha", "--primary")
    c.wait_connected()
    c.wait_for("alpha", "witness: link to witness up")
    c.wait_for("beta", "witness: link to witness up")
