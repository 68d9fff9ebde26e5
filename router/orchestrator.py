"""One request's life across a prefill node P and a decode node D.

    ARRIVED --checks (prompt, sampling, id not already running)--> ADMITTING
        (queue full: RESOURCE_EXHAUSTED; deadline while queued: DEADLINE_EXCEEDED)
    ADMITTING --slot--> ROUTING: tokenize; the retry book picks D among reachable
        decode nodes whose max_model_len fits the prompt; local prefill when the
        prompt has at most local_prefill_max_tokens tokens or no prefill node is
        reachable, else it picks P.
    ATTEMPT n (braid.router.attempt): remote, D.Reserve -> D.Decode stream ->
        P.Prefill concurrently with the stream; local, D.Decode(local_prefill=True).
        It succeeds on D's first message (the first token).
    ATTEMPT n fails: P's call fails (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED,
        RESOURCE_EXHAUSTED, ...), D refuses the reservation, or D's stream ends
        before the first token. The attempt is aborted on its nodes in the
        background and the failure goes to the retry book
        (braid.router.retry_book), which excludes the node at fault (for D's
        stream ending ABORTED, a failed transfer or an expired lease, D stays
        eligible and the attempt's P is only avoided); ATTEMPT n+1 starts on a
        fresh reservation, up to 1 + prefill_retries attempts within the
        deadline. Then UNAVAILABLE (RESOURCE_EXHAUSTED when every node said it
        was full) naming each failure.
    NO ROOM: D refusing a reservation with RESOURCE_EXHAUSTED (no free KV
        blocks now) is not a failed attempt: nothing was created on D (no Abort
        is sent) and the next attempt tries another D. When every D the prompt
        fits has refused, the request waits, holding its admission slot, and asks
        again with backoff (50 ms doubling to 1 s) for at most capacity_wait_s
        within its deadline; then RESOURCE_EXHAUSTED naming the nodes. When every
        prefill node has failed the request it fails: no silent recompute on D.
        INVALID_ARGUMENT from a node goes to the client as is, never retried.
    STREAMING: each DecodeResponse becomes a GenerateResponse (prompt_tokens on
        the first, finished + finish_reason + Timings + cached_prompt_tokens on
        the last) -> DONE.
    STREAMING fails (D errors or ends without finishing): P and D are aborted;
        the client gets UNAVAILABLE (DEADLINE_EXCEEDED once the deadline passed).
    Client cancel or deadline, in any state: the current attempt's calls are
        cancelled and Abort goes to its P and D from a task of its own (so it
        completes although the handler is being cancelled); then the
        cancellation propagates.
    Every exit after ADMITTING releases the admission slot.

This module ties the pieces together: admission, the request's deadline, the
loop of attempts driven by the retry book, streaming to the client, and metrics.
Node-side request ids are minted per attempt (retry_book.node_request_id:
"<client id>-<router instance id>-<serial>"), so two routers serving the same
client id, or a retry of it, never share an id on a node; the client's request
id (or the uuid the router assigned) is what the client sees and what is logged.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass

import grpc

from braid.client.sampling import check_sampling
from braid.proto import common_pb2, router_pb2
from braid.router.admission import AdmissionControl, Overloaded
from braid.router.attempt import ABORT_TIMEOUT_S, Aborts, Attempt, AttemptFailed, NodeCalls, RequestError, RequestInput
from braid.router.chat import chat_prompt_ids, check_chat
from braid.router.config import RouterConfig
from braid.router.metrics import RouterMetrics
from braid.router.nodes import NodeEntry, NodeView
from braid.router.policies import DECODE, NoNodes, Policy, RouteRequest
from braid.router.retry_book import Deadline, GiveUp, Pair, RetryBook, node_request_id
from braid.router.stop import StopStrings, check_stop, ids_through
from braid.tokenizer import IncrementalDetokenizer

__all__ = ["MAX_REQUEST_BYTES", "Deadline", "Orchestrator", "RequestError"]

MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Largest request served (a 1M-token prompt is about 5 MiB of ids)."""

log = logging.getLogger(__name__)

Code = grpc.StatusCode
TOKENIZE_INLINE_CHARS = 8192
"""Longer texts are tokenized in a worker thread, off the event loop."""


@dataclass(frozen=True)
class _Request(RequestInput):
    """What the attempts and the streaming phase need to know about the request."""

    route: RouteRequest | None = None
    arrived_s: float = 0.0
    queue_s: float = 0.0


class Orchestrator:
    """Runs Generate requests; one instance per router, on its event loop."""

    def __init__(
        self,
        config: RouterConfig,
        view: NodeView,
        prefill_policy: Policy,
        decode_policy: Policy,
        admission: AdmissionControl,
        metrics: RouterMetrics,
        tokenizer=None,
    ):
        self.config = config
        self.view = view
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.admission = admission
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.aborts = Aborts(config.node_rpc_timeout_s)
        self.calls = NodeCalls(view, self.aborts, config.reserve_lease_s, config.node_rpc_timeout_s)
        self._running: set[str] = set()
        """Client-facing ids of the requests admitted or queued (a second one with the same id is refused)."""
        self.draining = False
        """Set by RouterHandle.drain: new Generate calls are refused (UNAVAILABLE), running ones finish."""
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.instance_id = uuid.uuid4().hex[:16]
        """This router's part of every node-side request id (64 random bits)."""
        self._serials = itertools.count(1)

    # -- the RPC -----------------------------------------------------------------

    async def generate(self, request: router_pb2.GenerateRequest, context) -> None:
        """Serve one Generate call, writing responses to `context`; errors end it with a status."""
        code = Code.OK
        self._calls += 1
        self._idle.clear()
        try:
            if self.draining:  # a router being stopped: the client retries on another replica
                raise RequestError(Code.UNAVAILABLE, "router is draining (shutting down); retry on another router")
            await self._generate(request, context)
        except RequestError as e:
            code = e.code
            await context.abort(e.code, e.details)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = Code.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0.05 else Code.CANCELLED
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            code = Code.INTERNAL
            log.exception("router: request failed")
            await context.abort(Code.INTERNAL, f"router error: {type(e).__name__}: {e}")
        finally:
            self.metrics.request_done(code.name)
            self._calls -= 1
            if self._calls == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to `timeout` s for the running ones to end;
        True when none is left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _generate(self, request: router_pb2.GenerateRequest, context) -> None:
        arrived = time.monotonic()
        client_remaining = context.time_remaining()
        deadline = Deadline(client_remaining if client_remaining is not None else self.config.request_timeout_s)
        self._check(request)
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._running:
            raise RequestError(Code.ALREADY_EXISTS, f"request id {request_id!r} is already running")
        self._running.add(request_id)
        try:
            await self._admit(deadline)
        except BaseException:
            self._running.discard(request_id)
            raise
        try:
            queue_s = time.monotonic() - arrived
            self.metrics.phase_of["queue"].observe(queue_s)
            prompt = await self._prompt_ids(request)
            req = _Request(
                request_id=request_id,
                prompt=prompt,
                sampling=request.sampling,
                route=RouteRequest(prompt, request.session_id),
                deadline=deadline,
                arrived_s=arrived,
                queue_s=queue_s,
            )
            await self._run(req, context)
        finally:
            self.admission.release()
            self._running.discard(request_id)

    async def _admit(self, deadline: Deadline) -> None:
        """Take an admission slot, waiting in the queue at most until the deadline."""
        if self.admission.inflight < self.admission.max_inflight:
            await self.admission.acquire()  # a free slot: taken without suspending
            return
        try:
            await asyncio.wait_for(self.admission.acquire(), deadline.remaining())
        except Overloaded as e:
            raise RequestError(Code.RESOURCE_EXHAUSTED, str(e)) from None
        except TimeoutError:
            raise RequestError(Code.DEADLINE_EXCEEDED, "deadline passed while queued for admission") from None

    def _check(self, request: router_pb2.GenerateRequest) -> None:
        """The checks that need no node and no tokenizer run."""
        size = request.ByteSize()
        if size > MAX_REQUEST_BYTES:
            raise RequestError(
                Code.INVALID_ARGUMENT, f"request of {size} bytes exceeds the {MAX_REQUEST_BYTES // 2**20} MiB limit"
            )
        which = request.WhichOneof("prompt")
        if which == "text" and request.text:
            if self.tokenizer is None:
                raise RequestError(Code.INVALID_ARGUMENT, "send token ids: the router has no tokenizer")
        elif which == "chat":
            check_chat(self.tokenizer, request.chat)
        elif which != "token_ids" or not request.token_ids.ids:
            raise RequestError(Code.INVALID_ARGUMENT, "prompt is empty")
        try:
            check_sampling(request.sampling)
            check_stop(request.sampling.stop)
        except ValueError as e:
            raise RequestError(Code.INVALID_ARGUMENT, str(e)) from None
        if request.sampling.stop and self.tokenizer is None:
            raise RequestError(Code.INVALID_ARGUMENT, "stop strings need the router's tokenizer (use stop_token_ids)")

    async def _prompt_ids(self, request: router_pb2.GenerateRequest) -> list[int]:
        if request.WhichOneof("prompt") == "token_ids":
            return list(request.token_ids.ids)
        if request.WhichOneof("prompt") == "chat":
            return await chat_prompt_ids(self.tokenizer, request.chat)
        text = request.text
        if len(text) <= TOKENIZE_INLINE_CHARS:
            ids = self.tokenizer.encode(text)
        else:
            ids = await asyncio.to_thread(self.tokenizer.encode, text)
        if not ids:
            raise RequestError(Code.INVALID_ARGUMENT, "prompt is empty")
        return list(ids)

    # -- attempts ----------------------------------------------------------------

    async def _run(self, req: _Request, context) -> None:
        book = RetryBook(
            prefill_retries=self.config.prefill_retries,
            capacity_wait_s=self.config.capacity_wait_s,
            local_prefill_max_tokens=self.config.local_prefill_max_tokens,
            deadline=req.deadline,
        )
        attempt: Attempt | None = None
        try:
            while True:
                pair = await self._next_pair(book, req)
                nid = node_request_id(req.request_id, self.instance_id, next(self._serials))
                attempt = Attempt(pair.number, nid, pair.decode, pair.prefill, self.calls)
                if await self._try(attempt, book, req):
                    break
            await self._stream(attempt, req, context)
        except BaseException as e:
            if attempt is not None and not attempt.closed:
                attempt.release(_reason(e))
            raise

    async def _next_pair(self, book: RetryBook, req: _Request) -> Pair:
        """The retry book's next pair, waiting (with its backoff) while no decode node has room."""
        while True:
            try:
                pair = book.pick(
                    self.view.reachable(common_pb2.ROLE_DECODE),
                    self.view.reachable(common_pb2.ROLE_PREFILL),
                    len(req.prompt),
                    lambda role, entries: self._choose(role, entries, req.route),
                    known_decodes=len(self.view.entries(common_pb2.ROLE_DECODE)),
                )
                if pair is not None:
                    break
                delay = book.wait_for_room()
            except GiveUp as e:
                raise RequestError(Code[e.status], e.details) from None
            await asyncio.sleep(delay)
            self.metrics.capacity_waits.inc()
        if pair.number == 1:
            self.metrics.overhead.observe(time.monotonic() - req.arrived_s - req.queue_s)
        if pair.retry:
            self.metrics.prefill_retries.inc()
        return pair

    async def _try(self, attempt: Attempt, book: RetryBook, req: _Request) -> bool:
        """Run one attempt to its first token: True, or False when it failed and the book allows another."""
        try:
            await attempt.start(req)
            return True
        except AttemptFailed as f:
            failure = f.failure
        attempt.release(f"attempt failed: {failure}", failed=failure)
        if failure.no_room:  # not a failure of the prefill: wait or try another D
            log.info("router: request %s: %s", req.request_id, failure)
        else:
            self.metrics.prefill_failures.labels(failure.code).inc()
            log.warning("router: request %s attempt %d failed: %s", req.request_id, attempt.number, failure)
        try:
            book.record(failure)
        except GiveUp as e:
            raise RequestError(Code[e.status], e.details) from None
        return False

    def _choose(self, role: str, entries: list[NodeEntry], route: RouteRequest) -> NodeEntry:
        policy = self.decode_policy if role == DECODE else self.prefill_policy
        by_id = {e.node_id: e for e in entries}
        try:
            return by_id[policy.choose([e.candidate() for e in entries], route).node_id]
        except NoNodes as e:  # not reached: entries is non-empty
            raise RequestError(Code.UNAVAILABLE, str(e)) from None

    # -- streaming ---------------------------------------------------------------

    async def _stream(self, attempt: Attempt, req: _Request, context) -> None:
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        stop = StopStrings(req.sampling.stop) if req.sampling.stop and detok is not None else None
        msg = attempt.first
        first_token_s = None
        num_tokens = 0
        while True:
            out = router_pb2.GenerateResponse(request_id=req.request_id, token_ids=msg.token_ids)
            attempt.fill_logprobs(out, msg, req)  # before a stop string cuts the ids (and their logprobs)
            if detok is not None:
                out.text = detok.add(list(msg.token_ids), final=msg.finished)
            if first_token_s is None:
                first_token_s = time.monotonic()
                out.prompt_tokens = len(req.prompt)
                self.metrics.ttft.observe(first_token_s - req.arrived_s)
            stopped = stop is not None and self._apply_stop(stop, out, detok, msg.finished)
            num_tokens += len(out.token_ids)
            self.metrics.output_tokens.inc(len(out.token_ids))
            if msg.finished or stopped:
                out.finished = True
                out.finish_reason = common_pb2.FINISH_REASON_STOP if stopped else msg.finish_reason
                if stopped:  # the nodes are still generating: abort them as a client cancel does
                    attempt.release("stop string matched")
                else:
                    await attempt.collect_prefill(req)
                out.timings.CopyFrom(self._timings(attempt, req, first_token_s, num_tokens))
                out.cached_prompt_tokens = attempt.cached_prompt_tokens()
                self.metrics.cached_prompt_tokens.inc(out.cached_prompt_tokens)
                await context.write(out)
                return
            await context.write(out)
            msg = await attempt.next_message(req, num_tokens)

    def _apply_stop(self, stop: StopStrings, out: router_pb2.GenerateResponse, detok: IncrementalDetokenizer,
                    final: bool) -> bool:
        """Stop strings on this chunk's text (braid.router.stop): True when one matched; then
        the text ends before it and the ids (and their logprobs) past the token completing it
        are dropped. Without a match the text that could start one is held back."""
        text, matched = stop.feed(out.text)
        if not matched:
            out.text = text + (stop.flush() if final else "")
            return False
        out.text = text
        chunk = list(out.token_ids)
        before = detok.ids[: len(detok.ids) - len(chunk)]
        keep = ids_through(self.tokenizer.decode, before, chunk, stop.match_end)
        del out.token_ids[keep:]
        del out.logprobs[keep:]
        return True

    def _timings(self, attempt: Attempt, req: _Request, first_token_s: float, num_tokens: int) -> common_pb2.Timings:
        """The finished request's timings, also accounted in the metrics."""
        now = time.monotonic()
        t = common_pb2.Timings(
            queue_s=req.queue_s,
            ttft_s=first_token_s - req.arrived_s,
            decode_s=now - first_token_s,
            total_s=now - req.arrived_s,
            decode_node=attempt.decode.node_id,
            local_prefill=attempt.prefill is None,
            prefill_attempts=attempt.number,
        )
        if attempt.prefill is None:
            t.prefill_node = attempt.decode.node_id
            t.prefill_s = attempt.first.kv_ready_s
        else:
            t.prefill_node = attempt.prefill.node_id
            if attempt.prefill_resp is not None:
                r = attempt.prefill_resp
                t.prefill_s, t.transfer_s, t.kv_bytes = r.prefill_s, r.transfer_s, r.kv_bytes
        m = self.metrics
        if attempt.prefill is None:
            m.local_prefill.inc()
        m.phase_of["prefill"].observe(t.prefill_s)
        m.phase_of["transfer"].observe(t.transfer_s)
        m.phase_of["decode"].observe(t.decode_s)
        m.kv_bytes.inc(t.kv_bytes)
        if num_tokens > 1:
            m.tpot.observe(t.decode_s / (num_tokens - 1))
        return t

    async def close(self, timeout: float = ABORT_TIMEOUT_S) -> None:
        """Wait (bounded) for aborts still being sent."""
        await self.aborts.close(timeout)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, RequestError):
        return exc.details
    return f"{type(exc).__name__}: {exc}"
