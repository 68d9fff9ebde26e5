"""A small kustomize renderer for braid's manifests, for machines without
`kubectl kustomize` or `kustomize build`.

It implements exactly the kustomization features these manifests use and
raises RenderError on any other field, option or patch directive, rather than
render something kustomize would render differently:

  resources          files (multi-document YAML) and directories (other kustomizations)
  configMapGenerator files only; behavior create or replace; the content-hash
                     name suffix (kustomize's algorithm) and the rewriting of
                     references to the generated name in pod templates
  patches            strategic-merge patches from files (`path`), matched to a
                     resource by apiVersion group, kind and name
  labels             pairs with includeTemplates (never includeSelectors)
  images             name with newName / newTag / digest

Transformers run in kustomize's order (patches, labels, images) at every
level, and hash suffixes are added once at the top, as kustomize does.
tests/test_manifests.py checks that the output equals `kubectl kustomize`
wherever that is installed.

Usage: python manifests/render.py manifests/overlays/cpu > rendered.yaml
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "labels", "images"}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

# Strategic-merge keys of the lists that may appear in patches (from the
# Kubernetes API's x-kubernetes-patch-merge-key). Lists absent from both
# tables are refused.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}
ATOMIC_LISTS = {"args", "command", "tolerations", "supplementalGroups", "accessModes", "drop", "add", "envFrom"}

# Pod templates that labels (includeTemplates) and images reach, by kind.
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

# kustomize's "legacy" output order.
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class RenderError(ValueError):
    """The kustomization uses something this renderer does not implement, or is wrong."""


def build(path: str | Path) -> list[dict]:
    """Render the kustomization in directory `path`: the list of resources."""
    resources, generated = _accumulate(Path(path).resolve(), set())
    renames = {}
    for res in resources:
        if id(res) in generated:
            old = res["metadata"]["name"]
            res["metadata"]["name"] = f"{old}-{configmap_hash(res)}"
            renames[old] = res["metadata"]["name"]
    for res in resources:
        _rename_configmap_refs(res, renames)
    return sorted(resources, key=_order_key)


def dump(resources: list[dict]) -> str:
    return yaml.safe_dump_all(resources, sort_keys=True, default_flow_style=False)


# -- accumulation ----------------------------------------------------------------


def _load_kustomization(root: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        if (root / name).is_file():
            data = yaml.safe_load((root / name).read_text()) or {}
            break
    else:
        raise RenderError(f"{root}: no kustomization.yaml")
    unknown = sorted(set(data) - KUSTOMIZATION_FIELDS)
    if unknown:
        raise RenderError(f"{root}: kustomization field(s) {unknown} not supported by this renderer")
    if data.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{root}: kind {data['kind']!r} is not Kustomization (components are not supported)")
    return data


def _accumulate(root: Path, seen: set) -> tuple[list[dict], set]:
    """Resources of the kustomization at `root` with its own generators and
    transformers applied; also the ids of generated ConfigMaps still needing a hash."""
    if root in seen:
        raise RenderError(f"{root}: kustomization cycle")
    k = _load_kustomization(root)
    resources: list[dict] = []
    generated: set = set()
    for entry in k.get("resources") or []:
        path = root / entry
        if path.is_dir():
            sub, sub_generated = _accumulate(path.resolve(), seen | {root})
            resources += sub
            generated |= sub_generated
        elif path.is_file():
            resources += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        else:
            raise RenderError(f"{root}: resource {entry!r} not found (remote resources are not supported)")
    _check_unique(resources, root)
    for gen in k.get("configMapGenerator") or []:
        _generate_configmap(root, gen, resources, generated)
    for patch in k.get("patches") or []:
        _apply_patch_entry(root, patch, resources)
    for label in k.get("labels") or []:
        _apply_labels(root, label, resources)
    for image in k.get("images") or []:
        _apply_image(root, image, resources)
    return resources, generated


def _res_id(res: dict) -> tuple[str, str, str]:
    group = res.get("apiVersion", "").rpartition("/")[0]
    return group, res.get("kind", ""), res.get("metadata", {}).get("name", "")


def _check_unique(resources: list[dict], root: Path) -> None:
    ids = [_res_id(r) for r in resources]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise RenderError(f"{root}: duplicate resources {sorted(dup)}")


# -- configMapGenerator --------------------------------------------------------------


def _generate_configmap(root: Path, gen: dict, resources: list[dict], generated: set) -> None:
    unknown = sorted(set(gen) - {"name", "behavior", "files"})
    if unknown:
        raise RenderError(f"{root}: configMapGenerator option(s) {unknown} not supported")
    data = {}
    for entry in gen.get("files") or []:
        key, _, rel = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = (root / rel).read_text()
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}}
    if data:
        cm["data"] = data
    existing = [r for r in resources if _res_id(r) == ("", "ConfigMap", gen["name"])]
    behavior = gen.get("behavior", "create")
    if behavior == "create":
        if existing:
            raise RenderError(f"{root}: ConfigMap {gen['name']!r} exists; use behavior: replace")
        resources.append(cm)
    elif behavior == "replace":
        if not existing:
            raise RenderError(f"{root}: no ConfigMap {gen['name']!r} to replace")
        old = existing[0]
        # kustomize keeps the replaced object's labels and annotations.
        for field in ("labels", "annotations"):
            if old["metadata"].get(field):
                cm["metadata"][field] = {**old["metadata"][field], **cm["metadata"].get(field, {})}
        resources[resources.index(old)] = cm
        generated.discard(id(old))
    else:
        raise RenderError(f"{root}: configMapGenerator behavior {behavior!r} not supported")
    generated.add(id(cm))


def _go_json(value) -> str:
    """json.Marshal's encoding: sorted keys, no spaces, HTML characters escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def configmap_hash(cm: dict) -> str:
    """kustomize's name suffix for a generated ConfigMap (api/hasher): sha256 of
    the JSON of kind, name and data; the first 10 hex digits with 0, 1, 3, a, e
    mapped to g, h, k, m, t so the suffix never reads as a number.

    kustomize v5 looks the name up with yaml.Lookup("metadata/name"), which
    reads a field literally called "metadata/name" and finds none, so the
    name it hashes is always "" (checked against `kubectl kustomize`)."""
    unsupported = sorted(set(cm) - {"apiVersion", "kind", "metadata", "data"})
    if unsupported:
        raise RenderError(f"ConfigMap {cm['metadata']['name']}: cannot hash field(s) {unsupported}")
    doc = {"kind": "ConfigMap", "name": "", "data": cm.get("data") or ""}
    digest = hashlib.sha256(_go_json(doc).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _pod_specs(res: dict):
    if res.get("kind") in WORKLOAD_KINDS:
        yield res["spec"]["template"]["spec"]
    elif res.get("kind") in ("CronJob", "Pod", "ReplicationController"):
        raise RenderError(f"{res['kind']} {res['metadata']['name']}: kind not supported by this renderer")


def _rename_configmap_refs(res: dict, renames: dict) -> None:
    for spec in _pod_specs(res):
        for vol in spec.get("volumes") or []:
            if "configMap" in vol:
                vol["configMap"]["name"] = renames.get(vol["configMap"]["name"], vol["configMap"]["name"])
            if "projected" in vol:
                raise RenderError("projected volumes are not supported by this renderer")
        for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            for env in c.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    ref["name"] = renames.get(ref["name"], ref["name"])
            for src in c.get("envFrom") or []:
                if "configMapRef" in src:
                    src["configMapRef"]["name"] = renames.get(src["configMapRef"]["name"], src["configMapRef"]["name"])


# -- patches --------------------------------------------------------------------------


def _apply_patch_entry(root: Path, entry: dict, resources: list[dict]) -> None:
    unknown = sorted(set(entry) - {"path"})
    if unknown:
        raise RenderError(f"{root}: patch option(s) {unknown} not supported (only `path` to a strategic-merge patch)")
    for patch in yaml.safe_load_all((root / entry["path"]).read_text()):
        if patch is None:
            continue
        if isinstance(patch, list) or "op" in patch:
            raise RenderError(f"{root}/{entry['path']}: JSON 6902 patches are not supported")
        matches = [r for r in resources if _res_id(r) == _res_id(patch)]
        if len(matches) != 1:
            raise RenderError(f"{root}/{entry['path']}: patch target {_res_id(patch)} matches {len(matches)} resources")
        target = matches[0]
        body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
        body["metadata"] = {k: v for k, v in body.get("metadata", {}).items() if k != "name"}
        if not body["metadata"]:
            del body["metadata"]
        merged = strategic_merge(target, body, entry["path"])
        target.clear()
        target.update(merged)


def strategic_merge(dest, patch, where: str = ""):
    """Strategic merge of `patch` into `dest` (copies): maps merge, null deletes,
    lists with a merge key merge by it (patch elements first, in patch order,
    then the remaining original elements, as kustomize orders them), atomic
    lists are replaced."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(dest) if isinstance(dest, dict) else {}
    for key, value in patch.items():
        path = f"{where}.{key}"
        if key.startswith("$"):
            raise RenderError(f"{path}: patch directive {key} not supported")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(out.get(key), value, key, path)
        else:
            out[key] = strategic_merge(out.get(key), value, path)
    return out


def _merge_list(dest, patch: list, key: str, path: str) -> list:
    if key in ATOMIC_LISTS:
        return copy.deepcopy(patch)
    if key == "ports":  # container ports merge by containerPort, Service ports by port
        merge_key = "containerPort" if all("containerPort" in p for p in patch) else "port"
    elif key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
    else:
        raise RenderError(f"{path}: list {key!r} has no merge strategy known to this renderer")
    dest = list(dest or [])
    by_key = {d.get(merge_key): d for d in dest}
    out = []
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise RenderError(f"{path}: list element without merge key {merge_key!r}")
        if any(k.startswith("$") for k in item):
            raise RenderError(f"{path}: patch directives are not supported")
        out.append(strategic_merge(by_key.get(item[merge_key]), item, f"{path}[{item[merge_key]}]"))
    patched = {item[merge_key] for item in patch}
    out += [copy.deepcopy(d) for d in dest if d.get(merge_key) not in patched]
    return out


# -- labels and images ----------------------------------------------------------------


def _apply_labels(root: Path, entry: dict, resources: list[dict]) -> None:
    unknown = sorted(set(entry) - {"pairs", "includeTemplates", "includeSelectors"})
    if unknown:
        raise RenderError(f"{root}: labels option(s) {unknown} not supported")
    if entry.get("includeSelectors"):
        raise RenderError(f"{root}: labels.includeSelectors is not supported (selectors are written explicitly)")
    pairs = {str(k): str(v) for k, v in entry["pairs"].items()}
    for res in resources:
        res.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if not entry.get("includeTemplates"):
            continue
        if res.get("kind") in WORKLOAD_KINDS:
            res["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if res.get("kind") == "StatefulSet":
            for pvc in res["spec"].get("volumeClaimTemplates") or []:
                pvc.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if res.get("kind") in ("CronJob", "Pod", "ReplicationController"):
            raise RenderError(f"{res['kind']}: labels on its templates are not supported by this renderer")


def _image_name(image: str) -> str:
    """`registry/name:tag@digest` -> `registry/name` (a registry port is not a tag)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _apply_image(root: Path, entry: dict, resources: list[dict]) -> None:
    unknown = sorted(set(entry) - {"name", "newName", "newTag", "digest"})
    if unknown:
        raise RenderError(f"{root}: images option(s) {unknown} not supported")
    for res in resources:
        for spec in _pod_specs(res):
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                if _image_name(c["image"]) != entry["name"]:
                    continue
                name = entry.get("newName", entry["name"])
                rest = c["image"][len(_image_name(c["image"])):]
                if "digest" in entry:
                    rest = "@" + entry["digest"]
                elif "newTag" in entry:
                    rest = ":" + str(entry["newTag"])
                c["image"] = name + rest


# -- output -------------------------------------------------------------------------------


def _order_key(res: dict):
    kind = res.get("kind", "")
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    meta = res.get("metadata", {})
    return rank, kind if rank == len(ORDER_FIRST) else "", meta.get("namespace", ""), meta.get("name", "")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python manifests/render.py DIR", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(dump(build(argv[0])))
    except RenderError as e:
        print(f"render: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
