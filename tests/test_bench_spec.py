"""bench/spec.py --quick runs end to end on the looping checkpoint of spec_fixtures
(greedy text loops with period 7, so prompt lookup's drafts are accepted): it
checks that every speculative output equals the k=0 one (it exits otherwise, before
any time), prints its table with k=0 and k>0 side by side for both workloads and
both batch sizes, and a RESULT line. No timing assertions (the machine is noisy)."""
import os
import re
import subprocess
import sys

import pytest

from spec_fixtures import loop_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_spec_benchmark_quick(checkpoints):
    path = loop_checkpoint(checkpoints)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "spec.py"), "--quick", "--model", path,
                          "--prompts", "ids", "--ks", "2", "4"],
                         capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    check = re.search(r"CHECK speculative outputs equal k=0 token for token: (\d+) sequences compared, all equal", text)
    assert check and int(check.group(1)) > 0, text
    result = re.search(r"^RESULT (.*)$", text, re.M)
    assert result, text
    values = dict(kv.split("=") for kv in result.group(1).split())
    assert set(values) >= {"spec_speedup_b1", "spec_speedup_b8", "spec_speedup_free_b1", "spec_acceptance_quote"}
    assert all(float(v) > 0 for v in values.values()), values
    rows = [[c.strip() for c in line.split("|")] for line in text.splitlines() if line.count("|") == 9]
    header, body = rows[0], rows[1:]
    assert header[:4] == ["workload", "mode", "batch", "k"]
    col = {name: i for i, name in enumerate(header)}
    seen = {(r[col["workload"]], r[col["batch"]], r[col["k"]]) for r in body}
    assert seen == {(wl, b, k) for wl in ("quote", "free") for b in ("1", "8") for k in ("0", "2", "4")}
    assert all(r[col["mode"]] == "offline" for r in body)  # --quick skips the cluster
    for r in body:
        assert float(r[col["decode tok/s"]]) > 0 and float(r[col["speedup"]]) > 0
        if r[col["k"]] == "0":
            assert r[col["speedup"]] == "1.000" and r[col["accept"]] == "-"
        else:  # the looping model accepts drafts
            assert float(r[col["accept"]]) > 0 and float(r[col["tok/step"]]) > 1, r
