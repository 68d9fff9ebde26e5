"""DeepSeek-V3's config.json: its MoE router and its multi-token-prediction (MTP) layer.

In a request's life: nothing per request; read once at engine start (with the
rest of braid.engine.model_config) to build the model.

transformers' DeepseekV3 is the reference. Its router always scores with a
sigmoid and picks experts the `noaux_tc` way (group-limited top-k over the scores
plus `e_score_correction_bias`), whatever `scoring_func` / `topk_method` say, so
any other value is refused rather than silently read differently. A field that
config.json leaves out takes transformers' DeepseekV3Config default.

The MTP layers (`num_nextn_predict_layers`, DeepSeek's checkpoint format) are the
tensors `model.layers.{L}.*` for L = num_hidden_layers onwards; a config that
promises them while the checkpoint lacks them is refused here, before any rank
starts loading.
"""
from __future__ import annotations

import glob
import json
import logging
import os

V3_DEFAULTS = {
    "q_lora_rank": 1536,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
}
"""transformers' DeepseekV3Config defaults of the fields braid reads (used when config.json omits them)."""


def with_v3_defaults(cfg: dict) -> dict:
    return {**V3_DEFAULTS, **cfg}


def deepseek_v3_moe_config(cfg: dict, path: str, num_layers: int):
    """MoEConfig of transformers' DeepseekV3TopkRouter: sigmoid scores, noaux_tc."""
    from braid.engine.model_config import CheckpointError, MoEConfig, _experts_per_tok, _moe_intermediate_size

    scoring = cfg.get("scoring_func") or "sigmoid"
    if scoring != "sigmoid":
        raise CheckpointError(f"{path}: unsupported scoring_func {scoring!r} for DeepseekV3ForCausalLM (supported: sigmoid)")
    method = cfg.get("topk_method") or "noaux_tc"
    if method != "noaux_tc":
        raise CheckpointError(f"{path}: unsupported topk_method {method!r} for DeepseekV3ForCausalLM (supported: noaux_tc)")
    if cfg.get("rope_interleave") is False:
        raise CheckpointError(f"{path}: rope_interleave=false is not supported (DeepSeek's rope is interleaved)")
    if int(cfg.get("moe_layer_freq") or 1) != 1:
        raise CheckpointError(f"{path}: moe_layer_freq {cfg['moe_layer_freq']} is not supported (only 1)")
    e = int(cfg.get("n_routed_experts") or 0)
    if e < 1:
        raise CheckpointError(f"{path}: n_routed_experts must be set for DeepseekV3ForCausalLM")
    g, tg = cfg.get("n_group"), cfg.get("topk_group")
    k = _experts_per_tok(cfg, path, e, "n_routed_experts")
    if not g or e % g or e // g < 2:
        # each group's score is the sum of its two best experts
        raise CheckpointError(f"{path}: n_group {g} must divide n_routed_experts {e} into groups of at least 2 experts")
    if not tg or not 1 <= tg <= g or tg * (e // g) < k:
        raise CheckpointError(
            f"{path}: topk_group {tg} must be in 1..n_group {g} and its groups must hold num_experts_per_tok {k} experts"
        )
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    return MoEConfig(
        num_experts=e,
        num_experts_per_tok=k,
        moe_intermediate_size=_moe_intermediate_size(cfg, path),
        sparse_layers=frozenset(range(first_dense, num_layers)),
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        n_group=int(g),
        topk_group=int(tg),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob")),
    )


def mtp_config(cfg: dict, path: str, num_layers: int):
    """MTPConfig of the checkpoint's MTP layers, or None when it has none.
    DeepSeek's config.json (and transformers') say `num_nextn_predict_layers`."""
    from braid.engine.model_config import CheckpointError, MTPConfig

    n = cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers")) or 0
    if not isinstance(n, int) or n < 0:
        raise CheckpointError(f"{path}: num_nextn_predict_layers must be a non-negative integer, got {n!r}")
    if n == 0:
        return None
    names = _tensor_names(os.path.dirname(path))
    if names is None:
        # a config-only folder (planning, manifests): trust config.json and DeepSeek's
        # format (embed and head of its own); loading weights checks them anyway
        return MTPConfig(n, frozenset(range(n)), frozenset(range(n)))
    if f"model.layers.{num_layers}.eh_proj.weight" not in names:
        # transformers writes num_nextn_predict_layers 1 by default and saves no MTP
        # layer (it does not use one): such a checkpoint serves fine without MTP
        logging.getLogger(__name__).warning(
            "%s: num_nextn_predict_layers is %d but the checkpoint has no MTP layer; loading without it "
            "(speculative decoding with MTP unavailable)", path, n)
        return None
    embeds, heads = set(), set()
    for k in range(n):
        prefix = f"model.layers.{num_layers + k}."
        if prefix + "eh_proj.weight" not in names:
            raise CheckpointError(
                f"{path}: num_nextn_predict_layers is {n} but the checkpoint has no MTP layer {k} "
                f"(no tensor {prefix}eh_proj.weight); set num_nextn_predict_layers to 0 to load the model without it"
            )
        if prefix + "embed_tokens.weight" in names:
            embeds.add(k)
        if prefix + "shared_head.head.weight" in names:
            heads.add(k)
    return MTPConfig(n, frozenset(embeds), frozenset(heads))


def _tensor_names(model_path: str) -> set[str] | None:
    """Every tensor name of the safetensors checkpoint, from its index or the
    files' headers (no tensor data is read); None when the folder holds no weights."""
    from safetensors import safe_open

    from braid.engine.loader import checkpoint_files

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        checkpoint_files(model_path)  # validates the index
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    if not glob.glob(os.path.join(model_path, "*.safetensors")):
        return None
    names: set[str] = set()
    for file in checkpoint_files(model_path):
        with safe_open(file, framework="pt") as handle:
            names.update(handle.keys())
    return names
