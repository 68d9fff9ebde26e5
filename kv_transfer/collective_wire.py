"""The `collective` transport's wire: its frame format, how a DATA frame's payload is
cut into messages, and the private two-rank process groups it travels over. The
receiver (collective_receiver.py) and the sender (collective_sender.py) both follow it;
collective.py tells the life of a transfer over it.

Frame, sender -> receiver, all on one tag in order. Header int64[8]:
  0 magic << 8 | version   1 type (DATA, FINISH, ABORT, CLOSE, AUTH)   2 transfer id
  3 seq: DATA: index of this frame among tid's data frames on the connection; FINISH:
    how many were sent; ABORT: kind code
  4 n_pieces   5 payload_len (sum of piece lengths)   6 chunk
  7 DATA: pieces shorter than this are packed (see plan_messages); FINISH: trailer
    length (-1 none); AUTH: secret length
then, for DATA, the piece table int64[2n] (dst offset, length) and the payload in the
messages plan_messages() gives; for FINISH with a trailer, uint8[trailer length]; for
AUTH, uint8[secret length]: the transfer's secret, sent on a connection before its
first DATA or FINISH of that transfer (the receiver drops frames of a transfer expected
with a secret from a connection that did not present it).

Every wait on the group has a timeout: a frame's body the stall timeout, a send its
frame's deadline; only an idle connection's wait for the next header is long (a week),
and a dead peer ends it at once, its sockets closing. A timed-out gloo wait closes the
group's sockets, which is also how a connection is shut down on purpose:
ProcessGroupGloo.abort() does not cancel a posted recv, a tiny timed-out recv does
(`shut_group`). NCCL and HCCL groups are aborted with abort(). Only the gloo path can
be tested on a CPU machine; on NCCL an idle connection keeps a recv kernel posted.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from .common import ConnFail
from .sockets import dial

NS = "braid/kvc"
VERSION = 1
MAGIC = 0x42524B43  # "BRKC"
DATA, FINISH, ABORT, CLOSE, AUTH = 1, 2, 3, 4, 5
HEADER_WORDS = 8
MAX_CHUNK = 64 << 20  # bounds the scratch a connection may allocate
CHUNK = 16 << 20  # bytes per message: bounds how long a cancel waits for a landing recv
# Messages in flight per direction: at most WINDOW_BYTES (4 x 16 MiB keeps gloo near its
# peak, and bounds what a cancel waits for) and WINDOW_MSGS (KV blocks are often 16-64 KiB
# pieces, each its own message: each needs a rendezvous, so many must overlap).
WINDOW_BYTES = 64 << 20
WINDOW_MSGS = 64
# Pieces shorter than this travel packed (see plan_messages); at most PACK_WINDOW packed
# messages in flight per connection, so staging costs at most that many chunks per side.
PACK_BELOW = 256 << 10
PACK_WINDOW = 2
TAG = 0x4B56
SHUT_TAG = TAG + 1
IDLE = timedelta(days=7)  # an idle connection waits this long for its next header
IDLE_STORE_WAIT = timedelta(hours=1)


def window_full(msgs: int, nbytes: int, packs: int) -> bool:
    """Whether the messages in flight on a connection (`msgs` of them, `nbytes` of
    payload, `packs` packed) fill the window, so the oldest must land first."""
    return msgs >= WINDOW_MSGS or nbytes >= WINDOW_BYTES or packs >= PACK_WINDOW


def plan_messages(lens: Sequence[int], chunk: int, pack_below: int) -> list[list[tuple[int, int, int]]]:
    """The messages a DATA frame's payload travels in, computed alike by both sides from
    the piece table. Each is [(piece index, offset in the piece, length)]. A piece of at
    least `pack_below` bytes goes straight from region to region in `chunk`-byte
    messages; shorter ones are packed in order into messages of at most `chunk` bytes,
    gathered into a staging buffer by the sender and scattered out of one by the
    receiver. Gloo costs tens of microseconds per message whatever its size, so KV
    blocks of a few KiB each as their own message run at a fraction of the bandwidth;
    two copies cost less. A message of one entry is always a view of the region."""
    msgs: list[list[tuple[int, int, int]]] = []
    pack: list[tuple[int, int, int]] = []
    packed = 0
    for i, n in enumerate(lens):
        if n < pack_below:
            if pack and packed + n > chunk:
                msgs.append(pack)
                pack, packed = [], 0
            if n:
                pack.append((i, 0, n))
                packed += n
            continue
        if pack:
            msgs.append(pack)
            pack, packed = [], 0
        msgs.extend([(i, a, min(chunk, n - a))] for a in range(0, n, chunk))
    if pack:
        msgs.append(pack)
    return msgs


def gather(out: torch.Tensor, flat: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """out <- the (offset, length) spans of `flat`, back to back (all flat uint8)."""
    if out.device.type == "cpu":  # memoryview copies: a third of copy_()'s per-call cost
        mv, dst, pos = memoryview(flat.numpy()), memoryview(out.numpy()), 0
        for off, n in spans:
            dst[pos : pos + n] = mv[off : off + n]
            pos += n
    else:
        torch.cat([flat[off : off + n] for off, n in spans], out=out)


def scatter(flat: torch.Tensor, buf: torch.Tensor, segments: list[tuple[int, int, int]]) -> None:
    """flat[off : off + n] <- buf[pos : pos + n] for each (off, n, pos); on a device,
    returns once the copies are done (the caller then reports them landed)."""
    if flat.device.type == "cpu":
        mv, src = memoryview(flat.numpy()), memoryview(buf.numpy())
        for off, n, pos in segments:
            mv[off : off + n] = src[pos : pos + n]
        return
    for off, n, pos in segments:
        flat[off : off + n].copy_(buf[pos : pos + n])
    getattr(torch, flat.device.type).synchronize(flat.device)


def is_timeout(e: BaseException) -> bool:
    """Whether a torch.distributed error says a wait timed out (it has no type for it)."""
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def make_pair_group(device: torch.device, store: dist.Store, rank: int, timeout: float, local_host: str):
    """A two-rank group on `store` without any default group: gloo for CPU regions,
    NCCL for CUDA, HCCL for Ascend NPU (torch_npu imported only then). Blocks until
    the peer has built its side, at most `timeout` seconds."""
    if device.type == "cpu":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=timeout)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    # NCCL and HCCL run a watchdog that tears a group down once an op exceeds the
    # group's timeout; an idle connection keeps a header recv posted, so the group
    # timeout is long and every wait passes its own.
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = IDLE
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    if device.type == "npu":
        import torch_npu  # noqa: F401  (registers the npu device and hccl)
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL

        opts = ProcessGroupHCCL.Options()
        opts._timeout = IDLE
        return ProcessGroupHCCL(store, rank, 2, opts)
    raise ValueError(f"no collective backend for device type {device.type!r}")


def shut_group(pg, peer: int, device: torch.device) -> None:
    """Close a pair group's connection from any thread; posted ops then fail at once."""
    if device.type != "cpu":
        for name in ("abort", "shutdown"):
            fn = getattr(pg, name, None)
            if fn is not None:
                try:
                    fn()
                    return
                except RuntimeError:
                    pass
        return
    try:  # a gloo wait that times out closes the context's pairs (abort() does not)
        pg.recv([torch.empty(1, dtype=torch.uint8)], peer, SHUT_TAG).wait(timedelta(milliseconds=1))
    except RuntimeError:
        pass


def wait_work(work, seconds: float) -> None:
    """Wait for a posted send or recv at most `seconds`; ConnFail if it fails or times out."""
    try:
        work.wait(timedelta(seconds=max(seconds, 0.001)))
    except RuntimeError as e:
        raise ConnFail("timeout" if is_timeout(e) else "peer_lost", str(e).splitlines()[0][:300]) from None


def local_address_for(host: str, port: int, timeout: float) -> str:
    """The local address this host uses to reach host:port; raises ConnFail if the
    port does not answer (a fast 'refused' instead of TCPStore's retry loop)."""
    with dial((host, port), f"{host}:{port}", timeout) as s:
        return s.getsockname()[0]
