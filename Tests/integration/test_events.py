"""`tandem events`: a running node's state changes as JSON lines."""

import json
import subprocess
import time

from conftest import TANDEM_BIN, _die_with_parent, run
from test_replication import make_pair, pair, qemu_io  # noqa: F401 (fixtures)


def follow(p, node):
    return subprocess.Popen([TANDEM_BIN, "events", str(p.resource), "--node", node], stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)


def read_until(proc, predicate, timeout=30):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"events ended early after {seen}"
        event = json.loads(line)
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"not seen within {timeout}s: {seen}")


def test_events_show_a_role_switch_and_a_lost_peer(pair):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    a, b = follow(pair, "alpha"), follow(pair, "beta")
    try:
        first = json.loads(a.stdout.readline())
        assert first["type"] == "exists" and first["role"] == "Primary" and first["connection"] == "Connected"
        assert first["resource"] == "r0" and first["node"] == "alpha" and isinstance(first["time"], int)
        assert json.loads(b.stdout.readline())["role"] == "Secondary"
        run([TANDEM_BIN, "secondary", str(pair.resource), "--node", "alpha"])
        run([TANDEM_BIN, "primary", str(pair.resource), "--node", "beta"])
        seen = read_until(a, lambda e: e["type"] == "role")
        assert seen[-1]["role"] == "Secondary"
        seen = read_until(b, lambda e: e["type"] == "role")
        assert seen[-1]["role"] == "Primary"
        read_until(a, lambda e: e["type"] == "state" and e["peer_role"] == "Primary")
        pair.stop("beta")
        seen = read_until(a, lambda e: e["type"] == "peer-lost")
        assert seen[-1]["peer"] == "beta"
        # The state line that goes with it comes first.
        state = [e for e in seen if e["type"] == "state"][-1]
        assert state["connection"] == "Connecting" and state["peer_disk"] is None and state["replication"] == "Off"
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait()


def test_events_count_and_a_stopped_node(pair):
    pair.up("beta")
    pair.wait_for("beta", "up as secondary")
    cp = run([TANDEM_BIN, "events", str(pair.resource), "--node", "beta", "--count", "1"], timeout=30)
    assert json.loads(cp.stdout_text)["type"] == "exists"
    cp = run([TANDEM_BIN, "events", str(pair.resource), "--node", "alpha"], check=False, timeout=30)
    assert cp.returncode != 0 and cp.stderr_text.startswith("error:") and "not running" in cp.stderr_text
