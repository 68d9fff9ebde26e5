"""The sender's book of KV transfers (SenderBook): on a prefill rank, what becomes of
each transfer from its first send() to its acknowledgement or failure, and the queue of
every connection's writer thread. The tcp, collective and mooncake transports keep
their senders' transfers in one (base.py states the interface); a transport owns the
wire, the book owns the state. The receiver's half is receiver_book.py.

One Tx per transfer id, one connection (TxConn) per endpoint

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

  Secret. send() and finish() may carry the transfer's secret (from the reservation);
  the writer presents it on each connection before that connection's first frame of
  the transfer (the transport's `_write_auth`), and again after its FINISH.

Transfer ids are checked against the id space of the transport's wire format (TidSpace).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .base import KVSender, Piece, TransferError
from .common import INT64_IDS, MAX_SECRET, REMEMBER, ConnFail, TidSpace


@dataclass
class Tx:
    """Sender-side state of one transfer."""

    deadline: float | None = None
    unfinished: set[str] = field(default_factory=set)  # endpoints sent to, no finish yet
    pending: set[str] = field(default_factory=set)  # endpoints finished, no ack yet
    error: TransferError | None = None
    secret: bytes | None = None  # presented on each connection before the transfer's first frame


class TxConn:
    """What the book needs of a sender connection: a queue of (what, tid, payload,
    deadline) items for its writer thread, the transfers it carries, and a way to shut
    it down from another thread; `connected` once its writer made it."""

    def __init__(self, endpoint: str, lock: threading.Lock) -> None:
        self.endpoint = endpoint
        self.queue: collections.deque[tuple] = collections.deque()
        self.cv = threading.Condition(lock)
        self.tids: set[int] = set()  # transfers with frames queued or sent here and no reply yet
        self.dead = False
        self.writer: threading.Thread | None = None
        self.seq: dict[int, int] = {}  # tid -> data frames written since its FINISH (writer thread only)
        self.authed: set[int] = set()  # tids whose secret was presented here, until FINISH (writer thread only)

    def next_seq(self, tid: int) -> int:
        """The seq of tid's next data frame on this connection (writer thread only)."""
        seq = self.seq.get(tid, 0)
        self.seq[tid] = seq + 1
        return seq

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def shut(self) -> None:
        raise NotImplementedError


class SenderBook:
    """The sender's book: the transfers a prefill rank is sending, from the first send()
    to every endpoint's acknowledgement or the first failure (the module docstring
    tells how). It keeps per-transfer state, one connection per endpoint (made by
    `new_conn`, which starts its threads), the queues the writer threads drain with
    next_item(), and acknowledgements. Queue items:
    ("data", tid, pieces, deadline), ("finish", tid, trailer, deadline),
    ("abort", tid, (kind, detail), None), ("close", -1, None, None).

    `tids`: the ids the transport's frames carry, checked by send and finish."""

    def __init__(self, nbytes: int, new_conn: Callable[[str], TxConn], max_trailer: int, *, tids: TidSpace = INT64_IDS,
                 idle_close_s: float | None = None) -> None:
        self.nbytes = nbytes
        # a connection with nothing queued or in flight this long is closed by its writer,
        # before a receiver's idle timeout could close it under a new frame (None: never)
        self.idle_close_s = idle_close_s
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

    def send(self, tid: int, endpoint: str, pieces: Sequence[Piece], deadline: float, secret: bytes | None = None) -> None:
        if secret is not None and len(secret) > MAX_SECRET:
            raise ValueError(f"a transfer secret is at most {MAX_SECRET} bytes, got {len(secret)}")
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
            tx.secret = secret or tx.secret
            tx.deadline = deadline if tx.deadline is None else max(tx.deadline, deadline)
            tx.unfinished.add(endpoint)
            if pieces:
                self._enqueue(endpoint, ("data", tid, pieces, deadline))

    def finish(self, tid: int, endpoint: str, trailer: bytes | None, secret: bytes | None = None) -> None:
        if trailer is not None and len(trailer) > self._max_trailer:
            raise ValueError(f"trailer of {len(trailer)} bytes exceeds {self._max_trailer}")
        with self.lock:
            tx = self._tx(tid)
            if tx is None:
                return
            if endpoint in tx.pending:
                raise ValueError(f"finish to {endpoint} twice")
            tx.secret = secret or tx.secret
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

    def secret_of(self, tid: int) -> bytes | None:
        """The secret the receivers of `tid` want presented (None: none was given)."""
        with self.lock:
            tx = self._txs.get(tid)
            return tx.secret if tx is not None else None

    def next_item(self, c: TxConn) -> tuple | None:
        """The writer's next item, or None once `c` is dead. Items of failed transfers
        are dropped; data past its deadline fails its transfer instead."""
        with self.lock:
            while True:
                while not c.queue and not c.dead:
                    if not c.cv.wait(self.idle_close_s) and not c.queue and not c.tids and c.connected:
                        c.dead = True  # idle: the next send to this endpoint opens a new connection
                        if self.conns.get(c.endpoint) is c:
                            del self.conns[c.endpoint]
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



class BookedSender(KVSender):
    """A KVSender whose transfers a SenderBook keeps (`_book`), with a writer thread per
    connection (started by _start_writer, kept in `_threads`). A transport that checks
    endpoints or pieces further does so in send/finish before calling these.

    The writer thread takes its connection's items in order, connecting on the first
    (`_connect(c, deadline)`, which raises ConnFail), and writes each with the
    transport's `_write_data`, `_write_finish` or `_write_abort` (`_write` picks one and
    keeps each transfer's frame count, `c.seq`); a "close" item (close() asks for one)
    ends the connection after `_write_close(c)`. Whatever ends the thread kills the
    connection, failing the transfers it carries: a ConnFail with its kind, an error of
    `_errors` as "peer_lost"; then `_writer_done(c)` tidies up."""

    _book: SenderBook
    _threads: list[threading.Thread]
    _stall_timeout: float
    _errors: tuple[type[Exception], ...] = (OSError,)
    _min_wait = 0.2  # a frame whose deadline is (nearly) due still gets this long

    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float, *, secret: bytes | None = None) -> None:
        self._book.send(transfer_id, endpoint, pieces, deadline, secret)

    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None, *, secret: bytes | None = None) -> None:
        self._book.finish(transfer_id, endpoint, trailer, secret)

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
        """(book lock held: called from `new_conn`) Start c's writer thread."""
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

    def _budget(self, deadline: float | None) -> float:
        """How long a write may still wait: until its frame's deadline (at least
        `_min_wait`), or the stall timeout for a frame without one."""
        if deadline is None:
            return self._stall_timeout
        return max(deadline - time.monotonic(), self._min_wait)

    def _connect(self, c: TxConn, deadline: float | None) -> None:
        raise NotImplementedError

    def _write(self, c: TxConn, what: str, tid: int, payload, deadline: float | None) -> None:
        """Write one queued item. A FINISH carries how many data frames of `tid` went out
        on `c`, so the receiver can tell whether it took them all. The transfer's secret,
        if it has one, goes first on each connection (and again after a FINISH)."""
        if what in ("data", "finish") and tid not in c.authed:
            secret = self._book.secret_of(tid)
            if secret:
                self._write_auth(c, tid, secret, deadline)
            c.authed.add(tid)
        if what != "data":
            c.authed.discard(tid)
        if what == "data":
            self._write_data(c, tid, payload, deadline)
        elif what == "finish":
            self._write_finish(c, tid, c.seq.pop(tid, 0), payload, deadline)
        elif what == "abort":
            c.seq.pop(tid, None)
            self._write_abort(c, tid, *payload)

    def _write_data(self, c: TxConn, tid: int, pieces: list[Piece], deadline: float) -> None:
        raise NotImplementedError

    def _write_finish(self, c: TxConn, tid: int, seq: int, trailer: bytes | None, deadline: float | None) -> None:
        raise NotImplementedError

    def _write_abort(self, c: TxConn, tid: int, kind: str, detail: str) -> None:
        raise NotImplementedError

    def _write_auth(self, c: TxConn, tid: int, secret: bytes, deadline: float | None) -> None:
        raise NotImplementedError

    def _write_close(self, c: TxConn) -> None:
        """The writer's last act on close(), if the transport says goodbye."""

    def _writer_done(self, c: TxConn) -> None:
        """The writer thread ends, its connection killed."""
