"""Disk errors injected in the I/O layer (`--inject-fault`): the client gets the error the spec
names, the server keeps serving, and nothing else is disturbed."""

import pytest

from conftest import MiB, run


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw", uri]
    for c in cmds:
        args += ["-c", c]
    cp = run(args, check=False, timeout=60)
    return cp.returncode, cp.stdout_text + cp.stderr_text


def test_failed_writes_and_reads_reach_the_client_as_eio(serve, engine):
    srv = serve.start(size=8 * MiB, engine=engine,
                      extra=["--inject-fault", "write:EIO:offset=1M-2M", "--inject-fault", "read:EIO:offset=4M-5M"])
    uri = srv.uri()
    rc, out = qemu_io(uri, "write -P 0x5a 1M 64k")
    assert "Input/output error" in out, out
    rc, out = qemu_io(uri, "write -P 0x5b 0 64k", "read -P 0x5b 0 64k")
    assert rc == 0 and "Input/output error" not in out, out
    rc, out = qemu_io(uri, "read 4M 4k")
    assert "Input/output error" in out, out
    srv.assert_alive()
    assert "injecting faults" in srv.log_text()


def test_enospc_after_some_writes(serve):
    srv = serve.start(size=8 * MiB, extra=["--inject-fault", "write:ENOSPC:after=2"])
    rc, out = qemu_io(srv.uri(), "write 0 4k", "write 4k 4k", "write 8k 4k")
    assert out.count("wrote 4096/4096") == 2, out
    assert "No space left on device" in out, out
    srv.assert_alive()


@pytest.mark.parametrize("rule", ["bogus:EIO", "write:EWHAT", "write:EIO:offset=5-1", "write:EIO:sometimes", "write:5000", "flush:EIO:count=0"])
def test_bad_fault_rules_are_refused(tmp_path, rule):
    from conftest import TANDEM_BIN, make_backing
    disk = make_backing(tmp_path / "d.img", 4 * MiB)
    cp = run([TANDEM_BIN, "serve", str(disk), "--listen", "127.0.0.1:0", "--inject-fault", rule], check=False, timeout=20)
    assert cp.returncode != 0 and "error:" in cp.stderr_text, cp.stderr_text
