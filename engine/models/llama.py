"""Llama, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm) under tensor parallelism.

Layer order and dtype handling follow transformers so fp32 results agree to
rounding: pre-norm residual blocks, RMSNorm in fp32, rope cos/sin in fp32 cast
to the activations' dtype.
"""
from __future__ import annotations

from torch import nn

from braid.engine.layers.attention import Attention, AttentionMetadata
from braid.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from braid.engine.layers.norm import RMSNorm
from braid.engine.layers.rotary import RotaryEmbedding
from braid.engine.model_config import ModelConfig
from braid.engine.models.base import CausalLM, DecoderModel
from braid.engine.parallel_state import ParallelState


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool, par: ParallelState, dtype):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], bias, par.tp, dtype)
        self.down_proj = RowParallelLinear(inter, hidden, bias, par.tp, dtype)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, par.tp, dtype
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, par.tp, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg.rope)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, par)

    def forward(self, positions, x, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)  # [T, H, D]; T may be 0 on a PCP rank
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, par, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, par, dtype)

    def forward(self, positions, x, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    """Checkpoint names map onto fused parameters: q/k/v_proj -> qkv_proj,
    gate/up_proj -> gate_up_proj."""

    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        layers = [DecoderLayer(cfg, par, dtype) for _ in range(cfg.num_layers)]
        super().__init__(cfg, DecoderModel(cfg, layers, par.tp, dtype), dtype)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
