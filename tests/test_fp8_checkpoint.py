"""Block-FP8 checkpoints (DeepSeek-V3/R1's format: float8_e4m3fn weights with
one float32 `weight_scale_inv` per 128x128 block) dequantized at load.

Tiny random Llama checkpoints from transformers are quantized here, block by
block, the way the format defines it. Two of them:
- "hf": every quantized dimension a multiple of 128 or below 128, which is what
  transformers' own dequantization (FineGrainedFP8Config(dequantize=True), run
  on CPU) handles: it derives the block size from the scale grid, so a dimension
  above 128 that is not a multiple of 128 either fails there (320 rows in 3
  blocks) or is dequantized with the wrong blocks (448 rows in 4 blocks of 112).
  transformers is the reference for this one.
- "edge": dimensions of 2.5, 3.5 and 1.25 blocks (partial edge blocks beyond the
  first) and TP slices that start inside a block, sharded so that the scales sit
  in another file than their weights. The reference is a block-by-block
  dequantization written here in plain torch, and transformers runs a float32
  copy of those dequantized weights.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from braid.engine import LLM, SamplingParams
from braid.engine.model_config import CheckpointError
from conftest import VOCAB, edit_config, prompt_of, save_random

B = 128
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [B, B]}
BASE = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
            initializer_range=0.2, bos_token_id=0, eos_token_id=1)
CONFIGS = {
    # q/o 256 (2 blocks), gate/up/down 384 (3 blocks), k/v 64 rows (one partial block)
    "hf": dict(hidden_size=256, intermediate_size=384, num_key_value_heads=1, head_dim=64),
    # hidden 320 (2.5 blocks), intermediate 448 (3.5 blocks), k/v 160 rows (1.25 blocks), biases beside fp8 weights
    "edge": dict(hidden_size=320, intermediate_size=448, num_key_value_heads=2, head_dim=80, attention_bias=True),
}
PROMPTS = [prompt_of(n, seed=700 + n) for n in (1, 6, 19, 40)]
NEW = 20


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint format: per 128x128 block (edge blocks partial), scale =
    amax / 448 (e4m3's largest value), fp8 = w / scale, weight_scale_inv = scale."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-rows // B), -(-cols // B))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * B:(i + 1) * B, j * B:(j + 1) * B]
            s[i, j] = blk.abs().amax() / 448.0
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The reference: each block's fp8 values times that block's scale, in float32."""
    w = q.float()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * B:(i + 1) * B, j * B:(j + 1) * B] *= s[i, j]
    return w


def quantize_checkpoint(path: str, scales_apart: bool) -> dict:
    """Quantize a saved single-file checkpoint in place, as DeepSeek's are: every
    linear weight of the decoder layers (`*_proj.weight`, `kv_a_proj_with_mqa`),
    not embeddings, norms, biases, the router gate or lm_head. With
    `scales_apart` the scales go to a shard of their own, so the loader must pair
    across files. Returns the dequantized state dict."""
    stored = load_file(os.path.join(path, "model.safetensors"))
    tensors, scales, ref = {}, {}, {}
    for key, value in stored.items():
        if key.startswith("model.layers.") and key.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            tensors[key], scales[key + "_scale_inv"] = quantize(value)
            ref[key] = dequantize(tensors[key], scales[key + "_scale_inv"])
        else:
            tensors[key] = ref[key] = value
    if scales_apart:
        os.remove(os.path.join(path, "model.safetensors"))
        files = {"model-00001-of-00002.safetensors": tensors, "model-00002-of-00002.safetensors": scales}
        for file, part in files.items():
            save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map = {k: file for file, part in files.items() for k in part}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        save_file(dict(tensors, **scales), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    edit_config(path, quantization_config=QUANT)
    return ref


def build_llama_fp8(root: str, name: str) -> tuple[str, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(root, name)
    torch.manual_seed(17)
    save_random(LlamaForCausalLM(LlamaConfig(**dict(BASE, **CONFIGS[name]))).eval(), path)
    return path, quantize_checkpoint(path, scales_apart=name == "edge")


class FP8Checkpoints:
    """name -> (FP8 checkpoint, reference weights, transformers model on the
    dequantized weights), each built on first use."""

    def __init__(self, root: str):
        self.root = root
        self._built: dict = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            self._built[name] = getattr(self, f"_{name}")()
            self._built[name][2].generation_config.eos_token_id = None  # exactly NEW tokens
        return self._built[name]

    def _hf(self):
        path, ref = build_llama_fp8(self.root, "hf")
        hf = _transformers_dequantized(path)
        hf_sd = hf.state_dict()
        # transformers and the plain-torch dequantization agree on these dimensions
        assert all(torch.equal(hf_sd[k], ref[k]) for k in ref)
        return path, hf_sd, hf

    def _edge(self):
        from transformers import AutoModelForCausalLM

        path, ref = build_llama_fp8(self.root, "edge")
        copy = os.path.join(self.root, "edge-dequantized")
        shutil.copytree(path, copy, ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file(ref, os.path.join(copy, "model.safetensors"), metadata={"format": "pt"})
        edit_config(copy, quantization_config=None)
        hf = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).eval()
        assert all(torch.equal(hf.state_dict()[k], ref[k]) for k in ref)
        return path, ref, hf

    def _ds(self):
        """DeepSeek-V2 with q LoRA, attention biases, group-limited routing over 8
        experts in 2 MoE layers; dimensions transformers dequantizes correctly."""
        from deepseek_fixtures import CONFIGS as DS_CONFIGS
        from deepseek_fixtures import build_deepseek

        path = os.path.join(self.root, "ds")
        build_deepseek(path, dict(DS_CONFIGS["ds-group"], hidden_size=256, intermediate_size=384,
                                  moe_intermediate_size=128, q_lora_rank=128))
        quantize_checkpoint(path, scales_apart=False)
        hf = _transformers_dequantized(path)
        return path, hf.state_dict(), hf


    def _v3(self):
        """DeepSeek-V3 as DeepSeek ships it: block-FP8 linears (its MTP layer's
        too), fp32 router and score-correction bias, an MTP layer; dimensions
        transformers dequantizes correctly."""
        from test_deepseek_v3 import CONFIGS as V3_CONFIGS
        from test_deepseek_v3 import build_v3

        path = os.path.join(self.root, "v3")
        build_v3(path, dict(V3_CONFIGS["v3-lora"], hidden_size=256, intermediate_size=384,
                            moe_intermediate_size=128, q_lora_rank=128))
        quantize_checkpoint(path, scales_apart=True)
        hf = _transformers_dequantized(path)
        return path, hf.state_dict(), hf


def _transformers_dequantized(path: str):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return FP8Checkpoints(str(tmp_path_factory.mktemp("fp8")))


def expected_rank_params(ref: dict, cfg: dict, tp: int, rank: int) -> dict:
    """What TP rank `rank` of braid's Llama holds, cut by hand from the full
    reference weights: vocabulary, q, gate and up rows and o/down columns split
    evenly; K/V by heads (one head replicated past one head per rank); q/k/v and
    gate/up fused in that order."""
    kv_heads, head_dim = cfg["num_key_value_heads"], cfg["head_dim"]
    kv_head = rank * kv_heads // tp if tp <= kv_heads else rank // (tp // kv_heads)
    kv = slice(kv_head * head_dim, kv_head * head_dim + max(1, kv_heads // tp) * head_dim)

    def rows(t):
        return t.chunk(tp, 0)[rank]

    out = {k: v for k, v in ref.items() if "_proj." not in k}  # norms: whole on every rank
    out["model.embed_tokens.weight"], out["lm_head.weight"] = rows(ref["model.embed_tokens.weight"]), rows(ref["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for leaf in ("weight", "bias") if cfg.get("attention_bias") else ("weight",):
            q, k, v = (ref[f"{a}{n}_proj.{leaf}"] for n in "qkv")
            out[f"{a}qkv_proj.{leaf}"] = torch.cat([rows(q), k[kv], v[kv]])
        out[f"{a}o_proj.weight"] = ref[f"{a}o_proj.weight"].chunk(tp, 1)[rank]
        if cfg.get("attention_bias"):
            out[f"{a}o_proj.bias"] = ref[f"{a}o_proj.bias"]  # added once, after the reduction
        out[f"{m}gate_up_proj.weight"] = torch.cat([rows(ref[f"{m}gate_proj.weight"]), rows(ref[f"{m}up_proj.weight"])])
        out[f"{m}down_proj.weight"] = ref[f"{m}down_proj.weight"].chunk(tp, 1)[rank]
    return out


def rank_params(path: str, tp: int, rank: int, dtype=torch.float32) -> dict:
    """braid's Llama for one TP rank (no process group: loading runs no
    collective), filled from `path` by the engine's loader."""
    import dataclasses

    from braid.engine.loader import load_weights
    from braid.engine.model_config import load_model_config
    from braid.engine.models import build_model
    from braid.engine.parallel_state import GroupComm, ParallelState

    par = dataclasses.replace(ParallelState.single(), tp=GroupComm(list(range(tp)), None, rank))
    model = build_model(load_model_config(path), par, dtype)
    load_weights(model, path, dtype)
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", ["hf", "edge"])
@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_holds_its_slice_of_the_dequantized_weights(fp8, name, tp):
    path, ref, _ = fp8[name]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for rank in range(tp):
        got = rank_params(path, tp, rank)
        want = expected_rank_params(ref, cfg, tp, rank)
        assert sorted(got) == sorted(want)
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name} tp {tp} rank {rank}: {key}"


def test_deepseek_weights_equal_transformers_dequantized(fp8):
    """MLA projections (q_a/kv_a replicated, q_b/kv_b/o sliced), shared and routed
    experts dequantized; router gate, norms, embeddings and lm_head as stored."""
    path, hf_sd, _ = fp8["ds"]
    got = rank_params(path, 1, 0)
    experts = [k for k in got if ".mlp.experts." in k]
    assert len(experts) == 2 * 8 * 2  # 2 MoE layers x 8 experts x (gate_up, down)
    for key, value in got.items():
        if ".mlp.experts." in key:  # transformers stacks the experts: [E, 2 * I, H] and [E, H, I]
            layer, expert, proj = key.split(".mlp.experts.")[0], int(key.split(".")[5]), key.split(".")[6]
            want = hf_sd[f"{layer}.mlp.experts.{proj}"][expert]
        elif ".gate_up_proj." in key:
            want = torch.cat([hf_sd[key.replace("gate_up_proj", n)] for n in ("gate_proj", "up_proj")])
        else:
            want = hf_sd[key]
        assert torch.equal(value, want), key


def test_dequantized_weights_cast_to_the_engine_dtype(fp8):
    path, ref, _ = fp8["edge"]
    got = rank_params(path, 1, 0, torch.bfloat16)
    for key in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key], ref[key].to(torch.bfloat16)), key


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "name,tp,more",
    [("hf", 1, {}), ("edge", 2, {}), ("ds", 2, {}), ("v3", 2, {}),
     # DeepSeek-V3 as served: weights kept in fp8, experts whole on the ranks, latent KV sharded
     ("v3", 2, dict(fp8_weights="keep", enable_expert_parallel=True, decode_context_parallel_size=2))],
    ids=["hf-tp1", "edge-tp2", "ds-tp2", "v3-tp2", "v3-tp2-dcp2-ep2-keep"],
)
def test_greedy_equals_transformers_on_the_dequantized_weights(fp8, name, tp, more):
    path, _, hf = fp8[name]
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    with LLM(path, tensor_parallel_size=tp, block_size=8, num_kv_blocks=64, **more) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    for p, out, exp in zip(PROMPTS, outs, expected):
        assert out.token_ids == exp, f"{name} tp {tp} {more} prompt length {len(p)}"


def _copy(fp8, tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    shutil.copytree(fp8["hf"][0], path)
    return path


def _edit_tensors(path: str, edit) -> None:
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "setting,match",
    [
        (dict(weight_block_size=[64, 64]), r"weight_block_size \[64, 64\]"),
        (dict(weight_block_size=None), r"weight_block_size None"),
        (dict(quant_method="awq"), r"quant_method 'awq'"),
        (dict(fmt="e5m2"), r"fmt 'e5m2'"),
        (dict(activation_scheme="static"), r"activation_scheme 'static'"),
    ],
)
def test_unsupported_quantization_is_refused_naming_the_setting(fp8, tmp_path, setting, match):
    path = _copy(fp8, tmp_path)
    quant = {k: v for k, v in dict(QUANT, **setting).items() if v is not None}
    edit_config(path, quantization_config=quant)
    with pytest.raises(CheckpointError, match=match):
        LLM(path)


def test_missing_scale_is_a_clear_error(fp8, tmp_path):
    path = _copy(fp8, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    _edit_tensors(path, lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"{name} is stored as float8 but the checkpoint has no {name}_scale_inv"):
        LLM(path)


@pytest.mark.parametrize(
    "case,match",
    [
        ("orphan scale", r"model.layers.0.mlp.up_proj.weight_scale_inv scales model.layers.0.mlp.up_proj.weight, which the checkpoint lacks"),
        ("scale shape", r"o_proj.weight_scale_inv has shape \(1, 1\); a \(256, 256\) weight in 128x128 blocks needs \(2, 2\)"),
        ("scale of a float32 weight", r"lm_head.weight_scale_inv scales lm_head.weight, which is stored as F32, not float8"),
        ("no quantization_config", r"stored as float8 but config.json has no fp8 quantization_config"),
    ],
)
def test_malformed_fp8_tensors_are_clear_errors(fp8, tmp_path, case, match):
    from braid.engine.loader import iter_checkpoint

    path = _copy(fp8, tmp_path)
    if case == "orphan scale":
        _edit_tensors(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    elif case == "scale shape":
        _edit_tensors(path, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)}))
    elif case == "scale of a float32 weight":
        _edit_tensors(path, lambda t: t.update({"lm_head.weight_scale_inv": torch.ones(3, 2)}))
    else:
        edit_config(path, quantization_config=None)
    with pytest.raises(CheckpointError, match=match):
        list(iter_checkpoint(path, torch.float32))
