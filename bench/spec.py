"""Speculative decoding benchmark: n-gram prompt lookup, off (k=0) against on (k>0), side by side.

    .venv/bin/python bench/spec.py                    # SmolLM2-135M-Instruct, offline and P/D cluster (~10-15 min, 2 cores)
    .venv/bin/python bench/spec.py --no-cluster       # offline only
    .venv/bin/python bench/spec.py --quick --model PATH --prompts ids   # tiny sizes, token-id prompts (the test)

Two workloads, greedy (temperature 0, EOS ignored, a fixed number of output tokens):

    quote  chat prompts that quote their context: "Repeat the following passage exactly",
           "Fix the typos in this passage", "Summarise ..., quoting its key sentences word
           for word", over four fixed English passages (written for this benchmark)
    free   chat prompts asking for free generation ("Write a short story about ...")

each at batch 1 (the batch-1 prompts one after the other, each alone in the engine) and
batch 8 (eight prompts at once), in two modes:

    offline  braid.engine.LLM in this process (`--threads` per rank), the engine stepped here
    cluster  a local P/D cluster (etcd, one prefill node, one decode node, the router; one thread
             per rank), requests streamed through the SDK (batch 8 = 8 concurrent requests); the
             decode node speculates with the request's own k

k is set per request (SamplingParams / Client num_speculative_tokens), so every k of a
mode runs on the same engine (or cluster), interleaved within each repetition (k=0,
k=2, k=4, k=0, ...) so that machine noise falls on all of them alike. Repetition 0 is a
warm-up (not timed); the table shows the median of `--reps` timed repetitions.

Before any time is printed, every output with speculation (every repetition) is
compared token for token with the output without it (same mode, workload and batch);
any difference ends the run with an error and no table. The cluster's k=0 outputs are
also compared with the offline ones (reported, not fatal: the two differ in batching).

`--prompts ids` replaces the chat prompts with synthetic token-id prompts (for small test
checkpoints whose tokenizer makes no sense of English): "quote" is a random span of ids
followed by its first half again, "free" random ids.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import table  # noqa: E402
from braid.engine import LLM, SamplingParams  # noqa: E402
from braid.engine.default_model import resolve_model  # noqa: E402

PASSAGES = [
    "The lighthouse on the northern cape was built in 1872 from granite quarried on the island itself. "
    "For more than a century its keepers climbed one hundred and twelve steps every evening to light the lamp. "
    "In 1987 the light was automated, and the last keeper, a man named Thomas Hale, moved to the mainland. "
    "Today the tower is a small museum, and visitors can still see the logbooks in which the keepers "
    "recorded every ship that passed.",
    "Bread dough rises because yeast feeds on the sugars in the flour and releases carbon dioxide. "
    "The gas is trapped by a network of gluten proteins, which stretch like a balloon as the dough grows. "
    "Kneading makes this network stronger, while salt slows the yeast down and improves the flavour. "
    "A cool, slow rise gives the bacteria in the dough more time to produce acids, "
    "which is why bread left overnight in the fridge tastes richer.",
    "The committee met on Tuesday to review the budget for the new library. "
    "The architect presented three options: a single large reading room, two smaller rooms connected by a courtyard, "
    "or a renovation of the old post office on Market Street. "
    "After a long discussion, the committee voted to renovate the post office, because it was the cheapest option "
    "and the building was already in the centre of the town.",
    "Honeybees communicate the location of flowers with a movement called the waggle dance. "
    "A returning forager runs in a straight line while shaking her body, then circles back and repeats the run. "
    "The angle of the run relative to vertical shows the direction of the food relative to the sun, "
    "and the length of the run tells the other bees how far away the flowers are.",
]

QUOTE_TASKS = [
    "Repeat the following passage exactly, word for word:\n\n{}",
    "Fix the typos in this passage and write out the corrected passage in full:\n\n{}",
    "Summarise the following passage, quoting its key sentences word for word:\n\n{}",
]

STORY_TOPICS = [
    "a robot who learns to paint", "a lost dog finding its way home in the snow",
    "two friends opening a bakery", "a girl who discovers a door at the bottom of the sea",
    "an old fisherman and a talking seagull", "a city where it never stops raining",
    "a boy who collects lost keys", "the last day of summer at a mountain camp",
]


def typos(text: str, seed: int, every: int = 7) -> str:
    """`text` with the two middle letters of every `every`-th long word swapped (deterministic)."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i in range(rng.randrange(every), len(words), every):
        w = words[i]
        if len(w) >= 5 and w.isalpha():
            m = len(w) // 2
            words[i] = w[:m - 1] + w[m] + w[m - 1] + w[m + 1:]
    return " ".join(words)


def text_workloads() -> dict[str, list[list[dict]]]:
    """Eight chat conversations per workload."""
    quote = []
    for i in range(8):
        passage, task = PASSAGES[i % len(PASSAGES)], (i + i // len(PASSAGES)) % len(QUOTE_TASKS)
        if task == 1:
            passage = typos(passage, i)
        quote.append([{"role": "user", "content": QUOTE_TASKS[task].format(passage)}])
    free = [[{"role": "user", "content": f"Write a short story about {topic}."}] for topic in STORY_TOPICS]
    return {"quote": quote, "free": free}


def id_workloads(vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Eight token-id prompts per workload: quote = a random span then its first half again, free = random ids."""
    rng = random.Random(seed)
    quote, free = [], []
    for _ in range(8):
        span = [rng.randrange(2, vocab) for _ in range(40)]
        quote.append(span + span[:20])
        free.append([rng.randrange(2, vocab) for _ in range(60)])
    return {"quote": quote, "free": free}


def encode_chats(tokenizer, chats: list[list[dict]]) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt=True), add_special_tokens=False)
            for c in chats]


@dataclass
class Run:
    """One timed (or warm-up) pass of one configuration."""
    outputs: list[list[int]]
    decode_tokens: int
    """Output tokens after each sequence's first (the first comes with the prefill)."""
    decode_s: float
    """Wall time those tokens took (see the header of the table)."""
    all_tokens: int
    wall_s: float
    """Wall time of the whole pass, prefill included."""
    spec: dict = field(default_factory=dict)
    """Spec counter deltas: seq_steps, draft_tokens, accepted_tokens, emitted_tokens."""
    seq_steps: int = 0
    """Decode steps summed over sequences (offline only; 0: unknown)."""


SPEC_KEYS = ("seq_steps", "draft_tokens", "accepted_tokens", "emitted_tokens")


# -- offline ---------------------------------------------------------------------
def offline_pass(llm: LLM, prompts: list[list[int]], batch: int, k: int, max_tokens: int) -> Run:
    """Generate `prompts` `batch` at a time on the engine, stepping it here and timing each step."""
    eng = llm.engine
    st = eng.scheduler.spec_stats
    before = {key: getattr(st, key) for key in SPEC_KEYS}
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, num_speculative_tokens=k)
    outputs: list[list[int]] = []
    decode_tokens = all_tokens = seq_steps = 0
    decode_s = 0.0
    t_all = time.perf_counter()
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        ids = [eng.add_request(p, params).request_id for p in group]
        toks: dict[str, list[int]] = {rid: [] for rid in ids}
        steps: dict[str, int] = {rid: 0 for rid in ids}
        t_first = None
        while eng.has_unfinished():
            events = eng.step()
            now = time.perf_counter()
            seen = set()
            for ev in events:
                if ev.error:
                    raise RuntimeError(f"request {ev.request_id} failed: {ev.error}")
                if ev.token_id is not None:
                    toks[ev.request_id].append(ev.token_id)
                    seen.add(ev.request_id)
            for rid in seen:
                steps[rid] += 1
            if t_first is None and all(toks[rid] for rid in ids):
                t_first = now  # every sequence has its first token: decoding starts here
        t_end = time.perf_counter()
        outputs += [toks[rid] for rid in ids]
        decode_tokens += sum(len(toks[rid]) - 1 for rid in ids)
        all_tokens += sum(len(toks[rid]) for rid in ids)
        seq_steps += sum(steps[rid] - 1 for rid in ids)
        decode_s += t_end - t_first
    wall = time.perf_counter() - t_all
    spec = {key: getattr(st, key) - before[key] for key in SPEC_KEYS}
    return Run(outputs, decode_tokens, decode_s, all_tokens, wall, spec, seq_steps)


def cells(prompts: dict[str, list[list[int]]], args):
    """(workload, batch, k, prompts) of one repetition, in the order they run: every k of a
    (workload, batch) in a row, so machine noise falls on all of them alike."""
    for wl in prompts:
        for batch in args.batches:
            for k in [0] + args.ks:
                yield wl, batch, k, prompts[wl][:args.b1_prompts] if batch == 1 else prompts[wl][:batch]


def run_offline(model: str, prompts: dict[str, list[list[int]]], args, log) -> dict:
    """{(workload, batch, k): [Run, ...]} with repetition 0 (warm-up) first."""
    runs: dict[tuple, list[Run]] = {}
    settings = dict(threads_per_rank=args.threads)
    with LLM(model, **settings) as llm:
        for rep in range(args.reps + 1):
            t = time.perf_counter()
            for wl, batch, k, group in cells(prompts, args):
                runs.setdefault((wl, batch, k), []).append(offline_pass(llm, group, batch, k, args.max_tokens))
            log(f"  offline repetition {rep}{' (warm-up)' if rep == 0 else ''}: {time.perf_counter() - t:.0f} s")
    return runs


# -- cluster ---------------------------------------------------------------------
def start_cluster(model: str, workdir: str, args):
    from braid.cluster.launcher import LocalCluster

    data = {
        "router": {"prefill_policy": "round_robin", "decode_policy": "round_robin", "request_timeout_s": 600},
        # one rank each (the default cluster is prefill pcp 2 -> decode tp 2 dcp 2: SmolLM2's 9 heads do not split)
        "prefill": {"parallel": {"tensor_parallel_size": 1, "prefill_context_parallel_size": 1, "threads_per_rank": 1},
                    "cache": {"block_size": 16}},
        "decode": {"parallel": {"tensor_parallel_size": 1, "decode_context_parallel_size": 1, "threads_per_rank": 1},
                   "cache": {"block_size": 16}},
    }
    cluster = LocalCluster(workdir, data=data, model=model)
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster


def spec_counters(metrics_address: str) -> dict:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    out = {}
    for key in SPEC_KEYS:
        name = f"braid_node_spec_{key}_total"
        out[key] = next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith(name + " ") or line.startswith(name + "{")), 0.0)
    return out


def settled_counters(metrics_address: str) -> dict:
    """The decode node's counters once they include the pass that just ended: the node reads
    its engine every 0.5 s and exports the previous reading, so they lag by up to ~1 s."""
    time.sleep(1.1)
    last = spec_counters(metrics_address)
    for _ in range(20):
        time.sleep(0.3)
        now = spec_counters(metrics_address)
        if now == last:
            return now
        last = now
    return last


async def stream_one(client, prompt: list[int], k: int, max_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, time of the first token, time of the last) of one streamed request."""
    toks: list[int] = []
    first = last = None
    async for chunk in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                       num_speculative_tokens=k, timeout=600):
        if chunk.token_ids:
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            toks += list(chunk.token_ids)
    if first is None:
        raise RuntimeError("a cluster request returned no tokens")
    return toks, first, last


async def cluster_pass(address: str, prompts: list[list[int]], batch: int, k: int, max_tokens: int) -> Run:
    from braid.client import AsyncClient

    outputs: list[list[int]] = []
    decode_tokens = all_tokens = 0
    decode_s = 0.0
    async with AsyncClient(address, timeout=600) as client:
        t_all = time.perf_counter()
        for start in range(0, len(prompts), batch):
            res = await asyncio.gather(*(stream_one(client, p, k, max_tokens) for p in prompts[start:start + batch]))
            outputs += [r[0] for r in res]
            decode_tokens += sum(len(r[0]) - 1 for r in res)
            all_tokens += sum(len(r[0]) for r in res)
            decode_s += max(r[2] for r in res) - min(r[1] for r in res)
        wall = time.perf_counter() - t_all
    return Run(outputs, decode_tokens, decode_s, all_tokens, wall)


def run_cluster(model: str, prompts: dict[str, list[list[int]]], args, log) -> dict:
    runs: dict[tuple, list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="braid-spec-") as workdir:
        t = time.perf_counter()
        cluster = start_cluster(model, workdir, args)
        try:
            log(f"  cluster up in {time.perf_counter() - t:.0f} s at {cluster.address}")
            metrics = cluster.procs[[p.role for p in cluster.procs].index("decode")].info["metrics"]
            for rep in range(args.reps + 1):
                t = time.perf_counter()
                for wl, batch, k, group in cells(prompts, args):
                    before = spec_counters(metrics)
                    run = asyncio.run(cluster_pass(cluster.address, group, batch, k, args.cluster_max_tokens))
                    after = settled_counters(metrics) if k else spec_counters(metrics)
                    run.spec = {key: after[key] - before[key] for key in SPEC_KEYS}
                    runs.setdefault((wl, batch, k), []).append(run)
                log(f"  cluster repetition {rep}{' (warm-up)' if rep == 0 else ''}: {time.perf_counter() - t:.0f} s")
        finally:
            cluster.close()
    return runs


# -- checks and report -------------------------------------------------------------
def check_equal(mode: str, runs: dict) -> int:
    """Every run's outputs equal the k=0 warm-up's of the same workload and batch; the number
    of sequences compared. Exits (no times printed) on the first difference."""
    compared = 0
    for (wl, batch, k), rs in runs.items():
        ref = runs[(wl, batch, 0)][0].outputs
        for rep, r in enumerate(rs):
            for i, (got, exp) in enumerate(zip(r.outputs, ref)):
                if got != exp:
                    at = next((j for j, (a, b) in enumerate(zip(got, exp)) if a != b), min(len(got), len(exp)))
                    sys.exit(f"FAIL: {mode} {wl} batch {batch} k={k} repetition {rep} prompt {i}: output differs from "
                             f"k=0 at token {at}: {got[at:at + 8]} != {exp[at:at + 8]} (lengths {len(got)}, {len(exp)}); "
                             f"no times printed")
            if len(r.outputs) != len(ref):
                sys.exit(f"FAIL: {mode} {wl} batch {batch} k={k}: {len(r.outputs)} outputs, expected {len(ref)}")
            compared += len(r.outputs) if k else 0
    return compared


def summarize(runs: dict, mode: str) -> dict:
    """{(workload, batch, k): row values} over the timed repetitions (all but the first)."""
    out = {}
    for (wl, batch, k), rs in runs.items():
        timed = rs[1:] or rs
        spec = {key: sum(r.spec.get(key, 0) for r in timed) for key in SPEC_KEYS}
        seq_steps = sum(r.seq_steps for r in timed)
        out[(wl, batch, k)] = dict(
            decode=statistics.median(r.decode_tokens / r.decode_s for r in timed),
            e2e=statistics.median(r.all_tokens / r.wall_s for r in timed),
            accept=spec["accepted_tokens"] / spec["draft_tokens"] if spec["draft_tokens"] else None,
            tps=spec["emitted_tokens"] / spec["seq_steps"] if spec["seq_steps"] else None,
            tps_all=sum(r.decode_tokens for r in timed) / seq_steps if seq_steps else None,
            drafts=spec["draft_tokens"],
        )
    for (wl, batch, k), row in out.items():
        row["speedup"] = row["decode"] / out[(wl, batch, 0)]["decode"]
    return out


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def report_rows(mode: str, summary: dict) -> list[list]:
    rows = []
    for (wl, batch, k), r in summary.items():
        rows.append([wl, mode, batch, k, f"{r['decode']:.2f}", f"{r['e2e']:.2f}", f"{r['speedup']:.3f}",
                     fmt(r["accept"]) if k else "-", fmt(r["tps"], ".2f") if k else "-",
                     fmt(r["tps_all"], ".2f")])
    return rows


def best(summary: dict, wl: str, batch: int, ks: list[int]) -> tuple[int, dict] | None:
    cands = [(k, summary[(wl, batch, k)]) for k in ks if (wl, batch, k) in summary]
    return max(cands, key=lambda kv: kv[1]["speedup"]) if cands else None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="checkpoint (default: SmolLM2-135M-Instruct; 'tiny' = the tiny model)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="speculative tokens per step to compare with k=0")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, offline")
    ap.add_argument("--cluster-max-tokens", type=int, default=32, help="output tokens per request, cluster")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    ap.add_argument("--b1-prompts", type=int, default=2, help="prompts run one after the other at batch 1")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per rank offline (1 by default: the cluster nodes use 1, and a shared "
                         "2-core machine makes 2 threads very noisy)")
    ap.add_argument("--prompts", choices=("text", "ids"), default="text",
                    help="chat prompts (text) or synthetic token-id prompts (ids, for test checkpoints)")
    ap.add_argument("--no-cluster", action="store_true", help="offline only")
    ap.add_argument("--cluster", action="store_true", help="run the cluster part even with --quick")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: 16 tokens, 1 repetition, no cluster")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_tokens, args.cluster_max_tokens, args.reps, args.b1_prompts = 16, 16, 1, 1
        args.no_cluster = args.no_cluster or not args.cluster
    if 0 in args.ks or any(k < 0 for k in args.ks):
        ap.error("--ks: positive values (k=0 always runs as the baseline)")
    if max(args.batches) > 8:
        ap.error("--batches: at most 8 (each workload has 8 prompts)")
    return args


HEADERS = ["workload", "mode", "batch", "k", "decode tok/s", "e2e tok/s", "speedup", "accept", "tok/step",
           "tok/step all"]


def load_prompts(model: str, kind: str) -> dict[str, list[list[int]]]:
    if kind == "text":
        from braid.tokenizer import Tokenizer

        tok = Tokenizer(model)
        return {wl: encode_chats(tok, chats) for wl, chats in text_workloads().items()}
    from braid.engine.model_config import load_model_config

    return id_workloads(load_model_config(model).vocab_size)


def print_header(model: str, prompts: dict, args) -> None:
    lens = {wl: [len(p) for p in ps] for wl, ps in prompts.items()}
    print(f"model {model}; prompts: {args.prompts}; prompt tokens {lens}; ks {args.ks}; batches {args.batches}; "
          f"{args.reps} timed repetitions after 1 warm-up; {os.cpu_count()} cores", flush=True)
    print(f"\nSpeculative decoding (n-gram prompt lookup), greedy, EOS ignored; offline {args.max_tokens} and cluster "
          f"{args.cluster_max_tokens} output tokens per request; batch 1 = {args.b1_prompts} prompt(s) one after the "
          f"other; median of {args.reps} repetitions after a warm-up; offline {args.threads} thread(s) per rank")
    print("decode tok/s: output tokens after each sequence's first / wall time from the moment every sequence of "
          "the batch has its first token (prefill done) to the last token; the prefill is excluded. Offline timed "
          "around engine.step(); cluster at the client (streamed chunks; includes the P->D handoff of late requests)")
    print("e2e tok/s: all output tokens / wall time of the whole batch, prefill included. speedup: decode tok/s / "
          "k=0's, same run. accept: accepted / verified drafts; tok/step: tokens per step of the steps that "
          "verified drafts (SpecStats); tok/step all: decode tokens / decode steps per sequence (offline)", flush=True)


def cluster_section(model: str, prompts: dict, offline: dict, args, log) -> tuple[dict, int]:
    """The cluster's runs summarised, and how many sequences were checked equal."""
    cluster = run_cluster(model, prompts, args, log)
    n = check_equal("cluster", cluster)
    print(f"\nCHECK speculative outputs equal k=0 token for token (cluster): {n} sequences compared, all equal")
    same = total = 0
    for (wl, batch, k), rs in cluster.items():
        if k == 0:
            ref = offline[(wl, batch, 0)][0].outputs
            for got, exp in zip(rs[0].outputs, ref):
                total += 1
                same += got == exp[:len(got)]
    print(f"CHECK cluster k=0 outputs equal the offline ones (their first {args.cluster_max_tokens} tokens): "
          f"{same}/{total} (informational)")
    summary = summarize(cluster, "cluster")
    print(table(HEADERS, report_rows("cluster", summary)))
    return summary, n


def result_line(results: dict, args) -> str:
    """The RESULT line (best k per key), after a line naming the k each key used."""
    off = results["offline"]
    parts, chosen = [], {}
    keys = [("spec_speedup_b1", "offline", "quote", 1), ("spec_speedup_b8", "offline", "quote", 8),
            ("spec_speedup_free_b1", "offline", "free", 1), ("spec_speedup_free_b8", "offline", "free", 8),
            ("spec_cluster_speedup_b1", "cluster", "quote", 1), ("spec_cluster_speedup_b8", "cluster", "quote", 8)]
    for key, mode, wl, batch in keys:
        b = best(results[mode], wl, batch, args.ks) if mode in results else None
        if b:
            chosen[key] = b
            parts.append(f"{key}={b[1]['speedup']:.3f}")
    b1 = chosen.get("spec_speedup_b1") or best(off, "quote", args.batches[0], args.ks)
    parts.insert(min(4, len(parts)), f"spec_acceptance_quote={b1[1]['accept'] or 0.0:.3f}")
    print("best k per RESULT key: " + ", ".join(f"{key} k={b[0]}" for key, b in chosen.items())
          + f"; spec_acceptance_quote at k={b1[0]} (offline batch {1 if 'spec_speedup_b1' in chosen else args.batches[0]})")
    return "RESULT " + " ".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{msg} ({time.perf_counter() - t_all:.0f} s elapsed)", flush=True)

    model = resolve_model(args.model)
    prompts = load_prompts(model, args.prompts)
    print_header(model, prompts, args)
    results: dict[str, dict] = {}
    offline = run_offline(model, prompts, args, log)
    compared = check_equal("offline", offline)  # exits before any time is printed
    print(f"\nCHECK speculative outputs equal k=0 token for token (offline): {compared} sequences compared, all equal")
    results["offline"] = summarize(offline, "offline")
    print(table(HEADERS, report_rows("offline", results["offline"])), flush=True)
    if not args.no_cluster:
        results["cluster"], n = cluster_section(model, prompts, offline, args, log)
        compared += n
    print(f"\nCHECK speculative outputs equal k=0 token for token: {compared} sequences compared, all equal")
    line = result_line(results, args)
    print(f"wall time {time.perf_counter() - t_all:.0f} s")
    print(line)


if __name__ == "__main__":
    main()
