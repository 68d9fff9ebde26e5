"""Continuous batching on one instance, with chunked prefill and prefix caching.

A sequence's life: WAITING -> RUNNING (prefilled chunk by chunk, then one
token per step) -> FINISHED. Every step runs each running sequence that has
one token left to compute (its decode) and fills the rest of the token budget
(`max_num_batched_tokens`) with chunks of prompts: first those already being
prefilled, then newly admitted ones. A prompt longer than the budget is thus
prefilled over several steps while the running sequences keep decoding in
every one of them: no decode waits for more than one chunk. A step of decodes
only is a decode step (the fast path); anything else is a prefill step in
which a decode is a one-token chunk over its cached context.

Admission allocates KV for the whole prompt. With a prefix cache, the leading
full blocks the cache holds are reused (braid.engine.prefix_cache): the
sequence starts with those tokens computed, and a partly hit virtual block is
copied by the ranks at the start of the step (`copies`). Blocks are named in
the cache as soon as their KV is computed, decode tokens included.

When a step cannot get a block for a running sequence, the most recently
started sequence is preempted: its blocks are freed and it waits to be
prefilled again over all its tokens (recompute; its cached blocks make that
cheap). A remotely prefilled sequence holds reserved blocks in WAITING_FOR_KV
until its KV and first token arrive, then joins the running set.

Speculative decoding: after the chunks are chosen, each decoding sequence whose
request speculates gets up to k draft tokens from the proposer (k lowered to
share the step's draft budget, and to what the request may still emit) and KV
blocks for them if the pool has them free (drafts never preempt anyone). The
step then verifies last token + drafts (k+1 decode rows of the sequence, or a
chunk in a step with prompt chunks); `postprocess` appends the
1..k+1 tokens the target agreed with and frees the blocks that only held
rejected drafts (slots past the sequence in kept blocks are rewritten before
anything reads them: attention only reads positions below the sequence length).

Plain Python over ids and integers; no torch.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from braid.engine.block_manager import BlockManager
from braid.engine.config import SchedulerConfig, SpeculativeConfig
from braid.engine.prefix_cache import PrefixCache
from braid.engine.sequence import Sequence, SeqStatus
from braid.engine.spec_decode.stats import SpecStats
from braid.proto.prefix_hash import extend_hashes

Proposer = Callable[[list[Sequence], list[int]], list[list[int]]]
"""(sequences, k of each) -> at most k draft tokens to follow each one's tokens (speculative
decoding); each k >= 1 and each block table already covers len + k tokens."""


class RequestRejected(ValueError):
    """The request can never run on this engine (e.g. longer than max_model_len)."""


@dataclass(frozen=True)
class ScheduledBatch:
    is_prefill: bool
    seqs: tuple[Sequence, ...]
    num_new: tuple[int, ...] = ()
    """Tokens each sequence computes this step (from its num_cached_tokens); empty:
    all its uncomputed tokens (a whole prefill, or one decode token)."""
    copies: tuple[tuple[int, int], ...] = ()
    """(source, destination) virtual blocks the ranks copy before running the step."""
    drafts: tuple[tuple[int, ...], ...] = ()
    """Per sequence, the draft tokens its decode verifies this step after its last token
    (speculative decoding; their KV is written and rolled back unless accepted); empty: none."""

    def drafts_of(self, i: int) -> tuple[int, ...]:
        return self.drafts[i] if self.drafts else ()

    def new_tokens(self, i: int) -> int:
        if self.num_new:
            return self.num_new[i]
        seq = self.seqs[i]
        return len(seq) - seq.num_cached_tokens

    def completes(self, i: int) -> bool:
        """Whether sequence i's tokens are all computed after this step (it samples a token)."""
        seq = self.seqs[i]
        return seq.num_cached_tokens + self.new_tokens(i) >= len(seq)


class Scheduler:
    """Rank 0's choice of what the next step runs: the waiting queue, the
    running set and the sequences holding reserved blocks for remote KV.
    `schedule()` returns one ScheduledBatch; `postprocess()` advances the
    computed tokens, appends the sampled tokens of sequences that completed
    and retires finished ones, freeing their blocks. Never touches a tensor."""

    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, eos_token_ids: tuple[int, ...] = (),
                 prefix: PrefixCache | None = None, spec: SpeculativeConfig | None = None,
                 propose: Proposer | None = None):
        self.cfg = cfg
        self.spec = spec if spec is not None else SpeculativeConfig()
        self.propose = propose
        """Where drafts come from (None: no speculative decoding on this engine)."""
        self.spec_stats = SpecStats()
        self.propose_every_decode = False
        """A proposer that keeps state per step (MTP) is asked for every decode, k 0 included."""
        self.recompute_on_arrival = False
        """A sequence whose KV a prefill node sent recomputes its last prompt token with its
        first one (the MTP layer needs that token's hidden state, which did not travel)."""
        self.blocks = blocks
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefix = prefix
        if prefix is not None:
            blocks.cache = prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote: dict[str, Sequence] = {}  # WAITING_FOR_KV, by request id
        self.num_preemptions = 0
        self.num_chunks = 0
        """Prefill chunks that did not finish their prompt."""
        self._copies: list[tuple[int, int]] = []
        """(source, destination) blocks to copy at the start of the next step."""
        self._pinned: list[int] = []
        """Sources of those copies, held until the step ran."""

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

    # -- prefix cache ----------------------------------------------------------
    def hashes(self, seq: Sequence) -> list[int]:
        """The hash chain of the sequence's full blocks (extended as it grows)."""
        p = self.prefix
        return extend_hashes(seq.block_hashes, seq.token_ids, p.block_size, p.seed)

    def _allocate_with_hits(self, seq: Sequence, num_tokens: int, max_hit_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens, reusing cached leading blocks
        (at most `max_hit_tokens` tokens of them); False if the pool cannot."""
        p = self.prefix
        hit = None
        if p is not None and max_hit_tokens >= p.block_size:
            hit = p.match(self.hashes(seq), max_hit_tokens // p.block_size)
        held = list(hit.shared) if hit is not None else []
        if hit is not None and hit.copy_from is not None:
            held.append(hit.copy_from)  # pinned until the step has copied it
        for b in held:  # first: an idle cached block must not be evicted by the allocation below
            self.blocks.share(b)
        need = self.blocks.blocks_for(num_tokens) - (len(hit.shared) if hit is not None else 0)
        if not self.blocks.can_allocate(need):
            self.blocks.free(held)
            if hit is not None and hit.copy_from is not None:
                # the copy source's pin can take the very block a pool-filling prompt needs (and
                # nothing running would ever free one): recompute the partly hit group instead
                full_groups = hit.num_blocks // p.num_shards
                return self._allocate_with_hits(seq, num_tokens, full_groups * p.num_shards * p.block_size)
            return False
        fresh = self.blocks.allocate(need)
        if hit is None:
            seq.block_table = fresh
            seq.num_cached_tokens = 0
            return True
        seq.block_table = list(hit.shared) + fresh
        seq.num_cached_tokens = hit.num_blocks * p.block_size
        seq.num_prefix_hit_tokens = max(seq.num_prefix_hit_tokens, seq.num_cached_tokens)
        p.stats.queried_blocks += max_hit_tokens // p.block_size
        p.stats.hit_blocks += hit.num_blocks
        if hit.copy_from is not None:
            self._copies.append((hit.copy_from, fresh[0]))
            self._pinned.append(hit.copy_from)
            p.stats.copied_blocks += 1
        return True

    def take_copies(self) -> tuple[tuple[int, int], ...]:
        """The block copies the next step must run first (and forget them here)."""
        copies, self._copies = tuple(self._copies), []
        return copies

    def register(self, seq: Sequence) -> None:
        """Name in the cache every full block of `seq` whose KV is computed."""
        p = self.prefix
        if p is None or not seq.block_table:
            return
        hashes = self.hashes(seq)
        full = min(len(hashes), seq.num_cached_tokens // p.block_size)
        for g in range(seq.num_registered_blocks, full):
            p.insert(hashes[g], seq.block_table[g // p.num_shards])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def step_done(self) -> None:
        """The ranks ran the scheduled step (or will never run it): unpin its copy sources."""
        pinned, self._pinned = self._pinned, []
        if pinned:
            self.blocks.free(pinned)

    # -- remote prefill (blocks reserved for KV pushed by a prefill node) -----
    def reserve_remote(self, seq: Sequence) -> list[int]:
        """Allocate blocks for the prompt's KV (reusing cached leading blocks: those
        need not be sent); the sequence waits for the rest."""
        self.check(seq.num_prompt_tokens)
        if not self._allocate_with_hits(seq, seq.num_prompt_tokens + 1, seq.num_prompt_tokens - 1):
            need = self.blocks.blocks_for(seq.num_prompt_tokens + 1)
            raise RuntimeError(f"need {need} KV blocks, {self.blocks.num_free} free")
        seq.status = SeqStatus.WAITING_FOR_KV
        self.remote[seq.request_id] = seq
        return seq.block_table

    def remote_ready(self, request_id: str, first_token: int) -> Sequence:
        """The prompt's KV is in place and the first token sampled: start decoding."""
        seq = self.remote.pop(request_id)
        seq.num_cached_tokens = seq.num_prompt_tokens - (1 if self.recompute_on_arrival else 0)
        self.register(seq)
        seq.token_ids.append(first_token)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._check_finished(seq, first_token)
        if seq.is_finished:
            self._release(seq)
        return seq

    # -- scheduling ----------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        decodes = self._schedule_decode()
        # decode tokens do not count against the budget: it bounds the prompt tokens of a step
        chunks = self._schedule_chunks(self.cfg.max_num_batched_tokens)
        if not decodes and not chunks:
            return None
        drafts = self._drafts(decodes)  # after the chunks: drafts only take blocks left over
        if drafts:
            drafts += ((),) * len(chunks)
        seqs = tuple(decodes) + tuple(s for s, _ in chunks)
        num_new = (1,) * len(decodes) + tuple(n for _, n in chunks)
        return ScheduledBatch(bool(chunks), seqs, num_new, self.take_copies(), drafts)

    def _schedule_chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        """Prompt chunks for this step: sequences being prefilled first, then new ones."""
        out: list[tuple[Sequence, int]] = []
        for seq in self.running:
            left = len(seq) - seq.num_cached_tokens
            if left > 1 and budget > 0 and not self._whole_only(seq):
                n = min(left, budget)
                out.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            whole = self._whole_only(seq)
            if budget <= 0 or (whole and out and len(seq) > budget):
                break
            hit_limit = 0 if whole else len(seq) - 1  # the last token is always computed
            if not self._allocate_with_hits(seq, len(seq), hit_limit):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            left = len(seq) - seq.num_cached_tokens
            n = left if whole else min(left, budget)
            out.append((seq, n))
            budget -= n
        return out

    @staticmethod
    def _whole_only(seq: Sequence) -> bool:
        """Prompt logprobs need every prompt position's hidden state in one step."""
        return seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0

    def _schedule_decode(self) -> list[Sequence]:
        """Every running sequence with exactly one token to compute, with room for it."""
        batch: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if len(seq) - seq.num_cached_tokens != 1:
                i += 1
                continue
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

    # -- speculative decoding ----------------------------------------------------
    def spec_k(self, seq: Sequence) -> int:
        """Drafts `seq` may verify in its next decode: its request's k (or the engine's),
        never past the tokens it may still emit or the positions the model holds; 0 while
        its drafts have been rejected too often lately (SpecState: a paused step)."""
        p = seq.params
        k = p.num_speculative_tokens if p.num_speculative_tokens is not None else self.spec.num_speculative_tokens
        k = max(0, min(k, p.max_tokens - seq.num_output_tokens - 1, self.cfg.max_model_len - len(seq)))
        return k if k > 0 and seq.spec.should_speculate() else 0

    def _drafts(self, decodes: list[Sequence]) -> tuple[tuple[int, ...], ...]:
        """Each decoding sequence's drafts (() when none), with KV blocks for them; empty
        when no sequence speculates. The step's draft budget is shared evenly (a large
        batch lowers each k), and drafts never preempt: k is cut to the room the free
        blocks give. Blocks a shorter proposal does not need are freed at once."""
        if self.propose is None or not decodes:
            return ()
        share = self.spec.max_draft_tokens_per_step // len(decodes)
        ks = [self._room_for_drafts(seq, min(self.spec_k(seq), share)) for seq in decodes]
        idx = [i for i, k in enumerate(ks) if k > 0 or self.propose_every_decode]
        if not idx:
            return ()
        got = self.propose([decodes[i] for i in idx], [ks[i] for i in idx])
        out: list[tuple[int, ...]] = [()] * len(decodes)
        for i, drafts in zip(idx, got):
            out[i] = tuple(drafts[: ks[i]])
            self._trim_blocks(decodes[i], len(decodes[i]) + len(out[i]))
        return tuple(out) if any(out) else ()

    def _room_for_drafts(self, seq: Sequence, n: int) -> int:
        """Blocks for `n` drafts after `seq`'s tokens if the pool has them; how many fit."""
        if n <= 0:
            return 0
        need = self.blocks.blocks_for(len(seq) + n) - len(seq.block_table)
        if need <= 0:
            return n
        if self.blocks.can_allocate(need):
            seq.block_table += self.blocks.allocate(need)
            return n
        return max(0, len(seq.block_table) * self.blocks.tokens_per_block - len(seq))

    def _trim_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks of `seq` past those `num_tokens` tokens need."""
        keep = self.blocks.blocks_for(num_tokens)
        if len(seq.block_table) > keep:
            extra = seq.block_table[keep:]
            seq.block_table = seq.block_table[:keep]
            self.blocks.free(extra)

    def _accept(self, seq: Sequence, emitted: list[int], num_drafts: int) -> None:
        """A speculating decode's outcome: append the emitted tokens (the accepted drafts,
        then the target's token) up to a stop, keep the accepted drafts' KV and free the
        blocks that only held rejected drafts (their slots past the sequence are rewritten
        before anything reads them)."""
        st = self.spec_stats
        st.seq_steps += 1
        st.draft_tokens += num_drafts
        st.accepted_tokens += len(emitted) - 1
        seq.spec.record(num_drafts, len(emitted) - 1, self.spec.pause_below_acceptance)
        for tok in emitted:
            seq.token_ids.append(tok)
            st.emitted_tokens += 1
            self._check_finished(seq, tok)
            if seq.is_finished:
                return
        seq.num_cached_tokens = len(seq) - 1  # every token but the target's newest has its KV
        self._trim_blocks(seq, seq.num_cached_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_draft_cached = 0
        seq.num_registered_blocks = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- results -------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, tokens: list) -> list[Sequence]:
        """Advance each sequence by the tokens it computed; those that completed get
        their sampled token (`tokens[i]`; ignored for a chunk that did not), or, for a
        sequence that verified drafts, the list of tokens it emits. Returns the
        sequences that finished."""
        finished = []
        for i, (seq, tok) in enumerate(zip(batch.seqs, tokens)):
            if batch.drafts_of(i):
                self._accept(seq, list(tok), len(batch.drafts_of(i)))
                self.register(seq)
                if seq.is_finished:
                    self._release(seq)
                    finished.append(seq)
                continue
            done = batch.completes(i)
            seq.num_cached_tokens = min(len(seq), seq.num_cached_tokens + batch.new_tokens(i))
            self.register(seq)
            if not done:
                self.num_chunks += 1
                continue
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
