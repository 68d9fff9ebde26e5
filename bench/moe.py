"""MoE benchmark: expert parallelism (EP) against TP-sliced experts, side by side.

    .venv/bin/python bench/moe.py [--tp 2] [--experts 32] [--batch 16] [--prompt 512] [--quick]

A random Qwen3-MoE checkpoint (built once with transformers under the temp
folder): hidden 512, 4 sparse layers, `--experts` routed experts of
intermediate 256, top 4. Two engines at the same tp and one thread per rank,
alive at once and stepping in turn (so both see the same machine load): one
slices every expert over the TP ranks (braid's default), one places experts
whole on the ranks (EP = tp) and moves tokens with all-to-all. Both must
produce the same greedy tokens before any time is printed.

Rows: prefill time of one `--prompt`-token prompt (median of 3), decode step
time for `--batch` sequences (median over the steps), routed-expert weight
bytes per rank (measured on the ranks), the rows each rank's experts
computed, and both times per token. RESULT: EP / TP-sliced ratios (below 1 = EP faster).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import table  # noqa: E402
from braid.engine import LLM, SamplingParams  # noqa: E402

GREEDY = dict(temperature=0, ignore_eos=True)


def moe_model(experts: int, quick: bool) -> str:
    """A random Qwen3-MoE checkpoint (transformers' own class and save format)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    dims = dict(hidden_size=128, moe_intermediate_size=64, num_hidden_layers=2) if quick else \
        dict(hidden_size=512, moe_intermediate_size=256, num_hidden_layers=4)
    path = os.path.join(tempfile.gettempdir(), "braid-bench", f"qwen3moe-e{experts}{'-quick' if quick else ''}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        cfg = Qwen3MoeConfig(vocab_size=4096, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=64, num_experts=experts, num_experts_per_tok=4, norm_topk_prob=True,
                             max_position_embeddings=8192, initializer_range=0.05, bos_token_id=0, eos_token_id=1,
                             **dims)
        Qwen3MoeForCausalLM(cfg).eval().save_pretrained(path)
    return path


def prompt_of(n: int, seed: int) -> list[int]:
    return [((i + seed) * 7919) % 4000 + 2 for i in range(n)]


def prefill_time(llm: LLM, prompt_len: int, seed: int) -> float:
    t = time.perf_counter()
    llm.generate([prompt_of(prompt_len, seed)], SamplingParams(max_tokens=1, **GREEDY))
    return time.perf_counter() - t


def decode_steps(llms: dict[str, LLM], batch: int, steps: int) -> dict[str, float]:
    """Median decode step time of each engine, the engines stepping in turn."""
    engs = {k: llm.engine for k, llm in llms.items()}
    for eng in engs.values():
        for i in range(batch):
            eng.add_request(prompt_of(32 + i, 100 + i), SamplingParams(max_tokens=steps, **GREEDY))
    times: dict[str, list[float]] = {k: [] for k in engs}
    for _ in range(steps + 8):  # bounded: every sequence finishes after `steps` tokens
        live = [k for k, eng in engs.items() if eng.has_unfinished()]
        if not live:
            break
        for k in live:
            t = time.perf_counter()
            engs[k].step()
            times[k].append(time.perf_counter() - t)
    # the first steps prefill: the decode time is the median of the rest
    return {k: statistics.median(ts[2:] or ts) for k, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a tiny model and short runs (for the test)")
    args = ap.parse_args()
    if args.quick:
        args.prompt, args.steps, args.batch = 64, 8, 4
    model = moe_model(args.experts, args.quick)
    common = dict(tensor_parallel_size=args.tp, threads_per_rank=1, block_size=16, num_kv_blocks=512,
                  enable_prefix_caching=False)
    configs = {"TP-sliced": dict(), f"EP {args.tp}": dict(enable_expert_parallel=True)}
    with contextlib.ExitStack() as stack:
        llms = {k: stack.enter_context(LLM(model, **common, **v)) for k, v in configs.items()}
        check = [prompt_of(n, 7) for n in (5, 40)]
        ref = [o.token_ids for o in llms["TP-sliced"].generate(check, SamplingParams(max_tokens=16, **GREEDY))]
        for k, llm in llms.items():
            got = [o.token_ids for o in llm.generate(check, SamplingParams(max_tokens=16, **GREEDY))]
            if got != ref:
                sys.exit(f"{k} disagrees with TP-sliced experts: {got} != {ref}; no times printed")
        prefill = {k: [] for k in llms}
        for rep in range(4):  # the first is warm-up
            for k, llm in llms.items():
                t = prefill_time(llm, args.prompt, 500 + rep)
                if rep:
                    prefill[k].append(t)
        step = decode_steps(llms, args.batch, args.steps)
        stats = {k: llm.engine.executor.rank_stats() for k, llm in llms.items()}
    rows = []
    for k in configs:
        per_rank = [st.expert_weight_bytes / 2**20 for st in stats[k]]
        rows_per_rank = [int(st.expert_rows.sum()) for st in stats[k]]
        p = statistics.median(prefill[k])
        rows.append([k, p, step[k] * 1000, args.batch / step[k],
                     "/".join(f"{b:.1f}" for b in per_rank), "/".join(map(str, rows_per_rank)),
                     p * 1000 / args.prompt, step[k] * 1000 / args.batch])
    print(f"\nMoE: {args.experts} experts top-4, tp {args.tp}, one thread per rank; prefill {args.prompt} tokens, "
          f"decode batch {args.batch}")
    print(table(["experts", "prefill s", "decode step ms", "decode tok/s", "expert MiB per rank",
                 "expert rows per rank", "prefill ms/token", "decode ms/token"], rows))
    pcp = pcp_prefill(model, args)
    print(f"\nPrefill of {args.prompt} tokens under PCP 2 (tp 1): experts whole on both PCP ranks (no EP) vs EP 2 "
          f"across the PCP ranks (tokens dispatched with all-to-all)")
    print(table(["experts", "prefill s", "expert MiB per rank"], [[k, t, mib] for k, (t, mib) in pcp.items()]))
    tp_k, ep_k = list(configs)
    (_, (no_ep, _)), (_, (ep_a2a, _)) = pcp.items()
    print(f"RESULT ep_prefill_ratio={statistics.median(prefill[ep_k]) / statistics.median(prefill[tp_k]):.3f} "
          f"ep_decode_step_ratio={step[ep_k] / step[tp_k]:.3f} pcp_ep_all_to_all_prefill_ratio={ep_a2a / no_ep:.3f}")


def pcp_prefill(model: str, args) -> dict[str, tuple[float, str]]:
    """Median prefill time and routed-expert MiB per rank at pcp 2, without and with EP."""
    common = dict(prefill_context_parallel_size=2, threads_per_rank=1, block_size=16, num_kv_blocks=512,
                  enable_prefix_caching=False)
    configs = {"whole on each rank": dict(), "EP 2 (all-to-all)": dict(expert_parallel_size=2)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    with contextlib.ExitStack() as stack:
        llms = {k: stack.enter_context(LLM(model, **common, **v)) for k, v in configs.items()}
        for rep in range(4):  # the first is warm-up
            for k, llm in llms.items():
                t = prefill_time(llm, args.prompt, 700 + rep)
                if rep:
                    times[k].append(t)
        mib = {k: "/".join(f"{st.expert_weight_bytes / 2**20:.1f}" for st in llm.engine.executor.rank_stats())
               for k, llm in llms.items()}
    return {k: (statistics.median(times[k]), mib[k]) for k in configs}


if __name__ == "__main__":
    main()
