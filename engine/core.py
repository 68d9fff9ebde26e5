"""The engine loop on rank 0 (EngineCore): admit requests, schedule, run a step
on every rank, sample, and report what each request produced.

    batch  = scheduler.schedule()
    meta   = kv.build_meta(...)             # the KV connector's orders for the ranks
    result = executor.execute(plan of batch + meta)   # prefill steps push KV layer by layer
    tokens = sampler(result.logits)         # + the sampled tokens' logprobs, for requests that asked
    done   = scheduler.postprocess(batch, tokens)   # a speculating decode keeps 1..k+1 tokens
    kv.on_step_done(meta, result)           # transfers that arrived, were delivered or failed

KV transfer has two halves (braid.engine.kv_connector): the scheduler half
(`self.kv`, KVConnectorScheduler) keeps reservations, leases and sends; the
worker half runs in every rank. They meet only in the step: a step with no
sequences and only connector metadata runs while transfers are in flight and
nothing else does, and to flush a reservation or a release at once.

Errors: only a dead rank (RankFailure) ends the engine. A row that cannot be
sampled, or any other error raised while serving a step's batch, ends those
requests alone with an error TokenEvent (their blocks freed); the engine goes on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time

import torch

from braid.engine.block_manager import BlockManager
from braid.engine.config import EngineConfig, resolve
from braid.engine.executor import Executor, RankFailure
from braid.engine.events import DuplicateRequest, Overloaded, TokenEvent, UnknownRequest
from braid.engine.kv_connector.metadata import KVConnectorMeta
from braid.engine.kv_connector.scheduler import KVConnectorScheduler
from braid.engine.kv_connector.types import Reservation, TransferTarget, check_target
from braid.engine.kv_connector.watch import TransferWatch
from braid.engine.logprobs import sampled_logprobs
from braid.engine.prefix_cache import PrefixCache
from braid.proto.prefix_hash import cache_seed
from braid.engine.sampling import Sampler, SamplingParams
from braid.engine.scheduler import RequestRejected, ScheduledBatch, Scheduler
from braid.engine.sequence import Sequence
from braid.engine.spec_decode.acceptance import greedy_accept
from braid.engine.spec_decode.draft import DraftProposer
from braid.engine.spec_decode.mtp import MTPProposer
from braid.engine.spec_decode.ngram import propose_ngram
from braid.engine.step_plan import SeqPlan, StepPlan, StepResult
from braid.tokenizer import Tokenizer

__all__ = ["EngineCore", "Overloaded", "TokenEvent", "UnknownRequest"]

log = logging.getLogger(__name__)


class EngineCore:
    """One instance's engine, driven from one thread: requests in, TokenEvents
    out of `step()`. Owns the scheduler, the block manager, the sampler, the
    executor (every rank) and the KV connector's scheduler half."""

    def __init__(self, cfg: EngineConfig):
        self.config, self.model_config = resolve(cfg)
        cfg = self.config
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(cfg.model_path)
        except FileNotFoundError:
            self.tokenizer = None
        self.blocks = BlockManager(cfg.cache.num_kv_blocks, cfg.layout.virtual_block_size)
        self.prefix_cache = make_prefix_cache(cfg, self.model_config, self.blocks)
        self.scheduler = Scheduler(
            cfg.scheduler,
            self.blocks,
            self.model_config.eos_token_ids,
            self.prefix_cache,
            cfg.speculative,
            self._propose,
        )
        self.sampler = Sampler(cfg.seed)
        self.executor = Executor(cfg)
        self.draft = (DraftProposer(self.executor, cfg.scheduler.max_num_batched_tokens)
                      if cfg.speculative.method == "draft" else None)
        self.mtp = MTPProposer(self.executor) if cfg.speculative.method == "mtp" else None
        if self.mtp is not None:
            self.scheduler.propose_every_decode = self.scheduler.recompute_on_arrival = True
        self.requests: dict[str, Sequence] = {}
        self.kv = KVConnectorScheduler(self.scheduler, self.blocks, cfg.transfer.max_lease_s, cfg.transfer.max_reservations)
        self.ran_batch = False
        """Whether the last step ran the model (a driver steps again at once if so)."""
        self._ids = itertools.count()
        self._watch = TransferWatch()

    @property
    def kv_layout(self):
        """This instance's KVLayout descriptor (with receiver endpoints on decode)."""
        return self.executor.kv_layout

    @property
    def graph_steps(self) -> int:
        """Decode steps run through a compiled graph (parallel.graph_mode) since start."""
        graphs = self.executor.driver.runner.graphs
        return sum(graphs.steps.values()) if graphs is not None else 0

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
            raise DuplicateRequest(f"request id {request_id!r} is already in use")
        if params.speculative_method == "draft" and self.draft is None:
            raise RequestRejected("speculative_method 'draft': this engine has no draft model "
                                  "(speculative.method draft with a draft_model)")
        if params.speculative_method == "mtp" and self.mtp is None:
            raise RequestRejected("speculative_method 'mtp': this engine does not run an MTP layer "
                                  "(speculative.method mtp, on a checkpoint that has one)")
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
        if self.kv.abort(request_id):
            self._flush()  # carries the release to every rank; then the blocks are freed
        else:
            self.scheduler.abort(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.kv.has_work()

    def next_step_in(self, backoff_s: float) -> float | None:
        """How long a driver may wait (for new calls) before the next step is worth
        running: 0 now, `backoff_s` while only transfers or blocked requests wait,
        the time to the next lease's end, or None when there is nothing to do."""
        if self.ran_batch or self.kv.has_queued():
            return 0.0
        if self.scheduler.waiting or self.scheduler.running or self.kv.in_flight():
            return backoff_s
        deadline = self.kv.next_deadline()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    # -- KV transfer: decode side ----------------------------------------------
    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams, lease_s: float) -> Reservation:
        """Blocks for the prompt's KV, held for `lease_s`. When this returns every
        rank expects the bytes; the request waits for its KV and for `claim`."""
        if self.config.transfer.role not in ("decode", "both"):
            raise RuntimeError("this engine does not receive KV (kv_role is not decode)")
        seq = self.new_sequence(prompt, params, request_id)
        self.scheduler.check(seq.num_prompt_tokens)
        need = self.blocks.blocks_for(seq.num_prompt_tokens + 1)
        if not self.blocks.can_allocate(need):
            raise Overloaded(f"need {need} KV blocks for {seq.num_prompt_tokens} tokens, {self.blocks.num_free} free")
        reservation = self.kv.reserve(seq, lease_s, time.monotonic())
        try:
            self._flush()  # the step's collective is the barrier: every rank expects before anyone sends
        except BaseException:
            self.kv.discard(request_id)
            raise
        self.requests[request_id] = seq
        return reservation

    def claim(self, request_id: str) -> None:
        """A Decode stream takes the reservation: its KV (once arrived) starts decoding.
        UnknownRequest if there is no unclaimed reservation of that id."""
        self.kv.claim(request_id)

    # -- KV transfer: prefill side ---------------------------------------------
    def add_transfer_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                             target: TransferTarget, timeout_s: float) -> Sequence:
        """Prefill `prompt` and push its KV into `target`, within `timeout_s`."""
        from braid.kv_transfer.layout import check_compatible

        if self.config.transfer.role not in ("prefill", "both"):
            raise RuntimeError("this engine does not send KV (kv_role is not prefill)")
        check_compatible(self.kv_layout, target.layout)
        seq = self.new_sequence(prompt, dataclasses.replace(params, max_tokens=1), request_id)
        if target.num_tokens != seq.num_prompt_tokens:
            raise RequestRejected(
                f"destination expects {target.num_tokens} tokens, the prompt has {seq.num_prompt_tokens}"
            )
        check_target(target, self.kv_layout, self.config.transfer.transport, seq.num_prompt_tokens)  # before any rank sees it
        seq.transfer = (target, timeout_s)
        seq.holds_kv = True  # the scheduler must not free its blocks when it finishes
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        return seq

    # -- steps ---------------------------------------------------------------
    @staticmethod
    def plan_for(batch: ScheduledBatch | None, kv: KVConnectorMeta = KVConnectorMeta(),
                 copies: tuple[tuple[int, int], ...] = ()) -> StepPlan:
        seqs = []
        for i, seq in enumerate(batch.seqs if batch is not None else ()):
            start = seq.num_cached_tokens
            new = tuple(seq.token_ids[start : start + batch.new_tokens(i)])
            # prompt logprobs once, over the whole prompt (never a chunk or a cache hit: the
            # scheduler runs such a prompt whole), not again on a recompute after preemption
            plp = seq.params.prompt_logprobs
            whole = batch.is_prefill and start == 0 and seq.num_output_tokens == 0 and len(new) == len(seq)
            drafts = batch.drafts_of(i)  # verified after the last token: one logits row each, plus its own
            end = start + len(new)
            nxt = seq.token_ids[end] if end < len(seq) else -1  # a chunk that is not the last: the next chunk's first
            seqs.append(SeqPlan(start, new + drafts, tuple(seq.block_table), plp if plp is not None and whole else -1,
                                1 + len(drafts), nxt))
        copies = batch.copies if batch is not None else copies
        # a decode with drafts stays a decode step: one paged-decode query row per token
        return StepPlan(batch is not None and batch.is_prefill, tuple(seqs), kv, copies)

    def step(self) -> list[TokenEvent]:
        """One engine step; `ran_batch` tells afterwards whether the model ran
        (False when it only moved transfers along, so a driver may back off)."""
        events = self.kv.take_events()  # made between steps (a claim, a flush): they come first
        batch = self.scheduler.schedule()
        self.ran_batch = batch is not None
        if not self._watch.step_due(batch, self.scheduler, self.kv, self.executor.driver.connector):
            return events
        try:
            events += self._run_step(batch)
        except Exception as e:
            # a rank that died (or a step the ranks cannot agree on any more) ends the
            # engine; anything else raised while serving this batch ends its requests only
            if isinstance(e, RankFailure) or self.fatal_error() is not None:
                raise
            seqs = batch.seqs if batch is not None else ()
            log.exception("engine step failed; failing its %d request(s) only", len(seqs))
            why = f"engine step failed: {type(e).__name__}: {e}"
            events += [self._fail_seq(seq, why) for seq in seqs]
        events += self.kv.take_events()
        for ev in events:
            if ev.finished:
                self.requests.pop(ev.request_id, None)
        return events

    def _flush(self) -> None:
        """A connector-only step now, so that what is queued reaches every rank."""
        self._run_step(None)

    def _run_step(self, batch: ScheduledBatch | None) -> list[TokenEvent]:
        """Run `batch` (or no sequences) with the connector's metadata; the model's events."""
        sends = self.kv.sends_for(batch) if batch is not None and batch.is_prefill else ()
        meta = self.kv.build_meta(time.monotonic(), sends)
        copies = self.scheduler.take_copies() if batch is None else ()
        if batch is None and meta.is_empty and not copies:
            return []
        t0 = time.monotonic()
        self._watch.ran(t0)
        try:
            result = self.executor.execute(self.plan_for(batch, meta, copies))
        finally:  # the copies ran (or never will): their sources may go
            self.scheduler.step_done()
        try:
            events = self._postprocess(batch, meta, result, t0) if batch is not None else []
        finally:  # the ranks ran this step: its transfer progress is taken in whatever happened
            self.kv.on_step_done(meta, result, time.monotonic())
        return events

    def _postprocess(self, batch: ScheduledBatch, meta: KVConnectorMeta, result: StepResult, t0: float) -> list[TokenEvent]:
        """Sample, advance the sequences, book the sends; a row that could not be
        sampled ends its own request with an error event, the others go on."""
        forward_s = time.monotonic() - t0
        seqs = batch.seqs
        starts = _row_starts(batch)
        tokens, failed = self._sample(batch, result.logits, starts)
        ok = [i for i in range(len(seqs)) if i not in failed]
        sampled = [i for i in ok if batch.completes(i)]  # a prompt chunk that did not finish samples nothing
        emitted = {i: list(tokens[i]) if batch.drafts_of(i) else [tokens[i]] for i in sampled}
        if self.mtp is not None:
            self.mtp.note_step(seqs, starts, emitted)
        lps = sampled_logprobs(result.logits, seqs, emitted, starts)
        plps = result.prompt_logprobs
        before = {i: seqs[i].num_output_tokens for i in sampled}
        kept = ScheduledBatch(batch.is_prefill, tuple(seqs[i] for i in ok), tuple(batch.new_tokens(i) for i in ok),
                              drafts=tuple(batch.drafts_of(i) for i in ok) if batch.drafts else ())
        self.scheduler.postprocess(kept, [tokens[i] for i in ok])
        now = time.monotonic()
        for send in meta.sends:
            if send.seq_index not in failed:
                seq = seqs[send.seq_index]
                seq.first_logprobs, seq.prompt_logprobs = lps.get(send.seq_index, [None])[0], plps.get(send.seq_index)
                self.kv.sent(seq, tokens[send.seq_index], t0, forward_s, result.kv_bytes.get(send.transfer_id, 0), now)
        events = []
        for i, why in failed.items():
            log.warning("request %s failed: %s", seqs[i].request_id, why)
            events.append(self._fail_seq(seqs[i], why))
        for i in sampled:
            seq = seqs[i]
            if seq.transfer is not None:
                continue
            n = seq.num_output_tokens - before[i]  # emitted tokens kept (a stop cuts the rest)
            for j in range(n):
                last = j == n - 1
                events.append(TokenEvent(
                    seq.request_id, emitted[i][j], last and seq.is_finished, seq.finish_reason if last else None,
                    logprobs=lps[i][j] if i in lps else None, prompt_logprobs=plps.get(i) if j == 0 else None,
                    cached_tokens=seq.num_prefix_hit_tokens))
        return events

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor, starts: list[int]) -> tuple[list, dict[int, str]]:
        """For each sequence that completes: its token, or (it verified drafts) the list
        of tokens it emits; -1 for the others (a chunk samples nothing and draws nothing
        from a seeded generator). {sequence: why} for those whose rows failed.

        Every row is sampled as a plain decode at its output index would be (its own
        seeded generator: see draw_seed); drafts are kept while they equal the row's
        token. For greedy rows that is greedy acceptance, for sampled rows the draft-free
        rejection rule (acceptance.rejection_sample with draft_probs=None): the output
        has the target's distribution exactly, and a seeded request emits the very
        tokens it would without speculation."""
        seqs = batch.seqs
        tokens: list = [-1] * len(seqs)
        rows, params, gens, owner = [], [], [], []
        for i, seq in enumerate(seqs):
            if batch.completes(i):
                for j in range(1 + len(batch.drafts_of(i))):
                    rows.append(starts[i] + j)
                    params.append(seq.params)
                    gens.append(_generator(seq, j))
                    owner.append(i)
        if not rows:
            return tokens, {}
        picked = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=logits.device)]
        try:
            got, bad = self.sampler.sample(picked, params, gens)
        except Exception as e:  # noqa: BLE001 - a sampler bug fails this step's requests, not the engine
            why = f"sampling failed: {type(e).__name__}: {e}"
            return tokens, {i: why for i in owner}
        by_seq: dict[int, list[int]] = {}
        for r, i in enumerate(owner):
            by_seq.setdefault(i, []).append(got[r])
        for i, row_tokens in by_seq.items():
            drafts = batch.drafts_of(i)
            tokens[i] = greedy_accept(row_tokens, drafts).tokens if drafts else row_tokens[0]
        return tokens, {owner[r]: why for r, why in bad.items()}

    def _propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Up to ks[i] draft tokens for each sequence (the scheduler asks before each
        decode), from each request's method; an MTP sequence is proposed for with k 0 too
        (its MTP row must be written every step: spec_decode/mtp.py). A proposer that
        fails (short of a dead rank) costs the step its drafts, not the requests."""
        t0 = time.perf_counter()
        spec = self.config.speculative
        out: list[list[int]] = [[] for _ in seqs]
        groups: dict[str, list[int]] = {"ngram": [], "draft": [], "mtp": []}
        for i, s in enumerate(seqs):
            method = s.params.speculative_method or spec.method
            if ks[i] > 0 or (method == "mtp" and self._speculates(s)):
                groups[method].append(i)
        for i in groups["ngram"]:
            out[i] = propose_ngram(seqs[i].token_ids, ks[i], min_n=spec.ngram_min, max_n=spec.ngram_max)
        for name, proposer in (("draft", self.draft), ("mtp", self.mtp)):
            idx = groups[name]
            if idx:
                for i, d in zip(idx, self._drafts_from(name, proposer, [seqs[i] for i in idx], [ks[i] for i in idx])):
                    out[i] = d
        self.scheduler.spec_stats.draft_s += time.perf_counter() - t0
        return out

    def _speculates(self, seq: Sequence) -> bool:
        """Whether `seq`'s request speculates at all (its k, or the engine's, is not 0)."""
        k = seq.params.num_speculative_tokens
        return (k if k is not None else self.config.speculative.num_speculative_tokens) > 0

    def _drafts_from(self, name: str, proposer, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        try:
            return proposer.propose(seqs, ks)
        except Exception as e:  # noqa: BLE001 - only a dead rank may end the engine
            if isinstance(e, RankFailure) or self.fatal_error() is not None:
                raise
            log.exception("%s proposer failed; this step verifies none of its drafts", name)
            for seq in seqs:
                seq.num_draft_cached = 0  # what a draft model wrote is unknown: catch up again
            return [[] for _ in seqs]

    def _fail_seq(self, seq: Sequence, why: str) -> TokenEvent:
        """End one request of a step alone, with an error event. Its blocks are freed
        now, or (a prefill whose KV the ranks started sending) once every rank has
        dropped that send: the send is booked and released at the next step."""
        self.scheduler.abort(seq.request_id)  # never frees blocks that are being sent
        if seq.transfer is not None and not self.kv.abort(seq.request_id):
            now = time.monotonic()
            self.kv.sent(seq, 0, now, 0.0, 0, now)
            self.kv.abort(seq.request_id)
        return TokenEvent(seq.request_id, None, True, "error", why)

    def fatal_error(self) -> BaseException | None:
        """Why this engine cannot step any more (a rank died or a collective failed),
        or None. Only this kind of error may end the engine; see `step`."""
        ex = self.executor
        if ex.failure is not None:
            return ex.failure
        return RankFailure(0, "the instance's ranks failed") if getattr(ex, "_dead", False) else None

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
            return self.executor.execute(plan).logits
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


def _row_starts(batch: ScheduledBatch) -> list[int]:
    """Each sequence's first logits row: a sequence that verifies k drafts has k+1 rows."""
    starts, row = [], 0
    for i in range(len(batch.seqs)):
        starts.append(row)
        row += 1 + len(batch.drafts_of(i))
    return starts


def _generator(seq: Sequence, j: int) -> torch.Generator | None:
    """The generator for `seq`'s output token num_output_tokens + j (None: unseeded):
    seeded with (seed, that index) alone, whichever step the token falls in."""
    if seq.generator is None:
        return None
    seed = draw_seed(seq.params.seed, seq.num_output_tokens + j)
    if j == 0:
        return seq.generator.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def draw_seed(seed: int, index: int) -> int:
    """The generator seed of a seeded request's output token `index`. Each token's draw
    depends on the request's seed and the token's index only, not on the draws before
    it: the same seed gives the same tokens whether the first one was sampled on a
    prefill node or on the decode node (a prompt its prefix cache holds), after a
    preemption, or beside other requests."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_prefix_cache(cfg: EngineConfig, model_config, blocks: BlockManager) -> PrefixCache | None:
    """The instance's prefix cache (None when switched off). Its hash chain is seeded
    with what else decides a block's KV: the model's configuration, the cache dtype
    and the block size."""
    if not cfg.cache.enable_prefix_caching:
        return None
    seed = cache_seed(repr(model_config), cfg.dtype, cfg.cache.block_size)
    return PrefixCache(blocks, cfg.cache.block_size, cfg.layout.num_shards, seed)
