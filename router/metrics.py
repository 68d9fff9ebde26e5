"""Prometheus metrics of one router, on a CollectorRegistry of its own (never the
global one, so several routers can live in one process, as tests do), served
over HTTP at /metrics.

Names (all prefixed `braid_router_`):

  requests_total{code}           finished requests by final gRPC status name (OK, CANCELLED, ...)
  ttft_seconds                   arrival at the router -> first token sent to the client
  tpot_seconds                   time per output token after the first (decode time / (tokens - 1))
  overhead_seconds               router time before any node works on the request
                                 (validation, tokenization, routing), queueing excluded
  phase_seconds{phase}           queue, prefill, transfer, decode
  kv_bytes_total                 KV bytes moved from prefill to decode nodes
  reserved_blocks                sum of the decode nodes' reported Load.reserved_blocks
  inflight_requests              requests holding an admission slot
  queued_requests                requests waiting for a slot
  prefill_retries_total          prefill attempts beyond a request's first
  prefill_failures_total{code}   failed prefill attempts by status (node side)
  local_prefill_total            requests prefilled on their decode node
  output_tokens_total            tokens streamed to clients
  cached_prompt_tokens_total     prompt tokens the nodes took from their prefix caches (as reported in usage)
  nodes{role,reachable}          nodes in the view
  http_requests_total{route,status}  HTTP API requests (braid.router.http_api) by route and HTTP status
                                 (route "other" for paths it does not serve); each choice of one is
                                 also a request in requests_total
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

PREFIX = "braid_router"

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PHASES = ("queue", "prefill", "transfer", "decode")


class RouterMetrics:
    """The router's metrics; `serve(host, port)` exposes them over HTTP."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Finished requests by final status code", ["code"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_ttft_seconds", "Time to first token, seen by the router", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_tpot_seconds", "Time per output token after the first", buckets=_FAST_BUCKETS, registry=r)
        self.overhead = Histogram(
            f"{PREFIX}_overhead_seconds", "Router time before a node starts on the request (queueing excluded)",
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.phase = Histogram(f"{PREFIX}_phase_seconds", "Time per request phase", ["phase"], buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_bytes = Counter(f"{PREFIX}_kv_bytes", "KV cache bytes moved from prefill to decode nodes", registry=r)
        self.reserved_blocks = Gauge(f"{PREFIX}_reserved_blocks", "KV blocks reserved on decode nodes awaiting KV", registry=r)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "Requests holding an admission slot", registry=r)
        self.queued = Gauge(f"{PREFIX}_queued_requests", "Requests waiting for an admission slot", registry=r)
        self.prefill_retries = Counter(f"{PREFIX}_prefill_retries", "Prefill attempts beyond the first", registry=r)
        self.capacity_waits = Counter(f"{PREFIX}_capacity_waits", "Waits for a decode node with room for the KV", registry=r)
        self.prefill_failures = Counter(f"{PREFIX}_prefill_failures", "Failed prefill attempts by status", ["code"], registry=r)
        self.local_prefill = Counter(f"{PREFIX}_local_prefill", "Requests prefilled on their decode node", registry=r)
        self.output_tokens = Counter(f"{PREFIX}_output_tokens", "Tokens streamed to clients", registry=r)
        self.cached_prompt_tokens = Counter(f"{PREFIX}_cached_prompt_tokens",
                                            "Prompt tokens taken from the nodes' prefix caches", registry=r)
        self.nodes = Gauge(f"{PREFIX}_nodes", "Nodes in the router's view", ["role", "reachable"], registry=r)
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP API requests by route and status",
                                     ["route", "status"], registry=r)
        # the labelled children, looked up once: labels() takes a lock and builds a key on every
        # call, several times per request on the router's hot path
        self.phase_of = {phase: self.phase.labels(phase) for phase in PHASES}  # exported at 0 from the start
        self._requests_of: dict[str, object] = {}
        self._httpd = None
        self._thread: threading.Thread | None = None

    def request_done(self, code: str) -> None:
        """Count a finished request under its final status code name."""
        child = self._requests_of.get(code)
        if child is None:
            child = self._requests_of[code] = self.requests.labels(code)
        child.inc()

    def track_admission(self, inflight: Callable[[], int], queued: Callable[[], int]) -> None:
        """Read the gauges from the admission control at scrape time (plain int reads)."""
        self.inflight.set_function(inflight)
        self.queued.set_function(queued)

    def serve(self, host: str, port: int) -> str:
        """Serve /metrics on host:port (0 = a free port); returns "host:port"."""
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return f"{host}:{self._httpd.server_address[1]}"

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
