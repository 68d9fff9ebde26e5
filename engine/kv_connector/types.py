"""The engine-side records of a transfer that cross the engine's boundary: the
reservation a decode engine hands out, and the target a prefill engine pushes
into. The nodes translate them to and from protobuf (KVDestination); the KV
layout descriptor itself is the one braid.kv_transfer defines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reservation:
    """Blocks a decode engine holds for one prompt's KV, under a lease."""

    request_id: str
    transfer_id: int
    """Names the transfer on every rank of both sides (random, 62 bits)."""
    block_ids: tuple[int, ...]
    """The decode instance's block table for the prompt (same on every rank)."""
    num_tokens: int
    lease_deadline_unix: float
    """Wall-clock end of the lease: the reservation must be claimed and its KV
    arrived by then, or its blocks are freed and the request ends in an error."""


@dataclass(frozen=True)
class TransferTarget:
    """Where a prefill engine pushes a prompt's KV: a decode instance's blocks."""

    transfer_id: int
    layout: Any
    """The decode instance's KVLayout (braid.kv_transfer), with its endpoints."""
    block_ids: tuple[int, ...]
    num_tokens: int

    @staticmethod
    def of(reservation: Reservation, layout) -> "TransferTarget":
        """The target of a reservation made on an instance with this layout (a
        copy of it, so that changing the target never changes the instance's)."""
        own = type(layout)()
        own.CopyFrom(layout)
        return TransferTarget(reservation.transfer_id, own, reservation.block_ids, reservation.num_tokens)
