"""Shared-memory collectives for the ranks of one engine on one host (CPU).

gloo moves even an 8 KB all-reduce over loopback TCP with several round trips:
about 1.3 ms here between two single-threaded ranks, against ~15 us for
the same sum through shared memory. A decode step of a tp 2 (or dcp 2) engine
runs 2-5 such collectives per layer, so on CPU they were most of its time.

One segment per group: a flag per member (an int64 on its own cache line) and a
data slot per member and parity. An operation with sequence number `seq` copies
this rank's tensor into its slot of parity `seq % 2`, publishes `seq` in its flag
(release store), waits until every member's flag reaches `seq` (acquire loads,
braid.kernels.cpu_ext's shm_wait: spin, yield, nap; a deadline, and the
peers' processes watched so that a dead one fails the call at once), then reads the
members' slots. Two parities make the reuse safe: a rank writes parity p again
only at seq + 2, after seeing every member publish seq + 1, which each does only
after it finished reading seq. Every member sums the slots in member order, so
all hold bit-identical results, as with gloo.

The segment is a file in /dev/shm created by member 0 with its pages reserved
(posix_fallocate: a full tmpfs fails here, cleanly, rather than as SIGBUS on
first write), mapped by every member, and unlinked once all have mapped it, so
nothing is left behind whatever happens later. Tensors larger than a slot, the
idle loop's broadcasts and gathers, and any group whose members are not all on
this host (or without the C++ extension, or with BRAID_SHM_COLLECTIVES=0) stay
on the process group.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import tempfile

import torch

from braid.kernels import cpu_ext

log = logging.getLogger(__name__)

FLAG_STRIDE = 8  # int64s: one flag per 64-byte cache line
HEADER_BYTES = 4096
_REDUCE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}|{boot}"


def _segment_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class ShmComm:
    """All-reduce, all-gather and all-to-all among `size` ranks over one shared segment."""

    def __init__(self, ext, mapping: torch.Tensor, rank: int, pids: list[int], slot_bytes: int, timeout_s: float):
        self.ext, self.rank, self.size, self.slot_bytes, self.timeout_s = ext, rank, len(pids), slot_bytes, timeout_s
        self.flags = mapping[:HEADER_BYTES].view(torch.int64)
        self.data = mapping[HEADER_BYTES:]
        self.peers = [j for j in range(self.size) if j != rank]
        self.peer_flags = [j * FLAG_STRIDE for j in self.peers]
        self.peer_pids = [pids[j] for j in self.peers]
        self.seq = 0

    @staticmethod
    def create(store, rank: int, size: int, slot_bytes: int, timeout_s: float) -> "ShmComm | None":
        """Every member calls this in the same order (it rendezvous through `store`, a
        store private to the group); None on every member unless all can use it."""
        ext = cpu_ext.load()
        able = (os.environ.get("BRAID_SHM_COLLECTIVES", "1") != "0" and ext is not None and hasattr(ext, "shm_wait")
                and size * FLAG_STRIDE * 8 <= HEADER_BYTES)
        total = HEADER_BYTES + 2 * size * slot_bytes
        host = _host_id() if able else ""  # a member that cannot still answers: "" matches no host
        store.set(f"shm/host/{rank}", host)
        store.set(f"shm/pid/{rank}", str(os.getpid()))
        if rank == 0:
            same = able and all(store.get(f"shm/host/{j}").decode() == host for j in range(size))
            store.set("shm/path", _make_segment(total) if same else "")
        path = store.get("shm/path").decode()
        if not path:  # every member reads the same answer
            return None
        mapping = None
        try:
            mapping = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        except (RuntimeError, OSError) as e:
            log.warning("shared-memory collectives: cannot map %s (%s)", path, e)
        store.set(f"shm/ok/{rank}", "1" if mapping is not None else "0")
        ok = all(store.get(f"shm/ok/{j}") == b"1" for j in range(size))
        if rank == 0:
            os.unlink(path)  # every member has mapped it (or given up): the name is no longer needed
        if not ok:
            return None
        pids = [int(store.get(f"shm/pid/{j}")) for j in range(size)]
        return ShmComm(ext, mapping, rank, pids, slot_bytes, timeout_s)

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.slot_bytes

    def _slot(self, member: int, parity: int) -> torch.Tensor:
        start = (parity * self.size + member) * self.slot_bytes
        return self.data[start : start + self.slot_bytes]

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every member's `t` (same shape and dtype everywhere), as views of their slots:
        valid until this rank's next-but-one operation."""
        self.seq += 1
        parity, nbytes = self.seq & 1, t.numel() * t.element_size()
        self._slot(self.rank, parity)[:nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        self.ext.shm_post(self.flags, self.rank * FLAG_STRIDE, self.seq)
        got = self.ext.shm_wait(self.flags, self.peer_flags, self.peer_pids, self.seq, self.timeout_s)
        if got == -2:
            raise RuntimeError(f"shared-memory collective {self.seq}: a peer did not arrive within "
                               f"{self.timeout_s:.0f} s (member {self.rank} of {self.size})")
        if got >= 0:
            raise RuntimeError(f"shared-memory collective {self.seq}: member {self.peers[got]} of the group "
                               f"(pid {self.peer_pids[got]}) is gone (member {self.rank} of {self.size})")
        return [self._slot(j, parity)[:nbytes].view(t.dtype).view(t.shape) for j in range(self.size)]

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        fn = _REDUCE.get(op)
        if fn is None:
            raise ValueError(f"all_reduce: unknown op {op!r}")
        parts = self._exchange(t)
        fn(parts[0], parts[1], out=t)
        for p in parts[2:]:  # member order on every member: identical results
            fn(t, p, out=t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(t))

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([p[self.rank] for p in self._exchange(t)])


def _make_segment(total: int) -> str:
    """A new file of `total` reserved bytes for the group; "" when none can be made."""
    path = os.path.join(_segment_dir(), f"braid-shm-{os.getpid()}-{secrets.token_hex(6)}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as e:
        log.warning("shared-memory collectives off: cannot create %s (%s)", path, e)
        return ""
    try:
        os.posix_fallocate(fd, 0, total)
        return path
    except OSError as e:
        os.unlink(path)
        log.warning("shared-memory collectives off: %d bytes not available in %s (%s)", total, path, e)
        return ""
    finally:
        os.close(fd)
