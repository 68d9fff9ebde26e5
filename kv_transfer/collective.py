"""The `collective` transport: KV byte ranges over torch.distributed point-to-point
(gloo on CPU, NCCL on CUDA, HCCL on Ascend) between two independent instances.

No default process group is used or created: the two sides of every connection build
a private two-rank group straight from a PrefixStore of a TCPStore the receiver hosts,
so a node's own groups (TP, PCP) are never touched and two nodes can share a host.

Connection (one per sender and endpoint, made lazily by the sender's writer thread)
  1. the receiver hosts TCPStore(host, port 0); its endpoint is "host:port"
  2. the sender takes a pair id, `store.add(NS/pairs, 1)`, and posts NS/hello/<pair> =
     "<version> <device type>"; the receiver's accept thread answers NS/reply/<pair>
     "ok" (or "refused <why>": another protocol version or device type)
  3. both build the group on PrefixStore(NS/pair/<pair>): sender rank 0, receiver rank
     1; the backend follows the region's device (torch_npu is imported only for NPU)

Life of one transfer (see base.py)
  1. decode   receiver.expect(tid, ranges, deadline)
  2. prefill  sender.send(tid, ep, pieces, deadline) queues a DATA frame on the
     connection to `ep`; its writer thread sends header, piece table, and the payload:
     large pieces as views of the source region cut in `chunk`-byte messages, small
     ones (KV blocks) packed into `chunk`-byte messages; a window in flight
  3. the receiver's thread for the connection checks the header and that every piece
     lies inside tid's ranges, then posts recvs straight into views of the destination
     region (a packed message into staging, copied out while the transfer is live); a
     frame it will not land goes into scratch
  4. sender.finish(tid, ep, trailer) queues FINISH; the receiver reaches it after every
     earlier frame of the connection is in memory and acknowledges through the store
     (NS/ack/<pair>/<k> = "<tid> ok" or "<tid> <kind> <detail>", k = 0, 1, ...), which
     an ack thread of the sender consumes in order
  5. sender.wait or sender.poll, and receiver.poll, as in base.py; data frames of a
     transfer that failed or was cancelled here land in scratch, and the sender is
     told once (an ack entry with the error), so it drops the rest before `finish`

Frame, sender -> receiver, all on one tag in order. Header int64[8]:
  0 magic << 8 | version   1 type (DATA, FINISH, ABORT, CLOSE)   2 transfer id
  3 seq: DATA: index of this frame among tid's data frames on the connection; FINISH:
    how many were sent; ABORT: kind code
  4 n_pieces   5 payload_len (sum of piece lengths)   6 chunk
  7 DATA: pieces shorter than this are packed (see plan_messages); FINISH: trailer
    length (-1 none)
then, for DATA, the piece table int64[2n] (dst offset, length) and the payload in the
messages plan_messages() gives; for FINISH with a trailer, uint8[trailer length].

Failures, as TransferError kinds (the same as the tcp transport)
  corrupt    a bad header: the connection is closed and the transfers with frames open
             on it fail; a piece outside the expected ranges fails its transfer and its
             payload lands in scratch
  peer_lost  the group or the store failed (a dead peer closes its sockets at once)
  timeout    receiver: not complete at its deadline; sender: a frame did not go out by
             its deadline (the connection is closed: a frame is sent whole or not at all)
  refused    connecting refused; FINISH for a transfer the receiver does not know
  aborted    sender.abort, receiver.cancel, close
Every wait on the group has a timeout: a frame's body the stall timeout, a send its
frame's deadline; only an idle connection's wait for the next header is long (a week),
and a dead peer ends it at once, its sockets closing. A timed-out gloo wait closes the
group's sockets, which is also how a connection is shut down on purpose:
ProcessGroupGloo.abort() does not cancel a posted recv, a tiny timed-out recv does
(`_shut`). NCCL and HCCL groups are aborted with abort(). Only the gloo path can be
tested on a CPU machine; on NCCL an idle connection keeps a recv kernel posted.

The receiver and sender bookkeeping (RxLedger, TxLedger) is transport-neutral and
shared with the mooncake transport.
"""
from __future__ import annotations

import bisect
import collections
import heapq
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .base import KVReceiver, KVSender, Piece, TransferError

log = logging.getLogger(__name__)

NS = "braid/kvc"
VERSION = 1
MAGIC = 0x42524B43  # "BRKC"
DATA, FINISH, ABORT, CLOSE = 1, 2, 3, 4
HEADER_WORDS = 8
MAX_PIECES = 4096
MAX_TRAILER = 1 << 20
MAX_CHUNK = 64 << 20  # bounds the scratch a connection may allocate
CHUNK = 16 << 20  # bytes per message: bounds how long a cancel waits for a landing recv
# Messages in flight per direction: at most WINDOW_BYTES (4 x 16 MiB keeps gloo near its
# peak, and bounds what a cancel waits for) and WINDOW_MSGS (KV blocks are often 16-64 KiB
# pieces, each its own message: each needs a rendezvous, so many must overlap).
WINDOW_BYTES = 64 << 20
WINDOW_MSGS = 64
# Pieces shorter than this travel packed (see plan_messages); at most PACK_WINDOW packed
# messages in flight per connection, so staging costs at most that many chunks per side.
PACK_BELOW = 256 << 10
PACK_WINDOW = 2
TAG = 0x4B56
_SHUT_TAG = TAG + 1
_IDLE = timedelta(days=7)  # an idle connection waits this long for its next header
_IDLE_STORE_WAIT = timedelta(hours=1)
_REMEMBER = 8192  # ended transfers kept to answer late frames

KIND_CODE = {k: i + 1 for i, k in enumerate(TransferError.KINDS)}
CODE_KIND = {v: k for k, v in KIND_CODE.items()}


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host.strip("[]"), int(port)


def flat_bytes(region: torch.Tensor) -> torch.Tensor:
    """The region as a flat uint8 tensor on its own device (a view, no copy)."""
    if not region.is_contiguous():
        raise ValueError("a transport region must be a contiguous tensor")
    return region.view(-1).view(torch.uint8)


# ---------------------------------------------------------------------------------------
# receiver bookkeeping, shared with the mooncake transport


class Coverage:
    """Disjoint, sorted, non-touching byte intervals already written; counts each byte once."""

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


@dataclass
class Expected:
    """Receiver-side state of one live transfer."""

    starts: list[int]  # merged expected ranges, sorted
    ends: list[int]
    total: int
    deadline: float
    want_trailer: bool
    covered: Coverage = field(default_factory=Coverage)
    trailer: bytes | None = None

    def contains(self, off: int, length: int) -> bool:
        k = bisect.bisect_right(self.starts, off) - 1
        return k >= 0 and off + length <= self.ends[k]

    def complete(self) -> bool:
        return self.covered.size == self.total and (self.trailer is not None or not self.want_trailer)


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
    on_finish() and on losing the connection drop_conn()."""

    def __init__(self, nbytes: int, cancel_grace: float, name: str) -> None:
        self.nbytes = nbytes
        self.cancel_grace = cancel_grace
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
        self._timer = threading.Thread(target=self._timer_loop, name=f"braid-{name}-timer", daemon=True)
        self._timer.start()

    # ---- the KVReceiver half ---------------------------------------------------

    def expect(self, tid: int, ranges: Sequence[tuple[int, int]], deadline: float, want_trailer: bool) -> None:
        if not 0 <= tid < 1 << 63:
            raise ValueError(f"transfer id must fit in int64, got {tid}")
        spans = []
        for off, length in ranges:
            if off < 0 or length < 0 or off + length > self.nbytes:
                raise ValueError(f"range ({off}, {length}) is outside the region of {self.nbytes} bytes")
            if length:
                spans.append((off, off + length))
        starts: list[int] = []
        ends: list[int] = []
        for s, e in sorted(spans):
            if ends and s <= ends[-1]:
                ends[-1] = max(ends[-1], e)
            else:
                starts.append(s)
                ends.append(e)
        rx = Expected(starts, ends, sum(e - s for s, e in zip(starts, ends)), deadline, want_trailer)
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
                for s, e in spans:
                    rx.covered.add(s, e)
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
            if len(conn.told) >= _REMEMBER:
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
        while len(self._ended) > _REMEMBER:
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
# sender bookkeeping, shared with the mooncake transport


@dataclass
class Tx:
    """Sender-side state of one transfer."""

    deadline: float | None = None
    unfinished: set[str] = field(default_factory=set)  # endpoints sent to, no finish yet
    pending: set[str] = field(default_factory=set)  # endpoints finished, no ack yet
    error: TransferError | None = None


class ConnFail(Exception):
    """A connection failed; its transfers fail with `kind`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class TxConn:
    """What the ledger needs of a sender connection: a queue of (what, tid, payload,
    deadline) items for its writer thread, the transfers it carries, and a way to shut
    it down from another thread."""

    def __init__(self, endpoint: str, lock: threading.Lock) -> None:
        self.endpoint = endpoint
        self.queue: collections.deque[tuple] = collections.deque()
        self.cv = threading.Condition(lock)
        self.tids: set[int] = set()  # transfers with frames queued or sent here and no reply yet
        self.dead = False

    def shut(self) -> None:
        raise NotImplementedError


class TxLedger:
    """Sender-side bookkeeping of a transport: per-transfer state, one connection per
    endpoint (made by `new_conn`, which starts its threads), the queues the writer
    threads drain with next_item(), and acknowledgements. Queue items:
    ("data", tid, pieces, deadline), ("finish", tid, trailer, deadline),
    ("abort", tid, (kind, detail), None), ("close", -1, None, None)."""

    def __init__(self, nbytes: int, new_conn: Callable[[str], TxConn], max_trailer: int) -> None:
        self.nbytes = nbytes
        self._new_conn = new_conn
        self._max_trailer = max_trailer
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

    def close(self) -> list[TxConn]:
        """Fail what is in flight and ask every writer to close its connection; returns
        the connections, for the caller to join their threads."""
        with self.lock:
            if self.closed:
                return []
            self.closed = True
            for tid in list(self._txs):
                self.fail_tx(tid, "aborted", "sender closed", notify=False)
            conns = list(self.conns.values())
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
        if not 0 <= tid < 1 << 63:
            raise ValueError(f"transfer id must fit in int64, got {tid}")
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
        while len(self._failed) > _REMEMBER:
            self._failed.popitem(last=False)


# ---------------------------------------------------------------------------------------
# process groups


def plan_messages(lens: Sequence[int], chunk: int, pack_below: int) -> list[list[tuple[int, int, int]]]:
    """The messages a DATA frame's payload travels in, computed alike by both sides from
    the piece table. Each is [(piece index, offset in the piece, length)]. A piece of at
    least `pack_below` bytes goes straight from region to region in `chunk`-byte
    messages; shorter ones are packed in order into messages of at most `chunk` bytes,
    gathered into a staging buffer by the sender and scattered out of one by the
    receiver. Gloo costs tens of microseconds per message whatever its size, so KV
    blocks of a few KiB each as their own message run at a fraction of the bandwidth;
    two copies cost less. A message of one entry is always a view of the region."""
    msgs: list[list[tuple[int, int, int]]] = []
    pack: list[tuple[int, int, int]] = []
    packed = 0
    for i, n in enumerate(lens):
        if n < pack_below:
            if pack and packed + n > chunk:
                msgs.append(pack)
                pack, packed = [], 0
            if n:
                pack.append((i, 0, n))
                packed += n
            continue
        if pack:
            msgs.append(pack)
            pack, packed = [], 0
        msgs.extend([(i, a, min(chunk, n - a))] for a in range(0, n, chunk))
    if pack:
        msgs.append(pack)
    return msgs


def _gather(out: torch.Tensor, flat: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """out <- the (offset, length) spans of `flat`, back to back (all flat uint8)."""
    if out.device.type == "cpu":  # memoryview copies: a third of copy_()'s per-call cost
        mv, dst, pos = memoryview(flat.numpy()), memoryview(out.numpy()), 0
        for off, n in spans:
            dst[pos : pos + n] = mv[off : off + n]
            pos += n
    else:
        torch.cat([flat[off : off + n] for off, n in spans], out=out)


def _scatter(flat: torch.Tensor, buf: torch.Tensor, segments: list[tuple[int, int, int]]) -> None:
    """flat[off : off + n] <- buf[pos : pos + n] for each (off, n, pos); on a device,
    returns once the copies are done (the caller then reports them landed)."""
    if flat.device.type == "cpu":
        mv, src = memoryview(flat.numpy()), memoryview(buf.numpy())
        for off, n, pos in segments:
            mv[off : off + n] = src[pos : pos + n]
        return
    for off, n, pos in segments:
        flat[off : off + n].copy_(buf[pos : pos + n])
    getattr(torch, flat.device.type).synchronize(flat.device)


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def make_pair_group(device: torch.device, store: dist.Store, rank: int, timeout: float, local_host: str):
    """A two-rank group on `store` without any default group: gloo for CPU regions,
    NCCL for CUDA, HCCL for Ascend NPU (torch_npu imported only then). Blocks until
    the peer has built its side, at most `timeout` seconds."""
    if device.type == "cpu":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=timeout)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    # NCCL and HCCL run a watchdog that tears a group down once an op exceeds the
    # group's timeout; an idle connection keeps a header recv posted, so the group
    # timeout is long and every wait passes its own.
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _IDLE
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    if device.type == "npu":
        import torch_npu  # noqa: F401  (registers the npu device and hccl)
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL

        opts = ProcessGroupHCCL.Options()
        opts._timeout = _IDLE
        return ProcessGroupHCCL(store, rank, 2, opts)
    raise ValueError(f"no collective backend for device type {device.type!r}")


def _shut(pg, peer: int, device: torch.device) -> None:
    """Close a pair group's connection from any thread; posted ops then fail at once."""
    if device.type != "cpu":
        for name in ("abort", "shutdown"):
            fn = getattr(pg, name, None)
            if fn is not None:
                try:
                    fn()
                    return
                except RuntimeError:
                    pass
        return
    try:  # a gloo wait that times out closes the context's pairs (abort() does not)
        pg.recv([torch.empty(1, dtype=torch.uint8)], peer, _SHUT_TAG).wait(timedelta(milliseconds=1))
    except RuntimeError:
        pass


def _wait(work, seconds: float) -> None:
    try:
        work.wait(timedelta(seconds=max(seconds, 0.001)))
    except RuntimeError as e:
        raise ConnFail("timeout" if _is_timeout(e) else "peer_lost", str(e).splitlines()[0][:300]) from None


def _local_address_for(host: str, port: int, timeout: float) -> str:
    """The local address this host uses to reach host:port; raises ConnFail if the
    port does not answer (a fast 'refused' instead of TCPStore's retry loop)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.getsockname()[0]
    except ConnectionRefusedError:
        raise ConnFail("refused", f"connection to {host}:{port} refused") from None
    except socket.timeout:
        raise ConnFail("timeout", f"connect to {host}:{port} timed out") from None
    except OSError as e:
        raise ConnFail("peer_lost", f"connect to {host}:{port}: {e}") from None


# ---------------------------------------------------------------------------------------
# receiver


class _RConn(RxConn):
    def __init__(self, pair: int, device: torch.device) -> None:
        super().__init__(f"pair {pair}")
        self.pair = pair
        self.device = device
        self.pg = None
        self.store: dist.TCPStore | None = None
        self.acks = 0  # next ack key index
        self.dead = False
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.scratch: torch.Tensor | None = None
        self.staging: list[torch.Tensor] = []  # free staging buffers for packed messages

    def set_pg(self, pg) -> bool:
        with self._lock:
            self.pg = pg
            return not self.dead

    def shut(self) -> None:
        with self._lock:
            self.dead = True
            pg = self.pg
        if pg is not None:
            _shut(pg, 0, self.device)


class _Corrupt(Exception):
    """The frame stream of a connection cannot be trusted any more."""


@dataclass
class _Recv:
    """One posted recv of a DATA frame's payload."""

    buf: torch.Tensor  # what the recv lands in: a view of the region, staging or scratch
    rx: Expected | None  # the live transfer it belongs to, None if it is drained
    span: tuple[int, int] | None = None  # a direct recv into the region (write begun)
    segments: list[tuple[int, int, int]] | None = None  # packed: (dst offset, length, pos in buf)
    staging: torch.Tensor | None = None
    work: object = None


class CollectiveReceiver(KVReceiver):
    """Hosts a TCPStore on `host` (a free port by default) for senders to rendezvous
    on, and lands KV bytes into `region`, a contiguous tensor on CPU (gloo), CUDA
    (NCCL) or NPU (HCCL). `host` must be an address the senders can reach."""

    def __init__(
        self,
        region: torch.Tensor,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        connect_timeout: float = 30.0,
        stall_timeout: float = 10.0,
        cancel_grace: float = 0.5,
    ) -> None:
        self._region = region
        self._flat = flat_bytes(region)
        self._device = region.device
        self._host = host
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout  # a frame's body must keep arriving this fast
        self._server = dist.TCPStore(host, port, None, True, timedelta(seconds=connect_timeout), wait_for_workers=False)
        self._port = self._server.port
        self._endpoint = f"{host}:{self._port}"
        self._book = RxLedger(self._flat.numel(), cancel_grace, f"kvc-{self._port}")
        self._conns: set[_RConn] = set()
        self._closed = False
        self._accept_pair = 1  # the pair id whose hello the accept thread waits for
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"braid-kvc-accept-{self._port}", daemon=True)
        self._acceptor.start()

    # ---- KVReceiver ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

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

    def close(self) -> None:
        with self._book.lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
            wake = f"{NS}/hello/{self._accept_pair}"
        self._book.close()
        self._server.set(wake, "close")
        self._acceptor.join(timeout=2.0)
        for c in conns:
            c.shut()
        for c in conns:  # one still building its group ends when that times out
            if c.thread is not None:
                c.thread.join(timeout=2.0)
        self._server = None  # stops the store server once the threads dropped their clients

    # ---- accepting -----------------------------------------------------------------

    def _client(self, timeout: float) -> dist.TCPStore:
        return dist.TCPStore(self._host, self._port, None, False, timedelta(seconds=timeout))

    def _accept_loop(self) -> None:
        # Waits are long (TCPStore logs every wait that times out) and close() wakes
        # the one in progress by posting its key.
        store = self._client(self._connect_timeout)
        while True:
            with self._book.lock:
                if self._closed:
                    return
                pair = self._accept_pair
            hello = f"{NS}/hello/{pair}"
            try:
                store.wait([hello], timedelta(seconds=self._connect_timeout))
            except dist.DistStoreError:  # a wait timeout
                # a sender that took this pair id and died before its hello must not
                # block the ones after it
                if int(store.add(f"{NS}/pairs", 0)) > pair:
                    with self._book.lock:
                        self._accept_pair += 1
                continue
            except dist.DistError:
                if not self._closed:
                    log.exception("collective receiver %s: store failed", self._endpoint)
                return
            words = store.get(hello).decode(errors="replace").split()
            store.delete_key(hello)
            reply = "ok"
            if len(words) != 2 or words[0] != str(VERSION):
                reply = f"refused protocol {' '.join(words)!r}, this receiver speaks {VERSION}"
            elif words[1] != self._device.type:
                reply = f"refused a {words[1]} sender for a {self._device.type} region"
            c = _RConn(pair, self._device)
            with self._book.lock:
                closed = self._closed
                if closed:
                    reply = "refused: the receiver is closing"
                self._accept_pair += 1
                if reply == "ok":
                    self._conns.add(c)
                    c.thread = threading.Thread(target=self._serve, args=(c,), name=f"braid-kvc-read-{self._port}-{pair}", daemon=True)
                    c.thread.start()
            store.set(f"{NS}/reply/{pair}", reply)
            if closed:
                return

    def _serve(self, c: _RConn) -> None:
        kind, detail = "peer_lost", f"sender connection {c.name} closed"
        try:
            c.store = self._client(self._connect_timeout)
            pg = make_pair_group(self._device, dist.PrefixStore(f"{NS}/pair/{c.pair}", c.store), 1, self._connect_timeout, self._host)
            if not c.set_pg(pg):
                return
            hdr = torch.empty(HEADER_WORDS, dtype=torch.int64, device=self._device)
            while self._read_frame(c, hdr):
                pass
            kind, detail = "aborted", f"sender closed connection {c.name}"
        except _Corrupt as e:
            kind, detail = "corrupt", f"{e} on {c.name}"
        except ConnFail as e:
            kind, detail = e.kind, f"{e.detail} on {c.name}"
        except (RuntimeError, OSError) as e:
            detail = f"{str(e).splitlines()[0][:300]} on {c.name}"
        finally:
            with self._book.lock:
                self._conns.discard(c)
            if c.pg is not None:
                c.shut()
            self._book.drop_conn(c, kind, detail)
            c.store = None

    def _read_frame(self, c: _RConn, hdr: torch.Tensor) -> bool:
        """Handle one frame; False on CLOSE."""
        _wait(c.pg.recv([hdr], 0, TAG), _IDLE.total_seconds())
        word0, ftype, tid, seq, n, plen, chunk, last = hdr.tolist()
        if word0 != (MAGIC << 8 | VERSION):
            raise _Corrupt(f"bad magic/version {word0:#x}")
        if ftype == DATA:
            if not 0 < n <= MAX_PIECES or not 0 < chunk <= MAX_CHUNK or plen < 0 or not 0 <= last <= chunk:
                raise _Corrupt(f"malformed data frame ({n} pieces, chunk {chunk}, packing below {last})")
            table = torch.empty(2 * n, dtype=torch.int64, device=self._device)
            _wait(c.pg.recv([table], 0, TAG), self._stall_timeout)
            t = table.tolist()
            self._on_data(c, tid, seq, t[0::2], t[1::2], plen, chunk, last)
        elif ftype == FINISH:
            tlen = last
            if tlen > MAX_TRAILER:
                raise _Corrupt(f"trailer of {tlen} bytes")
            trailer = None
            if tlen >= 0:
                trailer = b""
                if tlen:
                    buf = torch.empty(tlen, dtype=torch.uint8, device=self._device)
                    _wait(c.pg.recv([buf], 0, TAG), self._stall_timeout)
                    trailer = buf.cpu().numpy().tobytes()
            err = self._book.on_finish(c, tid, seq, trailer)
            self._ack(c, tid, err)
        elif ftype == ABORT:
            self._book.on_abort(c, tid, CODE_KIND.get(seq, "aborted"), "aborted")
        elif ftype == CLOSE:
            return False
        else:
            raise _Corrupt(f"unknown frame type {ftype}")
        return True

    def _on_data(self, c: _RConn, tid: int, seq: int, offs: list[int], lens: list[int], plen: int, chunk: int, pack_below: int) -> None:
        if any(n < 0 for n in lens) or sum(lens) != plen:
            raise _Corrupt("piece lengths do not add up to the payload")  # the stream cannot be followed
        rx = self._book.admit(c, tid, seq, offs, lens, plen)
        if rx is None:
            err = self._book.tell_ended(c, tid)
            if err is not None:
                self._ack(c, tid, err)
        inflight: collections.deque[_Recv] = collections.deque()
        queued = packs = 0  # bytes and packed messages in flight
        try:
            for msg in plan_messages(lens, chunk, pack_below):
                r = self._post(c, tid, rx, msg, offs, chunk)
                rx = r.rx  # None once tid stopped being live: the rest goes to scratch
                inflight.append(r)
                queued += r.buf.numel()
                packs += r.segments is not None
                while len(inflight) >= WINDOW_MSGS or queued >= WINDOW_BYTES or packs >= PACK_WINDOW:
                    r = inflight.popleft()
                    queued -= r.buf.numel()
                    packs -= r.segments is not None
                    self._land(c, tid, r)
            while inflight:
                self._land(c, tid, inflight.popleft())
        finally:
            # the connection failed with recvs posted: a failed gloo op closes the
            # group's sockets (NCCL/HCCL: the group is aborted), so nothing more lands
            for r in inflight:
                self._release(c, tid, r)

    def _post(self, c: _RConn, tid: int, rx: Expected | None, msg: list[tuple[int, int, int]], offs: list[int], chunk: int) -> _Recv:
        """Post the recv of one message: into the region (a direct message of a live
        transfer), into staging (a packed one), or into scratch."""
        if len(msg) == 1:
            i, a, k = msg[0]
            off = offs[i] + a
            if rx is not None and self._book.begin_write(c, tid, rx):
                r = _Recv(self._flat[off : off + k], rx, span=(off, off + k))
            else:
                r = _Recv(self._scratch(c, chunk)[:k], None)
        else:
            staging = c.staging.pop() if c.staging and c.staging[-1].numel() >= chunk else torch.empty(chunk, dtype=torch.uint8, device=self._device)
            segments, pos = [], 0
            for i, a, k in msg:
                segments.append((offs[i] + a, k, pos))
                pos += k
            r = _Recv(staging[:pos], rx, segments=segments, staging=staging)
        try:
            r.work = c.pg.recv([r.buf], 0, TAG)
        except RuntimeError:
            self._release(c, tid, r)
            raise
        return r

    def _land(self, c: _RConn, tid: int, r: _Recv) -> None:
        try:
            _wait(r.work, self._stall_timeout)
        except ConnFail:
            self._release(c, tid, r)
            raise
        if r.segments is None:
            if r.span is not None:
                self._book.end_write(c, tid, r.rx, (r.span,))
            return
        spans: list[tuple[int, int]] = []
        if r.rx is not None and self._book.begin_write(c, tid, r.rx):
            try:
                _scatter(self._flat, r.buf, r.segments)
                spans = [(off, off + k) for off, k, _ in r.segments]
            finally:
                self._book.end_write(c, tid, r.rx, spans)
        self._release(c, tid, r, landed=True)

    def _release(self, c: _RConn, tid: int, r: _Recv, landed: bool = False) -> None:
        """Give back what a message held: its write bracket (a direct recv that did not
        land) and its staging buffer."""
        if r.span is not None and not landed:
            self._book.end_write(c, tid, r.rx, ())
        if r.staging is not None and len(c.staging) < PACK_WINDOW:
            c.staging.append(r.staging)

    def _scratch(self, c: _RConn, chunk: int) -> torch.Tensor:
        if c.scratch is None or c.scratch.numel() < chunk:
            c.scratch = torch.empty(chunk, dtype=torch.uint8, device=self._device)
        return c.scratch

    def _ack(self, c: _RConn, tid: int, err: TransferError | None) -> None:
        value = f"{tid} ok" if err is None else f"{tid} {err.kind} {err.detail or err.kind}"
        try:
            c.store.set(f"{NS}/ack/{c.pair}/{c.acks}", value)
        except dist.DistError as e:
            raise ConnFail("peer_lost", f"store: {e}") from None
        c.acks += 1


# ---------------------------------------------------------------------------------------
# sender


class _SConn(TxConn):
    def __init__(self, endpoint: str, lock: threading.Lock, device: torch.device) -> None:
        super().__init__(endpoint, lock)
        self.addr = parse_endpoint(endpoint)
        self.device = device
        self.pg = None
        self.store: dist.TCPStore | None = None  # the writer's client, idle once the group is built
        self.seq: dict[int, int] = {}  # tid -> data frames written (writer thread only)
        self.staging: list[torch.Tensor] = []  # free staging buffers for packed messages (writer thread only)
        self.writer: threading.Thread | None = None
        self.acker: threading.Thread | None = None
        self.ack_lock = threading.Lock()
        self.ack_key: str | None = None  # the key the ack thread waits for
        self._pg_lock = threading.Lock()
        self._shut = False

    def set_pg(self, pg, store: dist.TCPStore) -> bool:
        with self._pg_lock:
            self.pg, self.store = pg, store
            return not self._shut

    def shut(self) -> None:
        with self._pg_lock:
            self._shut = True
            pg, store = self.pg, self.store
        if pg is not None:
            _shut(pg, 1, self.device)
        with self.ack_lock:
            key = self.ack_key
        if store is not None and key is not None:
            try:
                store.set(key, "-1 wake")
            except dist.DistError:
                pass  # the store is gone, so the ack thread's wait fails by itself


class CollectiveSender(KVSender):
    """Sends byte ranges of `region` (a contiguous tensor on CPU, CUDA or NPU: the
    rank's KV cache) to CollectiveReceivers, over one pair group per endpoint."""

    def __init__(
        self,
        region: torch.Tensor,
        *,
        connect_timeout: float = 30.0,
        stall_timeout: float = 10.0,
        chunk_bytes: int = CHUNK,
        pack_below: int = PACK_BELOW,
        min_wait: float = 0.2,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK}], got {chunk_bytes}")
        if not 0 <= pack_below <= chunk_bytes:
            raise ValueError(f"pack_below must be in [0, chunk_bytes], got {pack_below}")
        self._pack_below = pack_below
        self._region = region
        self._flat = flat_bytes(region)
        self._device = region.device
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout  # for frames without a deadline
        self._chunk = chunk_bytes
        self._min_wait = min_wait  # a frame whose deadline is (nearly) due still gets this long
        self._book = TxLedger(self._flat.numel(), self._new_conn, MAX_TRAILER)
        self._threads: list[threading.Thread] = []

    # ---- KVSender --------------------------------------------------------------

    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float) -> None:
        parse_endpoint(endpoint)
        self._book.send(transfer_id, endpoint, pieces, deadline)

    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None) -> None:
        parse_endpoint(endpoint)
        self._book.finish(transfer_id, endpoint, trailer)

    def wait(self, transfer_id: int, timeout: float) -> None:
        self._book.wait(transfer_id, timeout)

    def poll(self) -> dict[int, TransferError | None]:
        return self._book.poll()

    def abort(self, transfer_id: int) -> None:
        self._book.abort(transfer_id)

    def close(self) -> None:
        conns = self._book.close()
        end = time.monotonic() + self._stall_timeout + 2.0
        for c in conns:  # each writer sends CLOSE after the frame it is writing
            if c.writer is not None:
                c.writer.join(timeout=max(0.0, end - time.monotonic()))
        for c in conns:
            self._book.kill(c, "aborted", "sender closed")
        for t in self._threads:
            t.join(timeout=2.0)

    # ---- connection threads --------------------------------------------------------

    def _new_conn(self, endpoint: str) -> _SConn:
        c = _SConn(endpoint, self._book.lock, self._device)
        c.writer = threading.Thread(target=self._write_loop, args=(c,), name=f"braid-kvc-write-{endpoint}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(c.writer)
        c.writer.start()
        return c

    def _write_loop(self, c: _SConn) -> None:
        kind, detail = "peer_lost", "connection closed"
        try:
            while True:
                item = self._book.next_item(c)
                if item is None:
                    return
                what, tid, payload, deadline = item
                if what == "close":
                    if c.pg is not None:
                        self._send_frame(c, [self._header(CLOSE, 0, 0)], None)
                    kind, detail = "aborted", "sender closed"
                    return
                if c.pg is None:
                    self._connect(c, deadline)
                if what == "data":
                    self._write_data(c, tid, payload, deadline)
                elif what == "finish":
                    frame = [self._header(FINISH, tid, c.seq.pop(tid, 0), tlen=-1 if payload is None else len(payload))]
                    if payload:
                        frame.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device))
                    self._send_frame(c, frame, deadline)
                else:
                    c.seq.pop(tid, None)
                    self._send_frame(c, [self._header(ABORT, tid, KIND_CODE[payload[0]])], None)
        except ConnFail as e:
            kind, detail = e.kind, e.detail
        except (RuntimeError, OSError) as e:
            detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        finally:
            self._book.kill(c, kind, f"{detail} ({c.endpoint})")

    def _connect(self, c: _SConn, deadline: float | None) -> None:
        end = time.monotonic() + self._connect_timeout
        if deadline is not None:
            end = min(end, max(deadline, time.monotonic() + 0.05))
        host, port = c.addr
        local = _local_address_for(host, port, end - time.monotonic())
        try:
            store = dist.TCPStore(host, port, None, False, timedelta(seconds=max(0.05, end - time.monotonic())))
            pair = int(store.add(f"{NS}/pairs", 1))
            store.set(f"{NS}/hello/{pair}", f"{VERSION} {self._device.type}")
            reply_key = f"{NS}/reply/{pair}"
            store.wait([reply_key], timedelta(seconds=max(0.05, end - time.monotonic())))
            reply = store.get(reply_key).decode(errors="replace")
            store.delete_key(reply_key)
        except dist.DistStoreError:
            raise ConnFail("timeout", f"no answer from {c.endpoint}") from None
        except dist.DistError as e:
            raise ConnFail("peer_lost", f"store of {c.endpoint}: {str(e).splitlines()[0][:200]}") from None
        if reply != "ok":
            raise ConnFail("refused", f"{c.endpoint} {reply}")
        try:
            pg = make_pair_group(self._device, dist.PrefixStore(f"{NS}/pair/{pair}", store), 0, max(0.05, end - time.monotonic()), local)
        except RuntimeError as e:
            raise ConnFail("timeout" if _is_timeout(e) else "peer_lost", str(e).splitlines()[0][:300]) from None
        if not c.set_pg(pg, store):
            raise ConnFail("aborted", "connection closed while connecting")
        c.acker = threading.Thread(target=self._ack_loop, args=(c, pair), name=f"braid-kvc-ack-{c.endpoint}", daemon=True)
        with self._book.lock:
            self._threads.append(c.acker)
        c.acker.start()

    def _header(self, ftype: int, tid: int, seq: int, n: int = 0, plen: int = 0, tlen: int = -1) -> torch.Tensor:
        last = self._pack_below if ftype == DATA else tlen
        words = [MAGIC << 8 | VERSION, ftype, tid, seq, n, plen, self._chunk, last]
        return torch.tensor(words, dtype=torch.int64, device=self._device)

    def _send_frame(self, c: _SConn, tensors: list[torch.Tensor], deadline: float | None) -> None:
        works = [c.pg.send([t], 1, TAG) for t in tensors]
        for w in works:
            _wait(w, self._budget(deadline))

    def _budget(self, deadline: float | None) -> float:
        if deadline is None:
            return self._stall_timeout
        return max(deadline - time.monotonic(), self._min_wait)

    def _write_data(self, c: _SConn, tid: int, pieces: list[Piece], deadline: float) -> None:
        runs: list[tuple[int, int, int]] = []  # (src, dst, length), contiguous pieces merged
        for p in pieces:
            if not p.length:
                continue
            if runs:
                s, d, n = runs[-1]
                if s + n == p.src_offset and d + n == p.dst_offset:
                    runs[-1] = (s, d, n + p.length)
                    continue
            runs.append((p.src_offset, p.dst_offset, p.length))
        flat, chunk, pg = self._flat, self._chunk, c.pg
        for k in range(0, len(runs), MAX_PIECES):
            frame = runs[k : k + MAX_PIECES]
            srcs, lens = [s for s, _, _ in frame], [n for _, _, n in frame]
            table = torch.tensor([x for _, d, n in frame for x in (d, n)], dtype=torch.int64, device=self._device)
            seq = c.seq.get(tid, 0)
            c.seq[tid] = seq + 1
            hdr = self._header(DATA, tid, seq, len(frame), sum(lens))
            inflight = collections.deque((pg.send([t], 1, TAG), t, None) for t in (hdr, table))  # (work, tensor, staging)
            queued = packs = 0  # payload bytes and packed messages in flight
            for msg in plan_messages(lens, chunk, self._pack_below):
                staging = None
                if len(msg) == 1:
                    i, a, n = msg[0]
                    t = flat[srcs[i] + a : srcs[i] + a + n]
                else:
                    staging = c.staging.pop() if c.staging else torch.empty(chunk, dtype=torch.uint8, device=self._device)
                    t = staging[: sum(n for _, _, n in msg)]
                    _gather(t, flat, [(srcs[i] + a, n) for i, a, n in msg])
                inflight.append((pg.send([t], 1, TAG), t, staging))
                queued += t.numel()
                packs += staging is not None
                while len(inflight) >= WINDOW_MSGS or queued >= WINDOW_BYTES or packs >= PACK_WINDOW:
                    queued, packs = self._retire(c, inflight, deadline, queued, packs)
            while inflight:
                queued, packs = self._retire(c, inflight, deadline, queued, packs)

    def _retire(self, c: _SConn, inflight: collections.deque, deadline: float, queued: int, packs: int) -> tuple[int, int]:
        """Wait for the oldest send in flight; its staging buffer goes back to the pool."""
        w, t, staging = inflight.popleft()
        _wait(w, self._budget(deadline))
        if t.dtype == torch.uint8:  # payload (the header and table are int64)
            queued -= t.numel()
        if staging is not None:
            packs -= 1
            c.staging.append(staging)
        return queued, packs

    def _ack_loop(self, c: _SConn, pair: int) -> None:
        """Consume the receiver's acknowledgements for this connection, in order; a
        store that fails means the receiver is gone. Waits are long (TCPStore logs
        every wait that times out); shut() wakes the one in progress."""
        host, port = c.addr
        try:
            store = dist.TCPStore(host, port, None, False, timedelta(seconds=self._connect_timeout))
            k = 0
            while True:
                key = f"{NS}/ack/{pair}/{k}"
                with c.ack_lock:
                    if c.dead:
                        return
                    c.ack_key = key
                try:
                    store.wait([key], _IDLE_STORE_WAIT)
                except dist.DistStoreError:
                    continue
                value = store.get(key).decode(errors="replace")
                store.delete_key(key)
                k += 1
                tid_s, status, *rest = value.split(" ", 2)
                tid = int(tid_s)
                if tid < 0:  # shut() woke us
                    return
                err = None
                if status != "ok":
                    kind = status if status in TransferError.KINDS else "corrupt"
                    err = TransferError(tid, kind, rest[0] if rest else "")
                self._book.acked(c, tid, err)
        except (dist.DistError, ValueError) as e:
            self._book.kill(c, "peer_lost", f"store of {c.endpoint}: {str(e).splitlines()[0][:200]} ({c.endpoint})")
