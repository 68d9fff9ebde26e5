"""The OpenAI-compatible HTTP API against the gRPC SDK, on one cluster.

    .venv/bin/python bench/http_api.py                 # a local cluster on the tiny model
    .venv/bin/python bench/http_api.py --quick         # fewer requests (~1 min)
    .venv/bin/python bench/http_api.py --router HOST:PORT --http HOST:PORT   # a running cluster

The same requests (token-id prompts, greedy, a fixed number of output tokens,
EOS ignored, non-streaming) go three ways: through the router's gRPC service
with braid's SDK; through its HTTP API with a bare HTTP client (http.client,
aiohttp), which shows the cost of the HTTP front itself (JSON, aiohttp, the
response shaping); and through the HTTP API with the official `openai` client,
which adds that client's own cost (what users see). Two phases:

    latency     one request at a time, the paths taking turns; per path p50/p99,
                and the added latency over gRPC (p50 and p99 of the paired
                differences: request i on the path minus request i over gRPC)
    saturation  `--concurrency` requests in flight, `--saturation` requests per
                path, one path at a time; completed requests per second

Prints a table and a RESULT line. On a small machine the nodes and the
benchmark share the cores, so absolute numbers are low; the comparison is fair.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402 - bench/ is not a package


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


PATHS = ("gRPC SDK", "HTTP raw", "HTTP openai")
"""braid's gRPC SDK; the HTTP API with a bare HTTP client (http.client / aiohttp: the
server's cost alone); the HTTP API with the official openai client (what users run)."""


def _check(n: int, max_tokens: int) -> None:
    if n != max_tokens:
        raise AssertionError(f"{n} tokens instead of {max_tokens}")


def latency_phase(grpc_address: str, http_address: str, prompts: list[tuple], max_tokens: int) -> dict:
    """Sequential requests, the paths taking turns (each with its own prompt, so that none
    finds another's prefix cached; the order rotates): path -> seconds per request."""
    import http.client
    import json

    import openai

    from braid.client import Client

    out = {p: [] for p in PATHS}
    host, port = http_address.rsplit(":", 1)
    with Client(grpc_address, timeout=120) as c, openai.OpenAI(
            base_url=f"http://{http_address}/v1", api_key="x", max_retries=0, timeout=120) as o:
        model = o.models.list().data[0].id
        conn = http.client.HTTPConnection(host, int(port), timeout=120)

        def raw(p):
            conn.request("POST", "/v1/completions", json.dumps(dict(
                model=model, prompt=p, max_tokens=max_tokens, temperature=0, ignore_eos=True)),
                {"Content-Type": "application/json"})
            _check(json.loads(conn.getresponse().read())["usage"]["completion_tokens"], max_tokens)

        calls = {
            "gRPC SDK": lambda p: _check(len(c.complete(p, max_tokens=max_tokens, temperature=0,
                                                        ignore_eos=True).token_ids), max_tokens),
            "HTTP raw": raw,
            "HTTP openai": lambda p: _check(o.completions.create(
                model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True}).usage.completion_tokens, max_tokens),
        }
        for i, trio in enumerate(prompts):
            order = PATHS[i % 3:] + PATHS[:i % 3]
            for path in order:
                t = time.perf_counter()
                calls[path](trio[PATHS.index(path)])
                out[path].append(time.perf_counter() - t)
        conn.close()
    return out


async def _saturate(call, prompts: list[list[int]], concurrency: int) -> tuple[float, int]:
    """Requests/s with `concurrency` in flight, and the failures."""
    queue = list(prompts)
    failed = 0

    async def worker():
        nonlocal failed
        while queue:
            p = queue.pop()
            try:
                await call(p)
            except Exception as e:  # noqa: BLE001 - counted, and the first few shown
                failed += 1
                if failed <= 3:
                    print(f"  request failed: {type(e).__name__}: {e}", flush=True)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(prompts) / (time.perf_counter() - t), failed


async def saturation_phase(grpc_address: str, http_address: str, prompts: dict, max_tokens: int,
                           concurrency: int) -> dict:
    """path -> (requests/s, failed), `concurrency` requests in flight on one path at a time."""
    import aiohttp
    import openai

    from braid.client import AsyncClient

    out = {}
    async with AsyncClient(grpc_address, timeout=300) as c:
        out["gRPC SDK"] = await _saturate(
            lambda p: c.complete(p, max_tokens=max_tokens, temperature=0, ignore_eos=True),
            prompts["gRPC SDK"], concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def raw(p):
            async with s.post(f"http://{http_address}/v1/completions", json=dict(
                    prompt=p, max_tokens=max_tokens, temperature=0, ignore_eos=True)) as r:
                _check((await r.json())["usage"]["completion_tokens"], max_tokens)

        out["HTTP raw"] = await _saturate(raw, prompts["HTTP raw"], concurrency)
    async with openai.AsyncOpenAI(base_url=f"http://{http_address}/v1", api_key="x", max_retries=0,
                                  timeout=300) as o:
        model = (await o.models.list()).data[0].id
        out["HTTP openai"] = await _saturate(
            lambda p: o.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True}), prompts["HTTP openai"], concurrency)
    return out


def start_cluster(workdir: str):
    from braid.cluster.launcher import LocalCluster
    from braid.engine.tiny import write_tiny_llama

    model = write_tiny_llama(os.path.join(workdir, "tiny"))
    sets = ["prefill.parallel.threads_per_rank=1", "decode.parallel.threads_per_rank=1",
            "prefill.parallel.prefill_context_parallel_size=1", "decode.parallel.tensor_parallel_size=1",
            "decode.parallel.decode_context_parallel_size=1", "router.max_inflight=512"]
    cluster = LocalCluster(workdir, model=model, overrides=sets)
    cluster.start(timeout_s=300)
    return cluster


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--router", help="gRPC address of a running router (else a local cluster is started)")
    ap.add_argument("--http", help="HTTP API address of that router")
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per path (latency phase)")
    ap.add_argument("--saturation", type=int, default=400, help="requests per path in the saturation phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="40 sequential and 120 saturating requests per path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.saturation = 40, 120
    if bool(args.router) != bool(args.http):
        ap.error("--router and --http go together")
    return args


def report(args, lat: dict, sat: dict) -> None:
    ms = 1000.0
    g = lat["gRPC SDK"]
    rows, added = [], {}
    for path in PATHS:
        xs = lat[path]
        diffs = [b - a for a, b in zip(g, xs)]  # request i on this path minus request i over gRPC
        added[path] = (pct(diffs, 50) * ms, pct(diffs, 99) * ms)
        extra = ["-", "-"] if path == "gRPC SDK" else list(added[path])
        rows.append([path, pct(xs, 50) * ms, pct(xs, 99) * ms, *extra, sat[path][0], sat[path][1]])
    print(f"\nHTTP API vs gRPC SDK: {args.prompt_tokens}-token prompts, {args.max_tokens} output tokens, "
          f"{args.requests} sequential and {args.saturation} saturating requests per path "
          f"(concurrency {args.concurrency}), {os.cpu_count()} cores")
    print(table(["path", "latency p50 ms", "latency p99 ms", "added p50 ms", "added p99 ms",
                    "req/s at saturation", "failed"], rows))
    grpc_rps = sat["gRPC SDK"][0]
    print(f"RESULT http_added_p50_ms={added['HTTP raw'][0]:.2f} http_added_p99_ms={added['HTTP raw'][1]:.2f} "
          f"openai_added_p50_ms={added['HTTP openai'][0]:.2f} openai_added_p99_ms={added['HTTP openai'][1]:.2f} "
          f"grpc_rps={grpc_rps:.2f} http_rps={sat['HTTP raw'][0]:.2f} openai_rps={sat['HTTP openai'][0]:.2f} "
          f"http_rps_ratio={sat['HTTP raw'][0] / grpc_rps:.3f} failed={sum(f for _, f in sat.values())}")


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)

    def prompt():
        return [rng.randrange(2, 300) for _ in range(args.prompt_tokens)]

    def trios(n):
        return [(prompt(), prompt(), prompt()) for _ in range(n)]

    cluster = None
    workdir = tempfile.mkdtemp(prefix="braid-bench-http-")
    try:
        if args.router:
            grpc_address, http_address = args.router, args.http
        else:
            cluster = start_cluster(workdir)
            grpc_address, http_address = cluster.address, cluster.http_address
        latency_phase(grpc_address, http_address, trios(4), args.max_tokens)  # warm-up
        lat = latency_phase(grpc_address, http_address, trios(args.requests), args.max_tokens)
        sat = asyncio.run(saturation_phase(grpc_address, http_address,
                                           {p: [prompt() for _ in range(args.saturation)] for p in PATHS},
                                           args.max_tokens, args.concurrency))
        report(args, lat, sat)
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
