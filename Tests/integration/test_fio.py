"""fio's NBD engine: 4 jobs (4 connections), queue depth 32, 4 KiB random
writes with crc32c verification."""

import json

from conftest import MiB, run

SIZE = 64 * MiB


def fio(uri, tmp_path, *args, timeout=240):
    out = tmp_path / "fio.json"
    argv = ["fio", "--name=tandem", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
            f"--output={out}", "--group_reporting=0", "--runtime=180", "--verify_state_save=0", *args]
    cp = run(argv, timeout=timeout, check=False, cwd=tmp_path)
    text = out.read_text() if out.exists() else ""
    # fio writes its json after a few possible warning lines
    start = text.find("{")
    report = json.loads(text[start:]) if start >= 0 else None
    problems = [l for l in (cp.stderr_text + cp.stdout_text).splitlines()
                if any(w in l.lower() for w in ("verify", "error", "bad", "fail", "crc"))]
    assert cp.returncode == 0 and not problems and report is not None, (
        f"fio exit {cp.returncode}\n--- stderr ---\n{cp.stderr_text}\n--- stdout ---\n{cp.stdout_text}"
        f"\n--- report ---\n{text[-4000:]}")
    for job in report["jobs"]:
        assert job["error"] == 0, f"fio job {job['jobname']} error {job['error']}"
    return report


def test_fio_randwrite_verify(serve, engine, tmp_path):
    srv = serve.start(size=SIZE, engine=engine)
    per_job = SIZE // 4
    rep = fio(srv.uri(), tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=4",
              f"--size={per_job}", f"--offset_increment={per_job}",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_dump=0")
    jobs = rep["jobs"]
    assert len(jobs) == 4
    for job in jobs:
        assert job["write"]["io_bytes"] == per_job, f"job wrote {job['write']['io_bytes']}"
        # the verify phase read everything back
        assert job["read"]["io_bytes"] == per_job, f"job verified {job['read']['io_bytes']}"
    srv.assert_alive()


def test_fio_mixed_unaligned_sizes(serve, tmp_path):
    """Mixed random read/write with variable block sizes and a verify backlog."""
    srv = serve.start(size=SIZE, engine="uring")
    rep = fio(srv.uri(), tmp_path, "--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16",
              "--numjobs=2", f"--size={SIZE // 2}", f"--offset_increment={SIZE // 2}",
              "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1", "--norandommap=0")
    for job in rep["jobs"]:
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
