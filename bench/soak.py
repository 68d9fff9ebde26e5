"""The chaos soak: a local cluster (two prefill and two decode nodes, one router) under
mixed load while a fault injector kills and pauses its parts; then every request's end
is checked.  `python bench/soak.py [--duration 600] [--quick]` or `braid soak`.

Where it sits in a request's life: nowhere; it drives requests end to end through the
client SDK into a braid.cluster.launcher.LocalCluster (the processes `braid up` starts).
Load: short and long greedy prompts (checked token for token against the same tiny model
run alone, offline, with braid's LLM), sampled ones, streams the client cancels, bad
inputs, adversarial requests (temperature=1e-40, max_tokens 10**9, prompts over
max_model_len). Faults, one after another: SIGSTOP etcd past the lease TTL, restart the
router (SIGTERM: it drains), SIGKILL a decode / prefill node process, SIGKILL a decode
rank (a child of the node process), SIGKILL a prefill rank with KV in flight (how KV
connections are dropped here: `ss -K` needs socket-destroy support, absent on this
kernel). A node that exits is restarted as Kubernetes would; one that outlives its
engine by NODE_EXIT_WAIT_S is a finding.

Checks: every request completed (greedy ones exact) or ended with a typed status (not
UNKNOWN/INTERNAL), bad inputs never completed, none outlived its deadline by more than
HANG_SLACK_S, every live decode node has zero reserved blocks and all blocks free once
quiet, no engine died from a request (no node exit, no "engine stopped" answer outside
a fault's window), every fault recovered, no process or port left behind. Prints tables
and a RESULT line; exits 0 when every check held.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from braid.client import BraidError, Client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_model, table  # noqa: E402 - bench/ is not a package
from soak_load import GREEDY, MAX_MODEL_LEN, MUST_FAIL, UNTYPED, Outcome, reference, request, run_one  # noqa: E402

HANG_SLACK_S = 5.0
NODE_EXIT_WAIT_S = 20.0
"""After a rank is killed, how long its node process may take to exit (then it is killed)."""
RECOVERY_TIMEOUT_S = 180.0
ENGINE_DEAD = re.compile(r"engine (stopped|failed|died)")
"""How a node says its engine is gone (braid.node.errors, the decode stream's error event)."""
RANK_FAULTS = ("kill_rank", "drop_kv")
"""The faults that kill an engine on purpose."""
SOAK_CONFIG = {
    "cluster": "soak",
    "etcd": {"lease_ttl_s": 3, "timeout_s": 2},
    "router": {"load_poll_s": 0.2, "request_timeout_s": 60, "reserve_lease_s": 5, "drain_timeout_s": 10,
               "node_rpc_timeout_s": 3},
    "prefill": {"parallel": {"prefill_context_parallel_size": 2, "threads_per_rank": 1}, "drain_timeout_s": 5,
                "cache": {"block_size": 4, "num_kv_blocks": 512}, "scheduler": {"max_model_len": MAX_MODEL_LEN}},
    "decode": {"parallel": {"tensor_parallel_size": 2, "decode_context_parallel_size": 2, "threads_per_rank": 1},
               "cache": {"block_size": 4, "num_kv_blocks": 512}, "scheduler": {"max_model_len": MAX_MODEL_LEN},
               "drain_timeout_s": 5},
}
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, initializer_range=0.2, max_position_embeddings=2048)


@dataclass
class Fault:
    name: str
    start: float
    end: float = 0.0
    recovered_s: float | None = None  # injection to: every node routable and a request served
    note: str = ""


class Soak:
    """One soak run: the cluster, the client threads, the fault injector, the monitor
    that restarts exited nodes, and what they recorded for the checks."""

    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = tempfile.mkdtemp(prefix="braid-soak-")
        self.outcomes: list[Outcome] = []
        self.faults: list[Fault] = []
        self.findings: dict[str, list[str]] = {"engines": [], "recovery": []}
        self.respawn_lock = threading.Lock()
        self.pids: set[int] = set()
        self.ports: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.cluster = None
        self.nodes: dict[str, list] = {"prefill": [], "decode": []}
        self.expected_down: set[int] = set()
        """Pids of node processes the injector killed (or whose rank it killed)."""

    # -- the cluster ---------------------------------------------------------------------

    def start(self) -> None:
        from braid.cluster.launcher import LocalCluster

        self.model = bench_model(os.path.join(tempfile.gettempdir(), "braid-soak-model"), **MODEL)
        self.cluster = LocalCluster(self.workdir, data=SOAK_CONFIG, model=self.model)
        self.pids.add(self.cluster.etcd.pid)
        self.ports.add(int(self.cluster.etcd.endpoint.rsplit(":", 1)[1]))
        roles = ["prefill", "prefill", "decode", "decode"]
        procs = [self.cluster.spawn(r, wait=False) for r in roles]
        router = self.cluster.spawn("router", wait=False)
        for p in (*procs, router):
            self.cluster.wait_ready(p, time.monotonic() + 300)
            self._track(p)
        for p in procs:
            self.nodes[p.role].append(p)
        self.router_port = int(router.address.rsplit(":", 1)[1])
        self._wait_full_strength(time.monotonic() + 120)

    def _track(self, proc) -> None:
        self.pids.add(proc.popen.pid)
        self.ports.update(int(proc.info[k].rsplit(":", 1)[1]) for k in ("address", "metrics") if proc.info.get(k))

    def _wait_full_strength(self, deadline: float) -> None:
        expected = {role: {p.node_id for p in ps} for role, ps in self.nodes.items()}
        with Client(self.cluster.address) as c:
            self.cluster.wait_nodes(c, expected, timeout=max(1.0, deadline - time.monotonic()))

    def _respawn(self, proc):
        sets = [f"router.port={self.router_port}"] if proc.role == "router" else []
        with self.respawn_lock:  # the injector and the monitor both restart processes
            new = self.cluster.respawn(proc, sets=sets, wait=True)
            self._track(new)
            if proc.role != "router":
                group = self.nodes[proc.role]
                group[group.index(proc)] = new
        return new

    # -- load ------------------------------------------------------------------------------

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        from braid.proto import router_pb2_grpc

        address = f"127.0.0.1:{self.router_port}"
        with Client(address) as client, grpc.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            while not self.stop.is_set():
                out = run_one(client, stub, *request(rng))
                with self.lock:
                    self.outcomes.append(out)
                if out.status == "UNAVAILABLE":
                    time.sleep(0.5)  # the router is restarting: do not spin

    # -- faults ------------------------------------------------------------------------------

    def injector(self, until: float) -> None:
        # the quick faults first, so that a short run still sees several kinds
        order = ["pause_etcd", "restart_router", "kill_decode", "kill_rank", "drop_kv", "kill_prefill"]
        gap = 3.0 if self.args.quick else 15.0
        i = 0
        while time.monotonic() < until and not self.stop.is_set():
            name = order[i % len(order)]
            i += 1
            fault = Fault(name, time.monotonic())
            try:
                getattr(self, f"_fault_{name}")(fault)
                self._wait_full_strength(time.monotonic() + RECOVERY_TIMEOUT_S)
                self._probe(time.monotonic() + 60)
                fault.recovered_s = time.monotonic() - fault.start
            except Exception as e:  # noqa: BLE001 - a fault the cluster did not recover from
                self.findings["recovery"].append(f"{name}: no recovery: {type(e).__name__}: {e}"[:300])
            fault.end = time.monotonic()
            self.faults.append(fault)
            time.sleep(gap)

    def _probe(self, deadline: float) -> None:
        """Until one short greedy request completes through the router."""
        with Client(f"127.0.0.1:{self.router_port}") as c:
            while True:
                try:
                    c.complete([5, 6, 7, 8, 9], max_tokens=2, temperature=0, timeout=5)
                    return
                except BraidError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def _kill_node(self, role: str, fault: Fault) -> None:
        proc = self.rng.choice(self.nodes[role])
        self.expected_down.add(proc.popen.pid)
        self.pids.update(proc.ranks())
        os.kill(proc.popen.pid, signal.SIGKILL)  # the node process only: its ranks must notice
        proc.popen.wait(10)
        self._respawn(proc)

    def _fault_kill_decode(self, fault: Fault) -> None:
        self._kill_node("decode", fault)

    def _fault_kill_prefill(self, fault: Fault) -> None:
        self._kill_node("prefill", fault)

    def _fault_kill_rank(self, fault: Fault) -> None:
        self._kill_a_rank("decode", fault)

    def _fault_drop_kv(self, fault: Fault) -> None:  # the sender's KV connections drop with it
        self._kill_a_rank("prefill", fault)

    def _kill_a_rank(self, role: str, fault: Fault) -> None:
        proc = self.rng.choice(self.nodes[role])
        ranks = proc.ranks()
        if not ranks:
            fault.note = "no rank process found"
            return
        self.pids.update(ranks)
        self.expected_down.add(proc.popen.pid)
        os.kill(ranks[0], signal.SIGKILL)
        try:
            proc.popen.wait(NODE_EXIT_WAIT_S)
            fault.note = f"node exited with code {proc.popen.returncode}"
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            fault.note = "node outlived its engine"
            self.findings["engines"].append(f"{fault.name}: {role} node {proc.node_id} kept running {NODE_EXIT_WAIT_S:.0f} s "
                                 "after a rank died (issue 14 finding 2); killed it")
        self._respawn(proc)

    def _fault_pause_etcd(self, fault: Fault) -> None:
        pid, ttl = self.cluster.etcd.pid, SOAK_CONFIG["etcd"]["lease_ttl_s"]
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(ttl + 2)
        finally:
            os.kill(pid, signal.SIGCONT)
        fault.note = f"etcd stopped {ttl + 2} s (lease TTL {ttl} s)"

    def _fault_restart_router(self, fault: Fault) -> None:
        router = self.cluster.router
        router.stop(timeout=SOAK_CONFIG["router"]["drain_timeout_s"] + 10)  # SIGTERM: it drains
        fault.note = f"router exited with code {router.popen.returncode}"
        if router.popen.returncode != 0:
            self.findings["recovery"].append(f"restart_router: the router exited with code {router.popen.returncode} on SIGTERM")
        self._respawn(router)

    def monitor(self) -> None:
        """Restart any node process that exited on its own (Kubernetes would), and note it."""
        n = 0
        while not self.stop.wait(0.5):
            n += 1
            if n % 10 == 0:
                self.collect_ranks()
            for role, procs in self.nodes.items():
                for proc in list(procs):
                    pid = proc.popen.pid
                    if pid in self.expected_down or proc.popen.poll() is None:
                        continue
                    self.findings["engines"].append(f"{role} node {proc.node_id} exited by itself (code {proc.popen.returncode}); "
                                         f"log: {proc.tail(3).strip()[-200:]}")
                    self.expected_down.add(pid)
                    try:
                        self._respawn(proc)
                    except Exception as e:  # noqa: BLE001
                        self.findings["recovery"].append(f"restart of {role} failed: {e}"[:300])

    def collect_ranks(self) -> None:
        self.pids.update(r for procs in self.nodes.values() for p in procs for r in p.ranks())

    # -- the end -----------------------------------------------------------------------------

    def quiesce_and_check_blocks(self) -> list[str]:
        """Every live decode node: zero reserved blocks, every block free (leases end in
        reserve_lease_s, so wait that long and some)."""
        from braid.proto import common_pb2, nodes_pb2_grpc

        deadline = time.monotonic() + SOAK_CONFIG["router"]["reserve_lease_s"] + 20
        while True:
            bad = []
            for proc in self.nodes["decode"]:
                try:
                    with grpc.insecure_channel(proc.address) as ch:
                        load = nodes_pb2_grpc.DecodeNodeStub(ch).GetLoad(common_pb2.LoadRequest(), timeout=5)
                    if load.reserved_blocks or load.free_kv_blocks != load.total_kv_blocks:
                        bad.append(f"{proc.node_id}: reserved {load.reserved_blocks}, "
                                   f"free {load.free_kv_blocks}/{load.total_kv_blocks}")
                except grpc.RpcError as e:
                    bad.append(f"{proc.node_id}: GetLoad {e.code().name}")
            if not bad or time.monotonic() > deadline:
                return bad
            time.sleep(0.5)

    def check_outcomes(self, reference: dict) -> list[str]:
        failed = []
        for o in self.outcomes:
            what = f"{o.kind} request (prompt {len(o.prompt)} tokens, max_tokens {o.max_tokens})"
            if o.elapsed > o.timeout + HANG_SLACK_S:
                failed.append(f"{what} hung: {o.elapsed:.1f} s past a {o.timeout:.0f} s deadline")
            if o.status in UNTYPED:
                failed.append(f"{what} ended untyped: {o.status} {o.cause}")
            if o.kind in MUST_FAIL and o.status == "OK":
                failed.append(f"{what} completed though invalid")
            if o.kind in GREEDY and o.status == "OK":
                want = reference.get((tuple(o.prompt), o.max_tokens))
                if want is None or o.tokens != want:
                    failed.append(f"{what} differs from the model run alone")
        return failed

    def check_engine_deaths(self) -> list[str]:
        """Answers naming a dead engine outside the window of every fault that kills a rank
        (then a request killed the engine)."""
        windows = [(f.start, f.end + 5.0) for f in self.faults if f.name in RANK_FAULTS]
        bad = [o for o in self.outcomes if ENGINE_DEAD.search(o.details)
               and not any(a <= o.start + o.elapsed and o.start <= b for a, b in windows)]
        return [f"{len(bad)} request(s) answered 'engine stopped' outside any fault (kinds: "
                f"{dict(Counter(o.kind for o in bad))})"] if bad else []

    def check_leftovers(self) -> list[str]:
        deadline = time.monotonic() + 15
        alive = set(self.pids)
        while alive and time.monotonic() < deadline:
            alive = {p for p in alive if _alive(p)}
            time.sleep(0.2)
        left = [f"process {p} still running" for p in sorted(alive)]
        for port in sorted(self.ports):
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    left.append(f"port {port} still accepts connections")
        return left


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def report(soak: Soak, checks: dict[str, list[str]], wall_s: float) -> str:
    by = Counter((o.status, o.kind, o.cause or "-") for o in soak.outcomes)
    lines = [f"soak: {len(soak.outcomes)} requests in {wall_s:.0f} s, {len(soak.faults)} faults", "",
             table(["outcome", "kind", "cause", "requests"], [[*k, n] for k, n in sorted(by.items())]), ""]
    rows = []
    for name in sorted({f.name for f in soak.faults}):
        fs = [f for f in soak.faults if f.name == name]
        rec = [f.recovered_s for f in fs if f.recovered_s is not None]
        p50 = f"{statistics.median(rec):.1f}" if rec else "-"
        worst = f"{max(rec):.1f}" if rec else "-"
        rows.append([name, len(fs), len(fs) - len(rec), p50, worst, fs[-1].note or "-"])
    if rows:
        lines += [table(["fault", "injected", "unrecovered", "recovery p50 s", "recovery max s", "last note"], rows), ""]
    for name, failed in checks.items():
        lines.append(f"check {name}: {'ok' if not failed else 'FAILED'}")
        lines += [f"    {x}" for x in failed[:8]] + ([f"    ... {len(failed) - 8} more"] if len(failed) > 8 else [])
    bad = [n for n, f in checks.items() if f]
    ok = sum(1 for o in soak.outcomes if o.status == "OK")
    lines.append(f"RESULT: {'PASS' if not bad else 'FAIL'} requests={len(soak.outcomes)} completed={ok} "
                 f"faults={len(soak.faults)} failed_checks={','.join(bad) or 'none'}")
    return "\n".join(lines)


def run(args) -> int:
    soak = Soak(args)
    t0 = time.monotonic()
    threads, checks = [], {}
    try:
        soak.start()
        print(f"soak: cluster up in {time.monotonic() - t0:.0f} s (workdir {soak.workdir})", flush=True)
        until = time.monotonic() + args.duration
        threads = [threading.Thread(target=soak.worker, args=(args.seed * 100 + i,), daemon=True)
                   for i in range(args.workers)]
        threads.append(threading.Thread(target=soak.monitor, daemon=True))
        for t in threads:
            t.start()
        soak.injector(until)
        while time.monotonic() < until:
            time.sleep(0.5)
        soak.stop.set()
        for t in threads:
            t.join(60)
        soak.collect_ranks()
        checks["blocks_free"] = soak.quiesce_and_check_blocks()
    finally:
        soak.stop.set()
        if soak.cluster is not None:
            soak.collect_ranks()
            soak.cluster.close()
    checks["requests"] = soak.check_outcomes(reference(soak.model, soak.outcomes))
    checks["engines"] = soak.check_engine_deaths() + soak.findings["engines"]
    checks["recovery"] = soak.findings["recovery"]
    checks["leftovers"] = soak.check_leftovers()
    print(report(soak, checks, time.monotonic() - t0), flush=True)
    return 0 if not any(checks.values()) else 1


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load and faults (default 600)")
    ap.add_argument("--quick", action="store_true", help="about a minute (--duration 60)")
    ap.add_argument("--workers", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 60.0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
