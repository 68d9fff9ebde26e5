"""A node's Prometheus metrics (its own registry, so several nodes can share a process in tests).

Load gauges come from the engine's load snapshot; the prefix cache and chunked
prefill counters from the engine reading the node takes on the engine thread
(braid.node.prefix_publish.EngineReading), every 0.5 s:

  braid_node_prefix_queried_blocks_total   full prompt blocks looked up in the prefix cache
  braid_node_prefix_hit_blocks_total       of those, found (reused)
  braid_node_prefix_hit_rate               hit / queried blocks since the engine started
  braid_node_prefix_cached_tokens_total    prompt tokens reused from the cache (hit blocks * block size)
  braid_node_prefix_evicted_blocks_total   cached virtual blocks evicted to make room
  braid_node_prefix_copied_blocks_total    partly hit virtual blocks copied (copy on write)
  braid_node_prefix_cached_blocks          virtual blocks the cache holds now (idle or in use)
  braid_node_prefill_partial_chunks_total  prompt chunks that did not finish their prompt (a prompt over
                                           the step's token budget runs in several chunks: all but its last)
"""
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
        self._cache_counters = {
            name: Counter(f"braid_node_prefix_{name}", doc, registry=r) for name, doc in (
                ("queried_blocks", "Full prompt blocks looked up in the prefix cache"),
                ("hit_blocks", "Prompt blocks found in the prefix cache"),
                ("cached_tokens", "Prompt tokens reused from the prefix cache"),
                ("evicted_blocks", "Cached KV blocks evicted to make room"),
                ("copied_blocks", "Partly hit KV blocks copied (copy on write)"),
            )
        }
        self._cache_counters["num_chunks"] = Counter("braid_node_prefill_partial_chunks",
                                                     "Prompt chunks that did not finish their prompt", registry=r)
        self._cache_counters["graph_steps"] = Counter("braid_node_graph_steps",
                                                      "Decode steps run through a compiled graph (parallel.graph_mode)",
                                                      registry=r)
        self.prefix_hit_rate = Gauge("braid_node_prefix_hit_rate", "Prefix cache hit blocks / queried blocks",
                                     registry=r)
        self.prefix_cached_blocks = Gauge("braid_node_prefix_cached_blocks", "KV blocks the prefix cache holds",
                                          registry=r)
        self._spec_counters = {
            name: Counter(f"braid_node_spec_{name}", doc, registry=r) for name, doc in (
                ("seq_steps", "Decode steps of one sequence that verified drafts (speculative decoding)"),
                ("draft_tokens", "Draft tokens proposed and verified"),
                ("accepted_tokens", "Draft tokens the target model accepted"),
                ("emitted_tokens", "Tokens speculating steps produced (accepted drafts + the target's own)"),
                ("draft_s", "Seconds spent proposing drafts"),
            )
        }
        self.spec_acceptance = Gauge("braid_node_spec_acceptance_rate", "Accepted / verified draft tokens",
                                     registry=r)
        self.spec_tokens_per_step = Gauge("braid_node_spec_tokens_per_step",
                                          "Mean tokens a speculating sequence gains per decode step", registry=r)
        self._cache_seen: dict[str, float] = {}
        """The cumulative engine counts already added to the counters."""

    def observe_load(self, load) -> None:
        self.free_blocks.set(load.free_kv_blocks)
        self.reserved_blocks.set(load.reserved_blocks)
        self.running.set(load.running_seqs)
        self.waiting.set(load.waiting_seqs)

    def observe_cache(self, reading) -> None:
        """Counters from an EngineReading (cumulative engine counts: each adds what is new)."""
        totals = dict(reading.stats)
        totals["cached_tokens"] = totals.get("hit_blocks", 0) * reading.block_size
        totals["num_chunks"] = reading.num_chunks
        totals["graph_steps"] = reading.graph_steps
        self._add_new(self._cache_counters, totals, "")
        self._add_new(self._spec_counters, reading.spec, "spec:")
        if reading.spec:
            self.spec_acceptance.set(reading.spec["acceptance_rate"])
            self.spec_tokens_per_step.set(reading.spec["tokens_per_step"])
        queried = totals.get("queried_blocks", 0)
        self.prefix_hit_rate.set(totals.get("hit_blocks", 0) / queried if queried else 0.0)
        self.prefix_cached_blocks.set(reading.cached_blocks)

    def _add_new(self, counters: dict, totals: dict, prefix: str) -> None:
        """Add to each counter what its cumulative engine total gained since the last reading."""
        for name, counter in counters.items():
            value = totals.get(name, 0)
            new = value - self._cache_seen.get(prefix + name, 0)
            if new > 0:
                counter.inc(new)
                self._cache_seen[prefix + name] = value
