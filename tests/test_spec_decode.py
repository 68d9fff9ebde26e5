"""Speculative decoding in the engine (n-gram prompt lookup and a draft model), against
transformers: greedy output with speculation equals output without it and transformers'
for k = 1, 2, 4 under tp 1, tp 2 with dcp 2 (interleave 1 and = block size) and pcp 2
(the target as its own draft keeps every draft);
a seeded sampled request emits the same tokens with and without it; the first
speculated token's distribution matches the exact one (chi-square, and a biased
acceptance rule fails the same test); after many rejections every block not in
use is free and the cache holds what a run without speculation wrote."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.config import SpeculativeConfig
from braid.engine.spec_decode.acceptance import Accepted
from spec_fixtures import hf_greedy, hf_next_probs, loop_checkpoint, quoting_prompt
from test_spec_acceptance import chi2_pvalue, chi2_stat

B = 4
NEW = 24
KS = (1, 2, 4)
LAYOUTS = {
    "tp1": dict(),
    "tp2-dcp2-i1": dict(tensor_parallel_size=2, decode_context_parallel_size=2, cp_kv_cache_interleave_size=1),
    "tp2-dcp2-iB": dict(tensor_parallel_size=2, decode_context_parallel_size=2, cp_kv_cache_interleave_size=B),
    "pcp2": dict(prefill_context_parallel_size=2),
}


def _prompts():
    return [quoting_prompt(seed, n) for seed, n in ((1, 5), (2, 14), (3, 23))]


def _greedy(k, n=NEW, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, num_speculative_tokens=k, **kw)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_with_speculation_equals_without_and_transformers(checkpoints, layout):
    check_greedy_speculation(loop_checkpoint(checkpoints), LAYOUTS[layout])


def check_greedy_speculation(path: str, layout: dict, **engine) -> None:
    """Greedy output without speculation, and with k = 1, 2, 4 per request in one batch,
    equals transformers'; drafts were both kept and rolled back; no block left behind."""
    prompts = _prompts()
    expected = [hf_greedy(path, p, NEW) for p in prompts]
    with LLM(path, block_size=B, num_kv_blocks=96, threads_per_rank=1, **engine, **layout) as llm:
        plain = llm.generate(prompts, _greedy(0))
        assert llm.engine.scheduler.spec_stats.seq_steps == 0
        # every k in one batch: per-request k
        outs = llm.generate([p for p in prompts for _ in KS], [_greedy(k) for _ in prompts for k in KS])
        st = llm.engine.scheduler.spec_stats
        assert llm.engine.blocks.num_free == 96
    assert [o.token_ids for o in plain] == expected
    for i, o in enumerate(outs):
        assert o.token_ids == expected[i // len(KS)], f"prompt {i // len(KS)}, k={KS[i % len(KS)]}"
    # both outcomes happened: drafts kept and drafts rolled back
    assert 0 < st.accepted_tokens < st.draft_tokens
    assert st.emitted_tokens > st.seq_steps  # speculation gained tokens per step


@pytest.mark.parametrize("layout,draft", [("tp1", "cycle"), ("tp2-dcp2-i1", "cycle"), ("tp2-dcp2-iB", "cycle"),
                                          ("pcp2", "cycle"), ("tp2-dcp2-i1", "self")])
def test_draft_model_greedy_equals_transformers(checkpoints, layout, draft):
    """A draft model on every rank with the target's layout and its own KV cache: a small
    model that only follows the cycles (drafts kept where the target loops, rejected
    where it jumps), or the target itself (every draft kept)."""
    path = loop_checkpoint(checkpoints)
    draft_path = path if draft == "self" else loop_checkpoint(checkpoints, scale=0.0)
    prompts = _prompts()
    expected = [hf_greedy(path, p, NEW) for p in prompts]
    with LLM(path, block_size=B, num_kv_blocks=96, threads_per_rank=1, speculative_method="draft",
             draft_model=draft_path, num_speculative_tokens=2, **LAYOUTS[layout]) as llm:
        outs = llm.generate([p for p in prompts for _ in KS], [_greedy(k) for _ in prompts for k in KS])
        st = llm.engine.scheduler.spec_stats
        assert llm.engine.blocks.num_free == 96
    for i, o in enumerate(outs):
        assert o.token_ids == expected[i // len(KS)], f"prompt {i // len(KS)}, k={KS[i % len(KS)]}"
    if draft == "self":
        assert st.accepted_tokens == st.draft_tokens > 0
    else:
        assert 0 < st.accepted_tokens < st.draft_tokens


def test_mla_verification_rows_under_dcp(ds, checkpoints):
    """DeepSeek-V2 (MLA: the absorbed decode over the latent cache) under tp 2, dcp 2: the
    model as its own draft keeps every draft, so each verification step runs k+1 query rows
    per sequence through the latent decode; output equals transformers'."""
    path = ds("ds-moe")
    prompts = [quoting_prompt(seed, 9) for seed in (41, 42)]
    with LLM(path, block_size=B, num_kv_blocks=96, tensor_parallel_size=2, decode_context_parallel_size=2,
             threads_per_rank=1, speculative_method="draft", draft_model=path, num_speculative_tokens=3) as llm:
        outs = llm.generate(prompts, _greedy(3, n=16))
        st = llm.engine.scheduler.spec_stats
    assert [o.token_ids for o in outs] == [checkpoints.greedy("ds-moe", p, 16) for p in prompts]
    assert st.accepted_tokens == st.draft_tokens > 0


def test_draft_catch_up_is_bounded_per_step(checkpoints):
    """A draft model's catch-up over prompts runs at most max_num_batched_tokens tokens a
    step (sequences still catching up decode without drafts meanwhile): a long prompt
    never stalls the node. Output stays transformers'; drafts start once caught up."""
    path = loop_checkpoint(checkpoints)
    prompts = _prompts()
    with LLM(path, block_size=B, num_kv_blocks=96, max_num_batched_tokens=8, speculative_method="draft",
             draft_model=loop_checkpoint(checkpoints, scale=0.0), num_speculative_tokens=3) as llm:
        sizes = []
        draft = llm.engine.executor.draft

        def recording(plan):
            if plan.is_prefill:
                sizes.append(sum(s.num_new for s in plan.seqs))
            return draft(plan)

        llm.engine.executor.draft = recording
        outs = llm.generate(prompts, _greedy(3))
        st = llm.engine.scheduler.spec_stats
    assert [o.token_ids for o in outs] == [hf_greedy(path, p, NEW) for p in prompts]
    assert max(sizes) <= 8 and sum(1 for n in sizes if n == 8) >= 3  # the prompts took several passes
    assert 0 < st.accepted_tokens < st.draft_tokens


def test_draft_method_is_refused_without_a_draft_and_a_bad_draft_fails_at_start(checkpoints, tmp_path):
    path = loop_checkpoint(checkpoints)
    with LLM(path, block_size=B, num_kv_blocks=32) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, speculative_method="draft"))[0]
        assert out.finish_reason == "error" and "has no draft model" in out.error
    with pytest.raises(ValueError, match="a draft must share the tokenizer"):
        LLM(path, speculative_method="draft", draft_model=_other_vocab(checkpoints, tmp_path))
    with pytest.raises(ValueError, match="speculative.draft_model: .*decode_context_parallel_size"):
        LLM(path, tensor_parallel_size=2, decode_context_parallel_size=2, speculative_method="draft",
            draft_model=checkpoints.get("kv2"))
    with pytest.raises(ValueError, match="draft_model: method 'draft' needs"):
        LLM(path, speculative_method="draft")


def _other_vocab(checkpoints, tmp_path) -> str:
    import json
    import shutil

    other = str(tmp_path / "other-vocab")
    shutil.copytree(checkpoints.get("kv1"), other)
    with open(f"{other}/config.json") as f:
        cfg = json.load(f)
    cfg["vocab_size"] += 1
    with open(f"{other}/config.json", "w") as f:
        json.dump(cfg, f)
    return other


def test_random_checkpoint_mostly_rejects_and_stays_exact(checkpoints):
    """A random checkpoint (near-random text) under tp 2, dcp 2: drafts are nearly all
    rejected, the output is still transformers'."""
    prompts = [quoting_prompt(seed, 12) for seed in (7, 8)]
    with LLM(checkpoints.get("kv1"), block_size=B, num_kv_blocks=64, tensor_parallel_size=2,
             decode_context_parallel_size=2, threads_per_rank=1) as llm:
        outs = llm.generate(prompts, _greedy(4))
        assert llm.engine.scheduler.spec_stats.draft_tokens > 0
        assert llm.engine.blocks.num_free == 64
    assert [o.token_ids for o in outs] == [checkpoints.greedy("kv1", p, NEW) for p in prompts]


def test_a_sequence_whose_drafts_fail_pauses_speculation(checkpoints):
    """A draft model that disagrees with the target (a random one) proposes on every
    step and is nearly always wrong: with pausing on, sequences verify drafts on a
    small share of their steps; with it off, on every step. Exact either way."""
    path = loop_checkpoint(checkpoints)
    prompts = _prompts()
    steps = {}
    for pause in (0.25, 0.0):
        with LLM(path, block_size=B, num_kv_blocks=96, speculative_method="draft", draft_model=checkpoints.get("kv1"),
                 num_speculative_tokens=2, pause_below_acceptance=pause) as llm:
            outs = llm.generate(prompts, _greedy(2, n=48))
            st = llm.engine.scheduler.spec_stats
        assert st.accepted_tokens < st.draft_tokens / 4
        assert [o.token_ids for o in outs] == [hf_greedy(path, p, 48) for p in prompts]
        steps[pause] = st.seq_steps
    decode_steps = len(prompts) * 47
    # the rule at zero acceptance, k=2: 4 verifying steps per window of 8 drafts, then pauses of
    # 4, 8, 16, 32 steps: 16 of a sequence's 47 decode steps verify (0.34)
    assert steps[0.0] > decode_steps * 0.9 and steps[0.25] <= decode_steps * 0.4


def test_pause_follows_the_acceptance_of_each_window():
    """SpecState against its rule written out: judge every SPEC_WINDOW drafts; below the
    threshold pause 4, 8, 16, ... (at most 64) steps; a good window resets the pause."""
    from braid.engine.spec_decode.stats import MAX_PAUSE, SPEC_WINDOW, SpecState

    st = SpecState()
    pauses = []
    for window in range(8):  # bad, bad, bad, good, bad, then bad ones up to the cap
        good = window == 3
        st.record(SPEC_WINDOW, SPEC_WINDOW if good else 0, 0.25)
        n = 0
        while not st.should_speculate():
            n += 1
        pauses.append(n)
    assert pauses == [4, 8, 16, 0, 4, 8, 16, 32]
    for _ in range(3):
        st.record(SPEC_WINDOW, 0, 0.25)
        n = 0
        while not st.should_speculate():
            n += 1
    assert n == MAX_PAUSE
    st = SpecState()
    st.record(SPEC_WINDOW, 2, 0.25)  # exactly the threshold: no pause
    assert st.should_speculate()


def test_seeded_sampling_is_the_same_with_and_without_speculation(checkpoints):
    """Each output index draws from (seed, index) alone and a draft is kept only when it
    equals that draw: the same seeded request emits the same tokens either way."""
    path = loop_checkpoint(checkpoints)
    prompts = _prompts()
    params = [SamplingParams(max_tokens=NEW, temperature=0.8, top_k=20, seed=100 + i, ignore_eos=True,
                             logprobs=2, num_speculative_tokens=k)
              for i in range(len(prompts)) for k in (0, 4)]
    with LLM(path, block_size=B, num_kv_blocks=64) as llm:
        outs = llm.generate([p for p in prompts for _ in (0, 4)], params)
        st = llm.engine.scheduler.spec_stats
    assert st.accepted_tokens > 0
    for plain, spec in zip(outs[::2], outs[1::2]):
        assert spec.token_ids == plain.token_ids
        assert len(spec.logprobs) == NEW
        for a, b in zip(plain.logprobs, spec.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


SAMPLES = 1200
ALPHA = 1e-3
TOP_K = 4


def _first_speculated_tokens(path, prompt, monkeypatch=None, biased=None) -> torch.Tensor:
    """Counts of output token 1 (the first one a speculating step emits) over SAMPLES
    unseeded requests at temperature 1, top-k 4."""
    if biased is not None:
        monkeypatch.setattr("braid.engine.core.greedy_accept", biased)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=TOP_K, ignore_eos=True, num_speculative_tokens=1)
    with LLM(path, block_size=B, num_kv_blocks=512, max_num_seqs=64, seed=5) as llm:
        outs = llm.generate([prompt] * SAMPLES, params)
        assert llm.engine.scheduler.spec_stats.draft_tokens > SAMPLES // 2
    pairs = torch.tensor([o.token_ids[:2] for o in outs])
    return pairs


def _exact_second_token(path, prompt) -> torch.Tensor:
    """P(output token 1) = sum over t0 of p(t0 | prompt) p(t1 | prompt, t0), from transformers."""
    p0 = hf_next_probs(path, [prompt], top_k=TOP_K)[0]  # [V]
    support = (p0 > 0).nonzero().flatten().tolist()
    p1 = hf_next_probs(path, [prompt + [t] for t in support], top_k=TOP_K)  # [n, V]
    return (p0[support, None] * p1).sum(0)


def _chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of observed tokens to probs, bins with expected count < 5 merged."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs * len(tokens)
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp_p = torch.cat([probs[big], probs[~big].sum().view(1)])
    keep = exp_p > 0
    return chi2_pvalue(chi2_stat(obs[keep], exp_p[keep]), int(keep.sum()) - 1)


def test_first_speculated_token_has_the_exact_distribution(checkpoints, monkeypatch):
    path = loop_checkpoint(checkpoints)
    prompt = quoting_prompt(12, 12)
    exact = _exact_second_token(path, prompt)
    assert (exact > 0.05).sum() >= 2, "the test needs a distribution with several likely tokens"
    got = _first_speculated_tokens(path, prompt)
    assert _chi2_pvalue(got[:, 1], exact) > ALPHA

    def keep_first_draft(target, drafts):  # a biased rule: the first draft is always kept
        return Accepted([int(drafts[0])] + [int(t) for t in target[1:2]])

    biased = _first_speculated_tokens(path, prompt, monkeypatch, keep_first_draft)
    assert _chi2_pvalue(biased[:, 1], exact) < ALPHA, "the chi-square test would not catch a biased rule"


@pytest.mark.parametrize("layout", ["tp1", "tp2-dcp2-i1"])
def test_rollback_frees_blocks_and_leaves_the_cache_a_plain_run_wrote(checkpoints, layout):
    """After every step: each decoding sequence holds exactly the blocks its computed
    tokens need, and the pool's used blocks are exactly those. At the end, every
    rank's cache rows of each computed position equal a run without speculation's."""
    path = loop_checkpoint(checkpoints)
    prompts = _prompts()
    caches = {}
    for k in (0, 4):
        with LLM(path, block_size=B, num_kv_blocks=96, threads_per_rank=1, **LAYOUTS[layout]) as llm:
            eng = llm.engine
            seqs = [eng.add_request(p, _greedy(k, n=60)) for p in prompts]  # none ends first
            for _ in range(200):
                if all(len(s.output_token_ids) >= 30 for s in seqs):
                    break
                eng.step()
                running = eng.scheduler.running
                assert sum(len(s.block_table) for s in running) == eng.blocks.num_blocks - eng.blocks.num_free
                for s in running:
                    if s.num_output_tokens:
                        assert len(s.block_table) == eng.blocks.blocks_for(s.num_cached_tokens)
            caches[k] = [_logical_kv(eng, s, len(p) + 29) for s, p in zip(seqs, prompts)]
            for s in seqs:
                eng.abort(s.request_id)
            assert eng.blocks.num_free == 96
            if k:
                assert 0 < eng.scheduler.spec_stats.accepted_tokens < eng.scheduler.spec_stats.draft_tokens
    for plain, spec in zip(caches[0], caches[4]):
        torch.testing.assert_close(spec, plain, rtol=1e-5, atol=1e-5)


def _logical_kv(eng, seq, n: int) -> torch.Tensor:
    """Each rank's cache rows of positions 0..n-1 of `seq`, [ranks, n, L, C, H, D]
    (a rank's rows of positions another DCP rank stores are left zero)."""
    assert seq.num_cached_tokens >= n
    layout = eng.config.layout
    per_rank = eng.executor.gather_kv(list(seq.block_table))  # [L, nb, C, H, B, D]
    table = torch.tensor([list(range(len(seq.block_table)))])  # local block index, not the id
    out = []
    for rank, cache in enumerate(per_rank):
        shard = eng.config.topology.for_rank(rank).cp_rank
        slots = layout.slot_mapping(torch.arange(n), table.expand(n, -1), shard)  # [n], -1 elsewhere
        rows = torch.zeros(n, *cache.shape[:1], *cache.shape[2:4], cache.shape[-1])
        flat = cache.permute(1, 4, 0, 2, 3, 5).reshape(-1, *rows.shape[1:])  # [nb*B, L, C, H, D]
        mine = slots >= 0
        rows[mine] = flat[slots[mine]]
        out.append(rows)
    return torch.stack(out)


def test_engine_lowers_k_for_a_large_batch_and_stops_at_max_tokens(checkpoints):
    """The step's draft budget is shared: 8 sequences with k=4 and a budget of 8 verify at
    most one draft each; no sequence drafts past max_tokens (k <= tokens left - 1)."""
    path = loop_checkpoint(checkpoints)
    prompts = [quoting_prompt(20 + i, 10) for i in range(8)]
    spec = SpeculativeConfig(num_speculative_tokens=4, max_draft_tokens_per_step=8)
    with LLM(path, block_size=B, num_kv_blocks=128) as llm:
        eng = llm.engine
        eng.config = dataclasses.replace(eng.config, speculative=spec)
        eng.scheduler.spec = spec
        seqs = [eng.add_request(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)) for p in prompts]
        eng.step()  # the prefill
        batch = eng.scheduler.schedule()
        assert batch is not None and not batch.is_prefill
        assert all(len(batch.drafts_of(i)) <= 1 for i in range(len(seqs)))
        for s in seqs:
            eng.abort(s.request_id)
        assert eng.blocks.num_free == 128
    with LLM(path, block_size=B, num_kv_blocks=128, num_speculative_tokens=4) as llm:
        outs = llm.generate(prompts[:2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        st = llm.engine.scheduler.spec_stats
    assert [len(o.token_ids) for o in outs] == [3, 3]
    assert 0 < st.draft_tokens <= 2  # each: k <= 3 - 1 - 1 = 1 after the first token, then 0
    assert [o.token_ids for o in outs] == [hf_greedy(path, p, 3) for p in prompts[:2]]


@pytest.mark.parametrize("kw,match", [
    (dict(num_speculative_tokens=17), "num_speculative_tokens must be an integer in"),
    (dict(num_speculative_tokens=-1), "num_speculative_tokens must be an integer in"),
    (dict(speculative_method="eagle"), "speculative_method must be one of ngram"),
])
def test_bad_request_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(num_speculative_tokens=17), "num_speculative_tokens: at most 16"),
    (dict(method="eagle"), "method: unknown speculative method"),
    (dict(ngram_min=3, ngram_max=2), "ngram_min: 3 is more than ngram_max 2"),
])
def test_bad_engine_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig(**kw)


def test_wire_carries_the_request_settings():
    from braid.proto import common_pb2
    from braid.proto.sampling_rules import check_sampling, sampling_kwargs

    pb = common_pb2.SamplingParams(max_tokens=4, num_speculative_tokens=3, speculative_method="ngram")
    check_sampling(pb)
    assert SamplingParams(**sampling_kwargs(pb)).num_speculative_tokens == 3
    assert "num_speculative_tokens" not in sampling_kwargs(common_pb2.SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        check_sampling(common_pb2.SamplingParams(max_tokens=4, num_speculative_tokens=99))
