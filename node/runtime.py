"""The node runtime: the engine on its own thread (braid.engine.async_engine)
bridged to asyncio, the gRPC server (health, reflection, message limits,
graceful stop), registration with discovery, the Prometheus endpoint, load
reports and draining on shutdown.

A node's life:
  start   engine ranks up -> gRPC server listening (health NOT_SERVING) ->
          registered in etcd under its lease -> health SERVING
  serve   a lost lease makes it refuse new work (UNAVAILABLE) until it has
          re-registered; requests in flight go on
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

from braid.discovery.base import DiscoveryConfig
from braid.engine.async_engine import AsyncEngine
from braid.node.config import NodeConfig
from braid.node.metrics import NodeMetrics
from braid.proto import common_pb2
from braid.proto.names import ROLES_BY_NAME

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
        self._stopping = False

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
        self.server = grpc.aio.server(options=opts)
        add_servicer(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        port = self.server.add_insecure_port(f"{self.node.host}:{self.node.port}")
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
        # a node that lost its lease stops taking work until it is registered again
        if self._stopping:
            return
        self.accepting = bool(registered)
        if not registered:
            log.warning("%s node %s lost its registration; refusing new work", self.role, self.node_id)

    async def _publish_load(self) -> None:
        while True:
            if self.engine is not None:
                self.metrics.observe_load(self.load())
            await asyncio.sleep(0.5)

    def load(self) -> common_pb2.Load:
        return common_pb2.Load(**self.engine.load)

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
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None


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
