"""The whole system: etcd, router, a PCP prefill node and a DCP decode node as
separate processes on loopback, driven through the client SDK."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest

from braid.client import Client, InvalidArgument, ResourceExhausted, Unavailable
from cluster_harness import Cluster, start_pair
from conftest import VOCAB, prompt_of

NAME = "kv1"  # one KV head: decode tp 2 can shard it with dcp 2


def _all_free(client) -> bool:
    for n in client.list_nodes(timeout=5):
        load = n.load
        if load.free_kv_blocks != load.total_kv_blocks or load.reserved_blocks or load.running_seqs or load.waiting_seqs:
            return False
    return True


def _eventually(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.fixture(scope="module")
def cluster(checkpoints, tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("cluster")), checkpoints.get(NAME))
    try:
        yield start_pair(c)
    finally:
        c.close()


def test_sixteen_concurrent_requests_equal_transformers(cluster, checkpoints):
    prompts = [prompt_of(n, seed=900 + n) for n in (1, 2, 5, 8, 13, 17, 21, 30, 33, 40, 47, 55, 64, 70, 81, 96)]
    with Client(cluster.router.address, timeout=120) as c:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda p: c.complete(p, max_tokens=16, temperature=0, ignore_eos=True), prompts))
        for p, r in zip(prompts, results):
            assert list(r.token_ids) == checkpoints.greedy(NAME, p, 16), f"prompt length {len(p)}"
            assert r.finish_reason == "length"
            assert r.timings.decode_node == cluster.decode.node_id
            assert r.timings.local_prefill or r.timings.prefill_node == cluster.prefill.node_id
        # every reserved block is free again, on every node
        _eventually(lambda: _all_free(c), 5, "all KV blocks free")


def test_text_prompt_streams_text(cluster, checkpoints):
    from braid.tokenizer import Tokenizer

    tok = Tokenizer(checkpoints.get(NAME))
    text = "The quick brown fox"
    with Client(cluster.router.address, timeout=60) as c:
        chunks = list(c.generate(text, max_tokens=12, temperature=0, ignore_eos=True))
    ids = [t for ch in chunks for t in ch.token_ids]
    assert ids == checkpoints.greedy(NAME, tok.encode(text), 12)
    assert "".join(ch.text for ch in chunks) == tok.decode(ids)
    assert chunks[0].prompt_tokens == len(tok.encode(text)) and chunks[-1].finished


@pytest.mark.parametrize(
    "prompt,kwargs,reason",
    [
        ([], {}, "empty"),
        (list(range(2, 2100)), {}, "max_model_len"),
        ([5, 6], {"max_tokens": 0}, "max_tokens"),
        ([5, 6], {"temperature": -0.5}, "temperature"),
        ([5, 6], {"top_p": 0.0}, "top_p"),
        ([5, 6], {"top_p": 1.5}, "top_p"),
        ([5, VOCAB + 3], {}, "vocabulary"),
    ],
)
def test_bad_input_is_invalid_argument_and_nodes_keep_serving(cluster, checkpoints, prompt, kwargs, reason):
    from braid.client.sampling import build_sampling
    from braid.proto import router_pb2, router_pb2_grpc, common_pb2

    # sent raw, so that client-side checks cannot stop it before the router sees it
    sampling = dict(max_tokens=4, temperature=0.0, top_p=1.0)
    sampling.update(kwargs)
    req = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt), sampling=common_pb2.SamplingParams(**sampling))
    with grpc.insecure_channel(cluster.router.address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in e.value.details()
    with Client(cluster.router.address, timeout=60) as c:  # still serving
        p = prompt_of(9, seed=1)
        assert list(c.complete(p, max_tokens=4, temperature=0, ignore_eos=True).token_ids) == checkpoints.greedy(NAME, p, 4)


def test_oversized_message_is_refused(cluster):
    from braid.proto import router_pb2, router_pb2_grpc, common_pb2

    huge = router_pb2.GenerateRequest(text="x" * (20 * 1024 * 1024), sampling=common_pb2.SamplingParams(max_tokens=1))
    opts = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(cluster.router.address, options=opts) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(router_pb2_grpc.RouterStub(ch).Generate(huge, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the 16 MiB limit" in e.value.details()


def test_client_cancel_frees_both_sides_within_a_second(cluster):
    with Client(cluster.router.address, timeout=120) as c:
        stream = c.generate(prompt_of(30, seed=2), max_tokens=1500, temperature=0, ignore_eos=True)
        got = 0
        for chunk in stream:
            got += len(chunk.token_ids)
            if got >= 5:
                break
        stream.close()
        t0 = time.monotonic()
        _eventually(lambda: _all_free(c), 1.5, "KV blocks freed after cancel")
        assert time.monotonic() - t0 < 1.5


def test_deepseek_v2_through_the_cluster(checkpoints, tmp_path):
    """MLA + MoE served by prefill pcp 2 -> decode tp 2 dcp 2: only latent blocks move."""
    from test_kv_transfer import model_path

    name = "ds-moe"
    c = Cluster(str(tmp_path), model_path(checkpoints, name))
    try:
        p = c.spawn("prefill")
        d = c.spawn("decode")
        router = c.spawn("router")
        with Client(router.address, timeout=120) as cl:
            c.wait_nodes(cl, {"prefill": {p.node_id}, "decode": {d.node_id}})
            prompts = [prompt_of(n, seed=70 + n) for n in (1, 6, 19, 44)]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda pr: cl.complete(pr, max_tokens=12, temperature=0, ignore_eos=True), prompts))
            for pr, r in zip(prompts, results):
                assert list(r.token_ids) == checkpoints.greedy(name, pr, 12), f"prompt length {len(pr)}"
                assert r.timings.kv_bytes > 0
            _eventually(lambda: _all_free(cl), 5, "all KV blocks free")
    finally:
        c.close()


def test_requests_wait_for_decode_kv_room(checkpoints, tmp_path):
    """A decode node whose KV pool holds one of these requests at a time (16 blocks of
    4 tokens x dcp 2 = 128 tokens; each request needs 13 blocks for its 100-token
    prompt and 14 by its end): three sent at once are served one after another, the
    router holding each until the node has room, every output still exact."""
    c = Cluster(str(tmp_path), checkpoints.get(NAME))
    try:
        p = c.spawn("prefill")
        d = c.spawn("decode", sets=["decode.cache.num_kv_blocks=16"])
        router = c.spawn("router")
        with Client(router.address, timeout=120) as cl:
            c.wait_nodes(cl, {"prefill": {p.node_id}, "decode": {d.node_id}})
            prompts = [prompt_of(100, seed=500 + i) for i in range(3)]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                results = list(pool.map(lambda pr: cl.complete(pr, max_tokens=8, temperature=0, ignore_eos=True), prompts))
            for pr, r in zip(prompts, results):
                assert list(r.token_ids) == checkpoints.greedy(NAME, pr, 8)
            _eventually(lambda: _all_free(cl), 5, "all KV blocks free")
    finally:
        c.close()
