"""The scheduler with a prefix cache attached, as a state machine: no torch, no
processes. A fake KV store (one token id per slot of each virtual block) is
written by every step exactly as the ranks would (copies first, then each
sequence's new tokens at their slots), so that a hit that names the wrong
block, a copy from the wrong source or a write into a shared block shows up
as a sequence whose cached context does not read back as its own tokens.
Reference counts are checked against a brute-force count after every step."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from braid.engine.block_manager import BlockManager
from braid.engine.config import SchedulerConfig
from braid.engine.prefix_cache import PrefixCache
from braid.engine.sampling import SamplingParams
from braid.engine.scheduler import Scheduler
from braid.engine.sequence import Sequence, SeqStatus

EOS = 1


class FakeKV:
    """What each virtual block's slots hold: the token whose KV a rank wrote there."""

    def __init__(self, num_blocks: int, tokens_per_block: int):
        self.vb = tokens_per_block
        self.slots = [[None] * tokens_per_block for _ in range(num_blocks)]

    def run(self, batch) -> None:
        for src, dst in batch.copies:  # every rank copies before anything writes
            self.slots[dst] = list(self.slots[src])
        for i, seq in enumerate(batch.seqs):
            start = seq.num_cached_tokens
            for x in range(start, start + batch.new_tokens(i)):
                self.slots[seq.block_table[x // self.vb]][x % self.vb] = seq.token_ids[x]

    def context_ok(self, seq: Sequence) -> bool:
        """Whether the sequence's cached tokens read back as its own tokens."""
        got = [self.slots[seq.block_table[x // self.vb]][x % self.vb] for x in range(seq.num_cached_tokens)]
        return got == seq.token_ids[: seq.num_cached_tokens]


def expected_refs(bm: BlockManager, cache: PrefixCache, live: list[Sequence], pinned: list[int]) -> list[int]:
    """Brute force: one reference per appearance in a live table, one per block the
    cache names, one per copy source not yet copied."""
    refs = [0] * bm.num_blocks
    for s in live:
        for b in s.block_table:
            refs[b] += 1
    for b in set(cache.index.values()):
        refs[b] += 1
    for b in pinned:
        refs[b] += 1
    return refs


def check_refs(bm: BlockManager, cache: PrefixCache, live: list[Sequence], pinned: list[int]) -> None:
    refs = expected_refs(bm, cache, live, pinned)
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == refs
    assert bm.num_unreferenced == refs.count(0)
    named = set(cache.index.values())
    assert set(cache.names) == named, "the cache holds blocks its index does not name"
    for b, hashes in cache.names.items():
        assert hashes and all(cache.index[h] == b for h in hashes)
    # idle (evictable) = named and held by nobody else
    assert set(cache.lru) == {b for b in named if refs[b] == 1}


def check_writes_exclusive(batch, live: list[Sequence], tokens_per_block: int) -> None:
    """No step writes a block that another live sequence also holds (shared blocks are read only)."""
    owners: dict[int, int] = {}
    for s in live:
        for b in s.block_table:
            owners[b] = owners.get(b, 0) + 1
    for i, seq in enumerate(batch.seqs):
        start = seq.num_cached_tokens
        for x in range(start, start + batch.new_tokens(i)):
            b = seq.block_table[x // tokens_per_block]
            assert owners[b] == 1, f"{seq.request_id} writes token {x} into block {b}, shared by {owners[b]} sequences"


def new_prompt(rng: random.Random, stems: list[list[int]], history: list[list[int]], max_len: int) -> list[int]:
    """A prompt sharing a random prefix with a stem or an earlier prompt (or repeating one)."""
    r = rng.random()
    if history and r < 0.15:
        return list(rng.choice(history))
    base = rng.choice(stems + history) if r < 0.9 else []
    keep = rng.randint(0, len(base))
    tail = [rng.randrange(2, 100) for _ in range(rng.randint(0 if keep else 1, 12))]
    return (base[:keep] + tail)[:max_len] or [2]


def _step(sched, bm, cache, kv, live, rng, eos_rate):
    """One engine step as EngineCore runs it, checked before and after."""
    waiting_before = {s.seq_id for s in sched.waiting}
    batch = sched.schedule()
    assert batch is not None, "work left but nothing schedulable"
    pinned = [src for src, _ in batch.copies]
    assert sorted(sched._pinned) == sorted(pinned), "every copy source is pinned until step_done"
    active = [s for s in live if s.status in (SeqStatus.RUNNING, SeqStatus.WAITING_FOR_KV)]
    check_refs(bm, cache, active, pinned)  # copy sources stay pinned until step_done
    for src, dst in batch.copies:
        assert src not in [b for s in active for b in s.block_table] or cache.holds(src)
        assert bm.ref_count(dst) == 1 and not cache.holds(dst), "a copy's destination must be private"
    for i, s in enumerate(batch.seqs):
        assert s.status == SeqStatus.RUNNING
        assert len(s.block_table) * bm.tokens_per_block >= s.num_cached_tokens + batch.new_tokens(i)
        if s.seq_id in waiting_before and s.num_cached_tokens:  # admitted now with a prefix hit
            assert s.num_cached_tokens % cache.block_size == 0
            assert s.num_cached_tokens < len(s)
            if s.num_output_tokens == 0:
                assert s.num_cached_tokens < s.num_prompt_tokens
            assert s.num_prefix_hit_tokens >= s.num_cached_tokens
    prompt_tokens = sum(batch.new_tokens(i) for i, s in enumerate(batch.seqs) if len(s) - s.num_cached_tokens > 1)
    assert prompt_tokens <= sched.cfg.max_num_batched_tokens
    check_writes_exclusive(batch, active, bm.tokens_per_block)
    kv.run(batch)
    for i, s in enumerate(batch.seqs):
        assert kv.context_ok(s), f"{s.request_id}: cached context is not its own tokens"
    sched.postprocess(batch, [EOS if rng.random() < eos_rate else rng.randrange(2, 100) for _ in batch.seqs])
    active = [s for s in live if s.status in (SeqStatus.RUNNING, SeqStatus.WAITING_FOR_KV)]
    check_refs(bm, cache, active, pinned)
    sched.step_done()
    assert not sched._pinned
    check_refs(bm, cache, active, [])
    for s in active:
        assert kv.context_ok(s), f"{s.request_id}: computed tokens are not its own tokens"
    return batch


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    num_shards=st.sampled_from([1, 2, 4]),
    block_size=st.sampled_from([1, 2, 4]),
    num_blocks=st.integers(3, 24),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 40),
    eos_rate=st.sampled_from([0.0, 0.05]),
)
def test_random_prefix_workloads_keep_counts_and_kv_right(seed, num_shards, block_size, num_blocks, max_num_seqs,
                                                         budget, eos_rate):
    rng = random.Random(seed)
    vb = block_size * num_shards
    bm = BlockManager(num_blocks, vb)
    cache = PrefixCache(bm, block_size, num_shards, seed=b"s")
    max_len = num_blocks * vb
    sched = Scheduler(SchedulerConfig(max_len, max_num_seqs, budget), bm, (EOS,), cache)
    kv = FakeKV(num_blocks, vb)
    stems = [[rng.randrange(2, 100) for _ in range(rng.randint(1, 3 * vb + 3))] for _ in range(3)]
    live: list[Sequence] = []
    history: list[list[int]] = []
    total = rng.randint(2, 16)
    steps = 0
    while len(live) < total or sched.has_unfinished():
        steps += 1
        assert steps < 20_000, "the scheduler stopped making progress"
        if len(live) < total and (not sched.has_unfinished() or rng.random() < 0.3):  # arrivals mid-workload
            prompt = new_prompt(rng, stems, history, max_len)
            seq = Sequence(f"r{len(live)}", prompt, SamplingParams(max_tokens=rng.randint(1, 10)))
            sched.add(seq)
            live.append(seq)
            history.append(prompt)
        if rng.random() < 0.03:  # an abort arrives between steps
            victim = rng.choice(live)
            if not victim.is_finished:
                assert sched.abort(victim.request_id) is victim
        if not sched.has_unfinished():
            continue
        _step(sched, bm, cache, kv, live, rng, eos_rate)
    assert all(s.is_finished and not s.block_table for s in live)
    # no leak: only the cache holds blocks now, one reference each
    check_refs(bm, cache, [], [])
    assert bm.num_unreferenced + cache.num_blocks == num_blocks
    assert cache.num_idle == cache.num_blocks
    bm.free(cache.clear())
    assert bm.num_unreferenced == num_blocks and not cache.index and not cache.names


def _common_blocks(a: list[int], b: list[int], block_size: int) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // block_size


def test_hits_are_counted_in_physical_blocks_and_copy_partial_groups():
    """B=2, N=4 (virtual blocks of 8): a prompt sharing k leading blocks of 2 with a
    cached one hits exactly k blocks (capped so that its last token is computed);
    the k // N fully hit virtual blocks are shared, a partly hit one is copied."""
    B, N = 2, 4
    bm = BlockManager(64, B * N)
    cache = PrefixCache(bm, B, N, seed=b"s")
    sched = Scheduler(SchedulerConfig(512, 8, 1000), bm, (EOS,), cache)
    kv = FakeKV(64, B * N)
    rng = random.Random(3)
    base = [rng.randrange(2, 100) for _ in range(29)]
    first = Sequence("base", base, SamplingParams(max_tokens=3))
    sched.add(first)
    table = []
    while sched.has_unfinished():
        table = list(first.block_table)
        _step(sched, bm, cache, kv, [first], rng, 0.0)
    computed = first.token_ids[:-1]  # the last sampled token's KV is never computed
    cases = {
        "zero": [base[0] + 1] + base[1:10],
        "one-token": base[:1] + [200] * 8,
        "one": base[:2] + [200] * 8,
        "k=5": base[:10] + [200, 201, 202],
        "group": base[:16] + [200] * 3,
        "all-but-one": base[:26] + [200, 201],
        "whole-blocks": base[:28],
        "same": list(base),
        "longer": base + first.output_token_ids[:2] + [200] * 5,
    }
    for name, prompt in cases.items():
        seq = Sequence(name, prompt, SamplingParams(max_tokens=1))
        hits_before, copies_before = cache.stats.hit_blocks, cache.stats.copied_blocks
        sched.add(seq)
        batch = sched.schedule()
        k = min(_common_blocks(prompt, computed, B), (len(prompt) - 1) // B)
        assert seq.num_cached_tokens == seq.num_prefix_hit_tokens == k * B, name
        assert cache.stats.hit_blocks - hits_before == k, name
        assert seq.block_table[: k // N] == table[: k // N], name
        assert list(batch.copies) == ([(table[k // N], seq.block_table[k // N])] if k % N else []), name
        assert cache.stats.copied_blocks - copies_before == (1 if k % N else 0), name
        assert bm.ref_count(table[k // N]) == (2 if k % N else 1), name  # pinned until the step ran
        kv.run(batch)
        assert kv.context_ok(seq), name
        sched.postprocess(batch, [5])
        sched.step_done()
        check_refs(bm, cache, [], [])


def test_a_prompt_that_fills_the_pool_is_admitted_despite_a_partial_hit():
    """All three blocks are idle in the cache; a 12-token prompt needs all three and
    shares one block of 2 with a cached one (a partly hit virtual block of 4). Pinning
    the copy's source would leave it two: it must still be admitted (by recomputing
    that group), not wait forever for a block nothing will free."""
    B, N = 2, 2
    bm = BlockManager(3, B * N)
    cache = PrefixCache(bm, B, N, seed=b"s")
    sched = Scheduler(SchedulerConfig(12, 4, 100), bm, (EOS,), cache)
    kv = FakeKV(3, B * N)
    rng = random.Random(0)
    first = Sequence("a", list(range(10, 22)), SamplingParams(max_tokens=1))
    _run(sched, kv, [first], rng)
    assert cache.num_idle == 3 and bm.num_unreferenced == 0
    second = Sequence("b", list(range(10, 12)) + list(range(50, 60)), SamplingParams(max_tokens=1))
    _run(sched, kv, [second], rng)
    assert second.is_finished and second.num_prefix_hit_tokens == 0
    check_refs(bm, cache, [], [])


def _run(sched, kv, seqs, rng):
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 1000
        _step(sched, sched.blocks, sched.prefix, kv, list(seqs), rng, 0.0)


def test_eviction_takes_a_finished_requests_tail_first():
    """When room is needed, the least recently used idle blocks go, and a request's
    blocks go idle tail first: its prefix outlives its continuation."""
    bm = BlockManager(6, 2)
    cache = PrefixCache(bm, 2, 1, seed=b"s")
    sched = Scheduler(SchedulerConfig(12, 4, 100), bm, (EOS,), cache)
    kv = FakeKV(6, 2)
    rng = random.Random(0)
    a = Sequence("a", list(range(10, 18)), SamplingParams(max_tokens=1))  # 4 blocks, all cached
    _run(sched, kv, [a], rng)
    assert cache.num_blocks == 4 and bm.num_unreferenced == 2
    b = Sequence("b", list(range(50, 56)), SamplingParams(max_tokens=1))  # 3 blocks: evicts one of a's
    _run(sched, kv, [b], rng)
    assert cache.stats.evicted_blocks == 1
    c = Sequence("c", list(range(10, 16)) + [60, 61], SamplingParams(max_tokens=1))
    _run(sched, kv, [c], rng)
    assert c.num_prefix_hit_tokens == 6  # a's first three blocks are all still there
    check_refs(bm, cache, [], [])


def test_events_since_returns_exactly_the_later_events_or_none_once_dropped():
    """The cache's add/evict log, read from any point, against a full record kept here."""
    from collections import deque

    bm = BlockManager(64, 2)  # never full: every eviction below is an explicit one
    cache = PrefixCache(bm, 2, 1, b"s")
    bm.cache = cache
    cache.events = deque(maxlen=16)  # a short log, so that old readers fall off it
    record = []
    rng = random.Random(5)
    for _ in range(60):
        if cache.num_idle and rng.random() < 0.4:
            victim = next(iter(cache.lru))
            record += [(False, h) for h in cache.names[victim]]  # one hash per block here
            bm.free([cache.evict()])  # the cache's reference: the block is free again
        else:
            (b,) = bm.allocate(1)
            h = rng.getrandbits(60)
            cache.insert(h, b)
            record.append((True, h))
            bm.free([b])  # only the cache holds it now: idle
        assert bm.num_unreferenced + len(cache.names) == bm.num_blocks
        assert cache.seq_no == len(record)
        for since in range(cache.seq_no + 1):
            got = cache.events_since(since)
            assert (got is None) == (since < cache.seq_no - 16)
            if got is not None:
                assert got == [(i + 1, a, h) for i, (a, h) in enumerate(record) if i + 1 > since]
