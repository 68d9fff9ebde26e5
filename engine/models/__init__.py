"""Model registry: architecture name -> model class (each rank builds its model
once at engine start, before loading the checkpoint)."""
from __future__ import annotations

import torch

from braid.engine.model_config import ModelConfig
from braid.engine.parallel_state import ParallelState


def build_model(cfg: ModelConfig, par: ParallelState, dtype: torch.dtype) -> torch.nn.Module:
    if cfg.architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        from braid.engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(cfg, par, dtype)
    if cfg.architecture == "DeepseekV2ForCausalLM":
        from braid.engine.models.deepseek_v2 import DeepseekV2ForCausalLM

        return DeepseekV2ForCausalLM(cfg, par, dtype)
    if cfg.architecture == "DeepseekV3ForCausalLM":
        from braid.engine.models.deepseek_v3 import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM(cfg, par, dtype)
    if cfg.architecture == "Qwen3MoeForCausalLM":
        from braid.engine.models.qwen3_moe import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(cfg, par, dtype)
    raise ValueError(f"no model class for architecture {cfg.architecture!r}")
