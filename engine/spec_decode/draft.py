"""Draft-model speculation: rank 0's half.

In a request's life: before a decode step, the scheduler asks for up to k drafts
for each speculating sequence. A smaller model with the target's vocabulary
(loaded on every rank with the target's TP/DCP/PCP layout: engine/worker.py,
CMD_DRAFT) proposes them greedily:

1. catch-up: one prefill-shaped pass over each sequence's tokens the draft's
   cache does not hold yet (the whole prompt the first time, on the decode node
   in P/D: the draft's KV never travels; afterwards the 1..k+1 tokens the last
   step emitted), at most `max_tokens_per_pass` tokens a step: a sequence still
   catching up (a long prompt) gets no drafts until it is done, so the node's
   other decodes never wait for a draft prefill; the last row is the first draft;
2. k-1 decode passes, one draft each, writing the draft's KV for the drafts.

The draft's cache shares the target's block ids and slot mapping, so the
sequence's block table (with blocks for k more tokens) serves both, sharded the
same way over the DCP ranks. Drafts the target rejects leave stale draft KV
past the sequence; the next catch-up rewrites those positions before any pass
reads them (the draft's cached length is set back to the sequence length at
each proposal, so accepted drafts are recomputed too: cheap, and it keeps one
rule). Greedy drafts are one-hot proposals: acceptance (engine/core.py) is then
exact for greedy and sampled requests alike.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

from braid.engine.sequence import Sequence
from braid.engine.step_plan import SeqPlan, StepPlan


class DraftProposer:
    def __init__(self, executor, max_tokens_per_pass: int):
        self.executor = executor
        self.max_tokens_per_pass = max(1, max_tokens_per_pass)

    def propose(self, seqs: Seq[Sequence], ks: Seq[int]) -> list[list[int]]:
        """Up to ks[i] greedy draft tokens for each sequence (each ks[i] >= 1; the block
        tables already cover len + ks[i] tokens); [] for a sequence whose draft cache is
        still catching up (one bounded pass a step: a long prompt never stalls the node)."""
        if not seqs:
            return []
        first = self._catch_up(seqs)
        drafts = [[t] if t >= 0 else [] for t in first]
        for step in range(1, max(ks)):
            active = [i for i, k in enumerate(ks) if k > step and drafts[i]]
            if not active:
                break
            plans = tuple(SeqPlan(len(seqs[i]) + step - 1, (drafts[i][-1],), tuple(seqs[i].block_table))
                          for i in active)
            logits = self.executor.draft(StepPlan(False, plans))
            for i, t in zip(active, logits.argmax(dim=-1).tolist()):
                drafts[i].append(int(t))
        return [d[:k] for d, k in zip(drafts, ks)]

    def _catch_up(self, seqs: Seq[Sequence]) -> list[int]:
        """One pass of at most max_tokens_per_pass tokens (at least one sequence's next
        token: every pass moves one forward) over the tokens the draft's cache lacks, in
        the sequences' order; the draft's next token after each sequence that is now
        caught up, -1 for the others."""
        room, rows, plans = self.max_tokens_per_pass, [], []
        for i, s in enumerate(seqs):
            left = len(s) - s.num_draft_cached
            if left <= 0 or (room <= 0 and plans):
                continue
            n = min(left, max(room, 1))
            start = s.num_draft_cached
            plans.append(SeqPlan(start, tuple(s.token_ids[start:start + n]), tuple(s.block_table)))
            rows.append(i)
            room -= n
        first = [-1] * len(seqs)
        if not plans:
            return first
        nxt = self.executor.draft(StepPlan(True, tuple(plans))).argmax(dim=-1).tolist()
        for j, i in enumerate(rows):
            s = seqs[i]
            s.num_draft_cached += plans[j].num_new
            if s.num_draft_cached == len(s):
                first[i] = int(nxt[j])
        return first
