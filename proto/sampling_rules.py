"""The one statement of which sampling settings a request may carry.

A request's sampling settings are checked where they enter each process: the
router checks the `SamplingParams` message of every Generate call (so a bad
request is refused before any node is touched), the nodes check it again when
they build the engine's `SamplingParams`, and the offline `LLM` checks what its
caller passed. All of them call `check_sampling_values`, so the router can
never accept what the engine would refuse, nor the other way round.

`check_sampling(pb)` and `sampling_kwargs(pb)` read a `braid.v1.SamplingParams`
message (wire defaults resolved: unset top_p is 1.0, unset seed is None), so the
router and the nodes check and convert it without importing the client SDK.

Plain Python (no torch, and no protobuf import: the message is read through its
attributes): it lives beside the wire definitions because it is part of the wire
contract, and proto is the one package below both the client side and the engine.
"""
from __future__ import annotations

import math


def _is_int(value) -> bool:
    # bool is an int subclass, but True tokens or a top_k of False is a caller's mistake
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_LOGPROBS = 20
"""Most alternatives a request may ask for at each position (logprobs, prompt_logprobs)."""
MAX_SPECULATIVE_TOKENS = 16
"""Most draft tokens one sequence may verify in one decode step."""
SPECULATIVE_METHODS = ("ngram", "draft", "mtp")
"""Proposers a request may name: "ngram" (prompt lookup) everywhere, "draft" (a smaller
model) where the engine loaded one; a node refuses one its engine has not."""


def check_sampling_values(*, max_tokens, temperature, top_k, top_p, logprobs=None, prompt_logprobs=None,
                          num_speculative_tokens=None, speculative_method=None) -> None:
    """Raise ValueError naming the field when a setting is out of its range.

    max_tokens: an integer >= 1. temperature: a finite number >= 0 (0 = greedy).
    top_k: -1 or 0 (both: off) or a positive integer. top_p: in (0, 1]; a wire
    message that leaves it unset means 1.0, and the caller resolves that first.
    logprobs, prompt_logprobs: None (not asked) or an integer in [0, MAX_LOGPROBS].
    num_speculative_tokens: None (the engine's setting) or an integer in
    [0, MAX_SPECULATIVE_TOKENS] (0: no speculation). speculative_method: None (the
    engine's) or one of SPECULATIVE_METHODS.
    """
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < -1:
        raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {top_k!r}")
    if not (_is_number(top_p) and 0 < top_p <= 1):  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
            raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (or unset), got {value!r}")
    k = num_speculative_tokens
    if k is not None and (not _is_int(k) or not 0 <= k <= MAX_SPECULATIVE_TOKENS):
        raise ValueError(f"num_speculative_tokens must be an integer in [0, {MAX_SPECULATIVE_TOKENS}] (or unset), "
                         f"got {k!r}")
    if speculative_method is not None and speculative_method not in SPECULATIVE_METHODS:
        raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)} (or unset), "
                         f"got {speculative_method!r}")


def _optional(pb, name: str):
    """An optional uint field of the message as an int, None when unset."""
    return int(getattr(pb, name)) if pb.HasField(name) else None


def check_sampling(pb) -> None:
    """Raise ValueError with the reason when a received SamplingParams message is not acceptable."""
    check_sampling_values(
        max_tokens=pb.max_tokens,
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,  # unset is 1.0; an explicit 0 is refused
        logprobs=_optional(pb, "logprobs"),
        prompt_logprobs=_optional(pb, "prompt_logprobs"),
        num_speculative_tokens=_optional(pb, "num_speculative_tokens"),
        speculative_method=pb.speculative_method if pb.HasField("speculative_method") else None,
    )


def sampling_kwargs(pb) -> dict:
    """A checked SamplingParams message as plain keyword arguments, wire defaults resolved
    (unset top_p -> 1.0, unset seed -> None, logprobs and prompt_logprobs only when set);
    fits `braid.engine.SamplingParams(**kw)`."""
    kw = dict(
        max_tokens=int(pb.max_tokens),
        temperature=float(pb.temperature),
        top_k=int(pb.top_k),
        top_p=float(pb.top_p) if pb.HasField("top_p") else 1.0,
        seed=int(pb.seed) if pb.HasField("seed") else None,
        stop_token_ids=tuple(int(t) for t in pb.stop_token_ids),
        ignore_eos=bool(pb.ignore_eos),
    )
    # only when asked: unset means the engine's default (None, no logprobs)
    for name in ("logprobs", "prompt_logprobs", "num_speculative_tokens"):
        if pb.HasField(name):
            kw[name] = int(getattr(pb, name))
    if pb.HasField("speculative_method"):
        kw["speculative_method"] = str(pb.speculative_method)
    return kw


__all__ = ["MAX_LOGPROBS", "MAX_SPECULATIVE_TOKENS", "SPECULATIVE_METHODS", "check_sampling", "check_sampling_values", "sampling_kwargs"]
