"""Shared helpers for the benchmarks: checkpoints built locally, timing, tables."""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from braid.engine.tiny import write_tiny_llama
from peer_steps import percentile  # one for every bench (peer_steps also runs where braid is not installed)

__all__ = ["BENCH_MODEL", "bench_model", "percentile", "table", "timed"]

BENCH_MODEL = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=65536,
    initializer_range=0.05,
)


def bench_model(root: str | None = None, **overrides) -> str:
    """A random Llama checkpoint (hidden 512, 4 layers, 8 heads, 1 KV head unless overridden)."""
    cfg = dict(BENCH_MODEL, **overrides)
    key = "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"
    root = root or os.path.join(tempfile.gettempdir(), "braid-bench")
    path = os.path.join(root, f"llama-{key}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        write_tiny_llama(path, seed=0, **cfg)
    return path


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
