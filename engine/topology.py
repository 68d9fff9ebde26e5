"""Parallel topology of one instance and the process groups built from it.

Rank layout: `rank = pcp_rank * tp + tp_rank` (TP innermost, so a TP group is
a run of consecutive ranks). DCP adds no ranks: it reuses TP ranks that would
otherwise hold duplicate KV heads, `dcp_rank = tp_rank % dcp`, and DCP groups
are runs of `dcp` consecutive TP ranks. PCP groups are the ranks that share a
TP rank.

KV shards: the cache of one instance is split along tokens over
`cp_size = pcp * dcp` shards, `cp_rank = pcp_rank * dcp + dcp_rank`. With
interleave size I and block size B, token x is stored on shard
`((x % (B*N)) // I) % N` (see `braid.engine.kv_layout`).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from braid.engine.model_config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class Topology:
    tp: int = 1
    pcp: int = 1
    dcp: int = 1
    rank: int = 0

    def __post_init__(self):
        for name in ("tp", "pcp", "dcp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} size must be >= 1, got {getattr(self, name)}")
        if self.tp % self.dcp:
            raise ValueError(
                f"decode_context_parallel_size {self.dcp} must divide tensor_parallel_size {self.tp}"
            )
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world of size {self.world}")

    @staticmethod
    def trivial() -> "Topology":
        return Topology()

    def for_rank(self, rank: int) -> "Topology":
        return Topology(tp=self.tp, pcp=self.pcp, dcp=self.dcp, rank=rank)

    @property
    def world(self) -> int:
        return self.tp * self.pcp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pcp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dcp_rank(self) -> int:
        return self.tp_rank % self.dcp

    @property
    def cp_size(self) -> int:
        """Number of KV shards along tokens (PCP times DCP)."""
        return self.pcp * self.dcp

    @property
    def cp_rank(self) -> int:
        return self.pcp_rank * self.dcp + self.dcp_rank

    def tp_group_ranks(self, pcp_rank: int | None = None) -> list[int]:
        p = self.pcp_rank if pcp_rank is None else pcp_rank
        return [p * self.tp + t for t in range(self.tp)]

    def pcp_group_ranks(self, tp_rank: int | None = None) -> list[int]:
        t = self.tp_rank if tp_rank is None else tp_rank
        return [p * self.tp + t for p in range(self.pcp)]

    def dcp_group_ranks(self, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        base = r - (r % self.tp) % self.dcp
        return [base + i for i in range(self.dcp)]

    def all_tp_groups(self) -> list[list[int]]:
        return [self.tp_group_ranks(p) for p in range(self.pcp)]

    def all_pcp_groups(self) -> list[list[int]]:
        return [self.pcp_group_ranks(t) for t in range(self.tp)]

    def all_dcp_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.dcp)) for s in range(0, self.world, self.dcp)]


def validate_for_model(topo: Topology, model: ModelConfig) -> None:
    """Reject a topology the model cannot run, naming the setting to change."""
    tp, dcp = topo.tp, topo.dcp
    if model.num_heads % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide num_attention_heads {model.num_heads}"
        )
    if model.is_mla:
        if tp % dcp:
            raise ValueError(f"MLA needs tensor_parallel_size % decode_context_parallel_size == 0 (tp={tp}, dcp={dcp})")
    else:
        kv = model.num_kv_heads
        if tp <= kv and kv % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide num_key_value_heads {kv}")
        if tp > kv and tp % kv:
            raise ValueError(f"tensor_parallel_size {tp} must be a multiple of num_key_value_heads {kv}")
        replicas = tp // kv  # TP ranks holding a copy of each KV head
        if dcp > 1 and (replicas < dcp or replicas % dcp):
            raise ValueError(
                f"DCP with GQA needs (tensor_parallel_size // num_key_value_heads) % decode_context_parallel_size == 0 "
                f"and >= decode_context_parallel_size: tp={tp} // kv_heads={kv} = {replicas} cannot host dcp={dcp}; "
                f"raise tensor_parallel_size to a multiple of {kv * dcp} or lower decode_context_parallel_size"
            )
    inter = [model.intermediate_size]
    if model.mla is not None and model.mla.n_routed_experts:
        inter.append(model.mla.moe_intermediate_size)
    for size in inter:
        if size % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the MLP intermediate size {size}")


# torch 2.13 renamed all_gather_into_tensor; keep working on older releases
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def backend_for(device: torch.device) -> str:
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device.type]


class GroupComm:
    """Collectives over one process group. Groups of size one are no-ops, so
    single-rank code paths cost nothing."""

    def __init__(self, ranks: list[int], group, rank: int):
        self.ranks = list(ranks)
        self.group = group
        self.size = len(ranks)
        self.rank_in_group = self.ranks.index(rank) if rank in self.ranks else -1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*shape] -> [size, *shape]."""
        if self.size == 1:
            return t.unsqueeze(0)
        t = t.contiguous()
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))
        _all_gather_single(out, t, group=self.group)
        return out.view(self.size, *t.shape)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *shape] where t[j] goes to member j -> [size, *shape] where out[j] came from member j."""
        if self.size == 1:
            return t
        t = t.contiguous()
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.group)
        return out

    def broadcast(self, t: torch.Tensor, src_index: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(t, self.ranks[src_index], group=self.group)
        return t


@dataclass(frozen=True)
class ParallelState:
    """The topology of this rank and the groups it belongs to."""

    topo: Topology
    device: torch.device
    world: GroupComm
    tp: GroupComm
    pcp: GroupComm
    dcp: GroupComm

    @staticmethod
    def single(device: torch.device | str = "cpu") -> "ParallelState":
        topo = Topology.trivial()
        solo = GroupComm([0], None, 0)
        return ParallelState(topo, torch.device(device), solo, solo, solo, solo)

    @staticmethod
    def initialize(topo: Topology, device: torch.device, store, timeout_s: float) -> "ParallelState":
        """Join the instance's process group through `store` and create the
        TP, PCP and DCP subgroups. Every rank must call this with the same topology."""
        if topo.world == 1:
            return ParallelState.single(device)
        dist.init_process_group(
            backend_for(device),
            store=store,
            rank=topo.rank,
            world_size=topo.world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        world = GroupComm(list(range(topo.world)), dist.group.WORLD, topo.rank)

        def pick(all_groups: list[list[int]]) -> GroupComm:
            mine = None
            for ranks in all_groups:  # new_group is collective: every rank creates every group
                g = dist.new_group(ranks) if len(ranks) > 1 else None
                if topo.rank in ranks:
                    mine = GroupComm(ranks, g, topo.rank)
            assert mine is not None
            return mine

        tp = pick(topo.all_tp_groups())
        pcp = pick(topo.all_pcp_groups())
        dcp = pick(topo.all_dcp_groups())
        return ParallelState(topo, device, world, tp, pcp, dcp)

    def shutdown(self) -> None:
        if self.world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
