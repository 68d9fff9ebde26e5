"""Latent (MLA) decode attention: MQA over the paged latent cache, with LSE.

DeepSeek's multi-head latent attention caches one "head" per token,
`kv_c_normed (kv_lora_rank) || k_pe (rope dim)`. With the key up-projection
absorbed into the query (`q_nope @ W_UK`), decode is plain MQA over that cache:
keys are the whole latent, values its first `kv_lora_rank` dims. The engine
therefore runs `ops.paged_decode_attention` on two views of one cache layer
(`latent_views`); `mla_decode_attention` below is the plain reference for it.

Same conventions as `braid.kernels.reference`: natural-log LSE in fp32, a
sequence with no cached tokens gives out 0 and lse -inf.
"""
from __future__ import annotations

from typing import Sequence

import torch

from braid.kernels.reference import dense_attention, gather_paged


def latent_views(cache: torch.Tensor, kv_lora_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's latent cache [num_blocks, C=1, H=1, B, L+R] -> (keys [num_blocks, 1, B, L+R],
    values [num_blocks, 1, B, L]); both are views, nothing is copied."""
    k = cache[:, 0]
    return k, k[..., :kv_lora_rank]


def mla_decode_attention(
    q: torch.Tensor,  # [S, H, L+R]: absorbed q_nope (L) || q_pe (R), one token per sequence
    latent_cache: torch.Tensor,  # [num_blocks, 1, B, L+R]
    kv_lora_rank: int,
    block_tables: torch.Tensor,  # [S, max_blocks]
    seq_lens: Sequence[int],  # tokens of each sequence in this cache (local lengths under DCP)
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: every query head attends over all `seq_lens[s]` cached latents.
    Returns out [S, H, L] (q's dtype) and lse [S, H] fp32."""
    out = q.new_zeros(q.shape[0], q.shape[1], kv_lora_rank)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for s, length in enumerate(seq_lens):
        if length == 0:
            continue
        latent = gather_paged(latent_cache, block_tables[s], int(length))  # [length, 1, L+R]
        o, l = dense_attention(q[s : s + 1], latent, latent[..., :kv_lora_rank], scale, causal=False)
        out[s], lse[s] = o[0], l[0]
    return out, lse
