"""Tiny random MoE checkpoints by name, built with transformers on first use beside
conftest's (so `checkpoints.greedy` serves them): Qwen3-MoE (`q3m-*`, test_qwen3_moe)
and DeepSeek-V3 (`v3-*`, test_deepseek_v3)."""
import os

from test_deepseek_v3 import CONFIGS as V3_CONFIGS, build_v3
from test_qwen3_moe import CONFIGS as Q3M_CONFIGS, build_qwen3_moe


def moe_checkpoint(root: str, name: str) -> str:
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        if name.startswith("v3-"):
            build_v3(path, V3_CONFIGS[name])
        else:
            build_qwen3_moe(path, Q3M_CONFIGS[name])
    return path
