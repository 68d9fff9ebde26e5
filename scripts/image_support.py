"""Helpers of scripts/check_image.py that know nothing of the image: free
loopback ports, HTTP and gRPC health calls, the process tree under /proc,
Kubernetes memory quantities."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path


class CheckFailed(AssertionError):
    pass


def free_ports(n: int, consecutive: bool = False) -> list[int]:
    """n free 127.0.0.1 ports (n consecutive ones with `consecutive`)."""
    for _ in range(200):
        socks = []
        try:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            socks.append(first)
            base = first.getsockname()[1]
            for i in range(1, n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i if consecutive else 0))
            return [s.getsockname()[1] for s in socks]
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise CheckFailed(f"no {n} free ports")


def etcd_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"etcd Version: (\d+)\.(\d+)", out)
    if not m:
        raise CheckFailed(f"{binary} --version: {out!r}")
    return int(m[1]), int(m[2])


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def http_post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def is_serve(argv: list[bytes]) -> bool:
    """`braid <role> serve ...` (python running the braid script), not buildah's own processes."""
    return b"serve" in argv and any(a == b"braid" or a.endswith(b"/braid") for a in argv[:2]) \
        and b"buildah" not in argv[0]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    """Every process below `root`, parents before children."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            children.setdefault(parent(int(d)), []).append(int(d))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def quantity(q: str) -> int:
    """A Kubernetes memory quantity (512Mi, 3Gi, 1G) in bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", q)
    if not m:
        raise CheckFailed(f"memory quantity {q!r}")
    unit = m[2] or ""
    scale = 1024 if unit.endswith("i") else 1000
    return int(m[1]) * scale ** (" KMGT".index(unit[:1]) if unit else 0)


def grpc_health(port: int, service: str = "") -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
