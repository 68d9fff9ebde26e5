"""`braid plan calibrate`: measure this machine, write a hardware YAML ("local").

One "card" here is one engine rank: one CPU thread (the benches run ranks with
threads_per_rank 1). Short measurements, each a few hundred milliseconds:

  * GEMMs at a few sizes: the best rate is the fp32 peak; a 1 x 16 x 16 matmul
    times the per-op overhead;
  * a large copy: memory bandwidth;
  * causal prefill attention through the engine's own kernel
    (braid.kernels.ops.prefill_attention) at a few lengths: attn_util against
    the GEMM peak;
  * optionally (bounded, loopback only) a gloo all-reduce between two local
    processes at two sizes: link latency and bandwidth.

The per-token factor (norms, rope, activations, Python between ops) cannot be
read off kernels: `engine_points` times the engine's own prefill at two lengths
(pcp 1) for `fit_prefill`, the same tier as fitting to published numbers.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from braid.planner.hardware import GiB, Hardware, Factors


def _best(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_gemm(sizes=((256, 512, 1024), (512, 512, 2048), (1024, 1024, 1024), (2048, 512, 1024))):
    """(peak FLOP/s, per-op seconds) of fp32 matmuls [m, k] x [k, n]: the best rate over
    the sizes, and the time of a matmul too small to be anything but overhead."""
    rates = []
    for m, k, n in sizes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2.0 * m * k * n / _best(lambda: torch.mm(a, b)))
    a, b = torch.randn(1, 16), torch.randn(16, 16)
    return float(max(rates)), _best(lambda: torch.mm(a, b), repeat=50)


def measure_bandwidth(nbytes: int = 64 << 20) -> float:
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    return float(2 * nbytes / _best(lambda: dst.copy_(src)))  # read + write


def measure_attention(peak: float, lengths=(512, 1024, 2048), heads: int = 8, kv_heads: int = 1, dim: int = 64):
    """attn_util of the engine's prefill attention kernel: causal FLOPs / (time x peak),
    the median over lengths."""
    from braid.kernels import ops
    from braid.kernels.reference import VarlenRows

    utils = []
    for n in lengths:
        q = torch.randn(n, heads, dim)
        k, v = torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
        rows = VarlenRows.packed([n], [n])
        t = _best(lambda: ops.prefill_attention(q, k, v, rows, dim ** -0.5, True), repeat=3)
        flops = 2.0 * heads * 2 * dim * n * (n + 1) / 2
        utils.append(flops / (t * peak))
    return float(np.median(utils))


_GLOO_WORKER = """
import datetime, json, sys, time
import torch, torch.distributed as dist
rank, port, sizes = int(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=30))
out = []
for n in sizes:
    x = torch.ones(n // 4)
    dist.all_reduce(x)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t)
    out.append(min(times))
print(json.dumps(out))
dist.destroy_process_group()
"""


def measure_allreduce(sizes=(4096, 4 << 20), timeout_s: float = 60.0):
    """(latency s, bytes/s) of a two-process gloo all-reduce on loopback (127.0.0.1
    only); None when it does not finish within timeout_s."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(port)] + [str(n) for n in sizes]
    procs = [subprocess.Popen([sys.executable, "-c", _GLOO_WORKER, str(r), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for r in range(2)]
    try:
        small, large = json.loads(procs[0].communicate(timeout=timeout_s)[0])
        procs[1].wait(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # all-reduce of n bytes over 2 ranks moves n bytes each way: time = 2 alpha + n / bw
    bw = (sizes[1] - sizes[0]) / max(large - small, 1e-9)
    return max(small / 2, 1e-6), float(bw)


def calibrate(collectives: bool = True) -> Hardware:
    """This machine as a Hardware spec, one thread per card."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak, op_s = measure_gemm()
        bw = measure_bandwidth()
        attn = measure_attention(peak)
        link = measure_allreduce() if collectives else None
    finally:
        torch.set_num_threads(threads)
    latency, link_bw = link if link else (50e-6, 1e9)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = os.cpu_count() or 1
    return Hardware(name="local", peak_flops={"fp32": peak, "bf16": peak, "int8": peak}, mem_bytes=mem // cores,
                    mem_bw=bw, scaleup_bw=link_bw, scaleout_bw=link_bw, devices_per_node=cores,
                    link_latency_s=latency, reserve_bytes=min(1 * GiB, mem // (4 * cores)), device="cpu",
                    factors=Factors(gemm_util=1.0, attn_util=attn, mem_util=1.0, comm_util=1.0,
                                    layer_overhead_s=8 * op_s, step_overhead_s=1e-3))  # ~8 ops per layer
