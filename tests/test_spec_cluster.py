"""Speculative decoding through P/D (prefill pcp 2 -> decode tp 2, dcp 2): the first
token comes from the prefill node, the decode node speculates on the KV it
received, with n-gram drafts or a draft model (whose own prompt KV it computes
itself: the draft's cache never travels), or DeepSeek-V3's MTP layer (whose prompt
KV the prefill node computes under PCP and sends as one more cache layer); greedy
output equals transformers' for k = 1, 2, 4 (the request's own k and method, and
the node's defaults), through the gRPC SDK; the decode node's /metrics count it."""
from __future__ import annotations

import time
import urllib.request

from cluster_harness import Cluster, start_pair
from spec_fixtures import hf_greedy, loop_checkpoint, mtp_loop_checkpoint, quoting_prompt

NEW = 20


def test_pd_cluster_speculates_exactly(tmp_path_factory, checkpoints):
    from braid.client import Client

    path = loop_checkpoint(checkpoints)
    prompts = [quoting_prompt(seed, n) for seed, n in ((31, 9), (32, 18))]
    expected = [hf_greedy(path, p, NEW) for p in prompts]
    spec = {"method": "draft", "draft_model": loop_checkpoint(checkpoints, scale=0.0), "num_speculative_tokens": 2}
    c = Cluster(str(tmp_path_factory.mktemp("spec")), path, {"decode": {"speculative": spec}})
    try:
        start_pair(c)
        with Client(c.router.address, timeout=120) as cl:
            for p, exp in zip(prompts, expected):
                for method, k in ((None, None), ("draft", 1), ("draft", 4), ("ngram", 1), ("ngram", 4)):
                    out = cl.complete(p, max_tokens=NEW, temperature=0, ignore_eos=True,
                                      num_speculative_tokens=k, speculative_method=method)
                    assert list(out.token_ids) == exp, f"method={method}, k={k}"
        accepted, drafted = _spec_counters(c.decode.info["metrics"])
    finally:
        c.close()
    assert 0 < accepted < drafted


def test_pd_cluster_speculates_with_mtp(tmp_path_factory, checkpoints):
    """The MTP layer's prompt KV crosses with the model's (both nodes run it); the decode
    node recomputes the last prompt token to get its hidden state, then drafts."""
    from braid.client import Client

    path = mtp_loop_checkpoint(checkpoints.root)
    prompts = [quoting_prompt(seed, n) for seed, n in ((33, 9), (34, 18))]
    expected = [hf_greedy(path, p, NEW) for p in prompts]
    c = Cluster(str(tmp_path_factory.mktemp("mtp")), path,
                {"prefill": {"speculative": {"method": "mtp"}},
                 "decode": {"speculative": {"method": "mtp", "num_speculative_tokens": 2}}})
    try:
        start_pair(c)
        with Client(c.router.address, timeout=120) as cl:
            for p, exp in zip(prompts, expected):
                for method, k in ((None, None), ("mtp", 1), ("mtp", 4), ("ngram", 2), (None, 0)):
                    out = cl.complete(p, max_tokens=NEW, temperature=0, ignore_eos=True,
                                      num_speculative_tokens=k, speculative_method=method)
                    assert list(out.token_ids) == exp, f"method={method}, k={k}"
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
