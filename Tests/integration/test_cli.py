"""Command-line behaviour: bad arguments fail fast with `error:`, signals exit
cleanly, `tandem certs` makes a usable PKI."""

import os
import signal
import socket
import time

import pytest

from conftest import HOST, MiB, TANDEM_BIN, free_port, make_backing, run


def serve_fails(args, timeout=15):
    t0 = time.monotonic()
    cp = run([TANDEM_BIN, "serve", *args], check=False, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert cp.returncode != 0, (f"`tandem serve {' '.join(map(str, args))}` should fail; exit 0\n"
                                f"{cp.stderr_text}")
    assert "error:" in cp.stderr_text, f"no 'error:' message on stderr:\n{cp.stderr_text}\n{cp.stdout_text}"
    assert elapsed < 10, f"took {elapsed:.1f}s to fail"
    return cp


@pytest.fixture
def disk(tmp_path):
    return make_backing(tmp_path / "disk.img", 4 * MiB)


def listen_arg():
    return ["--listen", f"{HOST}:{free_port()}"]


def test_missing_file(tmp_path):
    cp = serve_fails([tmp_path / "does-not-exist.img", *listen_arg()])
    assert "does-not-exist.img" in cp.stderr_text


def test_size_not_multiple_of_4096(tmp_path):
    p = make_backing(tmp_path / "odd.img", 4 * MiB + 512)
    serve_fails([p, *listen_arg()])


def test_backing_is_a_directory(tmp_path):
    serve_fails([tmp_path, *listen_arg()])


def test_port_in_use(disk):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, 0))
        s.listen(1)
        port = s.getsockname()[1]
        serve_fails([disk, "--listen", f"{HOST}:{port}"])


def test_unknown_io_engine(disk):
    serve_fails([disk, *listen_arg(), "--io-engine", "bogus"])


def test_unknown_cache_mode(disk):
    serve_fails([disk, *listen_arg(), "--cache", "bogus"])


def test_poll_us_out_of_range(disk):
    cp = serve_fails([disk, *listen_arg(), "--poll-us", "5000"])
    assert "--poll-us must be between 0 and 1000, got 5000" in cp.stderr_text, cp.stderr_text
    serve_fails([disk, *listen_arg(), "--poll-us", "-1"])


def test_send_buffer_out_of_range(disk):
    cp = serve_fails([disk, *listen_arg(), "--send-buffer-kib", "65537"])
    assert "--send-buffer-kib must be between 0 and 65536, got 65537" in cp.stderr_text, cp.stderr_text
    serve_fails([disk, *listen_arg(), "--send-buffer-kib", "-1"])


def test_bad_listen_address(disk):
    serve_fails([disk, "--listen", "not-an-address"])


def test_unreadable_key(disk, certs_dir, tmp_path):
    serve_fails([disk, *listen_arg(), "--tls-cert", certs_dir / "server-cert.pem",
                 "--tls-key", tmp_path / "missing-key.pem", "--tls-ca", certs_dir / "ca-cert.pem"])


def test_garbage_key(disk, certs_dir, tmp_path):
    bad = tmp_path / "garbage-key.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    serve_fails([disk, *listen_arg(), "--tls-cert", certs_dir / "server-cert.pem",
                 "--tls-key", bad, "--tls-ca", certs_dir / "ca-cert.pem"])


def test_key_does_not_match_cert(disk, certs_dir):
    serve_fails([disk, *listen_arg(), "--tls-cert", certs_dir / "server-cert.pem",
                 "--tls-key", certs_dir / "client-key.pem", "--tls-ca", certs_dir / "ca-cert.pem"])


def test_unreadable_cert(disk, certs_dir, tmp_path):
    serve_fails([disk, *listen_arg(), "--tls-cert", tmp_path / "nope-cert.pem",
                 "--tls-key", certs_dir / "server-key.pem", "--tls-ca", certs_dir / "ca-cert.pem"])


def test_tls_cert_without_key(disk, certs_dir):
    serve_fails([disk, *listen_arg(), "--tls-cert", certs_dir / "server-cert.pem",
                 "--tls-ca", certs_dir / "ca-cert.pem"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero(serve, sig):
    srv = serve.start(size=4 * MiB)
    h = srv.libnbd()  # an open connection must not block shutdown
    assert h.pread(512, 0) == bytes(512)
    rc = srv.stop(sig)
    assert rc == 0, f"exit {rc} on {sig.name}\n{srv.log_text()}"


def test_auto_engine_is_logged(serve):
    srv = serve.start(size=4 * MiB)  # no --io-engine: auto
    # io_uring works on this kernel, so auto must pick it
    if os.path.exists("/proc/sys/kernel/io_uring_disabled") and \
            open("/proc/sys/kernel/io_uring_disabled").read().strip() == "0":
        assert srv.engine == "uring", f"auto picked {srv.engine}"


def test_max_connections(serve):
    srv = serve.start(size=4 * MiB, extra=["--max-connections", "2"])
    a = srv.libnbd()
    b = srv.libnbd()
    # a third connection is refused, closed or held, but must not be served
    assert not srv.one_more_served(), "a third client was served with --max-connections 2"
    a.shutdown()
    b.shutdown()
    del a, b
    # once the others are gone a new client is served again
    srv.served_again("server did not accept clients after others left")


def test_certs_verify(tmp_path):
    d = tmp_path / "pki"
    run([TANDEM_BIN, "certs", "--dir", d, "--node", "alpha", "--node", "beta",
         "--san", "tandem.example.test", "--san", "10.1.2.3", "--days", "30"], timeout=120)
    expected = ["ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
                "client-key.pem", "alpha-cert.pem", "alpha-key.pem", "beta-cert.pem", "beta-key.pem"]
    for f in expected:
        assert (d / f).is_file(), f"missing {f}: {sorted(os.listdir(d))}"
    ca = d / "ca-cert.pem"
    for name, purpose in (("server", "sslserver"), ("client", "sslclient"), ("alpha", "sslserver"),
                          ("beta", "sslserver"), ("alpha", "sslclient")):
        cp = run(["openssl", "verify", "-purpose", purpose, "-CAfile", ca, d / f"{name}-cert.pem"])
        assert ": OK" in cp.stdout_text, cp.stdout_text
    # SANs on server and node certificates
    for name in ("server", "alpha", "beta"):
        text = run(["openssl", "x509", "-noout", "-text", "-in", d / f"{name}-cert.pem"]).stdout_text
        for san in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1",
                    "DNS:tandem.example.test", "IP Address:10.1.2.3"):
            assert san in text, f"{name}-cert.pem lacks SAN {san}"
        # validity follows --days
        end = run(["openssl", "x509", "-noout", "-checkend", str(29 * 86400), "-in",
                   d / f"{name}-cert.pem"], check=False)
        assert end.returncode == 0, "certificate expires before --days 30"
        end = run(["openssl", "x509", "-noout", "-checkend", str(31 * 86400), "-in",
                   d / f"{name}-cert.pem"], check=False)
        assert end.returncode != 0, "certificate outlives --days 30"
    # keys match certificates
    for name in ("ca", "server", "client", "alpha", "beta"):
        pub_cert = run(["openssl", "x509", "-noout", "-pubkey", "-in", d / f"{name}-cert.pem"]).stdout_text
        pub_key = run(["openssl", "pkey", "-pubout", "-in", d / f"{name}-key.pem"]).stdout_text
        assert pub_cert == pub_key, f"{name}-key.pem does not match {name}-cert.pem"
    # private keys are not world-readable
    for f in d.glob("*-key.pem"):
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} has mode {oct(f.stat().st_mode & 0o777)}"
    # an unrelated CA does not verify them
    other = tmp_path / "other"
    run([TANDEM_BIN, "certs", "--dir", other], timeout=120)
    cp = run(["openssl", "verify", "-CAfile", other / "ca-cert.pem", d / "server-cert.pem"], check=False)
    assert cp.returncode != 0
