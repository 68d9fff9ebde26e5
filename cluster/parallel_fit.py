"""Parallel layouts that fit a model, for `braid up`.

The cluster's default layouts (prefill pcp 2; decode tp 2, dcp 2) suit the
embedded tiny model, not every checkpoint: SmolLM2-135M has 9 query heads
and 3 KV heads, so tp 2 cannot split it. `fit_parallel` keeps a node's layout
when the model can run it, replaces a default one that it cannot by the
largest layout that fits within the host's cores, and refuses a layout the
user asked for explicitly, naming the constraint and the layouts that would
work; `share_cores` then splits the host's cores over the ranks of both nodes.
All of it happens before any process starts.
"""
from __future__ import annotations

import dataclasses

from braid.cluster.config import ClusterConfig, ConfigError
from braid.engine.config import ParallelConfig
from braid.engine.topology import validate_for_model

MAX_TP = 8


def _fits(model, par: ParallelConfig) -> str | None:
    """Why `par` cannot run `model`, or None when it can."""
    try:
        validate_for_model(par.topology, model)
    except ValueError as e:
        return str(e)
    return None


def valid_parallel(model, role: str, max_ranks: int) -> list[ParallelConfig]:
    """Every layout of `role` with at most `max_ranks` ranks that the model can run, largest first."""
    out = []
    for tp in range(min(MAX_TP, max_ranks), 0, -1):
        for dcp in (range(tp, 0, -1) if role == "decode" else (1,)):
            for pcp in ((max_ranks // tp, 1) if role == "prefill" else (1,)):
                if pcp < 1 or tp % dcp or tp * pcp > max_ranks:
                    continue
                par = ParallelConfig(tensor_parallel_size=tp, decode_context_parallel_size=dcp,
                                     prefill_context_parallel_size=pcp)
                if _fits(model, par) is None and par not in out:
                    out.append(par)
    out.sort(key=lambda p: -p.topology.world)
    return out


def describe(par: ParallelConfig) -> str:
    t = par.topology
    return f"tp {t.tp} pcp {t.pcp} dcp {t.dcp}"


def fit_parallel(cfg: ClusterConfig, model, explicit: set[str], cores: int) -> tuple[ClusterConfig, list[str]]:
    """`cfg` with each node's parallel layout fitted to `model` (a ModelConfig).
    `explicit` names the roles whose layout the user set; those are checked, not
    changed. Returns the config and one note per change."""
    notes = []
    max_ranks = max(2, cores)
    for role in ("prefill", "decode"):
        node = cfg.node(role)
        why = _fits(model, node.parallel)
        if why is None:
            continue
        choices = valid_parallel(model, role, max_ranks)
        if role in explicit or not choices:
            shown = "; ".join(describe(p) for p in choices[:8]) or "none"
            raise ConfigError(f"{role}.parallel: {why}. Layouts this model can run on up to {max_ranks} ranks: {shown}")
        best = choices[0]
        par = dataclasses.replace(node.parallel, tensor_parallel_size=best.tensor_parallel_size,
                                  decode_context_parallel_size=best.decode_context_parallel_size,
                                  prefill_context_parallel_size=best.prefill_context_parallel_size)
        notes.append(f"{role}: {describe(node.parallel)} does not fit this model ({why}); using {describe(par)}")
        cfg = dataclasses.replace(cfg, **{role: dataclasses.replace(node, parallel=par)})
    return cfg, notes



def share_cores(cfg: ClusterConfig, cores: int) -> ClusterConfig:
    """`cfg` with threads_per_rank filled in where unset, for nodes sharing one
    host: the engine's own default splits the host's cores over one instance's
    ranks, so a tp 1 decode node beside a pcp 2 prefill node on 2 cores would run
    2 + 1 + 1 intra-op threads on 2 cores, and spinning threads that outnumber
    the cores make every step several times slower. Here the cores are split
    over the ranks of both nodes (at least one thread each)."""
    ranks = cfg.prefill.parallel.topology.world + cfg.decode.parallel.topology.world
    threads = max(1, cores // ranks)
    for role in ("prefill", "decode"):
        node = cfg.node(role)
        if node.parallel.threads_per_rank is None:
            par = dataclasses.replace(node.parallel, threads_per_rank=threads)
            cfg = dataclasses.replace(cfg, **{role: dataclasses.replace(node, parallel=par)})
    return cfg
