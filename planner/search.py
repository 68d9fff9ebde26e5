"""Search over deployments: enumerate, simulate, keep the Pareto frontier, pick one.

A deployment is n_p prefill instances of one layout and n_d decode instances of
another, on at most `cards` devices. Layouts are what braid can run: prefill
tp x pcp (dcp 1), decode tp with dcp dividing tp, each instance within one node
(braid runs an instance's ranks in one pod) (for GQA, dcp at most
tp / kv_heads so that every DCP rank shares the same KV heads), EP over the whole
instance for MoE models. Layouts whose weights do not fit a device, or whose
decode KV cannot hold the workload's longest request, are dropped before any
simulation. Every survivor is simulated on the same requests.

The recommendation is the deployment with the most output tokens/s per card
among those meeting both SLOs at p90 (ties: lower p90 TTFT, then fewer cards);
the frontier is the set not dominated on (throughput per card, p90 TTFT, p90 TPOT).
"""
from __future__ import annotations

from dataclasses import dataclass

from braid.planner.cost import CostModel, Instance
from braid.planner.sim import percentile, simulate
from braid.planner.workload import Workload

TP_SIZES = (1, 2, 4, 8, 16, 32)
PCP_SIZES = (1, 2, 4)


@dataclass(frozen=True)
class Deployment:
    p: Instance
    n_p: int
    d: Instance
    n_d: int

    @property
    def cards(self) -> int:
        return self.n_p * self.p.world + self.n_d * self.d.world

    def label(self) -> str:
        return f"P {self.n_p} x [{self.p.label()}] + D {self.n_d} x [{self.d.label()}]"


@dataclass(frozen=True)
class Outcome:
    dep: Deployment
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float
    throughput: float

    @property
    def per_card(self) -> float:
        return self.throughput / self.dep.cards

    def meets(self, ttft_slo: float, tpot_slo: float) -> bool:
        return self.ttft_p90 <= ttft_slo and self.tpot_p90 <= tpot_slo


def _ep(model, world: int) -> int:
    return world if model.is_moe and model.routed_experts % world == 0 else 1


def prefill_layouts(cost: CostModel, cards: int, longest: int, max_num_seqs: int, budget: int) -> list[Instance]:
    m, out, node = cost.m, [], cost.hw.devices_per_node
    for tp in TP_SIZES:
        for pcp in PCP_SIZES:
            if m.heads % tp or tp * pcp > min(cards, node) or (m.is_moe and _ep(m, tp * pcp) == 1):
                continue
            inst = Instance(tp=tp, pcp=pcp, ep=_ep(m, tp * pcp), max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=budget)
            if cost.kv_capacity_tokens(inst) >= longest:
                out.append(inst)
    return out


def decode_layouts(cost: CostModel, cards: int, longest: int, max_num_seqs: int) -> list[Instance]:
    m, out = cost.m, []
    for tp in TP_SIZES:
        if m.heads % tp or tp > min(cards, cost.hw.devices_per_node) or (m.is_moe and _ep(m, tp) == 1):
            continue
        for dcp in (x for x in TP_SIZES if tp % x == 0):
            if not m.is_mla and dcp > max(1, tp // m.kv_heads):
                continue
            inst = Instance(tp=tp, dcp=dcp, ep=_ep(m, tp), max_num_seqs=max_num_seqs)
            if cost.kv_capacity_tokens(inst) >= longest:
                out.append(inst)
    return out


def deployments(cost: CostModel, cards: int, wl: Workload, prefill_seqs: int = 4,
                prefill_budget: int = 65536, decode_seqs: int = 64) -> list[Deployment]:
    """Every feasible deployment on at most `cards` devices."""
    if cards < 2:
        raise ValueError(f"--cards {cards}: need at least 2 (one prefill and one decode device)")
    longest = wl.prompt[1] + wl.output[1]
    out = []
    for p in prefill_layouts(cost, cards, wl.prompt[1], prefill_seqs, prefill_budget):
        for d in decode_layouts(cost, cards, longest, decode_seqs):
            for n_p in range(1, (cards - d.world) // p.world + 1):
                for n_d in range(1, (cards - n_p * p.world) // d.world + 1):
                    out.append(Deployment(p, n_p, d, n_d))
    if not out:
        raise ValueError(f"--cards {cards}: no deployment fits (weights, KV of a {longest}-token request) "
                         f"on {cards} devices of {cost.hw.name}")
    return out


def evaluate(cost: CostModel, dep: Deployment, wl: Workload) -> Outcome:
    r = simulate(cost, dep.p, dep.n_p, dep.d, dep.n_d, wl.draw(), wl.concurrency)
    t, o = list(r.ttft.values()), list(r.tpot.values())
    return Outcome(dep, percentile(t, 50), percentile(t, 90), percentile(t, 99), percentile(o, 50),
                   percentile(o, 90), percentile(o, 99), r.throughput)


def pareto(outcomes: list[Outcome]) -> list[Outcome]:
    """Outcomes no other beats on all of throughput per card (up), p90 TTFT and p90 TPOT (down)."""
    def dominates(a, b):
        ge = a.per_card >= b.per_card and a.ttft_p90 <= b.ttft_p90 and a.tpot_p90 <= b.tpot_p90
        return ge and (a.per_card > b.per_card or a.ttft_p90 < b.ttft_p90 or a.tpot_p90 < b.tpot_p90)
    return sorted((o for o in outcomes if not any(dominates(x, o) for x in outcomes)), key=lambda o: -o.per_card)


def recommend(outcomes: list[Outcome], ttft_slo: float, tpot_slo: float) -> Outcome | None:
    ok = [o for o in outcomes if o.meets(ttft_slo, tpot_slo)]
    return min(ok, key=lambda o: (-o.per_card, o.ttft_p90, o.dep.cards)) if ok else None


def search(cost: CostModel, cards: int, wl: Workload, ttft_slo: float, tpot_slo: float, **limits):
    """(all outcomes, the Pareto frontier, the recommendation or None)."""
    outcomes = [evaluate(cost, dep, wl) for dep in deployments(cost, cards, wl, **limits)]
    return outcomes, pareto(outcomes), recommend(outcomes, ttft_slo, tpot_slo)
