"""The retry book: one request's record of failed attempts and its choice of the next try.

Where it sits in a request's life (see braid.router.orchestrator): after admission,
the orchestrator asks the book for a (decode, prefill) pair, runs an attempt on it
(braid.router.attempt), and reports a failed attempt back here. The book decides:

- which nodes the next pick skips: a node whose call failed is excluded for the rest
  of the request; when D's stream ended ABORTED (a failed transfer or an expired
  lease) D stays eligible and the attempt's P is only avoided (preferred against);
- whether to try again: at most 1 + prefill_retries failed attempts, and never past
  the request's deadline;
- what a decode node refusing a reservation for lack of KV blocks means: not a
  failure (nothing was created on D, P did nothing). That D is skipped until the
  next capacity wait; when every D the prompt fits has refused, the request waits
  with backoff (50 ms doubling to 1 s) for at most capacity_wait_s, within its
  deadline, then gives up with RESOURCE_EXHAUSTED.

Plain Python: no gRPC, no I/O, no sleeping. Nodes are any objects with `node_id`,
`role` ("prefill" or "decode") and `max_model_len` (0 = no limit); status codes are
gRPC status names ("UNAVAILABLE"); the caller sleeps the delays it is given and maps
`GiveUp` to the request's final status.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from braid.router.policies import DECODE, PREFILL

CAPACITY_BACKOFF_INITIAL_S = 0.05
CAPACITY_BACKOFF_MAX_S = 1.0
PHASES = {"Reserve": "decode reservation", "Prefill": "prefill", "Decode": "decode stream"}
"""The phase each node call stands for in the messages a client reads."""


class Deadline:
    """A request's deadline on a monotonic clock (`clock` is injectable for tests)."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.at = clock() + budget_s

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.at

    def rpc_timeout(self, cap_s: float) -> float:
        """Timeout for one node call: the time remaining, at most `cap_s`."""
        return min(self.remaining(), cap_s)


@dataclass(frozen=True)
class Failure:
    """One failed attempt (or one decode node's refusal), for the retry decision and
    the final message."""

    node: object
    """The node at fault (a router NodeEntry, or anything with node_id and role)."""
    call: str
    code: str
    """gRPC status name."""
    details: str
    exclude: bool = True
    """Exclude the node from later attempts (else only prefer another prefill node)."""

    @property
    def no_room(self) -> bool:
        """D refused a reservation for lack of KV blocks: nothing was created there,
        and it says nothing about the prefill node or D's health."""
        return self.call == "Reserve" and self.code == "RESOURCE_EXHAUSTED"

    @property
    def phase(self) -> str:
        """The phase of the request that failed, as the client reads it."""
        return PHASES.get(self.call, self.call)

    def __str__(self) -> str:
        return f"{self.phase}: {self.node.role} node {self.node.node_id} {self.call}: {self.code}: {self.details}"


class GiveUp(Exception):
    """The request ends with gRPC status `status` (a name) and `details`."""

    def __init__(self, status: str, details: str):
        super().__init__(f"{status}: {details}")
        self.status = status
        self.details = details


@dataclass(frozen=True)
class Pair:
    """The nodes of one attempt; prefill None means local prefill on the decode node."""

    number: int
    """1 for the first attempt."""
    decode: object
    prefill: object | None
    retry: bool
    """This attempt follows a failed one (not only refusals for lack of room)."""


def node_request_id(request_id: str, router_id: str, serial: int) -> str:
    """The id an attempt uses on its nodes, minted by the router for each attempt:
    `<client id>-<router instance>-<serial>`, with `serial` counting every attempt the
    router made. Unique across routers (each instance has a random id) and across time
    (the serial never repeats), so neither another router serving the same client id
    nor anything left over from an earlier attempt (a late KV push, a late abort) can
    touch this one. The client's own id stays what the client sees and logs."""
    return f"{request_id}-{router_id}-{serial}"


Chooser = Callable[[str, list], object]
"""choose(role, candidates) -> one of candidates (the routing policy)."""


class RetryBook:
    """Failures, exclusions, capacity waiting and the choice of pairs for one request."""

    def __init__(self, *, prefill_retries: int, capacity_wait_s: float, local_prefill_max_tokens: int,
                 deadline: Deadline):
        self.prefill_retries = prefill_retries
        self.capacity_wait_s = capacity_wait_s
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.deadline = deadline
        self.failures: list[Failure] = []
        """Failed attempts: at most 1 + prefill_retries."""
        self.full: dict[str, Failure] = {}
        """Decode nodes that had no room for the KV, since the last capacity wait."""
        self.excluded: dict[str, set[str]] = {PREFILL: set(), DECODE: set()}
        self.avoided: set[str] = set()
        """Prefill nodes of attempts whose transfer failed: preferred against, not excluded."""
        self.attempts = 0
        self.current: Pair | None = None
        self._retrying = False
        self._wait_until: float | None = None
        self._delay = CAPACITY_BACKOFF_INITIAL_S

    # -- choosing ------------------------------------------------------------------

    def pick(self, decodes: Sequence, prefills: Sequence, prompt_len: int, choose: Chooser,
             known_decodes: int = 0) -> Pair | None:
        """The next attempt's pair among the reachable `decodes` and `prefills`, or None
        when every decode node the prompt fits has no room (call wait_for_room).
        GiveUp when no pair is left. `known_decodes`: decode nodes known, reachable or not."""
        decode = self._pick_decode(decodes, prompt_len, choose, known_decodes)
        if decode is None:
            return None
        prefill = None
        if prompt_len > self.local_prefill_max_tokens:
            prefill = self._pick_prefill(prefills, choose)
        self.attempts += 1
        self.current = Pair(self.attempts, decode, prefill, self._retrying)
        self._retrying = False
        return self.current

    def _pick_decode(self, decodes: Sequence, prompt_len: int, choose: Chooser, known: int):
        decodes = [e for e in decodes if e.node_id not in self.excluded[DECODE]]
        if not decodes:
            if self.failures:
                raise self._exhausted(self.failures)
            raise GiveUp("UNAVAILABLE", "no decode nodes" + (f" reachable ({known} known)" if known else ""))
        fits = [e for e in decodes if e.max_model_len == 0 or prompt_len <= e.max_model_len]
        if not fits:
            limit = max(e.max_model_len for e in decodes)
            raise GiveUp("INVALID_ARGUMENT", f"prompt has {prompt_len} tokens, more than max_model_len {limit}")
        fits = [e for e in fits if e.node_id not in self.full]
        return choose(DECODE, fits) if fits else None

    def _pick_prefill(self, prefills: Sequence, choose: Chooser):
        if not prefills:
            if self.excluded[PREFILL]:  # P nodes failed this request: fail rather than recompute on D
                raise self._exhausted(self.failures)
            return None  # no prefill node at all: prefill on D
        prefills = [e for e in prefills if e.node_id not in self.excluded[PREFILL]]
        if not prefills:
            raise self._exhausted(self.failures)
        preferred = [e for e in prefills if e.node_id not in self.avoided] or prefills
        return choose(PREFILL, preferred)

    # -- recording -----------------------------------------------------------------

    def record(self, failure: Failure) -> None:
        """Book the current attempt's failure; GiveUp when no further attempt may run."""
        if failure.no_room:
            self.full[failure.node.node_id] = failure
        else:
            self.failures.append(failure)
            if failure.exclude:
                self.excluded[failure.node.role].add(failure.node.node_id)
            elif self.current is not None and self.current.prefill is not None:
                self.avoided.add(self.current.prefill.node_id)
            if len(self.failures) > self.prefill_retries:
                raise self._exhausted(self.failures)
            self._retrying = True
        if self.deadline.expired():
            raise GiveUp("DEADLINE_EXCEEDED", f"deadline passed after {self.attempts} attempt(s); last: {failure}")

    def wait_for_room(self) -> float:
        """Every decode node the prompt fits said it has no room: the seconds to sleep
        before asking them all again (each is eligible again), or GiveUp once the
        capacity budget (counted from the first wait) or the deadline is spent."""
        now = self.deadline.clock()
        if self._wait_until is None:
            self._wait_until = min(now + self.capacity_wait_s, self.deadline.at)
        if now >= self._wait_until:
            raise self._exhausted(self.failures + list(self.full.values()))
        delay = min(self._delay, self._wait_until - now)
        self._delay = min(2 * self._delay, CAPACITY_BACKOFF_MAX_S)
        self.full.clear()
        return delay

    @staticmethod
    def _exhausted(failures: list[Failure]) -> GiveUp:
        what = "; ".join(str(f) for f in failures) or "no nodes left to try"
        if failures and all(f.code == "RESOURCE_EXHAUSTED" for f in failures):
            return GiveUp("RESOURCE_EXHAUSTED", f"every node tried is full: {what}")
        # Name the phases that failed (a decode refusal is not a prefill failure).
        phases = " and ".join(dict.fromkeys(f.phase for f in failures)) or "routing"
        return GiveUp("UNAVAILABLE", f"{phases} failed after {len(failures)} attempt(s): {what}")
