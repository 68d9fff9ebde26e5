"""The retry book (braid.router.retry_book) as a state machine, without gRPC or asyncio.

The brute-force test drives the book through every sequence of attempt outcomes
(up to a length) over a small cluster and compares each step with a reference
written from the rules in the orchestrator's docstring: the excluded, avoided and
full nodes are recomputed from the whole history at every step (not kept as
running state as the book does), and the expected candidates are chosen from
them. The other tests check the capacity backoff against its closed form on a
fake clock, and the edges (local prefill, deadline, prompt too long).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from braid.router.retry_book import Deadline, Failure, GiveUp, RetryBook, node_request_id


@dataclass(frozen=True)
class Node:
    node_id: str
    role: str
    max_model_len: int = 0


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


P = [Node("p0", "prefill"), Node("p1", "prefill")]
D = [Node("d0", "decode"), Node("d1", "decode")]

# Attempt outcomes: which node the failure names and how.
OUTCOMES = {
    "P": ("prefill", "Prefill", "UNAVAILABLE", True),  # P down
    "F": ("prefill", "Prefill", "RESOURCE_EXHAUSTED", True),  # P full
    "D": ("decode", "Decode", "UNKNOWN", True),  # D's stream ended before the first token
    "A": ("decode", "Decode", "ABORTED", False),  # transfer failed / lease expired: D stays eligible
    "R": ("decode", "Reserve", "RESOURCE_EXHAUSTED", True),  # D has no room: not a failure
}


def failure(kind: str, decode: Node, prefill: Node | None) -> Failure:
    side, call, code, exclude = OUTCOMES[kind]
    return Failure(prefill if side == "prefill" else decode, call, code, "injected", exclude=exclude)


def book(retries: int = 1, *, capacity_wait_s: float = 30.0, local: int = 0, budget_s: float = 600.0,
         clock: Clock | None = None) -> RetryBook:
    deadline = Deadline(budget_s, clock=clock or Clock())
    return RetryBook(prefill_retries=retries, capacity_wait_s=capacity_wait_s,
                     local_prefill_max_tokens=local, deadline=deadline)


class LowestId:
    """A deterministic policy that records the candidates it was offered."""

    def __init__(self):
        self.offered: dict[str, set[str]] = {}

    def __call__(self, role: str, entries: list) -> Node:
        self.offered[role] = {e.node_id for e in entries}
        return min(entries, key=lambda e: e.node_id)


# ------------------------------------------------------------------- reference


def give_up_status(counted: list[str]) -> str:
    """Status of a request that ran out of tries, from the kinds of its counted failures."""
    if counted and all(OUTCOMES[k][2] == "RESOURCE_EXHAUSTED" for k in counted):
        return "RESOURCE_EXHAUSTED"
    return "UNAVAILABLE"


def reference(history: list, retries: int):
    """What the next pick must give after `history` (events ("fail", d, p, kind) and
    ("wait",)): ("pair", decode ids offered, prefill ids offered) or ("none",) or
    ("give_up", status)."""
    fails = [e for e in history if e[0] == "fail"]
    counted = [k for _, _, _, k in fails if k != "R"]
    excluded_d = {d for _, d, _, k in fails if k == "D"}
    excluded_p = {p for _, _, p, k in fails if k in "PF"}
    avoided_p = {p for _, _, p, k in fails if k == "A"}
    last_wait = max([i for i, e in enumerate(history) if e[0] == "wait"], default=-1)
    full = {e[1] for e in history[last_wait + 1:] if e[0] == "fail" and e[3] == "R"}
    eligible_d = {n.node_id for n in D} - excluded_d
    if not eligible_d:
        return ("give_up", give_up_status(counted) if counted else "UNAVAILABLE")
    if not eligible_d - full:
        return ("none",)
    eligible_p = {n.node_id for n in P} - excluded_p
    if not eligible_p:
        return ("give_up", give_up_status(counted))
    return ("pair", eligible_d - full, (eligible_p - avoided_p) or eligible_p)


def drive(sequence: str, retries: int) -> None:
    """Run the book through `sequence` of outcomes, checking every step against the reference."""
    b, choose = book(retries), LowestId()
    history: list = []
    outcomes = iter(sequence)
    for _ in range(4 * len(sequence) + 2):  # bounded: every pass consumes an outcome or waits once
        want = reference(history, retries)
        try:
            pair = b.pick(D, P, 8, choose, known_decodes=len(D))
        except GiveUp as e:
            assert want == ("give_up", e.status), (sequence, history)
            return
        if pair is None:
            assert want == ("none",), (sequence, history)
            assert b.wait_for_room() > 0
            history.append(("wait",))
            continue
        assert want[0] == "pair", (sequence, history, want)
        assert choose.offered == {"decode": want[1], "prefill": want[2]}, (sequence, history)
        counted_before = sum(1 for e in history if e[0] == "fail" and e[3] != "R")
        assert pair.number == sum(1 for e in history if e[0] == "fail") + 1
        assert pair.retry == _retry_after_waits(history)
        kind = next(outcomes, None)
        if kind is None:
            return
        history.append(("fail", pair.decode.node_id, pair.prefill.node_id, kind))
        counted = counted_before + (kind != "R")
        try:
            b.record(failure(kind, pair.decode, pair.prefill))
        except GiveUp as e:
            assert counted > retries, (sequence, history)
            assert e.status == give_up_status([h[3] for h in history if h[0] == "fail" and h[3] != "R"])
            return
        assert counted <= retries, (sequence, history)
        assert len(b.failures) == counted  # a refusal for lack of room is not a failure
    raise AssertionError(f"no end for {sequence}")


def _retry_after_waits(history: list) -> bool:
    """A retry is an attempt following a counted failure, with only waits or refusals between."""
    for e in reversed(history):
        if e[0] == "wait":
            continue
        if e[3] == "R":
            return False
        return True
    return False


@pytest.mark.parametrize("retries", [0, 1, 2, 3])
def test_every_failure_sequence_matches_the_reference(retries):
    n = 0
    for length in range(1, 6):
        for seq in itertools.product(OUTCOMES, repeat=length):
            drive("".join(seq), retries)
            n += 1
    assert n == sum(5**k for k in range(1, 6))


# ------------------------------------------------------------------- retries


@pytest.mark.parametrize("retries", range(5))
def test_gives_up_on_the_failure_after_prefill_retries(retries):
    prefills = [Node(f"p{i}", "prefill") for i in range(10)]
    b, n = book(retries), 0
    while True:
        pair = b.pick(D, prefills, 8, LowestId())
        n += 1
        assert pair.number == n and pair.retry == (n > 1)
        try:
            b.record(Failure(pair.prefill, "Prefill", "UNAVAILABLE", "down"))
        except GiveUp as e:
            assert e.status == "UNAVAILABLE"
            assert f"prefill failed after {retries + 1} attempt(s)" in e.details
            break
    assert n == retries + 1
    # each attempt used a prefill node no earlier attempt had used
    assert len({f.node.node_id for f in b.failures}) == n


def test_no_room_is_not_a_prefill_failure():
    b, choose = book(retries=0), LowestId()
    for _ in range(3):  # three rounds of every D refusing, with waits between
        seen = set()
        while (pair := b.pick(D, P, 8, choose)) is not None:
            seen.add(pair.decode.node_id)
            assert pair.prefill.node_id == "p0"  # the prefill node is never blamed
            b.record(Failure(pair.decode, "Reserve", "RESOURCE_EXHAUSTED", "no free blocks"))
        assert seen == {"d0", "d1"}  # each D asked once per round
        assert b.failures == [] and b.excluded == {"prefill": set(), "decode": set()}
        b.wait_for_room()
        assert b.full == {}


def test_no_room_gives_up_with_resource_exhausted_naming_the_nodes():
    clock = Clock()
    b = book(retries=0, capacity_wait_s=0.0, clock=clock)
    while (pair := b.pick(D, P, 8, LowestId())) is not None:
        b.record(Failure(pair.decode, "Reserve", "RESOURCE_EXHAUSTED", "no free blocks"))
    with pytest.raises(GiveUp) as e:
        b.wait_for_room()
    assert e.value.status == "RESOURCE_EXHAUSTED"
    assert "decode node d0 Reserve" in e.value.details and "decode node d1 Reserve" in e.value.details


# ------------------------------------------------------------------- backoff


@pytest.mark.parametrize("budget_s,deadline_s", [(0.0, 10.0), (0.03, 10.0), (1.0, 10.0), (5.0, 10.0),
                                                 (30.0, 2.5), (30.0, 0.0), (4.0, 4.0)])
def test_capacity_backoff_doubles_and_never_passes_budget_or_deadline(budget_s, deadline_s):
    clock = Clock()
    start = clock.t
    b = book(retries=1, capacity_wait_s=budget_s, budget_s=deadline_s, clock=clock)
    end = start + min(budget_s, deadline_s)
    delays = []
    for _ in range(1000):
        try:
            delay = b.wait_for_room()
        except GiveUp as e:
            assert e.status == "UNAVAILABLE" and "no nodes left to try" in e.details
            break
        assert delay > 0
        delays.append(delay)
        clock.t += delay
        assert clock.t <= end + 1e-9
    else:
        raise AssertionError("the wait never ended")
    assert clock.t == pytest.approx(end)
    # independently: 0.05 s doubling to at most 1 s, the last one cut at the end
    want, t, k = [], 0.0, 0
    while t < end - start - 1e-12:
        d = min(0.05 * 2**k, 1.0, end - start - t)
        want.append(d)
        t += d
        k += 1
    assert delays == pytest.approx(want)


def test_wait_budget_counts_from_the_first_wait():
    clock = Clock()
    b = book(capacity_wait_s=1.0, clock=clock)
    clock.t += 5.0  # time spent before the first wait does not count
    total = 0.0
    while True:
        try:
            total += (d := b.wait_for_room())
        except GiveUp:
            break
        clock.t += d
    assert total == pytest.approx(1.0)


# ------------------------------------------------------------------- edges


def test_deadline_passed_ends_the_retries():
    clock = Clock()
    b = book(retries=5, budget_s=1.0, clock=clock)
    pair = b.pick(D, P, 8, LowestId())
    clock.t += 1.0
    with pytest.raises(GiveUp) as e:
        b.record(Failure(pair.prefill, "Prefill", "UNAVAILABLE", "down"))
    assert e.value.status == "DEADLINE_EXCEEDED" and "after 1 attempt(s)" in e.value.details


def test_local_prefill_for_short_prompts_and_without_prefill_nodes():
    b = book(local=8)
    assert b.pick(D, P, 8, LowestId()).prefill is None
    assert b.pick(D, P, 9, LowestId()).prefill.node_id == "p0"
    assert book().pick(D, [], 9, LowestId()).prefill is None  # no prefill node at all: prefill on D
    b = book(retries=3)
    pair = b.pick(D, P[:1], 9, LowestId())
    b.record(Failure(pair.prefill, "Prefill", "UNAVAILABLE", "down"))
    with pytest.raises(GiveUp):  # the prefill node failed and is gone: no silent recompute on D
        b.pick(D, [], 9, LowestId())


def test_prompt_longer_than_every_decode_node_and_no_decode_nodes():
    short = [Node("d0", "decode", 16), Node("d1", "decode", 32)]
    with pytest.raises(GiveUp) as e:
        book().pick(short, P, 33, LowestId())
    assert e.value.status == "INVALID_ARGUMENT" and "max_model_len 32" in e.value.details
    assert book().pick(short, P, 20, LowestId()).decode.node_id == "d1"
    with pytest.raises(GiveUp) as e:
        book().pick([], P, 8, LowestId(), known_decodes=2)
    assert (e.value.status, e.value.details) == ("UNAVAILABLE", "no decode nodes reachable (2 known)")


def test_node_request_ids_and_rpc_timeout():
    # minted per attempt: the client's id, the router instance, a serial that never repeats
    assert [node_request_id("r-1", "ab12", n) for n in (1, 2, 3)] == ["r-1-ab12-1", "r-1-ab12-2", "r-1-ab12-3"]
    assert node_request_id("r", "ab12", 1) != node_request_id("r", "cd34", 1)  # two routers, one client id
    clock = Clock()
    d = Deadline(5.0, clock=clock)
    assert d.rpc_timeout(10.0) == 5.0 and d.rpc_timeout(2.0) == 2.0
    clock.t += 6.0
    assert d.rpc_timeout(2.0) == 0.0 and d.expired()
