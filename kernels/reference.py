"""Torch reference attention ops: the ground truth every faster kernel is tested against.

Conventions shared by every op in `braid.kernels`:
- Every attention op returns `(out, lse)`; `lse` is the natural-log log-sum-exp of
  the scaled scores, fp32, shape `[num_tokens, num_heads]`.
- A query that sees no key returns `out = 0`, `lse = -inf`, so the LSE merge
  treats it as an empty shard.
- GQA: query head `h` reads KV head `h // (num_q_heads // num_kv_heads)`.
- Causal rows are bottom-right aligned: in a row with `q_len` queries and
  `k_len` keys, query `i` sits at key position `k_len - q_len + i` and sees
  keys `j <= k_len - q_len + i`. A plain prefill has `q_len == k_len`; a PCP
  query chunk is a row whose keys are the whole prefix up to its end.
- Paged KV cache layer layout: `[num_blocks, C, H, B, D]` where C is the number
  of cached components (2 = K and V for GQA, 1 = the latent for MLA), H the
  local KV heads (1 for MLA), B the block size. Attention ops take
  `[num_blocks, H, B, D]` views of one component.

These ops favour clarity over speed; `braid.kernels.ops` picks faster
implementations that are tested against these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class VarlenRows:
    """Rows of a varlen attention call: row i has queries `q[q_start:q_start+q_len]`
    and keys `k[k_start:k_start+k_len]` (rows may share keys, e.g. PCP chunks)."""

    q_start: Sequence[int]
    q_len: Sequence[int]
    k_start: Sequence[int]
    k_len: Sequence[int]

    @staticmethod
    def packed(q_lens: Sequence[int], k_lens: Sequence[int]) -> "VarlenRows":
        """Rows laid end to end in both q and k (ordinary varlen batch)."""
        qs, ks, q0, k0 = [], [], 0, 0
        for lq, lk in zip(q_lens, k_lens):
            qs.append(q0)
            ks.append(k0)
            q0 += lq
            k0 += lk
        return VarlenRows(tuple(qs), tuple(q_lens), tuple(ks), tuple(k_lens))

    def __len__(self) -> int:
        return len(self.q_len)


def dense_attention(
    q: torch.Tensor,  # [Lq, Hq, Dk]
    k: torch.Tensor,  # [Lk, Hkv, Dk]
    v: torch.Tensor,  # [Lk, Hkv, Dv]
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one row, in fp32. Returns out [Lq, Hq, Dv] (q's dtype), lse [Lq, Hq]."""
    lq, hq, _ = q.shape
    lk, hkv, dv = v.shape
    if lq == 0:
        return q.new_zeros(0, hq, dv), torch.zeros(0, hq, dtype=torch.float32, device=q.device)
    group = hq // hkv
    qf = q.float().view(lq, hkv, group, -1)
    s = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * scale  # [Hkv, G, Lq, Lk]
    if causal:
        qpos = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        kpos = torch.arange(lk, device=q.device)[None, :]
        s = s.masked_fill(kpos > qpos, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, Lq]; -inf where a query sees nothing
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])
    out = torch.einsum("hgqk,khd->qhgd", p, v.float()).reshape(lq, hq, dv)
    return out.to(q.dtype), lse.reshape(hq, lq).t().contiguous()


def prefill_attention(
    q: torch.Tensor,  # [Tq, Hq, Dk]
    k: torch.Tensor,  # [Tk, Hkv, Dk]
    v: torch.Tensor,  # [Tk, Hkv, Dv]
    rows: VarlenRows,
    scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention over rows (see VarlenRows). Tokens of q outside every row
    get out 0 and lse -inf. Returns out [Tq, Hq, Dv], lse [Tq, Hq] fp32."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    for qs, lq, ks, lk in zip(rows.q_start, rows.q_len, rows.k_start, rows.k_len):
        if lq == 0:
            continue
        o, l = dense_attention(q[qs : qs + lq], k[ks : ks + lk], v[ks : ks + lk], scale, causal)
        out[qs : qs + lq] = o
        lse[qs : qs + lq] = l
    return out, lse


def gather_paged(
    cache: torch.Tensor,  # [num_blocks, H, B, D]
    block_table: torch.Tensor,  # [max_blocks] block ids of one sequence
    length: int,
) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, as [length, H, D]."""
    bs = cache.shape[2]
    nblocks = (length + bs - 1) // bs
    blocks = cache[block_table[:nblocks].long()]  # [nb, H, B, D]
    return blocks.permute(0, 2, 1, 3).reshape(nblocks * bs, cache.shape[1], cache.shape[3])[:length]


def paged_decode_attention(
    q: torch.Tensor,  # [S, Hq, Dk], one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dk]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, B, Dv]
    block_tables: torch.Tensor,  # [S, max_blocks]
    seq_lens: Sequence[int],  # keys each query sees (local lengths under DCP)
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query attends over all `seq_lens[s]` cached tokens of its sequence
    (non-causal: the decode token is the last one). Returns out [S, Hq, Dv], lse [S, Hq]."""
    out = q.new_zeros(q.shape[0], q.shape[1], v_cache.shape[3])
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for s, length in enumerate(seq_lens):
        if length == 0:
            continue
        k = gather_paged(k_cache, block_tables[s], length)
        v = gather_paged(v_cache, block_tables[s], length)
        o, l = dense_attention(q[s : s + 1], k, v, scale, causal=False)
        out[s] = o[0]
        lse[s] = l[0]
    return out, lse


def merge_attn_states(
    outs: torch.Tensor,  # [N, T, H, D] partial outputs over disjoint key sets
    lses: torch.Tensor,  # [N, T, H] their natural-log LSEs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge. Shards with no keys (lse = -inf) contribute nothing; a
    query no shard saw gets out 0, lse -inf. Returns out [T, H, D] (outs' dtype), lse [T, H]."""
    lses = lses.float()
    lses = torch.where(torch.isnan(lses) | (lses == float("inf")), torch.full_like(lses, float("-inf")), lses)
    m = lses.max(dim=0).values  # [T, H]
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m_safe)  # [N, T, H]; 0 for empty shards
    total = w.sum(dim=0)  # [T, H]
    lse = torch.where(total > 0, m_safe + torch.log(total), torch.full_like(total, float("-inf")))
    scale = torch.where(total > 0, w / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(w))
    out = (outs.float() * scale[..., None]).sum(dim=0)
    return out.to(outs.dtype), lse


def write_kv_cache(
    cache: torch.Tensor,  # [num_blocks, C, H, B, D] one layer
    kv: torch.Tensor,  # [T, C, H, D] new values for T tokens
    slot_mapping: torch.Tensor,  # [T] slot = block * B + offset; -1 = not stored here
) -> None:
    """Store each token at its slot; tokens with slot -1 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() == 0:
        return
    bs = cache.shape[3]
    cache[slots // bs, :, :, slots % bs] = kv[keep].to(cache.dtype)
