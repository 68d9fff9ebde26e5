"""Counters of one engine's speculative decoding (plain Python: the scheduler
and the metrics exporter read them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecStats:
    seq_steps: int = 0
    """Decode steps of one sequence that verified at least one draft."""
    draft_tokens: int = 0
    """Drafts proposed and verified."""
    accepted_tokens: int = 0
    """Drafts the target agreed with (their KV stays)."""
    emitted_tokens: int = 0
    """Tokens those steps produced (accepted drafts plus the target's own, cut at a stop)."""
    draft_s: float = 0.0
    """Time spent proposing drafts."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a speculating sequence gains per step (1.0 = no gain)."""
        return self.emitted_tokens / self.seq_steps if self.seq_steps else 0.0

    def as_dict(self) -> dict:
        return {"seq_steps": self.seq_steps, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens, "emitted_tokens": self.emitted_tokens,
                "draft_s": self.draft_s, "acceptance_rate": self.acceptance_rate,
                "tokens_per_step": self.tokens_per_step}
