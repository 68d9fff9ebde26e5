"""The router's own settings (one section of the cluster config, braid.cluster.config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from braid.proto.tls import TlsConfig, check_bind

DEFAULT_ROUTER_PORT = 50051
DEFAULT_ROUTER_METRICS_PORT = 9400
DEFAULT_ROUTER_HTTP_PORT = 8000
POLICIES = ("round_robin", "least_loaded", "prefix_aware", "session_affinity")


@dataclass(frozen=True)
class RouterConfig:
    """Where the router listens, how it picks nodes, and its limits."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_ROUTER_PORT
    metrics_port: int = DEFAULT_ROUTER_METRICS_PORT
    http_port: int = DEFAULT_ROUTER_HTTP_PORT
    """The OpenAI-compatible HTTP API (braid.router.http_api) on `host`; 0 = a free port, -1 = off."""
    prefill_policy: str = "least_loaded"
    decode_policy: str = "least_loaded"
    max_inflight: int = 256
    """Requests being served at once; more wait in the queue."""
    max_queued: int = 1024
    """Requests waiting for a slot; beyond this the router answers RESOURCE_EXHAUSTED."""
    request_timeout_s: float = 600.0
    """Deadline of a request when the client sets none."""
    reserve_lease_s: float = 60.0
    """Lease on decode-side blocks reserved for a prefill's KV."""
    prefill_retries: int = 1
    """Retries of a failed prefill on another prefill node, within the request's deadline."""
    capacity_wait_s: float = 30.0
    """When every decode node says it has no room for a request's KV, how long the
    request waits (holding its admission slot, asking again with backoff) before it
    fails with RESOURCE_EXHAUSTED; always within its deadline. 0 = fail at once."""
    local_prefill_max_tokens: int = 0
    """Prompts this short (in tokens) are prefilled on the decode node itself; 0 = never."""
    load_poll_s: float = 0.5
    """How often the router refreshes each node's load."""
    node_rpc_timeout_s: float = 10.0
    """Deadline of control calls to nodes (Reserve, Abort, GetLoad)."""
    node_failures_to_drop: int = 3
    """Failed load polls in a row (timeouts, errors) that take a node out of routing; one
    answered poll puts it back. Evidence takes it out at once, whatever this says: its
    lease gone from discovery, GetLoad answering UNAVAILABLE (its engine died, or nothing
    listens), its health service saying NOT_SERVING, or a call to it failing UNAVAILABLE."""
    node_failure_window_s: float = 5.0
    """A run of failed load polls that has lasted this long (from its first failure) takes
    the node out even before it counts node_failures_to_drop (each slow poll waits up to
    node_rpc_timeout_s)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long in-flight streams may run to completion (new Generate calls
    are refused with UNAVAILABLE meanwhile) before the rest are cancelled."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """Transport security (braid.proto.tls): the router's certificate serves clients and is
    presented to the nodes; `ca` turns on mutual TLS (clients need a certificate);
    `server_name` is the name checked in the nodes' certificates; `allowed_peers` limits
    Generate to these client names (empty = any certificate the CA signed); `admin_peers`
    names who may call ListNodes."""

    def __post_init__(self):
        for name, lo in (("port", 0), ("metrics_port", -1), ("http_port", -1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 65535:
                raise ValueError(f"{name}: port {v!r} outside {lo}..65535")
        for name in ("prefill_policy", "decode_policy"):
            if getattr(self, name) not in POLICIES:
                raise ValueError(f"{name}: unknown policy {getattr(self, name)!r} (choose from {', '.join(POLICIES)})")
        positive = ("max_inflight", "request_timeout_s", "reserve_lease_s", "load_poll_s", "node_rpc_timeout_s",
                    "drain_timeout_s")
        for name in positive + ("max_queued", "prefill_retries", "local_prefill_max_tokens", "capacity_wait_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and name in positive):
                raise ValueError(f"{name}: must be {'> 0' if name in positive else '>= 0'}, got {v!r}")
        v = self.node_failures_to_drop
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"node_failures_to_drop: must be an integer >= 1, got {v!r}")
        v = self.node_failure_window_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"node_failure_window_s: must be > 0, got {v!r}")
        check_bind("router", self.host, self.tls)
