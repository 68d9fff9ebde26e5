"""The node runtime: the engine on its own thread (braid.engine.async_engine)
bridged to asyncio, the gRPC server (health, reflection, message limits,
graceful stop), registration with discovery, the Prometheus endpoint, load
reports and draining on shutdown.

A node's life:
  start   engine ranks up -> gRPC server listening (health NOT_SERVING) ->
          registered in etcd under its lease -> health SERVING
  serve   while etcd is merely unreachable it keeps serving (routers keep their
          last view too); only a lease etcd confirms gone makes it refuse new
          work (UNAVAILABLE) until it has re-registered; requests in flight go on.
          Load reports are clamped into the wire's ranges, so they never fail; each
          carries what the prefix cache gained and lost since what the asking router
          holds (node.prefix_publish), read on the engine thread.
  death   the engine died (a rank process died): health NOT_SERVING, GetLoad
          UNAVAILABLE, lease revoked (routers drop it at once), `failed` set;
          the serve command then stops it and exits non-zero (to be restarted)
  stop    health NOT_SERVING, lease revoked (routers drop the node at once),
          requests in flight drain for up to drain_timeout_s, server stops,
          engine ranks exit
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from braid.discovery.base import LOST_LEASE_GONE, DiscoveryConfig
from braid.engine.async_engine import AsyncEngine, EngineDead
from braid.node.config import NodeConfig
from braid.node.metrics import NodeMetrics
from braid.node.prefix_publish import PrefixPublisher, read_engine
from braid.proto import common_pb2
from braid.proto.names import ROLES_BY_NAME
from braid.proto.tls import PeerAllowList, add_port

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PREFIX_REFRESH_S = 0.1
"""A GetLoad finding the prefix mirror older than this starts a refresh (it answers at once
from the mirror, so a router sees a change one poll later at most)."""


class NodeRuntime:
    def __init__(self, role: str, node: NodeConfig, *, model_path: str, discovery: DiscoveryConfig):
        self.role = role
        self.node = node
        self.model_path = model_path
        self.discovery = discovery
        self.metrics = NodeMetrics(role)
        self.engine: AsyncEngine | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.registration = None
        self.accepting = False
        self.address = ""
        self.metrics_address = ""
        self.node_id = ""
        self.inflight = 0
        self._metrics_server = None
        self._load_task: asyncio.Task | None = None
        self.prefix = PrefixPublisher()
        """The mirror of the engine's prefix cache that load reports publish (node.prefix_publish)."""
        self._prefix_task: asyncio.Task | None = None
        self._prefix_read_s = 0.0
        self._stopping = False
        self.service_name = ""
        self.fatal: BaseException | None = None
        """Why the engine died, once it has."""
        self.failed = asyncio.Event()
        """Set once the engine died and the node has left the pool."""

    # -- start -----------------------------------------------------------------
    async def start(self, add_servicer, service_name: str) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.node.engine_config(self.role, self.model_path)
        self.engine = await loop.run_in_executor(None, lambda: AsyncEngine(cfg, loop))
        opts = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
        # under mutual TLS only tls.allowed_peers (the router) reach the node's service
        self.server = grpc.aio.server(options=opts, interceptors=[PeerAllowList(self.node.tls, (service_name,))])
        add_servicer(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        port = add_port(self.server, f"{self.node.host}:{self.node.port}", self.node.tls)
        if port == 0:
            raise OSError(f"cannot bind {self.node.host}:{self.node.port}")
        await self.server.start()
        host = self.node.advertised_host()
        self.address = f"{host}:{port}"
        self.node_id = self.node.node_id or os.environ.get("BRAID_NODE_ID") or f"{self.role}-{host}-{port}"
        await self.health.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.node.metrics_port >= 0:
            server, _ = start_http_server(self.node.metrics_port, addr=self.node.host, registry=self.metrics.registry)
            self._metrics_server = server
            self.metrics_address = f"{host}:{server.server_port}"
        self._load_task = asyncio.create_task(self._publish_load())
        await self._register()
        for name in (service_name, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.accepting = True
        self.service_name = service_name
        self.engine.on_dead(self._engine_died)
        log.info("%s node %s serving on %s", self.role, self.node_id, self.address)

    def node_info(self) -> common_pb2.NodeInfo:
        core = self.engine.core
        cfg = core.config
        return common_pb2.NodeInfo(
            node_id=self.node_id,
            role=ROLES_BY_NAME[self.role],
            address=self.address,
            model_id=os.path.basename(os.path.normpath(self.model_path)),
            layout=core.kv_layout,
            capacity=common_pb2.Capacity(
                num_kv_blocks=cfg.cache.num_kv_blocks,
                tokens_per_block=cfg.layout.virtual_block_size,
                max_num_seqs=cfg.scheduler.max_num_seqs,
                max_model_len=cfg.scheduler.max_model_len,
            ),
            cluster=self.discovery.cluster,
            transport=cfg.transfer.transport,
            started_at_ms=int(time.time() * 1000),
            metrics_address=self.metrics_address,
        )

    async def _register(self) -> None:
        from braid.discovery.etcd import EtcdRegistration

        self.registration = EtcdRegistration(self.discovery, self.node_info())
        self.registration.add_listener(self._on_registered)
        await self.registration.start()

    def _on_registered(self, registered: bool, *_) -> None:
        if self._stopping or self.fatal is not None:
            return
        if registered:
            self.accepting = True
            return
        reason = self.registration.lost_reason if self.registration is not None else None
        if reason == LOST_LEASE_GONE:
            # etcd itself says the key is gone: routers have dropped this node, and work
            # still sent here comes from a stale view; refuse it until re-registered
            self.accepting = False
            log.warning("%s node %s: etcd confirms its lease is gone; refusing new work until re-registered",
                        self.role, self.node_id)
        else:
            # etcd does not answer: that is no evidence the node is unwanted, and routers
            # that cannot reach etcd either keep routing here; an outage must not stop serving
            log.warning("%s node %s: no lease renewal confirmed (%s); still serving while re-registering",
                        self.role, self.node_id, reason)

    def _engine_died(self, error: BaseException) -> None:
        """The engine is gone for good: leave the pool at once (see the module docstring)."""
        if self.fatal is not None:
            return
        self.fatal = error
        self.accepting = False
        self.metrics.engine_up.set(0)
        log.error("%s node %s: engine died (%s); leaving the pool", self.role, self.node_id, error)
        self._leave_task = asyncio.get_running_loop().create_task(self._leave_pool())  # held: not GC'd

    async def _leave_pool(self) -> None:
        try:
            for name in (self.service_name, ""):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.registration is not None:
                try:
                    await asyncio.wait_for(self.registration.close(), timeout=5)
                except Exception:  # noqa: BLE001 - etcd may be gone too; the lease then expires
                    log.warning("could not revoke the registration of %s", self.node_id)
        finally:
            self.failed.set()

    async def _publish_load(self) -> None:
        while True:
            if self.engine is not None and self.engine.dead is None:
                self._refresh_prefix()
                try:
                    self.metrics.observe_load(self.load())
                    self.metrics.observe_cache(self.prefix.reading)
                except Exception:  # noqa: BLE001 - metrics must not stop on one bad report
                    log.exception("load metrics failed")
            await asyncio.sleep(0.5)

    def _refresh_prefix(self) -> None:
        """Start reading the engine's prefix cache into the mirror, unless a read is under way.
        The read runs on the engine thread (between steps): the cache is never iterated
        while the engine mutates it."""
        if self._prefix_task is not None and not self._prefix_task.done():
            return
        self._prefix_read_s = time.monotonic()
        self._prefix_task = asyncio.get_running_loop().create_task(self._read_prefix())

    async def _read_prefix(self) -> None:
        since = self.prefix.seq_no
        try:
            reading = await self.engine.call(lambda core: read_engine(core, since))
        except Exception as e:  # noqa: BLE001 - a dead engine ends the node elsewhere; keep the last mirror
            log.debug("prefix cache read failed: %r", e)
            return
        self.prefix.apply(reading)

    def load(self) -> common_pb2.Load:
        """The engine's load as the wire message; EngineDead once the engine died (a
        stale snapshot must never make a dead node look idle)."""
        if self.engine is None or self.engine.dead is not None:
            raise EngineDead(str(self.fatal or "engine stopped"))
        return clamp_load(self.engine.load)

    async def get_load(self, context, request: common_pb2.LoadRequest | None = None) -> common_pb2.Load:
        """GetLoad's answer: the load with the prefix cache's changes since what the
        asking router holds (`request`), or UNAVAILABLE once the engine died."""
        try:
            load = self.load()
        except EngineDead as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} node {self.node_id}: engine stopped: {e}")
        if time.monotonic() - self._prefix_read_s > PREFIX_REFRESH_S:
            self._refresh_prefix()
        req = request or common_pb2.LoadRequest()
        delta = self.prefix.delta(req.cache_generation, req.cache_seq_no)
        if delta is not None:
            load.prefix_cache.CopyFrom(delta)
        return load

    # -- stop ------------------------------------------------------------------
    async def stop(self) -> None:
        """Drain and stop (idempotent)."""
        self._stopping = True
        self.accepting = False
        await self.health.enter_graceful_shutdown()
        if self.registration is not None:
            try:
                await asyncio.wait_for(self.registration.close(), timeout=5)
            except Exception:  # noqa: BLE001 - etcd may be gone; the lease then expires on its own
                log.warning("could not revoke the registration of %s", self.node_id)
            self.registration = None
        deadline = time.monotonic() + self.node.drain_timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.server is not None:
            await self.server.stop(grace=1.0)
            self.server = None
        if self._load_task is not None:
            self._load_task.cancel()
        if self._prefix_task is not None:
            self._prefix_task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None


def clamp_load(values: dict) -> common_pb2.Load:
    """A Load message from the engine's numbers, each clamped into its field's range
    (unsigned: negatives -> 0, too large -> the maximum; non-numbers -> 0) and unknown
    names ignored: a load report is never refused for its own numbers."""
    from google.protobuf.descriptor import FieldDescriptor

    out = {}
    for f in common_pb2.Load.DESCRIPTOR.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:  # prefix_cache: added by get_load, not a number
            continue
        try:
            v = int(values.get(f.name, 0))
        except (TypeError, ValueError, OverflowError):  # None, NaN, inf
            v = 0
        top = (1 << 32) - 1 if f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32) else (1 << 64) - 1
        out[f.name] = min(max(v, 0), top)
    return common_pb2.Load(**out)


async def start_node(role: str, node: NodeConfig, model_path: str, discovery: DiscoveryConfig,
                     make_servicer, add_servicer, service_name: str):
    """Start a node of `role` serving `make_servicer(runtime)`; returns (runtime, servicer)."""
    rt = NodeRuntime(role, node, model_path=model_path, discovery=discovery)
    holder = {}

    def add(server):
        holder["svc"] = make_servicer(rt)
        add_servicer(holder["svc"], server)

    await rt.start(add, service_name)
    return rt, holder["svc"]
