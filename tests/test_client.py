"""The client SDK against a real grpc.aio Router servicer (a fake router in this file).

The fake router runs in its own thread and event loop on 127.0.0.1, port 0. The
prompt text picks its behaviour: stream canned chunks, fail with a status code,
fail mid-stream, stall, stream slowly, or end without a finished chunk. It
records each request, the deadline it arrived with, and whether the RPC ended
cancelled, so the tests can check what reached the server.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import pytest

from braid.client import (
    DEFAULT_GENERATE_TIMEOUT_S,
    DEFAULT_UNARY_TIMEOUT_S,
    ERROR_CLASSES,
    AsyncClient,
    BraidError,
    Cancelled,
    Client,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Timings,
    Unavailable,
    build_sampling,
    check_sampling,
    sampling_kwargs,
    validate_sampling,
)
from braid.proto import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.timeout(60)

CANCEL_BOUND_S = 1.0  # cancellation must reach the server within this

TIMINGS = common_pb2.Timings(
    queue_s=0.01, prefill_s=0.2, transfer_s=0.05, ttft_s=0.25, decode_s=1.5, total_s=1.75,
    kv_bytes=123456, prefill_node="p0", decode_node="d1", local_prefill=False, prefill_attempts=1,
)

# (token_ids, text) per chunk of the "canned" behaviour; prompt_tokens=3 on the first
CANNED = [([5, 6], "ab"), ([7], "c"), ([8, 9], "de")]

REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "none": common_pb2.FINISH_REASON_UNSPECIFIED,
}

NODES = [
    router_pb2.NodeStatus(
        info=common_pb2.NodeInfo(node_id="p0", role=common_pb2.ROLE_PREFILL, address="10.0.0.1:7000", model_id="m"),
        load=common_pb2.Load(queued_prefill_tokens=4096, waiting_seqs=2),
        reachable=True,
    ),
    router_pb2.NodeStatus(
        info=common_pb2.NodeInfo(node_id="d0", role=common_pb2.ROLE_DECODE, address="10.0.0.2:7000", model_id="m"),
        load=common_pb2.Load(free_kv_blocks=10, total_kv_blocks=100, running_seqs=7, reserved_blocks=3),
        reachable=False,
    ),
]


# ---------------------------------------------------------------- the fake router


class FakeRouter(router_pb2_grpc.RouterServicer):
    """Streams canned tokens, fails, stalls or streams slowly, as the prompt text says."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: list[router_pb2.GenerateRequest] = []
        self.remaining: dict[str, float | None] = {}
        self._cancelled: dict[str, threading.Event] = {}
        self._started: dict[str, threading.Event] = {}

    def cancelled(self, rid: str) -> threading.Event:
        """Set when the RPC of `rid` ended cancelled on the server side."""
        with self._lock:
            return self._cancelled.setdefault(rid, threading.Event())

    def started(self, rid: str) -> threading.Event:
        with self._lock:
            return self._started.setdefault(rid, threading.Event())

    async def Generate(self, request, context):
        rid = request.request_id or "auto-1"
        with self._lock:
            self.requests.append(request)
            self.remaining[rid] = context.time_remaining()
        context.add_done_callback(lambda ctx: ctx.cancelled() and self.cancelled(rid).set())
        self.started(rid).set()
        cmd = request.text if request.WhichOneof("prompt") == "text" else "canned"
        try:
            async for resp in self._behave(cmd, rid, request, context):
                yield resp
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: grpc.aio cancels the handler, or, when the client's
            # cancel races a message being sent, closes this generator (GeneratorExit)
            # and ends the RPC with ctx.cancelled() False (seen in about 3% of runs).
            self.cancelled(rid).set()
            raise

    async def _behave(self, cmd: str, rid: str, request, context):
        kind, _, arg = cmd.partition(":")
        if kind == "error":
            await context.abort(grpc.StatusCode[arg], f"boom {arg}")
        elif kind == "stall":
            await asyncio.sleep(3600)
        elif kind == "slow":
            for i in range(1000):
                yield router_pb2.GenerateResponse(request_id=rid, token_ids=[i], text=f"<{i}>")
                await asyncio.sleep(0.01)
        elif kind == "midstream":
            for ids, text in CANNED[:2]:
                yield router_pb2.GenerateResponse(request_id=rid, token_ids=ids, text=text)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode node lost")
        elif kind == "unfinished":
            yield router_pb2.GenerateResponse(request_id=rid, token_ids=[1], text="x")
        else:  # canned, optionally "reason:<stop|length|abort|none>"
            try:
                check_sampling(request.sampling)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            for resp in canned(rid, REASONS[arg] if kind == "reason" else common_pb2.FINISH_REASON_LENGTH):
                yield resp

    async def ListNodes(self, request, context):
        with self._lock:
            self.remaining["ListNodes"] = context.time_remaining()
        return router_pb2.ListNodesResponse(nodes=NODES)


def canned(rid: str, reason: int) -> list[router_pb2.GenerateResponse]:
    out = []
    for i, (ids, text) in enumerate(CANNED):
        last = i == len(CANNED) - 1
        resp = router_pb2.GenerateResponse(request_id=rid, token_ids=ids, text=text, finished=last)
        if i == 0:
            resp.prompt_tokens = 3
        if last:
            resp.finish_reason = reason
            resp.timings.CopyFrom(TIMINGS)
        out.append(resp)
    return out


class ServerThread:
    """A grpc.aio server for one servicer, in its own thread and event loop."""

    def __init__(self, servicer):
        self.servicer = servicer
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake router did not start")
        return self

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(grace=None)

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def router():
    server = ServerThread(FakeRouter()).start()
    yield server
    server.stop()


@pytest.fixture
def client(router):
    with Client(router.address) as c:
        yield c


def assert_canned(chunks, rid: str, reason: str | None = "length"):
    """The chunks are CANNED in order, with prompt_tokens first and timings last."""
    assert [(list(c.token_ids), c.text) for c in chunks] == CANNED
    assert [c.finished for c in chunks] == [False, False, True]
    assert [c.request_id for c in chunks] == [rid] * 3
    assert [c.prompt_tokens for c in chunks] == [3, None, None]
    assert [c.finish_reason for c in chunks] == [None, None, reason]
    assert [c.timings for c in chunks[:2]] == [None, None]
    assert chunks[-1].timings == Timings(**{f.name: v for f, v in TIMINGS.ListFields()})


def assert_completion(done, rid: str):
    assert done.request_id == rid
    assert list(done.token_ids) == [t for ids, _ in CANNED for t in ids]
    assert done.text == "".join(text for _, text in CANNED)
    assert done.finish_reason == "length"
    assert done.prompt_tokens == 3
    assert done.timings.kv_bytes == TIMINGS.kv_bytes and done.timings.decode_node == "d1"


def assert_nodes(nodes):
    assert [(n.node_id, n.role, n.address, n.reachable) for n in nodes] == [
        ("p0", "prefill", "10.0.0.1:7000", True),
        ("d0", "decode", "10.0.0.2:7000", False),
    ]
    assert nodes[0].load.queued_prefill_tokens == 4096 and nodes[0].load.waiting_seqs == 2
    assert (nodes[1].load.free_kv_blocks, nodes[1].load.total_kv_blocks, nodes[1].load.running_seqs) == (10, 100, 7)
    assert nodes[1].load.reserved_blocks == 3 and nodes[1].info.model_id == "m"


ALL_ERROR_CODES = sorted(ERROR_CLASSES, key=lambda c: c.value[0])


# ---------------------------------------------------------------- sampling rules


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(stop_token_ids=[3, -1]), "stop_token_ids"),
        (dict(stop_token_ids=[2**32]), "stop_token_ids"),
    ],
)
def test_validate_sampling_rejects_with_reason(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        validate_sampling(**kwargs)


def test_validate_sampling_accepts_and_round_trips():
    pb = validate_sampling(max_tokens=7, temperature=0, top_k=-1, top_p=0.5, seed=2**64 - 1,
                           stop_token_ids=[2, 3], ignore_eos=True)
    assert sampling_kwargs(pb) == dict(max_tokens=7, temperature=0.0, top_k=-1, top_p=0.5, seed=2**64 - 1,
                                       stop_token_ids=(2, 3), ignore_eos=True)
    default = validate_sampling()
    assert not default.HasField("seed")
    assert sampling_kwargs(default)["seed"] is None


def test_check_sampling_reads_wire_defaults():
    # top_p 0 is proto3's "unset" (1.0); max_tokens 0 is not allowed.
    check_sampling(common_pb2.SamplingParams(max_tokens=1))
    assert sampling_kwargs(common_pb2.SamplingParams(max_tokens=1))["top_p"] == 1.0
    for bad in (common_pb2.SamplingParams(), common_pb2.SamplingParams(max_tokens=1, top_p=1.25),
                common_pb2.SamplingParams(max_tokens=1, temperature=-1), common_pb2.SamplingParams(max_tokens=1, top_k=-5)):
        with pytest.raises(ValueError):
            check_sampling(bad)


def test_build_sampling_keeps_semantically_bad_values():
    # Encodable but wrong values go to the server unchanged, which rejects them.
    pb = build_sampling(max_tokens=0, temperature=-1.0, top_p=2.0, top_k=-7)
    assert (pb.max_tokens, pb.temperature, pb.top_p, pb.top_k) == (0, -1.0, 2.0, -7)


# ---------------------------------------------------------------- blocking client


def test_stream_order_and_fields(client):
    assert_canned(list(client.generate("canned", request_id="r1")), "r1")


@pytest.mark.parametrize("reason, expected", [("stop", "stop"), ("length", "length"), ("abort", "abort"), ("none", None)])
def test_finish_reasons(client, reason, expected):
    chunks = list(client.generate(f"reason:{reason}", request_id="r1"))
    assert chunks[-1].finished and chunks[-1].finish_reason == expected


def test_request_encoding(router, client):
    client.complete([11, 12, 13], max_tokens=5, temperature=0.5, top_k=4, top_p=0.9, seed=42,
                    stop_token_ids=[1, 2], ignore_eos=True, request_id="r-enc", session_id="s-1")
    client.complete("canned")
    token_req, text_req = router.servicer.requests
    assert token_req.WhichOneof("prompt") == "token_ids" and list(token_req.token_ids.ids) == [11, 12, 13]
    assert (token_req.request_id, token_req.session_id) == ("r-enc", "s-1")
    assert sampling_kwargs(token_req.sampling) == dict(
        max_tokens=5, temperature=0.5, top_k=4, top_p=pytest.approx(0.9), seed=42,
        stop_token_ids=(1, 2), ignore_eos=True)
    assert text_req.WhichOneof("prompt") == "text" and text_req.text == "canned"
    assert (text_req.request_id, text_req.session_id) == ("", "")
    assert not text_req.sampling.HasField("seed")


def test_complete(client):
    assert_completion(client.complete("canned", request_id="r2"), "r2")


def test_list_nodes(client):
    assert_nodes(client.list_nodes())


@pytest.mark.parametrize("code", ALL_ERROR_CODES, ids=lambda c: c.name)
def test_status_code_maps_to_its_exception(client, code):
    with pytest.raises(BraidError) as info:
        list(client.generate(f"error:{code.name}"))
    assert type(info.value) is ERROR_CLASSES[code]
    assert info.value.code == code and info.value.details == f"boom {code.name}"


def test_named_exception_classes():
    names = {c.name: ERROR_CLASSES[c].__name__ for c in ERROR_CLASSES}
    assert names["INVALID_ARGUMENT"] == "InvalidArgument" and names["RESOURCE_EXHAUSTED"] == "ResourceExhausted"
    assert names["UNAVAILABLE"] == "Unavailable" and names["DEADLINE_EXCEEDED"] == "DeadlineExceeded"
    assert names["CANCELLED"] == "Cancelled" and names["NOT_FOUND"] == "NotFound" and names["INTERNAL"] == "Internal"
    assert set(ERROR_CLASSES) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


def test_error_after_chunks_is_raised_when_it_happens(client):
    stream = client.generate("midstream", request_id="r3")
    assert [c.text for c in (next(stream), next(stream))] == ["ab", "c"]
    with pytest.raises(Unavailable, match="decode node lost"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


def test_stream_without_finished_chunk_is_internal(client):
    with pytest.raises(Internal, match="finished"):
        list(client.generate("unfinished"))


def test_server_rejects_bad_sampling(router, client):
    with pytest.raises(InvalidArgument, match="max_tokens"):
        list(client.generate("canned", max_tokens=0))
    with pytest.raises(InvalidArgument, match="top_p"):
        client.complete("canned", top_p=1.5)
    assert len(router.servicer.requests) == 2  # sent, and the server answered


def test_unencodable_values_raise_before_sending(router, client):
    with pytest.raises(InvalidArgument, match="max_tokens"):
        client.generate("canned", max_tokens=-1)
    with pytest.raises(InvalidArgument, match="prompt"):
        client.generate(b"bytes")
    with pytest.raises(InvalidArgument):
        client.generate([1, -2])
    assert router.servicer.requests == []


def test_close_cancels_on_server(router, client):
    stream = client.generate("slow", request_id="r-close")
    assert next(stream).token_ids == (0,)
    stream.close()
    assert router.servicer.cancelled("r-close").wait(CANCEL_BOUND_S)
    assert list(stream) == []


def test_with_block_cancels_on_server(router, client):
    with client.generate("slow", request_id="r-with") as stream:
        for chunk in stream:
            if chunk.token_ids == (2,):
                break
    assert router.servicer.cancelled("r-with").wait(CANCEL_BOUND_S)


def test_breaking_out_and_dropping_the_stream_cancels(router, client):
    for chunk in client.generate("slow", request_id="r-drop"):
        if chunk.token_ids == (1,):
            break
    del chunk
    assert router.servicer.cancelled("r-drop").wait(CANCEL_BOUND_S)


def test_cancel_from_another_thread_raises_cancelled(router, client):
    stream = client.generate("stall", request_id="r-cancel")
    assert router.servicer.started("r-cancel").wait(5)
    timer = threading.Timer(0.2, stream.cancel)
    timer.start()
    with pytest.raises(Cancelled):
        next(stream)
    timer.join()
    assert router.servicer.cancelled("r-cancel").wait(CANCEL_BOUND_S)


def test_deadline_exceeded(router, client):
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(client.generate("stall", request_id="r-dl", timeout=0.3))
    assert 0.25 < time.monotonic() - t0 < 3
    assert router.servicer.cancelled("r-dl").wait(CANCEL_BOUND_S)


def test_client_default_timeout_applies(router):
    with Client(router.address, timeout=0.3) as c:
        with pytest.raises(DeadlineExceeded):
            c.complete("stall")


def test_every_call_carries_a_deadline(router, client):
    client.complete("canned", request_id="r-default")
    client.complete("canned", request_id="r-5s", timeout=5)
    remaining = router.servicer.remaining
    assert DEFAULT_GENERATE_TIMEOUT_S - 10 < remaining["r-default"] < DEFAULT_GENERATE_TIMEOUT_S + 1
    assert 4 < remaining["r-5s"] < 5.5  # server clocks the deadline with a little slack
    client.list_nodes()
    assert DEFAULT_UNARY_TIMEOUT_S - 5 < remaining["ListNodes"] < DEFAULT_UNARY_TIMEOUT_S + 1


def test_bad_timeout_is_rejected(router):
    with pytest.raises(ValueError):
        Client(router.address, timeout=0)
    with Client(router.address) as c, pytest.raises(ValueError):
        c.generate("canned", timeout=-1)


def test_unavailable_when_no_server():
    server = ServerThread(FakeRouter()).start()
    address = server.address
    server.stop()
    with Client(address, timeout=5) as c:
        with pytest.raises(Unavailable):
            list(c.generate("canned"))
        with pytest.raises(Unavailable):
            c.list_nodes()


def test_message_size_limit(router):
    with Client(router.address, max_message_bytes=1024) as c:
        with pytest.raises(ResourceExhausted):
            c.complete("x" * 4096)
        assert c.complete("canned").text == "abcde"


# ---------------------------------------------------------------- asyncio client


def test_async_stream_order_and_complete(router):
    async def main():
        async with AsyncClient(router.address) as c:
            assert_canned([chunk async for chunk in c.generate("canned", request_id="a1")], "a1")
            assert_completion(await c.complete("canned", request_id="a2"), "a2")
            assert_nodes(await c.list_nodes())
            remaining = router.servicer.remaining["a1"]
            assert DEFAULT_GENERATE_TIMEOUT_S - 10 < remaining < DEFAULT_GENERATE_TIMEOUT_S + 1

    asyncio.run(main())


def test_async_status_codes(router):
    async def main():
        async with AsyncClient(router.address) as c:
            for code in ALL_ERROR_CODES:
                with pytest.raises(BraidError) as info:
                    await c.complete(f"error:{code.name}")
                assert type(info.value) is ERROR_CLASSES[code]
                assert info.value.code == code and info.value.details == f"boom {code.name}"
            with pytest.raises(InvalidArgument, match="temperature"):
                await c.complete("canned", temperature=-1)
            with pytest.raises(Internal):
                await c.complete("unfinished")

    asyncio.run(main())


def test_async_error_after_chunks(router):
    async def main():
        async with AsyncClient(router.address) as c:
            stream = c.generate("midstream")
            got = [(await stream.__anext__()).text, (await stream.__anext__()).text]
            assert got == ["ab", "c"]
            with pytest.raises(Unavailable, match="decode node lost"):
                await stream.__anext__()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()

    asyncio.run(main())


def test_async_aclose_cancels_on_server(router):
    async def main():
        async with AsyncClient(router.address) as c:
            stream = c.generate("slow", request_id="a-close")
            assert (await stream.__anext__()).token_ids == (0,)
            await stream.aclose()
            assert [chunk async for chunk in stream] == []
            async with c.generate("slow", request_id="a-with") as s2:
                async for chunk in s2:
                    break

    asyncio.run(main())
    assert router.servicer.cancelled("a-close").wait(CANCEL_BOUND_S)
    assert router.servicer.cancelled("a-with").wait(CANCEL_BOUND_S)


def test_async_break_and_drop_cancels(router):
    async def main():
        async with AsyncClient(router.address) as c:
            async for chunk in c.generate("slow", request_id="a-drop"):
                if chunk.token_ids == (1,):
                    break
            assert await asyncio.to_thread(router.servicer.cancelled("a-drop").wait, CANCEL_BOUND_S)

    asyncio.run(main())


def test_async_cancel_raises_cancelled(router):
    async def main():
        async with AsyncClient(router.address) as c:
            stream = c.generate("stall", request_id="a-cancel")
            asyncio.get_running_loop().call_later(0.2, stream.cancel)
            with pytest.raises(Cancelled):
                await stream.__anext__()
            assert await asyncio.to_thread(router.servicer.cancelled("a-cancel").wait, CANCEL_BOUND_S)

    asyncio.run(main())


def test_async_task_cancellation_stays_cancelled_and_reaches_server(router):
    async def consume(c):
        async for _ in c.generate("stall", request_id="a-task"):
            pass

    async def main():
        async with AsyncClient(router.address) as c:
            task = asyncio.create_task(consume(c))
            assert await asyncio.to_thread(router.servicer.started("a-task").wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(router.servicer.cancelled("a-task").wait, CANCEL_BOUND_S)

    asyncio.run(main())


def test_async_deadline_exceeded(router):
    async def main():
        async with AsyncClient(router.address, timeout=0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                async for _ in c.generate("stall", request_id="a-dl"):
                    pass
            assert 0.25 < time.monotonic() - t0 < 3
            with pytest.raises(DeadlineExceeded):
                await c.complete("stall", timeout=0.2)

    asyncio.run(main())
    assert router.servicer.cancelled("a-dl").wait(CANCEL_BOUND_S)


def test_async_unavailable_and_size_limit(router):
    dead = ServerThread(FakeRouter()).start()
    address = dead.address
    dead.stop()

    async def main():
        async with AsyncClient(address, timeout=5) as c:
            with pytest.raises(Unavailable):
                await c.complete("canned")
            with pytest.raises(Unavailable):
                await c.list_nodes()
        async with AsyncClient(router.address, max_message_bytes=1024) as c:
            with pytest.raises(ResourceExhausted):
                await c.complete("x" * 4096)
            with pytest.raises(NotFound):
                await c.complete("error:NOT_FOUND")

    asyncio.run(main())
