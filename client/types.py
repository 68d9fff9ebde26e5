"""The client's value types: what a request's stream and the node listing decode into.

A request's answer reaches the caller as these frozen records: each
`GenerateResponse` becomes a `Chunk` (the last one carrying `Timings`), a whole
generation folds into a `Completion`, and `ListNodes` yields `NodeStatus`es with
each node's `Load`. The router keeps the same `Load` record for its routing
policies, so a node's load has one definition from the wire to the policy.

Only protobuf here (no grpc): decoding a message into these types is plain data.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from braid.proto import common_pb2, router_pb2
from braid.proto.names import FINISH_REASON_NAMES, ROLE_NAMES


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds (mirrors `braid.v1.Timings`)."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    kv_bytes: int = 0
    prefill_node: str = ""
    decode_node: str = ""
    local_prefill: bool = False
    prefill_attempts: int = 0
    cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from a node's prefix cache instead of being computed
    (GenerateResponse.cached_prompt_tokens of the last chunk)."""

    @classmethod
    def from_proto(cls, pb: common_pb2.Timings, cached_prompt_tokens: int = 0) -> Timings:
        wire = pb.DESCRIPTOR.fields_by_name
        return cls(**{f.name: getattr(pb, f.name) for f in fields(cls) if f.name in wire},
                   cached_prompt_tokens=cached_prompt_tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability at its position (mirrors `braid.v1.TokenLogprobs`):
    log-softmax of the model's raw logits, before temperature, top-k and top-p."""

    token_id: int
    logprob: float
    rank: int
    """1 = the most likely token at its position."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely (token_id, logprob) alternatives, most likely first."""

    @classmethod
    def from_proto(cls, pb: common_pb2.TokenLogprobs) -> TokenLogprob:
        return cls(pb.token_id, pb.logprob, pb.rank, tuple((t.token_id, t.logprob) for t in pb.top))


def _logprobs(items) -> tuple[TokenLogprob, ...] | None:
    return tuple(TokenLogprob.from_proto(pb) for pb in items) if items else None


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a generation."""

    request_id: str
    token_ids: tuple[int, ...]
    """New tokens in this chunk."""
    text: str
    """Text delta for these tokens."""
    finished: bool
    finish_reason: str | None
    """"stop", "length" or "abort" on the last chunk, else None."""
    timings: Timings | None
    """On the last chunk."""
    prompt_tokens: int | None
    """On the first chunk."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One per token of this chunk, when the request asked for `logprobs`."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """First chunk, when the request asked for `prompt_logprobs`: prompt tokens 1.. (the first has none)."""
    prompt_token_ids: tuple[int, ...] | None = None
    """First chunk, when the request asked for `prompt_logprobs`: the prompt as tokenized."""


@dataclass(frozen=True)
class Completion:
    """A whole generation, as `complete()` returns it."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    timings: Timings | None
    prompt_tokens: int | None
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One per generated token, when the request asked for `logprobs`."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Load:
    """A node's latest reported load (mirrors `braid.v1.Load`).

    The one load record above the engine: the client lists it, and the router's
    policies score nodes by it (`braid.router.policies.NodeLoad` is this class).
    """

    queued_prefill_tokens: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    running_seqs: int = 0
    waiting_seqs: int = 0
    reserved_blocks: int = 0
    """Blocks held by reservations awaiting KV; assumed already excluded from free_kv_blocks."""

    @classmethod
    def from_proto(cls, pb: common_pb2.Load) -> Load:
        """From a `common_pb2.Load` (or anything with the same attributes)."""
        return cls(**{f.name: int(getattr(pb, f.name)) for f in fields(cls)})

    @property
    def used_kv_fraction(self) -> float:
        """Share of the KV pool in use, 0 for a node that reports no pool."""
        if self.total_kv_blocks <= 0:
            return 0.0
        return (self.total_kv_blocks - self.free_kv_blocks) / self.total_kv_blocks


@dataclass(frozen=True)
class NodeStatus:
    """One node as the router sees it."""

    node_id: str
    role: str
    """"prefill", "decode" or "unspecified"."""
    address: str
    model_id: str
    reachable: bool
    load: Load
    info: common_pb2.NodeInfo
    """The full registration (layout, capacity, transport, ...)."""


def chunk_from_proto(resp: router_pb2.GenerateResponse) -> Chunk:
    """Decode one GenerateResponse."""
    return Chunk(
        request_id=resp.request_id,
        token_ids=tuple(resp.token_ids),
        text=resp.text,
        finished=resp.finished,
        finish_reason=FINISH_REASON_NAMES.get(resp.finish_reason),
        timings=Timings.from_proto(resp.timings, resp.cached_prompt_tokens) if resp.HasField("timings") else None,
        prompt_tokens=resp.prompt_tokens or None,
        logprobs=_logprobs(resp.logprobs),
        prompt_logprobs=_logprobs(resp.prompt_logprobs),
        prompt_token_ids=tuple(resp.prompt_token_ids) or None,
    )


def node_from_proto(pb: router_pb2.NodeStatus) -> NodeStatus:
    """Decode one NodeStatus."""
    return NodeStatus(
        node_id=pb.info.node_id,
        role=ROLE_NAMES.get(pb.info.role, "unspecified"),
        address=pb.info.address,
        model_id=pb.info.model_id,
        reachable=pb.reachable,
        load=Load.from_proto(pb.load),
        info=pb.info,
    )


class Assembler:
    """Folds chunks into a Completion."""

    def __init__(self):
        self.request_id = ""
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.last: Chunk | None = None
        self.prompt_tokens: int | None = None
        self.logprobs: list[TokenLogprob] | None = None
        self.first: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.request_id = self.request_id or chunk.request_id
        self.token_ids.extend(chunk.token_ids)
        self.text.append(chunk.text)
        if self.prompt_tokens is None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(chunk.logprobs)
        self.first = self.first or chunk
        self.last = chunk

    def result(self) -> Completion:
        last = self.last
        return Completion(
            request_id=self.request_id,
            token_ids=tuple(self.token_ids),
            text="".join(self.text),
            finish_reason=last.finish_reason if last else None,
            timings=last.timings if last else None,
            prompt_tokens=self.prompt_tokens,
            logprobs=tuple(self.logprobs) if self.logprobs is not None else None,
            prompt_logprobs=self.first.prompt_logprobs if self.first else None,
            prompt_token_ids=self.first.prompt_token_ids if self.first else None,
        )


__all__ = [
    "Assembler", "Chunk", "Completion", "Load", "NodeStatus", "Timings", "TokenLogprob", "chunk_from_proto",
    "node_from_proto",
]
