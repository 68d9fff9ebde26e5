"""Shared-memory collectives (braid.engine.shm_comm) between real processes, against
brute-force results computed from every member's seeded inputs; the segment is
gone once the group is up; a missing peer fails the call within its deadline;
GroupComm takes the process group for tensors larger than a slot."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import pytest

from braid.kernels import cpu_ext

pytestmark = pytest.mark.skipif(cpu_ext.load() is None, reason="braid CPU kernels not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One member: joins a TCPStore, builds the group, runs `ops` mixed operations on
# inputs seeded by (op index, member), checks each against the brute force from
# all members' inputs, and prints a digest of its results (members must agree).
_MEMBER = r"""
import datetime, hashlib, json, os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["BRAID_ROOT_PARENT"])
from braid.engine.parallel_state import GroupComm, make_process_group
from braid.engine.shm_comm import ShmComm
rank, size, port, ops = (int(a) for a in sys.argv[1:5])
mode = sys.argv[5]
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=datetime.timedelta(seconds=60))
slot = 4096
shm = ShmComm.create(dist.PrefixStore("g/", store), rank, size, slot, timeout_s=3.0)
out = {"shm": shm is not None}
pg = make_process_group("gloo", dist.PrefixStore("pg/", store), rank, size, 60)
if mode in ("absent", "dies") and rank == size - 1:
    print(json.dumps(out), flush=True)
    if mode == "absent":
        time.sleep(8)  # alive, never takes part
    os._exit(0)
comm = GroupComm(list(range(size)), pg, rank, shm)
dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.int64]
digest = hashlib.sha256()
def inputs(i, member, shape, dtype):
    g = torch.Generator().manual_seed(1000 * i + member)
    x = torch.randn(shape, generator=g) * 4
    return x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)
try:
    for i in range(ops):
        kind = ("sum", "max", "min", "gather", "a2a")[i % 5]
        dtype = dtypes[i % len(dtypes)]
        big = i % 7 == 3  # past the slot: the process group's path
        rows = (slot // 2 + 5) if big else 1 + i % 6  # x 3 columns x >= 2 bytes > slot
        shape = (size, rows, 3) if kind == "a2a" else (rows, 3)
        xs = [inputs(i, m, shape, dtype) for m in range(size)]
        x = xs[rank].clone()
        if kind in ("sum", "max", "min"):
            got = comm.all_reduce(x, kind)
            want = xs[0].clone()
            for y in xs[1:]:
                want = want + y if kind == "sum" else (torch.maximum(want, y) if kind == "max" else torch.minimum(want, y))
            assert got is x, "all_reduce works in place"
        elif kind == "gather":
            got, want = comm.all_gather(x), torch.stack(xs)
        else:
            got, want = comm.all_to_all(x), torch.stack([xs[m][rank] for m in range(size)])
        assert got.dtype == want.dtype and got.shape == want.shape, (i, kind, got.shape, want.shape)
        # shared memory sums in member order, like the brute force; gloo's ring may not
        exact = (shm is not None and not big) or size <= 2 or kind != "sum" or not dtype.is_floating_point
        assert torch.equal(got, want) if exact else torch.allclose(got.double(), want.double(), rtol=1e-2, atol=0.25), \
            (i, kind, dtype)
        if kind != "a2a":  # every member's all-to-all result differs by design
            digest.update(got.contiguous().view(torch.uint8).numpy().tobytes())
    out["digest"] = digest.hexdigest()
except RuntimeError as e:
    out["error"] = str(e)
out["seq"] = shm.seq if shm is not None else 0
print(json.dumps(out), flush=True)
os._exit(0)  # gloo's threads can abort an interpreter's ordinary exit
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(size: int, ops: int, mode: str = "normal", env: dict | None = None,
         member_env: dict | None = None) -> list[dict]:
    """`env` for every member, `member_env[rank]` on top for one."""
    port = _free_port()
    env = dict(os.environ, BRAID_ROOT_PARENT=os.path.dirname(ROOT), **(env or {}))
    procs = [subprocess.Popen([sys.executable, "-c", _MEMBER, str(r), str(size), str(port), str(ops), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                              env=dict(env, **(member_env or {}).get(r, {})))
             for r in range(size)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.mark.parametrize("size", [2, 3])
def test_collectives_equal_brute_force_and_agree_across_members(size):
    before = set(glob.glob("/dev/shm/braid-shm-*"))
    outs = _run(size, ops=70)
    assert all(o["shm"] for o in outs), outs
    assert all("error" not in o for o in outs), outs
    assert len({o["digest"] for o in outs}) == 1, "members hold different results"
    assert {o["seq"] for o in outs} == {70 - sum(1 for i in range(70) if i % 7 == 3)}  # the big ones took gloo
    assert set(glob.glob("/dev/shm/braid-shm-*")) <= before, "a segment was left in /dev/shm"


def test_a_live_peer_that_never_arrives_fails_the_call_at_the_deadline():
    outs = _run(2, ops=5, mode="absent")
    assert outs[0]["shm"] and "did not arrive within 3 s" in outs[0]["error"], outs[0]


@pytest.mark.parametrize("size", [2, 3])
def test_a_dead_peer_fails_the_call_naming_it_before_the_deadline(size):
    """The member that exits is not reaped until the test collects it (a zombie, as a
    killed rank is until its parent polls): that counts as gone too."""
    outs = _run(size, ops=5, mode="dies")
    for o in outs[:-1]:
        assert o["shm"] and f"member {size - 1} of the group" in o["error"] and "is gone" in o["error"], o


def test_switched_off_by_environment_the_process_group_serves_and_results_hold():
    outs = _run(2, ops=20, env={"BRAID_SHM_COLLECTIVES": "0"})
    assert not any(o["shm"] for o in outs)
    assert len({o["digest"] for o in outs}) == 1 and all("error" not in o for o in outs)


@pytest.mark.parametrize("size,off", [(2, 1), (3, 0), (3, 2)])
def test_one_member_switched_off_all_take_the_process_group_at_once(size, off):
    """Members that disagree (one without the path: switched off, or no C++ kernels
    where it runs) settle on the process group together; before, the others waited
    for its host id until the store's timeout."""
    before = set(glob.glob("/dev/shm/braid-shm-*"))
    outs = _run(size, ops=20, member_env={off: {"BRAID_SHM_COLLECTIVES": "0"}})
    assert not any(o["shm"] for o in outs), outs
    assert len({o["digest"] for o in outs}) == 1 and all("error" not in o for o in outs), outs
    assert set(glob.glob("/dev/shm/braid-shm-*")) <= before
