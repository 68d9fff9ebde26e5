"""Fitting the calibrated factors to published (or measured) prefill times.

For hardware braid cannot reach, a few end-to-end points are all there is:
(deployment, prompt length, TTFT). The cost model is linear in two factors,

    T = fixed + gemm + comm + token_s * token_units + attn_units / attn_util,

so least squares over the points gives token_s and 1 / attn_util in closed
form (numpy lstsq on two columns), relative errors weighted equally (each row
divided by its measurement, so that the 128k point does not drown the 32k one).
The factors then carry over to other parallel layouts through the transforms in
braid.planner.cost: that is the check the seed's PCP rows make.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braid.planner.cost import CostModel, Instance
from braid.planner.hardware import Hardware
from braid.planner.model import ModelSpec


@dataclass(frozen=True)
class Point:
    """One measured single-request prefill: the instance, the prompt length, TTFT in seconds."""

    inst: Instance
    length: int
    ttft_s: float


def fit_prefill(model: ModelSpec, hw: Hardware, points: list[Point]) -> Hardware:
    """`hw` with token_s and attn_util fitted to the points (at least two lengths)."""
    if len({p.length for p in points}) < 2:
        raise ValueError("fit: need points at two or more prompt lengths")
    cm = CostModel(model, hw)
    rows, rhs = [], []
    for p in points:
        t = cm.prefill_terms(p.inst, [(p.length, 0)])
        rest = t["fixed"] + t["gemm"] + t["comm"]
        rows.append([t["token_units"] / p.ttft_s, t["attn_units"] / p.ttft_s])
        rhs.append((p.ttft_s - rest) / p.ttft_s)
    (token_s, inv_util), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    if inv_util <= 0:
        raise ValueError("fit: the points show no quadratic (attention) growth; give longer prompts")
    if token_s < 0:  # the fixed terms alone overshoot: keep the attention fit, no per-token cost
        token_s = 0.0
        a = np.array(rows)[:, 1]
        inv_util = float(a @ np.array(rhs) / (a @ a))
    return hw.with_factors(token_s=float(token_s), attn_util=float(1.0 / inv_util))


def predict(model: ModelSpec, hw: Hardware, inst: Instance, lengths: list[int]) -> list[float]:
    cm = CostModel(model, hw)
    return [cm.prefill_time(inst, [n]) for n in lengths]


@dataclass(frozen=True)
class DecodePoint:
    """One measured decode step: `batch` sequences of `context` cached tokens each, TPOT in seconds."""

    inst: Instance
    batch: int
    context: int
    tpot_s: float


def fit_decode(model: ModelSpec, hw: Hardware, points: list[DecodePoint]) -> Hardware:
    """`hw` with step_overhead_s and kv_util fitted to decode steps (two contexts or
    more): T = base + step_overhead_s + ctx_sum * (kv_units / kv_util + flop_slope),
    least squares on relative error, the arithmetic's share (flop_slope) taken from
    the calibrated decode_attn_util. When that share alone explains nearly all of the
    measured slope, decode_attn_util is refitted to 90% of it instead. The split
    matters under DCP: it halves the KV read per rank, not the arithmetic (the
    queries are all-gathered)."""
    if len({p.context for p in points}) < 2:
        raise ValueError("fit: need decode points at two or more context lengths")
    cm = CostModel(model, hw)
    terms = [cm.decode_terms(p.inst, p.batch) for p in points]
    t0 = terms[0]
    if any(t["kv_units"] != t0["kv_units"] or t["flop_units"] != t0["flop_units"] for t in terms):
        raise ValueError("fit: decode points must share one layout (tp, dcp)")
    rows = [[1.0 / p.tpot_s, p.batch * p.context / p.tpot_s] for p in points]
    rhs = [(p.tpot_s - t["base"]) / p.tpot_s for p, t in zip(points, terms)]
    (step, slope), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    if slope <= 0:
        raise ValueError("fit: the decode points do not grow with context")
    step = max(float(step), 0.0)
    read = slope - t0["flop_slope"]
    if read < 0.1 * slope:
        return hw.with_factors(step_overhead_s=step, decode_attn_util=float(t0["flop_units"] / (0.9 * slope)),
                               kv_util=float(t0["kv_units"] / (0.1 * slope)))
    return hw.with_factors(step_overhead_s=step, kv_util=float(t0["kv_units"] / read))


def fit_serving(model: ModelSpec, hw: Hardware, p: Instance, d: Instance, prompt: int, ttft_s: float,
                tpot_s: float) -> Hardware:
    """`hw` with request_overhead_s and step_overhead_s set from one short request
    served through a real cluster (prefill `p` -> decode `d`, `prompt` tokens, alone):
    what its TTFT and TPOT take beyond the instances' compute as modelled."""
    cm = CostModel(model, hw)
    prefill = cm.prefill_time(p, [prompt])
    compute = prefill + cm.transfer_time(p, d, prompt, prefill)
    decode = cm.decode_step_time(d, 1, prompt) - hw.factors.step_overhead_s
    return hw.with_factors(request_overhead_s=max(ttft_s - compute, 0.0), step_overhead_s=max(tpot_s - decode, 0.0))
