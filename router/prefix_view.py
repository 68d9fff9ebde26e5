"""The router's copy of what one node's prefix cache holds.

In a request's life: the node view's poller (braid.router.nodes) asks each node
for its load with what it already holds of that node's cache (`request_fields`),
applies the PrefixCacheDelta in the answer (`apply`), and the prefix_aware policy
(braid.router.policies) counts a prompt's leading blocks in the set
(`matched_blocks`), with hashes chained from the node's own seed and block size
(braid.proto.prefix_hash). The set lives with its node's entry, so it goes when
the node goes (or re-registers); a node that publishes nothing has no set.

Plain Python over integers and a protobuf message; no grpc.
"""
from __future__ import annotations

from collections.abc import Sequence


class PublishedPrefixes:
    """One node's published block hashes, as of its event `seq_no` of `generation`."""

    def __init__(self):
        self.generation = 0
        self.seq_no = 0
        self.seed = b""
        self.block_size = 0
        self.hashes: set[int] = set()
        self.truncated = False
        """The last snapshot did not carry every hash: the set may miss some the node holds."""
        self.resyncs = 0
        """Snapshots taken (the first one included)."""

    @property
    def synced(self) -> bool:
        """Whether a snapshot was taken (before that the set means nothing)."""
        return self.generation != 0 and self.block_size > 0

    def request_fields(self) -> dict:
        """LoadRequest fields telling the node what this copy holds."""
        return dict(cache_generation=self.generation, cache_seq_no=self.seq_no)

    def apply(self, delta) -> bool:
        """Apply a PrefixCacheDelta; False when it does not follow this copy (then the copy
        is emptied and asks from generation 0 next time, which the node answers with a
        snapshot)."""
        if delta.snapshot:
            self.generation, self.seq_no = delta.generation, delta.seq_no
            self.seed, self.block_size = bytes(delta.seed), delta.block_size
            self.hashes = set(delta.added)
            self.truncated = delta.truncated
            self.resyncs += 1
            return True
        follows = (self.synced and delta.generation == self.generation and delta.since_seq_no == self.seq_no
                   and bytes(delta.seed) == self.seed and delta.block_size == self.block_size)
        if not follows:
            self.reset()
            return False
        self.hashes.difference_update(delta.evicted)
        self.hashes.update(delta.added)
        self.seq_no = delta.seq_no
        return True

    def reset(self) -> None:
        self.generation, self.seq_no, self.block_size, self.seed = 0, 0, 0, b""
        self.hashes = set()
        self.truncated = False

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` (this node's chain for a prompt) it holds."""
        n = 0
        held = self.hashes
        while n < len(hashes) and hashes[n] in held:
            n += 1
        return n
