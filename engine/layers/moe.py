"""DeepSeek-V2 mixture of experts under tensor parallelism.

Every rank holds every expert, each with its intermediate dimension split
across TP ranks (gate/up column-parallel, down row-parallel). The router is
replicated and runs in fp32, so all TP ranks pick the same experts. Routed
and shared experts leave partial sums that one all-reduce completes.

Routing follows transformers' DeepseekV2TopkRouter: softmax over the router
logits; `greedy` takes the top-k experts; `group_limited_greedy` keeps the
`topk_group` groups with the highest best-expert score (others' scores set
to 0) and takes the top-k within them; weights are the chosen softmax scores
times `routed_scaling_factor` (not renormalised).
"""
from __future__ import annotations

import torch
from torch import nn

from braid.engine.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from braid.engine.model_config import MLAConfig, ModelConfig
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


def select_experts(scores: torch.Tensor, cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [T, E] fp32 softmax -> (weights [T, k] fp32, expert ids [T, k])."""
    k = cfg.num_experts_per_tok
    if cfg.topk_method == "group_limited_greedy":
        t, e = scores.shape
        grouped = scores.view(t, cfg.n_group, e // cfg.n_group)
        best_groups = grouped.max(dim=-1).values.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)  # [T, n_group]
        scores = grouped.masked_fill(~keep[..., None], 0.0).view(t, e)
    weights, ids = scores.topk(k, dim=-1, sorted=False)
    return weights * cfg.routed_scaling_factor, ids


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        super().__init__()
        mla = cfg.mla
        self.cfg = mla
        self.tp = par.tp
        hidden, inter = cfg.hidden_size, mla.moe_intermediate_size
        self.gate = ReplicatedLinear(hidden, mla.n_routed_experts, False, dtype)  # the router
        self.experts = nn.ModuleList(
            [GatedMLP(hidden, inter, par.tp, dtype, reduce=False) for _ in range(mla.n_routed_experts)]
        )
        shared = (mla.n_shared_experts or 0) * inter
        self.shared_experts = GatedMLP(hidden, shared, par.tp, dtype, reduce=False) if shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # [T, E]
        return select_experts(logits.softmax(dim=-1), self.cfg)

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
