"""Discovery through etcd (with etcd_client, the only modules that import aetcd).

Keys: /braid/<cluster>/nodes/<role>/<node_id> -> NodeInfo (protobuf bytes), each
attached to its node's lease.

Life of a registration (EtcdRegistration):
  1. start(): grant a lease (lease_ttl_s), claim the key with it, `registered` -> True.
     The claim is one compare-and-put: it succeeds when the key is absent, hangs on
     one of our own leases, or names our own address (this node, restarted before
     its old lease expired). A key held by another address under a lease that is not
     ours is a second live node with the same node_id: the claim fails with
     NodeIdInUse and is retried with backoff, so it succeeds once that holder's lease
     ends; start() waits one lease TTL longer for that before it gives up naming the
     holder. Never overwriting a live holder matters: a silent overwrite hides one
     node from routing, and the first of the two to close deletes the other's key.
  2. Every TTL/3 (jittered) renew the lease with one keepalive, each under a deadline.
     A failed renewal is retried with backoff until the lease is presumed expired:
     one TTL after the last confirmed renewal was sent.
  3. Lease lost (etcd answers TTL 0: expired, revoked, or etcd came back without it)
     or presumed expired: `registered` -> False, listeners hear False with
     `lost_reason` LOST_LEASE_GONE (the node stops taking work) or LOST_UNREACHABLE
     (it keeps serving), and step 1 is retried with backoff (capped at backoff_max_s)
     until etcd answers; the key is put under the new lease, the old lease is
     revoked (best effort), `registered` -> True, `epoch` + 1.
  4. close(): stop renewing, revoke the lease (the key disappears at once).

Life of a membership view (EtcdMembership):
  1. List the prefix at revision R, replace the view, watch from R + 1 (no gap, no
     duplicate); `healthy` -> True once the watch is created.
  2. Apply PUT / DELETE events as they come.
  3. Any failure (etcd restart, connection loss, compaction, a watch that ends, a
     call past its deadline): `healthy` -> False, drop the watch and the client
     connection, wait with backoff, go to 1. The last known view is kept meanwhile.
  4. Every resync_interval_s, even without errors, go to 1 without dropping
     `healthy`: a watch that stalled silently cannot keep the view stale longer.

Every etcd call runs under a deadline (call_timeout_s); nothing is module-global.
The key layout is in `braid.discovery.keys`; the retry timing in `base.Backoff`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aetcd

from braid.discovery.base import (
    LOST_CLOSED,
    LOST_LEASE_GONE,
    LOST_UNREACHABLE,
    Backoff,
    DiscoveryConfig,
    DiscoveryError,
    Membership,
    NodeIdInUse,
    Registration,
    bounded,
    stop_task,
)
from braid.discovery.etcd_client import BraidEtcdClient
from braid.discovery.keys import node_key, nodes_prefix, parse_node_key  # re-exported from here too
from braid.proto import common_pb2
from braid.proto.names import ROLE_NAMES

log = logging.getLogger(__name__)


def _new_client(config: DiscoveryConfig) -> aetcd.Client:
    options = {
        # Reconnect soon after etcd comes back (gRPC's default backoff grows to 120 s).
        "grpc.initial_reconnect_backoff_ms": int(config.backoff_initial_s * 1000),
        "grpc.max_reconnect_backoff_ms": int(config.backoff_max_s * 1000),
        # Notice a dead connection under a silent watch; etcd's server policy allows
        # pings only every >= 5 s and only while a stream is open.
        "grpc.keepalive_time_ms": int(config.grpc_keepalive_s * 1000),
        "grpc.keepalive_timeout_ms": int(config.call_timeout_s * 1000),
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.http2.max_pings_without_data": 0,
    }
    # aetcd passes `timeout` as the gRPC deadline of every unary call and as the
    # limit on creating a watch; the client adds TLS, authentication and failover
    # across every configured endpoint (braid.discovery.etcd_client).
    return BraidEtcdClient(config, options)


async def _close_client(client: aetcd.Client | None, timeout: float) -> None:
    if client is None:
        return
    try:
        await bounded(client.close(), timeout)
    except Exception as e:  # a broken channel may fail to close; it is dropped either way
        log.debug("closing etcd client: %r", e)


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "etcd call timed out"
    return f"{type(e).__name__}: {e}"


class EtcdRegistration(Registration):
    """Publishes one NodeInfo under a lease; see the module docstring for the life cycle."""

    def __init__(self, config: DiscoveryConfig, info: common_pb2.NodeInfo):
        super().__init__(self._stamp(config, info))
        self._config = config
        self._key = node_key(config.cluster, info.role, info.node_id).encode()
        self._client: aetcd.Client | None = None
        self._task: asyncio.Task | None = None
        self._lease_id: int | None = None       # the lease our key is (or may be) attached to
        self._stale_leases: set[int] = set()    # earlier leases to revoke once re-registered
        self._lease_ttl = config.lease_ttl_s    # as granted by etcd
        self._expires = 0.0                     # monotonic time the lease is presumed gone
        self._put_lock = asyncio.Lock()
        self._last_error: BaseException | None = None  # of the latest failed registration attempt

    @staticmethod
    def _stamp(config: DiscoveryConfig, info: common_pb2.NodeInfo) -> common_pb2.NodeInfo:
        if info.cluster and info.cluster != config.cluster:
            raise ValueError(f"NodeInfo.cluster {info.cluster!r} differs from discovery cluster {config.cluster!r}")
        stamped = common_pb2.NodeInfo()
        stamped.CopyFrom(info)
        stamped.cluster = config.cluster
        return stamped

    @property
    def key(self) -> str:
        return self._key.decode()

    @property
    def lease_id(self) -> int | None:
        """The current lease while registered (a fencing token of this registration)."""
        return self._lease_id if self._registered else None

    @property
    def lease_ttl(self) -> int:
        return self._lease_ttl

    async def start(self, timeout: float | None = None) -> None:
        if self._closed:
            raise RuntimeError("registration is closed")
        if self._task is None:
            self._client = _new_client(self._config)
            self._task = asyncio.create_task(self._run(), name=f"braid-registration-{self._info.node_id}")
        timeout = self._config.start_timeout_s if timeout is None else timeout
        waiter = asyncio.ensure_future(self.wait_until(True))
        deadline = time.monotonic() + timeout
        extended = False
        try:
            while True:
                await asyncio.wait({waiter, self._task}, timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if self._registered or self._closed or self._task.done():
                    break
                if isinstance(self._last_error, NodeIdInUse) and not extended:
                    # the holder may be this node's own dead predecessor at another
                    # address: its lease ends within one TTL, give it that long
                    extended = True
                    deadline = max(deadline, time.monotonic() + self._config.lease_ttl_s + 1.0)
                    continue
                break
        finally:
            waiter.cancel()
        if self._registered:
            return
        if self._closed:
            raise RuntimeError("registration closed while starting")
        if isinstance(self._last_error, NodeIdInUse):
            raise NodeIdInUse(f"{self._last_error} (still retrying in the background)")
        raise DiscoveryError(
            f"could not register {self._info.node_id!r} with etcd at {self._config.endpoint} "
            f"within {timeout:.1f}s (still retrying in the background)"
            + (f"; last error: {_describe(self._last_error)}" if self._last_error is not None else "")
        )

    async def update(self, info: common_pb2.NodeInfo) -> None:
        info = self._stamp(self._config, info)
        self._check_update(info)
        self._info = info  # every later (re-)registration publishes it
        lease = self._lease_id  # set from the grant on, so a registration in flight is covered
        if lease is None:
            return
        try:
            await self._put(lease)
        except Exception as e:
            raise DiscoveryError(f"could not publish the new NodeInfo now: {_describe(e)}") from e

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await stop_task(self._task, self._config.call_timeout_s)
        if self._client is not None and self._lease_id is not None:
            try:
                await bounded(self._client.revoke_lease(self._lease_id), self._config.call_timeout_s)
            except Exception as e:
                log.warning("node %s: could not revoke lease %x (%s); its key expires within %ss",
                            self._info.node_id, self._lease_id, _describe(e), self._lease_ttl)
        self._lease_id = None
        self._set_registered(False, LOST_CLOSED)
        await _close_client(self._client, self._config.call_timeout_s)
        self._client = None

    # -- background ------------------------------------------------------------------

    async def _run(self) -> None:
        cfg = self._config
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
        while not self._closed:  # (and cancellation) ends it
            if not self._registered:
                try:
                    await self._register()
                    backoff.reset()
                    self._last_error = None
                except Exception as e:
                    self._last_error = e
                    delay = backoff.next()
                    log.log(backoff.log_level(), "node %s: registration failed (%s); retrying in %.2fs",
                            self._info.node_id, _describe(e), delay)
                    await asyncio.sleep(delay)
                continue
            await asyncio.sleep(min(self._lease_ttl / 3 * random.uniform(0.7, 1.0),
                                    max(0.0, self._expires - time.monotonic())))
            await self._renew()

    async def _put(self, lease_id: int) -> None:
        async with self._put_lock:  # serializes with update(): the newest info lands last
            value = self._info.SerializeToString()
            await bounded(self._client.put(self._key, value, lease=lease_id), self._config.call_timeout_s)

    async def _claim(self, lease_id: int) -> None:
        """Put our key under `lease_id` unless another live node holds it (see the
        module docstring); one compare-and-put on the revision we inspected."""
        cfg, tx = self._config, self._client.transactions
        async with self._put_lock:
            current = await bounded(self._client.get(self._key), cfg.call_timeout_s)
            if current is None:
                guard = tx.version(self._key) == 0
            else:
                if current.lease not in (lease_id, *self._stale_leases):
                    holder = common_pb2.NodeInfo()
                    with contextlib.suppress(Exception):
                        holder.ParseFromString(current.value)
                    if holder.address != self._info.address:
                        raise NodeIdInUse(
                            f"node_id {self._info.node_id!r} is already registered by a live node at "
                            f"{holder.address or '(unknown address)'} (lease {current.lease:x}); this node is at "
                            f"{self._info.address}: give every node its own node_id")
                    log.warning("node %s: taking over its key from lease %x (same address %s: a restart)",
                                self._info.node_id, current.lease, holder.address)
                guard = tx.mod(self._key) == current.mod_revision
            value = self._info.SerializeToString()
            ok, _ = await bounded(
                self._client.transaction(compare=[guard], success=[tx.put(self._key, value, lease=lease_id)],
                                         failure=[]),
                cfg.call_timeout_s)
            if not ok:
                raise DiscoveryError(f"node {self._info.node_id!r}: its key changed while registering; retrying")

    async def _register(self) -> None:
        cfg = self._config
        sent = time.monotonic()
        lease = await bounded(self._client.lease(cfg.lease_ttl_s), cfg.call_timeout_s)
        if self._lease_id is not None:
            self._stale_leases.add(self._lease_id)
        self._lease_id = lease.id  # before the put, so close() revokes it even if cancelled mid-put
        await self._claim(lease.id)
        self._lease_ttl = lease.ttl
        self._expires = sent + lease.ttl
        self._set_registered(True)
        log.info("node %s registered at %s (lease %x, ttl %ss, epoch %d)",
                 self._info.node_id, self.key, lease.id, lease.ttl, self._epoch)
        # The key now hangs on the new lease, so revoking older ones cannot remove it.
        stale, self._stale_leases = self._stale_leases, set()
        for old in stale:
            with contextlib.suppress(Exception):
                await bounded(self._client.revoke_lease(old), cfg.call_timeout_s)

    async def _renew(self) -> None:
        """One renewal: returns once etcd confirmed the lease, or after marking it lost."""
        cfg = self._config
        retry = Backoff(cfg.backoff_initial_s, max(cfg.backoff_initial_s, min(cfg.backoff_max_s, self._lease_ttl / 3)))
        while True:
            sent = time.monotonic()
            remaining = self._expires - sent
            if remaining <= 0:
                self._lose(LOST_UNREACHABLE, f"no renewal confirmed within the {self._lease_ttl}s lease TTL")
                return
            try:
                reply = await bounded(self._client.refresh_lease(self._lease_id), min(cfg.call_timeout_s, remaining))
            except Exception as e:
                log.debug("node %s: lease renewal failed: %s", self._info.node_id, _describe(e))
                await asyncio.sleep(min(retry.next(), max(0.0, self._expires - time.monotonic())))
                continue
            if reply is None:  # the keepalive stream closed without answering
                await asyncio.sleep(min(retry.next(), max(0.0, self._expires - time.monotonic())))
                continue
            if reply.TTL <= 0:  # etcd answers TTL 0 for a lease it does not know
                self._lose(LOST_LEASE_GONE, "etcd no longer knows it (expired, revoked or etcd lost its data)")
                return
            self._expires = sent + reply.TTL
            return

    def _lose(self, kind: str, reason: str) -> None:
        log.warning("node %s: lease %x lost: %s; re-registering", self._info.node_id, self._lease_id, reason)
        self._stale_leases.add(self._lease_id)
        self._lease_id = None
        self._set_registered(False, kind)


class EtcdMembership(Membership):
    """The router's view of /braid/<cluster>/nodes/; see the module docstring."""

    def __init__(self, config: DiscoveryConfig):
        super().__init__()
        self._config = config
        self._prefix = nodes_prefix(config.cluster)
        self._client: aetcd.Client | None = None
        self._watch = None
        self._task: asyncio.Task | None = None
        self._listed = False
        self._closed = False
        self.revision = 0
        """etcd revision the view reflects."""
        self.relists = 0
        """Listings done: one per start, error recovery and resync."""
        self.failures = 0
        """Times the list/watch failed and was re-established."""
        self.divergences = 0
        """Resyncs that found the watched view wrong (a watch missed events)."""

    async def start(self, timeout: float | None = None) -> None:
        if self._closed:
            raise RuntimeError("membership is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"braid-membership-{self._config.cluster}")
        timeout = self._config.start_timeout_s if timeout is None else timeout
        waiter = asyncio.ensure_future(self.wait_for(lambda m: m._listed, timeout))
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._listed:
            return
        if self._closed:
            raise RuntimeError("membership closed while starting")
        raise DiscoveryError(
            f"could not list nodes from etcd at {self._config.endpoint} within {timeout:.1f}s "
            "(still retrying in the background)"
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await stop_task(self._task, self._config.call_timeout_s)
        await self._drop_watch()
        await _close_client(self._client, self._config.call_timeout_s)
        self._client = None
        self._set_healthy(False)

    # -- background ------------------------------------------------------------------

    async def _run(self) -> None:
        cfg = self._config
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
        while not self._closed:  # (and cancellation) ends it
            try:
                await self._list_and_watch(backoff)
                continue  # resync time: list again, still healthy
            except Exception as e:
                self.failures += 1
                delay = backoff.next()
                self._set_healthy(False)
                log.log(backoff.log_level(), "cluster %s: membership list/watch failed (%s); re-listing in %.2fs",
                        cfg.cluster, _describe(e), delay)
            # A fresh connection next time: nothing of the broken stream is reused.
            await self._drop_watch()
            await _close_client(self._client, cfg.call_timeout_s)
            self._client = None
            await asyncio.sleep(delay)

    async def _list_and_watch(self, backoff: Backoff) -> None:
        """List, watch from the next revision, apply events until resync time (returns)
        or a failure (raises)."""
        cfg = self._config
        if self._client is None:
            self._client = _new_client(cfg)
        prefix = self._prefix.encode()
        listing = await bounded(self._client.get_prefix(prefix), cfg.call_timeout_s)
        self._apply_listing(listing.kvs, listing.header.revision)
        self._watch = await bounded(
            self._client.watch_prefix(prefix, start_revision=listing.header.revision + 1), cfg.call_timeout_s)
        self._listed = True
        self._set_healthy(True)
        backoff.reset()
        resync_at = time.monotonic() + cfg.resync_interval_s * random.uniform(0.9, 1.1)
        events = self._watch.__aiter__()
        try:
            while True:
                remaining = resync_at - time.monotonic()
                if remaining <= 0:
                    return
                try:
                    event = await bounded(events.__anext__(), remaining)
                except asyncio.TimeoutError:
                    return
                except StopAsyncIteration:
                    raise ConnectionError("etcd watch ended") from None
                self._apply_event(event)
        finally:
            await self._drop_watch()

    async def _drop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            try:
                await bounded(watch.cancel(), self._config.call_timeout_s)
            except Exception as e:
                log.debug("cancelling etcd watch: %r", e)

    # -- applying etcd data to the view ------------------------------------------------

    def _decode(self, key: bytes, value: bytes) -> common_pb2.NodeInfo | None:
        parsed = parse_node_key(self._prefix, key.decode(errors="replace"))
        if parsed is None:
            log.debug("ignoring key %r: not /braid/<cluster>/nodes/<role>/<node_id>", key)
            return None
        role, node_id = parsed
        try:
            info = common_pb2.NodeInfo.FromString(value)
        except Exception as e:
            log.warning("ignoring %r: not a NodeInfo (%s)", key, e)
            return None
        if info.node_id != node_id or info.role != role:
            log.warning("ignoring %r: its NodeInfo says node %r role %s", key, info.node_id,
                        ROLE_NAMES.get(info.role, info.role))
            return None
        return info

    def _apply_listing(self, kvs, revision: int) -> None:
        infos = [info for kv in kvs if (info := self._decode(kv.key, kv.value)) is not None]
        resync = self._listed and self._healthy
        changed = self._replace_all(infos)
        if changed and resync:
            self.divergences += 1
            log.warning("cluster %s: resync at revision %d found changes the watch had not delivered",
                        self._config.cluster, revision)
        self.revision = revision
        self.relists += 1

    def _apply_event(self, event) -> None:
        key = event.kv.key.decode(errors="replace")
        self.revision = max(self.revision, event.kv.mod_revision)
        parsed = parse_node_key(self._prefix, key)
        if parsed is None:
            return
        role, node_id = parsed
        if event.kind == aetcd.EventKind.DELETE:
            self._remove(node_id, role)
            return
        info = self._decode(event.kv.key, event.kv.value)
        if info is None:  # a malformed value replaced the node's key: it is not routable
            self._remove(node_id, role)
        else:
            self._put(info)
