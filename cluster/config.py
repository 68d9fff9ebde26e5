"""The cluster configuration: one YAML file describes every component (router,
prefill nodes, decode nodes, etcd); each `braid ... serve` command reads its
section and CLI flags override single fields
(`--set decode.cache.block_size=32`).

The tree is built from the components' own frozen dataclasses, one per
concern: RouterConfig (braid.router.config), NodeConfig (braid.node.config)
holding the engine's ParallelConfig, CacheConfig, SchedulerConfig and
KVTransferConfig (braid.engine.config), and EtcdConfig here. Each checks its
own fields when built; the loader adds the dotted path, so a bad value fails
at start with the field's name and the reason (ConfigError). Cross-section
rules (one block size on both sides) are checked here once.

Torch-free: the router process loads this too.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from braid.discovery.base import DiscoveryConfig
from braid.engine.config import CacheConfig, KVTransferConfig, ParallelConfig
from braid.node.config import NodeConfig
from braid.proto.tls import TlsConfig
from braid.router.config import (
    DEFAULT_ROUTER_HTTP_PORT, DEFAULT_ROUTER_METRICS_PORT, DEFAULT_ROUTER_PORT, POLICIES, RouterConfig,
)

DEFAULT_PREFILL_PORT = 50061
DEFAULT_PREFILL_METRICS_PORT = 9401
DEFAULT_DECODE_PORT = 50071
DEFAULT_DECODE_METRICS_PORT = 9402
DEFAULT_TRANSFER_PORT = 50100
"""First KV data port of a decode node; rank r listens on DEFAULT_TRANSFER_PORT + r."""

__all__ = [
    "DEFAULT_DECODE_METRICS_PORT", "DEFAULT_DECODE_PORT", "DEFAULT_PREFILL_METRICS_PORT", "DEFAULT_PREFILL_PORT",
    "DEFAULT_ROUTER_HTTP_PORT", "DEFAULT_ROUTER_METRICS_PORT", "DEFAULT_ROUTER_PORT", "DEFAULT_TRANSFER_PORT", "POLICIES",
    "ADMIN_IDENTITY", "NODE_IDENTITY", "ROUTER_IDENTITY",
    "ClusterConfig", "ConfigError", "EtcdConfig", "NodeConfig", "RouterConfig", "TlsConfig", "load_config", "to_dict",
]


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
    username: str = ""
    """etcd user when etcd has auth enabled (with password); empty = none."""
    password: str = field(default="", repr=False)
    """Password of `username`; prefer $BRAID_ETCD_PASSWORD over writing it in the file."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """TLS to etcd: `ca` verifies the members (set = https), `cert`/`key` is braid's client
    certificate when etcd wants one, `server_name` the name checked in members' certificates."""

    def __post_init__(self):
        if not self.endpoints:
            raise ValueError("endpoints: at least one endpoint is needed")
        for i, ep in enumerate(self.endpoints):
            host, _, port = ep.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"endpoints[{i}]: expected host:port, got {ep!r}")
        if bool(self.username) != bool(self.password):
            raise ValueError("username: set username and password together (or $BRAID_ETCD_PASSWORD)")
        for name in ("lease_ttl_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")

    def discovery(self, cluster: str) -> DiscoveryConfig:
        """What a node or a router needs to register or watch in `cluster`."""
        return DiscoveryConfig(endpoint=self.endpoints[0], failover_endpoints=tuple(self.endpoints[1:]),
                               cluster=cluster, lease_ttl_s=max(1, int(round(self.lease_ttl_s))), call_timeout_s=self.timeout_s,
                               username=self.username, password=self.password, ca_file=self.tls.ca,
                               cert_file=self.tls.cert, key_file=self.tls.key, server_name=self.tls.server_name)


ROUTER_IDENTITY = "braid-router"
"""Certificate name nodes admit by default under mutual TLS (tls.allowed_peers)."""
NODE_IDENTITY = "braid-node"
"""Name every node certificate carries; the router checks it when dialling a node (tls.server_name)."""
ADMIN_IDENTITY = "braid-admin"
"""Certificate name the router answers ListNodes for by default (router.tls.admin_peers)."""


def _default_prefill() -> NodeConfig:
    return NodeConfig(port=DEFAULT_PREFILL_PORT, metrics_port=DEFAULT_PREFILL_METRICS_PORT,
                      parallel=ParallelConfig(prefill_context_parallel_size=2),
                      tls=TlsConfig(allowed_peers=(ROUTER_IDENTITY,)))


def _default_decode() -> NodeConfig:
    return NodeConfig(port=DEFAULT_DECODE_PORT, metrics_port=DEFAULT_DECODE_METRICS_PORT,
                      parallel=ParallelConfig(tensor_parallel_size=2, decode_context_parallel_size=2),
                      transfer=KVTransferConfig(port=DEFAULT_TRANSFER_PORT),
                      tls=TlsConfig(allowed_peers=(ROUTER_IDENTITY,)))


def _default_router() -> RouterConfig:
    return RouterConfig(tls=TlsConfig(server_name=NODE_IDENTITY, admin_peers=(ADMIN_IDENTITY,)))


@dataclass(frozen=True)
class ClusterConfig:
    cluster: str = "braid"
    """Name under /braid/<cluster>/ in etcd; routers only see nodes of their cluster."""
    model: str = ""
    """HF checkpoint directory or GGUF file; empty = the default model (SmolLM2-135M-Instruct,
    installed by scripts/setup.sh); "tiny" = the embedded tiny random model."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """Shared TLS settings: every field set here fills the same field of router.tls,
    prefill.tls and decode.tls where that section leaves it unset (one CA, one
    certificate for all, or per-component certificates under each section)."""
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    router: RouterConfig = field(default_factory=_default_router)
    prefill: NodeConfig = field(default_factory=_default_prefill)
    decode: NodeConfig = field(default_factory=_default_decode)

    def node(self, role: str) -> NodeConfig:
        return {"prefill": self.prefill, "decode": self.decode}[role]

    def discovery(self) -> DiscoveryConfig:
        return self.etcd.discovery(self.cluster)


# -- building from plain data ------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _build(base, data: Any, path: str):
    """`base` (a dataclass instance) with the fields in `data` replaced,
    recursively; every error names `path.field`."""
    if data is None:
        return base
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown field (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(type(base))
    kwargs = {name: _coerce(getattr(base, name), hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return dataclasses.replace(base, **kwargs)
    except ValueError as e:  # the dataclass's own check: "field: reason"
        raise ConfigError(_join(path, str(e))) from None


def _int_list(value: Any, path: str) -> tuple:
    """A list of integers (YAML list, or "1,2,4" from an environment variable)."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{path}: expected a list of integers, got {value!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{path}: expected a list of integers, got {value!r}")
    return tuple(value)


def _coerce(default: Any, hint, value: Any, path: str):
    if dataclasses.is_dataclass(default):
        return _build(default, value, path)
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (int,):
        return _int_list(value, path)
    if typing.get_origin(hint) is tuple:
        kinds = {tuple}
        optional = False
    else:
        args = typing.get_args(hint)
        optional = type(None) in args
        kinds = {a for a in args if a is not type(None)} or {hint}
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: must not be empty")
    if bool in kinds:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tuple in kinds:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
        return tuple(value)
    if float in kinds:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if int in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
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


# -- validation across sections --------------------------------------------------


def validate(cfg: ClusterConfig) -> ClusterConfig:
    """What no single section can check on its own."""
    if not cfg.cluster or "/" in cfg.cluster:
        raise ConfigError(f"cluster: must be a non-empty name without '/', got {cfg.cluster!r}")
    if cfg.model and cfg.model != "tiny" and not os.path.isdir(cfg.model) and not os.path.isfile(cfg.model):
        raise ConfigError(f"model: {cfg.model!r} is not a directory or a GGUF file (nor \"tiny\", the embedded model)")
    for role in ("prefill", "decode"):
        cache: CacheConfig = cfg.node(role).cache
        if cache.cp_kv_cache_interleave_size not in (None, cache.block_size):
            raise ConfigError(
                f"{role}.cache.cp_kv_cache_interleave_size: must equal block_size ({cache.block_size}) "
                f"when KV crosses instances"
            )
    if cfg.prefill.cache.block_size != cfg.decode.cache.block_size:
        raise ConfigError(
            f"decode.cache.block_size: {cfg.decode.cache.block_size} differs from prefill.cache.block_size "
            f"{cfg.prefill.cache.block_size}; KV moves whole blocks, so both sides need one block size"
        )
    if cfg.router.reserve_lease_s > cfg.decode.transfer.max_lease_s:
        raise ConfigError(
            f"router.reserve_lease_s: {cfg.router.reserve_lease_s} exceeds decode.transfer.max_lease_s "
            f"{cfg.decode.transfer.max_lease_s}; decode nodes would refuse every Reserve"
        )
    return cfg


def read_data(path: str | None = None, overrides: list[str] = ()) -> dict:
    """The YAML file as plain data (empty without a path), `FIELD=VALUE` overrides applied."""
    data = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return apply_overrides(data, list(overrides))


def _spread_tls(data: dict) -> dict:
    """Copy the shared `tls` fields into each component's `tls` where it leaves them unset,
    before the sections are built: a component checks its bind address against its TLS."""
    shared = data.get("tls")
    if not isinstance(shared, dict):
        return data
    data = copy.deepcopy(data)
    for role in ("router", "prefill", "decode"):
        section = data.setdefault(role, {})
        if not isinstance(section, dict):
            continue  # _build reports the bad section
        own = section.setdefault("tls", {})
        if isinstance(own, dict):
            for name, value in shared.items():
                if own.get(name) in (None, "", [], ()):
                    own[name] = value
    return data


def _env_secrets(data: dict) -> dict:
    """etcd.password from $BRAID_ETCD_PASSWORD when the file does not give one (keeps it out of ConfigMaps)."""
    password = os.environ.get("BRAID_ETCD_PASSWORD")
    etcd = data.get("etcd") if isinstance(data.get("etcd"), dict) else {}
    if not password or not etcd.get("username") or etcd.get("password"):
        return data
    data = copy.deepcopy(data)
    data.setdefault("etcd", {})["password"] = password
    return data


def load_config(path: str | None = None, overrides: list[str] = (), data: dict | None = None) -> ClusterConfig:
    """Read the YAML file (or `data`), apply `FIELD=VALUE` overrides, validate."""
    data = read_data(path, overrides) if data is None else apply_overrides(data, list(overrides))
    return validate(_build(ClusterConfig(), _env_secrets(_spread_tls(data)), ""))


def to_dict(cfg: ClusterConfig) -> dict:
    """Plain data (lists for tuples) that load_config reads back to the same config."""

    def conv(v):
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))
