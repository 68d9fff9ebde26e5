"""Prefix caching across prefill and decode nodes (pcp 2 -> tp 2, dcp 2), against
transformers: caches on both sides, on P only, on D only; a prompt fully cached
on D needs no prefill node; a small pool evicts in the middle of a workload.

The KV bytes a request moves are checked against the block count it must move:
a cold prompt moves every block, a prompt whose leading blocks D holds moves
only the rest (the bytes of one block are measured on the cold request)."""
from __future__ import annotations

import pytest

from cluster_harness import Cluster, start_pair
from conftest import prompt_of

NAME = "kv1"  # one KV head: tp 2 with dcp 2 can shard it
B = 4  # the harness's block size
NEW = 6
SHARED = prompt_of(40, seed=901)  # ten blocks


def _cluster(tmp_path_factory, checkpoints, p_cache: bool, d_cache: bool, blocks: int = 256, more: dict | None = None):
    over = {
        "prefill": {"cache": {"block_size": B, "num_kv_blocks": blocks, "enable_prefix_caching": p_cache}},
        "decode": {"cache": {"block_size": B, "num_kv_blocks": blocks, "enable_prefix_caching": d_cache}},
    }
    for section, values in (more or {}).items():
        over.setdefault(section, {}).update(values)
    return Cluster(str(tmp_path_factory.mktemp("prefix")), checkpoints.get(NAME), over)


def _run(client, prompt):
    return client.complete(prompt, max_tokens=NEW, temperature=0, ignore_eos=True)


def _serve(c, prompts) -> list:
    """Start the pair on cluster `c`, send the prompts one after another, stop it."""
    from braid.client import Client

    try:
        start_pair(c)
        with Client(c.router.address, timeout=120) as cl:
            return [_run(cl, p) for p in prompts]
    finally:
        c.close()


def _blocks(n: int) -> int:
    return -(-n // B)


@pytest.mark.parametrize("p_cache,d_cache", [(True, True), (True, False), (False, True)],
                         ids=["both", "prefill-only", "decode-only"])
def test_cached_prefix_is_exact_and_sends_only_what_decode_lacks(tmp_path_factory, checkpoints, p_cache, d_cache):
    from braid.client import Client

    cold = SHARED + prompt_of(5, seed=902)  # 45 tokens, 12 blocks
    warm = SHARED + prompt_of(7, seed=903)  # shares ten blocks with `cold`
    one_block = SHARED[:4] + prompt_of(20, seed=904)  # shares one block
    c = _cluster(tmp_path_factory, checkpoints, p_cache, d_cache)
    try:
        start_pair(c)
        with Client(c.router.address, timeout=120) as cl:
            first = _run(cl, cold)
            second = _run(cl, warm)
            third = _run(cl, one_block)
            again = _run(cl, cold)  # D holds all of it but the last token's block (when D caches)
    finally:
        c.close()
    for prompt, out in ((cold, first), (warm, second), (one_block, third), (cold, again)):
        assert list(out.token_ids) == checkpoints.greedy(NAME, prompt, NEW)
    assert not first.timings.local_prefill and first.timings.kv_bytes > 0
    per_block = first.timings.kv_bytes // _blocks(len(cold))
    assert per_block * _blocks(len(cold)) == first.timings.kv_bytes
    held_by_d = 10 if d_cache else 0
    assert second.timings.kv_bytes == per_block * (_blocks(len(warm)) - held_by_d)
    assert third.timings.kv_bytes == per_block * (_blocks(len(one_block)) - (1 if d_cache else 0))
    if d_cache:  # no prefill node at all: D computes the last token's block itself
        assert again.timings.local_prefill and again.timings.kv_bytes == 0
    else:
        assert not again.timings.local_prefill and again.timings.kv_bytes == first.timings.kv_bytes


def test_small_pools_evict_in_the_middle_of_a_workload(tmp_path_factory, checkpoints):
    """24 virtual blocks of 8 tokens a side: a few distinct prompts fill the caches,
    later ones evict the least recently used; every answer stays exact."""
    prompts = [prompt_of(30 + 3 * i, seed=950 + i) for i in range(6)]
    prompts += [prompts[0], prompts[5], SHARED + prompts[1][:3], prompts[2]]
    c = _cluster(tmp_path_factory, checkpoints, True, True, blocks=24)
    outs = _serve(c, prompts)
    for p, out in zip(prompts, outs):
        assert list(out.token_ids) == checkpoints.greedy(NAME, p, NEW)
    # prompts[5] was just served: D still holds it whole (the repeat needs no prefill node)
    assert outs[7].timings.local_prefill


def test_chunked_prefill_on_both_nodes_with_hits(tmp_path_factory, checkpoints):
    """Prompt budgets of 3 tokens on P (less than a block, each chunk split over
    pcp 2) and 5 on D (odd; D prefills short prompts and fully cached ones
    itself), with prefix hits on both sides: every answer exact."""
    cold = SHARED + prompt_of(5, seed=902)
    warm = SHARED + prompt_of(7, seed=903)
    short = prompt_of(11, seed=905)  # at most local_prefill_max_tokens: prefilled on D, in chunks of 5
    prompts = [cold, short, warm, cold, short]
    more = {"prefill": {"scheduler": {"max_num_batched_tokens": 3}},
            "decode": {"scheduler": {"max_num_batched_tokens": 5}},
            "router": {"local_prefill_max_tokens": 12}}
    c = _cluster(tmp_path_factory, checkpoints, True, True, more=more)
    outs = _serve(c, prompts)
    for p, out in zip(prompts, outs):
        assert list(out.token_ids) == checkpoints.greedy(NAME, p, NEW)
    assert [o.timings.local_prefill for o in outs] == [False, True, False, True, True]
