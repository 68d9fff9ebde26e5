"""MTP speculation (DeepSeek-V3's multi-token-prediction layer) in the engine, against
transformers: greedy output with it equals output without it and transformers' for
k = 1, 2, 4 under tp 1, tp 2 with dcp 2 (interleave 1 and = block size) and pcp 2;
every draft the engine proposes equals what transformers' own MtpLayer (fed
transformers' hidden states, chained on its own output) drafts, also with chunked
prompts, under PCP and after preemptions; seeded sampling is unchanged by it; prefix-cache hits stay
exact; the MTP cache layer
and the model's layers hold what a run without speculation wrote, and no block is
left behind; the method is refused where there is no MTP layer."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from braid.engine import LLM, SamplingParams
from braid.engine.scheduler import RequestRejected
from spec_fixtures import hf_greedy, loop_checkpoint, mtp_loop_checkpoint, quoting_prompt
from test_deepseek_v3 import CONFIGS, _hf_mtp_layer
from test_spec_decode import B, KS, LAYOUTS, _greedy, _logical_kv, _prompts, check_greedy_speculation

MTP_INDEX = CONFIGS["v3-lora"]["num_hidden_layers"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mtp_greedy_equals_without_and_transformers(checkpoints, layout):
    check_greedy_speculation(mtp_loop_checkpoint(checkpoints.root), LAYOUTS[layout], speculative_method="mtp")


class _ReferenceMTP:
    """transformers' DeepSeek-V3 and its MtpLayer (loaded from the checkpoint's MTP
    tensors), drafting without any cache: every row recomputed from the whole sequence."""

    def __init__(self, checkpoints, path: str):
        from transformers import AutoModelForCausalLM

        self.hf = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tensors = load_file(os.path.join(path, "model.safetensors"))
        self.layer = _hf_mtp_layer(self.hf, self.tensors, MTP_INDEX)
        self.layer.use_post_norm = False  # the chain feeds the block's own output (post_norm before the head only)
        self.embed = self.tensors[f"model.layers.{MTP_INDEX}.embed_tokens.weight"]
        self.head = self.tensors[f"model.layers.{MTP_INDEX}.shared_head.head.weight"]

    @torch.no_grad()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        """k greedy drafts after `tokens`: row i is (h_i, token i+1) for i < len-1, then
        each draft's row takes the previous row's output and that draft."""
        ids = torch.tensor(tokens)
        hidden = list(self.hf.model(ids[None]).last_hidden_state[0, :-1])  # after the final norm
        nxt = tokens[1:]
        out = []
        for _ in range(k):
            n = len(nxt)
            emb = torch.nn.functional.embedding(torch.tensor(nxt), self.embed)[None]
            positions = torch.arange(1, n + 1)[None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            rope = self.hf.model.rotary_emb(emb, positions)
            h = self.layer(emb, torch.stack(hidden)[None], rope, mask, positions, None)[0]
            logits = self.layer.post_norm(h[-1]) @ self.head.T
            out.append(int(logits.argmax()))
            hidden.append(h[-1])
            nxt.append(out[-1])
        return out


def _record_drafts(mtp, seen: list) -> None:
    """Append (the sequence's tokens, its drafts) to `seen` for every non-empty proposal."""
    propose = mtp.propose

    def recording(seqs, ks):
        got = propose(seqs, ks)
        seen.extend((list(s.token_ids), d) for s, d in zip(seqs, got) if d)
        return got

    mtp.propose = recording


DRAFT_LAYOUTS = {"tp1": {}, "tp2-dcp2-i1": LAYOUTS["tp2-dcp2-i1"], "pcp2": LAYOUTS["pcp2"],
                 # prompts in chunks of at most 6 tokens: a chunk's last MTP row takes the next chunk's first token
                 "tp1-chunked": dict(max_num_batched_tokens=6)}


@pytest.mark.parametrize("layout", list(DRAFT_LAYOUTS))
def test_mtp_drafts_equal_transformers_mtp_layer(checkpoints, layout):
    """Every proposal (k 1..4, a sequence's first step after its prompt and each step
    after a partly accepted one) equals transformers' MtpLayer's chain over the same
    tokens: the engine's MTP cache (written by prefill rows, verification rows and the
    rewritten row of each proposal) holds exactly what a full recomputation sees."""
    path = mtp_loop_checkpoint(checkpoints.root)
    ref = _ReferenceMTP(checkpoints, path)
    prompts = _prompts()
    seen = []
    with LLM(path, block_size=B, num_kv_blocks=96, threads_per_rank=1, speculative_method="mtp",
             **DRAFT_LAYOUTS[layout]) as llm:
        _record_drafts(llm.engine.mtp, seen)
        llm.generate([p for p in prompts for _ in KS], [_greedy(k, n=16) for _ in prompts for k in KS])
    assert len(seen) > 30 and any(len(d) == 4 for _, d in seen)
    for tokens, drafts in seen:
        assert drafts == ref.drafts(tokens, len(drafts)), f"after {tokens}"


@pytest.mark.parametrize("layout", ["tp1", "pcp2"])
def test_mtp_rollback_leaves_every_layer_a_plain_run_wrote(checkpoints, layout):
    """After many rejections: no block is left behind, and every rank's cache rows (the
    model's layers and the MTP layer's) of the positions whose MTP rows are final (all
    but the last two) equal those of a run that verified no drafts (a draft budget of 0:
    its MTP rows are still written every step, as for any request that speculates)."""
    path = mtp_loop_checkpoint(checkpoints.root)
    prompts = _prompts()
    caches = {}
    for budget in (0, 64):
        with LLM(path, block_size=B, num_kv_blocks=96, threads_per_rank=1, speculative_method="mtp",
                 max_draft_tokens_per_step=budget, **LAYOUTS[layout]) as llm:
            eng = llm.engine
            seqs = [eng.add_request(p, _greedy(4, n=60)) for p in prompts]
            for _ in range(200):
                if all(len(s.output_token_ids) >= 30 for s in seqs):
                    break
                eng.step()
            caches[budget] = [_logical_kv(eng, s, len(p) + 27) for s, p in zip(seqs, prompts)]
            for s in seqs:
                eng.abort(s.request_id)
            assert eng.blocks.num_free == 96
            st = eng.scheduler.spec_stats
            assert (0 < st.accepted_tokens < st.draft_tokens) if budget else st.draft_tokens == 0
    for plain, spec in zip(caches[0], caches[64]):
        assert spec.shape[2] == MTP_INDEX + 1  # the MTP layer's cache is the last layer
        assert spec[:, :, -1].abs().sum() > 0
        torch.testing.assert_close(spec, plain, rtol=1e-5, atol=1e-5)


def test_mtp_after_preemption_drafts_from_a_rebuilt_cache(checkpoints):
    """A KV pool too small for every sequence: preempted sequences recompute their tokens
    (the MTP rows with them); output stays transformers' and every later draft still
    equals transformers' MtpLayer's over the same tokens."""
    path = mtp_loop_checkpoint(checkpoints.root)
    ref = _ReferenceMTP(checkpoints, path)
    prompts = [quoting_prompt(s, 14) for s in range(4)]
    seen = []
    with LLM(path, block_size=B, num_kv_blocks=24, threads_per_rank=1, speculative_method="mtp",
             num_speculative_tokens=3) as llm:
        _record_drafts(llm.engine.mtp, seen)
        outs = llm.generate(prompts, _greedy(3, n=30))
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.num_free == 24
    assert [o.token_ids for o in outs] == [hf_greedy(path, p, 30) for p in prompts]
    for tokens, drafts in seen:
        assert drafts == ref.drafts(tokens, len(drafts)), f"after {tokens}"


def test_mtp_seeded_sampling_is_the_same_with_and_without_it(checkpoints):
    """Sampled requests (temperature 0.8, seeded) emit the very tokens they emit without
    speculation: every verification row is drawn as that output index's plain draw."""
    path = mtp_loop_checkpoint(checkpoints.root)
    prompts = _prompts()
    outs = {}
    with LLM(path, block_size=B, num_kv_blocks=96, threads_per_rank=1, speculative_method="mtp") as llm:
        for k in (0, 3):
            params = [SamplingParams(max_tokens=20, temperature=0.8, seed=100 + i, ignore_eos=True,
                                     num_speculative_tokens=k) for i in range(len(prompts))]
            outs[k] = [o.token_ids for o in llm.generate(prompts, params)]
        st = llm.engine.scheduler.spec_stats
    assert outs[3] == outs[0]
    assert 0 < st.accepted_tokens < st.draft_tokens


def test_mtp_with_prefix_cache_hits_stays_exact(checkpoints):
    """Requests that share a prefix (whole blocks hit in the prefix cache, one ending
    mid-block, one repeated whole) speculate with MTP; output equals transformers'.
    (A hit keeps the MTP rows its blocks' first writer computed: spec_decode/mtp.py.)"""
    path = mtp_loop_checkpoint(checkpoints.root)
    shared = quoting_prompt(7, 13)
    prompts = [shared + [40, 41, 42], shared[:12] + [50, 51], shared + [40, 41, 42], shared]
    with LLM(path, block_size=B, num_kv_blocks=96, threads_per_rank=1, speculative_method="mtp",
             num_speculative_tokens=3) as llm:
        eng, outs, hits = llm.engine, [], []
        for p in prompts:
            seq = eng.add_request(p, _greedy(3, n=16))
            for _ in range(100):
                if not eng.has_unfinished():
                    break
                eng.step()
            outs.append(list(seq.output_token_ids))
            hits.append(seq.num_prefix_hit_tokens)
        st = eng.scheduler.spec_stats
    assert outs == [hf_greedy(path, p, 16) for p in prompts]
    assert hits[0] == 0 and min(hits[1:]) >= 12
    assert 0 < st.accepted_tokens < st.draft_tokens


def test_mtp_is_refused_without_an_mtp_layer(checkpoints):
    with pytest.raises(ValueError, match="speculative.method 'mtp': .* has no MTP layer"):
        LLM(loop_checkpoint(checkpoints), speculative_method="mtp")
    with LLM(loop_checkpoint(checkpoints), block_size=B, num_kv_blocks=32) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, speculative_method="mtp"))[0]
        assert out.finish_reason == "error" and "does not run an MTP layer" in out.error
    with pytest.raises(RequestRejected, match="does not run an MTP layer"):
        with LLM(loop_checkpoint(checkpoints), block_size=B, num_kv_blocks=32) as llm:
            llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, speculative_method="mtp"))
