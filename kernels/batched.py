"""Paged decode attention for a whole batch in a few tensor ops (any device).

Gathers every sequence's blocks into one padded tensor and masks the tail, so
a decode step costs a handful of kernels instead of a Python loop over
sequences. Tested against `braid.kernels.reference.paged_decode_attention`.
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
    k = k_cache[table]  # [S, nb, Hkv, B, Dk]
    v = v_cache[table]
    k = k.permute(0, 2, 1, 3, 4).reshape(num_seqs, hkv, nblocks * bs, -1)  # [S, Hkv, L, Dk]
    v = v.permute(0, 2, 1, 3, 4).reshape(num_seqs, hkv, nblocks * bs, dv)
    group = hq // hkv
    qf = q.float().view(num_seqs, hkv, group, -1)
    s = torch.einsum("shgd,shld->shgl", qf, k.float()) * scale  # [S, Hkv, G, L]
    pad = torch.arange(nblocks * bs, device=q.device)[None, :] >= lens[:, None]  # [S, L]
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [S, Hkv, G]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])
    out = torch.einsum("shgl,shld->shgd", p, v.float()).reshape(num_seqs, hq, dv)
    return out.to(q.dtype), lse.reshape(num_seqs, hq)
