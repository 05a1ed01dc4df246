"""Point-in-time barriers on a running pair: the primary creates them in the replication
stream, the secondary keeps them restorable (copy-on-write undo store), exports them read-only,
and rolls the pair back after the primary's filesystem was wrecked."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import MiB, TANDEM_BIN, free_port, read_export, run, _die_with_parent
from nbdproto import CMD_READ, RawNBD
from test_filesystem import Cleanup, _have_fs_support, _mounted, check_files, write_files
from test_replication import make_pair, qemu_io  # noqa: F401 (fixture)


def barrier_pair(make_pair, tmp_path, barriers="", tuning=""):
    p = make_pair(tuning)
    text = p.resource.read_text()
    for name in ("alpha", "beta"):
        meta = f'metadata = "{tmp_path}/{name}.meta"\n'
        text = text.replace(meta, meta + f'undo = "{tmp_path}/{name}.undo"\n')
    if barriers:
        text = text.replace("\n[[node]]", f"\n[barriers]\n{barriers}\n\n[[node]]", 1)
    p.resource.write_text(text)
    run([TANDEM_BIN, "config", "check", str(p.resource)])
    p.up("beta")
    p.up("alpha", "--primary")
    p.wait_in_sync()
    return p


def tandem(p, *args, check=True, timeout=60):
    return run([TANDEM_BIN, args[0], *args[1:2], str(p.resource), *args[2:]] if args[0] == "barrier"
               else [TANDEM_BIN, args[0], str(p.resource), *args[1:]], check=check, timeout=timeout)


def create_barrier(p, label):
    since = p.mark("beta")
    out = tandem(p, "barrier", "create", "--node", "alpha", "--label", label).stdout_text
    barrier = int(re.search(r"barrier (\d+)", out).group(1))
    p.wait_for("beta", rf"barrier {barrier} '{label}' recorded", since=since)
    return barrier


class FuseDisk:
    """nbdfuse + loop device over an NBD URI, cleaned up in reverse order."""

    def __init__(self, tmp_path, uri, name):
        self.cleanup = Cleanup()
        self.fusedir = tmp_path / f"fuse-{name}"
        self.mnt = tmp_path / f"mnt-{name}"
        self.fusedir.mkdir()
        self.mnt.mkdir()
        pidfile = tmp_path / f"nbdfuse-{name}.pid"
        disk = self.fusedir / "disk"
        proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(disk), uri], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)

        def stop_fuse():
            if _mounted(self.fusedir):
                subprocess.run(["fusermount3", "-u", str(self.fusedir)], capture_output=True, timeout=30)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.cleanup.push(stop_fuse)
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "nbdfuse did not start"
            time.sleep(0.05)
        self.loop = run(["losetup", "-f", "--show", disk], timeout=30).stdout_text.strip()
        self.cleanup.push(lambda: subprocess.run(["losetup", "-d", self.loop], capture_output=True, timeout=30))

    def mount(self):
        run(["mount", "-t", "ext4", self.loop, self.mnt], timeout=60)
        self.cleanup.push(lambda: _mounted(self.mnt) and subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True))

    def umount(self):
        os.sync()
        run(["umount", self.mnt], timeout=60)

    def close(self):
        errors = self.cleanup.run()
        assert not errors, errors


def test_rollback_undoes_a_wrecked_filesystem_on_both_nodes(make_pair, tmp_path):
    why = _have_fs_support()
    if why:
        pytest.skip(f"needs FUSE and loop devices: {why}")
    p = barrier_pair(make_pair, tmp_path)
    size = (tmp_path / "alpha.img").stat().st_size
    disk = FuseDisk(tmp_path, p.uri, "a")
    try:
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", disk.loop], timeout=120)
        disk.mount()
        sums = write_files(disk.mnt)
        disk.umount()
    finally:
        disk.close()
    good = create_barrier(p, "good")
    image = (tmp_path / "alpha.img").read_bytes()
    # The corruption: files removed, then garbage over the start of the device.
    disk = FuseDisk(tmp_path, p.uri, "b")
    try:
        disk.mount()
        shutil.rmtree(disk.mnt / "dir")
        (disk.mnt / "big.bin").unlink()
        disk.umount()
    finally:
        disk.close()
    qemu_io(p.uri, "write -P 0xde 0 3M", "flush")
    assert (tmp_path / "beta.img").read_bytes()[:4096] != image[:4096], "the damage was mirrored, as it should be"
    # Look inside the barrier first: a read-only export, unchanged while writes go on.
    port = free_port()
    tandem(p, "barrier", "export", "--node", "beta", str(good), "--listen", f"127.0.0.1:{port}")
    uri = f"nbd://127.0.0.1:{port}/r0@{good}"
    assert read_export(uri, size) == image
    qemu_io(p.uri, "write -P 0xad 10M 5M", "flush")
    assert read_export(uri, size) == image, "the export changed while the primary wrote"
    listing = json.loads(tandem(p, "barrier", "list", "--node", "beta", "--json").stdout_text)
    assert [b["id"] for b in listing["barriers"]] == [good] and listing["barriers"][0]["bytes_held"] > 3 * MiB
    assert listing["barriers"][0]["exported"] == f"127.0.0.1:{port}"
    cp = tandem(p, "rollback", "--node", "beta", str(good), "--yes-destroy-newer-data", check=False)
    assert cp.returncode != 0 and "unexport" in cp.stderr_text
    tandem(p, "barrier", "unexport", "--node", "beta", str(good))
    cp = tandem(p, "rollback", "--node", "beta", str(good), "--yes-destroy-newer-data", check=False)
    assert cp.returncode != 0 and "demote it first" in cp.stderr_text
    cp = tandem(p, "rollback", "--node", "beta", str(good), check=False)
    assert cp.returncode != 0 and "--yes-destroy-newer-data" in cp.stderr_text
    # Roll back: demote the primary, roll back the secondary; alpha resyncs what changed.
    tandem(p, "secondary", "--node", "alpha")
    since = p.mark("beta")
    cp = tandem(p, "rollback", "--node", "beta", str(good), "--yes-destroy-newer-data")
    restored = int(re.search(r"(\d+) chunks restored", cp.stdout_text).group(1))
    assert "rollback" in cp.stderr_text and "100%" in cp.stderr_text, cp.stderr_text  # progress lines
    text = p.wait_for("beta", r"syncSource, (\d+) bytes out of sync", since=since)
    moved = int(re.findall(r"syncSource, (\d+) bytes out of sync", text)[-1])
    assert moved == restored * 64 * 1024, f"resynced {moved} bytes for {restored} restored chunks"
    assert moved < size // 2, "only what changed since the barrier"
    p.wait_for("beta", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", since=since)
    p.wait_for("alpha", r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync", since=0)
    tandem(p, "primary", "--node", "alpha")
    assert p.stop("alpha") == 0 and p.stop("beta") == 0
    a, b = (tmp_path / "alpha.img").read_bytes(), (tmp_path / "beta.img").read_bytes()
    assert a == image and b == image, "both devices equal the barrier's image"
    fsck = run(["fsck.ext4", "-n", "-f", str(tmp_path / "alpha.img")], check=False, timeout=120)
    assert fsck.returncode == 0, fsck.stdout_text + fsck.stderr_text
    # The files are back (read through a loop device on the rolled-back image).
    loop = run(["losetup", "-f", "--show", "-r", str(tmp_path / "alpha.img")]).stdout_text.strip()
    mnt = tmp_path / "check"
    mnt.mkdir()
    try:
        run(["mount", "-o", "ro", "-t", "ext4", loop, mnt])
        try:
            check_files(mnt, sums)
        finally:
            run(["umount", mnt])
    finally:
        run(["losetup", "-d", loop])


def test_retention_keeps_the_newest_and_scheduled_barriers_need_a_secondary(make_pair, tmp_path):
    p = barrier_pair(make_pair, tmp_path, barriers="keep = 3")
    ids = []
    for i in range(5):
        qemu_io(p.uri, f"write -P {0x10 + i} {i}M 1M")
        ids.append(create_barrier(p, f"b{i}"))
    listing = json.loads(tandem(p, "barrier", "list", "--node", "beta", "--json").stdout_text)
    assert [b["id"] for b in listing["barriers"]] == ids[2:], "the oldest go first"
    assert [b["label"] for b in listing["barriers"]] == ["b2", "b3", "b4"]
    on_primary = json.loads(tandem(p, "barrier", "list", "--node", "alpha", "--json").stdout_text)
    assert on_primary["kept_on"] == "beta" and [b["id"] for b in on_primary["barriers"]] == ids
    p.stop("beta", signal.SIGKILL)
    p.wait_for("alpha", "link to beta down")
    cp = tandem(p, "barrier", "create", "--node", "alpha", check=False)
    assert cp.returncode != 0 and "not connected" in cp.stderr_text


def test_a_killed_secondary_keeps_every_barrier_restorable(make_pair, tmp_path):
    p = barrier_pair(make_pair, tmp_path)
    size = (tmp_path / "alpha.img").stat().st_size
    images = {}
    fio = None
    for i in range(3):
        qemu_io(p.uri, f"write -P {0x20 + i} {8 * i}M 6M", "flush")
        b = create_barrier(p, f"k{i}")
        images[b] = (tmp_path / "alpha.img").read_bytes()
    # Random writes (each first overwrite saves a chunk) while beta is killed.
    fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={p.uri}", "--rw=randwrite", "--bs=4k",
                            "--iodepth=16", "--size=48M", "--time_based", "--runtime=20"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        time.sleep(1.5)
        p.stop("beta", signal.SIGKILL)
    finally:
        os.killpg(fio.pid, signal.SIGKILL)  # fio's job processes too
        fio.wait()
    since = p.mark("alpha")
    p.up("beta")
    p.wait_in_sync(since=since)
    for b, image in images.items():
        port = free_port()
        tandem(p, "barrier", "export", "--node", "beta", str(b), "--listen", f"127.0.0.1:{port}")
        assert read_export(f"nbd://127.0.0.1:{port}/r0@{b}", size) == image, f"barrier {b} does not restore exactly"
        tandem(p, "barrier", "unexport", "--node", "beta", str(b))


def test_diff_on_a_running_secondary_round_trips_while_it_replicates(make_pair, tmp_path):
    """`tandem diff` against the running secondary: a full stream and an incremental one, written
    by the node while random writes go on; applied, they give the barrier's exported image."""
    p = barrier_pair(make_pair, tmp_path)
    size = (tmp_path / "alpha.img").stat().st_size
    qemu_io(p.uri, "write -P 0x51 0 8M", "write -P 0x52 40M 3M", "flush")
    first = create_barrier(p, "nightly")
    qemu_io(p.uri, "write -P 0x53 4M 2M", "write -P 0x54 30M 1M", "discard 41M 512k", "write -P 0x55 63M 64k", "flush")
    second = create_barrier(p, "nightly")
    full, incremental = tmp_path / "full.tds", tmp_path / "incremental.tds"
    assert "running node diffs to a barrier" in tandem(p, "diff", "--node", "beta", str(first), "now", "--output", full, check=False).stderr_text
    assert "no barrier 12345" in tandem(p, "diff", "--node", "beta", "0", "12345", "--output", full, check=False).stderr_text
    fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={p.uri}", "--rw=randwrite", "--bs=4k",
                            "--iodepth=8", "--size=60M", "--time_based", "--runtime=60"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        time.sleep(0.5)
        since = p.mark("beta")
        cp = tandem(p, "diff", "--node", "beta", "0", str(first), "--output", full)
        assert f"wrote {full}" in cp.stdout_text and "diff" in cp.stderr_text  # the progress lines
        cp = tandem(p, "diff", "--node", "beta", str(first), str(second), "--output", incremental)
        assert re.search(r"wrote .*: \d+ chunks", cp.stdout_text)
        assert "rollback" not in p.log("beta")[since:]
        status = json.loads(tandem(p, "status", "--node", "beta", "--json").stdout_text)
        assert status["diff"]["running"] is False and status["diff"]["error"] is None
        assert status["diff"]["to"] == second and status["diff"]["stream_bytes"] == incremental.stat().st_size
        assert status["peer"]["connection"] == "Connected", "replication went on during the diffs"
        assert "link to beta down" not in p.log("alpha"), "the link never dropped"
    finally:
        os.killpg(fio.pid, signal.SIGKILL)
        fio.wait()
    assert fio.returncode is not None
    assert incremental.stat().st_size < full.stat().st_size / 4, "the incremental stream carries only the changed chunks"
    # Applied in order, the streams rebuild the image at the second barrier exactly.
    target = tmp_path / "restored.img"
    run([TANDEM_BIN, "apply", full, "--to", target, "--create"])
    run([TANDEM_BIN, "apply", incremental, "--to", target])
    port = free_port()
    tandem(p, "barrier", "export", "--node", "beta", str(second), "--listen", f"127.0.0.1:{port}")
    assert target.read_bytes() == read_export(f"nbd://127.0.0.1:{port}/r0@{second}", size)
    # The primary keeps no barriers (its undo store is empty): nothing to diff there.
    cp = tandem(p, "diff", "--node", "alpha", str(first), str(second), "--output", tmp_path / "x.tds", check=False)
    assert cp.returncode != 0 and f"no barrier {first} is retained" in cp.stderr_text, cp.stderr_text


def test_a_barrier_export_takes_the_resource_files_send_buffer(make_pair, tmp_path):
    """A barrier export's client sockets get `nbd-send-buffer`, as the node's own export's do
    (ss shows what the kernel keeps: twice the value)."""
    p = barrier_pair(make_pair, tmp_path, tuning='nbd-send-buffer = "64KiB"\n')
    qemu_io(p.uri, "write -P 0x5a 0 1M", "flush")
    b = create_barrier(p, "sndbuf")
    port = free_port()
    tandem(p, "barrier", "export", "--node", "beta", str(b), "--listen", f"127.0.0.1:{port}")
    c = RawNBD("127.0.0.1", port, timeout=30).connect(name=f"r0@{b}")
    try:
        assert c.request(CMD_READ, 0, MiB, cookie=1) == (0, b"\x5a" * MiB)
        out = run(["ss", "-tmnH", "state", "established", f"( sport = :{port} )"]).stdout_text
        assert [int(x) for x in re.findall(r"\btb(\d+)", out)] == [128 * 1024], out
    finally:
        c.close()
    tandem(p, "barrier", "unexport", "--node", "beta", str(b))
