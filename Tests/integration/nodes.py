"""Running `tandem up` processes and reading their logs: shared by the loopback pair
(test_replication.Pair) and the network-namespace cluster (netns.Cluster)."""

import re
import subprocess
import time

from conftest import TANDEM_BIN, _die_with_parent


class NodeProcesses:
    """Subclasses set `self.dir`, `self.resource`, `self.procs = {}`, `self.logs = {}`."""

    def start(self, name, extra, prefix=()):
        """`tandem up RESOURCE --node NAME EXTRA...`, logging to a new file per start; the
        process dies with the test runner even if the runner is killed before its teardown."""
        log = self.dir / f"{name}-{sum(1 for k in self.logs if k == name) + len(self.logs)}.log"
        self.logs[name] = log
        args = [*prefix, TANDEM_BIN, "up", str(self.resource), "--node", name, *extra]
        self.procs[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "w"), preexec_fn=_die_with_parent)
        return self.procs[name]

    def log(self, name):
        return self.logs[name].read_text()

    def mark(self, name):
        """The current end of a node's log: later waits look only past it."""
        return len(self.log(name))

    def wait_for(self, name, pattern, timeout=30, since=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log(name)[since:]
            if re.search(pattern, text):
                return text
            assert self.procs[name].poll() is None, f"{name} exited:\n{text}"
            time.sleep(0.05)
        raise AssertionError(f"{name}: no /{pattern}/ within {timeout}s:\n{self.log(name)[-8000:]}")
