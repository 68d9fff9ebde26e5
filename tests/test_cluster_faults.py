"""Membership changes and node failures in a running cluster (real processes)."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from braid.client import Client, Unavailable
from cluster_harness import Cluster
from conftest import prompt_of

NAME = "kv1"
TTL = 2.0


def _complete(client, prompt, n=8):
    return client.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True)


def _eventually(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.fixture
def cluster(checkpoints, tmp_path):
    c = Cluster(str(tmp_path), checkpoints.get(NAME))
    try:
        yield c
    finally:
        c.close()


def test_membership_join_leave_and_etcd_restart(cluster, checkpoints):
    p1 = cluster.spawn("prefill")
    d1 = cluster.spawn("decode")
    router = cluster.spawn("router")
    with Client(router.address, timeout=60) as c:
        cluster.wait_nodes(c, {"prefill": {p1.node_id}, "decode": {d1.node_id}})
        # a node started later is routed to within one lease TTL of registering
        p2 = cluster.spawn("prefill")
        t0 = time.monotonic()
        cluster.wait_nodes(c, {"prefill": {p1.node_id, p2.node_id}, "decode": {d1.node_id}}, timeout=TTL + 1)
        assert time.monotonic() - t0 <= TTL + 1
        used = set()
        for i in range(6):
            p = prompt_of(10 + i, seed=i)
            r = _complete(c, p)
            assert list(r.token_ids) == checkpoints.greedy(NAME, p, 8)
            used.add(r.timings.prefill_node)
        assert p2.node_id in used and p1.node_id in used

        # a node killed with SIGKILL stops receiving requests within one TTL
        p2.kill()
        time.sleep(TTL + 0.5)
        for i in range(4):
            p = prompt_of(20 + i, seed=50 + i)
            r = _complete(c, p)
            assert r.timings.prefill_node == p1.node_id
            assert list(r.token_ids) == checkpoints.greedy(NAME, p, 8)

        # etcd restarted: the cluster recovers without restarting any node
        cluster.etcd.stop()
        time.sleep(TTL + 0.5)
        cluster.etcd.restart()
        cluster.wait_nodes(c, {"prefill": {p1.node_id}, "decode": {d1.node_id}}, timeout=20)
        p = prompt_of(33, seed=7)

        def serves() -> bool:
            try:  # nodes refuse work until they have re-registered under a new lease
                return list(_complete(c, p).token_ids) == checkpoints.greedy(NAME, p, 8)
            except Unavailable:
                return False

        _eventually(serves, 20, "serving after etcd restart")
        assert p1.popen.poll() is None and d1.popen.poll() is None


def test_prefill_node_killed_mid_prefill_is_retried(cluster, checkpoints):
    slow = cluster.spawn("prefill", env={"BRAID_FAULT_PREFILL_DELAY_S": "30"})
    fast = cluster.spawn("prefill")
    d = cluster.spawn("decode")
    router = cluster.spawn("router")
    with Client(router.address, timeout=90) as c:
        cluster.wait_nodes(c, {"prefill": {slow.node_id, fast.node_id}, "decode": {d.node_id}})
        prompts = [prompt_of(15, seed=1), prompt_of(27, seed=2)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(_complete, c, p) for p in prompts]  # round robin: one lands on `slow`
            time.sleep(3.0)
            slow.kill()
            results = [f.result(timeout=60) for f in futures]
        for p, r in zip(prompts, results):
            assert list(r.token_ids) == checkpoints.greedy(NAME, p, 8)
            assert r.timings.prefill_node == fast.node_id
        assert sorted(r.timings.prefill_attempts for r in results) == [1, 2]


def test_decode_node_killed_mid_stream(cluster, checkpoints):
    p = cluster.spawn("prefill")
    d1 = cluster.spawn("decode")
    d2 = cluster.spawn("decode")
    router = cluster.spawn("router")
    with Client(router.address, timeout=60) as c:
        cluster.wait_nodes(c, {"prefill": {p.node_id}, "decode": {d1.node_id, d2.node_id}})
        outcome, streamed = {}, {0: 0, 1: 0}
        n_tokens = 600  # still streaming long after the kill: seconds of decode on this box

        def long_request(i):
            try:
                stream = c.generate(prompt_of(20, seed=i), max_tokens=n_tokens, temperature=0, ignore_eos=True, timeout=300)
                for chunk in stream:
                    streamed[i] += len(chunk.token_ids)
                outcome[i] = ("done", streamed[i])
            except Exception as e:  # noqa: BLE001
                outcome[i] = ("error", e, time.monotonic())

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(2)]  # one per decode node
        for t in threads:
            t.start()
        # kill once both streams are under way (not after a fixed sleep: this box may be slow)
        _eventually(lambda: min(streamed.values()) >= 5 or len(outcome) == 2, 120, "both streams started")
        assert not outcome, f"a stream ended before the kill: {outcome}"
        killed_at = time.monotonic()
        d2.kill()
        for t in threads:
            t.join(timeout=300)
        errors = [o for o in outcome.values() if o[0] == "error"]
        assert len(errors) == 1 and isinstance(errors[0][1], Unavailable), outcome
        assert errors[0][2] - killed_at < 10  # no hang
        assert [o for o in outcome.values() if o[0] == "done"][0][1] == n_tokens
        # later requests succeed on the remaining decode node
        for i in range(3):
            pr = prompt_of(9 + i, seed=30 + i)
            r = _complete(c, pr)
            assert r.timings.decode_node == d1.node_id
            assert list(r.token_ids) == checkpoints.greedy(NAME, pr, 8)
