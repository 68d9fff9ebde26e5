"""Workloads: who arrives when, with how long a prompt, wanting how many tokens.

A workload YAML (planner/workloads/long-context.yaml is the example):

    requests: 64               # how many to simulate
    seed: 0
    arrival: {rate: 0.2}       # Poisson, requests/s; or {concurrency: 8}: closed loop
    prompt: {min: 32768, max: 131072}   # uniform; or {fixed: N}
    output: {min: 256, max: 1024}
    prefix_hit: 0.0            # fraction of each prompt already cached on prefill

Requests are drawn with random.Random(seed), so a workload is the same list
every time it is read.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import yaml

WORKLOAD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads")


@dataclass(frozen=True)
class Request:
    rid: int
    arrival: float
    prompt: int
    output: int
    cached: int = 0


@dataclass(frozen=True, kw_only=True)
class Workload:
    requests: int = 64
    seed: int = 0
    rate: float | None = None
    concurrency: int | None = None
    prompt: tuple[int, int] = (4096, 4096)
    output: tuple[int, int] = (256, 256)
    prefix_hit: float = 0.0

    def __post_init__(self):
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("workload arrival: give exactly one of rate (requests/s) or concurrency")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"workload arrival.rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"workload arrival.concurrency must be >= 1, got {self.concurrency}")
        for name in ("prompt", "output"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"workload {name}: need 1 <= min <= max, got {lo}..{hi}")
        if not 0.0 <= self.prefix_hit < 1.0:
            raise ValueError(f"workload prefix_hit must be in [0, 1), got {self.prefix_hit}")
        if self.requests < 1:
            raise ValueError(f"workload requests must be >= 1, got {self.requests}")

    def draw(self) -> list[Request]:
        """The requests; arrival times are 0 for a closed loop (the simulator paces it)."""
        rng = random.Random(self.seed)
        t, out = 0.0, []
        for rid in range(self.requests):
            if self.rate is not None:
                t += rng.expovariate(self.rate)
            prompt = rng.randint(*self.prompt)
            output = rng.randint(*self.output)
            out.append(Request(rid, t if self.rate is not None else 0.0, prompt, output, int(prompt * self.prefix_hit)))
        return out


def _range(data: dict, name: str) -> tuple[int, int]:
    spec = data.get(name, getattr(Workload, name))
    if isinstance(spec, tuple):
        return spec
    if isinstance(spec, int):
        return spec, spec
    if not isinstance(spec, dict):
        raise ValueError(f"workload {name}: give {{fixed: N}} or {{min: A, max: B}}")
    if "fixed" in spec:
        return int(spec["fixed"]), int(spec["fixed"])
    try:
        return int(spec["min"]), int(spec["max"])
    except KeyError as e:
        raise ValueError(f"workload {name}: missing {e.args[0]}") from None


def workload_from_dict(data: dict) -> Workload:
    known = {"name", "requests", "seed", "arrival", "prompt", "output", "prefix_hit"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"workload: unknown field(s) {unknown}; known: {sorted(known)}")
    arrival = data.get("arrival") or {}
    return Workload(requests=int(data.get("requests", 64)), seed=int(data.get("seed", 0)),
                    rate=arrival.get("rate"), concurrency=arrival.get("concurrency"),
                    prompt=_range(data, "prompt"), output=_range(data, "output"),
                    prefix_hit=float(data.get("prefix_hit", 0.0)))


def load_workload(path: str) -> Workload:
    """A YAML file, or the name of a shipped one (long-context)."""
    if not os.path.isfile(path):
        shipped = os.path.join(WORKLOAD_DIR, os.path.basename(path))
        if not shipped.endswith(".yaml"):
            shipped += ".yaml"
        if not os.path.isfile(shipped):
            raise ValueError(f"--workload {path!r}: no such file (shipped: {sorted(os.listdir(WORKLOAD_DIR))})")
        path = shipped
    with open(path) as f:
        return workload_from_dict(yaml.safe_load(f) or {})
