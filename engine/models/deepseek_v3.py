"""DeepSeek-V3 / R1 (MLA, DeepSeekMoE with the noaux_tc router, dense first
layers, YaRN) under TP, DCP and PCP, with its multi-token-prediction (MTP) layers.

In a request's life: the forward pass of every engine step, on every rank. The
MTP layers are loaded and kept (`model.mtp`); with speculative.method "mtp" the
first one runs in every step and drafts (engine/spec_decode/mtp.py).

The decoder is DeepSeek-V2's (braid.engine.layers.mla, braid.engine.layers.moe)
with transformers' DeepseekV3 differences: the sigmoid, bias-corrected, group-
limited router (MoEConfig.topk_method "noaux_tc") and the interleaved rope
computed in the activations' dtype.

MTP layer k (DeepSeek's checkpoint tensors `model.layers.{num_hidden_layers + k}.*`)
drafts the token after next: for position i it takes the main model's final
hidden state h_i (after the final norm, as transformers' MtpModel and vLLM's
DeepSeekMTP both feed it) and the token t_{i+1}:
    x = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))
    h' = decoder block(x)                      (MLA + MoE, like a main layer)
    logits = shared_head.head(shared_head.norm(h'))
`embed` and `shared_head.head` are the layer's own checkpoint tensors where the
checkpoint has them (DeepSeek ships copies of the main ones), else the main
model's. The block's attention is not among `attention_layers()`: the KV cache
(and its P/D layout) holds the main layers only, so a model with MTP costs no
cache memory unless the instance runs it; then the first MTP layer's attention
(`mtp_attention_layers()`) gets the cache layer after the main ones, bound like
them, same slot mapping (engine/config.py cache_layers).
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from braid.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from braid.engine.layers.linear import ReplicatedLinear
from braid.engine.layers.mla import MLAAttention
from braid.engine.layers.moe import MoEDecoderLayer
from braid.engine.layers.norm import RMSNorm
from braid.engine.layers.rotary import RotaryEmbedding
from braid.engine.model_config import ModelConfig
from braid.engine.models.base import CausalLM, DecoderModel
from braid.engine.models.deepseek_v2 import DeepseekV2ForCausalLM
from braid.engine.parallel_state import ParallelState

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")


def v3_attention(cfg: ModelConfig, par: ParallelState, dtype) -> MLAAttention:
    """MLA as DeepSeek-V2's, its rope rotated in the activations' dtype as
    transformers' DeepseekV3 does (V2 rotates in fp32)."""
    attn = MLAAttention(cfg, par, dtype)
    attn.rotary = RotaryEmbedding(cfg.rope, interleaved=True, fp32_pairs=False)
    return attn


class SharedHead(nn.Module):
    """`shared_head.norm` and, where the checkpoint has it, `shared_head.head`."""

    def __init__(self, cfg: ModelConfig, own_head: bool, embed: VocabParallelEmbedding, main_head: ParallelLMHead,
                 dtype):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # the vocabulary split (and loader) of the main embedding, a weight of its own
        self.head = ParallelLMHead(embed, False, dtype) if own_head else None
        self._main = [main_head]  # a list: not registered, the main head's weight stays the main model's

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.head or self._main[0])(self.norm(hidden))


class MTPLayer(MoEDecoderLayer):
    """One MTP layer: the decoder block of layer index num_hidden_layers + k (its
    forward is the block's), with enorm, hnorm, eh_proj and shared_head around it.
    Parameter names are the checkpoint's after `model.layers.{num_hidden_layers + k}.`."""

    def __init__(self, cfg: ModelConfig, k: int, par: ParallelState, dtype, embed: VocabParallelEmbedding,
                 head: ParallelLMHead):
        index = cfg.num_layers + k
        block_cfg = cfg
        if cfg.moe is not None:  # DeepSeek's MTP block is always sparse (layer index past first_k_dense_replace)
            block_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, sparse_layers=frozenset({index})))
        super().__init__(block_cfg, index, par, dtype, v3_attention(cfg, par, dtype))
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.eh_proj = ReplicatedLinear(2 * h, h, False, dtype)
        self.shared_head = SharedHead(cfg, k in cfg.mtp.own_head, embed, head, dtype)
        own_embed = k in cfg.mtp.own_embed
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, h, par.tp, dtype) if own_embed else None
        self._main_embed = [embed]  # not registered (see SharedHead)

    def draft(self, positions: torch.Tensor, hidden: torch.Tensor, next_ids: torch.Tensor, meta) -> torch.Tensor:
        """hidden [T, H]: h_i (the main model's, after its final norm; or the previous
        MTP layer's output); next_ids [T]: t_{i+1}; positions and meta as for a main
        layer over the same tokens. Returns the block's output h' [T, H] (before
        shared_head.norm: `logits` applies it)."""
        embed = self.embed_tokens or self._main_embed[0]
        x = self.eh_proj(torch.cat([self.enorm(embed(next_ids)), self.hnorm(hidden)], dim=-1))
        return self(positions, x, meta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] block outputs -> [T, vocab] fp32 logits of the token after next."""
        return self.shared_head(hidden).float()


class MultiTokenPredictor(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype, embed, head):
        super().__init__()
        self.layers = nn.ModuleList([MTPLayer(cfg, k, par, dtype, embed, head) for k in range(cfg.mtp.num_layers)])

    def forward(self, positions, hidden, next_ids, meta, k: int = 0) -> torch.Tensor:
        return self.layers[k].draft(positions, hidden, next_ids, meta)

    def compute_logits(self, hidden: torch.Tensor, k: int = 0) -> torch.Tensor:
        return self.layers[k].logits(hidden)


class DeepseekV3ForCausalLM(CausalLM):
    """Checkpoint names as DeepSeek-V2's (transformers' and DeepSeek's), plus each
    router's `mlp.gate.e_score_correction_bias` and the MTP layers, read into
    `mtp.layers.{k}` (skipped when config.json declares none)."""

    packed = DeepseekV2ForCausalLM.packed

    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        if cfg.mla is None:
            raise ValueError(f"{cfg.architecture} needs an MLA configuration")
        layers = [MoEDecoderLayer(cfg, i, par, dtype, v3_attention(cfg, par, dtype)) for i in range(cfg.num_layers)]
        super().__init__(cfg, DecoderModel(cfg, layers, par.tp, dtype), dtype)
        self.mtp = None if cfg.mtp is None else MultiTokenPredictor(cfg, par, dtype, self.model.embed_tokens, self.lm_head)

    def attention_layers(self) -> list[MLAAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def mtp_attention_layers(self) -> list[MLAAttention]:
        return [] if self.mtp is None else [layer.self_attn for layer in self.mtp.layers]

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= self.cfg.num_layers:
            k = int(m.group(1)) - self.cfg.num_layers
            if self.mtp is None or k >= len(self.mtp.layers):
                return None  # MTP layers config.json does not declare: not loaded (as transformers)
            name = f"mtp.layers.{k}.{m.group(2)}"
        return super().checkpoint_target(name)
