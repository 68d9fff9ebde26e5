"""Block manager and scheduler as state machines: no torch, no processes.
Random workloads are checked against a brute-force model of what must hold
after every step, and no lifecycle leaks a block."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from braid.engine.block_manager import BlockManager, OutOfBlocks
from braid.engine.sampling import SamplingParams
from braid.engine.config import SchedulerConfig
from braid.engine.scheduler import RequestRejected, Scheduler
from braid.engine.sequence import Sequence, SeqStatus

EOS = 1


def test_block_manager_allocates_refcounts_and_frees():
    bm = BlockManager(6, tokens_per_block=4)
    assert (bm.num_free, bm.num_used) == (6, 0)
    a = bm.allocate(4)
    assert len(set(a)) == 4 and bm.num_used == 4 and bm.blocks_for(9) == 3
    with pytest.raises(OutOfBlocks):
        bm.allocate(3)
    bm.share(a[0])
    bm.free(a)
    assert bm.num_used == 1 and bm.ref_count(a[0]) == 1  # still held by the shared reference
    bm.free([a[0]])
    assert bm.num_free == 6
    with pytest.raises(ValueError, match="freed twice"):
        bm.free([a[1]])
    with pytest.raises(ValueError, match="not allocated"):
        bm.share(a[2])
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def _check(sched: Scheduler, bm: BlockManager, live: list[Sequence]) -> None:
    """What must hold between steps, computed independently of the scheduler."""
    held = [b for s in live for b in s.block_table]
    assert len(held) == len(set(held)), "a block is owned twice"
    assert bm.num_used == len(held), "block accounting drifted"
    for s in live:
        if s.status == SeqStatus.RUNNING and s.num_cached_tokens:
            assert len(s.block_table) * bm.tokens_per_block >= s.num_cached_tokens
        if s.status == SeqStatus.WAITING:
            assert not s.block_table and s.num_cached_tokens == 0
    assert len(sched.running) <= sched.cfg.max_num_seqs


def _fake_token(rng: random.Random, eos_rate: float) -> int:
    return EOS if rng.random() < eos_rate else rng.randrange(2, 100)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(4, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 64),
    eos_rate=st.sampled_from([0.0, 0.05]),
)
def test_random_workloads_finish_without_leaks(seed, num_blocks, block_size, max_num_seqs, budget, eos_rate):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    max_len = num_blocks * block_size
    sched = Scheduler(SchedulerConfig(max_len, max_num_seqs, budget), bm, (EOS,))
    live: list[Sequence] = []
    expect_len = {}
    for i in range(rng.randint(1, 12)):
        n = rng.randint(1, max_len)
        seq = Sequence(f"r{i}", [rng.randrange(2, 100) for _ in range(n)], SamplingParams(max_tokens=rng.randint(1, 20)))
        sched.add(seq)
        live.append(seq)
        expect_len[seq.request_id] = n
    aborted = set()
    steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 20_000, "the scheduler stopped making progress"
        if rng.random() < 0.02:  # an abort arrives between steps
            victim = rng.choice(live)
            if not victim.is_finished and sched.abort(victim.request_id) is not None:
                aborted.add(victim.request_id)
            if not sched.has_unfinished():
                break
        batch = sched.schedule()
        assert batch is not None, "work left but nothing schedulable"
        for s in batch.seqs:
            assert s.status == SeqStatus.RUNNING
            assert len(s.block_table) * block_size >= len(s)  # room for every token this step stores
        sched.postprocess(batch, [_fake_token(rng, eos_rate) for _ in batch.seqs])
        _check(sched, bm, [s for s in live if not s.is_finished])
    assert bm.num_free == num_blocks, "blocks leaked"
    for s in live:
        assert s.is_finished and not s.block_table
        if s.request_id in aborted:
            assert s.finish_reason == "abort"
            continue
        out = s.output_token_ids
        assert 1 <= len(out) <= s.params.max_tokens
        if s.finish_reason == "stop":
            assert out[-1] == EOS and EOS not in out[:-1]
        else:  # length: max_tokens or max_model_len, whichever came first
            assert EOS not in out
            assert len(out) == s.params.max_tokens or len(s) >= max_len


def test_prefill_admission_respects_blocks_and_token_budget():
    bm = BlockManager(20, 4)
    sched = Scheduler(SchedulerConfig(40, max_num_seqs=8, max_num_batched_tokens=10), bm)
    seqs = [Sequence(f"r{i}", [5] * n, SamplingParams(max_tokens=4)) for i, n in enumerate((6, 3, 20, 2))]
    for s in seqs:
        sched.add(s)

    def planned(batch):
        return [(s.request_id, batch.new_tokens(i)) for i, s in enumerate(batch.seqs)]

    batch = sched.schedule()
    # 6 + 3 + the first token of the 20-token prompt fill the 10-token budget (FIFO: the 2-token one waits)
    assert batch.is_prefill and planned(batch) == [("r0", 6), ("r1", 3), ("r2", 1)]
    sched.postprocess(batch, [7, 7, 7])
    assert seqs[2].output_token_ids == [] and seqs[2].num_cached_tokens == 1  # a chunk samples nothing
    batch = sched.schedule()
    # r0 and r1 decode (not counted against the prompt budget) while r2's prompt goes on
    assert batch.is_prefill and planned(batch) == [("r0", 1), ("r1", 1), ("r2", 10)]
    sched.postprocess(batch, [8, 8, 8])
    batch = sched.schedule()
    assert planned(batch) == [("r0", 1), ("r1", 1), ("r2", 9), ("r3", 1)]
    sched.postprocess(batch, [9, 9, 9, 9])
    assert seqs[2].output_token_ids == [9] and seqs[0].output_token_ids == [7, 8, 9]
    batch = sched.schedule()
    # r3's last prompt token runs as a one-token row beside the decodes: a pure decode step
    assert not batch.is_prefill and planned(batch) == [("r0", 1), ("r1", 1), ("r2", 1), ("r3", 1)]


def test_decode_preempts_the_newest_sequence_and_recomputes_it():
    bm = BlockManager(3, 2)  # 6 tokens of KV
    sched = Scheduler(SchedulerConfig(6, 4, 100), bm)
    a = Sequence("a", [5, 5], SamplingParams(max_tokens=3))
    b = Sequence("b", [6, 6], SamplingParams(max_tokens=3))
    sched.add(a)
    sched.add(b)
    sched.postprocess(sched.schedule(), [9, 9])  # both prefilled: 2 blocks used, each needs a 2nd block soon
    batch = sched.schedule()  # decode: a takes the last block, b is preempted
    assert not batch.is_prefill and [s.request_id for s in batch.seqs] == ["a"]
    assert b.status == SeqStatus.WAITING and not b.block_table and sched.num_preemptions == 1
    assert b.token_ids == [6, 6, 9]  # its output so far is kept and recomputed later
    while sched.has_unfinished():
        sched.postprocess(batch, [8] * len(batch.seqs))
        batch = sched.schedule()
        if batch is None:
            break
    assert a.is_finished and b.is_finished and bm.num_free == 3


def test_remote_reservation_lifecycle():
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(32, 4, 100), bm, (EOS,))
    seq = Sequence("remote", list(range(2, 12)), SamplingParams(max_tokens=3))
    table = sched.reserve_remote(seq)
    assert len(table) == bm.blocks_for(11) and seq.status == SeqStatus.WAITING_FOR_KV
    assert sched.schedule() is None  # nothing to run until the KV arrives
    sched.remote_ready("remote", 42)
    assert seq.status == SeqStatus.RUNNING and seq.num_cached_tokens == 10 and seq.token_ids[-1] == 42
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == (seq,)
    # a reservation aborted before its KV arrives gives its blocks back
    other = Sequence("gone", [3] * 9, SamplingParams(max_tokens=2))
    sched.reserve_remote(other)
    used = bm.num_used
    assert sched.abort("gone") is other and bm.num_used == used - bm.blocks_for(10)
    # the first token may already end it
    eos = Sequence("eos", [3, 4], SamplingParams(max_tokens=5))
    sched.reserve_remote(eos)
    sched.remote_ready("eos", EOS)
    assert eos.is_finished and eos.finish_reason == "stop" and not eos.block_table


def test_admission_rejects_what_can_never_run():
    sched = Scheduler(SchedulerConfig(16, 4, 100), BlockManager(4, 4))
    with pytest.raises(RequestRejected, match="empty"):
        sched.add(Sequence("e", [], SamplingParams()))
    with pytest.raises(RequestRejected, match="max_model_len 16"):
        sched.add(Sequence("l", [3] * 17, SamplingParams()))
    assert sched.abort("unknown") is None
