"""Tensor parallelism and DCP on real gloo ranks, against transformers."""
import os
import signal
import subprocess
import threading
import time

import pytest

from braid.engine import LLM, SamplingParams
from braid.engine.executor import RankFailure
from conftest import prompt_of

BLOCK = 4
# shorter than one virtual block (B*dcp) up to several; 24 new tokens cross virtual-block boundaries
LENGTHS = [1, 3, 7, 8, 9, 20, 33]
NEW = 24


def _cases():
    cases = []
    for kv, combos in (("kv1", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]), ("kv2", [(1, 1), (2, 1), (4, 1), (4, 2)])):
        for tp, dcp in combos:
            for inter in ((1, 2, BLOCK) if dcp > 1 else (BLOCK,)):
                cases.append(pytest.param(kv, tp, dcp, inter, id=f"{kv}-tp{tp}-dcp{dcp}-i{inter}"))
    return cases


@pytest.mark.parametrize("name,tp,dcp,interleave", _cases())
def test_tp_dcp_greedy_equals_transformers(checkpoints, name, tp, dcp, interleave):
    prompts = [prompt_of(n, seed=200 + n) for n in LENGTHS]
    expected = [checkpoints.greedy(name, p, NEW) for p in prompts]
    with LLM(
        checkpoints.get(name),
        tensor_parallel_size=tp,
        decode_context_parallel_size=dcp,
        cp_kv_cache_interleave_size=interleave,
        block_size=BLOCK,
        num_kv_blocks=64,
    ) as llm:
        assert llm.engine.blocks.tokens_per_block == BLOCK * dcp
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
        assert llm.engine.blocks.num_free == 64
    for p, out, exp in zip(prompts, outs, expected):
        assert out.token_ids == exp, f"prompt length {len(p)}"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tensor_parallel_size=2, decode_context_parallel_size=2), r"\(tensor_parallel_size // num_key_value_heads\) % decode_context_parallel_size"),
        (dict(tensor_parallel_size=4, decode_context_parallel_size=4), r"tp=4 // kv_heads=2 = 2 cannot host dcp=4"),
        (dict(tensor_parallel_size=2, decode_context_parallel_size=4), r"decode_context_parallel_size 4 must divide tensor_parallel_size 2"),
        (dict(block_size=4, cp_kv_cache_interleave_size=3), r"cp_kv_cache_interleave_size 3 must divide block_size 4"),
        (dict(block_size=4, cp_kv_cache_interleave_size=8), r"cp_kv_cache_interleave_size 8 must divide block_size 4"),
        (dict(tensor_parallel_size=3), r"tensor_parallel_size 3 must divide num_attention_heads 4"),
    ],
)
def test_invalid_combination_refused_before_any_process(checkpoints, monkeypatch, kw, match):
    def no_spawn(*a, **k):
        raise AssertionError("a rank process was started")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    with pytest.raises(ValueError, match=match):
        LLM(checkpoints.get("kv2"), **kw)


def test_dcp_holds_a_sequence_one_rank_cannot(checkpoints):
    """Same per-rank pool: 8 blocks of 4 tokens = 32 tokens at dcp 1, 64 at dcp 2."""
    name = "kv1"
    prompt = prompt_of(40, seed=11)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(checkpoints.get(name), tensor_parallel_size=2, block_size=4, num_kv_blocks=8) as llm:
        out = llm.generate([prompt], params)[0]
        assert out.finish_reason == "error" and "max_model_len 32" in out.error
    with LLM(checkpoints.get(name), tensor_parallel_size=2, decode_context_parallel_size=2, block_size=4, num_kv_blocks=8) as llm:
        out = llm.generate([prompt], params)[0]
        assert out.token_ids == checkpoints.greedy(name, prompt, 16)


def test_dcp_halves_per_rank_kv_bytes(checkpoints):
    name = "kv1"
    prompts = [prompt_of(n, seed=n) for n in (17, 30, 45)]
    used = {}
    for dcp in (1, 2):
        with LLM(checkpoints.get(name), tensor_parallel_size=2, decode_context_parallel_size=dcp, block_size=4, num_kv_blocks=64) as llm:
            for p in prompts:
                llm.engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            llm.engine.step()  # the prefill: all three prompts now hold their KV
            stats = llm.engine.kv_stats()
            used[dcp] = stats["bytes_used_per_rank"]
            per_block = stats["bytes_per_block_per_rank"]
            while llm.engine.has_unfinished():
                llm.engine.step()
    # half, give or take one physical block per sequence
    assert abs(used[2] - used[1] / 2) <= len(prompts) * per_block
    assert used[2] < used[1]


def test_killed_rank_is_named_and_nothing_is_left(checkpoints):
    llm = LLM(checkpoints.get("kv1"), tensor_parallel_size=2, decode_context_parallel_size=2, block_size=4, num_kv_blocks=512)
    procs = list(llm.engine.executor.procs)
    result = {}

    def run():
        try:
            llm.generate([prompt_of(20, 1)] * 4, SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
            result["error"] = None
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    time.sleep(2.0)
    assert t.is_alive(), "generation finished before the kill; make it longer"
    killed_at = time.monotonic()
    os.kill(procs[0].pid, signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive(), "generate did not return after a rank died"
    assert time.monotonic() - killed_at < 15
    err = result["error"]
    assert isinstance(err, RankFailure) and err.rank == 1 and "rank 1" in str(err)
    llm.shutdown()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RankFailure):
        llm.generate([[3, 4]], SamplingParams(max_tokens=2, temperature=0))
