"""The transfer planner: which prefill rank sends which block and heads to
which decode rank and slot.

Inputs are the two instances' KVLayout descriptors, the prompt length and
the two block tables (one id per virtual block of `block_size * num_shards`
tokens, the same id on every shard of that instance). With interleave size ==
block size on both sides, global block `g = x // B` lives whole:

    prefill: shard g % N_p, physical block p_block_ids[g // N_p]
    decode:  shard g % N_d, physical block d_block_ids[g // N_d]

so a transfer is a list of whole-block copies, each restricted to a range of
KV heads (TP may differ between the sides). Invariants of `plan`:
- every D rank on shard g % N_d receives all of its local heads of block g
  (KV-head replicas on D each get their own moves);
- every (block, head) leaves P from exactly one rank, chosen round-robin over
  the P replicas holding that head (by the block's index on its shard), so
  replicas share the sending load;
- moves are whole blocks; `num_tokens` only says how many of the block's
  tokens are valid (the last block may be partial).

`pieces` turns a move into byte ranges of the two ranks' cache tensors
`[num_layers, num_blocks, C, H_local, B, head_dim]` (contiguous), one range
per component; `expected_ranges` lists what a decode rank must receive.

Plain Python over integers: no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from braid.kv_transfer.base import Piece
from braid.kv_transfer.layout import (
    check_compatible,
    element_size,
    num_components,
)
from braid.proto import common_pb2

KVLayout = common_pb2.KVLayout


@dataclass(frozen=True, slots=True)
class BlockMove:
    """Copy heads [src_head_start, +num_heads) of physical block src_block on
    P rank src_rank to heads [dst_head_start, +num_heads) of physical block
    dst_block on D rank dst_rank, for every component and every layer. Head
    starts index the rank's *local* heads. `num_tokens` (1..B) of the block's
    tokens are valid; the whole block is copied regardless."""

    global_block: int
    num_tokens: int
    src_rank: int
    src_block: int
    src_head_start: int
    dst_rank: int
    dst_block: int
    dst_head_start: int
    num_heads: int


# (src_rank, src_head_start, dst_rank, dst_head_start, num_heads): the head
# run of one move, without its block
_Segment = tuple[int, int, int, int, int]


# ---------------------------------------------------------------- planning


def num_global_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens covering `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def _used_block_ids(layout: KVLayout, side: str, block_ids: Sequence[int], num_tokens: int) -> list[int]:
    """The ids of `block_ids` that `num_tokens` tokens occupy, as ints. Raise
    ValueError unless there are enough, distinct, and inside every rank's pool
    on that side."""
    per_id = layout.block_size * layout.num_shards
    need = num_global_blocks(num_tokens, per_id)
    if len(block_ids) < need:
        raise ValueError(
            f"{side} block table has {len(block_ids)} ids but {num_tokens} tokens need {need} "
            f"(one id per {per_id} tokens = block_size {layout.block_size} x {layout.num_shards} shards); "
            f"allocate {need} blocks for the request"
        )
    used = [int(b) for b in block_ids[:need]]
    if len(set(used)) != need:
        raise ValueError(f"{side} block table repeats a block id within its first {need} ids: {used}")
    pool = min(r.num_blocks for r in layout.ranks)
    bad = [b for b in used if not 0 <= b < pool]
    if bad:
        raise ValueError(f"{side} block ids {bad} lie outside the pool of {pool} blocks per rank")
    return used


def check_block_ids(layout: KVLayout, block_ids: Sequence[int], num_tokens: int) -> None:
    """Raise ValueError unless `block_ids` fit a transfer of `num_tokens` tokens into
    `layout`: enough distinct ids inside every rank's pool, and at most one id more
    than the tokens need (a reservation holds room for the first decoded token)."""
    _check_num_tokens(num_tokens)
    _used_block_ids(layout, "decode", block_ids, num_tokens)
    need = num_global_blocks(num_tokens, layout.block_size * layout.num_shards)
    if len(block_ids) > need + 1:
        raise ValueError(f"decode block table has {len(block_ids)} ids; {num_tokens} tokens need {need}")


def _check_num_tokens(num_tokens: int) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")


def _holders(p: KVLayout) -> list[list[list[tuple[int, int]]]]:
    """holders[shard][head] = [(p_rank, local head index), ...] in rank order:
    the P ranks of `shard` that hold `head` (its replicas)."""
    table = [[[] for _ in range(p.num_kv_heads)] for _ in range(p.num_shards)]
    for r in p.ranks:
        for i in range(r.head_count):
            table[r.cp_rank][r.head_start + i].append((r.rank, i))
    return table


def _segments(d_rank: common_pb2.RankLayout, holders: list[list[tuple[int, int]]], phase: int) -> list[_Segment]:
    """Head runs D rank `d_rank` receives from one P shard when each head is
    sent by replica `phase % replicas` of that head. Adjacent heads that come
    from consecutive local heads of the same P rank form one run."""
    runs: list[list[int]] = []  # [src_rank, src_head_start, dst_head_start, num_heads]
    for i in range(d_rank.head_count):
        reps = holders[d_rank.head_start + i]
        src, local = reps[phase % len(reps)]
        last = runs[-1] if runs else None
        if last is not None and last[0] == src and last[1] + last[3] == local:
            last[3] += 1
        else:
            runs.append([src, local, i, 1])
    return [(src, src_head, d_rank.rank, dst_head, n) for src, src_head, dst_head, n in runs]


def _segment_tables(p: KVLayout, d: KVLayout) -> list[tuple[int, dict[tuple[int, int], list[_Segment]]]]:
    """Per P shard: (period, table). `period` is the lcm of the shard's replica
    counts per head; table[(d_shard, phase)] lists, D rank by D rank, the head
    runs the ranks of D shard `d_shard` receive from this P shard for a block
    whose index on the P shard is `phase` modulo the period."""
    out = []
    for shard_holders in _holders(p):
        period = math.lcm(*(len(reps) for reps in shard_holders))
        table: dict[tuple[int, int], list[_Segment]] = {}
        for k in range(period):
            for r in d.ranks:
                table.setdefault((r.cp_rank, k), []).extend(_segments(r, shard_holders, k))
        out.append((period, table))
    return out


def check_first_block(first_block: int, num_tokens: int, block_size: int) -> None:
    """The blocks a decode node already holds (its prefix cache) precede the prompt's
    last token: at least the block holding it is always sent."""
    if not 0 <= first_block < max(1, num_global_blocks(num_tokens, block_size)):
        raise ValueError(
            f"cached_blocks {first_block} must be in [0, {num_global_blocks(num_tokens, block_size)}) "
            f"for {num_tokens} tokens in blocks of {block_size}: the block of the last prompt token is always sent"
        )


def plan(
    p: KVLayout,
    d: KVLayout,
    num_tokens: int,
    p_block_ids: Sequence[int],
    d_block_ids: Sequence[int],
    first_block: int = 0,
) -> list[BlockMove]:
    """The block moves that bring the KV of the first `num_tokens` tokens from
    prefill layout `p` (blocks `p_block_ids`) to decode layout `d` (blocks
    `d_block_ids`), ordered by global block, then D rank, then head. Global
    blocks before `first_block` are not moved (the decode side holds them).

    Raises LayoutMismatch when the layouts cannot exchange KV and ValueError
    when a block table is too short, repeats an id or leaves the pool."""
    check_compatible(p, d)
    _check_num_tokens(num_tokens)
    p_ids = _used_block_ids(p, "prefill", p_block_ids, num_tokens)
    d_ids = _used_block_ids(d, "decode", d_block_ids, num_tokens)
    b, n_p, n_d = p.block_size, p.num_shards, d.num_shards
    check_first_block(first_block, num_tokens, b)
    tables = _segment_tables(p, d)
    moves: list[BlockMove] = []
    for g in range(first_block, num_global_blocks(num_tokens, b)):
        k = g // n_p  # the block's index on its P shard g % n_p
        period, table = tables[g % n_p]
        src_block, dst_block = p_ids[k], d_ids[g // n_d]
        valid = min(b, num_tokens - g * b)
        for src, src_head, dst, dst_head, heads in table[(g % n_d, k % period)]:
            moves.append(BlockMove(g, valid, src, src_block, src_head, dst, dst_block, dst_head, heads))
    return moves


# ---------------------------------------------------------------- byte ranges


@dataclass(frozen=True)
class _Geometry:
    """Byte strides of one rank's cache [num_layers, num_blocks, C, H, B, D]."""

    layer: int  # bytes of [num_blocks, C, H, B, D]
    block: int  # bytes of [C, H, B, D]
    component: int  # bytes of [H, B, D]
    head: int  # bytes of [B, D]

    def offset(self, layer: int, block: int, component: int, head: int) -> int:
        return layer * self.layer + block * self.block + component * self.component + head * self.head


def _geometry(layout: KVLayout, rank: int) -> _Geometry:
    r = layout.ranks[rank]
    head = layout.block_size * layout.head_dim * element_size(layout)
    component = r.head_count * head
    block = num_components(layout) * component
    return _Geometry(layer=r.num_blocks * block, block=block, component=component, head=head)


def _as_layers(layout: KVLayout, layers: int | Iterable[int]) -> list[int]:
    """`layers` as a list, each checked to be a layer of `layout`."""
    out = [layers] if isinstance(layers, int) else list(layers)
    bad = [x for x in out if not 0 <= x < layout.num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside the model's {layout.num_layers} layers")
    return out


def _pair_ranges(moves: list[BlockMove], src: _Geometry, dst: _Geometry, components: int) -> list[tuple[int, int, int]]:
    """(src_offset, dst_offset, length) of `moves` (one P rank, one D rank) in
    layer 0, move by move, component by component."""
    out = []
    for m in moves:
        length = m.num_heads * src.head
        s = m.src_block * src.block + m.src_head_start * src.head
        d = m.dst_block * dst.block + m.dst_head_start * dst.head
        for c in range(components):
            out.append((s + c * src.component, d + c * dst.component, length))
    return out


def _layered_pieces(
    base: list[tuple[int, int, int]], src: _Geometry, dst: _Geometry, layers: list[int], coalesce: bool
) -> list[Piece]:
    """`base` shifted to each of `layers` (layer-major) as Pieces; with
    `coalesce`, a range continuing the previous one on both sides is merged
    into it."""
    runs: list[list[int]] = []  # [src_offset, dst_offset, length]
    for layer in layers:
        s_shift, d_shift = layer * src.layer, layer * dst.layer
        for s, d, n in base:
            s += s_shift
            d += d_shift
            if coalesce and runs:
                last = runs[-1]
                if last[0] + last[2] == s and last[1] + last[2] == d:
                    last[2] += n
                    continue
            runs.append([s, d, n])
    return [Piece(s, d, n) for s, d, n in runs]


def pieces(move: BlockMove, p: KVLayout, d: KVLayout, layer: int) -> list[Piece]:
    """Byte ranges of `move` for one layer, one per component (K then V for
    GQA): offsets into the P rank's and the D rank's whole cache tensors."""
    src, dst = _geometry(p, move.src_rank), _geometry(d, move.dst_rank)
    base = _pair_ranges([move], src, dst, num_components(p))
    return _layered_pieces(base, src, dst, _as_layers(p, layer), coalesce=False)


def pieces_by_pair(
    moves: Iterable[BlockMove],
    p: KVLayout,
    d: KVLayout,
    layers: int | Iterable[int],
    coalesce: bool = True,
) -> dict[tuple[int, int], list[Piece]]:
    """{(src_rank, dst_rank): pieces} for `moves` over `layers` (one layer or
    several, layer-major, moves in the given order within a layer). With
    `coalesce`, pieces contiguous on both sides are merged; the bytes covered
    are the same either way."""
    by_pair: dict[tuple[int, int], list[BlockMove]] = {}
    for m in moves:
        by_pair.setdefault((m.src_rank, m.dst_rank), []).append(m)
    layer_list = _as_layers(p, layers)
    components = num_components(p)
    out: dict[tuple[int, int], list[Piece]] = {}
    for (src_rank, dst_rank), pair_moves in by_pair.items():
        src, dst = _geometry(p, src_rank), _geometry(d, dst_rank)
        base = _pair_ranges(pair_moves, src, dst, components)
        out[(src_rank, dst_rank)] = _layered_pieces(base, src, dst, layer_list, coalesce)
    return out


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (offset, length) ranges with touching neighbours merged."""
    out: list[list[int]] = []
    for offset, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1][1] += length
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]


def expected_ranges(
    d: KVLayout,
    d_rank: int,
    num_tokens: int,
    d_block_ids: Sequence[int],
    layers: int | Iterable[int],
    coalesce: bool = True,
    first_block: int = 0,
) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of D rank `d_rank`'s cache that a transfer
    of `num_tokens` tokens fills: the whole [C, H_local, B, head_dim] chunk of
    every (layer, block) that rank stores, from global block `first_block` on. The planner's pieces for this rank
    cover exactly these bytes, each byte once. With `coalesce` the ranges are
    sorted and touching ones merged, so every (coalesced) piece lies inside
    one range; without it, one range per (layer, block) in that order."""
    _check_num_tokens(num_tokens)
    ids = _used_block_ids(d, "decode", d_block_ids, num_tokens)
    if not 0 <= d_rank < len(d.ranks):
        raise ValueError(f"decode rank {d_rank} outside the layout's {len(d.ranks)} ranks")
    geo = _geometry(d, d_rank)
    shard, n_d = d.ranks[d_rank].cp_rank, d.num_shards
    check_first_block(first_block, num_tokens, d.block_size)
    blocks = [ids[g // n_d] for g in range(shard, num_global_blocks(num_tokens, d.block_size), n_d) if g >= first_block]
    ranges = [(geo.offset(layer, blk, 0, 0), geo.block) for layer in _as_layers(d, layers) for blk in blocks]
    return _merge_ranges(ranges) if coalesce else ranges
