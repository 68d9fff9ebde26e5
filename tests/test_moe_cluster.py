"""MoE models through the cluster (router, prefill node, decode node) with expert
parallelism on both sides: prefill pcp 2 with EP 2 across its PCP ranks, decode
tp 2 with dcp 2 and EP 2; greedy output against transformers, and the KV really
crossed from P to D (no local prefill)."""
from __future__ import annotations


import pytest

from cluster_harness import Cluster, start_pair
from conftest import prompt_of
from moe_fixtures import moe_checkpoint

LENGTHS = [1, 3, 8, 9, 37, 100]
NEW = 48
EP_OVERRIDES = {
    "prefill": {"parallel": {"prefill_context_parallel_size": 2, "expert_parallel_size": 2, "threads_per_rank": 1}},
    "decode": {"parallel": {"tensor_parallel_size": 2, "decode_context_parallel_size": 2,
                            "enable_expert_parallel": True, "threads_per_rank": 1}},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["q3m-norm", "v3-lora"])
def test_pd_with_ep_on_both_sides_equals_transformers(tmp_path_factory, checkpoints, name):
    from braid.client import Client

    prompts = [prompt_of(n, seed=1100 + n) for n in LENGTHS]
    c = Cluster(str(tmp_path_factory.mktemp("moe")), moe_checkpoint(checkpoints.root, name), EP_OVERRIDES)
    try:
        start_pair(c)
        with Client(c.router.address, timeout=120) as cl:
            outs = [cl.complete(p, max_tokens=NEW, temperature=0, ignore_eos=True) for p in prompts]
    finally:
        c.close()
    for p, out in zip(prompts, outs):
        assert list(out.token_ids) == checkpoints.greedy(name, p, NEW), f"prompt length {len(p)}"
        assert not out.timings.local_prefill and out.timings.kv_bytes > 0
