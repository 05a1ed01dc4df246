"""TLS (FORCEDTLS, X.509 with client certificates) using certificates from
`tandem certs`."""

import os
import shutil
import ssl
import struct

import pytest

from conftest import HOST, MiB, TANDEM_BIN, nbdinfo_json, run
import nbdproto as P


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory):
    """An unrelated CA and its certificates."""
    d = tmp_path_factory.mktemp("othercerts")
    run([TANDEM_BIN, "certs", "--dir", d], timeout=120)
    return d


@pytest.fixture
def ca_only(tmp_path, certs_dir):
    d = tmp_path / "ca-only"
    d.mkdir()
    shutil.copy(certs_dir / "ca-cert.pem", d / "ca-cert.pem")
    return d


def tls_uri(srv, certdir, export="tandem"):
    return srv.uri(export=export, scheme="nbds", query=f"tls-certificates={certdir}")


def test_tls_nbdinfo(serve, certs_dir):
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir)
    info = nbdinfo_json(tls_uri(srv, certs_dir))
    assert info["TLS"] is True, info
    e = info["exports"][0]
    assert e["export-size"] == 8 * MiB
    assert e.get("block_size_minimum") == 512
    # the default export name over TLS too
    info = nbdinfo_json(tls_uri(srv, certs_dir, export=""))
    assert info["TLS"] is True


def test_tls_libnbd_io(serve, certs_dir):
    import nbd
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir)
    h = srv.libnbd_tls(certs_dir)
    data = os.urandom(MiB + 4096)
    h.pwrite(data, 4096)
    h.flush()
    assert h.pread(len(data), 4096) == data
    h.shutdown()


def test_plaintext_refused(serve, certs_dir):
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir)
    cp = run(["nbdinfo", srv.uri()], check=False, timeout=30)
    assert cp.returncode != 0, f"plaintext client was served by a TLS-only server:\n{cp.stdout_text}"
    # On the wire: GO/INFO/LIST before STARTTLS -> ERR_TLS_REQD, and the
    # connection stays usable for STARTTLS or ABORT.
    with P.RawNBD(HOST, srv.port) as c:
        c.handshake()
        assert c.go("tandem") == P.REP_ERR_TLS_REQD
        rtype, _ = c.option(P.OPT_LIST)
        assert rtype == P.REP_ERR_TLS_REQD, f"LIST before TLS -> {rtype:#x}"
        rtype, _ = c.option(P.OPT_ABORT)
        assert rtype == P.REP_ACK
    # NBD_OPT_EXPORT_NAME cannot carry an error: the server must disconnect.
    with P.RawNBD(HOST, srv.port) as c:
        c.handshake()
        c.send_option(P.OPT_EXPORT_NAME, b"tandem")
        c.wait_closed(10)
    srv.assert_alive()
    info = nbdinfo_json(tls_uri(srv, certs_dir))
    assert info["TLS"] is True


def test_client_without_certificate_refused(serve, certs_dir, ca_only):
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir)
    cp = run(["nbdinfo", tls_uri(srv, ca_only)], check=False, timeout=30)
    assert cp.returncode != 0, "a client without a certificate was accepted (client certs are required)"
    srv.assert_alive()
    nbdinfo_json(tls_uri(srv, certs_dir))


def test_anonymous_clients_allowed(serve, certs_dir, ca_only):
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir, tls_anonymous=True)
    info = nbdinfo_json(tls_uri(srv, ca_only))
    assert info["TLS"] is True
    # clients that do present a certificate are fine too
    nbdinfo_json(tls_uri(srv, certs_dir))
    # but TLS itself is still required
    assert run(["nbdinfo", srv.uri()], check=False, timeout=30).returncode != 0


def test_wrong_ca_fails(serve, certs_dir, other_certs):
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir)
    # the client does not trust the server's CA
    cp = run(["nbdinfo", tls_uri(srv, other_certs)], check=False, timeout=30)
    assert cp.returncode != 0, "client with an unrelated CA connected"
    srv.assert_alive()


def test_client_cert_from_other_ca_refused(serve, certs_dir, other_certs, tmp_path):
    """The client trusts the server, but its own certificate is signed by a CA
    the server does not know: the server must refuse it."""
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(certs_dir / "ca-cert.pem", d / "ca-cert.pem")
    shutil.copy(other_certs / "client-cert.pem", d / "client-cert.pem")
    shutil.copy(other_certs / "client-key.pem", d / "client-key.pem")
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir)
    cp = run(["nbdinfo", tls_uri(srv, d)], check=False, timeout=30)
    assert cp.returncode != 0, "server accepted a client certificate from an unknown CA"
    srv.assert_alive()
    nbdinfo_json(tls_uri(srv, certs_dir))


def test_nbdcopy_over_tls(serve, certs_dir, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 * MiB))
    backing = serve.backing(16 * MiB)
    srv = serve.start(backing, tls_dir=certs_dir)
    uri = tls_uri(srv, certs_dir)
    run(["nbdcopy", "--flush", src, uri], timeout=120)
    dst = tmp_path / "dst.img"
    run(["nbdcopy", uri, dst], timeout=120)
    assert dst.read_bytes() == src.read_bytes()
    srv.stop_clean()
    assert backing.read_bytes() == src.read_bytes()


def test_node_certificate_as_server_cert(serve, tmp_path):
    d = tmp_path / "nodecerts"
    run([TANDEM_BIN, "certs", "--dir", d, "--node", "n1", "--san", "tandem-n1.test"], timeout=120)
    srv = serve.start(size=4 * MiB, extra=["--tls-cert", d / "n1-cert.pem", "--tls-key", d / "n1-key.pem",
                                            "--tls-ca", d / "ca-cert.pem"])
    info = nbdinfo_json(tls_uri(srv, d))
    assert info["TLS"] is True


def _ssl_client_context(certdir, client_cert=True, version=None):
    """A client context trusting the test CA; `version` ("TLSv1.2"...) pins the TLS version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if version:
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version.replace(".", "_"))
    ctx.load_verify_locations(str(certdir / "ca-cert.pem"))
    if client_cert:
        ctx.load_cert_chain(str(certdir / "client-cert.pem"), str(certdir / "client-key.pem"))
    return ctx


def test_raw_starttls(serve, certs_dir):
    """STARTTLS by hand: negotiation state before TLS is dropped, a second
    STARTTLS is invalid, and the session works at TLS >= 1.2."""
    srv = serve.start(size=4 * MiB, tls_dir=certs_dir)
    c = P.RawNBD(HOST, srv.port)
    try:
        c.handshake()
        rtype, _ = c.option(P.OPT_STARTTLS)
        assert rtype == P.REP_ACK, f"STARTTLS -> {rtype:#x}"
        ctx = _ssl_client_context(certs_dir)
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3"), c.sock.version()
        rtype, _ = c.option(P.OPT_STARTTLS)
        assert rtype == P.REP_ERR_INVALID, f"second STARTTLS -> {rtype:#x}, want ERR_INVALID"
        c.structured_reply()
        assert c.go("tandem") == P.REP_ACK
        assert c.export_size == 4 * MiB
        err, data = c.request(P.CMD_READ, 0, 4096)
        assert err == 0 and data == bytes(4096)
        payload = os.urandom(8192)
        err, _ = c.request(P.CMD_WRITE, 8192, len(payload), payload=payload, cookie=2)
        assert err == 0
        err, data = c.request(P.CMD_READ, 8192, 8192, cookie=3)
        assert err == 0 and data == payload
        c.disconnect()
    finally:
        c.close()


def test_raw_starttls_without_client_cert(serve, certs_dir):
    srv = serve.start(size=4 * MiB, tls_dir=certs_dir)
    c = P.RawNBD(HOST, srv.port)
    try:
        c.handshake()
        rtype, _ = c.option(P.OPT_STARTTLS)
        assert rtype == P.REP_ACK
        ctx = _ssl_client_context(certs_dir, client_cert=False)
        refused = False
        try:
            c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
            # With TLS 1.3 the server's verdict on our (missing) certificate
            # arrives after the handshake: the next exchange must fail.
            rtype = c.go("tandem")
            refused = rtype != P.REP_ACK
        except (ssl.SSLError, P.Closed, ConnectionResetError, OSError, struct.error):
            refused = True
        assert refused, "TLS session without a client certificate was allowed to GO"
    finally:
        c.close()
    srv.assert_alive()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_tls_records_either_layer(serve, certs_dir, version):
    """A TLS 1.3 session has its records sealed and opened by Tandem's own
    record layer (the log says so); a TLS 1.2 session stays with OpenSSL's.
    Either way, payloads of many records and of odd sizes cross intact both
    ways, with several requests in flight."""
    srv = serve.start(size=8 * MiB, tls_dir=certs_dir)
    c = P.RawNBD(HOST, srv.port)
    try:
        c.handshake()
        rtype, _ = c.option(P.OPT_STARTTLS)
        assert rtype == P.REP_ACK
        ctx = _ssl_client_context(certs_dir, version=version)
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        assert c.sock.version() == version
        assert c.go("tandem") == P.REP_ACK
        sizes = [(0, MiB + 4096), (3 * MiB, 4096), (4 * MiB, 16384 + 512), (5 * MiB, 2 * MiB)]
        payloads = {off: os.urandom(n) for off, n in sizes}
        for i, (off, n) in enumerate(sizes):
            err, _ = c.request(P.CMD_WRITE, off, n, payload=payloads[off], cookie=10 + i)
            assert err == 0, f"write at {off}: error {err}"
        # All the reads in flight at once; replies come in any order.
        want = {20 + i: (off, n) for i, (off, n) in enumerate(sizes)}
        for cookie, (off, n) in want.items():
            c.send_request(P.CMD_READ, off, n, cookie=cookie)
        for _ in want:
            r = c.recv_reply({cookie: n for cookie, (_, n) in want.items()})
            off, n = want[r["cookie"]]
            assert r["error"] == 0 and r["data"] == payloads[off], f"read at {off} of {n} bytes differs"
        c.disconnect()
    finally:
        c.close()
    log = srv.log_text()
    attached = [line for line in log.splitlines() if "attached to export" in line]
    assert attached and f"over {version}" in attached[-1], attached
    sealed_here = "(records sealed here)" in attached[-1]
    assert sealed_here == (version == "TLSv1.3"), attached[-1]
