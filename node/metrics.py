"""A node's Prometheus metrics (its own registry, so several nodes can share a process in tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class NodeMetrics:
    def __init__(self, role: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("braid_node_requests", "Requests handled, by RPC and status", ["rpc", "status"], registry=r)
        self.free_blocks = Gauge("braid_node_free_kv_blocks", "Free KV blocks (per rank)", registry=r)
        self.reserved_blocks = Gauge("braid_node_reserved_kv_blocks", "KV blocks reserved for incoming KV", registry=r)
        self.running = Gauge("braid_node_running_seqs", "Sequences being decoded", registry=r)
        self.waiting = Gauge("braid_node_waiting_seqs", "Sequences waiting (queued or for KV)", registry=r)
        self.prefill_s = Histogram("braid_node_prefill_seconds", "Prefill time including KV transfer", registry=r,
                                   buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.kv_bytes = Counter("braid_node_kv_bytes", "KV bytes sent (prefill) or reserved for (decode)", registry=r)
        self.transfer_failures = Counter("braid_node_transfer_failures", "KV transfers that failed", registry=r)
        self.engine_up = Gauge("braid_node_engine_up", "1 while the engine runs; 0 once it died (the node then exits)",
                               registry=r)
        self.engine_up.set(1)

    def observe_load(self, load) -> None:
        self.free_blocks.set(load.free_kv_blocks)
        self.reserved_blocks.set(load.reserved_blocks)
        self.running.set(load.running_seqs)
        self.waiting.set(load.waiting_seqs)
