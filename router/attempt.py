"""One attempt of a request: one try on a chosen (prefill P, decode D) pair.

Where it sits in a request's life (see braid.router.orchestrator): the retry book
(braid.router.retry_book) chose the pair; the attempt then runs

    remote prefill: D.Reserve -> D.Decode stream opened (its first message read
        by a task) -> P.Prefill(destination), concurrently with the stream; P skips
        sending the leading blocks D's reservation says its cache holds;
    local prefill:  D.Decode(local_prefill=True, prompt, sampling); also when D's
        reservation says its prefix cache holds all the prompt but the last
        token's block (the reservation is dropped first: no P at all);

and succeeds when D's first message (the first token) arrives, whether or not P's
reply is in yet (it is collected when D finishes, for the timings); only a request
that asked for logprobs or prompt_logprobs also waits for P's reply, which carries
the first token's and the prompt's logprobs. It fails with
AttemptFailed (a Failure for the retry book) when P's call fails, D refuses the
reservation, or D's stream ends before the first token; with RequestError when a
node says the request itself is invalid (never retried). The orchestrator then
streams D's messages (`next_message`) and ends the attempt with `collect_prefill`
or `release`.

`release` stops everything of the attempt at once and sends Abort to every node it
called, except one that answered UNAVAILABLE itself, refused the reservation, or
answered ALREADY_EXISTS (the id is someone else's there: nothing of ours to free), from a task of its own so that it completes although the
request's handler is being cancelled. Abort is idempotent on the nodes, so an extra
one is harmless. Every outgoing call has a deadline: Reserve min(remaining,
node_rpc_timeout_s), Abort min(2 s, node_rpc_timeout_s), Prefill and Decode the
time remaining.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from braid.proto import common_pb2, nodes_pb2
from braid.router.nodes import NodeEntry, NodeView
from braid.router.retry_book import Deadline, Failure

log = logging.getLogger(__name__)

Code = grpc.StatusCode
ABORT_TIMEOUT_S = 2.0
"""Deadline of an Abort call (capped by node_rpc_timeout_s)."""
PREFILL_REPLY_GRACE_S = 2.0
"""After D finished streaming, how long to wait for P's reply (its timings)."""
EOF = object()
"""D's stream ended without an error."""


class RequestError(Exception):
    """Ends a request with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class AttemptFailed(Exception):
    """A node failed the attempt; the retry book decides what follows."""

    def __init__(self, failure: Failure):
        super().__init__(str(failure))
        self.failure = failure


@dataclass(frozen=True)
class RequestInput:
    """What an attempt sends to the nodes."""

    request_id: str
    """Client-facing id (attempts use their own node_request_id on the nodes)."""
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    deadline: Deadline


class Aborts:
    """Abort calls sent in the background, one task per batch; one per router."""

    def __init__(self, node_rpc_timeout_s: float):
        self.timeout = min(ABORT_TIMEOUT_S, node_rpc_timeout_s)
        self._background: set[asyncio.Task] = set()

    def spawn(self, targets: list[tuple[NodeEntry, str]], reason: str) -> None:
        # A task of its own: it runs to the end even when the request's handler is being cancelled.
        task = asyncio.create_task(self._abort_all(targets, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_all(self, targets: list[tuple[NodeEntry, str]], reason: str) -> None:
        async def abort(node: NodeEntry, request_id: str) -> None:
            try:
                await node.stub.Abort(common_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=self.timeout)
            except grpc.RpcError as e:
                log.info("router: abort of %s on %s failed: %s", request_id, node.node_id, e.code().name)
            except Exception as e:  # a closed channel, for one
                log.info("router: abort of %s on %s failed: %r", request_id, node.node_id, e)

        await asyncio.gather(*(abort(n, rid) for n, rid in targets))

    async def close(self, timeout: float = ABORT_TIMEOUT_S) -> None:
        """Wait (bounded) for aborts still being sent."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)


@dataclass(frozen=True)
class NodeCalls:
    """What every attempt of one router shares: the node view and the call settings."""

    view: NodeView
    aborts: Aborts
    reserve_lease_s: float
    node_rpc_timeout_s: float


class DecodeReader:
    """Reads D's Decode stream: `get()` is its next item, a DecodeResponse, then EOF or the RpcError.

    Each get() reads the call itself, in the awaiting task: no reader task and queue in
    between, which cost a task switch and a future per message relayed (the attempt
    wraps the first get() in a task of its own, to race it against P's reply). So D's
    messages wait in gRPC's flow control, not in an unbounded queue, while the client
    is slow."""

    def __init__(self, call):
        self.call = call

    async def get(self):
        try:
            msg = await self.call.read()
        except grpc.RpcError as e:
            return e
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a closed channel, say: the stream ended, nobody waits forever
            log.info("router: decode stream broke: %r", e)
            return EOF
        return EOF if msg is grpc.aio.EOF else msg

    def cancel(self) -> None:
        self.call.cancel()


@dataclass(eq=False)
class Attempt:
    """One try of a request on (prefill, decode); its state as it goes."""

    number: int
    node_request_id: str
    decode: NodeEntry
    prefill: NodeEntry | None
    """None: local prefill on the decode node."""
    calls: NodeCalls
    decode_called: bool = False
    reader: DecodeReader | None = None
    prefill_call: object = None
    """The grpc.aio call of P.Prefill; prefill_task awaits it."""
    prefill_task: asyncio.Future | None = None
    pending: list[asyncio.Task] = field(default_factory=list)
    first: nodes_pb2.DecodeResponse | None = None
    prefill_resp: nodes_pb2.PrefillResponse | None = None
    closed: bool = False

    # -- until the first token -------------------------------------------------------

    async def start(self, req: RequestInput) -> None:
        """Run the attempt until D's first message; AttemptFailed when a node fails it."""
        self.decode_called = True
        if self.prefill is None:
            await self._start_local(req)
            return
        reserved = await self._reserve(req)
        if fully_cached(reserved.destination) and not req.sampling.HasField("prompt_logprobs"):
            # D holds every block of the prompt but the last token's: it computes that
            # block itself, faster than a prefill node could send it; no P at all (unless the
            # prompt's logprobs are asked: the prompt is computed whole then, P does it under PCP)
            await self._drop_reservation()
            self.prefill = None
            await self._start_local(req)
            return
        # with logprobs asked, D reads the sampling to mark the first token (P's) in its logprobs
        sampling = req.sampling if req.sampling.HasField("logprobs") else None
        self.reader = DecodeReader(self._call(
            self.decode, "Decode", nodes_pb2.DecodeRequest(request_id=self.node_request_id, sampling=sampling),
            timeout=req.deadline.remaining(),
        ))
        self.prefill_call = self._call(
            self.prefill, "Prefill",
            nodes_pb2.PrefillRequest(
                request_id=self.node_request_id, token_ids=req.prompt,
                sampling=req.sampling, destination=reserved.destination,
            ),
            timeout=req.deadline.remaining(),
        )
        self.prefill_task = asyncio.ensure_future(self.prefill_call)
        self.prefill_task.add_done_callback(_retrieve)  # it may end after the attempt was given up
        first = asyncio.create_task(self.reader.get())
        self.pending.append(first)
        await asyncio.wait((self.prefill_task, first), return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            await self._await_first_after_prefill(first, req.deadline)
        self.first = self._first(first.result())
        if wants_logprobs(req.sampling) and self.prefill_resp is None:
            await self._await_prefill_reply(req.deadline)

    async def _await_prefill_reply(self, deadline: Deadline) -> None:
        """The first token's and the prompt's logprobs are in P's reply: a request that
        asked for them (and only such a request) waits for it before its first chunk.
        P replies once D has all the KV, which D's first message says it has."""
        done, _ = await asyncio.wait((self.prefill_task,), timeout=deadline.rpc_timeout(self.calls.node_rpc_timeout_s))
        if not done:
            raise AttemptFailed(Failure(self.prefill, "Prefill", "DEADLINE_EXCEEDED",
                                        "no prefill reply (with the logprobs) after the first token"))
        exc = None if self.prefill_task.cancelled() else self.prefill_task.exception()
        if exc is not None or self.prefill_task.cancelled():
            raise self._node_failed(self.prefill, "Prefill", exc or asyncio.CancelledError()) from None
        self.prefill_resp = self.prefill_task.result()

    async def _start_local(self, req: RequestInput) -> None:
        call = self._call(
            self.decode, "Decode",
            nodes_pb2.DecodeRequest(
                request_id=self.node_request_id, local_prefill=True,
                prompt_token_ids=req.prompt, sampling=req.sampling,
            ),
            timeout=req.deadline.remaining(),
        )
        self.reader = DecodeReader(call)
        self.first = self._first(await self.reader.get())

    async def _drop_reservation(self) -> None:
        """Free the reservation on D (its cached blocks stay in D's cache) before the
        same request id is prefilled there locally."""
        try:
            await self._call(self.decode, "Abort",
                             common_pb2.AbortRequest(request_id=self.node_request_id, reason="fully cached on decode"),
                             timeout=self.calls.aborts.timeout)
        except grpc.RpcError as e:
            raise self._node_failed(self.decode, "Abort", e) from None

    async def _reserve(self, req: RequestInput) -> nodes_pb2.ReserveResponse:
        try:
            return await self._call(
                self.decode, "Reserve",
                nodes_pb2.ReserveRequest(
                    request_id=self.node_request_id, prompt_token_ids=req.prompt,
                    sampling=req.sampling, lease_s=self.calls.reserve_lease_s,
                ),
                timeout=req.deadline.rpc_timeout(self.calls.node_rpc_timeout_s),
            )
        except grpc.RpcError as e:
            raise self._node_failed(self.decode, "Reserve", e) from None

    @staticmethod
    def _call(node: NodeEntry, call: str, request, **kwargs):
        """Start `call` on `node`. Its channel may already be closed (the view dropped the
        node while this attempt awaited another call): the node is gone, UNAVAILABLE."""
        try:
            return getattr(node.stub, call)(request, **kwargs)
        except grpc.aio.UsageError as e:
            raise AttemptFailed(Failure(node, call, "UNAVAILABLE", f"the node left the cluster ({e})")) from None

    async def _await_first_after_prefill(self, first: asyncio.Task, deadline: Deadline) -> None:
        """P replied before D's first message: take P's reply, then wait for D."""
        exc = self.prefill_task.exception()
        if exc is not None:
            raise self._node_failed(self.prefill, "Prefill", exc) from None
        self.prefill_resp = self.prefill_task.result()
        # P returns once D has all the KV, so D's first message is due now.
        done, _ = await asyncio.wait((first,), timeout=deadline.rpc_timeout(self.calls.node_rpc_timeout_s))
        if not done:
            raise AttemptFailed(Failure(self.decode, "Decode", "DEADLINE_EXCEEDED",
                                        "no first token after the prefill completed"))

    def _first(self, item) -> nodes_pb2.DecodeResponse:
        """D's first stream item as a message, or the attempt's failure."""
        if isinstance(item, nodes_pb2.DecodeResponse):
            return item
        if item is EOF:
            raise AttemptFailed(Failure(self.decode, "Decode", "UNKNOWN", "stream ended before the first token"))
        if item.code() == Code.ABORTED:
            # KV transfer failed or the lease expired: D itself is fine; try another P if there is one.
            raise AttemptFailed(Failure(self.decode, "Decode", "ABORTED", item.details() or "", exclude=False))
        raise self._node_failed(self.decode, "Decode", item)

    def _node_failed(self, node: NodeEntry, call: str, exc: BaseException) -> Exception:
        """A node call's error: RequestError for the client's own fault, else AttemptFailed."""
        if isinstance(exc, grpc.RpcError):
            code, details = exc.code(), exc.details() or ""
        else:
            code, details = Code.UNKNOWN, repr(exc)
        if code == Code.INVALID_ARGUMENT:
            return RequestError(code, details)
        if code == Code.UNAVAILABLE:
            self.calls.view.mark_unreachable(node, f"{call}: {details}")
        return AttemptFailed(Failure(node, call, code.name, details))

    # -- streaming and the end ---------------------------------------------------------

    def fill_logprobs(self, out, msg: nodes_pb2.DecodeResponse, req: RequestInput) -> None:
        """Copy what the request asked for of D's message `msg` into the client's chunk `out`:
        one TokenLogprobs per token (a remote prefill's first token: P's, which sampled it),
        and on the first chunk the prompt's logprobs (P's or, after a local prefill, D's)
        with the prompt's ids."""
        s = req.sampling
        first = msg is self.first
        remote = first and self.prefill is not None and self.prefill_resp is not None
        if s.HasField("logprobs"):
            lps = list(msg.logprobs)
            if remote and lps and self.prefill_resp.HasField("first_logprobs"):
                lps[0] = self.prefill_resp.first_logprobs
            out.logprobs.extend(lps)
        if first and s.HasField("prompt_logprobs"):
            out.prompt_logprobs.extend(self.prefill_resp.prompt_logprobs if remote else msg.prompt_logprobs)
            out.prompt_token_ids.extend(req.prompt)

    async def next_message(self, req: RequestInput, num_tokens: int) -> nodes_pb2.DecodeResponse:
        """D's next message; RequestError (the attempt released) when D fails or ends
        the stream without finishing."""
        item = await self.reader.get()
        if isinstance(item, nodes_pb2.DecodeResponse):
            return item
        node = self.decode
        if item is EOF:
            why = "ended the stream without finishing"
        else:
            why = f"{item.code().name}: {item.details()}"
            if item.code() == Code.UNAVAILABLE:
                self.calls.view.mark_unreachable(node, f"Decode: {item.details()}")
            if item.code() == Code.DEADLINE_EXCEEDED and req.deadline.expired():
                self.release("deadline")
                raise RequestError(Code.DEADLINE_EXCEEDED, f"deadline passed after {num_tokens} tokens")
        self.release(f"decode node failed: {why}")
        raise RequestError(Code.UNAVAILABLE, f"decode node {node.node_id} failed after {num_tokens} tokens: {why}")

    def cached_prompt_tokens(self) -> int:
        """Prompt tokens whose KV came from a prefix cache, for the client's usage: the
        prefill node's own hit (its reply) after a remote prefill, the decode node's (its
        first message) after a local one; 0 while P's reply is not in."""
        if self.prefill is None:
            return self.first.cached_tokens if self.first is not None else 0
        return self.prefill_resp.cached_tokens if self.prefill_resp is not None else 0

    async def collect_prefill(self, req: RequestInput) -> None:
        """D finished: wait briefly for P's reply (its timings), then close the attempt;
        a reply still missing is cancelled and P told to abort."""
        task = self.prefill_task
        if task is not None and self.prefill_resp is None:
            done, _ = await asyncio.wait((task,), timeout=min(PREFILL_REPLY_GRACE_S, req.deadline.remaining()))
            if done and task.exception() is None:
                self.prefill_resp = task.result()
            elif done:
                log.warning("router: request %s: prefill reply failed after decode finished: %r",
                            req.request_id, task.exception())
            else:
                self.prefill_call.cancel()
                task.cancel()
                self.calls.aborts.spawn([(self.prefill, self.node_request_id)], "prefill reply late")
        self.closed = True

    def release(self, reason: str, failed: Failure | None = None) -> None:
        """Stop everything of the attempt now and abort it on its nodes in the background (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for t in self.pending:
            t.cancel()
        if self.reader is not None:
            self.reader.cancel()
        task = self.prefill_task
        if task is not None and not task.done():
            self.prefill_call.cancel()
            task.cancel()

        def down(node: NodeEntry) -> bool:
            # it said UNAVAILABLE itself, or refused the reservation, or refused the id as one it
            # already holds (an Abort of that id would stop its holder): nothing of ours to abort there
            return failed is not None and failed.node is node and (
                failed.code in ("UNAVAILABLE", "ALREADY_EXISTS") or failed.no_room)

        targets = []
        if self.decode_called and not down(self.decode):
            targets.append((self.decode, self.node_request_id))
        if task is not None and not down(self.prefill):
            targets.append((self.prefill, self.node_request_id))
        if targets:
            self.calls.aborts.spawn(targets, reason)


def fully_cached(dest: common_pb2.KVDestination) -> bool:
    """Whether a decode node's reservation says it holds the whole prompt but the
    block of its last token (which is always computed: its logits give the first token)."""
    block = dest.layout.block_size
    return dest.cached_blocks > 0 and block > 0 and dest.num_tokens - dest.cached_blocks * block <= block


def wants_logprobs(sampling: common_pb2.SamplingParams) -> bool:
    return sampling.HasField("logprobs") or sampling.HasField("prompt_logprobs")


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
