"""The KV layout descriptor: how one instance lays out its paged KV cache.

A `KVLayout` (protobuf, braid.v1) travels in reservations and in NodeInfo so
that a prefill instance can feed a decode instance with any other parallel
layout. It states the model dims, the dtype, the block and interleave sizes
and, per rank, which KV shard and which KV heads that rank stores.

Facts the descriptor encodes (they must agree with the engine):
- Ranks: `world = tp * pcp`, `rank = pcp_rank * tp + tp_rank`,
  `dcp_rank = tp_rank % dcp`, KV shard `cp_rank = pcp_rank * dcp + dcp_rank`
  of `num_shards = pcp * dcp` (braid.engine.topology.Topology).
- Heads (braid.engine.layers.linear.QKVParallelLinear): GQA with H KV heads
  and tp <= H: rank holds `[tp_rank*H/tp, (tp_rank+1)*H/tp)`; tp > H: rank
  holds the single head `tp_rank // (tp // H)`. MLA: the one latent head 0 on
  every rank.
- Cache tensor on each rank (braid.engine.worker.allocate_kv_cache), contiguous:
  `[num_layers, num_blocks, C, head_count, block_size, head_dim]`, C = 2 (K, V)
  for GQA and 1 for MLA.

This module is control plane: plain Python over integers, no torch.
"""
from __future__ import annotations

from typing import Sequence

from braid.proto import common_pb2

FORMATS = {"gqa": common_pb2.KV_FORMAT_GQA, "mla": common_pb2.KV_FORMAT_MLA}
_FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
_COMPONENTS = {common_pb2.KV_FORMAT_GQA: 2, common_pb2.KV_FORMAT_MLA: 1}
ELEMENT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "bf16": "bfloat16",
    "half": "float16",
    "fp16": "float16",
}


class InvalidLayout(ValueError):
    """A layout that no engine can have (bad sizes, heads not covered, ...)."""


class LayoutMismatch(ValueError):
    """A prefill layout and a decode layout that cannot exchange KV."""


# ---------------------------------------------------------------- building


def canonical_dtype(dtype: str) -> str:
    """float32, bfloat16 or float16 for any spelling the engine accepts."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in ELEMENT_SIZES:
        raise InvalidLayout(f"unsupported KV dtype {dtype!r}; use float32, bfloat16 or float16")
    return name


def kv_heads_of(fmt: str, num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """KV heads TP rank `tp_rank` holds (the QKVParallelLinear rule)."""
    if fmt == "mla":
        return range(0, 1)
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    head = tp_rank // (tp // num_kv_heads)
    return range(head, head + 1)


def check_parallel(fmt: str, num_kv_heads: int, tp: int, pcp: int, dcp: int) -> None:
    """The parallel layouts a KV cache can have (the engine refuses the same
    ones before starting a rank): raises InvalidLayout naming the setting."""
    for name, value in (("tensor_parallel_size", tp), ("prefill_context_parallel_size", pcp),
                        ("decode_context_parallel_size", dcp)):
        if value < 1:
            raise InvalidLayout(f"{name} must be >= 1, got {value}")
    if tp % dcp:
        raise InvalidLayout(f"decode_context_parallel_size {dcp} must divide tensor_parallel_size {tp}")
    if fmt == "mla":
        if num_kv_heads != 1:
            raise InvalidLayout(f"MLA caches one latent head: num_kv_heads must be 1, got {num_kv_heads}")
        return
    h = num_kv_heads
    if h < 1:
        raise InvalidLayout(f"num_kv_heads must be >= 1, got {h}")
    if tp <= h and h % tp:
        raise InvalidLayout(f"tensor_parallel_size {tp} must divide num_key_value_heads {h}")
    if tp > h and tp % h:
        raise InvalidLayout(f"tensor_parallel_size {tp} must be a multiple of num_key_value_heads {h}")
    replicas = tp // h  # TP ranks holding a copy of each KV head
    if dcp > 1 and (replicas < dcp or replicas % dcp):
        raise InvalidLayout(
            f"DCP with GQA needs (tensor_parallel_size // num_key_value_heads) % decode_context_parallel_size == 0 "
            f"and >= decode_context_parallel_size: tp={tp} // kv_heads={h} = {replicas} cannot host dcp={dcp}; "
            f"raise tensor_parallel_size to a multiple of {h * dcp} or lower decode_context_parallel_size"
        )


def describe(
    *,
    fmt: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    block_size: int,
    interleave_size: int,
    tp: int,
    pcp: int,
    dcp: int,
    num_blocks: int,
    endpoints: Sequence[str] | None = None,
    model_id: str = "",
) -> common_pb2.KVLayout:
    """The layout of an instance with these settings, one RankLayout per rank
    in rank order. `endpoints` (decode side) gives each rank's transfer
    endpoint, one per rank; the prefill side leaves them empty."""
    if fmt not in FORMATS:
        raise InvalidLayout(f"KV format must be one of {sorted(FORMATS)}, got {fmt!r}")
    sizes = {"num_layers": num_layers, "head_dim": head_dim, "block_size": block_size, "num_blocks": num_blocks}
    for name, value in sizes.items():
        if value < 1:
            raise InvalidLayout(f"{name} must be >= 1, got {value}")
    if not 1 <= interleave_size <= block_size or block_size % interleave_size:
        raise InvalidLayout(
            f"cp_kv_cache_interleave_size {interleave_size} must divide block_size {block_size}"
        )
    check_parallel(fmt, num_kv_heads, tp, pcp, dcp)
    world = tp * pcp
    if endpoints is not None and len(endpoints) != world:
        raise InvalidLayout(f"need one endpoint per rank: {len(endpoints)} endpoints for {world} ranks")
    layout = common_pb2.KVLayout(
        format=FORMATS[fmt],
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=canonical_dtype(dtype),
        block_size=block_size,
        interleave_size=interleave_size,
        num_shards=pcp * dcp,
        tp_size=tp,
        pcp_size=pcp,
        dcp_size=dcp,
        model_id=model_id,
    )
    for rank in range(world):
        pcp_rank, tp_rank = divmod(rank, tp)
        heads = kv_heads_of(fmt, num_kv_heads, tp, tp_rank)
        layout.ranks.add(
            rank=rank,
            tp_rank=tp_rank,
            cp_rank=pcp_rank * dcp + tp_rank % dcp,
            head_start=heads.start,
            head_count=len(heads),
            endpoint="" if endpoints is None else endpoints[rank],
            num_blocks=num_blocks,
        )
    return layout


def describe_engine(
    engine_config,
    model_config,
    endpoints: Sequence[str] | None = None,
    model_id: str | None = None,
    num_layers: int | None = None,
) -> common_pb2.KVLayout:
    """The layout of an engine from its resolved EngineConfig (num_kv_blocks
    set) and its ModelConfig. `model_id` defaults to the model's architecture;
    `num_layers` to the model's (an engine that caches an MTP layer too passes
    its cache's count: braid.engine.config.cache_layers)."""
    cfg, model = engine_config, model_config
    cache, par = cfg.cache, cfg.parallel
    if cache.num_kv_blocks is None:
        raise InvalidLayout("engine config is not resolved: num_kv_blocks is None (call braid.engine.config.resolve first)")
    block = cache.block_size
    interleave = block if cache.cp_kv_cache_interleave_size is None else cache.cp_kv_cache_interleave_size
    return describe(
        fmt="mla" if model.is_mla else "gqa",
        num_layers=model.num_layers if num_layers is None else num_layers,
        num_kv_heads=1 if model.is_mla else model.num_kv_heads,
        head_dim=model.cache_head_dim,
        dtype=cfg.dtype,
        block_size=block,
        interleave_size=interleave,
        tp=par.tensor_parallel_size,
        pcp=par.prefill_context_parallel_size,
        dcp=par.decode_context_parallel_size,
        num_blocks=cache.num_kv_blocks,
        endpoints=endpoints,
        model_id=model.architecture if model_id is None else model_id,
    )


# ---------------------------------------------------------------- reading back


def format_name(layout: common_pb2.KVLayout) -> str:
    """"gqa" or "mla"."""
    try:
        return _FORMAT_NAMES[layout.format]
    except KeyError:
        raise InvalidLayout(f"KV layout has no known format ({layout.format})") from None


def num_components(layout: common_pb2.KVLayout) -> int:
    """Tensors cached per token and head: 2 (K, V) for GQA, 1 (latent) for MLA."""
    format_name(layout)
    return _COMPONENTS[layout.format]


def element_size(layout: common_pb2.KVLayout) -> int:
    """Bytes per cached value."""
    return ELEMENT_SIZES[canonical_dtype(layout.dtype)]


def world_size(layout: common_pb2.KVLayout) -> int:
    return layout.tp_size * layout.pcp_size


def head_range(layout: common_pb2.KVLayout, rank: int) -> range:
    """KV heads `rank` holds; local head i is global head `start + i`."""
    r = layout.ranks[rank]
    return range(r.head_start, r.head_start + r.head_count)


def cp_rank(layout: common_pb2.KVLayout, rank: int) -> int:
    """KV shard `rank` stores: global block g lives on shard g % num_shards."""
    return layout.ranks[rank].cp_rank


def ranks_on_shard(layout: common_pb2.KVLayout, shard: int) -> list[int]:
    """Ranks storing KV shard `shard`, in rank order."""
    return [r.rank for r in layout.ranks if r.cp_rank == shard]


def cache_shape(layout: common_pb2.KVLayout, rank: int) -> tuple[int, int, int, int, int, int]:
    """[num_layers, num_blocks, C, head_count, block_size, head_dim] of `rank`'s cache."""
    r = layout.ranks[rank]
    return (layout.num_layers, r.num_blocks, num_components(layout), r.head_count, layout.block_size, layout.head_dim)


def chunk_bytes(layout: common_pb2.KVLayout, rank: int) -> int:
    """Bytes of one (layer, block) chunk [C, head_count, block_size, head_dim] on `rank`."""
    _, _, c, h, b, d = cache_shape(layout, rank)
    return c * h * b * d * element_size(layout)


def cache_bytes(layout: common_pb2.KVLayout, rank: int) -> int:
    """Bytes of `rank`'s whole cache tensor (its transport region)."""
    r = layout.ranks[rank]
    return layout.num_layers * r.num_blocks * chunk_bytes(layout, rank)


# ---------------------------------------------------------------- checking


def validate(layout: common_pb2.KVLayout, side: str = "KV") -> None:
    """Raise InvalidLayout unless the descriptor is self-consistent: ranks
    listed in order, one per rank of tp * pcp, every shard < num_shards, head
    ranges inside [0, num_kv_heads), and every shard holding every head."""
    if layout.format not in _FORMAT_NAMES:
        raise InvalidLayout(f"{side} layout has no known KV format ({layout.format}); expected GQA or MLA")
    fmt = _FORMAT_NAMES[layout.format]
    canonical_dtype(layout.dtype)
    if layout.block_size < 1 or layout.head_dim < 1 or layout.num_layers < 1:
        raise InvalidLayout(f"{side} layout needs block_size, head_dim and num_layers >= 1")
    if layout.num_shards != layout.pcp_size * layout.dcp_size:
        raise InvalidLayout(
            f"{side} layout has num_shards {layout.num_shards} != pcp {layout.pcp_size} * dcp {layout.dcp_size}"
        )
    world = world_size(layout)
    if world < 1 or len(layout.ranks) != world:
        raise InvalidLayout(f"{side} layout lists {len(layout.ranks)} ranks, expected tp * pcp = {world}")
    if fmt == "mla" and layout.num_kv_heads != 1:
        raise InvalidLayout(f"{side} layout is MLA with num_kv_heads {layout.num_kv_heads}; must be 1")
    covered = [set() for _ in range(layout.num_shards)]
    for i, r in enumerate(layout.ranks):
        if r.rank != i:
            raise InvalidLayout(f"{side} layout lists rank {r.rank} at position {i}; ranks must be in order")
        if r.cp_rank >= layout.num_shards:
            raise InvalidLayout(f"{side} rank {i} stores shard {r.cp_rank} of only {layout.num_shards}")
        if r.head_count < 1 or r.head_start + r.head_count > layout.num_kv_heads:
            raise InvalidLayout(
                f"{side} rank {i} holds heads [{r.head_start}, {r.head_start + r.head_count}) "
                f"outside the model's {layout.num_kv_heads} KV heads"
            )
        if r.num_blocks < 1:
            raise InvalidLayout(f"{side} rank {i} has no KV blocks (num_blocks 0)")
        covered[r.cp_rank].update(head_range(layout, i))
    for shard, heads in enumerate(covered):
        if len(heads) != layout.num_kv_heads:
            missing = sorted(set(range(layout.num_kv_heads)) - heads)
            raise InvalidLayout(f"{side} layout: no rank of shard {shard} holds KV heads {missing}")


_MATCHED_FIELDS = ("format", "num_layers", "num_kv_heads", "head_dim", "dtype", "block_size")


def _shown(layout: common_pb2.KVLayout, field: str):
    if field == "format":
        return _FORMAT_NAMES.get(layout.format, layout.format)
    if field == "dtype":
        return canonical_dtype(layout.dtype)
    return getattr(layout, field)


def check_compatible(p: common_pb2.KVLayout, d: common_pb2.KVLayout) -> None:
    """Raise LayoutMismatch unless prefill layout `p` can feed decode layout
    `d`: same format, num_layers, num_kv_heads, head_dim, dtype and
    block_size, and interleave_size == block_size on both sides (so every
    block lives whole on one shard on both). TP, PCP and DCP may differ."""
    for side, layout in (("prefill", p), ("decode", d)):
        try:
            validate(layout, side)
        except InvalidLayout as e:
            raise LayoutMismatch(str(e)) from None
    for field in _MATCHED_FIELDS:
        pv, dv = _shown(p, field), _shown(d, field)
        if pv != dv:
            hint = (" (an instance that runs an MTP layer, speculative.method mtp, caches it as one more layer: "
                    "set it on both)" if field == "num_layers" and abs(pv - dv) == 1 else "")
            raise LayoutMismatch(f"prefill and decode KV layouts differ in {field}: prefill {pv!r}, decode {dv!r}{hint}")
    for side, layout in (("prefill", p), ("decode", d)):
        if layout.interleave_size != layout.block_size:
            raise LayoutMismatch(
                f"{side} interleave_size {layout.interleave_size} != block_size {layout.block_size}: "
                f"interleave must equal block size across instances: "
                f"set cp_kv_cache_interleave_size={layout.block_size}"
            )
