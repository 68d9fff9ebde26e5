"""The router's view of the nodes: membership (from discovery) plus, per node, a
gRPC channel, the latest reported load and whether the node answers.

Life of a node in the view:

1. Discovery lists it: an entry with a channel to `NodeInfo.address` is made;
   it counts as reachable at once (routing does not wait for a first poll) and
   a poller task starts calling `GetLoad` every `load_poll_s`, each call with a
   deadline of `node_rpc_timeout_s`.
2. A failed poll marks it unreachable (skipped by routing); the next answered
   poll marks it reachable again. A call of the orchestrator that finds the
   node down (`mark_unreachable`) does the same without waiting for a poll.
3. It re-registers with a new `started_at_ms` (a restart) or a new address:
   the entry is replaced (new channel, load forgotten) and the routing
   policies `forget` it.
4. Discovery drops it: the poller stops, the policies forget it, and its
   channel closes once the calls still running on it end (bounded by a grace
   period), so requests in flight are not cut by a membership blip.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from braid.proto.names import ROLE_NAMES
from braid.proto import common_pb2, nodes_pb2_grpc, router_pb2
from braid.router.policies import Candidate, NodeLoad, Policy

log = logging.getLogger(__name__)

NODE_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Send/receive limit on node channels: prompts travel to the nodes as token ids."""
CLOSE_GRACE_S = 60.0
"""How long a dropped node's channel stays open for the calls still running on it."""


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
        )

    def status(self) -> router_pb2.NodeStatus:
        return router_pb2.NodeStatus(info=self.info, load=self.load, reachable=self.reachable)


def _open(info: common_pb2.NodeInfo) -> tuple[grpc.aio.Channel, object]:
    channel = grpc.aio.insecure_channel(
        info.address,
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
    ):
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
        channel, stub = _open(info)
        entry = NodeEntry(info=info, channel=channel, stub=stub)
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
                load = await entry.stub.GetLoad(common_pb2.LoadRequest(), timeout=self._rpc_timeout_s)
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as e:
                self._mark(entry, False, f"{e.code().name}: {e.details()}")
            except Exception as e:  # a poll must never kill the poller
                self._mark(entry, False, repr(e))
            else:
                entry.load = load
                entry.last_poll_s = time.monotonic()
                self._mark(entry, True, "")
            self._changed()
            await asyncio.sleep(self._load_poll_s)

    def _mark(self, entry: NodeEntry, reachable: bool, error: str) -> None:
        if entry.reachable != reachable:
            log.warning("router: node %s %s%s", entry.node_id, "reachable again" if reachable else "unreachable: ", error)
        entry.reachable = reachable
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
            self._mark(entry, False, error)
            self._changed()

    def statuses(self) -> list[router_pb2.NodeStatus]:
        return [e.status() for e in self.entries()]

    def reserved_blocks(self) -> int:
        """Blocks reserved on decode nodes awaiting KV, as last reported."""
        return sum(int(e.load.reserved_blocks) for e in self.entries(common_pb2.ROLE_DECODE))

    def __contains__(self, node_id: str) -> bool:
        return any(node_id in by_id for by_id in self._entries.values())

