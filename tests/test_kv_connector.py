"""The KV connector's scheduler half as a state machine, with no processes: fake
ranks apply each step's metadata and report what a script says, and every
outcome is checked against a brute-force model of what should happen.

Invariants checked after every step and call: no block a rank still has
registered for a transfer (expected and not yet released) is free in the block
manager (so a late write can never land in reused memory); at the end, no
block is held and the connector keeps no record."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from braid.engine.block_manager import BlockManager
from braid.engine.config import SchedulerConfig
from braid.engine.events import UnknownRequest
from braid.engine.kv_connector.metadata import DONE, FAILED, INCOMING, OUTGOING, PENDING, TransferRef
from braid.engine.kv_connector.scheduler import KVConnectorScheduler
from braid.engine.kv_connector.types import TransferTarget
from braid.engine.sampling import SamplingParams
from braid.engine.scheduler import ScheduledBatch, Scheduler
from braid.engine.sequence import Sequence
from braid.engine.step_plan import StepResult

NEVER = 10**9
FIRST_TOKEN = 7


class FakeRanks:
    """Every rank at once: which transfers are registered, and what the script reports."""

    def __init__(self):
        self.registered: dict[TransferRef, tuple[int, ...]] = {}  # -> the blocks it may write or read
        self.complete: set[TransferRef] = set()
        """Done on every rank: nothing of it is written or read any more, but not yet released."""
        self.script: dict[int, tuple[int, int]] = {}  # tid -> (tick KV complete, tick it fails)
        self.finished: set[int] = set()

    def run(self, meta, tick: int, seqs=()) -> StepResult:
        for e in meta.expects:
            self.registered[TransferRef(INCOMING, e.transfer_id)] = e.block_ids
        for ref in meta.releases:
            self.registered.pop(ref, None)
            self.complete.discard(ref)
        self.finished |= {f.transfer_id for f in meta.finishes}
        for s in meta.sends:
            self.registered[TransferRef(OUTGOING, s.transfer_id)] = tuple(seqs[s.seq_index].block_table)
        states, firsts, errors = [], {}, {}
        for ref in meta.progress:
            done_at, fail_at = self.script.get(ref.transfer_id, (NEVER, NEVER))
            if ref in self.complete:
                state = DONE
            elif ref not in self.registered:
                state = FAILED
            elif fail_at <= tick and fail_at < done_at:
                state = FAILED
                errors[ref] = "peer_lost: the sender went away"
            elif done_at <= tick and (ref.direction == INCOMING or ref.transfer_id in self.finished):
                state = DONE
            else:
                state = PENDING
            states.append(state)
            if state == DONE and ref in self.registered:
                del self.registered[ref]
                self.complete.add(ref)
            if state == DONE and ref.direction == INCOMING:
                firsts[ref.transfer_id] = FIRST_TOKEN
        return StepResult(None, tuple(states), firsts, errors, {s.transfer_id: 1000 for s in meta.sends})


class Engine:
    """The core's use of the connector, in miniature (reserve, claim, abort, step)."""

    def __init__(self, num_blocks=64):
        self.blocks = BlockManager(num_blocks, 4)
        self.scheduler = Scheduler(SchedulerConfig(max_model_len=1000), self.blocks)
        self.kv = KVConnectorScheduler(self.scheduler, self.blocks)
        self.ranks = FakeRanks()
        self.events = []
        self.tick = 0

    def check(self):
        free = set(self.blocks._free)
        for ref, blocks in self.ranks.registered.items():
            assert free.isdisjoint(blocks), f"blocks of {ref} freed while a rank still has it registered"

    def step(self, batch=None, sends=()):
        meta = self.kv.build_meta(self.tick, sends)
        self.events += self.kv.take_events()
        if not meta.is_empty:
            result = self.ranks.run(meta, self.tick, batch.seqs if batch else ())
            self.check()
            self.kv.on_step_done(meta, result, self.tick)
        self.events += self.kv.take_events()
        self.check()
        return meta

    def reserve(self, rid, num_tokens, lease):
        seq = Sequence(rid, list(range(1, num_tokens + 1)), SamplingParams(max_tokens=1))
        res = self.kv.reserve(seq, lease, self.tick)
        self.step()  # the flush: every rank expects before the reservation is handed out
        assert TransferRef(INCOMING, res.transfer_id) in self.ranks.registered
        return res

    def abort(self, rid) -> bool:
        if self.kv.abort(rid):
            self.step()
            return True
        return self.scheduler.abort(rid) is not None


@dataclass(frozen=True)
class Script:
    lease: int
    claim: int
    arrive: int
    fail: int
    abort: int


def expected(s: Script) -> str:
    """Brute force, from the rules: what becomes of one reservation."""
    arrive = s.arrive if s.arrive < s.fail else NEVER
    fail = s.fail if s.fail < s.arrive else NEVER
    if arrive < s.lease and s.claim < s.lease:
        outcome, when = "decoded", max(arrive, s.claim)
    elif arrive < s.lease:
        outcome, when = "expired", s.lease  # arrived but never claimed
    elif fail < s.lease:
        outcome, when = "failed", (max(fail, s.claim) if s.claim < s.lease else s.lease)
    else:
        outcome, when = "expired", s.lease
    return "aborted" if s.abort < when else outcome


def scripts(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        times = rng.sample(range(1, 12), 5)  # distinct, so the order is never ambiguous
        t = [10 * x if rng.random() < 0.8 else NEVER + i for i, x in enumerate(times)]
        yield Script(lease=10 * times[0], claim=t[1], arrive=t[2], fail=t[3], abort=t[4])


def outcome_of(events, rid, aborted: bool) -> str:
    mine = [e for e in events if e.request_id == rid]
    if aborted:
        assert mine == []
        return "aborted"
    assert len(mine) == 1 and mine[0].finished, mine
    ev = mine[0]
    if ev.finish_reason != "error":
        assert ev.token_id == FIRST_TOKEN
        return "decoded"
    assert "failed" in ev.error or "lease expired" in ev.error, ev.error
    return "expired" if "lease expired" in ev.error else "failed"


@pytest.mark.parametrize("seed", range(8))
def test_reservations_against_a_brute_force_model(seed):
    eng = Engine(num_blocks=256)
    plans = {}
    for i, s in enumerate(scripts(12, seed)):
        rid = f"r{i}"
        res = eng.reserve(rid, 5 + 3 * i, s.lease)
        eng.ranks.script[res.transfer_id] = (s.arrive, s.fail)
        plans[rid] = s
    aborted = {}
    for eng.tick in range(1, 130):
        for rid, s in plans.items():
            if s.claim == eng.tick:
                gone = s.claim >= s.lease or s.abort < s.claim  # the reservation ended before
                try:
                    eng.kv.claim(rid)
                    assert not gone, (rid, s)
                except UnknownRequest:
                    assert gone, (rid, s)
            if s.abort == eng.tick:
                aborted[rid] = eng.abort(rid)
                eng.check()
        eng.step()
    for rid, s in plans.items():
        want = expected(s)
        if rid in aborted:
            assert aborted[rid] == (want == "aborted"), (rid, s)
        assert outcome_of(eng.events, rid, want == "aborted") == want, (rid, s)
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert not eng.kv.incoming and not eng.kv.outgoing
    assert not eng.ranks.registered and not eng.ranks.complete  # every transfer released on the ranks
    assert not eng.scheduler.remote and not eng.scheduler.running


def test_lease_expiry_releases_on_every_rank_before_freeing():
    eng = Engine()
    res = eng.reserve("a", 20, lease=5)
    used = eng.blocks.num_used
    eng.tick = 5
    meta = eng.kv.build_meta(eng.tick)
    assert TransferRef(INCOMING, res.transfer_id) in meta.releases
    assert eng.blocks.num_used == used  # not before the step carrying the release returned
    eng.ranks.run(meta, eng.tick)
    eng.kv.on_step_done(meta, StepResult(None, (PENDING,) * len(meta.progress)), eng.tick)
    assert eng.blocks.num_used == 0
    ev, = eng.kv.take_events()
    assert ev.finish_reason == "error" and "lease expired" in ev.error


def test_kv_before_claim_waits_for_the_claim():
    eng = Engine()
    res = eng.reserve("a", 9, lease=100)
    eng.ranks.script[res.transfer_id] = (2, NEVER)
    for eng.tick in range(1, 6):
        eng.step()
    assert eng.events == [] and eng.scheduler.remote  # arrived, not decoding
    eng.kv.claim("a")
    eng.tick += 1
    eng.step()
    assert [(e.token_id, e.finished) for e in eng.events] == [(FIRST_TOKEN, True)]
    assert eng.blocks.num_free == eng.blocks.num_blocks
    with pytest.raises(UnknownRequest):
        eng.kv.claim("a")


def test_claim_twice_or_unknown_is_refused():
    eng = Engine()
    eng.reserve("a", 9, lease=100)
    eng.kv.claim("a")
    for rid in ("a", "nobody"):
        with pytest.raises(UnknownRequest):
            eng.kv.claim(rid)
    assert eng.abort("a")
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.ranks.registered


def _prefill_seq(eng, rid, tid, n=10):
    seq = Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=1))
    seq.transfer = (TransferTarget(tid, _Layout(), (1, 2, 3), n), 5.0)
    seq.holds_kv = True
    eng.scheduler.add(seq)
    return seq


class _Layout:
    def SerializeToString(self):
        return b"layout"


@pytest.mark.parametrize("outcome", ["delivered", "failed", "aborted", "timeout"])
def test_prefill_send_lifecycle(outcome):
    eng = Engine()
    seq = _prefill_seq(eng, "p", 42)
    batch = eng.scheduler.schedule()
    assert batch.is_prefill
    sends = eng.kv.sends_for(batch)
    meta = eng.step(batch, sends)
    eng.scheduler.postprocess(batch, [FIRST_TOKEN])
    eng.kv.sent(seq, FIRST_TOKEN, 0.0, 0.1, 1000, eng.tick)
    assert eng.blocks.num_used == len(seq.block_table) > 0  # held while in flight
    eng.ranks.script[42] = {"delivered": (2, NEVER), "failed": (NEVER, 2)}.get(outcome, (NEVER, NEVER))
    if outcome == "aborted":
        assert eng.abort("p")
    for eng.tick in range(1, 10):
        eng.step()
    assert 42 in eng.ranks.finished or outcome == "aborted"
    evs = [e for e in eng.events if e.request_id == "p"]
    if outcome == "delivered":
        assert [(e.finish_reason, e.stats["kv_bytes"]) for e in evs] == [("transferred", 1000)]
    elif outcome == "aborted":
        assert evs == []
    else:
        assert [e.finish_reason for e in evs] == ["error"] and "failed" in evs[0].error
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.kv.outgoing
    assert not eng.ranks.registered and not eng.ranks.complete
