"""Several hosts on one machine: each Tandem node in its own network namespace, joined by veth
pairs to a bridge in the test's namespace (which the NBD clients use). A link is cut by taking
a node's veth down (the node is isolated) or by a route that forbids one pair of nodes from
talking (a partition between two nodes while both still see the third).

Needs root and iproute2; `available()` says why not when a test must skip.
"""

import os
import re
import secrets
import signal
import subprocess
import time

from conftest import MiB, TANDEM_BIN, make_backing, run
from nodes import NodeProcesses


def available():
    """None when namespaces work here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = "tdprobe" + secrets.token_hex(2)
    cp = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if cp.returncode != 0:
        return f"ip netns add failed: {cp.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return run(cmd, check=check, timeout=20)


class Cluster(NodeProcesses):
    """Nodes `alpha` (id 0), `beta` (id 1) and optionally `witness` (id 2), each in a namespace
    with address 10.<net>.0.<id+1>; the bridge has .254. Every process started is killed and
    every namespace and link deleted by `close()`."""

    NAMES = ("alpha", "beta", "witness")
    PORT = 7788
    NBD_PORT = 10809

    def __init__(self, tmp_path, size=64 * MiB, witness=False, failover="", handlers=None, tuning=""):
        self.dir = tmp_path
        self.tag = secrets.token_hex(2)
        self.net = 100 + secrets.randbelow(150)
        self.bridge = f"tdbr{self.tag}"
        self.names = self.NAMES if witness else self.NAMES[:2]
        self.ns = {n: f"td{n[0]}{self.tag}" for n in self.names}
        self.veth = {n: f"td{n[0]}{self.tag}h" for n in self.names}
        self.procs = {}
        self.logs = {}
        self.cuts = []
        self._setup_network()
        run([TANDEM_BIN, "certs", "--dir", str(tmp_path / "pki")] + sum((["--node", n] for n in self.names), []))
        text = (f'resource = "r0"\n\n[tls]\nca = "{tmp_path}/pki/ca-cert.pem"\n\n'
                f'[tuning]\nconnect-retry-ms = 100\nping-interval-ms = 200\npeer-timeout-ms = 1500\n{tuning}\n')
        if failover:
            text += f"[failover]\n{failover}\n"
        if handlers:
            text += "[handlers]\n" + "".join(f'{event} = "{script}"\n' for event, script in handlers.items())
        for name in self.names:
            i = self.NAMES.index(name)
            text += f'\n[[node]]\nname = "{name}"\nid = {i}\naddress = "{self.addr(name)}:{self.PORT}"\n'
            if name == "witness":
                text += 'role = "witness"\n'
            else:
                make_backing(tmp_path / f"{name}.img", size)
                text += (f'device = "{tmp_path}/{name}.img"\nmetadata = "{tmp_path}/{name}.meta"\n'
                         f'nbd = "{self.addr(name)}:{self.NBD_PORT}"\n')
            text += (f'control = "{tmp_path}/{name}.sock"\n'
                     f'cert = "{tmp_path}/pki/{name}-cert.pem"\nkey = "{tmp_path}/pki/{name}-key.pem"\n')
        self.resource = tmp_path / "r0.toml"
        self.resource.write_text(text)
        for name in self.names:
            if name != "witness":
                run([TANDEM_BIN, "init", str(self.resource), "--node", name])

    def addr(self, name):
        return f"10.{self.net}.0.{self.NAMES.index(name) + 1}"

    def uri(self, name):
        return f"nbd://{self.addr(name)}:{self.NBD_PORT}/r0"

    def _setup_network(self):
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"10.{self.net}.0.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for name in self.names:
            ns = self.ns[name]
            run(["ip", "netns", "add", ns])
            ip("link", "set", "lo", "up", ns=ns)
            ip("link", "add", self.veth[name], "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", self.veth[name], "master", self.bridge)
            ip("link", "set", self.veth[name], "up")
            ip("addr", "add", f"{self.addr(name)}/24", "dev", "eth0", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)

    # --- processes

    def up(self, name, *extra):
        return self.start(name, extra, prefix=("ip", "netns", "exec", self.ns[name]))

    def wait_connected(self, a="alpha", b="beta", timeout=30, since=(0, 0)):
        pattern = r"disk upToDate, peer disk upToDate, link connected, established, 0 bytes out of sync"
        self.wait_for(a, pattern, timeout, since[0])
        self.wait_for(b, pattern, timeout, since[1])

    def kill(self, name):
        p = self.procs.pop(name)
        p.kill()
        p.wait(timeout=20)

    def stop(self, name):
        p = self.procs.pop(name)
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise AssertionError(f"{name} did not stop:\n{self.log(name)[-4000:]}")

    def tandem(self, *args, check=True, timeout=60):
        """A `tandem` command against a node (control sockets are files: no namespace needed)."""
        cp = run([TANDEM_BIN, *args[:1], str(self.resource), *args[1:]], check=check, timeout=timeout)
        return cp

    def status(self, name):
        import json
        return json.loads(self.tandem("status", "--node", name, "--json").stdout_text)

    # --- faults

    def isolate(self, name):
        """Takes the node's only link down: it sees nobody, nobody sees it."""
        ip("link", "set", self.veth[name], "down")

    def reconnect(self, name):
        ip("link", "set", self.veth[name], "up")

    def partition(self, a, b):
        """a and b cannot reach each other; both still reach everyone else."""
        ip("route", "add", "prohibit", f"{self.addr(b)}/32", ns=self.ns[a])
        ip("route", "add", "prohibit", f"{self.addr(a)}/32", ns=self.ns[b])
        self.cuts.append((a, b))

    def heal(self, a, b):
        ip("route", "del", "prohibit", f"{self.addr(b)}/32", ns=self.ns[a])
        ip("route", "del", "prohibit", f"{self.addr(a)}/32", ns=self.ns[b])
        self.cuts.remove((a, b))

    def close(self):
        for name in list(self.procs):
            p = self.procs.pop(name)
            if p.poll() is None:
                p.kill()
            p.wait(timeout=20)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", self.ns[name]], capture_output=True)
            subprocess.run(["ip", "link", "del", self.veth[name]], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
