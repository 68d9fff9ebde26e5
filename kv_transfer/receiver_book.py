"""The receiver's book of KV transfers (ReceiverBook): one state machine per transfer
id on a decode rank, from the reservation's expect() to the moment its blocks may be
reused. The tcp, collective and mooncake transports keep their receivers' transfers in
one (base.py states the interface and the guarantees they keep). A transport owns the
wire (frames, sockets or process groups, its threads) and tells the book what arrived;
the book decides what becomes of each transfer. It does no I/O of its own, save asking
a connection to shut itself down (RxConn.shut). The sender's half is sender_book.py.

    expect ──> live ──(every expected byte covered, and the trailer if wanted)──> complete
                 ├──(its deadline passes: the book's timer thread)─────────────> failed "timeout"
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
  deadline with "timeout". A transfer expected with deadline None has no timer here:
  the reservation's owner (the engine's scheduler half, which keeps the one lease timer
  of a reservation) cancels it when that lease runs out, so it stays live until it
  completes, fails or is cancelled. A lost connection (drop_conn) fails the transfers
  with data frames open on it (taken, no FINISH yet) with the transport's kind
  (peer_lost, corrupt, ...); a sender's ABORT (on_abort) fails the transfer with the
  sender's kind. poll() returns, once each, the transfers that ended since the last
  poll: None complete, else the TransferError; a cancelled transfer is not reported.

  Secret and trailer. A transfer expected with a `secret` (minted by the decode node per
  reservation) counts frames only from connections that presented it (authenticate(),
  compared in constant time, once per connection and transfer, before its first data
  frame or FINISH there). admit() and on_finish() drop frames from any other connection
  and count them (`rejected_frames`); they do not fail the transfer, so a stranger
  cannot end someone else's. A trailer the transfer's `trailer_check` refuses fails it
  ("corrupt"), so a malformed first token never reaches the engine.

Transfer ids are checked against the id space of the transport's wire format (TidSpace).
"""
from __future__ import annotations

import bisect
import collections
import heapq
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .base import KVReceiver, TransferError
from .common import INT64_IDS, REMEMBER, TidSpace
from .coverage import Coverage, LazyCoverage, merged  # noqa: F401  (re-exported: the transports and tests take them from here)

log = logging.getLogger(__name__)


@dataclass
class Expected:
    """Receiver-side state of one live transfer."""

    starts: list[int]  # merged expected ranges, sorted
    ends: list[int]
    total: int
    deadline: float | None  # None: no timer here, the reservation's owner cancels it
    want_trailer: bool
    covered: Coverage | LazyCoverage = field(default_factory=Coverage)
    trailer: bytes | None = None
    secret: bytes | None = None  # what a sender must present (authenticate) before its frames count
    trailer_check: Callable[[bytes], bool] | None = None  # a FINISH's trailer it refuses fails the transfer

    def contains(self, off: int, length: int) -> bool:
        k = bisect.bisect_right(self.starts, off) - 1
        return k >= 0 and off + length <= self.ends[k]

    def complete(self) -> bool:
        if self.trailer is None and self.want_trailer:
            return False
        return self.covered.covers(self.total)


def _trailer_ok(rx: Expected, trailer: bytes) -> bool:
    """Whether the transfer's trailer_check (if any) takes `trailer`; one that raises refuses it."""
    try:
        return rx.trailer_check is None or bool(rx.trailer_check(trailer))
    except Exception:  # noqa: BLE001 - a sender's bytes must not break the connection's thread
        return False


class RxConn:
    """What the book needs of a receiver connection: the transfers with data frames
    open on it, and a way to shut it down from another thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.open: dict[int, int] = {}  # tid -> data frames admitted since its FINISH (book lock)
        self.told: set[int] = set()  # ended transfers whose sender was told so (book lock)
        self.authed: set[int] = set()  # live transfers whose secret this connection presented (book lock)

    def shut(self) -> None:
        raise NotImplementedError


_CANCELLED = object()  # `ended` marker: cancelled by the receiver
_UNKNOWN = object()


class ReceiverBook:
    """The receiver's book: the transfers a decode rank expects, from expect() to
    complete, failed or cancelled (the module docstring draws the state machine). It
    keeps each live transfer's expected ranges and coverage, the results and trailers
    until poll() and trailer() hand them out, the deadlines (its own timer thread; a
    transfer expected without one waits for its owner's cancel), how the last REMEMBER
    transfers ended, and the writes landing right now, so that cancel and every failure
    return only once nothing of a transfer can land.

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
        self.rejected_frames = 0  # frames of a live transfer from a connection without its secret
        self._timer = threading.Thread(target=self._timer_loop, name=timer_name, daemon=True)
        self._timer.start()

    # ---- the KVReceiver half ---------------------------------------------------

    def expect(self, tid: int, ranges: Sequence[tuple[int, int]], deadline: float | None, want_trailer: bool,
               secret: bytes | None = None, trailer_check: Callable[[bytes], bool] | None = None) -> None:
        """Take frames of `tid` into `ranges` until it completes, fails, is cancelled or,
        with a `deadline` (time.monotonic()), that passes; with None it has no timer here.
        With a `secret`, only frames from connections that presented it count; a trailer
        `trailer_check` refuses fails the transfer ("corrupt")."""
        self._tids.check(tid)
        spans = []
        for off, length in ranges:
            if off < 0 or length < 0 or off + length > self.nbytes:
                raise ValueError(f"range ({off}, {length}) is outside the region of {self.nbytes} bytes")
            if length:
                spans.append((off, off + length))
        starts, ends = merged(spans)
        rx = Expected(starts, ends, sum(ends) - sum(starts), deadline, want_trailer, self._coverage(),
                      secret=bytes(secret) if secret else None, trailer_check=trailer_check)
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
            if deadline is not None:  # None: the reservation's owner holds the one timer
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
            if rx.secret is not None and tid not in conn.authed:
                self.rejected_frames += 1  # dropped, not failed: a stranger cannot end someone's transfer
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
            rx = self._live.get(tid)
            if rx is not None and rx.secret is not None and tid not in conn.authed:
                self.rejected_frames += 1
                return TransferError(tid, "refused", "this connection did not present the transfer's secret")
            written = conn.open.pop(tid, 0)
            conn.authed.discard(tid)
            if rx is not None:
                if written != seq:
                    err = TransferError(tid, "refused", f"{seq - written} data frames arrived before expect")
                elif trailer is not None and not _trailer_ok(rx, trailer):
                    err = TransferError(tid, "corrupt", f"malformed trailer ({len(trailer)} bytes)")
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

    def authenticate(self, conn: RxConn, tid: int, presented: bytes) -> TransferError | None:
        """A sender presents `tid`'s secret on `conn` (before its frames of tid). None:
        accepted, or tid is not live (its frames are drained anyway); else the refusal,
        counted, and the connection's frames of tid keep being dropped."""
        with self.lock:
            rx = self._live.get(tid)
            if rx is None:
                return None
            if rx.secret is None or hmac.compare_digest(rx.secret, bytes(presented)):
                conn.authed.add(tid)
                return None
            self.rejected_frames += 1
        return TransferError(tid, "refused", "wrong secret for this transfer")

    def tell_ended(self, conn: RxConn, tid: int) -> TransferError | None:
        """Data keeps coming over `conn` for a transfer that failed or was cancelled
        here: the error to tell that sender, once, so it drops the rest and frees its
        blocks before `finish` (None: nothing to tell)."""
        with self.lock:
            status = self._ended.get(tid)
            if tid in conn.told or not (status is _CANCELLED or isinstance(status, TransferError)):
                return None
            conn.open.pop(tid, None)  # it will not send that FINISH
            conn.authed.discard(tid)
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
            conn.authed.discard(tid)
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


class BookedReceiver(KVReceiver):
    """A KVReceiver whose transfers a ReceiverBook keeps (`_book`); `_conns` holds the
    transport's open connections, guarded by the book's lock."""

    _book: ReceiverBook
    _conns: set

    @property
    def num_connections(self) -> int:
        """Sender connections currently open (a gauge)."""
        with self._book.lock:
            return len(self._conns)

    def expect(self, transfer_id: int, ranges: Sequence[tuple[int, int]], deadline: float | None, want_trailer: bool = False,
               *, secret: bytes | None = None, trailer_check: Callable[[bytes], bool] | None = None) -> None:
        self._book.expect(transfer_id, ranges, deadline, want_trailer, secret, trailer_check)

    @property
    def rejected_frames(self) -> int:
        """Frames dropped because their connection did not present the transfer's secret (a counter)."""
        with self._book.lock:
            return self._book.rejected_frames

    def poll(self) -> dict[int, TransferError | None]:
        return self._book.poll()

    def trailer(self, transfer_id: int) -> bytes | None:
        return self._book.trailer(transfer_id)

    def cancel(self, transfer_id: int) -> None:
        self._book.cancel(transfer_id)
