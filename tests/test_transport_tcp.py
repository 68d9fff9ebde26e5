"""The tcp KV transport over real loopback sockets.

The reference for every byte is an independent copy made with torch indexing;
malformed frames are built here from the wire format documented in
braid.kv_transfer.tcp (struct + zlib), not with the transport's own packer.
Every wait is bounded; no test asserts a speed.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch

from braid.kv_transfer.base import Piece, TransferError
from braid.kv_transfer.tcp import TcpReceiver, TcpSender

pytestmark = pytest.mark.timeout(60)

BLOCK = 4096  # bytes per KV block in these tests
SLACK = 10.0  # scheduling slack on a loaded 2-core machine; bounds, not speeds


# ---- helpers ---------------------------------------------------------------------------


def byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.uint8)


def rand_region(nbytes: int, seed: int) -> torch.Tensor:
    """A float16 KV-cache-like region [num_blocks, BLOCK // 2] filled with random bytes."""
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(nbytes // BLOCK, BLOCK // 2, dtype=torch.float16)
    byte_view(t).copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g))
    return t


def apply(ref: torch.Tensor, src: torch.Tensor, pieces) -> None:
    """The reference copy: what the receiver region must look like afterwards."""
    rb, sb = byte_view(ref), byte_view(src)
    for p in pieces:
        rb[p.dst_offset : p.dst_offset + p.length] = sb[p.src_offset : p.src_offset + p.length]


def block_pieces(src_blocks, dst_blocks, layer: int, layer_blocks: int) -> list[Piece]:
    """One piece per block of one layer; the region holds layers back to back."""
    base = layer * layer_blocks * BLOCK
    return [Piece(base + s * BLOCK, base + d * BLOCK, BLOCK) for s, d in zip(src_blocks, dst_blocks)]


def ranges_of(pieces) -> list[tuple[int, int]]:
    return [(p.dst_offset, p.length) for p in pieces]


def poll_until(rx: TcpReceiver, tids, timeout: float = 30.0) -> dict:
    """Accumulate poll() results until every tid in `tids` has ended."""
    got: dict = {}
    end = time.monotonic() + timeout
    while not set(tids) <= got.keys():
        got.update(rx.poll())
        if time.monotonic() > end:
            pytest.fail(f"transfers {set(tids) - got.keys()} did not end within {timeout}s")
        time.sleep(0.005)
    return got


_BODY = struct.Struct("<IBBHQIIQI")
DATA, FINISH, ACK, ERROR = 1, 2, 3, 4


def frame(ftype: int, tid: int, seq: int = 0, pieces=(), payload: bytes = b"", flags: int = 0, payload_len: int | None = None) -> bytes:
    """A frame built from the documented wire format."""
    table = b"".join(struct.pack("<QQ", d, n) for d, n in pieces)
    plen = len(payload) if payload_len is None else payload_len
    body = _BODY.pack(int.from_bytes(b"BRKV", "little"), 1, ftype, flags, tid, seq, len(pieces), plen, zlib.crc32(table))
    return body + struct.pack("<I", zlib.crc32(body)) + table + payload


def raw_connect(rx: TcpReceiver) -> socket.socket:
    host, port = rx.endpoint.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def wait_closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> None:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


@pytest.fixture
def closer():
    """Closes what a test registers, then checks no transport thread is left."""
    objs = []
    yield objs.append
    for o in reversed(objs):
        o.close()
    end = time.monotonic() + 5
    while any(t.name.startswith("braid-tcp") for t in threading.enumerate()) and time.monotonic() < end:
        time.sleep(0.01)
    left = [t.name for t in threading.enumerate() if t.name.startswith("braid-tcp")]
    assert not left, f"threads left behind: {left}"


# ---- data path ---------------------------------------------------------------------------


def test_round_trip_layers(closer):
    layers, layer_blocks = 4, 64
    src = rand_region(layers * layer_blocks * BLOCK, seed=1)
    dst = rand_region(layers * layer_blocks * BLOCK, seed=2)  # garbage that must survive outside the ranges
    ref = dst.clone()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    g = torch.Generator().manual_seed(3)
    src_blocks = torch.randperm(layer_blocks, generator=g)[:40].tolist()
    dst_blocks = torch.randperm(layer_blocks, generator=g)[:40].tolist()
    per_layer = [block_pieces(src_blocks, dst_blocks, layer, layer_blocks) for layer in range(layers)]
    # Two more pieces that are contiguous on both sides (the sender may merge them).
    per_layer[0] += [Piece(0, 0, 100), Piece(100, 100, 200)]
    all_pieces = [p for ps in per_layer for p in ps]
    rx.expect(7, ranges_of(all_pieces), time.monotonic() + 30)
    for ps in per_layer:
        tx.send(7, rx.endpoint, ps, time.monotonic() + 30)
    tx.finish(7, rx.endpoint)
    tx.wait(7, timeout=30)
    assert poll_until(rx, [7]) == {7: None}
    apply(ref, src, all_pieces)
    assert torch.equal(byte_view(dst), byte_view(ref))


def test_two_senders_feed_one_receiver(closer):
    size = 256 * BLOCK
    srcs = [rand_region(size, seed=10), rand_region(size, seed=11)]
    dst = torch.zeros(size // BLOCK, BLOCK // 2, dtype=torch.float16)
    ref = dst.clone()
    rx = TcpReceiver(dst)
    closer(rx)
    senders = [TcpSender(s) for s in srcs]
    for s in senders:
        closer(s)
    # Transfer 1 is split between the two prefill ranks; 2 and 3 come from one each.
    shared = [[Piece(b * BLOCK, b * BLOCK, BLOCK) for b in range(r, 128, 2)] for r in range(2)]
    own = [[Piece(b * BLOCK, b * BLOCK, BLOCK) for b in range(128 + 64 * r, 192 + 64 * r)] for r in range(2)]
    deadline = time.monotonic() + 30
    rx.expect(1, ranges_of(shared[0] + shared[1]), deadline)
    rx.expect(2, ranges_of(own[0]), deadline)
    rx.expect(3, ranges_of(own[1]), deadline)
    errors = []

    def rank(r):
        try:
            tx = senders[r]
            for k in range(0, len(shared[r]), 8):
                tx.send(1, rx.endpoint, shared[r][k : k + 8], deadline)
                tx.send(2 + r, rx.endpoint, own[r][k : k + 8], deadline)
            tx.send(2 + r, rx.endpoint, own[r][len(shared[r]) :], deadline)
            for tid in (1, 2 + r):
                tx.finish(tid, rx.endpoint)
            for tid in (1, 2 + r):
                tx.wait(tid, timeout=30)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert not errors
    assert poll_until(rx, [1, 2, 3]) == {1: None, 2: None, 3: None}
    for r in range(2):
        apply(ref, srcs[r], shared[r] + own[r])
    assert torch.equal(byte_view(dst), byte_view(ref))
    assert rx.num_connections == 2


def test_one_sender_feeds_two_receivers(closer):
    size = 128 * BLOCK
    src = rand_region(size, seed=20)
    dsts = [rand_region(size, seed=21), rand_region(size, seed=22)]
    refs = [d.clone() for d in dsts]
    rxs = [TcpReceiver(d) for d in dsts]
    tx = TcpSender(src)
    for o in (*rxs, tx):
        closer(o)
    # Decode context parallelism: block b goes to rank b % 2, at slot b // 2.
    pieces = [[Piece(b * BLOCK, (b // 2) * BLOCK, BLOCK) for b in range(r, 128, 2)] for r in range(2)]
    deadline = time.monotonic() + 30
    for r in range(2):
        rxs[r].expect(5, ranges_of(pieces[r]), deadline)
    for k in range(0, 64, 16):
        for r in range(2):
            tx.send(5, rxs[r].endpoint, pieces[r][k : k + 16], deadline)
    for r in range(2):
        tx.finish(5, rxs[r].endpoint)
    tx.wait(5, timeout=30)
    for r in range(2):
        assert poll_until(rxs[r], [5]) == {5: None}
        apply(refs[r], src, pieces[r])
        assert torch.equal(byte_view(dsts[r]), byte_view(refs[r]))


def test_eight_concurrent_transfers_share_one_connection(closer):
    size = 512 * BLOCK
    src = rand_region(size, seed=30)
    dst = rand_region(size, seed=31)
    ref = dst.clone()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    g = torch.Generator().manual_seed(32)
    dst_perm = torch.randperm(512, generator=g).tolist()
    plans = {tid: [Piece(b * BLOCK, dst_perm[b] * BLOCK, BLOCK) for b in range(tid * 64, tid * 64 + 64)] for tid in range(8)}
    deadline = time.monotonic() + 30
    for tid, ps in plans.items():
        rx.expect(tid, ranges_of(ps), deadline)
    start = threading.Barrier(8)
    errors = []

    def run(tid):
        try:
            start.wait(timeout=10)
            for k in range(0, 64, 4):  # 16 small frames each, interleaving with the others
                tx.send(tid, rx.endpoint, plans[tid][k : k + 4], deadline)
            tx.finish(tid, rx.endpoint, trailer=f"t{tid}".encode())
            tx.wait(tid, timeout=30)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(tid,)) for tid in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert not errors
    assert poll_until(rx, plans) == {tid: None for tid in plans}
    assert rx.num_connections == 1
    for ps in plans.values():
        apply(ref, src, ps)
    assert torch.equal(byte_view(dst), byte_view(ref))
    assert [rx.trailer(tid) for tid in plans] == [f"t{tid}".encode() for tid in plans]


def test_trailer_delivered_and_awaited(closer):
    src, dst = rand_region(64 * BLOCK, seed=40), rand_region(64 * BLOCK, seed=41)
    ref = dst.clone()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    pieces = [Piece(b * BLOCK, (63 - b) * BLOCK, BLOCK) for b in range(32)]
    rx.expect(9, ranges_of(pieces), time.monotonic() + 30, want_trailer=True)
    tx.send(9, rx.endpoint, pieces, time.monotonic() + 30)
    # A later transfer on the same connection completing proves the data frame landed.
    rx.expect(10, [(32 * BLOCK, BLOCK)], time.monotonic() + 30)
    tx.send(10, rx.endpoint, [Piece(0, 32 * BLOCK, BLOCK)], time.monotonic() + 30)
    tx.finish(10, rx.endpoint)
    tx.wait(10, timeout=30)
    assert poll_until(rx, [10]) == {10: None}
    assert rx.poll() == {} and rx.trailer(9) is None  # every byte of 9 is there, but no trailer yet
    trailer = bytes(range(256)) * 3
    tx.finish(9, rx.endpoint, trailer=trailer)
    tx.wait(9, timeout=30)
    assert poll_until(rx, [9]) == {9: None}
    assert rx.trailer(9) == trailer
    apply(ref, src, pieces + [Piece(0, 32 * BLOCK, BLOCK)])
    assert torch.equal(byte_view(dst), byte_view(ref))


def test_bytes_written_twice_count_once(closer):
    src, dst = rand_region(8 * BLOCK, seed=45), rand_region(8 * BLOCK, seed=46)
    ref = dst.clone()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    rx.expect(1, [(0, 2 * BLOCK)], time.monotonic() + 30)
    rx.expect(2, [(4 * BLOCK, BLOCK)], time.monotonic() + 30)
    tx.send(1, rx.endpoint, [Piece(0, 0, BLOCK), Piece(BLOCK // 2, BLOCK // 2, BLOCK)], time.monotonic() + 30)
    tx.send(1, rx.endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)  # 2.5 blocks sent, 1.5 distinct
    tx.send(2, rx.endpoint, [Piece(0, 4 * BLOCK, BLOCK)], time.monotonic() + 30)
    tx.finish(2, rx.endpoint)
    tx.wait(2, timeout=30)
    assert poll_until(rx, [2]) == {2: None} and rx.poll() == {}  # 1 is still short of its last half block
    tx.send(1, rx.endpoint, [Piece(BLOCK, BLOCK, BLOCK)], time.monotonic() + 30)
    tx.finish(1, rx.endpoint)
    tx.wait(1, timeout=30)
    assert poll_until(rx, [1]) == {1: None}
    apply(ref, src, [Piece(0, 0, 2 * BLOCK), Piece(0, 4 * BLOCK, BLOCK)])
    assert torch.equal(byte_view(dst), byte_view(ref))


def test_transfer_ids_span_u64(closer):
    src, dst = rand_region(8 * BLOCK, seed=47), rand_region(8 * BLOCK, seed=48)
    ref = dst.clone()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    tids = [1 << 63, (1 << 64) - 1]  # past int64: the header carries a u64
    for k, tid in enumerate(tids):
        rx.expect(tid, [(k * BLOCK, BLOCK)], time.monotonic() + 30)
        tx.send(tid, rx.endpoint, [Piece(k * BLOCK, k * BLOCK, BLOCK)], time.monotonic() + 30)
        tx.finish(tid, rx.endpoint)
    for tid in tids:
        tx.wait(tid, timeout=30)
    assert poll_until(rx, tids) == {tid: None for tid in tids}
    apply(ref, src, [Piece(0, 0, 2 * BLOCK)])
    assert torch.equal(byte_view(dst), byte_view(ref))
    for bad in (-1, 1 << 64):  # refused where they are given, on both sides
        with pytest.raises(ValueError, match="u64"):
            rx.expect(bad, [(0, BLOCK)], time.monotonic() + 30)
        with pytest.raises(ValueError, match="u64"):
            tx.send(bad, rx.endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)
        with pytest.raises(ValueError, match="u64"):
            tx.finish(bad, rx.endpoint)


def test_cancel_after_completion_acknowledges_a_late_finish(closer):
    """Two senders feed one transfer; it completes with their data, before the second
    one's FINISH. Releasing it then (cancel) keeps it complete: that FINISH is
    acknowledged, not refused."""
    size = 16 * BLOCK
    srcs = [rand_region(size, seed=48), rand_region(size, seed=49)]
    dst = rand_region(size, seed=50)
    ref = dst.clone()
    rx, a, b = TcpReceiver(dst), TcpSender(srcs[0]), TcpSender(srcs[1])
    closer(rx), closer(a), closer(b)
    halves = [[Piece(0, 0, 4 * BLOCK)], [Piece(4 * BLOCK, 4 * BLOCK, 4 * BLOCK)]]
    rx.expect(1, [(0, 8 * BLOCK)], time.monotonic() + 30)
    a.send(1, rx.endpoint, halves[0], time.monotonic() + 30)
    b.send(1, rx.endpoint, halves[1], time.monotonic() + 30)
    a.finish(1, rx.endpoint)
    a.wait(1, timeout=30)
    assert poll_until(rx, [1]) == {1: None}
    rx.cancel(1)
    rx.cancel(1)
    b.finish(1, rx.endpoint)
    b.wait(1, timeout=30)
    assert rx.poll() == {}
    apply(ref, srcs[0], halves[0])
    apply(ref, srcs[1], halves[1])
    assert torch.equal(byte_view(dst), byte_view(ref))


def test_frames_of_unknown_transfers_are_drained(closer):
    dst = rand_region(64 * BLOCK, seed=50)
    ref = dst.clone()
    rx = TcpReceiver(dst)
    closer(rx)
    rx.expect(1, [(0, BLOCK)], time.monotonic() + 30)
    payload = os.urandom(BLOCK)
    with raw_connect(rx) as s:
        s.sendall(frame(DATA, 99, pieces=[(8 * BLOCK, BLOCK)], payload=os.urandom(BLOCK)))  # unknown: dropped
        s.sendall(frame(DATA, 1, pieces=[(0, BLOCK)], payload=payload))  # the stream is still in sync
        s.sendall(frame(FINISH, 99, seq=1))
        s.sendall(frame(FINISH, 1, seq=1))
        assert poll_until(rx, [1]) == {1: None}
        replies = b""
        s.settimeout(10)
        while len(replies) < 80 + len("unknown transfer"):
            replies += s.recv(4096)
    byte_view(ref)[:BLOCK] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    assert torch.equal(byte_view(dst), byte_view(ref))
    first = _BODY.unpack_from(replies)
    assert first[2] == ERROR and first[4] == 99 and first[3] == 1 + TransferError.KINDS.index("refused")
    second = _BODY.unpack_from(replies, 40 + first[7])
    assert second[2] == ACK and second[4] == 1


def test_data_before_expect_is_refused(closer):
    dst = torch.zeros(8 * BLOCK, dtype=torch.uint8)
    rx = TcpReceiver(dst)
    closer(rx)
    with raw_connect(rx) as s:
        s.sendall(frame(DATA, 5, seq=0, pieces=[(0, BLOCK)], payload=b"\x01" * BLOCK))  # too early: drained
        rx.expect(6, [(BLOCK, BLOCK)], time.monotonic() + 30)
        s.sendall(frame(DATA, 6, pieces=[(BLOCK, BLOCK)], payload=b"\x06" * BLOCK))
        assert poll_until(rx, [6]) == {6: None}  # the early frame has been handled by now
        rx.expect(5, [(0, 2 * BLOCK)], time.monotonic() + 30)
        s.sendall(frame(DATA, 5, seq=1, pieces=[(BLOCK // 2, BLOCK)], payload=b"\x02" * BLOCK))
        got = poll_until(rx, [5], timeout=20)
    assert got[5].kind == "refused"
    assert not dst[:BLOCK].any()


# ---- faults --------------------------------------------------------------------------------

CHILD = r"""
import sys, time, torch
from braid.kv_transfer.base import Piece
from braid.kv_transfer.tcp import TcpSender
endpoint, tid, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
src = torch.randint(1, 256, (size,), dtype=torch.uint8)  # no zero byte: landed bytes show
tx = TcpSender(src)
chunk, off = 1 << 16, 0
print("ready", flush=True)
while True:  # only ever the first half of the range: the transfer cannot complete
    tx.send(tid, endpoint, [Piece(off, off, chunk)], time.monotonic() + 60)
    off = (off + chunk) % (size // 2)
    time.sleep(0.002)
"""


def test_sender_process_killed_mid_transfer(closer):
    size = 8 << 20
    dst = torch.zeros(size, dtype=torch.uint8)
    other_src = rand_region(64 * BLOCK, seed=60)
    rx, tx = TcpReceiver(dst), TcpSender(other_src)
    closer(rx), closer(tx)
    deadline = time.monotonic() + 50
    rx.expect(1, [(0, size)], deadline)
    other = [Piece(b * BLOCK, size // 2 + b * BLOCK, BLOCK) for b in range(64)]
    rx.expect(2, ranges_of(other), deadline)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, rx.endpoint, "1", str(size)], stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 40)
        assert ready and proc.stdout.readline() == b"ready\n"
        tx.send(2, rx.endpoint, other[:32], deadline)  # in flight on another connection
        end = time.monotonic() + 20
        while not dst[: size // 2].any():
            assert time.monotonic() < end, "no byte of the child's transfer arrived"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    got = poll_until(rx, [1], timeout=20)
    assert isinstance(got[1], TransferError) and got[1].kind == "peer_lost"
    assert time.monotonic() < deadline
    tx.send(2, rx.endpoint, other[32:], deadline)
    tx.finish(2, rx.endpoint)
    tx.wait(2, timeout=30)
    assert poll_until(rx, [2]) == {2: None}


class SilentServer:
    """Accepts connections and never reads from them."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.endpoint = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                self.accepted.append(self.listener.accept()[0])
            except socket.timeout:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        for s in self.accepted:
            s.close()
        self.listener.close()


def test_receiver_that_never_reads_times_out(closer):
    src = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8)
    dst = torch.zeros(64 << 20, dtype=torch.uint8)
    server = SilentServer()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(server), closer(rx), closer(tx)
    deadline = time.monotonic() + 1.5
    tx.send(1, server.endpoint, [Piece(0, 0, 64 << 20)], deadline)  # far more than the socket buffers hold
    tx.finish(1, server.endpoint)
    # Another transfer, on another connection of the same sender, is unaffected.
    rx.expect(2, [(0, 1 << 20)], time.monotonic() + 30)
    tx.send(2, rx.endpoint, [Piece(0, 0, 1 << 20)], time.monotonic() + 30)
    tx.finish(2, rx.endpoint)
    with pytest.raises(TransferError) as err:
        tx.wait(1, timeout=30)
    assert err.value.kind == "timeout"
    assert time.monotonic() < deadline + SLACK
    tx.wait(2, timeout=30)
    assert poll_until(rx, [2]) == {2: None}
    assert torch.equal(dst[: 1 << 20], src[: 1 << 20])
    # The sender dropped the stalled connection by itself (wait's own deadline does not
    # close connections) ...
    end = time.monotonic() + 20
    while tx.num_connections > 1:
        assert time.monotonic() < end, "the stalled connection was not dropped"
        time.sleep(0.01)
    # ... and a later transfer reconnects.
    tx.send(3, server.endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)
    end = time.monotonic() + 20
    while len(server.accepted) < 2:
        assert time.monotonic() < end, "no reconnect"
        time.sleep(0.01)
    tx.abort(3)


@pytest.mark.parametrize("damage", ["crc", "magic", "table"])
def test_corrupted_header_fails_transfers_on_that_connection(closer, damage):
    src = rand_region(64 * BLOCK, seed=70)
    dst = rand_region(64 * BLOCK, seed=71)
    ref = dst.clone()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    deadline = time.monotonic() + 30
    rx.expect(1, [(0, 8 * BLOCK)], deadline)
    other = [Piece(b * BLOCK, b * BLOCK, BLOCK) for b in range(32, 48)]
    rx.expect(2, ranges_of(other), deadline)
    tx.send(2, rx.endpoint, other[:8], deadline)  # in flight on a healthy connection
    first = os.urandom(BLOCK)
    bad = bytearray(frame(DATA, 1, seq=1, pieces=[(BLOCK, BLOCK)], payload=b"\xff" * BLOCK))
    if damage == "crc":
        bad[12] ^= 0x01  # a bit of the transfer id: header CRC mismatch
    elif damage == "magic":
        bad[0:4] = b"XXXX"
    else:
        bad[40] ^= 0x80  # the piece table's dst offset: table CRC mismatch
    with raw_connect(rx) as s:
        s.sendall(frame(DATA, 1, pieces=[(0, BLOCK)], payload=first))
        s.sendall(bytes(bad))
        got = poll_until(rx, [1], timeout=20)
        assert got[1].kind == "corrupt"
        wait_closed_by_peer(s)
    tx.send(2, rx.endpoint, other[8:], deadline)
    tx.finish(2, rx.endpoint)
    tx.wait(2, timeout=30)
    assert poll_until(rx, [2]) == {2: None}
    byte_view(ref)[:BLOCK] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
    apply(ref, src, other)
    assert torch.equal(byte_view(dst), byte_view(ref))  # the bad frame wrote nothing


def test_truncated_frame_is_peer_lost(closer):
    dst = torch.zeros(16 * BLOCK, dtype=torch.uint8)
    rx = TcpReceiver(dst)
    closer(rx)
    rx.expect(1, [(0, 8 * BLOCK)], time.monotonic() + 30)
    rx.expect(2, [(8 * BLOCK, BLOCK)], time.monotonic() + 30)
    with raw_connect(rx) as s, raw_connect(rx) as s2:
        s.sendall(frame(DATA, 1, pieces=[(0, 8 * BLOCK)], payload_len=8 * BLOCK) + b"\x01" * (3 * BLOCK))
        s2.sendall(frame(DATA, 2, pieces=[(8 * BLOCK, BLOCK)], payload=b"\x02" * BLOCK))
        assert poll_until(rx, [2]) == {2: None}
        s.close()
        got = poll_until(rx, [1], timeout=20)
    assert got[1].kind == "peer_lost"
    assert dst[3 * BLOCK : 8 * BLOCK].eq(0).all() and dst[8 * BLOCK : 9 * BLOCK].eq(2).all()


def test_expect_deadline_without_data_times_out(closer):
    rx = TcpReceiver(torch.zeros(BLOCK, dtype=torch.uint8))
    closer(rx)
    deadline = time.monotonic() + 0.5
    rx.expect(1, [(0, BLOCK)], deadline)
    got = poll_until(rx, [1], timeout=20)
    assert got[1].kind == "timeout"
    assert deadline <= time.monotonic() < deadline + SLACK


def test_frame_outside_expected_ranges_is_corrupt(closer):
    dst = rand_region(64 * BLOCK, seed=80)
    ref = dst.clone()
    rx = TcpReceiver(dst)
    closer(rx)
    rx.expect(1, [(0, 4 * BLOCK), (8 * BLOCK, 4 * BLOCK)], time.monotonic() + 30)
    rx.expect(2, [(20 * BLOCK, BLOCK)], time.monotonic() + 30)
    # In range, in range, and one that runs a byte past the end of the first range.
    pieces = [(0, BLOCK), (8 * BLOCK, BLOCK), (3 * BLOCK, BLOCK + 1)]
    with raw_connect(rx) as s:
        s.sendall(frame(DATA, 1, pieces=pieces, payload=b"\xee" * (3 * BLOCK + 1)))
        got = poll_until(rx, [1], timeout=20)
        assert got[1].kind == "corrupt"
        # The connection stays usable: the frame was drained, not written.
        s.sendall(frame(DATA, 2, pieces=[(20 * BLOCK, BLOCK)], payload=b"\x07" * BLOCK))
        assert poll_until(rx, [2]) == {2: None}
    byte_view(ref)[20 * BLOCK : 21 * BLOCK] = 7
    assert torch.equal(byte_view(dst), byte_view(ref))


def test_sender_piece_outside_ranges_fails_both_sides(closer):
    src, dst = rand_region(32 * BLOCK, seed=90), rand_region(32 * BLOCK, seed=91)
    ref = dst.clone()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    rx.expect(1, [(0, 4 * BLOCK)], time.monotonic() + 30)
    tx.send(1, rx.endpoint, [Piece(0, 0, BLOCK), Piece(BLOCK, 16 * BLOCK, BLOCK)], time.monotonic() + 30)
    tx.finish(1, rx.endpoint)
    with pytest.raises(TransferError) as err:
        tx.wait(1, timeout=30)
    assert err.value.kind == "corrupt"
    assert poll_until(rx, [1])[1].kind == "corrupt"
    assert torch.equal(byte_view(dst), byte_view(ref))


def test_cancel_mid_transfer_stops_all_writes(closer):
    size = 32 << 20
    src = torch.randint(1, 256, (size,), dtype=torch.uint8)  # no zero byte
    dst = torch.zeros(size, dtype=torch.uint8)
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    rx.expect(1, [(0, size)], time.monotonic() + 50)
    stop = threading.Event()

    def keep_sending():  # 1 MiB pieces, only ever the first half: never completes by itself
        off = 0
        while not stop.is_set():
            tx.send(1, rx.endpoint, [Piece(off, off, 1 << 20)], time.monotonic() + 50)
            off = (off + (1 << 20)) % (size // 2)
            time.sleep(0.001)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        end = time.monotonic() + 20
        while not dst[: size // 2].any():
            assert time.monotonic() < end
            time.sleep(0.005)
        rx.cancel(1)
        dst.zero_()  # the blocks are reused at once
        time.sleep(1.0)  # the sender keeps going meanwhile
    finally:
        stop.set()
        sender.join(timeout=10)
    assert not dst.any()
    assert rx.poll() == {}
    rx.cancel(1)  # idempotent
    # The receiver told the sender when the next frame came, before any finish.
    end = time.monotonic() + 20
    while True:
        try:
            tx.wait(1, timeout=0.1)
        except ValueError:  # not failed yet, so still "sent without finish"
            assert time.monotonic() < end, "the sender never learned of the cancel"
            time.sleep(0.05)
            continue
        except TransferError as e:
            assert e.kind == "aborted"
            break
        else:
            pytest.fail("wait succeeded for a cancelled transfer")


def test_cancel_while_a_frame_is_stalled_mid_payload(closer):
    dst = torch.zeros(64 * BLOCK, dtype=torch.uint8)
    rx = TcpReceiver(dst, cancel_grace=0.2)
    closer(rx)
    rx.expect(1, [(0, 32 * BLOCK)], time.monotonic() + 30)
    rx.expect(2, [(40 * BLOCK, BLOCK)], time.monotonic() + 30)
    with raw_connect(rx) as s:
        s.sendall(frame(DATA, 1, pieces=[(0, 32 * BLOCK)], payload_len=32 * BLOCK) + b"\x01" * BLOCK)
        end = time.monotonic() + 20
        while not dst[:BLOCK].all():  # the receiver is now blocked landing the rest
            assert time.monotonic() < end
            time.sleep(0.005)
        t0 = time.monotonic()
        rx.cancel(1)
        assert time.monotonic() - t0 < SLACK
        snapshot = dst.clone()
        try:
            s.sendall(b"\x01" * (31 * BLOCK))
        except OSError:
            pass  # the receiver shut the connection down: that is the point
        time.sleep(0.3)
    assert torch.equal(dst, snapshot)
    with raw_connect(rx) as s2:  # the receiver itself goes on
        s2.sendall(frame(DATA, 2, pieces=[(40 * BLOCK, BLOCK)], payload=b"\x02" * BLOCK))
        assert poll_until(rx, [2]) == {2: None}
    assert rx.poll() == {}


def test_sender_abort_fails_the_receiver_side(closer):
    src, dst = rand_region(32 * BLOCK, seed=100), rand_region(32 * BLOCK, seed=101)
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(rx), closer(tx)
    rx.expect(1, [(0, 32 * BLOCK)], time.monotonic() + 30)
    tx.send(1, rx.endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)
    tx.abort(1)
    tx.abort(1)
    tx.send(1, rx.endpoint, [Piece(BLOCK, BLOCK, BLOCK)], time.monotonic() + 30)  # dropped
    assert poll_until(rx, [1], timeout=20)[1].kind == "aborted"
    with pytest.raises(TransferError) as err:
        tx.wait(1, timeout=5)
    assert err.value.kind == "aborted"


def test_sender_poll_reports_each_transfer_once(closer):
    """poll() does not block; it reports an acknowledged transfer once, and fails one
    whose acknowledgement does not come by its deadline with "timeout"."""
    src, dst = rand_region(8 * BLOCK, seed=105), rand_region(8 * BLOCK, seed=106)
    server = SilentServer()
    rx, tx = TcpReceiver(dst), TcpSender(src)
    closer(server), closer(rx), closer(tx)
    rx.expect(1, [(0, BLOCK)], time.monotonic() + 30)
    tx.send(1, rx.endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)
    tx.finish(1, rx.endpoint)
    deadline = time.monotonic() + 1.0
    tx.send(2, server.endpoint, [Piece(0, 0, BLOCK)], deadline)  # written, never answered
    tx.finish(2, server.endpoint)
    got, when = {}, {}
    end = time.monotonic() + 20
    while got.keys() != {1, 2}:
        assert time.monotonic() < end, f"poll did not report {({1, 2} - got.keys())}"
        t0 = time.monotonic()
        out = tx.poll()
        assert time.monotonic() - t0 < SLACK
        assert not out.keys() & got.keys()  # each once
        got.update(out)
        when.update({tid: time.monotonic() for tid in out})
        time.sleep(0.01)
    assert got[1] is None
    assert isinstance(got[2], TransferError) and got[2].kind == "timeout"
    assert when[2] >= deadline
    assert tx.poll() == {}
    with pytest.raises(ValueError):  # reported, so forgotten
        tx.wait(1, timeout=1)
    with pytest.raises(TransferError) as err:  # a failed one stays failed
        tx.wait(2, timeout=1)
    assert err.value.kind == "timeout"


def test_unreachable_endpoint_is_refused(closer):
    tx = TcpSender(torch.zeros(BLOCK, dtype=torch.uint8))
    closer(tx)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        endpoint = "127.0.0.1:%d" % probe.getsockname()[1]
    tx.send(1, endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)
    tx.finish(1, endpoint)
    with pytest.raises(TransferError) as err:
        tx.wait(1, timeout=30)
    assert err.value.kind == "refused"


def test_close_joins_a_connection_its_sender_just_ended(closer, monkeypatch):
    """A connection whose sender closed it is still cleaning up (failing what it carried)
    when the receiver closes: close() waits for that thread too (it used to leave the
    connection's set first, so close() could return with the thread still running)."""
    src, dst = rand_region(4 * BLOCK, seed=120), rand_region(4 * BLOCK, seed=121)
    rx, tx = TcpReceiver(dst), TcpSender(src)
    entered = threading.Event()
    drop = rx._book.drop_conn

    def slow_drop(c, kind, detail):
        entered.set()
        time.sleep(0.5)
        drop(c, kind, detail)

    monkeypatch.setattr(rx._book, "drop_conn", slow_drop)
    rx.expect(1, [(0, BLOCK)], time.monotonic() + 30)
    tx.send(1, rx.endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)
    tx.finish(1, rx.endpoint)
    tx.wait(1, timeout=30)
    tx.close()  # the receiver's connection thread reads EOF and starts its cleanup
    assert entered.wait(10)
    rx.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("braid-tcp-read")]


def test_close_leaves_no_thread_or_socket(closer):
    fds_before = len(os.listdir("/proc/self/fd"))
    src, dst = rand_region(16 * BLOCK, seed=110), rand_region(16 * BLOCK, seed=111)
    rx, tx = TcpReceiver(dst), TcpSender(src)
    rx.expect(1, [(0, 16 * BLOCK)], time.monotonic() + 30)
    tx.send(1, rx.endpoint, [Piece(0, 0, 16 * BLOCK)], time.monotonic() + 30)
    tx.finish(1, rx.endpoint)
    tx.wait(1, timeout=30)
    rx.expect(2, [(0, BLOCK)], time.monotonic() + 30)  # still open at close
    tx.send(2, rx.endpoint, [Piece(0, 0, BLOCK)], time.monotonic() + 30)
    tx.close()
    rx.close()
    rx.close()
    with pytest.raises(TransferError) as err:
        tx.wait(2, timeout=5)
    assert err.value.kind == "aborted"
    assert not [t.name for t in threading.enumerate() if t.name.startswith("braid-tcp")]
    assert len(os.listdir("/proc/self/fd")) <= fds_before
