"""Paged attention with the KV cache sharded along tokens (DCP, PCP).

One step of one layer, on one rank:

prefill  1. (PCP) all-gather the new tokens' KV over the PCP group and restore
            token order, so every rank sees the whole chunk's K/V.
         2. write each token's KV on its owner shard only (slot -1 elsewhere).
         3. attend each local query row against the chunk's K/V, causal
            (PCP query chunks are rows whose keys are the prefix up to the
            chunk's end). No communication: every rank has all the new K/V.
         4. (a chunk after cached context: chunked prefill, a prefix-cache hit,
            a decode token batched with prefill chunks) the context's KV is
            sharded over the KV shards: all-gather the chunk's queries (PCP:
            tokens, DCP: heads), attend them to the local shard of the context
            without a mask, merge the shards by LSE as decode does, keep the
            local tokens, and merge that with step 3's result by LSE.
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
from braid.kernels.merge import merge_attn_states
from braid.kernels.reference import VarlenRows, gather_paged
from braid.engine.parallel_state import ParallelState


@dataclass
class ContextMeta:
    """Prefill over cached context: what every rank needs to attend the step's new
    tokens (in full order) to the context tokens its own shard stores."""

    block_tables: torch.Tensor
    """[S, max_blocks] block ids of each sequence."""
    local_lens: list[int]
    """Context tokens of each sequence on this rank's shard (those before its new tokens)."""
    rows: VarlenRows
    """New tokens (full order) against the concatenated local contexts, one row per sequence."""
    local_tokens: torch.Tensor | None = None
    """Under PCP: the full-order index of each of this rank's new tokens."""


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
    context: ContextMeta | None = None
    """Prefill: the cached context some sequences' new tokens also attend to."""

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the partial results of all KV shards; returns this rank's heads
    (out [S, H, Dv] fp32, lse [S, H])."""
    packed = torch.cat([out.float(), lse[..., None]], dim=-1)  # [S, Hg, Dv+1]
    if par.pcp.size > 1:
        parts = par.pcp.all_gather(packed)  # [pcp, S, Hg, Dv+1]
        o, l = merge_attn_states(parts[..., :-1], parts[..., -1])
        packed = torch.cat([o, l[..., None]], dim=-1)
    if par.dcp.size > 1:
        s, hg, d1 = packed.shape
        send = packed.view(s, par.dcp.size, hg // par.dcp.size, d1).transpose(0, 1)  # [dcp, S, H, Dv+1]
        parts = par.dcp.all_to_all(send)
        return merge_attn_states(parts[..., :-1], parts[..., -1])
    return packed[..., :-1], packed[..., -1]


def _gather_heads(q: torch.Tensor, par: ParallelState) -> torch.Tensor:
    """[T, H, D] this rank's query heads -> [T, H * dcp, D] the DCP group's (it shares KV heads)."""
    if par.dcp.size == 1:
        return q
    t, h, _ = q.shape
    return par.dcp.all_gather(q).permute(1, 0, 2, 3).reshape(t, par.dcp.size * h, -1)


def cp_decode_attention(
    q: torch.Tensor,  # [S, H, Dk] this rank's query heads
    k_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dk]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dv]
    meta: AttentionMetadata,
    par: ParallelState,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a token-sharded cache; returns [S, H, Dv] in q's dtype."""
    sharded = par.pcp.size > 1 or par.dcp.size > 1
    dtype = q.dtype
    q = _gather_heads(q, par)
    out, lse = ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.local_seq_lens, scale)
    if not sharded:
        return out
    return merge_over_shards(out, lse, par)[0].to(dtype)


def context_attention(
    q: torch.Tensor,  # [T_local, H, Dk] this rank's new tokens, its query heads
    k_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dk]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dv]
    meta: AttentionMetadata,
    par: ParallelState,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new tokens' attention to their sequences' cached context (no mask: every
    context token precedes every new one), over all KV shards. Returns this rank's
    tokens' (out [T_local, H, Dv] fp32, lse [T_local, H]). Every rank of the instance
    calls it in the same steps (it runs collectives)."""
    ctx = meta.context
    q_all = _gather_heads(meta.gather_new_tokens(q, par), par)  # [T_full, H * dcp, Dk]
    ks, vs = [], []
    for s, n in enumerate(ctx.local_lens):
        if n:
            ks.append(gather_paged(k_cache, ctx.block_tables[s], n))
            vs.append(gather_paged(v_cache, ctx.block_tables[s], n))
    if ks:
        out, lse = ops.prefill_attention(q_all, torch.cat(ks), torch.cat(vs), ctx.rows, scale, causal=False)
    else:  # this shard holds none of the context: an empty partial
        out = q_all.new_zeros(*q_all.shape[:2], v_cache.shape[-1])
        lse = torch.full(q_all.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    if par.pcp.size > 1 or par.dcp.size > 1:
        out, lse = merge_over_shards(out, lse, par)
    if ctx.local_tokens is not None:
        out, lse = out.index_select(0, ctx.local_tokens), lse.index_select(0, ctx.local_tokens)
    return out.float(), lse


def with_context(out: torch.Tensor, lse: torch.Tensor, ctx_out: torch.Tensor, ctx_lse: torch.Tensor) -> torch.Tensor:
    """Merge attention over the new tokens with attention over the cached context (both
    partial results over disjoint keys) by LSE; returns out's dtype."""
    merged, _ = merge_attn_states(torch.stack([out.float(), ctx_out]), torch.stack([lse, ctx_lse]))
    return merged.to(out.dtype)


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
            out, lse = ops.prefill_attention(q, kv[:, 0], kv[:, 1], meta.rows, self.scale)
            if meta.context is None:
                return out
            ctx = context_attention(q, self.cache[:, 0], self.cache[:, 1], meta, self.par, self.scale)
            return with_context(out, lse, *ctx)
        ops.write_kv_cache(self.cache, kv, meta.slot_mapping)
        return cp_decode_attention(q, self.cache[:, 0], self.cache[:, 1], meta, self.par, self.scale)
