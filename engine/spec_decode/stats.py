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


SPEC_WINDOW = 8
"""Verified drafts a sequence's acceptance is judged on before it may pause."""
MAX_PAUSE = 64


@dataclass
class SpecState:
    """One sequence's recent speculation: drafts verified and kept since the last
    judgement, and the decode steps it sits out (a pause doubles each time, up to
    MAX_PAUSE, and a good window resets it)."""

    drafted: int = 0
    accepted: int = 0
    pause_left: int = 0
    next_pause: int = 4

    def should_speculate(self) -> bool:
        """False (and one step of the pause served) while paused."""
        if self.pause_left > 0:
            self.pause_left -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int, threshold: float) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if self.drafted < SPEC_WINDOW:
            return
        if self.accepted < threshold * self.drafted:
            self.pause_left = self.next_pause
            self.next_pause = min(MAX_PAUSE, 2 * self.next_pause)
        else:
            self.next_pause = 4
        self.drafted = self.accepted = 0
