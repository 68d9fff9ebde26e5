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
DeepSeek-V3 (`noaux_tc`, transformers' DeepseekV3TopkRouter) scores each expert
with a sigmoid and adds `e_score_correction_bias` for choosing only: groups
ranked by the sum of their two best corrected scores, `topk_group` kept (the
others' corrected scores set to -inf), top-k experts by corrected score, weighted
by their uncorrected scores (renormalised with norm_topk_prob, +1e-20), times
`routed_scaling_factor`. transformers keeps DeepSeek's router weight and bias
in fp32 whatever the model's dtype, and so does braid (`router`).
"""
from __future__ import annotations

import copy

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


def select_experts(
    scores: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [T, E] fp32 (softmax; sigmoid for noaux_tc, whose `bias` [E] is the
    fp32 e_score_correction_bias) -> (weights [T, k] fp32, expert ids [T, k])."""
    k = cfg.num_experts_per_tok
    if cfg.topk_method == "noaux_tc":
        return _select_noaux_tc(scores, bias, cfg)
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


def _select_noaux_tc(scores: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's choice, op for op as transformers (so ties break the same way)."""
    t, e = scores.shape
    corrected = scores + bias  # for choosing only
    group_scores = corrected.view(t, cfg.n_group, e // cfg.n_group).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    best_groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    keep = keep[:, :, None].expand(t, cfg.n_group, e // cfg.n_group).reshape(t, e)
    # -inf, not 0: corrected scores can be negative
    ids = corrected.masked_fill(~keep, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def router(hidden: int, moe: MoEConfig, dtype) -> ReplicatedLinear:
    """The replicated router `mlp.gate`. With fp32_router (DeepSeek) its weight, and
    DeepSeek-V3's `e_score_correction_bias`, are fp32 and read from the checkpoint in
    fp32 (transformers' _keep_in_fp32_modules_strict): rounding the bias to bf16
    would change which experts are chosen."""
    gate = ReplicatedLinear(hidden, moe.num_experts, False, torch.float32 if moe.fp32_router else dtype)
    gate.prepackable = False  # route() reads its weight
    if moe.fp32_router:
        gate.weight.weight_loader = _load_fp32
    if moe.topk_method == "noaux_tc":
        bias = nn.Parameter(torch.zeros(moe.num_experts, dtype=torch.float32), requires_grad=False)
        bias.weight_loader = _load_fp32
        gate.e_score_correction_bias = bias
    return gate


def _load_fp32(param: torch.Tensor, lazy, shard_id=None) -> None:
    fp32 = copy.copy(lazy)  # the same checkpoint tensor, read as float32 instead of the engine's dtype
    fp32.dtype = torch.float32
    value = fp32.full()
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{lazy.name}: checkpoint shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(value)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelState, dtype):
        super().__init__()
        moe = cfg.moe
        self.cfg = moe
        self.tp = par.tp
        hidden, inter = cfg.hidden_size, moe.moe_intermediate_size
        self.gate = router(hidden, moe, dtype)
        self.par = par
        self.ep = par.ep
        local = local_experts(moe.num_experts, par)
        expert_tp = par.tp if self.ep is None else GroupComm([0], None, 0)  # under EP an expert is whole
        # keyed by global expert id, so parameter names are the checkpoint's (`experts.{e}.…`)
        self.experts = nn.ModuleDict(
            {str(e): GatedMLP(hidden, inter, expert_tp, dtype, reduce=False) for e in local}
        )
        # rows each local expert computed (this rank's count; summed over steps)
        self.register_buffer("expert_rows", torch.zeros(len(local), dtype=torch.int64), persistent=False)
        self.first_expert = local.start
        shared = moe.n_shared_experts * inter
        self.shared_experts = GatedMLP(hidden, shared, par.tp, dtype, reduce=False) if shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.fp32_router:
            logits = nn.functional.linear(x.float(), self.gate.weight.float())  # [T, E]
            if self.cfg.scoring_func == "sigmoid":
                return select_experts(logits.sigmoid(), self.cfg, self.gate.e_score_correction_bias)
            return select_experts(logits.softmax(dim=-1), self.cfg)
        logits = nn.functional.linear(x, self.gate.dense_weight())  # a float8 router kept at rest too
        weights, ids = select_experts(logits.softmax(dim=-1, dtype=torch.float32), self.cfg)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor, same_on_pcp: bool = False) -> torch.Tensor:
        """x [T, hidden], the same on every TP rank; `same_on_pcp`: also the same on
        every PCP rank (decode steps), so EP across PCP ranks splits them too."""
        if self.ep is not None:
            return self._forward_ep(x, same_on_pcp)
        out = self._held_experts(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.tp.all_reduce(out)

    def _held_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Route every token of x and run the experts this rank holds on the tokens
        that chose them: this rank's partial sum of the routed output."""
        weights, ids = self.route(x)  # [T, k]
        out = torch.zeros_like(x)
        first, last = self.first_expert, self.first_expert + self.expert_rows.numel()
        for e in ids.unique().tolist():
            if not first <= e < last:
                continue
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y = self._expert(e, x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        self.expert_rows[e - self.first_expert] += rows.shape[0]
        return self.experts[str(e)](rows)

    def _forward_ep(self, x: torch.Tensor, same_on_pcp: bool) -> torch.Tensor:
        """Where every member of the EP group holds every token (an EP group inside
        a TP group, or any decode step) nothing needs dispatching: each rank routes
        all tokens and runs its own experts on those that chose them, and the sum
        over the group combines them (one all-reduce, as TP-sliced experts need).
        Otherwise (prefill with EP across PCP ranks) the members holding the same
        tokens split them, send each (token, expert) pair to its expert's rank and
        back with all-to-all (dispatch_combine), and the shares are summed back
        together (disjoint rows: the sum is a gather). The shared experts' TP
        partial sums join the same all-reduce where the groups coincide."""
        share = self.ep if same_on_pcp else self.par.ep_share
        if share.ranks == self.ep.ranks:
            routed = self._held_experts(x)
        else:
            lo, hi = _share_bounds(x.shape[0], share.size, share.rank_in_group)
            routed = torch.zeros_like(x)
            routed[lo:hi] = self._dispatch_combine(x[lo:hi])
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if share.ranks == self.tp.ranks:  # one all-reduce over TP completes both
            return self.tp.all_reduce(routed if shared is None else routed + shared)
        routed = share.all_reduce(routed)
        return routed if shared is None else routed + self.tp.all_reduce(shared)

    def _dispatch_combine(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, hidden] (this rank's share) -> sum over each token's top-k experts
        of weight * expert(token), the experts run on the EP ranks holding them:
        one all-to-all sends each (token, expert) pair to its expert's rank, a
        second brings the outputs back."""
        ep = self.ep
        weights, ids = self.route(x)  # [t, k]
        k = ids.shape[1]
        flat = ids.flatten()
        dest = flat // (self.cfg.num_experts // ep.size)
        order = dest.argsort(stable=True)  # pairs grouped by destination rank
        tok = order // k
        send = torch.bincount(dest, minlength=ep.size)
        recv = ep.all_to_all(send.view(ep.size, 1)).view(-1)
        send_l, recv_l = send.tolist(), recv.tolist()
        got_x = ep.all_to_all_v(x[tok], send_l, recv_l)
        got_e = ep.all_to_all_v(flat[order], send_l, recv_l)
        y = torch.empty_like(got_x)
        for e in got_e.unique().tolist():
            rows = (got_e == e).nonzero(as_tuple=True)[0]
            y[rows] = self._expert(e, got_x[rows]).to(y.dtype)
        back = ep.all_to_all_v(y, recv_l, send_l)  # [t*k, hidden] in `order`
        out = torch.zeros_like(x)
        out.index_add_(0, tok, (back * weights.flatten()[order, None]).to(out.dtype))
        return out


def local_experts(num_experts: int, par: ParallelState) -> range:
    """The routed experts this rank holds: all of them without EP, else its
    EP rank's contiguous run of num_experts / ep."""
    if par.ep is None:
        return range(num_experts)
    per = num_experts // par.ep.size
    return range(par.ep.rank_in_group * per, (par.ep.rank_in_group + 1) * per)


def _share_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [lo, hi) of part `index` when n rows are cut into `parts` near-equal runs."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


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
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):  # decode steps give every PCP rank the same tokens
            return x + self.mlp(h, same_on_pcp=not meta.is_prefill)
        return x + self.mlp(h)
