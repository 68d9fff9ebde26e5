"""One request's life across a prefill node P and a decode node D.

    ARRIVED --checks (prompt, sampling, id not already running)--> ADMITTING
        (queue full: RESOURCE_EXHAUSTED; deadline while queued: DEADLINE_EXCEEDED)
    ADMITTING --slot--> ROUTING: tokenize; pick D among reachable decode nodes
        whose max_model_len fits the prompt; local prefill when the prompt has at
        most local_prefill_max_tokens tokens or no prefill node is reachable,
        else pick P.
    ATTEMPT n (remote): D.Reserve -> D.Decode stream opened (read by a task into
        a queue) -> P.Prefill(destination), concurrently with the stream; the
        attempt succeeds when D's first message (the first token) arrives,
        whether or not P's reply is in yet (it is collected for the timings).
    ATTEMPT n (local):  D.Decode(local_prefill=True, prompt, sampling); succeeds
        on D's first message.
    ATTEMPT n fails: P's call fails (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED,
        RESOURCE_EXHAUSTED, ...), D refuses the reservation, or D's stream ends
        before the first token. The attempt is aborted on its nodes in the
        background; the node at fault is excluded from this request (for D's
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
        within its deadline; then RESOURCE_EXHAUSTED naming the nodes. When every prefill node has failed the
        request it fails: no silent recompute on D. INVALID_ARGUMENT from a node
        goes to the client as is, never retried.
    STREAMING: each DecodeResponse becomes a GenerateResponse (prompt_tokens on
        the first, finished + finish_reason + Timings on the last) -> DONE.
    STREAMING fails (D errors or ends without finishing): P and D are aborted;
        the client gets UNAVAILABLE (DEADLINE_EXCEEDED once the deadline passed).
    Client cancel or deadline, in any state: the current attempt's calls are
        cancelled and Abort goes to its P and D from a task of its own (so it
        completes although the handler is being cancelled); then the
        cancellation propagates.
    Every exit after ADMITTING releases the admission slot.

Aborts go to every node an attempt called, except one that answered
UNAVAILABLE itself (down or not taking work: nothing to free there); Abort is
idempotent on the nodes, so an extra one is harmless. Node-side request ids:
attempt 1 uses the client's request id (or the uuid the router assigned);
attempt n > 1 uses "<id>-a<n>", so that nothing left over from a failed
attempt (a late KV push, a late abort) can touch the next one. Every outgoing
call has a deadline: Reserve min(remaining, node_rpc_timeout_s), Abort
min(2 s, node_rpc_timeout_s), Prefill and Decode the time remaining.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from braid.client.sampling import check_sampling
from braid.engine.tokenizer import IncrementalDetokenizer
from braid.proto import common_pb2, nodes_pb2, router_pb2
from braid.router.admission import AdmissionControl, Overloaded
from braid.router.config import RouterConfig
from braid.router.metrics import RouterMetrics
from braid.router.nodes import NodeEntry, NodeView
from braid.router.policies import NoNodes, Policy, RouteRequest

MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Largest request served (a 1M-token prompt is about 5 MiB of ids)."""

log = logging.getLogger(__name__)

Code = grpc.StatusCode
ABORT_TIMEOUT_S = 2.0
"""Deadline of an Abort call (capped by node_rpc_timeout_s)."""
PREFILL_REPLY_GRACE_S = 2.0
"""After D finished streaming, how long to wait for P's reply (its timings)."""
TOKENIZE_INLINE_CHARS = 8192
"""Longer texts are tokenized in a worker thread, off the event loop."""
_EOF = object()


class RequestError(Exception):
    """Ends a request with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class _Failure:
    """One failed attempt, for the retry decision and the final message."""

    node: NodeEntry
    call: str
    code: grpc.StatusCode
    details: str

    def __str__(self) -> str:
        return f"{self.node.role} node {self.node.node_id} {self.call}: {self.code.name}: {self.details}"


class _AttemptFailed(Exception):
    def __init__(self, failure: _Failure, *, exclude: bool = True):
        super().__init__(str(failure))
        self.failure = failure
        self.exclude = exclude
        """Exclude the node from later attempts (else only prefer others)."""


class _NoRoom(Exception):
    """Every decode node the prompt fits has said it has no room for the KV."""


def _no_room(failure: _Failure) -> bool:
    """D refused a reservation for lack of KV blocks: nothing was created there, and
    it says nothing about the prefill node or D's health."""
    return failure.call == "Reserve" and failure.code == Code.RESOURCE_EXHAUSTED


class _CapacityWait:
    """Bounded waiting for decode capacity: backoff from INITIAL_S to MAX_S, for at
    most `budget_s` from the first wait and never past the request's deadline."""

    INITIAL_S = 0.05
    MAX_S = 1.0

    def __init__(self, budget_s: float, deadline: Deadline):
        self.budget_s = budget_s
        self.deadline = deadline
        self.until: float | None = None
        self.delay = self.INITIAL_S

    async def wait(self) -> bool:
        """Sleep before asking again; False when the budget or the deadline is spent."""
        now = time.monotonic()
        if self.until is None:
            self.until = min(now + self.budget_s, self.deadline.at)
        if now >= self.until:
            return False
        await asyncio.sleep(min(self.delay, self.until - now))
        self.delay = min(2 * self.delay, self.MAX_S)
        return True


class Deadline:
    def __init__(self, budget_s: float):
        self.at = time.monotonic() + budget_s

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def control(self, cap_s: float) -> float:
        return min(self.remaining(), cap_s)


class _DecodeReader:
    """Reads D's Decode stream in a task into a queue: DecodeResponses, then _EOF or the RpcError."""

    def __init__(self, call):
        self.call = call
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for msg in self.call:
                self.queue.put_nowait(msg)
            self.queue.put_nowait(_EOF)
        except grpc.RpcError as e:
            self.queue.put_nowait(e)

    async def get(self):
        return await self.queue.get()

    def cancel(self) -> None:
        self.call.cancel()
        self.task.cancel()


@dataclass(eq=False)
class _Attempt:
    number: int
    node_request_id: str
    decode: NodeEntry
    prefill: NodeEntry | None
    """None: local prefill on the decode node."""
    decode_called: bool = False
    reader: _DecodeReader | None = None
    prefill_call: object = None
    """The grpc.aio call of P.Prefill; prefill_task awaits it."""
    prefill_task: asyncio.Future | None = None
    pending: list[asyncio.Task] = field(default_factory=list)
    first: nodes_pb2.DecodeResponse | None = None
    prefill_resp: nodes_pb2.PrefillResponse | None = None
    closed: bool = False


@dataclass
class _Request:
    """What the streaming phase needs to know about the request."""

    request_id: str
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    route: RouteRequest
    deadline: Deadline
    arrived_s: float
    queue_s: float


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
        self._background: set[asyncio.Task] = set()
        self._running: set[str] = set()
        """Client-facing ids of the requests admitted or queued (a second one with the same id is refused)."""

    # -- the RPC -----------------------------------------------------------------

    async def generate(self, request: router_pb2.GenerateRequest, context) -> None:
        """Serve one Generate call, writing responses to `context`; errors end it with a status."""
        code = Code.OK
        try:
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
            self.metrics.requests.labels(code.name).inc()

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
            self.metrics.phase.labels("queue").observe(queue_s)
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
        elif which != "token_ids" or not request.token_ids.ids:
            raise RequestError(Code.INVALID_ARGUMENT, "prompt is empty")
        try:
            check_sampling(request.sampling)
        except ValueError as e:
            raise RequestError(Code.INVALID_ARGUMENT, str(e)) from None

    async def _prompt_ids(self, request: router_pb2.GenerateRequest) -> list[int]:
        if request.WhichOneof("prompt") == "token_ids":
            return list(request.token_ids.ids)
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
        failures: list[_Failure] = []  # failed attempts: at most 1 + prefill_retries
        full: dict[str, _Failure] = {}  # decode nodes that had no room for the KV, since the last wait
        bad = {common_pb2.ROLE_PREFILL: set(), common_pb2.ROLE_DECODE: set()}
        avoid: set[str] = set()
        attempt: _Attempt | None = None
        room = _CapacityWait(self.config.capacity_wait_s, req.deadline)
        number, retrying = 0, False
        try:
            while True:
                try:
                    decode, prefill = self._pick(req, bad, avoid, failures, full)
                except _NoRoom:
                    if not await room.wait():
                        raise self._exhausted(failures + list(full.values())) from None
                    self.metrics.capacity_waits.inc()
                    full.clear()
                    continue
                number += 1
                if number == 1:
                    self.metrics.overhead.observe(time.monotonic() - req.arrived_s - req.queue_s)
                if retrying:
                    self.metrics.prefill_retries.inc()
                    retrying = False
                node_rid = req.request_id if number == 1 else f"{req.request_id}-a{number}"
                attempt = _Attempt(number, node_rid, decode, prefill)
                try:
                    await self._start(attempt, req)
                    break
                except _AttemptFailed as f:
                    self._release(attempt, f"attempt failed: {f.failure}", failed=f.failure)
                    if _no_room(f.failure):  # not a failure of the prefill: wait or try another D
                        log.info("router: request %s: %s", req.request_id, f.failure)
                        full[f.failure.node.node_id] = f.failure
                    else:
                        failures.append(f.failure)
                        self.metrics.prefill_failures.labels(f.failure.code.name).inc()
                        log.warning("router: request %s attempt %d failed: %s", req.request_id, number, f.failure)
                        if f.exclude:
                            bad[f.failure.node.info.role].add(f.failure.node.node_id)
                        elif prefill is not None:
                            avoid.add(prefill.node_id)
                        if len(failures) > self.config.prefill_retries:
                            raise self._exhausted(failures) from None
                        retrying = True
                    if req.deadline.expired():
                        raise RequestError(Code.DEADLINE_EXCEEDED, f"deadline passed after {number} attempt(s); last: {f.failure}") from None
            await self._stream(attempt, req, context)
        except BaseException as e:
            if attempt is not None and not attempt.closed:
                self._release(attempt, _reason(e))
            raise

    def _pick(self, req: _Request, bad: dict, avoid: set[str], failures: list[_Failure],
              full: dict[str, _Failure]) -> tuple[NodeEntry, NodeEntry | None]:
        """Choose D, and P (None = local prefill), skipping nodes that failed this
        request; _NoRoom when every D the prompt fits said it has no room."""
        decodes = self.view.reachable(common_pb2.ROLE_DECODE, exclude=bad[common_pb2.ROLE_DECODE])
        if not decodes:
            if failures:
                raise self._exhausted(failures)
            known = len(self.view.entries(common_pb2.ROLE_DECODE))
            raise RequestError(Code.UNAVAILABLE, "no decode nodes" + (f" reachable ({known} known)" if known else ""))
        n = len(req.prompt)
        fits = [e for e in decodes if e.max_model_len == 0 or n <= e.max_model_len]
        if not fits:
            limit = max(e.max_model_len for e in decodes)
            raise RequestError(Code.INVALID_ARGUMENT, f"prompt has {n} tokens, more than max_model_len {limit}")
        fits = [e for e in fits if e.node_id not in full]
        if not fits:
            raise _NoRoom()
        decode = self._choose(self.decode_policy, fits, req.route)
        if n <= self.config.local_prefill_max_tokens:
            return decode, None
        prefills = self.view.reachable(common_pb2.ROLE_PREFILL)
        if not prefills:
            if bad[common_pb2.ROLE_PREFILL]:  # P nodes failed this request: fail rather than recompute on D
                raise self._exhausted(failures)
            return decode, None
        prefills = [e for e in prefills if e.node_id not in bad[common_pb2.ROLE_PREFILL]]
        if not prefills:
            raise self._exhausted(failures)
        preferred = [e for e in prefills if e.node_id not in avoid] or prefills
        return decode, self._choose(self.prefill_policy, preferred, req.route)

    @staticmethod
    def _choose(policy: Policy, entries: list[NodeEntry], route: RouteRequest) -> NodeEntry:
        by_id = {e.node_id: e for e in entries}
        try:
            return by_id[policy.choose([e.candidate() for e in entries], route).node_id]
        except NoNodes as e:  # not reached: entries is non-empty
            raise RequestError(Code.UNAVAILABLE, str(e)) from None

    @staticmethod
    def _exhausted(failures: list[_Failure]) -> RequestError:
        what = "; ".join(str(f) for f in failures) or "no nodes left to try"
        if failures and all(f.code == Code.RESOURCE_EXHAUSTED for f in failures):
            return RequestError(Code.RESOURCE_EXHAUSTED, f"every node tried is full: {what}")
        return RequestError(Code.UNAVAILABLE, f"prefill failed after {len(failures)} attempt(s): {what}")

    async def _start(self, attempt: _Attempt, req: _Request) -> None:
        """Run an attempt until D's first message; _AttemptFailed when a node fails it."""
        decode, prefill = attempt.decode, attempt.prefill
        attempt.decode_called = True
        if prefill is None:
            call = decode.stub.Decode(
                nodes_pb2.DecodeRequest(
                    request_id=attempt.node_request_id, local_prefill=True,
                    prompt_token_ids=req.prompt, sampling=req.sampling,
                ),
                timeout=req.deadline.remaining(),
            )
            attempt.reader = _DecodeReader(call)
            attempt.first = self._first(await attempt.reader.get(), attempt, req)
            return
        try:
            reserved = await decode.stub.Reserve(
                nodes_pb2.ReserveRequest(
                    request_id=attempt.node_request_id, prompt_token_ids=req.prompt,
                    sampling=req.sampling, lease_s=self.config.reserve_lease_s,
                ),
                timeout=req.deadline.control(self.config.node_rpc_timeout_s),
            )
        except grpc.RpcError as e:
            raise self._node_failed(decode, "Reserve", e) from None
        attempt.reader = _DecodeReader(
            decode.stub.Decode(nodes_pb2.DecodeRequest(request_id=attempt.node_request_id), timeout=req.deadline.remaining())
        )
        attempt.prefill_call = prefill.stub.Prefill(
            nodes_pb2.PrefillRequest(
                request_id=attempt.node_request_id, token_ids=req.prompt,
                sampling=req.sampling, destination=reserved.destination,
            ),
            timeout=req.deadline.remaining(),
        )
        attempt.prefill_task = asyncio.ensure_future(attempt.prefill_call)
        attempt.prefill_task.add_done_callback(_retrieve)  # it may end after the attempt was given up
        first = asyncio.create_task(attempt.reader.get())
        attempt.pending.append(first)
        await asyncio.wait((attempt.prefill_task, first), return_when=asyncio.FIRST_COMPLETED)
        if first.done():  # D has the KV (or failed) before P's reply arrived: P's reply is collected later
            attempt.first = self._first(first.result(), attempt, req)
            return
        exc = attempt.prefill_task.exception()
        if exc is not None:
            raise self._node_failed(prefill, "Prefill", exc) from None
        attempt.prefill_resp = attempt.prefill_task.result()
        # P returns once D has all the KV, so D's first message is due now.
        done, _ = await asyncio.wait((first,), timeout=req.deadline.control(self.config.node_rpc_timeout_s))
        if not done:
            raise _AttemptFailed(_Failure(decode, "Decode", Code.DEADLINE_EXCEEDED, "no first token after the prefill completed"))
        attempt.first = self._first(first.result(), attempt, req)

    def _first(self, item, attempt: _Attempt, req: _Request) -> nodes_pb2.DecodeResponse:
        """D's first stream item as a message, or the attempt's failure."""
        if isinstance(item, nodes_pb2.DecodeResponse):
            return item
        if item is _EOF:
            raise _AttemptFailed(_Failure(attempt.decode, "Decode", Code.UNKNOWN, "stream ended before the first token"))
        if item.code() == Code.ABORTED:
            # KV transfer failed or the lease expired: D itself is fine; try another P if there is one.
            raise _AttemptFailed(_Failure(attempt.decode, "Decode", Code.ABORTED, item.details() or ""), exclude=False)
        raise self._node_failed(attempt.decode, "Decode", item)

    def _node_failed(self, node: NodeEntry, call: str, exc: BaseException) -> Exception:
        """A node call's error: RequestError for the client's own fault, else _AttemptFailed."""
        if isinstance(exc, grpc.RpcError):
            code, details = exc.code(), exc.details() or ""
        else:
            code, details = Code.UNKNOWN, repr(exc)
        if code == Code.INVALID_ARGUMENT:
            return RequestError(code, details)
        if code == Code.UNAVAILABLE:
            self.view.mark_unreachable(node, f"{call}: {details}")
        return _AttemptFailed(_Failure(node, call, code, details))

    # -- streaming ---------------------------------------------------------------

    async def _stream(self, attempt: _Attempt, req: _Request, context) -> None:
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        msg = attempt.first
        first_token_s = None
        num_tokens = 0
        while True:
            out = router_pb2.GenerateResponse(request_id=req.request_id, token_ids=msg.token_ids)
            if detok is not None:
                out.text = detok.add(list(msg.token_ids), final=msg.finished)
            num_tokens += len(msg.token_ids)
            self.metrics.output_tokens.inc(len(msg.token_ids))
            if first_token_s is None:
                first_token_s = time.monotonic()
                out.prompt_tokens = len(req.prompt)
                self.metrics.ttft.observe(first_token_s - req.arrived_s)
            if msg.finished:
                out.finished = True
                out.finish_reason = msg.finish_reason
                out.timings.CopyFrom(await self._finish(attempt, req, first_token_s, num_tokens))
                await context.write(out)
                return
            await context.write(out)
            item = await attempt.reader.get()
            if not isinstance(item, nodes_pb2.DecodeResponse):
                raise self._stream_failed(attempt, req, item, num_tokens)
            msg = item

    def _stream_failed(self, attempt: _Attempt, req: _Request, item, num_tokens: int) -> RequestError:
        node = attempt.decode
        if item is _EOF:
            why = "ended the stream without finishing"
        else:
            why = f"{item.code().name}: {item.details()}"
            if item.code() == Code.UNAVAILABLE:
                self.view.mark_unreachable(node, f"Decode: {item.details()}")
            if item.code() == Code.DEADLINE_EXCEEDED and req.deadline.expired():
                self._release(attempt, "deadline")
                return RequestError(Code.DEADLINE_EXCEEDED, f"deadline passed after {num_tokens} tokens")
        self._release(attempt, f"decode node failed: {why}")
        return RequestError(Code.UNAVAILABLE, f"decode node {node.node_id} failed after {num_tokens} tokens: {why}")

    async def _finish(self, attempt: _Attempt, req: _Request, first_token_s: float, num_tokens: int) -> common_pb2.Timings:
        """Collect P's reply (D is done), close the attempt and account the request."""
        task = attempt.prefill_task
        if task is not None and attempt.prefill_resp is None:
            done, _ = await asyncio.wait((task,), timeout=min(PREFILL_REPLY_GRACE_S, req.deadline.remaining()))
            if done and task.exception() is None:
                attempt.prefill_resp = task.result()
            elif done:
                log.warning("router: request %s: prefill reply failed after decode finished: %r", req.request_id, task.exception())
            else:
                attempt.prefill_call.cancel()
                task.cancel()
                self._spawn_aborts([(attempt.prefill, attempt.node_request_id)], "prefill reply late")
        attempt.closed = True
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
        m.phase.labels("prefill").observe(t.prefill_s)
        m.phase.labels("transfer").observe(t.transfer_s)
        m.phase.labels("decode").observe(t.decode_s)
        m.kv_bytes.inc(t.kv_bytes)
        if num_tokens > 1:
            m.tpot.observe(t.decode_s / (num_tokens - 1))
        return t

    # -- cleanup -----------------------------------------------------------------

    def _release(self, attempt: _Attempt, reason: str, failed: _Failure | None = None) -> None:
        """Stop everything of an attempt now and abort it on its nodes in the background (idempotent)."""
        if attempt.closed:
            return
        attempt.closed = True
        for t in attempt.pending:
            t.cancel()
        if attempt.reader is not None:
            attempt.reader.cancel()
        task = attempt.prefill_task
        if task is not None and not task.done():
            attempt.prefill_call.cancel()
            task.cancel()

        def down(node: NodeEntry) -> bool:
            # it said UNAVAILABLE itself, or refused the reservation: nothing to abort there
            return failed is not None and failed.node is node and (failed.code == Code.UNAVAILABLE or _no_room(failed))

        targets = []
        if attempt.decode_called and not down(attempt.decode):
            targets.append((attempt.decode, attempt.node_request_id))
        if task is not None and not down(attempt.prefill):
            targets.append((attempt.prefill, attempt.node_request_id))
        if targets:
            self._spawn_aborts(targets, reason)

    def _spawn_aborts(self, targets: list[tuple[NodeEntry, str]], reason: str) -> None:
        # A task of its own: it runs to the end even when the request's handler is being cancelled.
        task = asyncio.create_task(self._abort_all(targets, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_all(self, targets: list[tuple[NodeEntry, str]], reason: str) -> None:
        timeout = min(ABORT_TIMEOUT_S, self.config.node_rpc_timeout_s)

        async def abort(node: NodeEntry, request_id: str) -> None:
            try:
                await node.stub.Abort(common_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=timeout)
            except grpc.RpcError as e:
                log.info("router: abort of %s on %s failed: %s", request_id, node.node_id, e.code().name)
            except Exception as e:  # a closed channel, for one
                log.info("router: abort of %s on %s failed: %r", request_id, node.node_id, e)

        await asyncio.gather(*(abort(n, rid) for n, rid in targets))

    async def close(self, timeout: float = ABORT_TIMEOUT_S) -> None:
        """Wait (bounded) for aborts still being sent."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, RequestError):
        return exc.details
    return f"{type(exc).__name__}: {exc}"
