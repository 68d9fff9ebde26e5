"""What the rest of braid sees of discovery: a Registration and a Membership view.

A node, once it can serve:

  reg = EtcdRegistration(config, node_info)   # or StaticRegistration in unit tests
  reg.add_listener(on_registered)             # on_registered(False): see lost_reason
  await reg.start()                           # returns once the NodeInfo is published
  ...                                         # the lease is renewed in the background;
                                              # a lost lease is signalled and re-registered
  await reg.close()                           # revoke: the router drops the node at once

The router:

  members = EtcdMembership(config)            # or StaticMembership([...]) in unit tests
  await members.start()                       # first list done (or DiscoveryError)
  members.nodes(ROLE_DECODE)                  # {node_id: NodeInfo}, a snapshot
  gen = members.generation
  gen = await members.wait_changed(gen, timeout=5.0)
  members.healthy                             # False while the view may be stale
  await members.close()

Both run on the caller's asyncio loop. Listeners are plain callables run on that
loop; they must not block. NodeInfo messages handed out are shared: treat them
as read-only.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import random
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Mapping

from braid.proto import common_pb2
from braid.proto.names import ROLE_NAMES, ROLES_BY_NAME  # re-exported: discovery's role names

log = logging.getLogger(__name__)


LOST_LEASE_GONE = "lease_gone"
LOST_UNREACHABLE = "unreachable"
LOST_CLOSED = "closed"


class DiscoveryError(RuntimeError):
    """Discovery could not reach its backend in time (etcd down or unreachable)."""


class NodeIdInUse(DiscoveryError):
    """Another live node (a different address, under a lease that is not ours) holds
    this node's key: two nodes were given the same node_id."""


async def bounded(aw, timeout: float | None):
    """`await aw` with a deadline (TimeoutError after `timeout` seconds; None = none).

    asyncio.wait_for before Python 3.12 can swallow a cancellation of the caller that
    races with the result; a background loop would then outlive its close(). The
    asyncio.timeout context manager (3.11+) does not.
    """
    if timeout is None:
        return await aw
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)


async def stop_task(task: asyncio.Task | None, timeout: float) -> None:
    """Cancel a background task and wait (bounded) until it has ended, re-cancelling in
    case a cancellation is swallowed by third-party code."""
    if task is None:
        return
    deadline = time.monotonic() + timeout
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.done():
        log.error("background task %s did not stop within %.1fs", task.get_name(), timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.error("background task %s had failed: %r", task.get_name(), task.exception())


class Backoff:
    """Exponential delays from `initial` to `maximum`, jittered to 50-100%."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum = initial, maximum
        self._n = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2 ** min(self._n, 30))
        self._n += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._n = 0

    def log_level(self) -> int:
        """WARNING for the first failure of a streak and every 10th after, DEBUG otherwise."""
        return logging.WARNING if self._n % 10 == 1 else logging.DEBUG


def parse_role(role: int | str) -> int:
    """common_pb2.ROLE_PREFILL / ROLE_DECODE, from the enum value or "prefill" / "decode"."""
    if isinstance(role, str):
        if role not in ROLES_BY_NAME:
            raise ValueError(f"unknown role {role!r}: use 'prefill' or 'decode'")
        return ROLES_BY_NAME[role]
    if role not in ROLE_NAMES:
        raise ValueError(f"role must be ROLE_PREFILL or ROLE_DECODE, got {role!r}")
    return int(role)


def role_name(role: int | str) -> str:
    return ROLE_NAMES[parse_role(role)]


def check_name(what: str, value: str) -> None:
    """Cluster names and node ids become etcd key segments: non-empty, no '/', printable."""
    if not value or "/" in value or not value.isprintable() or value.strip() != value:
        raise ValueError(f"{what} {value!r} must be non-empty, printable, without '/' or surrounding spaces")


def validate_node_info(info: common_pb2.NodeInfo) -> None:
    check_name("node_id", info.node_id)
    parse_role(info.role)
    if not info.address:
        raise ValueError(f"node {info.node_id!r}: NodeInfo.address (host:port of its gRPC server) is empty")


@dataclass(frozen=True, kw_only=True)
class DiscoveryConfig:
    endpoint: str = "127.0.0.1:2379"
    """etcd client endpoint, host:port (an http:// prefix is accepted): the first one tried."""
    failover_endpoints: tuple[str, ...] = ()
    """Further etcd members, host:port; the client fails over between all of them in order."""
    username: str = ""
    """etcd user (etcd auth enabled); empty = no authentication."""
    password: str = field(default="", repr=False)
    """Password of `username` (kept out of repr, so out of logs)."""
    ca_file: str = ""
    """PEM CA that signed etcd's server certificate; set = talk to etcd over TLS."""
    cert_file: str = ""
    """PEM client certificate for etcd's client-certificate auth (with key_file)."""
    key_file: str = ""
    """Private key of cert_file."""
    server_name: str = ""
    """Name checked in etcd members' certificates; empty = the first endpoint's host."""
    cluster: str = "default"
    """Keys live under /braid/<cluster>/nodes/; clusters sharing an etcd never see each other."""
    lease_ttl_s: int = 10
    """Lease time to live; a dead node vanishes at most this long after its last renewal.
    etcd raises values under its minimum (2 s with default election settings)."""
    call_timeout_s: float = 5.0
    """Deadline of every etcd call (a lease renewal never waits past the lease's presumed expiry)."""
    backoff_initial_s: float = 0.1
    """First retry delay after a failed etcd call; doubles per failure, jittered."""
    backoff_max_s: float = 2.0
    """Cap of the retry delay: once etcd answers again, recovery takes at most about this long."""
    resync_interval_s: float = 30.0
    """The membership re-lists and re-watches this often even without errors, bounding how long
    a silently stalled watch can leave the view stale."""
    start_timeout_s: float = 10.0
    """How long start() waits for the first registration / first listing."""
    grpc_keepalive_s: float = 10.0
    """HTTP/2 keepalive ping interval on the etcd channel (etcd refuses pings under 5 s
    by default); a dead connection is noticed within this plus call_timeout_s."""

    def __post_init__(self):
        host, _, port = self.endpoint.removeprefix("http://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"discovery endpoint {self.endpoint!r} must be host:port")
        for ep in self.failover_endpoints:
            h, _, p = ep.removeprefix("http://").removeprefix("https://").rpartition(":")
            if not h or not p.isdigit():
                raise ValueError(f"discovery endpoint {ep!r} must be host:port")
        if bool(self.username) != bool(self.password):
            raise ValueError("discovery username and password: set both or neither")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("discovery cert_file and key_file: set both or neither")
        check_name("cluster", self.cluster)
        if not isinstance(self.lease_ttl_s, int) or isinstance(self.lease_ttl_s, bool) or self.lease_ttl_s < 1:
            raise ValueError(f"lease_ttl_s must be a whole number of seconds >= 1 (got {self.lease_ttl_s!r})")
        for name in ("call_timeout_s", "backoff_initial_s", "backoff_max_s", "resync_interval_s",
                     "start_timeout_s", "grpc_keepalive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.endpoint.removeprefix("http://").rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def all_endpoints(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every configured member, `endpoint` first, without repeats."""
        out = []
        for ep in (self.endpoint, *self.failover_endpoints):
            host, _, port = ep.removeprefix("http://").removeprefix("https://").rpartition(":")
            if (host.strip("[]"), int(port)) not in out:
                out.append((host.strip("[]"), int(port)))
        return tuple(out)

    @staticmethod
    def from_dict(d: Mapping) -> "DiscoveryConfig":
        known = {f.name for f in fields(DiscoveryConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown discovery settings {sorted(unknown)}; known: {sorted(known)}")
        return DiscoveryConfig(**d)


Listener = Callable[..., object]


def _call_listeners(listeners: list[Listener], *args) -> None:
    for cb in list(listeners):
        try:
            cb(*args)
        except Exception:
            log.exception("discovery listener %r failed", cb)


class Registration(abc.ABC):
    """Publishes one node's NodeInfo while the node is ready to serve.

    State: `registered` is True while the NodeInfo is (as far as this process can
    tell) visible to routers. It turns False when the lease is lost or presumed
    expired (no renewal confirmed within one TTL) and True again once
    re-registered; listeners get every transition as `listener(registered)`, and
    `lost_reason` says why it was lost. What to do meanwhile is the node's call:
    a node stops taking new work only on LOST_LEASE_GONE (etcd confirmed it); on
    LOST_UNREACHABLE it keeps serving, since an etcd outage is no reason for an
    outage of the cluster (routers keep their last view meanwhile).
    """

    def __init__(self, info: common_pb2.NodeInfo):
        validate_node_info(info)
        self._info = info
        self._registered = False
        self._epoch = 0
        self._listeners: list[Listener] = []
        self._state_changed = asyncio.Event()  # replaced on every transition
        self._closed = False
        self._lost_reason: str | None = None

    @property
    def info(self) -> common_pb2.NodeInfo:
        return self._info

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def epoch(self) -> int:
        """Number of successful (re-)registrations so far: 1 after start(), +1 per recovery."""
        return self._epoch

    def add_listener(self, callback: Callable[[bool], object]) -> None:
        """callback(registered) after every change of `registered` (run on the loop)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[bool], object]) -> None:
        self._listeners.remove(callback)

    async def wait_until(self, registered: bool, timeout: float | None = None) -> bool:
        """Wait until `self.registered == registered`; False if the timeout passed first.
        State, not transitions: a loss repaired at once can go unseen here (listeners see it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._registered != registered:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await bounded(self._state_changed.wait(), remaining)
            except asyncio.TimeoutError:
                return self._registered == registered
        return True

    @property
    def lost_reason(self) -> str | None:
        """Why `registered` last turned False: LOST_LEASE_GONE (the backend confirmed the
        lease is gone: routers have dropped the node), LOST_UNREACHABLE (no renewal
        confirmed within one TTL: routers have probably dropped it) or LOST_CLOSED;
        None while registered."""
        return None if self._registered else self._lost_reason

    def _set_registered(self, registered: bool, reason: str | None = None) -> None:
        if registered:
            self._epoch += 1
        else:
            self._lost_reason = reason
        if registered == self._registered:
            return
        self._registered = registered
        event, self._state_changed = self._state_changed, asyncio.Event()
        event.set()
        _call_listeners(self._listeners, registered)

    @abc.abstractmethod
    async def start(self, timeout: float | None = None) -> None:
        """Publish the NodeInfo; returns once it is visible. Call once the node is ready.
        Raises DiscoveryError when the backend did not answer within `timeout` (the
        registration keeps retrying in the background until close())."""

    @abc.abstractmethod
    async def update(self, info: common_pb2.NodeInfo) -> None:
        """Replace the published NodeInfo (same node_id and role). DiscoveryError if it
        cannot be published now; every later re-registration publishes it anyway."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Withdraw the NodeInfo at once (revoke) and stop renewing. Idempotent."""

    def _check_update(self, info: common_pb2.NodeInfo) -> None:
        validate_node_info(info)
        if (info.node_id, info.role) != (self._info.node_id, self._info.role):
            raise ValueError(
                f"update() cannot change node_id or role ({self._info.node_id!r}, {role_name(self._info.role)}"
                f" -> {info.node_id!r}, {role_name(info.role)}); close and register anew"
            )

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()


class Membership(abc.ABC):
    """A view of the registered nodes, by role, kept current in the background.

    `generation` grows by one on every change to the view or to `healthy`;
    `wait_changed(gen)` returns as soon as it differs from `gen`, so a caller that
    re-reads the view after each wake-up never misses a change.
    `healthy` is False while the view may be stale (backend unreachable, watch
    being re-established); the view then keeps the last known nodes.
    """

    def __init__(self):
        self._view: dict[int, dict[str, common_pb2.NodeInfo]] = {role: {} for role in ROLE_NAMES}
        self._healthy = False
        self._generation = 0
        self._changed = asyncio.Event()  # replaced on every change
        self._listeners: list[Listener] = []

    # -- reading -----------------------------------------------------------------

    def nodes(self, role: int | str) -> dict[str, common_pb2.NodeInfo]:
        """{node_id: NodeInfo} of one role: a snapshot (the messages are shared, read-only)."""
        return dict(self._view[parse_role(role)])

    def get(self, node_id: str, role: int | str | None = None) -> common_pb2.NodeInfo | None:
        roles = ROLE_NAMES if role is None else (parse_role(role),)
        for r in roles:
            info = self._view[r].get(node_id)
            if info is not None:
                return info
        return None

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def generation(self) -> int:
        return self._generation

    def add_listener(self, callback: Callable[[], object]) -> None:
        """callback() after every change to the view or to `healthy` (run on the loop)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], object]) -> None:
        self._listeners.remove(callback)

    async def wait_changed(self, since: int, timeout: float | None = None) -> int:
        """Wait until `generation != since` (or the timeout); returns the generation then."""
        if self._generation == since:
            try:
                await bounded(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self._generation

    async def wait_for(self, predicate: Callable[["Membership"], bool], timeout: float) -> bool:
        """Wait until predicate(self) holds; False if `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        while True:
            gen = self._generation
            if predicate(self):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self.wait_changed(gen, remaining)

    # -- lifecycle ---------------------------------------------------------------

    @abc.abstractmethod
    async def start(self, timeout: float | None = None) -> None:
        """Load the current members and begin following changes; returns once the
        first listing is in (DiscoveryError after `timeout`; it keeps trying)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop following changes. Idempotent."""

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- for implementations -------------------------------------------------------

    def _notify(self) -> None:
        self._generation += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        _call_listeners(self._listeners)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self._notify()

    def _put(self, info: common_pb2.NodeInfo) -> bool:
        """Insert or replace one node (keyed by role and node_id); True (and a
        notification) if the view changed."""
        role = parse_role(info.role)
        if self._view[role].get(info.node_id) == info:
            return False
        self._view[role][info.node_id] = info
        self._notify()
        return True

    def _remove(self, node_id: str, role: int | None = None) -> bool:
        roles = ROLE_NAMES if role is None else (role,)
        removed = [self._view[r].pop(node_id, None) is not None for r in roles]
        if any(removed):
            self._notify()
            return True
        return False

    def _replace_all(self, infos: Iterable[common_pb2.NodeInfo]) -> bool:
        """Make the view exactly `infos`; True (and one notification) if anything changed."""
        view: dict[int, dict[str, common_pb2.NodeInfo]] = {role: {} for role in ROLE_NAMES}
        for info in infos:
            view[parse_role(info.role)][info.node_id] = info
        if view == self._view:
            return False
        self._view = view
        self._notify()
        return True
