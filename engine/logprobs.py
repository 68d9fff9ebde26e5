"""Log-probabilities of tokens under the model's distribution (SamplingParams.logprobs
and prompt_logprobs).

In a request's life: a sampled token's logprob is computed on rank 0 right after
the sampler picked it (EngineCore._postprocess), from the step's logits; a prompt's
logprobs are computed during its prefill step (ModelRunner), from the hidden state
of every prompt position, in row chunks so that a long prompt never holds all its
[tokens, vocab] logits at once. Both use the raw fp32 logits: temperature, top-k and
top-p shape sampling, not the reported distribution.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PROMPT_CHUNK_ROWS = 256
"""Prompt positions turned into logits at a time: [256, vocab] fp32 at most."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability at its position."""

    token_id: int
    logprob: float
    rank: int
    """1 + the number of vocabulary entries with a strictly larger logit (1 = most likely)."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely (token_id, logprob) at the position, most likely first."""


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: int) -> list[TokenLogprob]:
    """logits [n, V] (any dtype; taken as fp32) and one token per row -> its TokenLogprob,
    with the `num_top` most likely alternatives of the row."""
    x = logits.detach().float()
    lp = torch.log_softmax(x, dim=-1)
    idx = torch.tensor(tokens, dtype=torch.int64, device=x.device).unsqueeze(1)
    chosen_logit = x.gather(1, idx)
    # a NaN logit never counts as larger; ties share the better rank
    rank = (x > chosen_logit).sum(dim=-1) + 1
    chosen = lp.gather(1, idx).squeeze(1)
    k = min(num_top, x.shape[-1])
    if k > 0:
        top_lp, top_ids = lp.topk(k, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    else:
        top_lp = top_ids = [[] for _ in tokens]
    return [
        TokenLogprob(int(t), float(c), int(r), tuple(zip(ids, lps)))
        for t, c, r, ids, lps in zip(tokens, chosen.tolist(), rank.tolist(), top_ids, top_lp)
    ]


def prompt_logprobs(hidden: torch.Tensor, prompt: list[int], num_top: int, compute_logits,
                    keep: bool) -> list[TokenLogprob]:
    """Logprobs of prompt tokens 1..N-1 from the hidden states of positions 0..N-2.

    hidden [N, H] in prompt order on every rank; `compute_logits` may be a collective
    (the TP-sharded LM head), so every rank calls it for the same chunks. Only a rank
    with `keep` (rank 0) turns the logits into results; the others return []."""
    out: list[TokenLogprob] = []
    rows = len(prompt) - 1
    for start in range(0, rows, PROMPT_CHUNK_ROWS):
        end = min(rows, start + PROMPT_CHUNK_ROWS)
        logits = compute_logits(hidden[start:end])
        if keep:
            out += token_logprobs(logits, prompt[start + 1 : end + 1], num_top)
    return out


def sampled_logprobs(logits: torch.Tensor, seqs, emitted: dict[int, list[int]], starts: list[int]) -> dict:
    """Sequence -> the TokenLogprob of each token it emitted (emitted token j from row
    starts[i] + j), for the sequences whose request asked; the others cost nothing."""
    want = [i for i in emitted if seqs[i].params.logprobs is not None]
    if not want:
        return {}
    pairs = [(i, starts[i] + j, t) for i in want for j, t in enumerate(emitted[i])]
    most = max(seqs[i].params.logprobs for i in want)
    index = torch.tensor([r for _, r, _ in pairs], dtype=torch.int64, device=logits.device)
    found = token_logprobs(logits.index_select(0, index), [t for _, _, t in pairs], most)
    out: dict[int, list] = {}
    for (i, _, _), lp in zip(pairs, found):
        out.setdefault(i, []).append(dataclasses.replace(lp, top=lp.top[: seqs[i].params.logprobs]))
    return out
