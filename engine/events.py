"""What the engine hands back to its caller: one TokenEvent per new token or
end of a request, and the typed errors its entry points raise (each mapped to
one gRPC status by braid.node.errors)."""
from __future__ import annotations

from dataclasses import dataclass


class Overloaded(RuntimeError):
    """No room right now (KV blocks); retry later or elsewhere."""


class DuplicateRequest(ValueError):
    """The request id is already held here (running, reserved or transferring):
    the new request is refused and the one holding the id is left alone."""


class UnknownRequest(LookupError):
    """No such request (or reservation) here: never made, already claimed, or ended."""


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a request, or its end."""

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None
    """stop, length, abort, transferred (prefill side) or error."""
    error: str | None = None
    stats: dict | None = None
    """Prefill side of a transfer: prefill_s, transfer_s, kv_bytes."""
    logprobs: object = None
    """The token's TokenLogprob (braid.engine.logprobs) when the request asked for logprobs
    and this engine sampled it (a remote prefill's first token on the decode side has none)."""
    prompt_logprobs: list | None = None
    """On the event of the first token (or a transfer's "transferred" event): the prompt's
    TokenLogprobs, tokens 1..N-1, when the request asked for prompt_logprobs."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from a prefix cache instead of being computed."""
