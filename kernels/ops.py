"""The attention ops the engine calls, each picked for the tensor's device.

| op | CPU | CUDA / NPU (until a fused kernel lands) |
|---|---|---|
| prefill_attention | aten flash (`flash_cpu`) | reference |
| paged_decode_attention | batched gather (`batched`) | batched gather |
| merge_attn_states, write_kv_cache | reference | reference |

Every implementation keeps the contract of `braid.kernels.reference`.
"""
from __future__ import annotations

import torch

from braid.kernels import batched, flash_cpu, reference
from braid.kernels.reference import VarlenRows, merge_attn_states, write_kv_cache


def prefill_attention(q, k, v, rows: VarlenRows, scale: float, causal: bool = True):
    if q.device.type == "cpu":
        return flash_cpu.prefill_attention(q, k, v, rows, scale, causal)
    return reference.prefill_attention(q, k, v, rows, scale, causal)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float):
    return batched.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


__all__ = [
    "VarlenRows",
    "merge_attn_states",
    "paged_decode_attention",
    "prefill_attention",
    "write_kv_cache",
]
