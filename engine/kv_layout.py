"""Where each token's KV lives when the cache is sharded along tokens.

N shards, physical block size B, interleave size I (B % I == 0). The
scheduler hands out one block id per virtual block of B*N tokens and every
shard uses that id in its own pool. For token x:

    vb  = x // (B*N)                 virtual block (index into the block table)
    off = x % (B*N)
    shard = (off // I) % N           the only shard that stores x
    local = (off // (I*N)) * I + off % I   offset in that shard's physical block
    slot  = block_table[vb] * B + local

With I = B, global block g = x // B lives whole on shard g % N at local
block index g // N. Each shard's tokens are packed densely in token order, so
shard r holds exactly `local_len(L, r)` of the first L tokens, at local
positions 0..local_len-1 (paged by B), which is what its decode kernel reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ShardLayout:
    block_size: int
    num_shards: int = 1
    interleave: int | None = None

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_shards < 1:
            raise ValueError(f"number of KV shards must be >= 1, got {self.num_shards}")
        i = self.interleave_size
        if not 1 <= i <= self.block_size or self.block_size % i:
            raise ValueError(
                f"cp_kv_cache_interleave_size {i} must divide block_size {self.block_size} "
                f"(1 <= interleave <= block_size, block_size % interleave == 0)"
            )

    @property
    def interleave_size(self) -> int:
        return self.block_size if self.interleave is None else self.interleave

    @property
    def virtual_block_size(self) -> int:
        """Tokens covered by one block id of the scheduler."""
        return self.block_size * self.num_shards

    def num_virtual_blocks(self, num_tokens: int) -> int:
        vbs = self.virtual_block_size
        return (num_tokens + vbs - 1) // vbs

    def owner(self, x: int) -> tuple[int, int, int]:
        """(shard, virtual block, offset in the shard's physical block) of token x."""
        b, n, i = self.block_size, self.num_shards, self.interleave_size
        vb, off = divmod(x, b * n)
        return (off // i) % n, vb, (off // (i * n)) * i + off % i

    def local_len(self, length: int, shard: int) -> int:
        """How many of the first `length` tokens shard `shard` stores."""
        n, i = self.num_shards, self.interleave_size
        full, rem = divmod(length, n * i)
        return full * i + min(max(rem - shard * i, 0), i)

    def local_index(self, x: int) -> int:
        """Position of token x among its owner shard's tokens (dense, in token order)."""
        _, vb, local = self.owner(x)
        return vb * self.block_size + local

    def slot_mapping(
        self,
        positions: torch.Tensor,  # [T] token positions
        block_table_rows: torch.Tensor,  # [T, max_blocks] the block table of each token's sequence
        shard: int,
    ) -> torch.Tensor:
        """[T] int64 slots on `shard`, -1 for tokens another shard stores."""
        b, n, i = self.block_size, self.num_shards, self.interleave_size
        pos = positions.long()
        vb = pos // (b * n)
        off = pos % (b * n)
        owner = (off // i) % n
        local = (off // (i * n)) * i + off % i
        block = block_table_rows.long().gather(1, vb[:, None])[:, 0]
        slots = block * b + local
        return slots.masked_fill(owner != shard, -1)
