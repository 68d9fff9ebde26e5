"""Load checkpoints into a model, each rank reading only its slice: HF
safetensors (single file or sharded via `model.safetensors.index.json`) or a
GGUF file (dequantized at load, see gguf_checkpoint).

In a request's life: nothing per request; every rank runs this once at engine
start, before the KV cache is allocated."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

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


def iter_checkpoint(model_path: str, dtype: torch.dtype) -> Iterator[LazyTensor]:
    """Every tensor of the checkpoint under its Hugging Face name: safetensors
    files as stored, a GGUF file dequantized and renamed (gguf_checkpoint)."""
    gguf_file = gguf_file_of(model_path)
    if gguf_file is not None:
        yield from iter_gguf(gguf_file, dtype)
        return
    for path in checkpoint_files(model_path):
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        with handle:
            for name in handle.keys():
                yield LazyTensor(handle, name, path, dtype)


def load_weights(model: torch.nn.Module, model_path: str, dtype: torch.dtype) -> None:
    """Fill every parameter of `model` from the checkpoint; raise CheckpointError
    naming any tensor that is missing, unexpected or misshapen."""
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
    missing = [p for p, shards in expected.items() if not shards <= loaded.get(p, set())]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{model_path}: checkpoint lacks {len(missing)} tensors: {shown}")
