"""bench/serve.py --quick runs end to end; its accounting adds up (no timing assertions)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_serve_benchmark_quick(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "serve.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.load(open(tmp_path / "serve.json"))
    args = data["meta"]["args"]
    assert set(data["results"]) == {"colocated", "pd_pcp_dcp"}
    for name, points in data["results"].items():
        assert len(points) == len(args["rates"])
        for p in points:
            recs = p["records"]
            assert p["requests"] == len(recs) == args["requests"]
            assert p["completed"] == args["requests"] and p["failed"] == 0, p["errors"]
            assert all(r["error"] is None and r["tokens"] == args["max_tokens"] for r in recs)
            assert p["output_tokens"] == args["requests"] * args["max_tokens"]
            assert p["tokens_per_s"] == pytest.approx(p["output_tokens"] / p["wall_s"])
            assert all(r["sent"] <= r["first"] <= r["last"] for r in recs)
            assert p["ttft_p50"] <= p["ttft_p90"] <= p["ttft_p99"]
            if name == "colocated":  # prefilled on the decode node: nothing moves
                assert p["local_prefill"] == p["completed"] and p["kv_bytes_mean"] == 0
            else:
                assert p["local_prefill"] == 0 and p["kv_bytes_mean"] > 0
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1 and out.stdout.rstrip().endswith(result[0])
    fields = dict(kv.split("=") for kv in result[0].split()[1:])
    for name in ("colocated", "pd_pcp_dcp"):
        assert float(fields[f"{name}_ttft_p50"]) > 0 and fields[f"{name}_failed"] == "0"
    assert (tmp_path / "serve.png").stat().st_size > 1000
