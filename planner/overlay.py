"""The chosen deployment as a kustomize overlay braid's manifests can deploy.

The overlay starts from the shipped overlay for the hardware's device
(manifests/overlays/npu, cuda or cpu): its patches keep the device plugin's
settings (tolerations, HCCL/NCCL environment, node selectors), and the planner
changes what the plan decides: the parallel sizes in cluster.yaml, one
accelerator per rank, CPU for threads_per_rank x ranks, the KV data ports of
every decode rank, and the replica counts. braid's base is copied beside it
(out/manifests/base), so the overlay renders on its own:

    kubectl kustomize OUT/manifests/overlays/plan
"""
from __future__ import annotations

import copy
import os
import shutil

import yaml

from braid.planner.cost import Instance
from braid.planner.search import Deployment

MANIFESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "manifests")
KV_PORT = 50100


def _read(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def _write(path: str, data, header: str = "") -> None:
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False)


def _parallel(section: dict, inst: Instance, role: str) -> None:
    par = section["parallel"]
    par["tensor_parallel_size"] = inst.tp
    par["prefill_context_parallel_size"] = inst.pcp if role == "prefill" else 1
    par["decode_context_parallel_size"] = inst.dcp
    if inst.ep > 1:
        par["enable_expert_parallel"] = True
        par["expert_parallel_size"] = inst.ep
    else:
        par.pop("enable_expert_parallel", None)
        par.pop("expert_parallel_size", None)


def _cluster_yaml(template: dict, dep: Deployment, model_path: str | None) -> dict:
    cfg = copy.deepcopy(template)
    if model_path:
        cfg["model"] = model_path
    _parallel(cfg["prefill"], dep.p, "prefill")
    _parallel(cfg["decode"], dep.d, "decode")
    cfg["prefill"].setdefault("scheduler", {})["max_num_seqs"] = dep.p.max_num_seqs
    cfg["decode"].setdefault("scheduler", {})["max_num_seqs"] = dep.d.max_num_seqs
    return cfg


def _resources(container: dict, resource: str | None, world: int, threads: int) -> None:
    res = container.setdefault("resources", {})
    for kind in ("requests", "limits"):
        section = res.setdefault(kind, {})
        section["cpu"] = str(max(1, threads * world))
        if resource:
            section[resource] = world


def _patch(template: dict | None, role: str, world: int, replicas: int, resource, threads: int) -> dict:
    """The role's StatefulSet patch: the template's, resized to `world` ranks."""
    patch = copy.deepcopy(template) if template else {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": f"braid-{role}"},
        "spec": {"template": {"spec": {"containers": [{"name": role}]}}}}
    patch["spec"]["replicas"] = replicas
    (container,) = [c for c in patch["spec"]["template"]["spec"]["containers"] if c["name"] == role]
    if resource or "resources" in container:
        _resources(container, resource, world, threads)
    if role == "decode":  # the base declares kv-0 and kv-1
        container["ports"] = [{"name": f"kv-{r}", "containerPort": KV_PORT + r} for r in range(2, world)]
        if not container["ports"]:
            del container["ports"]
    return patch


def write_overlay(out: str, dep: Deployment, device: str, resource: str | None, model_path: str | None = None,
                  note: str = "") -> str:
    """Write OUT/manifests/{base,overlays/plan}; returns the overlay's directory."""
    src = os.path.join(MANIFESTS, "overlays", device)
    if not os.path.isdir(src):
        raise ValueError(f"no shipped overlay for device {device!r} under {MANIFESTS} (a source checkout is needed)")
    root = os.path.join(out, "manifests")
    shutil.copytree(os.path.join(MANIFESTS, "base"), os.path.join(root, "base"), dirs_exist_ok=True)
    dst = os.path.join(root, "overlays", "plan")
    os.makedirs(dst, exist_ok=True)
    kust = _read(os.path.join(src, "kustomization.yaml"))
    cluster = _cluster_yaml(_read(os.path.join(src, "cluster.yaml")), dep, model_path)
    header = f"# Written by `braid plan`: {dep.label()} on {dep.cards} devices.\n" + "".join(
        f"# {line}\n" for line in note.splitlines())
    _write(os.path.join(dst, "cluster.yaml"), cluster, header)
    patches = []
    for entry in kust.get("patches") or []:
        path = entry["path"]
        if path in ("patch-prefill.yaml", "patch-decode.yaml"):
            continue  # resized below
        shutil.copy(os.path.join(src, path), os.path.join(dst, path))
        patches.append({"path": path})
    for role, inst, n in (("prefill", dep.p, dep.n_p), ("decode", dep.d, dep.n_d)):
        template = os.path.join(src, f"patch-{role}.yaml")
        doc = _patch(_read(template) if os.path.isfile(template) else None, role, inst.world, n, resource,
                     int(cluster[role]["parallel"].get("threads_per_rank", 1)))
        _write(os.path.join(dst, f"patch-plan-{role}.yaml"), doc)
        patches.append({"path": f"patch-plan-{role}.yaml"})
    kust["patches"] = patches
    _write(os.path.join(dst, "kustomization.yaml"), kust, header)
    return dst
