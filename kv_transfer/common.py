"""What the transports and both transfer books share: how an endpoint, a transfer id
and an error kind look on the wire, the failure of a connection, and the pieces of a
`send` merged into the runs a frame carries.

Every transfer passes through these: the decode side's endpoint string names where
the prefill side connects, the transfer id chosen at reservation travels in every
frame (checked against the wire format's id space), and a failure crosses the wire
as a kind code before the other side reports it as a TransferError.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .base import Piece, TransferError

REMEMBER = 8192  # ended transfers each book keeps to answer frames that come late
MAX_PIECES = 4096  # entries in one frame's piece table (every transport)
MAX_TRAILER = 1 << 20  # bytes of a FINISH's trailer (every transport)
MAX_SECRET = 64  # bytes of a transfer's secret, presented before its frames (every transport)

# An error kind on the wire: 1 + its index in TransferError.KINDS (every transport).
KIND_CODE = {k: i + 1 for i, k in enumerate(TransferError.KINDS)}
CODE_KIND = {v: k for k, v in KIND_CODE.items()}


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host.strip("[]"), int(port)


class TidSpace(NamedTuple):
    """The transfer ids a wire format can carry: 0 <= id < limit."""

    limit: int
    name: str

    def check(self, tid: int) -> None:
        if not 0 <= tid < self.limit:
            raise ValueError(f"transfer id must fit in {self.name}, got {tid}")


INT64_IDS = TidSpace(1 << 63, "int64")
U64_IDS = TidSpace(1 << 64, "u64")


class ConnFail(Exception):
    """A connection failed; its transfers fail with `kind`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def flat_bytes(region: torch.Tensor) -> torch.Tensor:
    """The region as a flat uint8 tensor on its own device (a view, no copy)."""
    if not region.is_contiguous():
        raise ValueError("a transport region must be a contiguous tensor")
    return region.view(-1).view(torch.uint8)


def merge_runs(pieces: Sequence[Piece]) -> list[tuple[int, int, int]]:
    """(src, dst, length) runs of the pieces, in order, contiguous pieces merged and
    empty ones left out: what one frame's piece table carries."""
    runs: list[tuple[int, int, int]] = []
    for p in pieces:
        if not p.length:
            continue
        if runs:
            s, d, n = runs[-1]
            if s + n == p.src_offset and d + n == p.dst_offset:
                runs[-1] = (s, d, n + p.length)
                continue
        runs.append((p.src_offset, p.dst_offset, p.length))
    return runs
