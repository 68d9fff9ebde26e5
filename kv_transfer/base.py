"""The interface every KV transport implements.

A transport moves byte ranges from a prefill rank's registered memory (its
whole KV cache tensor) straight into a decode rank's registered memory. The
planner decides which ranges; the transport only moves bytes and reports, per
transfer, success or a typed error.

Lifecycle of one transfer (ids are chosen by the decode side at reservation):

  receiver.expect(tid, ranges, deadline, want_trailer)   decode rank, before any byte is sent
                                                         (deadline None: the caller cancels)
  sender.send(tid, endpoint, pieces, deadline)           prefill rank, once per layer (non-blocking)
  sender.finish(tid, endpoint, trailer)                  after its last piece to that endpoint
  sender.wait(tid, timeout)  or  sender.poll()           once every endpoint acknowledged (wait and
                                                         poll consume the transfer: use one of them)
  receiver.poll() -> {tid: None | TransferError}         complete when every expected byte (and
                                                         the trailer, if wanted) arrived
  receiver.cancel(tid) / sender.abort(tid)               idempotent, at any point

Guarantees every implementation keeps (the tests check them):
- A receiver writes only inside the ranges `expect` registered for the transfer
  a frame names; anything else fails that transfer with kind "corrupt".
- Once `receiver.cancel(tid)` returns, no byte of `tid` is written into the
  region any more, so its blocks can be reused at once.
- Every wait is bounded by the transfer's deadline: a dead, stalled or
  misbehaving peer ends in a TransferError, never a hang.
- One failed transfer does not fail transfers on other connections; the
  process lives on.
- A transfer expected with a `secret` (minted by the decode node per reservation,
  carried to the prefill side in the KV destination) takes frames only from
  connections that presented it (the sender's `send(..., secret=)`, compared in
  constant time) before a byte lands; frames from any other connection are dropped
  and counted (`rejected_frames`), without failing the transfer. A trailer the
  receiver's `trailer_check` refuses fails that transfer alone ("corrupt").
  The secret authenticates; it does not encrypt the KV stream.
"""
from __future__ import annotations

import abc
from typing import NamedTuple, Sequence

import torch


class TransferError(RuntimeError):
    """A transfer failed. `kind` is one of KINDS."""

    KINDS = ("timeout", "peer_lost", "corrupt", "aborted", "refused")

    def __init__(self, transfer_id: int, kind: str, detail: str = ""):
        if kind not in self.KINDS:
            raise ValueError(f"unknown transfer error kind {kind!r}")
        super().__init__(f"transfer {transfer_id}: {kind}" + (f": {detail}" if detail else ""))
        self.transfer_id = transfer_id
        self.kind = kind
        self.detail = detail


class Piece(NamedTuple):
    """One contiguous byte range to copy: sender region [src, src+length) ->
    receiver region [dst, dst+length). A NamedTuple: requests build thousands."""

    src_offset: int
    dst_offset: int
    length: int


def region_bytes(region: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor (no copy)."""
    if region.device.type != "cpu" or not region.is_contiguous():
        raise ValueError("a transport region must be a contiguous CPU tensor")
    return memoryview(region.view(-1).view(torch.uint8).numpy()).cast("B")


class KVReceiver(abc.ABC):
    """Receives KV into one decode rank's region."""

    @property
    @abc.abstractmethod
    def endpoint(self) -> str:
        """Address a sender connects to (e.g. "127.0.0.1:40123")."""

    @abc.abstractmethod
    def expect(self, transfer_id: int, ranges: Sequence[tuple[int, int]], deadline: float | None, want_trailer: bool = False,
               *, secret: bytes | None = None, trailer_check=None) -> None:
        """Accept frames of `transfer_id` into these (offset, length) byte ranges
        until `deadline` (time.monotonic()), when it fails "timeout". A deadline of
        None sets no timer here: the reservation's owner keeps the one lease timer and
        cancels the transfer when it runs out. Complete once the ranges are all
        written (and a trailer arrived, when `want_trailer`). With `secret`, only
        connections that presented it may write; `trailer_check(bytes) -> bool`
        vets the trailer."""

    @abc.abstractmethod
    def poll(self) -> dict[int, TransferError | None]:
        """Transfers that ended since the last poll: None = complete, else the error."""

    @abc.abstractmethod
    def trailer(self, transfer_id: int) -> bytes | None:
        """The trailer a sender attached to `finish`, once received."""

    @abc.abstractmethod
    def cancel(self, transfer_id: int) -> None:
        """Forget the transfer; after return nothing of it touches the region."""

    @abc.abstractmethod
    def close(self) -> None: ...


class KVSender(abc.ABC):
    """Sends from one prefill rank's region."""

    @abc.abstractmethod
    def send(self, transfer_id: int, endpoint: str, pieces: Sequence[Piece], deadline: float, *, secret: bytes | None = None) -> None:
        """Queue pieces for `endpoint`; returns at once (the forward pass goes on). The
        transfer's `secret` is presented on each connection before its first frame."""

    @abc.abstractmethod
    def finish(self, transfer_id: int, endpoint: str, trailer: bytes | None = None, *, secret: bytes | None = None) -> None:
        """Queue the end marker of `transfer_id` for `endpoint` (after its pieces)."""

    @abc.abstractmethod
    def wait(self, transfer_id: int, timeout: float) -> None:
        """Block until every endpoint that got `finish` for this transfer
        acknowledged it; raise TransferError on failure or at the deadline."""

    @abc.abstractmethod
    def poll(self) -> dict[int, TransferError | None]:
        """Transfers that ended since the last poll, without blocking: None once every
        endpoint acknowledged its finish, else the error; a transfer past its deadline
        fails with "timeout". Like `wait`, reporting a transfer ends it here."""

    @abc.abstractmethod
    def abort(self, transfer_id: int) -> None:
        """Drop whatever of the transfer is still queued; later waits raise 'aborted'."""

    @abc.abstractmethod
    def close(self) -> None: ...
