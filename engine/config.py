"""Engine configuration: what the user asks for, validated and resolved once on
rank 0 (before any other process starts), then shipped to the other ranks as JSON."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from braid.engine.kv_layout import ShardLayout
from braid.engine.model_config import ModelConfig, load_model_config, parse_dtype
from braid.engine.topology import Topology, validate_for_model

DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model_path: str
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    device: str = "cpu"
    """cpu, cuda or npu; the collective backend follows (gloo, nccl, hccl)."""
    tensor_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    cp_kv_cache_interleave_size: int | None = None
    """Tokens stored together on one KV shard; defaults to block_size (required for P/D transfer)."""
    block_size: int = 16
    """Tokens per physical KV block on each rank."""
    num_kv_blocks: int | None = None
    """Physical KV blocks per rank; None sizes the cache from kv_cache_bytes."""
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    """Per-rank KV memory when num_kv_blocks is None."""
    max_model_len: int | None = None
    """Longest sequence served; defaults to min(max_position_embeddings, KV capacity)."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    seed: int = 0
    threads_per_rank: int | None = None
    """torch intra-op threads in each rank process; None splits the host's cores."""
    collective_timeout_s: float = 120.0
    """Deadline for any collective and for the ranks to start."""
    kv_role: str | None = None
    """KV transfer role: None (colocated), "prefill" (sends KV), "decode" (receives), "both"."""
    kv_transport: str = "tcp"
    """tcp, collective or mooncake."""
    kv_host: str = "127.0.0.1"
    """Address decode ranks bind their KV receivers to."""
    kv_port: int = 0
    """First KV receiver port (rank r uses kv_port + r); 0 picks free ports."""
    kv_advertise_host: str | None = None
    """Host put in the receivers' endpoints (defaults to kv_host)."""

    @property
    def topology(self) -> Topology:
        return Topology(
            tp=self.tensor_parallel_size,
            pcp=self.prefill_context_parallel_size,
            dcp=self.decode_context_parallel_size,
        )

    @property
    def layout(self) -> ShardLayout:
        topo = self.topology
        return ShardLayout(self.block_size, topo.cp_size, self.cp_kv_cache_interleave_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "EngineConfig":
        return EngineConfig(**json.loads(text))


def local_kv_heads(model: ModelConfig, tp: int) -> int:
    return 1 if model.is_mla else max(1, model.num_kv_heads // tp)


def kv_bytes_per_block(model: ModelConfig, cfg: EngineConfig) -> int:
    """Bytes of one physical block, all layers, on one rank."""
    item = torch.tensor([], dtype=cfg.torch_dtype).element_size()
    heads = local_kv_heads(model, cfg.tensor_parallel_size)
    return model.num_layers * model.cache_components * heads * cfg.block_size * model.cache_head_dim * item


def resolve(cfg: EngineConfig) -> tuple[EngineConfig, ModelConfig]:
    """Validate everything that can be checked without starting a rank and fill
    in the derived defaults. Raises ValueError naming the setting to change."""
    model = load_model_config(cfg.model_path)
    parse_dtype(cfg.dtype)
    if cfg.kv_role not in (None, "prefill", "decode", "both"):
        raise ValueError(f"kv_role must be None, prefill, decode or both, got {cfg.kv_role!r}")
    if cfg.kv_role is not None and cfg.kv_transport not in ("tcp", "collective", "mooncake"):
        raise ValueError(f"kv_transport must be tcp, collective or mooncake, got {cfg.kv_transport!r}")
    if cfg.kv_role is not None and cfg.cp_kv_cache_interleave_size not in (None, cfg.block_size):
        raise ValueError(
            f"cp_kv_cache_interleave_size {cfg.cp_kv_cache_interleave_size} must equal block_size {cfg.block_size} "
            f"when KV moves between instances (kv_role={cfg.kv_role})"
        )
    if cfg.device not in ("cpu", "cuda", "npu"):
        raise ValueError(f"device must be cpu, cuda or npu, got {cfg.device!r}")
    topo = cfg.topology
    validate_for_model(topo, model)
    layout = cfg.layout  # validates block and interleave sizes
    num_blocks = cfg.num_kv_blocks
    if num_blocks is None:
        num_blocks = max(1, cfg.kv_cache_bytes // kv_bytes_per_block(model, cfg))
    if num_blocks < 1:
        raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
    capacity = num_blocks * layout.virtual_block_size
    max_len = cfg.max_model_len
    if max_len is None:
        max_len = min(model.max_position_embeddings, capacity)
    elif max_len > capacity:
        raise ValueError(
            f"max_model_len {max_len} exceeds the KV cache capacity of {capacity} tokens "
            f"({num_blocks} blocks x {layout.virtual_block_size} tokens); raise num_kv_blocks or lower max_model_len"
        )
    if max_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_len}")
    threads = cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // topo.world)
    return dataclasses.replace(cfg, num_kv_blocks=num_blocks, max_model_len=max_len, threads_per_rank=threads), model
