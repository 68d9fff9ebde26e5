"""bench/moe.py --quick runs end to end: both engines agree on greedy tokens (it
exits otherwise), it prints its tables and RESULT line, and the expert memory it
reports per rank is what the checkpoint's config.json implies (experts x gate,
up and down x hidden x intermediate x fp32 x layers; halved per rank where two
ranks split the experts). No timing assertions."""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(400)
def test_moe_benchmark_quick():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "moe.py"), "--quick"],
                         capture_output=True, text=True, timeout=380, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    result = re.search(r"RESULT ep_prefill_ratio=([\d.]+) ep_decode_step_ratio=([\d.]+) "
                       r"pcp_ep_all_to_all_prefill_ratio=([\d.]+)", text)
    assert result, text
    assert all(float(v) > 0 for v in result.groups())
    with open(os.path.join(tempfile.gettempdir(), "braid-bench", "qwen3moe-e32-quick", "config.json")) as f:
        cfg = json.load(f)
    all_mib = cfg.get("num_experts", cfg.get("num_local_experts")) * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 4 \
        * cfg["num_hidden_layers"] / 2**20
    half = f"{all_mib / 2:.1f}/{all_mib / 2:.1f}"
    whole = f"{all_mib:.1f}/{all_mib:.1f}"
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in text.splitlines() if "|" in line}
    assert rows["TP-sliced"][4] == half and rows["EP 2"][4] == half  # tp 2: sliced or split, half each
    assert rows["whole on each rank"][2] == whole and rows["EP 2 (all-to-all)"][2] == half
    # every expert row counted once under EP, twice (once per TP rank's slice) when sliced
    tp_rows = [int(x) for x in rows["TP-sliced"][5].split("/")]
    assert tp_rows[0] == tp_rows[1] > 0
