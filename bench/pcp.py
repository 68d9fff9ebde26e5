"""PCP benchmark: time to first token for long prompts at pcp 1 and pcp 2.

    .venv/bin/python bench/pcp.py [--lengths 2048 4096 8192 16384] [--repeat 2]

Each rank runs one torch thread, so pcp 2 uses two cores and pcp 1 one. The
model is random (hidden 512, 4 layers, 8 query heads, 1 KV head, head dim 64).
The breakdown times one rank's share of a pcp 2 prefill layer by layer
(attention, K/V all-gather, the rest) in this process, with no other rank
competing for the cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench_model, table, timed  # noqa: E402
from braid.engine import LLM  # noqa: E402


def prompt_of(n: int) -> list[int]:
    return [(i * 7919) % 380 + 2 for i in range(n)]


def ttft(model: str, pcp: int, lengths: list[int], repeat: int) -> dict[int, float]:
    longest = max(lengths)
    block = 16
    blocks = longest // (block * pcp) + 8
    out = {}
    with LLM(
        model,
        prefill_context_parallel_size=pcp,
        threads_per_rank=1,
        block_size=block,
        num_kv_blocks=blocks,
        max_model_len=longest + 16,
        max_num_batched_tokens=longest,
    ) as llm:
        for n in lengths:
            p = prompt_of(n)
            out[n] = timed(lambda: llm.engine.last_token_logits([p]), repeat=repeat, warmup=1 if n <= 4096 else 0)
            print(f"  pcp {pcp}: {n:6d} tokens  {out[n]:.3f} s", flush=True)
    return out


def breakdown(model: str, length: int) -> list[list]:
    """One pcp-2 rank's share of a prefill of `length` tokens, per layer, in this process:
    the rank's attention rows, the K/V all-gather's data movement (concatenation and
    reordering; the network part is measured in the TTFT table), and everything else."""
    from braid.engine.config import EngineConfig, resolve
    from braid.engine.loader import load_weights
    from braid.engine.models import build_model
    from braid.engine.pcp import split_prefill
    from braid.engine.parallel_state import ParallelState
    from braid.kernels import ops
    from braid.kernels.reference import VarlenRows

    torch.set_num_threads(1)
    cfg, mcfg = resolve(EngineConfig.build(model, num_kv_blocks=1))
    par = ParallelState.single()
    m = build_model(mcfg, par, torch.float32)
    load_weights(m, model, torch.float32)
    split = split_prefill([length], 2, 0)
    rows = VarlenRows(*zip(*split.rows))
    t_loc = len(split.positions)
    x = torch.randn(t_loc, mcfg.hidden_size) * 0.1
    pos = torch.tensor(split.positions)
    full_kv = torch.randn(length, 2, mcfg.num_kv_heads, mcfg.head_dim)
    res = []
    with torch.inference_mode():
        for i, layer in enumerate(m.model.layers):
            a = layer.self_attn
            t0 = time.perf_counter()
            h = layer.input_layernorm(x)
            q, k, v = a.qkv_proj(h)
            q = q.view(t_loc, a.num_heads, a.head_dim)
            k = k.view(t_loc, a.num_kv_heads, a.head_dim)
            q, k = a.rotary(pos, q, k)
            t1 = time.perf_counter()
            kv = torch.stack((k, v.view(t_loc, a.num_kv_heads, a.head_dim)), 1)
            gathered = torch.cat([kv, full_kv[: length - t_loc]]).index_select(0, torch.randperm(length))
            t2 = time.perf_counter()
            out, _ = ops.prefill_attention(q, gathered[:, 0], gathered[:, 1], rows, a.attn.scale)
            t3 = time.perf_counter()
            x = x + a.o_proj(out.reshape(t_loc, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            t4 = time.perf_counter()
            res.append([i, t3 - t2, t2 - t1, (t1 - t0) + (t4 - t3)])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model = bench_model()
    print(f"model: {model} (cores: {os.cpu_count()})")
    results = {pcp: ttft(model, pcp, args.lengths, args.repeat) for pcp in (1, 2)}
    rows = [[n, results[1][n], results[2][n], results[1][n] / results[2][n]] for n in args.lengths]
    print("\nTime to first token (prefill), seconds, one thread per rank")
    print(table(["tokens", "pcp1 s", "pcp2 s", "speedup"], rows))
    longest = max(args.lengths)
    print(f"\nPer-layer breakdown of one pcp-2 rank at {longest} tokens (seconds)")
    print(table(["layer", "attention", "kv gather (local copy)", "other"], breakdown(model, longest)))
    speedup = results[1][longest] / results[2][longest]
    tag = f"{longest // 1024}k" if longest % 1024 == 0 else str(longest)
    print(f"RESULT pcp2_speedup_{tag}={speedup:.3f}")


if __name__ == "__main__":
    main()
