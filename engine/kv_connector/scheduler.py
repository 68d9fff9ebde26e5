"""The scheduler half of the KV connector (KVConnectorScheduler): on rank 0,
beside the scheduler, plain Python over ids; it never touches a rank. What it
wants done on the ranks it queues, and the engine carries it in the next
step's StepPlan (`build_meta`); what the ranks report comes back with that
step's result (`on_step_done`).

A decode reservation's life (one lease, one timer: `Lease.deadline`, covering
both "claimed by a Decode stream" and "KV arrived"):
  reserve   refused past the caps (a lease over max_lease_s, more than max_reservations
            held); blocks allocated (the sequence waits, WAITING_FOR_KV), a random
            secret minted (the receivers take KV only from a sender presenting it) and the expect
            queued; the engine flushes it with a connector-only step, whose
            collective is the barrier: every rank has registered before the
            reservation is handed out, so no byte arrives unexpected
  claim     a Decode stream takes the reservation (unknown or taken twice:
            UnknownRequest); KV that arrived before waits for the claim
  arrived   every rank has its KV and rank 0 the first token: the receivers'
            records are released; once claimed, the sequence starts decoding
  end       the lease runs out before claim and arrival, the transfer fails, or
            the request is aborted: the release rides the next step to every
            rank, and only after that step returned are the blocks freed (a late
            write never lands in reused memory); then the request ends with an
            error event (none after an abort). A failure before the claim keeps
            just its reason, for the claim (which gets the error) or until the
            lease ends.
A prefill send's life:
  send      the scheduled prefill step plans it and pushes each layer's KV
  finish    the next step carries the end marker with the sampled first token
  done      every receiver acknowledged on every rank: the blocks are freed and
            a "transferred" event carries timings and bytes. Failed, or past
            its deadline: release on every rank, then free, then an error event.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from braid.engine.events import Overloaded, TokenEvent, UnknownRequest
from braid.engine.kv_connector.metadata import (
    DONE, INCOMING, OUTGOING, PENDING, KVConnectorMeta, KVExpect, KVFinish, KVSend, TransferRef,
)
from braid.engine.kv_connector.types import Reservation

WAITING, ARRIVED, SENDING, RELEASING, FAILED_UNCLAIMED = "waiting", "arrived", "sending", "releasing", "failed"
LEASE_EXPIRED = "KV transfer failed: the lease expired before the KV arrived"
NEVER_CLAIMED = "the lease expired: no Decode stream claimed the reservation"
SEND_TIMEOUT = "KV transfer failed (timeout: no acknowledgement by the deadline)"
SEND_GRACE_S = 1.0
SECRET_BYTES = 16
"""Random bytes of a reservation's secret (128 bits: not guessable within a lease)."""
"""A send's own backstop runs this long after its transport deadline."""


@dataclass
class Lease:
    """Decode side: one reservation."""

    seq: object
    transfer_id: int
    deadline: float
    """time.monotonic() when the lease ends: the one timer of the reservation."""
    claimed: bool = False
    state: str = WAITING
    first_token: int | None = None
    error: str | None = None
    notify: bool = True
    """End with an error event (False after an abort)."""


@dataclass
class Outgoing:
    """Prefill side: one sent transfer, its blocks held until acknowledged."""

    seq: object
    transfer_id: int
    deadline: float
    started: float
    forward_s: float
    kv_bytes: int
    state: str = SENDING
    error: str | None = None
    notify: bool = True


class KVConnectorScheduler:
    """Rank 0's book of every transfer of this instance, and what the ranks must do next."""

    def __init__(self, scheduler, blocks, max_lease_s: float = float("inf"), max_reservations: int | None = None):
        self.scheduler = scheduler
        self.blocks = blocks
        self.max_lease_s = max_lease_s
        self.max_reservations = max_reservations
        """Caps on what one Reserve may hold and for how long (KVTransferConfig)."""
        self.incoming: dict[int, Lease] = {}
        self.outgoing: dict[int, Outgoing] = {}
        self._by_request: dict[str, TransferRef] = {}
        self._expects: list[KVExpect] = []
        self._finishes: list[KVFinish] = []
        self._releases: dict[TransferRef, None] = {}  # an ordered set
        self.events: list[TokenEvent] = []
        """Events made outside a step's results processing, handed out by the next step."""

    # -- decode side -----------------------------------------------------------
    def reserve(self, seq, lease_s: float, now: float) -> Reservation:
        """Blocks for the prompt under a lease; the expect waits for the next step.
        A lease over `max_lease_s` is refused (ValueError), and so is a reservation
        beyond `max_reservations` held at once (Overloaded)."""
        if not 0 < lease_s <= self.max_lease_s:
            raise ValueError(f"lease_s must be in (0, {self.max_lease_s:g}] seconds, got {lease_s!r}")
        if self.max_reservations is not None and len(self.incoming) >= self.max_reservations:
            raise Overloaded(f"{len(self.incoming)} reservations are held already (at most {self.max_reservations})")
        self.scheduler.reserve_remote(seq)
        tid = secrets.randbits(62)
        while tid in self.incoming:
            tid = secrets.randbits(62)
        self.incoming[tid] = Lease(seq, tid, now + lease_s)
        self._by_request[seq.request_id] = TransferRef(INCOMING, tid)
        blocks = tuple(seq.block_table)
        secret = secrets.token_bytes(SECRET_BYTES)  # only the holder of the destination may write these blocks
        prefix = self.scheduler.prefix
        cached = seq.num_cached_tokens // prefix.block_size if prefix is not None else 0  # held here: not sent
        self._expects.append(KVExpect(tid, seq.num_prompt_tokens, blocks, secret, cached))
        return Reservation(seq.request_id, tid, blocks, seq.num_prompt_tokens, time.time() + lease_s, secret, cached)

    def claim(self, request_id: str) -> None:
        """A Decode stream takes the reservation; its events flow from now on."""
        ref = self._by_request.get(request_id)
        lease = self.incoming.get(ref.transfer_id) if ref is not None and ref.direction == INCOMING else None
        if lease is None or lease.claimed:
            raise UnknownRequest(f"no unclaimed reservation for request {request_id!r}")
        lease.claimed = True
        if lease.state == ARRIVED:
            self._start_decoding(lease)
        elif lease.state == FAILED_UNCLAIMED:
            self._forget(lease, INCOMING)
            self.events.append(TokenEvent(request_id, None, True, "error", lease.error))

    def _start_decoding(self, lease: Lease) -> None:
        self._forget(lease, INCOMING)
        seq = self.scheduler.remote_ready(lease.seq.request_id, lease.first_token)
        self.events.append(TokenEvent(seq.request_id, lease.first_token, seq.is_finished, seq.finish_reason,
                                      cached_tokens=seq.num_prefix_hit_tokens))

    def discard(self, request_id: str) -> None:
        """Forget a reservation whose expect never reached the ranks (the step failed)."""
        ref = self._by_request.get(request_id)
        if ref is None or ref.direction != INCOMING:
            return
        lease = self.incoming[ref.transfer_id]
        self._expects = [e for e in self._expects if e.transfer_id != ref.transfer_id]
        self._forget(lease, INCOMING)
        self.scheduler.abort(request_id)

    # -- prefill side ----------------------------------------------------------
    @staticmethod
    def sends_for(batch) -> tuple[KVSend, ...]:
        """The sends of a prefill batch: every sequence that has a transfer target and
        whose prompt this step finishes (earlier chunks' KV waits in the cache)."""
        sends = []
        for i, seq in enumerate(batch.seqs):
            if seq.transfer is None or not batch.completes(i):
                continue
            target, timeout_s = seq.transfer
            layout = target.layout.SerializeToString()
            sends.append(KVSend(i, target.transfer_id, int(timeout_s * 1000), layout, tuple(target.block_ids),
                                bytes(target.secret), target.cached_blocks))
        return tuple(sends)

    def sent(self, seq, first_token: int, started: float, forward_s: float, kv_bytes: int, now: float) -> None:
        """A send's step ran: hold the blocks until acknowledged; finish at the next step."""
        target, timeout_s = seq.transfer
        tid = target.transfer_id
        self.outgoing[tid] = Outgoing(seq, tid, now + timeout_s + SEND_GRACE_S, started, forward_s, kv_bytes)
        self._by_request[seq.request_id] = TransferRef(OUTGOING, tid)
        self._finishes.append(KVFinish(tid, first_token))

    # -- both sides --------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        """Start releasing the request's transfer (no event); False if it has none.
        The caller flushes the release with a step, after which the blocks are free."""
        ref = self._by_request.get(request_id)
        if ref is None:
            return False
        rec = self._record(ref)
        if rec.state == FAILED_UNCLAIMED:  # its blocks are free already
            self._forget(rec, ref.direction)
        else:
            self._end(ref, rec, None, notify=False)
        return True

    def _record(self, ref: TransferRef):
        return (self.incoming if ref.direction == INCOMING else self.outgoing).get(ref.transfer_id)

    def _forget(self, rec, direction: int) -> None:
        (self.incoming if direction == INCOMING else self.outgoing).pop(rec.transfer_id, None)
        self._by_request.pop(rec.seq.request_id, None)

    def _end(self, ref: TransferRef, rec, error: str | None, notify: bool) -> None:
        """Release on every rank (next step); blocks freed once that step returned."""
        rec.state, rec.error, rec.notify = RELEASING, error, notify
        self._releases[ref] = None
        self._finishes = [f for f in self._finishes if f.transfer_id != ref.transfer_id]

    # -- the step ----------------------------------------------------------------
    def build_meta(self, now: float, sends: tuple[KVSend, ...] = ()) -> KVConnectorMeta:
        """This step's metadata: what is queued, and the transfers whose progress to report."""
        self._expire(now)
        progress = [TransferRef(INCOMING, t) for t, lease in self.incoming.items() if lease.state == WAITING]
        progress += [TransferRef(OUTGOING, t) for t, out in self.outgoing.items() if out.state == SENDING]
        meta = KVConnectorMeta(tuple(self._expects), tuple(sends), tuple(self._finishes), tuple(self._releases),
                               tuple(progress))
        self._expects, self._finishes, self._releases = [], [], {}
        return meta

    def _expire(self, now: float) -> None:
        for tid, lease in list(self.incoming.items()):
            if now < lease.deadline or lease.state == RELEASING:
                continue
            if lease.state == FAILED_UNCLAIMED:  # never claimed: end it (its blocks are free)
                self._forget(lease, INCOMING)
                self.events.append(TokenEvent(lease.seq.request_id, None, True, "error", lease.error))
            else:
                why = LEASE_EXPIRED if lease.state == WAITING else NEVER_CLAIMED
                self._end(TransferRef(INCOMING, tid), lease, why, notify=True)
        for tid, out in self.outgoing.items():
            if out.state == SENDING and now >= out.deadline:
                self._end(TransferRef(OUTGOING, tid), out, SEND_TIMEOUT, notify=True)

    def on_step_done(self, meta: KVConnectorMeta, result, now: float) -> None:
        """Take in a step's results: finish the releases it carried, then its progress."""
        for ref in meta.releases:
            self._released(ref, now)
        for ref, state in zip(meta.progress, result.states):
            rec = self._record(ref)
            if state == PENDING or rec is None or rec.state not in (WAITING, SENDING):
                continue
            if state != DONE:
                detail = result.errors.get(ref)
                why = f"KV transfer failed ({detail})" if detail else "KV transfer failed on another rank"
                self._end(ref, rec, why, notify=True)
            elif ref.direction == INCOMING:
                self._arrived(ref, rec, result.first_tokens.get(ref.transfer_id))
            else:
                self._delivered(ref, rec, now)

    def _released(self, ref: TransferRef, now: float) -> None:
        """Every rank has released: nothing of the transfer touches the blocks any more."""
        rec = self._record(ref)
        if rec is None or rec.state != RELEASING:
            return  # the release only tidied the ranks' books
        if ref.direction == INCOMING:
            self.scheduler.abort(rec.seq.request_id)
        else:
            self.blocks.free(rec.seq.block_table)
            rec.seq.block_table = []
        if ref.direction == INCOMING and rec.notify and not rec.claimed and now < rec.deadline:
            rec.state = FAILED_UNCLAIMED  # its claim gets the error
            return
        self._forget(rec, ref.direction)
        if rec.notify:
            self.events.append(TokenEvent(rec.seq.request_id, None, True, "error", rec.error))

    def _arrived(self, ref: TransferRef, lease: Lease, first_token: int | None) -> None:
        if first_token is None:
            self._end(ref, lease, "KV transfer failed: no first token arrived", notify=True)
            return
        lease.state, lease.first_token = ARRIVED, first_token
        self._releases[ref] = None  # the receivers' records only; the blocks stay the sequence's
        if lease.claimed:
            self._start_decoding(lease)

    def _delivered(self, ref: TransferRef, out: Outgoing, now: float) -> None:
        """Every receiver acknowledged: nothing reads the blocks any more."""
        self._forget(out, OUTGOING)
        seq = out.seq
        self.blocks.free(seq.block_table)
        seq.block_table = []
        self._releases[ref] = None
        stats = {"prefill_s": out.forward_s, "transfer_s": now - out.started, "kv_bytes": out.kv_bytes}
        self.events.append(TokenEvent(seq.request_id, seq.output_token_ids[0], True, "transferred", stats=stats,
                                      logprobs=getattr(seq, "first_logprobs", None),
                                      prompt_logprobs=getattr(seq, "prompt_logprobs", None),
                                      cached_tokens=seq.num_prefix_hit_tokens))

    # -- what the driver asks ------------------------------------------------------
    def take_events(self) -> list[TokenEvent]:
        events, self.events = self.events, []
        return events

    def has_work(self) -> bool:
        return bool(self.incoming or self.outgoing or self.events or self.has_queued())

    def has_queued(self) -> bool:
        """Something for the ranks or the caller: the next step should run now."""
        return bool(self._expects or self._finishes or self._releases or self.events)

    def in_flight(self) -> bool:
        """Transfers whose progress the steps must watch."""
        return any(lease.state in (WAITING, RELEASING) for lease in self.incoming.values()) or bool(self.outgoing)

    def next_deadline(self) -> float | None:
        deadlines = [lease.deadline for lease in self.incoming.values()] + [o.deadline for o in self.outgoing.values()]
        return min(deadlines, default=None)

    def reserved_blocks(self) -> int:
        return sum(len(lease.seq.block_table) for lease in self.incoming.values())
