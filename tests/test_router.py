"""The Router service end to end over real gRPC, with fake prefill and decode nodes.

Every test starts, on 127.0.0.1 port 0 and on one event loop (asyncio.run):
fake DecodeNode and PrefillNode servers, a StaticMembership naming them, the
real router (`start_router`), and the real client SDK (`AsyncClient`). The
fakes follow the node protocol and share in-memory state: a fake D's Reserve
creates a reservation under a lease; a fake P "sends" the KV by completing
that reservation with the first token; the D's Decode stream then sends the
first token and decodes the rest. Tokens are a fixed function of the prompt
(`token_at`), so the expected output is known independently of the router.
Failure knobs on the fakes: fail with a status, stall, end the stream ABORTED,
die mid-stream. Every log entry is (node_id, call, request_id).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.client import (
    AlreadyExists,
    AsyncClient,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from braid.client.sampling import check_sampling
from braid.discovery.static import StaticMembership
from braid.engine.tiny import save_tokenizer
from braid.tokenizer import Tokenizer
from braid.proto import common_pb2, nodes_pb2, nodes_pb2_grpc, router_pb2, router_pb2_grpc
from braid.router.config import RouterConfig
from braid.router.orchestrator import MAX_REQUEST_BYTES
from braid.router.server import MAX_MESSAGE_BYTES, start_router

VOCAB = 384
MAX_MODEL_LEN = 256
KV_BYTES_PER_TOKEN = 1024
BLOCKS_PER_RESERVATION = 4
PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]


def token_at(prompt, i: int) -> int:
    """The i-th output token the fake nodes produce for a prompt (0 = P's first token)."""
    return (sum(prompt) + 31 * i) % (VOCAB - 4) + 2


def expected(prompt, n: int) -> list[int]:
    return [token_at(prompt, i) for i in range(n)]


class KVFailed(Exception):
    pass


def check_request(prompt, sampling) -> str | None:
    """The fakes' input checks; the reason, or None when fine."""
    try:
        check_sampling(sampling)
    except ValueError as e:
        return str(e)
    if not prompt:
        return "empty prompt"
    if len(prompt) > MAX_MODEL_LEN:
        return f"prompt of {len(prompt)} tokens exceeds max_model_len {MAX_MODEL_LEN}"
    bad = [t for t in prompt if t >= VOCAB]
    if bad:
        return f"token id {bad[0]} out of range (vocab {VOCAB})"
    return None


# ---------------------------------------------------------------- fake nodes


@dataclasses.dataclass
class Reservation:
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    kv: asyncio.Future
    lease: asyncio.TimerHandle


class FakeDecode(nodes_pb2_grpc.DecodeNodeServicer):
    def __init__(self, node_id: str, log: list):
        self.node_id = node_id
        self.log = log
        self.reservations: dict[str, Reservation] = {}
        self.streams: set[str] = set()
        self.aborted: set[str] = set()
        self.token_delay = 0.0
        self.abort_streams = 0
        """The next N remote streams end ABORTED before the first token (a failed transfer)."""
        self.die_after: int | None = None
        """Die (UNAVAILABLE on everything) after streaming this many tokens."""
        self.dead = False
        self.room: int | None = None
        """Requests (reserved or streaming) it holds at most; Reserve beyond that
        answers RESOURCE_EXHAUSTED, as a node with no free KV blocks does."""
        self.peak = 0
        self.cached_tokens = 0
        """DecodeResponse.cached_tokens of each stream's first message."""
        self.publisher = None
        """A braid.node.prefix_publish.PrefixPublisher whose set GetLoad publishes, or None."""

    def held(self) -> int:
        return len(self.reservations) + len(self.streams)

    async def _alive(self, context):
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} is down")

    async def Reserve(self, request, context):
        await self._alive(context)
        rid = request.request_id
        self.log.append((self.node_id, "reserve", rid))
        reason = check_request(list(request.prompt_token_ids), request.sampling)
        if reason:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        if rid in self.reservations:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{rid} already reserved")
        if self.room is not None and self.held() >= self.room:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"need 4 KV blocks, 0 free on {self.node_id}")
        loop = asyncio.get_running_loop()
        kv = loop.create_future()
        kv.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting
        self.reservations[rid] = Reservation(
            prompt=list(request.prompt_token_ids),
            sampling=request.sampling,
            kv=kv,
            lease=loop.call_later(request.lease_s, self._fail_kv, rid, "lease expired"),
        )
        self.peak = max(self.peak, self.held())
        return nodes_pb2.ReserveResponse(
            destination=common_pb2.KVDestination(
                decode_node_id=self.node_id, block_ids=list(range(BLOCKS_PER_RESERVATION)), transfer_id=hash(rid) & 0xFFFF,
                transport="tcp", lease_deadline_unix=time.time() + request.lease_s, num_tokens=len(request.prompt_token_ids),
            )
        )

    def _fail_kv(self, rid: str, why: str) -> bool:
        r = self.reservations.pop(rid, None)
        if r is None:
            return False
        r.lease.cancel()
        if not r.kv.done():
            r.kv.set_exception(KVFailed(why))
        return True

    def deliver(self, rid: str, first_token: int) -> bool:
        """The fake KV transfer: P completes the reservation with the first token."""
        r = self.reservations.get(rid)
        if r is None or r.kv.done():
            return False
        r.kv.set_result(first_token)
        return True

    def reserved_blocks(self) -> int:
        return BLOCKS_PER_RESERVATION * sum(1 for r in self.reservations.values() if not r.kv.done())

    async def Decode(self, request, context):
        await self._alive(context)
        rid = request.request_id
        self.log.append((self.node_id, "decode", rid))
        started = time.monotonic()
        if request.local_prefill:
            prompt, sampling = list(request.prompt_token_ids), request.sampling
            reason = check_request(prompt, sampling)
            if reason:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
            await asyncio.sleep(0.005)
            first = token_at(prompt, 0)
        else:
            r = self.reservations.get(rid)
            if r is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation {rid}")
            if self.abort_streams > 0:
                self.abort_streams -= 1
                await asyncio.sleep(0.01)
                self._fail_kv(rid, "KV transfer failed")
                await context.abort(grpc.StatusCode.ABORTED, "KV transfer failed")
            try:
                first = await r.kv
            except KVFailed as e:
                await context.abort(grpc.StatusCode.ABORTED, str(e))
            finally:
                self._fail_kv(rid, "stream closed")  # KV is now the sequence's; the reservation is done
            prompt, sampling = r.prompt, r.sampling
        self.streams.add(rid)
        try:
            stops = set(sampling.stop_token_ids)
            for i in range(sampling.max_tokens):
                if self.die_after is not None and i >= self.die_after:
                    self.dead = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} died")
                if rid in self.aborted:
                    await context.abort(grpc.StatusCode.ABORTED, "aborted")
                tok = first if i == 0 else token_at(prompt, i)
                stop = tok in stops
                finished = stop or i == sampling.max_tokens - 1
                reason = common_pb2.FINISH_REASON_UNSPECIFIED
                if finished:
                    reason = common_pb2.FINISH_REASON_STOP if stop else common_pb2.FINISH_REASON_LENGTH
                await context.write(
                    nodes_pb2.DecodeResponse(
                        token_ids=[tok], finished=finished, finish_reason=reason,
                        kv_ready_s=time.monotonic() - started if i == 0 else 0.0,
                        cached_tokens=self.cached_tokens if i == 0 else 0,
                    )
                )
                if finished:
                    return
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
        finally:
            self.streams.discard(rid)

    async def Abort(self, request, context):
        await self._alive(context)
        rid = request.request_id
        self.log.append((self.node_id, "abort", rid))
        found = self._fail_kv(rid, "aborted") or rid in self.streams
        self.aborted.add(rid)
        return common_pb2.AbortResponse(found=found)

    async def GetLoad(self, request, context):
        await self._alive(context)
        reserved = self.reserved_blocks()
        return published(self.publisher, request, common_pb2.Load(
            free_kv_blocks=100 - reserved, total_kv_blocks=100, running_seqs=len(self.streams), reserved_blocks=reserved,
        ))


class FakePrefill(nodes_pb2_grpc.PrefillNodeServicer):
    def __init__(self, node_id: str, log: list, decoders: dict[str, FakeDecode]):
        self.node_id = node_id
        self.log = log
        self.decoders = decoders
        self.fail_code: grpc.StatusCode | None = None
        self.stall = False
        self.delay = 0.01
        self.reply_delay = 0.0
        """Seconds between completing the KV on D and replying (D streams first)."""
        self.aborted: set[str] = set()
        self.cached_tokens = 0
        """PrefillResponse.cached_tokens."""
        self.publisher = None
        """As FakeDecode.publisher."""

    async def Prefill(self, request, context):
        rid = request.request_id
        self.log.append((self.node_id, "prefill", rid))
        if self.fail_code is not None:
            await context.abort(self.fail_code, f"{self.node_id} failed on purpose")
        reason = check_request(list(request.token_ids), request.sampling)
        if reason:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        try:
            await asyncio.sleep(3600 if self.stall else self.delay)
        except asyncio.CancelledError:
            self.log.append((self.node_id, "prefill_cancelled", rid))
            raise
        first = token_at(list(request.token_ids), 0)
        decode = self.decoders.get(request.destination.decode_node_id)
        if rid in self.aborted or decode is None or not decode.deliver(rid, first):
            await context.abort(grpc.StatusCode.ABORTED, "KV transfer failed: no reservation")
        await asyncio.sleep(self.reply_delay)
        return nodes_pb2.PrefillResponse(
            first_token=first, prefill_s=self.delay, transfer_s=self.delay / 2,
            kv_bytes=len(request.token_ids) * KV_BYTES_PER_TOKEN, cached_tokens=self.cached_tokens,
        )

    async def Abort(self, request, context):
        self.log.append((self.node_id, "abort", request.request_id))
        self.aborted.add(request.request_id)
        return common_pb2.AbortResponse(found=True)

    async def GetLoad(self, request, context):
        return published(self.publisher, request, common_pb2.Load(queued_prefill_tokens=0))


def published(publisher, request, load):
    """`load` with the prefix cache changes `publisher` has for the asking router, as a node adds them."""
    delta = publisher.delta(request.cache_generation, request.cache_seq_no) if publisher is not None else None
    if delta is not None:
        load.prefix_cache.CopyFrom(delta)
    return load


# ---------------------------------------------------------------- harness


class Cluster:
    """Fake nodes, membership, router and client on the running loop."""

    def __init__(self):
        self.log: list[tuple[str, str, str]] = []
        self.decoders: dict[str, FakeDecode] = {}
        self.prefills: dict[str, FakePrefill] = {}
        self.servers: dict[str, grpc.aio.Server] = {}
        self.infos: dict[str, common_pb2.NodeInfo] = {}
        self.router = None
        self.client: AsyncClient | None = None

    async def _serve(self, node_id: str, role: int, servicer) -> None:
        server = grpc.aio.server()
        if role == common_pb2.ROLE_DECODE:
            nodes_pb2_grpc.add_DecodeNodeServicer_to_server(servicer, server)
        else:
            nodes_pb2_grpc.add_PrefillNodeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.servers[node_id] = server
        self.infos[node_id] = common_pb2.NodeInfo(
            node_id=node_id, role=role, address=f"127.0.0.1:{port}", model_id="fake",
            capacity=common_pb2.Capacity(num_kv_blocks=100, tokens_per_block=16, max_num_seqs=8, max_model_len=MAX_MODEL_LEN),
            started_at_ms=1,
        )

    async def start(self, n_prefill: int = 2, n_decode: int = 2, tokenizer=None, **router_opts) -> Cluster:
        for i in range(n_decode):
            d = self.decoders[f"d{i}"] = FakeDecode(f"d{i}", self.log)
            await self._serve(d.node_id, common_pb2.ROLE_DECODE, d)
        for i in range(n_prefill):
            p = self.prefills[f"p{i}"] = FakePrefill(f"p{i}", self.log, self.decoders)
            await self._serve(p.node_id, common_pb2.ROLE_PREFILL, p)
        self.membership = StaticMembership(self.infos.values())
        opts = dict(
            host="127.0.0.1", port=0, metrics_port=0, http_port=0, prefill_policy="round_robin", decode_policy="round_robin",
            load_poll_s=0.1, node_rpc_timeout_s=2.0, request_timeout_s=30.0,
        )
        opts.update(router_opts)
        self.router = await start_router(RouterConfig(**opts), self.membership, tokenizer)
        self.client = AsyncClient(self.router.address, timeout=20)
        return self

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.router is not None:
            await self.router.stop(0)
        await asyncio.gather(*(s.stop(None) for s in self.servers.values()))

    @property
    def clog(self) -> list[tuple[str, str, str]]:
        """The log with each node-side request id named by its client id: "<id>" for the
        first attempt of a request, "<id>-a<n>" for its n-th. The router mints node-side
        ids "<client id>-<router instance id>-<serial>" (unique per attempt); this checks
        that form and that the instance id is this router's."""
        names: dict[str, str] = {}
        attempts: dict[str, int] = {}
        out = []
        for node, call, rid in self.log:
            if rid not in names:
                client, instance, serial = rid.rsplit("-", 2)
                assert instance == self.router.orchestrator.instance_id and serial.isdigit(), rid
                attempts[client] = n = attempts.get(client, 0) + 1
                names[rid] = client if n == 1 else f"{client}-a{n}"
            out.append((node, call, names[rid]))
        return out

    def events(self, call: str, node: str | None = None) -> list[tuple[str, str, str]]:
        return [e for e in self.clog if e[1] == call and (node is None or e[0] == node)]

    def stranded(self) -> dict[str, int]:
        """Reservations still held per decode node (must be zero after every request)."""
        return {d.node_id: len(d.reservations) for d in self.decoders.values() if d.reservations}

    async def scrape(self) -> str:
        url = f"http://{self.router.metrics_address}/metrics"
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    async def metric(self, sample: str) -> float | None:
        for line in (await self.scrape()).splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return None


def run(body, **cluster_opts):
    """Run `await body(cluster)` with a fresh cluster, always stopped afterwards."""

    async def main():
        cluster = Cluster()
        try:
            await cluster.start(**cluster_opts)
            await body(cluster)
        finally:
            await cluster.stop()

    asyncio.run(main())


async def eventually(predicate, timeout: float = 1.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)


async def collect(stream) -> list:
    return [chunk async for chunk in stream]


# ---------------------------------------------------------------- happy paths


@pytest.mark.timeout(30)
def test_happy_path_streams_in_order_with_accounting():
    async def body(c: Cluster):
        chunks = await collect(c.client.generate(PROMPT, max_tokens=6, temperature=0, request_id="req-1"))
        assert [t for ch in chunks for t in ch.token_ids] == expected(PROMPT, 6)
        assert all(len(ch.token_ids) == 1 for ch in chunks)
        assert all(ch.request_id == "req-1" for ch in chunks)
        assert chunks[0].prompt_tokens == len(PROMPT)
        assert all(ch.prompt_tokens is None for ch in chunks[1:])
        assert [ch.finished for ch in chunks] == [False] * 5 + [True]
        last = chunks[-1]
        assert last.finish_reason == "length"
        t = last.timings
        assert (t.prefill_node, t.decode_node, t.local_prefill, t.prefill_attempts) == ("p0", "d0", False, 1)
        assert t.kv_bytes == len(PROMPT) * KV_BYTES_PER_TOKEN
        assert t.prefill_s == pytest.approx(0.01) and t.transfer_s == pytest.approx(0.005)
        assert 0 < t.ttft_s <= t.total_s and t.decode_s >= 0 and t.queue_s >= 0
        assert all(ch.timings is None for ch in chunks[:-1])
        # the pairing: D reserved and streamed, P prefilled into it, all under the request's id
        assert c.events("reserve") == [("d0", "reserve", "req-1")]
        assert c.events("prefill") == [("p0", "prefill", "req-1")]
        assert c.events("abort") == []
        assert c.stranded() == {}

        # a stop token ends early with "stop"; a request without an id gets one
        stop = token_at(PROMPT, 2)
        done = await c.client.complete(PROMPT, max_tokens=10, temperature=0, stop_token_ids=[stop])
        assert done.token_ids == tuple(expected(PROMPT, 3)) and done.finish_reason == "stop"
        assert len(done.request_id) >= 16 and done.request_id != "req-1"

        # D streams before P's reply arrives: the reply's numbers still reach the timings
        for p in c.prefills.values():
            p.reply_delay = 0.5
        late = await collect(c.client.generate(PROMPT, max_tokens=2, temperature=0))
        assert late[-1].timings.kv_bytes == len(PROMPT) * KV_BYTES_PER_TOKEN
        assert late[-1].timings.ttft_s < 0.5 <= late[-1].timings.total_s
        for p in c.prefills.values():
            p.reply_delay = 0.0

        # one token: the first chunk is also the last
        one = await collect(c.client.generate(PROMPT, max_tokens=1, temperature=0))
        assert len(one) == 1 and one[0].finished and one[0].prompt_tokens == len(PROMPT) and one[0].timings is not None

    run(body)


@pytest.mark.timeout(30)
def test_text_prompt_and_text_deltas_with_a_real_tokenizer(tmp_path):
    save_tokenizer(str(tmp_path), VOCAB)
    tok = Tokenizer(str(tmp_path))
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)

    async def body(c: Cluster):
        chunks = await collect(c.client.generate(text, max_tokens=12, temperature=0))
        tokens = [t for ch in chunks for t in ch.token_ids]
        assert tokens == expected(ids, 12)
        assert chunks[0].prompt_tokens == len(ids)
        assert "".join(ch.text for ch in chunks) == tok.decode(tokens)
        assert c.events("prefill") == [("p0", "prefill", chunks[0].request_id)]

    run(body, tokenizer=tok)


@pytest.mark.timeout(30)
def test_round_robin_spreads_requests_over_two_prefill_and_two_decode_nodes():
    async def body(c: Cluster):
        for i in range(4):
            done = await c.client.complete(PROMPT, max_tokens=3, temperature=0, request_id=f"r{i}")
            assert done.token_ids == tuple(expected(PROMPT, 3))
        assert [e[0] for e in c.events("prefill")] == ["p0", "p1", "p0", "p1"]
        assert [e[0] for e in c.events("reserve")] == ["d0", "d1", "d0", "d1"]
        # concurrent requests spread the same way
        results = await asyncio.gather(*(c.client.complete(PROMPT, max_tokens=3, temperature=0) for _ in range(4)))
        assert all(r.token_ids == tuple(expected(PROMPT, 3)) for r in results)
        assert sorted(r.timings.prefill_node for r in results) == ["p0", "p0", "p1", "p1"]
        assert sorted(r.timings.decode_node for r in results) == ["d0", "d0", "d1", "d1"]
        assert c.stranded() == {}

    run(body)


@pytest.mark.timeout(60)
def test_many_concurrent_requests_each_get_their_own_tokens():
    async def body(c: Cluster):
        prompts = [[(7 * i + j) % 300 + 2 for j in range(5 + i % 7)] for i in range(32)]
        results = await asyncio.gather(*(c.client.complete(p, max_tokens=8, temperature=0) for p in prompts))
        for p, r in zip(prompts, results):
            assert r.token_ids == tuple(expected(p, 8)) and r.prompt_tokens == len(p)
        assert len({r.request_id for r in results}) == 32
        assert c.stranded() == {} and c.events("abort") == []
        assert c.router.orchestrator.admission.inflight == 0

    run(body, max_inflight=8)


@pytest.mark.timeout(30)
def test_short_prompts_prefill_on_the_decode_node():
    async def body(c: Cluster):
        short = PROMPT[:4]
        done = await c.client.complete(short, max_tokens=4, temperature=0)
        assert done.token_ids == tuple(expected(short, 4))
        assert done.timings.local_prefill and done.timings.prefill_node == done.timings.decode_node == "d0"
        assert done.timings.prefill_attempts == 1
        assert c.events("prefill") == [] and c.events("reserve") == []
        assert c.events("decode") == [("d0", "decode", done.request_id)]
        # one token longer goes through a prefill node
        longer = await c.client.complete(PROMPT[:5], max_tokens=2, temperature=0)
        assert not longer.timings.local_prefill and longer.timings.prefill_node == "p0"
        assert longer.token_ids == tuple(expected(PROMPT[:5], 2))

    run(body, local_prefill_max_tokens=4)


@pytest.mark.timeout(30)
def test_without_prefill_nodes_the_decode_node_prefills():
    async def body(c: Cluster):
        done = await c.client.complete(PROMPT, max_tokens=3, temperature=0)
        assert done.token_ids == tuple(expected(PROMPT, 3))
        assert done.timings.local_prefill and done.timings.decode_node == "d0"

    run(body, n_prefill=0)


# ---------------------------------------------------------------- failures and retries


@pytest.mark.timeout(30)
def test_prefill_unavailable_is_retried_on_the_other_prefill_node():
    async def body(c: Cluster):
        c.prefills["p0"].fail_code = grpc.StatusCode.UNAVAILABLE
        done = await c.client.complete(PROMPT, max_tokens=5, temperature=0, request_id="rx")
        assert done.token_ids == tuple(expected(PROMPT, 5))
        assert done.timings.prefill_attempts == 2 and done.timings.prefill_node == "p1"
        # attempt 1: d0 + p0 (failed); attempt 2: a fresh reservation (d1, new node-side id) + p1
        assert c.events("prefill") == [("p0", "prefill", "rx"), ("p1", "prefill", "rx-a2")]
        assert c.events("reserve") == [("d0", "reserve", "rx"), ("d1", "reserve", "rx-a2")]
        assert done.timings.decode_node == "d1"
        await eventually(lambda: ("d0", "abort", "rx") in c.clog, what="abort of attempt 1 on d0")
        assert c.stranded() == {}
        assert await c.metric("braid_router_prefill_retries_total") == 1.0
        assert await c.metric('braid_router_prefill_failures_total{code="UNAVAILABLE"}') == 1.0

    run(body)


@pytest.mark.timeout(30)
def test_every_prefill_failing_ends_unavailable_within_the_deadline():
    async def body(c: Cluster):
        for p in c.prefills.values():
            p.fail_code = grpc.StatusCode.RESOURCE_EXHAUSTED
        c.prefills["p1"].fail_code = grpc.StatusCode.ABORTED
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as err:
            await c.client.complete(PROMPT, max_tokens=3, timeout=5)
        assert time.monotonic() - t0 < 5
        assert "p0" in err.value.details and "p1" in err.value.details
        assert "RESOURCE_EXHAUSTED" in err.value.details and "ABORTED" in err.value.details
        await eventually(lambda: len(c.events("abort", "d0")) + len(c.events("abort", "d1")) == 2, what="aborts on D")
        assert c.stranded() == {}
        # the router still serves once a prefill node recovers
        c.prefills["p0"].fail_code = None
        done = await c.client.complete(PROMPT, max_tokens=2, temperature=0)
        assert done.token_ids == tuple(expected(PROMPT, 2))

    run(body, prefill_retries=3)


@pytest.mark.timeout(30)
def test_decode_stream_aborted_before_first_token_is_retried():
    async def body(c: Cluster):
        c.decoders["d0"].abort_streams = 1
        for p in c.prefills.values():
            p.delay = 0.2  # D's abort arrives while P still works
        done = await c.client.complete(PROMPT, max_tokens=4, temperature=0, request_id="ab")
        assert done.token_ids == tuple(expected(PROMPT, 4))
        assert done.timings.prefill_attempts == 2
        assert c.events("reserve") == [("d0", "reserve", "ab"), ("d1", "reserve", "ab-a2")]
        await eventually(lambda: ("p0", "abort", "ab") in c.clog, what="abort of the running prefill")
        assert ("p0", "prefill_cancelled", "ab") in c.clog or ("p0", "abort", "ab") in c.clog
        assert c.stranded() == {}

    run(body)


@pytest.mark.timeout(30)
def test_decode_node_dying_mid_stream_fails_the_request_and_later_ones_use_the_other():
    async def body(c: Cluster):
        c.decoders["d0"].die_after = 2
        got = []
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as err:
            async for chunk in c.client.generate(PROMPT, max_tokens=8, temperature=0, timeout=10):
                got.extend(chunk.token_ids)
        assert time.monotonic() - t0 < 5
        assert got == expected(PROMPT, 2)
        assert "d0" in err.value.details
        for _ in range(3):
            done = await c.client.complete(PROMPT, max_tokens=3, temperature=0)
            assert done.token_ids == tuple(expected(PROMPT, 3)) and done.timings.decode_node == "d1"
        nodes = {n.node_id: n for n in await c.client.list_nodes()}
        assert not nodes["d0"].reachable and nodes["d1"].reachable

    run(body)


@pytest.mark.timeout(30)
def test_unreachable_node_is_skipped_after_a_load_poll():
    async def body(c: Cluster):
        await c.servers["p0"].stop(None)
        await c.servers["d0"].stop(None)

        async def unreachable():
            return {n.node_id for n in await c.client.list_nodes() if not n.reachable}

        deadline = time.monotonic() + 3
        while await unreachable() != {"p0", "d0"}:
            assert time.monotonic() < deadline, "stopped nodes not marked unreachable"
            await asyncio.sleep(0.05)
        for _ in range(3):
            done = await c.client.complete(PROMPT, max_tokens=2, temperature=0)
            assert done.token_ids == tuple(expected(PROMPT, 2))
            assert (done.timings.prefill_node, done.timings.decode_node, done.timings.prefill_attempts) == ("p1", "d1", 1)
        text = await c.scrape()
        assert 'braid_router_nodes{reachable="false",role="prefill"} 1.0' in text

    run(body)


@pytest.mark.timeout(30)
def test_client_cancel_mid_stream_aborts_both_nodes_and_frees_the_slot():
    async def body(c: Cluster):
        for d in c.decoders.values():
            d.token_delay = 0.05
        stream = c.client.generate(PROMPT, max_tokens=500, temperature=0, request_id="cx")
        got = [await stream.__anext__(), await stream.__anext__()]
        assert got[0].prompt_tokens == len(PROMPT)
        assert await c.metric("braid_router_inflight_requests") == 1.0
        await stream.aclose()
        t0 = time.monotonic()
        await eventually(
            lambda: ("p0", "abort", "cx") in c.clog and ("d0", "abort", "cx") in c.clog, timeout=1.0, what="aborts"
        )
        assert time.monotonic() - t0 < 1.0
        await eventually(lambda: not c.decoders["d0"].streams, what="D stream ended")
        assert await c.metric("braid_router_inflight_requests") == 0.0
        await eventually(lambda: c.router.orchestrator.admission.inflight == 0, what="slot released")
        assert await c.metric('braid_router_requests_total{code="CANCELLED"}') == 1.0
        # the router keeps serving
        for d in c.decoders.values():
            d.token_delay = 0.0
        assert (await c.client.complete(PROMPT, max_tokens=2, temperature=0)).token_ids == tuple(expected(PROMPT, 2))

    run(body)


@pytest.mark.timeout(30)
def test_client_deadline_shorter_than_a_stalled_prefill():
    async def body(c: Cluster):
        for p in c.prefills.values():
            p.stall = True
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await c.client.complete(PROMPT, max_tokens=3, timeout=0.5, request_id="dl")
        assert time.monotonic() - t0 < 1.5
        await eventually(
            lambda: ("p0", "abort", "dl") in c.clog and ("d0", "abort", "dl") in c.clog, timeout=1.0, what="aborts"
        )
        await eventually(lambda: ("p0", "prefill_cancelled", "dl") in c.clog, what="prefill call cancelled")
        await eventually(lambda: c.stranded() == {}, what="reservation freed")
        await eventually(lambda: c.router.orchestrator.admission.inflight == 0, what="slot released")

    run(body)


@pytest.mark.timeout(30)
def test_router_deadline_applies_when_the_client_sets_none():
    async def body(c: Cluster):
        for p in c.prefills.values():
            p.stall = True
        req = router_pb2.GenerateRequest(
            request_id="rd", token_ids=common_pb2.TokenIds(ids=PROMPT), sampling=common_pb2.SamplingParams(max_tokens=3)
        )
        t0 = time.monotonic()
        async with grpc.aio.insecure_channel(c.router.address) as ch:
            call = router_pb2_grpc.RouterStub(ch).Generate(req)  # no deadline: the router's request_timeout_s
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0
        await eventually(lambda: ("p0", "abort", "rd") in c.clog and ("d0", "abort", "rd") in c.clog, what="aborts")
        assert await c.metric('braid_router_requests_total{code="DEADLINE_EXCEEDED"}') == 1.0
        await eventually(lambda: c.stranded() == {}, what="reservation freed")

    run(body, request_timeout_s=0.5)


# ---------------------------------------------------------------- decode capacity


@pytest.mark.timeout(60)
def test_requests_wait_for_decode_room_instead_of_failing():
    """One decode node with room for one request at a time, six concurrent requests:
    each waits until the node has room, none fails or counts as a prefill retry,
    and nothing is aborted (a refused reservation leaves nothing to free)."""
    async def body(c: Cluster):
        d = c.decoders["d0"]
        d.room, d.token_delay = 1, 0.01
        prompts = [[i + 1] + PROMPT for i in range(6)]
        outs = await asyncio.gather(*(c.client.complete(p, max_tokens=5, temperature=0) for p in prompts))
        assert [o.token_ids for o in outs] == [tuple(expected(p, 5)) for p in prompts]
        assert d.peak == 1
        assert len(c.events("reserve")) > 6  # some were refused and asked again
        assert c.events("abort") == []
        assert c.stranded() == {}
        assert await c.metric("braid_router_capacity_waits_total") >= 1.0
        assert await c.metric("braid_router_prefill_retries_total") == 0.0
        assert await c.metric('braid_router_requests_total{code="OK"}') == 6.0

    run(body, n_decode=1)


@pytest.mark.timeout(60)
def test_a_full_decode_node_is_passed_over_for_one_with_room():
    async def body(c: Cluster):
        c.decoders["d0"].room = 0
        for _ in range(3):
            out = await c.client.complete(PROMPT, max_tokens=3, temperature=0)
            assert out.token_ids == tuple(expected(PROMPT, 3)) and out.timings.decode_node == "d1"
        assert await c.metric("braid_router_capacity_waits_total") == 0.0
        assert c.events("abort") == [] and c.stranded() == {}

    run(body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait_s", [0.0, 0.6])
def test_no_decode_room_within_capacity_wait_is_resource_exhausted(wait_s):
    async def body(c: Cluster):
        for d in c.decoders.values():
            d.room = 0
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted) as err:
            await c.client.complete(PROMPT, max_tokens=3, timeout=10)
        took = time.monotonic() - t0
        assert wait_s <= took < wait_s + 5
        assert "d0" in err.value.details and "d1" in err.value.details and "full" in err.value.details
        assert c.events("prefill") == [] and c.events("abort") == []
        assert await c.metric('braid_router_requests_total{code="RESOURCE_EXHAUSTED"}') == 1.0
        # room again: the next request is served
        c.decoders["d1"].room = None
        out = await c.client.complete(PROMPT, max_tokens=3, temperature=0)
        assert out.token_ids == tuple(expected(PROMPT, 3))
        assert c.stranded() == {}

    run(body, capacity_wait_s=wait_s)


# ---------------------------------------------------------------- admission and bad input


@pytest.mark.timeout(30)
def test_admission_queue_full_is_resource_exhausted():
    async def body(c: Cluster):
        for d in c.decoders.values():
            d.token_delay = 0.02
        first = c.client.generate(PROMPT, max_tokens=20, temperature=0)
        chunk = await first.__anext__()  # holds the only slot
        assert chunk.prompt_tokens == len(PROMPT)
        queued = asyncio.create_task(c.client.complete(PROMPT, max_tokens=2, temperature=0))
        await eventually(lambda: c.router.orchestrator.admission.queued == 1, what="second request queued")
        assert await c.metric("braid_router_queued_requests") == 1.0
        with pytest.raises(ResourceExhausted) as err:
            await c.client.complete(PROMPT, max_tokens=2)
        assert "overloaded" in err.value.details
        rest = [chunk] + [ch async for ch in first]
        assert [t for ch in rest for t in ch.token_ids] == expected(PROMPT, 20)
        assert (await queued).token_ids == tuple(expected(PROMPT, 2))
        assert await c.metric('braid_router_requests_total{code="RESOURCE_EXHAUSTED"}') == 1.0

    run(body, max_inflight=1, max_queued=1)


@pytest.mark.timeout(60)
def test_bad_input_is_invalid_argument_and_the_router_keeps_serving():
    async def body(c: Cluster):
        cases = [
            (dict(prompt=[]), "prompt is empty"),
            (dict(prompt=""), "prompt is empty"),
            (dict(prompt="hello"), "no tokenizer"),
            (dict(max_tokens=0), "max_tokens"),
            (dict(temperature=-1.0), "temperature"),
            (dict(temperature=float("nan")), "temperature"),
            (dict(top_p=1.5), "top_p"),
            (dict(top_p=-0.1), "top_p"),
            (dict(top_k=-2), "top_k"),
            (dict(prompt=[3] * (MAX_MODEL_LEN + 1)), "max_model_len"),
            (dict(prompt=[3, VOCAB + 5]), "out of range"),  # refused by the node, passed through
        ]
        for kwargs, reason in cases:
            prompt = kwargs.pop("prompt", PROMPT)
            with pytest.raises(InvalidArgument) as err:
                await c.client.complete(prompt, **{"max_tokens": 2, **kwargs})
            assert reason in err.value.details, (kwargs, err.value.details)
        # the node's refusal was not retried
        assert len(c.events("reserve")) == 1
        # an oversized request is refused with the reason
        with pytest.raises(InvalidArgument) as err:
            await c.client.complete("x" * (MAX_REQUEST_BYTES + 1024), max_tokens=2)
        assert "exceeds the 16 MiB limit" in err.value.details
        done = await c.client.complete(PROMPT, max_tokens=2, temperature=0)
        assert done.token_ids == tuple(expected(PROMPT, 2))
        assert await c.metric('braid_router_requests_total{code="INVALID_ARGUMENT"}') == len(cases) + 1
        assert c.stranded() == {}

    run(body)


@pytest.mark.timeout(30)
def test_a_request_id_already_running_is_refused():
    async def body(c: Cluster):
        for d in c.decoders.values():
            d.token_delay = 0.02
        first = c.client.generate(PROMPT, max_tokens=10, temperature=0, request_id="dup")
        chunk = await first.__anext__()
        with pytest.raises(AlreadyExists):
            await c.client.complete(PROMPT, max_tokens=2, request_id="dup")
        rest = [chunk] + [ch async for ch in first]
        assert [t for ch in rest for t in ch.token_ids] == expected(PROMPT, 10)
        # once finished, the id may be used again
        assert (await c.client.complete(PROMPT, max_tokens=2, temperature=0, request_id="dup")).request_id == "dup"

    run(body)


@pytest.mark.timeout(30)
def test_no_decode_nodes_is_unavailable():
    async def body(c: Cluster):
        with pytest.raises(Unavailable) as err:
            await c.client.complete(PROMPT, max_tokens=2)
        assert "no decode nodes" in err.value.details

    run(body, n_decode=0)


# ---------------------------------------------------------------- membership, ListNodes, metrics, health


@pytest.mark.timeout(30)
def test_list_nodes_reports_every_node_with_its_load():
    async def body(c: Cluster):
        await eventually(lambda: all(e.last_poll_s for e in c.router.view.entries()), what="first poll")
        nodes = await c.client.list_nodes()
        assert sorted((n.node_id, n.role) for n in nodes) == [
            ("d0", "decode"), ("d1", "decode"), ("p0", "prefill"), ("p1", "prefill"),
        ]
        for n in nodes:
            assert n.reachable and n.address == c.infos[n.node_id].address and n.model_id == "fake"
            assert n.info.capacity.max_model_len == MAX_MODEL_LEN
            if n.role == "decode":
                assert n.load.total_kv_blocks == 100

    run(body)


@pytest.mark.timeout(30)
def test_membership_changes_are_followed():
    async def body(c: Cluster):
        forgotten = []
        policy = c.router.orchestrator.prefill_policy
        real_forget = policy.forget
        policy.forget = lambda node_id: (forgotten.append(node_id), real_forget(node_id))
        c.membership.remove("p0")
        await eventually(lambda: "p0" not in c.router.view, what="p0 dropped")
        assert forgotten == ["p0"]
        for _ in range(2):
            done = await c.client.complete(PROMPT, max_tokens=2, temperature=0)
            assert done.timings.prefill_node == "p1"
        assert {n.node_id for n in await c.client.list_nodes()} == {"p1", "d0", "d1"}
        # back, restarted (new started_at_ms): a new entry, used again
        info = common_pb2.NodeInfo()
        info.CopyFrom(c.infos["p0"])
        info.started_at_ms = 2
        c.membership.add(info)
        await eventually(lambda: "p0" in c.router.view, what="p0 back")
        # a restart under the same id (and address) replaces the entry and is forgotten too
        info2 = common_pb2.NodeInfo()
        info2.CopyFrom(info)
        info2.started_at_ms = 3
        c.membership.add(info2)
        await eventually(lambda: forgotten == ["p0", "p0"], what="restart forgotten")
        assert c.router.view.get(common_pb2.ROLE_PREFILL, "p0").info.started_at_ms == 3
        used = {(await c.client.complete(PROMPT, max_tokens=1)).timings.prefill_node for _ in range(2)}
        assert used == {"p0", "p1"}

    run(body)


@pytest.mark.timeout(30)
def test_metrics_endpoint_serves_the_router_metrics():
    async def body(c: Cluster):
        await c.client.complete(PROMPT, max_tokens=4, temperature=0)
        text = await c.scrape()
        for name in (
            'braid_router_requests_total{code="OK"} 1.0',
            "braid_router_ttft_seconds_count 1.0",
            "braid_router_tpot_seconds_count 1.0",
            "braid_router_overhead_seconds_count 1.0",
            'braid_router_phase_seconds_count{phase="queue"} 1.0',
            'braid_router_phase_seconds_count{phase="prefill"} 1.0',
            'braid_router_phase_seconds_count{phase="transfer"} 1.0',
            'braid_router_phase_seconds_count{phase="decode"} 1.0',
            f"braid_router_kv_bytes_total {float(len(PROMPT) * KV_BYTES_PER_TOKEN)}",
            "braid_router_reserved_blocks ",  # its value: test_reserved_blocks_gauge_follows_the_decode_nodes
            "braid_router_inflight_requests 0.0",
            "braid_router_queued_requests 0.0",
            "braid_router_prefill_retries_total 0.0",
            "braid_router_output_tokens_total 4.0",
        ):
            assert name in text, name

    run(body)


@pytest.mark.timeout(30)
def test_reserved_blocks_gauge_follows_the_decode_nodes():
    async def body(c: Cluster):
        for p in c.prefills.values():
            p.stall = True
        task = asyncio.create_task(c.client.complete(PROMPT, max_tokens=2, timeout=10, request_id="rb"))
        deadline = time.monotonic() + 3
        while await c.metric("braid_router_reserved_blocks") != float(BLOCKS_PER_RESERVATION):
            assert time.monotonic() < deadline, "reserved blocks never reported"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: c.stranded() == {}, what="reservation aborted")
        deadline = time.monotonic() + 3
        while await c.metric("braid_router_reserved_blocks") != 0.0:
            assert time.monotonic() < deadline, "reserved blocks gauge stuck"
            await asyncio.sleep(0.05)

    run(body)


@pytest.mark.timeout(30)
def test_health_service_and_graceful_stop():
    async def body(c: Cluster):
        async with grpc.aio.insecure_channel(c.router.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "braid.v1.Router"):
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
        # a request running at stop() finishes within the grace period
        for d in c.decoders.values():
            d.token_delay = 0.01
        task = asyncio.create_task(c.client.complete(PROMPT, max_tokens=10, temperature=0))
        await eventually(lambda: c.decoders["d0"].streams, what="stream started")
        await c.router.stop(5.0)
        assert (await task).token_ids == tuple(expected(PROMPT, 10))
        with pytest.raises(Unavailable):
            await c.client.complete(PROMPT, max_tokens=2, timeout=2)

    run(body)
