"""Qwen3-MoE (Qwen3MoeForCausalLM) under TP, DCP and PCP, experts sliced by TP.

In a request's life: the forward pass of every engine step, on every rank.

Attention is dense Qwen3's (GQA with q/k RMSNorm, `LlamaAttention`); the MLP of
each layer is the sparse block (`braid.engine.layers.moe.MoE`: softmax router,
top-k, optional renormalisation, no shared experts) where MoEConfig says the
layer is sparse, transformers' rule from `decoder_sparse_step` and
`mlp_only_layers`, and a dense gated MLP of `intermediate_size` otherwise.
Layer order and dtypes follow transformers' Qwen3Moe: pre-norm residual blocks,
RMSNorm in fp32.
"""
from __future__ import annotations

from braid.engine.layers.attention import Attention
from braid.engine.layers.moe import MoEDecoderLayer
from braid.engine.model_config import ModelConfig
from braid.engine.models.base import CausalLM, DecoderModel
from braid.engine.models.llama import LlamaAttention, LlamaForCausalLM
from braid.engine.parallel_state import ParallelState


class Qwen3MoeForCausalLM(CausalLM):
    """Checkpoint names are transformers' (and Qwen's): q/k/v_proj -> qkv_proj;
    gate/up_proj of the dense MLPs and of each expert `mlp.experts.{e}` ->
    gate_up_proj; the router is `mlp.gate`."""

    packed = LlamaForCausalLM.packed  # the same fused q/k/v and gate/up names

    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        if cfg.mla is not None or not cfg.qk_norm:
            raise ValueError(f"{cfg.architecture}: Qwen3-MoE needs GQA attention with q/k norm")
        layers = [MoEDecoderLayer(cfg, i, par, dtype, LlamaAttention(cfg, par, dtype)) for i in range(cfg.num_layers)]
        super().__init__(cfg, DecoderModel(cfg, layers, par.tp, dtype), dtype)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
