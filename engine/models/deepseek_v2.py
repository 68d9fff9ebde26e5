"""DeepSeek-V2 (MLA attention, DeepSeekMoE) under TP, DCP and PCP.

Layer order and dtypes follow transformers' DeepseekV2: pre-norm residual
blocks, RMSNorm in fp32, dense MLPs for the first `first_k_dense_replace`
layers and MoE after. Attention is `braid.engine.layers.mla`, the MoE
`braid.engine.layers.moe`.
"""
from __future__ import annotations

from braid.engine.layers.mla import MLAAttention
from braid.engine.layers.moe import MoEDecoderLayer
from braid.engine.model_config import ModelConfig
from braid.engine.models.base import CausalLM, DecoderModel
from braid.engine.parallel_state import ParallelState


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
        layers = [MoEDecoderLayer(cfg, i, par, dtype, MLAAttention(cfg, par, dtype)) for i in range(cfg.num_layers)]
        super().__init__(cfg, DecoderModel(cfg, layers, par.tp, dtype), dtype)

    def attention_layers(self) -> list[MLAAttention]:
        return [layer.self_attn for layer in self.model.layers]
