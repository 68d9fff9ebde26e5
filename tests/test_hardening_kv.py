"""Hardening of the KV data path (issue 14, findings 3, 5 and 6), tried as an attacker
would: frames from a connection that does not hold the reservation's secret, malformed
FINISH trailers, destinations with no blocks, Reserve floods, idle and slow
connections, frames declaring a huge payload, and listeners on wildcard addresses.

Frames are built here from the wire format documented in braid.kv_transfer.tcp (struct
+ zlib); expected bytes come from torch indexing, expected tokens from transformers
(conftest's checkpoints). Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import zlib

import pytest
import torch

from braid.kv_transfer.base import Piece, TransferError
from braid.kv_transfer.tcp import TcpReceiver, TcpSender

pytestmark = pytest.mark.timeout(240)

_BODY = struct.Struct("<IBBHQIIQI")
MAGIC = int.from_bytes(b"BRKV", "little")
DATA, FINISH, ACK, ERROR, AUTH = 1, 2, 3, 4, 5
FLAG_TRAILER = 1


def frame(ftype: int, tid: int, seq: int = 0, pieces=(), payload: bytes = b"", flags: int = 0,
          payload_len: int | None = None) -> bytes:
    """One tcp-transport frame as documented: 40-byte header (CRC'd), piece table, payload."""
    table = b"".join(struct.pack("<QQ", off, n) for off, n in pieces)
    plen = len(payload) if payload_len is None else payload_len
    body = _BODY.pack(MAGIC, 1, ftype, flags, tid, seq, len(pieces), plen, zlib.crc32(table))
    return body + struct.pack("<I", zlib.crc32(body)) + table + payload


def read_reply(sock: socket.socket, timeout: float = 10.0) -> tuple[int, int, int, bytes]:
    """(type, flags, tid, payload) of the receiver's next reply."""
    sock.settimeout(timeout)
    hdr = b""
    while len(hdr) < 40:
        chunk = sock.recv(40 - len(hdr))
        assert chunk, "receiver closed the connection"
        hdr += chunk
    _, _, ftype, flags, tid, _, _, plen, _ = _BODY.unpack_from(hdr)
    payload = b""
    while len(payload) < plen:
        payload += sock.recv(plen - len(payload))
    return ftype, flags, tid, payload


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def poll_until(rx, tid: int, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = rx.poll()
        if tid in got:
            return got[tid]
        time.sleep(0.01)
    pytest.fail(f"transfer {tid} did not end within {timeout}s")


def region(nbytes: int, seed: int | None = None) -> torch.Tensor:
    if seed is None:
        return torch.zeros(nbytes, dtype=torch.uint8)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- (a) the per-reservation secret, at the transport --------------------------------------

SECRET = bytes(range(16))


def test_tcp_frames_without_the_secret_are_dropped_and_counted():
    src, dst = region(64 << 10, seed=1), region(64 << 10)
    rx = TcpReceiver(dst)
    tid = 7
    pieces = [Piece(0, 4096, 8192)]
    try:
        rx.expect(tid, [(4096, 8192)], time.monotonic() + 30, secret=SECRET)
        # a raw connection that presents no secret: its data and FINISH must not count
        host, port = rx.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), 5) as s:
            s.sendall(frame(DATA, tid, 0, [(4096, 8192)], b"\xee" * 8192))
            s.sendall(frame(FINISH, tid, 1))
            ftype, _, rtid, _ = read_reply(s)
            assert (ftype, rtid) == (ERROR, tid)  # its FINISH is refused
            # one with the wrong secret is refused too
            s.sendall(frame(AUTH, tid, payload=b"\x00" * 16))
            ftype, _, _, _ = read_reply(s)
            assert ftype == ERROR
            s.sendall(frame(DATA, tid, 0, [(4096, 8192)], b"\xee" * 8192))
        time.sleep(0.3)
        assert not torch.any(dst[4096 : 4096 + 8192]), "bytes from a connection without the secret landed"
        assert rx.rejected_frames >= 3
        assert rx.poll() == {}  # the transfer is still live: a stranger cannot end it
        # a sender without the secret fails; the holder of the secret completes
        for secret, ok in ((None, False), (b"x" * 16, False), (SECRET, True)):
            tx = TcpSender(src)
            try:
                tx.send(tid, rx.endpoint, pieces, time.monotonic() + 10, secret=secret)
                tx.finish(tid, rx.endpoint, secret=secret)
                if ok:
                    tx.wait(tid, 10)
                else:
                    with pytest.raises(TransferError):
                        tx.wait(tid, 10)
            finally:
                tx.close()
        assert poll_until(rx, tid) is None
        assert torch.equal(dst[4096 : 4096 + 8192], src[:8192])
    finally:
        rx.close()


def test_collective_frames_without_the_secret_are_dropped():
    from braid.kv_transfer.collective import CollectiveReceiver, CollectiveSender

    src, dst = region(64 << 10, seed=2), region(64 << 10)
    rx = CollectiveReceiver(dst, connect_timeout=10.0)
    tid = 11
    try:
        rx.expect(tid, [(0, 16384)], time.monotonic() + 60, secret=SECRET)
        for secret, ok in ((None, False), (SECRET, True)):
            tx = CollectiveSender(src, connect_timeout=10.0)
            try:
                tx.send(tid, rx.endpoint, [Piece(1024, 0, 16384)], time.monotonic() + 20, secret=secret)
                tx.finish(tid, rx.endpoint, secret=secret)
                if ok:
                    tx.wait(tid, 20)
                else:
                    with pytest.raises(TransferError):
                        tx.wait(tid, 20)
                    assert not torch.any(dst[:16384])
                    assert rx.rejected_frames >= 1
            finally:
                tx.close()
        assert poll_until(rx, tid) is None
        assert torch.equal(dst[:16384], src[1024 : 1024 + 16384])
    finally:
        rx.close()


def test_the_secret_reaches_every_rank_in_the_step_plan():
    """The secret travels from rank 0 to every rank inside the step's int64 encoding."""
    from braid.engine.kv_connector.metadata import KVConnectorMeta, KVExpect, KVFinish, KVSend, TransferRef

    meta = KVConnectorMeta(
        expects=(KVExpect(5, 9, (3, 4, 7), bytes(range(200, 216)), 2), KVExpect(6, 1, (1,), b"")),
        sends=(KVSend(0, 8, 1500, b"\x01layout\xff", (2, 9), b"\x00" + bytes(range(255, 240, -1)), 3),),
        finishes=(KVFinish(8, 42),), releases=(TransferRef(0, 5),), progress=(TransferRef(1, 8),),
    )
    words = [99] + meta.encode() + [77]
    back, pos = KVConnectorMeta.decode(words, 1)
    assert back == meta and words[pos] == 77


# ---- (e) the KV listener cannot be exhausted -----------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _legit_transfer(rx: TcpReceiver, tid: int, seed: int) -> None:
    src = region(rx._mv.nbytes, seed=seed)
    rx.expect(tid, [(0, 32768)], time.monotonic() + 30)
    tx = TcpSender(src)
    try:
        tx.send(tid, rx.endpoint, [Piece(0, 0, 32768)], time.monotonic() + 20)
        tx.finish(tid, rx.endpoint)
        tx.wait(tid, 20)
    finally:
        tx.close()
    assert poll_until(rx, tid) is None
    assert torch.equal(byte_view(rx._region)[:32768], src[:32768])


def byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.uint8)


def test_300_idle_connections_cost_bounded_memory_and_threads():
    """Default settings: 300 idle connections stay within the connection cap (threads)
    and cost little memory; a legitimate transfer still goes through."""
    rx = TcpReceiver(region(1 << 20))
    host, port = rx.endpoint.rsplit(":", 1)
    socks = []
    try:
        threads0, rss0 = threading.active_count(), _rss_bytes()
        for _ in range(300):
            socks.append(socket.create_connection((host, int(port)), 5))
        time.sleep(1.0)  # let the acceptor take them all
        threads, grown = threading.active_count() - threads0, _rss_bytes() - rss0
        assert threads <= 256 + 4, f"{threads} threads for 300 idle connections"
        assert grown < 64 << 20, f"300 idle connections cost {grown >> 20} MiB"
        _legit_transfer(rx, 1, seed=3)
    finally:
        for s in socks:
            s.close()
        rx.close()


def test_idle_and_slow_connections_are_closed_and_the_cap_holds():
    rx = TcpReceiver(region(1 << 20), max_connections=16, idle_timeout=1.0, frame_timeout=1.0)
    host, port = rx.endpoint.rsplit(":", 1)
    addr = (host, int(port))
    threads0 = threading.active_count()
    socks = [socket.create_connection(addr, 5) for _ in range(100)]
    try:
        time.sleep(0.5)
        assert threading.active_count() - threads0 <= 16 + 4
        _legit_transfer(rx, 2, seed=4)  # the cap makes room for a sender that is sending
        assert all(closed_within(s, 5.0) for s in socks[-5:]), "idle connections outlived the idle timeout"
        # a slow sender: half a header, then nothing
        slow = socket.create_connection(addr, 5)
        socks.append(slow)
        slow.sendall(frame(FINISH, 3)[:20])
        t0 = time.monotonic()
        assert closed_within(slow, 5.0)
        assert time.monotonic() - t0 < 4.0
        # a frame whose payload trickles in slower than the frame deadline
        rx.expect(4, [(0, 4096)], time.monotonic() + 30)
        trickle = socket.create_connection(addr, 5)
        socks.append(trickle)
        trickle.sendall(frame(DATA, 4, 0, [(0, 4096)], b"", payload_len=4096) + b"\1" * 100)
        assert closed_within(trickle, 6.0)
        assert isinstance(poll_until(rx, 4), TransferError)
    finally:
        for s in socks:
            s.close()
        rx.close()


def test_a_sender_closes_idle_connections_before_the_receiver_would():
    """Keeps an honest sender clear of the receiver's idle timeout: its idle connection
    closes first, and the next transfer simply reconnects."""
    rx = TcpReceiver(region(1 << 20), idle_timeout=2.0)
    src = region(1 << 20, seed=6)
    tx = TcpSender(src, idle_close=0.3)
    try:
        for tid in (21, 22):
            rx.expect(tid, [(0, 4096)], time.monotonic() + 20)
            tx.send(tid, rx.endpoint, [Piece(4096 * tid, 0, 4096)], time.monotonic() + 10)
            tx.finish(tid, rx.endpoint)
            tx.wait(tid, 10)
            assert poll_until(rx, tid) is None
            assert torch.equal(rx._region[:4096], src[4096 * tid : 4096 * tid + 4096])
            end = time.monotonic() + 5
            while tx.num_connections and time.monotonic() < end:
                time.sleep(0.05)
            assert tx.num_connections == 0
    finally:
        tx.close()
        rx.close()


def test_a_frame_declaring_a_huge_payload_is_refused_at_once():
    rx = TcpReceiver(region(1 << 20))
    host, port = rx.endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), 5) as s:
            s.sendall(frame(DATA, 99, 0, [(0, 1 << 40)], b"", payload_len=1 << 40))  # 1 TiB, unknown transfer
            assert closed_within(s, 3.0), "a frame declaring 1 TiB held its connection"
        with socket.create_connection((host, int(port)), 5) as s:
            s.sendall(frame(ERROR, 99, 0, (), b"", flags=1, payload_len=1 << 40))
            assert closed_within(s, 3.0)
        _legit_transfer(rx, 5, seed=5)
    finally:
        rx.close()


# ---- (a) and (c) against a real decode engine ------------------------------------------------

NAME = "kv1"


def _greedy(n: int = 6):
    from braid.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def decode_engine(checkpoints):
    from test_kv_transfer import engine

    D = engine(checkpoints, NAME, "decode", "tcp", tp=1, blocks=64)
    yield D
    D.shutdown()


def _attack(D, rid: str, trailer: bytes, *, present_secret: bool, seed: int):
    """Reserve and claim as the router would, then write the whole destination from a raw
    socket: one DATA frame over every expected range, then FINISH with `trailer`."""
    from conftest import prompt_of
    from braid.engine.kv_connector.types import TransferTarget
    from braid.kv_transfer.planner import expected_ranges

    prompt = prompt_of(10, seed=seed)
    res = D.reserve(rid, prompt, _greedy(), 30.0)
    D.claim(rid)
    dest = TransferTarget.of(res, D.kv_layout)
    ranges = expected_ranges(dest.layout, 0, len(prompt), list(dest.block_ids), range(dest.layout.num_layers))
    host, port = dest.layout.ranks[0].endpoint.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), 5)
    secret = getattr(res, "secret", b"")
    if present_secret and secret:
        sock.sendall(frame(AUTH, dest.transfer_id, payload=secret))
    total = sum(n for _, n in ranges)
    sock.sendall(frame(DATA, dest.transfer_id, 0, ranges, b"\0" * total))
    sock.sendall(frame(FINISH, dest.transfer_id, 1, (), trailer, flags=FLAG_TRAILER))
    return sock


def _drive(D, until, timeout_s: float):
    seen = []
    end = time.monotonic() + timeout_s
    while not until(seen):
        assert time.monotonic() < end, "no result within the deadline"
        seen += D.step()
        time.sleep(0.002)
    return seen


def _ended(rid):
    return lambda evs: any(e.request_id == rid and e.finished for e in evs)


def _serves_a_normal_request(D, checkpoints, rid: str) -> None:
    from conftest import prompt_of

    p = prompt_of(13, seed=99)
    D.add_request(p, _greedy(), request_id=rid)
    evs = _drive(D, _ended(rid), 60)
    got = [e.token_id for e in evs if e.request_id == rid and e.token_id is not None]
    assert got == checkpoints.greedy(NAME, p, 6)


def _all_free(D) -> bool:
    return D.blocks.num_free == D.blocks.num_blocks and not D.kv.incoming


@pytest.mark.parametrize("trailer", [b"\x05", struct.pack("<q", 1 << 40), struct.pack("<q", -3), b"\x05" * 16],
                         ids=["1-byte", "token-past-vocab", "negative-token", "16-bytes"])
def test_malformed_finish_trailer_fails_only_its_transfer(decode_engine, checkpoints, trailer):
    D = decode_engine
    rid = f"trailer-{len(trailer)}-{trailer[:2].hex()}"
    sock = _attack(D, rid, trailer, present_secret=True, seed=len(trailer))
    try:
        evs = _drive(D, _ended(rid), 20)
    finally:
        sock.close()
    err = next(e for e in evs if e.request_id == rid and e.finished)
    assert err.finish_reason == "error"
    assert not any(e.request_id == rid and e.token_id is not None for e in evs)
    _drive(D, lambda _: _all_free(D), 10)
    _serves_a_normal_request(D, checkpoints, f"after-{rid}")


def test_kv_from_a_connection_without_the_secret_never_lands(decode_engine, checkpoints):
    D = decode_engine
    receiver = D.executor.driver.connector.receiver
    before = getattr(receiver, "rejected_frames", 0)
    token = struct.pack("<q", 5)
    sock = _attack(D, "no-secret", token, present_secret=False, seed=41)
    t_end = time.monotonic() + 1.5  # long enough for the frames to land, were they taken
    try:
        evs = _drive(D, lambda _: time.monotonic() >= t_end, 5)
    finally:
        sock.close()
    assert not any(e.request_id == "no-secret" for e in evs), "a transfer completed without the secret"
    assert receiver.rejected_frames >= before + 2  # the DATA frame and the FINISH
    D.abort("no-secret")
    assert _all_free(D)
    # the holder of the secret, over the same kind of raw connection, delivers
    sock = _attack(D, "with-secret", token, present_secret=True, seed=42)
    try:
        evs = _drive(D, _ended("with-secret"), 30)
    finally:
        sock.close()
    assert [e.token_id for e in evs if e.request_id == "with-secret"][0] == 5
    assert all(e.finish_reason != "error" for e in evs if e.request_id == "with-secret")
    _serves_a_normal_request(D, checkpoints, "after-secret")


# ---- (b), (d), (f) against real nodes (gRPC, etcd) -------------------------------------------

NODE_MODEL = "kv2"
MAX_RESERVATIONS = 16
MAX_LEASE_S = 120.0


class _LoopThread:
    """An asyncio loop on its own thread: the nodes and the gRPC calls run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hardening-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def nodes(checkpoints):
    """An etcd, a decode node (tp 2, two rank processes) with small reservation caps and a
    prefill node, all on loopback."""
    from braid.decode_node.server import start_decode_node
    from braid.discovery.base import DiscoveryConfig
    from braid.discovery.etcd_server import EtcdServer, find_etcd_binary
    from braid.engine.config import CacheConfig, KVTransferConfig, ParallelConfig
    from braid.node.config import NodeConfig
    from braid.prefill_node.server import start_prefill_node

    if find_etcd_binary() is None:
        pytest.skip("no etcd binary")
    path = checkpoints.get(NODE_MODEL)
    srv = EtcdServer(start_timeout=30.0, stop_timeout=10.0)
    srv.start()
    lt = _LoopThread()
    disc = DiscoveryConfig(endpoint=srv.endpoint, cluster=f"hardening{os.getpid()}", lease_ttl_s=5)
    cache = CacheConfig(block_size=4, num_kv_blocks=128)
    dnode = NodeConfig(host="127.0.0.1", metrics_port=-1, cache=cache,
                       parallel=ParallelConfig(tensor_parallel_size=2, threads_per_rank=1),
                       transfer=KVTransferConfig(max_reservations=MAX_RESERVATIONS, max_lease_s=MAX_LEASE_S))
    pnode = NodeConfig(host="127.0.0.1", metrics_port=-1, cache=cache, parallel=ParallelConfig(threads_per_rank=1))
    started = []
    try:
        drt, _ = lt.run(start_decode_node(dnode, path, disc), 180)
        started.append(drt)
        prt, _ = lt.run(start_prefill_node(pnode, path, disc), 180)
        started.append(prt)
        yield lt, drt, prt
    finally:
        for rt in started:
            lt.run(rt.stop(), 60)
        lt.close()
        srv.close()


def _sampling(n: int = 6):
    from braid.proto import common_pb2

    return common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


async def _reserve(stub, rid: str, prompt, lease_s: float):
    import grpc

    from braid.proto import nodes_pb2

    try:
        res = await stub.Reserve(nodes_pb2.ReserveRequest(request_id=rid, prompt_token_ids=prompt,
                                                          sampling=_sampling(), lease_s=lease_s), timeout=30)
        return grpc.StatusCode.OK, res.destination
    except grpc.aio.AioRpcError as e:
        return e.code(), None


async def _pd_request(drt, prt, rid: str, prompt) -> list[int]:
    """Reserve on D, stream Decode (the claim), Prefill on P into the destination: the
    tokens the client would see."""
    import grpc

    from braid.proto import nodes_pb2, nodes_pb2_grpc

    async with grpc.aio.insecure_channel(drt.address) as dch, grpc.aio.insecure_channel(prt.address) as pch:
        dstub, pstub = nodes_pb2_grpc.DecodeNodeStub(dch), nodes_pb2_grpc.PrefillNodeStub(pch)
        code, dest = await _reserve(dstub, rid, prompt, 30.0)
        assert code == grpc.StatusCode.OK, code
        stream = dstub.Decode(nodes_pb2.DecodeRequest(request_id=rid), timeout=60)
        await pstub.Prefill(nodes_pb2.PrefillRequest(request_id=rid, token_ids=prompt, sampling=_sampling(),
                                                     destination=dest), timeout=60)
        tokens = []
        async for msg in stream:
            tokens += list(msg.token_ids)
        return tokens


def test_reserve_flood_is_capped_and_normal_requests_are_served(nodes, checkpoints):
    import grpc

    from conftest import prompt_of
    from braid.proto import common_pb2, nodes_pb2_grpc

    lt, drt, prt = nodes
    core = drt.engine.core
    flood = prompt_of(8, seed=5)

    async def flood_with(lease_s: float, tag: str):
        async with grpc.aio.insecure_channel(drt.address) as ch:
            stub = nodes_pb2_grpc.DecodeNodeStub(ch)
            return await asyncio.gather(*(_reserve(stub, f"{tag}-{i}", flood, lease_s) for i in range(512)))

    # 512 Reserve(lease_s=1e9): every one refused, not a block taken
    codes = [c for c, _ in lt.run(flood_with(1e9, "forever"))]
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert core.blocks.num_free == core.blocks.num_blocks
    p = prompt_of(11, seed=6)
    assert lt.run(_pd_request(drt, prt, "normal-1", p)) == checkpoints.greedy(NODE_MODEL, p, 6)

    # 512 Reserve within the lease cap: at most MAX_RESERVATIONS held, the rest refused
    results = lt.run(flood_with(MAX_LEASE_S, "held"))
    held = [rid for rid, (c, _) in zip((f"held-{i}" for i in range(512)), results) if c == grpc.StatusCode.OK]
    refused = {c for c, _ in results if c != grpc.StatusCode.OK}
    assert len(held) == MAX_RESERVATIONS and refused == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    secrets_ = {d.secret for c, d in results if c == grpc.StatusCode.OK}
    assert len(secrets_) == MAX_RESERVATIONS and all(len(x) >= 16 for x in secrets_)  # one random secret each
    assert core.blocks.num_free >= core.blocks.num_blocks - MAX_RESERVATIONS * 3
    # a request prefilled on the decode node itself is still served meanwhile
    async def local(prompt):
        from braid.proto import nodes_pb2

        async with grpc.aio.insecure_channel(drt.address) as ch:
            stream = nodes_pb2_grpc.DecodeNodeStub(ch).Decode(nodes_pb2.DecodeRequest(
                request_id="local-1", local_prefill=True, prompt_token_ids=prompt, sampling=_sampling()), timeout=60)
            return [t async for msg in stream for t in msg.token_ids]
    q = prompt_of(9, seed=7)
    assert lt.run(local(q)) == checkpoints.greedy(NODE_MODEL, q, 6)

    # the held reservations end (aborted here; else their lease); then P/D requests again
    async def abort_all():
        async with grpc.aio.insecure_channel(drt.address) as ch:
            stub = nodes_pb2_grpc.DecodeNodeStub(ch)
            for rid in held:
                await stub.Abort(common_pb2.AbortRequest(request_id=rid), timeout=30)
    lt.run(abort_all())
    assert core.blocks.num_free == core.blocks.num_blocks
    assert lt.run(_pd_request(drt, prt, "normal-2", p)) == checkpoints.greedy(NODE_MODEL, p, 6)


def test_bad_destinations_are_refused_on_arrival_and_the_prefill_engine_lives(nodes, checkpoints):
    import grpc

    from conftest import prompt_of
    from braid.proto import common_pb2, nodes_pb2, nodes_pb2_grpc

    lt, drt, prt = nodes
    prompt = prompt_of(10, seed=8)

    async def body():
        async with grpc.aio.insecure_channel(drt.address) as dch, grpc.aio.insecure_channel(prt.address) as pch:
            dstub, pstub = nodes_pb2_grpc.DecodeNodeStub(dch), nodes_pb2_grpc.PrefillNodeStub(pch)
            code, good = await _reserve(dstub, "victim", prompt, 30.0)
            assert code == grpc.StatusCode.OK
            # a stranger who learnt the endpoint and transfer id, but not the secret
            host, port = good.layout.ranks[0].endpoint.rsplit(":", 1)
            with socket.create_connection((host, int(port)), 5) as s:
                s.sendall(frame(DATA, good.transfer_id, 0, [(0, 64)], b"\xff" * 64))
                s.sendall(frame(FINISH, good.transfer_id, 1))
                assert read_reply(s)[0] == ERROR
            bad = []
            for mutate in ("no-blocks", "too-many-blocks", "few-tokens", "bad-endpoint", "block-size", "block-past-pool",
                           "cached-past-end"):
                d = type(good)()
                d.CopyFrom(good)
                if mutate == "no-blocks":
                    del d.block_ids[:]
                elif mutate == "too-many-blocks":
                    d.block_ids.extend(range(100, 140))
                elif mutate == "few-tokens":
                    d.num_tokens = 3
                elif mutate == "bad-endpoint":
                    d.layout.ranks[1].endpoint = "nowhere"
                elif mutate == "block-size":
                    d.layout.block_size = 8
                elif mutate == "cached-past-end":  # "D holds every block": the last one must always be sent
                    d.cached_blocks = -(-d.num_tokens // d.layout.block_size)
                else:
                    d.block_ids[0] = 10**9
                bad.append((mutate, d))
            codes = {}
            for mutate, d in bad:
                try:
                    await pstub.Prefill(nodes_pb2.PrefillRequest(request_id=f"bad-{mutate}", token_ids=prompt,
                                                                 sampling=_sampling(), destination=d), timeout=30)
                    codes[mutate] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    codes[mutate] = e.code()
            await dstub.Abort(common_pb2.AbortRequest(request_id="victim"), timeout=30)
            return codes

    codes = lt.run(body())
    assert codes == {k: grpc.StatusCode.INVALID_ARGUMENT for k in codes}, codes
    from prometheus_client import generate_latest

    metrics = generate_latest(drt.metrics.registry).decode()
    line = next(x for x in metrics.splitlines() if x.startswith("braid_node_kv_rejected_frames "))
    assert float(line.split()[1]) >= 2
    assert prt.engine.core.blocks.num_free == prt.engine.core.blocks.num_blocks
    p = prompt_of(12, seed=9)
    assert lt.run(_pd_request(drt, prt, "after-bad", p)) == checkpoints.greedy(NODE_MODEL, p, 6)


def _listening(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, local address hex) of every TCP socket in LISTEN that these processes hold."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in owner:  # 0A: LISTEN
                    out.append((owner[cols[9]], cols[1]))
    return out


def test_no_process_listens_on_a_wildcard_address(nodes):
    lt, drt, prt = nodes
    from braid.cluster.launcher import process_tree

    pids = process_tree(os.getpid())
    assert len(pids) >= 3  # this process, the decode node's second rank, etcd
    socks = _listening(pids)
    assert socks, "found no listening socket at all: the probe is broken"
    wildcard = [(pid, addr) for pid, addr in socks if set(addr.split(":")[0]) == {"0"}]
    assert not wildcard, f"listening on a wildcard address: {wildcard}"
    loopback = ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")
    assert all(addr.split(":")[0] in loopback for _, addr in socks), socks


def test_the_caps_are_cluster_config_fields():
    from braid.cluster.config import ConfigError, load_config

    cfg = load_config(data={"decode": {"transfer": {"max_reservations": 32, "max_lease_s": 90, "max_connections": 64,
                                                    "idle_timeout_s": 120, "frame_timeout_s": 10}}})
    t = cfg.decode.transfer
    assert (t.max_reservations, t.max_lease_s, t.max_connections, t.idle_timeout_s, t.frame_timeout_s) == (32, 90, 64, 120, 10)
    assert t.receiver_limits() == {"max_connections": 64, "idle_timeout": 120, "frame_timeout": 10}
    with pytest.raises(ConfigError, match="max_reservations"):
        load_config(data={"decode": {"transfer": {"max_reservations": 0}}})
    with pytest.raises(ConfigError, match="reserve_lease_s"):
        load_config(data={"router": {"reserve_lease_s": 900}, "decode": {"transfer": {"max_lease_s": 600}}})
