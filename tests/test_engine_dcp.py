"""Tensor parallelism and DCP on real gloo ranks, against transformers."""
import os
import signal
import subprocess
import threading
import time

import pytest
import torch

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


def _held_tokens(cache: torch.Tensor) -> int:
    """Token slots of one rank's cache [L, n, C, H, B, D] that hold anything (the cache starts zeroed)."""
    return int(cache.ne(0).any(dim=5).any(dim=3).any(dim=2).any(dim=0).sum())


def test_dcp_halves_per_rank_kv_bytes(checkpoints):
    """The engine's accounting and the ranks' caches agree: at dcp 2 each rank
    physically holds its share of the tokens, and the two shares add up to every
    token exactly once."""
    name, B = "kv1", 4
    prompts = [prompt_of(n, seed=n) for n in (17, 30, 45)]
    used, held = {}, {}
    for dcp in (1, 2):
        with LLM(checkpoints.get(name), tensor_parallel_size=2, decode_context_parallel_size=dcp, block_size=B, num_kv_blocks=64) as llm:
            seqs = [llm.engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
            llm.engine.step()  # the prefill: all three prompts now hold their KV
            stats = llm.engine.kv_stats()
            used[dcp] = stats["bytes_used_per_rank"]
            per_block = stats["bytes_per_block_per_rank"]
            held[dcp] = [0] * 2  # per rank, summed over the sequences
            for seq in seqs:
                for rank, cache in enumerate(llm.engine.executor.gather_kv(list(seq.block_table))):
                    held[dcp][rank] += _held_tokens(cache)
            while llm.engine.has_unfinished():
                llm.engine.step()
    # half, give or take one physical block per sequence
    assert abs(used[2] - used[1] / 2) <= len(prompts) * per_block
    assert used[2] < used[1]
    total = sum(len(p) for p in prompts)
    assert held[1] == [total, total]  # dcp 1: both TP ranks hold every token (their one KV head replicated)
    # dcp 2: rank r (dcp rank r) holds the tokens of global blocks g with g % 2 == r
    assert held[2] == [sum(1 for p in prompts for x in range(len(p)) if (x // B) % 2 == r) for r in (0, 1)]
    assert sum(held[2]) == total


def _kv_head_of(tp_rank: int, tp: int, num_kv_heads: int, local_heads: int) -> list[int]:
    """transformers' KV heads that TP rank `tp_rank` serves: a slice when tp <= heads,
    else one head shared by tp // heads consecutive ranks."""
    if tp <= num_kv_heads:
        return list(range(tp_rank * local_heads, (tp_rank + 1) * local_heads))
    return [tp_rank // (tp // num_kv_heads)]


@pytest.mark.parametrize("name,tp,dcp", [("kv1", 2, 2), ("kv2", 4, 2)])
def test_dcp_ranks_hold_each_token_once_as_transformers(checkpoints, name, tp, dcp):
    """After a prefill and a few decode steps, read every rank's cache rows of each
    sequence: token x (global block g = x // B) is on the DCP rank g % dcp of its head
    group, at the sequence's block_table[g // dcp], offset x % B, holding
    transformers' K (after rope) and V of its KV head; every other slot of the
    sequence's blocks, on every rank, is still zero."""
    B, decode_steps = 4, 3
    prompts = [prompt_of(n, seed=300 + n) for n in (5, 17, 30, 45)]
    with LLM(
        checkpoints.get(name), tensor_parallel_size=tp, decode_context_parallel_size=dcp,
        cp_kv_cache_interleave_size=B, block_size=B, num_kv_blocks=64,
    ) as llm:
        seqs = [llm.engine.add_request(p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)) for p in prompts]
        for _ in range(1 + decode_steps):  # the prefill, then decode steps writing the generated tokens' KV
            llm.engine.step()
        kv_heads = llm.engine.model_config.num_kv_heads
        captured = [(list(s.token_ids), s.num_cached_tokens, llm.engine.executor.gather_kv(list(s.block_table))) for s in seqs]
        topo = llm.engine.config.topology
        for s in seqs:
            llm.engine.abort(s.request_id)
    for prompt, (tokens, cached, caches) in zip(prompts, captured):
        assert cached == len(prompt) + decode_steps
        assert tokens[len(prompt):] == checkpoints.greedy(name, prompt, len(tokens) - len(prompt))
        ref = checkpoints.kv(name, tokens[:cached])  # per layer (K [Hkv, cached, D], V)
        assert len(caches) == tp
        for rank, cache in enumerate(caches):
            t = topo.for_rank(rank)
            heads = _kv_head_of(t.tp_rank, tp, kv_heads, cache.shape[3])
            expected = torch.zeros_like(cache)  # [L, n_blocks, C=2, H_local, B, D]
            for x in range(cached):
                g = x // B
                if g % dcp != t.dcp_rank:
                    continue
                for layer, (k, v) in enumerate(ref):
                    expected[layer, g // dcp, 0, :, x % B] = k[heads, x]
                    expected[layer, g // dcp, 1, :, x % B] = v[heads, x]
            torch.testing.assert_close(
                cache, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"prompt {len(prompt)}, rank {rank}: {m}"
            )
        # the same, seen from the tokens and without the layout: each token's K and V (every
        # layer) turn up somewhere in the sequence's blocks of exactly one rank per DCP group
        ref_kv = torch.stack([torch.stack([k, v]) for k, v in ref])  # [L, C=2, Hkv, cached, D]
        found = [_tokens_found(cache, ref_kv, _kv_head_of(topo.for_rank(r).tp_rank, tp, kv_heads, cache.shape[3]))
                 for r, cache in enumerate(caches)]
        for group in topo.all_dcp_groups():
            holders = torch.stack([found[r] for r in group]).sum(0)  # [cached]
            assert holders.eq(1).all(), f"prompt {len(prompt)}: tokens held by {holders.tolist()} ranks of {group}"


def _tokens_found(cache: torch.Tensor, ref_kv: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """[tokens] bool: token x's reference K and V, for every layer and head of this
    rank, equal some slot of `cache` [L, n, C, H, B, D] (anywhere in the blocks)."""
    L, n, C, H, B, D = cache.shape
    rows = cache.permute(0, 2, 3, 1, 4, 5).reshape(L, C, H, n * B, D)
    # exact differences: the matmul shortcut cdist takes for many rows is too coarse in fp32 for 1e-4
    dist = torch.cdist(ref_kv[:, :, heads], rows, compute_mode="donot_use_mm_for_euclid_dist")  # [L, C, H, tokens, slots]
    return dist.min(-1).values.lt(1e-4).flatten(0, 2).all(0)


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
    time.sleep(1.0)  # the ranks have started generating; with shared-memory collectives 1500 tokens take ~4 s
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
