"""Operations (issue 8): `tandem config check` for each kind of error, `tandem status --json`
against its schema (Protocol/status.schema.json), `tandem check` exit codes in each state with
real processes, progress of wait-sync / verify / diff / apply, JSON logs, examples in every
--help, the systemd units and tools/install."""

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MiB, REPO_ROOT, TANDEM_BIN, make_backing, run
from test_replication import Pair, make_pair, pair, qemu_io  # noqa: F401 (fixtures)

SCHEMA = json.loads((REPO_ROOT / "Protocol" / "status.schema.json").read_text())


def tandem(*args, timeout=60):
    return run([TANDEM_BIN, *map(str, args)], check=False, timeout=timeout)


# ---------------------------------------------------------------------------
# tandem config check: one bad file per kind of error


def resource_text(tmp_path, alpha_size=64 * MiB, beta_size=64 * MiB):
    if not (tmp_path / "pki").exists():
        run([TANDEM_BIN, "certs", "--dir", str(tmp_path / "pki"), "--node", "alpha", "--node", "beta"])
    make_backing(tmp_path / "alpha.img", alpha_size)
    make_backing(tmp_path / "beta.img", beta_size)
    text = f'resource = "r0"\n\n[tls]\nca = "{tmp_path}/pki/ca-cert.pem"\n\n[tuning]\npeer-timeout-ms = 6000\n'
    for i, name in enumerate(("alpha", "beta")):
        text += (f'\n[[node]]\nname = "{name}"\nid = {i}\naddress = "127.0.0.1:{7788 + i}"\n'
                 f'device = "{tmp_path}/{name}.img"\nmetadata = "{tmp_path}/{name}.meta"\n'
                 f'nbd = "127.0.0.1:{10809 + i}"\ncontrol = "{tmp_path}/{name}.sock"\n'
                 f'cert = "{tmp_path}/pki/{name}-cert.pem"\nkey = "{tmp_path}/pki/{name}-key.pem"\n')
    return text


def line_of(text, needle, nth=0):
    """1-based number of the nth line containing needle."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) > nth, (needle, text)
    return hits[nth]


# Each case: how to spoil the file (text replacements, files to remove, sizes), the line the
# error must name (the line holding `at`), and words its message must hold.
CASES = {
    "unknown key": dict(replace=[('nbd = "127.0.0.1:10810"', 'nbdd = "127.0.0.1:10810"')], at="nbdd =",
                        words=["unknown key 'nbdd'", "did you mean 'nbd'"]),
    "wrong type": dict(replace=[("peer-timeout-ms = 6000", 'peer-timeout-ms = "6000"')], at="peer-timeout-ms",
                       words=["must be an integer", "remove the quotes"]),
    "missing TLS file": dict(remove=["pki/alpha-key.pem"], node="alpha", at="alpha-key.pem",
                             words=["private key of node 'alpha'", "does not exist", "tandem certs"]),
    "missing CA": dict(remove=["pki/ca-cert.pem"], node="alpha", at="ca-cert.pem",
                       words=["CA certificate", "does not exist"]),
    "duplicate address": dict(replace=[('address = "127.0.0.1:7789"', 'address = "127.0.0.1:7788"')],
                              at='address = "127.0.0.1:7788"', nth=1, words=["is also the 'address' of node 'alpha'"]),
    "size mismatch": dict(beta_size=32 * MiB, node="alpha", at="alpha.img",
                          words=["33554432 bytes", "must be the same size", "truncate -s 67108864"]),
    "size not in blocks": dict(alpha_size=64 * MiB + 512, beta_size=64 * MiB + 512, node="alpha", at="alpha.img",
                               words=["not a whole number of 4096-byte blocks", "truncate -s 67112960"]),
    "device resized after init": dict(init="alpha", grow=True, node="alpha", at="alpha.meta",
                                      words=["was made for a 67108864-byte device", "tandem init"]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_config_check_names_file_line_and_fix_for_each_kind(tmp_path, kind):
    case = CASES[kind]
    text = resource_text(tmp_path, case.get("alpha_size", 64 * MiB), case.get("beta_size", 64 * MiB))
    for old, new in case.get("replace", []):
        assert old in text
        text = text.replace(old, new, 1)
    path = tmp_path / "r0.toml"
    path.write_text(text)
    if "init" in case:
        run([TANDEM_BIN, "init", path, "--node", case["init"]])
    if case.get("grow"):
        os.truncate(tmp_path / "alpha.img", 128 * MiB)
        os.truncate(tmp_path / "beta.img", 128 * MiB)
    for name in case.get("remove", []):
        os.remove(tmp_path / name)
    args = ["config", "check", path] + (["--node", case["node"]] if "node" in case else [])
    cp = tandem(*args)
    assert cp.returncode == 1, (kind, cp.stdout_text, cp.stderr_text)
    errors = [line for line in cp.stderr_text.splitlines() if line.startswith("error: ")]
    assert errors, cp.stderr_text
    want = line_of(text, case["at"], case.get("nth", 0))
    matching = [e for e in errors if e.startswith(f"error: {path}:{want}: ")]
    assert matching, f"{kind}: no error on {path}:{want} ({text.splitlines()[want - 1]!r}):\n{cp.stderr_text}"
    message = matching[0]
    for word in case["words"]:
        assert word in message, f"{kind}: {word!r} not in {message!r}"
    assert re.search(r"\(fix: .+\)$", message), f"{kind}: no fix in {message!r}"
    # The valid file passes.
    if "node" not in case and "replace" in case:
        ok = tmp_path / "ok.toml"
        ok.write_text(resource_text(tmp_path))
        assert tandem("config", "check", ok, "--node", "alpha").returncode == 0


# ---------------------------------------------------------------------------
# tandem status --json against Protocol/status.schema.json


def schema_problems(value, schema, where="$"):
    """A checker for the part of JSON Schema that status.schema.json uses: type, enum,
    required, properties, additionalProperties (true), minimum."""
    problems = []
    types = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}

    def is_type(v, name):
        if name == "integer":
            return isinstance(v, int) and not isinstance(v, bool)
        if name == "number":
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        return isinstance(v, types[name])

    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(is_type(value, t) for t in allowed):
            return [f"{where}: {value!r} is not of type {allowed}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and is_type(value, "number") and value < schema["minimum"]:
        problems.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{where}: missing {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += schema_problems(value[key], sub, f"{where}.{key}")
        if schema.get("additionalProperties") is False:
            problems += [f"{where}: unexpected {k!r}" for k in value if k not in schema.get("properties", {})]
    return problems


def status_json(pair, name):
    cp = tandem("status", pair.resource, "--node", name, "--json")
    assert cp.returncode == 0, cp.stderr_text
    return json.loads(cp.stdout_text)


def assert_schema(doc):
    problems = schema_problems(doc, SCHEMA)
    assert not problems, f"status does not match Protocol/status.schema.json: {problems}\n{doc}"


def test_the_schema_checker_catches_what_it_should():
    good = {"resource": "r0", "node": "a", "role": "Primary", "disk": "UpToDate", "split_brain": False, "quorum": None,
            "peer": {"node": "b", "connection": "Connected", "role": "Secondary", "disk": "UpToDate",
                     "replication": "Established", "out_of_sync_bytes": 0, "resync_done_bytes": 0},
            "writes_in_flight": 0, "transfer_log_entries": 0,
            "verify": {"running": False, "checked_bytes": 0, "mismatched_bytes": 0, "total_bytes": 1},
            "rollback": {"running": False, "barrier": None, "done_chunks": 0, "total_chunks": 0, "failed": False},
            "diff": {"running": False, "from": None, "to": None, "output": None, "done_bytes": 0, "total_bytes": 0,
                     "chunks": None, "stream_bytes": None, "error": None}}
    assert schema_problems(good, SCHEMA) == []
    bad = json.loads(json.dumps(good))
    bad["role"] = "primary"
    bad["peer"]["out_of_sync_bytes"] = -1
    bad["verify"]["running"] = 1
    del bad["quorum"]
    problems = schema_problems(bad, SCHEMA)
    assert len(problems) == 4, problems


def test_status_doc_describes_every_schema_field():
    doc = (REPO_ROOT / "Protocol" / "status.md").read_text()

    def fields(schema, prefix=""):
        for key, sub in schema.get("properties", {}).items():
            yield prefix + key
            yield from fields(sub, prefix + key + ".")

    missing = [f for f in fields(SCHEMA) if f"`{f}`" not in doc]
    assert not missing, f"Protocol/status.md does not document {missing}"


def test_status_json_of_live_nodes_matches_the_schema(pair):
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    a, b = status_json(pair, "alpha"), status_json(pair, "beta")
    for doc in (a, b):
        assert_schema(doc)
    assert a["quorum"] is None, "no witness: quorum is null"
    assert (a["role"], b["role"], a["peer"]["connection"]) == ("Primary", "Secondary", "Connected")
    assert a["verify"]["total_bytes"] == 64 * MiB
    # Disconnected: the peer's role and disk become null, replication Off.
    since = pair.mark("alpha")
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down", since=since)
    a = status_json(pair, "alpha")
    assert_schema(a)
    assert a["peer"]["replication"] == "Off" and a["peer"]["disk"] is None
    # StandAlone after tandem disconnect.
    assert tandem("disconnect", pair.resource, "--node", "alpha").returncode == 0
    a = status_json(pair, "alpha")
    assert_schema(a)
    assert a["peer"]["connection"] == "Standalone"


# ---------------------------------------------------------------------------
# tandem check: Nagios exit codes with real processes


def check(pair, name):
    cp = tandem("check", pair.resource, "--node", name, timeout=30)
    lines = cp.stdout_text.splitlines()
    assert len(lines) == 1, f"one line expected:\n{cp.stdout_text}\n{cp.stderr_text}"
    assert cp.stderr_text == "", cp.stderr_text
    return cp.returncode, lines[0]


def wait_check(pair, name, code, timeout=30, contains=""):
    deadline = time.monotonic() + timeout
    while True:
        got, line = check(pair, name)
        if got == code and contains in line:
            return line
        assert time.monotonic() < deadline, f"check {name}: wanted exit {code}, last {got}: {line}"
        time.sleep(0.2)


def beta_nbd_uri(pair):
    port = re.search(r'name = "beta"(?:.|\n)*?nbd = "127\.0\.0\.1:(\d+)"', pair.resource.read_text()).group(1)
    return f"nbd://127.0.0.1:{port}/r0"


def test_check_exit_codes_in_each_state(make_pair):
    pair = make_pair('resync-rate-min = "1MiB"\nresync-rate-max = "2MiB"\n')
    # UNKNOWN: nothing runs.
    code, line = check(pair, "alpha")
    assert code == 3 and line.startswith("TANDEM UNKNOWN: ") and "not running" in line, line
    # OK: connected, both UpToDate.
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    code, line = check(pair, "alpha")
    assert code == 0 and line.startswith("TANDEM OK: r0 alpha Primary/UpToDate, beta Connected Secondary/UpToDate Established"), line
    assert "| out_of_sync=0B" in line
    assert check(pair, "beta")[0] == 0
    # WARNING: the secondary is gone, the primary serves alone.
    since = pair.mark("alpha")
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down", since=since)
    qemu_io(pair.uri, "write -P 0x21 0 6M", "flush")
    code, line = check(pair, "alpha")
    assert code == 1 and line.startswith("TANDEM WARNING: ") and "beta not connected: serving alone" in line, line
    # WARNING while the resync runs (2 MiB/s: about 3 s), with its progress; then OK.
    pair.up("beta")
    line = wait_check(pair, "alpha", 1, contains="resync to beta")
    assert re.search(r"resync to beta: \d+% done, [\d.]+ MiB left", line), line
    assert wait_check(pair, "alpha", 0).startswith("TANDEM OK")
    assert wait_check(pair, "beta", 0).startswith("TANDEM OK")
    # CRITICAL: StandAlone after tandem disconnect; the secondary is Outdated: WARNING.
    since = pair.mark("beta")
    assert tandem("disconnect", pair.resource, "--node", "alpha").returncode == 0
    pair.wait_for("beta", "disk outdated", since=since)
    code, line = check(pair, "alpha")
    assert code == 2 and line.startswith("TANDEM CRITICAL: ") and "StandAlone" in line, line
    code, line = check(pair, "beta")
    assert code == 1 and "local disk Outdated" in line, line
    # CRITICAL: split brain. beta is promoted by force and both write while apart.
    assert tandem("primary", pair.resource, "--node", "beta", "--force").returncode == 0
    qemu_io(beta_nbd_uri(pair), "write -P 0x31 20M 1M", "flush")
    qemu_io(pair.uri, "write -P 0x32 30M 1M", "flush")
    since = (pair.mark("alpha"), pair.mark("beta"))
    assert tandem("connect", pair.resource, "--node", "alpha").returncode == 0
    pair.wait_for("alpha", "SPLIT BRAIN", since=since[0])
    pair.wait_for("beta", "SPLIT BRAIN", since=since[1])
    for name in ("alpha", "beta"):
        code, line = check(pair, name)
        assert code == 2 and "split brain" in line, line
    # UNKNOWN: the node stopped.
    pair.stop("alpha")
    code, line = check(pair, "alpha")
    assert code == 3 and "not running" in line, line


def test_check_says_unknown_for_a_bad_resource_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('resource = "r0"\n[tlss]\n')
    cp = tandem("check", bad, "--node", "alpha")
    assert cp.returncode == 3 and cp.stdout_text.startswith("TANDEM UNKNOWN: ") and str(bad) in cp.stdout_text
    assert len(cp.stdout_text.splitlines()) == 1


# ---------------------------------------------------------------------------
# progress: wait-sync, verify --wait, diff, apply


def percent_lines(text, label):
    return [int(m) for m in re.findall(rf"^{re.escape(label)}: (\d+)% \(", text, re.M)]


def test_wait_sync_and_verify_show_progress(make_pair, tmp_path):
    pair = make_pair('resync-rate-min = "1MiB"\nresync-rate-max = "4MiB"\n')
    pair.up("beta")
    pair.up("alpha", "--primary")
    pair.wait_in_sync()
    since = pair.mark("alpha")
    pair.stop("beta", signal.SIGKILL)
    pair.wait_for("alpha", "link to beta down", since=since)
    qemu_io(pair.uri, "write -P 0x44 0 12M", "flush")
    pair.up("beta")
    cp = tandem("wait-sync", pair.resource, "--node", "alpha", "--timeout", "60", timeout=90)
    assert cp.returncode == 0, cp.stderr_text
    assert "alpha: in sync with beta" in cp.stdout_text
    steps = percent_lines(cp.stderr_text, "resync")
    assert steps and steps[-1] == 100 and steps == sorted(steps) and len(steps) >= 3, cp.stderr_text
    assert all(s % 5 == 0 for s in steps), "plain lines come every 5%, not on every poll"
    assert "\r" not in cp.stderr_text, "no terminal bar when stderr is not a terminal"
    # verify --wait: the same plain progress, then the result.
    cp = tandem("verify", pair.resource, "--node", "alpha", "--wait", timeout=120)
    assert cp.returncode == 0 and "verify finished: 67108864 bytes checked, 0 bytes differ" in cp.stdout_text, cp.stdout_text
    assert percent_lines(cp.stderr_text, "verify")[-1] == 100, cp.stderr_text
    # --no-progress: nothing on stderr.
    cp = tandem("wait-sync", pair.resource, "--node", "alpha", "--no-progress")
    assert cp.returncode == 0 and cp.stderr_text == ""


def test_wait_sync_fails_at_once_on_a_standalone_node(pair):
    pair.up("alpha", "--primary")
    pair.wait_for("alpha", "up as primary")
    assert tandem("disconnect", pair.resource, "--node", "alpha").returncode == 0
    cp = tandem("wait-sync", pair.resource, "--node", "alpha", timeout=20)
    assert cp.returncode == 1 and "StandAlone" in cp.stderr_text


def test_diff_and_apply_show_progress(tmp_path):
    disk = make_backing(tmp_path / "disk.img", 16 * MiB, fill=os.urandom(4 * MiB))
    cp = tandem("diff", "--device", disk, "0", "now", "--output", tmp_path / "full.tds")
    assert cp.returncode == 0, cp.stderr_text
    assert percent_lines(cp.stderr_text, "diff")[-1] == 100, cp.stderr_text
    cp = tandem("apply", tmp_path / "full.tds", "--to", tmp_path / "copy.img", "--create")
    assert cp.returncode == 0, cp.stderr_text
    assert percent_lines(cp.stderr_text, "apply: check")[-1] == 100, cp.stderr_text
    assert percent_lines(cp.stderr_text, "apply: write")[-1] == 100, cp.stderr_text
    assert (tmp_path / "copy.img").read_bytes() == disk.read_bytes()


def test_progress_is_a_bar_on_a_terminal(tmp_path):
    disk = make_backing(tmp_path / "disk.img", 16 * MiB, fill=os.urandom(1 * MiB))
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([TANDEM_BIN, "diff", "--device", str(disk), "0", "now", "--output", str(tmp_path / "f.tds")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, timeout=60)
        os.close(slave)
        slave = None
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    text = out.decode()
    assert "\r" in text and "diff  [" in text and "100%" in text and "#" * 30 in text, repr(text)


# ---------------------------------------------------------------------------
# logs


def test_up_logs_json_lines(pair):
    pair.up("beta", "--log-format", "json")
    pair.up("alpha", "--primary", "--log-format", "json", "--log-level", "debug")
    pair.wait_for("alpha", "established, 0 bytes out of sync")
    pair.wait_for("beta", "established, 0 bytes out of sync")
    assert pair.stop("alpha") == 0 and pair.stop("beta") == 0
    for name in ("alpha", "beta"):
        lines = pair.log(name).splitlines()
        assert len(lines) >= 3
        for line in lines:
            entry = json.loads(line)
            assert set(entry) == {"ts", "level", "label", "message", "metadata"}, entry
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), entry
            assert entry["level"] in ("trace", "debug", "info", "notice", "warning", "error", "critical")
            assert isinstance(entry["metadata"], dict)
    levels = {json.loads(line)["level"] for line in pair.log("alpha").splitlines()}
    assert "info" in levels
    cp = tandem("up", pair.resource, "--node", "alpha", "--log-format", "xml")
    assert cp.returncode != 0 and "unknown log format 'xml'" in cp.stderr_text


# ---------------------------------------------------------------------------
# --help


def subcommands(path):
    cp = run([TANDEM_BIN, *path, "--help"])
    text = cp.stdout_text
    if "SUBCOMMANDS:" not in text:
        return text, []
    names = re.findall(r"^  ([a-z][a-z-]*)(?:\s|$)", text.split("SUBCOMMANDS:", 1)[1], re.M)
    return text, [n for n in names if n != "help"]


def test_every_subcommand_help_has_examples():
    seen = []
    todo = [[]]
    while todo:
        path = todo.pop()
        text, children = subcommands(path)
        if path:
            seen.append(" ".join(path))
            assert "Examples:" in text, f"tandem {' '.join(path)} --help has no Examples: section"
            assert re.search(r"^\s+tandem ", text.split("Examples:", 1)[1], re.M), f"tandem {' '.join(path)}: no example command"
        todo += [path + [c] for c in children]
    for expected in ("serve", "config check", "status", "check", "wait-sync", "barrier list", "barrier export", "diff", "apply"):
        assert expected in seen, (expected, seen)


# ---------------------------------------------------------------------------
# systemd units and tools/install


UNITS = REPO_ROOT / "tools" / "systemd"


@pytest.mark.parametrize("unit", ["tandem@.service", "tandem-witness@.service"])
def test_unit_passes_systemd_analyze_verify(tmp_path, unit):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # An instance of the template, with the binary under test in place of /usr/local/bin/tandem
    # (verify insists that ExecStart= exists and is executable).
    text = (UNITS / unit).read_text()
    assert "/usr/local/bin/tandem up /etc/tandem/%i.toml --node ${NODE}" in text
    instance = tmp_path / unit.replace("@", "@r0")
    instance.write_text(text.replace("/usr/local/bin/tandem", TANDEM_BIN))
    cp = run(["systemd-analyze", "verify", "--man=no", str(instance)], check=False, timeout=60)
    output = cp.stdout_text + cp.stderr_text
    assert cp.returncode == 0, output
    # Unknown keys are only warnings to systemd-analyze: none may appear.
    assert instance.name not in output and "Unknown" not in output, output


def test_install_dry_run_changes_nothing(tmp_path):
    stage = tmp_path / "stage"
    cp = run([REPO_ROOT / "tools" / "install", "--dry-run", "--prefix", stage, "--binary", TANDEM_BIN])
    assert "would install" in cp.stdout_text and "etc/systemd/system/tandem@.service" in cp.stdout_text
    assert "dry run: nothing was changed" in cp.stdout_text
    assert not stage.exists()


def test_install_into_a_prefix_is_idempotent(tmp_path):
    stage = tmp_path / "stage"
    install = [REPO_ROOT / "tools" / "install", "--prefix", stage, "--binary", TANDEM_BIN]
    run(install)
    for rel in ("usr/local/bin/tandem", "etc/systemd/system/tandem@.service", "etc/systemd/system/tandem-witness@.service",
                "etc/tmpfiles.d/tandem.conf", "etc/tandem/example.env", "usr/local/share/doc/tandem/README.md",
                "usr/local/share/doc/tandem/Protocol/status.md"):
        assert (stage / rel).is_file(), rel
    for rel in ("etc/tandem", "var/lib/tandem", "run/tandem"):
        assert (stage / rel).is_dir() and (stage / rel).stat().st_mode & 0o777 == 0o750, rel
    assert os.access(stage / "usr/local/bin/tandem", os.X_OK)
    assert "d /run/tandem" in (stage / "etc/tmpfiles.d/tandem.conf").read_text()
    # The operator's edits to configuration survive a second run; everything else is unchanged.
    (stage / "etc/tandem/example.env").write_text("NODE=beta\n")
    cp = run(install)
    assert "installed" not in cp.stdout_text and "created" not in cp.stdout_text, cp.stdout_text
    assert (stage / "etc/tandem/example.env").read_text() == "NODE=beta\n"
    cp = run([REPO_ROOT / "tools" / "install", "--prefix", stage, "--binary", tmp_path / "missing"], check=False)
    assert cp.returncode != 0 and "no binary" in cp.stderr_text
