"""The engine's kernels as torch.library custom ops, for graph mode.

`torch.compile` cannot trace into a pybind11 function (the C++ paged decode)
and breaks the graph on data-dependent shapes (the KV write keeps the tokens
whose slot is not -1). Registered as opaque ops with a shape-only fake
implementation, both sit inside one compiled graph; eager code keeps calling
the plain functions (the dispatcher's overhead buys nothing there); each op's
implementation is the eager dispatch of braid.kernels.ops.

`braid::write_kv_cache` mutates its cache argument in place (declared, so the
compiler orders it before the reads of the same layer's cache).
"""
from __future__ import annotations

import itertools
import weakref

import torch


@torch.library.custom_op("braid::write_kv_cache", mutates_args=("cache",))
def write_kv_cache(cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    from braid.kernels import ops  # (ops imports this module)

    ops.write_kv_cache(cache, kv, slot_mapping)  # not compiling in here: the eager kernel


@write_kv_cache.register_fake
def _(cache, kv, slot_mapping) -> None:
    return None


@torch.library.custom_op("braid::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from braid.kernels import ops  # (ops imports this module)

    out, lse = ops.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return out.contiguous(), lse.contiguous()  # a custom op's outputs may not alias or be odd views


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale):
    s, h = q.shape[:2]
    return q.new_empty(s, h, v_cache.shape[-1]), q.new_empty(s, h, dtype=torch.float32)


# Collectives: a process group is not something a graph can hold, so each
# GroupComm registers under an int key and the ops carry the key. Their eager
# implementation is the GroupComm's own (called with compiling off). Weak
# references: a shut-down engine's groups are not kept alive by the registry.
_GROUPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_keys = itertools.count()


def register_group(comm) -> int:
    key = next(_keys)
    _GROUPS[key] = comm
    return key


@torch.library.custom_op("braid::all_reduce", mutates_args=())
def all_reduce(t: torch.Tensor, group: int, op: str) -> torch.Tensor:
    return _GROUPS[group].all_reduce(t.clone(memory_format=torch.contiguous_format), op)


@all_reduce.register_fake
def _(t, group, op):
    return t.new_empty(t.shape)


@torch.library.custom_op("braid::all_gather", mutates_args=())
def all_gather(t: torch.Tensor, group: int) -> torch.Tensor:
    return _GROUPS[group].all_gather(t).clone()


@all_gather.register_fake
def _(t, group):
    return t.new_empty(_GROUPS[group].size, *t.shape)


@torch.library.custom_op("braid::all_to_all", mutates_args=())
def all_to_all(t: torch.Tensor, group: int) -> torch.Tensor:
    return _GROUPS[group].all_to_all(t)  # contiguous, as the fake says


@all_to_all.register_fake
def _(t, group):
    return t.new_empty(t.shape)


# Linear layers whose weight is held packed for oneDNN (an opaque tensor a graph
# cannot take as an input): the op carries the layer's key and calls its eager
# `linear` (packed_out: the layer's output features, for the fake).
_LINEARS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_linear(layer) -> int:
    key = next(_keys)
    _LINEARS[key] = layer
    return key


@torch.library.custom_op("braid::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, layer: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _LINEARS[layer].linear(x, bias)


@packed_linear.register_fake
def _(x, layer, bias):
    return x.new_empty(*x.shape[:-1], _LINEARS[layer].packed_out)
