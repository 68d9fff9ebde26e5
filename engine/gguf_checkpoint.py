"""GGUF checkpoints for the engine: the model config from the file's metadata
and the weights, dequantized with the `gguf` package and renamed to the
Hugging Face names the models' weight loaders know, so TP sharding works as
for safetensors.

In a request's life: nothing per request. At engine start every rank reads
the config here, then `iter_gguf` hands the loader one lazy tensor per weight;
a rank dequantizes only the rows of its own shard where the split is by rows.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np
import torch

from braid.engine.default_model import default_gguf_path  # noqa: F401 - re-exported where it used to live
from braid.engine.model_config import CheckpointError, ModelConfig, RopeConfig
from braid.tokenizer.gguf_vocab import GGUFError, find_gguf, metadata, open_gguf

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# types whose dequantization the gguf package implements and we test or trust
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor names -> Hugging Face names (per layer: blk.N.<part>)
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_file_of(model_path: str) -> str | None:
    """The GGUF file `model_path` names (a .gguf file, or a folder holding one), else None."""
    if model_path.lower().endswith(".gguf") and not os.path.exists(model_path):
        raise CheckpointError(f"{model_path}: no such GGUF file")
    try:
        return find_gguf(model_path)
    except GGUFError as e:
        raise CheckpointError(str(e)) from None


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name; None when unknown."""
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind == "weight":
        return f"{_GLOBAL_NAMES[stem]}.weight"
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _reader(path: str):
    try:
        return open_gguf(path)
    except GGUFError as e:
        raise CheckpointError(str(e)) from None


def _check_tensors(reader, path: str) -> None:
    """Refuse, before any weight is read, a quantization type or tensor braid cannot load."""
    for t in reader.tensors:
        if t.tensor_type.name not in QUANT_TYPES:
            raise CheckpointError(
                f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which braid cannot load "
                f"(supported: {', '.join(QUANT_TYPES)})"
            )
        if t.name == "rope_freqs.weight":
            raise CheckpointError(f"{path}: per-dimension rope frequency factors (rope_freqs, llama3 rope) are not supported")
        if hf_name(t.name) is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name}")


def _rope_scaling(reader, arch: str, path: str) -> dict | None:
    kind = metadata(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = metadata(reader, f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise CheckpointError(f"{path}: unsupported rope scaling type {kind!r} (supported: none, linear, yarn)")


def _checkpoint_dtype(reader) -> torch.dtype:
    """The dtype the matrices are stored in when all share a float type, else float32
    (what dequantized blocks are exact in)."""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    return {frozenset({"BF16"}): torch.bfloat16, frozenset({"F16"}): torch.float16}.get(frozenset(kinds), torch.float32)


def _require(reader, key: str, path: str):
    value = metadata(reader, key)
    if value is None:
        raise CheckpointError(f"{path}: missing required GGUF metadata {key!r}")
    return value


def gguf_model_config(path: str) -> ModelConfig:
    """The engine's ModelConfig from a GGUF file's metadata and tensor list."""
    reader = _reader(path)
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    _check_tensors(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(_require(reader, f"{arch}.embedding_length", path))
    heads = int(_require(reader, f"{arch}.attention.head_count", path))
    kv_heads = int(metadata(reader, f"{arch}.attention.head_count_kv", heads))
    if heads % kv_heads:
        raise CheckpointError(f"{path}: head_count {heads} not divisible by head_count_kv {kv_heads}")
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", hidden // heads))
    rotary = int(metadata(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(f"{path}: partial rotary ({rotary} of {head_dim} dims) is not supported")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    max_pos = int(metadata(reader, f"{arch}.context_length", 4096))
    special = {k: metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot")}
    eos = tuple(dict.fromkeys(int(special[k]) for k in ("eos", "eot") if special[k] is not None))
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(metadata(reader, f"{arch}.vocab_size", int(embed.shape[1]))),
        hidden_size=hidden,
        intermediate_size=int(_require(reader, f"{arch}.feed_forward_length", path)),
        num_layers=int(_require(reader, f"{arch}.block_count", path)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        rope=RopeConfig(float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)), head_dim,
                        _rope_scaling(reader, arch, path), max_pos),
        max_position_embeddings=max_pos,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        checkpoint_dtype=_checkpoint_dtype(reader),
        eos_token_ids=eos,
        bos_token_id=None if special["bos"] is None else int(special["bos"]),
        raw={"gguf_file": path, "general.architecture": arch},
    )


def unpermute_rope_rows(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each head's q/k rows from
    [first half, second half] (rotate-half rope) to interleaved pairs
    (0, h, 1, h+1, ...) for its own rope kernel. `rows` holds whole heads."""
    heads = rows.shape[0] // head_dim
    grouped = rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


class GGUFTensor:
    """One GGUF tensor under its Hugging Face name and shape, read on demand
    (the LazyTensor interface of braid.engine.loader)."""

    def __init__(self, tensor, name: str, file: str, dtype: torch.dtype, rope_head_dim: int | None):
        self._tensor = tensor
        self.name = name
        self.file = file
        self.dtype = dtype
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        # head size for q/k of llama-arch files, whose rows llama.cpp permuted; else None
        self._rope_head_dim = rope_head_dim

    def _dequantize(self, start: int, length: int) -> np.ndarray:
        """Rows start..start+length (dim 0) as float32, in Hugging Face order."""
        import gguf

        raw = self._tensor.data
        if len(self.shape) > 1:
            raw = raw[start:start + length]  # quantized blocks run along a row, so rows slice cleanly
        rows = gguf.quants.dequantize(np.asarray(raw), self._tensor.tensor_type)
        rows = rows.reshape((length,) + self.shape[1:]) if len(self.shape) > 1 else rows.reshape(-1)[start:start + length]
        if self._rope_head_dim:
            if start % self._rope_head_dim or length % self._rope_head_dim:
                raise CheckpointError(f"{self.file}: {self.name} rows {start}..{start + length} split a head")
            rows = unpermute_rope_rows(rows, self._rope_head_dim)
        # F32 rows may be a view of the read-only memory map; torch wants its own copy
        return rows if rows.flags.writeable else rows.copy()

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if start < 0 or start + length > self.shape[dim]:
            raise CheckpointError(
                f"{self.file}: tensor {self.name} of shape {self.shape} has no rows {start}..{start + length} on dim {dim}"
            )
        if dim == 0:
            return torch.from_numpy(np.ascontiguousarray(self._dequantize(start, length))).to(self.dtype)
        return self.full().narrow(dim, start, length).contiguous()

    def full(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._dequantize(0, self.shape[0]))).to(self.dtype)


def iter_gguf(path: str, dtype: torch.dtype) -> Iterator[GGUFTensor]:
    """Every weight of the file as a lazy tensor under its Hugging Face name."""
    cfg = gguf_model_config(path)  # validates names and types first (cached reader)
    reader = _reader(path)
    permuted = cfg.architecture == "LlamaForCausalLM"
    for t in reader.tensors:
        name = hf_name(t.name)
        rope = cfg.head_dim if permuted and (".q_proj." in name or ".k_proj." in name) else None
        yield GGUFTensor(t, name, path, dtype, rope)
