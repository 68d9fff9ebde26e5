"""Graph mode (parallel.graph_mode): decode steps through torch.compile'd graphs, one
per padded batch size, inputs in persistent buffers. Greedy output equals eager and
transformers under tp 1, tp 2 with dcp 2 (interleave 1 and = block) and P/D; the
graphs really ran (per size); padding rows write nothing (the caches of an eager and
a graph run are equal); a batch above the largest size runs eagerly; bad settings
are refused by name."""
from __future__ import annotations

import time
import urllib.request

import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.cluster.config import ConfigError, load_config
from braid.engine.config import ParallelConfig
from cluster_harness import Cluster, TEST_CONFIG, start_pair
from conftest import prompt_of

BLOCK = 4
LENGTHS = [1, 3, 7, 9, 20]
"""Five sequences whose lengths cross (virtual) block boundaries while decoding."""
MAX_NEW = [6, 10, 14, 18, 22]
"""Different lengths: the batch shrinks 5 -> 1, so steps land in every size below."""
SIZES = [1, 2, 4]
"""5 sequences run eagerly (above the largest size); 3 pad to 4."""


def _run(path: str, graph: bool, **kw):
    prompts = [prompt_of(n, seed=300 + n) for n in LENGTHS]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_NEW]
    with LLM(path, block_size=BLOCK, num_kv_blocks=64, threads_per_rank=1, graph_mode=graph,
             graph_batch_sizes=SIZES, **kw) as llm:
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.blocks.num_free == 64
        graphs = llm.engine.executor.driver.runner.graphs
        steps = dict(graphs.steps) if graphs is not None else None
        cache = llm.engine.executor.driver.kv_cache.clone()
    return prompts, outs, steps, cache


@pytest.mark.parametrize("name,tp,dcp,interleave", [
    ("kv2", 1, 1, BLOCK), ("kv1", 2, 2, 1), ("kv1", 2, 2, BLOCK),
], ids=["tp1", "tp2-dcp2-i1", "tp2-dcp2-iblock"])
def test_graph_mode_greedy_equals_eager_and_transformers(checkpoints, name, tp, dcp, interleave):
    path = checkpoints.get(name)
    kw = dict(tensor_parallel_size=tp, decode_context_parallel_size=dcp, cp_kv_cache_interleave_size=interleave)
    prompts, eager, none, eager_cache = _run(path, False, **kw)
    _, graph, steps, graph_cache = _run(path, True, **kw)
    assert none is None
    for p, m, e, g in zip(prompts, MAX_NEW, eager, graph):
        assert g == e == checkpoints.greedy(name, p, m), f"prompt length {len(p)}"
    assert steps == _expected_steps(), steps
    # padding rows wrote nothing and real rows wrote the same KV (rank 0's shard)
    torch.testing.assert_close(graph_cache, eager_cache, rtol=1e-5, atol=1e-5)


def _expected_steps() -> dict[int, int]:
    """The steps each size runs, counted from the schedule: the prompts' step gives
    every first token, decode step j runs the sequences that want more than j + 1
    tokens; a batch of n runs in the smallest size >= n, above the largest eagerly."""
    steps = {n: 0 for n in SIZES}
    for j in range(1, max(MAX_NEW)):
        n = sum(m - 1 >= j for m in MAX_NEW)
        if n <= SIZES[-1]:
            steps[min(s for s in SIZES if s >= n)] += 1
    return steps


def test_graph_mode_settings_refused_by_name():
    for bad in ([], [0], [2000], "4", [True]):
        with pytest.raises(ValueError, match="graph_batch_sizes"):
            ParallelConfig(graph_batch_sizes=bad)
    with pytest.raises(ValueError, match="graph_mode: expected true or false"):
        ParallelConfig(graph_mode="yes")
    assert ParallelConfig(graph_batch_sizes=[8, 1, 8]).graph_batch_sizes == (1, 8)
    # the cluster YAML and --set overrides
    cfg = load_config(data={"decode": {"parallel": {"graph_mode": True, "graph_batch_sizes": [4, 1]}}})
    assert cfg.decode.parallel.graph_batch_sizes == (1, 4) and cfg.decode.parallel.graph_mode
    cfg = load_config(data={}, overrides=["decode.parallel.graph_batch_sizes=2,8"])
    assert cfg.decode.parallel.graph_batch_sizes == (2, 8)
    from braid.cluster.cli import _offline_settings, build_parser
    from braid.engine.config import EngineConfig

    args = build_parser().parse_args(["offline", "hi", "--graph-mode", "--graph-batch-sizes", "1,8"])
    par = EngineConfig.build("model", **_offline_settings(args)).parallel
    assert par.graph_mode and par.graph_batch_sizes == (1, 8)
    assert not EngineConfig.build("model", **_offline_settings(build_parser().parse_args(["offline", "hi"]))).parallel.graph_mode
    for bad, why in ((["a"], "expected a list of integers"), ([0], "from 1 to 1024"), ("x,y", "list of integers")):
        with pytest.raises(ConfigError, match=f"decode.parallel.graph_batch_sizes: .*{why}"):
            load_config(data={"decode": {"parallel": {"graph_batch_sizes": bad}}})


def test_pd_decode_node_in_graph_mode(tmp_path_factory, checkpoints):
    """Prefill pcp 2 -> decode tp 2 dcp 2 in graph mode: greedy equals transformers
    through the SDK, and the decode node's /metrics count graph steps."""
    from braid.client import Client

    name = "kv1"
    parallel = dict(TEST_CONFIG["decode"]["parallel"], graph_mode=True, graph_batch_sizes=[2])
    c = Cluster(str(tmp_path_factory.mktemp("graph")), checkpoints.get(name), {"decode": {"parallel": parallel}})
    prompts = [prompt_of(n, seed=400 + n) for n in (5, 13)]
    try:
        start_pair(c)
        with Client(c.router.address, timeout=120) as cl:
            for p in prompts:
                out = cl.complete(p, max_tokens=12, temperature=0, ignore_eos=True)
                assert list(out.token_ids) == checkpoints.greedy(name, p, 12)
        steps = _graph_steps(c.decode.info["metrics"], 2 * 11)
    finally:
        c.close()
    assert steps == 2 * 11  # 11 decode steps a request (the first token comes from prefill), one at a time


def _graph_steps(address: str, want: float) -> float:
    """braid_node_graph_steps_total once it reaches `want` (the node reads its engine
    every 0.5 s), or what it says after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        value = next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("braid_node_graph_steps_total ")), 0.0)
        if value >= want or time.monotonic() > deadline:
            return value
        time.sleep(0.2)
