"""Model configuration read from a Hugging Face checkpoint directory (or, via
braid.engine.gguf_checkpoint, from a GGUF file's metadata).

Only what the engine needs is kept, validated, and normalised across the two
rope formats transformers writes (`rope_theta` + `rope_scaling` in 4.x,
`rope_parameters` in 5.x).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from braid.kv_transfer.layout import InvalidLayout, canonical_dtype


class CheckpointError(ValueError):
    """The checkpoint directory is unusable; the message names the file and field."""


GQA_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
SUPPORTED_ARCHITECTURES = GQA_ARCHITECTURES + MLA_ARCHITECTURES

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype for any spelling braid accepts (the names are kv_transfer.layout's)."""
    try:
        return _TORCH_DTYPES[canonical_dtype(str(name))]
    except InvalidLayout as e:
        raise ValueError(str(e).replace("KV dtype", "dtype")) from None


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int
    """Dimensions of each head that are rotated (the whole head for Llama)."""
    scaling: dict[str, Any] | None = None
    """`rope_type` and its parameters (llama3, yarn, linear), or None."""
    max_position_embeddings: int = 4096


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek-V2 multi-head latent attention settings (its MoE is `ModelConfig.moe`)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool = False
    """Bias on q_a_proj, kv_a_proj_with_mqa and o_proj (transformers' `attention_bias`)."""


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts (DeepSeek-V2, Qwen3-MoE): which layers are sparse and how
    a token picks its experts (braid.engine.layers.moe)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    sparse_layers: frozenset[int]
    """Layers whose MLP is the sparse block; the others are dense (`intermediate_size`)."""
    n_shared_experts: int = 0
    topk_method: str = "greedy"
    """greedy, group_limited_greedy (DeepSeek-V2) or noaux_tc (DeepSeek-V3: groups ranked by
    their two best bias-corrected scores, experts chosen by corrected score, weighted by raw score)."""
    scoring_func: str = "softmax"
    """softmax over the router logits, or sigmoid of each (DeepSeek-V3)."""
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    """Renormalise the chosen top-k scores to sum to 1 (Qwen3-MoE, DeepSeek-V3)."""
    fp32_router: bool = True
    """Router logits in fp32 (DeepSeek-V2, V3; the router weight, and V3's score bias, kept
    in fp32 as transformers keeps them); else in the activations' dtype with the
    softmax in fp32 and the weights cast back (transformers' Qwen3MoeTopKRouter)."""

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.sparse_layers


@dataclass(frozen=True)
class MTPConfig:
    """DeepSeek-V3's multi-token-prediction layers: MTP layer k < num_layers is the
    checkpoint's `model.layers.{num_hidden_layers + k}.*` (braid.engine.models.deepseek_v3)."""

    num_layers: int
    own_embed: frozenset[int] = frozenset()
    """MTP layers whose checkpoint carries its own `embed_tokens` (else the main model's is used)."""
    own_head: frozenset[int] = frozenset()
    """MTP layers whose checkpoint carries its own `shared_head.head` (else the main LM head is used)."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """KV heads in the cache format: the model's KV heads for GQA, 1 for MLA."""
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    checkpoint_dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    """None for a model without routed experts."""
    mtp: MTPConfig | None = None
    """DeepSeek-V3's MTP layers, kept for speculative decoding; None when the checkpoint has none."""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_mla(self) -> bool:
        return self.mla is not None

    @property
    def cache_components(self) -> int:
        """Tensors cached per token and head: K and V for GQA, the latent for MLA."""
        return 1 if self.is_mla else 2

    @property
    def cache_head_dim(self) -> int:
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return self.head_dim


def _require(cfg: dict, key: str, path: str):
    if key not in cfg:
        raise CheckpointError(f"{path}: missing required field {key!r}")
    return cfg[key]


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either rope format; scaling None for default rope."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        scaling.pop("type", None)
        if kind == "default":
            scaling = None
        elif kind not in ("llama3", "yarn", "linear"):
            raise CheckpointError(f"config.json: unsupported rope scaling type {kind!r} (supported: llama3, yarn, linear)")
    return theta, scaling


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _read_config_json(model_path: str) -> tuple[str, dict, str]:
    """(path of config.json, its contents, the supported architecture it names)."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isdir(model_path):
        raise CheckpointError(f"{model_path}: not a directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_path}: no config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    if not archs:
        raise CheckpointError(f"{path}: no 'architectures' field")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return path, cfg, arch


def _checkpoint_eos_ids(model_path: str, cfg: dict) -> tuple[int, ...]:
    """EOS ids of generation_config.json first (what generation stops on), then config.json's."""
    gen_path = os.path.join(model_path, "generation_config.json")
    eos = _eos_ids(cfg.get("eos_token_id"))
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
        eos = tuple(dict.fromkeys(_eos_ids(gen.get("eos_token_id")) + eos))
    return eos


def load_model_config(model_path: str) -> ModelConfig:
    """The config of a Hugging Face folder (config.json) or of a GGUF checkpoint
    (a .gguf file, or a folder holding exactly one, read from its metadata)."""
    from braid.engine.fp8_checkpoint import fp8_block_size
    from braid.engine.gguf_checkpoint import gguf_file_of, gguf_model_config

    gguf_file = gguf_file_of(model_path)
    if gguf_file is not None:
        return gguf_model_config(gguf_file)
    path, cfg, arch = _read_config_json(model_path)
    fp8_block_size(cfg, path)  # refuse an unsupported quantization before any rank starts loading
    hidden = int(_require(cfg, "hidden_size", path))
    heads = int(_require(cfg, "num_attention_heads", path))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise CheckpointError(f"{path}: num_attention_heads {heads} not divisible by num_key_value_heads {kv_heads}")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = _rope_settings(cfg)
    dtype_str = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    eos = _checkpoint_eos_ids(model_path, cfg)
    common = dict(
        architecture=arch,
        vocab_size=int(_require(cfg, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", path)),
        num_layers=int(_require(cfg, "num_hidden_layers", path)),
        num_heads=heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=max_pos,
        hidden_act=cfg.get("hidden_act", "silu"),
        checkpoint_dtype=parse_dtype(dtype_str),
        eos_token_ids=eos,
        bos_token_id=cfg.get("bos_token_id"),
        raw=cfg,
    )
    if common["hidden_act"] != "silu":
        raise CheckpointError(f"{path}: unsupported hidden_act {common['hidden_act']!r} (supported: silu)")
    if arch in MLA_ARCHITECTURES:
        return _mla_config(cfg, path, common, theta, scaling, max_pos)
    return ModelConfig(
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope=RopeConfig(theta, head_dim, scaling, max_pos),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        o_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
        and bool(cfg.get("attention_bias", False)),  # Qwen2 biases q/k/v only
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        moe=_qwen3_moe_config(cfg, path, common["num_layers"]) if arch == "Qwen3MoeForCausalLM" else None,
        **common,
    )


def _mla_config(cfg, path, common, theta, scaling, max_pos) -> ModelConfig:
    arch, layers = common["architecture"], common["num_layers"]
    moe_of, mtp = _deepseek_moe_config, None
    if arch == "DeepseekV3ForCausalLM":
        from braid.engine.deepseek_v3_config import deepseek_v3_moe_config, mtp_config, with_v3_defaults

        cfg = with_v3_defaults(cfg)
        moe_of, mtp = deepseek_v3_moe_config, mtp_config(cfg, path, layers)
    mla = MLAConfig(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=int(_require(cfg, "kv_lora_rank", path)),
        qk_nope_head_dim=int(_require(cfg, "qk_nope_head_dim", path)),
        qk_rope_head_dim=int(_require(cfg, "qk_rope_head_dim", path)),
        v_head_dim=int(_require(cfg, "v_head_dim", path)),
        attention_bias=bool(cfg.get("attention_bias", False)),
    )
    if mla.qk_rope_head_dim % 2:
        raise CheckpointError(f"{path}: qk_rope_head_dim {mla.qk_rope_head_dim} must be even")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported for {arch}")
    qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    return ModelConfig(
        num_kv_heads=1,
        head_dim=qk_head_dim,
        rope=RopeConfig(theta, mla.qk_rope_head_dim, scaling, max_pos),
        mla=mla,
        moe=moe_of(cfg, path, layers),
        mtp=mtp,
        **common,
    )


def _deepseek_moe_config(cfg: dict, path: str, num_layers: int) -> MoEConfig | None:
    """Routed experts from layer `first_k_dense_replace` on. Refuses the settings
    on which transformers (our reference) and DeepSeek's own code disagree, or
    that no DeepSeek-V2 checkpoint uses."""
    scoring = cfg.get("scoring_func") or "softmax"
    if scoring != "softmax":
        raise CheckpointError(f"{path}: unsupported scoring_func {scoring!r} (supported: softmax)")
    method = cfg.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise CheckpointError(f"{path}: unsupported topk_method {method!r} (supported: greedy, group_limited_greedy)")
    e = cfg.get("n_routed_experts")
    if not e:
        return None
    if int(cfg.get("moe_layer_freq") or 1) != 1:
        # transformers ignores moe_layer_freq; DeepSeek's code uses layer % freq == 0
        raise CheckpointError(f"{path}: moe_layer_freq {cfg['moe_layer_freq']} is not supported (only 1)")
    if cfg.get("norm_topk_prob", False):
        # transformers ignores norm_topk_prob; DeepSeek's code renormalises the top-k weights
        raise CheckpointError(f"{path}: norm_topk_prob=true is not supported for DeepseekV2ForCausalLM")
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    moe = MoEConfig(
        num_experts=int(e),
        num_experts_per_tok=_experts_per_tok(cfg, path, int(e), "n_routed_experts"),
        moe_intermediate_size=_moe_intermediate_size(cfg, path),
        sparse_layers=frozenset(range(first_dense, num_layers)),
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        topk_method=method,
        n_group=cfg.get("n_group"),
        topk_group=cfg.get("topk_group"),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
    )
    if method == "group_limited_greedy":
        g, tg, k = moe.n_group, moe.topk_group, moe.num_experts_per_tok
        if not g or e % g:
            raise CheckpointError(f"{path}: group_limited_greedy needs n_group dividing n_routed_experts {e}, got n_group {g}")
        if not tg or not 1 <= tg <= g or tg * (e // g) < k:
            raise CheckpointError(
                f"{path}: topk_group {tg} must be in 1..n_group {g} and its groups must hold num_experts_per_tok {k} experts"
            )
    return moe


def _experts_per_tok(cfg: dict, path: str, e: int, experts_key: str) -> int:
    k = cfg.get("num_experts_per_tok")
    if not k or not 1 <= int(k) <= e:
        raise CheckpointError(f"{path}: num_experts_per_tok {k} must be between 1 and {experts_key} {e}")
    return int(k)


def _moe_intermediate_size(cfg: dict, path: str) -> int:
    size = int(cfg.get("moe_intermediate_size") or 0)
    if size < 1:
        raise CheckpointError(f"{path}: moe_intermediate_size must be set for a MoE model")
    return size


def _qwen3_moe_config(cfg: dict, path: str, num_layers: int) -> MoEConfig | None:
    """Qwen3-MoE's sparse blocks, by transformers' Qwen3MoeDecoderLayer rule: layer
    i is sparse when i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step
    == 0. transformers 5 writes `num_experts` as `num_local_experts`."""
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{path}: use_sliding_window=true is not supported for Qwen3MoeForCausalLM")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported for Qwen3MoeForCausalLM")
    key = "num_experts" if "num_experts" in cfg else "num_local_experts"
    e = int(cfg.get(key) or 0)
    if e <= 0:
        return None
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise CheckpointError(f"{path}: decoder_sparse_step must be a positive integer, got {step!r}")
    dense = set(cfg.get("mlp_only_layers") or [])
    return MoEConfig(
        num_experts=e,
        num_experts_per_tok=_experts_per_tok(cfg, path, e, key),
        moe_intermediate_size=_moe_intermediate_size(cfg, path),
        sparse_layers=frozenset(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        fp32_router=False,
    )
