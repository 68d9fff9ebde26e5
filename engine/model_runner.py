"""Turns a StepPlan into this rank's model inputs and runs the model.

Each rank derives its own view of the step: its PCP share of the prefill
tokens (each chunk zigzag-split on its own), the slot of every new token on
its KV shard (-1 where another shard stores it), how many tokens of each
sequence's cached context its shard holds (decode, and prefill chunks after a
cached prefix or an earlier chunk).
A prefill sequence whose plan asks for prompt logprobs also gets the logits of
every prompt position (gathered back to prompt order under PCP, chunked).

With the MTP layer on (speculative.method "mtp", DeepSeek-V3), every step also
runs it over the step's tokens with the same metadata, writing its cache layer
(after the model's): the row of position i takes the final hidden state h_i and
the token after it in the plan (a chunk's last row takes the next chunk's first
token; a sequence's last row has none yet: its KV is rewritten by the next
proposal, see engine/spec_decode/mtp.py). The logits rows' hidden states stay
on every rank (`_stash`) until the next step: proposals chain the MTP layer
from them (`propose_mtp`).
"""
from __future__ import annotations

import torch

from braid.engine.graph_runner import DecodeGraphs
from braid.engine.kv_layout import ShardLayout
from braid.engine.layers.attention import AttentionMetadata, ContextMeta
from braid.engine.logprobs import prompt_logprobs
from braid.engine.pcp import split_prefill
from braid.engine.step_plan import SeqPlan, StepPlan
from braid.engine.parallel_state import ParallelState
from braid.kernels.reference import VarlenRows


class ModelRunner:
    def __init__(self, model: torch.nn.Module, par: ParallelState, layout: ShardLayout, mtp: bool = False,
                 graphs: DecodeGraphs | None = None):
        self.model = model
        self.graphs = graphs
        """Graph mode: the compiled decode graphs, which run the decode steps they cover."""
        self.par = par
        self.layout = layout
        self.device = par.device
        self.shard = par.topo.cp_rank
        self.mtp = mtp
        """Run the model's first MTP layer in every step (its attention bound to a cache layer)."""
        self._stash: torch.Tensor | None = None
        """MTP: the last step's logits rows' final hidden states [sum(num_logits), H]."""

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _block_tables(self, plan: StepPlan) -> torch.Tensor:
        width = max(1, max(len(s.block_table) for s in plan.seqs))
        rows = [list(s.block_table) + [0] * (width - len(s.block_table)) for s in plan.seqs]
        return self._tensor(rows)  # [S, max_blocks]

    def _slots(self, seq_of: list[int], positions: list[int], tables: torch.Tensor) -> torch.Tensor:
        """Slot of every new token (full order) on this rank's shard."""
        rows = tables[self._tensor(seq_of)]
        return self.layout.slot_mapping(self._tensor(positions), rows, self.shard)

    def prepare(self, plan: StepPlan):
        """-> (input_ids, positions, metadata, last-token selector, this rank's tokens: their
        index in plan order, None when it runs them all)."""
        tables = self._block_tables(plan)
        seq_of, positions = [], []  # of every new token, full order
        for i, s in enumerate(plan.seqs):
            seq_of += [i] * s.num_new
            positions += range(s.num_computed, s.end)
        slots = self._slots(seq_of, positions, tables)
        all_ids = [t for s in plan.seqs for t in s.token_ids]
        if not plan.is_prefill:
            # one query row per new token (a speculating sequence's k+1 share its block table):
            # row j of a sequence sees its first num_computed + j + 1 tokens, this shard's share
            # of them derived from that global length; every row's KV is written before any reads
            lens = [self.layout.local_len(p + 1, self.shard) for p in positions]
            if len(seq_of) != len(plan.seqs):
                tables = tables.index_select(0, self._tensor(seq_of))
            meta = AttentionMetadata(False, slots, block_tables=tables, local_seq_lens=self._tensor(lens))
            return self._tensor(all_ids), self._tensor(positions), meta, None, None
        lengths = [s.num_new for s in plan.seqs]
        pcp = self.par.pcp
        if pcp.size == 1:
            rows = VarlenRows.packed(lengths, lengths)
            last = torch.cumsum(self._tensor(lengths), 0) - 1
            meta = AttentionMetadata(True, slots, rows=rows, context=self._context(plan, tables, None))
            return self._tensor(all_ids), self._tensor(positions), meta, last, None
        split = split_prefill(lengths, pcp.size, pcp.rank_in_group)
        ids = [all_ids[i] for i in split.token_index]
        offset = [s.num_computed for s in plan.seqs for _ in range(s.num_new)]  # of each token, full order
        positions = [p + offset[i] for p, i in zip(split.positions, split.token_index)]
        q_start, q_len, k_start, k_len = zip(*split.rows) if split.rows else ((), (), (), ())
        meta = AttentionMetadata(
            True,
            slots,
            rows=VarlenRows(q_start, q_len, k_start, k_len),
            pcp_restore=self._tensor(split.restore),
            pcp_pad=split.pad,
            context=self._context(plan, tables, split.token_index),
        )
        return self._tensor(ids), self._tensor(positions), meta, split.last_local, split.token_index

    def _context(self, plan: StepPlan, tables: torch.Tensor, local_tokens: list[int] | None) -> ContextMeta | None:
        """What the new tokens need to attend to their cached context, when some have one."""
        if not any(s.num_computed for s in plan.seqs):
            return None
        local_lens = [self.layout.local_len(s.num_computed, self.shard) for s in plan.seqs]
        rows = VarlenRows.packed([s.num_new for s in plan.seqs], local_lens)
        index = None if local_tokens is None else self._tensor(local_tokens)
        return ContextMeta(tables, local_lens, rows, index)

    def last_hidden(self, hidden: torch.Tensor, last, num_seqs: int) -> torch.Tensor:
        """Hidden state of each sequence's last token, [S, hidden], on every rank."""
        if last is None:  # decode with one token per sequence (logit_hidden handles several)
            return hidden
        if isinstance(last, torch.Tensor):
            return hidden[last]
        # PCP: the rank holding a sequence's last token contributes it; others add zeros
        out = hidden.new_zeros(num_seqs, hidden.shape[-1])
        for s, idx in enumerate(last):
            if idx >= 0:
                out[s] = hidden[idx]
        return self.par.pcp.all_reduce(out)

    def prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor, meta: AttentionMetadata) -> dict[int, list]:
        """Sequence index -> prompt TokenLogprobs (on rank 0; {} elsewhere), for the
        sequences of a prefill plan that asked. Under PCP every rank holds only its
        zigzag share of the hidden states: they are all-gathered back to prompt order
        first, once for the step and only when some sequence asked."""
        wanted = [i for i, s in enumerate(plan.seqs) if s.prompt_logprobs >= 0]
        if not plan.is_prefill or not wanted:
            return {}
        full = meta.gather_new_tokens(hidden, self.par)  # [all new tokens, H] in plan order
        starts, total = [], 0
        for s in plan.seqs:
            starts.append(total)
            total += s.num_new
        keep = self.par.topo.rank == 0
        out = {}
        for i in wanted:
            s = plan.seqs[i]
            rows = full[starts[i] : starts[i] + s.num_new]
            out[i] = prompt_logprobs(rows, list(s.token_ids), s.prompt_logprobs, self.model.compute_logits, keep)
        return out if keep else {}

    def logit_hidden(self, plan: StepPlan, hidden: torch.Tensor, meta: AttentionMetadata, last) -> torch.Tensor:
        """Hidden states of the rows the plan wants logits for, [sum(num_logits), H]: each
        sequence's last token, or its last num_logits tokens (a speculative step's
        verification rows: under PCP gathered back to plan order first)."""
        if all(s.num_logits == 1 for s in plan.seqs):
            return self.last_hidden(hidden, last, len(plan.seqs))
        full = meta.gather_new_tokens(hidden, self.par)  # [all new tokens, H] in plan order
        index, end = [], 0
        for s in plan.seqs:
            end += s.num_new
            index += range(end - s.num_logits, end)
        return full.index_select(0, self._tensor(index))

    @torch.inference_mode()
    def run(self, plan: StepPlan, on_layer=None) -> tuple[torch.Tensor, dict[int, list]]:
        """(Logits [sum(num_logits), vocab] fp32: each sequence's last token's, or its last
        num_logits tokens' rows; the prompt logprobs the plan asked for). `on_layer(i)` is
        called once layer i's KV of this step is in the cache (prefill only)."""
        ids, positions, meta, last, local = self.prepare(plan)
        meta.on_layer_written = on_layer
        if self.graphs is not None and self.graphs.covers(plan):
            hidden = self.graphs.run(ids, positions, meta)
        else:
            hidden = self.model(ids, positions, meta)
        if self.mtp:
            self._mtp_rows(plan, positions, hidden, meta, local)
        rows = self.logit_hidden(plan, hidden, meta, last)
        if self.mtp:
            self._stash = rows
        return self.model.compute_logits(rows), self.prompt_logprobs(plan, hidden, meta)

    def _mtp_rows(self, plan: StepPlan, positions, hidden, meta, local) -> None:
        """The MTP layer over this step's tokens (see the module docstring): writes its
        cache layer; the outputs are not needed."""
        nxt = []
        for s in plan.seqs:
            nxt += s.token_ids[1:]
            nxt.append(max(s.next_token, 0))  # -1 (none yet): any token; the row is rewritten
        next_ids = self._tensor(nxt)
        if local is not None:
            next_ids = next_ids.index_select(0, self._tensor(local))
        self.model.mtp(positions, hidden, next_ids, meta)

    @torch.inference_mode()
    def propose_mtp(self, plan: StepPlan, rows: list[int], ks: list[int]) -> torch.Tensor:
        """Greedy MTP drafts, [S, max(1, max ks)] (-1 past a sequence's k; every rank the
        same: rank 0's choices are broadcast). Sequence i's plan is its position len-2 and
        newest token; its hidden state is the last step's logits row rows[i] (the row of
        its last accepted token). Draft j + 1 chains from draft j's row: the MTP layer's
        own output as the hidden state and draft j as the token, one position on; the
        KV those chained rows write is rewritten by the next step's MTP rows."""
        layer = self.model.mtp.layers[0]
        seqs = list(plan.seqs)
        width = max([1, *ks])
        out = torch.full((len(seqs), width), -1, dtype=torch.int64)
        active = list(range(len(seqs)))
        hidden = self._stash.index_select(0, self._tensor(rows))
        for j in range(width):
            ids, positions, meta, _, _ = self.prepare(StepPlan(False, tuple(seqs[i] for i in active)))
            h = layer.draft(positions, hidden, ids, meta)
            tok = layer.logits(h).argmax(dim=-1).to(torch.int64).cpu()
            self.par.world.broadcast(tok, 0)  # near-ties must not split the ranks' chains
            out[active, j] = tok
            keep = [n for n, i in enumerate(active) if ks[i] > j + 1]
            if not keep:
                break
            for n in keep:
                s = seqs[active[n]]
                seqs[active[n]] = SeqPlan(s.num_computed + 1, (int(tok[n]),), s.block_table)
            hidden = h.index_select(0, self._tensor(keep))
            active = [active[n] for n in keep]
        return out
