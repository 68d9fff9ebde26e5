"""What rank 0 tells every rank about KV transfers at one step (KVConnectorMeta),
and its encoding inside the StepPlan's int64 tensor.

Each rank applies a step's metadata at the step's start, in this order:
expects (register receive ranges), releases (forget; nothing of the transfer
is read or written afterwards), finishes (end markers with the first token),
sends (planned now, pushed layer by layer while the model runs). After the
model it reports the state of each transfer named in `progress`; states are
ordered so that one MAX all-reduce gives the state every rank agrees on:
done only when done on every rank, failed when failed on any.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

DONE, PENDING, FAILED = 0, 1, 2
INCOMING, OUTGOING = 0, 1
"""Direction of a transfer seen from this instance: decode receives, prefill sends."""


class TransferRef(NamedTuple):
    direction: int
    transfer_id: int


class KVFinish(NamedTuple):
    """End a sent transfer at its receivers; decode rank 0 gets the first token."""

    transfer_id: int
    first_token: int


@dataclass(frozen=True)
class KVExpect:
    """Decode: receive the prompt's KV into these blocks (the reservation's)."""

    transfer_id: int
    num_tokens: int
    block_ids: tuple[int, ...]
    secret: bytes = b""
    """What a sender must present on its connection before its frames count."""
    first_block: int = 0
    """Leading global blocks already here (prefix cache): not expected."""


@dataclass(frozen=True)
class KVSend:
    """Prefill: push sequence `seq_index`'s KV to a decode instance during this step."""

    seq_index: int
    transfer_id: int
    timeout_ms: int
    dest_layout: bytes
    """The decode instance's serialized KVLayout (with its endpoints)."""
    dest_block_ids: tuple[int, ...]
    secret: bytes = b""
    """The reservation's secret, presented to the decode ranks' receivers."""
    first_block: int = 0
    """Leading global blocks the decode side holds already: not sent."""


@dataclass(frozen=True)
class KVConnectorMeta:
    expects: tuple[KVExpect, ...] = ()
    sends: tuple[KVSend, ...] = ()
    finishes: tuple[KVFinish, ...] = ()
    releases: tuple[TransferRef, ...] = ()
    progress: tuple[TransferRef, ...] = ()
    """Transfers whose agreed state rank 0 wants back from this step."""

    @property
    def is_empty(self) -> bool:
        return not (self.expects or self.sends or self.finishes or self.releases or self.progress)

    @property
    def needs_sync(self) -> bool:
        """The step ends with the world all-reduce: it reports progress, or it must
        be a barrier (every rank expects before a byte is sent; every rank has
        released before rank 0 reuses the blocks)."""
        return bool(self.expects or self.releases or self.progress)

    def encode(self) -> list[int]:
        out = [len(self.expects)]
        for e in self.expects:
            out += [e.transfer_id, e.num_tokens, e.first_block, len(e.block_ids), len(e.secret), *e.block_ids, *e.secret]
        out.append(len(self.sends))
        for s in self.sends:
            out += [s.seq_index, s.transfer_id, s.timeout_ms, s.first_block, len(s.dest_layout), len(s.dest_block_ids),
                    len(s.secret)]
            out += [*s.dest_layout, *s.dest_block_ids, *s.secret]
        for pairs in (self.finishes, self.releases, self.progress):
            out.append(len(pairs))
            for a, b in pairs:
                out += [a, b]
        return out

    @staticmethod
    def decode(v: list[int], pos: int) -> tuple["KVConnectorMeta", int]:
        """The metadata encoded at v[pos:], and the position after it."""
        expects = []
        for _ in range(v[pos]):
            tid, num_tokens, first, nb, ns = v[pos + 1 : pos + 6]
            start = pos + 6
            secret = bytes(v[start + nb : start + nb + ns])
            expects.append(KVExpect(tid, num_tokens, tuple(v[start : start + nb]), secret, first))
            pos += 5 + nb + ns
        pos += 1
        sends = []
        for _ in range(v[pos]):
            seq_index, tid, timeout_ms, first, nbytes, nb, ns = v[pos + 1 : pos + 8]
            start = pos + 8
            layout = bytes(v[start : start + nbytes])
            blocks = tuple(v[start + nbytes : start + nbytes + nb])
            secret = bytes(v[start + nbytes + nb : start + nbytes + nb + ns])
            sends.append(KVSend(seq_index, tid, timeout_ms, layout, blocks, secret, first))
            pos += 7 + nbytes + nb + ns
        pos += 1
        lists = []
        for kind in (KVFinish, TransferRef, TransferRef):
            n = v[pos]
            lists.append(tuple(kind(v[pos + 1 + 2 * i], v[pos + 2 + 2 * i]) for i in range(n)))
            pos += 1 + 2 * n
        return KVConnectorMeta(tuple(expects), tuple(sends), *lists), pos
