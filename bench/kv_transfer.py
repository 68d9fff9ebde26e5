"""KV transfer benchmark: transport throughput next to raw loopback sockets, and
how much of a long prompt's transfer hides behind its prefill compute.

    .venv/bin/python bench/kv_transfer.py [--sizes-mb 64 256 1024] [--repeat 3] [--overlap-tokens 16384]

Throughput: a receiver process and a sender process on loopback; each request
moves `size` bytes of KV as 1 MiB block pieces spread over 8 layer sends (what
a prefill rank does), and the time runs from the first send to the receiver
reporting completion. "raw" is plain sendall / recv_into of 4 MiB chunks
between the same two processes: the ceiling any transport on loopback has.

Overlap: a prefill instance pushes a prompt's KV into a decode instance over
tcp, layer by layer while its forward pass runs. hidden = 1 - exposed / alone,
where exposed is the time from the end of the forward pass until the decode
side acknowledged every byte, and alone is the time the same bytes take with
nothing to hide behind (at the throughput measured above).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench_model, table  # noqa: E402

PIECE = 1 << 20
CHUNK = 4 << 20


def _pieces(size: int, layers: int = 8):
    from braid.kv_transfer.base import Piece

    per_layer = size // layers
    out = []
    for layer in range(layers):
        base = layer * per_layer
        # every other block first, so that pieces do not merge into one big copy
        offs = list(range(0, per_layer, 2 * PIECE)) + list(range(PIECE, per_layer, 2 * PIECE))
        out.append([Piece(base + o, base + o, min(PIECE, per_layer - o)) for o in offs])
    return out


# -- raw sockets -------------------------------------------------------------------


def _raw_receiver(port_q, size, repeat):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(size)
    view = memoryview(buf)
    for _ in range(repeat):
        got = 0
        while got < size:
            got += conn.recv_into(view[got : got + CHUNK])
        conn.sendall(b"k")
    conn.close()


def raw_loopback(size: int, repeat: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_raw_receiver, args=(q, size, repeat), daemon=True)
    p.start()
    s = socket.create_connection(("127.0.0.1", q.get(timeout=60)))
    data = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sent = 0
        while sent < size:
            s.sendall(data[sent : sent + CHUNK])
            sent += CHUNK
        s.recv(1)
        times.append(time.perf_counter() - t)
    s.close()
    p.join(30)
    return size / statistics.median(times) / 1e9


# -- transports --------------------------------------------------------------------


def _receiver(kind, size, q_out, q_in):
    from braid.engine.transfer import make_receiver

    region = torch.zeros(size, dtype=torch.uint8)
    rx = make_receiver(kind, region, "127.0.0.1", 0)
    q_out.put(rx.endpoint)
    while True:
        tid = q_in.get(timeout=300)
        if tid is None:
            break
        rx.expect(tid, [(0, size)], time.monotonic() + 120)
        q_out.put(("ready", tid))
        while True:
            done = rx.poll()
            if tid in done:
                q_out.put(("done", tid, done[tid] is None, time.perf_counter()))
                rx.cancel(tid)
                break
            time.sleep(0.0005)
    time.sleep(0.5)
    rx.close()


def transport(kind: str, size: int, repeat: int) -> float:
    from braid.engine.transfer import make_sender

    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_receiver, args=(kind, size, q_out, q_in), daemon=True)
    p.start()
    endpoint = q_out.get(timeout=120)
    region = torch.randint(0, 255, (size,), dtype=torch.uint8)
    tx = make_sender(kind, region)
    layers = _pieces(size)
    times = []
    try:
        for i in range(repeat + 1):  # the first run warms up the connection
            tid = 1000 + i
            q_in.put(tid)
            assert q_out.get(timeout=120) == ("ready", tid)
            t = time.perf_counter()
            for pieces in layers:
                tx.send(tid, endpoint, pieces, time.monotonic() + 120)
            tx.finish(tid, endpoint)
            tx.wait(tid, 120)
            _, _, ok, t_done = q_out.get(timeout=120)
            assert ok
            if i:
                times.append(max(time.perf_counter(), t_done) - t)
    finally:
        q_in.put(None)
        tx.close()
        p.join(60)
    return size / statistics.median(times) / 1e9


def mooncake_available() -> str | None:
    try:
        import mooncake.engine  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


# -- overlap -----------------------------------------------------------------------


def overlap(tokens: int, rate_gbps: float) -> dict:
    from braid.engine.config import EngineConfig
    from braid.engine.core import EngineCore
    from braid.engine.sampling import SamplingParams

    model = bench_model(num_hidden_layers=16, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=64)
    common = dict(model_path=model, block_size=16, max_model_len=tokens + 16, max_num_batched_tokens=tokens,
                  kv_transport="tcp", threads_per_rank=1)
    blocks = tokens // 16 + 8
    P = EngineCore(EngineConfig(kv_role="prefill", num_kv_blocks=blocks, **common))
    D = EngineCore(EngineConfig(kv_role="decode", num_kv_blocks=blocks, **common))
    try:
        prompt = [(i * 7919) % 380 + 2 for i in range(tokens)]
        params = SamplingParams(max_tokens=1, temperature=0)
        dest = D.reserve("o", prompt, params, 600)
        P.add_transfer_request("o", prompt, params, dest, 600)
        ev = None
        while ev is None:
            for e in P.step():
                ev = e
            D.step()
        assert ev.finish_reason == "transferred", ev
        s = ev.stats
        alone = s["kv_bytes"] / (rate_gbps * 1e9)
        exposed = max(0.0, s["transfer_s"] - s["prefill_s"])
        return dict(tokens=tokens, kv_mb=s["kv_bytes"] / 2**20, forward_s=s["prefill_s"], total_s=s["transfer_s"],
                    exposed_s=exposed, alone_s=alone, hidden=max(0.0, 1 - exposed / alone))
    finally:
        P.shutdown()
        D.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--overlap-tokens", type=int, default=16384)
    ap.add_argument("--transports", nargs="+", default=["tcp", "collective", "mooncake"])
    args = ap.parse_args()
    kinds = list(args.transports)
    why = mooncake_available()
    if "mooncake" in kinds and why is not None:
        print(f"mooncake: skipped ({why})")
        kinds.remove("mooncake")
    rows, ratios = [], {}
    for mb in args.sizes_mb:
        size = mb << 20
        raw = raw_loopback(size, args.repeat)
        row = [mb, raw]
        for k in kinds:
            try:
                gbps = transport(k, size, args.repeat)
            except Exception as e:  # noqa: BLE001 - a transport that cannot run here is reported, not fatal
                print(f"  {k}: failed at {mb} MB: {type(e).__name__}: {e}", flush=True)
                gbps = float("nan")
            row += [gbps, gbps / raw]
            ratios.setdefault(k, []).append(gbps / raw)
        rows.append(row)
        print("  " + "  ".join(str(round(x, 3)) if isinstance(x, float) else str(x) for x in row), flush=True)
    headers = ["MB", "raw GB/s"]
    for k in kinds:
        headers += [f"{k} GB/s", f"{k}/raw"]
    print("\nKV transfer throughput, loopback, sender and receiver in separate processes")
    print(table(headers, rows))
    tcp_rate = statistics.median([r[2] for r in rows]) if "tcp" in kinds else 1.0
    ov = overlap(args.overlap_tokens, tcp_rate)
    print(f"\nLayerwise overlap, {ov['tokens']} tokens, {ov['kv_mb']:.0f} MiB of KV over tcp (16 layers)")
    print(table(["forward s", "forward+transfer s", "exposed s", "transfer alone s", "hidden"],
                [[ov["forward_s"], ov["total_s"], ov["exposed_s"], ov["alone_s"], ov["hidden"]]]))
    tcp_vs_raw = statistics.median(ratios["tcp"]) if "tcp" in ratios else float("nan")
    print(f"RESULT tcp_vs_raw={tcp_vs_raw:.3f} overlap={ov['hidden']:.3f}")


if __name__ == "__main__":
    main()
