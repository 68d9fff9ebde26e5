"""The router's view of the nodes: membership (from discovery) plus, per node, a
gRPC channel, the latest reported load and whether the node answers.

Life of a node in the view:

1. Discovery lists it: an entry with a channel to `NodeInfo.address` is made;
   it counts as reachable at once (routing does not wait for a first poll) and
   a poller task starts calling `GetLoad` every `load_poll_s`, each call with a
   deadline of `node_rpc_timeout_s`.
2. It leaves routing (unreachable, skipped by routing) on evidence only
   (`Liveness`): at once when its GetLoad answers UNAVAILABLE (the node says
   its engine died, or nothing listens there), when its health service says
   NOT_SERVING, or when a call of the orchestrator finds it down
   (`mark_unreachable`); otherwise after `failures_to_drop` failed polls in a
   row, or a run of failed polls lasting `failure_window_s`. One failed poll
   (a timeout under a burst, a bad report) is no evidence. The next answered
   poll marks it reachable again. While discovery is unreachable the
   membership keeps its last view, so the nodes stay as they are.
3. It re-registers with a new `started_at_ms` (a restart) or a new address:
   the entry is replaced (new channel, load forgotten) and the routing
   policies `forget` it.
4. Discovery drops it: the poller stops, the policies forget it, and its
   channel closes once the calls still running on it end (bounded by a grace
   period), so requests in flight are not cut by a membership blip.

Prefix caches: each poll tells the node what the entry holds of its prefix cache
(`PublishedPrefixes`, braid.router.prefix_view) and applies the changes the node
answers with; the set lives and dies with the entry (a restarted node is a new
entry with an empty set), and is emptied when the node stops publishing. The
load kept for ListNodes keeps the node's report without its hash lists.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.proto.names import ROLE_NAMES
from braid.proto import common_pb2, nodes_pb2_grpc, router_pb2
from braid.proto.tls import TlsConfig, open_channel
from braid.router.policies import Candidate, NodeLoad, Policy
from braid.router.prefix_view import PublishedPrefixes

log = logging.getLogger(__name__)

NODE_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Send/receive limit on node channels: prompts travel to the nodes as token ids."""
CLOSE_GRACE_S = 60.0
"""How long a dropped node's channel stays open for the calls still running on it."""
HEALTH_CHECK_TIMEOUT_S = 2.0
"""Deadline of the health check that follows a failed poll."""


@dataclass(eq=False)
class NodeEntry:
    """One node as the router sees it; `stub` is a PrefillNodeStub or DecodeNodeStub."""

    info: common_pb2.NodeInfo
    channel: grpc.aio.Channel
    stub: object
    load: common_pb2.Load = field(default_factory=common_pb2.Load)
    reachable: bool = True
    last_error: str = ""
    last_poll_s: float = 0.0
    """time.monotonic() of the last answered poll (0 = never)."""
    liveness: "Liveness" = field(default_factory=lambda: Liveness(3, 5.0))
    """The rule that takes it out of routing and back (the view sets the configured one)."""
    polls: int = 0
    """Polls done (answered or not)."""
    prefix: PublishedPrefixes = field(default_factory=PublishedPrefixes)
    """What the node's prefix cache holds, as it published it."""

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def role(self) -> str:
        return ROLE_NAMES[self.info.role]

    @property
    def max_model_len(self) -> int:
        """0 when the node does not say."""
        return int(self.info.capacity.max_model_len)

    def candidate(self) -> Candidate:
        return Candidate(
            node_id=self.node_id,
            role=self.role,
            load=NodeLoad.from_proto(self.load),
            max_num_seqs=int(self.info.capacity.max_num_seqs),
            prefix=self.prefix if self.prefix.synced else None,
        )

    def take_load(self, load: common_pb2.Load) -> None:
        """Keep an answered poll's load, applying its prefix cache changes."""
        if load.HasField("prefix_cache"):
            if not self.prefix.apply(load.prefix_cache):
                log.info("router: node %s: prefix cache report out of step; resyncing", self.node_id)
            del load.prefix_cache.added[:]  # applied: ListNodes need not carry them
            del load.prefix_cache.evicted[:]
        elif self.prefix.synced:
            self.prefix.reset()  # it publishes no more (caching off, or an older build)
        self.load = load

    def status(self) -> router_pb2.NodeStatus:
        return router_pb2.NodeStatus(info=self.info, load=self.load, reachable=self.reachable)


@dataclass
class Liveness:
    """Whether routing may use a node, from what its polls and calls showed.

    `answered()` (a poll answered) makes it reachable. `gone()` (evidence: GetLoad
    UNAVAILABLE, health NOT_SERVING, a call that found it down) makes it
    unreachable at once. `failed(now)` (a poll that failed otherwise) makes it
    unreachable once the failures since the last answer number
    `failures_to_drop`, or the first of them is `window_s` old.
    """

    failures_to_drop: int
    window_s: float
    reachable: bool = True
    failures: int = 0
    """Failed polls since the last answered one."""
    first_failure_s: float | None = None

    def answered(self) -> None:
        self.reachable, self.failures, self.first_failure_s = True, 0, None

    def gone(self) -> None:
        self.reachable = False

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.first_failure_s is None:
            self.first_failure_s = now
        if self.failures >= self.failures_to_drop or now - self.first_failure_s >= self.window_s:
            self.reachable = False


def _open(info: common_pb2.NodeInfo, tls: TlsConfig) -> tuple[grpc.aio.Channel, object]:
    # TLS with the router's own certificate when configured: nodes admit only the router
    channel = open_channel(
        info.address,
        tls,
        options=[
            ("grpc.max_send_message_length", NODE_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", NODE_MAX_MESSAGE_BYTES),
        ],
    )
    if info.role == common_pb2.ROLE_PREFILL:
        return channel, nodes_pb2_grpc.PrefillNodeStub(channel)
    return channel, nodes_pb2_grpc.DecodeNodeStub(channel)


class NodeView:
    """Membership + channels + load polling. Runs on the router's event loop.

    `policies` maps policy role names (PREFILL, DECODE) to the Policy objects
    that must forget nodes that leave. `on_change` is called after every poll
    round or membership change (metrics).
    """

    def __init__(
        self,
        membership,
        policies: dict[str, Policy],
        *,
        load_poll_s: float,
        rpc_timeout_s: float,
        on_change=None,
        tls: TlsConfig | None = None,
        failures_to_drop: int = 3,
        failure_window_s: float = 5.0,
    ):
        self._tls = tls or TlsConfig()
        self._failures_to_drop = failures_to_drop
        self._failure_window_s = failure_window_s
        self._membership = membership
        self._policies = policies
        self._load_poll_s = load_poll_s
        self._rpc_timeout_s = rpc_timeout_s
        self._on_change = on_change
        self._entries: dict[int, dict[str, NodeEntry]] = {role: {} for role in ROLE_NAMES}
        self._pollers: dict[NodeEntry, asyncio.Task] = {}
        self._closing: dict[asyncio.Task, grpc.aio.Channel] = {}
        """Channels of dropped nodes, closing once their calls end."""
        self._watcher: asyncio.Task | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Take the membership's current view and follow its changes."""
        self._sync()
        self._watcher = asyncio.create_task(self._watch(), name="router-membership-watch")

    async def close(self) -> None:
        """Stop polling and watching; close every channel at once."""
        self._closed = True
        closing = dict(self._closing)
        tasks = [t for t in (self._watcher, *self._pollers.values(), *closing) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channels = [e.channel for by_id in self._entries.values() for e in by_id.values()] + list(closing.values())
        self._entries = {role: {} for role in ROLE_NAMES}
        self._pollers.clear()
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)

    async def _watch(self) -> None:
        gen = self._membership.generation
        while not self._closed:
            try:
                gen = await self._membership.wait_changed(gen, timeout=5.0)
                self._sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bad NodeInfo stop the watch
                log.exception("router: membership sync failed")
                await asyncio.sleep(0.5)

    def _sync(self) -> None:
        for role in ROLE_NAMES:
            current = self._membership.nodes(role)
            entries = self._entries[role]
            for node_id in [n for n in entries if n not in current]:
                self._drop(entries.pop(node_id), "left the membership")
            for node_id, info in current.items():
                old = entries.get(node_id)
                if old is not None and old.info.started_at_ms == info.started_at_ms and old.info.address == info.address:
                    old.info = info  # same incarnation: keep channel and load
                    continue
                if old is not None:
                    self._drop(old, "re-registered")
                entries[node_id] = self._add(info)
        self._changed()

    def _add(self, info: common_pb2.NodeInfo) -> NodeEntry:
        channel, stub = _open(info, self._tls)
        entry = NodeEntry(info=info, channel=channel, stub=stub,
                          liveness=Liveness(self._failures_to_drop, self._failure_window_s))
        self._pollers[entry] = asyncio.create_task(self._poll(entry), name=f"router-poll-{info.node_id}")
        log.info("router: node %s (%s) at %s joined", info.node_id, ROLE_NAMES[info.role], info.address)
        return entry

    def _drop(self, entry: NodeEntry, why: str) -> None:
        log.info("router: node %s %s", entry.node_id, why)
        poller = self._pollers.pop(entry, None)
        if poller is not None:
            poller.cancel()
        self._policies[entry.role].forget(entry.node_id)
        entry.reachable = False
        task = asyncio.create_task(entry.channel.close(grace=CLOSE_GRACE_S))
        self._closing[task] = entry.channel
        task.add_done_callback(lambda t: self._closing.pop(t, None))

    async def _poll(self, entry: NodeEntry) -> None:
        while True:
            try:
                load = await entry.stub.GetLoad(common_pb2.LoadRequest(**entry.prefix.request_fields()),
                                                timeout=self._rpc_timeout_s)
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as e:
                error = f"{e.code().name}: {e.details()}"
                # UNAVAILABLE is the node's own word (engine dead) or nothing listening
                evidence = e.code() == grpc.StatusCode.UNAVAILABLE or await self._not_serving(entry)
                self._mark(entry, None if evidence else False, error)
            except Exception as e:  # a poll must never kill the poller
                self._mark(entry, False, repr(e))
            else:
                entry.take_load(load)
                entry.last_poll_s = time.monotonic()
                self._mark(entry, True, "")
            entry.polls += 1
            self._changed()
            await asyncio.sleep(self._load_poll_s)

    async def _not_serving(self, entry: NodeEntry) -> bool:
        """After a failed poll: does the node's health service say NOT_SERVING (or is
        nothing there)? A health answer of SERVING, or none in time, is no evidence."""
        try:
            reply = await health_pb2_grpc.HealthStub(entry.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(self._rpc_timeout_s, HEALTH_CHECK_TIMEOUT_S))
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE
        except Exception:  # noqa: BLE001
            return False
        return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

    def _mark(self, entry: NodeEntry, answered: bool | None, error: str) -> None:
        """answered: True (a poll answered), False (a poll failed: counts toward the
        rule), None (evidence the node is down: out of routing at once)."""
        live = entry.liveness
        if answered:
            live.answered()
        elif answered is None:
            live.gone()
        else:
            live.failed(time.monotonic())
        if entry.reachable != live.reachable:
            log.warning("router: node %s %s%s", entry.node_id,
                        "reachable again" if live.reachable else "unreachable: ", error)
        elif error and live.reachable:
            log.info("router: node %s: poll failed (%d in a row, still routed): %s",
                     entry.node_id, live.failures, error)
        entry.reachable = live.reachable
        entry.last_error = error

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self)
            except Exception:
                log.exception("router: node view listener failed")

    # -- reading ---------------------------------------------------------------

    def entries(self, role: int | None = None) -> list[NodeEntry]:
        roles = ROLE_NAMES if role is None else (role,)
        return [e for r in roles for _, e in sorted(self._entries[r].items())]

    def get(self, role: int, node_id: str) -> NodeEntry | None:
        return self._entries[role].get(node_id)

    def reachable(self, role: int, exclude: Iterable[str] = ()) -> list[NodeEntry]:
        """Reachable nodes of a role, less `exclude` (node ids)."""
        skip = set(exclude)
        return [e for e in self.entries(role) if e.reachable and e.node_id not in skip]

    def mark_unreachable(self, entry: NodeEntry, error: str) -> None:
        """A call found the node down; routing skips it until a poll answers."""
        if self._entries[entry.info.role].get(entry.node_id) is entry:
            self._mark(entry, None, error)
            self._changed()

    def statuses(self) -> list[router_pb2.NodeStatus]:
        return [e.status() for e in self.entries()]

    def reserved_blocks(self) -> int:
        """Blocks reserved on decode nodes awaiting KV, as last reported."""
        return sum(int(e.load.reserved_blocks) for e in self.entries(common_pb2.ROLE_DECODE))

    def __contains__(self, node_id: str) -> bool:
        return any(node_id in by_id for by_id in self._entries.values())

