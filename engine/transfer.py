"""The worker half of KV transfer: per rank, the transport endpoints and the
bookkeeping of what this rank sends or expects.

Decode side (every rank of a decode instance):
  expect(tid, num_tokens, block_ids, timeout)  register the byte ranges this rank's
                                                shard and heads will receive
  state(tids)                                  0 done, 1 pending, 2 failed, per tid
  release(tids)                                forget; no more writes land afterwards
Prefill side (every rank of a prefill instance):
  begin(specs)        plan the moves of each transfer of a prefill step; returns the
                      per-layer hook that queues this rank's pieces once the layer's
                      KV is in the cache (so transfer overlaps the remaining layers)
  finish(tid, token)  end marker to every endpoint; rank 0 also sends the first token
                      as the trailer to decode rank 0
  state(tids)         0 acknowledged by every receiver, 1 pending, 2 failed

The scheduler half (rank 0, braid.engine.core) reduces states across ranks
with MAX, so every rank agrees: done only when done everywhere, failed if
failed anywhere.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import torch

from braid.kv_transfer.base import KVReceiver, KVSender, Piece, TransferError
from braid.kv_transfer import layout as kvl
from braid.kv_transfer.planner import pieces_by_pair, expected_ranges, plan
from braid.proto import common_pb2

DONE, PENDING, FAILED = 0, 1, 2
TRAILER = struct.Struct("<q")  # the first token, sent by prefill rank 0 to decode rank 0


def make_receiver(transport: str, region: torch.Tensor, host: str, port: int) -> KVReceiver:
    if transport == "tcp":
        from braid.kv_transfer.tcp import TcpReceiver

        return TcpReceiver(region, host=host, port=port)
    if transport == "collective":
        from braid.kv_transfer.collective import CollectiveReceiver

        return CollectiveReceiver(region, host=host, port=port)
    if transport == "mooncake":
        from braid.kv_transfer.mooncake import MooncakeReceiver

        return MooncakeReceiver(region, host=host, port=port)
    raise ValueError(f"unknown KV transport {transport!r} (choose tcp, collective or mooncake)")


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
    raise ValueError(f"unknown KV transport {transport!r} (choose tcp, collective or mooncake)")


@dataclass(frozen=True)
class SendSpec:
    """One sequence of a prefill step whose KV goes to a decode instance."""

    transfer_id: int
    dest: common_pb2.KVLayout
    dest_block_ids: tuple[int, ...]
    num_tokens: int
    block_ids: tuple[int, ...]
    """This (prefill) instance's block table of the sequence."""
    timeout_s: float


@dataclass
class _Outgoing:
    deadline: float
    targets: dict[int, tuple[str, list[Piece]]]
    """Destination rank -> (endpoint, this rank's pieces for layer 0)."""
    src_stride: int
    """Bytes between layers in this rank's cache."""
    dst_stride: dict[int, int]
    """Bytes between layers in each destination rank's cache."""
    finished: bool = False


class TransferWorker:
    def __init__(self, transport: str, rank: int, region: torch.Tensor, role: str, host: str, port: int, advertise: str | None = None):
        self.rank = rank
        self.advertise = advertise
        self.region = region
        self.receiver: KVReceiver | None = None
        self.sender: KVSender | None = None
        if role in ("decode", "both"):
            self.receiver = make_receiver(transport, region, host, port + rank if port else 0)
        if role in ("prefill", "both"):
            self.sender = make_sender(transport, region)
        self.layout: common_pb2.KVLayout | None = None  # this instance's layout, set by the worker
        self._incoming: dict[int, int] = {}  # tid -> state
        self._incoming_errors: dict[int, TransferError] = {}
        self._outgoing: dict[int, _Outgoing] = {}
        self._outgoing_state: dict[int, int] = {}
        self._outgoing_errors: dict[int, TransferError] = {}

    @property
    def endpoint(self) -> str:
        """Where senders reach this rank's receiver (the advertised host, the bound port)."""
        if self.receiver is None:
            return ""
        bound = self.receiver.endpoint
        if not self.advertise:
            return bound
        host, sep, rest = bound.partition(":")
        return f"{self.advertise}:{rest}" if sep else bound

    # -- decode side -------------------------------------------------------------
    def expect(self, tid: int, num_tokens: int, block_ids: list[int], timeout_s: float) -> None:
        num_layers = self.layout.num_layers
        ranges = expected_ranges(self.layout, self.rank, num_tokens, block_ids, range(num_layers))
        self._incoming[tid] = PENDING
        want_trailer = self.rank == 0
        if not ranges and not want_trailer:
            self._incoming[tid] = DONE  # this rank's shard holds none of the prompt
            return
        self.receiver.expect(tid, ranges, time.monotonic() + timeout_s, want_trailer=want_trailer)

    def trailer_token(self, tid: int) -> int | None:
        data = self.receiver.trailer(tid) if self.receiver is not None else None
        return TRAILER.unpack(data)[0] if data is not None else None

    def _drain_receiver(self) -> None:
        for tid, err in self.receiver.poll().items():
            if tid in self._incoming:
                self._incoming[tid] = DONE if err is None else FAILED
                if err is not None:
                    self._incoming_errors[tid] = err

    def incoming_state(self, tids: list[int]) -> list[int]:
        if self.receiver is not None:
            self._drain_receiver()
        return [self._incoming.get(t, FAILED) for t in tids]

    def error(self, incoming: bool, tid: int) -> TransferError | None:
        """What this rank saw go wrong with a failed transfer, if anything."""
        return (self._incoming_errors if incoming else self._outgoing_errors).get(tid)

    def release_incoming(self, tid: int) -> None:
        if self.receiver is not None:
            self.receiver.cancel(tid)
        self._incoming.pop(tid, None)
        self._incoming_errors.pop(tid, None)

    # -- prefill side ------------------------------------------------------------
    def begin(self, specs: list[SendSpec]):
        """Plan this rank's pieces for every transfer; return the per-layer hook."""
        src_stride = kvl.cache_bytes(self.layout, self.rank) // self.layout.num_layers
        for spec in specs:
            moves = plan(self.layout, spec.dest, spec.num_tokens, spec.block_ids, spec.dest_block_ids)
            mine = [m for m in moves if m.src_rank == self.rank]
            targets = {
                dst: (spec.dest.ranks[dst].endpoint, pieces)
                for (_, dst), pieces in pieces_by_pair(mine, self.layout, spec.dest, 0).items()
            }
            if self.rank == 0:
                # rank 0 always ends the transfer at decode rank 0: its end marker carries the first token
                targets.setdefault(0, (spec.dest.ranks[0].endpoint, []))
            self._outgoing[spec.transfer_id] = _Outgoing(
                deadline=time.monotonic() + spec.timeout_s,
                targets=targets,
                src_stride=src_stride,
                dst_stride={dst: kvl.cache_bytes(spec.dest, dst) // spec.dest.num_layers for dst in targets},
            )
            # a rank that holds none of the request's blocks has nothing to send or finish
            self._outgoing_state[spec.transfer_id] = PENDING if targets else DONE
        tids = [s.transfer_id for s in specs]
        return lambda layer: self._send_layer(tids, layer)

    def _send_layer(self, tids: list[int], layer: int) -> None:
        for tid in tids:
            out = self._outgoing.get(tid)
            if out is None or self._outgoing_state.get(tid) != PENDING:
                continue
            for dst, (endpoint, pieces) in out.targets.items():
                s, d = layer * out.src_stride, layer * out.dst_stride[dst]
                shifted = [Piece(p.src_offset + s, p.dst_offset + d, p.length) for p in pieces]
                self.sender.send(tid, endpoint, shifted, out.deadline)

    def finish(self, tid: int, first_token: int) -> None:
        """End the transfer at every destination; rank 0 attaches the first token for decode rank 0."""
        out = self._outgoing.get(tid)
        if out is None or out.finished:
            return
        out.finished = True
        for dst, (endpoint, _) in out.targets.items():
            trailer = TRAILER.pack(first_token) if (self.rank == 0 and dst == 0) else None
            self.sender.finish(tid, endpoint, trailer)

    def outgoing_state(self, tids: list[int]) -> list[int]:
        for tid, err in self.sender.poll().items():
            if tid in self._outgoing_state:
                self._outgoing_state[tid] = DONE if err is None else FAILED
                if err is not None:
                    self._outgoing_errors[tid] = err
        now = time.monotonic()
        for tid in tids:
            out = self._outgoing.get(tid)
            if out is not None and self._outgoing_state.get(tid) == PENDING and now > out.deadline + 1.0:
                self.sender.abort(tid)
                self._outgoing_state[tid] = FAILED
                self._outgoing_errors[tid] = TransferError(tid, "timeout", "no acknowledgement by the deadline")
        return [self._outgoing_state.get(t, FAILED) for t in tids]

    def release_outgoing(self, tid: int) -> None:
        if tid in self._outgoing and self._outgoing_state.get(tid) == PENDING:
            self.sender.abort(tid)
        self._outgoing.pop(tid, None)
        self._outgoing_state.pop(tid, None)
        self._outgoing_errors.pop(tid, None)

    def close(self) -> None:
        for t in (self.sender, self.receiver):
            if t is not None:
                t.close()
