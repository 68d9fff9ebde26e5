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
    5   1  type         1 DATA, 2 FINISH, 3 ACK, 4 ERROR, 5 AUTH
    6   2  flags        FINISH: bit 0 = a trailer follows; ERROR: kind code
                        (1 + index in TransferError.KINDS)
    8   8  transfer id
   16   4  seq          DATA: index of this frame among the transfer's data frames on
                        this connection; FINISH: how many data frames were sent on it
   20   4  n_pieces     DATA: entries in the piece table (<= MAX_PIECES); else 0
   24   8  payload_len  bytes after the piece table: DATA sum of piece lengths, FINISH
                        the trailer, ERROR a utf-8 detail, AUTH the transfer's
                        secret (<= MAX_SECRET bytes), ACK 0
   32   4  table_crc    CRC32 of the piece table
   36   4  header_crc   CRC32 of bytes 0..35
Piece table: n_pieces x (dst_offset u64, length u64); the payload follows in table
order. Headers carry CRCs because a framing error would scatter bytes across the
region; the payload relies on TCP's checksum (a CRC over gigabytes costs too much).
An AUTH frame presents a transfer's secret (minted by the decode node per reservation)
on a connection before that connection's first DATA or FINISH of the transfer; the
receiver's book drops (and counts) frames of a transfer expected with a secret that come
over a connection which did not present it. DATA, FINISH and AUTH go sender -> receiver, ACK receiver -> sender, ERROR both ways: a
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

The receiver's and sender's books (receiver_book.py, sender_book.py) are shared with
the collective and mooncake transports; what is tcp's own: transfer ids are u64
(checked where they are given, on both sides), a transfer counts its bytes with
LazyCoverage (a recvmsg_into lands up to _IOV_MAX spans), and closing a sender shuts its
connections at once (there is no CLOSE frame). The socket side of connections
(sockets.py: SocketReceiver accepting, a thread per connection; SocketSender
connecting, a reader thread for replies) is shared with the mooncake transport's
control channel.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import torch

from .base import Piece, TransferError, region_bytes
from .common import CODE_KIND, KIND_CODE, MAX_PIECES, MAX_SECRET, MAX_TRAILER, U64_IDS, ConnFail, merge_runs, parse_endpoint
from .receiver_book import Expected, LazyCoverage, ReceiverBook
from .sender_book import SenderBook
from .sockets import (
    Corrupt, Lost, SocketRConn, SocketReceiver, SocketSConn, SocketSender, check_deadline, recv_exact, recv_header,
)

MAGIC = int.from_bytes(b"BRKV", "little")
VERSION = 1
DATA, FINISH, ACK, ERROR, AUTH = 1, 2, 3, 4, 5
FLAG_TRAILER = 1

_BODY = struct.Struct("<IBBHQIIQI")  # the header up to header_crc
_U32 = struct.Struct("<I")
HEADER_SIZE = _BODY.size + 4  # 40
PIECE_SIZE = 16
MAX_DETAIL = 4096

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_RECV_CHUNK = 8 << 20  # bytes per recvmsg_into: bounds how long cancel waits for a landing recv
_SCRATCH = 1 << 20
MIN_RATE = 1 << 20  # bytes/s a sender must keep up within a frame (beyond the frame timeout)
SENDER_IDLE_CLOSE_S = 60.0  # a sender closes a connection idle this long: well inside a receiver's idle timeout


# ---------------------------------------------------------------------------------------
# frames


def _pack_header(buf, ftype: int, flags: int, tid: int, seq: int, n_pieces: int, payload_len: int, table_crc: int) -> None:
    _BODY.pack_into(buf, 0, MAGIC, VERSION, ftype, flags, tid, seq, n_pieces, payload_len, table_crc)
    _U32.pack_into(buf, _BODY.size, zlib.crc32(memoryview(buf)[: _BODY.size]))


def _parse_header(buf) -> tuple[int, int, int, int, int, int, int]:
    """-> (type, flags, tid, seq, n_pieces, payload_len, table_crc); raises Corrupt."""
    magic, version, ftype, flags, tid, seq, n, plen, tcrc = _BODY.unpack_from(buf)
    if magic != MAGIC:
        raise Corrupt(f"bad magic {magic:#x}")
    if zlib.crc32(memoryview(buf)[: _BODY.size]) != _U32.unpack_from(buf, _BODY.size)[0]:
        raise Corrupt("header CRC mismatch")
    if version != VERSION:
        raise Corrupt(f"unsupported version {version}")
    if ftype not in (DATA, FINISH, ACK, ERROR, AUTH) or n > MAX_PIECES or (n and ftype != DATA):
        raise Corrupt(f"malformed frame (type {ftype}, {n} pieces)")
    return ftype, flags, tid, seq, n, plen, tcrc


def _read_header(sock: socket.socket, hdr: memoryview, idle_deadline: float | None = None,
                 frame_s: float = 0.0) -> tuple[int, int, int, int, int, int, int] | None:
    """The next frame's header, read into `hdr` and parsed; None on a clean EOF between
    frames (deadlines as sockets.recv_header's)."""
    return _parse_header(hdr) if recv_header(sock, hdr, idle_deadline, frame_s) else None


# ---------------------------------------------------------------------------------------
# receiver


class _RConn(SocketRConn):
    def __init__(self, sock: socket.socket, name: str) -> None:
        super().__init__(sock, name)
        # an idle connection holds only its header: the piece table and replies are
        # allocated per frame, and drained payloads share the receiver's scratch
        self.hdr = memoryview(bytearray(HEADER_SIZE))


class TcpReceiver(SocketReceiver):
    """Listens on `host:port` (loopback and a free port by default) and lands KV bytes
    sent by TcpSenders into `region`, a contiguous CPU tensor (the rank's KV cache).

    Limits against a sender that only holds connections: at most `max_connections`
    (at the cap the oldest idle one is closed to make room, see sockets.py); a
    connection that begins no frame within `idle_timeout` s is closed; a frame must
    arrive whole within `frame_timeout` s plus 1 s per MIN_RATE bytes of its declared
    payload, and may declare no more payload than the region holds (else it is
    malformed: "corrupt")."""

    _rconn = _RConn

    def __init__(self, region: torch.Tensor, host: str = "127.0.0.1", port: int = 0, *, cancel_grace: float = 0.5,
                 reply_timeout: float = 5.0, max_connections: int = 256, idle_timeout: float = 300.0,
                 frame_timeout: float = 30.0) -> None:
        self._region = region  # keeps the memory alive under the view
        self._mv = region_bytes(region)
        self._reply_timeout = reply_timeout
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._frame_timeout = frame_timeout
        self._rcv_poll = min(1.0, max(0.02, min(idle_timeout, frame_timeout) / 4))
        self._scratch = memoryview(bytearray(_SCRATCH))  # drained payloads land here, whichever connection (never read)
        self._listener = socket.create_server((host, port), backlog=64)
        h, p = self._listener.getsockname()[:2]
        self._endpoint = f"{h}:{p}"
        self._book = ReceiverBook(self._mv.nbytes, cancel_grace, f"braid-tcp-timer-{p}", tids=U64_IDS, coverage=LazyCoverage)
        self._start_accepting(f"braid-tcp-accept-{p}", "braid-tcp-read")

    @property
    def endpoint(self) -> str:
        return self._endpoint

    # ---- connections ---------------------------------------------------------------

    def _handle(self, c: _RConn) -> bool:
        """Handle one frame; False on a clean EOF between frames."""
        c.idle = True
        header = _read_header(c.sock, c.hdr, time.monotonic() + self._idle_timeout, self._frame_timeout)
        if header is None:
            return False
        c.idle = False
        ftype, flags, tid, seq, n, plen, tcrc = header
        if plen > self._mv.nbytes:  # no legitimate frame carries more than the whole region
            raise Corrupt(f"a frame declaring {plen} bytes of payload, more than the {self._mv.nbytes}-byte region")
        deadline = time.monotonic() + self._frame_timeout + plen / MIN_RATE
        if ftype == DATA:
            table = memoryview(bytearray(n * PIECE_SIZE))
            recv_exact(c.sock, table, deadline)
            if zlib.crc32(table) != tcrc:
                raise Corrupt("piece table CRC mismatch")
            self._on_data(c, tid, seq, np.frombuffer(table, dtype="<u8").tolist(), plen, deadline)
        elif ftype == FINISH:
            if plen > MAX_TRAILER:
                raise Corrupt(f"trailer of {plen} bytes")
            buf = bytearray(plen)
            recv_exact(c.sock, memoryview(buf), deadline)
            self._reply(c, tid, self._book.on_finish(c, tid, seq, bytes(buf) if flags & FLAG_TRAILER else None))
        elif ftype == ERROR:
            if plen > MAX_DETAIL or flags not in CODE_KIND:
                raise Corrupt("malformed error frame")
            buf = bytearray(plen)
            recv_exact(c.sock, memoryview(buf), deadline)
            self._book.on_abort(c, tid, CODE_KIND[flags], buf.decode("utf-8", "replace"))
        elif ftype == AUTH:
            if plen > MAX_SECRET:
                raise Corrupt(f"secret of {plen} bytes")
            buf = bytearray(plen)
            recv_exact(c.sock, memoryview(buf), deadline)
            err = self._book.authenticate(c, tid, bytes(buf))
            if err is not None:
                self._reply(c, tid, err)
        else:
            raise Corrupt("ACK frame from a sender")
        return True

    def _on_data(self, c: _RConn, tid: int, seq: int, table: list[int], plen: int, deadline: float) -> None:
        offs, lens = table[0::2], table[1::2]
        rx = self._book.admit(c, tid, seq, offs, lens, plen)
        if rx is None:  # unknown, ended, unauthenticated, or failed just now: drained, not written
            self._drain(c, plen, deadline)
            err = self._book.tell_ended(c, tid)
            if err is not None:
                self._reply(c, tid, err)
            return
        self._land(c, tid, rx, offs, lens, plen, deadline)

    def _land(self, c: _RConn, tid: int, rx: Expected, offs: list[int], lens: list[int], plen: int, deadline: float) -> None:
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
            if not self._book.begin_write(c, tid, rx):
                break
            got = 0
            try:
                try:
                    got = c.sock.recvmsg_into(bufs, 0, socket.MSG_WAITALL)[0]
                except (BlockingIOError, InterruptedError):  # the receive timeout woke it: nothing came
                    got = -1
                if got <= 0:
                    pass
                elif got == _RECV_CHUNK - budget:
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
            finally:
                self._book.end_write(c, tid, rx, spans if got > 0 else ())
            if got < 0:
                check_deadline(deadline, "the sender did not send a whole data frame in time")
                continue
            if got == 0:
                raise Lost("connection closed inside a data frame")
            left -= got
        self._drain(c, left, deadline)

    def _drain(self, c: _RConn, nbytes: int, deadline: float) -> None:
        while nbytes:
            try:
                k = c.sock.recv_into(self._scratch, min(nbytes, _SCRATCH), socket.MSG_WAITALL)
            except (BlockingIOError, InterruptedError):
                check_deadline(deadline, "the sender did not send a whole frame in time")
                continue
            if k == 0:
                raise Lost("connection closed inside a frame")
            nbytes -= k

    def _reply(self, c: _RConn, tid: int, err: TransferError | None) -> None:
        reply = bytearray(HEADER_SIZE)
        if err is None:
            _pack_header(reply, ACK, 0, tid, 0, 0, 0, 0)
            c.sock.sendall(reply)
            return
        detail = (err.detail or err.kind).encode()[:MAX_DETAIL]
        _pack_header(reply, ERROR, KIND_CODE[err.kind], tid, 0, 0, len(detail), 0)
        c.sock.sendall(bytes(reply) + detail)


# ---------------------------------------------------------------------------------------
# sender


class _SConn(SocketSConn):
    def __init__(self, endpoint: str, lock: threading.Lock) -> None:
        super().__init__(endpoint, lock, parse_endpoint(endpoint), endpoint)
        self.hdr = bytearray(HEADER_SIZE + MAX_PIECES * PIECE_SIZE)  # writer thread
        self.hdr_mv = memoryview(self.hdr)
        self.ack_hdr = memoryview(bytearray(HEADER_SIZE))  # reader thread


class TcpSender(SocketSender):
    """Sends byte ranges of `region` (a contiguous CPU tensor, the rank's KV cache) to
    TcpReceivers over one persistent connection per endpoint."""

    _sconn = _SConn
    _thread_names = ("braid-tcp-write", "braid-tcp-ack")

    def __init__(self, region: torch.Tensor, *, connect_timeout: float = 5.0, stall_timeout: float = 10.0, poll_interval: float = 0.2,
                 idle_close: float = SENDER_IDLE_CLOSE_S) -> None:
        self._region = region
        self._mv = region_bytes(region)
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout  # for frames without a deadline (finish, error)
        self._sndtimeo = poll_interval  # a blocked send wakes this often to check its deadline
        self._book = SenderBook(self._mv.nbytes, self._new_conn, MAX_TRAILER, tids=U64_IDS, idle_close_s=idle_close)
        self._threads: list[threading.Thread] = []

    @property
    def num_connections(self) -> int:
        """Connections currently open or opening (a gauge)."""
        with self._book.lock:
            return len(self._book.conns)

    def close(self) -> None:
        conns = self._book.close(ask_writers=False)  # no CLOSE frame: the connections are shut at once
        with self._book.lock:
            threads, self._threads = self._threads, []
        for c in conns:
            self._book.kill(c, "aborted", "sender closed")
        deadline = time.monotonic() + self._connect_timeout + 2.0
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # ---- connection threads --------------------------------------------------------

    def _write_finish(self, c: _SConn, tid: int, seq: int, trailer: bytes | None, deadline: float | None) -> None:
        body = trailer or b""
        _pack_header(c.hdr, FINISH, FLAG_TRAILER if trailer is not None else 0, tid, seq, 0, len(body), 0)
        self._sendv(c, [c.hdr_mv[:HEADER_SIZE], memoryview(body)], deadline)

    def _write_auth(self, c: _SConn, tid: int, secret: bytes, deadline: float | None) -> None:
        if len(secret) > MAX_SECRET:
            raise ConnFail("refused", f"a secret of {len(secret)} bytes (at most {MAX_SECRET})")
        _pack_header(c.hdr, AUTH, 0, tid, 0, 0, len(secret), 0)
        self._sendv(c, [c.hdr_mv[:HEADER_SIZE], memoryview(secret)], deadline)

    def _write_abort(self, c: _SConn, tid: int, kind: str, detail: str) -> None:
        body = detail.encode()[:MAX_DETAIL]
        _pack_header(c.hdr, ERROR, KIND_CODE[kind], tid, 0, 0, len(body), 0)
        self._sendv(c, [c.hdr_mv[:HEADER_SIZE], memoryview(body)], None)

    def _write_data(self, c: _SConn, tid: int, pieces: list[Piece], deadline: float) -> None:
        runs = merge_runs(pieces)
        mv = self._mv
        for k in range(0, len(runs), MAX_PIECES):
            frame = runs[k : k + MAX_PIECES]
            n = len(frame)
            table = [x for _, d, ln in frame for x in (d, ln)]
            struct.pack_into(f"<{2 * n}Q", c.hdr, HEADER_SIZE, *table)
            end = HEADER_SIZE + n * PIECE_SIZE
            seq = c.next_seq(tid)
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
                    raise ConnFail("aborted", "connection closed")
                if time.monotonic() > deadline:
                    raise ConnFail("timeout", "the receiver stopped reading")

    def _read_reply(self, c: _SConn) -> bool:
        header = _read_header(c.sock, c.ack_hdr)
        if header is None:
            return False
        ftype, flags, tid, _, _, plen, _ = header
        if ftype == ACK and not plen:
            self._book.acked(c, tid, None)
        elif ftype == ERROR and plen <= MAX_DETAIL and flags in CODE_KIND:
            buf = bytearray(plen)
            recv_exact(c.sock, memoryview(buf))
            self._book.acked(c, tid, TransferError(tid, CODE_KIND[flags], buf.decode("utf-8", "replace")))
        else:
            raise Corrupt(f"unexpected frame type {ftype} from a receiver")
        return True
