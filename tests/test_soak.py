"""The chaos soak (bench/soak.py) in its quick form, as a subprocess: a local cluster of
two prefill and two decode nodes under mixed load while nodes, ranks, etcd and the
router are killed or paused; it must report every check held (exit 0, RESULT: PASS).
No timing is asserted: the soak's own checks (exact greedy outputs, typed statuses,
no hung request, free KV blocks, no engine death, nothing left behind) are the test."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(1200)
def test_quick_soak_holds_every_check():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--quick"],
                          capture_output=True, text=True, timeout=1100)
    out = proc.stdout + proc.stderr
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert result, f"no RESULT line; output ends:\n{out[-4000:]}"
    assert result[-1].startswith("RESULT: PASS"), f"{result[-1]}\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, out[-4000:]
