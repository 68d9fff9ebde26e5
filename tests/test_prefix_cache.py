"""Prefix caching and chunked prefill in the offline engine, against transformers.

Every run is checked token for token against transformers' greedy output (or,
for seeded sampling and prompt logprobs, against a cold engine without a cache),
and after every run against the block invariants, computed here from the block
manager's reference counts and the cache's index alone: a referenced block is
named by the index and held once (by the cache), every other block is free.
Hits are checked against a brute-force count: the longest run of whole blocks a
prompt shares with the tokens computed before it, capped so that its last token
is computed.

One engine per layout; the chunk budget is changed between rounds on the same
engine (only rank 0's scheduler reads it), so that the rank processes start once.
"""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from braid.engine import LLM, SamplingParams
from conftest import build_checkpoint, prompt_of

B = 4
NEW = 5
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
BIG = 8192


# -- helpers -------------------------------------------------------------------
def check_blocks(engine) -> None:
    """The engine is idle: only the cache holds blocks, one reference each, and the
    cache's blocks are exactly those its index names."""
    bm, cache = engine.blocks, engine.prefix_cache
    assert not engine.has_unfinished()
    if cache is None:  # caching off: every block is free
        assert bm.num_unreferenced == bm.num_blocks
        return
    named = set(cache.index.values())
    assert set(cache.names) == named, "the cache holds blocks its index does not name"
    for b, hashes in cache.names.items():
        assert hashes and all(cache.index[h] == b for h in hashes)
    refs = [bm.ref_count(b) for b in range(bm.num_blocks)]
    assert [b for b, r in enumerate(refs) if r] == sorted(named), "a block is held by something other than the cache"
    assert all(refs[b] == 1 for b in named)
    assert bm.num_unreferenced + len(cache.names) == bm.num_blocks


def set_budget(llm: LLM, budget: int) -> None:
    sched = llm.engine.scheduler
    sched.cfg = dataclasses.replace(sched.cfg, max_num_batched_tokens=budget)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    """Serve `prompts` together; returns (tokens, cached_tokens, prompt_logprobs) per prompt."""
    eng = llm.engine
    seqs = [eng.add_request(p, params) for p in prompts]
    tokens = {s.request_id: [] for s in seqs}
    cached, plps = {}, {}
    for _ in range(100_000):
        if not eng.has_unfinished():
            break
        for ev in eng.step():
            assert ev.error is None, ev.error
            tokens[ev.request_id].append(ev.token_id)
            cached[ev.request_id] = ev.cached_tokens
            if ev.prompt_logprobs is not None:
                plps[ev.request_id] = ev.prompt_logprobs
    for s in seqs:
        assert cached[s.request_id] == s.num_prefix_hit_tokens
    check_blocks(eng)
    ids = [s.request_id for s in seqs]
    return [tokens[i] for i in ids], [cached[i] for i in ids], [plps.get(i) for i in ids]


def shared_blocks(prompt: list[int], computed: list[list[int]]) -> int:
    """Whole blocks of `prompt` that some computed token sequence starts with, capped
    so that the prompt's last token is computed."""
    best = 0
    for seq in computed:
        n = 0
        while n < min(len(prompt), len(seq)) and prompt[n] == seq[n]:
            n += 1
        best = max(best, n // B)
    return min(best, (len(prompt) - 1) // B)


def hit_cases(base: list[int], seed: int) -> dict[str, list[int]]:
    """Prompts sharing 0, 1, k and all-but-one blocks of `base` (37 tokens: 9 blocks + 1)."""
    def tail(n, s):
        return prompt_of(n, seed * 100 + s)

    assert len(base) == 37
    return {
        "zero": tail(19, 1),
        "one": base[:B] + tail(9, 2),
        "k=3": base[: 3 * B] + tail(7, 3),  # an odd k: a partly hit virtual block under N=2 and N=4
        "k=4": base[: 4 * B] + tail(5, 4),
        "all-but-one": base[: 7 * B] + tail(B, 5),
        "all-but-one-even": base[: 8 * B] + tail(B, 6),
        "whole-blocks": base[: 9 * B],  # all cached, but its last token must still be computed
        "same": list(base),  # hits all but its last token
        "longer": base + tail(6, 7),
    }


def check_round(llm, name, checkpoints, seed, budget, computed, exact_hits):
    """A cold pair (a base prompt and an unrelated one), then prompts sharing the base's
    prefixes; exact tokens, and hits as the brute-force count says."""
    set_budget(llm, budget)
    base = prompt_of(37, seed)
    cold = [base, prompt_of(21, seed + 1)]
    toks, cached, _ = run(llm, cold)
    for p, t, c in zip(cold, toks, cached):
        assert t == checkpoints.greedy(name, p, NEW)
        assert c == B * shared_blocks(p, computed)
        computed.append(p + t[:-1])
    cases = hit_cases(base, seed)
    toks, cached, _ = run(llm, list(cases.values()))
    batch = [p + t[:-1] for p, t in zip(cases.values(), toks)]
    for i, ((case, p), t, c) in enumerate(zip(cases.items(), toks, cached)):
        where = f"{case}, budget {budget}"
        assert t == checkpoints.greedy(name, p, NEW), where
        assert c % B == 0 and c < len(p), where
        if exact_hits:  # every prompt admitted in one step: hits come from earlier runs only
            assert c == B * shared_blocks(p, computed), where
        else:  # admitted over several steps: may also hit what this batch computed first
            assert B * shared_blocks(p, computed) <= c <= B * shared_blocks(p, computed + batch[:i] + batch[i + 1 :]), where
    computed += batch
    assert llm.engine.prefix_cache.stats.evicted_blocks == 0  # else the counts above would not hold


LAYOUTS = [
    # checkpoint, tp, pcp, dcp, interleave, budgets
    ("kv1", 1, 1, 1, None, (BIG, 3, 4, 7)),
    ("kv1", 1, 2, 1, None, (BIG, 3, 4, 7)),
    ("kv1", 2, 1, 2, None, (BIG, 3, 4, 7)),
    ("kv1", 2, 2, 2, None, (BIG, 3, 4, 5)),
    ("kv1", 2, 1, 2, 1, (BIG, 3, 4)),
    ("ds-dense", 2, 1, 2, None, (BIG, 3, 7)),  # MLA: the cached context is the latent cache
    ("ds-dense", 1, 2, 1, None, (BIG, 4, 5)),
]


# -- prefixes and chunks under every layout ------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name,tp,pcp,dcp,interleave,budgets",
    [pytest.param(*c, id=f"{c[0]}-tp{c[1]}-pcp{c[2]}-dcp{c[3]}" + (f"-i{c[4]}" if c[4] else "")) for c in LAYOUTS],
)
def test_shared_prefixes_and_chunks_equal_transformers(ds, checkpoints, name, tp, pcp, dcp, interleave, budgets):
    path = ds(name) if name.startswith("ds-") else checkpoints.get(name)
    computed: list[list[int]] = []
    with LLM(path, tensor_parallel_size=tp, prefill_context_parallel_size=pcp, decode_context_parallel_size=dcp,
             cp_kv_cache_interleave_size=interleave, block_size=B, num_kv_blocks=256) as llm:
        for r, budget in enumerate(budgets):
            check_round(llm, name, checkpoints, 1000 + 10 * r, budget, computed, exact_hits=budget == BIG)
        stats = llm.engine.prefix_cache.stats
        assert stats.hit_blocks > 0 and (stats.copied_blocks > 0) == (pcp * dcp > 1)
        assert llm.engine.scheduler.num_chunks > 0


# -- evictions -----------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp,dcp,budget", [(1, 1, 5), (2, 2, 7)], ids=["tp1", "tp2-dcp2"])
def test_evictions_mid_workload_keep_outputs_exact(checkpoints, tp, dcp, budget):
    """A pool of 112 tokens: the cache fills up and must evict while requests are being
    prefilled and decoded; what it still holds is reused, what it evicted is
    recomputed, a preempted request is recomputed, and every output stays exact."""
    name = "kv1"
    stems = [prompt_of(24, 70 + i) for i in range(4)]
    waves = []
    for w in range(4):  # each wave: two stems, a new prompt on each and a repeat of an old one
        waves.append([stems[w % 4] + prompt_of(5 + w, 80 + w), stems[(w + 1) % 4] + prompt_of(9 - w, 90 + w),
                      stems[w % 4] + prompt_of(5 + w, 80 + w)[:3]])
    waves.append(waves[0][:2])  # the first wave again, long after its blocks were evicted
    with LLM(checkpoints.get(name), tensor_parallel_size=tp, decode_context_parallel_size=dcp, block_size=B,
             num_kv_blocks=14 * 2 // dcp, max_num_batched_tokens=budget) as llm:
        cache = llm.engine.prefix_cache
        evict, busy = cache.evict, []

        def evict_and_note():  # whether a request was running when the cache had to give a block up
            busy.append(bool(llm.engine.scheduler.running))
            return evict()

        cache.evict = evict_and_note
        evicted = []
        for wave in waves:
            toks, cached, _ = run(llm, wave)
            for p, t, c in zip(wave, toks, cached):
                assert t == checkpoints.greedy(name, p, NEW)
                assert c % B == 0 and c < len(p)
            evicted.append(cache.stats.evicted_blocks)
        assert evicted[-1] > 0 and cache.stats.hit_blocks > 0
        assert evicted[1] > 0 and any(busy), "the cache never had to evict in the middle of the workload"
        assert len(busy) == cache.stats.evicted_blocks
        # three requests that outgrow the pool as they decode: the newest is preempted and
        # recomputed (from what the cache still holds of it)
        crowd = [stems[i] + prompt_of(6, 95 + i) for i in range(3)]
        toks, _, _ = run(llm, crowd, dataclasses.replace(GREEDY, max_tokens=12))
        assert llm.engine.scheduler.num_preemptions > 0
        for p, t in zip(crowd, toks):
            assert t == checkpoints.greedy(name, p, 12)


# -- block size 16, DCP 4 ------------------------------------------------------------
@pytest.mark.timeout(240)
def test_dcp4_block16_hits_nine_blocks_of_150_shared_tokens(checkpoints):
    """Virtual blocks of 64 tokens (16 x 4 shards); two prompts sharing 150 tokens: the
    second reuses 144 (nine blocks of 16: two whole virtual blocks and one copied
    in part), not 128 (whole virtual blocks only) or 0. A third, chunked by an odd
    budget, does too."""
    name = "kv1"
    shared = prompt_of(150, 15)
    prompts = [shared + prompt_of(20, 16), shared + prompt_of(25, 17), shared + prompt_of(3, 18)]
    with LLM(checkpoints.get(name), tensor_parallel_size=4, decode_context_parallel_size=4, block_size=16,
             num_kv_blocks=16) as llm:
        assert llm.engine.blocks.tokens_per_block == 64
        got = [run(llm, [prompts[0]])]
        got.append(run(llm, [prompts[1]]))
        set_budget(llm, 7)
        got.append(run(llm, [prompts[2]]))
        stats = llm.engine.prefix_cache.stats
        assert stats.copied_blocks == 2 and stats.evicted_blocks == 0
    for p, (toks, cached, _) in zip(prompts, got):
        assert toks[0] == checkpoints.greedy(name, p, NEW)
    assert [c[0] for _, c, _ in got] == [0, 144, 144]


# -- a long prompt in chunks beside running decodes -------------------------------------
@pytest.fixture(scope="module")
def long_ckpt(checkpoints) -> str:
    """kv1's shape with room for 4k-token prompts (the shared checkpoints stop at 2048)."""
    name = "kv1-long"
    path = os.path.join(checkpoints.root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_checkpoint(path, "llama", dict(num_attention_heads=4, num_key_value_heads=1,
                                             max_position_embeddings=8192), {})
    return name


def _states(seqs) -> dict:
    return {s.request_id: (len(s), s.num_cached_tokens, s.is_finished) for s in seqs}


@pytest.mark.timeout(300)
def test_4k_prompt_prefills_in_chunks_while_others_keep_decoding(checkpoints, long_ckpt):
    budget = 500
    shorts = [prompt_of(n, 40 + n) for n in (7, 13, 21)]
    long_prompt, late_prompt = prompt_of(4096, 44), prompt_of(11, 45)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(os.path.join(checkpoints.root, long_ckpt), block_size=16, num_kv_blocks=300,
             max_num_batched_tokens=budget) as llm:
        eng = llm.engine
        seqs = [eng.add_request(p, params) for p in shorts]
        eng.step()  # the three short prompts in one step: they decode from now on
        assert [s.num_output_tokens for s in seqs] == [1, 1, 1]
        big = eng.add_request(long_prompt, dataclasses.replace(params, max_tokens=4))
        seqs.append(big)
        chunk_steps = 0
        while eng.has_unfinished():
            if big.num_cached_tokens >= 2000 and len(seqs) == 4:  # a request arriving mid-prefill
                seqs.append(eng.add_request(late_prompt, params))
            before = _states(seqs)
            eng.step()
            after = _states(seqs)
            prompt_tokens = sum(after[r][1] - before[r][1] for r in before if before[r][0] - before[r][1] > 1)
            assert prompt_tokens <= budget
            if before[big.request_id][1] < 4096 and big.num_output_tokens <= 1:  # a step of the long prefill
                chunk_steps += 1
                assert after[big.request_id][1] - before[big.request_id][1] == min(budget, 4096 - before[big.request_id][1])
                for s in seqs[:3]:  # every decode moved on by one token in this very step
                    assert after[s.request_id][0] == before[s.request_id][0] + 1, f"step {chunk_steps}"
        assert chunk_steps == math.ceil(4096 / budget)
        assert eng.scheduler.num_chunks >= chunk_steps - 1
        check_blocks(eng)
    for s, p in zip(seqs, shorts + [long_prompt, late_prompt]):
        assert s.output_token_ids == checkpoints.greedy(long_ckpt, p, s.params.max_tokens), len(p)


# -- sampling and prompt logprobs ------------------------------------------------------
@pytest.mark.timeout(240)
def test_seeded_sampling_is_the_same_with_chunks_and_cache_hits(checkpoints):
    """A chunk samples nothing and draws nothing from the request's generator: the same
    seed gives the same tokens whole or chunked, cold or from the cache."""
    path = checkpoints.get("kv1")
    prompts = [prompt_of(29, 60), prompt_of(29, 60)[:17] + prompt_of(6, 61)]
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234 + i, ignore_eos=True)
              for i in range(len(prompts))]

    def sample(llm):
        return [run(llm, [p], sp)[0][0] for p, sp in zip(prompts, params)]

    with LLM(path, block_size=B, num_kv_blocks=64, enable_prefix_caching=False) as llm:
        assert llm.engine.prefix_cache is None
        reference = sample(llm)
    with LLM(path, block_size=B, num_kv_blocks=64, max_num_batched_tokens=3) as llm:
        assert sample(llm) == reference  # cold, chunked (the second prompt hits the first's blocks)
        assert sample(llm) == reference  # cache hits, chunked
        set_budget(llm, BIG)
        assert sample(llm) == reference  # cache hits, whole
        assert llm.engine.prefix_cache.stats.hit_blocks >= 4 + 3 * 7
    assert len({tuple(t) for t in reference}) == 2 and len(set(reference[0])) > 3  # really sampled


@pytest.mark.timeout(240)
def test_prompt_logprobs_requests_are_neither_cached_nor_chunked(checkpoints):
    """A request asking for prompt logprobs needs every prompt position's logits in one
    pass: it is not served from the cache (though its prompt is cached) and not cut
    into chunks by a budget smaller than its prompt; its logprobs equal a cold
    engine's and transformers' log-softmax."""
    name = "kv1"
    prompt = prompt_of(30, 62)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    with LLM(checkpoints.get(name), block_size=B, num_kv_blocks=64, enable_prefix_caching=False) as llm:
        (cold_toks,), _, (cold_plp,) = run(llm, [prompt], params)
    with LLM(checkpoints.get(name), block_size=B, num_kv_blocks=64, max_num_batched_tokens=7) as llm:
        run(llm, [prompt])  # the prompt is now cached (7 blocks)
        sched = llm.engine.scheduler
        schedule, planned = sched.schedule, []

        def record():
            batch = schedule()
            if batch is not None:
                planned.append([(s.request_id, batch.new_tokens(i)) for i, s in enumerate(batch.seqs)])
            return batch

        sched.schedule = record
        (toks,), (cached,), (plp,) = run(llm, [prompt], params)
        rid = planned[0][0][0]
        assert planned[0] == [(rid, len(prompt))]  # the whole prompt in one step, nothing from the cache
        assert cached == 0 and toks == cold_toks == checkpoints.greedy(name, prompt, 3)
    assert [(lp.token_id, lp.rank) for lp in plp] == [(lp.token_id, lp.rank) for lp in cold_plp]
    with torch.no_grad():
        ref = torch.log_softmax(checkpoints.hf_model(name)(torch.tensor([prompt])).logits[0].float(), -1)
    for x, (lp, cold) in enumerate(zip(plp, cold_plp), start=1):
        assert lp.token_id == prompt[x]
        assert lp.logprob == pytest.approx(cold.logprob, abs=1e-5)
        assert lp.logprob == pytest.approx(ref[x - 1, prompt[x]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == [t for t, _ in cold.top]
    assert len(plp) == len(prompt) - 1
