"""DeepSeek-V2 (MLA attention, DeepSeekMoE) under TP, DCP and PCP.

Layer order and dtypes follow transformers' DeepseekV2: pre-norm residual
blocks, RMSNorm in fp32, dense MLPs for the first `first_k_dense_replace`
layers and MoE after. Attention is `braid.engine.layers.mla`, the MoE
`braid.engine.layers.moe`.
"""
from __future__ import annotations

from torch import nn

from braid.engine.layers.attention import AttentionMetadata
from braid.engine.layers.mla import MLAAttention
from braid.engine.layers.moe import GatedMLP, MoE
from braid.engine.layers.norm import RMSNorm
from braid.engine.model_config import ModelConfig
from braid.engine.models.base import CausalLM, DecoderModel
from braid.engine.parallel_state import ParallelState


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, par: ParallelState, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLAAttention(cfg, par, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.moe is not None and cfg.moe.is_moe_layer(layer):
            self.mlp = MoE(cfg, par, dtype)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, par.tp, dtype)

    def forward(self, positions, x, meta: AttentionMetadata):
        x = x + self.self_attn(positions, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV2ForCausalLM(CausalLM):
    """Checkpoint names are transformers' (and DeepSeek's): gate/up_proj of
    the dense MLPs, shared experts and each routed expert `mlp.experts.{e}`
    map onto fused gate_up_proj; the router is `mlp.gate`. The head-split
    projections are column-parallel linears with one sub-matrix (shard 0)."""

    packed = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
        "q_proj": ("q_proj", 0),
        "q_b_proj": ("q_b_proj", 0),
        "kv_b_proj": ("kv_b_proj", 0),
    }

    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        if cfg.mla is None:
            raise ValueError(f"{cfg.architecture} needs an MLA configuration")
        layers = [DecoderLayer(cfg, i, par, dtype) for i in range(cfg.num_layers)]
        super().__init__(cfg, DecoderModel(cfg, layers, par.tp, dtype), dtype)

    def attention_layers(self) -> list[MLAAttention]:
        return [layer.self_attn for layer in self.model.layers]
