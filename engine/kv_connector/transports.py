"""Opening a rank's KV transport by name (tcp, collective or mooncake); each
module is imported only when asked for, so an unused one costs nothing."""
from __future__ import annotations

import torch

from braid.kv_transfer.base import KVReceiver, KVSender

TRANSPORTS = ("tcp", "collective", "mooncake")


def _unknown(transport: str) -> ValueError:
    return ValueError(f"unknown KV transport {transport!r} (choose {', '.join(TRANSPORTS)})")


def make_receiver(transport: str, region: torch.Tensor, host: str, port: int, limits: dict | None = None) -> KVReceiver:
    """`limits`: the tcp receiver's connection cap and timeouts (KVTransferConfig.receiver_limits)."""
    if transport == "tcp":
        from braid.kv_transfer.tcp import TcpReceiver

        return TcpReceiver(region, host=host, port=port, **(limits or {}))
    if transport == "collective":
        from braid.kv_transfer.collective import CollectiveReceiver

        return CollectiveReceiver(region, host=host, port=port)
    if transport == "mooncake":
        from braid.kv_transfer.mooncake import MooncakeReceiver

        return MooncakeReceiver(region, host=host, port=port)
    raise _unknown(transport)


def make_sender(transport: str, region: torch.Tensor) -> KVSender:
    if transport == "tcp":
        from braid.kv_transfer.tcp import TcpSender

        return TcpSender(region)
    if transport == "collective":
        from braid.kv_transfer.collective import CollectiveSender

        return CollectiveSender(region)
    if transport == "mooncake":
        from braid.kv_transfer.mooncake import MooncakeSender

        return MooncakeSender(region)
    raise _unknown(transport)
