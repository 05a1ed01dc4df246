"""Prometheus metrics over HTTP (`metrics = "HOST:PORT"` in a [[node]])."""

import json
import re
import urllib.error
import urllib.request

from conftest import MiB, free_port
from test_replication import make_pair, qemu_io  # noqa: F401 (fixture)


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def value(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def serve_metrics(p, tmp_path):
    """Gives both nodes of pair `p` a metrics address; returns their ports by name."""
    ports = {"alpha": free_port(), "beta": free_port()}
    text = p.resource.read_text()
    for name, port in ports.items():
        meta = f'metadata = "{tmp_path}/{name}.meta"\n'
        text = text.replace(meta, meta + f'metrics = "127.0.0.1:{port}"\n')
    p.resource.write_text(text)
    return ports


def test_metrics_are_scraped_over_http(make_pair, tmp_path):
    p = make_pair()
    ports = serve_metrics(p, tmp_path)
    p.up("beta")
    p.up("alpha", "--primary")
    p.wait_in_sync()
    qemu_io(p.uri, "write -P 0x11 0 4M", "write -z 8M 1M", "discard 12M 1M", "flush", "read 0 2M")
    a = scrape(ports["alpha"])
    # Every metric is documented with HELP and TYPE, and the labels name the node.
    for name in set(re.findall(r"^(tandem_[a-z_]+?)(?:_bucket|_sum|_count)?\{", a, re.M)):
        assert f"# TYPE {name} " in a, name
    assert value(a, "tandem_primary", node="alpha") == 1
    assert value(a, "tandem_connected") == 1 and value(a, "tandem_quorum") == 1
    assert value(a, "tandem_disk_state", state="UpToDate") == 1 and value(a, "tandem_disk_state", state="Failed") == 0
    assert value(a, "tandem_peer_disk_state", state="UpToDate") == 1
    assert value(a, "tandem_request_bytes_total", kind="write") == 4 * MiB
    assert value(a, "tandem_request_bytes_total", kind="zeroes") == 1 * MiB
    assert value(a, "tandem_requests_total", kind="trim") == 1
    assert value(a, "tandem_requests_total", kind="flush") >= 1
    assert value(a, "tandem_request_bytes_total", kind="read") >= 2 * MiB
    writes = value(a, "tandem_write_latency_seconds_count")
    assert writes >= 3 and value(a, "tandem_write_latency_seconds_bucket", le="+Inf") == writes
    assert value(a, "tandem_write_latency_seconds_sum") > 0
    b = scrape(ports["beta"])
    assert value(b, "tandem_primary", node="beta") == 0 and value(b, "tandem_requests_total", kind="write") == 0
    # After the secondary is gone, the primary says so.
    p.stop("beta")
    p.wait_for("alpha", "link to beta down")
    qemu_io(p.uri, "write -P 0x12 20M 1M")
    a = scrape(ports["alpha"])
    assert value(a, "tandem_connected") == 0 and value(a, "tandem_out_of_sync_bytes") == 1 * MiB
    try:
        scrape(ports["alpha"], "/other")
        raise AssertionError("a path other than /metrics answered")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_polling_before_sleeping_is_counted_and_can_be_turned_off(make_pair, tmp_path):
    """The resource file sets poll-us = 1000 (long enough that a primary taking a stream of
    writes finds completions while it polls); beta is started with --poll-us 0, which
    overrides the file, and must never poll. Both say so at start, and the metrics count."""
    p = make_pair(tuning="poll-us = 1000\n")
    ports = serve_metrics(p, tmp_path)
    p.up("beta", "--poll-us", "0")
    p.up("alpha", "--primary")
    p.wait_in_sync()
    p.wait_for("alpha", "polls up to 1000 µs before sleeping")
    p.wait_for("beta", "no polling")
    qemu_io(p.uri, *[f"write -P 0x{i:02x} {i * 64}k 64k" for i in range(1, 65)], "flush")
    a = scrape(ports["alpha"])
    assert value(a, "tandem_poll_hits_total") > 0, a
    assert value(a, "tandem_poll_seconds_total") > 0
    b = scrape(ports["beta"])
    assert value(b, "tandem_poll_hits_total") == 0 and value(b, "tandem_poll_misses_total") == 0
    assert value(b, "tandem_poll_seconds_total") == 0


def test_connections_that_say_nothing_cannot_lock_out_scrapes_or_the_control_socket(make_pair, tmp_path):
    """Both small servers take 16 connections. Twenty that connect and send nothing (to each)
    do not keep Prometheus or `tandem status` out: a new connection replaces the one that has
    waited longest for its request, and an idle one is closed after the request timeout (10 s)."""
    import socket
    import time
    from conftest import TANDEM_BIN, run
    p = make_pair()
    ports = serve_metrics(p, tmp_path)
    p.up("alpha", "--primary")
    p.wait_for("alpha", r"metrics: http://")
    control = str(tmp_path / "alpha.sock")
    assert json.loads(run([TANDEM_BIN, "status", str(p.resource), "--node", "alpha", "--json"]).stdout)["role"] == "Primary"
    idle = []
    for _ in range(20):
        idle.append(socket.create_connection(("127.0.0.1", ports["alpha"]), timeout=30))
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        u.connect(control)  # blocking: waits while the listen backlog is full
        u.settimeout(30)
        idle.append(u)
    try:
        assert value(scrape(ports["alpha"]), "tandem_primary", node="alpha") == 1
        out = run([TANDEM_BIN, "status", str(p.resource), "--node", "alpha", "--json"]).stdout
        assert json.loads(out)["role"] == "Primary", out
        # The idle connections still open are closed by the timeout: recv sees the end.
        started = time.monotonic()
        for s in idle:
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 25
    finally:
        for s in idle:
            s.close()
    # Both servers still answer after all that.
    assert value(scrape(ports["alpha"]), "tandem_primary", node="alpha") == 1
    assert json.loads(run([TANDEM_BIN, "status", str(p.resource), "--node", "alpha", "--json"]).stdout)["role"] == "Primary"
