"""Point-in-time barriers offline: `tandem diff` / `tandem apply` round trips on real files, a
wrong base and a damaged stream refused with the target unchanged, kill -9 while the undo store
is being written (every retained barrier still restores exactly), retention dropping the oldest.
"""

import json
import os
import signal
import subprocess
import time

from conftest import MiB, TANDEM_BIN, make_backing, pattern, run


def tandem(*args, check=True, timeout=60):
    return run([TANDEM_BIN, *args], check=check, timeout=timeout)


def fails(*args):
    cp = tandem(*args, check=False)
    assert cp.returncode != 0, f"tandem {' '.join(map(str, args))} should fail:\n{cp.stdout_text}"
    errors = [line for line in cp.stderr_text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, cp.stderr_text
    return errors[0]


def write_through(tmp_path, undo, device, offset, data):
    src = tmp_path / "write.bin"
    src.write_bytes(data)
    tandem("barrier", "write", "--undo-dir", undo, "--device", device, "--offset", offset, "--input", src)


def store_with_three_barriers(tmp_path):
    """A device with barriers 1, 2, 3 and writes between them; returns the images at each."""
    device = make_backing(tmp_path / "device.img", 4 * MiB, fill=pattern("base", 4 * MiB))
    undo = tmp_path / "undo"
    images = {}
    for n in (1, 2, 3):
        tandem("barrier", "create", "--undo-dir", undo, "--device", device, "--label", f"step {n}")
        images[n] = device.read_bytes()
        for k in range(4):
            write_through(tmp_path, undo, device, (n * 977 + k * 300_001) % (4 * MiB - 70_000), pattern(f"{n}-{k}", 65_000 + k))
    return device, undo, images


def test_diff_apply_round_trip(tmp_path):
    device, undo, images = store_with_three_barriers(tmp_path)
    listed = json.loads(tandem("barrier", "list", "--undo-dir", undo, "--json").stdout_text)
    assert [b["id"] for b in listed["barriers"]] == [1, 2, 3]
    assert [b["label"] for b in listed["barriers"]] == ["step 1", "step 2", "step 3"]
    assert all(b["bytes_held"] > 128 for b in listed["barriers"])

    full1, d12, d23, d3now = (tmp_path / n for n in ("full1.tdiff", "d12.tdiff", "d23.tdiff", "d3now.tdiff"))
    tandem("diff", "--undo-dir", undo, "--device", device, "0", "1", "--output", full1)
    tandem("diff", "--undo-dir", undo, "--device", device, "1", "2", "--output", d12)
    tandem("diff", "--undo-dir", undo, "--device", device, "2", "3", "--output", d23)
    tandem("diff", "--undo-dir", undo, "--device", device, "3", "now", "--output", d3now)
    assert d12.stat().st_size < full1.stat().st_size / 4, "an incremental stream carries only changed chunks"

    target = tmp_path / "replica.img"
    tandem("apply", full1, "--to", target, "--create")
    assert target.read_bytes() == images[1]
    tandem("apply", d12, "--to", target)
    assert target.read_bytes() == images[2]
    tandem("apply", d23, "--to", target)
    assert target.read_bytes() == images[3]
    tandem("apply", d3now, "--to", target)
    assert target.read_bytes() == device.read_bytes()
    # The same stream again: nothing to write, the target already holds it.
    out = tandem("apply", d3now, "--to", target).stdout_text
    assert "0 chunks written" in out


def test_wrong_base_refused_and_target_unchanged(tmp_path):
    device, undo, images = store_with_three_barriers(tmp_path)
    d23 = tmp_path / "d23.tdiff"
    tandem("diff", "--undo-dir", undo, "--device", device, "2", "3", "--output", d23)
    target = tmp_path / "at1.img"
    target.write_bytes(images[1])
    line = fails("apply", d23, "--to", target)
    assert "does not hold the base" in line and "nothing written" in line
    assert target.read_bytes() == images[1]
    # A device of another size is refused too.
    small = make_backing(tmp_path / "small.img", 1 * MiB)
    assert "bytes" in fails("apply", d23, "--to", small)


def test_corrupt_stream_refused(tmp_path):
    device, undo, images = store_with_three_barriers(tmp_path)
    d12 = tmp_path / "d12.tdiff"
    tandem("diff", "--undo-dir", undo, "--device", device, "1", "2", "--output", d12)
    good = d12.read_bytes()
    target = tmp_path / "at1.img"
    for where in (10, 300, len(good) // 2, len(good) - 40, len(good) - 3):
        bad = bytearray(good)
        bad[where] ^= 0x20
        d12.write_bytes(bytes(bad))
        target.write_bytes(images[1])
        line = fails("apply", d12, "--to", target)
        assert "damaged" in line or "not a" in line, line
        assert target.read_bytes() == images[1], f"flip at {where} changed the target"
    for cut in (100, len(good) // 2, len(good) - 1):
        d12.write_bytes(good[:cut])
        target.write_bytes(images[1])
        fails("apply", d12, "--to", target)
        assert target.read_bytes() == images[1]
    d12.write_bytes(good + b"x")
    fails("apply", d12, "--to", target)
    assert target.read_bytes() == images[1]


def test_diff_errors_are_one_line(tmp_path):
    device, undo, _ = store_with_three_barriers(tmp_path)
    assert "no barrier 9" in fails("diff", "--undo-dir", undo, "--device", device, "1", "9", "--output", tmp_path / "x")
    fails("diff", "--undo-dir", undo, "--device", device, "3", "2", "--output", tmp_path / "x")
    fails("diff", "--device", device, "1", "2", "--output", tmp_path / "x")
    fails("apply", tmp_path / "missing.tdiff", "--to", device)
    fails("apply", device, "--to", tmp_path / "y.img")


def test_kill_9_while_writing_the_undo_store(tmp_path):
    """A writer with barriers is killed at random moments; after each kill every retained barrier
    still restores exactly (through a full stream and through rollback)."""
    device = make_backing(tmp_path / "device.img", 2 * MiB, fill=pattern("k9", 2 * MiB))
    undo, oracle = tmp_path / "undo", tmp_path / "oracle"
    oracle.mkdir()
    seen = set()
    for round_ in range(3):
        proc = subprocess.Popen(
            [TANDEM_BIN, "barrier", "torture", "--undo-dir", undo, "--device", device, "--oracle-dir", oracle,
             "--seed", str(round_ + 1), "--barrier-every", "7", "--keep", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            announced = 0
            deadline = time.monotonic() + 60
            while announced < 4 + round_ and time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, f"torture ended early: {proc.stderr.read()}"
                seen.add(int(line.split()[1]))
                announced += 1
            time.sleep(0.05 * (round_ + 1))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        # Announcements still in the pipe: each line was written whole after its image.
        for line in proc.stdout.read().splitlines(keepends=True):
            if line.endswith("\n"):
                seen.add(int(line.split()[1]))
        listed = json.loads(tandem("barrier", "list", "--undo-dir", undo, "--json").stdout_text)["barriers"]
        ids = [b["id"] for b in listed]
        assert ids and len(ids) <= 6, ids
        checked = 0
        for bid in ids:
            expected = oracle / f"{bid}.img"
            if bid not in seen or not expected.exists():
                continue  # created just before the kill: its expected image was never announced
            stream = tmp_path / f"full{bid}.tdiff"
            restored = tmp_path / f"restored{bid}.img"
            stream.unlink(missing_ok=True)
            restored.unlink(missing_ok=True)
            tandem("diff", "--undo-dir", undo, "--device", device, "0", str(bid), "--output", stream)
            tandem("apply", stream, "--to", restored, "--create")
            assert restored.read_bytes() == expected.read_bytes(), f"round {round_}: barrier {bid} does not restore"
            checked += 1
        assert checked >= 2
    # Finally roll the device itself back to the oldest announced barrier still retained.
    ids = [b["id"] for b in json.loads(tandem("barrier", "list", "--undo-dir", undo, "--json").stdout_text)["barriers"]]
    oldest = next(b for b in ids if b in seen)
    tandem("rollback", "--undo-dir", undo, "--device", device, str(oldest), "--yes-destroy-newer-data")
    assert device.read_bytes() == (oracle / f"{oldest}.img").read_bytes()
    listed = json.loads(tandem("barrier", "list", "--undo-dir", undo, "--json").stdout_text)["barriers"]
    assert [b["id"] for b in listed] == [b for b in ids if b <= oldest]


def test_retention_drops_the_oldest(tmp_path):
    device = make_backing(tmp_path / "device.img", 1 * MiB, fill=pattern("r", 1 * MiB))
    undo, oracle = tmp_path / "undo", tmp_path / "oracle"
    oracle.mkdir()
    cp = tandem("barrier", "torture", "--undo-dir", undo, "--device", device, "--oracle-dir", oracle,
                "--writes", "200", "--barrier-every", "10", "--keep", "4")
    assert "dropped barrier 1 (count)" in cp.stderr_text
    listed = json.loads(tandem("barrier", "list", "--undo-dir", undo, "--json").stdout_text)["barriers"]
    assert [b["id"] for b in listed] == [17, 18, 19, 20]
