"""Acceptance: which of a step's draft tokens a sequence keeps.

In a request's life: a speculating decode step scores k+1 positions per
sequence (the last emitted token followed by the k drafts). Row i of the
target's output is its prediction for the token after draft i-1. This module
turns those k+1 rows and the k drafts into the 1..k+1 tokens the sequence emits
this step; the engine appends them and rolls back the KV of the drafts that
were not kept (every draft after the first rejection).

- Greedy requests: `greedy_accept` keeps the longest prefix of drafts equal to
  the target's argmax and adds the target's own token at the first mismatch
  (or the bonus token after all k): the output equals non-speculative greedy
  decoding token for token.
- Sampled requests: `rejection_sample` (Leviathan et al. 2023, Chen et al. 2023)
  keeps draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first
  rejection it emits a token from norm(max(0, p_i - q_i)); after k acceptances it
  emits a bonus token from p_k. Every emitted token is distributed exactly as the
  target's p. The p rows are the target's probabilities after the request's own
  transforms (temperature, top-k, top-p); q rows are the draft's, for the
  distribution each draft was actually drawn from.
- Draft-free proposers (n-gram) have a one-hot q: keep x_i with probability
  p_i(x_i), else emit from p_i with x_i removed. Drawing y ~ p_i and keeping x_i
  iff y == x_i (else emitting y) is the same joint law, and it is what is done
  here (draft_probs=None): then each emitted token is the very token a
  non-speculative sampler would draw from the same p row with the same generator.

Randomness: every draw for emitted position i (0..k) comes from generator i, and
the draws per position are fixed in number and order (draft-free: one
multinomial; with q: one uniform, then one multinomial if it rejects; the bonus:
one multinomial). The engine seeds generator i with draw_seed(seed, n + i), n
being the sequence's output tokens so far (engine/core.py), so the token at
output index j depends on (seed, j), the drafts and the target rows only: not on
the batch, the step in which j fell, or the draws of other positions. With
draft_probs=None a seeded request then emits the same tokens with speculation as
without it (given the same target rows). A single generator is also accepted:
it is used for all positions in order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator per emitted position (k+1 of them), one for all, or None (torch's default)."""


@dataclass(frozen=True)
class Accepted:
    """One sequence's outcome of a speculating step."""

    tokens: list[int]
    """The 1..k+1 tokens to append: the accepted drafts, then the target's token."""

    @property
    def num_accepted(self) -> int:
        """Drafts kept (their KV stays); the KV of the other k - num_accepted is rolled back."""
        return len(self.tokens) - 1


def greedy_accept(target_tokens: Sequence[int] | torch.Tensor, draft_tokens: Sequence[int]) -> Accepted:
    """target_tokens: the target's argmax at the k+1 positions; draft_tokens: the k drafts."""
    target = [int(t) for t in (target_tokens.tolist() if isinstance(target_tokens, torch.Tensor) else target_tokens)]
    k = len(draft_tokens)
    if len(target) != k + 1:
        raise ValueError(f"{k} drafts need {k + 1} target tokens, got {len(target)}")
    out = []
    for i in range(k):
        out.append(target[i])
        if target[i] != int(draft_tokens[i]):
            return Accepted(out)
    out.append(target[k])  # all k kept: the bonus token
    return Accepted(out)


def greedy_accept_batch(target_logits: torch.Tensor, drafts: Sequence[Sequence[int]]) -> list[Accepted]:
    """target_logits [sum(k_s + 1), V]: each sequence's k_s + 1 rows, in order;
    drafts: each sequence's k_s drafts. One argmax and one transfer for the batch."""
    need = sum(len(d) + 1 for d in drafts)
    if target_logits.dim() != 2 or target_logits.shape[0] != need:
        raise ValueError(f"drafts need {need} target rows, got shape {tuple(target_logits.shape)}")
    argmax = target_logits.argmax(dim=-1).tolist()  # [sum(k_s + 1)]
    out, row = [], 0
    for d in drafts:
        out.append(greedy_accept(argmax[row: row + len(d) + 1], d))
        row += len(d) + 1
    return out


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One generator per emitted position, seeded (e.g. with draw_seed(seed, n + i))."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _position_generator(generators: Generators, i: int) -> torch.Generator | None:
    if generators is None or isinstance(generators, torch.Generator):
        return generators
    return generators[i]


def _check_inputs(p: torch.Tensor, x: list[int], q: torch.Tensor | None, generators: Generators) -> None:
    k = len(x)
    if p.dim() != 2 or p.shape[0] != k + 1:
        raise ValueError(f"{k} drafts need target probabilities [{k + 1}, V], got {tuple(p.shape)}")
    if q is not None and tuple(q.shape) != (k, p.shape[1]):
        raise ValueError(f"draft probabilities must be [{k}, {p.shape[1]}], got {tuple(q.shape)}")
    if any(not 0 <= t < p.shape[1] for t in x):
        raise ValueError(f"draft tokens {x} fall outside the vocabulary of {p.shape[1]}")
    if not (generators is None or isinstance(generators, torch.Generator)) and len(generators) < k + 1:
        raise ValueError(f"{k} drafts need {k + 1} generators, got {len(generators)}")


def rejection_sample(target_probs: torch.Tensor, draft_tokens: Sequence[int], draft_probs: torch.Tensor | None,
                     generators: Generators = None) -> Accepted:
    """target_probs [k+1, V], draft_tokens [k], draft_probs [k, V] or None for a
    draft-free proposer (one-hot q) -> the 1..k+1 tokens to emit."""
    x = [int(t) for t in draft_tokens]
    _check_inputs(target_probs, x, draft_probs, generators)
    if draft_probs is None:
        # the caller's dtype, unconverted: the draws then match a plain sampler's on the same rows
        return _one_hot_accept(target_probs.detach().cpu(), x, generators)
    p = target_probs.detach().to("cpu", torch.float64)  # [k+1, V]; fp64 for the ratio test and the residual
    q = draft_probs.detach().to("cpu", torch.float64)  # [k, V]
    k = len(x)
    idx = torch.tensor(x, dtype=torch.long).unsqueeze(1)  # [k, 1]
    px = p[:k].gather(1, idx).squeeze(1).tolist()  # [k]
    qx = q.gather(1, idx).squeeze(1).tolist()  # [k]
    out = []
    for i in range(k):
        gen = _position_generator(generators, i)
        u = float(torch.rand((), dtype=torch.float64, generator=gen))  # in [0, 1)
        if u * qx[i] < px[i]:  # u < p/q without dividing: q(x)=0 keeps x iff p(x)>0
            out.append(x[i])
            continue
        residual = (p[i] - q[i]).clamp_(min=0.0)  # [V]
        if not float(residual.sum()) > 0.0:
            # p == q up to rounding: a rejection then has probability ~0 and p is the residual's limit
            residual = p[i]
        out.append(_draw(residual, gen))
        return Accepted(out)
    out.append(_draw(p[k], _position_generator(generators, k)))  # all k kept: the bonus token
    return Accepted(out)


def _one_hot_accept(p: torch.Tensor, x: list[int], generators: Generators) -> Accepted:
    """Draft-free: y_i ~ p_i; keep x_i iff y_i == x_i, else emit y_i and stop.
    P(keep) = p_i(x_i) and, on a rejection, y_i ~ p_i without x_i, renormalised:
    the one-hot rejection rule exactly, with one draw per position."""
    out = []
    for i in range(len(x) + 1):
        y = _draw(p[i], _position_generator(generators, i))
        out.append(y)
        if i == len(x) or y != x[i]:
            break
    return Accepted(out)


def _draw(weights: torch.Tensor, gen: torch.Generator | None) -> int:
    """One token from non-negative weights (need not sum to 1)."""
    return int(torch.multinomial(weights, 1, generator=gen))


def rejection_sample_batch(target_probs: Sequence[torch.Tensor], drafts: Sequence[Sequence[int]],
                           draft_probs: Sequence[torch.Tensor | None],
                           generators: Sequence[Generators]) -> list[Accepted]:
    """rejection_sample per sequence, each with its own k, q (or None) and generators."""
    n = len(target_probs)
    if not len(drafts) == len(draft_probs) == len(generators) == n:
        raise ValueError("target_probs, drafts, draft_probs and generators need one entry per sequence")
    return [rejection_sample(p, d, q, g) for p, d, q, g in zip(target_probs, drafts, draft_probs, generators)]
