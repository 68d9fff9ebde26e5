"""The `mooncake` transport: prefill ranks write KV byte ranges one-sided into decode
ranks' memory with Mooncake's transfer engine (RDMA, or its TCP protocol where there is
no RDMA hardware), and a small TCP control channel says what one-sided writes cannot:
which ranges a sender may write, when its writes landed, the end of a transfer, the
trailer, and the acknowledgement.

Optional: it needs the `mooncake-transfer-engine` package (the `rdma` extra; on a host
without CUDA, `mooncake-transfer-engine-non-cuda`, same module) and Debian's
`libibverbs1`. This module imports without them; constructing a sender or receiver then
raises MooncakeUnavailable with the reason, and `unavailable_reason()` tells beforehand.

Endpoint: "host:rpc_port#0xADDR:NBYTES#ctrl_port": the receiver engine's session name
(P2P handshake, no metadata server), the address and size of its registered region, and
its control port on the same host.

Life of one transfer (see base.py)
  1. decode   receiver.expect(tid, ranges, deadline)
  2. prefill  sender.send(tid, ep, pieces, deadline) queues the pieces on the connection
     to `ep`; its writer thread asks for them (WRITE: tid, seq, piece table) and the
     receiver answers GRANT once it checked every piece lies inside tid's ranges, or
     refuses (the transfer is unknown, cancelled, failed: the sender fails it too)
  3. the writer writes the granted pieces with one Mooncake batch write straight into
     the receiver's region, then reports DONE (ok or failed); the receiver counts the
     bytes only then, and cancel waits for the DONE of every granted write of the
     transfer (a write is granted only while the transfer is live)
  4. sender.finish(tid, ep, trailer) sends FINISH after the connection's earlier
     frames; the receiver answers ACK, or ERROR with the reason
  5. sender.wait / receiver.poll as in base.py

Control frame, little-endian header of 32 bytes: magic u32 "BRMC", version u8, type u8,
flags u16, transfer id u64, seq u32, n_pieces u32, payload_len u64; then the payload:
WRITE a piece table n x (dst offset u64, length u64); FINISH the trailer (flags bit 0:
there is one); GRANT (flags: 0 granted, else a kind code), ERROR (flags: kind code) a
utf-8 detail; AUTH the transfer's secret (sent before a connection's first WRITE or
FINISH of it: writes and FINISHes of a transfer expected with a secret are granted only
over a connection that presented it); DONE (flags: 0 ok, 1 the write failed) and ACK
nothing.

Limits of one-sided writes: the receiver's guarantees hold for senders running this
code (a write is always granted first), not against a peer that writes on its own.
A granted write that neither reports DONE within `cancel_grace` nor dies with its
process is waited out by closing the control connection, but bytes already submitted to
Mooncake may still land until Mooncake's own transfer timeout.

The transfers' state is kept in the receiver's and sender's books (receiver_book.py,
sender_book.py); the control channel's sockets and threads are sockets.py's
(SocketReceiver, SocketSender), shared with the tcp transport.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Sequence

import torch

from .base import Piece, TransferError
from .common import CODE_KIND, KIND_CODE, MAX_PIECES, MAX_SECRET, MAX_TRAILER, ConnFail, flat_bytes, merge_runs, parse_endpoint
from .receiver_book import Expected, ReceiverBook
from .sender_book import SenderBook
from .sockets import Corrupt, SocketRConn, SocketReceiver, SocketSConn, SocketSender, recv_exact, recv_header

log = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"BRMC", "little")
VERSION = 1
WRITE, GRANT, DONE, FINISH, ACK, ERROR, AUTH = 1, 2, 3, 4, 5, 6, 7
FLAG_TRAILER = 1
_HDR = struct.Struct("<IBBHQIIQ")
HEADER_SIZE = _HDR.size  # 32
MAX_DETAIL = 4096
# Entries per Mooncake batch write: its TCP transport fails a batch outright once more
# than max_queued_transfers_per_peer (1024 by default) entries wait for one peer.
MAX_BATCH = 512


class MooncakeUnavailable(RuntimeError):
    """Mooncake's transfer engine cannot be imported or started here."""


_engine_cls = None
_import_error: str | None = None


def _load_engine_class():
    global _engine_cls, _import_error
    if _engine_cls is None and _import_error is None:
        try:
            from mooncake.engine import TransferEngine
        except Exception as e:  # ImportError, or OSError for a missing shared library
            _import_error = f"{type(e).__name__}: {e}"
        else:
            _engine_cls = TransferEngine
    if _engine_cls is None:
        raise MooncakeUnavailable(
            f"the mooncake transport needs Mooncake's transfer engine ({_import_error}); install "
            "the 'rdma' extra (mooncake-transfer-engine, or mooncake-transfer-engine-non-cuda on "
            "hosts without CUDA) and Debian's libibverbs1"
        )
    return _engine_cls


def unavailable_reason() -> str | None:
    """None if Mooncake's engine imports here, else why not."""
    try:
        _load_engine_class()
    except MooncakeUnavailable as e:
        return str(e)
    return None


def _start_engine(region: torch.Tensor, host: str, protocol: str, device_name: str) -> tuple[object, int, int]:
    """A Mooncake engine started on `host` with `region` registered in it, so that
    peers may write into it or it may write from it: (engine, address, size)."""
    flat = flat_bytes(region)
    addr, nbytes = flat.data_ptr(), flat.numel()
    engine = _load_engine_class()()
    rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
    if rc != 0:
        raise MooncakeUnavailable(f"Mooncake transfer engine failed to start on {host} with protocol {protocol!r} (rc {rc})")
    if engine.register_memory(addr, nbytes) != 0:
        raise RuntimeError(f"Mooncake could not register the {nbytes}-byte region")
    return engine, addr, nbytes


def parse_mooncake_endpoint(endpoint: str) -> tuple[str, int, int, tuple[str, int]]:
    """-> (engine session "host:rpc_port", region address, region size, (host, ctrl port))."""
    parts = endpoint.split("#")
    try:
        session, region, ctrl = parts
        host, _ = parse_endpoint(session)
        addr_s, size_s = region.split(":")
        return session, int(addr_s, 16), int(size_s), (host, int(ctrl))
    except ValueError:
        raise ValueError(f"mooncake endpoint must be 'host:rpc_port#0xADDR:NBYTES#ctrl_port', got {endpoint!r}") from None


# ---- control frames -----------------------------------------------------------------


def _pack(ftype: int, tid: int, flags: int = 0, seq: int = 0, n: int = 0, payload: bytes = b"") -> bytes:
    return _HDR.pack(MAGIC, VERSION, ftype, flags, tid, seq, n, len(payload)) + payload


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact(sock, memoryview(buf))
    return bytes(buf)


def _read_frame(sock: socket.socket) -> tuple[int, int, int, int, int, bytes] | None:
    """-> (type, flags, tid, seq, n, payload), None on EOF between frames."""
    hdr = bytearray(HEADER_SIZE)
    if not recv_header(sock, memoryview(hdr)):
        return None
    magic, version, ftype, flags, tid, seq, n, plen = _HDR.unpack(hdr)
    if magic != MAGIC or version != VERSION:
        raise Corrupt(f"bad magic/version {magic:#x}/{version}")
    limit = {WRITE: 16 * MAX_PIECES, FINISH: MAX_TRAILER, AUTH: MAX_SECRET}.get(ftype, MAX_DETAIL)
    if not WRITE <= ftype <= AUTH or plen > limit or (ftype == WRITE and (not 0 < n <= MAX_PIECES or plen != 16 * n)):
        raise Corrupt(f"malformed control frame (type {ftype}, {n} pieces, {plen} bytes)")
    return ftype, flags, tid, seq, n, _recv_bytes(sock, plen) if plen else b""


# ---------------------------------------------------------------------------------------
# receiver


class _RConn(SocketRConn):
    def __init__(self, sock: socket.socket, name: str) -> None:
        super().__init__(sock, name)
        self.grants: dict[tuple[int, int], tuple[Expected, list[tuple[int, int]]]] = {}  # conn thread only


class MooncakeReceiver(SocketReceiver):
    """Registers `region` (a contiguous tensor: the rank's KV cache) with a Mooncake
    transfer engine on `host` and takes control connections on `port` there (a free
    one by default; the engine picks its own RPC port)."""

    _rconn = _RConn

    def __init__(
        self,
        region: torch.Tensor,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        protocol: str = "tcp",
        device_name: str = "",
        cancel_grace: float = 2.0,
        reply_timeout: float = 5.0,
    ) -> None:
        self._region = region
        self._engine, self._addr, self._nbytes = _start_engine(region, host, protocol, device_name)
        self._reply_timeout = reply_timeout
        self._book = ReceiverBook(self._nbytes, cancel_grace, f"braid-mooncake-{self._engine.get_rpc_port()}-timer")
        self._listener = socket.create_server((host, port), backlog=64)
        self._endpoint = f"{host}:{self._engine.get_rpc_port()}#{self._addr:#x}:{self._nbytes}#{self._listener.getsockname()[1]}"
        self._start_accepting("braid-mooncake-accept", "braid-mooncake-ctrl")

    # ---- KVReceiver ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def close(self) -> None:
        super().close()
        engine, self._engine = self._engine, None  # dropping it stops the engine's servers
        if engine is not None:
            engine.unregister_memory(self._addr)

    # ---- connections ---------------------------------------------------------------

    def _release(self, c: _RConn) -> None:
        # the sender's writer ends before its connection does (or dies with its
        # process), so no write of these grants is in flight any more
        grants, c.grants = c.grants, {}
        for (tid, _), (rx, _) in grants.items():
            self._book.end_write(c, tid, rx, ())

    def _handle(self, c: _RConn) -> bool:
        frame = _read_frame(c.sock)
        if frame is None:
            return False
        ftype, flags, tid, seq, n, payload = frame
        if ftype == WRITE:
            table = struct.unpack(f"<{2 * n}Q", payload)
            offs, lens = list(table[0::2]), list(table[1::2])
            rx = self._book.admit(c, tid, seq, offs, lens, sum(lens))
            if rx is not None and self._book.begin_write(c, tid, rx):
                c.grants[(tid, seq)] = (rx, [(o, o + n) for o, n in zip(offs, lens)])
                c.sock.sendall(_pack(GRANT, tid, 0, seq))
            else:
                err = self._book.tell_ended(c, tid) or self._book.refusal(tid)
                c.sock.sendall(_pack(GRANT, tid, KIND_CODE[err.kind], seq, payload=err.detail.encode()[:MAX_DETAIL]))
        elif ftype == DONE:
            grant = c.grants.pop((tid, seq), None)
            if grant is None:
                raise Corrupt(f"DONE of transfer {tid} frame {seq} that was not granted")
            rx, spans = grant
            self._book.end_write(c, tid, rx, spans if flags == 0 else ())
            if flags != 0:
                self._book.fail(tid, TransferError(tid, "peer_lost", "the sender's Mooncake write failed"))
        elif ftype == FINISH:
            err = self._book.on_finish(c, tid, seq, payload if flags & FLAG_TRAILER else None)
            if err is None:
                c.sock.sendall(_pack(ACK, tid))
            else:
                c.sock.sendall(_pack(ERROR, tid, KIND_CODE[err.kind], payload=(err.detail or err.kind).encode()[:MAX_DETAIL]))
        elif ftype == ERROR:
            self._book.on_abort(c, tid, CODE_KIND.get(flags, "aborted"), payload.decode(errors="replace"))
        elif ftype == AUTH:
            err = self._book.authenticate(c, tid, payload)
            if err is not None:
                c.sock.sendall(_pack(ERROR, tid, KIND_CODE[err.kind], payload=err.detail.encode()[:MAX_DETAIL]))
        else:
            raise Corrupt(f"frame type {ftype} from a sender")
        return True


# ---------------------------------------------------------------------------------------
# sender


class _Grant:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: TransferError | None = None
        self.lost = False


class _SConn(SocketSConn):
    def __init__(self, endpoint: str, lock: threading.Lock) -> None:
        session, self.remote_addr, self.remote_nbytes, ctrl = parse_mooncake_endpoint(endpoint)
        super().__init__(endpoint, lock, ctrl, session)
        self.session = session
        self.grants: dict[tuple[int, int], _Grant] = {}
        self.grant_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self._shut = False

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def shut(self) -> None:
        with self.grant_lock:
            self._shut = True
            grants = list(self.grants.values())
        for g in grants:
            g.lost = True
            g.event.set()
        super().shut()

    def await_grant(self, tid: int, seq: int) -> _Grant:
        g = _Grant()
        with self.grant_lock:
            if self._shut:
                g.lost = True
                g.event.set()
            self.grants[(tid, seq)] = g
        return g

    def resolve_grant(self, tid: int, seq: int, err: TransferError | None) -> None:
        with self.grant_lock:
            g = self.grants.pop((tid, seq), None)
        if g is None:
            raise Corrupt(f"GRANT of transfer {tid} frame {seq} that was not asked for")
        g.error = err
        g.event.set()


class MooncakeSender(SocketSender):
    """Writes byte ranges of `region` (a contiguous tensor: the rank's KV cache) into
    MooncakeReceivers through a Mooncake transfer engine started on `host`."""

    _sconn = _SConn
    _thread_names = ("braid-mooncake-write", "braid-mooncake-reply")

    def __init__(
        self,
        region: torch.Tensor,
        host: str = "127.0.0.1",
        *,
        protocol: str = "tcp",
        device_name: str = "",
        connect_timeout: float = 5.0,
        stall_timeout: float = 10.0,
        min_wait: float = 0.2,
    ) -> None:
        self._region = region
        self._engine, self._addr, nbytes = _start_engine(region, host, protocol, device_name)
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout
        self._sndtimeo = stall_timeout
        self._min_wait = min_wait  # a frame whose deadline is (nearly) due still gets this long
        self._book = SenderBook(nbytes, self._new_conn, MAX_TRAILER)
        self._threads: list[threading.Thread] = []

    # ---- KVSender --------------------------------------------------------------

    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float, *, secret: bytes | None = None) -> None:
        _, _, nbytes, _ = parse_mooncake_endpoint(endpoint)
        for p in pieces:
            if p.dst_offset + p.length > nbytes:
                raise ValueError(f"{p} is outside the receiver's {nbytes}-byte region")
        super().send(transfer_id, endpoint, pieces, deadline, secret=secret)

    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None, *, secret: bytes | None = None) -> None:
        parse_mooncake_endpoint(endpoint)
        super().finish(transfer_id, endpoint, trailer, secret=secret)

    def close(self) -> None:
        super().close()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.unregister_memory(self._addr)

    # ---- connection threads --------------------------------------------------------

    def _write_finish(self, c: _SConn, tid: int, seq: int, trailer: bytes | None, deadline: float | None) -> None:
        c.send(_pack(FINISH, tid, 0 if trailer is None else FLAG_TRAILER, seq, payload=trailer or b""))

    def _write_auth(self, c: _SConn, tid: int, secret: bytes, deadline: float | None) -> None:
        c.send(_pack(AUTH, tid, payload=secret))

    def _write_abort(self, c: _SConn, tid: int, kind: str, detail: str) -> None:
        c.send(_pack(ERROR, tid, KIND_CODE[kind], payload=detail.encode()[:MAX_DETAIL]))

    def _write_data(self, c: _SConn, tid: int, pieces: list[Piece], deadline: float) -> None:
        runs = merge_runs(pieces)
        for k in range(0, len(runs), MAX_PIECES):
            frame = runs[k : k + MAX_PIECES]
            seq = c.next_seq(tid)
            grant = c.await_grant(tid, seq)
            table = struct.pack(f"<{2 * len(frame)}Q", *[x for _, d, n in frame for x in (d, n)])
            c.send(_pack(WRITE, tid, 0, seq, len(frame), table))
            if not grant.event.wait(self._budget(deadline)):
                raise ConnFail("timeout", "no grant from the receiver in time")
            if grant.lost:
                raise ConnFail("peer_lost", "connection closed while waiting for a grant")
            if grant.error is not None:  # the receiver knows already: no ABORT frame for it
                self._book.acked(c, tid, grant.error)
                return
            rc = 0
            for b in range(0, len(frame), MAX_BATCH):
                batch = frame[b : b + MAX_BATCH]
                rc = self._engine.batch_transfer_sync_write(
                    c.session,
                    [self._addr + s for s, _, _ in batch],
                    [c.remote_addr + d for _, d, _ in batch],
                    [n for _, _, n in batch],
                )
                if rc != 0:
                    break
            c.send(_pack(DONE, tid, 0 if rc == 0 else 1, seq))
            if rc != 0:
                raise ConnFail("peer_lost", f"Mooncake write to {c.session} failed (rc {rc})")

    def _read_reply(self, c: _SConn) -> bool:
        frame = _read_frame(c.sock)
        if frame is None:
            return False
        ftype, flags, tid, seq, _, payload = frame
        err = None
        if ftype in (GRANT, ERROR) and flags:
            if flags not in CODE_KIND:
                raise Corrupt(f"unknown kind code {flags}")
            err = TransferError(tid, CODE_KIND[flags], payload.decode("utf-8", "replace"))
        if ftype == GRANT:
            c.resolve_grant(tid, seq, err)
        elif ftype == ACK:
            self._book.acked(c, tid, None)
        elif ftype == ERROR and err is not None:
            self._book.acked(c, tid, err)
        else:
            raise Corrupt(f"frame type {ftype} from a receiver")
        return True
