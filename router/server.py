"""The Router gRPC service: Generate (server streaming) and ListNodes.

    handle = await start_router(config.router, membership, tokenizer)   # membership already started
    handle.address            # "host:port" actually bound (port 0 = a free port)
    handle.metrics_address    # "host:port" of /metrics, or None when metrics_port = -1
    handle.http_address       # "host:port" of the OpenAI-compatible HTTP API, or None when http_port = -1
    await handle.stop(grace=5.0)

With `tls` set (braid.proto.tls) it serves TLS, requires client certificates
when `tls.ca` is set, admits to Generate only `tls.allowed_peers` (empty = any
certificate the CA signed), answers ListNodes only to `tls.admin_peers`, and
dials the nodes with its own certificate. The server is grpc.aio with the
standard health service ("" and braid.v1.Router report SERVING until stop) and
reflection. A request over MAX_REQUEST_BYTES (orchestrator) is refused with
INVALID_ARGUMENT naming its size; one over MAX_MESSAGE_BYTES never gets past
grpc (RESOURCE_EXHAUSTED). On SIGTERM the CLI calls
drain(router.drain_timeout_s) first: new Generate calls get UNAVAILABLE while
running streams finish. stop() turns health to NOT_SERVING, lets running calls
finish for `grace` seconds, cancels the rest (their nodes get aborts), then
closes the node channels and the metrics server. The HTTP API
(braid.router.http_server) runs in the same event loop over the same
orchestrator: drain refuses its new requests with 503, stop closes it with the
gRPC server. The membership belongs to the caller: it is neither started nor
closed here.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from braid.proto import router_pb2, router_pb2_grpc
from braid.proto.tls import PeerAllowList, TlsConfig, add_port, peer_names
from braid.router.admission import AdmissionControl
from braid.router.config import RouterConfig
from braid.router.http_server import HttpServer, start_http
from braid.router.metrics import RouterMetrics
from braid.router.nodes import NodeView
from braid.router.orchestrator import Orchestrator
from braid.router.policies import DECODE, PREFILL, make_policy

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message grpc reads off the wire; beyond it grpc answers RESOURCE_EXHAUSTED.
Requests between MAX_REQUEST_BYTES and this are read and refused with INVALID_ARGUMENT."""
MAX_SEND_BYTES = 64 * 1024 * 1024
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, orchestrator: Orchestrator, view: NodeView, tls: TlsConfig | None = None):
        self._orchestrator = orchestrator
        self._view = view
        self._tls = tls or TlsConfig()

    async def Generate(self, request, context):
        await self._orchestrator.generate(request, context)

    async def ListNodes(self, request, context):
        # node addresses and KV endpoints are for operators: under mutual TLS only an admin
        # certificate sees them; on plaintext loopback development it stays open
        tls = self._tls
        if tls.mutual and not (peer_names(context) & set(tls.admin_peers)):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "ListNodes needs an admin certificate (router.tls.admin_peers)")
        return router_pb2.ListNodesResponse(nodes=self._view.statuses())


@dataclass(eq=False)
class RouterHandle:
    address: str
    metrics_address: str | None
    server: grpc.aio.Server
    view: NodeView
    orchestrator: Orchestrator
    metrics: RouterMetrics
    health: HealthServicer
    http: HttpServer | None = None
    _stopped: bool = False

    @property
    def http_address(self) -> str | None:
        return self.http.address if self.http is not None else None

    async def drain(self, timeout: float) -> bool:
        """Before stop (on SIGTERM): health NOT_SERVING, new Generate calls refused with
        UNAVAILABLE, running streams given up to `timeout` s to finish; True if all did."""
        await self.health.enter_graceful_shutdown()
        return await self.orchestrator.drain(timeout)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Graceful stop (idempotent): refuse new calls, give running ones `grace` seconds."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        self.orchestrator.draining = True  # the HTTP API refuses new requests while both servers stop
        if self.http is not None:
            await asyncio.gather(self.server.stop(grace), self.http.close())
        else:
            await self.server.stop(grace)
        await self.orchestrator.close()
        await self.view.close()
        await asyncio.to_thread(self.metrics.close)


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, str):
        from braid.tokenizer import Tokenizer

        return Tokenizer(tokenizer)
    return tokenizer


def _grpc_server(rc: RouterConfig, orchestrator: Orchestrator, view: NodeView):
    """The gRPC server with the Router, health and reflection services (not yet bound)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
        ],
        # the allow-list only acts under mutual TLS; without it the interceptor would only
        # cost every call an extra await in grpc's handler lookup
        interceptors=[PeerAllowList(rc.tls, (ROUTER_SERVICE,))] if rc.tls.mutual else None,
    )
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(orchestrator, view, rc.tls), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (ROUTER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    return server, health


async def start_router(rc: RouterConfig, membership, tokenizer=None) -> RouterHandle:
    """Start the router on rc.host:rc.port; `tokenizer` (a braid Tokenizer or a
    model directory) enables text prompts and text deltas."""
    metrics = RouterMetrics()
    policies = {PREFILL: make_policy(rc.prefill_policy), DECODE: make_policy(rc.decode_policy)}
    admission = AdmissionControl(rc.max_inflight, rc.max_queued)
    metrics.track_admission(lambda: admission.inflight, lambda: admission.queued)

    def on_view_change(view: NodeView) -> None:
        metrics.reserved_blocks.set(view.reserved_blocks())
        counts = {(role, r): 0 for role in (PREFILL, DECODE) for r in ("true", "false")}
        for e in view.entries():
            counts[(e.role, "true" if e.reachable else "false")] += 1
        for (role, r), n in counts.items():
            metrics.nodes.labels(role, r).set(n)

    view = NodeView(
        membership, policies, load_poll_s=rc.load_poll_s, rpc_timeout_s=rc.node_rpc_timeout_s, on_change=on_view_change,
        tls=rc.tls, failures_to_drop=rc.node_failures_to_drop, failure_window_s=rc.node_failure_window_s,
    )
    orchestrator = Orchestrator(
        rc, view, policies[PREFILL], policies[DECODE], admission, metrics, tokenizer=_load_tokenizer(tokenizer)
    )
    server, health = _grpc_server(rc, orchestrator, view)
    try:
        port = add_port(server, f"{rc.host}:{rc.port}", rc.tls)
    except RuntimeError as e:
        raise OSError(f"router: cannot bind {rc.host}:{rc.port}: {e}") from None
    if port == 0:
        raise OSError(f"router: cannot bind {rc.host}:{rc.port}")
    metrics_address = None
    http = None
    await view.start()
    try:
        if rc.metrics_port >= 0:
            metrics_address = metrics.serve(rc.host, rc.metrics_port)
        if rc.http_port >= 0:
            http = await start_http(rc, orchestrator, view, metrics)
        await server.start()
    except BaseException:
        if http is not None:
            await http.close()
        await view.close()
        metrics.close()
        await server.stop(None)
        raise
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    address = f"{rc.host}:{port}"
    log.info("router: serving on %s (metrics: %s, HTTP API: %s)", address, metrics_address or "off",
             http.address if http is not None else "off")
    return RouterHandle(address, metrics_address, server, view, orchestrator, metrics, health, http)
