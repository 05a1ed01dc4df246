"""Resource files and metadata: `tandem config check`, `tandem init`, `tandem dump-metadata`."""

import json
import os

import pytest

from conftest import MiB, TANDEM_BIN, make_backing, run


def write_resource(tmp_path, **overrides):
    run([TANDEM_BIN, "certs", "--dir", str(tmp_path / "pki"), "--node", "alpha", "--node", "beta"])
    for name in ("alpha", "beta"):
        make_backing(tmp_path / f"{name}.img", overrides.pop(f"{name}_size", 64 * MiB))
    text = f'''resource = "r0"

[tls]
ca = "{tmp_path}/pki/ca-cert.pem"

[tuning]
bitmap-granularity = "4KiB"
peer-timeout-ms = 6000
'''
    for i, name in enumerate(("alpha", "beta")):
        text += f'''
[[node]]
name = "{name}"
id = {i}
address = "127.0.0.1:{7788 + i}"
device = "{tmp_path}/{name}.img"
metadata = "{tmp_path}/{name}.meta"
nbd = "127.0.0.1:{10809 + i}"
control = "{tmp_path}/{name}.sock"
cert = "{tmp_path}/pki/{name}-cert.pem"
key = "{tmp_path}/pki/{name}-key.pem"
'''
    for old, new in overrides.get("replace", []):
        assert old in text
        text = text.replace(old, new, 1)
    path = tmp_path / "r0.toml"
    path.write_text(text)
    return path


def tandem(*args, check=False):
    return run([TANDEM_BIN, *map(str, args)], check=check, timeout=30)


def test_config_check_accepts_a_valid_file(tmp_path):
    path = write_resource(tmp_path)
    cp = tandem("config", "check", path, "--node", "alpha")
    assert cp.returncode == 0, cp.stderr_text
    assert "valid" in cp.stdout_text and "alpha" in cp.stdout_text and "beta" in cp.stdout_text


@pytest.mark.parametrize("old,new,line_text,message", [
    ('address = "127.0.0.1:7789"', 'adress = "127.0.0.1:7789"', "adress", "did you mean 'address'"),
    ("id = 1", 'id = "one"', 'id = "one"', "must be an integer"),
    ('address = "127.0.0.1:7789"', 'address = "127.0.0.1:7788"', 'address = "127.0.0.1:7788"', "is also the 'address' of node 'alpha'"),
    ('bitmap-granularity = "4KiB"', 'bitmap-granularity = "3KiB"', "bitmap-granularity", "power of two"),
    ("peer-timeout-ms = 6000", "peer-timeout-ms = 10", "peer-timeout-ms", ""),
    ('resource = "r0"', 'resource = "r0', 'resource = "r0', ""),
])
def test_config_errors_name_file_line_and_fix(tmp_path, old, new, line_text, message):
    path = write_resource(tmp_path, replace=[(old, new)])
    cp = tandem("config", "check", path)
    assert cp.returncode != 0
    err = cp.stderr_text
    assert f"{path}:" in err, err
    # The reported line is the line holding the offending text (or, for a missing key, its table).
    lines = path.read_text().splitlines()
    reported = {int(part.split(":")[1]) for part in err.split("error: ")[1:] if part.startswith(str(path))}
    assert any(line_text in lines[n - 1] or lines[n - 1].startswith("[[node]]") for n in reported), (err, reported)
    assert message in err, err


def test_config_check_reports_missing_files_for_the_node(tmp_path):
    path = write_resource(tmp_path)
    os.remove(tmp_path / "alpha.img")
    cp = tandem("config", "check", path, "--node", "alpha")
    assert cp.returncode != 0 and "alpha.img" in cp.stderr_text, cp.stderr_text
    assert tandem("config", "check", path, "--node", "beta").returncode == 0


def test_init_writes_metadata_and_refuses_to_overwrite(tmp_path):
    path = write_resource(tmp_path)
    cp = tandem("init", path, "--node", "alpha")
    assert cp.returncode == 0, cp.stderr_text
    assert "new and zeroed" in cp.stdout_text, "a file with no data is a new, zeroed device"
    meta = tmp_path / "alpha.meta"
    assert meta.read_bytes()[:8] == b"TNDMMETA"
    assert os.stat(meta).st_mode & 0o777 == 0o600
    dump = json.loads(tandem("dump-metadata", meta, "--json", check=True).stdout_text)
    assert dump["resource"] == "r0" and dump["node_id"] == 0
    assert dump["device_bytes"] == 64 * MiB
    assert "new-zeroed" in dump["flags"]
    assert dump["out_of_sync_bytes"] == 0 and dump["activity_log"]["hot_extents"] == 0
    before = meta.read_bytes()
    cp = tandem("init", path, "--node", "alpha")
    assert cp.returncode != 0 and "already holds metadata" in cp.stderr_text
    assert meta.read_bytes() == before, "a refused init changes nothing"
    assert tandem("init", path, "--node", "alpha", "--force").returncode == 0


def test_init_of_a_device_with_data_is_not_zeroed(tmp_path):
    path = write_resource(tmp_path)
    with open(tmp_path / "beta.img", "r+b") as f:
        f.seek(4096)
        f.write(b"x" * 4096)
    assert tandem("init", path, "--node", "beta", check=True).returncode == 0
    dump = json.loads(tandem("dump-metadata", tmp_path / "beta.meta", "--json", check=True).stdout_text)
    assert "new-zeroed" not in dump["flags"]


def test_dump_metadata_refuses_damaged_metadata(tmp_path):
    path = write_resource(tmp_path)
    tandem("init", path, "--node", "alpha", check=True)
    meta = tmp_path / "alpha.meta"
    data = bytearray(meta.read_bytes())
    data[100] ^= 0xFF  # inside superblock slot A: its checksum no longer matches
    meta.write_bytes(bytes(data))
    cp = tandem("dump-metadata", meta)
    assert cp.returncode != 0 and "no valid superblock" in cp.stderr_text, cp.stderr_text
    assert "checksum" in cp.stderr_text
