"""Speculative decoding through P/D (prefill pcp 2 -> decode tp 2, dcp 2): the first
token comes from the prefill node, the decode node speculates (n-gram) on the
KV it received; greedy output equals transformers' for k = 1, 2, 4 (the request's
own k, and the node's default), through the gRPC SDK; the decode node's /metrics count it."""
from __future__ import annotations

import time
import urllib.request

from cluster_harness import Cluster, start_pair
from spec_fixtures import hf_greedy, loop_checkpoint, quoting_prompt

NEW = 20


def test_pd_cluster_speculates_exactly(tmp_path_factory, checkpoints):
    from braid.client import Client

    path = loop_checkpoint(checkpoints)
    prompts = [quoting_prompt(seed, n) for seed, n in ((31, 9), (32, 18))]
    expected = [hf_greedy(path, p, NEW) for p in prompts]
    c = Cluster(str(tmp_path_factory.mktemp("spec")), path, {"decode": {"speculative": {"num_speculative_tokens": 2}}})
    try:
        start_pair(c)
        with Client(c.router.address, timeout=120) as cl:
            for p, exp in zip(prompts, expected):
                for k in (None, 1, 4):
                    kw = {} if k is None else {"num_speculative_tokens": k}
                    out = cl.complete(p, max_tokens=NEW, temperature=0, ignore_eos=True, **kw)
                    assert list(out.token_ids) == exp, f"k={k}"
        accepted, drafted = _spec_counters(c.decode.info["metrics"])
    finally:
        c.close()
    assert 0 < accepted < drafted


def _spec_counters(address: str) -> tuple[float, float]:
    """(accepted, drafted) from the decode node's /metrics, once its reading (every 0.5 s) has them."""
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        accepted = _metric(text, "braid_node_spec_accepted_tokens_total")
        if accepted > 0 or time.monotonic() > deadline:
            return accepted, _metric(text, "braid_node_spec_draft_tokens_total")
        time.sleep(0.2)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
