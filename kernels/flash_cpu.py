"""Prefill attention on aten's fused flash kernel (CPU), with LSE.

`aten._scaled_dot_product_flash_attention_for_cpu` computes attention in
tiles without materialising the score matrix and returns the natural-log LSE,
but its causal mask is top-left aligned and it wants equal Q and KV head
counts. A bottom-right causal row with `q_len < k_len` (a PCP query chunk, or
a chunk after cached context) is therefore computed as two calls merged by
LSE: the queries against the `k_len - q_len` earlier keys without a mask, and
against their own diagonal block with the causal mask.

Tested against `braid.kernels.reference.prefill_attention`.
"""
from __future__ import annotations

import torch

from braid.kernels.merge import merge_attn_states
from braid.kernels.reference import VarlenRows

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_row(q, k, v, scale, causal):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, Dv], lse [Lq, Hq] fp32."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    dk, dv = q.shape[2], v.shape[2]
    # The fused kernel wants one head dim for Q, K and V. Zero columns change
    # neither the scores (padding Q and K) nor the kept output (padding V).
    if dv < dk:
        v = torch.nn.functional.pad(v, (0, dk - dv))
    elif dk < dv:
        q = torch.nn.functional.pad(q, (0, dv - dk))
        k = torch.nn.functional.pad(k, (0, dv - dk))
    out, lse = _flash(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        0.0,
        causal,
        scale=scale,
    )
    # out [1, Hq, Lq, D]; lse [1, Hq, Lq]
    return out[0].transpose(0, 1)[..., :dv], lse[0].transpose(0, 1).float()


def flash_attention_row(q, k, v, scale: float, causal: bool):
    """One bottom-right-aligned row: q [Lq, Hq, Dk], k [Lk, Hkv, Dk], v [Lk, Hkv, Dv]."""
    lq, lk = q.shape[0], k.shape[0]
    if lq == 0 or lk == 0:
        return (
            q.new_zeros(lq, q.shape[1], v.shape[2]),
            torch.full((lq, q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device),
        )
    if not causal:
        return _flash_row(q, k, v, scale, False)
    if lq > lk:
        raise ValueError(f"causal row with more queries ({lq}) than keys ({lk})")
    ctx = lk - lq
    diag_out, diag_lse = _flash_row(q, k[ctx:], v[ctx:], scale, True)
    if ctx == 0:
        return diag_out, diag_lse
    prev_out, prev_lse = _flash_row(q, k[:ctx], v[:ctx], scale, False)
    return merge_attn_states(torch.stack([prev_out, diag_out]), torch.stack([prev_lse, diag_lse]))


def prefill_attention(q, k, v, rows: VarlenRows, scale: float, causal: bool = True):
    """Same contract as `braid.kernels.reference.prefill_attention`."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    for qs, lq, ks, lk in zip(rows.q_start, rows.q_len, rows.k_start, rows.k_len):
        if lq == 0:
            continue
        o, l = flash_attention_row(q[qs : qs + lq], k[ks : ks + lk], v[ks : ks + lk], scale, causal)
        out[qs : qs + lq] = o
        lse[qs : qs + lq] = l
    return out, lse
