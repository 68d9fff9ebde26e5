"""PCP prefill on real gloo ranks, against transformers, plus the split's balance."""
import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.kv_layout import ShardLayout
from braid.engine.pcp import chunk_bounds, split_prefill
from conftest import prompt_of

NEW = 16


def _lengths(pcp: int) -> list[int]:
    return sorted({1, 2 * pcp - 1, 2 * pcp, 2 * pcp + 1, 100, 1000})


@pytest.mark.parametrize("pcp,tp", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)])
def test_pcp_logits_and_greedy_equal_transformers(checkpoints, pcp, tp):
    name = "kv2"
    prompts = [prompt_of(n, seed=300 + n) for n in _lengths(pcp)]
    with LLM(
        checkpoints.get(name), prefill_context_parallel_size=pcp, tensor_parallel_size=tp, block_size=16, num_kv_blocks=256
    ) as llm:
        logits = llm.engine.last_token_logits(prompts)  # the whole batch prefilled together, each split on its own
        for row, p in zip(logits, prompts):
            ref = checkpoints.last_logits(name, p)
            assert (row - ref).abs().max() / ref.abs().max() < 1e-4, f"prompt length {len(p)}"
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    for p, out in zip(prompts, outs):
        assert out.token_ids == checkpoints.greedy(name, p, NEW), f"prompt length {len(p)}"


@pytest.mark.parametrize("pcp", [2, 4])
def test_pcp_prompts_shorter_than_the_ranks_alone(checkpoints, pcp):
    """A prompt alone in its batch, too short to give every PCP rank a token."""
    name = "kv2"
    with LLM(checkpoints.get(name), prefill_context_parallel_size=pcp, block_size=4, num_kv_blocks=64) as llm:
        for n in range(1, 2 * pcp + 1):
            p = prompt_of(n, seed=600 + n)
            out = llm.generate([p], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
            assert out.token_ids == checkpoints.greedy(name, p, 6), f"prompt length {n}"


def test_pcp_with_dcp_is_exact(checkpoints):
    name = "kv1"
    prompts = [prompt_of(n, seed=400 + n) for n in (1, 3, 4, 5, 37, 100)]
    with LLM(
        checkpoints.get(name),
        prefill_context_parallel_size=2,
        tensor_parallel_size=2,
        decode_context_parallel_size=2,
        block_size=4,
        num_kv_blocks=64,
    ) as llm:
        logits = llm.engine.last_token_logits(prompts)
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    for row, p, out in zip(logits, prompts, outs):
        ref = checkpoints.last_logits(name, p)
        assert (row - ref).abs().max() / ref.abs().max() < 1e-4
        assert out.token_ids == checkpoints.greedy(name, p, NEW)


@pytest.mark.parametrize("pcp,tp,dcp", [(2, 1, 1), (2, 2, 2)])
def test_prefill_kv_is_block_interleaved_across_shards(checkpoints, pcp, tp, dcp):
    """After a PCP prefill, block g of the prompt sits whole on KV shard g % N
    (N = pcp * dcp) and nowhere else, holding transformers' K and V."""
    name = "kv1"
    B = 4
    prompt = prompt_of(45, seed=8)
    ref = checkpoints.kv(name, prompt)  # per layer (K [Hkv, L, D], V)
    with LLM(
        checkpoints.get(name), prefill_context_parallel_size=pcp, tensor_parallel_size=tp, decode_context_parallel_size=dcp,
        block_size=B, num_kv_blocks=32,
    ) as llm:
        seq = llm.engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0))
        llm.engine.step()  # prefill only
        table = list(seq.block_table)
        caches = llm.engine.executor.gather_kv(table)  # per rank [L, n, C, H, B, D]
        topo = llm.engine.config.topology
        llm.engine.abort(seq.request_id)
    n = pcp * dcp
    layout = ShardLayout(B, n, B)
    for rank, cache in enumerate(caches):
        shard = topo.for_rank(rank).cp_rank
        expected = torch.zeros_like(cache)  # [L, n_blocks, C, H=1, B, D]
        for x in range(len(prompt)):
            owner, vb, off = layout.owner(x)
            assert owner == (x // B) % n and off == x % B  # block g whole on shard g % N
            if owner != shard:
                continue
            for layer, (k, v) in enumerate(ref):
                expected[layer, vb, 0, 0, off] = k[0, x]
                expected[layer, vb, 1, 0, off] = v[0, x]
        torch.testing.assert_close(cache, expected, atol=1e-5, rtol=1e-5, msg=f"rank {rank} (shard {shard})")


def _pairs(q_len: int, k_len: int) -> int:
    """Query-key pairs of one bottom-right causal row, counted one query at a time."""
    return sum(k_len - q_len + i + 1 for i in range(q_len))


@pytest.mark.parametrize("pcp", [2, 3, 4])
def test_zigzag_split_balances_attention_work(pcp):
    for length in range(1, 301):
        size = -(-length // (2 * pcp))
        work = []
        covered = []
        for r in range(pcp):
            split = split_prefill([length], pcp, r)
            work.append(sum(_pairs(q, k) for _, q, _, k in split.rows))
            covered += split.positions
            # brute force: the rank's queries are chunks r and 2P-1-r
            bounds = chunk_bounds(length, pcp)
            mine = [p for c in (r, 2 * pcp - 1 - r) for p in range(*bounds[c])]
            assert split.positions == mine
            assert work[-1] == sum(p + 1 for p in mine)
        assert sorted(covered) == list(range(length))
        assert max(work) - min(work) <= size * length, f"length {length}: {work}"


def test_split_restore_order_and_last_token():
    lengths = [5, 1, 12, 3]
    pcp = 2
    splits = [split_prefill(lengths, pcp, r) for r in range(pcp)]
    pad = splits[0].pad
    gathered = [None] * (pcp * pad)
    for r, s in enumerate(splits):
        for i, t in enumerate(s.token_index):
            gathered[r * pad + i] = t
    assert [gathered[i] for i in splits[0].restore] == list(range(sum(lengths)))
    for s_idx, n in enumerate(lengths):
        owners = [r for r, s in enumerate(splits) if s.last_local[s_idx] >= 0]
        assert len(owners) == 1
        s = splits[owners[0]]
        assert s.positions[s.last_local[s_idx]] == n - 1
