"""KV transfer benchmark: transport throughput next to raw loopback sockets, and
how much of a long prompt's transfer hides behind its prefill compute.

    .venv/bin/python bench/kv_transfer.py [--sizes-mb 64 256 1024] [--repeat 5] [--overlap-tokens 16384]

Throughput: a receiver process and a sender process on loopback; each request
moves `size` bytes of KV as 1 MiB block pieces spread over 8 layer sends (what
a prefill rank does), and the time runs from the first send to the receiver
reporting completion. "raw" is plain sendall / recv_into of 4 MiB chunks
between two processes: what Python sockets on loopback give without any
protocol. All of them are set up together and timed in turn, round after
round (median of `repeat`), so each ratio compares runs under the same load.

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


def _raw_receiver(port_q, size):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(size)
    view = memoryview(buf)
    while conn.recv(1) == b"g":  # one request per "g"; anything else (or EOF) ends it
        got = 0
        while got < size:
            got += conn.recv_into(view[got : got + CHUNK])
        conn.sendall(b"k")
    conn.close()


class RawLoopback:
    """Plain sendall / recv_into between two processes: one timed request per once()."""

    def __init__(self, size: int):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.size = size
        self.proc = ctx.Process(target=_raw_receiver, args=(q, size), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(("127.0.0.1", q.get(timeout=60)))
        self.data = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20))

    def once(self) -> float:
        t = time.perf_counter()
        self.sock.sendall(b"g")
        sent = 0
        while sent < self.size:
            self.sock.sendall(self.data[sent : sent + CHUNK])
            sent += CHUNK
        assert self.sock.recv(1) == b"k"
        return time.perf_counter() - t

    def close(self) -> None:
        self.sock.close()
        self.proc.join(30)


# -- transports --------------------------------------------------------------------


def _receiver(kind, size, q_out, q_in):
    from braid.engine.kv_connector.transports import make_receiver

    region = torch.zeros(size, dtype=torch.uint8)
    rx = make_receiver(kind, region, "127.0.0.1", 0)
    q_out.put(rx.endpoint)
    while True:
        tid = q_in.get(timeout=600)
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


class TransportPair:
    """A braid sender and a receiver process for one transport; once() times one
    request of `size` bytes sent as a prefill rank sends it (8 layers of 1 MiB pieces)."""

    def __init__(self, kind: str, size: int):
        from braid.engine.kv_connector.transports import make_sender

        ctx = mp.get_context("spawn")
        self.size = size
        self.q_out, self.q_in = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_receiver, args=(kind, size, self.q_out, self.q_in), daemon=True)
        self.proc.start()
        self.endpoint = self.q_out.get(timeout=120)
        self.tx = make_sender(kind, torch.randint(0, 255, (size,), dtype=torch.uint8))
        self.layers = _pieces(size)
        self.tid = 1000
        self.once()  # warms up the connection

    def once(self) -> float:
        self.tid += 1
        tid = self.tid
        self.q_in.put(tid)
        assert self.q_out.get(timeout=120) == ("ready", tid)
        t = time.perf_counter()
        for pieces in self.layers:
            self.tx.send(tid, self.endpoint, pieces, time.monotonic() + 120)
        self.tx.finish(tid, self.endpoint)
        self.tx.wait(tid, 120)
        _, _, ok, t_done = self.q_out.get(timeout=120)
        assert ok
        return max(time.perf_counter(), t_done) - t

    def close(self) -> None:
        self.q_in.put(None)
        self.tx.close()
        self.proc.join(60)


def measure(size: int, kinds: list[str], repeat: int) -> dict[str, float]:
    """GB/s of raw loopback and each transport at `size`: all of them set up at once
    and timed in turn, round after round, so that they share the machine's load
    (it is shared and its speed drifts); the median time of each."""
    pairs: dict = {}
    try:
        pairs["raw"] = RawLoopback(size)
        for k in kinds:
            try:
                pairs[k] = TransportPair(k, size)
            except Exception as e:  # noqa: BLE001 - a transport that cannot run here is reported, not fatal
                print(f"  {k}: failed at {size >> 20} MB: {type(e).__name__}: {e}", flush=True)
        times: dict[str, list[float]] = {k: [] for k in pairs}
        for _ in range(repeat):
            for k, pair in pairs.items():
                times[k].append(pair.once())
    finally:
        for pair in pairs.values():
            pair.close()
    return {k: size / statistics.median(ts) / 1e9 for k, ts in times.items()}


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
    from braid.engine.kv_connector.types import TransferTarget
    from braid.engine.sampling import SamplingParams

    model = bench_model(num_hidden_layers=16, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=64)
    common = dict(block_size=16, max_model_len=tokens + 16, max_num_batched_tokens=tokens,
                  kv_transport="tcp", threads_per_rank=1)
    blocks = tokens // 16 + 8
    P = EngineCore(EngineConfig.build(model, kv_role="prefill", num_kv_blocks=blocks, **common))
    D = EngineCore(EngineConfig.build(model, kv_role="decode", num_kv_blocks=blocks, **common))
    try:
        prompt = [(i * 7919) % 380 + 2 for i in range(tokens)]
        params = SamplingParams(max_tokens=1, temperature=0)
        reservation = D.reserve("o", prompt, params, 600)
        D.claim("o")
        P.add_transfer_request("o", prompt, params, TransferTarget.of(reservation, D.kv_layout), 600)
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
    ap.add_argument("--repeat", type=int, default=5)
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
        rates = measure(mb << 20, kinds, args.repeat)
        raw = rates["raw"]
        row = [mb, raw]
        for k in kinds:
            gbps = rates.get(k, float("nan"))
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
