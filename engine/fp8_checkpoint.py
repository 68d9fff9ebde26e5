"""Block-FP8 checkpoints (DeepSeek-V3/R1's format), dequantized at load.

config.json's `quantization_config` says `quant_method: fp8`, `fmt: e4m3`,
`weight_block_size: [128, 128]`; each quantized linear weight `X.weight` is
stored as float8_e4m3fn beside `X.weight_scale_inv`, one float32 scale per
128x128 block (ceil(rows/128) x ceil(cols/128), the last blocks partial). The
weight is fp8.float() * its block's scale, then cast to the engine's dtype.

In a request's life: nothing per request; every rank dequantizes only its own
slice of each weight once, while braid.engine.loader fills the model at start
(or, with the engine setting `fp8_weights: keep`, takes the raw fp8 slice and
its scales, which braid.engine.layers.linear dequantizes in every forward).
"""
from __future__ import annotations

import torch

from braid.engine.model_config import CheckpointError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3",)
"""safetensors' names for float8_e4m3fn, the only element type the format uses."""
SUPPORTED_BLOCK = (128, 128)


def fp8_block_size(cfg: dict, path: str) -> tuple[int, int] | None:
    """The weight block size of config.json's `quantization_config`; None when
    the checkpoint is not quantized. Refuses, naming the setting, anything other
    than DeepSeek's dynamic e4m3 FP8 with 128x128 blocks."""
    q = cfg.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{path}: quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(
            f"{path}: unsupported quantization_config.quant_method {method!r} (supported: 'fp8' with 128x128 block scales)"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{path}: unsupported quantization_config.fmt {fmt!r} (supported: 'e4m3')")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        # static schemes ship calibrated activation scales, which dequantizing at load would silently drop
        raise CheckpointError(
            f"{path}: unsupported quantization_config.activation_scheme {scheme!r} (supported: 'dynamic')"
        )
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise CheckpointError(f"{path}: unsupported quantization_config.scale_fmt {scale_fmt!r} (supported: float, ue8m0)")
    block = q.get("weight_block_size")
    if not isinstance(block, (list, tuple)) or tuple(block) != SUPPORTED_BLOCK:
        raise CheckpointError(
            f"{path}: unsupported quantization_config.weight_block_size {block!r} (supported: [128, 128])"
        )
    return SUPPORTED_BLOCK


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], row0: int = 0, col0: int = 0) -> torch.Tensor:
    """float32 values of the fp8 rows/cols `q`, whose first element sits at
    (row0, col0) inside the first block of `scale` (the scales of exactly the
    blocks `q` touches)."""
    rows, cols = q.shape
    s = scale.float().repeat_interleave(block[0], dim=0)[row0:row0 + rows]
    s = s.repeat_interleave(block[1], dim=1)[:, col0:col0 + cols]
    return q.float() * s


class BlockFP8Tensor:
    """A quantized weight read on demand (the LazyTensor interface of
    braid.engine.loader): `narrow` reads only the asked rows or columns of the
    fp8 tensor and the scales of the blocks they touch, so a rank never
    dequantizes another rank's slice (a TP slice need not start on a block edge)."""

    def __init__(self, weight_slice, scale_slice, name: str, file: str, dtype: torch.dtype, block: tuple[int, int]):
        self._weight = weight_slice
        self._scale = scale_slice
        self.name = name
        self.file = file
        self.dtype = dtype
        self.block = block
        self.shape = tuple(weight_slice.get_shape())
        if len(self.shape) != 2:
            raise CheckpointError(f"{file}: {name} is float8 with shape {self.shape}; only 2-D block-quantized weights are supported")
        want = tuple(-(-n // b) for n, b in zip(self.shape, block))
        got = tuple(scale_slice.get_shape())
        if got != want:
            raise CheckpointError(
                f"{file}: {name}{SCALE_SUFFIX} has shape {got}; a {self.shape} weight in {block[0]}x{block[1]} blocks needs {want}"
            )
        if scale_slice.get_dtype() not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{file}: {name}{SCALE_SUFFIX} has dtype {scale_slice.get_dtype()} (supported: F32, BF16, F16)")

    def _read(self, dim: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored fp8 rows/cols [start, start + length) on `dim` and the stored
        scales of exactly the blocks they touch."""
        if dim not in (0, 1) or start < 0 or length < 1 or start + length > self.shape[dim]:
            raise CheckpointError(
                f"{self.file}: tensor {self.name} of shape {self.shape} has no rows {start}..{start + length} on dim {dim}"
            )
        index = [slice(None), slice(None)]
        index[dim] = slice(start, start + length)
        b = self.block[dim]
        blocks = [slice(None), slice(None)]
        blocks[dim] = slice(start // b, (start + length - 1) // b + 1)
        return self._weight[tuple(index)], self._scale[tuple(blocks)]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        q, scale = self._read(dim, start, length)
        offset = [0, 0]
        offset[dim] = start % self.block[dim]
        return dequantize_blocks(q, scale, self.block, *offset).to(self.dtype)

    def narrow_raw(self, dim: int, start: int, length: int, grain: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For weights kept float8 at rest: the fp8 rows/cols as stored and their
        scales as float32, one per block along the other dimension and, along
        `dim`, one per block (grain = the block size; `start` on a block edge) or
        one per row/column (grain 1)."""
        b = self.block[dim]
        if grain not in (1, b) or (grain == b and start % b):
            raise CheckpointError(f"{self.file}: {self.name}: scales per {grain} on dim {dim} cannot start at {start}")
        q, scale = self._read(dim, start, length)
        scale = scale.float()
        if grain == 1:
            scale = scale.repeat_interleave(b, dim=dim).narrow(dim, start % b, length)
        return q, scale

    def full(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0])
