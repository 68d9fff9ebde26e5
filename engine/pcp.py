"""The load-balanced ("zigzag") split of prefill tokens across PCP ranks.

A sequence of L new tokens is cut into 2P contiguous chunks; PCP rank r takes
chunks r and 2P-1-r. Under a causal mask an early chunk is cheap and a late
one expensive, so each rank gets about the same number of query-key pairs.
Chunks hold L // 2P tokens each; the L % 2P remaining tokens go one each to
the late chunks (2P-1, 2P-2, ..., P) and then to the early ones (0, 1, ...),
so that short prompts still spread over ranks and the per-rank work differs
by at most one chunk's worth (ceil(L/2P) queries against L keys).
"""
from __future__ import annotations

from dataclasses import dataclass


def chunk_bounds(length: int, pcp: int) -> list[tuple[int, int]]:
    """(start, end) of the 2P chunks of a sequence of `length` tokens."""
    n = 2 * pcp
    base, rem = divmod(length, n)
    sizes = [base] * n
    extra_order = list(range(n - 1, pcp - 1, -1)) + list(range(pcp))
    for c in extra_order[:rem]:
        sizes[c] += 1
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def rank_chunks(pcp: int, rank: int) -> tuple[int, int]:
    return rank, 2 * pcp - 1 - rank


@dataclass(frozen=True)
class PCPSplit:
    """Where every new token of a prefill batch goes, for one PCP rank."""

    positions: list[int]
    """Positions (within their sequence) of this rank's tokens, in local order."""
    token_index: list[int]
    """Index of each local token in the batch's full token order."""
    rows: list[tuple[int, int, int, int]]
    """(q_start, q_len, k_start, k_len): local query chunks against the full tokens."""
    pad: int
    """Tokens per rank in the all-gather (the largest rank's count)."""
    restore: list[int]
    """For each token in full order, its index in the flattened [pcp, pad] gather."""
    last_local: list[int]
    """Per sequence: local index of its last token if this rank holds it, else -1."""


def split_prefill(lengths: list[int], pcp: int, rank: int) -> PCPSplit:
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    local_of = {}  # full index -> (rank, local index)
    counts = [0] * pcp
    mine = None
    for r in range(pcp):
        positions, token_index, rows, last_local = [], [], [], []
        for s, n in enumerate(lengths):
            bounds = chunk_bounds(n, pcp)
            last = -1
            for c in rank_chunks(pcp, r):
                a, b = bounds[c]
                if a == b:
                    continue
                rows.append((len(positions), b - a, starts[s], b))
                for p in range(a, b):
                    local_of[starts[s] + p] = (r, len(positions))
                    if p == n - 1:
                        last = len(positions)
                    positions.append(p)
                    token_index.append(starts[s] + p)
            last_local.append(last)
        counts[r] = len(positions)
        if r == rank:
            mine = (positions, token_index, rows, last_local)
    pad = max(counts) if counts else 0
    restore = [local_of[i][0] * pad + local_of[i][1] for i in range(total)]
    positions, token_index, rows, last_local = mine
    return PCPSplit(positions, token_index, rows, pad, restore, last_local)
