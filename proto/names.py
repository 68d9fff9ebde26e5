"""The one table between the wire's enums and the names the rest of braid speaks.

A request's life crosses these enums twice: nodes register under a `Role`
(discovery keys and the router's pools are named "prefill" / "decode"), and a
generation ends with a `FinishReason` that the decode node sets from the
engine's reason ("stop" / "length" / "abort") and the client turns back into
that name. Every layer converts through these tables so the spellings cannot
drift apart. UNSPECIFIED has no name on purpose: it is never a valid role or
reason to act on, so a lookup that misses it makes the caller decide.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from braid.proto import common_pb2

ROLE_NAMES: Mapping[int, str] = MappingProxyType({
    common_pb2.ROLE_PREFILL: "prefill",
    common_pb2.ROLE_DECODE: "decode",
})
"""Role enum value -> name; only the roles a node may register with."""

ROLES_BY_NAME: Mapping[str, int] = MappingProxyType({name: role for role, name in ROLE_NAMES.items()})
"""Name -> Role enum value (the inverse of ROLE_NAMES)."""

FINISH_REASON_NAMES: Mapping[int, str] = MappingProxyType({
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
})
"""FinishReason enum value -> the engine's and the client's name for it."""

FINISH_REASONS_BY_NAME: Mapping[str, int] = MappingProxyType(
    {name: reason for reason, name in FINISH_REASON_NAMES.items()}
)
"""Name -> FinishReason enum value (the inverse of FINISH_REASON_NAMES)."""

__all__ = ["FINISH_REASONS_BY_NAME", "FINISH_REASON_NAMES", "ROLES_BY_NAME", "ROLE_NAMES"]
