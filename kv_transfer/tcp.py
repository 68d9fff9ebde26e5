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

The receiver and sender bookkeeping (RxLedger, TxLedger) is ledger.py's, shared with
the collective and mooncake transports; what is tcp's own: transfer ids are u64
(checked where they are given, on both sides), a transfer counts its bytes with
LazyCoverage (a recvmsg_into lands up to _IOV_MAX spans), and closing a sender shuts its
connections at once (there is no CLOSE frame). The socket side of connections
(SocketReceiver: accepting, a thread per connection; SocketSender: connecting, a
reader thread for replies) is shared with the mooncake transport's control channel.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import torch

from .base import Piece, TransferError, region_bytes
from .ledger import CODE_KIND, KIND_CODE, U64_IDS, ConnFail, Expected, LazyCoverage, LedgerReceiver, LedgerSender, RxConn, RxLedger, TxConn, TxLedger, parse_endpoint

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

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_RECV_CHUNK = 8 << 20  # bytes per recvmsg_into: bounds how long cancel waits for a landing recv
_SCRATCH = 1 << 20


# ---------------------------------------------------------------------------------------
# connections over TCP sockets: this transport's, and the mooncake transport's control
# channel (frames are each transport's own)


class Corrupt(Exception):
    """The byte stream of a connection cannot be trusted any more."""


class Lost(Exception):
    """The peer went away (EOF inside a frame, reset)."""


def set_sndtimeo(sock: socket.socket, seconds: float) -> None:
    """Kernel send timeout on a blocking socket: a stalled send returns (partial count
    or EAGAIN) instead of blocking for ever, while full-speed sends stay in C."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def connect(addr: tuple[str, int], endpoint: str, timeout: float, deadline: float | None, sndtimeo: float) -> socket.socket:
    """A blocking TCP_NODELAY connection to `addr`, made within `timeout` and the
    frame's `deadline` (but given 50 ms at least), whose sends wake every `sndtimeo`;
    ConnFail (timeout, refused, peer_lost) if it cannot be made."""
    limit = timeout
    if deadline is not None:
        limit = max(0.05, min(limit, deadline - time.monotonic()))
    try:
        sock = socket.create_connection(addr, timeout=limit)
    except socket.timeout:
        raise ConnFail("timeout", f"connect to {endpoint} timed out") from None
    except ConnectionRefusedError:
        raise ConnFail("refused", f"connection to {endpoint} refused") from None
    except OSError as e:
        raise ConnFail("peer_lost", f"connect to {endpoint}: {e}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_sndtimeo(sock, sndtimeo)
    return sock


class SocketRConn(RxConn):
    """An accepted connection; its thread is the only one reading from it or replying."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        super().__init__(name)
        self.sock = sock
        self.thread: threading.Thread | None = None
        self._sock_lock = threading.Lock()  # shutdown (any thread) vs close (its thread)
        self._closed = False

    def shut(self) -> None:
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


class SocketReceiver(LedgerReceiver):
    """A receiver that takes sender connections (`_rconn`, a SocketRConn class) on a
    TCP listener, with a thread each that hands the connection's frames to `_handle(c)`
    (False: a clean end between frames) until it ends; then the transfers with frames
    open on it fail. Replies (ACK, ERROR, ...) that the sender does not read within
    `_reply_timeout` end the connection."""

    _rconn: type[SocketRConn]
    _listener: socket.socket
    _endpoint: str
    _reply_timeout: float

    def _start_accepting(self, name: str, conn_name: str) -> None:
        """Start the accept thread `name`; connection threads are `conn_name`-<peer port>."""
        self._conns: set[SocketRConn] = set()
        self._closed = False
        self._listener.settimeout(0.2)  # the accept loop notices close within this
        self._acceptor = threading.Thread(target=self._accept_loop, args=(conn_name,), name=name, daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        with self._book.lock:
            if self._closed:
                return
            self._closed = True
        self._book.close()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
        self._acceptor.join(timeout=2.0)  # else it notices `_closed` within its 0.2 s timeout
        self._listener.close()
        with self._book.lock:
            conns = list(self._conns)
        for c in conns:
            c.shut()
        for c in conns:
            if c.thread is not None:
                c.thread.join(timeout=2.0)
            c.close()

    def _accept_loop(self, conn_name: str) -> None:
        while not self._closed:
            try:
                sock, addr = self._listener.accept()
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_sndtimeo(sock, self._reply_timeout)  # a peer that never reads replies cannot block the connection's thread
            c = self._rconn(sock, f"{addr[0]}:{addr[1]}->{self._endpoint}")
            c.thread = threading.Thread(target=self._serve, args=(c,), name=f"{conn_name}-{addr[1]}", daemon=True)
            with self._book.lock:
                if self._closed:
                    c.close()
                    return
                self._conns.add(c)
            c.thread.start()

    def _serve(self, c: SocketRConn) -> None:
        kind, detail = "peer_lost", f"sender connection {c.name} closed"
        try:
            while self._handle(c):
                pass
        except Corrupt as e:
            kind, detail = "corrupt", f"{e} on {c.name}"
        except (Lost, OSError) as e:
            detail = f"{e or type(e).__name__} on {c.name}"
        finally:
            with self._book.lock:
                self._conns.discard(c)
            self._release(c)
            c.shut()
            c.close()
            self._book.drop_conn(c, kind, detail)

    def _handle(self, c: SocketRConn) -> bool:
        raise NotImplementedError

    def _release(self, c: SocketRConn) -> None:
        """The connection `c` ended: give back what it holds, before its transfers fail."""


class SocketSConn(TxConn):
    """A sender's connection to `addr`: made by its writer thread on the first item,
    with a reader thread for the receiver's replies; threads are named after `label`."""

    def __init__(self, endpoint: str, lock: threading.Lock, addr: tuple[str, int], label: str) -> None:
        super().__init__(endpoint, lock)
        self.addr = addr
        self.label = label
        self.sock: socket.socket | None = None
        self.seq: dict[int, int] = {}  # tid -> data frames written (writer thread only)
        self.reader: threading.Thread | None = None
        self.sock_lock = threading.Lock()  # shutdown (any thread) vs close (writer)

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def shut(self) -> None:
        with self.sock_lock:
            if self.sock is not None and self.sock.fileno() >= 0:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class SocketSender(LedgerSender):
    """A sender whose connections are SocketSConns: the writer thread (LedgerSender)
    connects, and starts a reader thread that hands the receiver's replies to
    `_read_reply(c)` (False: the receiver closed the connection between frames).
    Whatever ends either thread kills the connection, failing the transfers it
    carries. Sends wake every `_sndtimeo` to check their deadline; threads are named
    `_thread_names` (writer, reader) prefixes."""

    _connect_timeout: float
    _sndtimeo: float
    _thread_names: tuple[str, str]

    def _start_conn(self, c: SocketSConn) -> SocketSConn:
        return self._start_writer(c, f"{self._thread_names[0]}-{c.label}")

    def _writer_done(self, c: SocketSConn) -> None:
        c.shut()  # also when it was killed while connecting, before it had a socket
        if c.reader is not None:
            c.reader.join(timeout=2.0)
        with c.sock_lock:
            if c.sock is not None:
                c.sock.close()

    def _connect(self, c: SocketSConn, deadline: float | None) -> None:
        sock = connect(c.addr, c.endpoint, self._connect_timeout, deadline, self._sndtimeo)
        with c.sock_lock:
            c.sock = sock
        c.reader = threading.Thread(target=self._read_loop, args=(c,), name=f"{self._thread_names[1]}-{c.label}", daemon=True)
        c.reader.start()
        if c.dead:  # killed while connecting
            raise ConnFail("aborted", "connection closed while connecting")

    def _read_loop(self, c: SocketSConn) -> None:
        kind, detail = "peer_lost", "receiver closed the connection"
        try:
            while self._read_reply(c):
                pass
        except Corrupt as e:
            kind, detail = "corrupt", str(e)
        except (Lost, OSError) as e:
            detail = f"{e or type(e).__name__}"
        self._book.kill(c, kind, f"{detail} ({c.endpoint})")

    def _write(self, c: SocketSConn, what: str, tid: int, payload, deadline: float | None) -> None:
        raise NotImplementedError

    def _read_reply(self, c: SocketSConn) -> bool:
        raise NotImplementedError


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
    if ftype not in (DATA, FINISH, ACK, ERROR) or n > MAX_PIECES or (n and ftype != DATA):
        raise Corrupt(f"malformed frame (type {ftype}, {n} pieces)")
    return ftype, flags, tid, seq, n, plen, tcrc


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise Lost("connection closed inside a frame")
        got += k


def _read_header(sock: socket.socket, hdr: memoryview) -> tuple[int, int, int, int, int, int, int] | None:
    """The next frame's header, read into `hdr` and parsed; None on a clean EOF between frames."""
    k = sock.recv_into(hdr, HEADER_SIZE, socket.MSG_WAITALL)
    if k == 0:
        return None
    if k < HEADER_SIZE:
        _recv_exact(sock, hdr[k:])
    return _parse_header(hdr)


# ---------------------------------------------------------------------------------------
# receiver


class _RConn(SocketRConn):
    def __init__(self, sock: socket.socket, name: str) -> None:
        super().__init__(sock, name)
        self.hdr = memoryview(bytearray(HEADER_SIZE))
        self.table = memoryview(bytearray(MAX_PIECES * PIECE_SIZE))
        self.reply = bytearray(HEADER_SIZE + MAX_DETAIL)
        self.scratch = memoryview(bytearray(_SCRATCH))


class TcpReceiver(SocketReceiver):
    """Listens on `host:port` (loopback and a free port by default) and lands KV bytes
    sent by TcpSenders into `region`, a contiguous CPU tensor (the rank's KV cache)."""

    _rconn = _RConn

    def __init__(self, region: torch.Tensor, host: str = "127.0.0.1", port: int = 0, *, cancel_grace: float = 0.5, reply_timeout: float = 5.0) -> None:
        self._region = region  # keeps the memory alive under the view
        self._mv = region_bytes(region)
        self._reply_timeout = reply_timeout
        self._listener = socket.create_server((host, port), backlog=64)
        h, p = self._listener.getsockname()[:2]
        self._endpoint = f"{h}:{p}"
        self._book = RxLedger(self._mv.nbytes, cancel_grace, f"braid-tcp-timer-{p}", tids=U64_IDS, coverage=LazyCoverage)
        self._start_accepting(f"braid-tcp-accept-{p}", "braid-tcp-read")

    @property
    def endpoint(self) -> str:
        return self._endpoint

    # ---- connections ---------------------------------------------------------------

    def _handle(self, c: _RConn) -> bool:
        """Handle one frame; False on a clean EOF between frames."""
        header = _read_header(c.sock, c.hdr)
        if header is None:
            return False
        ftype, flags, tid, seq, n, plen, tcrc = header
        if ftype == DATA:
            table = c.table[: n * PIECE_SIZE]
            _recv_exact(c.sock, table)
            if zlib.crc32(table) != tcrc:
                raise Corrupt("piece table CRC mismatch")
            self._on_data(c, tid, seq, np.frombuffer(table, dtype="<u8").tolist(), plen)
        elif ftype == FINISH:
            if plen > MAX_TRAILER:
                raise Corrupt(f"trailer of {plen} bytes")
            buf = bytearray(plen)
            _recv_exact(c.sock, memoryview(buf))
            self._reply(c, tid, self._book.on_finish(c, tid, seq, bytes(buf) if flags & FLAG_TRAILER else None))
        elif ftype == ERROR:
            if plen > MAX_DETAIL or flags not in CODE_KIND:
                raise Corrupt("malformed error frame")
            buf = bytearray(plen)
            _recv_exact(c.sock, memoryview(buf))
            self._book.on_abort(c, tid, CODE_KIND[flags], buf.decode("utf-8", "replace"))
        else:
            raise Corrupt("ACK frame from a sender")
        return True

    def _on_data(self, c: _RConn, tid: int, seq: int, table: list[int], plen: int) -> None:
        offs, lens = table[0::2], table[1::2]
        rx = self._book.admit(c, tid, seq, offs, lens, plen)
        if rx is None:  # unknown, ended, or failed just now: drained, not written
            self._drain(c, plen)
            err = self._book.tell_ended(c, tid)
            if err is not None:
                self._reply(c, tid, err)
            return
        self._land(c, tid, rx, offs, lens, plen)

    def _land(self, c: _RConn, tid: int, rx: Expected, offs: list[int], lens: list[int], plen: int) -> None:
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
                got = c.sock.recvmsg_into(bufs, 0, socket.MSG_WAITALL)[0]
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
            finally:
                self._book.end_write(c, tid, rx, spans if got else ())
            if got == 0:
                raise Lost("connection closed inside a data frame")
            left -= got
        self._drain(c, left)

    def _drain(self, c: _RConn, nbytes: int) -> None:
        while nbytes:
            k = c.sock.recv_into(c.scratch, min(nbytes, _SCRATCH), socket.MSG_WAITALL)
            if k == 0:
                raise Lost("connection closed inside a frame")
            nbytes -= k

    def _reply(self, c: _RConn, tid: int, err: TransferError | None) -> None:
        if err is None:
            _pack_header(c.reply, ACK, 0, tid, 0, 0, 0, 0)
            c.sock.sendall(memoryview(c.reply)[:HEADER_SIZE])
            return
        detail = (err.detail or err.kind).encode()[:MAX_DETAIL]
        c.reply[HEADER_SIZE : HEADER_SIZE + len(detail)] = detail
        _pack_header(c.reply, ERROR, KIND_CODE[err.kind], tid, 0, 0, len(detail), 0)
        c.sock.sendall(memoryview(c.reply)[: HEADER_SIZE + len(detail)])


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

    _thread_names = ("braid-tcp-write", "braid-tcp-ack")

    def __init__(self, region: torch.Tensor, *, connect_timeout: float = 5.0, stall_timeout: float = 10.0, poll_interval: float = 0.2) -> None:
        self._region = region
        self._mv = region_bytes(region)
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout  # for frames without a deadline (finish, error)
        self._sndtimeo = poll_interval  # a blocked send wakes this often to check its deadline
        self._book = TxLedger(self._mv.nbytes, self._new_conn, MAX_TRAILER, tids=U64_IDS)
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

    def _new_conn(self, endpoint: str) -> _SConn:
        return self._start_conn(_SConn(endpoint, self._book.lock))

    def _write(self, c: _SConn, what: str, tid: int, payload, deadline: float | None) -> None:
        if what == "data":
            self._write_data(c, tid, payload, deadline)
        elif what == "finish":
            flags = FLAG_TRAILER if payload is not None else 0
            body = payload or b""
            _pack_header(c.hdr, FINISH, flags, tid, c.seq.pop(tid, 0), 0, len(body), 0)
            self._sendv(c, [c.hdr_mv[:HEADER_SIZE], memoryview(body)], deadline)
        elif what == "abort":
            body = payload[1].encode()[:MAX_DETAIL]
            c.seq.pop(tid, None)
            _pack_header(c.hdr, ERROR, KIND_CODE[payload[0]], tid, 0, 0, len(body), 0)
            self._sendv(c, [c.hdr_mv[:HEADER_SIZE], memoryview(body)], None)

    def _write_data(self, c: _SConn, tid: int, pieces: list[Piece], deadline: float) -> None:
        # (src, dst, length), contiguous pieces merged; unlike collective.merge_runs, an
        # empty piece ends a run (this transport's frames are as they always were)
        runs: list[tuple[int, int, int]] = []
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
            _recv_exact(c.sock, memoryview(buf))
            self._book.acked(c, tid, TransferError(tid, CODE_KIND[flags], buf.decode("utf-8", "replace")))
        else:
            raise Corrupt(f"unexpected frame type {ftype} from a receiver")
        return True
