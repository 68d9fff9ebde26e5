"""The process groups of one rank, built from its Topology: the world group and
the TP, PCP, DCP and EP groups, each a standalone torch.distributed group (no
global state), passed explicitly to whoever runs collectives."""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from braid.engine.shm_comm import ShmComm
from braid.engine.topology import Topology
from braid.kernels import graph_ops


# Shared-memory slot per member and parity: the model's groups carry decode-sized
# activations and logits (larger ones go through the process group); the world
# group only small control tensors.
SHM_SLOT_BYTES = {"model": 4 << 20, "world": 256 << 10}


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


def build_group(store, ranks: list[int], rank: int, backend: str, timeout_s: float,
                shm_slot_bytes: int | None = None) -> "GroupComm":
    """`ranks`' group over `store` (private to it), with shared-memory collectives
    when `shm_slot_bytes` is given and every member can use them."""
    index = ranks.index(rank)
    pg = make_process_group(backend, store, index, len(ranks), timeout_s)
    shm = ShmComm.create(store, index, len(ranks), shm_slot_bytes, timeout_s) if shm_slot_bytes else None
    return GroupComm(ranks, pg, rank, shm)


class GroupComm:
    """Collectives over one process group, called on the group object itself.
    Groups of size one are no-ops, so single-rank code paths cost nothing. Under
    torch.compile (graph mode) the collectives the model's forward runs go through
    opaque custom ops (braid.kernels.graph_ops), which call back here."""

    def __init__(self, ranks: list[int], group, rank: int, shm: ShmComm | None = None):
        self.ranks = list(ranks)
        self.group = group
        self.shm = shm
        """Shared-memory path for the model's collectives (CPU, one host); None: the group's."""
        self.size = len(ranks)
        self.rank_in_group = self.ranks.index(rank) if rank in self.ranks else -1
        self.key = graph_ops.register_group(self)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.size > 1 and torch.compiler.is_compiling():
            return graph_ops.all_reduce(t, self.key, op)
        if self.shm is not None and self.shm.fits(t):
            return self.shm.all_reduce(t, op)
        if self.size > 1:
            opts = dist.AllreduceOptions()
            opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
            self.group.allreduce([t], opts).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*shape] -> [size, *shape]."""
        if self.size == 1:
            return t.unsqueeze(0)
        if torch.compiler.is_compiling():
            return graph_ops.all_gather(t, self.key)
        if self.shm is not None and self.shm.fits(t):
            return self.shm.all_gather(t)
        t = t.contiguous()
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))
        self.group._allgather_base(out, t).wait()
        return out.view(self.size, *t.shape)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *shape] where t[j] goes to member j -> [size, *shape] where out[j] came from member j."""
        if self.size == 1:
            return t
        if torch.compiler.is_compiling():
            return graph_ops.all_to_all(t, self.key)
        if self.shm is not None and self.shm.fits(t):
            return self.shm.all_to_all(t)
        t = t.contiguous()
        out = torch.empty_like(t)
        self.group.alltoall_base(out, t, [], []).wait()
        return out

    def all_to_all_v(self, t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows of `t` (sum(send_counts) of them, member order) go send_counts[j] to
        member j -> sum(recv_counts) rows, recv_counts[j] of them from member j."""
        if self.size == 1:
            return t
        t = t.contiguous()
        out = t.new_empty((sum(recv_counts), *t.shape[1:]))
        self.group.alltoall_base(out, t, list(recv_counts), list(send_counts)).wait()
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
    ep: GroupComm | None = None
    """The EP group (None when EP is off)."""

    @staticmethod
    def single(device: torch.device | str = "cpu") -> "ParallelState":
        topo = Topology.trivial()
        solo = GroupComm([0], None, 0)
        return ParallelState(topo, torch.device(device), solo, solo, solo, solo)

    @property
    def ep_share(self) -> GroupComm:
        """The members of the EP group holding this rank's tokens: the EP group
        itself when it lies inside a TP group, else the TP group."""
        return self.ep if self.topo.ep <= self.topo.tp else self.tp

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
            slot = SHM_SLOT_BYTES["world" if name == "world" else "model"] if device.type == "cpu" else None
            return build_group(dist.PrefixStore(prefix, store), ranks, topo.rank, backend, timeout_s, slot)

        world = group("world", list(range(topo.world)))
        tp = group("tp", topo.tp_group_ranks())
        pcp = group("pcp", topo.pcp_group_ranks())
        dcp = group("dcp", topo.dcp_group_ranks())
        ep = group("ep", topo.ep_group_ranks()) if topo.ep > 1 else None
        return ParallelState(topo, device, world, tp, pcp, dcp, ep)

    def shutdown(self) -> None:
        """Drop the groups (their sockets close when the objects are freed)."""
