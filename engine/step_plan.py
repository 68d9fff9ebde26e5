"""The rank-agnostic description of one engine step, and its tensor encoding.

Rank 0 schedules and broadcasts a StepPlan to the other ranks as one int64
tensor; every rank derives its own inputs (PCP split, slot mapping, local
sequence lengths) from it, so nothing rank-specific crosses the wire and no
pickle is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqPlan:
    num_computed: int
    """Tokens of the sequence already in the KV cache (its new tokens start here)."""
    token_ids: tuple[int, ...]
    """Tokens to run this step."""
    block_table: tuple[int, ...]

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.num_computed + len(self.token_ids)


@dataclass(frozen=True)
class TransferPlan:
    """KV of sequence `seq_index` goes to a decode instance during this prefill step."""

    seq_index: int
    transfer_id: int
    timeout_ms: int
    dest_layout: bytes
    """The decode instance's serialized KVLayout (with its endpoints)."""
    dest_block_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    is_prefill: bool
    seqs: tuple[SeqPlan, ...]
    transfers: tuple[TransferPlan, ...] = ()

    def encode(self) -> torch.Tensor:
        """[2 + 3*S + tokens + blocks] int64: is_prefill, S, then per sequence
        (num_computed, num_new, num_blocks), then all tokens, then all block tables."""
        head = [int(self.is_prefill), len(self.seqs)]
        for s in self.seqs:
            head += [s.num_computed, s.num_new, len(s.block_table)]
        body = [t for s in self.seqs for t in s.token_ids] + [b for s in self.seqs for b in s.block_table]
        body.append(len(self.transfers))
        for t in self.transfers:
            body += [t.seq_index, t.transfer_id, t.timeout_ms, len(t.dest_layout), len(t.dest_block_ids)]
            body += list(t.dest_layout) + list(t.dest_block_ids)
        return torch.tensor(head + body, dtype=torch.int64)

    @staticmethod
    def decode(t: torch.Tensor) -> "StepPlan":
        v = t.tolist()
        is_prefill, n = bool(v[0]), v[1]
        meta = [v[2 + 3 * i : 5 + 3 * i] for i in range(n)]
        pos = 2 + 3 * n
        tokens = []
        for _, num_new, _ in meta:
            tokens.append(tuple(v[pos : pos + num_new]))
            pos += num_new
        seqs = []
        for (computed, _, nb), toks in zip(meta, tokens):
            seqs.append(SeqPlan(computed, toks, tuple(v[pos : pos + nb])))
            pos += nb
        transfers = []
        count = v[pos]
        pos += 1
        for _ in range(count):
            seq_index, tid, timeout_ms, nbytes, nblocks = v[pos : pos + 5]
            pos += 5
            layout = bytes(v[pos : pos + nbytes])
            pos += nbytes
            transfers.append(TransferPlan(seq_index, tid, timeout_ms, layout, tuple(v[pos : pos + nblocks])))
            pos += nblocks
        return StepPlan(is_prefill, tuple(seqs), tuple(transfers))
