"""The rank-agnostic description of one engine step, its tensor encoding, and
what rank 0 gets back from it.

Rank 0 schedules and broadcasts a StepPlan to the other ranks as one int64
tensor (`to_tensor` / `from_tensor`); every rank derives its own inputs (PCP
split, slot mapping, local sequence lengths) from it, so nothing rank-specific
crosses the wire and no pickle is used. The plan also carries the KV
connector's metadata for the step; a plan may have no sequences and only that
metadata (a connector-only step: transfers in flight, a reservation to flush).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from braid.engine.kv_connector.metadata import KVConnectorMeta, TransferRef


@dataclass(frozen=True)
class SeqPlan:
    num_computed: int
    """Tokens of the sequence already in the KV cache (its new tokens start here)."""
    token_ids: tuple[int, ...]
    """Tokens to run this step."""
    block_table: tuple[int, ...]
    prompt_logprobs: int = -1
    """Prefill only: compute the prompt's logprobs with this many alternatives; -1: not asked."""
    num_logits: int = 1
    """Logits rows for the last this many new tokens (a speculative step's verification:
    the last emitted token and its k drafts, k+1 rows); 1: the last token's only."""
    next_token: int = -1
    """The token after these (a prompt chunk that is not the last: the next chunk's first);
    -1: not known yet. The MTP layer's row of the last new token needs it."""

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.num_computed + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    is_prefill: bool
    seqs: tuple[SeqPlan, ...]
    kv: KVConnectorMeta = KVConnectorMeta()
    copies: tuple[tuple[int, int], ...] = ()
    """(source, destination) block ids every rank copies (all layers) before the step runs:
    a prefix-cache hit's partly shared block (copy on write)."""

    def to_tensor(self) -> torch.Tensor:
        """[3 + 6*S + 2*copies + tokens + blocks + kv] int64: is_prefill, S, number of
        copies, then per sequence (num_computed, num_new, num_blocks, prompt_logprobs, num_logits,
        next_token),
        the copies' (source, destination) pairs, all tokens, all block tables, then
        the connector metadata (KVConnectorMeta.encode)."""
        head = [int(self.is_prefill), len(self.seqs), len(self.copies)]
        for s in self.seqs:
            head += [s.num_computed, s.num_new, len(s.block_table), s.prompt_logprobs, s.num_logits, s.next_token]
        head += [b for pair in self.copies for b in pair]
        body = [t for s in self.seqs for t in s.token_ids] + [b for s in self.seqs for b in s.block_table]
        return torch.tensor(head + body + self.kv.encode(), dtype=torch.int64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "StepPlan":
        v = t.tolist()
        is_prefill, n, nc = bool(v[0]), v[1], v[2]
        meta = [v[3 + 6 * i : 9 + 6 * i] for i in range(n)]
        pos = 3 + 6 * n
        copies = tuple((v[pos + 2 * i], v[pos + 2 * i + 1]) for i in range(nc))
        pos += 2 * nc
        tokens = []
        for _, num_new, *_ in meta:
            tokens.append(tuple(v[pos : pos + num_new]))
            pos += num_new
        seqs = []
        for (computed, _, nb, plp, nl, nxt), toks in zip(meta, tokens):
            seqs.append(SeqPlan(computed, toks, tuple(v[pos : pos + nb]), plp, nl, nxt))
            pos += nb
        kv, _ = KVConnectorMeta.decode(v, pos)
        return StepPlan(is_prefill, tuple(seqs), kv, copies)


@dataclass(frozen=True)
class StepResult:
    """What rank 0 learns from one step."""

    logits: torch.Tensor | None
    """[sum of num_logits, vocab] fp32: each sequence's rows in order (its last token's
    alone unless its plan asked for more); None for a connector-only step."""
    states: tuple[int, ...] = ()
    """Agreed state (DONE, PENDING, FAILED) of each transfer in the plan's kv.progress."""
    first_tokens: dict[int, int] = field(default_factory=dict)
    """Incoming transfer id -> the first token (the trailer rank 0 received)."""
    errors: dict[TransferRef, str] = field(default_factory=dict)
    """What rank 0 saw go wrong with a failed transfer ("kind: detail"), if it saw anything."""
    kv_bytes: dict[int, int] = field(default_factory=dict)
    """Outgoing transfer id -> bytes it moves (every layer), from the plan its send made."""
    prompt_logprobs: dict[int, list] = field(default_factory=dict)
    """Sequence index -> its prompt's TokenLogprobs (tokens 1..N-1), for the sequences whose plan asked."""
