"""Routing policies and admission control against brute-force reference models.

No processes, no grpc: the policies are driven as state machines with seeded
random membership changes, loads and prompts, and every choice is checked
against a reference computed independently (from the history of choices, or
by enumerating the two samples with the same seeded RNG sequence).
"""
from __future__ import annotations

import asyncio
import random
from collections import OrderedDict

import pytest

from braid.proto import common_pb2
from braid.router.admission import AdmissionControl, AdmissionStats, Overloaded
from braid.router.policies import (
    DECODE,
    DEFAULT_MAX_NUM_SEQS,
    PREFILL,
    Candidate,
    LeastLoaded,
    NodeLoad,
    NoNodes,
    PrefixAware,
    RoundRobin,
    RouteRequest,
    SessionAffinity,
    load_score,
    make_policy,
)
from braid.proto.prefix_hash import block_hashes

pytestmark = pytest.mark.timeout(120)

ALL_IDS = [f"n{i:02d}" for i in range(8)]


# ---------------------------------------------------------------- helpers


def prefill(node_id: str, queued: int) -> Candidate:
    return Candidate(node_id, PREFILL, NodeLoad(queued_prefill_tokens=queued))


def decode(node_id: str, free: int, total: int, running: int, waiting: int = 0, max_num_seqs: int = 0) -> Candidate:
    load = NodeLoad(free_kv_blocks=free, total_kv_blocks=total, running_seqs=running, waiting_seqs=waiting)
    return Candidate(node_id, DECODE, load, max_num_seqs=max_num_seqs)


def random_candidate(rng: random.Random, node_id: str) -> Candidate:
    if rng.random() < 0.5:
        return prefill(node_id, rng.randrange(0, 5) * 1000)  # coarse, so that ties happen
    total = rng.choice([0, 100])
    return decode(node_id, rng.randrange(0, total + 1), total, rng.randrange(0, 4), rng.randrange(0, 2),
                  rng.choice([0, 8]))


def reference_score(c: Candidate) -> float:
    """The load score, written out from its definition."""
    if c.role == PREFILL:
        return c.load.queued_prefill_tokens
    used = (c.load.total_kv_blocks - c.load.free_kv_blocks) / c.load.total_kv_blocks if c.load.total_kv_blocks else 0.0
    return used + (c.load.running_seqs + c.load.waiting_seqs) / (c.max_num_seqs or DEFAULT_MAX_NUM_SEQS)


def random_members(rng: random.Random, min_size: int = 1) -> list[str]:
    return rng.sample(ALL_IDS, rng.randint(min_size, len(ALL_IDS)))


REQ = RouteRequest()


# ---------------------------------------------------------------- value types and factory


def test_node_load_from_proto_and_score():
    pb = common_pb2.Load(queued_prefill_tokens=7, free_kv_blocks=25, total_kv_blocks=100,
                         running_seqs=3, waiting_seqs=1, reserved_blocks=5)
    load = NodeLoad.from_proto(pb)
    assert load == NodeLoad(7, 25, 100, 3, 1, 5)
    assert load.used_kv_fraction == 0.75
    assert NodeLoad().used_kv_fraction == 0.0
    assert load_score(Candidate("p", PREFILL, load)) == 7
    assert load_score(Candidate("d", DECODE, load, max_num_seqs=8)) == 0.75 + 4 / 8
    assert load_score(Candidate("d", DECODE, load)) == 0.75 + 4 / DEFAULT_MAX_NUM_SEQS
    with pytest.raises(ValueError, match="role"):
        Candidate("x", "both")


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "power-of-two", "prefix_aware", "session_affinity"])
def test_every_policy_raises_no_nodes_and_rejects_duplicates(name):
    policy = make_policy(name)
    with pytest.raises(NoNodes):
        policy.choose([], REQ)
    with pytest.raises(ValueError, match="twice"):
        policy.choose([prefill("a", 0), prefill("a", 1)], REQ)
    only = prefill("solo", 5)
    assert policy.choose([only], RouteRequest((1, 2, 3), "s")) is only


def test_make_policy():
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("Least-Loaded", rng=random.Random(1)), LeastLoaded)
    assert isinstance(make_policy("power_of_two"), LeastLoaded)
    p = make_policy("prefix_aware", block_size=4, max_blocks_per_node=10)
    assert isinstance(p, PrefixAware) and (p.block_size, p.max_blocks_per_node) == (4, 10)
    assert isinstance(make_policy("session_affinity"), SessionAffinity)
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'.*round_robin"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="accepts: block_size"):
        make_policy("prefix_aware", blocksize=4)
    with pytest.raises(ValueError, match="block_size"):
        make_policy("prefix_aware", block_size=0)


# ---------------------------------------------------------------- round robin


def test_round_robin_cycles_in_id_order_with_fixed_membership():
    rng = random.Random(0)
    members = rng.sample(ALL_IDS, 5)
    policy = RoundRobin()
    picks = []
    for _ in range(4 * len(members)):
        rng.shuffle(members)  # the caller's order does not matter
        picks.append(policy.choose([prefill(m, 0) for m in members], REQ).node_id)
    assert picks == sorted(members) * 4


@pytest.mark.parametrize("seed", range(5))
def test_round_robin_is_fair_as_nodes_come_and_go(seed):
    """Between two picks of a node present throughout, every other node present throughout is picked exactly once."""
    rng = random.Random(seed)
    policy = RoundRobin()
    history: list[tuple[frozenset, str]] = []  # (members at the call, pick)
    members = set(random_members(rng))
    for _ in range(400):
        if rng.random() < 0.05:  # one node joins or leaves
            node = rng.choice(ALL_IDS)
            if node not in members:
                members.add(node)
            elif len(members) > 1:
                members.remove(node)
        cands = [prefill(m, rng.randrange(100)) for m in members]
        rng.shuffle(cands)
        pick = policy.choose(cands, REQ).node_id
        assert pick in members
        history.append((frozenset(members), pick))
    check_round_robin_fairness(history)


def check_round_robin_fairness(history):
    """Brute force over all pairs of consecutive picks of the same node."""
    last_pick: dict[str, int] = {}
    checked = 0
    for t, (_, pick) in enumerate(history):
        if pick in last_pick:
            s = last_pick[pick]
            always = frozenset.intersection(*(m for m, _ in history[s : t + 1]))
            between = [p for _, p in history[s + 1 : t]]
            if pick not in always:  # it left and came back: its turn restarted
                continue
            checked += 1
            for node in always - {pick}:
                assert between.count(node) == 1, (s, t, node, between)
        last_pick[pick] = t
    assert checked > len(history) // 4  # most pairs were checked, not skipped


# ---------------------------------------------------------------- power of two choices


@pytest.mark.parametrize("seed", range(5))
def test_least_loaded_matches_brute_force_with_same_rng(seed):
    rng = random.Random(1000 + seed)
    policy = LeastLoaded(rng=random.Random(seed))
    ref_rng = random.Random(seed)
    counts: dict[str, int] = {}
    ref_counts: dict[str, int] = {}
    for _ in range(2000):
        cands = [random_candidate(rng, m) for m in random_members(rng)]
        rng.shuffle(cands)
        pick = policy.choose(cands, REQ)
        expected = reference_power_of_two(ref_rng, cands)
        assert pick == expected
        counts[pick.node_id] = counts.get(pick.node_id, 0) + 1
        ref_counts[expected.node_id] = ref_counts.get(expected.node_id, 0) + 1
    assert counts == ref_counts


def reference_power_of_two(rng: random.Random, cands: list[Candidate]) -> Candidate:
    """Two distinct samples over the id-sorted nodes; the lower score wins, the first on a tie."""
    nodes = sorted(cands, key=lambda c: c.node_id)
    if len(nodes) == 1:
        return nodes[0]
    i, j = rng.sample(range(len(nodes)), 2)
    first, second = nodes[i], nodes[j]
    best = first if reference_score(first) <= reference_score(second) else second
    assert reference_score(best) == min(reference_score(first), reference_score(second))
    return best


def test_least_loaded_never_picks_the_worst_of_its_samples():
    """With distinct scores, the most loaded node is never chosen and the least loaded wins every pair it is in."""
    cands = [prefill(m, 100 * (k + 1)) for k, m in enumerate(ALL_IDS)]
    policy = LeastLoaded(rng=random.Random(3))
    picks = [policy.choose(cands, REQ).node_id for _ in range(3000)]
    assert ALL_IDS[-1] not in picks
    # The least loaded node wins every pair containing it: 2/n of the draws in expectation;
    # exactly, the count equals the number of sampled pairs containing it.
    ref_rng = random.Random(3)
    pairs = [ref_rng.sample(range(len(cands)), 2) for _ in range(3000)]
    assert picks.count(ALL_IDS[0]) == sum(0 in pair for pair in pairs)


def test_least_loaded_custom_score():
    policy = LeastLoaded(rng=random.Random(0), score=lambda c: -c.load.queued_prefill_tokens)
    cands = [prefill("a", 1), prefill("b", 2)]
    assert {policy.choose(cands, REQ).node_id for _ in range(20)} == {"b"}


# ---------------------------------------------------------------- prefix aware


def block_prefixes(tokens: tuple[int, ...], block_size: int) -> list[tuple[int, ...]]:
    """The prompt's full-block prefixes: block i is named by all tokens up to its end."""
    return [tokens[: (i + 1) * block_size] for i in range(len(tokens) // block_size)]


def random_prompt(rng: random.Random, bases: list[tuple[int, ...]], block_size: int) -> tuple[int, ...]:
    base = rng.choice(bases)
    keep = rng.randint(0, len(base))
    tail = tuple(rng.randrange(50) for _ in range(rng.randint(0, 3 * block_size)))
    return base[:keep] + tail


class PrefixModel:
    """Brute-force reference: per node, prefixes it was sent, with LRU recency as a list."""

    def __init__(self, block_size: int, bound: int | None):
        self.block_size = block_size
        self.bound = bound
        self.recent: dict[str, list[tuple[int, ...]]] = {}  # least recent first

    def match(self, node: str, tokens: tuple[int, ...]) -> int:
        held = set(self.recent.get(node, []))
        n = 0
        for prefix in block_prefixes(tokens, self.block_size):
            if prefix not in held:
                break
            n += 1
        return n

    def send(self, node: str, tokens: tuple[int, ...]) -> None:
        lst = self.recent.setdefault(node, [])
        for prefix in reversed(block_prefixes(tokens, self.block_size)):
            if prefix in lst:
                lst.remove(prefix)
            lst.append(prefix)
        while self.bound is not None and len(lst) > self.bound:
            lst.pop(0)


def unbounded_history_match(history: list[tuple[str, tuple[int, ...]]], node: str, tokens, block_size: int) -> int:
    """Longest common full-block prefix of `tokens` with any prompt ever sent to `node`."""
    best = 0
    for sent_to, sent in history:
        if sent_to != node:
            continue
        n = 0
        while (n + 1) * block_size <= min(len(tokens), len(sent)) and \
                tokens[: (n + 1) * block_size] == sent[: (n + 1) * block_size]:
            n += 1
        best = max(best, n)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_prefix_aware_picks_longest_match_from_history(seed):
    block = 4
    rng = random.Random(seed)
    bases = [tuple(rng.randrange(50) for _ in range(rng.randint(8, 40))) for _ in range(6)]
    policy = PrefixAware(block_size=block, max_blocks_per_node=10**9, rng=random.Random(seed))
    history: list[tuple[str, tuple[int, ...]]] = []
    hits = 0
    for _ in range(300):
        cands = [random_candidate(rng, m) for m in random_members(rng)]
        tokens = random_prompt(rng, bases, block)
        pick = policy.choose(cands, RouteRequest(tokens, "sess"))
        matches = {c.node_id: unbounded_history_match(history, c.node_id, tokens, block) for c in cands}
        longest = max(matches.values())
        tied = [c for c in cands if matches[c.node_id] == longest]
        assert matches[pick.node_id] == longest
        assert reference_score(pick) == min(reference_score(c) for c in tied)
        hits += longest > 0
        history.append((pick.node_id, tokens))
    assert hits > 100  # the scenario exercises matching, not only ties at zero


@pytest.mark.parametrize("seed", range(4))
def test_prefix_aware_respects_lru_bound(seed):
    block, bound = 4, 12
    rng = random.Random(seed)
    bases = [tuple(rng.randrange(50) for _ in range(rng.randint(8, 40))) for _ in range(6)]
    policy = PrefixAware(block_size=block, max_blocks_per_node=bound, rng=random.Random(seed))
    model = PrefixModel(block, bound)
    for _ in range(300):
        cands = [random_candidate(rng, m) for m in random_members(rng)]
        tokens = random_prompt(rng, bases, block)
        hashes = block_hashes(tokens, block)
        for c in cands:
            assert policy.matched_blocks(c.node_id, hashes) == model.match(c.node_id, tokens)
        pick = policy.choose(cands, RouteRequest(tokens))
        matches = {c.node_id: model.match(c.node_id, tokens) for c in cands}
        longest = max(matches.values())
        assert matches[pick.node_id] == longest
        assert reference_score(pick) == min(reference_score(c) for c in cands if matches[c.node_id] == longest)
        model.send(pick.node_id, tokens)
        for node in ALL_IDS:
            held = policy.held_blocks(node)
            assert len(held) <= bound
            assert held == [block_hashes(p, block)[-1] for p in model.recent.get(node, [])]


def test_prefix_aware_ties_on_load_then_random():
    policy = PrefixAware(block_size=2, rng=random.Random(0))
    cands = [prefill("a", 10), prefill("b", 5), prefill("c", 5)]
    picks = {policy.choose(cands, RouteRequest((i, i, i, i))).node_id for i in range(40)}
    assert picks == {"b", "c"}  # never the loaded one; both of the tied least loaded


def test_prefix_aware_follows_prefix_over_load_and_forgets():
    policy = PrefixAware(block_size=2, rng=random.Random(0))
    doc = (1, 2, 3, 4, 5, 6)
    policy.record("busy", block_hashes(doc, 2))
    cands = [prefill("busy", 10_000), prefill("idle", 0)]
    assert policy.choose(cands, RouteRequest(doc + (9,))).node_id == "busy"
    assert policy.choose(cands, RouteRequest((7, 7, 7, 7))).node_id == "idle"
    policy.forget("busy")
    assert policy.held_blocks("busy") == []
    assert policy.choose(cands, RouteRequest(doc)).node_id == "idle"
    # a node that leaves and returns without forget() keeps its history
    assert policy.choose([prefill("other", 0)], RouteRequest(doc)).node_id == "other"
    assert policy.choose(cands, RouteRequest(doc)).node_id == "idle"


def test_block_hashes_chain():
    a = block_hashes((1, 2, 3, 4, 5), 2)
    b = block_hashes((9, 2, 3, 4), 2)
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1]  # the same second block behind a different first block
    assert block_hashes((1, 2, 3, 4, 6, 7), 2)[:2] == a
    assert block_hashes((1,), 2) == []


# ---------------------------------------------------------------- session affinity


def reference_owner(session: str, members) -> str:
    import hashlib

    def weight(node):
        return int.from_bytes(hashlib.blake2b(f"{session}\x00{node}".encode(), digest_size=8).digest(), "little")

    return max(members, key=weight)


def test_session_affinity_is_sticky_and_moves_only_lost_sessions():
    rng = random.Random(5)
    policy = SessionAffinity(rng=random.Random(0))
    sessions = [f"s{i}" for i in range(200)]
    members = list(ALL_IDS)
    before = {s: policy.choose([prefill(m, rng.randrange(9)) for m in members], RouteRequest((), s)).node_id
              for s in sessions}
    assert before == {s: reference_owner(s, members) for s in sessions}
    gone = members.pop(3)
    after = {s: policy.choose([prefill(m, 0) for m in members], RouteRequest((), s)).node_id for s in sessions}
    assert {s for s in sessions if before[s] != after[s]} == {s for s in sessions if before[s] == gone}
    assert len(set(after.values())) == len(members)  # spread over every node


def test_session_affinity_without_session_uses_fallback():
    policy = SessionAffinity(fallback=RoundRobin())
    cands = [prefill(m, 0) for m in ("a", "b", "c")]
    assert [policy.choose(cands, REQ).node_id for _ in range(4)] == ["a", "b", "c", "a"]


# ---------------------------------------------------------------- admission control


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class Requests:
    """Tasks that acquire, note the order they got in, and hold the slot until told."""

    def __init__(self, adm: AdmissionControl):
        self.adm = adm
        self.order: list[int] = []
        self.rejected: list[int] = []
        self.tasks: dict[int, asyncio.Task] = {}
        self.done: dict[int, asyncio.Event] = {}

    def start(self, i: int) -> None:
        self.done[i] = asyncio.Event()
        self.tasks[i] = asyncio.create_task(self._run(i))

    async def _run(self, i: int) -> None:
        try:
            await self.adm.acquire()
        except Overloaded:
            self.rejected.append(i)
            return
        self.order.append(i)
        try:
            await self.done[i].wait()
        finally:
            self.adm.release()

    def running(self) -> set[int]:
        return {i for i in self.order if not self.tasks[i].done()}


def test_admission_limits_and_overload():
    async def main():
        adm = AdmissionControl(max_inflight=2, max_queued=2)
        reqs = Requests(adm)
        for i in range(5):
            reqs.start(i)
            await settle()
        assert reqs.order == [0, 1] and reqs.rejected == [4]
        assert (adm.inflight, adm.queued) == (2, 2)
        assert adm.stats() == AdmissionStats(inflight=2, queued=2, max_inflight=2, max_queued=2,
                                             admitted_total=2, rejected_total=1, cancelled_total=0)
        with pytest.raises(Overloaded, match="max_queued=2"):
            await adm.acquire()
        for i in range(4):
            reqs.done[i].set()
        await settle(20)
        assert reqs.order == [0, 1, 2, 3]
        assert (adm.inflight, adm.queued) == (0, 0)
        assert adm.stats().admitted_total == 4 and adm.stats().rejected_total == 2

    asyncio.run(main())


def test_admission_no_queue_rejects_at_once():
    async def main():
        adm = AdmissionControl(max_inflight=1, max_queued=0)
        await adm.acquire()
        with pytest.raises(Overloaded):
            await adm.acquire()
        adm.release()
        await adm.acquire()
        adm.release()
        with pytest.raises(RuntimeError):
            adm.release()

    asyncio.run(main())
    with pytest.raises(ValueError):
        AdmissionControl(max_inflight=0, max_queued=1)
    with pytest.raises(ValueError):
        AdmissionControl(max_inflight=1, max_queued=-1)


def test_admission_fifo_and_no_overtaking():
    async def main():
        adm = AdmissionControl(max_inflight=1, max_queued=10)
        reqs = Requests(adm)
        for i in range(6):
            reqs.start(i)
            await settle()
        reqs.done[0].set()  # frees the slot; 1 gets it...
        reqs.start(99)  # ...even though 99 arrives in the same tick
        await settle(10)
        assert reqs.order == [0, 1]
        for i in (1, 2, 3, 4, 5):
            reqs.done[i].set()
            await settle(10)
        reqs.done[99].set()
        await settle(10)
        assert reqs.order == [0, 1, 2, 3, 4, 5, 99]
        assert (adm.inflight, adm.queued) == (0, 0)

    asyncio.run(main())


def test_admission_cancelled_waiters_leave_without_leaking():
    async def main():
        adm = AdmissionControl(max_inflight=1, max_queued=5)
        reqs = Requests(adm)
        for i in range(5):
            reqs.start(i)
            await settle()
        reqs.tasks[2].cancel()
        await settle()
        assert adm.queued == 3 and adm.stats().cancelled_total == 1
        for i in (0, 1, 3, 4):
            reqs.done[i].set()
            await settle(10)
        assert reqs.order == [0, 1, 3, 4]
        assert reqs.tasks[2].cancelled()
        assert (adm.inflight, adm.queued) == (0, 0)
        # timeouts are cancellations too
        await adm.acquire()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(adm.acquire(), 0.05)
        assert adm.queued == 0
        adm.release()
        assert adm.inflight == 0

    asyncio.run(main())


def test_admission_granted_then_cancelled_passes_slot_on():
    async def main():
        adm = AdmissionControl(max_inflight=1, max_queued=5)
        await adm.acquire()
        a = asyncio.create_task(adm.acquire())
        b = asyncio.create_task(adm.acquire())
        await settle()
        adm.release()  # hands the slot to a, whose task has not resumed yet
        a.cancel()
        await settle()
        assert a.cancelled() and b.done() and not b.cancelled()
        assert (adm.inflight, adm.queued) == (1, 0)
        assert (adm.stats().admitted_total, adm.stats().cancelled_total) == (2, 1)
        adm.release()
        assert adm.inflight == 0

    asyncio.run(main())


def test_admission_slot_context_releases_on_error():
    async def main():
        adm = AdmissionControl(max_inflight=1, max_queued=0)
        with pytest.raises(KeyError):
            async with adm.slot():
                assert adm.inflight == 1
                raise KeyError("boom")
        assert adm.inflight == 0

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(6))
def test_admission_matches_brute_force_model(seed):
    """Random arrivals, completions and cancellations against a list-based model."""

    async def main():
        rng = random.Random(seed)
        max_inflight, max_queued = rng.randint(1, 3), rng.randint(0, 4)
        adm = AdmissionControl(max_inflight, max_queued)
        reqs = Requests(adm)
        running: list[int] = []  # model
        waiting: list[int] = []
        rejected: list[int] = []
        for i in range(200):
            op = rng.random()
            if op < 0.45:
                reqs.start(i)
                if len(running) < max_inflight:
                    running.append(i)
                elif len(waiting) < max_queued:
                    waiting.append(i)
                else:
                    rejected.append(i)
            elif op < 0.8 and running:
                r = rng.choice(running)
                reqs.done[r].set()
                running.remove(r)
                if waiting:
                    running.append(waiting.pop(0))
            elif waiting:
                w = rng.choice(waiting)
                reqs.tasks[w].cancel()
                waiting.remove(w)
            await settle(10)
            assert reqs.running() == set(running)
            assert (adm.inflight, adm.queued) == (len(running), len(waiting))
            assert reqs.rejected == rejected
        for r in running + waiting:
            reqs.done[r].set()
        await settle(50)
        assert (adm.inflight, adm.queued) == (0, 0)

    asyncio.run(main())
