"""Paged attention with the KV cache sharded along tokens (DCP, PCP).

One step of one layer, on one rank:

prefill  1. (PCP) all-gather the new tokens' KV over the PCP group and restore
            token order, so every rank sees the whole prompt's K/V.
         2. write each token's KV on its owner shard only (slot -1 elsewhere).
         3. attend each local query row against the prompt's K/V, causal
            (PCP query chunks are rows whose keys are the prefix up to the
            chunk's end). No communication: every rank has all the new K/V.
decode   1. write the new token's KV on its owner shard.
         2. (DCP) all-gather the query over the DCP group along heads: the
            group shares its KV heads, so each rank can serve every query head.
         3. attend over the local shard only (local sequence lengths).
         4. merge the partial results exactly by LSE: all-gather over PCP
            (shards of the same heads), then one all-to-all of packed
            `[out || lse]` over DCP that hands each rank its own heads back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from braid.kernels import ops
from braid.kernels.reference import VarlenRows, merge_attn_states
from braid.engine.parallel_state import ParallelState


@dataclass
class AttentionMetadata:
    """Per-step inputs shared by every attention layer on one rank."""

    is_prefill: bool
    slot_mapping: torch.Tensor
    """[T_full] slot of each new token on this rank, -1 where another shard stores it.
    T_full counts all new tokens of the step (under PCP, after the all-gather)."""
    rows: VarlenRows | None = None
    """Prefill: local query rows against the full new tokens."""
    pcp_restore: torch.Tensor | None = None
    """Prefill under PCP: index into the flattened [pcp, pcp_pad] all-gather giving token order."""
    pcp_pad: int = 0
    block_tables: torch.Tensor | None = None
    """Decode: [S, max_blocks] block ids (the same on every rank)."""
    local_seq_lens: torch.Tensor | None = None
    """Decode: [S] tokens of each sequence stored on this rank, the new one included."""
    on_layer_written: Callable[[int], None] | None = None
    """Prefill with KV transfer: called with the layer index once its KV is in the cache."""

    def layer_written(self, layer_idx: int) -> None:
        if self.on_layer_written is not None:
            self.on_layer_written(layer_idx)

    def gather_new_tokens(self, x: torch.Tensor, par: ParallelState) -> torch.Tensor:
        """[T_local, ...] per-token values -> [T_full, ...] in token order (PCP all-gather)."""
        if self.pcp_restore is None:
            return x
        pad = self.pcp_pad - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        gathered = par.pcp.all_gather(x)  # [pcp, pcp_pad, ...]
        return gathered.flatten(0, 1).index_select(0, self.pcp_restore)


def merge_over_shards(
    out: torch.Tensor,  # [S, H * dcp, Dv] partial attention over this rank's shard
    lse: torch.Tensor,  # [S, H * dcp]
    par: ParallelState,
) -> torch.Tensor:
    """Combine the partial results of all KV shards; returns this rank's heads [S, H, Dv] (fp32)."""
    packed = torch.cat([out.float(), lse[..., None]], dim=-1)  # [S, Hg, Dv+1]
    if par.pcp.size > 1:
        parts = par.pcp.all_gather(packed)  # [pcp, S, Hg, Dv+1]
        o, l = merge_attn_states(parts[..., :-1], parts[..., -1])
        packed = torch.cat([o, l[..., None]], dim=-1)
    if par.dcp.size > 1:
        s, hg, d1 = packed.shape
        send = packed.view(s, par.dcp.size, hg // par.dcp.size, d1).transpose(0, 1)  # [dcp, S, H, Dv+1]
        parts = par.dcp.all_to_all(send)
        o, _ = merge_attn_states(parts[..., :-1], parts[..., -1])
        return o
    return packed[..., :-1]


def cp_decode_attention(
    q: torch.Tensor,  # [S, H, Dk] this rank's query heads
    k_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dk]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dv]
    meta: AttentionMetadata,
    par: ParallelState,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a token-sharded cache; returns [S, H, Dv] in q's dtype."""
    s, h, _ = q.shape
    sharded = par.pcp.size > 1 or par.dcp.size > 1
    if par.dcp.size > 1:
        q = par.dcp.all_gather(q).permute(1, 0, 2, 3).reshape(s, par.dcp.size * h, -1)
    out, lse = ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.local_seq_lens, scale)
    if not sharded:
        return out
    return merge_over_shards(out, lse, par).to(q.dtype)


class Attention(nn.Module):
    """GQA attention over one layer's paged cache `[num_blocks, 2, Hkv, B, D]`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, par: ParallelState):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.par = par
        self.cache: torch.Tensor | None = None  # bound by the worker after allocation
        self.layer_idx = -1  # bound by the worker too

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        # q [T, H, D], k/v [T, Hkv, D] for this rank's tokens
        kv = torch.stack((k, v), dim=1)  # [T, 2, Hkv, D]
        if meta.is_prefill:
            kv = meta.gather_new_tokens(kv, self.par)  # [T_full, 2, Hkv, D]
            ops.write_kv_cache(self.cache, kv, meta.slot_mapping)
            meta.layer_written(self.layer_idx)
            out, _ = ops.prefill_attention(q, kv[:, 0], kv[:, 1], meta.rows, self.scale)
            return out
        ops.write_kv_cache(self.cache, kv, meta.slot_mapping)
        return cp_decode_attention(q, self.cache[:, 0], self.cache[:, 1], meta, self.par, self.scale)
