"""Attention ops returning `(out, lse)`, the exact LSE merge and the paged cache write.

In a request's life: every layer of every step on every rank writes the new
tokens' K/V into the paged cache (slot mapping from braid.engine.kv_layout),
then attends: causal varlen attention over the prompt on prefill (merged across
PCP ranks with the LSE), paged decode attention over this rank's KV shard
(merged across DCP ranks with the LSE).

`braid.kernels.reference` is the plain-torch ground truth; `braid.kernels.ops`
dispatches to the fastest tested implementation for a device.
"""
