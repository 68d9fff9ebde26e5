"""Sampling parameters and the sampler (runs on rank 0 only).

In a request's life: after each model step, EngineCore hands the step's logits to
the Sampler, which picks every request's next token. A row that cannot be sampled
fails only its own request (EngineCore ends it with an error event)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from braid.proto.sampling_rules import check_sampling_values

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample as greedy. Dividing logits by a smaller number
overflows fp32 (1e-40 is not even a normal float), and a distribution that sharp
is greedy in all but name; `check_sampling_values` still accepts any finite >= 0."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """New tokens to generate at most."""
    temperature: float = 1.0
    """0 (or anything below MIN_TEMPERATURE) means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; in (0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed and prompt give the same tokens."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Tokens that end the request (besides the model's EOS)."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Report each sampled token's logprob and rank plus this many alternatives (0..20); None: none."""
    prompt_logprobs: int | None = None
    """Report the logprob of every prompt token after the first, with this many alternatives (0..20)."""
    num_speculative_tokens: int | None = None
    """Drafts verified per decode step (0..16; 0: off); None: the engine's setting."""
    speculative_method: str | None = None
    """Proposer ("ngram"); None: the engine's."""

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        # the same rules the router and the nodes apply to the wire message
        check_sampling_values(
            max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
            num_speculative_tokens=self.num_speculative_tokens, speculative_method=self.speculative_method,
        )

    @property
    def greedy(self) -> bool:
        """0 means greedy; so does any temperature too small to divide by safely."""
        return self.temperature < MIN_TEMPERATURE


class SamplingError(RuntimeError):
    """One row could not be sampled (its logits hold no finite value); only that
    request fails."""


class Sampler:
    """Picks one token per row of a step's logits. Every row is sampled on its own
    and in a numerically safe way (fp32, NaN -> -inf, max subtracted before the
    temperature, probabilities checked before multinomial), so no request's
    settings or logits can make another request, or the engine, fail."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
        """logits [S, V] -> one token per row; SamplingError if any row failed."""
        tokens, failed = self.sample(logits, params, generators)
        if failed:
            raise SamplingError("; ".join(f"row {i}: {why}" for i, why in sorted(failed.items())))
        return tokens

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list) -> tuple[list[int], dict[int, str]]:
        """logits [S, V] -> (one token per row, {row: why} for the rows that failed;
        their token is -1). Never raises for a row's own reasons."""
        clean = _clean(logits)
        best = clean.max(dim=-1)  # one pass: the values and the first index of each row's maximum
        greedy = best.indices.tolist()
        finite = torch.isfinite(best.values).tolist()
        tokens, failed = [], {}
        for i, p in enumerate(params):
            if not finite[i]:
                tokens.append(-1)
                failed[i] = "the model's logits hold no finite value"
                continue
            if p.greedy:
                tokens.append(greedy[i])
                continue
            try:
                gen = generators[i] if generators[i] is not None else self.generator
                tokens.append(_sample_row(clean[i].cpu(), p, gen, greedy[i]))
            except Exception as e:  # noqa: BLE001 - this request fails, not the batch
                tokens.append(-1)
                failed[i] = f"sampling failed: {type(e).__name__}: {e}"
        return tokens, failed


def _clean(logits: torch.Tensor) -> torch.Tensor:
    """fp32 (on the logits' device: greedy rows never leave it) with NaN as -inf and
    +inf as the largest float: a NaN never wins, and an infinite logit stays the most
    likely without poisoning softmax."""
    x = logits.detach().float()
    return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator, greedy: int) -> int:
    """One token from one clean row (its max finite) under `p`."""
    # subtract the max first: every value is <= 0, so dividing by the temperature
    # can only underflow toward -inf (probability 0), never overflow to +inf
    row = (row - row.max()) / p.temperature
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the token that crosses top_p
        drop[0] = False  # the most likely token always stays
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = row.softmax(-1)
    total = float(probs.sum())
    if not (torch.isfinite(probs).all() and total > 0):
        return greedy  # cannot happen with the max at 0, but multinomial must never see it
    return int(torch.multinomial(probs, 1, generator=gen))
