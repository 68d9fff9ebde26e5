"""Transfer faults at the engine level: each ends in a typed error within the
deadline, the decode side's blocks all come back, and requests in flight
beside it complete correctly."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import struct
import threading
import time
import zlib

import pytest
import torch

from braid.engine.config import EngineConfig
from braid.engine.core import EngineCore
from braid.engine.sampling import SamplingParams
from braid.kv_transfer import layout as kvl
from braid.kv_transfer.planner import pieces_by_pair, plan
from conftest import prompt_of
from test_kv_transfer import B, engine, reserve_target, run_pd

NAME = "kv1"
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def decode_engine(checkpoints):
    D = engine(checkpoints, NAME, "decode", "tcp", tp=2, dcp=2, blocks=128)
    yield D
    D.shutdown()


@pytest.fixture(scope="module")
def prefill_engine(checkpoints):
    P = engine(checkpoints, NAME, "prefill", "tcp", tp=1, pcp=2, blocks=128)
    yield P
    P.shutdown()


def _all_free(core: EngineCore) -> bool:
    return core.blocks.num_free == core.blocks.num_blocks and not core.kv.incoming and not core.kv.outgoing


def _drive(cores, until, timeout_s):
    """Step the engines until `until(events)` is true; returns every event seen."""
    seen = []
    end = time.monotonic() + timeout_s
    while not until(seen):
        assert time.monotonic() < end, "no result within the deadline"
        for c in cores:
            seen += c.step()
        time.sleep(0.001)
    return seen


def _finished(rid):
    """The request's end on the side that serves it last: the prefill side's "transferred"
    repeats the first token while the decode side may still be streaming."""
    return lambda evs: any(e.request_id == rid and e.finished and e.finish_reason != "transferred" for e in evs)


def _local_request(D, checkpoints, rid):
    """A request prefilled on the decode node itself, to run beside a fault."""
    p = prompt_of(21, seed=77)
    D.add_request(p, GREEDY, request_id=rid)
    return p


def _tokens(events, rid):
    """Tokens the decode side streamed (the prefill side's "transferred" event repeats the first)."""
    return [e.token_id for e in events if e.request_id == rid and e.token_id is not None and e.finish_reason != "transferred"]


def test_lease_expires_without_any_sender(decode_engine, checkpoints):
    D = decode_engine
    p = prompt_of(30, seed=1)
    D.reserve("lease", p, GREEDY, lease_s=1.0)
    local = _local_request(D, checkpoints, "beside-lease")
    t0 = time.monotonic()
    evs = _drive([D], lambda e: _finished("lease")(e) and _finished("beside-lease")(e), 20)
    err = next(e for e in evs if e.request_id == "lease")
    assert err.finish_reason == "error" and "the lease expired" in err.error
    assert time.monotonic() - t0 < 5
    assert _tokens(evs, "beside-lease") == checkpoints.greedy(NAME, local, GREEDY.max_tokens)
    assert _all_free(D)


def _partial_sender(dest_layout_bytes: bytes, dest_blocks, tid: int, p_layout_bytes: bytes, num_tokens: int, p_blocks, started,
                    secret: bytes = b""):
    """A prefill rank that sends layer 0 of a transfer and then hangs (to be killed)."""
    from braid.kv_transfer.tcp import TcpSender
    from braid.proto import common_pb2

    d = common_pb2.KVLayout.FromString(dest_layout_bytes)
    p = common_pb2.KVLayout.FromString(p_layout_bytes)
    region = torch.randn(kvl.cache_shape(p, 0))
    sender = TcpSender(region)
    moves = plan(p, d, num_tokens, p_blocks, dest_blocks)
    for (src, dst), pieces in pieces_by_pair([m for m in moves if m.src_rank == 0], p, d, 0).items():
        sender.send(tid, d.ranks[dst].endpoint, pieces, time.monotonic() + 60, secret=secret)  # as a prefill rank would
    time.sleep(0.5)  # the frames are out
    started.set()
    time.sleep(600)


def test_sender_killed_mid_transfer(decode_engine, prefill_engine, checkpoints):
    D, P = decode_engine, prefill_engine
    p = prompt_of(40, seed=2)
    dest = reserve_target(D, "killed", p, GREEDY, lease_s=30.0)
    p_layout = kvl.describe(
        fmt="gqa", num_layers=2, num_kv_heads=1, head_dim=16, dtype="float32", block_size=B, interleave_size=B,
        tp=1, pcp=1, dcp=1, num_blocks=64,
    )
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(
        target=_partial_sender,
        args=(dest.layout.SerializeToString(), list(dest.block_ids), dest.transfer_id, p_layout.SerializeToString(),
              len(p), list(range(10)), started, dest.secret),
        daemon=True,
    )
    proc.start()
    try:
        assert started.wait(60)
        # a healthy transfer and a local request run beside the broken one
        good = prompt_of(25, seed=3)
        dest_ok = reserve_target(D, "healthy", good, GREEDY, lease_s=30.0)
        P.add_transfer_request("healthy", good, GREEDY, dest_ok, 30.0)
        local = _local_request(D, checkpoints, "beside-kill")
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        evs = _drive([P, D], lambda e: all(_finished(r)(e) for r in ("killed", "healthy", "beside-kill")), 30)
    finally:
        proc.kill()
        proc.join(10)
    err = next(e for e in evs if e.request_id == "killed" and e.finished)
    assert err.finish_reason == "error" and "failed" in err.error
    assert time.monotonic() - t0 < 10  # peer_lost, long before the 30 s lease
    assert _tokens(evs, "healthy") == checkpoints.greedy(NAME, good, GREEDY.max_tokens)
    assert _tokens(evs, "beside-kill") == checkpoints.greedy(NAME, local, GREEDY.max_tokens)
    _drive([P, D], lambda e: _all_free(D) and _all_free(P), 10)


def test_receiver_that_stops_reading(decode_engine, prefill_engine, checkpoints):
    """The prefill side gives up at its deadline, frees its blocks and keeps serving."""
    D, P = decode_engine, prefill_engine
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_ignore():
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = silent.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                accepted.append(conn)
            except OSError:
                pass

    th = threading.Thread(target=accept_and_ignore, daemon=True)
    th.start()
    try:
        p = prompt_of(600, seed=4)  # enough KV to fill the socket buffers
        dest = reserve_target(D, "stalled", p, GREEDY, lease_s=30.0)
        for r in dest.layout.ranks:  # every decode rank points at the silent server
            r.endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        P.add_transfer_request("stalled", p, GREEDY, dest, timeout_s=2.0)
        t0 = time.monotonic()
        evs = _drive([P], _finished("stalled"), 30)
        ev = next(e for e in evs if e.request_id == "stalled")
        assert ev.finish_reason == "error"
        assert time.monotonic() - t0 < 8
        assert _all_free(P)
        D.abort("stalled")  # what the router does when the prefill fails
        assert _all_free(D)
        # the prefill node still serves
        good = prompt_of(12, seed=5)
        outs, _, errors = run_pd(P, D, [good], params=GREEDY)
        assert not errors and outs[0] == checkpoints.greedy(NAME, good, GREEDY.max_tokens)
    finally:
        stop.set()
        th.join(5)
        for c in accepted:
            c.close()
        silent.close()


def _auth(tid: int, secret: bytes) -> bytes:
    """The AUTH frame a sender presents the reservation's secret in (before its frames of tid)."""
    from braid.kv_transfer import tcp

    hdr = bytearray(tcp.HEADER_SIZE)
    tcp._pack_header(hdr, tcp.AUTH, 0, tid, 0, 0, len(secret), 0)
    return bytes(hdr) + secret


def _frame(tid: int, pieces: list[tuple[int, int]], payload_len: int) -> bytes:
    """A DATA frame header and piece table in the tcp transport's documented format."""
    from braid.kv_transfer import tcp

    table = b"".join(struct.pack("<QQ", off, n) for off, n in pieces)
    hdr = bytearray(tcp.HEADER_SIZE)
    tcp._pack_header(hdr, tcp.DATA, 0, tid, 0, len(pieces), payload_len, zlib.crc32(table))
    return bytes(hdr) + table


@pytest.mark.parametrize("fault", ["corrupt", "truncated"])
def test_corrupted_or_truncated_frame(decode_engine, checkpoints, fault):
    D = decode_engine
    p = prompt_of(30, seed=6)
    dest = reserve_target(D, fault, p, GREEDY, lease_s=30.0)
    local = _local_request(D, checkpoints, f"beside-{fault}")
    host, port = dest.layout.ranks[0].endpoint.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(_auth(dest.transfer_id, dest.secret))  # a sender holding the destination, misbehaving
    try:
        if fault == "corrupt":  # a piece outside the reserved blocks
            far = kvl.cache_bytes(dest.layout, 0) - 64
            sock.sendall(_frame(dest.transfer_id, [(far, 64)], 64) + b"\0" * 64)
        else:  # a frame promising more bytes than arrive
            ranges = kvl.chunk_bytes(dest.layout, 0)
            first_block = dest.block_ids[0] * ranges
            sock.sendall(_frame(dest.transfer_id, [(first_block, 256)], 256) + b"\1" * 100)
            sock.close()
        t0 = time.monotonic()
        evs = _drive([D], lambda e: _finished(fault)(e) and _finished(f"beside-{fault}")(e), 20)
    finally:
        sock.close()
    err = next(e for e in evs if e.request_id == fault)
    assert err.finish_reason == "error" and "failed" in err.error
    assert time.monotonic() - t0 < 5
    assert _tokens(evs, f"beside-{fault}") == checkpoints.greedy(NAME, local, GREEDY.max_tokens)
    assert _all_free(D)
