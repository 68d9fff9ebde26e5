"""What every causal LM of the engine shares: a decoder body (`self.model`), a
vocabulary-parallel LM head, and the map from checkpoint names to parameters."""
from __future__ import annotations

import re

import torch
from torch import nn

from braid.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from braid.engine.layers.norm import RMSNorm
from braid.engine.model_config import ModelConfig


class DecoderModel(nn.Module):
    """Embedding -> decoder layers -> final norm; `layers` are the model's own blocks."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module], tp_comm, dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_comm, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class CausalLM(nn.Module):
    packed: dict[str, tuple[str, object]] = {}
    """Checkpoint module name -> (fused parameter's module, shard id)."""

    def __init__(self, cfg: ModelConfig, body: nn.Module, dtype):
        super().__init__()
        self.cfg = cfg
        self.model = body
        self.lm_head = ParallelLMHead(body.embed_tokens, cfg.tie_word_embeddings, dtype)
        # routed experts this rank holds (all without expert parallelism): the
        # checkpoint's other experts belong to other ranks and are not read here
        self.held_experts = {int(m.group(1)) for n, _ in self.named_parameters() if (m := _EXPERT.search(n))}

    def forward(self, input_ids, positions, meta):
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def mtp_attention_layers(self) -> list:
        """Attention of the model's multi-token-prediction layers (none but DeepSeek-V3's)."""
        return []

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """Parameter name and shard id for a checkpoint tensor; None to skip it."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return None
        expert = _EXPERT.search(name)
        if expert and self.cfg.moe and int(expert.group(1)) < self.cfg.moe.num_experts:
            if int(expert.group(1)) not in self.held_experts:
                return None
        for ckpt, (fused, shard) in self.packed.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{fused}."), shard
        return name, None
