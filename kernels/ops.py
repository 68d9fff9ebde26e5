"""The attention ops the engine calls, each picked for the tensor's device.

| op | CPU | CUDA / NPU (until a fused kernel lands) |
|---|---|---|
| prefill_attention | aten flash (`flash_cpu`) | reference |
| paged_decode_attention | C++ (`cpu_ext`, fp32, when built), else batched gather (`batched`) | batched gather |
| write_kv_cache | C++ (`cpu_ext`, when built), else reference | reference |
| merge_attn_states | C++ (`cpu_ext`, fp32, when built; `merge`), else reference | reference |

Every implementation keeps the contract of `braid.kernels.reference`. Under
`torch.compile` (graph mode) the decode attention and the KV write go through
their custom ops (`braid.kernels.graph_ops`), which the compiler keeps opaque.
"""
from __future__ import annotations

import torch

from braid.kernels import batched, cpu_ext, flash_cpu, graph_ops, reference
from braid.kernels.merge import merge_attn_states
from braid.kernels.reference import VarlenRows


def prefill_attention(q, k, v, rows: VarlenRows, scale: float, causal: bool = True):
    if q.device.type == "cpu":
        return flash_cpu.prefill_attention(q, k, v, rows, scale, causal)
    return reference.prefill_attention(q, k, v, rows, scale, causal)


def write_kv_cache(cache, kv, slot_mapping) -> None:
    if torch.compiler.is_compiling():
        graph_ops.write_kv_cache(cache, kv, slot_mapping)
        return
    ext = cpu_ext.load() if cache.device.type == "cpu" and cache.dim() == 5 else None
    if ext is not None:
        ext.write_kv(cache, kv.to(cache.dtype), slot_mapping)
    else:
        reference.write_kv_cache(cache, kv, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float):
    if torch.compiler.is_compiling():
        return graph_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if q.device.type == "cpu" and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32:
        ext = cpu_ext.load()
        if ext is not None:
            lens = torch.as_tensor(seq_lens, dtype=torch.long)
            return tuple(ext.paged_decode(q, k_cache, v_cache, block_tables, lens, float(scale)))
    return batched.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


__all__ = [
    "VarlenRows",
    "merge_attn_states",
    "paged_decode_attention",
    "prefill_attention",
    "write_kv_cache",
]
