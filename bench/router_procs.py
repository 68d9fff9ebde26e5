"""The processes of bench/router.py, each started as `python bench/router_procs.py ROLE ...`:

    nodes   a fake prefill node and a fake decode node (two gRPC servers, one event loop)
            that answer at once: P "sends" the KV by completing D's reservation in memory,
            D then streams 16 tokens (one message each, as a real decode node sends one
            per step); tokens are token_at(prompt, i), so a client can check them
    relay   the floor: a bare grpc.aio servicer making the router's node calls and relaying
            D's messages, with none of the router's own work (bench/router.py --floor)
    router  the real router (braid.router.server.start_router) over a StaticMembership
            naming the fake nodes, with a tokenizer (text deltas, as in production);
            BRAID_ROUTER_PROFILE=PATH runs it under cProfile and writes the stats at stop
    load    a load generator against the router's gRPC front (raw stub), its HTTP front
            (OpenAI /v1/completions, streaming) or the nodes directly (Reserve, Decode
            stream, Prefill: the calls the router makes), closed loop at a concurrency
            or open loop (Poisson) at a rate, for a bounded window

Each prints one JSON line on stdout when ready (addresses; for `load`, "start" when
its measuring window opens, "end" when it closes, then the results) and stops when
its stdin closes or on SIGTERM, so a parent that dies takes its children with it.
Everything binds 127.0.0.1 port 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time

import grpc

from braid.proto import common_pb2, nodes_pb2, nodes_pb2_grpc, router_pb2, router_pb2_grpc

VOCAB = 384
NUM_TOKENS = int(os.environ.get("BRAID_BENCH_TOKENS", "16"))
"""Tokens per stream (bench/router.py --tokens sets it for every child)."""
PROMPT_LEN = 8
RPC_TIMEOUT_S = 10.0


def token_at(prompt, i: int) -> int:
    """The i-th output token of the fake nodes for a prompt (the same rule as tests/test_router.py)."""
    return (sum(prompt) + 31 * i) % (VOCAB - 4) + 2


def expected(prompt) -> list[int]:
    return [token_at(prompt, i) for i in range(NUM_TOKENS)]


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stop_event() -> asyncio.Event:
    """Set on SIGTERM/SIGINT or when stdin closes (the parent went away)."""
    loop = asyncio.get_running_loop()
    ev = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ev.set)

    fd = sys.stdin.fileno()

    def on_stdin():  # the loop's own reader: no thread left blocked in read() at exit
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            ev.set()

    loop.add_reader(fd, on_stdin)
    return ev


# ---------------------------------------------------------------- fake nodes



async def open_pair(dstub, pstub, rid: str, prompt, sampling):
    """The router's three node calls, made directly: D.Reserve, then D's Decode stream
    opened and P.Prefill to the reserved destination running beside it; returns
    (the stream, the Prefill future)."""
    reserved = await dstub.Reserve(nodes_pb2.ReserveRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, lease_s=RPC_TIMEOUT_S), timeout=RPC_TIMEOUT_S)
    stream = dstub.Decode(nodes_pb2.DecodeRequest(request_id=rid), timeout=RPC_TIMEOUT_S)
    prefill = asyncio.ensure_future(pstub.Prefill(nodes_pb2.PrefillRequest(
        request_id=rid, token_ids=prompt, sampling=sampling, destination=reserved.destination),
        timeout=RPC_TIMEOUT_S))
    return stream, prefill

class FakeDecode(nodes_pb2_grpc.DecodeNodeServicer):
    def __init__(self):
        self.kv: dict[str, tuple[list[int], asyncio.Future]] = {}

    async def Reserve(self, request, context):
        fut = asyncio.get_running_loop().create_future()
        self.kv[request.request_id] = (list(request.prompt_token_ids), fut)
        return nodes_pb2.ReserveResponse(destination=common_pb2.KVDestination(
            decode_node_id="d0", block_ids=[0], transport="tcp", num_tokens=len(request.prompt_token_ids)))

    async def Decode(self, request, context):
        entry = self.kv.get(request.request_id)
        if entry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no reservation")
        prompt, fut = entry
        try:
            await asyncio.wait_for(fut, RPC_TIMEOUT_S)
        finally:
            self.kv.pop(request.request_id, None)
        for i in range(NUM_TOKENS):
            last = i == NUM_TOKENS - 1
            await context.write(nodes_pb2.DecodeResponse(
                token_ids=[token_at(prompt, i)], finished=last,
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED))

    def deliver(self, rid: str) -> bool:
        entry = self.kv.get(rid)
        if entry is None or entry[1].done():
            return False
        entry[1].set_result(True)
        return True

    async def Abort(self, request, context):
        entry = self.kv.pop(request.request_id, None)
        if entry is not None and not entry[1].done():
            entry[1].cancel()
        return common_pb2.AbortResponse(found=entry is not None)

    async def GetLoad(self, request, context):
        return common_pb2.Load(free_kv_blocks=100, total_kv_blocks=100)


class FakePrefill(nodes_pb2_grpc.PrefillNodeServicer):
    def __init__(self, decode: FakeDecode):
        self.decode = decode

    async def Prefill(self, request, context):
        if not self.decode.deliver(request.request_id):
            await context.abort(grpc.StatusCode.ABORTED, "KV transfer failed: no reservation")
        return nodes_pb2.PrefillResponse(first_token=token_at(request.token_ids, 0))

    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=False)

    async def GetLoad(self, request, context):
        return common_pb2.Load()


async def serve_nodes(args) -> None:
    stop = stop_event()
    decode = FakeDecode()
    servers, addrs = [], {}
    for name, servicer, add in (("decode", decode, nodes_pb2_grpc.add_DecodeNodeServicer_to_server),
                                ("prefill", FakePrefill(decode), nodes_pb2_grpc.add_PrefillNodeServicer_to_server)):
        server = grpc.aio.server()
        add(servicer, server)
        addrs[name] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        servers.append(server)
    say(addrs)
    await stop.wait()
    await asyncio.gather(*(s.stop(None) for s in servers))


# ---------------------------------------------------------------- the router


def node_infos(addrs: dict) -> list:
    cap = common_pb2.Capacity(num_kv_blocks=100, tokens_per_block=16, max_num_seqs=256, max_model_len=4096)
    return [common_pb2.NodeInfo(node_id=f"{role[0]}0", role=r, address=addrs[role], model_id="fake", capacity=cap,
                                started_at_ms=1)
            for role, r in (("prefill", common_pb2.ROLE_PREFILL), ("decode", common_pb2.ROLE_DECODE))]


async def serve_router(args) -> None:
    from braid.discovery.static import StaticMembership
    from braid.router.config import RouterConfig
    from braid.router.server import start_router

    stop = stop_event()
    profile_path = os.environ.get("BRAID_ROUTER_PROFILE")
    prof = None
    if profile_path:
        import cProfile

        prof = cProfile.Profile()
    rc = RouterConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0, node_rpc_timeout_s=RPC_TIMEOUT_S)
    handle = await start_router(rc, StaticMembership(node_infos(json.loads(args.nodes))), args.tokenizer)
    say({"grpc": handle.address, "http": handle.http_address, "metrics": handle.metrics_address})
    if prof is not None:
        prof.enable()
    await stop.wait()
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile_path)
    await handle.stop(1.0)


class Relay(router_pb2_grpc.RouterServicer):
    """The floor: the router's node calls and relay with nothing else (no admission, routing,
    retries, deadlines beyond the calls', detokenizer, metrics or logging)."""

    def __init__(self, addrs: dict):
        self.channels = [grpc.aio.insecure_channel(addrs[r]) for r in ("decode", "prefill")]
        self.dstub = nodes_pb2_grpc.DecodeNodeStub(self.channels[0])
        self.pstub = nodes_pb2_grpc.PrefillNodeStub(self.channels[1])
        self.serial = 0

    async def Generate(self, request, context):
        self.serial += 1
        rid, prompt, sampling = f"relay-{self.serial}", request.token_ids.ids, request.sampling
        stream, prefill = await open_pair(self.dstub, self.pstub, rid, prompt, sampling)
        async for msg in stream:
            await context.write(router_pb2.GenerateResponse(
                token_ids=msg.token_ids, finished=msg.finished, finish_reason=msg.finish_reason))
        await prefill


async def serve_relay(args) -> None:
    stop = stop_event()
    relay = Relay(json.loads(args.nodes))
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(relay, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    say({"grpc": f"127.0.0.1:{port}"})
    await stop.wait()
    await server.stop(None)
    for ch in relay.channels:
        await ch.close()


# ---------------------------------------------------------------- the load


class Stats:
    def __init__(self):
        self.e2e: list[float] = []
        self.ttft: list[float] = []
        self.ok = 0
        self.bad = 0
        self.errors: list[str] = []
        self.record = False
        self.sample = None
        """[prompt, what came back (ids, or the text for HTTP)] of one counted request, for an outside check."""
        self.chunks = 0
        """Messages (gRPC) or SSE events (HTTP) the requests counted in `ok` received."""

    def add(self, sent: float, first: float | None, end: float, good: bool, error: str | None = None,
            chunks: int = 0) -> None:
        if not self.record:
            return
        if error is not None or not good or first is None:
            self.bad += 1
            if len(self.errors) < 5:
                self.errors.append(error or "wrong tokens")
            return
        self.ok += 1
        self.chunks += chunks
        self.e2e.append(end - sent)
        self.ttft.append(first - sent)


class Target:
    """One way of running a request: `await target.one(prompt, rid, stats)`."""

    def __init__(self, args):
        self.args = args
        self.serial = 0
        self.last = None
        """[prompt, received] of the latest request."""

    async def open(self):
        a = self.args
        if a.target == "http":
            import aiohttp

            from braid.tokenizer import Tokenizer

            self.tok = Tokenizer(a.tokenizer)
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT_S))
            self.url = f"http://{a.addr}/v1/completions"
        elif a.target == "grpc":
            self.channel = grpc.aio.insecure_channel(a.addr)
            self.stub = router_pb2_grpc.RouterStub(self.channel)
        else:
            nodes = json.loads(a.addr)
            self.channels = [grpc.aio.insecure_channel(nodes[r]) for r in ("decode", "prefill")]
            self.dstub = nodes_pb2_grpc.DecodeNodeStub(self.channels[0])
            self.pstub = nodes_pb2_grpc.PrefillNodeStub(self.channels[1])
        return self

    async def close(self):
        if self.args.target == "http":
            await self.session.close()
        else:
            for ch in getattr(self, "channels", None) or [self.channel]:
                await ch.close()

    async def one(self, prompt: list[int], stats: Stats) -> None:
        sent, first, error, good, chunks = time.perf_counter(), None, None, False, 0
        try:
            run = {"grpc": self._grpc, "http": self._http, "direct": self._direct}[self.args.target]
            first, good, chunks = await run(prompt, sent)
        except Exception as e:  # noqa: BLE001 - counted, the load goes on
            error = f"{type(e).__name__}: {e}"[:200]
        stats.add(sent, first, time.perf_counter(), good, error, chunks)
        if stats.record and good and stats.sample is None:
            stats.sample = self.last

    async def _grpc(self, prompt, sent):
        req = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt),
                                         sampling=common_pb2.SamplingParams(max_tokens=NUM_TOKENS))
        ids, first, finished, chunks = [], None, False, 0
        async for resp in self.stub.Generate(req, timeout=RPC_TIMEOUT_S):
            if first is None and resp.token_ids:
                first = time.perf_counter()
            ids.extend(resp.token_ids)
            finished, chunks = resp.finished, chunks + 1
        self.last = [list(prompt), ids]
        return first, finished and ids == expected(prompt), chunks

    async def _direct(self, prompt, sent):
        self.serial += 1
        rid = f"direct-{os.getpid()}-{self.serial}"
        sampling = common_pb2.SamplingParams(max_tokens=NUM_TOKENS)
        stream, prefill = await open_pair(self.dstub, self.pstub, rid, prompt, sampling)
        ids, first, finished, chunks = [], None, False, 0
        async for resp in stream:
            if first is None:
                first = time.perf_counter()
            ids.extend(resp.token_ids)
            finished, chunks = resp.finished, chunks + 1
        await prefill
        self.last = [list(prompt), ids]
        return first, finished and ids == expected(prompt), chunks

    async def _http(self, prompt, sent):
        body = {"model": "fake", "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        text, first, tokens, done, chunks = [], None, None, False, 0
        async with self.session.post(self.url, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:100]}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                event, chunks = json.loads(line[6:]), chunks + 1
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for c in event.get("choices", ()):
                    if first is None and c.get("text"):
                        first = time.perf_counter()
                    text.append(c.get("text", ""))
        self.last = [list(prompt), "".join(text)]
        good = done and tokens == NUM_TOKENS and "".join(text) == self.tok.decode(expected(prompt))
        return first, good, chunks


async def closed_loop(target: Target, stats: Stats, concurrency: int, until: float, rng: random.Random) -> None:
    async def worker():
        while time.perf_counter() < until:
            await target.one([rng.randrange(2, VOCAB - 4) for _ in range(PROMPT_LEN)], stats)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def open_loop(target: Target, stats: Stats, rate: float, until: float, rng: random.Random) -> None:
    """Poisson arrivals at `rate`; at most MAX_OUTSTANDING in flight (beyond: counted as dropped)."""
    tasks: set[asyncio.Task] = set()
    nxt = time.perf_counter()
    while nxt < until:
        nxt += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        if len(tasks) >= MAX_OUTSTANDING:
            stats.add(0, None, 0, False, "dropped: too many outstanding")
            continue
        t = asyncio.create_task(target.one([rng.randrange(2, VOCAB - 4) for _ in range(PROMPT_LEN)], stats))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=RPC_TIMEOUT_S + 1)


MAX_OUTSTANDING = 2000


async def run_load(args) -> None:
    stop = stop_event()
    target = await Target(args).open()
    stats, rng = Stats(), random.Random(args.seed)
    try:
        t0 = time.perf_counter()
        start, end = t0 + args.warmup, t0 + args.warmup + args.duration

        async def window():
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            stats.record = True
            say({"event": "start"})
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            stats.record = False
            say({"event": "end"})

        gen = closed_loop(target, stats, args.concurrency, end, rng) if args.rate == 0 else \
            open_loop(target, stats, args.rate, end, rng)
        run = asyncio.gather(window(), gen)
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait((run, waiter), return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        waiter.cancel()
    finally:
        await target.close()
    say({"event": "result", "ok": stats.ok, "bad": stats.bad, "errors": stats.errors, "window_s": args.duration,
         "chunks": stats.chunks, "sample": stats.sample, "e2e": stats.e2e, "ttft": stats.ttft})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=("nodes", "router", "relay", "load"))
    p.add_argument("--nodes", help="router: JSON {prefill: addr, decode: addr}")
    p.add_argument("--tokenizer", help="router and HTTP load: a folder with tokenizer.json")
    p.add_argument("--target", choices=("grpc", "http", "direct"))
    p.add_argument("--addr", help="load: the router's address, or the nodes' JSON for direct")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0, help="load: Poisson arrivals per s (0 = closed loop)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run = {"nodes": serve_nodes, "router": serve_router, "relay": serve_relay, "load": run_load}[args.role]
    if args.role == "router" and os.environ.get("BRAID_BENCH_UVLOOP"):
        import uvloop  # optional: installed beside braid, never required

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
