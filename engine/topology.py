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
Expert parallelism (EP, MoE models only) adds no ranks either: EP groups are
runs of `ep` consecutive ranks, `ep` dividing the world and either dividing tp
(several EP groups inside one TP group, each holding every expert) or being a
multiple of it (one EP group spanning whole TP groups of several PCP ranks).
Each member of an EP group holds `num_experts / ep` experts whole.
Torch-free (the cluster config and the scheduler import it); the process
groups built from a topology live in braid.engine.parallel_state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from braid.engine.model_config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class Topology:
    tp: int = 1
    pcp: int = 1
    dcp: int = 1
    ep: int = 1
    rank: int = 0

    def __post_init__(self):
        for name in ("tp", "pcp", "dcp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} size must be >= 1, got {getattr(self, name)}")
        if self.tp % self.dcp:
            raise ValueError(
                f"decode_context_parallel_size {self.dcp} must divide tensor_parallel_size {self.tp}"
            )
        if self.world % self.ep or (self.tp % self.ep and self.ep % self.tp):
            raise ValueError(
                f"expert_parallel_size {self.ep} must divide tensor_parallel_size {self.tp} or be a multiple of it "
                f"dividing the instance's {self.world} ranks (tensor_parallel_size x prefill_context_parallel_size)"
            )
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world of size {self.world}")

    @staticmethod
    def trivial() -> "Topology":
        return Topology()

    def for_rank(self, rank: int) -> "Topology":
        return Topology(tp=self.tp, pcp=self.pcp, dcp=self.dcp, ep=self.ep, rank=rank)

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

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    def ep_group_ranks(self, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        base = r - r % self.ep
        return list(range(base, base + self.ep))

    def all_tp_groups(self) -> list[list[int]]:
        return [self.tp_group_ranks(p) for p in range(self.pcp)]

    def all_pcp_groups(self) -> list[list[int]]:
        return [self.pcp_group_ranks(t) for t in range(self.tp)]

    def all_dcp_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.dcp)) for s in range(0, self.world, self.dcp)]

    def all_ep_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.ep)) for s in range(0, self.world, self.ep)]


def validate_for_model(topo: Topology, model: ModelConfig) -> None:
    """Reject a topology the model cannot run, naming the setting to change."""
    from braid.kv_transfer.layout import check_parallel

    tp = topo.tp
    if model.num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide num_attention_heads {model.num_heads}")
    check_parallel("mla" if model.is_mla else "gqa", 1 if model.is_mla else model.num_kv_heads, tp, topo.pcp, topo.dcp)
    moe = model.moe
    inter = [("MLP intermediate size", model.intermediate_size)]
    if moe is None and topo.ep > 1:
        raise ValueError(f"expert_parallel_size {topo.ep}: {model.architecture} has no routed experts; turn EP off")
    if moe is not None:
        inter = _moe_sliced_sizes(topo, model)
    for what, size in inter:
        if size % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the {what} {size}")


def _moe_sliced_sizes(topo: Topology, model: ModelConfig) -> list[tuple[str, int]]:
    """The MoE model's dimensions TP slices (checked by the caller), after
    checking what EP needs. Without EP, TP slices every routed expert; with EP,
    routed experts stay whole and only shared experts are sliced. Dense MLPs
    are sliced where some layer is dense."""
    moe = model.moe
    if topo.ep > 1 and moe.num_experts % topo.ep:
        raise ValueError(f"expert_parallel_size {topo.ep} must divide the model's {moe.num_experts} routed experts")
    sizes = []
    if topo.ep == 1:
        sizes.append(("MoE moe_intermediate_size", moe.moe_intermediate_size))
    elif moe.n_shared_experts:
        sizes.append(("shared experts' intermediate size", moe.n_shared_experts * moe.moe_intermediate_size))
    if len(moe.sparse_layers) < model.num_layers:
        sizes.append(("MLP intermediate size", model.intermediate_size))
    return sizes
