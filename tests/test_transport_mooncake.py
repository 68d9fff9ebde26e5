"""The mooncake transport with Mooncake's TCP protocol on loopback: the receiver in the
test process, each sender in a process of its own. Skipped, with the reason, where
Mooncake's transfer engine cannot be imported or started; the error a user gets then is
checked everywhere."""
from __future__ import annotations

import time

import pytest
import torch

from braid.kv_transfer import mooncake
from braid.kv_transfer.base import Piece, TransferError
from braid.kv_transfer.mooncake import MooncakeReceiver, MooncakeSender, MooncakeUnavailable, parse_mooncake_endpoint
from test_transport_collective import BLOCK, REGION, SenderProc, block_plan, check_late_finish_after_cancel, expected_region, layers, ranges_of, results_within, wait_landed

SENDER = dict(cls="MooncakeSender", mod="braid.kv_transfer.mooncake", connect_timeout=10.0)


def test_unavailable_engine_fails_clearly_on_construction(monkeypatch):
    monkeypatch.setattr(mooncake, "_engine_cls", None)
    monkeypatch.setattr(mooncake, "_import_error", "ImportError: No module named 'mooncake'")
    region = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(MooncakeUnavailable, match="rdma"):
        MooncakeReceiver(region)
    with pytest.raises(MooncakeUnavailable, match="No module named 'mooncake'"):
        MooncakeSender(region)
    assert "rdma" in mooncake.unavailable_reason()


def test_endpoint_format():
    assert parse_mooncake_endpoint("10.0.0.2:15001#0x7f00aa000040:4096#40123") == ("10.0.0.2:15001", 0x7F00AA000040, 4096, ("10.0.0.2", 40123))
    for bad in ("10.0.0.2:15001", "10.0.0.2:15001#0x10#1", "host#0x10:4#1", "a:1#zz:4#1"):
        with pytest.raises(ValueError):
            parse_mooncake_endpoint(bad)


@pytest.fixture
def receiver():
    reason = mooncake.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[MooncakeReceiver] = []

    def make(**kwargs) -> tuple[MooncakeReceiver, torch.Tensor]:
        region = torch.zeros(REGION, dtype=torch.uint8)
        try:
            r = MooncakeReceiver(region, **kwargs)
        except MooncakeUnavailable as e:
            pytest.skip(str(e))
        made.append(r)
        return r, region

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def procs():
    """procs(seed) -> a sender process shared by this module's tests; fresh=True for one to kill."""
    cache: dict[int, SenderProc] = {}

    def get(seed: int, fresh: bool = False) -> SenderProc:
        p = cache.get(seed)
        if p is None or fresh or p.proc.poll() is not None:
            p = cache[seed] = SenderProc(seed, **SENDER)
        return p

    yield get
    for p in cache.values():
        try:
            p.close()
        except Exception:
            p.kill()


@pytest.mark.timeout(180)
def test_round_trip_exact_with_trailer(receiver, procs):
    r, region = receiver()
    s = procs(21)
    pieces = block_plan(40, seed=21)
    pieces.append(Piece(REGION - 3 * BLOCK - 77, 3, 50_001))  # unaligned
    pieces = [p for p in pieces[:-1] if p.dst_offset >= 3 + 50_001] + [pieces[-1]]
    r.expect(5, ranges_of(pieces), time.monotonic() + 60, want_trailer=True)
    for layer in layers(pieces, 3):
        s.send(5, r.endpoint, layer)
    s.finish(5, r.endpoint, b"first-token:7")
    assert s.wait(5) == {"ok": True}
    assert results_within(r, [5], 30) == {5: None}
    assert r.trailer(5) == b"first-token:7"
    assert torch.equal(region, expected_region([(s.source, p) for p in pieces]))


@pytest.mark.timeout(180)
def test_concurrent_transfers_and_two_senders(receiver, procs):
    r, region = receiver()
    a, b = procs(21), procs(22)
    g = torch.Generator().manual_seed(22)
    dst_blocks = torch.randperm(REGION // BLOCK, generator=g)[:64].tolist()
    plans = {tid: [Piece(((tid * 8 + i) * 7 % 120) * BLOCK, dst_blocks[tid * 8 + i] * BLOCK, BLOCK) for i in range(8)] for tid in range(8)}
    for tid, pieces in plans.items():
        r.expect(100 + tid, ranges_of(pieces), time.monotonic() + 60)
    for layer in range(4):  # eight transfers interleave; a sends the first half of each, b the rest
        for tid, pieces in plans.items():
            (a if layer < 2 else b).send(100 + tid, r.endpoint, pieces[layer * 2 : layer * 2 + 2])
    for tid in plans:
        a.finish(100 + tid, r.endpoint)
        b.finish(100 + tid, r.endpoint)
    for tid in plans:
        assert a.wait(100 + tid) == {"ok": True} and b.wait(100 + tid) == {"ok": True}
    assert results_within(r, [100 + t for t in plans], 30) == {100 + t: None for t in plans}
    moves = [((a if i < 4 else b).source, p) for ps in plans.values() for i, p in enumerate(ps)]
    assert torch.equal(region, expected_region(moves))


@pytest.mark.timeout(180)
def test_cancel_after_completion_acknowledges_a_late_finish(receiver, procs):
    r, region = receiver()
    check_late_finish_after_cancel(r, region, procs(21), procs(22), 91, block_plan(8, seed=29))


@pytest.mark.timeout(180)
def test_cancel_refuses_later_writes(receiver, procs):
    r, region = receiver()
    s = procs(22)
    pieces = block_plan(12, seed=24)
    r.expect(31, ranges_of(pieces), time.monotonic() + 60)
    s.send(31, r.endpoint, pieces[:6])
    wait_landed(region, s.source, pieces[5])
    r.cancel(31)
    snapshot = region.clone()
    s.send(31, r.endpoint, pieces[6:])
    s.finish(31, r.endpoint)
    out = s.wait(31)
    assert not out["ok"] and out["kind"] == "aborted"
    assert torch.equal(region, snapshot)
    assert r.poll() == {}


@pytest.mark.timeout(180)
def test_piece_outside_ranges_is_refused_before_writing(receiver, procs):
    r, region = receiver()
    s = procs(21)
    r.expect(41, [(0, BLOCK)], time.monotonic() + 60)
    r.expect(42, [(4 * BLOCK, BLOCK)], time.monotonic() + 60)
    s.send(41, r.endpoint, [Piece(0, 0, BLOCK), Piece(BLOCK, 2 * BLOCK, BLOCK)])
    s.send(42, r.endpoint, [Piece(5 * BLOCK, 4 * BLOCK, BLOCK)])
    s.finish(41, r.endpoint)
    s.finish(42, r.endpoint)
    out = s.wait(41)
    assert not out["ok"] and out["kind"] == "corrupt"
    assert s.wait(42) == {"ok": True}
    got = results_within(r, [41, 42], 30)
    assert got[41].kind == "corrupt" and got[42] is None
    assert torch.equal(region[: 4 * BLOCK], torch.zeros(4 * BLOCK, dtype=torch.uint8))
    assert torch.equal(region[4 * BLOCK : 5 * BLOCK], s.source[5 * BLOCK : 6 * BLOCK])


@pytest.mark.timeout(180)
def test_sender_killed_and_deadline(receiver, procs):
    r, region = receiver()
    doomed = procs(26, fresh=True)
    pieces = block_plan(8, seed=26)
    r.expect(51, ranges_of(pieces), time.monotonic() + 60)
    doomed.send(51, r.endpoint, pieces[:4])
    wait_landed(region, doomed.source, pieces[3])
    t0 = time.monotonic()
    doomed.kill()
    got = results_within(r, [51], 20)
    assert got[51].kind == "peer_lost" and time.monotonic() - t0 < 20
    r.expect(52, [(0, BLOCK)], time.monotonic() + 1.0)  # nobody sends
    assert results_within(r, [52], 15)[52].kind == "timeout"


@pytest.mark.timeout(60)
def test_unreachable_endpoint_is_refused(receiver):
    r, _ = receiver()  # for the skip when Mooncake cannot run
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    session, addr, nbytes, _ = parse_mooncake_endpoint(r.endpoint)
    ep = f"{session}#{addr:#x}:{nbytes}#{port}"
    s = MooncakeSender(torch.zeros(1024, dtype=torch.uint8))
    try:
        s.send(1, ep, [Piece(0, 0, 16)], time.monotonic() + 30)
        s.finish(1, ep)
        with pytest.raises(TransferError) as e:
            s.wait(1, 20)
        assert e.value.kind == "refused"
        with pytest.raises(ValueError):
            s.send(2, ep, [Piece(0, nbytes - 8, 16)], time.monotonic() + 30)  # past the receiver's region
    finally:
        s.close()
