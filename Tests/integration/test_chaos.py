"""A short seeded chaos run (tools/chaos) of a real pair: kills of either node or both under
in-flight writes, restarts, switchovers, failovers, disconnects, verify passes, barriers and
rollbacks, with every acknowledged write read back and both images equal at the end. Longer
runs: `tools/chaos --seeds 1-100`."""

import os
import subprocess
import sys

from conftest import TANDEM_BIN

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_a_seeded_chaos_run_loses_no_acknowledged_write():
    cp = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "chaos"), "--seed", "3", "--rounds", "30",
                         "--tandem", TANDEM_BIN, "--quiet"], capture_output=True, text=True, timeout=900)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "seed 3: passed, 30 rounds" in cp.stdout, cp.stdout


def test_chaos_refuses_bad_arguments():
    for args in (["--rounds", "5"], ["--seeds", "9-1"], ["--seeds", "x"], ["--seed", "1", "--rounds", "0"]):
        cp = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "chaos"), *args, "--tandem", TANDEM_BIN],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 2 and "error:" in cp.stderr, (args, cp.stderr)
