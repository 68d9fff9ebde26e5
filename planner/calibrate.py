"""`braid plan calibrate`: measure this machine, write a hardware YAML ("local").

One "card" here is one engine rank: one CPU thread (the benches run ranks with
threads_per_rank 1). Short measurements, each a few hundred milliseconds:

  * GEMMs at a few sizes: the best rate is the fp32 peak; a 1 x 16 x 16 matmul
    times the per-op overhead;
  * a large copy: memory bandwidth;
  * causal prefill attention through the engine's own kernel
    (braid.kernels.ops.prefill_attention) at a few lengths: attn_util against
    the GEMM peak; paged decode attention likewise (decode_attn_util);
  * optionally (bounded, loopback only) all-reduces between two local processes
    at two sizes: the engine's own collective (shared memory between ranks of
    one host) gives the link latency and the scale-up bandwidth, plain gloo over
    TCP the scale-out bandwidth (the P->D KV path).

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


def measure_decode_attention(peak: float, batch: int = 4, context: int = 2048, heads: int = 8, kv_heads: int = 1,
                             dim: int = 64, block: int = 16):
    """decode_attn_util of the engine's paged decode attention kernel
    (braid.kernels.ops.paged_decode_attention): QK and PV FLOPs / (time x peak)."""
    from braid.kernels import ops

    blocks = batch * context // block
    k_cache, v_cache = torch.randn(blocks, kv_heads, block, dim), torch.randn(blocks, kv_heads, block, dim)
    tables = torch.randperm(blocks).view(batch, context // block).int()
    lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, dim)
    t = _best(lambda: ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim ** -0.5), repeat=5)
    return 2.0 * heads * 2 * dim * batch * context / (t * peak)


_COLLECTIVE_WORKER = """
import datetime, json, os, sys, time
import torch, torch.distributed as dist
from braid.engine.parallel_state import SHM_SLOT_BYTES, build_group
rank, port, sizes = int(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=30))
def comm(name, slot):
    return build_group(dist.PrefixStore(name + "/", store), [0, 1], rank, "gloo", 30, slot)
out = {}
for name, c in (("engine", comm("engine", SHM_SLOT_BYTES["model"])), ("gloo", comm("gloo", None))):
    out[name] = []
    for n in sizes:
        x = torch.ones(n // 4)
        c.all_reduce(x)
        times = []
        for _ in range(20 if n < 65536 else 5):
            t = time.perf_counter()
            c.all_reduce(x)
            times.append(time.perf_counter() - t)
        out[name].append(min(times))
print(json.dumps(out), flush=True)
os._exit(0)
"""


def measure_allreduce(sizes=(4096, 4 << 20), timeout_s: float = 60.0):
    """{"engine": (latency s, bytes/s), "gloo": (...)} of two-process all-reduces on this
    host: the engine's own (braid's GroupComm: shared memory where it applies) and plain
    gloo over loopback TCP (a stand-in for the P->D KV path); None when they do not
    finish within timeout_s."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(port)] + [str(n) for n in sizes]
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECTIVE_WORKER, str(r), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd="/") for r in range(2)]
    try:
        got = json.loads(procs[0].communicate(timeout=timeout_s)[0])
        procs[1].wait(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # all-reduce of n bytes over 2 ranks moves n bytes each way: time = 2 alpha + n / bw
    return {name: (max(small / 2, 1e-7), float((sizes[1] - sizes[0]) / max(large - small, 1e-9)))
            for name, (small, large) in got.items()}


def calibrate(collectives: bool = True) -> Hardware:
    """This machine as a Hardware spec, one thread per card."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak, op_s = measure_gemm()
        bw = measure_bandwidth()
        attn = measure_attention(peak)
        decode_attn = measure_decode_attention(peak)
        link = measure_allreduce() if collectives else None
    finally:
        torch.set_num_threads(threads)
    (latency, link_bw), (_, tcp_bw) = (link["engine"], link["gloo"]) if link else ((50e-6, 1e9), (0, 1e9))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = os.cpu_count() or 1
    return Hardware(name="local", peak_flops={"fp32": peak, "bf16": peak, "int8": peak}, mem_bytes=mem // cores,
                    mem_bw=bw, scaleup_bw=link_bw, scaleout_bw=tcp_bw, devices_per_node=cores,
                    link_latency_s=latency, reserve_bytes=min(1 * GiB, mem // (4 * cores)), device="cpu",
                    factors=Factors(gemm_util=1.0, attn_util=attn, decode_attn_util=decode_attn, mem_util=1.0, comm_util=1.0,
                                    layer_overhead_s=8 * op_s, step_overhead_s=1e-3))  # ~8 ops per layer
