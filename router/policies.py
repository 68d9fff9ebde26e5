"""Routing policies: which node of one pool (prefill or decode) takes a request.

Plain Python over ids and integers; no grpc, no torch. The router keeps one
policy object per pool (one for prefill nodes, one for decode nodes) and, for
each request:

1. builds the candidates from its membership view: one `Candidate` per node
   that may take work, with the node's latest reported `NodeLoad` and the
   block hashes its prefix cache published (`PublishedPrefixes`, or None);
2. calls `policy.choose(candidates, RouteRequest(prompt_token_ids, session_id))`,
   which returns one of the candidates or raises `NoNodes` when there are none
   (the router answers UNAVAILABLE);
3. calls `policy.forget(node_id)` when discovery drops a node or the node
   re-registers after a restart, so that per-node history does not outlive it.

Candidates may differ from call to call (nodes join, leave, or are skipped as
unreachable); every policy works on whatever set it is given, sorted by node id
so that the caller's order does not matter. Policies keep state (round-robin
position, prefix history) and are not thread-safe: use them from the router's
event loop only.
"""
from __future__ import annotations

import hashlib
import inspect
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from braid.client.types import Load
from braid.proto.prefix_hash import block_hashes
from braid.router.prefix_view import PublishedPrefixes

NodeLoad = Load
"""A node's latest reported load: the client's `Load` record (one definition for both)."""

PREFILL = "prefill"
DECODE = "decode"
DEFAULT_MAX_NUM_SEQS = 256
"""Batch size assumed for a decode node's load score when its capacity is unknown."""


class NoNodes(Exception):
    """No candidate node to route to (the router answers UNAVAILABLE)."""


# ---------------------------------------------------------------- value types


@dataclass(frozen=True)
class Candidate:
    """A node that may take the request."""

    node_id: str
    role: str
    """PREFILL or DECODE: selects the load score."""
    load: NodeLoad = NodeLoad()
    max_num_seqs: int = 0
    """The node's batch limit (Capacity.max_num_seqs); 0 = unknown."""
    prefix: PublishedPrefixes | None = None
    """What the node's prefix cache holds, as it published it; None: it publishes nothing."""

    def __post_init__(self):
        if self.role not in (PREFILL, DECODE):
            raise ValueError(f"role must be {PREFILL!r} or {DECODE!r}, got {self.role!r}")


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at in a request."""

    prompt_token_ids: tuple[int, ...] = ()
    session_id: str = ""
    _hashes: dict = field(default_factory=dict, compare=False, repr=False)
    """(seed, block_size) -> the prompt's block hashes: computed once per request, shared
    by its prefill and decode choices and its retries."""

    def __post_init__(self):
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))

    def block_hashes(self, block_size: int, seed: bytes = b"") -> list[int]:
        """The prompt's chained block hashes (braid.proto.prefix_hash) for this seed and block size."""
        key = (seed, block_size)
        hashes = self._hashes.get(key)
        if hashes is None:
            hashes = self._hashes[key] = block_hashes(self.prompt_token_ids, block_size, seed)
        return hashes


def load_score(c: Candidate) -> float:
    """Lower is less loaded.

    Prefill: tokens waiting to be prefilled. Decode: used KV fraction plus the
    share of the batch taken by running and waiting sequences (each in [0, 1]).
    """
    if c.role == PREFILL:
        return float(c.load.queued_prefill_tokens)
    max_seqs = c.max_num_seqs if c.max_num_seqs > 0 else DEFAULT_MAX_NUM_SEQS
    return c.load.used_kv_fraction + (c.load.running_seqs + c.load.waiting_seqs) / max_seqs


ScoreFn = Callable[[Candidate], float]


def sorted_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates sorted by node id; NoNodes when empty, ValueError on a repeated id."""
    if not candidates:
        raise NoNodes("no nodes available")
    nodes = sorted(candidates, key=lambda c: c.node_id)
    for a, b in zip(nodes, nodes[1:]):
        if a.node_id == b.node_id:
            raise ValueError(f"node {a.node_id!r} appears twice among the candidates")
    return nodes


# ---------------------------------------------------------------- policies


class Policy(ABC):
    """Chooses one node from the candidates of one pool."""

    name = ""

    def choose(self, candidates: Sequence[Candidate], request: RouteRequest) -> Candidate:
        """One of `candidates`; NoNodes when there are none."""
        return self._choose(sorted_candidates(candidates), request)

    @abstractmethod
    def _choose(self, nodes: list[Candidate], request: RouteRequest) -> Candidate:
        """`nodes` is non-empty and sorted by node id."""

    def forget(self, node_id: str) -> None:
        """Drop what the policy remembers about a node that left (no-op by default)."""


class RoundRobin(Policy):
    """Each node in turn, in node-id order.

    The position is the last chosen node id, not an index, so that joins and
    leaves do not shift the cycle: the next pick is the first node whose id
    follows the last pick's, wrapping around. While membership holds still,
    every node is picked once per cycle; a joining node enters the cycle at its
    place in id order.
    """

    name = "round_robin"

    def __init__(self):
        self._last: str | None = None

    def _choose(self, nodes, request):
        last = self._last
        pick = nodes[0] if last is None else next((n for n in nodes if n.node_id > last), nodes[0])
        self._last = pick.node_id
        return pick


class LeastLoaded(Policy):
    """Power of two choices: two distinct nodes at random, the less loaded wins.

    Draws `rng.sample(range(len(nodes)), 2)` over the candidates sorted by node
    id; on equal scores the first drawn wins. One candidate is returned without
    drawing.
    """

    name = "least_loaded"

    def __init__(self, rng: random.Random | None = None, score: ScoreFn = load_score):
        self._rng = rng if rng is not None else random.Random()
        self._score = score

    def _choose(self, nodes, request):
        if len(nodes) == 1:
            return nodes[0]
        i, j = self._rng.sample(range(len(nodes)), 2)
        a, b = nodes[i], nodes[j]
        return b if self._score(b) < self._score(a) else a


DECODE_LOAD_SLACK = 0.5
"""prefix_aware: how much higher a decode node's load score (KV fraction + batch fraction)
than the least loaded candidate's may be before its cached prefix no longer counts."""


class PrefixAware(Policy):
    """The node holding the longest prefix of the prompt, unless it is much busier.

    Each node's match is a number of prompt tokens:
      - a node that publishes its prefix cache (`Candidate.prefix`): its cached
        prefix, the leading prompt blocks (hashed with the node's own seed and block
        size) found in its published set, times its block size;
      - any other node (caching off, an older node): the guess from recent routing,
        the leading prompt blocks (of `block_size` tokens, unseeded hashes) found in
        an LRU set of at most `max_blocks_per_node` hashes of the blocks it was sent,
        times `block_size`.
    A published match only counts while the node is not much busier than the least
    loaded candidate (load score `base`): it is dropped to 0 when, for a prefill
    node, its score (queued prefill tokens) exceeds `base` by more than the matched
    tokens (the queue ahead of it costs more than its cache saves), and for a decode
    node when its score exceeds `base` by more than `decode_load_slack`. A guessed
    match always counts (as before nodes published their caches). The largest
    counted match wins; ties go to the lower load score, then to a random one of the
    tied (`rng`). A chosen node that publishes nothing then records all the
    prompt's blocks in its guess set, the last block first so that a prefix
    outlives its continuations under eviction.
    """

    name = "prefix_aware"

    def __init__(
        self,
        block_size: int = 16,
        max_blocks_per_node: int = 1 << 16,
        rng: random.Random | None = None,
        score: ScoreFn = load_score,
        decode_load_slack: float = DECODE_LOAD_SLACK,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_blocks_per_node < 1:
            raise ValueError(f"max_blocks_per_node must be >= 1, got {max_blocks_per_node}")
        if decode_load_slack < 0:
            raise ValueError(f"decode_load_slack must be >= 0, got {decode_load_slack}")
        self.block_size = block_size
        self.max_blocks_per_node = max_blocks_per_node
        self.decode_load_slack = decode_load_slack
        self._rng = rng if rng is not None else random.Random()
        self._score = score
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def matched_blocks(self, node_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the node holds by the routing guess."""
        held = self._blocks.get(node_id, {})
        n = 0
        while n < len(hashes) and hashes[n] in held:
            n += 1
        return n

    def held_blocks(self, node_id: str) -> list[int]:
        """The node's guessed block hashes, least recently used first."""
        return list(self._blocks.get(node_id, ()))

    def cached_tokens(self, node: Candidate, request: RouteRequest) -> tuple[int, bool]:
        """(prompt tokens the node holds, whether it published them rather than guessed)."""
        p = node.prefix
        if p is not None:
            return p.matched_blocks(request.block_hashes(p.block_size, p.seed)) * p.block_size, True
        return self.matched_blocks(node.node_id, request.block_hashes(self.block_size)) * self.block_size, False

    def _counted(self, node: Candidate, tokens: int, published: bool, base: float) -> int:
        """The match that counts, given the least load score `base` (see the class docstring)."""
        if not published or tokens == 0:
            return tokens
        extra = self._score(node) - base
        slack = tokens if node.role == PREFILL else self.decode_load_slack
        return 0 if extra > slack else tokens

    def _choose(self, nodes, request):
        scores = {n.node_id: self._score(n) for n in nodes}
        base = min(scores.values())
        keys = {}
        for n in nodes:
            tokens, published = self.cached_tokens(n, request)
            keys[n.node_id] = (-self._counted(n, tokens, published, base), scores[n.node_id])
        best = min(keys.values())
        tied = [n for n in nodes if keys[n.node_id] == best]
        pick = tied[0] if len(tied) == 1 else self._rng.choice(tied)
        if pick.prefix is None:
            self.record(pick.node_id, request.block_hashes(self.block_size))
        return pick

    def record(self, node_id: str, hashes: Sequence[int]) -> None:
        """Note that the node was sent these blocks (refreshing them), evicting the oldest."""
        held = self._blocks.setdefault(node_id, OrderedDict())
        for h in reversed(hashes):
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks_per_node:
            held.popitem(last=False)

    def forget(self, node_id: str) -> None:
        self._blocks.pop(node_id, None)


def _rendezvous_weight(key: str, node_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SessionAffinity(Policy):
    """Requests of one session go to one node (rendezvous hashing on session_id).

    A node leaving moves only its own sessions; a node joining takes only the
    sessions it now wins. Requests without a session go to `fallback`
    (least_loaded by default).
    """

    name = "session_affinity"

    def __init__(self, fallback: Policy | None = None, rng: random.Random | None = None):
        self._fallback = fallback if fallback is not None else LeastLoaded(rng)

    def _choose(self, nodes, request):
        if not request.session_id:
            return self._fallback.choose(nodes, request)
        return max(nodes, key=lambda n: _rendezvous_weight(request.session_id, n.node_id))

    def forget(self, node_id: str) -> None:
        self._fallback.forget(node_id)


POLICIES = MappingProxyType(
    {
        "round_robin": RoundRobin,
        "least_loaded": LeastLoaded,
        "power_of_two": LeastLoaded,
        "prefix_aware": PrefixAware,
        "session_affinity": SessionAffinity,
    }
)
"""Policy name -> class; names accept '-' for '_'."""


def make_policy(name: str, **opts) -> Policy:
    """A new policy by name; ValueError for an unknown name or option."""
    key = name.strip().lower().replace("-", "_")
    cls = POLICIES.get(key)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of: {', '.join(POLICIES)}")
    sig = inspect.signature(cls)
    try:
        sig.bind(**opts)
    except TypeError:
        accepted = ", ".join(sig.parameters) or "none"
        raise ValueError(f"policy {key!r} got options {sorted(opts)}; it accepts: {accepted}") from None
    return cls(**opts)
