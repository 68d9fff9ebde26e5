"""How a receiver counts the bytes of a KV transfer that landed (Coverage,
LazyCoverage): every byte once, however often it is written, so a transfer is
complete exactly when its expected ranges are all written. The receiver's book
(receiver_book.py) keeps one per live transfer; a transport picks which.
"""
from __future__ import annotations

import bisect
from typing import Sequence


def merged(spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The (start, end) spans as sorted, disjoint, non-touching (starts, ends)."""
    starts: list[int] = []
    ends: list[int] = []
    for s, e in sorted(spans):
        if ends and s <= ends[-1]:
            ends[-1] = max(ends[-1], e)
        else:
            starts.append(s)
            ends.append(e)
    return starts, ends


class Coverage:
    """Disjoint, sorted, non-touching byte intervals already written, merged as each
    span lands; counts each byte once."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.size = 0

    def add(self, s: int, e: int) -> None:
        starts, ends = self.starts, self.ends
        i = bisect.bisect_left(ends, s)  # first interval ending at or after s
        j = bisect.bisect_right(starts, e)  # past the last starting at or before e
        if i == j:
            starts.insert(i, s)
            ends.insert(i, e)
            self.size += e - s
            return
        overlap = sum(max(0, min(e, ends[k]) - max(s, starts[k])) for k in range(i, j))
        self.size += (e - s) - overlap
        starts[i:j] = [min(s, starts[i])]
        ends[i:j] = [max(e, ends[j - 1])]

    def extend(self, spans: Sequence[tuple[int, int]]) -> None:
        for s, e in spans:
            self.add(s, e)

    def covers(self, total: int) -> bool:
        """Whether `total` distinct bytes are written (never more: spans lie inside the ranges)."""
        return self.size == total


class LazyCoverage:
    """Coverage for writes that land many spans at once: spans are appended as they
    land (O(1) each), and only once the running count reaches the expected total are
    they sorted and merged, which discounts bytes written twice."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.count = 0  # >= bytes covered (overlaps counted twice until settle)

    def extend(self, spans: Sequence[tuple[int, int]]) -> None:
        self.spans.extend(spans)
        self.count += sum([e - s for s, e in spans])

    def settle(self) -> int:
        starts, ends = merged(self.spans)
        self.spans = list(zip(starts, ends))
        self.count = sum(ends) - sum(starts)
        return self.count

    def covers(self, total: int) -> bool:
        return self.count >= total and self.settle() == total
