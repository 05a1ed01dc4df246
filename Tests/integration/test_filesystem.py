"""A real filesystem on the export: nbdfuse -> loop device -> ext4."""

import hashlib
import os
import subprocess
import time

import pytest

from conftest import MiB, run, _die_with_parent

SIZE = 128 * MiB


def _have_fs_support():
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE not available in this kernel/container)"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop devices (/dev/loop-control missing)"
    for tool in ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"{tool} not installed"
    return None


def _mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Cleanup:
    def __init__(self):
        self.steps = []

    def push(self, fn):
        self.steps.append(fn)

    def run(self):
        errors = []
        while self.steps:
            fn = self.steps.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                errors.append(repr(e))
        return errors


def write_files(mnt):
    sums = {}
    (mnt / "dir" / "sub").mkdir(parents=True)
    for i in range(24):
        data = os.urandom(37 * 1024 * (i + 1))
        p = mnt / "dir" / ("sub" if i % 2 else "") / f"f{i}.bin"
        p.write_bytes(data)
        sums[str(p.relative_to(mnt))] = hashlib.sha256(data).hexdigest()
    big = os.urandom(24 * MiB)
    (mnt / "big.bin").write_bytes(big)
    sums["big.bin"] = hashlib.sha256(big).hexdigest()
    return sums


def check_files(mnt, sums):
    for rel, digest in sums.items():
        got = hashlib.sha256((mnt / rel).read_bytes()).hexdigest()
        assert got == digest, f"{rel}: content changed"


@pytest.mark.parametrize("engine_opt,cache", [("uring", "direct"), ("threads", "page")])
def test_ext4_over_nbdfuse(serve, tmp_path, engine_opt, cache):
    why = _have_fs_support()
    if why:
        pytest.skip(f"filesystem test needs FUSE and loop devices: {why}")
    backing = serve.backing(SIZE)
    srv = serve.start(backing, engine=engine_opt, cache=cache)
    fusedir = tmp_path / "fuse"
    mnt = tmp_path / "mnt"
    fusedir.mkdir()
    mnt.mkdir()
    disk = fusedir / "disk"
    pidfile = tmp_path / "nbdfuse.pid"
    fuselog = open(tmp_path / "nbdfuse.log", "wb")
    cleanup = Cleanup()
    try:
        proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(disk), srv.uri()],
                                stdin=subprocess.DEVNULL, stdout=fuselog, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)

        def stop_fuse():
            if _mounted(fusedir):
                r = subprocess.run(["fusermount3", "-u", str(fusedir)], capture_output=True, timeout=30)
                if r.returncode and _mounted(fusedir):
                    subprocess.run(["fusermount3", "-u", "-z", str(fusedir)], capture_output=True, timeout=30)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        cleanup.push(stop_fuse)

        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None, (f"nbdfuse exited {proc.returncode}:\n"
                                         f"{(tmp_path / 'nbdfuse.log').read_text()}")
            assert time.monotonic() < deadline, "nbdfuse did not become ready in 30s"
            time.sleep(0.05)
        assert disk.stat().st_size == SIZE

        loop = run(["losetup", "-f", "--show", disk], timeout=30).stdout_text.strip()
        assert loop.startswith("/dev/loop"), loop
        cleanup.push(lambda: subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30))

        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop], timeout=120)
        run(["mount", "-t", "ext4", loop, mnt], timeout=60)

        def umount_mnt():
            if _mounted(mnt):
                r = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
                if r.returncode and _mounted(mnt):
                    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)
        cleanup.push(umount_mnt)

        sums = write_files(mnt)
        os.sync()
        run(["umount", mnt], timeout=60)
        # drop the loop device's cached pages so the next reads go to the server
        run(["blockdev", "--flushbufs", loop], timeout=30)
        run(["mount", "-t", "ext4", loop, mnt], timeout=60)
        check_files(mnt, sums)
        (mnt / "dir" / "f0.bin").unlink()
        del sums["dir/f0.bin"]
        run(["fstrim", "-v", mnt], timeout=60, check=False)  # exercises TRIM if supported
        os.sync()
        run(["umount", mnt], timeout=60)
        fsck = run(["fsck.ext4", "-n", "-f", loop], timeout=120, check=False)
        assert fsck.returncode == 0, f"fsck over NBD found problems:\n{fsck.stdout_text}{fsck.stderr_text}"

        errors = cleanup.run()
        assert not errors, errors
        assert proc.returncode == 0, (f"nbdfuse exited {proc.returncode}:\n"
                                      f"{(tmp_path / 'nbdfuse.log').read_text()}")
    finally:
        cleanup.run()
        fuselog.close()

    srv.stop_clean()
    # The backing file itself is a consistent ext4 image holding the files.
    fsck = run(["fsck.ext4", "-n", "-f", backing], timeout=120, check=False)
    assert fsck.returncode == 0, f"fsck of the backing file:\n{fsck.stdout_text}{fsck.stderr_text}"
    loop = run(["losetup", "-f", "--show", "-r", backing], timeout=30).stdout_text.strip()
    try:
        run(["mount", "-o", "ro", "-t", "ext4", loop, mnt], timeout=60)
        try:
            check_files(mnt, sums)
        finally:
            run(["umount", mnt], timeout=60, check=False)
    finally:
        run(["losetup", "-d", loop], timeout=30, check=False)
