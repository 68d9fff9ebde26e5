"""What a node's prefix cache holds, published to the routers on its load reports.

In a request's life: the router's prefix_aware policy chooses a node by the
prompt blocks that node already holds. It learns what each node holds from the
node's GetLoad answers (Load.prefix_cache): each answer carries the changes since
what that router last saw (it says so in LoadRequest: generation and seq_no).

Threads. The engine's PrefixCache is mutated on the engine thread only, so it is
read there (`read_engine`, run through AsyncEngine.call): the new events, or the
whole hash list when the cache's own event log no longer reaches back far enough,
plus the counters for the metrics, all copied. `PrefixPublisher` keeps a mirror
of the set and of the recent events on the event loop; GetLoad answers from the
mirror without waiting for the engine (so it may lag one refresh behind).

Bounds. A delta carries at most `max_events` events' worth of hashes (the mirror
keeps no more; an older router gets a snapshot) and a snapshot at most
`max_snapshot` hashes: beyond that it carries the oldest-added ones, flagged
`truncated`. Older first because a prompt's blocks are added in chain order, so
what is sent still matches from a prompt's start; the router's set is then a
subset of the node's (it under-estimates hits, never claims a block the node
lacks) until the node next sends a snapshot.

Generation: random per publisher (one per engine start); a router holding
another generation gets a snapshot.
"""
from __future__ import annotations

import dataclasses
import secrets
from collections import deque
from dataclasses import dataclass

from braid.proto import common_pb2

MAX_SNAPSHOT_HASHES = 1 << 16
"""Most hashes one snapshot carries (8 bytes each on the wire: 512 KiB)."""
MAX_EVENTS = 1 << 16
"""Events the mirror keeps for routers that ask for changes; an older router gets a snapshot."""


@dataclass(frozen=True)
class EngineReading:
    """What the engine thread read of its prefix cache and scheduler (plain copies)."""

    seq_no: int = 0
    events: tuple = ()
    """(seq_no, added, hash) after the mirror's seq_no, oldest first."""
    hashes: tuple | None = None
    """Set instead of `events` when those were no longer kept: every hash, oldest-added first."""
    seed: bytes = b""
    block_size: int = 0
    stats: dict = dataclasses.field(default_factory=dict)
    """CacheStats as a dict (queried_blocks, hit_blocks, evicted_blocks, copied_blocks)."""
    cached_blocks: int = 0
    """Virtual blocks the cache names (idle or in use)."""
    num_chunks: int = 0
    """Prompt chunks that did not finish their prompt (Scheduler.num_chunks)."""
    caching: bool = True
    """False: prefix caching is off on this engine."""
    spec: dict = dataclasses.field(default_factory=dict)
    """Speculative decoding counters (braid.engine.spec_decode.stats.SpecStats.as_dict)."""
    graph_steps: int = 0
    """Decode steps run through a compiled graph (graph mode)."""


def read_engine(core, since: int) -> EngineReading:
    """On the engine thread: the cache's changes after event `since`, and the counters."""
    chunks = int(getattr(core.scheduler, "num_chunks", 0))
    spec = core.scheduler.spec_stats.as_dict() if hasattr(core.scheduler, "spec_stats") else {}
    graphs = int(getattr(core, "graph_steps", 0))
    pc = core.prefix_cache
    if pc is None:
        return EngineReading(num_chunks=chunks, caching=False, spec=spec, graph_steps=graphs)
    events = pc.events_since(since)
    common = dict(seq_no=pc.seq_no, seed=bytes(pc.seed), block_size=int(pc.block_size), graph_steps=graphs,
                  stats=dataclasses.asdict(pc.stats), cached_blocks=pc.num_blocks, num_chunks=chunks, spec=spec)
    if events is None:
        return EngineReading(hashes=tuple(pc.hashes()), **common)
    return EngineReading(events=tuple(events), **common)


class PrefixPublisher:
    """The node's mirror of its engine's cache set and recent events (event loop only)."""

    def __init__(self, max_events: int = MAX_EVENTS, max_snapshot: int = MAX_SNAPSHOT_HASHES,
                 generation: int | None = None):
        self.generation = generation if generation is not None else (secrets.randbits(64) or 1)
        self.max_snapshot = max_snapshot
        self.seq_no = 0
        self.seed = b""
        self.block_size = 0
        self.caching: bool | None = None
        """None until the first reading."""
        self.hashes: dict[int, None] = {}
        """The set, in the order the hashes were added (oldest first)."""
        self.log: deque = deque(maxlen=max_events)
        """(seq_no, added, hash) of the recent events, oldest first."""
        self.reading = EngineReading(caching=False)
        """The latest reading (its counters feed the metrics)."""

    def apply(self, r: EngineReading) -> None:
        """Bring the mirror up to the engine's reading `r` (taken after `self.seq_no`)."""
        self.reading = r
        self.caching = r.caching
        if not r.caching:
            return
        self.seed, self.block_size = r.seed, r.block_size
        if r.hashes is not None:
            self.hashes = dict.fromkeys(r.hashes)
            self.log.clear()  # the events before r.seq_no are unknown: older routers get a snapshot
        for seq, added, h in r.events:
            if seq <= self.seq_no:
                continue
            if added:
                self.hashes[h] = None
            else:
                self.hashes.pop(h, None)
            self.log.append((seq, added, h))
        self.seq_no = max(self.seq_no, r.seq_no)

    def _covers(self, seq_no: int) -> bool:
        """Whether the log holds every event after `seq_no`."""
        first = self.log[0][0] - 1 if self.log else self.seq_no
        return first <= seq_no <= self.seq_no

    def delta(self, generation: int, seq_no: int) -> common_pb2.PrefixCacheDelta | None:
        """What a router holding (generation, seq_no) lacks; None when caching is off
        (or not read yet)."""
        if not self.caching:
            return None
        out = common_pb2.PrefixCacheDelta(seed=self.seed, block_size=self.block_size, generation=self.generation,
                                          seq_no=self.seq_no, num_hashes=len(self.hashes))
        if generation == self.generation and self._covers(seq_no):
            recent = []
            for event in reversed(self.log):  # newest first: a router polling often needs a few
                if event[0] <= seq_no:
                    break
                recent.append(event)
            last: dict[int, bool] = {}
            for _, added, h in reversed(recent):  # each hash's net change: its last event
                last[h] = added
            out.since_seq_no = seq_no
            out.added.extend(h for h, a in last.items() if a)
            out.evicted.extend(h for h, a in last.items() if not a)
            return out
        out.snapshot = True
        out.truncated = len(self.hashes) > self.max_snapshot
        out.added.extend(h for _, h in zip(range(self.max_snapshot), self.hashes))
        return out
