"""The router alone under load: how many requests a second one router process
serves, and the latency it adds, with nodes that cost nothing.

    .venv/bin/python bench/router.py                  # levels 1, 4, 16, 64; 5 s each
    .venv/bin/python bench/router.py --quick          # a smoke run (~30 s)
    .venv/bin/python bench/router.py --profile out.prof   # the router under cProfile (slower)

Processes (bench/router_procs.py; all on 127.0.0.1, free ports): one with a fake
prefill and a fake decode node that answer at once (16-token streams, one message
per token), one router (the real start_router over a static membership naming
them, with a tokenizer), and one load generator per level, so that the router's
CPU time (/proc/PID/stat) is its own. For each front (gRPC: the raw stub; HTTP:
OpenAI /v1/completions with stream=true) it ramps closed-loop concurrency and
takes the best requests/s as saturation, then offers Poisson arrivals at half
that rate to the router and, as the baseline, the same calls (Reserve, Decode
stream, Prefill) straight to the nodes: the router's added latency is the
difference of the percentiles, end to end and to the first token (also at
concurrency 1 against the nodes called directly one at a time). Every request
is checked (the 16 tokens, in order; for HTTP the text and usage). Prints a
table per front and RESULT lines; --json writes everything, with the children's
pids and ports (all stopped and closed at the end, also on error or Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peer_steps import percentile  # noqa: E402

PROCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "router_procs.py")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
TICKS = os.sysconf("SC_CLK_TCK")


class Child:
    """A bench_procs process; `read()` returns its next JSON line (bounded wait)."""

    def __init__(self, args: list[str], env: dict | None = None, python: str | None = None):
        self.proc = subprocess.Popen([python or sys.executable, PROCS, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)

    def read(self, timeout: float) -> dict:
        import select

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"{self.proc.args[2:4]} said nothing for {timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.proc.args[2:4]} exited ({self.proc.wait(STOP_TIMEOUT_S)})")
            if line.startswith("{"):
                return json.loads(line)

    def stop(self) -> int | None:
        """Close its stdin (it stops itself), then SIGTERM, then SIGKILL; its exit code."""
        p = self.proc
        for step in (p.stdin.close, p.terminate, p.kill):
            if p.poll() is not None:
                break
            try:
                step()
                p.wait(STOP_TIMEOUT_S)
            except (subprocess.TimeoutExpired, OSError):
                continue
        p.stdout.close()
        return p.poll()


def cpu_s(pid) -> float:
    """User + system CPU seconds of a process (or "PID/task/TID": a thread) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (grpc's C-core threads vs the event loop's main thread)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = "main" if tid == str(pid) else f.read().strip()
            out[name] = out.get(name, 0.0) + cpu_s(f"{pid}/task/{tid}")
        except OSError:  # a thread that just ended
            continue
    return out


def load_level(target: str, addr: str, args, router_pid: int | None, concurrency: int = 1, rate: float = 0.0,
               tokenizer: str | None = None) -> dict:
    """One load generator run; its results plus the router's CPU time over the window."""
    cmd = ["load", "--target", target, "--addr", addr, "--concurrency", str(concurrency), "--rate", str(rate),
           "--duration", str(args.duration), "--warmup", str(args.warmup)]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    child = Child(cmd)
    try:
        limit = args.warmup + args.duration + READY_TIMEOUT_S
        assert child.read(limit)["event"] == "start"
        cpu0, t0 = (cpu_s(router_pid) if router_pid else 0.0), time.monotonic()
        threads0 = thread_cpu_s(router_pid) if router_pid else {}
        assert child.read(limit)["event"] == "end"
        cpu = (cpu_s(router_pid) if router_pid else 0.0) - cpu0
        threads = {k: v - threads0.get(k, 0.0) for k, v in (thread_cpu_s(router_pid) if router_pid else {}).items()}
        wall = time.monotonic() - t0
        res = child.read(limit)
    finally:
        child.stop()
    n = res["ok"]
    return dict(target=target, concurrency=concurrency, rate=rate, tokens=int(os.environ["BRAID_BENCH_TOKENS"]), ok=n,
                bad=res["bad"], errors=res["errors"], sample=res["sample"],
                rps=n / res["window_s"], cpu_ms_per_req=1000 * cpu / n if n else float("nan"),
                chunks_per_req=res["chunks"] / n if n else float("nan"),
                router_cpu_util=cpu / wall if wall > 0 else float("nan"),
                router_thread_cpu_s={k: round(v, 3) for k, v in threads.items() if v > 0},
                e2e_p50=_ms(res["e2e"], 50), e2e_p99=_ms(res["e2e"], 99),
                ttft_p50=_ms(res["ttft"], 50), ttft_p99=_ms(res["ttft"], 99))


def _ms(xs: list[float], q: float) -> float:
    return 1000 * percentile(xs, q)


def bench_front(front: str, addr: str, nodes: str, args, router_pid: int, tokenizer: str, direct1: dict) -> dict:
    """Saturation over the concurrency levels, then router vs direct at half that rate;
    `direct1`: the nodes called directly one request at a time (against the level c=1)."""
    target = "grpc" if front == "floor" else front  # the floor is a gRPC server
    levels = [load_level(target, addr, args, router_pid, concurrency=c, tokenizer=tokenizer) for c in args.levels]
    for lv in levels:
        print(f"  {front} c={lv['concurrency']}: {lv['rps']:.0f} req/s, router CPU {lv['cpu_ms_per_req']:.2f} ms/req, "
              f"{lv['chunks_per_req']:.1f} chunks/req", flush=True)
    sat = max(levels, key=lambda lv: lv["rps"])
    rate = max(1.0, sat["rps"] / 2)
    half = load_level(target, addr, args, router_pid, rate=rate, tokenizer=tokenizer)
    direct = load_level("direct", nodes, args, None, rate=rate)
    keys = ("e2e_p50", "e2e_p99", "ttft_p50", "ttft_p99")
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    return dict(levels=levels, saturation=sat, half=half, direct=direct, rate=rate,
                added={k: half[k] - direct[k] for k in keys},
                added_c1={k: one[k] - direct1[k] for k in keys} if one is not None else None)


def print_front(front: str, r: dict) -> None:
    from common import table

    rows = [[f"c={lv['concurrency']}", round(lv["rps"]), lv["e2e_p50"], lv["e2e_p99"], lv["ttft_p50"], lv["ttft_p99"],
             lv["cpu_ms_per_req"], f"{100 * lv['router_cpu_util']:.0f}%", lv["bad"]] for lv in r["levels"]]
    for name, lv in (("router @ half", r["half"]), ("direct @ half", r["direct"])):
        rows.append([f"{name} ({r['rate']:.0f}/s)", round(lv["rps"]), lv["e2e_p50"], lv["e2e_p99"], lv["ttft_p50"],
                     lv["ttft_p99"], lv["cpu_ms_per_req"] if name.startswith("router") else "-",
                     f"{100 * lv['router_cpu_util']:.0f}%" if name.startswith("router") else "-", lv["bad"]])
    for name, a in (("added @ half", r["added"]), ("added @ c=1 (vs direct c=1)", r["added_c1"])):
        if a is not None:
            rows.append([name, "-", a["e2e_p50"], a["e2e_p99"], a["ttft_p50"], a["ttft_p99"], "-", "-", "-"])
    title = "floor: a bare grpc.aio relay of the same calls" if front == "floor" else f"{front} front"
    print(f"\n{title} ({r['levels'][0]['tokens']}-token streams; latencies in ms)")
    print(table(["load", "req/s", "e2e p50", "e2e p99", "ttft p50", "ttft p99", "router CPU ms/req", "router CPU",
                 "bad"], rows))


def result_lines(results: dict) -> list[str]:
    out = []
    for front, r in results["fronts"].items():
        out += [f"router_rps_{front}={r['saturation']['rps']:.1f}",
                f"router_cpu_ms_per_req_{front}={r['saturation']['cpu_ms_per_req']:.3f}",
                f"router_added_p50_ms_{front}={r['added']['e2e_p50']:.3f}",
                f"router_added_p99_ms_{front}={r['added']['e2e_p99']:.3f}",
                f"router_added_ttft_p50_ms_{front}={r['added']['ttft_p50']:.3f}",
                f"router_added_ttft_p99_ms_{front}={r['added']['ttft_p99']:.3f}"]
        if r["added_c1"] is not None:
            out += [f"router_added_c1_p50_ms_{front}={r['added_c1']['e2e_p50']:.3f}",
                    f"router_added_c1_ttft_p50_ms_{front}={r['added_c1']['ttft_p50']:.3f}"]
    runs = [lv for r in results["fronts"].values() for lv in (*r["levels"], r["half"], r["direct"])]
    runs.append(results["direct_c1"])
    out += [f"router_requests_ok={sum(lv['ok'] for lv in runs)}", f"router_requests_bad={sum(lv['bad'] for lv in runs)}"]
    return ["RESULT " + line for line in out]


def start_cluster(args, workdir: str) -> tuple[list[Child], dict, dict, str]:
    """The fake nodes and the router; (children, node addresses, router addresses, tokenizer folder)."""
    from braid.engine.tiny import save_tokenizer

    tok = os.path.join(workdir, "tokenizer")
    save_tokenizer(tok)
    children = []
    nodes = Child(["nodes"])
    children.append(nodes)
    naddrs = nodes.read(READY_TIMEOUT_S)
    env = dict(os.environ)
    if args.profile:
        env["BRAID_ROUTER_PROFILE"] = os.path.abspath(args.profile)
    if args.uvloop:
        env["BRAID_BENCH_UVLOOP"] = "1"
    router = Child(["router", "--nodes", json.dumps(naddrs), "--tokenizer", tok], env=env, python=args.router_python)
    children.append(router)
    raddrs = router.read(READY_TIMEOUT_S)
    if args.floor:
        relay = Child(["relay", "--nodes", json.dumps(naddrs)])
        children.append(relay)
        raddrs["floor"] = relay.read(READY_TIMEOUT_S)["grpc"]
    return children, naddrs, raddrs, tok


def run(args) -> dict:
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    print(f"load average before: {' '.join(load_before)}; {os.cpu_count()} CPUs", flush=True)
    children: list[Child] = []
    results = dict(args=vars(args), load_before=load_before, fronts={})
    with tempfile.TemporaryDirectory(prefix="braid-router-bench-") as workdir:
        try:
            children, naddrs, raddrs, tok = start_cluster(args, workdir)
            results.update(nodes=naddrs, router=raddrs, pids=[c.proc.pid for c in children])
            results["direct_c1"] = direct1 = load_level("direct", json.dumps(naddrs), args, None, concurrency=1)
            for front in args.fronts + (["floor"] if args.floor else []):
                pid = children[2 if front == "floor" else 1].proc.pid
                results["fronts"][front] = bench_front(front, raddrs[front], json.dumps(naddrs), args, pid, tok,
                                                       direct1)
        finally:
            results["exit_codes"] = [c.stop() for c in reversed(children)]
    with open("/proc/loadavg") as f:
        results["load_after"] = f.read().split()[:3]
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64],
                   help="closed-loop concurrencies (comma-separated)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    p.add_argument("--fronts", type=lambda s: s.split(","), default=["grpc", "http"])
    p.add_argument("--quick", action="store_true", help="levels 1,8; 1 s each (a smoke run)")
    p.add_argument("--profile", help="run the router under cProfile and write its stats here")
    p.add_argument("--uvloop", action="store_true", help="run the router on uvloop (installed where --router-python is)")
    p.add_argument("--router-python", help="the interpreter of the router process (default: this one)")
    p.add_argument("--floor", action="store_true",
                   help="also load a bare relay making the same gRPC calls (what grpc.aio alone costs)")
    p.add_argument("--json", help="write every number (and the children's pids and ports) here")
    p.add_argument("--tokens", type=int, default=16, help="tokens per stream (the fake decode node's stream length)")
    args = p.parse_args(argv)
    os.environ["BRAID_BENCH_TOKENS"] = str(args.tokens)  # every child inherits it
    if args.quick:
        args.levels, args.duration, args.warmup = [1, 8], 1.0, 0.3
    # SIGTERM unwinds like Ctrl-C, through run()'s finally, which stops every child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = run(args)
    for front, r in results["fronts"].items():
        print_front(front, r)
    print(f"\nload average after: {' '.join(results['load_after'])}")
    for line in result_lines(results):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
