"""End-to-end serving benchmark: what P/D disaggregation with PCP and DCP buys.

    .venv/bin/python bench/serve.py                       # the five configurations, default load
    .venv/bin/python bench/serve.py --quick               # a few requests, tiny model (~1 min)
    .venv/bin/python bench/serve.py --router HOST:PORT    # load an already running cluster

Each configuration runs as a real local cluster (etcd, router, nodes as
separate processes) with the same model and the same total number of ranks
(4), loaded through the client SDK:

    colocated   one decode node (tp 4) prefills and decodes every request; no transfer
    pd          prefill tp 2  -> decode tp 2
    pd_pcp      prefill pcp 2 -> decode tp 2
    pd_dcp      prefill tp 2  -> decode tp 2, dcp 2
    pd_pcp_dcp  prefill pcp 2 -> decode tp 2, dcp 2

Requests arrive as a Poisson process at each offered rate (or at a fixed
concurrency), with a mix of short chats and long contexts and a fixed number
of output tokens; warm-up requests are excluded. Reported per configuration
and load: TTFT, TPOT and end-to-end latency (p50/p90/p99), output tokens per
second, requests completed and failed, and the phase breakdown the router
measures (queue, prefill, transfer, decode). Results: a table, a JSON file, a
PNG of TTFT and TPOT against offered load, and RESULT lines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_model, percentile, table  # noqa: E402

# (name, description, nodes as (role, overrides)) with 4 ranks in total
CONFIGS = {
    "colocated": ("one engine, tp 4, prefill and decode", [
        ("decode", ["decode.parallel.tensor_parallel_size=4", "decode.parallel.decode_context_parallel_size=1"])]),
    "pd": ("prefill tp2 -> decode tp2", [
        ("prefill", ["prefill.parallel.tensor_parallel_size=2", "prefill.parallel.prefill_context_parallel_size=1"]),
        ("decode", ["decode.parallel.tensor_parallel_size=2", "decode.parallel.decode_context_parallel_size=1"])]),
    "pd_pcp": ("prefill pcp2 -> decode tp2", [
        ("prefill", ["prefill.parallel.tensor_parallel_size=1", "prefill.parallel.prefill_context_parallel_size=2"]),
        ("decode", ["decode.parallel.tensor_parallel_size=2", "decode.parallel.decode_context_parallel_size=1"])]),
    "pd_dcp": ("prefill tp2 -> decode tp2 dcp2", [
        ("prefill", ["prefill.parallel.tensor_parallel_size=2", "prefill.parallel.prefill_context_parallel_size=1"]),
        ("decode", ["decode.parallel.tensor_parallel_size=2", "decode.parallel.decode_context_parallel_size=2"])]),
    "pd_pcp_dcp": ("prefill pcp2 -> decode tp2 dcp2", [
        ("prefill", ["prefill.parallel.tensor_parallel_size=1", "prefill.parallel.prefill_context_parallel_size=2"]),
        ("decode", ["decode.parallel.tensor_parallel_size=2", "decode.parallel.decode_context_parallel_size=2"])]),
}


LONG_PROMPT = 1024
"""Prompts at least this long count as long contexts in the TTFT breakdown."""


@dataclass
class Record:
    prompt_tokens: int
    sent: float = 0.0
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None
    phases: dict = field(default_factory=dict)


def make_prompts(n: int, rng: random.Random, short: tuple[int, int], long: tuple[int, int], long_fraction: float) -> list[list[int]]:
    out = []
    for _ in range(n):
        lo, hi = long if rng.random() < long_fraction else short
        length = rng.randint(lo, hi)
        out.append([rng.randrange(2, 380) for _ in range(length)])
    return out


async def one_request(client, prompt: list[int], max_tokens: int, rec: Record) -> None:
    rec.sent = time.perf_counter()
    try:
        stream = client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, timeout=900)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.token_ids:
                if rec.first is None:
                    rec.first = now
                rec.last = now
                rec.tokens += len(chunk.token_ids)
            if chunk.finished and chunk.timings is not None:
                t = chunk.timings
                rec.phases = dict(queue=t.queue_s, prefill=t.prefill_s, transfer=t.transfer_s, decode=t.decode_s,
                                  kv_bytes=t.kv_bytes, local_prefill=t.local_prefill)
    except Exception as e:  # noqa: BLE001 - counted as a failure
        rec.error = f"{type(e).__name__}: {e}"


async def run_load(address: str, prompts, max_tokens: int, rate: float | None, concurrency: int | None, seed: int):
    """Send every prompt, as Poisson arrivals at `rate` req/s or `concurrency` at a time."""
    from braid.client import AsyncClient

    rng = random.Random(seed)
    records = [Record(len(p)) for p in prompts]
    async with AsyncClient(address, timeout=900) as client:
        start = time.perf_counter()
        if concurrency:
            sem = asyncio.Semaphore(concurrency)

            async def gated(p, r):
                async with sem:
                    await one_request(client, p, max_tokens, r)

            await asyncio.gather(*(gated(p, r) for p, r in zip(prompts, records)))
        else:
            tasks = []
            for p, r in zip(prompts, records):
                tasks.append(asyncio.create_task(one_request(client, p, max_tokens, r)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return records, wall


def summarize(records: list[Record], wall: float, max_tokens: int) -> dict:
    ok = [r for r in records if r.error is None and r.tokens == max_tokens]
    ttft = [r.first - r.sent for r in ok]
    tpot = [(r.last - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1]
    e2e = [r.last - r.sent for r in ok]
    out = dict(
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=sorted({r.error for r in records if r.error})[:5],
        output_tokens=sum(r.tokens for r in records),
        tokens_per_s=sum(r.tokens for r in ok) / wall if wall > 0 else float("nan"),
        wall_s=wall,
    )
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(xs, q)
    for cls, pick in (("short", lambda r: r.prompt_tokens < LONG_PROMPT), ("long", lambda r: r.prompt_tokens >= LONG_PROMPT)):
        xs = [r.first - r.sent for r in ok if pick(r)]
        out[f"ttft_{cls}_p50"] = percentile(xs, 50)
        out[f"n_{cls}"] = len(xs)
    for phase in ("queue", "prefill", "transfer", "decode"):
        vals = [r.phases[phase] for r in ok if r.phases]
        out[f"{phase}_mean"] = statistics.mean(vals) if vals else float("nan")
    out["kv_bytes_mean"] = statistics.mean([r.phases["kv_bytes"] for r in ok if r.phases]) if ok else 0
    out["local_prefill"] = sum(1 for r in ok if r.phases.get("local_prefill"))
    return out


def start_cluster(name: str, model: str, workdir: str, block_size: int):
    from braid.cluster.launcher import LocalCluster

    sets = [
        f"prefill.cache.block_size={block_size}",
        f"decode.cache.block_size={block_size}",
        "prefill.parallel.threads_per_rank=1",
        "decode.parallel.threads_per_rank=1",
        "prefill.scheduler.max_num_batched_tokens=65536",
        "decode.scheduler.max_num_batched_tokens=65536",
        "router.prefill_policy=round_robin",
        "router.decode_policy=round_robin",
    ]
    cluster = LocalCluster(workdir, model=model, overrides=sets)
    cluster.start(CONFIGS[name][1], timeout_s=300)
    return cluster


def plot(results: dict, path: str, loads: list) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in results.items():
        xs = [p["offered"] for p in points]
        axes[0].plot(xs, [p["ttft_p50"] for p in points], marker="o", label=name)
        axes[1].plot(xs, [p["tpot_p50"] * 1000 for p in points], marker="o", label=name)
    axes[0].set(xlabel="offered load", ylabel="TTFT p50 (s)", title="Time to first token")
    axes[1].set(xlabel="offered load", ylabel="TPOT p50 (ms)", title="Time per output token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--router", help="load this running cluster instead of starting the configurations")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5], help="offered loads, requests/s (Poisson)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="fixed concurrency levels instead of rates")
    ap.add_argument("--requests", type=int, default=10, help="measured requests per load point")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--short", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--long", type=int, nargs=2, default=[4096, 6144], metavar=("MIN", "MAX"))
    ap.add_argument("--long-fraction", type=float, default=0.3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--model", help="checkpoint (default: the benchmark model: hidden 512, 4 layers)")
    ap.add_argument("--out", default="bench/results", help="folder for serve.json and serve.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model, two configurations, a few requests")
    args = ap.parse_args()
    if args.quick:
        from braid.engine.tiny import ensure_default_model

        args.model = args.model or ensure_default_model()
        if args.configs == list(CONFIGS):
            args.configs = ["colocated", "pd_pcp_dcp"]
        args.rates, args.concurrency = [4.0], None
        args.requests, args.warmup, args.max_tokens = 4, 1, 8
        args.short, args.long, args.long_fraction = [8, 64], [200, 400], 0.25
    return args


def run_config(name: str, args, model: str, loads: list, warm: list, point_prompts: list, t_all: float) -> list[dict]:
    """Start configuration `name` (or use --router), warm it up, then measure each load point."""
    unit = "concurrency" if args.concurrency else "req/s"
    with tempfile.TemporaryDirectory(prefix=f"braid-serve-{name}-") as workdir:
        cluster = None
        try:
            if args.router:
                address = args.router
            else:
                t0 = time.perf_counter()
                cluster = start_cluster(name, model, workdir, args.block_size)
                address = cluster.address
                print(f"  cluster up in {time.perf_counter() - t0:.0f} s at {address}", flush=True)
            asyncio.run(run_load(address, warm, args.max_tokens, None, len(warm) or 1, args.seed))
            points = []
            for i, load in enumerate(loads):
                rate = None if args.concurrency else load
                conc = load if args.concurrency else None
                records, wall = asyncio.run(run_load(address, point_prompts[i], args.max_tokens, rate, conc, args.seed + i))
                s = summarize(records, wall, args.max_tokens)
                s["offered"] = load
                s["records"] = [asdict(r) for r in records]
                points.append(s)
                print(f"  {unit} {load}: {s['completed']}/{s['requests']} ok, TTFT p50 {s['ttft_p50']:.2f} s, "
                      f"TPOT p50 {s['tpot_p50'] * 1000:.1f} ms, {s['tokens_per_s']:.1f} tok/s "
                      f"({time.perf_counter() - t_all:.0f} s elapsed)", flush=True)
            return points
        finally:
            if cluster is not None:
                cluster.close()


def table_rows(results: dict) -> list[list]:
    rows = []
    for name, points in results.items():
        for s in points:
            rows.append([
                name, s["offered"], s["completed"], s["failed"],
                f"{s['ttft_p50']:.2f}/{s['ttft_p90']:.2f}/{s['ttft_p99']:.2f}",
                f"{s['ttft_short_p50']:.2f}/{s['ttft_long_p50']:.2f}",
                f"{s['tpot_p50'] * 1e3:.0f}/{s['tpot_p90'] * 1e3:.0f}/{s['tpot_p99'] * 1e3:.0f}",
                f"{s['e2e_p50']:.2f}/{s['e2e_p90']:.2f}/{s['e2e_p99']:.2f}",
                f"{s['tokens_per_s']:.1f}", f"{s['queue_mean']:.3f}", f"{s['prefill_mean']:.3f}",
                f"{s['transfer_mean']:.3f}", f"{s['decode_mean']:.3f}",
            ])
    return rows


def report(results: dict, args, model: str, loads: list, t_all: float) -> None:
    """The table, serve.json, serve.png and the RESULT line."""
    unit = "concurrency" if args.concurrency else "req/s"
    headers = ["config", unit, "done", "fail", "TTFT p50/p90/p99 s", "TTFT short/long p50 s", "TPOT p50/p90/p99 ms",
               "E2E p50/p90/p99 s", "tok/s", "queue s", "prefill s", "transfer s", "decode s"]
    rows = table_rows(results)
    print(f"\nServing benchmark: model {model}, {args.requests} requests per point, "
          f"{int(args.long_fraction * 100)}% long ({args.long[0]}-{args.long[1]} tokens), "
          f"short {args.short[0]}-{args.short[1]}, {args.max_tokens} output tokens, {os.cpu_count()} cores")
    print(table(headers, rows))
    meta = dict(model=model, args={k: v for k, v in vars(args).items()}, cores=os.cpu_count(),
                wall_s=time.perf_counter() - t_all)
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    png = os.path.join(args.out, "serve.png")
    if plot(results, png, loads):
        print(f"plot: {png}")
    print(f"json: {os.path.join(args.out, 'serve.json')}")
    parts = []
    for name, points in results.items():
        top = points[-1]
        parts += [f"{name}_ttft_p50={top['ttft_p50']:.4f}", f"{name}_tpot_p50={top['tpot_p50']:.5f}",
                  f"{name}_tok_s={top['tokens_per_s']:.2f}", f"{name}_failed={sum(p['failed'] for p in points)}"]
    print("RESULT " + " ".join(parts))


def main() -> None:
    args = parse_args()
    model = args.model or bench_model()
    loads = args.concurrency or args.rates
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    warm = make_prompts(args.warmup, rng, tuple(args.short), tuple(args.short), 0.0)
    point_prompts = [make_prompts(args.requests, rng, tuple(args.short), tuple(args.long), args.long_fraction) for _ in loads]
    names = ["external"] if args.router else args.configs
    results: dict[str, list] = {}
    t_all = time.perf_counter()
    for name in names:
        print(f"[{name}] {CONFIGS[name][0] if name in CONFIGS else args.router}", flush=True)
        results[name] = run_config(name, args, model, loads, warm, point_prompts, t_all)
    report(results, args, model, loads, t_all)


if __name__ == "__main__":
    main()
