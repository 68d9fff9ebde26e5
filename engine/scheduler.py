"""Continuous batching on one instance.

A sequence's life: WAITING -> (prefill step) RUNNING -> (decode steps) ->
FINISHED. Each step is either a prefill batch (waiting sequences that fit the
token budget and the free KV blocks) or a decode batch (every running
sequence, one token each); prefill goes first so new requests join the batch
quickly. When a decode step cannot get a block for a sequence, the most
recently started sequence is preempted: its blocks are freed and it waits to
be prefilled again over all its tokens (recompute). A remotely prefilled
sequence holds reserved blocks in WAITING_FOR_KV until its KV and first token
arrive, then joins the running set.

Plain Python over ids and integers; no torch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from braid.engine.block_manager import BlockManager
from braid.engine.config import SchedulerConfig
from braid.engine.sequence import Sequence, SeqStatus


class RequestRejected(ValueError):
    """The request can never run on this engine (e.g. longer than max_model_len)."""


@dataclass(frozen=True)
class ScheduledBatch:
    is_prefill: bool
    seqs: tuple[Sequence, ...]


class Scheduler:
    """Rank 0's choice of what the next step runs: the waiting queue, the
    running set and the sequences holding reserved blocks for remote KV.
    `schedule()` returns one ScheduledBatch (prefill first, else decode);
    `postprocess()` appends the sampled tokens and retires finished
    sequences, freeing their blocks. Never touches a tensor."""

    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, eos_token_ids: tuple[int, ...] = ()):
        self.cfg = cfg
        self.blocks = blocks
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote: dict[str, Sequence] = {}  # WAITING_FOR_KV, by request id
        self.num_preemptions = 0

    # -- admission -----------------------------------------------------------
    def check(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens < 1:
            raise RequestRejected("prompt is empty")
        if num_prompt_tokens > self.cfg.max_model_len:
            raise RequestRejected(
                f"prompt has {num_prompt_tokens} tokens, more than max_model_len {self.cfg.max_model_len}"
            )

    def add(self, seq: Sequence) -> None:
        self.check(seq.num_prompt_tokens)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.remote)

    # -- remote prefill (blocks reserved for KV pushed by a prefill node) -----
    def reserve_remote(self, seq: Sequence) -> list[int]:
        """Allocate blocks for the prompt's KV; the sequence waits for it."""
        self.check(seq.num_prompt_tokens)
        need = self.blocks.blocks_for(seq.num_prompt_tokens + 1)
        seq.block_table = self.blocks.allocate(need)
        seq.status = SeqStatus.WAITING_FOR_KV
        self.remote[seq.request_id] = seq
        return seq.block_table

    def remote_ready(self, request_id: str, first_token: int) -> Sequence:
        """The prompt's KV is in place and the first token sampled: start decoding."""
        seq = self.remote.pop(request_id)
        seq.num_cached_tokens = seq.num_prompt_tokens
        seq.token_ids.append(first_token)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._check_finished(seq, first_token)
        if seq.is_finished:
            self._release(seq)
        return seq

    # -- scheduling ----------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch:
            return ScheduledBatch(True, tuple(batch))
        batch = self._schedule_decode()
        return ScheduledBatch(False, tuple(batch)) if batch else None

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq)
            if batch and tokens + n > self.cfg.max_num_batched_tokens:
                break
            need = self.blocks.blocks_for(n)
            if not self.blocks.can_allocate(need):
                break
            self.waiting.popleft()
            seq.block_table = self.blocks.allocate(need)
            seq.status = SeqStatus.RUNNING
            batch.append(seq)
            tokens += n
        self.running.extend(batch)
        return batch

    def _schedule_decode(self) -> list[Sequence]:
        batch: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = self.blocks.blocks_for(len(seq)) - len(seq.block_table)
            while need > 0 and not self.blocks.can_allocate(need):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                if need > 0:
                    seq.block_table += self.blocks.allocate(need)
                batch.append(seq)
                i += 1
                continue
            break  # seq itself was preempted; everything after it too
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- results -------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, tokens: list[int]) -> list[Sequence]:
        """Append each sequence's new token; return the sequences that finished."""
        finished = []
        for seq, tok in zip(batch.seqs, tokens):
            seq.num_cached_tokens = len(seq)
            seq.token_ids.append(tok)
            self._check_finished(seq, tok)
            if seq.is_finished:
                self._release(seq)
                finished.append(seq)
        return finished

    def _check_finished(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.cfg.max_model_len:
            seq.finish_reason = "length"
        else:
            return
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.block_table and not seq.holds_kv:
            self.blocks.free(seq.block_table)
            seq.block_table = []

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request wherever it is and free its blocks; None if unknown."""
        seq = self.remote.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self.running if s.request_id == request_id), None)
        if seq is None:
            seq = next((s for s in self.waiting if s.request_id == request_id), None)
            if seq is not None:
                self.waiting.remove(seq)
        if seq is None:
            return None
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "abort"
        return seq
