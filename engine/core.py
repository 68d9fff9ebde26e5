"""The engine loop on rank 0: admit requests, schedule, run a step on every
rank, sample, and report what each request produced.

    batch  = scheduler.schedule()
    logits = executor.execute(plan of batch)
    tokens = sampler(logits)
    done   = scheduler.postprocess(batch, tokens)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from braid.engine.block_manager import BlockManager
from braid.engine.config import EngineConfig, resolve
from braid.engine.executor import Executor
from braid.engine.sampling import Sampler, SamplingParams
from braid.engine.scheduler import RequestRejected, ScheduledBatch, Scheduler, SchedulerConfig
from braid.engine.sequence import Sequence
from braid.engine.step_plan import SeqPlan, StepPlan
from braid.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a request (or its end)."""

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None


class EngineCore:
    def __init__(self, cfg: EngineConfig):
        self.config, self.model_config = resolve(cfg)
        cfg = self.config
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(cfg.model_path)
        except FileNotFoundError:
            self.tokenizer = None
        self.blocks = BlockManager(cfg.num_kv_blocks, cfg.layout.virtual_block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(cfg.max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens),
            self.blocks,
            self.model_config.eos_token_ids,
        )
        self.sampler = Sampler(cfg.seed)
        self.executor = Executor(cfg)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected("this model has no tokenizer.json; send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestRejected(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    def new_sequence(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, self.tokenize(prompt), params)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        return seq

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        seq = self.new_sequence(prompt, params, request_id)
        self.scheduler.add(seq)
        self.requests[seq.request_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- steps ---------------------------------------------------------------
    @staticmethod
    def plan_for(batch: ScheduledBatch) -> StepPlan:
        seqs = []
        for seq in batch.seqs:
            if batch.is_prefill:
                seqs.append(SeqPlan(0, tuple(seq.token_ids), tuple(seq.block_table)))
            else:
                seqs.append(SeqPlan(len(seq) - 1, (seq.token_ids[-1],), tuple(seq.block_table)))
        return StepPlan(batch.is_prefill, tuple(seqs))

    def step(self) -> list[TokenEvent]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self.executor.execute(self.plan_for(batch))
        tokens = self.sampler(logits, [s.params for s in batch.seqs], [s.generator for s in batch.seqs])
        self.scheduler.postprocess(batch, tokens)
        events = []
        for seq, tok in zip(batch.seqs, tokens):
            events.append(TokenEvent(seq.request_id, tok, seq.is_finished, seq.finish_reason))
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return events

    def last_token_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill `prompts` as one batch and return the logits of each one's
        last position, [len(prompts), vocab] fp32. Needs an idle engine."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("last_token_logits needs an idle engine")
        tables = []
        try:
            for ids in prompts:
                ids = self.tokenize(ids)
                self.scheduler.check(len(ids))
                tables.append((ids, self.blocks.allocate(self.blocks.blocks_for(len(ids)))))
            plan = StepPlan(True, tuple(SeqPlan(0, tuple(ids), tuple(t)) for ids, t in tables))
            return self.executor.execute(plan)
        finally:
            for _, t in tables:
                self.blocks.free(t)

    def kv_stats(self) -> dict:
        """KV memory held on each rank right now (every rank uses the same block ids)."""
        from braid.engine.config import kv_bytes_per_block

        per_block = kv_bytes_per_block(self.model_config, self.config)
        return {
            "blocks_used": self.blocks.num_used,
            "blocks_total": self.blocks.num_blocks,
            "tokens_per_block": self.blocks.tokens_per_block,
            "bytes_per_block_per_rank": per_block,
            "bytes_used_per_rank": per_block * self.blocks.num_used,
        }

    def shutdown(self) -> None:
        self.executor.shutdown()
