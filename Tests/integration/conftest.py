"""Fixtures for the Tandem integration suite.

Every test drives a real `tandem serve` process (TANDEM_BIN, default
<repo>/.build/debug/tandem) over loopback with real NBD clients (libnbd tools,
qemu-io, fio, nbdfuse, raw sockets).  Everything is bounded in time: each
subprocess has a timeout, and a per-test watchdog (TANDEM_TEST_TIMEOUT seconds,
default 180) kills the servers to unblock a hung test.  Server processes get
PR_SET_PDEATHSIG so that they die with the test runner.
"""

import ctypes
import faulthandler
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("uring", "aio", "threads")
HOST = "127.0.0.1"
MiB = 1 << 20
KiB = 1 << 10

START_TIMEOUT = float(os.environ.get("TANDEM_START_TIMEOUT", "30"))
STOP_TIMEOUT = float(os.environ.get("TANDEM_STOP_TIMEOUT", "20"))
TEST_TIMEOUT = float(os.environ.get("TANDEM_TEST_TIMEOUT", "180"))
LOG_TAIL = 20000


def _resolve_bin():
    raw = os.environ.get("TANDEM_BIN") or ".build/debug/tandem"
    p = Path(raw)
    if not p.is_absolute():
        p = (Path.cwd() / p) if (Path.cwd() / p).exists() else (REPO_ROOT / p)
    return str(p)


TANDEM_BIN = _resolve_bin()

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    # PR_SET_PDEATHSIG = 1: the child is SIGKILLed if the test runner dies.
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)


# ---------------------------------------------------------------------------
# helpers


def run(cmd, timeout=60, check=True, input=None, env=None, cwd=None):
    """Run a command with a hard timeout; on failure raise AssertionError that
    shows the command and its output."""
    cmd = [str(c) for c in cmd]
    try:
        cp = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                            env=env, cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"command timed out after {timeout}s: {' '.join(cmd)}\n"
            f"--- stdout ---\n{_txt(e.stdout)}\n--- stderr ---\n{_txt(e.stderr)}") from None
    cp.stdout_text = _txt(cp.stdout)
    cp.stderr_text = _txt(cp.stderr)
    if check and cp.returncode != 0:
        raise AssertionError(
            f"command failed (exit {cp.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{cp.stdout_text[-LOG_TAIL:]}\n--- stderr ---\n{cp.stderr_text[-LOG_TAIL:]}")
    return cp


def _txt(b):
    if b is None:
        return ""
    if isinstance(b, str):
        return b
    return b.decode("utf-8", "replace")


_ports_given = set()


def free_port(host=HOST):
    """A port nothing listens on now, and not one this test run handed out before: the kernel
    may give a just-closed port out again, and a resource file that got the same port for two
    listeners was refused (seen once in CI)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise AssertionError("no fresh free port in 1000 tries")


def hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_backing(path, size, fill=None):
    """Create a backing file: sparse (all holes) unless `fill` (bytes) is given."""
    path = Path(path)
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill)
            f.truncate(size)
    return path


def pattern(seed, n):
    """Deterministic, non-repeating-ish test data."""
    import hashlib
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 32
        counter += 1
    return bytes(out[:n])


def read_export(uri, size):
    """The whole export at `uri` (libnbd), read 4 MiB at a time."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))
    finally:
        h.shutdown()


def nbdinfo_json(uri, *extra, timeout=30):
    cp = run(["nbdinfo", "--json", *extra, uri], timeout=timeout)
    try:
        return json.loads(cp.stdout_text)
    except ValueError as e:
        raise AssertionError(f"nbdinfo printed invalid JSON: {e}\n{cp.stdout_text}") from None


# ---------------------------------------------------------------------------
# the server under test

_ALL_SERVERS = []
_TEST_STARTED = [0.0]
_LOG_OFFSETS = {}  # server -> log size when the current test started


class ServerStartError(AssertionError):
    pass


class TandemServer:
    def __init__(self, backing, args, log_path, port=None, export_name="tandem",
                 engine=None, host=HOST):
        self.host = host
        self.backing = Path(backing)
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path)
        self.port = port
        self.export_name = export_name
        self.requested_engine = engine
        self.engine = None
        self.proc = None
        self.returncode = None
        self.started_at = None
        self.stopped_at = None
        self.watchdog_killed = False
        _ALL_SERVERS.append(self)

    # -- lifecycle ----------------------------------------------------------
    @property
    def cmd(self):
        return [TANDEM_BIN, "serve", str(self.backing), "--listen", hostport(self.host, self.port), *self.args]

    def start(self):
        if not os.access(TANDEM_BIN, os.X_OK):
            raise ServerStartError(f"tandem binary not found or not executable: {TANDEM_BIN} "
                                   "(build it with `swift build` or set TANDEM_BIN)")
        last = None
        for attempt in range(5):
            if self.port is None or attempt > 0:
                self.port = free_port(self.host)
            try:
                self._start_once()
                return self
            except ServerStartError as e:
                last = e
                if "in use" not in self.log_text().lower():
                    raise
        raise last

    def _start_once(self):
        self.log = open(self.log_path, "ab")
        self.log.write(f"$ {' '.join(self.cmd)}\n".encode())
        self.log.flush()
        self.started_at = time.time()
        self.stopped_at = None
        self.returncode = None
        self._log_offset = self.log.tell()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        want = f"listening on {hostport(self.host, self.port)}"
        while True:
            text = self.log_text(since_start=True)
            if "listening on" in text:
                break
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                self.stopped_at = time.time()
                raise ServerStartError(f"tandem serve exited with {rc} before listening:\n"
                                       f"{' '.join(self.cmd)}\n{text[-LOG_TAIL:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                self.returncode = self.proc.returncode
                self.stopped_at = time.time()
                raise ServerStartError(f"tandem serve did not log 'listening on' within "
                                       f"{START_TIMEOUT}s:\n{text[-LOG_TAIL:]}")
            time.sleep(0.02)
        # The engine line may be logged just before or after the listening line.
        deadline = time.monotonic() + 5
        while True:
            text = self.log_text(since_start=True)
            m = re.search(r"io engine: (\w+)", text)
            if m or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert want in text, f"expected {want!r} in the server log:\n{text[-LOG_TAIL:]}"
        assert m, f"server log does not name the io engine ('io engine: ...'):\n{text[-LOG_TAIL:]}"
        self.engine = m.group(1)
        if self.requested_engine not in (None, "auto"):
            assert self.engine == self.requested_engine, (
                f"asked for --io-engine {self.requested_engine}, server says "
                f"'io engine: {self.engine}'")
        else:
            assert self.engine in ENGINES, f"unknown engine in log: {self.engine}"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        """Stop the server with `sig` and return its exit code (bounded)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self.returncode = self.proc.returncode
                self.stopped_at = time.time()
                self.log.close()
                raise AssertionError(f"tandem did not exit within {STOP_TIMEOUT}s of "
                                     f"{signal.Signals(sig).name}; killed.\n{self.log_text()[-LOG_TAIL:]}")
        self.returncode = self.proc.returncode
        if self.stopped_at is None:
            self.stopped_at = time.time()
        if not self.log.closed:
            self.log.close()
        return self.returncode

    def stop_clean(self):
        if self.watchdog_killed:
            self.stop()
            raise AssertionError("tandem serve was SIGKILLed by the test watchdog (a test hung on it)")
        rc = self.stop()
        assert rc == 0, (f"tandem serve exited with {rc} on SIGTERM (expected 0); log:\n"
                         f"{self.log_text()[-LOG_TAIL:]}")

    # -- info -----------------------------------------------------------------
    def log_text(self, since_start=False):
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return _txt(f.read())
        except FileNotFoundError:
            return ""

    def uri(self, export=None, scheme="nbd", query=""):
        name = self.export_name if export is None else export
        u = f"{scheme}://{hostport(self.host, self.port)}/{name}"
        return u + (f"?{query}" if query else "")

    def assert_alive(self):
        assert self.alive(), (f"tandem serve died (exit {self.proc.poll()}); log:\n"
                              f"{self.log_text()[-LOG_TAIL:]}")

    def served_again(self, why, timeout=10):
        """Connects until a client is served: a place frees once a client has left."""
        import nbd
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = self.libnbd()
                h.pread(512, 0)
                h.shutdown()
                return
            except nbd.Error:
                assert time.monotonic() < deadline, why
                time.sleep(0.2)

    def one_more_served(self):
        """Whether a new client gets through the handshake to the export (a server at its
        connection limit refuses, closes or holds it)."""
        import nbdproto as P
        try:
            with P.RawNBD(self.host, self.port, timeout=3) as c:
                c.handshake()
                return c.go(self.export_name) == P.REP_ACK
        except (OSError, P.Closed, AssertionError):
            return False

    def libnbd_tls(self, certs_dir, export="tandem"):
        """A libnbd handle over TLS with the client certificate of `certs_dir`."""
        import nbd
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certs_dir))
        h.set_export_name(export)
        h.connect_tcp(self.host, str(self.port))
        assert h.get_tls_negotiated()
        return h

    def libnbd(self, export=None, strict=True, structured=True):
        import nbd
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        if not structured:
            h.set_request_structured_replies(False)
        h.connect_uri(self.uri(export))
        return h


class ServerFactory:
    def __init__(self, tmp_path):
        self.dir = Path(tmp_path)
        self.servers = []
        self._n = 0

    def backing(self, size=64 * MiB, name=None, fill=None):
        self._n += 1
        return make_backing(self.dir / (name or f"backing{self._n}.img"), size, fill)

    def start(self, backing=None, *, size=64 * MiB, engine=None, cache=None, read_only=False,
              export_name=None, description=None, tls_dir=None, tls_anonymous=False,
              extra=(), host=HOST):
        if backing is None:
            backing = self.backing(size)
        args = []
        if engine is not None:
            args += ["--io-engine", engine]
        if cache is not None:
            args += ["--cache", cache]
        if read_only:
            args += ["--read-only"]
        if export_name is not None:
            args += ["--export-name", export_name]
        if description is not None:
            args += ["--description", description]
        if tls_dir is not None:
            tls_dir = Path(tls_dir)
            args += ["--tls-cert", tls_dir / "server-cert.pem", "--tls-key", tls_dir / "server-key.pem",
                     "--tls-ca", tls_dir / "ca-cert.pem"]
            if tls_anonymous:
                args += ["--tls-anonymous-clients"]
        args += list(extra)
        self._n += 1
        srv = TandemServer(backing, args, self.dir / f"tandem{self._n}.log",
                           export_name="tandem" if export_name is None else export_name,
                           engine=engine, host=host)
        self.servers.append(srv)
        srv.start()
        return srv

    def stop_all(self):
        problems = []
        for s in self.servers:
            try:
                if s.proc is not None and s.stopped_at is None:
                    s.stop_clean()
            except AssertionError as e:
                problems.append(str(e))
        self.servers.clear()
        if problems:
            raise AssertionError("\n\n".join(problems))


def run_workers(worker, count, timeout=240):
    """Runs worker(k) for k in range(count) on threads; fails on a hung thread or on what any
    worker raised."""
    import threading
    errors = []

    def guarded(k):
        try:
            worker(k)
        except BaseException as e:  # reported below
            errors.append(f"worker {k}: {e!r}")

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "worker thread hung"
    assert not errors, errors


@pytest.fixture
def serve(tmp_path):
    """Factory: serve.start(...) -> TandemServer.  All servers are stopped with
    SIGTERM at teardown, which must exit 0."""
    f = ServerFactory(tmp_path)
    yield f
    f.stop_all()


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory):
    f = ServerFactory(tmp_path_factory.mktemp("srv"))
    yield f
    f.stop_all()


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory):
    """A certificate set made by `tandem certs` (libnbd's tls-certificates layout)."""
    d = tmp_path_factory.mktemp("certs")
    run([TANDEM_BIN, "certs", "--dir", d], timeout=120)
    for f in ("ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem",
              "client-cert.pem", "client-key.pem"):
        assert (d / f).is_file(), f"`tandem certs` did not write {f}; dir has {sorted(os.listdir(d))}"
    return d


# ---------------------------------------------------------------------------
# reporting and watchdog


_REAL_STDERR = [None]  # a dup of the terminal's stderr, taken with capture suspended


def pytest_configure(config):
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman:
        capman.suspend_global_capture()
    try:
        _REAL_STDERR[0] = os.dup(2)
    finally:
        if capman:
            capman.resume_global_capture()


class _Watchdog:
    """Per-test time limit.  At TEST_TIMEOUT the stacks are saved and every
    running tandem server is SIGKILLed: whatever client call was blocked on it
    then fails, and the test fails with a clear message instead of hanging.  If
    the test still has not finished 60s later, all stacks go to the terminal
    and the run exits."""

    def __init__(self):
        self.timer = None
        self.fired = None
        self.stacks = ""

    def arm(self, nodeid):
        self.fired = None
        self.stacks = ""
        self.timer = threading.Timer(TEST_TIMEOUT, self._fire, args=(nodeid,))
        self.timer.daemon = True
        self.timer.start()
        if _REAL_STDERR[0] is not None:
            faulthandler.dump_traceback_later(TEST_TIMEOUT + 60, exit=True, file=_REAL_STDERR[0])

    def disarm(self):
        if self.timer is not None:
            self.timer.cancel()
        faulthandler.cancel_dump_traceback_later()

    def _fire(self, nodeid):
        import tempfile
        self.fired = nodeid
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            self.stacks = f.read()
        for s in _ALL_SERVERS:
            if s.alive():
                s.watchdog_killed = True
                s.proc.kill()
        if _REAL_STDERR[0] is not None:
            os.write(_REAL_STDERR[0], (f"\nWATCHDOG: {nodeid} exceeded {TEST_TIMEOUT:.0f}s; "
                                        "killed the tandem servers to unblock it\n").encode())


_WATCHDOG = _Watchdog()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _TEST_STARTED[0] = time.time()
    _LOG_OFFSETS.clear()
    for s in _ALL_SERVERS:
        if s.started_at is not None and s.stopped_at is None:
            _LOG_OFFSETS[id(s)] = len(s.log_text())
    _WATCHDOG.arm(item.nodeid)
    try:
        yield
    finally:
        _WATCHDOG.disarm()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    if _WATCHDOG.fired == item.nodeid:
        rep.sections.append((f"WATCHDOG: test exceeded {TEST_TIMEOUT:.0f}s; the tandem servers were "
                             "SIGKILLed to unblock it. Stacks at that moment", _WATCHDOG.stacks[-LOG_TAIL:]))
    t0 = _TEST_STARTED[0]
    for s in _ALL_SERVERS:
        if s.started_at is None:
            continue
        if s.stopped_at is not None and s.stopped_at < t0:
            continue
        text = s.log_text()
        off = _LOG_OFFSETS.get(id(s), 0)
        state = "running" if s.alive() else f"exited {s.returncode if s.returncode is not None else s.proc.poll()}"
        if s.watchdog_killed:
            state += ", killed by the watchdog"
        if off:
            head = text.splitlines()[0] if text else ""
            text = f"{head}\n[... output before this test omitted ...]\n{text[off:]}"
        rep.sections.append((f"tandem log {s.log_path} [{state}]", text[-LOG_TAIL:]))


def pytest_report_header(config):
    return [f"tandem binary: {TANDEM_BIN}"]


def require_tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"required tool {name!r} is not installed (tools/test installs it)")
