"""A request's state inside the engine."""
from __future__ import annotations

import enum
import itertools

from braid.engine.sampling import SamplingParams
from braid.engine.spec_decode.stats import SpecState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    WAITING_FOR_KV = "waiting_for_kv"
    """Blocks reserved; the KV arrives from a prefill node (remote prefill)."""
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        """Tokens whose KV is in the cache; the scheduler advances it toward len(token_ids)."""
        self.block_hashes: list[int] = []
        """Hash chain of the full blocks of token_ids (prefix cache), extended as they fill."""
        self.spec = SpecState()
        """Speculative decoding: recent acceptance and pauses of this sequence."""
        self.num_draft_cached = 0
        """Leading tokens whose KV the draft model's cache holds (speculative decoding, method draft)."""
        self.mtp_row = (-1, -1)
        """(step, logits row) of the hidden state its next MTP proposal starts from (method mtp)."""
        self.num_registered_blocks = 0
        """Leading blocks of this sequence named in the prefix cache."""
        self.num_prefix_hit_tokens = 0
        """Prompt tokens whose KV came from the prefix cache (this node's, or the decode node's)."""
        self.finish_reason: str | None = None
        self.generator = None  # torch.Generator when the request is seeded
        self.transfer = None
        """Prefill side of a remote prefill: (TransferTarget, timeout_s)."""
        self.holds_kv = False
        """Blocks outlive the sequence's end (they are being sent); the engine frees them."""
        self.first_logprobs = None
        self.prompt_logprobs: list | None = None
        """Prefill side of a transfer: the first token's and the prompt's logprobs (when asked),
        kept until the "transferred" event carries them."""

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED
