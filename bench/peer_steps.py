"""Step-by-step timing of one batch, the same for every engine bench/peers.py runs.

Plain Python with no braid import: bench/peers.py runs it in braid's process and,
copied beside it, inside each peer's own virtual environment (vLLM's), where it is
the `__main__` that loads the peer, runs the cases it is given as JSON and prints
one `PEER_RESULT {...}` line.

A case adds a batch of token-id prompts at once and steps the engine until all
finish, stamping the wall time of every step that emitted tokens. From the stamps:
TTFT (until every request has its first token), decode tok/s (tokens after the
first ones over the time after that) and inter-token latencies (one decode step
emits one token per running request).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time


def run_case(add, step, unfinished, prompts: list[list[int]], max_tokens: int, limit_s: float = 1800.0) -> dict:
    """add(request_id, prompt) queues one request; step() -> {request_id: tokens so far
    of the requests that got some}; unfinished() -> bool. Bounded by `limit_s`."""
    ids = [f"case-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        add(rid, p)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    first: dict[str, float] = {}
    stamps: list[tuple[float, int]] = []
    while unfinished():
        if time.perf_counter() - t0 > limit_s:
            raise TimeoutError(f"case of {len(prompts)} prompts still running after {limit_s} s")
        got = step()
        now = time.perf_counter() - t0
        new = 0
        for rid, toks in got.items():
            if rid in tokens:
                new += len(toks) - len(tokens[rid])
                tokens[rid] = list(toks)
                if toks and rid not in first:
                    first[rid] = now
        if new:
            stamps.append((now, new))
    return {"tokens": [tokens[r] for r in ids], "stamps": stamps, "batch": len(prompts),
            "first": [first.get(r) for r in ids]}


def summarize(run: dict) -> dict:
    """TTFT (until every request has its first token), decode tok/s (the tokens of
    the steps after that, over their time) and inter-token latencies (between those
    steps) of one run_case result. Requests whose prefill ends early emit tokens
    before the last one's first: those count in neither."""
    ttft = max(run["first"])
    first_at = max(i for i, (t, _) in enumerate(run["stamps"]) if t <= ttft)
    end = run["stamps"][-1][0]
    decode_tokens = sum(n for t, n in run["stamps"][first_at + 1:])
    decode_s = end - ttft
    times = [t for t, _ in run["stamps"][first_at:]]
    itl = [b2 - a for a, b2 in zip(times, times[1:])]
    return {"ttft_s": ttft, "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            "itl_s": itl, "e2e_s": end}


def percentile(xs: list[float], q: float) -> float:
    """Percentile q (0..100) with linear interpolation; NaN for no samples."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def repeat_case(add, step, unfinished, case: dict) -> dict:
    """`case`: prompts, max_tokens, warmup, repeat. Tokens of the last run, each run's summary."""
    runs = [run_case(add, step, unfinished, case["prompts"], case["max_tokens"])
            for _ in range(case.get("warmup", 1) + case.get("repeat", 3))]
    kept = runs[case.get("warmup", 1):]
    return {"tokens": kept[-1]["tokens"], "runs": [summarize(r) for r in kept]}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# -- vLLM, inside its own virtual environment ------------------------------------


def vllm_main(spec: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: steps time it
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              max_num_seqs=spec["max_num_seqs"], enable_prefix_caching=False, skip_tokenizer_init=True, seed=0,
              max_num_batched_tokens=spec.get("max_num_batched_tokens"))
    eng = llm.llm_engine
    out = []
    for case in spec["cases"]:
        params = SamplingParams(max_tokens=case["max_tokens"], temperature=0, ignore_eos=True, detokenize=False)

        def add(rid, prompt, params=params):
            eng.add_request(rid, {"prompt_token_ids": prompt}, params)

        def step():
            return {o.request_id: o.outputs[0].token_ids for o in eng.step()}

        out.append(repeat_case(add, step, eng.has_unfinished_requests, case))
    return {"cases": out}


if __name__ == "__main__":
    result = vllm_main(json.loads(open(sys.argv[1]).read()))
    print("PEER_RESULT " + json.dumps(result), flush=True)
