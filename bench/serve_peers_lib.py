"""Helpers of bench/serve_peers.py that need neither vLLM nor a running server:
the tokenizer export, the dataset, braid's layouts and overrides, parsing and
comparing results, process groups and HTTP calls (tests/test_bench_serve_peers.py)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import urllib.request

# name -> (description, LocalCluster.start nodes); 2 cores in all, as vLLM gets
BRAID_LAYOUTS = {
    "pd": ("P/D: prefill 1 rank + decode 1 rank, 1 thread each", [
        ("prefill", ["prefill.parallel.tensor_parallel_size=1", "prefill.parallel.prefill_context_parallel_size=1",
                     "prefill.parallel.threads_per_rank=1"]),
        ("decode", ["decode.parallel.tensor_parallel_size=1", "decode.parallel.decode_context_parallel_size=1",
                    "decode.parallel.threads_per_rank=1"])]),
    # graph mode on the decode rank: compiled at start for each batch size (minutes), so not
    # among the default layouts; pass --layouts pd,pd_graph to include it
    "pd_graph": ("P/D as pd, the decode rank in graph mode (batch sizes 1-16 compiled at start)", [
        ("prefill", ["prefill.parallel.tensor_parallel_size=1", "prefill.parallel.prefill_context_parallel_size=1",
                     "prefill.parallel.threads_per_rank=1"]),
        ("decode", ["decode.parallel.tensor_parallel_size=1", "decode.parallel.decode_context_parallel_size=1",
                    "decode.parallel.threads_per_rank=1", "decode.parallel.graph_mode=true",
                    "decode.parallel.graph_batch_sizes=[1,2,4,8,16]"])]),
    "colocated": ("colocated: one decode node, 1 rank of 2 threads, prefills itself", [
        ("decode", ["decode.parallel.tensor_parallel_size=1", "decode.parallel.decode_context_parallel_size=1",
                    "decode.parallel.threads_per_rank=2"])]),
}
SHORT, LONG, LONG_FRACTION = (96, 160), (896, 1152), 0.25
"""Prompt lengths in tokens: the short/long mix of the request stream."""
KV_BLOCKS = 1024
"""Per rank, of 16 tokens: 16k tokens, more than 16 requests of the mix hold."""


def braid_overrides(max_model_len: int, max_num_seqs: int, max_batched: int) -> list[str]:
    """The cluster settings both layouts share (vLLM gets the same limits)."""
    out = ["router.http_port=0"]
    for role in ("prefill", "decode"):
        out += [f"{role}.cache.block_size=16", f"{role}.cache.num_kv_blocks={KV_BLOCKS}",
                f"{role}.cache.enable_prefix_caching=false", f"{role}.scheduler.max_model_len={max_model_len}",
                f"{role}.scheduler.max_num_seqs={max_num_seqs}",
                f"{role}.scheduler.max_num_batched_tokens={max_batched}"]
    return out


def export_tokenizer(model_dir: str, gguf: str | None = None) -> str:
    """tokenizer.json + tokenizer_config.json in `model_dir`, from the GGUF file's
    vocabulary (braid.tokenizer.gguf_vocab: the tokenizer braid itself uses for it), so
    that HF's AutoTokenizer (vLLM) and braid's Tokenizer read the same files."""
    from braid.engine.default_model import resolve_model
    from braid.tokenizer.gguf_vocab import gguf_chat_template, gguf_special_ids, gguf_tokenizer

    gguf = gguf or resolve_model(None)
    tok = gguf_tokenizer(gguf)
    ids = gguf_special_ids(gguf)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    added = {str(i): {"content": tok.id_to_token(i), "special": True, "normalized": False, "lstrip": False,
                      "rstrip": False, "single_word": False}
             for i in sorted({v for v in ids.values() if v is not None})}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # HF would otherwise rewrite " ." to "." on decode, which braid does not
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "added_tokens_decoder": added,
    }
    for name in ("bos", "eos", "unknown", "padding"):
        if ids.get(name) is not None:
            key = {"unknown": "unk_token", "padding": "pad_token"}.get(name, f"{name}_token")
            cfg[key] = tok.id_to_token(ids[name])
    template = gguf_chat_template(gguf)
    if template:
        cfg["chat_template"] = template
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return model_dir


def word_ids(model_dir: str) -> list[int]:
    """Vocabulary entries that are one lowercase word after a space: text made of them
    encodes back to the same ids, so prompt lengths come out as asked."""
    from braid.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    out = []
    for i in range(tok.vocab_size):
        piece = tok._tok.id_to_token(i) or ""
        if piece.startswith("\u0120") and piece[1:].isascii() and piece[1:].isalpha() and piece[1:].islower():
            out.append(i)
    return out


def write_dataset(path: str, model_dir: str, n: int, seed: int) -> str:
    """A JSONL file for `vllm bench serve --dataset-name custom`: n prompts of random
    words, LONG_FRACTION of them LONG tokens long, the rest SHORT."""
    from braid.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    words = word_ids(model_dir)
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            lo, hi = LONG if rng.random() < LONG_FRACTION else SHORT
            ids = [rng.choice(words) for _ in range(rng.randint(lo, hi))]
            f.write(json.dumps({"prompt": tok.decode(ids).strip()}) + "\n")
    return path


# -- results -----------------------------------------------------------------------


def parse_vllm_result(d: dict) -> dict:
    """The fields of `vllm bench serve --save-result` JSON this benchmark reports
    (run with --percentile-metrics ttft,tpot,... --metric-percentiles 50,99)."""
    return dict(ttft_p50_ms=d["p50_ttft_ms"], ttft_p99_ms=d["p99_ttft_ms"], tpot_p50_ms=d["p50_tpot_ms"],
                tpot_p99_ms=d["p99_tpot_ms"], output_tok_s=d["output_throughput"], completed=d["completed"],
                failed=d.get("failed", d.get("num_prompts", d["completed"]) - d["completed"]),
                duration_s=d["duration"], output_tokens=d["total_output_tokens"],
                errors=sorted({e for e in d.get("errors", []) if e})[:3])


def summarize_braid(records: list, wall: float, max_tokens: int) -> dict:
    """bench/serve.py's Record list in the same fields as parse_vllm_result."""
    from serve import summarize

    s = summarize(records, wall, max_tokens)
    return dict(ttft_p50_ms=1e3 * s["ttft_p50"], ttft_p99_ms=1e3 * s["ttft_p99"], tpot_p50_ms=1e3 * s["tpot_p50"],
                tpot_p99_ms=1e3 * s["tpot_p99"], output_tok_s=s["tokens_per_s"], completed=s["completed"],
                failed=s["failed"], duration_s=wall, output_tokens=s["output_tokens"], errors=s["errors"])


def ratios(results: dict) -> tuple[float, dict]:
    """(lowest, {concurrency: ratio}): braid's best layout over vLLM in output tok/s."""
    peer = results["vLLM"]
    per = {}
    for c, v in peer.items():
        best = max((p[c]["output_tok_s"] for e, p in results.items() if e.startswith("braid") and c in p),
                   default=float("nan"))
        per[c] = best / v["output_tok_s"] if v["output_tok_s"] else float("nan")
    return (min(per.values()) if per else float("nan")), per


def agreement(a: list, b: list) -> str:
    """"all N" when every (text, prompt tokens) pair is equal, else where the first differs."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x[1] != y[1]:
            return f"prompt {i}: {x[1]} vs {y[1]} prompt tokens"
        if x[0] != y[0]:
            j = next((k for k, (p, q) in enumerate(zip(x[0], y[0])) if p != q), min(len(x[0]), len(y[0])))
            return f"prompt {i} differs at char {j}"
    return f"all {len(a)}" if len(a) == len(b) else f"{len(a)} vs {len(b)} outputs"


# -- processes and HTTP -------------------------------------------------------------


def spawn_group(cmd: list[str], env: dict, cwd: str, log: str) -> subprocess.Popen:
    """A server in its own process group (stop_group ends it and all it started)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(url: str, proc: subprocess.Popen, deadline: float, log: str) -> None:
    """Until `url` answers 200; RuntimeError quoting the log when proc exits or time runs out."""
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log, errors="replace") as f:
                tail = f.read()[-3000:]
            why = f"exited with code {proc.returncode}" if proc.poll() is not None else "not ready in time"
            raise RuntimeError(f"server {why}; its log ends:\n{tail}")
        try:
            get_json(url, timeout=5)
            return
        except OSError:
            time.sleep(1)


def greedy_texts(http: str, prompts: list[str], max_tokens: int) -> list[tuple[str, int]]:
    """(text, prompt tokens) of each prompt, greedy, EOS ignored, non-streaming."""
    model = get_json(f"http://{http}/v1/models")["data"][0]["id"]
    out = []
    for p in prompts:
        r = post_json(f"http://{http}/v1/completions", dict(model=model, prompt=p, max_tokens=max_tokens,
                                                            temperature=0, ignore_eos=True))
        out.append((r["choices"][0]["text"], r["usage"]["prompt_tokens"]))
    return out
