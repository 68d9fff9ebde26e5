"""A real cluster for integration tests: etcd, a router and nodes, each its own
process started with the `braid` CLI, all on loopback with free ports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from braid.discovery.etcd_server import EtcdServer


class Proc:
    def __init__(self, role: str, popen: subprocess.Popen, info: dict, log: str):
        self.role = role
        self.popen = popen
        self.info = info
        self.log = log

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def node_id(self) -> str:
        return self.info.get("node_id", "router")

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


class Cluster:
    def __init__(self, workdir: str, model: str, overrides: dict | None = None):
        self.workdir = workdir
        self.etcd = EtcdServer(data_dir=os.path.join(workdir, "etcd"))
        self.etcd.start()
        cfg = {
            "cluster": "test",
            "model": model,
            "etcd": {"endpoints": [self.etcd.endpoint], "lease_ttl_s": 2, "timeout_s": 2},
            "router": {"port": 0, "metrics_port": 0, "prefill_policy": "round_robin", "decode_policy": "round_robin",
                       "load_poll_s": 0.2, "request_timeout_s": 120},
            "prefill": {"port": 0, "metrics_port": 0, "engine": {"prefill_context_parallel_size": 2, "block_size": 4,
                                                                "num_kv_blocks": 256, "threads_per_rank": 1}},
            "decode": {"port": 0, "metrics_port": 0, "transfer": {"port": 0},
                       "engine": {"tensor_parallel_size": 2, "decode_context_parallel_size": 2, "block_size": 4,
                                  "num_kv_blocks": 256, "threads_per_rank": 1}},
        }
        for section, values in (overrides or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.config_path = os.path.join(workdir, "cluster.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.procs: list[Proc] = []
        self._n = 0

    def spawn(self, role: str, *, sets: list[str] = (), env: dict | None = None, wait: bool = True, timeout: float = 180) -> Proc:
        self._n += 1
        ready = os.path.join(self.workdir, f"{role}-{self._n}.ready")
        log = os.path.join(self.workdir, f"{role}-{self._n}.log")
        cmd = [sys.executable, "-m", "braid.router.cli", role, "serve", "--config", self.config_path, "--ready-file", ready]
        for s in sets:
            cmd += ["--set", s]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "w") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        proc = Proc(role, p, {}, log)
        self.procs.append(proc)
        if wait:
            end = time.monotonic() + timeout
            while not os.path.exists(ready):
                if p.poll() is not None:
                    raise RuntimeError(f"{role} exited ({p.returncode}):\n{proc.tail()}")
                if time.monotonic() > end:
                    raise TimeoutError(f"{role} not ready:\n{proc.tail()}")
                time.sleep(0.1)
            with open(ready) as f:
                proc.info = json.load(f)
        return proc

    def wait_nodes(self, client, expected: dict[str, set[str]], timeout: float = 30) -> list:
        """Until ListNodes shows exactly these reachable node ids per role."""
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
        for p in reversed(self.procs):
            p.stop()
        self.etcd.stop()
