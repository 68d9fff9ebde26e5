"""The engine loop on rank 0: admit requests, schedule, run a step on every
rank, sample, and report what each request produced.

    events = poll KV transfers (decode: sequences whose KV arrived start decoding;
                                prefill: sent sequences release their blocks)
    batch  = scheduler.schedule()
    logits = executor.execute(plan of batch)   # prefill steps push KV layer by layer
    tokens = sampler(logits)
    done   = scheduler.postprocess(batch, tokens)

KV transfer, the scheduler half (the worker half is braid.engine.transfer):
- decode: `reserve` allocates blocks for a prompt under a lease and has every
  rank expect its bytes; the sequence waits (WAITING_FOR_KV) until every rank
  has its KV and rank 0 the first token, then decodes like any other. A failed
  transfer or an expired lease cancels every rank's receiver first and only then
  frees the blocks, so a late write can never land in reused memory.
- prefill: `add_transfer_request` queues a prompt with its destination; its
  prefill step sends each layer's blocks as soon as they are written, the first
  token goes out as the transfer's trailer, and the blocks stay held until every
  receiver acknowledged (or the transfer failed).
"""
from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
from dataclasses import dataclass

import torch

from braid.engine.block_manager import BlockManager
from braid.engine.config import EngineConfig, resolve
from braid.engine.executor import Executor
from braid.engine.sampling import Sampler, SamplingParams
from braid.engine.scheduler import RequestRejected, ScheduledBatch, Scheduler
from braid.engine.sequence import Sequence
from braid.engine.step_plan import SeqPlan, StepPlan, TransferPlan
from braid.tokenizer import Tokenizer
from braid.engine.transfer import DONE, FAILED
from braid.engine.worker import INCOMING, OUTGOING


class Overloaded(RuntimeError):
    """No room right now (KV blocks); retry later or elsewhere."""


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a request, or its end."""

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None
    """stop, length, abort, transferred (prefill side) or error."""
    error: str | None = None
    stats: dict | None = None
    """Prefill side of a transfer: prefill_s, transfer_s, kv_bytes."""


@dataclass
class _Transfer:
    seq: Sequence
    deadline: float
    started: float
    forward_s: float = 0.0


class EngineCore:
    def __init__(self, cfg: EngineConfig):
        self.config, self.model_config = resolve(cfg)
        cfg = self.config
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(cfg.model_path)
        except FileNotFoundError:
            self.tokenizer = None
        self.blocks = BlockManager(cfg.cache.num_kv_blocks, cfg.layout.virtual_block_size)
        self.scheduler = Scheduler(
            cfg.scheduler,
            self.blocks,
            self.model_config.eos_token_ids,
        )
        self.sampler = Sampler(cfg.seed)
        self.executor = Executor(cfg)
        self.requests: dict[str, Sequence] = {}
        self.ran_batch = False
        self.incoming: dict[int, _Transfer] = {}  # decode: reserved, waiting for KV
        self.outgoing: dict[int, _Transfer] = {}  # prefill: sent, waiting for acknowledgement
        self._ids = itertools.count()

    @property
    def kv_layout(self):
        """This instance's KVLayout descriptor (with receiver endpoints on decode)."""
        return self.executor.driver.transfer.layout

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
        """Stop a request wherever it is; its blocks are free when this returns."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        for table, direction in ((self.incoming, INCOMING), (self.outgoing, OUTGOING)):
            for tid, tr in list(table.items()):
                if tr.seq is seq:
                    self._drop_transfer(table, direction, tid)
                    return True
        self.scheduler.abort(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.incoming or self.outgoing)

    # -- KV transfer: decode side ----------------------------------------------
    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams, lease_s: float):
        """Blocks for the prompt's KV, held for `lease_s`; returns the KVDestination."""
        from braid.proto import common_pb2

        if self.config.transfer.role not in ("decode", "both"):
            raise RuntimeError("this engine does not receive KV (kv_role is not decode)")
        seq = self.new_sequence(prompt, params, request_id)
        self.scheduler.check(seq.num_prompt_tokens)
        need = self.blocks.blocks_for(seq.num_prompt_tokens + 1)
        if not self.blocks.can_allocate(need):
            raise Overloaded(f"need {need} KV blocks for {seq.num_prompt_tokens} tokens, {self.blocks.num_free} free")
        self.scheduler.reserve_remote(seq)
        tid = secrets.randbits(62)
        try:
            self.executor.kv_expect(tid, seq.num_prompt_tokens, lease_s, seq.block_table)
        except BaseException:
            self.scheduler.abort(request_id)
            raise
        self.requests[request_id] = seq
        now = time.monotonic()
        self.incoming[tid] = _Transfer(seq, now + lease_s, now)
        return common_pb2.KVDestination(
            layout=self.kv_layout,
            block_ids=seq.block_table,
            transfer_id=tid,
            transport=self.config.transfer.transport,
            lease_deadline_unix=time.time() + lease_s,
            num_tokens=seq.num_prompt_tokens,
        )

    # -- KV transfer: prefill side ---------------------------------------------
    def add_transfer_request(self, request_id: str, prompt: list[int], params: SamplingParams, destination, timeout_s: float) -> Sequence:
        """Prefill `prompt` and push its KV into `destination` (a KVDestination)."""
        from braid.kv_transfer.layout import check_compatible

        if self.config.transfer.role not in ("prefill", "both"):
            raise RuntimeError("this engine does not send KV (kv_role is not prefill)")
        check_compatible(self.kv_layout, destination.layout)
        seq = self.new_sequence(prompt, dataclasses.replace(params, max_tokens=1), request_id)
        if destination.num_tokens != seq.num_prompt_tokens:
            raise RequestRejected(
                f"destination expects {destination.num_tokens} tokens, the prompt has {seq.num_prompt_tokens}"
            )
        seq.transfer = (destination, timeout_s)
        seq.holds_kv = True  # the scheduler must not free its blocks when it finishes
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        return seq

    def _transfer_plans(self, batch: ScheduledBatch) -> tuple[TransferPlan, ...]:
        plans = []
        for i, seq in enumerate(batch.seqs):
            if getattr(seq, "transfer", None) is None:
                continue
            dest, timeout_s = seq.transfer
            plans.append(
                TransferPlan(i, dest.transfer_id, int(timeout_s * 1000), dest.layout.SerializeToString(), tuple(dest.block_ids))
            )
        return tuple(plans)

    # -- transfer bookkeeping --------------------------------------------------
    def _drop_transfer(self, table: dict, direction: int, tid: int) -> _Transfer:
        """Cancel on every rank, then free the blocks (in that order)."""
        tr = table.pop(tid)
        self.executor.kv_release(direction, [tid])
        self.scheduler.abort(tr.seq.request_id)
        if tr.seq.block_table:  # prefill side: the scheduler no longer tracks it
            self.blocks.free(tr.seq.block_table)
            tr.seq.block_table = []
        return tr

    def _poll_transfers(self) -> list[TokenEvent]:
        events = []
        now = time.monotonic()
        for table, direction in ((self.incoming, INCOMING), (self.outgoing, OUTGOING)):
            if not table:
                continue
            tids = list(table)
            states = self.executor.kv_poll(direction, tids)
            for tid, state in zip(tids, states):
                tr = table[tid]
                rid = tr.seq.request_id
                if state == DONE:
                    events.append(self._transfer_done(table, direction, tid))
                elif state == FAILED or now > tr.deadline:
                    why = self._failure_reason(direction, tid, state == FAILED)
                    self._drop_transfer(table, direction, tid)
                    self.requests.pop(rid, None)
                    events.append(TokenEvent(rid, None, True, "error", why))
        return events

    def _failure_reason(self, direction: int, tid: int, failed: bool) -> str:
        err = self.executor.driver.transfer.error(direction == INCOMING, tid) if failed else None
        if direction == INCOMING and (not failed or (err is not None and err.kind == "timeout")):
            return "KV transfer failed: the lease expired before the KV arrived"
        if err is None:
            return "KV transfer failed on another rank" if failed else "KV transfer failed: deadline passed"
        return f"KV transfer failed ({err.kind}{': ' + err.detail if err.detail else ''})"

    def _transfer_done(self, table: dict, direction: int, tid: int) -> TokenEvent:
        tr = table.pop(tid)
        seq, rid = tr.seq, tr.seq.request_id
        if direction == OUTGOING:
            stats = {
                "prefill_s": tr.forward_s,
                "transfer_s": time.monotonic() - tr.started,
                "kv_bytes": self._kv_bytes(seq),
            }
            self.executor.kv_release(direction, [tid])
            self.blocks.free(seq.block_table)
            seq.block_table = []
            self.requests.pop(rid, None)
            return TokenEvent(rid, seq.output_token_ids[0], True, "transferred", stats=stats)
        token = self.executor.driver.transfer.trailer_token(tid)
        self.executor.kv_release(direction, [tid])
        self.scheduler.remote_ready(rid, token)
        if seq.is_finished:
            self.requests.pop(rid, None)
        return TokenEvent(rid, token, seq.is_finished, seq.finish_reason)

    def _kv_bytes(self, seq: Sequence) -> int:
        """Bytes a transfer moves (every layer, every destination replica)."""
        from braid.kv_transfer import layout as kvl
        from braid.kv_transfer.planner import plan

        dest = seq.transfer[0]
        moves = plan(self.kv_layout, dest.layout, seq.num_prompt_tokens, seq.block_table, dest.block_ids)
        lay = self.kv_layout
        per_head_block = kvl.num_components(lay) * lay.block_size * lay.head_dim * kvl.element_size(lay)
        return sum(m.num_heads for m in moves) * per_head_block * lay.num_layers

    # -- steps ---------------------------------------------------------------
    @staticmethod
    def plan_for(batch: ScheduledBatch, transfers: tuple[TransferPlan, ...] = ()) -> StepPlan:
        seqs = []
        for seq in batch.seqs:
            if batch.is_prefill:
                seqs.append(SeqPlan(0, tuple(seq.token_ids), tuple(seq.block_table)))
            else:
                seqs.append(SeqPlan(len(seq) - 1, (seq.token_ids[-1],), tuple(seq.block_table)))
        return StepPlan(batch.is_prefill, tuple(seqs), transfers)

    def step(self) -> list[TokenEvent]:
        """One engine step; `ran_batch` tells afterwards whether the model ran
        (False when it only polled transfers, so a driver may back off)."""
        events = self._poll_transfers() if (self.incoming or self.outgoing) else []
        batch = self.scheduler.schedule()
        self.ran_batch = batch is not None
        if batch is None:
            return events
        transfers = self._transfer_plans(batch) if batch.is_prefill else ()
        t0 = time.monotonic()
        logits = self.executor.execute(self.plan_for(batch, transfers))
        forward_s = time.monotonic() - t0
        tokens = self.sampler(logits, [s.params for s in batch.seqs], [s.generator for s in batch.seqs])
        if transfers:
            self.executor.kv_finish([(t.transfer_id, tokens[t.seq_index]) for t in transfers])
        self.scheduler.postprocess(batch, tokens)
        now = time.monotonic()
        for seq, tok in zip(batch.seqs, tokens):
            transfer = getattr(seq, "transfer", None)
            if transfer is not None:
                dest, timeout_s = transfer
                self.outgoing[dest.transfer_id] = _Transfer(seq, now + timeout_s + 1.0, t0, forward_s)
                continue
            events.append(TokenEvent(seq.request_id, tok, seq.is_finished, seq.finish_reason))
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return events

    # -- diagnostics -----------------------------------------------------------
    def last_token_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill `prompts` as one batch and return the logits of each one's
        last position, [len(prompts), vocab] fp32. Needs an idle engine."""
        if self.has_unfinished():
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
