"""DCP benchmark: KV capacity and decode speed at dcp 1, 2 (and 4) with the
same per-rank KV memory.

    .venv/bin/python bench/dcp.py [--tp 2] [--blocks 256] [--batch 8] [--context 2048 8192]

Capacity: the scheduler's pool holds `blocks` ids of block_size * dcp tokens;
the table shows that bound and the most tokens the engine actually held at
once while serving a stream of long requests. TPOT: median decode step time for
`batch` sequences of each context length, all dcp engines alive at once and
stepping in turn so they share the machine's load; the RESULT ratio is at the
longest context. The model has one KV head, so every TP
rank holds a copy of it at dcp 1; DCP turns those copies into shards.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_model, table  # noqa: E402
from braid.engine import LLM, SamplingParams  # noqa: E402


def prompt_of(n: int, seed: int) -> list[int]:
    return [((i + seed) * 7919) % 380 + 2 for i in range(n)]


def capacity(llm: LLM, context: int) -> int:
    """Most tokens resident at once while serving many requests of `context` tokens."""
    eng = llm.engine
    vbs = eng.blocks.tokens_per_block
    n = 2 * (eng.blocks.num_blocks * vbs) // context + 2
    for i in range(n):
        eng.add_request(prompt_of(context, i), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, sum(s.num_cached_tokens for s in eng.scheduler.running))
    return peak


def tpot(llms: dict[int, LLM], batch: int, context: int, steps: int) -> dict[int, float]:
    """Median decode step time of each engine. The engines step in turn (one
    step each, round after round) so that every configuration sees the same
    machine load: this machine is shared and its speed drifts over minutes."""
    engs = {d: llm.engine for d, llm in llms.items()}
    for eng in engs.values():
        for i in range(batch):
            eng.add_request(prompt_of(context, 100 + i),
                            SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True))
        while any(s.num_cached_tokens == 0 for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()  # prefill everything first (not timed)
    times: dict[int, list[float]] = {d: [] for d in engs}
    for _ in range(steps + 4):  # bounded: each engine finishes after steps + 1 decode steps
        live = [d for d, eng in engs.items() if eng.has_unfinished()]
        if not live:
            break
        for d in live:
            t = time.perf_counter()
            engs[d].step()
            times[d].append(time.perf_counter() - t)
    return {d: statistics.median(ts[1:-1] or ts) for d, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2, help="tensor parallel size (dcp goes up to tp)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=256, help="KV blocks per rank (same memory at every dcp)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, nargs="+", default=[2048, 8192], help="context lengths for TPOT")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    model = bench_model()
    dcps = [d for d in (1, 2, 4) if d <= args.tp and args.tp % d == 0]
    rows, res, tpots = [], {}, {}
    common = dict(tensor_parallel_size=args.tp, block_size=args.block_size, threads_per_rank=1, max_num_seqs=256)
    for dcp in dcps:
        with LLM(model, num_kv_blocks=args.blocks, decode_context_parallel_size=dcp, **common) as llm:
            bound = llm.engine.blocks.num_blocks * llm.engine.blocks.tokens_per_block
            per_rank_mb = llm.engine.kv_stats()["bytes_per_block_per_rank"] * args.blocks / 2**20
            held = capacity(llm, min(args.context) // 4)
        res[dcp] = (bound, held, per_rank_mb)
        print(f"  dcp {dcp}: capacity bound {bound} tokens, held {held}", flush=True)
    for ctx in args.context:
        with contextlib.ExitStack() as stack:
            llms = {}
            for dcp in dcps:
                need = (args.batch * (ctx + args.steps + 2)) // (args.block_size * dcp) + args.batch + 1
                llms[dcp] = stack.enter_context(LLM(model, num_kv_blocks=need, max_model_len=ctx + args.steps + 8,
                                                    decode_context_parallel_size=dcp, **common))
            for dcp, t in tpot(llms, args.batch, ctx, args.steps).items():
                tpots[(dcp, ctx)] = t
        print(f"  TPOT @ {ctx}: " + ", ".join(f"dcp {d} {tpots[(d, ctx)] * 1000:.1f} ms" for d in dcps), flush=True)
    for dcp in dcps:
        bound, held, per_rank_mb = res[dcp]
        rows.append([dcp, f"{per_rank_mb:.1f}", bound, held] + [tpots[(dcp, c)] * 1000 for c in args.context])
    print(f"\nDCP at the same per-rank KV memory (tp {args.tp}, block {args.block_size}, {args.blocks} blocks per rank)")
    print(f"TPOT: batch {args.batch}, one thread per rank, context lengths {args.context}")
    print(table(["dcp", "KV MiB/rank", "capacity bound (tokens)", "held at once"] + [f"TPOT ms @ {c}" for c in args.context], rows))
    for d in dcps[1:]:
        print(f"dcp {d} vs 1: capacity x{res[d][1] / res[1][1]:.2f}; TPOT "
              + ", ".join(f"x{tpots[(d, c)] / tpots[(1, c)]:.3f} @ {c}" for c in args.context))
    cap_ratio = res[2][1] / res[1][1] if 2 in res else float("nan")
    longest = max(args.context)
    tpot_ratio = tpots[(2, longest)] / tpots[(1, longest)] if 2 in res else float("nan")
    print(f"RESULT dcp_capacity_ratio={cap_ratio:.3f} dcp_tpot_ratio={tpot_ratio:.3f}")


if __name__ == "__main__":
    main()
