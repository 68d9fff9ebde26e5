"""Block ids of the paged KV cache: allocation, reference counts, free/used counts.

Plain Python over integers. One block id covers `tokens_per_block` tokens:
the physical block size B on a single rank, the virtual block B * cp_size
when the cache is sharded along tokens (every shard uses the same id in its
own pool). With a prefix cache attached (braid.engine.prefix_cache), blocks
only the cache holds count as free: an allocation that needs them evicts the
least recently used.
"""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    """The instance's pool of KV block ids (the same ids on every rank; with
    PCP/DCP one id covers `tokens_per_block` = block_size x shards tokens, one
    block_size slice on each shard). Plain integers, no torch: the scheduler
    allocates a sequence's blocks as it grows and frees them when it ends or is
    preempted; the KV connector holds blocks while KV is in flight."""

    def __init__(self, num_blocks: int, tokens_per_block: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if tokens_per_block < 1:
            raise ValueError(f"tokens per block must be >= 1, got {tokens_per_block}")
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.cache = None
        """The PrefixCache naming some of these blocks, if caching is on."""

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and idle cached ones."""
        return len(self._free) + (self.cache.num_idle if self.cache is not None else 0)

    @property
    def num_unreferenced(self) -> int:
        """Blocks nobody holds, not even the cache."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def can_allocate(self, num: int) -> bool:
        return num <= self.num_free

    def allocate(self, num: int) -> list[int]:
        if num > self.num_free:
            raise OutOfBlocks(f"need {num} KV blocks, {self.num_free} free")
        while len(self._free) < num:  # room from the cache's idle blocks, least recently used first
            block = self.cache.evict()
            self._refs[block] = 0
            self._free.append(block)
        ids = [self._free.popleft() for _ in range(num)]
        for b in ids:
            self._refs[b] = 1
        return ids

    def share(self, block: int) -> None:
        """Take another reference to an allocated block."""
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self._refs[block] += 1
        if self._refs[block] == 2 and self.cache is not None and self.cache.holds(block):
            self.cache.busy(block)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block with none left is free again.
        Blocks are released last first: cached ones go idle tail first, so under
        LRU eviction a prefix outlives its continuations."""
        for b in reversed(blocks):
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
            elif self._refs[b] == 1 and self.cache is not None and self.cache.holds(b):
                self.cache.idle(b)

    def ref_count(self, block: int) -> int:
        return self._refs[block]
