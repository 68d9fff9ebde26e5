"""The engine's TokenLogprob records -> the wire's TokenLogprobs, for the node servicers.

In a request's life: the prefill node puts the first token's and the prompt's
logprobs in its PrefillResponse; the decode node puts one per streamed token in
each DecodeResponse (and, after a local prefill, the prompt's in its first one).
The router forwards them to the client unchanged.
"""
from __future__ import annotations

from braid.proto import common_pb2


def to_pb(lp) -> common_pb2.TokenLogprobs:
    """One braid.engine.logprobs.TokenLogprob as a TokenLogprobs message."""
    return common_pb2.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def placeholder(token_id: int) -> common_pb2.TokenLogprobs:
    """A token this node did not sample (a remote prefill's first token, sampled by
    the prefill node): rank 0 marks it, and the router fills in the prefill node's."""
    return common_pb2.TokenLogprobs(token_id=token_id)


def events_to_pb(events) -> list[common_pb2.TokenLogprobs]:
    """One TokenLogprobs per event that carries a token, in order."""
    return [to_pb(e.logprobs) if e.logprobs is not None else placeholder(e.token_id)
            for e in events if e.token_id is not None]


def prompt_to_pb(lps) -> list[common_pb2.TokenLogprobs]:
    return [to_pb(lp) for lp in lps or ()]
