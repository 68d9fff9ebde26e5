"""The cost model: seconds of one prefill batch, one decode step, one KV transfer.

Each operator costs max(FLOPs / (peak x util), bytes / (bandwidth x util)) plus
fixed overheads; collectives are alpha-beta (latency per step + bytes over the
link). Parallelism enters as transforms of who does which share:

  * TP splits heads and projections; an all-reduce of the hidden state after the
    attention block and after a dense MLP (a MoE layer's reduce-scatter before
    dispatch and all-gather after combine count as that one all-reduce).
  * PCP splits a prompt's tokens over pcp ranks (zigzag, so each rank gets an equal
    share of the causal attention work) and all-gathers K/V per layer. Attention
    and projections then run on tp x pcp devices.
  * DP (attention data parallelism, the seed's baseline) gives each request one
    lane of tp x pcp devices; lanes share the MoE (EP) devices.
  * DCP splits the cached KV of a sequence over dcp ranks of the TP group:
    a query all-gather and an output + LSE all-gather per layer.
  * EP spreads routed experts over ep devices; dispatch and combine all-to-alls.

Summing the terms gives, for one prompt of length L, T = a + b L + c L^2: the
quadratic term is attention (halved by PCP 2), the linear term the projections,
MLP/experts and `Factors.token_s`, which the seed data shows is not a GEMM
roofline (it is the same for DP2 and PCP2 on the same 16 devices, because the
experts run on all of them in both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from braid.planner.hardware import Hardware
from braid.planner.model import ModelSpec


@dataclass(frozen=True, kw_only=True)
class Instance:
    """One prefill or decode instance: its parallel layout and batching limits."""

    tp: int = 1
    pcp: int = 1
    dcp: int = 1
    ep: int = 1
    dp: int = 1
    max_num_seqs: int = 1
    max_num_batched_tokens: int = 1 << 20

    def __post_init__(self):
        for name in ("tp", "pcp", "dcp", "ep", "dp", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tp % self.dcp:
            raise ValueError(f"dcp {self.dcp} must divide tp {self.tp}")
        if self.ep > self.world:
            raise ValueError(f"ep {self.ep} exceeds the instance's {self.world} devices")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pcp

    def label(self) -> str:
        parts = [f"dp{self.dp}"] if self.dp > 1 else []
        parts += [f"tp{self.tp}"] + [f"{k}{getattr(self, k)}" for k in ("pcp", "dcp", "ep") if getattr(self, k) > 1]
        return " ".join(parts)


class CostModel:
    """Seconds for the work of one instance, from a model, a hardware spec and its factors."""

    def __init__(self, model: ModelSpec, hw: Hardware):
        self.m = model
        self.hw = hw
        self.f = hw.factors
        self._decode_cache: dict = {}

    # -- primitives ---------------------------------------------------------------------------

    def _op(self, flops: float, nbytes: float, peak: float, util: float) -> float:
        return max(flops / (peak * util), nbytes / (self.hw.mem_bw * self.f.mem_util))

    def _collective(self, nbytes: float, group: int, phases: int) -> float:
        """Alpha-beta: a latency per log2(group) step of each of `phases` phases (tree or
        recursive doubling, what small messages use), plus `nbytes` through one link."""
        if group <= 1:
            return 0.0
        latency = phases * math.ceil(math.log2(group)) * self.hw.link_latency_s
        return latency + nbytes / (self.hw.link_bw(group) * self.f.comm_util)

    def _all_reduce(self, nbytes: float, n: int) -> float:
        return self._collective(2 * nbytes * (n - 1) / n, n, 2)

    def _all_gather(self, nbytes_total: float, n: int) -> float:
        return self._collective(nbytes_total * (n - 1) / n, n, 1)

    def _act_bytes(self) -> int:
        return 1 if self.m.weight_bytes == 1 else 2

    # -- shares of one layer -------------------------------------------------------------------

    def _mlp_layer(self, inst: Instance, tokens: float, lane_tokens: float, moe: bool) -> dict:
        """The MLP of one layer: experts over ep devices (all tokens of the instance
        pooled) or a dense MLP on the lane's tp x pcp devices. Returns seconds by term."""
        m, peak = self.m, self.hw.peak(self.m.weight_bytes)
        if moe:
            per_expert = m.expert_params() * m.weight_bytes
            touched = m.routed_experts / inst.ep * min(1.0, 1 - (1 - m.top_k / m.routed_experts) ** max(tokens, 0))
            nbytes = touched * per_expert + m.shared_experts * per_expert / inst.tp
            gemm = self._op(2 * tokens * m.active_moe_params() / inst.ep, nbytes, peak, self.f.gemm_util)
            ep_bytes = tokens / inst.ep * m.top_k * m.hidden * (self._act_bytes() + 2) * (inst.ep - 1) / inst.ep
            comm = self._collective(ep_bytes, inst.ep, 2)  # dispatch and combine
            return {"gemm": gemm, "token": tokens / inst.ep, "comm": comm}
        n = inst.tp * inst.pcp
        gemm = self._op(2 * lane_tokens * m.dense_mlp_params() / n, m.dense_mlp_params() * m.weight_bytes / inst.tp,
                        peak, self.f.gemm_util)
        comm = self._all_reduce(lane_tokens / inst.pcp * m.hidden * 2, inst.tp)  # after the down projection
        return {"gemm": gemm, "token": lane_tokens / n, "comm": comm}

    def _sum_layers(self, attn: dict, dense: dict, moe: dict) -> dict:
        """All layers: the attention block on every layer, dense and MoE MLPs on theirs."""
        out = {}
        for key in ("gemm", "token", "comm", "attn"):
            out[key] = (self.m.layers * attn.get(key, 0.0) + self.m.dense_layers * dense.get(key, 0.0)
                        + self.m.moe_layers * moe.get(key, 0.0))
        return out

    # -- prefill ---------------------------------------------------------------------------

    def _lanes(self, inst: Instance, lengths: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Requests (new, cached) spread over the dp lanes, longest first onto the
        least loaded lane (attention work ~ new x (new + 2 cached))."""
        lanes = [[] for _ in range(inst.dp)]
        load = [0.0] * inst.dp
        for new, cached in sorted(lengths, key=lambda r: -r[0] * (r[0] + 2 * r[1])):
            i = min(range(inst.dp), key=load.__getitem__)
            lanes[i].append((new, cached))
            load[i] += new * (new + 2 * cached)
        return lanes

    def prefill_terms(self, inst: Instance, lengths: list[tuple[int, int]]) -> dict:
        """Seconds by term for one prefill step over requests (new tokens, cached tokens),
        with token_s and attn_util taken as 1 in "token_units" and "attn_units", so that
        a fit can scale them: total = fixed + gemm + comm + token_s x token_units
        + attn_units / attn_util."""
        m, n_attn = self.m, inst.tp * inst.pcp
        lanes = self._lanes(inst, lengths)
        lane_tok = [sum(r[0] for r in lane) for lane in lanes]
        worst = max(range(inst.dp), key=lambda i: (sum(m.causal_prefill_attn_flops(*r) for r in lanes[i]), lane_tok[i]))
        lt, tokens = lane_tok[worst], sum(lane_tok)
        attn_flops = sum(m.causal_prefill_attn_flops(*r) for r in lanes[worst]) / m.layers
        kvb = m.kv_bytes_per_token_layer()
        attn = {
            "gemm": self._op(2 * lt * m.attn_proj_params() / n_attn, m.attn_proj_params() * m.weight_bytes / inst.tp,
                             self.hw.peak(m.weight_bytes), self.f.gemm_util),
            "attn": attn_flops / n_attn / self.hw.peak(m.kv_bytes),
            # o_proj's all-reduce (before MoE: a reduce-scatter, the all-gather after the combine)
            "comm": self._all_reduce(lt / inst.pcp * m.hidden * 2, inst.tp)
            + self._all_gather(sum(r[0] + r[1] for r in lanes[worst]) * kvb, inst.pcp),
        }
        dense = self._mlp_layer(inst, tokens, lt, moe=False) if m.dense_layers else {}
        moe = self._mlp_layer(inst, tokens, lt, moe=True) if m.moe_layers else {}
        s = self._sum_layers(attn, dense, moe)
        fixed = m.layers * self.f.layer_overhead_s + self.f.step_overhead_s
        return {"fixed": fixed, "gemm": s["gemm"], "comm": s["comm"], "token_units": s["token"],
                "attn_units": s["attn"]}

    def combine(self, t: dict) -> float:
        scaled = self.f.token_s * t["token_units"] + t["attn_units"] / self.f.attn_util
        return t["fixed"] + t["gemm"] + t["comm"] + scaled

    def prefill_time(self, inst: Instance, lengths: list[int] | list[tuple[int, int]]) -> float:
        reqs = [r if isinstance(r, tuple) else (int(r), 0) for r in lengths]
        return self.combine(self.prefill_terms(inst, reqs))

    # -- decode ----------------------------------------------------------------------------

    def kv_share(self, inst: Instance) -> float:
        """Fraction of a sequence's KV bytes one device holds (and reads per step):
        MLA's single latent head is replicated over TP and split by DCP; GQA's KV
        heads are split over TP (replicated past kv_heads), then by DCP."""
        if self.m.is_mla:
            return 1.0 / inst.dcp
        return 1.0 / (min(inst.tp, self.m.kv_heads) * inst.dcp)

    def decode_step_time(self, inst: Instance, batch: int, ctx_sum: int) -> float:
        """One decode step of `batch` sequences holding `ctx_sum` cached tokens in all."""
        if batch == 0:
            return 0.0
        fixed, per_ctx = self.decode_coeffs(inst, batch)
        return fixed + per_ctx * ctx_sum

    def decode_coeffs(self, inst: Instance, batch: int) -> tuple[float, float]:
        """(seconds independent of context, seconds per cached token) of a decode step:
        attention is linear in the context (its KV read plus its arithmetic: a paged
        decode kernel streams the cache and computes on it, and on a CPU the two do not
        overlap; on an accelerator the arithmetic is small beside the read), all
        else depends on the batch only. Cached, since the simulator asks per step."""
        key = (inst, batch)
        if key not in self._decode_cache:
            self._decode_cache[key] = self._decode_coeffs(inst, batch)
        return self._decode_cache[key]

    def _decode_coeffs(self, inst: Instance, batch: int) -> tuple[float, float]:
        t = self.decode_terms(inst, batch)
        return t["base"] + self.f.step_overhead_s, t["kv_units"] / self.f.kv_util + t["flop_slope"]

    def decode_terms(self, inst: Instance, batch: int) -> dict:
        """A decode step by term, the fitted factors left out: "base" (seconds besides
        step_overhead_s), "kv_units" (seconds per cached token at kv_util 1: the KV
        read), "flop_units" (the same for attention arithmetic at utilisation 1) and
        "flop_slope" (that at the decode attention's utilisation)."""
        m, f = self.m, self.f
        peak, attn_peak = self.hw.peak(m.weight_bytes), self.hw.peak(m.kv_bytes)
        kv_units = m.layers * m.kv_bytes_per_token_layer() * self.kv_share(inst) / self.hw.mem_bw
        # DCP splits the tokens but all-gathers the queries: a rank computes heads / tp x dcp
        # heads over ctx / dcp tokens, the same arithmetic as without DCP
        flop_units = m.layers * m.attn_flops_per_pair(absorbed=True) / inst.tp / attn_peak
        flop_slope = flop_units / (f.decode_attn_util or f.attn_util)
        attn = {
            "gemm": self._op(2 * batch * m.attn_proj_params() / inst.tp,
                             m.attn_proj_params() * m.weight_bytes / inst.tp, peak, f.gemm_util),
            "comm": self._all_reduce(batch * m.hidden * 2, inst.tp)
            + 2 * self._all_gather(batch * m.heads * (m.kv_lora or m.head_dim) * 2, inst.dcp),
        }
        dense = self._mlp_layer(inst, batch, batch, moe=False) if m.dense_layers else {}
        moe = self._mlp_layer(inst, batch, batch, moe=True) if m.moe_layers else {}
        s = self._sum_layers(attn, dense, moe)
        head = self._op(2 * batch * m.vocab * m.hidden / inst.tp, m.vocab * m.hidden * 2 / inst.tp, attn_peak,
                        f.gemm_util)
        base = m.layers * f.layer_overhead_s + head + s["gemm"] + s["comm"] + f.token_s * s["token"]
        return {"base": base, "kv_units": kv_units, "flop_units": flop_units, "flop_slope": flop_slope}

    # -- memory and transfer -------------------------------------------------------------------

    def weight_bytes_per_device(self, inst: Instance) -> float:
        m = self.m
        experts = m.moe_layers * (m.routed_experts * m.expert_params() / inst.ep
                                  + m.shared_experts * m.expert_params() / inst.tp)
        per_tp = m.layers * m.attn_proj_params() + m.dense_layers * m.dense_mlp_params()
        return (per_tp / inst.tp + experts) * m.weight_bytes + 2 * m.vocab * m.hidden * 2 / inst.tp

    def kv_capacity_tokens(self, inst: Instance) -> int:
        """Tokens of KV the instance holds: each device's memory after weights and the
        reserve, over its share of a token's KV; 0 when the weights do not fit."""
        free = self.hw.mem_bytes - self.hw.reserve_bytes - self.weight_bytes_per_device(inst)
        if free <= 0:
            return 0
        per_token = self.m.kv_bytes_per_token() * self.kv_share(inst)
        return int(free / per_token) * inst.dp

    @property
    def request_overhead_s(self) -> float:
        """A request's hops beyond compute (router, reservation, RPCs), added to TTFT."""
        return self.f.request_overhead_s

    def transfer_time(self, p: Instance, d: Instance, tokens: int, prefill_s: float) -> float:
        """Exposed P->D KV transfer: layer by layer, so all but the last layer's share
        hides behind the prefill that is still running; each device has its own link."""
        links = min(p.world, d.world)
        total = tokens * self.m.kv_bytes_per_token() / (self.hw.scaleout_bw * self.f.comm_util * links)
        last = total / self.m.layers
        return max(last, total - prefill_s * (self.m.layers - 1) / self.m.layers)
