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


def backend_for(device: torch.device) -> str:
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device.type]


def make_process_group(backend: str, store, rank: int, size: int, timeout_s: float):
    """A standalone process group over `store` (not registered with
    torch.distributed's global state, so several instances can live in one
    process). `rank` is the rank within the group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    if backend == "hccl":
        import torch_npu  # noqa: F401
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL

        opts = ProcessGroupHCCL.Options()
        opts._timeout = timeout
        return ProcessGroupHCCL(store, rank, size, opts)
    raise ValueError(f"unknown collective backend {backend!r}")


class GroupComm:
    """Collectives over one process group, called on the group object itself.
    Groups of size one are no-ops, so single-rank code paths cost nothing."""

    def __init__(self, ranks: list[int], group, rank: int):
        self.ranks = list(ranks)
        self.group = group
        self.size = len(ranks)
        self.rank_in_group = self.ranks.index(rank) if rank in self.ranks else -1

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.size > 1:
            opts = dist.AllreduceOptions()
            opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
            self.group.allreduce([t], opts).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*shape] -> [size, *shape]."""
        if self.size == 1:
            return t.unsqueeze(0)
        t = t.contiguous()
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))
        self.group._allgather_base(out, t).wait()
        return out.view(self.size, *t.shape)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *shape] where t[j] goes to member j -> [size, *shape] where out[j] came from member j."""
        if self.size == 1:
            return t
        t = t.contiguous()
        out = torch.empty_like(t)
        self.group.alltoall_base(out, t, [], []).wait()
        return out

    def broadcast(self, t: torch.Tensor, src_index: int = 0) -> torch.Tensor:
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = src_index
            self.group.broadcast([t], opts).wait()
        return t

    def gather(self, t: torch.Tensor, dst_index: int = 0) -> list[torch.Tensor] | None:
        """Every member's `t` (same shape) on member `dst_index`; None elsewhere."""
        if self.size == 1:
            return [t]
        t = t.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = dst_index
        mine = self.rank_in_group == dst_index
        outs = [torch.empty_like(t) for _ in range(self.size)] if mine else []
        self.group.gather([outs] if mine else [], [t], opts).wait()
        return outs if mine else None


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
        """Build this rank's world, TP, PCP and DCP groups as standalone process
        groups over `store` (each under its own key prefix). Only members create
        a group, so no collective set-up call is needed."""
        if topo.world == 1:
            return ParallelState.single(device)
        backend = backend_for(device)

        def group(name: str, ranks: list[int]) -> GroupComm:
            if len(ranks) == 1:
                return GroupComm(ranks, None, topo.rank)
            prefix = f"pg/{name}/" + "-".join(map(str, ranks)) + "/"
            pg = make_process_group(backend, dist.PrefixStore(prefix, store), ranks.index(topo.rank), len(ranks), timeout_s)
            return GroupComm(ranks, pg, topo.rank)

        world = group("world", list(range(topo.world)))
        tp = group("tp", topo.tp_group_ranks())
        pcp = group("pcp", topo.pcp_group_ranks())
        dcp = group("dcp", topo.dcp_group_ranks())
        return ParallelState(topo, device, world, tp, pcp, dcp)

    def shutdown(self) -> None:
        """Drop the groups (their sockets close when the objects are freed)."""
