"""Routing that knows the nodes' prefix caches.

- The publishing chain (engine PrefixCache -> node mirror, braid.node.prefix_publish
  -> PrefixCacheDelta -> the router's copy, braid.router.prefix_view) against a
  brute-force replay of the cache's operations: through snapshots, a mirror too far
  behind, truncated snapshots, reports out of step and engine restarts (generation).
- PrefixAware against a brute-force model (token prefixes compared directly, no
  hashing): published matches weighed against load, guessed matches for the rest.
- With the fake nodes of test_router: both the prefill and the decode choice follow
  their own nodes' published sets, and the cached prompt tokens the nodes report
  reach the SDK's timings and the HTTP API's usage.
- End to end with real nodes (tiny model, block size 4): after a request the
  router's view of each node holds the prompt's block hashes, and a repeated
  prompt reports its cached tokens.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from types import SimpleNamespace

import aiohttp
import pytest

from braid.node.prefix_publish import EngineReading, PrefixPublisher, read_engine
from braid.proto import common_pb2
from braid.proto.prefix_hash import block_hashes, cache_seed
from braid.router.policies import DECODE, PREFILL, Candidate, NodeLoad, PrefixAware, RouteRequest
from braid.router.prefix_view import PublishedPrefixes

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- publishing chain


class _Blocks:
    """The BlockManager side the PrefixCache calls (reference counts are not under test here)."""

    def share(self, block: int) -> None:
        pass


def _engine(max_events: int):
    from collections import deque

    from braid.engine.prefix_cache import PrefixCache

    pc = PrefixCache(_Blocks(), block_size=4, num_shards=2, seed=cache_seed("m", random.random()))
    pc.events = deque(maxlen=max_events)  # a short event log, so that readers fall behind it
    return SimpleNamespace(prefix_cache=pc, scheduler=SimpleNamespace(num_chunks=0))


class Replay:
    """Brute force: the hashes present, in the order they were added, from the operations alone."""

    def __init__(self):
        self.present: list[int] = []
        self.by_block: dict[int, list[int]] = {}

    def insert(self, h: int, block: int) -> None:
        if h not in self.present:
            self.present.append(h)
            self.by_block.setdefault(block, []).append(h)

    def evict(self, block: int) -> None:
        for h in self.by_block.pop(block, []):
            self.present.remove(h)


def _mutate(rng: random.Random, core, replay: Replay, next_hash: list[int]) -> None:
    """One random cache operation on the engine and on the replay."""
    pc = core.prefix_cache
    if rng.random() < 0.6 or not pc.names:
        block = rng.randrange(40)
        if rng.random() < 0.2 and replay.present:
            h = rng.choice(replay.present)  # already held: no event
        else:
            next_hash[0] += 1
            h = next_hash[0]
        pc.insert(h, block)
        replay.insert(h, block)
    else:
        block = rng.choice(sorted(pc.names))
        pc.idle(block)
        assert pc.evict() == block  # the only idle block
        replay.evict(block)


@pytest.mark.parametrize("seed", range(6))
def test_router_copy_equals_a_replay_of_the_cache(seed):
    rng = random.Random(seed)
    max_snapshot = rng.choice([8, 10_000])
    core = _engine(max_events=rng.choice([6, 50]))
    pub = PrefixPublisher(max_events=rng.choice([5, 40]), max_snapshot=max_snapshot)
    replay, next_hash = Replay(), [0]
    view = PublishedPrefixes()
    read_state: list[int] = []  # the replay when the mirror last read the engine
    truncated = False
    generations = {pub.generation}
    for _ in range(600):
        r = rng.random()
        if r < 0.55:
            _mutate(rng, core, replay, next_hash)
        elif r < 0.75:
            pub.apply(read_engine(core, pub.seq_no))
            read_state = list(replay.present)
        elif r < 0.97:
            delta = pub.delta(**_request(view))
            if delta is None:  # a new mirror that has not read its engine yet
                assert pub.caching is None
                continue
            assert not set(delta.added) & set(delta.evicted)
            assert len(delta.added) <= max(max_snapshot, 40) and len(delta.evicted) <= 40
            assert view.apply(delta)
            if delta.snapshot:
                truncated = delta.truncated
                assert delta.truncated == (len(read_state) > max_snapshot)
                assert list(delta.added) == read_state[:max_snapshot]  # the oldest-added first
            if truncated:
                assert view.hashes <= set(read_state)
            else:
                assert view.hashes == set(read_state)
            assert (view.seed, view.block_size) == (core.prefix_cache.seed, 4)
        elif r < 0.99:  # the engine restarts: an empty cache, a new mirror
            core = _engine(max_events=rng.choice([6, 50]))
            replay = Replay()
            pub = PrefixPublisher(max_events=pub.log.maxlen, max_snapshot=max_snapshot)
            generations.add(pub.generation)
        else:  # a report out of step (as after a lost answer): the copy empties and resyncs
            bad = common_pb2.PrefixCacheDelta(generation=view.generation, since_seq_no=view.seq_no + 7,
                                              seed=view.seed, block_size=view.block_size, seq_no=view.seq_no + 9)
            assert not view.apply(bad)
            assert (view.generation, view.hashes) == (0, set())
    assert len(generations) > 1 and view.resyncs > 2


def _request(view: PublishedPrefixes) -> dict:
    f = view.request_fields()
    return dict(generation=f["cache_generation"], seq_no=f["cache_seq_no"])


def test_caching_off_publishes_nothing_and_the_router_drops_its_copy():
    pub = PrefixPublisher()
    assert pub.delta(0, 0) is None  # not read yet
    pub.apply(read_engine(SimpleNamespace(prefix_cache=None, scheduler=SimpleNamespace(num_chunks=3)), 0))
    assert pub.delta(0, 0) is None and pub.reading.num_chunks == 3
    from braid.router.nodes import NodeEntry

    entry = NodeEntry(info=common_pb2.NodeInfo(node_id="d0", role=common_pb2.ROLE_DECODE), channel=None, stub=None)
    on = PrefixPublisher()
    on.apply(EngineReading(seq_no=2, events=((1, True, 11), (2, True, 12)), seed=b"s", block_size=4))
    load = common_pb2.Load(free_kv_blocks=3)
    load.prefix_cache.CopyFrom(on.delta(**_request(entry.prefix)))
    entry.take_load(load)
    assert entry.prefix.hashes == {11, 12} and entry.candidate().prefix is entry.prefix
    assert list(entry.load.prefix_cache.added) == [] and entry.load.prefix_cache.num_hashes == 2
    entry.take_load(common_pb2.Load(free_kv_blocks=3))  # the node stopped publishing
    assert entry.candidate().prefix is None and entry.prefix.hashes == set()


# ---------------------------------------------------------------- the policy against a model


def _token_prefixes(tokens, block: int) -> list[tuple]:
    return [tuple(tokens[: (i + 1) * block]) for i in range(len(tokens) // block)]


def _published(prompts, block: int, seed: bytes) -> PublishedPrefixes:
    """A node's published set holding every full block of `prompts`."""
    p = PublishedPrefixes()
    p.generation, p.block_size, p.seed = 1, block, seed
    for t in prompts:
        p.hashes.update(block_hashes(t, block, seed))
    return p


def _model_score(c: Candidate) -> float:
    if c.role == PREFILL:
        return c.load.queued_prefill_tokens
    used = (c.load.total_kv_blocks - c.load.free_kv_blocks) / c.load.total_kv_blocks if c.load.total_kv_blocks else 0
    return used + (c.load.running_seqs + c.load.waiting_seqs) / (c.max_num_seqs or 256)


def _model_pick_set(cands, tokens, held: dict, history, guess_block: int, slack: float) -> set[str]:
    """Node ids the rule allows: `held[node]` = (token prefixes the node holds, its block
    size) for publishing nodes; `history` = (node, prompt) sent to the others."""
    def match(c):
        if c.node_id in held:
            prefixes, block = held[c.node_id]
            n = 0
            for pre in _token_prefixes(tokens, block):
                if pre not in prefixes:
                    break
                n += 1
            return n * block, True
        best = 0
        for node, sent in history:
            if node == c.node_id:
                n = 0
                while (n + 1) * guess_block <= min(len(tokens), len(sent)) and \
                        tuple(tokens[: (n + 1) * guess_block]) == tuple(sent[: (n + 1) * guess_block]):
                    n += 1
                best = max(best, n)
        return best * guess_block, False

    base = min(_model_score(c) for c in cands)
    counted = {}
    for c in cands:
        tokens_held, published = match(c)
        allowed = tokens_held if c.role == PREFILL else slack
        over = published and tokens_held and _model_score(c) - base > allowed
        counted[c.node_id] = 0 if over else tokens_held
    top = max(counted.values())
    tied = [c for c in cands if counted[c.node_id] == top]
    low = min(_model_score(c) for c in tied)
    return {c.node_id for c in tied if _model_score(c) == low}


@pytest.mark.parametrize("seed", range(6))
def test_prefix_aware_picks_what_the_model_picks(seed):
    rng = random.Random(seed)
    guess_block, slack = 4, 0.5
    policy = PrefixAware(block_size=guess_block, max_blocks_per_node=10**9, rng=random.Random(seed),
                         decode_load_slack=slack)
    bases = [[rng.randrange(50) for _ in range(rng.randint(8, 40))] for _ in range(5)]
    role = rng.choice([PREFILL, DECODE])
    nodes = [f"n{i}" for i in range(5)]
    publishing = {n: (rng.choice([2, 4, 8]), bytes([i])) for i, n in enumerate(nodes) if rng.random() < 0.6}
    sent: dict[str, list] = {n: [] for n in publishing}  # prompts whose blocks each publishing node holds
    history: list = []
    counted_hits = 0
    for _ in range(250):
        tokens = rng.choice(bases)[: rng.randint(0, 40)] + [rng.randrange(50) for _ in range(rng.randint(0, 9))]
        for n in publishing:  # the caches change between requests
            if rng.random() < 0.3:
                sent[n].append(rng.choice(bases)[: rng.randint(0, 40)])
            if sent[n] and rng.random() < 0.1:
                sent[n].pop(rng.randrange(len(sent[n])))
        cands = []
        for n in rng.sample(nodes, rng.randint(1, len(nodes))):
            if role == PREFILL:
                load = NodeLoad(queued_prefill_tokens=rng.choice([0, 4, 8, 16, 40]))
            else:
                load = NodeLoad(free_kv_blocks=rng.choice([0, 50, 100]), total_kv_blocks=100,
                                running_seqs=rng.randrange(3))
            prefix = _published(sent[n], *publishing[n]) if n in publishing else None
            cands.append(Candidate(n, role, load, max_num_seqs=4, prefix=prefix))
        held = {n: ({pre for t in sent[n] for pre in _token_prefixes(t, publishing[n][0])}, publishing[n][0])
                for n in publishing}
        allowed = _model_pick_set(cands, tokens, held, history, guess_block, slack)
        pick = policy.choose(cands, RouteRequest(tokens))
        assert pick.node_id in allowed
        counted_hits += any(c.prefix is not None and c.prefix.matched_blocks(
            block_hashes(tokens, c.prefix.block_size, c.prefix.seed)) for c in cands)
        if pick.node_id not in publishing:
            history.append((pick.node_id, tokens))
    assert counted_hits > 50  # published matches were in play, not only ties at zero


def test_prefix_aware_weighs_published_matches_against_load():
    doc = list(range(1, 17))  # four blocks of 4
    held = _published([doc], 4, b"s")
    policy = PrefixAware(block_size=4, rng=random.Random(0))
    req = RouteRequest(doc + [99])
    # prefill: 16 cached tokens are worth up to 16 more queued tokens
    assert policy.choose([Candidate("a", PREFILL, NodeLoad(queued_prefill_tokens=16), prefix=held),
                          Candidate("b", PREFILL, NodeLoad(queued_prefill_tokens=0))], req).node_id == "a"
    assert policy.choose([Candidate("a", PREFILL, NodeLoad(queued_prefill_tokens=17), prefix=held),
                          Candidate("b", PREFILL, NodeLoad(queued_prefill_tokens=0))], req).node_id == "b"
    # decode: within decode_load_slack of the least loaded (a fresh policy: "b" was sent the doc above,
    # so its guessed match would now tie)
    policy = PrefixAware(block_size=4, rng=random.Random(0))
    busy = NodeLoad(free_kv_blocks=55, total_kv_blocks=100)
    full = NodeLoad(free_kv_blocks=40, total_kv_blocks=100)
    idle = NodeLoad(free_kv_blocks=100, total_kv_blocks=100)
    assert policy.choose([Candidate("a", DECODE, busy, prefix=held), Candidate("b", DECODE, idle)], req).node_id == "a"
    assert policy.choose([Candidate("a", DECODE, full, prefix=held), Candidate("b", DECODE, idle)], req).node_id == "b"
    # the prompt is hashed with each node's own seed: hashes of another seed match nothing
    other = _published([doc], 4, b"s")
    other.seed = b"t"
    assert policy.choose([Candidate("a", PREFILL, NodeLoad(), prefix=other),
                          Candidate("b", PREFILL, NodeLoad(queued_prefill_tokens=1), prefix=held)], req).node_id == "b"
    # a longer published match beats a shorter one, in tokens whatever the block sizes
    eight = _published([doc[:8]], 8, b"s")
    two = _published([doc[:10]], 2, b"s")
    assert policy.choose([Candidate("a", PREFILL, NodeLoad(), prefix=eight),
                          Candidate("b", PREFILL, NodeLoad(), prefix=two)], req).node_id == "b"
    # each (seed, block size) the request met, the unseeded guess's included
    assert set(req._hashes) == {(b"", 4), (b"s", 4), (b"t", 4), (b"s", 8), (b"s", 2)}


def test_prompt_hashes_are_computed_once_per_seed_and_block_size(monkeypatch):
    import braid.router.policies as policies

    calls = []
    real = policies.block_hashes
    monkeypatch.setattr(policies, "block_hashes", lambda t, b, s=b"": calls.append((b, s)) or real(t, b, s))
    doc = list(range(1, 17))
    req = RouteRequest(doc)
    policy = PrefixAware(block_size=4, rng=random.Random(0))
    cands = [Candidate("a", PREFILL, prefix=_published([doc], 4, b"s")), Candidate("b", PREFILL),
             Candidate("c", PREFILL, prefix=_published([doc], 4, b"s"))]
    for _ in range(3):  # the prefill choice, the decode choice, a retry: one request
        policy.choose(cands, req)
    assert sorted(calls) == [(4, b""), (4, b"s")]


# ---------------------------------------------------------------- fake nodes


def _publisher_holding(prompts, block: int = 4, seed: bytes = b"fake") -> PrefixPublisher:
    pub = PrefixPublisher()
    hashes = [h for t in prompts for h in block_hashes(t, block, seed)]
    pub.apply(EngineReading(seq_no=len(hashes), events=tuple((i + 1, True, h) for i, h in enumerate(hashes)),
                            seed=seed, block_size=block))
    return pub


@pytest.mark.timeout(60)
def test_fake_nodes_both_choices_follow_their_own_published_sets_and_usage_reports_cached_tokens():
    from test_router import PROMPT, Cluster, eventually

    prompt = PROMPT + [1, 2, 3, 4, 6, 8, 9, 10]  # four blocks of 4

    async def main():
        c = Cluster()
        try:
            await c.start(prefill_policy="prefix_aware", decode_policy="prefix_aware")
            c.prefills["p1"].publisher = _publisher_holding([prompt], seed=b"p")
            c.decoders["d0"].publisher = _publisher_holding([prompt[:8]], block=8, seed=b"d")
            c.decoders["d1"].publisher = _publisher_holding([prompt[:4]], seed=b"d")
            c.prefills["p1"].cached_tokens = 12
            view = c.router.view
            await eventually(lambda: all(e.prefix.synced for e in view.entries() if e.node_id != "p0"),
                             timeout=5, what="the published sets reach the router")
            for _ in range(3):  # round robin would alternate; the caches keep the picks
                out = await c.client.complete(prompt, max_tokens=3, temperature=0)
                assert (out.timings.prefill_node, out.timings.decode_node) == ("p1", "d0")
                assert out.timings.cached_prompt_tokens == 12
            async with aiohttp.ClientSession() as s:
                body = {"model": "fake", "prompt": prompt, "max_tokens": 2, "temperature": 0}
                async with s.post(f"http://{c.router.http_address}/v1/completions", json=body) as r:
                    usage = json.loads(await r.read())["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 12}
            assert await c.metric("braid_router_cached_prompt_tokens_total") == 48.0
        finally:
            await c.stop()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_fake_local_prefill_reports_the_decode_nodes_hit():
    from test_router import PROMPT, Cluster

    async def main():
        c = Cluster()
        try:
            await c.start(n_prefill=0, n_decode=1)
            c.decoders["d0"].cached_tokens = 4
            out = await c.client.complete(PROMPT, max_tokens=3, temperature=0)
            assert out.timings.local_prefill and out.timings.cached_prompt_tokens == 4
            chunks = [ch async for ch in c.client.generate(PROMPT, max_tokens=3, temperature=0)]
            assert [ch.timings.cached_prompt_tokens for ch in chunks if ch.timings] == [4]
        finally:
            await c.stop()

    asyncio.run(main())


def test_openai_usage_counts_cached_tokens_once_per_prompt():
    from braid.router.openai_format import usage

    def choice(prompt_index, prompt_tokens, cached, generated):
        return SimpleNamespace(job=SimpleNamespace(prompt_index=prompt_index), prompt_tokens=prompt_tokens,
                               cached_tokens=cached, ids=[0] * generated)

    # n = 2 of prompt 0 (one choice found 8 tokens cached, the other 4), one choice of prompt 1
    got = usage([choice(0, 10, 8, 3), choice(0, 10, 4, 2), choice(1, 7, 0, 1)])
    assert got == {"prompt_tokens": 17, "completion_tokens": 6, "total_tokens": 23,
                   "prompt_tokens_details": {"cached_tokens": 4}}


# ---------------------------------------------------------------- real nodes


NAME = "kv1"
B = 4  # the harness's block size
CHUNK = 8  # the prefill node's step budget (max_num_batched_tokens): a prompt runs in chunks


def test_a_nodes_published_set_reaches_the_router(checkpoints, tmp_path_factory):
    """Real prefill and decode nodes (pcp 2 -> tp 2, dcp 2; the prefill node runs prompts
    in chunks of CHUNK tokens), an in-process router on the same etcd: after a request,
    the router's copy of each node's set holds the prompt's full blocks (hashed with the
    seed the node published), the repeated prompt reports its cached tokens (all its
    blocks but the last token's), and the nodes' metrics count the hits and chunks."""
    from cluster_harness import Cluster
    from conftest import prompt_of

    prompt = prompt_of(7 * B + 2, seed=4242)
    c = Cluster(str(tmp_path_factory.mktemp("prefix-routing")), checkpoints.get(NAME),
                {"prefill": {"scheduler": {"max_num_batched_tokens": CHUNK}}})
    try:
        c.spawn("prefill")
        c.spawn("decode")
        first, again, entries = asyncio.run(_route_twice(c, prompt))
    finally:
        c.close()
    assert list(first.token_ids) == list(again.token_ids) == checkpoints.greedy(NAME, prompt, 4)
    assert first.timings.cached_prompt_tokens == 0
    assert again.timings.cached_prompt_tokens == (len(prompt) - 1) // B * B
    for role, (block, held) in entries.items():
        assert block == B, role


async def _route_twice(c, prompt):
    from braid.client import AsyncClient
    from braid.discovery.etcd import EtcdMembership
    from braid.router.config import RouterConfig
    from braid.router.server import start_router

    membership = EtcdMembership(c.config.discovery())
    await membership.start()
    router = await start_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=-1,
                                             prefill_policy="prefix_aware", decode_policy="prefix_aware",
                                             load_poll_s=0.1, request_timeout_s=120), membership)
    client = AsyncClient(router.address, timeout=120)
    try:
        view = router.view
        await _until(lambda: len([e for e in view.entries() if e.reachable and e.prefix.synced]) == 2, 60,
                     "both nodes reachable and publishing")
        first = await client.complete(prompt, max_tokens=4, temperature=0, ignore_eos=True)

        def holds_prompt():
            return all(set(block_hashes(prompt, e.prefix.block_size, e.prefix.seed)) <= e.prefix.hashes
                       for e in view.entries())

        await _until(holds_prompt, 30, "the router's copies hold the prompt's blocks")
        entries = {e.role: (e.prefix.block_size, set(e.prefix.hashes)) for e in view.entries()}
        again = await client.complete(prompt, max_tokens=4, temperature=0, ignore_eos=True)
        d = view.entries(common_pb2.ROLE_DECODE)[0].info.metrics_address
        p = view.entries(common_pb2.ROLE_PREFILL)[0].info.metrics_address
        hit = (len(prompt) - 1) // B  # the decode node's hit on the repeated prompt

        async def counted() -> bool:
            dm, pm = await _scrape(d), await _scrape(p)
            return (dm.get("braid_node_prefix_hit_blocks_total", 0) >= hit
                    and dm.get("braid_node_prefix_cached_tokens_total", 0) >= hit * B
                    and 0 < dm.get("braid_node_prefix_hit_rate", 0) <= 1
                    and dm.get("braid_node_prefix_cached_blocks", 0) > 0
                    and pm.get("braid_node_prefill_partial_chunks_total", 0) >= -(-len(prompt) // CHUNK) - 1
                    and pm.get("braid_node_prefix_queried_blocks_total", 0) >= 1)

        end = time.monotonic() + 30
        while not await counted():
            if time.monotonic() > end:
                dm, pm = await _scrape(d), await _scrape(p)
                raise AssertionError(f"the node metrics never counted the cache hits: decode {_prefix(dm)}, "
                                     f"prefill {_prefix(pm)}")
            await asyncio.sleep(0.2)
        return first, again, entries
    finally:
        await client.close()
        await router.stop(0)
        await membership.close()


def _prefix(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "prefix" in k or "chunks" in k}


async def _scrape(address: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{address}/metrics") as r:
            text = await r.text()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def test_node_metrics_count_what_the_engine_counted():
    from braid.node.metrics import NodeMetrics

    m = NodeMetrics("decode")
    stats = [dict(queried_blocks=10, hit_blocks=4, evicted_blocks=1, copied_blocks=0),
             dict(queried_blocks=10, hit_blocks=4, evicted_blocks=1, copied_blocks=0),  # nothing new
             dict(queried_blocks=30, hit_blocks=9, evicted_blocks=5, copied_blocks=2)]
    for i, st in enumerate(stats):
        m.observe_cache(EngineReading(stats=st, block_size=16, cached_blocks=7 + i, num_chunks=3 * i))
    value = m.registry.get_sample_value
    assert value("braid_node_prefix_queried_blocks_total") == 30
    assert value("braid_node_prefix_hit_blocks_total") == 9
    assert value("braid_node_prefix_cached_tokens_total") == 9 * 16
    assert value("braid_node_prefix_evicted_blocks_total") == 5
    assert value("braid_node_prefix_copied_blocks_total") == 2
    assert value("braid_node_prefill_partial_chunks_total") == 6
    assert value("braid_node_prefix_hit_rate") == 9 / 30
    assert value("braid_node_prefix_cached_blocks") == 9


async def _until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
