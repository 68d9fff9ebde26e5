"""The `collective` transport's receiver (CollectiveReceiver), on a decode rank: it
hosts the TCPStore senders rendezvous on, answers each sender's hello with a private
pair group, and lands the DATA frames of expected transfers straight into the rank's
KV region, acknowledging each FINISH through the store. collective.py tells the
protocol, collective_wire.py the frames; the transfers' state is a ReceiverBook's.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .base import TransferError
from .common import CODE_KIND, MAX_PIECES, MAX_SECRET, MAX_TRAILER, ConnFail, flat_bytes
from .collective_wire import (
    ABORT, AUTH, CLOSE, DATA, FINISH, HEADER_WORDS, IDLE, MAGIC, MAX_CHUNK, NS, PACK_WINDOW, TAG, VERSION,
    make_pair_group, plan_messages, scatter, shut_group, wait_work, window_full,
)
from .receiver_book import BookedReceiver, Expected, ReceiverBook, RxConn
from .stores import serve_store

log = logging.getLogger(__name__)


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
            shut_group(pg, 0, self.device)


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


class CollectiveReceiver(BookedReceiver):
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
        self._server = serve_store(host, port, None, timedelta(seconds=connect_timeout))  # on `host` only
        self._port = self._server.port
        self._endpoint = f"{host}:{self._port}"
        self._book = ReceiverBook(self._flat.numel(), cancel_grace, f"braid-kvc-{self._port}-timer")
        self._conns: set[_RConn] = set()
        self._closed = False
        self._accept_pair = 1  # the pair id whose hello the accept thread waits for
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"braid-kvc-accept-{self._port}", daemon=True)
        self._acceptor.start()

    # ---- KVReceiver ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

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
        wait_work(c.pg.recv([hdr], 0, TAG), IDLE.total_seconds())
        word0, ftype, tid, seq, n, plen, chunk, last = hdr.tolist()
        if word0 != (MAGIC << 8 | VERSION):
            raise _Corrupt(f"bad magic/version {word0:#x}")
        if ftype == DATA:
            if not 0 < n <= MAX_PIECES or not 0 < chunk <= MAX_CHUNK or plen < 0 or not 0 <= last <= chunk:
                raise _Corrupt(f"malformed data frame ({n} pieces, chunk {chunk}, packing below {last})")
            table = torch.empty(2 * n, dtype=torch.int64, device=self._device)
            wait_work(c.pg.recv([table], 0, TAG), self._stall_timeout)
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
                    wait_work(c.pg.recv([buf], 0, TAG), self._stall_timeout)
                    trailer = buf.cpu().numpy().tobytes()
            err = self._book.on_finish(c, tid, seq, trailer)
            self._ack(c, tid, err)
        elif ftype == ABORT:
            self._book.on_abort(c, tid, CODE_KIND.get(seq, "aborted"), "aborted")
        elif ftype == AUTH:
            if not 0 < last <= MAX_SECRET:
                raise _Corrupt(f"secret of {last} bytes")
            buf = torch.empty(last, dtype=torch.uint8, device=self._device)
            wait_work(c.pg.recv([buf], 0, TAG), self._stall_timeout)
            err = self._book.authenticate(c, tid, buf.cpu().numpy().tobytes())
            if err is not None:
                self._ack(c, tid, err)
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
                while window_full(len(inflight), queued, packs):
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
            wait_work(r.work, self._stall_timeout)
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
                scatter(self._flat, r.buf, r.segments)
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

