"""bench/router.py --quick runs end to end: every request got the fake nodes' 16 tokens
in order, the numbers are there, and nothing it started is left (no timing assertions:
the machine is shared)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from braid.engine.tiny import save_tokenizer
from braid.tokenizer import Tokenizer
from test_router import token_at  # the suite's own rule for the fake nodes' tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 16


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_router_bench_quick(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "router.py"), "--quick", "--floor", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Fatal" not in out.stderr, out.stderr[-3000:]
    data = json.load(open(tmp_path / "r.json"))
    save_tokenizer(str(tmp_path / "tok"))
    tok = Tokenizer(str(tmp_path / "tok"))
    assert set(data["fronts"]) == {"grpc", "http", "floor"}
    for front, r in data["fronts"].items():
        runs = [*r["levels"], r["half"], r["direct"]]
        assert [lv["concurrency"] for lv in r["levels"]] == [1, 8]
        for lv in runs:
            assert lv["ok"] > 0 and lv["bad"] == 0 and lv["errors"] == [], (front, lv["errors"])
            assert lv["tokens"] == TOKENS and lv["rps"] > 0
            assert 0 < lv["e2e_p50"] <= lv["e2e_p99"] and 0 < lv["ttft_p50"] <= lv["ttft_p99"]
            assert lv["ttft_p50"] <= lv["e2e_p50"]
            prompt, got = lv["sample"]
            want = [token_at(prompt, i) for i in range(TOKENS)]
            assert got == (tok.decode(want) if lv["target"] == "http" else want), (front, lv["target"])
        for lv in r["levels"] + [r["half"]]:  # the router's (or the floor's) CPU time was measured
            assert lv["cpu_ms_per_req"] > 0 and lv["router_cpu_util"] > 0
        assert r["direct"]["target"] == "direct" and r["half"]["rate"] == pytest.approx(r["rate"])
        assert r["saturation"]["rps"] == max(lv["rps"] for lv in r["levels"])
    d1 = data["direct_c1"]
    assert d1["target"] == "direct" and d1["concurrency"] == 1 and d1["ok"] > 0 and d1["bad"] == 0
    assert all(set(r["added_c1"]) == {"e2e_p50", "e2e_p99", "ttft_p50", "ttft_p99"} for r in data["fronts"].values())
    # one gRPC message per token as the fake decode node sends them
    assert all(lv["chunks_per_req"] == TOKENS for lv in data["fronts"]["grpc"]["levels"])
    result = dict(line.split()[1].split("=") for line in out.stdout.splitlines() if line.startswith("RESULT "))
    for front in ("grpc", "http"):
        for key in ("rps", "cpu_ms_per_req", "added_p50_ms", "added_p99_ms", "added_ttft_p50_ms", "added_ttft_p99_ms",
                    "added_c1_p50_ms", "added_c1_ttft_p50_ms"):
            assert f"router_{key}_{front}" in result
        assert float(result[f"router_rps_{front}"]) > 0 and float(result[f"router_cpu_ms_per_req_{front}"]) > 0
    assert int(result["router_requests_bad"]) == 0 and int(result["router_requests_ok"]) > 0
    # every process stopped by itself (exit 0 after its stdin closed) and every port closed
    assert data["exit_codes"] == [0] * len(data["pids"]) == [0, 0, 0]
    assert not any(alive(pid) for pid in data["pids"])
    addresses = [*data["nodes"].values(), *(a for a in data["router"].values() if a)]
    assert len(addresses) == 6 and all(refused(a) for a in addresses)
