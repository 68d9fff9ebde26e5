"""The worker half of the KV connector (KVConnectorWorker): on every rank, the
transport endpoints and this rank's share of each transfer.

A transfer's life on one rank, as the steps carry it (see metadata.py for the
order a step applies things in):

  decode   expect    register the byte ranges this rank's shard and heads will
                     receive (no deadline here: the scheduler half keeps the
                     lease's one timer); a rank that holds none of the prompt is
                     done at once. Rank 0 also waits for the trailer (first token),
                     which must be one token id of the vocabulary, else the transfer
                     fails; only senders presenting the reservation's secret count.
           progress  the receiver's reports: done once every range (and the
                     trailer) landed, failed on a bad frame or a lost sender
           release   cancel at the receiver: once the step returns, nothing of the
                     transfer lands in the cache any more
  prefill  send      plan the transfer's moves once; while the model runs, queue
                     this rank's pieces of each layer as soon as it is in the cache
           finish    end marker to every endpoint (decode rank 0's carries the
                     first token)
           progress  done once every endpoint acknowledged, failed on an error or
                     at the transport's deadline
           release   abort whatever is still queued; nothing of the blocks is read
                     once the step returns

The step's result reports the state of every transfer rank 0 asked about,
agreed across ranks with one MAX all-reduce (only when the step needs it).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import torch

from braid.engine.kv_connector.metadata import (
    DONE, FAILED, INCOMING, OUTGOING, PENDING, KVConnectorMeta, KVExpect, KVFinish, KVSend, TransferRef,
)
from braid.engine.kv_connector.transports import make_receiver, make_sender
from braid.kv_transfer import layout as kvl
from braid.kv_transfer.base import KVReceiver, KVSender, Piece, TransferError
from braid.kv_transfer.planner import KVLayout, expected_ranges, pieces_by_pair, plan

TRAILER = struct.Struct("<q")  # the first token, sent by prefill rank 0 to decode rank 0
ENDPOINT_BYTES = 256


@dataclass
class _Outgoing:
    deadline: float
    targets: dict[int, tuple[str, list[Piece]]]
    """Destination rank -> (endpoint, this rank's pieces for layer 0)."""
    src_stride: int
    """Bytes between layers in this rank's cache."""
    dst_stride: dict[int, int]
    """Bytes between layers in each destination rank's cache."""
    secret: bytes = b""
    """The reservation's secret, presented to each destination's receiver."""
    finished: bool = False


class KVConnectorWorker:
    """One rank's KV transport and its books of what it expects and sends."""

    def __init__(self, transport: str, role: str, rank: int, region: torch.Tensor, host: str, port: int,
                 advertise: str | None = None, limits: dict | None = None):
        self.rank = rank
        self.advertise = advertise
        self.num_layers = region.shape[0]  # the model's cache layers, and an MTP layer's when it runs one
        self.receiver: KVReceiver | None = None
        self.sender: KVSender | None = None
        if role in ("decode", "both"):
            self.receiver = make_receiver(transport, region, host, port + rank if port else 0, limits)
        if role in ("prefill", "both"):
            self.sender = make_sender(transport, region)
        self.layout: KVLayout | None = None  # this instance's layout, set by `describe`
        self._states: dict[TransferRef, int] = {}
        self._errors: dict[TransferRef, TransferError] = {}
        self._outgoing: dict[int, _Outgoing] = {}
        self._kv_bytes: dict[int, int] = {}  # rank 0: bytes of the sends planned this step
        self._ended = 0  # transfers this rank saw end (its transports' reports taken)
        self.vocab_size = 0  # a first token in a trailer must lie in [0, vocab_size); set by `describe`

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

    def describe(self, cfg, model_cfg, world) -> None:
        """Learn every rank's endpoint (a world all-gather) to describe the instance's layout."""
        mine = torch.zeros(ENDPOINT_BYTES, dtype=torch.uint8)
        raw = self.endpoint.encode()
        if len(raw) > ENDPOINT_BYTES:
            raise ValueError(f"KV endpoint {self.endpoint!r} longer than {ENDPOINT_BYTES} bytes")
        mine[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        everyone = world.all_gather(mine)  # [world, ENDPOINT_BYTES]
        endpoints = [bytes(row.tolist()).rstrip(b"\0").decode() for row in everyone]
        self.layout = kvl.describe_engine(cfg, model_cfg, endpoints if cfg.transfer.role != "prefill" else None,
                                          num_layers=self.num_layers)
        self.vocab_size = model_cfg.vocab_size

    # -- the step ----------------------------------------------------------------
    def start_step(self, meta: KVConnectorMeta, seqs) -> "callable | None":
        """Apply the step's metadata; returns the per-layer send hook (or None)."""
        for e in meta.expects:
            self._expect(e)
        for ref in meta.releases:
            self._release(ref)
        for f in meta.finishes:
            self._finish(f)
        self._kv_bytes = {}
        if not meta.sends:
            return None
        tids = [self._begin(s, seqs[s.seq_index]) for s in meta.sends]
        return lambda layer: self._send_layer(tids, layer)

    def end_step(self, meta: KVConnectorMeta, world) -> tuple[tuple[int, ...], dict, dict, dict]:
        """(agreed states of meta.progress, first tokens, rank-0 errors, planned bytes)."""
        self._drain()
        local = [self._states.get(ref, FAILED) for ref in meta.progress]
        states = tuple(local)
        if meta.needs_sync and world.size > 1:
            t = torch.tensor(local or [0], dtype=torch.int64)
            states = tuple(world.all_reduce(t, op="max").tolist()[: len(local)])
        if self.rank != 0:
            return states, {}, {}, {}
        firsts, errors = {}, {}
        for ref, state in zip(meta.progress, states):
            if state == DONE and ref.direction == INCOMING:
                firsts[ref.transfer_id] = self._trailer_token(ref.transfer_id)
            elif state == FAILED and ref in self._errors:
                err = self._errors[ref]
                errors[ref] = err.kind + (f": {err.detail}" if err.detail else "")
        return states, firsts, errors, dict(self._kv_bytes)

    def poll_local(self) -> int:
        """Between steps, on this rank only (no collective): take the transports' reports
        now; the count of this rank's transfers that have ended so far."""
        self._drain()
        return self._ended

    def _drain(self) -> None:
        """Take the transports' reports of ended transfers into this rank's book."""
        for direction, transport in ((INCOMING, self.receiver), (OUTGOING, self.sender)):
            if transport is None:
                continue
            for tid, err in transport.poll().items():
                ref = TransferRef(direction, tid)
                if self._states.get(ref) == PENDING:
                    self._ended += 1
                    self._states[ref] = DONE if err is None else FAILED
                    if err is not None:
                        self._errors[ref] = err

    # -- decode side -------------------------------------------------------------
    def _expect(self, e: KVExpect) -> None:
        ranges = expected_ranges(self.layout, self.rank, e.num_tokens, list(e.block_ids), range(self.layout.num_layers),
                                 first_block=e.first_block)
        ref = TransferRef(INCOMING, e.transfer_id)
        want_trailer = self.rank == 0
        if not ranges and not want_trailer:
            self._states[ref] = DONE  # this rank's shard holds none of the prompt
            return
        self._states[ref] = PENDING
        self.receiver.expect(e.transfer_id, ranges, None, want_trailer=want_trailer, secret=e.secret or None,
                             trailer_check=self.valid_trailer if want_trailer else None)

    def valid_trailer(self, data: bytes) -> bool:
        """Exactly one token id of this model's vocabulary (a sender's word, never trusted)."""
        return len(data) == TRAILER.size and 0 <= TRAILER.unpack(data)[0] < self.vocab_size

    def _trailer_token(self, tid: int) -> int | None:
        data = self.receiver.trailer(tid) if self.receiver is not None else None
        return TRAILER.unpack(data)[0] if data is not None and self.valid_trailer(data) else None

    def _release(self, ref: TransferRef) -> None:
        if ref.direction == INCOMING:
            if self.receiver is not None:
                self.receiver.cancel(ref.transfer_id)
        else:
            if ref.transfer_id in self._outgoing and self._states.get(ref) == PENDING:
                self.sender.abort(ref.transfer_id)
            self._outgoing.pop(ref.transfer_id, None)
        self._states.pop(ref, None)
        self._errors.pop(ref, None)

    # -- prefill side ------------------------------------------------------------
    def _begin(self, send: KVSend, seq) -> int:
        """Plan the transfer's moves (once, here) and keep this rank's pieces."""
        dest = KVLayout.FromString(send.dest_layout)
        moves = plan(self.layout, dest, seq.end, list(seq.block_table), list(send.dest_block_ids), send.first_block)
        mine = [m for m in moves if m.src_rank == self.rank]
        targets = {
            dst: (dest.ranks[dst].endpoint, pieces)
            for (_, dst), pieces in pieces_by_pair(mine, self.layout, dest, 0).items()
        }
        if self.rank == 0:
            # rank 0 always ends the transfer at decode rank 0: its end marker carries the first token
            targets.setdefault(0, (dest.ranks[0].endpoint, []))
            lay = self.layout
            per_head_block = kvl.num_components(lay) * lay.block_size * lay.head_dim * kvl.element_size(lay)
            self._kv_bytes[send.transfer_id] = sum(m.num_heads for m in moves) * per_head_block * lay.num_layers
        self._outgoing[send.transfer_id] = _Outgoing(
            deadline=time.monotonic() + send.timeout_ms / 1000,
            targets=targets,
            src_stride=kvl.cache_bytes(self.layout, self.rank) // self.layout.num_layers,
            dst_stride={dst: kvl.cache_bytes(dest, dst) // dest.num_layers for dst in targets},
            secret=send.secret,
        )
        # a rank that holds none of the request's blocks has nothing to send or finish
        self._states[TransferRef(OUTGOING, send.transfer_id)] = PENDING if targets else DONE
        return send.transfer_id

    def _send_layer(self, tids: list[int], layer: int) -> None:
        for tid in tids:
            out = self._outgoing.get(tid)
            if out is None or self._states.get(TransferRef(OUTGOING, tid)) != PENDING:
                continue
            for dst, (endpoint, pieces) in out.targets.items():
                s, d = layer * out.src_stride, layer * out.dst_stride[dst]
                shifted = [Piece(p.src_offset + s, p.dst_offset + d, p.length) for p in pieces]
                self.sender.send(tid, endpoint, shifted, out.deadline, secret=out.secret or None)

    def _finish(self, f: KVFinish) -> None:
        """End the transfer at every destination; rank 0 attaches the first token for decode rank 0."""
        out = self._outgoing.get(f.transfer_id)
        if out is None or out.finished:
            return
        out.finished = True
        for dst, (endpoint, _) in out.targets.items():
            trailer = TRAILER.pack(f.first_token) if (self.rank == 0 and dst == 0) else None
            self.sender.finish(f.transfer_id, endpoint, trailer, secret=out.secret or None)

    def close(self) -> None:
        for t in (self.sender, self.receiver):
            if t is not None:
                t.close()
