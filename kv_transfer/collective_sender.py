"""The `collective` transport's sender (CollectiveSender), on a prefill rank: one pair
group per decode endpoint, made by its writer thread on the first frame, which sends
the frames the sender book queues (payload straight from the KV region, small pieces
packed), and an ack thread that reads the receiver's answers from its store.
collective.py tells the protocol, collective_wire.py the frames; the transfers' state
is a SenderBook's.
"""
from __future__ import annotations

import collections
import threading
import time
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from .base import Piece, TransferError
from .common import KIND_CODE, MAX_PIECES, MAX_TRAILER, ConnFail, flat_bytes, merge_runs, parse_endpoint
from .collective_wire import (
    ABORT, AUTH, CHUNK, CLOSE, DATA, FINISH, IDLE_STORE_WAIT, MAGIC, MAX_CHUNK, NS, PACK_BELOW, TAG, VERSION,
    gather, is_timeout, local_address_for, make_pair_group, plan_messages, shut_group, wait_work, window_full,
)
from .sender_book import BookedSender, SenderBook, TxConn


class _SConn(TxConn):
    def __init__(self, endpoint: str, lock: threading.Lock, device: torch.device) -> None:
        super().__init__(endpoint, lock)
        self.addr = parse_endpoint(endpoint)
        self.device = device
        self.pg = None
        self.store: dist.TCPStore | None = None  # the writer's client, idle once the group is built
        self.staging: list[torch.Tensor] = []  # free staging buffers for packed messages (writer thread only)
        self.acker: threading.Thread | None = None
        self.ack_lock = threading.Lock()
        self.ack_key: str | None = None  # the key the ack thread waits for
        self._pg_lock = threading.Lock()
        self._shut = False

    @property
    def connected(self) -> bool:
        return self.pg is not None

    def set_pg(self, pg, store: dist.TCPStore) -> bool:
        with self._pg_lock:
            self.pg, self.store = pg, store
            return not self._shut

    def shut(self) -> None:
        with self._pg_lock:
            self._shut = True
            pg, store = self.pg, self.store
        if pg is not None:
            shut_group(pg, 1, self.device)
        with self.ack_lock:
            key = self.ack_key
        if store is not None and key is not None:
            try:
                store.set(key, "-1 wake")
            except dist.DistError:
                pass  # the store is gone, so the ack thread's wait fails by itself


class CollectiveSender(BookedSender):
    """Sends byte ranges of `region` (a contiguous tensor on CPU, CUDA or NPU: the
    rank's KV cache) to CollectiveReceivers, over one pair group per endpoint."""

    _errors = (RuntimeError, OSError)  # torch.distributed raises RuntimeError

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
        self._book = SenderBook(self._flat.numel(), self._new_conn, MAX_TRAILER)
        self._threads: list[threading.Thread] = []

    # ---- KVSender --------------------------------------------------------------

    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float, *, secret: bytes | None = None) -> None:
        parse_endpoint(endpoint)
        super().send(transfer_id, endpoint, pieces, deadline, secret=secret)

    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None, *, secret: bytes | None = None) -> None:
        parse_endpoint(endpoint)
        super().finish(transfer_id, endpoint, trailer, secret=secret)

    # ---- connection threads --------------------------------------------------------

    def _new_conn(self, endpoint: str) -> _SConn:
        return self._start_writer(_SConn(endpoint, self._book.lock, self._device), f"braid-kvc-write-{endpoint}")

    def _write_finish(self, c: _SConn, tid: int, seq: int, trailer: bytes | None, deadline: float | None) -> None:
        frame = [self._header(FINISH, tid, seq, tlen=-1 if trailer is None else len(trailer))]
        if trailer:
            frame.append(torch.frombuffer(bytearray(trailer), dtype=torch.uint8).to(self._device))
        self._send_frame(c, frame, deadline)

    def _write_auth(self, c: _SConn, tid: int, secret: bytes, deadline: float | None) -> None:
        frame = [self._header(AUTH, tid, 0, tlen=len(secret)), torch.frombuffer(bytearray(secret), dtype=torch.uint8).to(self._device)]
        self._send_frame(c, frame, deadline)

    def _write_abort(self, c: _SConn, tid: int, kind: str, detail: str) -> None:
        self._send_frame(c, [self._header(ABORT, tid, KIND_CODE[kind])], None)  # no field carries the detail

    def _write_close(self, c: _SConn) -> None:
        if c.pg is not None:
            self._send_frame(c, [self._header(CLOSE, 0, 0)], None)

    def _connect(self, c: _SConn, deadline: float | None) -> None:
        end = time.monotonic() + self._connect_timeout
        if deadline is not None:
            end = min(end, max(deadline, time.monotonic() + 0.05))
        host, port = c.addr
        local = local_address_for(host, port, end - time.monotonic())
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
            raise ConnFail("timeout" if is_timeout(e) else "peer_lost", str(e).splitlines()[0][:300]) from None
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
            wait_work(w, self._budget(deadline))

    def _write_data(self, c: _SConn, tid: int, pieces: list[Piece], deadline: float) -> None:
        runs = merge_runs(pieces)
        flat, chunk, pg = self._flat, self._chunk, c.pg
        for k in range(0, len(runs), MAX_PIECES):
            frame = runs[k : k + MAX_PIECES]
            srcs, lens = [s for s, _, _ in frame], [n for _, _, n in frame]
            table = torch.tensor([x for _, d, n in frame for x in (d, n)], dtype=torch.int64, device=self._device)
            seq = c.next_seq(tid)
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
                    gather(t, flat, [(srcs[i] + a, n) for i, a, n in msg])
                inflight.append((pg.send([t], 1, TAG), t, staging))
                queued += t.numel()
                packs += staging is not None
                while window_full(len(inflight), queued, packs):
                    queued, packs = self._retire(c, inflight, deadline, queued, packs)
            while inflight:
                queued, packs = self._retire(c, inflight, deadline, queued, packs)

    def _retire(self, c: _SConn, inflight: collections.deque, deadline: float, queued: int, packs: int) -> tuple[int, int]:
        """Wait for the oldest send in flight; its staging buffer goes back to the pool."""
        w, t, staging = inflight.popleft()
        wait_work(w, self._budget(deadline))
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
                    store.wait([key], IDLE_STORE_WAIT)
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
