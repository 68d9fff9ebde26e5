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

The receiver and sender bookkeeping (RxLedger, TxLedger) is ledger.py's, shared with
the tcp and mooncake transports.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from .base import Piece, TransferError
from .ledger import CODE_KIND, KIND_CODE, ConnFail, Coverage, Expected, LedgerReceiver, LedgerSender, RxConn, RxLedger, TxConn, TxLedger, parse_endpoint  # noqa: F401 (Coverage: re-exported)

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


def flat_bytes(region: torch.Tensor) -> torch.Tensor:
    """The region as a flat uint8 tensor on its own device (a view, no copy)."""
    if not region.is_contiguous():
        raise ValueError("a transport region must be a contiguous tensor")
    return region.view(-1).view(torch.uint8)


def merge_runs(pieces: Sequence[Piece]) -> list[tuple[int, int, int]]:
    """(src, dst, length) runs of the pieces, in order, contiguous pieces merged and
    empty ones left out (the mooncake transport's too)."""
    runs: list[tuple[int, int, int]] = []
    for p in pieces:
        if not p.length:
            continue
        if runs:
            s, d, n = runs[-1]
            if s + n == p.src_offset and d + n == p.dst_offset:
                runs[-1] = (s, d, n + p.length)
                continue
        runs.append((p.src_offset, p.dst_offset, p.length))
    return runs


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


class CollectiveReceiver(LedgerReceiver):
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
        self._book = RxLedger(self._flat.numel(), cancel_grace, f"braid-kvc-{self._port}-timer")
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
            _shut(pg, 1, self.device)
        with self.ack_lock:
            key = self.ack_key
        if store is not None and key is not None:
            try:
                store.set(key, "-1 wake")
            except dist.DistError:
                pass  # the store is gone, so the ack thread's wait fails by itself


class CollectiveSender(LedgerSender):
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
        self._book = TxLedger(self._flat.numel(), self._new_conn, MAX_TRAILER)
        self._threads: list[threading.Thread] = []

    # ---- KVSender --------------------------------------------------------------

    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float) -> None:
        parse_endpoint(endpoint)
        super().send(transfer_id, endpoint, pieces, deadline)

    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None) -> None:
        parse_endpoint(endpoint)
        super().finish(transfer_id, endpoint, trailer)

    # ---- connection threads --------------------------------------------------------

    def _new_conn(self, endpoint: str) -> _SConn:
        return self._start_writer(_SConn(endpoint, self._book.lock, self._device), f"braid-kvc-write-{endpoint}")

    def _write(self, c: _SConn, what: str, tid: int, payload, deadline: float | None) -> None:
        if what == "data":
            self._write_data(c, tid, payload, deadline)
        elif what == "finish":
            frame = [self._header(FINISH, tid, c.seq.pop(tid, 0), tlen=-1 if payload is None else len(payload))]
            if payload:
                frame.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device))
            self._send_frame(c, frame, deadline)
        elif what == "abort":
            c.seq.pop(tid, None)
            self._send_frame(c, [self._header(ABORT, tid, KIND_CODE[payload[0]])], None)

    def _write_close(self, c: _SConn) -> None:
        if c.pg is not None:
            self._send_frame(c, [self._header(CLOSE, 0, 0)], None)

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
        runs = merge_runs(pieces)
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
