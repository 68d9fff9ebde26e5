"""Sampling settings on the wire: one set of rules for the client, the router and the nodes.

Three steps, kept apart so each side uses what it needs:

- `build_sampling(...)` encodes keyword arguments into `common_pb2.SamplingParams`,
  refusing only values the wire types cannot carry (a negative `max_tokens` in a
  uint32, a token id past 2**32). The client uses it so that semantically bad
  values still reach the server, which answers INVALID_ARGUMENT with the reason.
- `check_sampling(pb)` applies the semantic rules to a received message and raises
  `ValueError` with the reason; the router and the nodes call it on every request.
- `validate_sampling(...)` is both: keyword arguments in, a checked message out.

`check_sampling` and `sampling_kwargs` live in `braid.proto.sampling_rules` (so the
nodes need not import the client SDK) and are re-exported here. The rules are
`check_sampling_values` there, the one copy that `braid.engine.SamplingParams`
applies too: max_tokens >= 1, temperature a finite number >= 0 (0 = greedy),
top_k -1, 0 (off) or positive, top_p in (0, 1] (an optional field: unset means
1.0, an explicit 0 is refused), logprobs and prompt_logprobs unset or in [0, 20].
"""
from __future__ import annotations

from collections.abc import Iterable

from braid.proto import common_pb2
from braid.proto.sampling_rules import check_sampling, sampling_kwargs  # re-exported: part of this API

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def _as_int(name: str, value, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def _as_float(name: str, value) -> float:
    """`value` as a float (NaN and infinities pass: the semantic check rejects them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def build_sampling(
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
) -> common_pb2.SamplingParams:
    """Encode sampling settings; ValueError only for values the wire types cannot hold."""
    pb = common_pb2.SamplingParams(
        max_tokens=_as_int("max_tokens", max_tokens, 0, UINT32_MAX),
        temperature=_as_float("temperature", temperature),
        top_k=_as_int("top_k", top_k, INT32_MIN, INT32_MAX),
        top_p=_as_float("top_p", top_p),
        stop_token_ids=[_as_int("stop_token_ids[]", t, 0, UINT32_MAX) for t in stop_token_ids],
        ignore_eos=bool(ignore_eos),
    )
    if seed is not None:
        pb.seed = _as_int("seed", seed, 0, UINT64_MAX)
    stop = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    pb.stop.extend(stop)  # matched by the router on the decoded text (braid.router.stop)
    if logprobs is not None:  # unset means none; 0 means the sampled token's own logprob only
        pb.logprobs = _as_int("logprobs", logprobs, 0, UINT32_MAX)
    if prompt_logprobs is not None:
        pb.prompt_logprobs = _as_int("prompt_logprobs", prompt_logprobs, 0, UINT32_MAX)
    if num_speculative_tokens is not None:  # unset means the decode node's setting
        pb.num_speculative_tokens = _as_int("num_speculative_tokens", num_speculative_tokens, 0, UINT32_MAX)
    if speculative_method is not None:
        if not isinstance(speculative_method, str):
            raise ValueError(f"speculative_method must be a string, got {speculative_method!r}")
        pb.speculative_method = speculative_method
    return pb


def validate_sampling(**kwargs) -> common_pb2.SamplingParams:
    """Keyword arguments of `build_sampling` in, a checked SamplingParams out (ValueError otherwise)."""
    pb = build_sampling(**kwargs)
    check_sampling(pb)
    return pb


__all__ = ["build_sampling", "check_sampling", "sampling_kwargs", "validate_sampling"]
