"""Tensor-parallel linear layers, in every decoder layer's attention and MLP, for
every token of every step.

Each parameter carries a `weight_loader(param, lazy, shard_id)` that copies
this rank's slice of a checkpoint tensor into it; `lazy` reads only the rows
or columns it is asked for (see `braid.engine.loader.LazyTensor`).

Block-FP8 weights at rest (engine setting `fp8_weights: keep`): a weight the
checkpoint stores as float8_e4m3fn stays float8 on its rank, beside
`weight_scale_inv`, its float32 block scales for this rank's slice, and each
forward dequantizes it exactly as loading would have (fp8.float() * scale, cast
to the layer's dtype). The model is then built with its linear weights as
placeholders on the meta device (`deferred_weights`), and the loader turns each
into a float8 or a dense weight by what the checkpoint stores (`keep_fp8` /
`materialize`), before it reads any weight: no rank ever holds the dequantized
model. Scales are kept per 128x128 block where this rank's slice (every fused
sub-matrix of it) starts on a block edge, and per row (per column) along a
dimension where it does not: a TP slice of 448 rows at tp 2 starts at row 224.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import torch
from torch import nn

from braid.engine.parallel_state import GroupComm
from braid.kernels import cpu_ext, graph_ops

FP8 = torch.float8_e4m3fn
_DEFERRED = contextvars.ContextVar("braid_linear_weights_deferred", default=False)


@contextlib.contextmanager
def deferred_weights(enabled: bool = True):
    """Linear weights built inside are meta-device placeholders, to be placed by
    the loader (float8 at rest or dense) before any is filled."""
    token = _DEFERRED.set(enabled)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def _attach(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader
    return param


def _copy(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(value)


def _blocks(n: int, grain: int) -> int:
    return -(-n // grain)


PACK_BATCH = 128
"""The batch size oneDNN lays a packed weight out for: measured here, it serves
decode batches of 1 to 32 and prefill chunks as well as a layout for each would."""


def _panel_kernels(dtype):
    """braid's C++ panel kernel (kernels/cpu_ext/gemm.cpp) where it runs fast: fp32 on a
    CPU with AVX-512; else None."""
    if dtype != torch.float32:
        return None
    ext = cpu_ext.load()
    return ext if ext is not None and ext.panel_simd() else None


def cpu_packing_supported(dtype) -> bool:
    """Whether a weight of `dtype` has a packed layout on this CPU (panels or oneDNN's)."""
    if _panel_kernels(dtype) is not None:
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> the layout `packed_linear` multiplies fastest here, same values:
    fp32 with AVX-512, panels of 16 rows [out / 16, in, 16] (row n is column
    n % 16 of panel n // 16; only where out is a multiple of 16, so no padding
    rows cost memory) for braid's C++ kernel, which
    streams a batch of one through the weight at ~1.8x oneDNN's speed here and
    matches it up to batch ~64 (~0.95x on prefill chunks); else oneDNN's blocked
    layout (an opaque tensor)."""
    w = weight.detach()
    if _panel_kernels(w.dtype) is None or w.shape[0] % 16:  # panels only where they need no padding rows
        return torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH)
    rows, cols = w.shape
    return w.view(rows // 16, 16, cols).transpose(1, 2).contiguous()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) for a weight `pack_weight` laid out, `out` its rows."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return cpu_ext.load().panel_linear(x, packed, bias, out)


class LinearBase(nn.Module):
    """What every linear shares: its weight [out, in] (dense, or float8 with block
    scales), the weight's row/column segments (where each checkpoint slice lands
    and where it comes from), and the load of one slice in either form.

    On CPU the loaded weight may be packed (`prepack`, engine setting
    parallel.cpu_packed_weights): the same values in the layout `pack_weight`
    picks (braid's 16-row panels, or oneDNN's blocked layout), 1.3x to 2.5x
    faster than `linear` on the plain layout here; the plain copy is dropped."""

    prepackable = True
    """False for a layer whose weight something else reads (MLA's kv_b_proj, a router)."""
    _packed: torch.Tensor | None = None

    def _init_weight(self, rows: int, cols: int, dtype, loader) -> None:
        self.compute_dtype = dtype
        self._own_loader = loader
        device = "meta" if _DEFERRED.get() else None
        self.weight = _attach(nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False), loader)
        self.weight_scale_inv: nn.Parameter | None = None
        self.scale_grain = (1, 1)

    def segments(self, dim: int) -> list[tuple[int, int, int]]:
        """(local start, size, checkpoint start) of each slice along `dim`; one whole slice by default."""
        return [(0, self.weight.shape[dim], 0)]

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8

    def materialize(self, device) -> None:
        """A meta placeholder becomes a dense weight of its dtype on `device` (its loader kept)."""
        if self.weight.is_meta:
            loader = self.weight.weight_loader
            self.weight = _attach(nn.Parameter(torch.empty_like(self.weight, device=device), requires_grad=False), loader)

    def keeps_own_loader(self) -> bool:
        """False where a model replaced the weight's loader (DeepSeek's fp32 router): that weight stays dense."""
        return self.weight.weight_loader == self._own_loader

    def keep_fp8(self, block: tuple[int, int], device) -> None:
        """Hold the weight as float8 with float32 scales: per block along a dimension
        whose every slice starts on a block edge (and fills whole blocks but at the
        end), per row/column along one that does not."""
        rows, cols = self.weight.shape
        grain = []
        for dim, b in enumerate(block):
            end = self.weight.shape[dim]
            aligned = all(local % b == 0 and src % b == 0 and (size % b == 0 or local + size == end)
                          for local, size, src in self.segments(dim))
            grain.append(b if aligned else 1)
        self.scale_grain = tuple(grain)
        self.weight = _attach(nn.Parameter(torch.empty(rows, cols, dtype=FP8, device=device), requires_grad=False),
                              self._own_loader)
        scale = torch.empty(_blocks(rows, grain[0]), _blocks(cols, grain[1]), dtype=torch.float32, device=device)
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)

    def prepack(self) -> bool:
        """Pack the weight for oneDNN and drop the plain one, where that applies (a dense
        CPU weight of a dtype this CPU packs, in a layer nothing else reads); whether it did."""
        w = self.weight
        if not self.prepackable or self.is_fp8 or w.is_meta or w.device.type != "cpu" or not cpu_packing_supported(w.dtype):
            return False
        self._packed = pack_weight(w)
        self.packed_out = w.shape[0]
        self._packed_key = graph_ops.register_linear(self)
        self.weight = _attach(nn.Parameter(w.new_empty(0), requires_grad=False), w.weight_loader)
        return True

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias). Under torch.compile (graph mode) a packed weight's product is
        an opaque op of the graph that calls back here."""
        if self._packed is not None:
            if torch.compiler.is_compiling():
                return graph_ops.packed_linear(x, self._packed_key, bias)
            return packed_linear(x, self._packed, self.packed_out, bias)
        return nn.functional.linear(x, self.dense_weight(), bias)

    def dense_weight(self) -> torch.Tensor:
        """The weight in the layer's dtype: float8 dequantized with the same float
        ops as at load (fp8.float() * its scale, then cast), so bit for bit equal."""
        if not self.is_fp8:
            return self.weight
        rows, cols = self.weight.shape
        s = self.weight_scale_inv
        if self.scale_grain[0] > 1:
            s = s.repeat_interleave(self.scale_grain[0], dim=0)[:rows]
        if self.scale_grain[1] > 1:
            s = s.repeat_interleave(self.scale_grain[1], dim=1)[:, :cols]
        return (self.weight.float() * s).to(self.compute_dtype)

    def _load_slice(self, param, lazy, dim: int, local: int, size: int, src: int) -> None:
        """Rows (dim 0) or columns (dim 1) [src, src + size) of the checkpoint tensor
        into [local, local + size) of `param` (a `segments` entry): raw float8 and
        scales into a float8 weight, else as `lazy` reads them (dequantized to the
        dtype if float8)."""
        if param is not self.weight or not self.is_fp8:
            _copy(param.data.narrow(dim, local, size), lazy.narrow(dim, src, size), lazy.name)
            return
        if not hasattr(lazy, "narrow_raw"):
            raise ValueError(f"{lazy.name}: not float8 in the checkpoint, but its parameter holds float8")
        grain = self.scale_grain[dim]
        q, s = lazy.narrow_raw(dim, src, size, grain)
        _copy(param.data.narrow(dim, local, size), q, lazy.name)
        _copy(self.weight_scale_inv.data.narrow(dim, local // grain, s.shape[dim]), s, lazy.name + "_scale_inv")


class ColumnParallelLinear(LinearBase):
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
        self._init_weight(out, input_size, dtype, self._load)
        self.bias = (
            _attach(nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False), self._load) if bias else None
        )

    def segments(self, dim: int) -> list[tuple[int, int, int]]:
        if dim == 1:
            return super().segments(dim)
        starts = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        return [(start, size, self.tp.rank_in_group * size) for start, size in zip(starts, self.local_sizes)]

    def _load(self, param, lazy, shard_id=0):
        self._load_slice(param, lazy, 0, *self.segments(0)[shard_id or 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)


class QKVParallelLinear(LinearBase):
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
        self._init_weight(out, hidden, dtype, self._load)
        self.bias = _attach(nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False), self._load) if bias else None

    def segments(self, dim: int) -> list[tuple[int, int, int]]:
        if dim == 1:
            return super().segments(dim)
        kv_src = self.kv_head_start * self.head_dim
        srcs = [self.tp.rank_in_group * self.sizes[0], kv_src, kv_src]
        return [(sum(self.sizes[:i]), self.sizes[i], srcs[i]) for i in range(3)]

    def _load(self, param, lazy, shard_id: str):
        self._load_slice(param, lazy, 0, *self.segments(0)["qkv".index(shard_id)])

    def forward(self, x: torch.Tensor):
        qkv = self.linear(x, self.bias)
        return qkv.split(self.sizes, dim=-1)


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W's columns split across TP ranks; partial sums are
    all-reduced and the bias is added once, after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: GroupComm, dtype, reduce: bool = True):
        super().__init__()
        if input_size % tp.size:
            raise ValueError(f"input size {input_size} not divisible by tensor_parallel_size {tp.size}")
        self.tp = tp
        self.reduce = reduce
        self.local_in = input_size // tp.size
        self._init_weight(output_size, self.local_in, dtype, self._load_weight)
        self.bias = _attach(nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False), self._load_bias) if bias else None

    def segments(self, dim: int) -> list[tuple[int, int, int]]:
        if dim == 0:
            return super().segments(dim)
        return [(0, self.local_in, self.tp.rank_in_group * self.local_in)]

    def _load_weight(self, param, lazy, shard_id=None):
        self._load_slice(param, lazy, 1, *self.segments(1)[0])

    def _load_bias(self, param, lazy, shard_id=None):
        _copy(param.data, lazy.full(), lazy.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.reduce:
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype):
        super().__init__()
        self._init_weight(output_size, input_size, dtype, self._load)
        self.bias = _attach(nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False), self._load) if bias else None

    def _load(self, param, lazy, shard_id=None):
        if param is self.weight and self.is_fp8:
            self._load_slice(param, lazy, 0, 0, param.shape[0], 0)
        else:
            _copy(param.data, lazy.full(), lazy.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)
