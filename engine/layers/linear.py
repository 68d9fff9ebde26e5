"""Tensor-parallel linear layers.

Each parameter carries a `weight_loader(param, lazy, shard_id)` that copies
this rank's slice of a checkpoint tensor into it; `lazy` reads only the rows
or columns it is asked for (see `braid.engine.loader.LazyTensor`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from braid.engine.parallel_state import GroupComm


def _attach(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader
    return param


def _copy(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(value)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows split across TP ranks. `output_sizes` lists
    the fused sub-matrices (e.g. gate and up); each is split on its own, and
    `shard_id` in the loader picks which one a checkpoint tensor fills."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool, tp: GroupComm, dtype):
        super().__init__()
        self.tp = tp
        for size in output_sizes:
            if size % tp.size:
                raise ValueError(f"output size {size} not divisible by tensor_parallel_size {tp.size}")
        self.local_sizes = [s // tp.size for s in output_sizes]
        out = sum(self.local_sizes)
        self.weight = _attach(nn.Parameter(torch.empty(out, input_size, dtype=dtype), requires_grad=False), self._load)
        self.bias = (
            _attach(nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False), self._load) if bias else None
        )

    def _load(self, param, lazy, shard_id=0):
        shard_id = shard_id or 0
        start = sum(self.local_sizes[:shard_id])
        size = self.local_sizes[shard_id]
        value = lazy.narrow(0, self.tp.rank_in_group * size, size)
        _copy(param.data.narrow(0, start, size), value, lazy.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class QKVParallelLinear(nn.Module):
    """Fused q/k/v projection. Query heads split evenly; KV heads split when
    tp <= num_kv_heads, else each rank holds one KV head, replicated on
    tp // num_kv_heads consecutive ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: GroupComm, dtype):
        super().__init__()
        self.tp = tp
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        if tp.size <= num_kv_heads:
            self.num_kv_heads = num_kv_heads // tp.size
            self.kv_head_start = tp.rank_in_group * self.num_kv_heads
        else:
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank_in_group // (tp.size // num_kv_heads)
        self.sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]
        out = sum(self.sizes)
        self.weight = _attach(nn.Parameter(torch.empty(out, hidden, dtype=dtype), requires_grad=False), self._load)
        self.bias = _attach(nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False), self._load) if bias else None

    def _load(self, param, lazy, shard_id: str):
        idx = "qkv".index(shard_id)
        start = sum(self.sizes[:idx])
        if shard_id == "q":
            src = self.tp.rank_in_group * self.sizes[0]
        else:
            src = self.kv_head_start * self.head_dim
        _copy(param.data.narrow(0, start, self.sizes[idx]), lazy.narrow(0, src, self.sizes[idx]), lazy.name)

    def forward(self, x: torch.Tensor):
        qkv = nn.functional.linear(x, self.weight, self.bias)
        return qkv.split(self.sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns split across TP ranks; partial sums are
    all-reduced and the bias is added once, after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: GroupComm, dtype, reduce: bool = True):
        super().__init__()
        if input_size % tp.size:
            raise ValueError(f"input size {input_size} not divisible by tensor_parallel_size {tp.size}")
        self.tp = tp
        self.reduce = reduce
        self.local_in = input_size // tp.size
        self.weight = _attach(nn.Parameter(torch.empty(output_size, self.local_in, dtype=dtype), requires_grad=False), self._load_weight)
        self.bias = _attach(nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False), self._load_bias) if bias else None

    def _load_weight(self, param, lazy, shard_id=None):
        _copy(param.data, lazy.narrow(1, self.tp.rank_in_group * self.local_in, self.local_in), lazy.name)

    def _load_bias(self, param, lazy, shard_id=None):
        _copy(param.data, lazy.full(), lazy.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        if self.reduce:
            self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class ReplicatedLinear(nn.Module):
    """A linear layer every rank holds whole."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype):
        super().__init__()
        self.weight = _attach(nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False), self._load)
        self.bias = _attach(nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False), self._load) if bias else None

    def _load(self, param, lazy, shard_id=None):
        _copy(param.data, lazy.full(), lazy.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)
