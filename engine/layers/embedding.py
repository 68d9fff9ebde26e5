"""Vocabulary-parallel embedding and LM head: each TP rank holds a contiguous
range of `ceil(vocab / tp)` rows (the last range zero-padded)."""
from __future__ import annotations

import torch
from torch import nn

from braid.engine.parallel_state import GroupComm


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: GroupComm, dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank_in_group * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param, lazy, shard_id=None):
        rows = self.end - self.start
        value = lazy.narrow(0, self.start, rows)
        if tuple(value.shape) != (rows, param.shape[1]):
            raise ValueError(f"{lazy.name}: checkpoint shape {tuple(lazy.shape)} does not fit vocab {self.vocab_size} x {param.shape[1]}")
        param.data[:rows].copy_(value)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = nn.functional.embedding(local, self.weight)
        out = out * mine[:, None].to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Logits for a few positions: local vocab slice, then all-gathered."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, dtype):
        super().__init__()
        self.tp = embedding.tp
        self.vocab_size = embedding.vocab_size
        self._tied = embedding.weight if tied else None
        if tied:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.zeros_like(embedding.weight, dtype=dtype), requires_grad=False)
            self.weight.weight_loader = embedding._load

    _packed: torch.Tensor | None = None

    def prepack(self) -> bool:
        """Pack the head for oneDNN on CPU (see LinearBase.prepack); a tied head keeps the
        embedding's plain weight, which the lookup reads, and packs a copy."""
        from braid.engine.layers.linear import cpu_packing_supported, pack_weight

        w = self.weight
        if w.device.type != "cpu" or not cpu_packing_supported(w.dtype):
            return False
        self._packed = pack_weight(w)
        self._packed_out = w.shape[0]
        if w is not self._tied:
            self.weight = nn.Parameter(w.new_empty(0), requires_grad=False)
        return True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            from braid.engine.layers.linear import packed_linear

            logits = packed_linear(hidden, self._packed, self._packed_out)
        else:
            logits = nn.functional.linear(hidden, self.weight)  # [S, V/tp]
        if self.tp.size > 1:
            parts = self.tp.all_gather(logits)  # [tp, S, V/tp]
            logits = parts.permute(1, 0, 2).reshape(hidden.shape[0], -1)
        return logits[:, : self.vocab_size]
