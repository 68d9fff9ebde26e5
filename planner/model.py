"""A model read into the handful of operator counts the cost model needs.

The planner never builds the model: it reads an HF config.json (a dict, a
file or a checkpoint directory), a GGUF file's metadata, or one of the
built-in configs (`deepseek-r1`, `qwen3-235b-a22b`, so that planning works
offline), and derives per layer and per token:

  * linear (matmul) FLOPs and weight bytes, split into the attention block
    (projections) and the MLP (dense, or the active routed + shared experts
    of a MoE layer), because parallelism splits the two differently;
  * attention FLOPs per (query token, context token) pair, in the form each
    phase runs: MLA as MHA in prefill (qk = nope + rope, v) and absorbed in
    decode (scores and values against the latent);
  * KV bytes per token per layer (MLA: the latent kv_lora_rank + rope dims;
    GQA: K and V of every KV head).

Routers, norms and the LM head are left out of the per-token linear count, so
that it matches the usual "2 x active matmul parameters" figure.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
BUILTIN = {"deepseek-r1": "deepseek-r1.json", "qwen3-235b-a22b": "qwen3-235b-a22b.json"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Shapes of a decoder-only transformer, as the cost model reads them."""

    name: str
    layers: int
    dense_layers: int
    """Layers with a dense MLP (all of them for a dense model; first_k_dense_replace for DeepSeek)."""
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    """GQA head size (q, k and v)."""
    intermediate: int
    moe_intermediate: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    top_k: int = 0
    q_lora: int = 0
    kv_lora: int = 0
    rope_dim: int = 0
    nope_dim: int = 0
    v_dim: int = 0
    weight_bytes: int = 2
    """Bytes per linear weight at rest and per GEMM operand: 1 for W8A8 / FP8 checkpoints."""
    kv_bytes: int = 2
    """Bytes per cached element (bf16)."""

    @property
    def is_mla(self) -> bool:
        return self.kv_lora > 0

    @property
    def is_moe(self) -> bool:
        return self.routed_experts > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    # -- parameters per layer ------------------------------------------------------------

    def attn_proj_params(self) -> int:
        h = self.hidden
        if self.is_mla:
            qk = self.nope_dim + self.rope_dim
            q = h * self.q_lora + self.q_lora * self.heads * qk if self.q_lora else h * self.heads * qk
            kv = h * (self.kv_lora + self.rope_dim) + self.kv_lora * self.heads * (self.nope_dim + self.v_dim)
            return q + kv + self.heads * self.v_dim * h
        return 2 * h * self.heads * self.head_dim + 2 * h * self.kv_heads * self.head_dim

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def expert_params(self) -> int:
        """One routed (or shared) expert: gate, up and down."""
        return 3 * self.hidden * self.moe_intermediate

    def active_moe_params(self) -> int:
        return (self.top_k + self.shared_experts) * self.expert_params()

    # -- per token -------------------------------------------------------------------------

    def linear_flops_per_token(self) -> float:
        """2 x active matmul parameters over all layers (no LM head, no routers)."""
        mlp = self.dense_layers * self.dense_mlp_params() + self.moe_layers * self.active_moe_params()
        return 2.0 * (self.layers * self.attn_proj_params() + mlp)

    def attn_flops_per_pair(self, absorbed: bool = False) -> float:
        """FLOPs of one (query token, context token) pair in one layer: QK^T and PV.
        MLA prefill runs as MHA (qk = nope + rope, v); MLA decode is absorbed (both
        products against the kv_lora latent, the rope part against the shared key)."""
        if self.is_mla and absorbed:
            return 2.0 * self.heads * (2 * self.kv_lora + self.rope_dim)
        if self.is_mla:
            return 2.0 * self.heads * (self.nope_dim + self.rope_dim + self.v_dim)
        return 2.0 * self.heads * 2 * self.head_dim

    def causal_prefill_attn_flops(self, new: int, cached: int = 0) -> float:
        """All layers, a prompt of `new` tokens after `cached` ones (causal: pairs
        counted once, the diagonal included)."""
        pairs = new * cached + new * (new + 1) / 2
        return self.layers * pairs * self.attn_flops_per_pair()

    def kv_bytes_per_token_layer(self) -> int:
        if self.is_mla:
            return (self.kv_lora + self.rope_dim) * self.kv_bytes
        return 2 * self.kv_heads * self.head_dim * self.kv_bytes

    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_bytes_per_token_layer()

    def total_params(self) -> int:
        routed = self.moe_layers * (self.routed_experts + self.shared_experts) * self.expert_params()
        dense = self.dense_layers * self.dense_mlp_params()
        return self.layers * self.attn_proj_params() + routed + dense + 2 * self.vocab * self.hidden


# -- readers ---------------------------------------------------------------------------------


def _weight_bytes(cfg: dict) -> int:
    quant = cfg.get("quantization_config") or {}
    if quant.get("quant_method") in ("fp8", "w8a8", "compressed-tensors") or quant.get("bits") == 8:
        return 1
    return _DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), 2)


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ValueError(f"{where}: config field {key!r} missing")
    return cfg[key]


def from_hf_config(cfg: dict, name: str = "model") -> ModelSpec:
    """A ModelSpec from the fields of an HF config.json (Llama/Qwen/Qwen-MoE/DeepSeek)."""
    heads = int(_need(cfg, "num_attention_heads", name))
    hidden = int(_need(cfg, "hidden_size", name))
    layers = int(_need(cfg, "num_hidden_layers", name))
    routed = int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    dense = layers if routed == 0 else int(cfg.get("first_k_dense_replace", 0))
    mla = dict(q_lora=int(cfg.get("q_lora_rank") or 0), kv_lora=int(cfg["kv_lora_rank"]),
               rope_dim=int(cfg["qk_rope_head_dim"]), nope_dim=int(cfg["qk_nope_head_dim"]),
               v_dim=int(cfg["v_head_dim"])) if cfg.get("kv_lora_rank") else {}
    return ModelSpec(
        name=name, layers=layers, dense_layers=dense, hidden=hidden, vocab=int(_need(cfg, "vocab_size", name)),
        heads=heads, kv_heads=1 if mla else int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate=int(cfg.get("intermediate_size") or 0),
        moe_intermediate=int(cfg.get("moe_intermediate_size") or 0), routed_experts=routed,
        shared_experts=int(cfg.get("n_shared_experts") or 0),
        top_k=int(cfg.get("num_experts_per_tok") or 0) if routed else 0,
        weight_bytes=_weight_bytes(cfg), kv_bytes=min(_weight_bytes(dict(cfg, quantization_config=None)), 4),
        **mla,
    )


def from_gguf(path: str) -> ModelSpec:
    """A dense GGUF model (the architectures the engine reads) through the engine's reader."""
    from braid.engine.gguf_checkpoint import gguf_model_config

    c = gguf_model_config(path)
    if c.moe is not None or c.mla is not None:
        raise ValueError(f"{path}: GGUF MoE/MLA models are not read by the planner; give their config.json")
    return ModelSpec(name=os.path.basename(path), layers=c.num_layers, dense_layers=c.num_layers, hidden=c.hidden_size,
                     vocab=c.vocab_size, heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                     intermediate=c.intermediate_size)


def load_model(spec: str | dict) -> ModelSpec:
    """A built-in name, a config.json (file or the checkpoint directory holding it),
    a GGUF file, or an HF config dict."""
    if isinstance(spec, dict):
        return from_hf_config(spec)
    if spec in BUILTIN:
        with open(os.path.join(CONFIG_DIR, BUILTIN[spec])) as f:
            return from_hf_config(json.load(f), spec)
    if spec.endswith(".gguf") and os.path.isfile(spec):
        return from_gguf(spec)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"--model {spec!r}: not a config.json, checkpoint directory, GGUF file or "
                         f"built-in name ({', '.join(sorted(BUILTIN))})")
    with open(path) as f:
        return from_hf_config(json.load(f), os.path.basename(os.path.dirname(os.path.abspath(path))) or "model")
