"""`braid plan`: the planner's command line (registered by braid.cluster.cli).

    braid plan --model deepseek-r1 --hardware 910c --cards 64 \\
               --ttft-slo 10s --tpot-slo 50ms --workload long-context [--out DIR]
    braid plan calibrate [--out FILE] [--no-collectives]
    braid plan fit --model M --hardware H --point dp2,tp8,ep16:32768:9.3 ... [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import re

import yaml

from braid.planner.cost import CostModel, Instance
from braid.planner.hardware import LOCAL_PATH, hardware_to_dict, load_hardware
from braid.planner.model import load_model

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "": 1.0}


def parse_duration(text: str) -> float:
    """Seconds from "10s", "50ms", "1.5", "2min"; argparse names the flag on error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|s|min|m|)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration (e.g. 10s, 50ms, 1.5)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_instance(text: str) -> Instance:
    """"dp2,tp8,ep16" or "tp8,pcp2,dcp8,ep16" -> Instance."""
    sizes = {}
    for part in text.split(","):
        match = re.fullmatch(r"(dp|tp|pcp|dcp|ep)([0-9]+)", part.strip())
        if not match:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated dpN, tpN, pcpN, dcpN, epN")
        sizes[match.group(1)] = int(match.group(2))
    try:
        return Instance(**sizes)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def parse_point(text: str):
    """"LAYOUT:LENGTH:TTFT" (TTFT a duration) -> fit.Point."""
    from braid.planner.fit import Point

    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected LAYOUT:LENGTH:TTFT, e.g. dp2,tp8,ep16:32768:9.3s")
    return Point(parse_instance(parts[0]), int(parts[1]), parse_duration(parts[2]))


def _plan(args) -> int:
    from braid.planner import report
    from braid.planner.overlay import write_overlay
    from braid.planner.search import search
    from braid.planner.workload import load_workload

    if args.cards < 1:
        raise ValueError(f"--cards must be >= 1, got {args.cards}")
    model, hw, wl = load_model(args.model), load_hardware(args.hardware), load_workload(args.workload)
    cost = CostModel(model, hw)
    outcomes, frontier, best = search(cost, args.cards, wl, args.ttft_slo, args.tpot_slo)
    print(f"model {model.name} on {args.cards} x {hw.name}; {len(outcomes)} deployments simulated "
          f"({wl.requests} requests each); Pareto frontier:")
    print(report.table(frontier[: args.top]))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "plan.png")
    report.plot(outcomes, frontier, best, png, args.ttft_slo, args.tpot_slo)
    with open(os.path.join(args.out, "plan.txt"), "w") as f:
        f.write(report.table(sorted(outcomes, key=lambda o: -o.per_card)) + "\n")
    if best is None:
        print(f"no deployment meets TTFT p90 <= {args.ttft_slo:g} s and TPOT p90 <= {args.tpot_slo:g} s; "
              f"see {png}")
        return 1
    print(report.summary(best, args.ttft_slo, args.tpot_slo))
    overlay = write_overlay(args.out, best.dep, hw.device, hw.resource, args.model_path,
                            note=report.summary(best, args.ttft_slo, args.tpot_slo))
    with open(os.path.join(overlay, "cluster.yaml")) as f:
        model_path = yaml.safe_load(f)["model"]
    print(f"wrote {png}, {os.path.join(args.out, 'plan.txt')} and the overlay {overlay} "
          f"(kubectl kustomize {overlay}); its cluster.yaml loads model {model_path} (--model-path to change)")
    return 0


def _calibrate(args) -> int:
    from braid.planner.calibrate import calibrate

    hw = calibrate(collectives=not args.no_collectives)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        yaml.safe_dump(hardware_to_dict(hw), f, sort_keys=False)
    fct = hw.factors
    print(f"fp32 peak {hw.peak_flops['fp32'] / 1e9:.1f} GFLOP/s per thread, memory {hw.mem_bw / 1e9:.1f} GB/s, "
          f"attention util {fct.attn_util:.2f} (decode {fct.decode_attn_util:.2f}), collectives "
          f"{hw.scaleup_bw / 1e9:.2f} GB/s with {hw.link_latency_s * 1e6:.0f} us latency, TCP {hw.scaleout_bw / 1e9:.2f} GB/s")
    print(f"wrote {args.out} (use --hardware {'local' if args.out == LOCAL_PATH else args.out})")
    return 0


def _fit(args) -> int:
    from braid.planner.fit import fit_prefill

    model, hw = load_model(args.model), load_hardware(args.hardware)
    fitted = fit_prefill(model, hw, args.point)
    cost = CostModel(model, fitted)
    print(f"token_s {fitted.factors.token_s:.4g} s, attn_util {fitted.factors.attn_util:.3f}")
    for p in args.point:
        pred = cost.prefill_time(p.inst, [p.length])
        print(f"  {p.inst.label():24s} {p.length:7d} tokens: measured {p.ttft_s:.3f} s, "
              f"fitted {pred:.3f} s ({(pred / p.ttft_s - 1) * 100:+.1f}%)")
    if args.out:
        with open(args.out, "w") as f:
            yaml.safe_dump(hardware_to_dict(fitted), f, sort_keys=False)
        print(f"wrote {args.out}")
    return 0


def add_plan_command(sub) -> None:
    """`plan` and its actions on the braid CLI's subparsers."""
    plan = sub.add_parser("plan", help="simulate deployments and recommend one (PCP/DCP/TP, P:D split)")
    plan.add_argument("--model", default="deepseek-r1", help="config.json, checkpoint directory, GGUF, or "
                      "a built-in name (deepseek-r1, qwen3-235b-a22b)")
    plan.add_argument("--hardware", default="910c", help="910b, 910c, h100, h200, local, or a hardware YAML")
    plan.add_argument("--cards", type=int, default=64, help="devices available (910C: dies)")
    plan.add_argument("--ttft-slo", type=parse_duration, default=10.0, help="p90 TTFT target (10s, 500ms)")
    plan.add_argument("--tpot-slo", type=parse_duration, default=0.05, help="p90 TPOT target (50ms)")
    plan.add_argument("--workload", default="long-context", help="workload YAML (or a shipped one's name)")
    plan.add_argument("--out", default="braid-plan", help="folder for plan.png, plan.txt and the overlay")
    plan.add_argument("--model-path", help="the model's path inside the pods (cluster.yaml `model`)")
    plan.add_argument("--top", type=int, default=12, help="frontier rows to print")
    plan.set_defaults(func=_plan)
    actions = plan.add_subparsers(dest="action", metavar="ACTION")
    cal = actions.add_parser("calibrate", help="measure this machine; write a hardware YAML")
    cal.add_argument("--out", default=LOCAL_PATH, help=f"where the YAML goes (default {LOCAL_PATH}: --hardware local)")
    cal.add_argument("--no-collectives", action="store_true", help="skip the two-process gloo all-reduce")
    cal.set_defaults(func=_calibrate)
    fit = actions.add_parser("fit", help="fit token_s and attn_util to measured single-request prefills")
    fit.add_argument("--model", required=True)
    fit.add_argument("--hardware", required=True)
    fit.add_argument("--point", type=parse_point, action="append", required=True,
                     help="LAYOUT:LENGTH:TTFT, e.g. dp2,tp8,ep16:32768:9.3s (repeat, two lengths or more)")
    fit.add_argument("--out", help="write the fitted hardware YAML here")
    fit.set_defaults(func=_fit)
