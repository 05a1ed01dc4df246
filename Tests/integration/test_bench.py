"""`tandem bench` end to end in a tiny configuration: it must find its driver, benchmark the binary
it runs as, and leave a table, JSON and a chart. Speed is never asserted."""

import json
import subprocess
import time
import xml.etree.ElementTree as ET

from conftest import TANDEM_BIN, free_port, run

CASES = ["seq-read-1M/1c", "seq-read-1M/4c", "write-4k-qd1/1c", "write-4k-qd1/4c"]


def test_quick_run_prints_a_table_and_writes_json_and_a_chart(tmp_path):
    out = tmp_path / "run.json"
    # Two jobs (one needs the fill, one has two metrics) at 1 and 4 connections, on one node, a
    # replicated pair and nbdkit (skipped with a note where it is not installed), 1 s each.
    cp = run([TANDEM_BIN, "bench", "--quick", "--size", "16M", "--runtime", "1", "--ramp-time", "0",
              "--jobs", "seq-read-1M,write-4k-qd1", "--connections", "1,4",
              "--servers", "tandem-direct,tandem-replicated,nbdkit", "--no-resync", "--no-tls-link",
              "--dir", tmp_path, "--json", out], timeout=150)

    assert "[1/" in cp.stderr_text, f"no progress lines on stderr:\n{cp.stderr_text}"
    for case in CASES:
        assert case in cp.stdout_text, f"{case} missing from the table:\n{cp.stdout_text}"
    assert "p99 µs" in cp.stdout_text and "tandem-replicated" in cp.stdout_text

    report = json.loads(out.read_text())
    assert report["schema"] == 2
    assert report["driver"] == "tandem bench"
    assert report["tandem_bin"] and report["tandem_build"] in ("debug", "release")
    assert report["options"]["connections"] == [1, 4]
    assert sorted(report["cases"]) == sorted(CASES)
    for server in ("tandem-direct", "tandem-replicated"):
        assert report["servers"][server]["status"] == "ok", report["servers"][server]
        for case in CASES:
            entry = report["results"][server][case]
            assert entry["status"] == "ok", (server, case, entry.get("error"))
            assert {"mib_s", "iops", "p50_us", "p99_us"} <= entry["summary"].keys()
            # What the job cost: the server's CPU (both nodes for the pair) and fio's.
            assert entry["summary"]["server_cpu_us_per_io"] > 0, (server, case, entry["summary"])
            assert entry["summary"]["fio_cpu_us_per_io"] > 0, (server, case, entry["summary"])
    qd1 = report["results"]["tandem-replicated"]["write-4k-qd1/1c"]["summary"]
    assert qd1["alpha_cpu_s_per_gib"] > 0 and qd1["beta_cpu_s_per_gib"] > 0, qd1
    assert abs(qd1["alpha_cpu_s_per_gib"] + qd1["beta_cpu_s_per_gib"] - qd1["server_cpu_s_per_gib"]) < 1e-3
    assert "CPU cost of the 1 MiB jobs" in cp.stdout_text
    assert report["results"]["tandem-direct"]["write-4k-qd1/4c"]["connections"] == 4
    assert "replicated_summary" in report
    assert report["servers"]["tandem-replicated"]["replicas_identical"] is True

    assert (tmp_path / "run.txt").read_text().strip() in cp.stdout_text
    chart = ET.parse(tmp_path / "run.svg").getroot()
    assert chart.tag == "{http://www.w3.org/2000/svg}svg"
    text = (tmp_path / "run.svg").read_text()
    assert "tandem-direct" in text and "write-4k-qd1/4c" in text and "<rect" in text


def test_tls_exports_are_benchmarked_over_nbds(tmp_path):
    """tandem-tls and nbdkit-tls run only when named, over nbds:// with a CA that fio and nbdinfo
    find in their HOME; the detail table compares tandem-tls with nbdkit-tls."""
    import shutil
    out = tmp_path / "tls.json"
    servers = ["tandem-tls"] + (["nbdkit-tls"] if shutil.which("nbdkit") else [])
    cp = run([TANDEM_BIN, "bench", "--quick", "--size", "16M", "--runtime", "1", "--ramp-time", "0",
              "--jobs", "seq-write-1M,rand-read-4k", "--connections", "1",
              "--servers", ",".join(servers), "--dir", tmp_path, "--json", out], timeout=150)
    report = json.loads(out.read_text())
    for server in servers:
        assert report["servers"][server]["status"] == "ok", report["servers"][server]
        for case in ("seq-write-1M/1c", "rand-read-4k/1c"):
            entry = report["results"][server][case]
            assert entry["status"] == "ok", (server, case, entry.get("error"))
            assert entry["summary"]["iops"] > 0
            assert entry["fio_cmd"][3].startswith("--uri=nbds://127.0.0.1:"), entry["fio_cmd"]
    log = (tmp_path / "tls-logs" / "tandem-tls.log").read_text()
    assert "over TLSv1.3 TLS_AES_128_GCM_SHA256 (records sealed here)" in log, log[-2000:]
    if "nbdkit-tls" in servers:
        assert "vs nbdkit-tls" in cp.stdout_text, cp.stdout_text
    # Not in the default matrix.
    cp = run([TANDEM_BIN, "bench", "--help"], timeout=30)
    assert "tandem-tls" in cp.stdout_text


def test_a_page_cache_pair_is_compared_with_the_page_cache_node(tmp_path):
    """--replicated-cache page runs both nodes with --cache page and compares the pair with
    tandem-page (and nbdkit), not tandem-direct."""
    out = tmp_path / "rp.json"
    cp = run([TANDEM_BIN, "bench", "--quick", "--size", "16M", "--runtime", "1", "--ramp-time", "0",
              "--jobs", "rand-write-4k", "--connections", "1", "--replicated-cache", "page",
              "--servers", "tandem-page,tandem-replicated", "--no-resync", "--no-tls-link",
              "--dir", tmp_path, "--json", out], timeout=150)
    report = json.loads(out.read_text())
    assert report["options"]["replicated_cache"] == "page"
    assert report["servers"]["tandem-replicated"]["replicas_identical"] is True
    summary = report["replicated_summary"]
    assert summary["rand_write_4k_vs_tandem_page"] > 0, summary
    assert "rand_write_4k_vs_tandem_direct" not in summary
    assert "alpha (primary, --cache page)" in cp.stdout_text, cp.stdout_text
    for node in ("alpha", "beta"):
        first = (tmp_path / "rp-logs" / f"tandem-replicated-{node}.log").read_text().splitlines()[0]
        assert " up " in first and f"--node {node} --cache page" in first, first


def test_nbd_server_runs_as_a_daemon(tmp_path):
    """nbd-server is started through its own class (a daemon found by PID)."""
    import shutil
    import pytest
    if not shutil.which("nbd-server"):
        pytest.skip("nbd-server not installed")
    out = tmp_path / "nbds.json"
    run([TANDEM_BIN, "bench", "--quick", "--size", "16M", "--runtime", "1", "--ramp-time", "0",
         "--jobs", "write-4k-qd1", "--connections", "1", "--servers", "nbd-server",
         "--dir", tmp_path, "--json", out], timeout=120)
    report = json.loads(out.read_text())
    assert report["servers"]["nbd-server"]["status"] == "ok", report["servers"]["nbd-server"]
    assert report["results"]["nbd-server"]["write-4k-qd1/1c"]["status"] == "ok"
    # Its CPU is its per-connection child's: counted though the child is not the daemon.
    assert report["results"]["nbd-server"]["write-4k-qd1/1c"]["summary"]["server_cpu_us_per_io"] > 0


def test_rounds_interleave_the_servers_and_report_medians(tmp_path):
    """Every server is started first, then each job runs against every server in turn, once per
    round, odd rounds in reverse; a cell's summary is the median of its rounds."""
    out = tmp_path / "rounds.json"
    cp = run([TANDEM_BIN, "bench", "--quick", "--size", "16M", "--runtime", "1", "--ramp-time", "0",
              "--jobs", "write-4k-qd1,rand-read-4k", "--connections", "1", "--rounds", "3",
              "--servers", "tandem-direct,tandem-page", "--dir", tmp_path, "--json", out], timeout=150)
    report = json.loads(out.read_text())
    assert report["options"]["rounds"] == 3
    runs = [line.split(" ... ")[0].split("] ", 1)[1] for line in cp.stderr_text.splitlines()
            if line.startswith("[") and " ... " in line]
    # Odd rounds (the second here) take the servers in reverse order.
    order = {1: ("tandem-direct", "tandem-page"), 2: ("tandem-page", "tandem-direct"),
             3: ("tandem-direct", "tandem-page")}
    expected = ["%s %s (round %d/3)" % (server, case, r)
                for r in (1, 2, 3) for case in ("write-4k-qd1/1c", "rand-read-4k/1c")
                for server in order[r]]
    assert runs == expected, cp.stderr_text
    first_job = cp.stderr_text.index("[1/")
    for server in ("tandem-direct", "tandem-page"):  # both up before any job runs
        assert -1 < cp.stderr_text.find("== %s on" % server) < first_job, cp.stderr_text
    for server in ("tandem-direct", "tandem-page"):
        for case in ("write-4k-qd1/1c", "rand-read-4k/1c"):
            entry = report["results"][server][case]
            assert entry["status"] == "ok", (server, case, entry.get("error"))
            rounds = entry["rounds"]
            assert len(rounds) == 3
            for key in ("iops", "p50_us", "mib_s"):
                assert entry["summary"][key] == sorted(r[key] for r in rounds)[1], (key, entry)
    assert "3 rounds; every cell is the median of its rounds" in cp.stdout_text
    # The detail table shows each cell's spread: its lowest and highest round.
    assert "rounds (min-max)" in cp.stdout_text
    qd1 = report["results"]["tandem-direct"]["write-4k-qd1/1c"]["rounds"]
    low, high = min(r["p50_us"] for r in qd1), max(r["p50_us"] for r in qd1)
    us = lambda v: "%.1f" % v if v < 100 else "%.0f" % v  # the table's format for µs
    detail = [line for line in cp.stdout_text.splitlines()
              if line.startswith("write-4k-qd1/1c") and "tandem-direct" in line]
    assert len(detail) == 1 and detail[0].rstrip().endswith("%s-%s" % (us(low), us(high))), cp.stdout_text


def test_bad_option_is_one_error_line(tmp_path):
    for bad, word in ((["--jobs", "bogus"], "bogus"), (["--rounds", "0"], "--rounds")):
        cp = run([TANDEM_BIN, "bench", *bad], check=False, timeout=30)
        assert cp.returncode != 0
        lines = cp.stderr_text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], cp.stderr_text


def test_link_probe_moves_every_byte_through_either_record_layer(tmp_path):
    """`tandem link-probe` (the TLS link limit's second method): one TLS 1.3 stream between two
    processes with the pair's certificates, through Tandem's record layer or OpenSSL's."""
    pki = tmp_path / "pki"
    run([TANDEM_BIN, "certs", "--dir", pki, "--node", "alpha", "--node", "beta"], timeout=60)
    total = 64 << 20
    for extra, in_tandem in (([], True), (["--openssl-records"], False)):
        port = free_port()
        args = ["--port", str(port), "--pki", str(pki), "--bytes", str(total)] + extra
        sender = subprocess.Popen([TANDEM_BIN, "link-probe", "--role", "send"] + args,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            got = None
            for _ in range(100):  # the receiver dials once the sender listens
                cp = run([TANDEM_BIN, "link-probe", "--role", "recv"] + args, check=False, timeout=60)
                if cp.returncode == 0:
                    got = json.loads(cp.stdout_text)
                    break
                time.sleep(0.05)
            out, err = sender.communicate(timeout=60)
        finally:
            sender.kill()
        assert got is not None, f"receiver never connected: {cp.stderr_text}"
        sent = json.loads(out)
        assert sent["bytes"] == total and got["bytes"] == total, (sent, got)
        assert sent["version"] == "TLSv1.3" and sent["cipher"] == "TLS_AES_128_GCM_SHA256", sent
        assert sent["records_in_tandem"] is in_tandem and got["records_in_tandem"] is in_tandem
        assert sent["cpu_s"] > 0 and got["cpu_s"] > 0, (sent, got)


def test_the_tls_link_limit_is_the_faster_of_two_streams(tmp_path):
    out = tmp_path / "run.json"
    run([TANDEM_BIN, "bench", "--quick", "--size", "16M", "--runtime", "1", "--ramp-time", "0",
         "--jobs", "write-4k-qd1", "--connections", "1", "--servers", "tandem-replicated",
         "--no-resync", "--dir", tmp_path, "--json", out], timeout=240)
    link = json.loads(out.read_text())["tls_link"]
    methods = link["methods"]
    assert set(methods) == {"openssl", "tandem"}, link
    assert all(m["mib_s"] > 0 for m in methods.values()), link
    assert all(m["cpu_s_per_gib"]["send"] > 0 and m["cpu_s_per_gib"]["recv"] > 0
               for m in methods.values()), link
    assert link["mib_s"] == max(m["mib_s"] for m in methods.values())
    assert link["cipher"] == "TLS_AES_128_GCM_SHA256", "the probe uses the link's suites"
