"""One node's settings: where its servers listen and its engine's concerns
(parallel, cache, scheduler, transfer), the engine's own dataclasses. The
cluster config (braid.cluster.config) holds one NodeConfig per node kind."""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field

from braid.engine.config import EngineConfig, EngineSettings, check_port, check_positive
from braid.proto.tls import TlsConfig, check_bind

ROLES = ("prefill", "decode")


@dataclass(frozen=True, kw_only=True)
class NodeConfig(EngineSettings):
    """A node: its servers, plus the engine settings (dtype, seed, parallel, cache,
    scheduler, transfer) it starts its engine with."""

    host: str = "127.0.0.1"
    """Address the node's servers bind to (0.0.0.0 inside a container)."""
    advertise_host: str | None = None
    """Address other components use to reach this node; defaults to host (or $POD_IP)."""
    port: int = 0
    """gRPC port; 0 picks a free port."""
    metrics_port: int = 0
    """Prometheus metrics HTTP port; 0 picks a free port, -1 disables."""
    node_id: str | None = None
    """Unique id in discovery; default: <role>-<host>-<port>."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: stop taking work, finish in-flight requests for up to this long."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """Transport security of the node's gRPC server (braid.proto.tls): its certificate, the
    CA its callers' certificates must chain to (mutual TLS), and `allowed_peers`, the
    certificate names allowed to call Reserve/Decode/Abort/Prefill/GetLoad (the router)."""

    def __post_init__(self):
        super().__post_init__()
        check_port(self, "port")
        check_port(self, "metrics_port", allow_off=True)
        check_positive(self, ("drain_timeout_s",), zero_ok=True)
        check_bind("node", self.host, self.tls)

    def advertised_host(self) -> str:
        return advertise_host(self.host, self.advertise_host)

    def engine_config(self, role: str, model_path: str) -> EngineConfig:
        """The engine this node runs: KV role from the node's kind, KV receivers on the node's host."""
        transfer = dataclasses.replace(
            self.transfer, role=role, host=self.host, advertise_host=self.advertised_host()
        )
        return EngineConfig(model_path=model_path, **dict(self.settings(), transfer=transfer))


def advertise_host(bind_host: str, configured: str | None) -> str:
    """The address others use to reach a server bound to `bind_host`."""
    if configured:
        return configured
    env = os.environ.get("BRAID_ADVERTISE_HOST") or os.environ.get("POD_IP")
    if bind_host in ("0.0.0.0", "::", ""):
        return env or socket.gethostbyname(socket.gethostname())
    return bind_host
