"""MTP speculation (DeepSeek-V3's multi-token-prediction layer): rank 0's half.

In a request's life: the MTP layer's KV is built as the target runs. Every step
runs the layer over the step's tokens (engine/model_runner.py: the row of
position i takes the target's final hidden state h_i and token i+1), so a prompt's
MTP KV is written by its own prefill (on the prefill node in P/D, under PCP; its
cache layer travels with the target's layers). A row whose next token is not
known yet (a sequence's newest) is written again by the next proposal:

    proposal before step N (sequence of L tokens, KV cached for L-1):
        row L-2 <- (h_{L-2}: the last step's logits row of its last accepted token,
                    token L-1, its newest)  -> draft 1
        row L-1 <- (that row's own output, draft 1)  -> draft 2, ... (chained, k rows)
    step N verifies token L-1 + drafts; its MTP rows over them are right up to the
    last accepted draft, and the next proposal rewrites the row after.

So before each proposal the MTP cache holds positions 0..L-3 from real hidden
states, and every sequence is proposed for in every decode step (its k may be 0:
the first row only), since a skipped row could not be written later (its h is
gone). On a P/D decode node the prefill node's h_{P-1} is not here: the sequence's
first step recomputes its last prompt token with its first token (a 2-token chunk,
`Scheduler.recompute_on_arrival`) and the proposals go on from there.

Caveat: the MTP row of a block's last position depends on the token after the
block. A prefix-cache hit that ends at a block boundary (or a shared block a
sequence continues differently) keeps the row its first writer computed; drafts
may then be a little worse, never the output: verification keeps it exact.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from braid.engine.sequence import Sequence
from braid.engine.step_plan import SeqPlan, StepPlan


def encode_mtp_request(plan: StepPlan, rows: Seq[int], ks: Seq[int]) -> torch.Tensor:
    """[1 + 2*S + plan] int64: S, each sequence's logits row, each one's k, then the plan."""
    head = [len(rows), *rows, *ks]
    return torch.cat([torch.tensor(head, dtype=torch.int64), plan.to_tensor()])


def decode_mtp_request(t: torch.Tensor) -> tuple[StepPlan, list[int], list[int]]:
    n = int(t[0])
    head = t[: 1 + 2 * n].tolist()
    return StepPlan.from_tensor(t[1 + 2 * n:]), head[1 : 1 + n], head[1 + n :]


class MTPProposer:
    """Knows which logits row of the last step holds each sequence's hidden state and
    asks the ranks for drafts (worker CMD_MTP)."""

    def __init__(self, executor):
        self.executor = executor
        self.step = 0
        """Steps that ran the model so far (a row is valid for the step after its own only)."""

    def note_step(self, seqs: Seq[Sequence], starts: Seq[int], emitted: dict[int, list[int]]) -> None:
        """After a step: sequence i's hidden state for its next proposal is its row of its
        last kept token (the last accepted draft's, or its only row)."""
        self.step += 1
        for i, toks in emitted.items():
            seqs[i].mtp_row = (self.step, starts[i] + len(toks) - 1)

    def ready(self, seq: Sequence) -> bool:
        return seq.mtp_row[0] == self.step and len(seq) >= 2

    def propose(self, seqs: Seq[Sequence], ks: Seq[int]) -> list[list[int]]:
        """Up to ks[i] drafts for each sequence (k 0: the MTP row only); [] for one whose
        row is not from the last step (it cannot be: see the module docstring)."""
        idx = [i for i, s in enumerate(seqs) if self.ready(s)]
        out: list[list[int]] = [[] for _ in seqs]
        if not idx:
            return out
        plans = tuple(SeqPlan(len(seqs[i]) - 2, (seqs[i].token_ids[-1],), tuple(seqs[i].block_table)) for i in idx)
        rows = [seqs[i].mtp_row[1] for i in idx]
        got = self.executor.mtp(encode_mtp_request(StepPlan(False, plans), rows, [ks[i] for i in idx]))
        for n, i in enumerate(idx):
            out[i] = [int(t) for t in got[n, : ks[i]].tolist()]
        return out
