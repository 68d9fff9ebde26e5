"""CPU used by idle nodes: a prefill node (PCP 2) and a decode node (TP 2, DCP 2),
started with braid.cluster.launcher.LocalCluster and left with nothing to do.
Reads utime+stime from /proc/<pid>/stat of each node process and of every
process under it (its rank processes) over a quiet window, and prints each
node's CPU use as a percentage of one core, then a RESULT line.

    python bench/idle_cpu.py                       # this tree
    python bench/idle_cpu.py --tree /tmp/braid-before   # nodes run from another checkout

With --tree, the node processes import braid from that checkout: a shim folder
holds `braid/<package>` links into it and goes first on the nodes' PYTHONPATH,
ahead of the editable install (whose finder comes last on sys.meta_path)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_model, table  # noqa: E402

CONFIG = {
    "cluster": "idle",
    "etcd": {"lease_ttl_s": 5, "timeout_s": 5},
    "prefill": {"parallel": {"prefill_context_parallel_size": 2, "threads_per_rank": 1},
                "cache": {"block_size": 4, "num_kv_blocks": 256}},
    "decode": {"parallel": {"tensor_parallel_size": 2, "decode_context_parallel_size": 2, "threads_per_rank": 1},
               "cache": {"block_size": 4, "num_kv_blocks": 256}},
}
PACKAGES = ("client", "cluster", "decode_node", "discovery", "engine", "kernels", "kv_transfer", "node",
            "prefill_node", "proto", "router", "tokenizer", "planner")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shim_for(checkout: str, workdir: str) -> str:
    """A folder whose braid/<pkg> links point into `checkout`."""
    shim = os.path.join(workdir, "shim")
    os.makedirs(os.path.join(shim, "braid"))
    for pkg in PACKAGES:
        if os.path.isdir(os.path.join(checkout, pkg)):
            os.symlink(os.path.join(checkout, pkg), os.path.join(shim, "braid", pkg))
    return shim


def measure(model: str, window_s: float, checkout: str | None) -> dict[str, float]:
    from braid.cluster.launcher import LocalCluster, process_tree

    with tempfile.TemporaryDirectory(prefix="braid-idle-") as workdir:
        env = {"PYTHONPATH": shim_for(checkout, workdir)} if checkout else None
        cluster = LocalCluster(workdir, data=CONFIG, model=model)
        try:
            nodes = [cluster.spawn(role, env=env, wait=False) for role in ("prefill", "decode")]
            for p in nodes:
                cluster.wait_ready(p, time.monotonic() + 300)
            time.sleep(3.0)  # let start-up work (registration, first load reports) settle
            pids = {p.role: process_tree(p.popen.pid) for p in nodes}
            before = {role: sum(cpu_seconds(pid) for pid in ps) for role, ps in pids.items()}
            t0 = time.monotonic()
            time.sleep(window_s)
            elapsed = time.monotonic() - t0
            after = {role: sum(cpu_seconds(pid) for pid in ps) for role, ps in pids.items()}
            return {role: 100.0 * (after[role] - before[role]) / elapsed for role in pids} | {
                f"{role}_procs": len(ps) for role, ps in pids.items()}
        finally:
            cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--tree", default=None, help="run the nodes from this checkout (e.g. a git worktree)")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model = args.model or bench_model()
    got = measure(model, args.window_s, args.tree)
    label = args.tree or "this tree"
    rows = [[role, got[f"{role}_procs"], f"{got[role]:.2f}"] for role in ("prefill", "decode")]
    print(f"idle nodes, {args.window_s:.0f} s window, nodes from {label}")
    print(table(["node", "processes", "CPU % of one core"], rows))
    print(f"RESULT idle_cpu prefill={got['prefill']:.2f}% decode={got['decode']:.2f}% "
          f"total={got['prefill'] + got['decode']:.2f}% tree={label}")


if __name__ == "__main__":
    main()
