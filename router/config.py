"""The cluster configuration: one YAML file describes every component (router,
prefill nodes, decode nodes, etcd); each `braid ... serve` command reads its
section and CLI flags override single fields (`--set decode.engine.block_size=32`).

Every field is validated when the file is loaded; a bad value fails at start
with the dotted field name and the reason (ConfigError).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

DEFAULT_ROUTER_PORT = 50051
DEFAULT_ROUTER_METRICS_PORT = 9400
DEFAULT_PREFILL_PORT = 50061
DEFAULT_PREFILL_METRICS_PORT = 9401
DEFAULT_DECODE_PORT = 50071
DEFAULT_DECODE_METRICS_PORT = 9402
DEFAULT_TRANSFER_PORT = 50100
"""First KV data port of a decode node; rank r listens on DEFAULT_TRANSFER_PORT + r."""

TRANSPORTS = ("tcp", "collective", "mooncake")
POLICIES = ("round_robin", "least_loaded", "prefix_aware", "session_affinity")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the field's dotted path."""


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    """etcd client endpoints, host:port."""
    lease_ttl_s: float = 10.0
    """Node registrations expire this long after a node stops renewing."""
    timeout_s: float = 5.0
    """Deadline of every etcd call."""


@dataclass(frozen=True)
class EngineSection:
    """Engine options of one node kind (see braid.engine.config.EngineConfig)."""

    tensor_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    cp_kv_cache_interleave_size: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 256 * 1024 * 1024
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    threads_per_rank: int | None = None
    collective_timeout_s: float = 120.0


@dataclass(frozen=True)
class TransferConfig:
    transport: str = "tcp"
    """KV transport: tcp (default), collective (gloo/nccl/hccl) or mooncake (RDMA)."""
    port: int = 0
    """First KV data port on a decode node (rank r uses port + r); 0 picks free ports."""
    timeout_s: float = 60.0
    """Deadline of one request's KV transfer."""


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"
    """Address the node's servers bind to (0.0.0.0 inside a container)."""
    advertise_host: str | None = None
    """Address other components use to reach this node; defaults to host (or $POD_IP)."""
    port: int = 0
    metrics_port: int = 0
    """Prometheus metrics HTTP port; 0 picks a free port, -1 disables."""
    node_id: str | None = None
    """Unique id in etcd; default: <role>-<host>-<port>."""
    engine: EngineSection = field(default_factory=EngineSection)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    drain_timeout_s: float = 30.0
    """On SIGTERM: stop taking work, finish in-flight requests for up to this long."""


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_ROUTER_PORT
    metrics_port: int = DEFAULT_ROUTER_METRICS_PORT
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


@dataclass(frozen=True)
class ClusterConfig:
    cluster: str = "braid"
    """Name under /braid/<cluster>/ in etcd; routers only see nodes of their cluster."""
    model: str = ""
    """HF checkpoint directory; empty = the embedded tiny default model."""
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    prefill: NodeConfig = field(
        default_factory=lambda: NodeConfig(
            port=DEFAULT_PREFILL_PORT,
            metrics_port=DEFAULT_PREFILL_METRICS_PORT,
            engine=EngineSection(prefill_context_parallel_size=2),
        )
    )
    decode: NodeConfig = field(
        default_factory=lambda: NodeConfig(
            port=DEFAULT_DECODE_PORT,
            metrics_port=DEFAULT_DECODE_METRICS_PORT,
            engine=EngineSection(tensor_parallel_size=2, decode_context_parallel_size=2),
            transfer=TransferConfig(port=DEFAULT_TRANSFER_PORT),
        )
    )

    def node(self, role: str) -> NodeConfig:
        return {"prefill": self.prefill, "decode": self.decode}[role]


# -- building from plain data ------------------------------------------------------


def _build(base, data: Any, path: str):
    """`base` (a dataclass instance) with the fields in `data` replaced,
    recursively, with type checks naming `path.field`."""
    if data is None:
        return base
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(getattr(base, name), known[name].type, value, _join(path, name))
    return dataclasses.replace(base, **kwargs)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(default: Any, type_str: str, value: Any, path: str):
    if dataclasses.is_dataclass(default):
        return _build(default, value, path)
    optional = "None" in str(type_str)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: must not be empty")
    if isinstance(default, bool) or "bool" in str(type_str):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if "tuple" in str(type_str):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
        return tuple(value)
    if "int" in str(type_str) and "float" not in str(type_str):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if "float" in str(type_str):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _parse_scalar(text: str):
    """A --set value: YAML scalar syntax (numbers, true/false, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {text!r}: {e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (copied)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected FIELD=VALUE")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


# -- validation ------------------------------------------------------------------


def _port(path: str, v: int, allow_off: bool = False) -> None:
    lo = -1 if allow_off else 0
    if not lo <= v <= 65535:
        raise ConfigError(f"{path}: port {v} outside {lo}..65535")


def _positive(path: str, v, allow_zero: bool = False) -> None:
    if v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def validate(cfg: ClusterConfig) -> ClusterConfig:
    if not cfg.cluster or "/" in cfg.cluster:
        raise ConfigError(f"cluster: must be a non-empty name without '/', got {cfg.cluster!r}")
    if cfg.model and not os.path.isdir(cfg.model):
        raise ConfigError(f"model: {cfg.model!r} is not a directory")
    if not cfg.etcd.endpoints:
        raise ConfigError("etcd.endpoints: at least one endpoint is needed")
    for i, ep in enumerate(cfg.etcd.endpoints):
        host, _, port = ep.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"etcd.endpoints[{i}]: expected host:port, got {ep!r}")
    _positive("etcd.lease_ttl_s", cfg.etcd.lease_ttl_s)
    _positive("etcd.timeout_s", cfg.etcd.timeout_s)
    r = cfg.router
    _port("router.port", r.port)
    _port("router.metrics_port", r.metrics_port, allow_off=True)
    for name in ("prefill_policy", "decode_policy"):
        if getattr(r, name) not in POLICIES:
            raise ConfigError(f"router.{name}: unknown policy {getattr(r, name)!r} (choose from {', '.join(POLICIES)})")
    for name in ("max_inflight", "request_timeout_s", "reserve_lease_s", "load_poll_s", "node_rpc_timeout_s"):
        _positive(f"router.{name}", getattr(r, name))
    for name in ("max_queued", "prefill_retries", "local_prefill_max_tokens", "capacity_wait_s"):
        _positive(f"router.{name}", getattr(r, name), allow_zero=True)
    for role in ("prefill", "decode"):
        n = cfg.node(role)
        _port(f"{role}.port", n.port)
        _port(f"{role}.metrics_port", n.metrics_port, allow_off=True)
        _port(f"{role}.transfer.port", n.transfer.port)
        if n.transfer.transport not in TRANSPORTS:
            raise ConfigError(f"{role}.transfer.transport: unknown transport {n.transfer.transport!r} (choose from {', '.join(TRANSPORTS)})")
        _positive(f"{role}.transfer.timeout_s", n.transfer.timeout_s)
        _positive(f"{role}.drain_timeout_s", n.drain_timeout_s, allow_zero=True)
        e = n.engine
        for name in ("tensor_parallel_size", "prefill_context_parallel_size", "decode_context_parallel_size", "block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            _positive(f"{role}.engine.{name}", getattr(e, name))
        if e.device not in ("cpu", "cuda", "npu"):
            raise ConfigError(f"{role}.engine.device: must be cpu, cuda or npu, got {e.device!r}")
        if e.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{role}.engine.dtype: must be float32, bfloat16 or float16, got {e.dtype!r}")
        inter = e.cp_kv_cache_interleave_size
        if inter is not None and inter != e.block_size:
            raise ConfigError(
                f"{role}.engine.cp_kv_cache_interleave_size: must equal block_size ({e.block_size}) when KV crosses instances"
            )
    if cfg.prefill.engine.block_size != cfg.decode.engine.block_size:
        raise ConfigError(
            f"decode.engine.block_size: {cfg.decode.engine.block_size} differs from prefill.engine.block_size "
            f"{cfg.prefill.engine.block_size}; KV moves whole blocks, so both sides need one block size"
        )
    return cfg


def load_config(path: str | None = None, overrides: list[str] = (), data: dict | None = None) -> ClusterConfig:
    """Read the YAML file (or `data`), apply `FIELD=VALUE` overrides, validate."""
    if data is None:
        data = {}
        if path:
            try:
                with open(path) as f:
                    data = yaml.safe_load(f) or {}
            except OSError as e:
                raise ConfigError(f"{path}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
    data = apply_overrides(data, list(overrides))
    return validate(_build(ClusterConfig(), data, ""))


def to_dict(cfg: ClusterConfig) -> dict:
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def engine_kwargs(section: EngineSection) -> dict:
    """EngineSection as keyword arguments for braid.engine.config.EngineConfig."""
    return dataclasses.asdict(section)
