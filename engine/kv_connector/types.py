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
    secret: bytes = b""
    """Random per reservation: the decode ranks take KV only from senders that
    present it (it travels to the prefill node in the KVDestination)."""
    cached_blocks: int = 0
    """Leading blocks of block_size tokens the decode instance holds already (its
    prefix cache): the prefill node does not send them."""


@dataclass(frozen=True)
class TransferTarget:
    """Where a prefill engine pushes a prompt's KV: a decode instance's blocks."""

    transfer_id: int
    layout: Any
    """The decode instance's KVLayout (braid.kv_transfer), with its endpoints."""
    block_ids: tuple[int, ...]
    num_tokens: int
    secret: bytes = b""
    """The reservation's secret, presented to the decode ranks' receivers."""
    cached_blocks: int = 0
    """Leading blocks the decode instance holds already: not sent."""

    @staticmethod
    def of(reservation: Reservation, layout) -> "TransferTarget":
        """The target of a reservation made on an instance with this layout (a
        copy of it, so that changing the target never changes the instance's)."""
        own = type(layout)()
        own.CopyFrom(layout)
        return TransferTarget(reservation.transfer_id, own, reservation.block_ids, reservation.num_tokens,
                              reservation.secret, reservation.cached_blocks)


MAX_TRANSFER_ID = 1 << 63
"""Transfer ids every transport's frames carry (int64 on the collective wire)."""


def check_target(target: TransferTarget, own_layout, transport: str, num_prompt_tokens: int) -> None:
    """Refuse (ValueError, naming the field) a destination this prefill instance cannot
    push into: another transport, an incompatible or malformed layout, a token count
    other than the prompt's, too few or too many block ids (or ids outside the decode
    pool), an endpoint its transport cannot parse, an oversized secret. Checked when
    the request arrives, so a bad destination never reaches a rank's step."""
    from braid.kv_transfer.common import MAX_SECRET, parse_endpoint
    from braid.kv_transfer.layout import check_compatible
    from braid.kv_transfer.planner import check_block_ids, check_first_block

    check_compatible(own_layout, target.layout)
    if target.num_tokens != num_prompt_tokens or num_prompt_tokens < 1:
        raise ValueError(f"destination expects {target.num_tokens} tokens, the prompt has {num_prompt_tokens}")
    check_block_ids(target.layout, target.block_ids, target.num_tokens)
    check_first_block(target.cached_blocks, target.num_tokens, target.layout.block_size)
    if not 0 <= target.transfer_id < MAX_TRANSFER_ID:
        raise ValueError(f"destination transfer_id {target.transfer_id} outside [0, 2^63)")
    if len(target.secret) > MAX_SECRET:
        raise ValueError(f"destination secret of {len(target.secret)} bytes (at most {MAX_SECRET})")
    for r in target.layout.ranks:
        if transport == "mooncake":
            from braid.kv_transfer.mooncake import parse_mooncake_endpoint

            parse_mooncake_endpoint(r.endpoint)
        else:
            parse_endpoint(r.endpoint)
