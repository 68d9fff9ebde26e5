"""The OpenAI-compatible HTTP API of the router (aiohttp), beside its gRPC service.

    app = build_app(orchestrator, view, metrics)   # served by braid.router.http_server.start_http

In a request's life: POST /v1/completions or /v1/chat/completions is read (at
most MAX_REQUEST_BYTES, else 413), parsed (braid.router.openai_protocol; 400
naming the field), checked against the models the nodes advertise (404
model_not_found), then each choice runs as one Orchestrator.generate call, in
the same event loop and through the same admission, deadlines, retries and
metrics as a gRPC Generate call. `_Context` stands in for the gRPC context:
`write` puts the response on a queue, `abort` records the status. The choices'
responses are merged (braid.router.openai_format) into one JSON body or one SSE
stream; a status before the first token becomes the HTTP status (GRPC_TO_HTTP),
one mid-stream an SSE `{"error": ...}` event. The runner cancels a handler whose
client disconnected (handler_cancellation), which cancels its orchestrator
calls: their attempts are aborted on both nodes, as for a gRPC cancel.
GET /v1/models lists NodeInfo.model_id of the nodes, /health answers 200 while
a decode node is reachable (else 503), /metrics serves the router's registry.
"""
from __future__ import annotations

import asyncio
import json
import logging

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from braid.proto import common_pb2
from braid.router.metrics import RouterMetrics
from braid.router.nodes import NodeView
from braid.router.openai_format import (
    Choice, TokenText, chat_body, chat_chunk, completion_body, completion_chunk, usage_chunk,
)
from braid.router.openai_protocol import ApiError, OpenAIRequest, parse_chat, parse_completion
from braid.router.orchestrator import MAX_REQUEST_BYTES, Orchestrator

log = logging.getLogger(__name__)

Code = grpc.StatusCode
GRPC_TO_HTTP = {
    Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409, Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
}
"""Every other status is 500."""
FALLBACK_CONTEXT = 4096
"""Chat's default max_tokens when no decode node says its max_model_len."""
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def status_error(code: grpc.StatusCode, details: str) -> ApiError:
    status = GRPC_TO_HTTP.get(code, 500)
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return ApiError(status, details or code.name, None, kind, code.name.lower())


class _Context:
    """What Orchestrator.generate needs of a gRPC context, for one choice."""

    def __init__(self, index: int, queue: asyncio.Queue):
        self.index, self.queue = index, queue
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def write(self, msg) -> None:
        self.queue.put_nowait((self.index, msg))

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError(code, details)

    def time_remaining(self) -> float | None:
        return None  # the router's request_timeout_s applies


class Fanout:
    """The orchestrator calls of one HTTP request (one per choice), their output on one
    queue as (index, GenerateResponse), then (index, None) when a call ended."""

    def __init__(self, orchestrator: Orchestrator, req: OpenAIRequest):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.contexts = {j.index: _Context(j.index, self.queue) for j in req.jobs}
        self.tasks = {
            j.index: asyncio.create_task(self._run(orchestrator, j.request, self.contexts[j.index])) for j in req.jobs
        }

    async def _run(self, orchestrator: Orchestrator, request, ctx: _Context) -> None:
        try:
            await orchestrator.generate(request, ctx)
        except grpc.aio.AbortError:
            pass  # the status is on ctx
        finally:
            self.queue.put_nowait((ctx.index, None))

    async def next(self):
        return await self.queue.get()

    def error(self, index: int) -> ApiError | None:
        ctx = self.contexts[index]
        return None if ctx.code is None else status_error(ctx.code, ctx.details)

    def cancel(self, index: int) -> None:
        self.tasks[index].cancel()

    async def close(self) -> None:
        """Cancel the calls still running (their attempts get aborted on the nodes) and wait for them."""
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


class OpenAIApi:
    """The routes; one instance per router."""

    def __init__(self, orchestrator: Orchestrator, view: NodeView, metrics: RouterMetrics):
        self.orchestrator, self.view, self.metrics = orchestrator, view, metrics
        self.tt = TokenText(orchestrator.tokenizer)

    # -- helpers -----------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            raise ApiError(413, f"request body of {request.content_length} bytes exceeds the "
                                f"{MAX_REQUEST_BYTES // 2**20} MiB limit")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body exceeds the {MAX_REQUEST_BYTES // 2**20} MiB limit") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def model_ids(self) -> list[str]:
        return sorted({e.info.model_id for e in self.view.entries() if e.info.model_id})

    def _model(self, name: str | None) -> str:
        ids = self.model_ids()
        if name is not None and ids and name not in ids:
            raise ApiError(404, f"model {name!r} does not exist; served: {', '.join(ids)}", "model",
                           code="model_not_found")
        return name or (ids[0] if ids else "braid")

    def _max_model_len(self) -> int:
        """The smallest max_model_len of the reachable decode nodes (0 when none says)."""
        lens = [e.max_model_len for e in self.view.reachable(common_pb2.ROLE_DECODE) if e.max_model_len > 0]
        return min(lens) if lens else 0

    def _decode_ids(self, ids: list[int]) -> str:
        tok = self.orchestrator.tokenizer
        return tok.decode(ids) if tok is not None else ""

    # -- routes ------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._generate(request, parse_completion(body, self._decode_ids))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._generate(request, parse_chat(body, self._max_model_len() or FALLBACK_CONTEXT))

    async def _generate(self, request: web.Request, req: OpenAIRequest) -> web.StreamResponse:
        if self.orchestrator.draining:
            raise ApiError(503, "router is draining (shutting down); retry on another router", type_="server_error",
                           code="unavailable")
        model = self._model(req.model)
        max_len = self._max_model_len() if req.context_budget else 0
        choices = {j.index: Choice(j, req, self.orchestrator.tokenizer, max_len) for j in req.jobs}
        fan = Fanout(self.orchestrator, req)
        try:
            if req.stream:
                return await self._stream(request, req, model, choices, fan)
            return await self._collect(req, model, choices, fan)
        finally:
            await fan.close()

    async def _collect(self, req: OpenAIRequest, model: str, choices: dict, fan: Fanout) -> web.Response:
        remaining = len(choices)
        while remaining:
            index, msg = await fan.next()
            if msg is None:
                remaining -= 1
                err = fan.error(index)
                if err is not None:
                    raise err
                continue
            c = choices[index]
            if c.finish is None and c.add(msg)[2]:
                fan.cancel(index)  # cut at the context budget: stop its nodes
        shape = chat_body if req.kind == "chat" else completion_body
        return web.json_response(shape(req, model, list(choices.values()), self.tt))

    async def _stream(self, request: web.Request, req: OpenAIRequest, model: str, choices: dict,
                      fan: Fanout) -> web.StreamResponse:
        first = await fan.next()  # a status before any output is the response's HTTP status
        if first[1] is None and fan.error(first[0]) is not None:
            raise fan.error(first[0])
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        offsets = dict.fromkeys(choices, 0)
        pending, remaining, failed = [first], len(choices), False
        while remaining:
            index, msg = pending.pop() if pending else await fan.next()
            if msg is None:
                remaining -= 1
                err = fan.error(index)
                if err is not None:  # mid-stream: an error event, then the end
                    await _send(resp, err.body())
                    failed = True
                    break
                continue
            c = choices[index]
            if c.finish is not None:
                continue
            text, entries, cut = c.add(msg)
            if cut:
                fan.cancel(index)
            for chunk in self._chunks(req, model, c, text, entries, offsets):
                await _send(resp, chunk)
        if req.include_usage and not failed:
            await _send(resp, usage_chunk(req, model, list(choices.values())))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _chunks(self, req: OpenAIRequest, model: str, c: Choice, text: str, entries: list, offsets: dict) -> list:
        if req.kind != "chat":
            if not text and not entries and c.finish is None:
                return []
            offset = offsets[c.index]
            offsets[c.index] += sum(len(self.tt(e[0])) for e in entries)
            return [completion_chunk(req, model, c, text, entries, self.tt, offset)]
        out = []
        if offsets[c.index] == 0:  # the choice's first chunk carries the role
            offsets[c.index] = 1
            out.append(chat_chunk(req, model, c, {"role": "assistant", "content": ""}, [], self.tt, None))
        if text or entries:
            out.append(chat_chunk(req, model, c, {"content": text}, entries, self.tt, None))
        if c.finish is not None:
            out.append(chat_chunk(req, model, c, {}, [], self.tt, c.finish))
        return out

    async def models(self, request: web.Request) -> web.Response:
        max_len = self._max_model_len()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "braid", "max_model_len": max_len or None}
                for m in self.model_ids()]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if self.view.reachable(common_pb2.ROLE_DECODE):
            return web.Response(status=200)
        return _error_response(ApiError(503, "no decode node is reachable", type_="server_error", code="unavailable"))

    async def prometheus(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _send(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _error_response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


@web.middleware
async def _errors(request: web.Request, handler):
    """ApiError -> the OpenAI envelope; aiohttp's own HTTP errors (404, 405) too."""
    try:
        return await handler(request)
    except ApiError as e:
        return _error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error_response(ApiError(e.status, e.reason, code=str(e.status)))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # noqa: BLE001 - a bug must still answer in the envelope
        log.exception("router: HTTP request failed")
        return _error_response(ApiError(500, f"router error: {type(e).__name__}: {e}", type_="server_error"))


def _counted(metrics: RouterMetrics):
    """braid_router_http_requests_total{route,status}; a client that left counts as 499."""

    @web.middleware
    async def count(request: web.Request, handler):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"  # bounded label values
        status = 499
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            metrics.http_requests.labels(route, str(status)).inc()

    return count


def build_app(orchestrator: Orchestrator, view: NodeView, metrics: RouterMetrics, middlewares=()) -> web.Application:
    api = OpenAIApi(orchestrator, view, metrics)
    # one byte over the limit is enough for aiohttp to refuse the body (413 through _errors)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES + 1,
                          middlewares=[_counted(metrics), _errors, *middlewares])
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.prometheus)
    return app
