"""The send buffer of NBD client sockets (`--send-buffer-kib`, the resource file's
`nbd-send-buffer`): bounded by default, so large replies reach the client while they are still
in the CPU's cache (Limits.nbdSendBufferBytesDefault)."""

import re
import subprocess

import pytest

from conftest import MiB, pattern
from nbdproto import CMD_READ, CMD_WRITE, RawNBD

SIZE = 64 * MiB


def socket_send_buffers(port):
    """SO_SNDBUF (ss's skmem tb, as the kernel keeps it: twice what was set) of the server's
    established sockets on `port`."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in re.findall(r"\btb(\d+)", out)]


@pytest.mark.parametrize("extra,expect", [([], 1024 * 1024), (["--send-buffer-kib", "256"], 512 * 1024),
                                          (["--send-buffer-kib", "0"], None)])
def test_client_sockets_get_the_send_buffer(serve, extra, expect):
    """A client's socket gets SO_SNDBUF 512 KiB by default (the kernel keeps 1 MiB), or what
    --send-buffer-kib says; 0 leaves the kernel's autotuning, which starts elsewhere."""
    srv = serve.start(size=SIZE, cache="page", extra=extra)
    c = RawNBD(srv.host, srv.port, timeout=60).connect()
    try:
        data = pattern("sndbuf", 2 * MiB)
        assert c.request(CMD_WRITE, 0, len(data), cookie=1, payload=data)[0] == 0
        assert c.request(CMD_READ, 0, len(data), cookie=2) == (0, data)
        buffers = socket_send_buffers(srv.port)
    finally:
        c.close()
    assert len(buffers) == 1, buffers
    if expect is None:
        assert buffers[0] not in (512 * 1024, 1024 * 1024), buffers
    else:
        assert buffers[0] == expect, buffers
