"""Engine configuration: one frozen dataclass per concern (parallel layout, KV
cache, scheduler, KV transfer), composed into EngineConfig. The cluster config
(braid.cluster.config) embeds these same classes, so every setting is defined
once. Each class checks its own fields when built (ValueError starting with
the field's name); `resolve` then checks what needs the model (head counts,
cache capacity) on rank 0 before any other process starts, and fills in the
derived defaults. The resolved config travels to the other ranks as JSON.

Torch-free at import: the scheduler and the cluster config import it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from braid.engine.kv_layout import ShardLayout
from braid.kv_transfer.layout import ELEMENT_SIZES
from braid.engine.topology import Topology
from braid.proto.sampling_rules import MAX_SPECULATIVE_TOKENS, SPECULATIVE_METHODS

DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
DEVICES = ("cpu", "cuda", "npu")
KV_ROLES = (None, "prefill", "decode", "both")
TRANSPORTS = ("tcp", "collective", "mooncake")
DTYPES = tuple(ELEMENT_SIZES)
"""float32, bfloat16, float16: the names kv_transfer.layout knows (one table for every layer)."""
FP8_WEIGHTS = ("dequantize", "keep")
"""Block-FP8 checkpoints: weights dequantized to dtype at load, or kept float8 with their scales."""


def check_positive(obj, names: tuple[str, ...], *, optional: bool = False, zero_ok: bool = False) -> None:
    """Each named field of `obj` a number > 0 (>= 0 with zero_ok; None allowed with optional)."""
    for name in names:
        v = getattr(obj, name)
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not zero_ok):
            raise ValueError(f"{name}: must be {'>= 0' if zero_ok else '> 0'}, got {v!r}")


def check_choice(obj, name: str, choices: tuple, what: str) -> None:
    v = getattr(obj, name)
    if v not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise ValueError(f"{name}: unknown {what} {v!r} (choose from {shown})")


def check_port(obj, name: str, *, allow_off: bool = False) -> None:
    """A TCP port, 0 = pick a free one; -1 = off where allow_off."""
    v, lo = getattr(obj, name), (-1 if allow_off else 0)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 65535:
        raise ValueError(f"{name}: port {v!r} outside {lo}..65535")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How one instance spreads over its ranks (world = tp * pcp processes)."""

    tensor_parallel_size: int = 1
    """Ranks that split heads and hidden dimensions."""
    prefill_context_parallel_size: int = 1
    """Ranks that split a prompt's tokens during prefill (PCP)."""
    decode_context_parallel_size: int = 1
    """TP ranks that shard the KV cache along tokens instead of holding copies (DCP); divides tp."""
    enable_expert_parallel: bool = False
    """MoE models: place routed experts whole on ranks (EP) instead of slicing each by TP."""
    expert_parallel_size: int | None = None
    """Ranks of one EP group (setting it enables EP); None = tensor_parallel_size when enabled.
    Divides tp, or is a multiple of tp dividing tp * pcp (EP across PCP ranks)."""
    device: str = "cpu"
    """cpu, cuda or npu; the collective backend follows (gloo, nccl, hccl)."""
    threads_per_rank: int | None = None
    """torch intra-op threads in each rank process; None splits the host's cores."""
    collective_timeout_s: float = 120.0
    """Deadline for any collective and for the ranks to start."""
    cpu_packed_weights: bool = True
    """On CPU: hold linear weights (and the LM head) packed, the same values in the layout
    the fastest kernel here reads: fp32 with AVX-512, braid's 16-row panels (C++,
    kernels/cpu_ext/gemm.cpp); else oneDNN's blocked layout, multiplied by oneDNN. Rounding
    differs from the plain `linear` at the order of 1e-6 relative. False: torch's plain layout."""
    graph_mode: bool = False
    """Decode steps (one token per sequence, no speculation, no MTP) run a compiled graph
    of the model (torch.compile, inductor), one per batch size of graph_batch_sizes, the
    batch padded up to the next; all compiled at start-up (tens of seconds each for a
    30-layer model here). Off by default: see the README's performance section."""
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Graph mode's padded batch sizes; a larger decode batch runs eagerly."""

    def __post_init__(self):
        check_positive(self, ("tensor_parallel_size", "prefill_context_parallel_size", "decode_context_parallel_size",
                              "collective_timeout_s"))
        check_positive(self, ("threads_per_rank", "expert_parallel_size"), optional=True)
        for name in ("enable_expert_parallel", "graph_mode", "cpu_packed_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        sizes = self.graph_batch_sizes
        if (not isinstance(sizes, (list, tuple)) or not sizes
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1024 for n in sizes)):
            raise ValueError(f"graph_batch_sizes: expected a list of batch sizes from 1 to 1024, got {sizes!r}")
        object.__setattr__(self, "graph_batch_sizes", tuple(sorted(set(sizes))))
        check_choice(self, "device", DEVICES, "device")
        self.topology  # noqa: B018 -- builds (and so checks) the topology

    @property
    def expert_parallel(self) -> int:
        """EP group size: 1 when EP is off."""
        if self.expert_parallel_size is not None:
            return self.expert_parallel_size
        return self.tensor_parallel_size if self.enable_expert_parallel else 1

    @property
    def topology(self) -> Topology:
        return Topology(tp=self.tensor_parallel_size, pcp=self.prefill_context_parallel_size,
                        dcp=self.decode_context_parallel_size, ep=self.expert_parallel)


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The paged KV cache of each rank."""

    block_size: int = 16
    """Tokens per physical KV block on each rank; the same on every instance that exchanges KV."""
    cp_kv_cache_interleave_size: int | None = None
    """Tokens stored together on one KV shard; defaults to block_size (required for P/D transfer)."""
    num_kv_blocks: int | None = None
    """Physical KV blocks per rank; None sizes the cache from kv_cache_bytes."""
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    """Per-rank KV memory when num_kv_blocks is None."""
    enable_prefix_caching: bool = True
    """Keep full KV blocks after their request ends and reuse them for prompts that
    start with the same tokens (hits counted in blocks of block_size tokens)."""

    def __post_init__(self):
        check_positive(self, ("block_size", "kv_cache_bytes"))
        check_positive(self, ("num_kv_blocks", "cp_kv_cache_interleave_size"), optional=True)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching: must be true or false, got {self.enable_prefix_caching!r}")
        ShardLayout(self.block_size, 1, self.cp_kv_cache_interleave_size)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_model_len: int | None = None
    """Longest sequence (prompt + output) served; None = min(max_position_embeddings, KV capacity)."""
    max_num_seqs: int = 64
    """Sequences in one batch at most."""
    max_num_batched_tokens: int = 8192
    """Prompt tokens computed in one step at most: a longer prompt is prefilled in
    chunks over several steps while running sequences keep decoding (a prompt that
    asks for prompt logprobs runs whole, alone if it must)."""

    def __post_init__(self):
        check_positive(self, ("max_num_seqs", "max_num_batched_tokens"))
        check_positive(self, ("max_model_len",), optional=True)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (braid.engine.spec_decode): each decode step verifies up
    to k proposed tokens per sequence and keeps the longest prefix the target model
    agrees with, plus its own next token. Exact: the output is the same as without it."""

    method: str = "ngram"
    """Proposer for requests that speculate: "ngram" (prompt lookup, no draft model),
    "draft" (`draft_model`, run greedily for k tokens on every rank) or "mtp" (the
    checkpoint's own multi-token-prediction layer, DeepSeek-V3's: the instance computes
    its KV in every step, in a cache layer after the model's; set it on the prefill
    instances of a P/D pair too, whose transfer then carries that layer)."""
    draft_model: str | None = None
    """A smaller checkpoint with the target's vocabulary (method "draft"): loaded on every rank
    with the target's TP/DCP/PCP layout, its own KV cache in the same block ids."""
    num_speculative_tokens: int = 0
    """Drafts per sequence per step (k) for requests that do not set their own; 0: off."""
    ngram_min: int = 1
    ngram_max: int = 3
    """N-gram lengths prompt lookup tries, longest first."""
    max_draft_tokens_per_step: int = 64
    """Drafts one step verifies at most, all sequences together: with a large batch each
    sequence's k is lowered (decode is then compute-bound and speculation pays less)."""
    pause_below_acceptance: float = 0.25
    """A sequence whose last SPEC_WINDOW verified drafts were accepted less often than this
    stops speculating for a while (4 decode steps, doubling on each pause up to 64): text
    that does not repeat its context pays for verifying drafts and gains nothing. 0: never."""

    def __post_init__(self):
        check_choice(self, "method", SPECULATIVE_METHODS, "speculative method")
        check_positive(self, ("ngram_min", "ngram_max"))
        check_positive(self, ("num_speculative_tokens", "max_draft_tokens_per_step"), zero_ok=True)
        if not 0 <= self.pause_below_acceptance <= 1:
            raise ValueError(f"pause_below_acceptance: must be in [0, 1], got {self.pause_below_acceptance!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens: at most {MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("draft_model: method 'draft' needs the draft checkpoint's path")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min: {self.ngram_min} is more than ngram_max {self.ngram_max}")


@dataclass(frozen=True, kw_only=True)
class KVTransferConfig:
    """Moving KV between instances (the KV connector)."""

    role: str | None = None
    """None (colocated), "prefill" (sends KV), "decode" (receives) or "both"; a node sets it from its kind."""
    transport: str = "tcp"
    """tcp, collective (gloo/nccl/hccl) or mooncake (RDMA)."""
    host: str = "127.0.0.1"
    """Address decode ranks bind their KV receivers to; a node sets it from its host."""
    port: int = 0
    """First KV receiver port (rank r uses port + r); 0 picks free ports."""
    advertise_host: str | None = None
    """Host put in the receivers' endpoints (defaults to host); a node sets it."""
    timeout_s: float = 60.0
    """Deadline of one request's KV transfer on the prefill side."""
    max_lease_s: float = 600.0
    """Longest reservation lease a decode engine grants; a Reserve asking for more is
    refused (INVALID_ARGUMENT), so nobody can hold blocks for ever."""
    max_reservations: int = 256
    """Reservations a decode engine holds at once (claimed or not, until their KV
    arrived or they ended); one more is refused (RESOURCE_EXHAUSTED)."""
    max_connections: int = 256
    """Sender connections each decode rank's tcp KV listener keeps open; at the cap the
    oldest idle one is closed to make room (or, with none idle, the new one)."""
    idle_timeout_s: float = 300.0
    """A tcp KV connection that begins no frame for this long is closed (an honest
    sender reconnects on its next frame)."""
    frame_timeout_s: float = 30.0
    """A tcp KV frame must arrive whole within this, plus 1 s per MiB of its payload."""

    def __post_init__(self):
        check_choice(self, "role", KV_ROLES, "KV role")
        check_choice(self, "transport", TRANSPORTS, "transport")
        check_port(self, "port")
        check_positive(self, ("timeout_s", "max_lease_s", "max_reservations", "max_connections", "idle_timeout_s",
                              "frame_timeout_s"))

    def receiver_limits(self) -> dict:
        """What the tcp transport's receivers are built with (the others take none)."""
        if self.transport != "tcp":
            return {}
        return {"max_connections": self.max_connections, "idle_timeout": self.idle_timeout_s,
                "frame_timeout": self.frame_timeout_s}


SECTIONS = {"parallel": ParallelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
            "transfer": KVTransferConfig, "speculative": SpeculativeConfig}
_FLAT_ALIASES = {"kv_role": "role", "kv_transport": "transport", "kv_host": "host", "kv_port": "port",
                 "kv_advertise_host": "advertise_host", "kv_timeout_s": "timeout_s", "kv_max_lease_s": "max_lease_s",
                 "kv_max_reservations": "max_reservations", "kv_max_connections": "max_connections",
                 "kv_idle_timeout_s": "idle_timeout_s", "kv_frame_timeout_s": "frame_timeout_s"}


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """What an engine runs with besides its model: the dtype, the sampler's seed and
    one section per concern. A node's config (braid.node.config.NodeConfig) extends it."""

    dtype: str = "float32"
    """Weights, activations and KV cache: float32, bfloat16 or float16."""
    seed: int = 0
    """Seed of the sampler for requests without their own."""
    fp8_weights: str = "dequantize"
    """Block-FP8 checkpoints (DeepSeek-V3/R1): "dequantize" each rank's weights to dtype at
    load, or "keep" them float8 with their block scales (about half the bytes of bf16) and
    dequantize in each matmul, with the same result. "keep" needs a block-FP8 checkpoint."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self):
        check_choice(self, "dtype", DTYPES, "dtype")
        check_choice(self, "fp8_weights", FP8_WEIGHTS, "fp8_weights mode")

    def settings(self) -> dict:
        """The EngineSettings fields of this object, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineSettings)}


@dataclass(frozen=True, kw_only=True)
class EngineConfig(EngineSettings):
    """Everything one engine instance needs."""

    model_path: str

    def __post_init__(self):
        super().__post_init__()
        if self.transfer.role is not None and self.cache.cp_kv_cache_interleave_size not in (None, self.cache.block_size):
            raise ValueError(
                f"cache.cp_kv_cache_interleave_size: {self.cache.cp_kv_cache_interleave_size} must equal "
                f"block_size {self.cache.block_size} when KV moves between instances (transfer.role={self.transfer.role})"
            )

    @classmethod
    def build(cls, model_path: str, **flat) -> "EngineConfig":
        """From flat keyword arguments (`tensor_parallel_size=2, block_size=16, kv_role="decode"`):
        each name goes to the section that defines it."""
        top = {k: flat.pop(k) for k in ("dtype", "seed", "fp8_weights") if k in flat}
        parts: dict[str, dict] = {name: {} for name in SECTIONS}
        if "speculative_method" in flat:  # "method" alone says little beside the other sections' names
            parts["speculative"]["method"] = flat.pop("speculative_method")
        for key, value in flat.items():
            name = _FLAT_ALIASES.get(key, key)
            section = next((s for s, c in SECTIONS.items() if name in {f.name for f in dataclasses.fields(c)}
                            and (s == "transfer") == (key in _FLAT_ALIASES)), None)
            if section is None:
                raise TypeError(f"unknown engine setting {key!r}")
            parts[section][name] = value
        return cls(model_path=model_path, **top, **{s: SECTIONS[s](**kw) for s, kw in parts.items()})

    @property
    def topology(self) -> Topology:
        return self.parallel.topology

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.cache.block_size, self.topology.cp_size, self.cache.cp_kv_cache_interleave_size)

    @property
    def torch_dtype(self):
        from braid.engine.model_config import parse_dtype

        return parse_dtype(self.dtype)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "EngineConfig":
        data = json.loads(text)
        return EngineConfig(**{k: SECTIONS[k](**v) if k in SECTIONS else v for k, v in data.items()})


def local_kv_heads(model, tp: int) -> int:
    return 1 if model.is_mla else max(1, model.num_kv_heads // tp)


def cache_layers(model, cfg: EngineConfig) -> int:
    """Layers of the KV cache: the model's, then its MTP layer's when the instance runs it
    (speculative.method "mtp"; only the first MTP layer drafts: DeepSeek-V3 ships one)."""
    return model.num_layers + (1 if cfg.speculative.method == "mtp" and model.mtp is not None else 0)


def kv_bytes_per_block(model, cfg: EngineConfig) -> int:
    """Bytes of one physical block, all layers, on one rank."""
    heads = local_kv_heads(model, cfg.parallel.tensor_parallel_size)
    return (cache_layers(model, cfg) * model.cache_components * heads * cfg.cache.block_size * model.cache_head_dim
            * ELEMENT_SIZES[cfg.dtype])


def _check_fp8_weights(cfg: EngineConfig, model) -> None:
    """`keep` on a checkpoint without block-FP8 weights is refused, not ignored: a
    deployment sized for float8 at rest would otherwise run out of memory later."""
    from braid.engine.fp8_checkpoint import fp8_block_size

    if cfg.fp8_weights == "keep" and fp8_block_size(model.raw, cfg.model_path) is None:
        raise ValueError(
            f"fp8_weights: 'keep' needs a block-FP8 checkpoint (config.json quantization_config quant_method "
            f"'fp8'); {cfg.model_path} has none: use fp8_weights 'dequantize'"
        )


def _draft_model(cfg: EngineConfig, target):
    """The draft model's ModelConfig (method "draft"), checked against the target and
    the layout; None without one. Method "mtp" needs the target's MTP layer."""
    from braid.engine.model_config import load_model_config
    from braid.engine.topology import validate_for_model

    spec = cfg.speculative
    if spec.method == "mtp" and target.mtp is None:
        raise ValueError(f"speculative.method 'mtp': {cfg.model_path} has no MTP layer (num_nextn_predict_layers "
                         f"with its tensors, as DeepSeek-V3's checkpoints ship); use ngram or draft")
    if spec.method != "draft":
        return None
    draft = load_model_config(spec.draft_model)
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"speculative.draft_model: its vocabulary ({draft.vocab_size}) is not the target's "
                         f"({target.vocab_size}); a draft must share the tokenizer")
    try:
        validate_for_model(cfg.topology, draft)
    except ValueError as e:
        raise ValueError(f"speculative.draft_model: {e}") from None
    return draft


def resolve(cfg: EngineConfig):
    """Validate what needs the model and fill in the derived defaults; returns
    (EngineConfig, ModelConfig). Raises ValueError naming the setting to change."""
    from braid.engine.model_config import load_model_config
    from braid.engine.topology import validate_for_model

    model = load_model_config(cfg.model_path)
    validate_for_model(cfg.topology, model)
    _check_fp8_weights(cfg, model)
    draft = _draft_model(cfg, model)
    layout = cfg.layout
    num_blocks = cfg.cache.num_kv_blocks
    if num_blocks is None:
        per_block = kv_bytes_per_block(model, cfg) + (kv_bytes_per_block(draft, cfg) if draft is not None else 0)
        num_blocks = max(1, cfg.cache.kv_cache_bytes // per_block)
    capacity = num_blocks * layout.virtual_block_size
    max_len = cfg.scheduler.max_model_len
    if max_len is None:
        max_len = min(model.max_position_embeddings, capacity)
    elif max_len > capacity:
        raise ValueError(
            f"max_model_len {max_len} exceeds the KV cache capacity of {capacity} tokens "
            f"({num_blocks} blocks x {layout.virtual_block_size} tokens); raise num_kv_blocks or lower max_model_len"
        )
    threads = cfg.parallel.threads_per_rank or max(1, (os.cpu_count() or 1) // cfg.topology.world)
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, threads_per_rank=threads),
        cache=dataclasses.replace(cfg.cache, num_kv_blocks=num_blocks),
        scheduler=dataclasses.replace(cfg.scheduler, max_model_len=max_len),
    ), model
