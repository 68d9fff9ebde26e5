"""Load checkpoints into a model, each rank reading only its slice: HF
safetensors (single file or sharded via `model.safetensors.index.json`; block-FP8
weights dequantized at load, see fp8_checkpoint, or with `fp8_weights: keep` kept
float8 with their scales, see braid.engine.layers.linear) or a GGUF file (dequantized at
load, see gguf_checkpoint).

In a request's life: nothing per request; every rank runs this once at engine
start, before the KV cache is allocated."""
from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

from braid.engine.fp8_checkpoint import FP8_DTYPES, SCALE_SUFFIX, BlockFP8Tensor, fp8_block_size
# default_gguf_path is re-exported: the loader is where callers look for checkpoints
from braid.engine.gguf_checkpoint import default_gguf_path, gguf_file_of, iter_gguf  # noqa: F401
from braid.engine.model_config import CheckpointError


class LazyTensor:
    """One checkpoint tensor, read on demand: `narrow` reads only the slice asked for."""

    def __init__(self, handle, name: str, file: str, dtype: torch.dtype):
        self._slice = handle.get_slice(name)
        self.name = name
        self.file = file
        self.dtype = dtype
        self.shape = tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if start < 0 or start + length > self.shape[dim]:
            raise CheckpointError(
                f"{self.file}: tensor {self.name} of shape {self.shape} has no rows {start}..{start + length} on dim {dim}"
            )
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)].to(self.dtype)

    def full(self) -> torch.Tensor:
        return self._slice[tuple(slice(None) for _ in self.shape)].to(self.dtype)


def checkpoint_files(model_path: str) -> list[str]:
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(model_path, name)):
                raise CheckpointError(f"{index}: names shard {name}, which is missing")
        return [os.path.join(model_path, n) for n in files]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{model_path}: no *.safetensors files")
    return files


def iter_checkpoint(model_path: str, dtype: torch.dtype) -> Iterator[LazyTensor | BlockFP8Tensor]:
    """Every tensor of the checkpoint under its Hugging Face name: safetensors
    files as stored (a block-FP8 weight and its `*_weight_scale_inv` as one
    tensor), a GGUF file dequantized and renamed (gguf_checkpoint)."""
    gguf_file = gguf_file_of(model_path)
    if gguf_file is not None:
        yield from iter_gguf(gguf_file, dtype)
        return
    block = _fp8_block_of(model_path)
    with contextlib.ExitStack() as stack:
        entries: dict[str, tuple[object, str]] = {}  # name -> (open file, its path)
        for path in checkpoint_files(model_path):
            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            stack.enter_context(handle)
            # a weight's scale may sit in another shard, so every name is known before any is paired
            entries.update((name, (handle, path)) for name in handle.keys())
        for name in entries:
            lazy = _checkpoint_tensor(entries, name, dtype, block)
            if lazy is not None:
                yield lazy


def _fp8_block_of(model_path: str) -> tuple[int, int] | None:
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return fp8_block_size(json.load(f), path)


def _checkpoint_tensor(entries: dict, name: str, dtype: torch.dtype, block) -> LazyTensor | BlockFP8Tensor | None:
    """The tensor `name` as the model reads it; None for a scale, which rides
    with its weight. Stored fp8 and a scale go together or not at all."""
    handle, path = entries[name]
    if name.endswith(SCALE_SUFFIX):
        if name[: -len(SCALE_SUFFIX)] not in entries:
            raise CheckpointError(f"{path}: {name} scales {name[: -len(SCALE_SUFFIX)]}, which the checkpoint lacks")
        return None
    stored = handle.get_slice(name).get_dtype()
    scale = entries.get(name + SCALE_SUFFIX)
    if stored in FP8_DTYPES:
        if block is None:
            raise CheckpointError(f"{path}: {name} is stored as float8 but config.json has no fp8 quantization_config")
        if scale is None:
            raise CheckpointError(f"{path}: {name} is stored as float8 but the checkpoint has no {name}{SCALE_SUFFIX}")
        return BlockFP8Tensor(handle.get_slice(name), scale[0].get_slice(name + SCALE_SUFFIX), name, path, dtype, block)
    if stored.startswith("F8"):
        raise CheckpointError(f"{path}: {name} is stored as {stored}; the only float8 format supported is F8_E4M3 (e4m3)")
    if scale is not None:
        raise CheckpointError(f"{scale[1]}: {name}{SCALE_SUFFIX} scales {name}, which is stored as {stored}, not float8")
    return LazyTensor(handle, name, path, dtype)


def place_weights(model: torch.nn.Module, model_path: str, dtype: torch.dtype) -> None:
    """`fp8_weights: keep`: before any weight is read, place each linear's weight
    by what the checkpoint stores for it (keep_at_rest)."""
    stored: dict[str, set] = {}  # parameter name -> float8 or not, per checkpoint tensor it fuses
    block = None
    for lazy in iter_checkpoint(model_path, dtype):
        target = model.checkpoint_target(lazy.name)
        if target is not None:
            stored.setdefault(target[0], set()).add(isinstance(lazy, BlockFP8Tensor))
            block = lazy.block if isinstance(lazy, BlockFP8Tensor) else block
    device = next(p.device for p in model.parameters() if not p.is_meta)
    keep_at_rest(model, stored, block, device, model_path)


def keep_at_rest(model: torch.nn.Module, stored: dict[str, set], block, device, where: str) -> None:
    """Make each linear's weight float8 with scales (braid.engine.layers.linear)
    where `stored` (parameter name -> whether each checkpoint tensor it holds is
    block-FP8) says float8, dense elsewhere and where a model gave the weight a
    loader of its own, turning the meta placeholders of a model built under
    `deferred_weights` into memory only in the form kept."""
    from braid.engine.layers.linear import LinearBase

    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        kinds = stored.get(f"{name}.weight", {False})
        if len(kinds) > 1:
            raise CheckpointError(
                f"{where}: {name}.weight fuses float8 and unquantized checkpoint tensors; "
                "fp8_weights keep needs all or none of them float8 (use fp8_weights dequantize)"
            )
        if True in kinds and module.keeps_own_loader():
            module.keep_fp8(block, device)
        else:
            module.materialize(device)


def load_weights(model: torch.nn.Module, model_path: str, dtype: torch.dtype, keep_fp8: bool = False) -> None:
    """Fill every parameter of `model` from the checkpoint; raise CheckpointError
    naming any tensor that is missing, unexpected or misshapen. With `keep_fp8`
    block-FP8 weights stay float8 at rest (place_weights), their
    `weight_scale_inv` filled with them."""
    if keep_fp8:
        place_weights(model, model_path, dtype)
    params = dict(model.named_parameters())
    expected: dict[str, set] = {}
    for pname in params:
        module_name = pname.rsplit(".", 2)[-2] if pname.count(".") >= 1 else ""
        shards = {s for fused, s in getattr(model, "packed", {}).values() if fused == module_name}
        expected[pname] = shards or {None}
    loaded: dict[str, set] = {}
    for lazy in iter_checkpoint(model_path, dtype):
        target = model.checkpoint_target(lazy.name)
        if target is None:
            continue
        pname, shard = target
        param = params.get(pname)
        if param is None:
            raise CheckpointError(f"{lazy.file}: unexpected tensor {lazy.name} for {model.cfg.architecture}")
        try:
            param.weight_loader(param, lazy, shard)
        except ValueError as e:
            raise CheckpointError(f"{lazy.file}: {e}") from None
        loaded.setdefault(pname, set()).add(shard)
        if params.get(pname + SCALE_SUFFIX) is not None and isinstance(lazy, BlockFP8Tensor):
            loaded.setdefault(pname + SCALE_SUFFIX, set()).add(shard)  # the raw scales rode with the weight
    missing = [p for p, shards in expected.items() if not shards <= loaded.get(p, set())]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{model_path}: checkpoint lacks {len(missing)} tensors: {shown}")
