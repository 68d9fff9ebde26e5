"""Issue 14, findings 2, 7 and 9: who is in the pool.

2. A dead engine leaves the pool: health NOT_SERVING, lease revoked, GetLoad
   UNAVAILABLE, the node process exits non-zero, the router routes elsewhere.
7. An etcd outage is no outage: nodes keep serving while etcd is paused past
   the lease TTL, and so does the router with its last view.
9. One failed load poll is no evidence: the router's node view follows a stated
   rule (checked against a brute-force statement of it), and a node's load
   report never fails on its own numbers.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from braid.discovery.base import LOST_LEASE_GONE, LOST_UNREACHABLE, DiscoveryConfig
from braid.discovery.etcd_server import EtcdServer
from braid.discovery.static import StaticMembership
from braid.proto import common_pb2, nodes_pb2_grpc
from braid.router.nodes import Liveness, NodeView
from conftest import prompt_of

MODEL = "kv2"  # two KV heads: splits over tensor parallel 2


# -- the rule, stated by brute force ------------------------------------------------------

OK, FAIL, GONE = "ok", "fail", "gone"


def reachable_by_rule(history: list[tuple[float, str]], n: int, window_s: float) -> bool:
    """Whether a node with these poll outcomes (time, outcome) may be routed to: yes
    with no history or when the latest outcome answered; otherwise look at the
    outcomes since the last answer: no if any was evidence (GONE), or there are n
    failures, or the first of them is window_s older than the latest."""
    since = []
    for t, outcome in history:
        since = [] if outcome == OK else since + [(t, outcome)]
    if not since:
        return True
    if any(o == GONE for _, o in since):
        return False
    return not (len(since) >= n or since[-1][0] - since[0][0] >= window_s)


def test_liveness_rule_against_brute_force():
    rng = random.Random(9)
    for trial in range(400):
        n, window = rng.randint(1, 5), rng.choice([0.5, 1.0, 3.0, 100.0])
        live = Liveness(n, window)
        history, t = [], 0.0
        for _ in range(rng.randint(1, 30)):
            t += rng.choice([0.05, 0.2, 0.5, 1.5])
            outcome = rng.choices([OK, FAIL, GONE], weights=[4, 5, 1])[0]
            history.append((t, outcome))
            {OK: live.answered, GONE: live.gone}.get(outcome, lambda: live.failed(t))()
            assert live.reachable == reachable_by_rule(history, n, window), (trial, n, window, history)


class ScriptedNode(nodes_pb2_grpc.DecodeNodeServicer):
    """GetLoad follows a script: "ok" answers, "fail" fails (INTERNAL, as a report that
    could not be serialized did), "unavailable" answers UNAVAILABLE (a dead engine),
    "not_serving" fails and turns health NOT_SERVING; then "ok" forever."""

    def __init__(self, script: list[str], health_servicer):
        self.script = list(script)
        self.health = health_servicer

    async def GetLoad(self, request, context):
        step = self.script.pop(0) if self.script else "ok"
        status = health_pb2.HealthCheckResponse
        await self.health.set("", status.NOT_SERVING if step == "not_serving" else status.SERVING)
        if step == "fail" or step == "not_serving":
            await context.abort(grpc.StatusCode.INTERNAL, "Value out of range: -1")
        if step == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine stopped")
        return common_pb2.Load(free_kv_blocks=10, total_kv_blocks=10)


async def _scripted_view(script: list[str], n: int) -> list[bool]:
    """Serve a ScriptedNode, follow it with a NodeView, return `reachable` after each poll."""
    server = grpc.aio.server()
    hs = health.aio.HealthServicer()
    nodes_pb2_grpc.add_DecodeNodeServicer_to_server(ScriptedNode(script, hs), server)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    info = common_pb2.NodeInfo(node_id="d0", role=common_pb2.ROLE_DECODE, address=f"127.0.0.1:{port}",
                               started_at_ms=1)
    seen: list[bool] = []

    def on_change(view):
        entry = view.get(common_pb2.ROLE_DECODE, "d0")
        if entry is not None and entry.polls > len(seen):
            seen.append(entry.reachable)

    class Forget:
        def forget(self, node_id):
            pass

    view = NodeView(StaticMembership([info]), {"prefill": Forget(), "decode": Forget()}, load_poll_s=0.01,
                    rpc_timeout_s=2.0, on_change=on_change, failures_to_drop=n, failure_window_s=1000.0)
    await view.start()
    try:
        deadline = time.monotonic() + 20
        while len(seen) < len(script) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await view.close()
        await server.stop(None)
    return seen[:len(script)]


@pytest.mark.timeout(60)
def test_node_view_drops_a_node_on_evidence_not_on_one_failed_poll():
    """The reported case (one failed report under a burst) and others, through real
    gRPC: `reachable` after each poll equals the brute-force statement."""
    scripts = [
        ["ok", "fail", "ok", "fail", "ok"],              # single failures: always routed
        ["ok", "fail", "fail", "fail", "fail", "ok"],    # three in a row: out, then back
        ["fail", "fail", "ok", "fail", "fail", "ok"],
        ["ok", "unavailable", "ok", "fail"],              # the node's own word: out at once
        ["ok", "not_serving", "fail", "ok"],              # health NOT_SERVING: out at once
    ]
    kinds = {"ok": OK, "fail": FAIL, "unavailable": GONE, "not_serving": GONE}
    for script in scripts:
        got = asyncio.run(_scripted_view(script, 3))
        want = [reachable_by_rule([(i, kinds[s]) for i, s in enumerate(script[:k + 1])], 3, 1000.0)
                for k in range(len(script))]
        assert got == want, script
        if script == scripts[0]:
            assert got == [True] * 5, "a single failed poll must not take a node out"


def test_load_report_is_clamped_into_the_wire_ranges():
    """A report with numbers the wire cannot carry (negative, too large, not a number)
    is sent clamped, never refused; a plain one is sent as is."""
    from braid.node.runtime import NodeRuntime

    class Engine:
        dead = None
        load = dict(queued_prefill_tokens=-5, free_kv_blocks=2**70, total_kv_blocks=64, running_seqs=2**40,
                    waiting_seqs=float("nan"), reserved_blocks=-1, not_a_field=3)

    rt = NodeRuntime.__new__(NodeRuntime)
    rt.engine, rt.fatal = Engine(), None
    load = rt.load()
    common_pb2.Load.FromString(load.SerializeToString())
    assert (load.queued_prefill_tokens, load.free_kv_blocks, load.total_kv_blocks, load.running_seqs,
            load.waiting_seqs, load.reserved_blocks) == (0, 2**64 - 1, 64, 2**32 - 1, 0, 0)
    Engine.load = dict(queued_prefill_tokens=7, free_kv_blocks=5, total_kv_blocks=64, running_seqs=3,
                       waiting_seqs=1, reserved_blocks=2)
    assert rt.load() == common_pb2.Load(**Engine.load)


# -- real nodes, real etcd --------------------------------------------------------------------



def discovery(srv: EtcdServer, name: str) -> DiscoveryConfig:
    return DiscoveryConfig(endpoint=srv.endpoint, cluster=f"{name}{os.getpid()}", lease_ttl_s=2, call_timeout_s=0.5,
                           backoff_initial_s=0.05, backoff_max_s=0.5, resync_interval_s=1.0)


def node_config(node_id: str, tp: int = 1):
    from braid.engine.config import CacheConfig, ParallelConfig
    from braid.node.config import NodeConfig

    return NodeConfig(host="127.0.0.1", port=0, metrics_port=-1, node_id=node_id, drain_timeout_s=1.0,
                      parallel=ParallelConfig(tensor_parallel_size=tp, threads_per_rank=1),
                      cache=CacheConfig(block_size=4, num_kv_blocks=128))


async def until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class DecodeOnlyCluster:
    """Decode nodes in this process, the real router (prompts prefilled on the decode
    node: no prefill node), an EtcdMembership and the SDK."""

    def __init__(self, model: str, disc: DiscoveryConfig):
        self.model, self.disc = model, disc
        self.nodes = {}

    async def start(self, tps: dict[str, int]):
        from braid.client import AsyncClient
        from braid.decode_node.server import start_decode_node
        from braid.discovery.etcd import EtcdMembership
        from braid.router.config import RouterConfig
        from braid.router.server import start_router

        for node_id, tp in tps.items():
            self.nodes[node_id], _ = await start_decode_node(node_config(node_id, tp), self.model, self.disc)
        self.members = EtcdMembership(self.disc)
        await self.members.start()
        rc = RouterConfig(host="127.0.0.1", port=0, metrics_port=-1, http_port=-1, decode_policy="round_robin", load_poll_s=0.1,
                          node_rpc_timeout_s=2.0, request_timeout_s=30.0)
        self.router = await start_router(rc, self.members, None)
        self.client = AsyncClient(self.router.address, timeout=30)
        assert await self.members.wait_for(lambda m: set(m.nodes("decode")) == set(tps), 5)
        return self

    async def complete(self, prompt, n=4):
        return await self.client.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True)

    async def stop(self):
        await self.client.close()
        await self.router.stop(0)
        await self.members.close()
        for rt in self.nodes.values():
            await rt.stop()


async def _health_and_load(address: str):
    async with grpc.aio.insecure_channel(address) as ch:
        status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)).status
        try:
            await nodes_pb2_grpc.DecodeNodeStub(ch).GetLoad(common_pb2.LoadRequest(), timeout=5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
    return status, code


@pytest.mark.timeout(180)
def test_dead_engine_leaves_the_pool_at_once(etcd, checkpoints):
    """SIGKILL one rank of a tensor-parallel-2 decode node: it turns NOT_SERVING,
    GetLoad answers UNAVAILABLE, its etcd key goes at once (revoked, not expired), and
    the router serves every later request on the other node."""
    model = checkpoints.get(MODEL)
    prompt = prompt_of(11, seed=2)
    ref = checkpoints.greedy(MODEL, prompt, 4)

    async def body():
        c = await DecodeOnlyCluster(model, discovery(etcd, "dead")).start({"d0": 2, "d1": 1})
        try:
            used = {(await c.complete(prompt)).timings.decode_node for _ in range(2)}
            assert used == {"d0", "d1"}
            d0 = c.nodes["d0"]
            rank = d0.engine.core.executor.procs[0]
            os.kill(rank.pid, signal.SIGKILL)
            t0 = time.monotonic()
            assert await until(d0.failed.is_set, 5), "the node did not notice its engine died"
            assert d0.fatal is not None and not d0.accepting
            assert d0.metrics.registry.get_sample_value("braid_node_engine_up") == 0
            assert await _health_and_load(d0.address) == (health_pb2.HealthCheckResponse.NOT_SERVING,
                                                          grpc.StatusCode.UNAVAILABLE)
            # revoked: gone well within the 2 s lease TTL of the death being noticed
            assert await c.members.wait_for(lambda m: "d0" not in m.nodes("decode"), 1.5)
            assert time.monotonic() - t0 < 5
            for _ in range(4):
                t = time.monotonic()
                done = await c.complete(prompt)
                assert list(done.token_ids) == ref and done.timings.decode_node == "d1"
                assert time.monotonic() - t < 5
        finally:
            await c.stop()

    asyncio.run(asyncio.wait_for(body(), 150))


@pytest.mark.timeout(180)
def test_etcd_paused_past_the_lease_ttl_is_no_outage(etcd, checkpoints):
    """etcd SIGSTOPped for longer than the lease TTL: the node's lease is presumed lost,
    yet it keeps accepting work, and the router (its membership unhealthy) keeps its
    view: requests are served throughout. After SIGCONT the node is registered again."""
    model = checkpoints.get(MODEL)
    prompt = prompt_of(9, seed=3)
    ref = checkpoints.greedy(MODEL, prompt, 4)

    async def body():
        disc = discovery(etcd, "pause")
        c = await DecodeOnlyCluster(model, disc).start({"d0": 1})
        d0 = c.nodes["d0"]
        # after the node's own listener: (registered, lost_reason, accepting) at each change
        seen = []
        d0.registration.add_listener(lambda r: seen.append((r, d0.registration.lost_reason, d0.accepting)))
        try:
            assert list((await c.complete(prompt)).token_ids) == ref
            os.kill(etcd.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                assert await d0.registration.wait_until(False, timeout=disc.lease_ttl_s + 2)
                assert await until(lambda: not c.members.healthy, 5)
                while time.monotonic() - t0 < disc.lease_ttl_s + 1.5:  # well past the TTL
                    await asyncio.sleep(0.1)
                assert d0.accepting
                for _ in range(3):
                    done = await c.complete(prompt)
                    assert list(done.token_ids) == ref and done.timings.decode_node == "d0"
            finally:
                os.kill(etcd.pid, signal.SIGCONT)
            assert await d0.registration.wait_until(True, timeout=15)
            assert await c.members.wait_for(lambda m: m.healthy and "d0" in m.nodes("decode"), 15)
            assert list((await c.complete(prompt)).token_ids) == ref
            assert seen == [(False, LOST_UNREACHABLE, True), (True, None, True)]
            # etcd itself saying the lease is gone is evidence: refuse work until re-registered
            await _revoke(etcd, d0.registration.lease_id)
            assert await until(lambda: len(seen) >= 4, 5)
            assert seen[2:4] == [(False, LOST_LEASE_GONE, False), (True, None, True)]
        finally:
            await c.stop()

    asyncio.run(asyncio.wait_for(body(), 150))


async def _revoke(srv: EtcdServer, lease: int) -> None:
    import aetcd

    host, port = srv.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
        await client.revoke_lease(lease)


@pytest.mark.timeout(240)
def test_node_process_exits_non_zero_when_its_engine_dies(checkpoints, tmp_path):
    """`braid decode serve` (as Kubernetes runs it): SIGKILL one of its rank processes;
    the node exits non-zero at once, and the router answers later requests from the
    other decode node."""
    from braid.client import Client
    from cluster_harness import Cluster

    tp2 = {"parallel": {"tensor_parallel_size": 2, "decode_context_parallel_size": 1, "threads_per_rank": 1},
           "cache": {"block_size": 4, "num_kv_blocks": 128}}
    cluster = Cluster(str(tmp_path), checkpoints.get(MODEL), {"decode": tp2})
    prompt = prompt_of(10, seed=4)
    ref = checkpoints.greedy(MODEL, prompt, 4)
    try:
        d0, d1 = cluster.spawn("decode", wait=False), cluster.spawn("decode", wait=False)
        router = cluster.spawn("router")
        for p in (d0, d1):
            cluster.wait_ready(p, time.monotonic() + 120)
        with Client(router.address, timeout=60) as c:
            cluster.wait_nodes(c, {"decode": {d0.node_id, d1.node_id}}, timeout=30)
            ranks = d0.ranks()
            assert len(ranks) == 1, ranks
            os.kill(ranks[0], signal.SIGKILL)
            code = d0.popen.wait(timeout=20)
            assert code != 0, d0.tail()
            for _ in range(3):
                done = c.complete(prompt, max_tokens=4, temperature=0, ignore_eos=True, timeout=10)
                assert list(done.token_ids) == ref and done.timings.decode_node == d1.node_id
    finally:
        cluster.close()
