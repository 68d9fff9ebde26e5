"""Transport-neutral bookkeeping of KV transfers: the receiver's and the sender's state
machines, shared by the tcp, collective and mooncake transports (base.py states the
interface and the guarantees they keep). A transport owns the wire (frames, sockets or
process groups, its threads) and tells a ledger what arrived; the ledger decides what
becomes of each transfer. It does no I/O of its own, save asking a connection to shut
itself down (RxConn.shut, TxConn.shut).

Receiver: RxLedger, one state machine per transfer id

    expect ──> live ──(every expected byte covered, and the trailer if wanted)──> complete
                 ├──(its deadline passes: the ledger's timer thread)───────────> failed "timeout"
                 ├──(a bad frame, the sender's ABORT, its connection lost)─────> failed
                 └──(cancel)──────────────────────────────────────────────────> cancelled
    complete ──(cancel)──> complete (released here, still answered as complete)

  Expected ranges and coverage. expect() merges the (offset, length) ranges into sorted,
  disjoint spans (Expected). A connection thread hands every data frame's header to
  admit() before any byte of it lands: the frame is taken only while the transfer is
  live, in order (its seq counts the frames of the transfer on that connection since
  its last FINISH; a gap means frames came before expect and were drained: "refused"),
  and only if every piece lies inside the spans ("corrupt" otherwise); a frame not taken
  goes to the transport's scratch, never into the region. Each write into the region is
  bracketed by begin_write(), which succeeds only while the transfer is live, and
  end_write(spans it landed); the spans go into the transfer's coverage, which counts
  every byte once however often it is written (Coverage keeps merged intervals as it
  goes; LazyCoverage appends and merges only once the count reaches the total, for a
  transport that lands many spans per write).

  Completion. A live transfer is complete once its coverage reaches the expected total
  and, if it wants one, a trailer arrived. A FINISH (on_finish) says how many data frames
  its sender sent on that connection: fewer taken means some came before expect, and the
  transfer fails "refused"; otherwise its trailer is kept and the transport acknowledges
  it (on_finish returned None).

  Cancel and quiesce. cancel() takes the transfer out of the live set at once, so no
  write of it can begin, then waits until every write already begun has ended; one still
  landing after `cancel_grace` has its connection shut (RxConn.shut), which makes it end
  at once. Every failure does the same before it is reported. So once cancel() returns,
  or poll() reports a failure, no byte of that transfer lands in the region any more and
  its blocks can be reused. Cancelling a complete transfer keeps it complete, so a FINISH
  still on its way from another sender is acknowledged.

  Late frames. The last REMEMBER ended transfers are remembered with how they ended, to
  answer frames that come afterwards (a transport that answers data frames, like
  mooncake's grants, gives refusal() as the answer):
    complete   FINISH acknowledged (its trailer kept if there was none yet); data
               drained, refused "data after the transfer completed"
    cancelled  FINISH answered "aborted"; data drained, its sender told once (below)
    failed     FINISH answered with the failure; data drained, its sender told once
    unknown    (never expected, or forgotten) FINISH refused "unknown transfer"; data
               drained, refused "unknown transfer (data before expect?)"
  While data of a cancelled or failed transfer keeps coming over a connection,
  tell_ended() gives the error to send its sender, once per connection, so that it drops
  the rest before its FINISH. expect() of an ended id starts it afresh.

  Deadlines and failure reporting. The timer thread fails a transfer still live at its
  deadline with "timeout". A lost connection (drop_conn) fails the transfers with data
  frames open on it (taken, no FINISH yet) with the transport's kind (peer_lost,
  corrupt, ...); a sender's ABORT (on_abort) fails the transfer with the sender's kind.
  poll() returns, once each, the transfers that ended since the last poll: None
  complete, else the TransferError; a cancelled transfer is not reported.

Sender: TxLedger, one Tx per transfer id, one connection (TxConn) per endpoint

  send(tid, ep, pieces) queues ("data", tid, pieces, deadline) on the connection to `ep`
  (made on first use by the transport's `new_conn`, which starts its writer thread) and
  marks `ep` unfinished; finish(tid, ep, trailer) queues ("finish", tid, trailer,
  deadline) and moves `ep` from unfinished to pending. The writer takes items with
  next_item(), which drops the items of failed transfers and fails a transfer whose data
  is still queued past its deadline ("timeout") instead of sending it. The receiver's
  answer to a FINISH comes back through acked(): None takes `ep` off pending, an error
  fails the transfer. A transfer is done once nothing is unfinished or pending.

  Failure. fail_tx() ends a transfer at its first error: its queued items are dropped on
  every connection, and ("abort", tid, (kind, detail), None) is queued on each
  connection that carried it (but the one whose receiver reported the error), so those
  receivers fail it too. kill() closes a connection for good (a write failed, the peer
  went away): the transfers it carries fail with its kind; the next send to that
  endpoint reconnects. abort() fails a transfer "aborted"; close() fails every transfer
  "aborted" (telling no receiver) and, with `ask_writers`, queues ("close", -1, None,
  None) for each writer to end its connection cleanly.

  Reporting. wait(tid, timeout) blocks until the transfer is done or failed, for at most
  `timeout` and never past its deadline (then it fails "timeout"); poll() returns
  without blocking the transfers done (None) or failed since the last poll, and fails
  those past their deadline with "timeout". Either one consumes the transfer; a failed
  one stays remembered (the last REMEMBER), so later sends of it are dropped and a
  later wait raises its error.

Transfer ids are checked against the id space of the transport's wire format (TidSpace).
"""
from __future__ import annotations

import bisect
import collections
import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

from .base import KVReceiver, KVSender, Piece, TransferError

log = logging.getLogger(__name__)

REMEMBER = 8192  # ended transfers kept to answer late frames

# An error kind on the wire: 1 + its index in TransferError.KINDS (every transport).
KIND_CODE = {k: i + 1 for i, k in enumerate(TransferError.KINDS)}
CODE_KIND = {v: k for k, v in KIND_CODE.items()}


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host.strip("[]"), int(port)


class TidSpace(NamedTuple):
    """The transfer ids a wire format can carry: 0 <= id < limit."""

    limit: int
    name: str

    def check(self, tid: int) -> None:
        if not 0 <= tid < self.limit:
            raise ValueError(f"transfer id must fit in {self.name}, got {tid}")


INT64_IDS = TidSpace(1 << 63, "int64")
U64_IDS = TidSpace(1 << 64, "u64")


class ConnFail(Exception):
    """A connection failed; its transfers fail with `kind`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


# ---------------------------------------------------------------------------------------
# receiver


def merged(spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The (start, end) spans as sorted, disjoint, non-touching (starts, ends)."""
    starts: list[int] = []
    ends: list[int] = []
    for s, e in sorted(spans):
        if ends and s <= ends[-1]:
            ends[-1] = max(ends[-1], e)
        else:
            starts.append(s)
            ends.append(e)
    return starts, ends


class Coverage:
    """Disjoint, sorted, non-touching byte intervals already written, merged as each
    span lands; counts each byte once."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.size = 0

    def add(self, s: int, e: int) -> None:
        starts, ends = self.starts, self.ends
        i = bisect.bisect_left(ends, s)  # first interval ending at or after s
        j = bisect.bisect_right(starts, e)  # past the last starting at or before e
        if i == j:
            starts.insert(i, s)
            ends.insert(i, e)
            self.size += e - s
            return
        overlap = sum(max(0, min(e, ends[k]) - max(s, starts[k])) for k in range(i, j))
        self.size += (e - s) - overlap
        starts[i:j] = [min(s, starts[i])]
        ends[i:j] = [max(e, ends[j - 1])]

    def extend(self, spans: Sequence[tuple[int, int]]) -> None:
        for s, e in spans:
            self.add(s, e)

    def covers(self, total: int) -> bool:
        """Whether `total` distinct bytes are written (never more: spans lie inside the ranges)."""
        return self.size == total


class LazyCoverage:
    """Coverage for writes that land many spans at once: spans are appended as they
    land (O(1) each), and only once the running count reaches the expected total are
    they sorted and merged, which discounts bytes written twice."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.count = 0  # >= bytes covered (overlaps counted twice until settle)

    def extend(self, spans: Sequence[tuple[int, int]]) -> None:
        self.spans.extend(spans)
        self.count += sum([e - s for s, e in spans])

    def settle(self) -> int:
        starts, ends = merged(self.spans)
        self.spans = list(zip(starts, ends))
        self.count = sum(ends) - sum(starts)
        return self.count

    def covers(self, total: int) -> bool:
        return self.count >= total and self.settle() == total


@dataclass
class Expected:
    """Receiver-side state of one live transfer."""

    starts: list[int]  # merged expected ranges, sorted
    ends: list[int]
    total: int
    deadline: float
    want_trailer: bool
    covered: Coverage | LazyCoverage = field(default_factory=Coverage)
    trailer: bytes | None = None

    def contains(self, off: int, length: int) -> bool:
        k = bisect.bisect_right(self.starts, off) - 1
        return k >= 0 and off + length <= self.ends[k]

    def complete(self) -> bool:
        if self.trailer is None and self.want_trailer:
            return False
        return self.covered.covers(self.total)


class RxConn:
    """What the ledger needs of a receiver connection: the transfers with data frames
    open on it, and a way to shut it down from another thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.open: dict[int, int] = {}  # tid -> data frames admitted since its FINISH (ledger lock)
        self.told: set[int] = set()  # ended transfers whose sender was told so (ledger lock)

    def shut(self) -> None:
        raise NotImplementedError


_CANCELLED = object()  # `ended` marker: cancelled by the receiver
_UNKNOWN = object()


class RxLedger:
    """Receiver-side bookkeeping of a transport: live transfers and their coverage,
    results, trailers, deadlines (own timer thread), and the writes landing right now,
    so that cancel and every failure return only once nothing of a transfer can land.

    A connection thread calls admit() on a data frame's header, then brackets every
    write into the region with begin_write()/end_write(); on FINISH it calls
    on_finish() and on losing the connection drop_conn().

    `tids`: the ids the transport's frames carry; `coverage`: how a transfer counts the
    bytes written (Coverage or LazyCoverage); `timer_name`: the timer thread's name."""

    def __init__(
        self,
        nbytes: int,
        cancel_grace: float,
        timer_name: str,
        *,
        tids: TidSpace = INT64_IDS,
        coverage: Callable[[], Coverage | LazyCoverage] = Coverage,
    ) -> None:
        self.nbytes = nbytes
        self.cancel_grace = cancel_grace
        self._tids = tids
        self._coverage = coverage
        self.lock = threading.Lock()
        self._writes = threading.Condition(self.lock)  # a write ended
        self._timer_cv = threading.Condition(self.lock)  # a new deadline, or close
        self._live: dict[int, Expected] = {}
        self._ended: collections.OrderedDict[int, object] = collections.OrderedDict()  # None | TransferError | _CANCELLED
        self._results: dict[int, TransferError | None] = {}
        self._trailers: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._deadlines: list[tuple[float, int]] = []  # heap
        self._writing: dict[int, collections.Counter] = {}  # tid -> {conn: writes landing now}
        self.closed = False
        self._timer = threading.Thread(target=self._timer_loop, name=timer_name, daemon=True)
        self._timer.start()

    # ---- the KVReceiver half ---------------------------------------------------

    def expect(self, tid: int, ranges: Sequence[tuple[int, int]], deadline: float, want_trailer: bool) -> None:
        self._tids.check(tid)
        spans = []
        for off, length in ranges:
            if off < 0 or length < 0 or off + length > self.nbytes:
                raise ValueError(f"range ({off}, {length}) is outside the region of {self.nbytes} bytes")
            if length:
                spans.append((off, off + length))
        starts, ends = merged(spans)
        rx = Expected(starts, ends, sum(ends) - sum(starts), deadline, want_trailer, self._coverage())
        with self.lock:
            if self.closed:
                raise RuntimeError("receiver is closed")
            if tid in self._live:
                raise ValueError(f"transfer {tid} is already expected")
            self._ended.pop(tid, None)
            self._results.pop(tid, None)
            self._trailers.pop(tid, None)
            self._live[tid] = rx
            if rx.complete():
                self._complete(tid, rx)
                return
            heapq.heappush(self._deadlines, (deadline, tid))
            self._timer_cv.notify()

    def poll(self) -> dict[int, TransferError | None]:
        with self.lock:
            out, self._results = self._results, {}
        return out

    def trailer(self, tid: int) -> bytes | None:
        with self.lock:
            rx = self._live.get(tid)
            return rx.trailer if rx is not None else self._trailers.get(tid)

    def cancel(self, tid: int) -> None:
        with self.lock:
            live = self._live.pop(tid, None)
            # releasing a completed transfer keeps it complete, so an end marker still
            # on its way from another sender is acknowledged, not refused
            if live is not None or self._ended.get(tid, _UNKNOWN) is not None:
                self._remember(tid, _CANCELLED)
            self._results.pop(tid, None)
            self._trailers.pop(tid, None)
        self._quiesce(tid)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._live.clear()
            self._timer_cv.notify_all()
        self._timer.join(timeout=2.0)

    # ---- the connection threads' half -----------------------------------------------

    def admit(self, conn: RxConn, tid: int, seq: int, offs: list[int], lens: list[int], plen: int) -> Expected | None:
        """Check a data frame before any byte of it lands. None: land it in scratch
        (the transfer is unknown or over, or this frame just failed it)."""
        err = None
        with self.lock:
            rx = self._live.get(tid)
            if rx is None:
                return None
            if sum(lens) != plen:
                err = TransferError(tid, "corrupt", f"frame payload {plen} != sum of piece lengths")
            elif seq != conn.open.get(tid, 0):
                err = TransferError(tid, "refused", f"data frames {conn.open.get(tid, 0)}..{seq - 1} arrived before expect")
            elif not all(n >= 0 and rx.contains(o, n) for o, n in zip(offs, lens)):
                err = TransferError(tid, "corrupt", "a piece lies outside the expected ranges")
            else:
                conn.open[tid] = seq + 1
                return rx
        self.fail(tid, err)
        return None

    def begin_write(self, conn: RxConn, tid: int, rx: Expected) -> bool:
        """True (and counted) if `tid` is still live, so a write into the region may start."""
        with self.lock:
            if self._live.get(tid) is not rx:
                return False
            self._writing.setdefault(tid, collections.Counter())[conn] += 1
            return True

    def end_write(self, conn: RxConn, tid: int, rx: Expected, spans: Sequence[tuple[int, int]]) -> None:
        """A write begun with begin_write() ended; `spans` are the (start, end) byte
        intervals it landed (empty if it failed)."""
        with self.lock:
            writers = self._writing[tid]
            writers[conn] -= 1
            if writers[conn] <= 0:
                del writers[conn]
                if not writers:
                    del self._writing[tid]
            self._writes.notify_all()
            if self._live.get(tid) is rx:
                rx.covered.extend(spans)
                if rx.complete():
                    self._complete(tid, rx)

    def on_finish(self, conn: RxConn, tid: int, seq: int, trailer: bytes | None) -> TransferError | None:
        """A FINISH after `seq` data frames: None to acknowledge, else the refusal."""
        err = None
        with self.lock:
            written = conn.open.pop(tid, 0)
            rx = self._live.get(tid)
            if rx is not None:
                if written != seq:
                    err = TransferError(tid, "refused", f"{seq - written} data frames arrived before expect")
                else:
                    if trailer is not None:
                        rx.trailer = trailer
                    if rx.complete():
                        self._complete(tid, rx)
            else:
                status = self._ended.get(tid, _UNKNOWN)
                if status is None:  # complete already; keep a late trailer
                    if trailer is not None:
                        self._trailers.setdefault(tid, trailer)
                elif status is _CANCELLED:
                    err = TransferError(tid, "aborted", "cancelled by the receiver")
                elif isinstance(status, TransferError):
                    err = status
                else:
                    err = TransferError(tid, "refused", "unknown transfer")
        if err is not None and rx is not None:
            self.fail(tid, err)
        return err

    def tell_ended(self, conn: RxConn, tid: int) -> TransferError | None:
        """Data keeps coming over `conn` for a transfer that failed or was cancelled
        here: the error to tell that sender, once, so it drops the rest and frees its
        blocks before `finish` (None: nothing to tell)."""
        with self.lock:
            status = self._ended.get(tid)
            if tid in conn.told or not (status is _CANCELLED or isinstance(status, TransferError)):
                return None
            conn.open.pop(tid, None)  # it will not send that FINISH
            if len(conn.told) >= REMEMBER:
                conn.told.clear()
            conn.told.add(tid)
        return status if isinstance(status, TransferError) else TransferError(tid, "aborted", "cancelled by the receiver")

    def refusal(self, tid: int) -> TransferError:
        """Why data of `tid` is not being taken (after admit() returned None)."""
        with self.lock:
            status = self._ended.get(tid, _UNKNOWN)
        if status is _CANCELLED:
            return TransferError(tid, "aborted", "cancelled by the receiver")
        if isinstance(status, TransferError):
            return status
        if status is None:
            return TransferError(tid, "refused", "data after the transfer completed")
        return TransferError(tid, "refused", "unknown transfer (data before expect?)")

    def on_abort(self, conn: RxConn, tid: int, kind: str, detail: str) -> None:
        with self.lock:
            conn.open.pop(tid, None)
        self.fail(tid, TransferError(tid, kind, f"sender: {detail}"))

    def drop_conn(self, conn: RxConn, kind: str, detail: str) -> None:
        """`conn` is gone: fail the transfers with data frames open on it."""
        with self.lock:
            tids = [] if self.closed else list(conn.open)
            conn.open.clear()
        for tid in tids:
            self.fail(tid, TransferError(tid, kind, detail))

    def fail(self, tid: int, err: TransferError) -> None:
        with self.lock:
            if self._live.pop(tid, None) is None:
                return
            self._remember(tid, err)
        self._quiesce(tid)  # report only once nothing of tid can land any more
        with self.lock:
            if self._ended.get(tid) is err:
                self._results[tid] = err

    # ---- internals -----------------------------------------------------------------

    def _remember(self, tid: int, status: object) -> None:
        self._ended[tid] = status
        self._ended.move_to_end(tid)
        while len(self._ended) > REMEMBER:
            old, _ = self._ended.popitem(last=False)
            self._trailers.pop(old, None)

    def _complete(self, tid: int, rx: Expected) -> None:
        del self._live[tid]
        self._remember(tid, None)
        if rx.trailer is not None:
            self._trailers[tid] = rx.trailer
        self._results[tid] = None

    def _quiesce(self, tid: int) -> None:
        """Return once no write of `tid` (no longer live, so none can begin) is landing.
        A write still landing after the grace period has its connection shut down."""
        with self._writes:
            if self._writes.wait_for(lambda: tid not in self._writing, self.cancel_grace):
                return
            stuck = list(self._writing.get(tid, ()))
        for c in stuck:
            log.warning("shutting down %s: a write of ended transfer %d did not end", c.name, tid)
            c.shut()
        with self._writes:
            if not self._writes.wait_for(lambda: tid not in self._writing, 4 * self.cancel_grace + 1.0):
                log.error("a write of transfer %d is still landing after its connection was shut down", tid)

    def _timer_loop(self) -> None:
        while True:
            with self._timer_cv:
                if self.closed:
                    return
                now = time.monotonic()
                expired = []
                while self._deadlines and self._deadlines[0][0] <= now:
                    deadline, tid = heapq.heappop(self._deadlines)
                    rx = self._live.get(tid)
                    if rx is not None and rx.deadline == deadline:
                        expired.append(tid)
                if not expired:
                    wait = self._deadlines[0][0] - now if self._deadlines else 1.0
                    self._timer_cv.wait(min(wait, 1.0))
                    continue
            for tid in expired:
                self.fail(tid, TransferError(tid, "timeout", "not complete at its deadline"))


# ---------------------------------------------------------------------------------------
# sender


@dataclass
class Tx:
    """Sender-side state of one transfer."""

    deadline: float | None = None
    unfinished: set[str] = field(default_factory=set)  # endpoints sent to, no finish yet
    pending: set[str] = field(default_factory=set)  # endpoints finished, no ack yet
    error: TransferError | None = None


class TxConn:
    """What the ledger needs of a sender connection: a queue of (what, tid, payload,
    deadline) items for its writer thread, the transfers it carries, and a way to shut
    it down from another thread; `connected` once its writer made it."""

    def __init__(self, endpoint: str, lock: threading.Lock) -> None:
        self.endpoint = endpoint
        self.queue: collections.deque[tuple] = collections.deque()
        self.cv = threading.Condition(lock)
        self.tids: set[int] = set()  # transfers with frames queued or sent here and no reply yet
        self.dead = False
        self.writer: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def shut(self) -> None:
        raise NotImplementedError


class TxLedger:
    """Sender-side bookkeeping of a transport: per-transfer state, one connection per
    endpoint (made by `new_conn`, which starts its threads), the queues the writer
    threads drain with next_item(), and acknowledgements. Queue items:
    ("data", tid, pieces, deadline), ("finish", tid, trailer, deadline),
    ("abort", tid, (kind, detail), None), ("close", -1, None, None).

    `tids`: the ids the transport's frames carry, checked by send and finish."""

    def __init__(self, nbytes: int, new_conn: Callable[[str], TxConn], max_trailer: int, *, tids: TidSpace = INT64_IDS) -> None:
        self.nbytes = nbytes
        self._new_conn = new_conn
        self._max_trailer = max_trailer
        self._tids = tids
        self.lock = threading.Lock()
        self._done = threading.Condition(self.lock)  # some transfer was acknowledged or failed
        self.conns: dict[str, TxConn] = {}
        self._txs: dict[int, Tx] = {}
        self._failed: collections.OrderedDict[int, TransferError] = collections.OrderedDict()
        self._failures: collections.deque[tuple[int, TransferError]] = collections.deque()  # for poll()
        self.closed = False

    # ---- the KVSender half -------------------------------------------------------

    def send(self, tid: int, endpoint: str, pieces: Sequence[Piece], deadline: float) -> None:
        pieces = list(pieces)
        for p in pieces:
            if p.src_offset < 0 or p.dst_offset < 0 or p.length < 0 or p.src_offset + p.length > self.nbytes:
                raise ValueError(f"{p} is outside the {self.nbytes}-byte source region or negative")
        with self.lock:
            tx = self._tx(tid)
            if tx is None:
                return  # failed or aborted: wait() raises
            if endpoint in tx.pending:
                raise ValueError(f"send to {endpoint} after its finish")
            tx.deadline = deadline if tx.deadline is None else max(tx.deadline, deadline)
            tx.unfinished.add(endpoint)
            if pieces:
                self._enqueue(endpoint, ("data", tid, pieces, deadline))

    def finish(self, tid: int, endpoint: str, trailer: bytes | None) -> None:
        if trailer is not None and len(trailer) > self._max_trailer:
            raise ValueError(f"trailer of {len(trailer)} bytes exceeds {self._max_trailer}")
        with self.lock:
            tx = self._tx(tid)
            if tx is None:
                return
            if endpoint in tx.pending:
                raise ValueError(f"finish to {endpoint} twice")
            tx.unfinished.discard(endpoint)
            tx.pending.add(endpoint)
            self._enqueue(endpoint, ("finish", tid, None if trailer is None else bytes(trailer), tx.deadline))

    def wait(self, tid: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self.lock:
            tx = self._txs.get(tid)
            if tx is None:
                if tid in self._failed:
                    raise self._failed[tid]
                raise ValueError(f"transfer {tid} is unknown (or was already waited for)")
            if tx.unfinished and tx.error is None:
                raise ValueError(f"transfer {tid} sent to {sorted(tx.unfinished)} without finish")
            if tx.deadline is not None:
                end = min(end, tx.deadline)
            while tx.error is None and tx.pending:
                left = end - time.monotonic()
                if left <= 0:
                    self.fail_tx(tid, "timeout", "no acknowledgement by the deadline", notify=True)
                    break
                self._done.wait(left)
            self._txs.pop(tid, None)
            if tx.error is not None:
                raise tx.error

    def poll(self) -> dict[int, TransferError | None]:
        out: dict[int, TransferError | None] = {}
        now = time.monotonic()
        with self.lock:
            for tid, tx in list(self._txs.items()):
                if tx.error is None and not tx.pending and not tx.unfinished:
                    out[tid] = None
                    del self._txs[tid]
                elif tx.error is None and tx.deadline is not None and now > tx.deadline:
                    self.fail_tx(tid, "timeout", "no acknowledgement by the deadline", notify=True)
            while self._failures:
                tid, err = self._failures.popleft()
                out[tid] = err
        return out

    def abort(self, tid: int) -> None:
        with self.lock:
            if tid in self._txs:
                self.fail_tx(tid, "aborted", "aborted by the sender", notify=True)
            elif tid not in self._failed:
                self._remember_failed(tid, TransferError(tid, "aborted", "aborted by the sender"))

    def close(self, ask_writers: bool = True) -> list[TxConn]:
        """Fail what is in flight and, with `ask_writers`, ask every writer to close its
        connection after the frame it is writing (a "close" item); returns the
        connections (none if closed already), for the caller to join or kill."""
        with self.lock:
            if self.closed:
                return []
            self.closed = True
            for tid in list(self._txs):
                self.fail_tx(tid, "aborted", "sender closed", notify=False)
            conns = list(self.conns.values())
            if ask_writers:
                for c in conns:
                    c.queue.append(("close", -1, None, None))
                    c.cv.notify_all()
        return conns

    # ---- the connection threads' half -----------------------------------------------

    def next_item(self, c: TxConn) -> tuple | None:
        """The writer's next item, or None once `c` is dead. Items of failed transfers
        are dropped; data past its deadline fails its transfer instead."""
        with self.lock:
            while True:
                while not c.queue and not c.dead:
                    c.cv.wait()
                if c.dead:
                    return None
                item = c.queue.popleft()
                what, tid, _, deadline = item
                if what in ("data", "finish") and (tid in self._failed or tid not in c.tids):
                    continue
                if what == "data" and time.monotonic() > deadline:
                    self.fail_tx(tid, "timeout", "deadline passed before the data was sent", notify=True)
                    continue
                return item

    def acked(self, c: TxConn, tid: int, err: TransferError | None) -> None:
        """The receiver behind `c` acknowledged tid's FINISH (err None) or refused it."""
        with self.lock:
            c.tids.discard(tid)
            if err is not None:
                self.fail_tx(tid, err.kind, f"receiver: {err.detail or err.kind}", notify=True, skip=c)
                return
            tx = self._txs.get(tid)
            if tx is not None and tx.error is None:
                tx.pending.discard(c.endpoint)
                self._done.notify_all()

    def kill(self, c: TxConn, kind: str, detail: str) -> None:
        """Close `c` for good: fail the transfers it carries; later sends reconnect."""
        with self.lock:
            if c.dead:
                return
            c.dead = True
            if self.conns.get(c.endpoint) is c:
                del self.conns[c.endpoint]
            c.queue.clear()
            tids, c.tids = c.tids, set()
            for tid in tids:
                self.fail_tx(tid, kind, detail, notify=True)
            c.cv.notify_all()
        c.shut()

    def fail_tx(self, tid: int, kind: str, detail: str, notify: bool, skip: TxConn | None = None) -> None:
        """(lock held) Fail `tid`: drop its queued frames everywhere; with `notify`, tell
        the receivers that have frames of it (except `skip`) with an ABORT frame."""
        tx = self._txs.get(tid)
        if tx is None or tx.error is not None:
            return
        tx.error = TransferError(tid, kind, detail)
        self._remember_failed(tid, tx.error)
        self._failures.append((tid, tx.error))
        del self._txs[tid]  # a waiter holds `tx` and sees the error; a later wait finds _failed
        for c in self.conns.values():
            if tid not in c.tids:
                continue
            c.tids.discard(tid)
            kept = [it for it in c.queue if it[1] != tid]
            c.queue.clear()
            c.queue.extend(kept)
            if notify and c is not skip and not c.dead:
                c.queue.append(("abort", tid, (kind, detail), None))
                c.cv.notify()
        self._done.notify_all()

    # ---- internals -----------------------------------------------------------------

    def _tx(self, tid: int) -> Tx | None:
        if self.closed:
            raise RuntimeError("sender is closed")
        self._tids.check(tid)
        if tid in self._failed:
            return None
        tx = self._txs.get(tid)
        if tx is None:
            tx = self._txs[tid] = Tx()
        return tx

    def _enqueue(self, endpoint: str, item: tuple) -> None:
        c = self.conns.get(endpoint)
        if c is None:
            c = self.conns[endpoint] = self._new_conn(endpoint)
        c.tids.add(item[1])
        c.queue.append(item)
        c.cv.notify()

    def _remember_failed(self, tid: int, err: TransferError) -> None:
        self._failed[tid] = err
        while len(self._failed) > REMEMBER:
            self._failed.popitem(last=False)


# ---------------------------------------------------------------------------------------
# the transfer half of the interface, for a transport that keeps its transfers in a ledger


class LedgerReceiver(KVReceiver):
    """A KVReceiver whose transfers an RxLedger keeps (`_book`); `_conns` holds the
    transport's open connections, guarded by the ledger's lock."""

    _book: RxLedger
    _conns: set

    @property
    def num_connections(self) -> int:
        """Sender connections currently open (a gauge)."""
        with self._book.lock:
            return len(self._conns)

    def expect(self, transfer_id: int, ranges: Sequence[tuple[int, int]], deadline: float, want_trailer: bool = False) -> None:
        self._book.expect(transfer_id, ranges, deadline, want_trailer)

    def poll(self) -> dict[int, TransferError | None]:
        return self._book.poll()

    def trailer(self, transfer_id: int) -> bytes | None:
        return self._book.trailer(transfer_id)

    def cancel(self, transfer_id: int) -> None:
        self._book.cancel(transfer_id)


class LedgerSender(KVSender):
    """A KVSender whose transfers a TxLedger keeps (`_book`), with a writer thread per
    connection (started by _start_writer, kept in `_threads`). A transport that checks
    endpoints or pieces further does so in send/finish before calling these.

    The writer thread takes its connection's items in order, connecting on the first
    (`_connect(c, deadline)`, which raises ConnFail), and writes each with `_write(c,
    what, tid, payload, deadline)`; a "close" item (close() asks for one) ends the
    connection after `_write_close(c)`. Whatever ends the thread kills the connection,
    failing the transfers it carries: a ConnFail with its kind, an error of `_errors`
    as "peer_lost"; then `_writer_done(c)` tidies up."""

    _book: TxLedger
    _threads: list[threading.Thread]
    _stall_timeout: float
    _errors: tuple[type[Exception], ...] = (OSError,)

    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float) -> None:
        self._book.send(transfer_id, endpoint, pieces, deadline)

    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None) -> None:
        self._book.finish(transfer_id, endpoint, trailer)

    def wait(self, transfer_id: int, timeout: float) -> None:
        self._book.wait(transfer_id, timeout)

    def poll(self) -> dict[int, TransferError | None]:
        return self._book.poll()

    def abort(self, transfer_id: int) -> None:
        self._book.abort(transfer_id)

    def close(self) -> None:
        """Fail what is in flight; each writer ends its connection after the frame it is
        writing (within the stall timeout), then what is left is killed."""
        conns = self._book.close()
        end = time.monotonic() + self._stall_timeout + 2.0
        for c in conns:
            if c.writer is not None:
                c.writer.join(timeout=max(0.0, end - time.monotonic()))
        for c in conns:
            self._book.kill(c, "aborted", "sender closed")
        for t in self._threads:
            t.join(timeout=2.0)

    def _start_writer(self, c: TxConn, name: str) -> TxConn:
        """(ledger lock held: called from `new_conn`) Start c's writer thread."""
        c.writer = threading.Thread(target=self._write_loop, args=(c,), name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(c.writer)
        c.writer.start()
        return c

    def _write_loop(self, c: TxConn) -> None:
        kind, detail = "peer_lost", "connection closed"
        try:
            while True:
                item = self._book.next_item(c)
                if item is None:
                    return
                what, tid, payload, deadline = item
                if what == "close":
                    self._write_close(c)
                    kind, detail = "aborted", "sender closed"
                    return
                if not c.connected:  # an abort too: the receiver may be expecting the transfer
                    self._connect(c, deadline)
                self._write(c, what, tid, payload, deadline)
        except ConnFail as e:
            kind, detail = e.kind, e.detail
        except self._errors as e:
            detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        finally:
            self._book.kill(c, kind, f"{detail} ({c.endpoint})")
            self._writer_done(c)

    def _connect(self, c: TxConn, deadline: float | None) -> None:
        raise NotImplementedError

    def _write(self, c: TxConn, what: str, tid: int, payload, deadline: float | None) -> None:
        raise NotImplementedError

    def _write_close(self, c: TxConn) -> None:
        """The writer's last act on close(), if the transport says goodbye."""

    def _writer_done(self, c: TxConn) -> None:
        """The writer thread ends, its connection killed."""
