"""Automatic prefix caching: full KV blocks kept after their request ends,
found again by the hash chain of their tokens (braid.proto.prefix_hash).

Granularity. The scheduler's block ids are virtual blocks of B*N tokens (N KV
shards, B the physical block size), but a cache hit is counted in blocks of B
tokens whatever N is: a prompt sharing k*B leading tokens with a cached one
reuses those k blocks. Global block g (tokens [g*B, (g+1)*B)) lies in virtual
block g // N. The index maps the hash of block g to a virtual block id whose
KV is valid for blocks g - g % N .. g (the request that wrote g had the earlier
blocks of that group in the same virtual block). A hit of k blocks then:
  - shares (one more reference) the virtual block of every group fully hit:
    the id named by the group's last block;
  - copies the partly hit tail group (k % N blocks) from the virtual block named
    by block k-1 into a fresh one, on every rank, before the step that writes
    the rest of it: two requests never write one virtual block.

Lifetime. The cache holds one reference on each virtual block its index names.
A block only the cache holds is idle and evictable; blocks are evicted least
recently used (a request's blocks go idle tail first, so a prefix outlives its
continuations) and only when an allocation needs room. Evicting a virtual block
drops every hash naming it. Every add and evict is an event with a sequence
number, for the router's view of what this node holds.

Plain Python over ids and integers; no torch.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

MAX_EVENTS = 1 << 16
"""Add/evict events kept for readers that poll with `events_since`; an older reader gets a snapshot."""


@dataclass
class CacheStats:
    queried_blocks: int = 0
    """Full prompt blocks looked up (hits are counted against these)."""
    hit_blocks: int = 0
    evicted_blocks: int = 0
    """Virtual blocks evicted to make room."""
    copied_blocks: int = 0
    """Partly hit virtual blocks copied (copy on write)."""


@dataclass(frozen=True)
class PrefixHit:
    """What a sequence reuses: `num_blocks` blocks of B tokens."""

    num_blocks: int
    shared: tuple[int, ...] = ()
    """Virtual block ids of the fully hit groups, in order."""
    copy_from: int | None = None
    """Virtual block to copy the partly hit tail group from."""


@dataclass
class PrefixCache:
    """The index (block hash -> virtual block id) and the idle LRU. `blocks` is the
    BlockManager whose ids it names; the BlockManager calls `idle`, `busy` and
    `evict` as references come and go."""

    blocks: object
    block_size: int
    num_shards: int
    seed: bytes
    index: dict[int, int] = field(default_factory=dict)
    names: dict[int, set[int]] = field(default_factory=dict)
    """Virtual block id -> the hashes naming it."""
    lru: OrderedDict = field(default_factory=OrderedDict)
    """Idle virtual blocks (only the cache holds them), least recently used first."""
    stats: CacheStats = field(default_factory=CacheStats)
    seq_no: int = 0
    events: deque = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    """(seq_no, added, hash)."""

    # -- lookups ---------------------------------------------------------------
    def match(self, hashes: list[int], max_blocks: int) -> PrefixHit:
        """The leading blocks of `hashes` (at most `max_blocks`) this cache holds."""
        k = 0
        limit = min(len(hashes), max_blocks)
        while k < limit and hashes[k] in self.index:
            k += 1
        # (stats are counted by the caller, once the hit is taken)
        n = self.num_shards
        shared = tuple(self.index[hashes[j * n + n - 1]] for j in range(k // n))
        tail = self.index[hashes[k - 1]] if k % n else None
        return PrefixHit(k, shared, tail)

    def holds(self, block: int) -> bool:
        return block in self.names

    @property
    def num_blocks(self) -> int:
        """Virtual blocks the cache names (idle or in use)."""
        return len(self.names)

    # -- adding ----------------------------------------------------------------
    def insert(self, block_hash: int, block: int) -> None:
        """Name `block` (in use by the caller) as holding the block of `block_hash`."""
        if block_hash in self.index:
            return
        if block not in self.names:
            self.blocks.share(block)  # the cache's own reference
            self.names[block] = set()
        self.index[block_hash] = block
        self.names[block].add(block_hash)
        self._event(True, block_hash)

    # -- BlockManager hooks ------------------------------------------------------
    def idle(self, block: int) -> None:
        """Only the cache holds `block` now: it may be evicted (most recent last)."""
        self.lru[block] = None
        self.lru.move_to_end(block)

    def busy(self, block: int) -> None:
        """A request took `block` again."""
        self.lru.pop(block, None)

    @property
    def num_idle(self) -> int:
        return len(self.lru)

    def evict(self) -> int:
        """Drop the least recently used idle block from the index; returns its id
        (the caller frees it)."""
        block, _ = self.lru.popitem(last=False)
        for h in self.names.pop(block):
            del self.index[h]
            self._event(False, h)
        self.stats.evicted_blocks += 1
        return block

    def clear(self) -> list[int]:
        """Forget every idle block (the ids to free); blocks in use stay named."""
        return [self.evict() for _ in range(len(self.lru))]

    # -- events ------------------------------------------------------------------
    def _event(self, added: bool, block_hash: int) -> None:
        self.seq_no += 1
        self.events.append((self.seq_no, added, block_hash))

    def events_since(self, seq_no: int) -> list[tuple[int, bool, int]] | None:
        """Events after `seq_no`, or None when some were dropped (read `hashes()` instead)."""
        if seq_no >= self.seq_no:
            return []
        if not self.events or self.events[0][0] > seq_no + 1:
            return None
        out = []
        for e in reversed(self.events):  # newest first: a reader polling often needs only a few
            if e[0] <= seq_no:
                break
            out.append(e)
        out.reverse()
        return out

    def hashes(self) -> list[int]:
        """Every block hash the cache holds now."""
        return list(self.index)
