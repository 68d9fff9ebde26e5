"""Sampling parameters and the sampler (runs on rank 0 only)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from braid.proto.sampling_rules import check_sampling_values


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """New tokens to generate at most."""
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; in (0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed and prompt give the same tokens."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Tokens that end the request (besides the model's EOS)."""
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        # the same rules the router and the nodes apply to the wire message
        check_sampling_values(
            max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
        """logits [S, V] fp32 -> one token per row."""
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, p in enumerate(params):
            if p.greedy:
                out.append(greedy[i])
                continue
            row = logits[i].float().cpu() / p.temperature
            if p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = row.sort(descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the token that crosses top_p
                row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
            probs = row.softmax(-1)
            gen = generators[i] if generators[i] is not None else self.generator
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
        return out
