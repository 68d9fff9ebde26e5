"""bench/prefix.py --quick runs end to end (the tiny model, 2 chats x 3 turns): it prints
its table and RESULT line, and its accounting agrees with what the workload implies
(no timing assertions beyond sanity).

References independent of the benchmark's own arithmetic: the KV bytes of one block
from the tiny checkpoint's config.json (layers x KV heads x head dim x K and V x
float32 x block size); a cold prompt moves every one of its blocks; a turn extends the
previous turn's prompt of its chat, so with caching on it finds (nearly) all of that
prompt's full blocks cached; a first turn after the first chat's shares the system prompt."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 16  # the benchmark's default block size


def _block_bytes() -> int:
    from braid.engine.default_model import resolve_model

    with open(os.path.join(resolve_model("tiny"), "config.json")) as f:
        cfg = json.load(f)
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 4 * BLOCK


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


@pytest.mark.timeout(300)
def test_prefix_benchmark_quick(tmp_path):
    path = tmp_path / "prefix.json"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "prefix.py"), "--quick", "--json", str(path)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    result = [line for line in lines if line.startswith("RESULT ")]
    assert len(result) == 1, out.stdout[-3000:]
    fields = dict(kv.split("=") for kv in result[0].split()[1:])
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("caching |"))
    rows = {line.split("|")[0].strip(): line.split("|") for line in lines[header + 2:header + 4]}
    assert set(rows) == {"on", "off"}

    data = json.loads(path.read_text())
    recs = data["records"]
    n = data["args"]["conversations"] * data["args"]["turns"]
    assert int(fields["requests"]) == n == 6 and len(recs) == 2 * n
    assert int(rows["on"][1]) == int(rows["off"][1]) == n
    assert int(fields["answer_mismatches"]) == 0
    on = {(r["conversation"], r["turn"]): r for r in recs if r["mode"] == "on"}
    off = {(r["conversation"], r["turn"]): r for r in recs if r["mode"] == "off"}
    assert set(on) == set(off) and len(on) == n
    per_block = _block_bytes()
    for key, r in off.items():  # no cache anywhere: every prompt token computed, every block moved
        assert r["cached_tokens"] == 0
        assert r["kv_bytes"] == per_block * _blocks(r["prompt_tokens"])
        assert on[key]["prompt_tokens"] == r["prompt_tokens"] and on[key]["token_ids"] == r["token_ids"]
        assert r["token_ids"] and r["ttft_s"] > 0
    for (conv, turn), r in on.items():
        assert r["cached_tokens"] % BLOCK == 0 and r["cached_tokens"] < r["prompt_tokens"]
        assert r["kv_bytes"] % per_block == 0 and r["kv_bytes"] <= off[conv, turn]["kv_bytes"]
        if turn > 0:  # the previous turn's prompt is this one's prefix: its full blocks, the last perhaps not
            prev = on[conv, turn - 1]["prompt_tokens"]
            assert r["cached_tokens"] >= (prev // BLOCK - 1) * BLOCK
            assert r["kv_bytes"] < off[conv, turn]["kv_bytes"]
        elif conv > 0:  # the shared system prompt
            assert r["cached_tokens"] > 0
        else:  # the very first chat turn: cold (the warm-up prompt shares no block)
            assert r["cached_tokens"] == 0 and r["kv_bytes"] == off[conv, turn]["kv_bytes"]

    prompt = sum(r["prompt_tokens"] for r in on.values())
    cached = sum(r["cached_tokens"] for r in on.values())
    kv_on, kv_off = (sum(r["kv_bytes"] for r in m.values()) for m in (on, off))
    assert float(fields["hit_rate_on"]) == pytest.approx(cached / prompt, abs=1e-4) and cached > 0
    assert float(fields["hit_rate_off"]) == 0
    assert int(fields["kv_bytes_on"]) == kv_on < kv_off == int(fields["kv_bytes_off"])
    assert float(fields["kv_bytes_saved"]) == pytest.approx(1 - kv_on / kv_off, abs=1e-4)
    assert float(fields["prefill_tokens_saved"]) == pytest.approx(cached / prompt, abs=1e-4)
    assert float(fields["prefix_ttft_speedup"]) == pytest.approx(
        float(fields["ttft_p50_off"]) / float(fields["ttft_p50_on"]), rel=1e-2)
    assert int(rows["on"][7]) == prompt - cached and int(rows["off"][7]) == prompt  # prefill tokens computed
