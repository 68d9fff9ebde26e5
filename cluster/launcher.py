"""A local cluster on loopback: its own etcd, a router and nodes, each a
separate process started with the `braid` CLI, every server on a free port.
`braid up`, the integration tests and the benchmarks all use this one class.

    cluster = LocalCluster(workdir, data={...}, model=path)   # etcd starts here
    address = cluster.start()            # one prefill node, one decode node, the router
    ...                                  # or spawn("prefill") / spawn("router") one by one
    cluster.close()                      # SIGTERM in reverse order, then etcd

Every component writes its log to `workdir/<tag>.log`; a component that exits
or does not become ready raises with the last lines of its log, and the log
stays where it is.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from braid.cluster.config import load_config, to_dict
from braid.discovery.etcd_server import EtcdServer

START_TIMEOUT_S = 300.0


class ComponentFailed(RuntimeError):
    """A component exited or did not become ready; the message quotes its log."""


def child_pids() -> dict[int, list[int]]:
    """Every live process's children, by parent pid, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (a node's rank processes and theirs)."""
    children = child_pids()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class Proc:
    """One component process of a LocalCluster."""

    def __init__(self, role: str, popen: subprocess.Popen, log: str, ready_file: str):
        self.role = role
        self.popen = popen
        self.ready_file = ready_file
        self.info: dict = {}
        """What the component wrote to its ready file: address, node_id, metrics."""
        self.log = log

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def node_id(self) -> str:
        return self.info.get("node_id", "router")

    def ranks(self) -> list[int]:
        """The processes this component started itself (a node's ranks 1..world-1)."""
        return child_pids().get(self.popen.pid, [])

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 40) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class LocalCluster:
    def __init__(self, workdir: str, *, data: dict | None = None, model: str | None = None,
                 overrides: list[str] = (), router_port: int = 0, tls: bool = False):
        """`data` is a cluster config as plain data (YAML), `overrides` FIELD=VALUE
        items on top; addresses and ports are replaced by loopback and free ports
        (the router's by `router_port` when given). `tls`: generate a throwaway CA and
        certificates in `workdir/tls` (braid.cluster.certs) and run every gRPC hop
        over mutual TLS; `certs` then names the files, `client()` dials as the admin."""
        self.workdir = workdir
        self.certs = None
        cfg = to_dict(load_config(data=data or {}, overrides=list(overrides)))
        if model:
            cfg["model"] = model
        self.procs: list[Proc] = []
        self._n = 0
        self.router: Proc | None = None
        self.etcd = EtcdServer(data_dir=os.path.join(workdir, "etcd"))
        self.etcd.start()
        cfg["etcd"]["endpoints"] = [self.etcd.endpoint]
        cfg["router"].update(host="127.0.0.1", port=router_port, metrics_port=0,
                             http_port=0 if cfg["router"].get("http_port", 0) >= 0 else -1)
        for role in ("prefill", "decode"):
            cfg[role].update(host="127.0.0.1", port=0, metrics_port=0, advertise_host=None)
            cfg[role]["transfer"]["port"] = 0
        if tls:
            from braid.cluster.certs import make_certs, tls_config_data

            self.certs = make_certs(os.path.join(workdir, "tls"))
            for role, section in tls_config_data(self.certs).items():
                cfg[role]["tls"].update(section["tls"])
        self.config = load_config(data=cfg)
        self.config_path = os.path.join(workdir, "cluster.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(cfg, f)

    @property
    def address(self) -> str:
        """The router's address."""
        return self.router.address

    @property
    def http_address(self) -> str | None:
        """The router's OpenAI-compatible HTTP API, "host:port" (None when router.http_port is -1)."""
        return self.router.info.get("http")

    def client_tls(self, identity: str = "admin") -> dict:
        """Client keyword arguments (ca, cert, key) of `identity` under TLS; {} without it."""
        if self.certs is None:
            return {}
        p = self.certs[identity]
        return dict(ca=p.ca, cert=p.cert, key=p.key)

    def client(self, identity: str = "admin", **kwargs):
        """A braid Client of the router, as `identity` when the cluster runs TLS."""
        from braid.client import Client

        return Client(self.address, **self.client_tls(identity), **kwargs)

    def spawn(self, role: str, *, sets: list[str] = (), env: dict | None = None, wait: bool = True,
              timeout: float = 180) -> Proc:
        """Start one component (router, prefill or decode); with `wait`, return once it is serving."""
        self._n += 1
        tag = f"{role}-{self._n}"
        ready = os.path.join(self.workdir, f"{tag}.ready.json")
        log = os.path.join(self.workdir, f"{tag}.log")
        cmd = [sys.executable, "-m", "braid.cluster.cli", role, "serve", "--config", self.config_path,
               "--ready-file", ready]
        for s in sets:
            cmd += ["--set", s]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "w") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        proc = Proc(role, p, log, ready)
        self.procs.append(proc)
        if role == "router":
            self.router = proc
        if wait:
            self.wait_ready(proc, time.monotonic() + timeout)
        return proc

    def respawn(self, proc: Proc, *, sets: list[str] = (), wait: bool = True, timeout: float = 180) -> Proc:
        """Replace `proc` with a fresh process of the same role (as Kubernetes restarts a
        pod): SIGKILL it if still running, then spawn the role again with `sets`."""
        proc.kill()
        if proc in self.procs:
            self.procs.remove(proc)
        return self.spawn(proc.role, sets=sets, wait=wait, timeout=timeout)

    def wait_ready(self, proc: Proc, deadline: float) -> dict:
        while not os.path.exists(proc.ready_file):
            if proc.popen.poll() is not None:
                raise ComponentFailed(
                    f"{proc.role} exited with code {proc.popen.returncode}; its log ({proc.log}) ends:\n{proc.tail(20)}")
            if time.monotonic() > deadline:
                raise ComponentFailed(f"{proc.role} did not become ready in time; its log ({proc.log}) ends:\n{proc.tail(20)}")
            time.sleep(0.1)
        with open(proc.ready_file) as f:
            proc.info = json.load(f)
        return proc.info

    def start(self, nodes: list[tuple[str, list[str]]] | None = None, timeout_s: float = START_TIMEOUT_S) -> str:
        """Start `nodes` ((role, FIELD=VALUE overrides) each; default one prefill and
        one decode node) and the router, all at once; returns the router's address
        once the router can route to every node."""
        deadline = time.monotonic() + timeout_s
        started = [self.spawn(role, sets=sets, wait=False) for role, sets in (nodes or [("prefill", []), ("decode", [])])]
        router = self.spawn("router", wait=False)
        for proc in (router, *started):
            self.wait_ready(proc, deadline)
        expected = {}
        for proc in started:
            expected.setdefault(proc.role, set()).add(proc.node_id)
        with self.client() as c:  # ListNodes: the admin's certificate under TLS
            self.wait_nodes(c, expected, timeout=max(1.0, deadline - time.monotonic()))
        return self.address

    def wait_nodes(self, client, expected: dict[str, set[str]], timeout: float = 30) -> list:
        """Until the router lists exactly these reachable node ids per role."""
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            try:
                nodes = client.list_nodes(timeout=5)
                got = {role: {n.node_id for n in nodes if n.role == role and n.reachable} for role in expected}
                last = got
                if got == expected:
                    return nodes
            except Exception as e:  # noqa: BLE001 - router still starting
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"nodes never became {expected}; last view {last}")

    def close(self) -> None:
        """Stop every component (SIGTERM in reverse start order, SIGKILL after 40 s), then etcd."""
        for p in reversed(self.procs):
            p.stop()
        self.etcd.stop()
