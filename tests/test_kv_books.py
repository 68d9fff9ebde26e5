"""The receiver's book without a timer of its own: an expectation whose deadline is None
(the engine's scheduler half keeps the one lease timer of a reservation and cancels)
stays pending past any time limit until it completes or is cancelled, while one with
a deadline beside it still times out.

References are independent of the code under test: the bytes a transfer must leave
are copied with torch indexing, and "past any time limit" means past a deadline that
the timer thread demonstrably enforces on a control transfer in the same book. Every
wait is bounded (small sleeps, polled with deadlines).
"""
from __future__ import annotations

import time

import pytest
import torch

from braid.kv_transfer.base import Piece, TransferError
from braid.kv_transfer.receiver_book import ReceiverBook, RxConn
from braid.kv_transfer.tcp import TcpReceiver, TcpSender

pytestmark = pytest.mark.timeout(60)

NBYTES = 1 << 16
SHORT = 0.15  # the control transfer's deadline, seconds from expect
PAST = 0.6  # how long the test waits: well past SHORT, past the timer's 1 s-capped wakeups too


def poll_until(poll, tids, timeout: float = 10.0) -> dict:
    """Accumulate poll() results until every tid in `tids` has ended (bounded)."""
    got: dict = {}
    end = time.monotonic() + timeout
    while not set(tids) <= got.keys():
        got.update(poll())
        assert time.monotonic() < end, f"transfers {set(tids) - got.keys()} did not end within {timeout}s"
        time.sleep(0.01)
    return got


class _Conn(RxConn):
    def shut(self) -> None:  # no socket: nothing can be stuck landing
        pass


@pytest.fixture
def book():
    b = ReceiverBook(NBYTES, cancel_grace=0.1, timer_name="test-kv-books-timer")
    yield b
    b.close()


def _land(book: ReceiverBook, conn: RxConn, tid: int, seq: int, spans: list[tuple[int, int]]) -> None:
    """What a transport's connection thread does for one data frame: admit, then write."""
    offs, lens = [s for s, _ in spans], [e - s for s, e in spans]
    rx = book.admit(conn, tid, seq, offs, lens, sum(lens))
    assert rx is not None, "a live transfer must take a frame inside its ranges"
    assert book.begin_write(conn, tid, rx)
    book.end_write(conn, tid, rx, spans)


def test_book_without_deadline_stays_live_until_complete(book):
    conn = _Conn("test")
    book.expect(1, [(0, 100), (200, 50)], None, False)
    book.expect(2, [(0, 100)], time.monotonic() + SHORT, False)  # control: the timer runs
    time.sleep(PAST)
    got = poll_until(book.poll, [2])
    assert isinstance(got[2], TransferError) and got[2].kind == "timeout"
    assert 1 not in got and book.poll() == {}
    # still live: frames are taken, and it completes once every expected byte landed
    _land(book, conn, 1, 0, [(0, 100)])
    time.sleep(PAST)
    assert book.poll() == {}
    _land(book, conn, 1, 1, [(200, 250)])
    assert poll_until(book.poll, [1]) == {1: None}


def test_book_without_deadline_stays_live_until_cancelled(book):
    conn = _Conn("test")
    book.expect(3, [(0, 4096)], None, False)
    _land(book, conn, 3, 0, [(0, 1024)])
    time.sleep(PAST)
    assert book.poll() == {}
    book.cancel(3)
    assert book.poll() == {}  # a cancelled transfer is not reported
    # once cancelled nothing more of it is taken, and its sender hears "aborted"
    assert book.admit(conn, 3, 1, [1024], [1024], 1024) is None
    err = book.on_finish(conn, 3, 2, None)
    assert err is not None and err.kind == "aborted"


def _region(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (NBYTES,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_tcp_transfer_without_deadline_completes_after_the_time_limit():
    src, dst = _region(1), torch.zeros(NBYTES, dtype=torch.uint8)
    pieces = [Piece(0, 8192, 4096), Piece(16384, 0, 2048)]
    ref = dst.clone()
    for p in pieces:  # the reference: torch indexing, not the transport
        ref[p.dst_offset : p.dst_offset + p.length] = src[p.src_offset : p.src_offset + p.length]
    rx, tx = TcpReceiver(dst), TcpSender(src)
    try:
        rx.expect(7, [(p.dst_offset, p.length) for p in pieces], None)
        rx.expect(8, [(40000, 16)], time.monotonic() + SHORT)  # control
        time.sleep(PAST)
        got = poll_until(rx.poll, [8])
        assert got[8].kind == "timeout" and 7 not in got
        tx.send(7, rx.endpoint, pieces, time.monotonic() + 10.0)
        tx.finish(7, rx.endpoint)
        tx.wait(7, 10.0)
        assert poll_until(rx.poll, [7]) == {7: None}
        assert torch.equal(dst, ref)
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("transport", ["tcp", "collective"])
def test_receiver_without_deadline_stays_pending_until_cancelled(transport):
    region = torch.zeros(NBYTES, dtype=torch.uint8)
    if transport == "tcp":
        rx = TcpReceiver(region)
    else:
        from braid.kv_transfer.collective import CollectiveReceiver

        rx = CollectiveReceiver(region, connect_timeout=10.0)
    try:
        rx.expect(5, [(0, 4096)], None)
        rx.expect(6, [(4096, 4096)], time.monotonic() + SHORT)  # control
        time.sleep(PAST)
        got = poll_until(rx.poll, [6])
        assert got[6].kind == "timeout" and 5 not in got
        time.sleep(PAST)
        assert rx.poll() == {}
        rx.cancel(5)
        time.sleep(0.05)
        assert rx.poll() == {}
        rx.expect(5, [(0, 4096)], None)  # the cancelled id can be expected afresh
    finally:
        rx.close()
