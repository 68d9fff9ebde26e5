"""The `tcp` transport: prefill ranks push KV byte ranges into decode ranks over
plain TCP sockets, zero-copy on both ends.

Life of one transfer
  1. decode   receiver.expect(tid, ranges, deadline)   registers where tid may write
  2. prefill  sender.send(tid, ep, pieces, deadline)    appends to the queue of the one
     connection this sender keeps to `ep`; that connection's writer thread packs the
     pieces of the call into one DATA frame (more past MAX_PIECES pieces) and sendmsg()s
     header + piece table + memoryviews of the source region (no copy)
  3. the receiver's reader thread for that connection checks the header and piece table
     CRCs and that every piece lies inside tid's ranges, then recvmsg_into()s the payload
     straight into the destination slices of the region (scatter read, no staging copy)
  4. sender.finish(tid, ep, trailer) queues a FINISH frame; the reader reaches it only
     after every earlier frame of the connection is in memory, and answers ACK
  5. sender.wait(tid) returns once every endpoint ACKed; receiver.poll() reports tid
     complete once every expected byte (and the trailer, if wanted) arrived, whichever
     sender connections the bytes came over (several prefill ranks feed one decode rank)
Frames of different transfers interleave on a connection, each frame whole.

Frame, little-endian. Fixed header, 40 bytes:
  off size field
    0   4  magic        b"BRKV"
    4   1  version      1
    5   1  type         1 DATA, 2 FINISH, 3 ACK, 4 ERROR
    6   2  flags        FINISH: bit 0 = a trailer follows; ERROR: kind code
                        (1 + index in TransferError.KINDS)
    8   8  transfer id
   16   4  seq          DATA: index of this frame among the transfer's data frames on
                        this connection; FINISH: how many data frames were sent on it
   20   4  n_pieces     DATA: entries in the piece table (<= MAX_PIECES); else 0
   24   8  payload_len  bytes after the piece table: DATA sum of piece lengths, FINISH
                        the trailer, ERROR a utf-8 detail, ACK 0
   32   4  table_crc    CRC32 of the piece table
   36   4  header_crc   CRC32 of bytes 0..35
Piece table: n_pieces x (dst_offset u64, length u64); the payload follows in table
order. Headers carry CRCs because a framing error would scatter bytes across the
region; the payload relies on TCP's checksum (a CRC over gigabytes costs too much).
DATA and FINISH go sender -> receiver, ACK receiver -> sender, ERROR both ways: a
sender's abort or give-up; a receiver's answer to a FINISH it cannot ACK, or its
notice (once per connection) that data keeps coming for a transfer it cancelled or
failed, so the sender drops the rest early.

Failures, as TransferError kinds
  corrupt    bad magic/version/CRC: the stream cannot be trusted, so the connection is
             closed and the transfers with frames open on it fail; a piece outside the
             expected ranges fails its transfer and its payload is drained, not written
  peer_lost  EOF or reset on a connection fails the transfers with frames open on it
  timeout    receiver: not complete at its deadline (a timer thread checks);
             sender: the receiver stopped reading past the frame's deadline (the
             connection is closed, its transfers fail; the next send reconnects)
  refused    connection refused; FINISH for a transfer the receiver does not know; data
             frames of the transfer that were drained because they came before expect
  aborted    sender.abort, receiver.cancel, close
A data frame for an unknown, cancelled or ended transfer is drained into a scratch
buffer. The receiver writes a transfer's bytes only while it is live; cancel and every
failure wait (briefly) for a recv that is landing its bytes, and shut that connection
down if it does not end, before they return or report.
"""
from __future__ import annotations

import bisect
import collections
import heapq
import logging
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .base import KVReceiver, KVSender, Piece, TransferError, region_bytes

log = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"BRKV", "little")
VERSION = 1
DATA, FINISH, ACK, ERROR = 1, 2, 3, 4
FLAG_TRAILER = 1

_BODY = struct.Struct("<IBBHQIIQI")  # the header up to header_crc
_U32 = struct.Struct("<I")
HEADER_SIZE = _BODY.size + 4  # 40
PIECE_SIZE = 16
MAX_PIECES = 4096  # piece table <= 64 KiB
MAX_TRAILER = 1 << 20
MAX_DETAIL = 4096

_KIND_CODE = {k: i + 1 for i, k in enumerate(TransferError.KINDS)}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_RECV_CHUNK = 8 << 20  # bytes per recvmsg_into: bounds how long cancel waits for a landing recv
_SCRATCH = 1 << 20
_REMEMBER = 8192  # ended transfers kept to answer late frames


class _Corrupt(Exception):
    """The byte stream of a connection cannot be trusted any more."""


class _Lost(Exception):
    """The peer went away (EOF inside a frame, reset)."""


def _pack_header(buf, ftype: int, flags: int, tid: int, seq: int, n_pieces: int, payload_len: int, table_crc: int) -> None:
    _BODY.pack_into(buf, 0, MAGIC, VERSION, ftype, flags, tid, seq, n_pieces, payload_len, table_crc)
    _U32.pack_into(buf, _BODY.size, zlib.crc32(memoryview(buf)[: _BODY.size]))


def _parse_header(buf) -> tuple[int, int, int, int, int, int, int]:
    """-> (type, flags, tid, seq, n_pieces, payload_len, table_crc); raises _Corrupt."""
    magic, version, ftype, flags, tid, seq, n, plen, tcrc = _BODY.unpack_from(buf)
    if magic != MAGIC:
        raise _Corrupt(f"bad magic {magic:#x}")
    if zlib.crc32(memoryview(buf)[: _BODY.size]) != _U32.unpack_from(buf, _BODY.size)[0]:
        raise _Corrupt("header CRC mismatch")
    if version != VERSION:
        raise _Corrupt(f"unsupported version {version}")
    if ftype not in (DATA, FINISH, ACK, ERROR) or n > MAX_PIECES or (n and ftype != DATA):
        raise _Corrupt(f"malformed frame (type {ftype}, {n} pieces)")
    return ftype, flags, tid, seq, n, plen, tcrc


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise _Lost("connection closed inside a frame")
        got += k


def _set_sndtimeo(sock: socket.socket, seconds: float) -> None:
    """Kernel send timeout on a blocking socket: a stalled send returns (partial count
    or EAGAIN) instead of blocking for ever, while full-speed sends stay in C."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host.strip("[]"), int(port)


class _Coverage:
    """Byte spans written so far, each byte counted once. Spans are appended as they
    land (O(1)); only once the running count reaches the expected total are they
    sorted and merged, which discounts bytes written twice."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.count = 0  # >= bytes covered (overlaps counted twice until settle)

    def extend(self, spans: list[tuple[int, int]], nbytes: int) -> None:
        self.spans.extend(spans)
        self.count += nbytes

    def settle(self) -> int:
        merged: list[list[int]] = []
        for s, e in sorted(self.spans):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.spans = [(s, e) for s, e in merged]
        self.count = sum(e - s for s, e in merged)
        return self.count


@dataclass
class _Expected:
    """Receiver-side state of one live transfer."""

    starts: list[int]  # merged expected ranges, sorted
    ends: list[int]
    total: int
    deadline: float
    want_trailer: bool
    covered: _Coverage = field(default_factory=_Coverage)
    trailer: bytes | None = None

    def contains(self, off: int, length: int) -> bool:
        k = bisect.bisect_right(self.starts, off) - 1
        return k >= 0 and off + length <= self.ends[k]

    def complete(self) -> bool:
        if self.trailer is None and self.want_trailer:
            return False
        return self.covered.count >= self.total and self.covered.settle() == self.total


class _RConn:
    """One accepted connection; its reader thread is the only one reading or sending."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.open: dict[int, int] = {}  # tid -> data frames written since its FINISH (receiver lock)
        self.told: set[int] = set()  # ended tids this sender was told about (reader thread)
        self.writing: int | None = None  # tid a recv is landing in the region now (receiver lock)
        self.hdr = memoryview(bytearray(HEADER_SIZE))
        self.table = memoryview(bytearray(MAX_PIECES * PIECE_SIZE))
        self.reply = bytearray(HEADER_SIZE + MAX_DETAIL)
        self.scratch = memoryview(bytearray(_SCRATCH))
        self.thread: threading.Thread | None = None
        self._sock_lock = threading.Lock()  # shutdown (any thread) vs close (reader)
        self._closed = False

    def shutdown(self) -> None:
        with self._sock_lock:
            if not self._closed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._sock_lock:
            if not self._closed:
                self._closed = True
                self.sock.close()


_CANCELLED = object()  # _ended marker: cancelled by the receiver
_UNKNOWN = object()


class TcpReceiver(KVReceiver):
    """Listens on `host:port` (loopback and a free port by default) and lands KV bytes
    sent by TcpSenders into `region`, a contiguous CPU tensor (the rank's KV cache)."""

    def __init__(self, region: torch.Tensor, host: str = "127.0.0.1", port: int = 0, *, cancel_grace: float = 0.5, reply_timeout: float = 5.0) -> None:
        self._region = region  # keeps the memory alive under the view
        self._mv = region_bytes(region)
        self._cancel_grace = cancel_grace
        self._reply_timeout = reply_timeout
        self._lock = threading.Lock()
        self._writes = threading.Condition(self._lock)  # a conn's `writing` went back to None
        self._timer_cv = threading.Condition(self._lock)  # a new deadline, or close
        self._live: dict[int, _Expected] = {}
        self._ended: collections.OrderedDict[int, object] = collections.OrderedDict()  # None | TransferError | _CANCELLED
        self._results: dict[int, TransferError | None] = {}
        self._trailers: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._deadlines: list[tuple[float, int]] = []  # heap
        self._conns: set[_RConn] = set()
        self._closed = False
        self._listener = socket.create_server((host, port), backlog=64)
        self._listener.settimeout(0.2)  # the accept loop notices close within this
        h, p = self._listener.getsockname()[:2]
        self._endpoint = f"{h}:{p}"
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"braid-tcp-accept-{p}", daemon=True)
        self._timer = threading.Thread(target=self._timer_loop, name=f"braid-tcp-timer-{p}", daemon=True)
        self._acceptor.start()
        self._timer.start()

    # ---- public API --------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def num_connections(self) -> int:
        """Sender connections currently open (a gauge)."""
        with self._lock:
            return len(self._conns)

    def expect(self, transfer_id: int, ranges: Sequence[tuple[int, int]], deadline: float, want_trailer: bool = False) -> None:
        if not 0 <= transfer_id < 1 << 64:
            raise ValueError(f"transfer id must fit in u64, got {transfer_id}")
        size = self._mv.nbytes
        spans = []
        for off, length in ranges:
            if off < 0 or length < 0 or off + length > size:
                raise ValueError(f"range ({off}, {length}) is outside the region of {size} bytes")
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
        rx = _Expected(starts, ends, sum(e - s for s, e in zip(starts, ends)), deadline, want_trailer)
        with self._lock:
            if self._closed:
                raise RuntimeError("receiver is closed")
            if transfer_id in self._live:
                raise ValueError(f"transfer {transfer_id} is already expected")
            self._ended.pop(transfer_id, None)
            self._results.pop(transfer_id, None)
            self._trailers.pop(transfer_id, None)
            self._live[transfer_id] = rx
            if rx.complete():
                self._complete(transfer_id, rx)
                return
            heapq.heappush(self._deadlines, (deadline, transfer_id))
            self._timer_cv.notify()

    def poll(self) -> dict[int, TransferError | None]:
        with self._lock:
            out, self._results = self._results, {}
        return out

    def trailer(self, transfer_id: int) -> bytes | None:
        with self._lock:
            rx = self._live.get(transfer_id)
            return rx.trailer if rx is not None else self._trailers.get(transfer_id)

    def cancel(self, transfer_id: int) -> None:
        with self._lock:
            live = self._live.pop(transfer_id, None)
            # releasing a completed transfer keeps it complete, so an end marker still
            # on its way from another sender is acknowledged, not refused
            if live is not None or self._ended.get(transfer_id, _UNKNOWN) is not None:
                self._remember(transfer_id, _CANCELLED)
            self._results.pop(transfer_id, None)
            self._trailers.pop(transfer_id, None)
        self._quiesce(transfer_id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._live.clear()
            self._timer_cv.notify_all()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
        self._acceptor.join(timeout=2.0)  # else it notices `_closed` within its 0.2 s timeout
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.shutdown()
        for c in conns:
            if c.thread is not None:
                c.thread.join(timeout=2.0)
            c.close()
        self._timer.join(timeout=2.0)

    # ---- bookkeeping (receiver lock held) ------------------------------------------

    def _remember(self, tid: int, status: object) -> None:
        self._ended[tid] = status
        self._ended.move_to_end(tid)
        while len(self._ended) > _REMEMBER:
            old, _ = self._ended.popitem(last=False)
            self._trailers.pop(old, None)

    def _complete(self, tid: int, rx: _Expected) -> None:
        del self._live[tid]
        self._remember(tid, None)
        if rx.trailer is not None:
            self._trailers[tid] = rx.trailer
        self._results[tid] = None

    def _writers_of(self, tid: int) -> list[_RConn]:
        return [c for c in self._conns if c.writing == tid]

    # ---- failure paths -------------------------------------------------------------

    def _quiesce(self, tid: int) -> None:
        """Return once no recv is landing bytes of `tid` (which is no longer live, so
        none can start). A recv that does not end within the grace period has its
        connection shut down, which makes the kernel return it at once."""
        with self._writes:
            if self._writes.wait_for(lambda: not self._writers_of(tid), self._cancel_grace):
                return
            stuck = self._writers_of(tid)
        for c in stuck:
            log.warning("shutting down %s: a recv of cancelled transfer %d did not end", c.name, tid)
            c.shutdown()
        with self._writes:
            if not self._writes.wait_for(lambda: not self._writers_of(tid), 4 * self._cancel_grace + 1.0):
                log.error("a recv of transfer %d is still landing after shutdown", tid)

    def _fail(self, tid: int, err: TransferError) -> None:
        with self._lock:
            if self._live.pop(tid, None) is None:
                return
            self._remember(tid, err)
        self._quiesce(tid)  # report only once nothing of tid can land any more
        with self._lock:
            if self._ended.get(tid) is err:
                self._results[tid] = err

    def _timer_loop(self) -> None:
        while True:
            with self._timer_cv:
                if self._closed:
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
                self._fail(tid, TransferError(tid, "timeout", "not complete at its deadline"))

    # ---- connections ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._listener.accept()
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_sndtimeo(sock, self._reply_timeout)  # a peer that never reads ACKs cannot block the reader
            c = _RConn(sock, f"{addr[0]}:{addr[1]}->{self._endpoint}")
            c.thread = threading.Thread(target=self._serve, args=(c,), name=f"braid-tcp-read-{addr[1]}", daemon=True)
            with self._lock:
                if self._closed:
                    c.close()
                    return
                self._conns.add(c)
            c.thread.start()

    def _serve(self, c: _RConn) -> None:
        kind, detail = "peer_lost", f"sender connection {c.name} closed"
        try:
            while self._read_frame(c):
                pass
        except _Corrupt as e:
            kind, detail = "corrupt", f"{e} on {c.name}"
        except (_Lost, OSError) as e:
            detail = f"{e or type(e).__name__} on {c.name}"
        finally:
            with self._lock:
                self._conns.discard(c)
                tids = [] if self._closed else list(c.open)
                c.open.clear()
            c.shutdown()
            c.close()
            for tid in tids:
                self._fail(tid, TransferError(tid, kind, detail))

    def _read_frame(self, c: _RConn) -> bool:
        """Handle one frame; False on a clean EOF between frames."""
        k = c.sock.recv_into(c.hdr, HEADER_SIZE, socket.MSG_WAITALL)
        if k == 0:
            return False
        if k < HEADER_SIZE:
            _recv_exact(c.sock, c.hdr[k:])
        ftype, flags, tid, seq, n, plen, tcrc = _parse_header(c.hdr)
        if ftype == DATA:
            table = c.table[: n * PIECE_SIZE]
            _recv_exact(c.sock, table)
            if zlib.crc32(table) != tcrc:
                raise _Corrupt("piece table CRC mismatch")
            self._on_data(c, tid, seq, np.frombuffer(table, dtype="<u8").tolist(), plen)
        elif ftype == FINISH:
            if plen > MAX_TRAILER:
                raise _Corrupt(f"trailer of {plen} bytes")
            buf = bytearray(plen)
            _recv_exact(c.sock, memoryview(buf))
            self._on_finish(c, tid, seq, bytes(buf) if flags & FLAG_TRAILER else None)
        elif ftype == ERROR:
            if plen > MAX_DETAIL or flags not in _CODE_KIND:
                raise _Corrupt("malformed error frame")
            buf = bytearray(plen)
            _recv_exact(c.sock, memoryview(buf))
            with self._lock:
                c.open.pop(tid, None)
            detail = buf.decode("utf-8", "replace")
            self._fail(tid, TransferError(tid, _CODE_KIND[flags], f"sender: {detail}"))
        else:
            raise _Corrupt("ACK frame from a sender")
        return True

    def _on_data(self, c: _RConn, tid: int, seq: int, table: list[int], plen: int) -> None:
        offs, lens = table[0::2], table[1::2]
        err = None
        with self._lock:
            rx = self._live.get(tid)
            if rx is not None:
                if sum(lens) != plen:
                    err = TransferError(tid, "corrupt", f"frame payload {plen} != sum of piece lengths")
                elif seq != c.open.get(tid, 0):
                    err = TransferError(tid, "refused", f"data frames {c.open.get(tid, 0)}..{seq - 1} arrived before expect")
                elif not all(rx.contains(o, n) for o, n in zip(offs, lens)):
                    err = TransferError(tid, "corrupt", "a piece lies outside the expected ranges")
                else:
                    c.open[tid] = seq + 1
        if rx is None or err is not None:
            if err is not None:
                self._fail(tid, err)
            self._drain(c, plen)
            self._tell_ended(c, tid)
            return
        self._land(c, tid, rx, offs, lens, plen)

    def _land(self, c: _RConn, tid: int, rx: _Expected, offs: list[int], lens: list[int], plen: int) -> None:
        """recvmsg_into the payload straight into the region, at most _RECV_CHUNK bytes
        and _IOV_MAX slices per call; each call starts only while tid is live."""
        mv, n = self._mv, len(offs)
        i = d = 0  # cursor: piece i, d bytes into it
        left = plen
        while left:
            bufs, spans = [], []
            budget = _RECV_CHUNK
            j, e = i, d
            while j < n and budget and len(bufs) < _IOV_MAX:
                o = offs[j] + e
                take = min(lens[j] - e, budget)
                if take:
                    bufs.append(mv[o : o + take])
                    spans.append((o, o + take))
                budget -= take
                e += take
                if e == lens[j]:
                    j, e = j + 1, 0
            with self._lock:
                if self._live.get(tid) is not rx:
                    break
                c.writing = tid
            try:
                got = c.sock.recvmsg_into(bufs, 0, socket.MSG_WAITALL)[0]
            finally:
                with self._lock:
                    c.writing = None
                    self._writes.notify_all()
            if got == 0:
                raise _Lost("connection closed inside a data frame")
            left -= got
            if got == _RECV_CHUNK - budget:
                i, d = j, e
            else:  # cut short (a signal, a shutdown): count what landed, go on from there
                spans, rest = [], got
                while rest:
                    take = min(lens[i] - d, rest)
                    spans.append((offs[i] + d, offs[i] + d + take))
                    rest -= take
                    d += take
                    if d == lens[i]:
                        i, d = i + 1, 0
            with self._lock:
                if self._live.get(tid) is rx:
                    rx.covered.extend(spans, got)
                    if rx.complete():
                        self._complete(tid, rx)
        self._drain(c, left)

    def _drain(self, c: _RConn, nbytes: int) -> None:
        while nbytes:
            k = c.sock.recv_into(c.scratch, min(nbytes, _SCRATCH), socket.MSG_WAITALL)
            if k == 0:
                raise _Lost("connection closed inside a frame")
            nbytes -= k

    def _on_finish(self, c: _RConn, tid: int, seq: int, trailer: bytes | None) -> None:
        err = None
        with self._lock:
            written = c.open.pop(tid, 0)
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
            self._fail(tid, err)
        self._reply(c, tid, err)

    def _tell_ended(self, c: _RConn, tid: int) -> None:
        """Data keeps coming for a transfer that failed or was cancelled here: tell
        the sender once, so it drops the rest and frees its blocks before `finish`."""
        with self._lock:
            status = self._ended.get(tid)
            if tid in c.told or not (status is _CANCELLED or isinstance(status, TransferError)):
                return
            c.open.pop(tid, None)  # it will not send that FINISH
        if len(c.told) >= _REMEMBER:
            c.told.clear()
        c.told.add(tid)
        err = status if isinstance(status, TransferError) else TransferError(tid, "aborted", "cancelled by the receiver")
        self._reply(c, tid, err)

    def _reply(self, c: _RConn, tid: int, err: TransferError | None) -> None:
        if err is None:
            _pack_header(c.reply, ACK, 0, tid, 0, 0, 0, 0)
            c.sock.sendall(memoryview(c.reply)[:HEADER_SIZE])
            return
        detail = (err.detail or err.kind).encode()[:MAX_DETAIL]
        c.reply[HEADER_SIZE : HEADER_SIZE + len(detail)] = detail
        _pack_header(c.reply, ERROR, _KIND_CODE[err.kind], tid, 0, 0, len(detail), 0)
        c.sock.sendall(memoryview(c.reply)[: HEADER_SIZE + len(detail)])


# ---------------------------------------------------------------------------------------
# sender


@dataclass
class _Tx:
    """Sender-side state of one transfer."""

    deadline: float | None = None
    unfinished: set[str] = field(default_factory=set)  # endpoints sent to, no finish yet
    pending: set[str] = field(default_factory=set)  # endpoints finished, no ACK yet
    error: TransferError | None = None


class _SConn:
    """The one connection of a sender to an endpoint: a queue, a writer thread that
    connects lazily and writes frames, a reader thread for ACK/ERROR frames."""

    def __init__(self, endpoint: str, lock: threading.Lock) -> None:
        self.endpoint = endpoint
        self.addr = _parse_endpoint(endpoint)
        self.sock: socket.socket | None = None
        self.queue: collections.deque[tuple] = collections.deque()  # (kind, tid, payload, deadline)
        self.cv = threading.Condition(lock)
        self.tids: set[int] = set()  # transfers with frames queued or sent here and no reply yet
        self.seq: dict[int, int] = {}  # tid -> data frames written (writer thread only)
        self.dead = False
        self.hdr = bytearray(HEADER_SIZE + MAX_PIECES * PIECE_SIZE)
        self.hdr_mv = memoryview(self.hdr)
        self.writer: threading.Thread | None = None
        self.reader: threading.Thread | None = None
        self.sock_lock = threading.Lock()  # shutdown (any thread) vs close (writer)

    def shutdown(self) -> None:
        with self.sock_lock:
            if self.sock is not None and self.sock.fileno() >= 0:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _ConnFail(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class TcpSender(KVSender):
    """Sends byte ranges of `region` (a contiguous CPU tensor, the rank's KV cache) to
    TcpReceivers over one persistent connection per endpoint."""

    def __init__(self, region: torch.Tensor, *, connect_timeout: float = 5.0, stall_timeout: float = 10.0, poll_interval: float = 0.2) -> None:
        self._region = region
        self._mv = region_bytes(region)
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout  # for frames without a deadline (finish, error)
        self._poll = poll_interval  # a blocked send wakes this often to check its deadline
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # some transfer got an ACK or failed
        self._conns: dict[str, _SConn] = {}
        self._txs: dict[int, _Tx] = {}
        self._failed: collections.OrderedDict[int, TransferError] = collections.OrderedDict()
        self._failures: collections.deque[tuple[int, TransferError]] = collections.deque()  # for poll()
        self._threads: list[threading.Thread] = []
        self._closed = False

    # ---- public API --------------------------------------------------------------

    @property
    def num_connections(self) -> int:
        """Connections currently open or opening (a gauge)."""
        with self._lock:
            return len(self._conns)

    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float) -> None:
        size = self._mv.nbytes
        pieces = list(pieces)
        for p in pieces:
            if p.src_offset < 0 or p.dst_offset < 0 or p.length < 0 or p.src_offset + p.length > size:
                raise ValueError(f"{p} is outside the {size}-byte source region or negative")
        with self._lock:
            tx = self._tx(transfer_id)
            if tx is None:
                return  # failed or aborted: wait() raises
            if endpoint in tx.pending:
                raise ValueError(f"send to {endpoint} after its finish")
            tx.deadline = deadline if tx.deadline is None else max(tx.deadline, deadline)
            tx.unfinished.add(endpoint)
            if pieces:
                self._enqueue(endpoint, ("data", transfer_id, pieces, deadline))

    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None) -> None:
        if trailer is not None and len(trailer) > MAX_TRAILER:
            raise ValueError(f"trailer of {len(trailer)} bytes exceeds {MAX_TRAILER}")
        with self._lock:
            tx = self._tx(transfer_id)
            if tx is None:
                return
            if endpoint in tx.pending:
                raise ValueError(f"finish to {endpoint} twice")
            tx.unfinished.discard(endpoint)
            tx.pending.add(endpoint)
            self._enqueue(endpoint, ("finish", transfer_id, trailer, tx.deadline))

    def wait(self, transfer_id: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self._lock:
            tx = self._txs.get(transfer_id)
            if tx is None:
                if transfer_id in self._failed:
                    raise self._failed[transfer_id]
                raise ValueError(f"transfer {transfer_id} is unknown (or was already waited for)")
            if tx.unfinished and tx.error is None:
                raise ValueError(f"transfer {transfer_id} sent to {sorted(tx.unfinished)} without finish")
            if tx.deadline is not None:
                end = min(end, tx.deadline)
            while tx.error is None and tx.pending:
                left = end - time.monotonic()
                if left <= 0:
                    self._fail_tx(transfer_id, "timeout", "no acknowledgement by the deadline", notify=True)
                    break
                self._done.wait(left)
            self._txs.pop(transfer_id, None)
            if tx.error is not None:
                raise tx.error

    def poll(self) -> dict[int, TransferError | None]:
        """Transfers that ended since the last poll, without blocking: None once every
        endpoint acknowledged its finish, else the error. A transfer past its deadline
        fails here with "timeout". Reported transfers are forgotten (like wait)."""
        out: dict[int, TransferError | None] = {}
        now = time.monotonic()
        with self._lock:
            for tid, tx in list(self._txs.items()):
                if tx.error is None and not tx.pending and not tx.unfinished:
                    out[tid] = None
                    del self._txs[tid]
                elif tx.error is None and tx.deadline is not None and now > tx.deadline:
                    self._fail_tx(tid, "timeout", "no acknowledgement by the deadline", notify=True)
            while self._failures:
                tid, err = self._failures.popleft()
                out[tid] = err
        return out

    def abort(self, transfer_id: int) -> None:
        with self._lock:
            if transfer_id in self._txs:
                self._fail_tx(transfer_id, "aborted", "aborted by the sender", notify=True)
            elif transfer_id not in self._failed:
                self._remember_failed(transfer_id, TransferError(transfer_id, "aborted", "aborted by the sender"))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for tid in list(self._txs):
                self._fail_tx(tid, "aborted", "sender closed", notify=False)
            conns = list(self._conns.values())
            threads = list(self._threads)
        for c in conns:
            self._kill(c, "aborted", "sender closed")
        deadline = time.monotonic() + self._connect_timeout + 2.0
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # ---- bookkeeping (sender lock held) --------------------------------------------

    def _tx(self, tid: int) -> _Tx | None:
        if self._closed:
            raise RuntimeError("sender is closed")
        if tid in self._failed:
            return None
        tx = self._txs.get(tid)
        if tx is None:
            tx = self._txs[tid] = _Tx()
        return tx

    def _enqueue(self, endpoint: str, item: tuple) -> None:
        c = self._conns.get(endpoint)
        if c is None:
            c = self._conns[endpoint] = _SConn(endpoint, self._lock)
            c.writer = threading.Thread(target=self._write_loop, args=(c,), name=f"braid-tcp-write-{endpoint}", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(c.writer)
            c.writer.start()
        c.tids.add(item[1])
        c.queue.append(item)
        c.cv.notify()

    def _remember_failed(self, tid: int, err: TransferError) -> None:
        self._failed[tid] = err
        while len(self._failed) > _REMEMBER:
            self._failed.popitem(last=False)

    def _fail_tx(self, tid: int, kind: str, detail: str, notify: bool, skip: _SConn | None = None) -> None:
        """Fail `tid`: drop its queued frames everywhere; with `notify`, tell the
        receivers that have frames of it (except `skip`) with an ERROR frame."""
        tx = self._txs.get(tid)
        if tx is None or tx.error is not None:
            return
        tx.error = TransferError(tid, kind, detail)
        self._remember_failed(tid, tx.error)
        self._failures.append((tid, tx.error))
        del self._txs[tid]  # a waiter holds `tx` and sees the error; a later wait finds _failed
        for c in self._conns.values():
            if tid not in c.tids:
                continue
            c.tids.discard(tid)
            kept = [it for it in c.queue if it[1] != tid]
            c.queue.clear()
            c.queue.extend(kept)
            if notify and c is not skip:
                c.queue.append(("error", tid, (kind, detail), None))
                c.cv.notify()
        self._done.notify_all()

    # ---- connection threads --------------------------------------------------------

    def _kill(self, c: _SConn, kind: str, detail: str) -> None:
        """Close `c` for good: fail the transfers it carries; later sends reconnect."""
        with self._lock:
            if c.dead:
                return
            c.dead = True
            if self._conns.get(c.endpoint) is c:
                del self._conns[c.endpoint]
            c.queue.clear()
            tids, c.tids = c.tids, set()
            for tid in tids:
                self._fail_tx(tid, kind, detail, notify=True)
            c.cv.notify_all()
        c.shutdown()

    def _write_loop(self, c: _SConn) -> None:
        kind, detail = "peer_lost", "connection closed"
        try:
            while True:
                with self._lock:
                    while not c.queue and not c.dead:
                        c.cv.wait()
                    if c.dead:
                        return
                    what, tid, payload, deadline = c.queue.popleft()
                    if what != "error" and (tid in self._failed or tid not in c.tids):
                        continue
                    if what == "data" and time.monotonic() > deadline:
                        self._fail_tx(tid, "timeout", "deadline passed before the data was sent", notify=True)
                        continue
                if c.sock is None:  # an ERROR too: the receiver may be expecting the transfer
                    self._connect(c, deadline)
                if what == "data":
                    self._write_data(c, tid, payload, deadline)
                elif what == "finish":
                    flags = FLAG_TRAILER if payload is not None else 0
                    body = payload or b""
                    _pack_header(c.hdr, FINISH, flags, tid, c.seq.pop(tid, 0), 0, len(body), 0)
                    self._sendv(c, [c.hdr_mv[:HEADER_SIZE], memoryview(body)], deadline)
                else:
                    body = payload[1].encode()[:MAX_DETAIL]
                    c.seq.pop(tid, None)
                    _pack_header(c.hdr, ERROR, _KIND_CODE[payload[0]], tid, 0, 0, len(body), 0)
                    self._sendv(c, [c.hdr_mv[:HEADER_SIZE], memoryview(body)], None)
        except _ConnFail as e:
            kind, detail = e.kind, e.detail
        except OSError as e:
            detail = f"{e or type(e).__name__}"
        finally:
            self._kill(c, kind, f"{detail} ({c.endpoint})")
            c.shutdown()  # also when it was killed while connecting, before it had a socket
            if c.reader is not None:
                c.reader.join(timeout=2.0)
            with c.sock_lock:
                if c.sock is not None:
                    c.sock.close()

    def _connect(self, c: _SConn, deadline: float | None) -> None:
        limit = self._connect_timeout
        if deadline is not None:
            limit = max(0.05, min(limit, deadline - time.monotonic()))
        try:
            sock = socket.create_connection(c.addr, timeout=limit)
        except socket.timeout:
            raise _ConnFail("timeout", f"connect to {c.endpoint} timed out")
        except ConnectionRefusedError:
            raise _ConnFail("refused", f"connection to {c.endpoint} refused")
        except OSError as e:
            raise _ConnFail("peer_lost", f"connect to {c.endpoint}: {e}")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _set_sndtimeo(sock, self._poll)
        with c.sock_lock:
            c.sock = sock
        c.reader = threading.Thread(target=self._read_loop, args=(c,), name=f"braid-tcp-ack-{c.endpoint}", daemon=True)
        c.reader.start()
        if c.dead:  # killed while connecting
            raise _ConnFail("aborted", "connection closed while connecting")

    def _write_data(self, c: _SConn, tid: int, pieces: list[Piece], deadline: float) -> None:
        runs: list[tuple[int, int, int]] = []  # (src, dst, length), contiguous pieces merged
        rs = rd = -1
        rl = 0
        for p in pieces:
            s, d, ln = p.src_offset, p.dst_offset, p.length
            if s == rs + rl and d == rd + rl:
                rl += ln
                continue
            if rl:
                runs.append((rs, rd, rl))
            rs, rd, rl = s, d, ln
        if rl:
            runs.append((rs, rd, rl))
        mv = self._mv
        for k in range(0, len(runs), MAX_PIECES):
            frame = runs[k : k + MAX_PIECES]
            n = len(frame)
            table = [x for _, d, ln in frame for x in (d, ln)]
            struct.pack_into(f"<{2 * n}Q", c.hdr, HEADER_SIZE, *table)
            end = HEADER_SIZE + n * PIECE_SIZE
            seq = c.seq.get(tid, 0)
            c.seq[tid] = seq + 1
            _pack_header(c.hdr, DATA, 0, tid, seq, n, sum(table[1::2]), zlib.crc32(c.hdr_mv[HEADER_SIZE:end]))
            self._sendv(c, [c.hdr_mv[:end]] + [mv[s : s + ln] for s, _, ln in frame], deadline)

    def _sendv(self, c: _SConn, bufs: list[memoryview], deadline: float | None) -> None:
        """sendmsg the buffers in order; the socket's SO_SNDTIMEO wakes a stalled send
        every poll interval to check the deadline and whether the connection died."""
        if deadline is None:
            deadline = time.monotonic() + self._stall_timeout
        sock, i, n = c.sock, 0, len(bufs)
        while i < n:
            try:
                sent = sock.sendmsg(bufs[i : i + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            while sent:
                b = bufs[i]
                if sent >= b.nbytes:
                    sent -= b.nbytes
                    i += 1
                else:
                    bufs[i] = b[sent:]
                    sent = 0
            while i < n and not bufs[i].nbytes:
                i += 1
            if i < n:
                if c.dead:
                    raise _ConnFail("aborted", "connection closed")
                if time.monotonic() > deadline:
                    raise _ConnFail("timeout", "the receiver stopped reading")

    def _read_loop(self, c: _SConn) -> None:
        hdr = memoryview(bytearray(HEADER_SIZE))
        kind, detail = "peer_lost", "receiver closed the connection"
        try:
            while True:
                k = c.sock.recv_into(hdr, HEADER_SIZE, socket.MSG_WAITALL)
                if k == 0:
                    break
                if k < HEADER_SIZE:
                    _recv_exact(c.sock, hdr[k:])
                ftype, flags, tid, _, _, plen, _ = _parse_header(hdr)
                if ftype == ACK and not plen:
                    with self._lock:
                        c.tids.discard(tid)
                        tx = self._txs.get(tid)
                        if tx is not None and tx.error is None:
                            tx.pending.discard(c.endpoint)
                            self._done.notify_all()
                elif ftype == ERROR and plen <= MAX_DETAIL and flags in _CODE_KIND:
                    buf = bytearray(plen)
                    _recv_exact(c.sock, memoryview(buf))
                    with self._lock:
                        c.tids.discard(tid)
                        self._fail_tx(tid, _CODE_KIND[flags], "receiver: " + buf.decode("utf-8", "replace"), notify=True, skip=c)
                else:
                    raise _Corrupt(f"unexpected frame type {ftype} from a receiver")
        except _Corrupt as e:
            kind, detail = "corrupt", str(e)
        except (_Lost, OSError) as e:
            detail = f"{e or type(e).__name__}"
        self._kill(c, kind, f"{detail} ({c.endpoint})")
