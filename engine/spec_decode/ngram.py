"""N-gram prompt lookup: the draft-free proposer.

In a request's life: before each decode step of a speculating sequence, the
engine asks for up to k draft tokens. The proposer takes the sequence's last n
tokens (prompt + generated), finds their most recent earlier occurrence, and
proposes the tokens that followed it; it tries n = max_n first and falls back to
shorter n down to min_n. Text that quotes its context (summaries, edits, code
that repeats identifiers) is where this pays. No draft model and no draft KV:
the draft's "probabilities" are one-hot (see acceptance.rejection_sample).

Two ways to search, with the same answer whenever the first one's window
covers the match:

- `propose_ngram` is stateless: a vectorised scan of the last `window` start
  positions only. Work per call: O(window * max_n) per n tried, independent of
  the sequence length (a 100k-token sequence costs no more than a 4k one); the
  price is that a match older than the window is not found.
- `NgramIndex` keeps, per sequence, a hash map from each n-gram to the end of its
  most recent occurrence, fed lazily with the tokens appended since the last
  call. Work per call: amortised O((max_n - min_n + 1) * max_n) per new token to
  index, O(max_n) per lookup, O(k) to copy the proposal; memory
  O(len * (max_n - min_n + 1)). It finds matches anywhere in the history.

Semantics shared by both (and by the brute-force reference in the tests): with
L tokens, an occurrence of the suffix t[L-n:] starting at s counts when
s + n <= L - 1, i.e. at least one token follows it and it is not the suffix
itself (it may overlap it); the latest such s wins; the proposal is
t[s+n : s+n+k], shorter when the sequence ends first.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_WINDOW = 8192
"""Start positions `propose_ngram` scans per n: at 3-grams a 24k-element compare,
tens of microseconds on a CPU, whatever the sequence length."""


def _check_n(min_n: int, max_n: int, k: int) -> None:
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def propose_ngram(tokens: Sequence[int] | torch.Tensor, k: int, *, min_n: int = 1, max_n: int = 3,
                  window: int | None = DEFAULT_WINDOW) -> list[int]:
    """Up to k draft tokens for one sequence (prompt + generated ids); [] when no
    n-gram of length min_n..max_n recurs within the window. window=None scans the
    whole history (O(len * max_n) per call: linear per step, not bounded)."""
    _check_n(min_n, max_n, k)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if k == 0:
        return []
    if window is not None:
        # every candidate and its continuation lie in the last window + max_n tokens:
        # convert only those, so a long Python list costs O(window) too, not O(len)
        tokens = tokens[max(0, len(tokens) - window - max_n):]
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # [min(L, window + max_n)]
    for n in range(max_n, min_n - 1, -1):
        s = _latest_start(t, n, window)
        if s is not None:
            return t[s + n: s + n + k].tolist()
    return []


def _latest_start(t: torch.Tensor, n: int, window: int | None) -> int | None:
    """The latest start s <= L-n-1 with t[s:s+n] == t[L-n:], among the last
    `window` candidate starts; None if there is none."""
    length = t.numel()
    last = length - n - 1  # latest start that leaves one token after the n-gram
    if last < 0:
        return None
    first = 0 if window is None else max(0, last - window + 1)
    cands = t[first: last + n].unfold(0, n, 1)  # [last - first + 1, n], one row per start
    hits = (cands == t[length - n:]).all(dim=1).nonzero()
    if hits.numel() == 0:
        return None
    return first + int(hits[-1])


def propose_ngram_batch(seqs: Sequence[Sequence[int] | torch.Tensor], ks: Sequence[int], *, min_n: int = 1,
                        max_n: int = 3, window: int | None = DEFAULT_WINDOW) -> list[list[int]]:
    """propose_ngram for each sequence with its own k (k=0: no speculation for it)."""
    if len(seqs) != len(ks):
        raise ValueError(f"{len(seqs)} sequences but {len(ks)} values of k")
    return [propose_ngram(s, k, min_n=min_n, max_n=max_n, window=window) for s, k in zip(seqs, ks)]


class NgramIndex:
    """One sequence's n-gram index: exact prompt lookup over the whole history at
    bounded cost per step. Feed it the sequence as it grows (`propose` takes the
    full token list each time and indexes only what is new); tokens already
    indexed must not change (a preempted sequence that is recomputed keeps its
    tokens, so the index survives preemption)."""

    def __init__(self, min_n: int = 1, max_n: int = 3):
        _check_n(min_n, max_n, 0)
        self.min_n, self.max_n = min_n, max_n
        # n -> {n-gram: end position (exclusive) of its latest indexed occurrence}
        self._last_end: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self._indexed = 0  # occurrences ending at or before this (exclusive end) are indexed

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens for `tokens` (the whole sequence so far, as Python
        ints: the keys are tuples of them)."""
        _check_n(self.min_n, self.max_n, k)
        length = len(tokens)
        if length < self._indexed:
            raise ValueError(f"the sequence shrank from {self._indexed} indexed tokens to {length}")
        # an occurrence counts when a token follows it: index those ending (exclusive) <= L-1
        self._index_until(tokens, length - 1)
        if k == 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if length < n:
                continue
            end = self._last_end[n].get(tuple(tokens[length - n:]))
            if end is not None:
                return list(tokens[end: end + k])
        return []

    def _index_until(self, tokens: Sequence[int], stop: int) -> None:
        """Index every n-gram whose exclusive end lies in (self._indexed, stop];
        a later occurrence overwrites an earlier one, so lookups get the latest."""
        for end in range(self._indexed + 1, stop + 1):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._last_end[n][tuple(tokens[end - n: end])] = end
        self._indexed = max(self._indexed, stop)
