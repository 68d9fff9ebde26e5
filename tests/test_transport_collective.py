"""The collective transport over gloo between real processes: the receiver lives in
the test process, every sender in a process of its own (driven over stdin/stdout).
Each sender's region is random bytes from a seed, so the test rebuilds it and checks
the receiver's region byte for byte against a plain copy of the pieces."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from braid.kv_transfer.base import Piece, TransferError
from braid.kv_transfer.collective import CollectiveReceiver, CollectiveSender, plan_messages
from braid.kv_transfer.receiver_book import Coverage

REGION = 4 << 20  # bytes per region
BLOCK = 32 << 10
# small messages: blocks travel packed three to a message, longer pieces in several
SENDER_KW = {"chunk_bytes": 96 << 10, "pack_below": 40 << 10, "connect_timeout": 30.0}

_WORKER = r"""
import importlib, json, sys, time
import torch
from braid.kv_transfer.base import Piece, TransferError
mod, cls, nbytes, seed, kwargs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
region = torch.randint(0, 256, (nbytes,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
sender = getattr(importlib.import_module(mod), cls)(region, **kwargs)
print(json.dumps({"ok": True, "ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, out = cmd["op"], {"ok": True}
    try:
        if op == "send":
            sender.send(cmd["tid"], cmd["ep"], [Piece(*p) for p in cmd["pieces"]], time.monotonic() + cmd["within"])
        elif op == "finish":
            trailer = cmd.get("trailer")
            sender.finish(cmd["tid"], cmd["ep"], None if trailer is None else bytes.fromhex(trailer))
        elif op == "wait":
            sender.wait(cmd["tid"], cmd["wait_s"])
        elif op == "abort":
            sender.abort(cmd["tid"])
        elif op == "poll":
            out["results"] = {str(t): None if e is None else e.kind for t, e in sender.poll().items()}
        elif op == "close":
            sender.close()
    except TransferError as e:
        out = {"ok": False, "kind": e.kind, "detail": e.detail}
    print(json.dumps(out), flush=True)
    if op == "close":
        break
"""


def source_region(seed: int, nbytes: int = REGION) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class SenderProc:
    """A sender in its own process. Requests are answered in order, one line each."""

    def __init__(self, seed: int, cls: str = "CollectiveSender", mod: str = "braid.kv_transfer.collective", **kwargs):
        self.seed = seed
        self.source = source_region(seed)
        args = [sys.executable, "-c", _WORKER, mod, cls, str(REGION), str(seed), json.dumps(kwargs)]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.reply(120)["ready"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._replies.put(json.loads(line))
        self._replies.put(None)

    def reply(self, timeout: float = 60) -> dict:
        out = self._replies.get(timeout=timeout)
        if out is None:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace")[-3000:]
            raise AssertionError(f"sender process exited:\n{tail}")
        return out

    def call(self, op: str, timeout: float = 60, **kw) -> dict:
        self.post(op, **kw)
        return self.reply(timeout)

    def post(self, op: str, **kw) -> None:
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()

    def send(self, tid: int, ep: str, pieces: list[Piece], within: float = 60.0) -> None:
        assert self.call("send", tid=tid, ep=ep, pieces=[(p.src_offset, p.dst_offset, p.length) for p in pieces], within=within)["ok"]

    def finish(self, tid: int, ep: str, trailer: bytes | None = None) -> None:
        assert self.call("finish", tid=tid, ep=ep, trailer=None if trailer is None else trailer.hex())["ok"]

    def wait(self, tid: int, timeout: float = 60.0) -> dict:
        return self.call("wait", timeout=timeout + 30, tid=tid, wait_s=timeout)

    def poll_until(self, tids, timeout: float = 60.0) -> dict[int, str | None]:
        """sender.poll() until every tid reported: {tid: None | error kind}."""
        end, got = time.monotonic() + timeout, {}
        while set(tids) - set(got):
            assert time.monotonic() < end, f"sender reported no result for {sorted(set(tids) - set(got))}"
            got.update({int(t): k for t, k in self.call("poll")["results"].items()})
            time.sleep(0.02)
        return got

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("close", timeout=60)
            finally:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def procs():
    """procs(seed) -> a sender process whose region comes from `seed`, shared by the
    tests of this module (transfer ids differ across tests); fresh=True for one to kill."""
    cache: dict[int, SenderProc] = {}

    def get(seed: int, fresh: bool = False) -> SenderProc:
        p = cache.get(seed)
        if p is None or fresh or p.proc.poll() is not None:
            p = cache[seed] = SenderProc(seed, **SENDER_KW)
        return p

    yield get
    for p in cache.values():
        try:
            p.close()
        except Exception:
            p.kill()


@pytest.fixture
def receiver():
    made: list[CollectiveReceiver] = []

    def make(dtype: torch.dtype = torch.uint8, **kwargs) -> tuple[CollectiveReceiver, torch.Tensor]:
        """-> (receiver, its region as flat bytes); the region itself has `dtype`."""
        region = torch.zeros(REGION // dtype.itemsize, dtype=dtype)
        r = CollectiveReceiver(region, **kwargs)
        made.append(r)
        return r, region.view(torch.uint8)

    yield make
    for r in made:
        r.close()


def block_plan(n: int, seed: int, src_base: int = 0) -> list[Piece]:
    """n whole blocks from consecutive source blocks to shuffled destination blocks."""
    g = torch.Generator().manual_seed(1000 + seed)
    dst = torch.randperm(REGION // BLOCK, generator=g)[:n].tolist()
    return [Piece(src_base + i * BLOCK, d * BLOCK, BLOCK) for i, d in enumerate(dst)]


def expected_region(moves: list[tuple[torch.Tensor, Piece]]) -> torch.Tensor:
    out = torch.zeros(REGION, dtype=torch.uint8)
    for src, p in moves:
        out[p.dst_offset : p.dst_offset + p.length] = src[p.src_offset : p.src_offset + p.length]
    return out


def ranges_of(pieces: list[Piece]) -> list[tuple[int, int]]:
    return [(p.dst_offset, p.length) for p in pieces]


def results_within(r, tids, timeout: float) -> dict[int, TransferError | None]:
    """Poll until every tid reported, or fail."""
    end = time.monotonic() + timeout
    got: dict = {}
    while set(tids) - set(got):
        assert time.monotonic() < end, f"no result for {sorted(set(tids) - set(got))} within {timeout}s"
        got.update(r.poll())
        time.sleep(0.01)
    return got


def wait_landed(region: torch.Tensor, source: torch.Tensor, p: Piece, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not torch.equal(region[p.dst_offset : p.dst_offset + p.length], source[p.src_offset : p.src_offset + p.length]):
        assert time.monotonic() < end, f"{p} did not land within {timeout}s"
        time.sleep(0.01)


def layers(pieces: list[Piece], n: int) -> list[list[Piece]]:
    return [pieces[i::n] for i in range(n)]


# ---- tests ---------------------------------------------------------------------


def test_coverage_counts_each_byte_once():
    cov, ref = Coverage(), set()
    g = torch.Generator().manual_seed(3)
    for _ in range(300):
        s = int(torch.randint(0, 500, (1,), generator=g))
        e = s + int(torch.randint(0, 40, (1,), generator=g))
        cov.add(s, e)
        ref.update(range(s, e))
        assert cov.size == len(ref)
    assert all(a < b for a, b in zip(cov.ends, cov.starts[1:]))


@pytest.mark.parametrize("chunk,pack_below", [(96, 40), (64, 0), (64, 64), (1000, 300)])
def test_plan_messages_covers_each_byte_once(chunk, pack_below):
    g = torch.Generator().manual_seed(chunk + pack_below)
    lens = torch.randint(0, 250, (60,), generator=g).tolist()
    msgs = plan_messages(lens, chunk, pack_below)
    seen = [(i, a + j) for m in msgs for i, a, n in m for j in range(n)]
    assert seen == [(i, j) for i, n in enumerate(lens) for j in range(n)]  # every byte once, in order
    for m in msgs:
        assert 0 < sum(n for _, _, n in m) <= chunk
        if len(m) > 1:  # packed: only whole short pieces
            assert all(a == 0 and n == lens[i] < pack_below for i, a, n in m)


@pytest.mark.timeout(180)
def test_round_trip_exact_with_trailer(receiver, procs):
    r, region = receiver()
    s = procs(1)
    pieces = block_plan(40, seed=1)
    pieces.append(Piece(REGION - 6 * BLOCK - 123, 7, 150_001))  # unaligned, direct, spans two messages
    pieces.append(Piece(REGION - 123, 200_003, 101))  # tiny and unaligned, packed
    pieces = [p for p in pieces[:-2] if p.dst_offset >= 200_104] + pieces[-2:]
    r.expect(5, ranges_of(pieces), time.monotonic() + 60, want_trailer=True)
    for layer in layers(pieces, 3):
        s.send(5, r.endpoint, layer)
    s.finish(5, r.endpoint, b"first-token:42")
    assert s.wait(5) == {"ok": True}
    assert results_within(r, [5], 30) == {5: None}
    assert r.trailer(5) == b"first-token:42"
    assert torch.equal(region, expected_region([(s.source, p) for p in pieces]))


@pytest.mark.timeout(180)
def test_eight_concurrent_transfers_one_sender(receiver, procs):
    r, region = receiver()
    s = procs(2)
    g = torch.Generator().manual_seed(8)
    dst_blocks = torch.randperm(REGION // BLOCK, generator=g)[:64].tolist()
    plans = {tid: [Piece(((tid * 8 + i) * 7 % 120) * BLOCK, dst_blocks[tid * 8 + i] * BLOCK, BLOCK) for i in range(8)] for tid in range(8)}
    for tid, pieces in plans.items():
        r.expect(100 + tid, ranges_of(pieces), time.monotonic() + 60)
    for layer in range(4):  # the layers of all eight interleave on the one connection
        for tid, pieces in plans.items():
            s.send(100 + tid, r.endpoint, pieces[layer * 2 : layer * 2 + 2])
    for tid in plans:
        s.finish(100 + tid, r.endpoint)
    for tid in range(4):
        assert s.wait(100 + tid) == {"ok": True}
    assert s.poll_until(range(104, 108)) == {t: None for t in range(104, 108)}  # the non-blocking way
    assert results_within(r, [100 + t for t in plans], 30) == {100 + t: None for t in plans}
    assert torch.equal(region, expected_region([(s.source, p) for ps in plans.values() for p in ps]))


@pytest.mark.timeout(180)
def test_two_senders_into_one_receiver(receiver, procs):
    """Two prefill ranks feed one transfer (half the blocks each) and one of their own
    each, into a bf16 cache."""
    r, region = receiver(torch.bfloat16)
    a, b = procs(1), procs(2)
    shared = block_plan(24, seed=3)
    own_a = [Piece(30 * BLOCK, 100 * BLOCK + 5, BLOCK - 5)]
    own_b = [Piece(31 * BLOCK, 101 * BLOCK, BLOCK)]
    shared = [p for p in shared if p.dst_offset // BLOCK not in (100, 101)]
    half_a, half_b = shared[0::2], shared[1::2]
    r.expect(7, ranges_of(shared), time.monotonic() + 60, want_trailer=True)
    r.expect(8, ranges_of(own_a), time.monotonic() + 60)
    r.expect(9, ranges_of(own_b), time.monotonic() + 60)
    a.send(7, r.endpoint, half_a)
    b.send(7, r.endpoint, half_b)
    a.send(8, r.endpoint, own_a)
    b.send(9, r.endpoint, own_b)
    a.finish(7, r.endpoint)
    a.finish(8, r.endpoint)
    b.finish(9, r.endpoint)
    assert a.wait(7) == {"ok": True} and a.wait(8) == {"ok": True} and b.wait(9) == {"ok": True}
    assert results_within(r, [8, 9], 30) == {8: None, 9: None}
    assert r.poll() == {}  # 7 still misses b's half (and the trailer b sends)
    b.finish(7, r.endpoint, b"t")
    assert b.wait(7) == {"ok": True}
    assert results_within(r, [7], 30) == {7: None}
    moves = [(a.source, p) for p in half_a + own_a] + [(b.source, p) for p in half_b + own_b]
    assert torch.equal(region, expected_region(moves))
    assert r.num_connections == 2


def check_late_finish_after_cancel(r, region: torch.Tensor, a: SenderProc, b: SenderProc, tid: int, pieces: list[Piece]) -> None:
    """A transfer fed by two senders completes before the second one's FINISH; released
    then (cancel), it stays complete, so that FINISH is acknowledged, not refused."""
    half_a, half_b = pieces[: len(pieces) // 2], pieces[len(pieces) // 2 :]
    r.expect(tid, ranges_of(pieces), time.monotonic() + 60)
    a.send(tid, r.endpoint, half_a)
    b.send(tid, r.endpoint, half_b)
    a.finish(tid, r.endpoint)
    assert a.wait(tid) == {"ok": True}
    assert results_within(r, [tid], 30) == {tid: None}
    r.cancel(tid)
    b.finish(tid, r.endpoint)
    assert b.wait(tid) == {"ok": True}
    assert r.poll() == {}
    assert torch.equal(region, expected_region([(a.source, p) for p in half_a] + [(b.source, p) for p in half_b]))


@pytest.mark.timeout(180)
def test_cancel_after_completion_acknowledges_a_late_finish(receiver, procs):
    r, region = receiver()
    check_late_finish_after_cancel(r, region, procs(1), procs(2), 91, block_plan(8, seed=9))


@pytest.mark.timeout(180)
def test_sender_killed_mid_transfer(receiver, procs):
    r, region = receiver()
    doomed, healthy = procs(5, fresh=True), procs(1)
    pieces = block_plan(16, seed=5)
    other = [Piece(p.src_offset, p.dst_offset, p.length) for p in block_plan(16, seed=6) if p not in pieces]
    other = [p for p in other if all(abs(p.dst_offset - q.dst_offset) >= BLOCK for q in pieces)]
    r.expect(11, ranges_of(pieces), time.monotonic() + 60)
    r.expect(12, ranges_of(other), time.monotonic() + 60)
    doomed.send(11, r.endpoint, pieces[:8])
    healthy.send(12, r.endpoint, other[: len(other) // 2])
    # let the first layer land, then kill the process with its transfer half done
    wait_landed(region, doomed.source, pieces[7])
    wait_landed(region, healthy.source, other[len(other) // 2 - 1])
    t0 = time.monotonic()
    doomed.kill()
    got = results_within(r, [11], 20)
    assert isinstance(got[11], TransferError) and got[11].kind == "peer_lost", got
    assert time.monotonic() - t0 < 20  # long before the 60 s deadline
    healthy.send(12, r.endpoint, other[len(other) // 2 :])
    healthy.finish(12, r.endpoint)
    assert healthy.wait(12) == {"ok": True}
    assert results_within(r, [12], 30) == {12: None}
    got12 = expected_region([(healthy.source, p) for p in other])
    for p in other:
        assert torch.equal(region[p.dst_offset : p.dst_offset + p.length], got12[p.dst_offset : p.dst_offset + p.length])
    # the receiver still takes new senders
    late = procs(2)
    r.expect(13, [(0, BLOCK)], time.monotonic() + 60)
    late.send(13, r.endpoint, [Piece(0, 0, BLOCK)])
    late.finish(13, r.endpoint)
    assert late.wait(13) == {"ok": True}
    assert results_within(r, [13], 30) == {13: None}
    assert torch.equal(region[:BLOCK], late.source[:BLOCK])


@pytest.mark.timeout(180)
def test_expect_deadline_passes(receiver, procs):
    r, region = receiver()
    t0 = time.monotonic()
    r.expect(21, [(0, BLOCK)], t0 + 1.0)  # nobody sends
    got = results_within(r, [21], 15)
    assert got[21].kind == "timeout" and time.monotonic() - t0 >= 1.0
    # a sender that sends half and finishes learns the receiver's verdict
    s = procs(1)
    pieces = block_plan(4, seed=8)
    r.expect(22, ranges_of(pieces), time.monotonic() + 3.0)
    s.send(22, r.endpoint, pieces[:2])
    got = results_within(r, [22], 20)
    assert got[22].kind == "timeout"
    s.finish(22, r.endpoint)
    out = s.wait(22)
    assert not out["ok"] and out["kind"] == "timeout"


@pytest.mark.timeout(180)
def test_cancel_stops_writes(receiver, procs):
    r, region = receiver()
    s = procs(2)
    pieces = block_plan(12, seed=9)
    r.expect(31, ranges_of(pieces), time.monotonic() + 60)
    s.send(31, r.endpoint, pieces[:6])
    wait_landed(region, s.source, pieces[5])
    r.cancel(31)
    snapshot = region.clone()
    s.send(31, r.endpoint, pieces[6:])
    assert s.poll_until([31]) == {31: "aborted"}  # told on its next frame, before any finish
    s.finish(31, r.endpoint)
    out = s.wait(31)
    assert not out["ok"] and out["kind"] == "aborted"
    assert torch.equal(region, snapshot)  # nothing of 31 landed after cancel returned
    assert r.poll() == {}
    # the connection still serves later transfers, even one reusing the blocks
    r.expect(32, ranges_of(pieces), time.monotonic() + 60)
    s.send(32, r.endpoint, pieces)
    s.finish(32, r.endpoint)
    assert s.wait(32) == {"ok": True}
    assert results_within(r, [32], 30) == {32: None}
    assert torch.equal(region, expected_region([(s.source, p) for p in pieces]))


@pytest.mark.timeout(180)
def test_piece_outside_ranges_is_corrupt_and_not_written(receiver, procs):
    r, region = receiver()
    s = procs(1)
    good = [Piece(0, 0, BLOCK)]
    r.expect(41, ranges_of(good), time.monotonic() + 60)
    r.expect(42, [(4 * BLOCK, BLOCK)], time.monotonic() + 60)
    s.send(41, r.endpoint, good + [Piece(BLOCK, 2 * BLOCK, BLOCK)])  # second piece not expected
    s.send(42, r.endpoint, [Piece(5 * BLOCK, 4 * BLOCK, BLOCK)])
    s.finish(41, r.endpoint)
    s.finish(42, r.endpoint)
    out = s.wait(41)
    assert not out["ok"] and out["kind"] == "corrupt"
    assert s.wait(42) == {"ok": True}
    got = results_within(r, [41, 42], 30)
    assert got[41].kind == "corrupt" and got[42] is None
    assert torch.equal(region[: 4 * BLOCK], torch.zeros(4 * BLOCK, dtype=torch.uint8))  # the frame went to scratch
    assert torch.equal(region[4 * BLOCK : 5 * BLOCK], s.source[5 * BLOCK : 6 * BLOCK])


@pytest.mark.timeout(180)
def test_sender_abort_reaches_receiver(receiver, procs):
    r, region = receiver()
    s = procs(2)
    pieces = block_plan(6, seed=11)
    r.expect(51, ranges_of(pieces), time.monotonic() + 60)
    s.send(51, r.endpoint, pieces[:3])
    assert s.call("abort", tid=51)["ok"]
    got = results_within(r, [51], 20)
    assert got[51].kind == "aborted"
    out = s.wait(51)
    assert not out["ok"] and out["kind"] == "aborted"


@pytest.mark.timeout(120)
def test_unreachable_endpoint_is_refused_fast():
    region = torch.zeros(1024, dtype=torch.uint8)
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = CollectiveSender(region, connect_timeout=10.0)
    try:
        t0 = time.monotonic()
        s.send(1, f"127.0.0.1:{port}", [Piece(0, 0, 16)], time.monotonic() + 30)
        s.finish(1, f"127.0.0.1:{port}")
        with pytest.raises(TransferError) as e:
            s.wait(1, 20)
        assert e.value.kind == "refused" and time.monotonic() - t0 < 5
    finally:
        s.close()


@pytest.mark.timeout(180)
def test_receiver_closed_under_a_sender(receiver, procs):
    r, region = receiver()
    s = procs(1)
    r.expect(61, [(0, BLOCK)], time.monotonic() + 60)
    s.send(61, r.endpoint, [Piece(0, 0, BLOCK)])
    s.finish(61, r.endpoint)
    assert s.wait(61) == {"ok": True}
    ep = r.endpoint
    r.close()
    s.send(62, ep, [Piece(0, 0, BLOCK)])
    s.finish(62, ep)
    out = s.wait(62, timeout=20)
    assert not out["ok"] and out["kind"] in ("peer_lost", "refused")


def test_bad_arguments():
    region = torch.zeros(1024, dtype=torch.uint8)
    r = CollectiveReceiver(region)
    try:
        with pytest.raises(ValueError):
            r.expect(1, [(1000, 100)], time.monotonic() + 1)
        r.expect(2, [(0, 10)], time.monotonic() + 10)
        with pytest.raises(ValueError):
            r.expect(2, [(0, 10)], time.monotonic() + 10)
        r.expect(3, [], time.monotonic() + 10)  # nothing to wait for: complete at once
        assert r.poll() == {3: None}
    finally:
        r.close()
    s = CollectiveSender(region)
    try:
        with pytest.raises(ValueError):
            s.send(1, "127.0.0.1:1", [Piece(1000, 0, 100)], time.monotonic() + 1)
        with pytest.raises(ValueError):
            s.send(1, "no-port", [Piece(0, 0, 10)], time.monotonic() + 1)
        with pytest.raises(ValueError):
            s.wait(99, 1)
    finally:
        s.close()
    with pytest.raises(ValueError):
        CollectiveReceiver(torch.zeros(4, 4).t())


@pytest.mark.timeout(180)
def test_cancel_in_the_middle_of_a_frame(receiver, procs):
    """Cancel while one large frame is landing: nothing of it lands after cancel returns."""
    r, region = receiver()
    s = procs(2)
    pieces = block_plan(120, seed=13)
    r.expect(71, ranges_of(pieces), time.monotonic() + 60)
    s.send(71, r.endpoint, pieces)  # one frame, 40 messages of three blocks
    wait_landed(region, s.source, pieces[0])
    r.cancel(71)
    snapshot = region.clone()
    s.finish(71, r.endpoint)
    out = s.wait(71)
    assert not out["ok"] and out["kind"] == "aborted"
    time.sleep(0.2)
    assert torch.equal(region, snapshot)
    assert r.poll() == {}


@pytest.mark.timeout(180)
def test_data_before_expect_is_refused(receiver, procs):
    r, region = receiver()
    s = procs(1)
    s.send(81, r.endpoint, [Piece(0, 0, BLOCK)])
    s.send(82, r.endpoint, [Piece(0, BLOCK, BLOCK)])
    r.expect(82, [(BLOCK, BLOCK)], time.monotonic() + 60)  # after 81's frame, maybe before 82's
    s.finish(82, r.endpoint)
    out = s.wait(82)
    assert out == {"ok": True} or out["kind"] == "refused"
    r.expect(81, [(0, BLOCK)], time.monotonic() + 60)  # surely too late for 81's frame
    s.finish(81, r.endpoint)
    out = s.wait(81)
    assert not out["ok"] and out["kind"] == "refused"
    assert results_within(r, [81], 30)[81].kind == "refused"
    assert torch.equal(region[:BLOCK], torch.zeros(BLOCK, dtype=torch.uint8))
