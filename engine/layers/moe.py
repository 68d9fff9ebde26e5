"""Mixture of experts (DeepSeek-V2, Qwen3-MoE) under tensor parallelism.

In a request's life: the MLP of every sparse decoder layer, for every token of
every step (prefill chunks and decodes alike).

Every rank holds every expert, each with its intermediate dimension split
across TP ranks (gate/up column-parallel, down row-parallel). The router is
replicated with a replicated input, so all TP ranks pick the same experts.
Routed and shared experts leave partial sums that one all-reduce completes.

Routing follows transformers' DeepseekV2TopkRouter and Qwen3MoeTopKRouter:
softmax (fp32) over the router logits; `greedy` takes the top-k experts;
`group_limited_greedy` keeps the `topk_group` groups with the highest
best-expert score (others' scores set to 0) and takes the top-k within them;
with `norm_topk_prob` (Qwen3-MoE) the chosen scores are renormalised to sum to
1; weights are then scaled by `routed_scaling_factor` (DeepSeek-V2).
DeepSeek-V2 computes the router logits in fp32; Qwen3-MoE in the activations'
dtype, casting the weights back to it (MoEConfig.fp32_router).
"""
from __future__ import annotations

import torch
from torch import nn

from braid.engine.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from braid.engine.layers.norm import RMSNorm
from braid.engine.model_config import ModelConfig, MoEConfig
from braid.engine.parallel_state import GroupComm, ParallelState


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), intermediate split across TP ranks. With
    `reduce=False` the output is this rank's partial sum."""

    def __init__(self, hidden: int, inter: int, tp: GroupComm, dtype, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], False, tp, dtype)
        self.down_proj = RowParallelLinear(inter, hidden, False, tp, dtype, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


def select_experts(scores: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [T, E] fp32 softmax -> (weights [T, k] fp32, expert ids [T, k])."""
    k = cfg.num_experts_per_tok
    if cfg.topk_method == "group_limited_greedy":
        t, e = scores.shape
        grouped = scores.view(t, cfg.n_group, e // cfg.n_group)
        best_groups = grouped.max(dim=-1).values.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)  # [T, n_group]
        scores = grouped.masked_fill(~keep[..., None], 0.0).view(t, e)
    # sorted when renormalising: the sum then adds in transformers' (descending) order
    weights, ids = scores.topk(k, dim=-1, sorted=cfg.norm_topk_prob)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * cfg.routed_scaling_factor, ids


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        super().__init__()
        moe = cfg.moe
        self.cfg = moe
        self.tp = par.tp
        hidden, inter = cfg.hidden_size, moe.moe_intermediate_size
        self.gate = ReplicatedLinear(hidden, moe.num_experts, False, dtype)  # the router
        self.experts = nn.ModuleList(
            [GatedMLP(hidden, inter, par.tp, dtype, reduce=False) for _ in range(moe.num_experts)]
        )
        shared = moe.n_shared_experts * inter
        self.shared_experts = GatedMLP(hidden, shared, par.tp, dtype, reduce=False) if shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.fp32_router:
            logits = nn.functional.linear(x.float(), self.gate.weight.float())  # [T, E]
            return select_experts(logits.softmax(dim=-1), self.cfg)
        logits = nn.functional.linear(x, self.gate.weight)
        weights, ids = select_experts(logits.softmax(dim=-1, dtype=torch.float32), self.cfg)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, hidden]
        weights, ids = self.route(x)  # [T, k]
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y = self.experts[e](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.tp.all_reduce(out)


class MoEDecoderLayer(nn.Module):
    """A pre-norm residual block (RMSNorm in fp32, as transformers) whose MLP is the
    sparse MoE where the model's MoEConfig says the layer is sparse and a dense gated
    MLP of `intermediate_size` elsewhere; `self_attn` is the model's attention
    (DeepSeek-V2: MLA; Qwen3-MoE: GQA with q/k norm). Parameter names are the
    checkpoints'."""

    def __init__(self, cfg: ModelConfig, layer: int, par: ParallelState, dtype, self_attn: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.moe is not None and cfg.moe.is_moe_layer(layer):
            self.mlp = MoE(cfg, par, dtype)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, par.tp, dtype)

    def forward(self, positions, x, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))
