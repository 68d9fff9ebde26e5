"""DeepSeek-V2 tiny random checkpoints built with transformers, shared by the tests
(the `ds` fixture, registered in conftest)."""
import os

import pytest
import torch

from conftest import VOCAB, save_random

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # transformers requires it equal to num_attention_heads
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_intermediate_size=32,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=2048,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
)

# DeepSeek-V2's YaRN settings, with a context short enough that the prompts below pass it
YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
    beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707,
)

CONFIGS = {
    # q LoRA, both layers dense
    "ds-dense": dict(q_lora_rank=32, n_routed_experts=4, first_k_dense_replace=2),
    # plain q_proj, greedy routing, layer 1 MoE
    "ds-moe": dict(q_lora_rank=None, n_routed_experts=4, routed_scaling_factor=1.5),
    # group-limited routing over 8 experts in 4 groups, attention biases, two MoE layers
    "ds-group": dict(
        q_lora_rank=24, n_routed_experts=8, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=2.0, attention_bias=True, num_hidden_layers=3,
    ),
    "ds-yarn": dict(q_lora_rank=32, n_routed_experts=4, rope_parameters=YARN, max_position_embeddings=128),
}


def build_deepseek(path: str, overrides: dict, seed: int = 0) -> str:
    """A random transformers DeepseekV2ForCausalLM saved with save_pretrained.
    Biases and norm weights are randomised too, so that loading them matters."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**dict(BASE, **overrides))).eval()
    return save_random(model, path)


@pytest.fixture(scope="session")
def ds(checkpoints):
    """name -> checkpoint path, built once beside conftest's (so `checkpoints`
    serves transformers' greedy outputs, logits and caches for it)."""

    def get(name: str) -> str:
        path = os.path.join(checkpoints.root, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_deepseek(path, CONFIGS[name])
        return path

    return get
