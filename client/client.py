"""The gRPC client SDK: `Client` (blocking) and `AsyncClient` (asyncio), same surface.

A request's life as the client sees it:

1. `generate(prompt, ...)` encodes a `GenerateRequest` (text or token ids, sampling,
   optional request and session ids; `chat(messages, ...)` sends a chat instead)
   and opens `Router.Generate` with a deadline
   (the call's `timeout`, else the client's, else `DEFAULT_GENERATE_TIMEOUT_S`).
   Values that the wire cannot carry (a negative `max_tokens`) raise
   `InvalidArgument` at once; every other check is the server's, whose answer
   arrives as `InvalidArgument` from the stream.
2. The returned stream yields `Chunk`s in the order the router sent them: the first
   carries `prompt_tokens`, the last has `finished=True`, a `finish_reason` and the
   `timings`.
3. A failed status raises its typed error (`braid.client.errors`) from the stream
   when it happens, after the chunks that came before it.
4. `close()` / `aclose()`, leaving a `with` block, or dropping the stream cancels
   the RPC; the router then aborts the request on its nodes. `cancel()` cancels
   too, and a reader still waiting on the stream gets `Cancelled`.

The records the stream and `list_nodes()` yield are in `braid.client.types`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence

import grpc

from braid.client.errors import Cancelled, Internal, InvalidArgument, error_from_rpc
from braid.client.sampling import build_sampling
from braid.client.types import (  # re-exported: these names were always importable from here
    Assembler,
    Chunk,
    Completion,
    Load,
    NodeStatus,
    Timings,
    TokenLogprob,
    chunk_from_proto,
    node_from_proto,
)
from braid.proto import router_pb2, router_pb2_grpc
from braid.proto.tls import TlsConfig, channel_credentials, channel_options

DEFAULT_GENERATE_TIMEOUT_S = 600.0
"""Deadline of a Generate call when neither the call nor the client names one."""
DEFAULT_UNARY_TIMEOUT_S = 30.0
"""Deadline of a unary call (ListNodes) when neither the call nor the client names one."""
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Send and receive limit per message; a 1M-token prompt is about 5 MiB."""


# ---------------------------------------------------------------- encoding


class ChatMessages(tuple):
    """A chat prompt: (role, content) pairs from a list of {"role", "content"}
    dicts; the router renders it with the model's chat template."""

    def __new__(cls, messages):
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            raise InvalidArgument("messages must be a list of {'role', 'content'} dicts")
        pairs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgument(f"messages[{i}] must be a dict with string 'role' and 'content'")
            pairs.append((m["role"], m["content"]))
        return super().__new__(cls, pairs)


def build_request(
    prompt: str | Sequence[int],
    *,
    request_id: str | None = None,
    session_id: str | None = None,
    **sampling,
) -> router_pb2.GenerateRequest:
    """Encode a GenerateRequest; InvalidArgument only for what the wire cannot carry."""
    try:
        params = build_sampling(**sampling)
        req = router_pb2.GenerateRequest(
            request_id=request_id or "", sampling=params, session_id=session_id or ""
        )
        if isinstance(prompt, str):
            req.text = prompt
        elif isinstance(prompt, ChatMessages):
            req.chat.SetInParent()  # an empty list still selects the chat prompt (the router refuses it)
            req.chat.messages.extend(router_pb2.ChatMessage(role=r, content=c) for r, c in prompt)
        elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
            raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        else:
            req.token_ids.SetInParent()  # an empty list still selects the token_ids prompt
            req.token_ids.ids.extend(prompt)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(str(e)) from None
    return req


def _channel_options(max_message_bytes: int, options: Iterable[tuple[str, object]]) -> list:
    """Message size limits first; caller options override them."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *options,
    ]


def _unfinished() -> Internal:
    return Internal("the router closed the stream without a finished chunk")


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    return timeout


class _RouterClient:
    """What both clients share: the channel, the default deadline, and opening Generate.

    `timeout` is the default deadline (seconds) of every call; without one,
    Generate gets DEFAULT_GENERATE_TIMEOUT_S and ListNodes DEFAULT_UNARY_TIMEOUT_S.
    `wait_for_ready` queues calls while the router is unreachable instead of
    failing with Unavailable at once. `options` are extra grpc channel options.
    TLS: `ca` (PEM path) verifies the router's certificate, `cert`/`key` (PEM paths)
    are this client's own for mutual TLS, `server_name` is the name to check in the
    router's certificate (default: the address's host); or pass ready-made
    `credentials` instead. Without any of them the channel is plaintext.
    """

    _channels = grpc  # the module whose insecure_channel / secure_channel to use
    _stream_type: type  # GenerateStream or AsyncGenerateStream

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, object]] = (),
        wait_for_ready: bool = False,
        metadata: Iterable[tuple[str, str]] = (),
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
    ):
        self._timeout = _check_timeout(timeout)
        self._wait_for_ready = wait_for_ready
        self._metadata = tuple(metadata) or None
        opts = _channel_options(max_message_bytes, options)
        if credentials is None and (ca or cert or key):
            try:
                tls = TlsConfig(ca=ca or "", cert=cert or "", key=key or "", server_name=server_name or "")
                credentials = channel_credentials(tls)
            except ValueError as e:  # a missing file or half a key pair
                raise InvalidArgument(str(e)) from None
            opts += channel_options(tls)
        if credentials is None:
            self._channel = self._channels.insecure_channel(address, options=opts)
        else:
            self._channel = self._channels.secure_channel(address, credentials, options=opts)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def _call_kwargs(self, timeout: float | None, default: float) -> dict:
        """Deadline: the call's timeout, else the client's, else `default`; every call has one."""
        deadline = _check_timeout(timeout) or self._timeout or default
        return dict(timeout=deadline, metadata=self._metadata, wait_for_ready=self._wait_for_ready)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        stop: str | Iterable[str] = (),
        num_speculative_tokens: int | None = None,
        speculative_method: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        session_id: str | None = None,
    ):
        """Start a generation and return its stream of Chunks (GenerateStream for
        Client, AsyncGenerateStream for AsyncClient). `stop`: stop strings; the text
        ends before the first one found (finish_reason "stop"). `num_speculative_tokens`,
        `speculative_method`: speculative decoding on the decode node (unset: the node's)."""
        req = build_request(
            prompt, request_id=request_id, session_id=session_id, max_tokens=max_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, stop=stop,
            num_speculative_tokens=num_speculative_tokens, speculative_method=speculative_method,
        )
        call = self._stub.Generate(req, **self._call_kwargs(timeout, DEFAULT_GENERATE_TIMEOUT_S))
        return self._stream_type(call)

    def chat(self, messages: Sequence[Mapping[str, str]], *, stream: bool = True, **kwargs):
        """A chat: `messages` ({"role", "content"} dicts) rendered by the router with
        the model's chat template and its generation prompt; the other arguments
        are generate's. `stream=True`: the stream of Chunks, as generate returns;
        `stream=False`: the whole Completion, as complete returns (awaitable on
        AsyncClient). A model without a chat template answers InvalidArgument."""
        prompt = ChatMessages(messages)
        return self.generate(prompt, **kwargs) if stream else self.complete(prompt, **kwargs)

    def _list_nodes_call(self, timeout: float | None):
        return self._stub.ListNodes(router_pb2.ListNodesRequest(), **self._call_kwargs(timeout, DEFAULT_UNARY_TIMEOUT_S))


# ---------------------------------------------------------------- blocking client


class GenerateStream:
    """Iterator of Chunks over one Generate call; close() or cancel() ends the RPC."""

    def __init__(self, call):
        self._call = call
        self._closed = False
        self._done = False
        self._finished = False

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Chunk:
        if self._closed or self._done:
            raise StopIteration
        try:
            chunk = chunk_from_proto(next(self._call))
        except StopIteration:
            self._done = True
            if not self._finished:
                raise _unfinished() from None
            raise
        except grpc.RpcError as e:
            self._done = True
            raise error_from_rpc(e) from None
        self._finished = self._finished or chunk.finished
        return chunk

    def cancel(self) -> None:
        """Cancel the RPC; a reader waiting on the stream gets Cancelled."""
        self._call.cancel()

    def close(self) -> None:
        """Cancel the RPC if it still runs; iteration stops."""
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        call = getattr(self, "_call", None)
        if call is not None:
            call.cancel()


class Client(_RouterClient):
    """Blocking client of the braid Router (see _RouterClient for the arguments)."""

    _stream_type = GenerateStream

    def complete(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        """Generate and wait for the whole result (same arguments as generate)."""
        acc = Assembler()
        with self.generate(prompt, **kwargs) as stream:
            for chunk in stream:
                acc.add(chunk)
        return acc.result()

    def list_nodes(self, *, timeout: float | None = None) -> list[NodeStatus]:
        """The nodes the router knows, with their latest load."""
        try:
            resp = self._list_nodes_call(timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return [node_from_proto(n) for n in resp.nodes]

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- asyncio client


def _task_cancelling() -> bool:
    """Whether the running task itself is being cancelled (Python >= 3.11 can tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())


class AsyncGenerateStream:
    """Async iterator of Chunks over one Generate call; aclose() or cancel() ends the RPC."""

    def __init__(self, call):
        self._call = call
        self._closed = False
        self._done = False
        self._finished = False
        self._cancel_requested = False

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._closed or self._done:
            raise StopAsyncIteration
        resp = await self._read()
        if resp is grpc.aio.EOF:
            self._done = True
            if not self._finished:
                raise _unfinished()
            raise StopAsyncIteration
        chunk = chunk_from_proto(resp)
        self._finished = self._finished or chunk.finished
        return chunk

    async def _read(self):
        """One message or EOF; RPC failures as typed errors."""
        try:
            return await self._call.read()
        except grpc.RpcError as e:
            self._done = True
            raise error_from_rpc(e) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError for a call cancelled locally; only a
            # cancel() of ours becomes Cancelled, a cancelled task stays cancelled.
            if self._cancel_requested and not _task_cancelling():
                self._done = True
                raise Cancelled("cancelled by the client") from None
            raise

    def cancel(self) -> None:
        """Cancel the RPC; a reader waiting on the stream gets Cancelled."""
        self._cancel_requested = True
        self._call.cancel()

    async def aclose(self) -> None:
        """Cancel the RPC if it still runs; iteration stops."""
        self._closed = True
        self._cancel_requested = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __del__(self):
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            try:
                call.cancel()
            except RuntimeError:  # the event loop is already closed
                pass


class AsyncClient(_RouterClient):
    """asyncio client of the braid Router; the same surface as `Client`, awaitable.

    Construct it inside the event loop that will use it.
    """

    _channels = grpc.aio
    _stream_type = AsyncGenerateStream

    async def complete(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        """Generate and wait for the whole result (same arguments as generate)."""
        acc = Assembler()
        async with self.generate(prompt, **kwargs) as stream:
            async for chunk in stream:
                acc.add(chunk)
        return acc.result()

    async def list_nodes(self, *, timeout: float | None = None) -> list[NodeStatus]:
        """The nodes the router knows, with their latest load."""
        try:
            resp = await self._list_nodes_call(timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return [node_from_proto(n) for n in resp.nodes]

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "ChatMessages",
    "Chunk",
    "Client",
    "Completion",
    "GenerateStream",
    "Load",
    "NodeStatus",
    "Timings",
    "TokenLogprob",
    "build_request",
    "chunk_from_proto",
    "node_from_proto",
]
