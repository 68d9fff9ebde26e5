"""Graph mode: decode steps through a compiled model, one graph per padded batch size.

A decode step of S sequences (one new token each) is padded up to the next
size in `parallel.graph_batch_sizes` and run by `torch.compile`'s graph for
that size (inductor, static shapes: it fuses the small ops between the
matmuls, norms, rotary, activations, residuals, that eager runs one by one).
Every graph is compiled at start-up, on every rank in the same order (their
collectives meet), so serving never stops to compile; a step that would
recompile anyway (a bug) runs eagerly with a warning.

Inputs live in persistent buffers, one set per size, updated in place each
step (the same tensors every call, as a captured CUDA graph needs; a graph fed
a fresh metadata tensor it had baked in is how peers got wrong DCP results):
token ids, positions, slot mapping, this rank's sequence lengths (DCP: its
shard's share) and block tables `[size, W]`, W wide enough for max_model_len.
Padding rows write nothing (slot -1) and read nothing (length 0); their
outputs are dropped. Every op of the step is row-wise, so padding cannot
change a real row. The attention kernels, the collectives and the products
with oneDNN-packed weights are opaque custom ops in the graph
(braid.kernels.graph_ops) running the eager kernels, so one graph covers the
whole model and its numbers are eager's up to the fused elementwise ops.
"""
from __future__ import annotations

import logging
import time
import types
from dataclasses import dataclass

import torch

from braid.engine.layers.attention import AttentionMetadata
from braid.engine.step_plan import StepPlan

log = logging.getLogger(__name__)


@dataclass
class _Inputs:
    """One batch size's persistent inputs and the metadata object built on them."""

    ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata

    @classmethod
    def allocate(cls, size: int, width: int, device) -> "_Inputs":
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        meta = AttentionMetadata(False, torch.full((size,), -1, dtype=torch.int64, device=device),
                                 block_tables=zeros(size, width), local_seq_lens=zeros(size))
        return cls(zeros(size), zeros(size), meta)

    def fill(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        n, w = meta.block_tables.shape
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        mine = self.meta
        mine.slot_mapping.fill_(-1)
        mine.slot_mapping[:n].copy_(meta.slot_mapping)
        mine.local_seq_lens.zero_()
        mine.local_seq_lens[:n].copy_(meta.local_seq_lens)
        mine.block_tables[:n, :w].copy_(meta.block_tables)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, sizes: tuple[int, ...], table_width: int, device):
        self.sizes = tuple(sorted(sizes))
        self.width = table_width
        self._inputs = {n: _Inputs.allocate(n, table_width, device) for n in self.sizes}
        self.model = model
        # one cache of graphs per engine (dynamo keys it on the code object; a shared one
        # would pile up every engine's graphs in a process and hit the recompile limit)
        limit = torch._dynamo.config
        limit.recompile_limit = max(limit.recompile_limit, len(self.sizes) + 1)
        self._graph = torch.compile(_own_function(model), dynamic=False)
        self.steps = {n: 0 for n in self.sizes}
        """Decode steps each graph ran (warm-up not counted)."""

    def covers(self, plan: StepPlan) -> bool:
        """A decode step graph mode runs: one token and one logits row per sequence,
        no more sequences than the largest size, block tables within the width."""
        return (not plan.is_prefill and len(plan.seqs) <= self.sizes[-1]
                and all(s.num_new == 1 and s.num_logits == 1 and len(s.block_table) <= self.width
                        for s in plan.seqs))

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's hidden states [S, H] for the step `prepare` described."""
        n = ids.shape[0]
        size = next(size for size in self.sizes if size >= n)
        inputs = self._inputs[size]
        inputs.fill(ids, positions, meta)
        self.steps[size] += 1
        try:
            with torch.compiler.set_stance("fail_on_recompile"):  # never compile while serving
                return self._graph(inputs.ids, inputs.positions, inputs.meta)[:n]
        except torch._dynamo.exc.RecompileError as e:  # a bug; the step still runs, eagerly
            self.steps[size] -= 1
            log.warning("graph mode: batch %d would recompile (%s); this step runs eagerly", size, e)
            return self.model(ids, positions, meta)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile every size (all padding: nothing written, nothing read)."""
        for n in self.sizes:
            t0 = time.perf_counter()
            inputs = self._inputs[n]
            self._graph(inputs.ids, inputs.positions, inputs.meta)
            log.info("graph mode: batch %d compiled in %.1f s", n, time.perf_counter() - t0)


def _own_function(model: torch.nn.Module):
    """`model(ids, positions, meta)` as a function with a code object of its own."""
    def forward(ids, positions, meta):
        return model(ids, positions, meta)

    code = forward.__code__.replace(co_name=f"braid_decode_graph_{id(model):x}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)
