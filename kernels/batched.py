"""Paged decode attention for a whole batch in a few tensor ops (any device).

Gathers every sequence's blocks into one padded tensor and masks the tail, so
a decode step costs a handful of kernels instead of a Python loop over
sequences. Rows with the same block-table row (speculative decoding's k+1
verification rows of one sequence) share one gather: their queries are padded
into one group, so the cache is read once per sequence, not once per row.
Tested against `braid.kernels.reference.paged_decode_attention`.
"""
from __future__ import annotations

from typing import Sequence

import torch


def paged_decode_attention(
    q: torch.Tensor,  # [S, Hq, Dk]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dk]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dv]
    block_tables: torch.Tensor,  # [S, max_blocks]
    seq_lens: Sequence[int] | torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_seqs, hq, _ = q.shape
    _, hkv, bs, dv = v_cache.shape
    lens = torch.as_tensor(seq_lens, dtype=torch.long, device=q.device)
    if num_seqs == 0:
        return q.new_zeros(0, hq, dv), torch.zeros(0, hq, dtype=torch.float32, device=q.device)
    max_len = int(lens.max())
    if max_len == 0:
        return (
            q.new_zeros(num_seqs, hq, dv),
            torch.full((num_seqs, hq), float("-inf"), dtype=torch.float32, device=q.device),
        )
    nblocks = (max_len + bs - 1) // bs
    table = block_tables[:, :nblocks].long().clamp_min(0)  # [S, nb]
    if num_seqs > 1:
        uniq, group = torch.unique(table, dim=0, return_inverse=True)  # rows with one table row share a gather
        if uniq.shape[0] < num_seqs:
            return _grouped(q, k_cache, v_cache, uniq, group, lens, scale)
    flat = table.reshape(-1)  # index_select: far cheaper than advanced indexing on CPU
    k = k_cache.index_select(0, flat).view(num_seqs, nblocks, hkv, bs, -1)  # [S, nb, Hkv, B, Dk]
    v = v_cache.index_select(0, flat).view(num_seqs, nblocks, hkv, bs, dv)
    group = hq // hkv
    qf = q.float().view(num_seqs, hkv, group, -1)
    length = nblocks * bs
    # measured here: several short sequences are fastest contracted in the blocked layout,
    # one sequence or long ones after one copy into [S, Hkv, L, D]
    blocked = num_seqs > 1 and length <= 512
    if blocked:
        s = torch.einsum("shgd,snhbd->shgnb", qf, k.float()).reshape(num_seqs, hkv, group, length) * scale
    else:
        k = k.permute(0, 2, 1, 3, 4).reshape(num_seqs, hkv, length, -1)  # [S, Hkv, L, Dk]
        v = v.permute(0, 2, 1, 3, 4).reshape(num_seqs, hkv, length, dv)
        s = torch.einsum("shgd,shld->shgl", qf, k.float()) * scale  # [S, Hkv, G, L]
    pad = torch.arange(length, device=q.device)[None, :] >= lens[:, None]  # [S, L]
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [S, Hkv, G]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])
    if blocked:
        out = torch.einsum("shgnb,snhbd->shgd", p.view(num_seqs, hkv, group, nblocks, bs), v.float())
    else:
        out = torch.einsum("shgl,shld->shgd", p, v.float())
    return out.reshape(num_seqs, hq, dv).to(q.dtype), lse.reshape(num_seqs, hq)


def _grouped(q, k_cache, v_cache, tables, group, lens, scale):
    """paged_decode_attention for rows in groups that share a block-table row: tables
    [U, nb] the distinct rows, group [S] each query row's. Each group's blocks are gathered
    once; its rows' queries are padded to the largest group, [U, R, ...], and masked by
    their own lengths."""
    num_seqs, hq, _ = q.shape
    _, hkv, bs, dv = v_cache.shape
    u, nblocks = tables.shape
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=u)  # [U]
    first = torch.cumsum(counts, 0) - counts  # [U] each group's first index in `order`
    slot = torch.empty_like(group)
    slot[order] = torch.arange(num_seqs, device=q.device) - first[group[order]]  # row's place in its group
    r = int(counts.max())
    flat = tables.reshape(-1)
    k = k_cache.index_select(0, flat).view(u, nblocks, hkv, bs, -1).permute(0, 2, 1, 3, 4).reshape(u, hkv, nblocks * bs, -1)
    v = v_cache.index_select(0, flat).view(u, nblocks, hkv, bs, dv).permute(0, 2, 1, 3, 4).reshape(u, hkv, nblocks * bs, dv)
    g = hq // hkv
    qp = q.new_zeros(u, r, hkv, g, q.shape[-1], dtype=torch.float32)
    qp[group, slot] = q.float().view(num_seqs, hkv, g, -1)
    lp = torch.zeros(u, r, dtype=torch.long, device=q.device)
    lp[group, slot] = lens
    s = torch.einsum("urhgd,uhld->urhgl", qp, k.float()) * scale  # [U, R, Hkv, G, L]
    pad = torch.arange(nblocks * bs, device=q.device)[None, None, :] >= lp[:, :, None]  # [U, R, L]
    s = s.masked_fill(pad[:, :, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [U, R, Hkv, G]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])
    out = torch.einsum("urhgl,uhld->urhgd", p, v.float())[group, slot]  # [S, Hkv, G, Dv]
    return out.reshape(num_seqs, hq, dv).to(q.dtype), lse[group, slot].reshape(num_seqs, hq)
