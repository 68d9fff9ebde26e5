"""DeepSeek-V2 multi-head latent attention (MLA) under TP, DCP and PCP.

Each token caches one latent "head": `kv_c_normed (kv_lora_rank) || k_pe
(qk_rope_head_dim, rope applied)`, the same on every TP rank, stored only on
the token's owner KV shard. Query heads (q_b_proj / q_proj), the key/value
up-projection kv_b_proj and o_proj are split by heads across TP ranks; the
latent projections (q_a_proj, kv_a_proj_with_mqa) are replicated.

One step of one layer, on one rank:

prefill (un-absorbed)
  1. q of this rank's heads for its tokens; the latent of its tokens.
  2. (PCP) all-gather only the latent over the PCP group, in token order.
  3. write each token's latent on its owner shard.
  4. decompress K/V of all new tokens for this rank's heads with kv_b_proj
     and attend causally (q/k head dim nope + rope, v head dim v_head_dim).
  5. (cached context: a later chunk, a prefix hit) attend the absorbed query
     to the sharded latent cache as decode does, map the result through W_UV
     and merge it with step 4's by LSE.
decode (absorbed)
  1. write the new token's latent on its owner shard.
  2. absorb W_UK into the query: q_nope [S, H, nope] -> [S, H, kv_lora_rank],
     concatenate q_pe -> [S, H, kv_lora_rank + rope].
  3. MQA over the latent cache (K = latent, V = its first kv_lora_rank dims);
     `cp_decode_attention` all-gathers q over DCP heads and merges the shards
     exactly by LSE.
  4. W_UV: [S, H, kv_lora_rank] -> [S, H, v_head_dim]; o_proj (all-reduce).
"""
from __future__ import annotations

import torch
from torch import nn

from braid.engine.layers.attention import AttentionMetadata, context_attention, cp_decode_attention, with_context
from braid.engine.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from braid.engine.layers.norm import RMSNorm
from braid.engine.layers.rotary import RotaryEmbedding, yarn_softmax_scale
from braid.engine.model_config import ModelConfig
from braid.engine.parallel_state import ParallelState
from braid.kernels import ops
from braid.kernels.mla import latent_views

LORA_NORM_EPS = 1e-6
"""transformers builds q_a_layernorm and kv_a_layernorm with the default eps, not rms_norm_eps."""


class MLAAttention(nn.Module):
    """Self-attention of one DeepSeek-V2 layer; `cache` is this layer's latent
    cache `[num_blocks, 1, 1, B, kv_lora_rank + rope]`, bound by the worker."""

    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        super().__init__()
        mla = cfg.mla
        tp = par.tp
        self.par = par
        self.num_heads = cfg.num_heads // tp.size
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        hidden, bias = cfg.hidden_size, mla.attention_bias
        self.q_lora = bool(mla.q_lora_rank)
        if self.q_lora:
            self.q_a_proj = ReplicatedLinear(hidden, mla.q_lora_rank, bias, dtype)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LORA_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(mla.q_lora_rank, [cfg.num_heads * qk_dim], False, tp, dtype)
        else:
            self.q_proj = ColumnParallelLinear(hidden, [cfg.num_heads * qk_dim], False, tp, dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, bias, dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LORA_NORM_EPS, dtype)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, [cfg.num_heads * (self.nope_dim + self.v_dim)], False, tp, dtype
        )
        self.kv_b_proj.prepackable = False  # up_weights() reads it (the absorbed decode)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.v_dim, hidden, bias, tp, dtype)
        self.rotary = RotaryEmbedding(cfg.rope, interleaved=True)
        self.scale = qk_dim**-0.5 * yarn_softmax_scale(cfg.rope.scaling, cfg.rope.max_position_embeddings)
        self.cache: torch.Tensor | None = None
        self.layer_idx = -1  # bound by the worker

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's heads of kv_b_proj as (W_UK [H, nope, L], W_UV [H, v, L]) views."""
        w = self.kv_b_proj.dense_weight().view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self._query(x).view(t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :])  # [T, H, R], [T, 1, R]
        latent = torch.cat([self.kv_a_layernorm(kv_c), k_pe[:, 0]], dim=-1)  # [T, L + R]
        if meta.is_prefill:
            out = self.prefill(q_nope, q_pe, latent, meta)
        else:
            out = self.decode(q_nope, q_pe, latent, meta)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))

    def prefill(self, q_nope, q_pe, latent, meta: AttentionMetadata) -> torch.Tensor:
        """Un-absorbed: attend with decompressed K/V of all new tokens; returns [T, H, v]."""
        latent = meta.gather_new_tokens(latent, self.par)  # [T_full, L + R]
        ops.write_kv_cache(self.cache, latent[:, None, None, :], meta.slot_mapping)
        meta.layer_written(self.layer_idx)  # KV transfer can send this layer now
        kv = self.kv_b_proj(latent[:, : self.kv_lora_rank])  # [T_full, H * (nope + v)]
        k_nope, v = kv.view(-1, self.num_heads, self.nope_dim + self.v_dim).split([self.nope_dim, self.v_dim], dim=-1)
        k_pe = latent[:, None, self.kv_lora_rank :].expand(-1, self.num_heads, -1)  # [T_full, H, R]
        k = torch.cat([k_nope, k_pe], dim=-1)  # [T_full, H, nope + R]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, nope + R]
        out, lse = ops.prefill_attention(q, k, v, meta.rows, self.scale)
        if meta.context is None:
            return out
        # the cached context in the absorbed form (as decode reads it); W_UV is linear, so
        # it can be applied before the LSE merge: both partials are then in v space
        w_uk, w_uv = self.up_weights()
        q_cat = torch.cat([torch.einsum("thn,hnl->thl", q_nope, w_uk), q_pe], dim=-1)
        k_cache, v_cache = latent_views(self.cache, self.kv_lora_rank)
        ctx_out, ctx_lse = context_attention(q_cat, k_cache, v_cache, meta, self.par, self.scale)
        return with_context(out, lse, torch.einsum("thl,hvl->thv", ctx_out, w_uv.float()), ctx_lse)

    def decode(self, q_nope, q_pe, latent, meta: AttentionMetadata) -> torch.Tensor:
        """Absorbed: MQA over the latent cache; returns [S, H, v]."""
        ops.write_kv_cache(self.cache, latent[:, None, None, :], meta.slot_mapping)
        w_uk, w_uv = self.up_weights()
        q_lat = torch.einsum("shn,hnl->shl", q_nope, w_uk)  # [S, H, L]
        q_cat = torch.cat([q_lat, q_pe], dim=-1)  # [S, H, L + R]
        k_cache, v_cache = latent_views(self.cache, self.kv_lora_rank)
        out = cp_decode_attention(q_cat, k_cache, v_cache, meta, self.par, self.scale)  # [S, H, L]
        return torch.einsum("shl,hvl->shv", out, w_uv)
