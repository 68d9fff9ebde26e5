"""Block-FP8 weights kept at rest (`fp8_weights: keep`): each rank holds its
slice of every float8 checkpoint weight as float8 with its scales and
dequantizes it in the matmul. The checkpoints are test_fp8_checkpoint's (tiny
Llama and DeepSeek-V2 models quantized here in 128x128 blocks); the references
are transformers on the dequantized weights and the block-by-block
dequantization written in plain torch there (expected_rank_params).
"""
import dataclasses
import os

import pytest
import torch
from safetensors import safe_open

from braid.engine import LLM, SamplingParams
from braid.engine.config import EngineConfig
from conftest import prompt_of
from test_fp8_checkpoint import FP8Checkpoints, expected_rank_params

PROMPTS = [prompt_of(n, seed=900 + n) for n in (3, 17, 33)]
NEW = 12
REPLICATED = ("q_a_proj.", "kv_a_proj_with_mqa.")
"""DeepSeek's latent projections: whole on every TP rank."""


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return FP8Checkpoints(str(tmp_path_factory.mktemp("fp8-at-rest")))


def fp8_elements_per_rank(path: str, tp: int) -> int:
    """float8 weight elements one TP rank holds, counted from the checkpoint:
    every quantized weight split by TP but the replicated latent projections and,
    past one KV head per rank, Llama's k/v (a whole head on each rank)."""
    import json

    with open(os.path.join(path, "config.json")) as f:
        kv_heads = json.load(f).get("num_key_value_heads", 0)
    replicated = REPLICATED + (("k_proj.", "v_proj.") if kv_heads < tp else ())
    total = 0
    for file in os.listdir(path):
        if not file.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                if s.get_dtype() == "F8_E4M3":
                    numel = s.get_shape()[0] * s.get_shape()[1]
                    total += numel if any(r in name for r in replicated) else numel // tp
    return total


def _greedy(path: str, tp: int, mode: str):
    with LLM(path, tensor_parallel_size=tp, block_size=8, num_kv_blocks=48, fp8_weights=mode) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
        stats = llm.engine.executor.rank_stats()
    return [o.token_ids for o in outs], [s.weight_bytes for s in stats]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,tp", [("hf", 1), ("hf", 2), ("ds", 1), ("ds", 2)])
def test_keep_equals_dequantize_and_transformers_in_a_quarter_of_the_bytes(fp8, name, tp):
    path, _, hf = fp8[name]
    with torch.no_grad():
        expected = []
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    kept, kept_bytes = _greedy(path, tp, "keep")
    dense, dense_bytes = _greedy(path, tp, "dequantize")
    assert kept == dense == expected, f"{name} tp {tp}"
    n8 = fp8_elements_per_rank(path, tp)
    for rank in range(tp):
        # everything else is held as before; the float8 weights drop from 4 bytes (float32) to 1 plus scales
        unquantized = dense_bytes[rank] - 4 * n8
        quantized = kept_bytes[rank] - unquantized
        assert n8 < quantized < 1.05 * n8, (name, tp, rank, kept_bytes, dense_bytes, n8)


def _rank_model(path: str, tp: int, rank: int, dtype, keep: bool):
    """braid's model for one TP rank, built and loaded as a worker does."""
    from braid.engine.layers.linear import deferred_weights
    from braid.engine.loader import load_weights
    from braid.engine.model_config import load_model_config
    from braid.engine.models import build_model
    from braid.engine.parallel_state import GroupComm, ParallelState

    par = dataclasses.replace(ParallelState.single(), tp=GroupComm(list(range(tp)), None, rank))
    with deferred_weights(keep):
        model = build_model(load_model_config(path), par, dtype)
    load_weights(model, path, dtype, keep_fp8=keep)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_fly_dequantization_is_bit_identical_for_slices_starting_mid_block(fp8, dtype):
    """The "edge" Llama at tp 2, rank 1: intermediate 448 starts at 224 (gate/up
    rows, down columns), hidden 320 at 160 (q rows, o columns), k/v 160 rows of
    2.5 blocks fused after q. Each float8 layer's weight, dequantized in its
    forward, equals the plain-torch block dequantization of its slice (cast to
    the dtype) and the weight dequantize-at-load gives, bit for bit."""
    import json

    path, ref, _ = fp8["edge"]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    want = expected_rank_params(ref, cfg, 2, 1)
    kept = _rank_model(path, 2, 1, dtype, keep=True)
    dense = dict(_rank_model(path, 2, 1, dtype, keep=False).named_parameters())
    layer = kept.model.layers[1]
    assert layer.mlp.down_proj.scale_grain == (128, 1)  # columns 224.. : a scale per column
    assert layer.mlp.gate_up_proj.scale_grain == (1, 128)  # rows 224.. of gate and of up: a scale per row
    checked = 0
    for name, module in kept.named_modules():
        if getattr(module, "weight_scale_inv", None) is None:
            continue
        assert module.weight.dtype == torch.float8_e4m3fn
        w = module.dense_weight()
        assert w.dtype == dtype
        assert torch.equal(w, want[f"{name}.weight"].to(dtype)), name
        assert torch.equal(w, dense[f"{name}.weight"]), name
        x = torch.randn(5, w.shape[1]).to(dtype)
        w_ref = want[f"{name}.weight"].to(dtype)
        if hasattr(module, "reduce"):  # row-parallel: no process group here, and the bias follows the reduction
            module.reduce = False
            expect = torch.nn.functional.linear(x, w_ref)
            expect = expect if module.bias is None else expect + module.bias
        else:
            expect = torch.nn.functional.linear(x, w_ref, module.bias)
        out = module(x)
        assert torch.equal(torch.cat(out, -1) if isinstance(out, tuple) else out, expect), name
        checked += 1
    assert checked == 2 * 4  # qkv, o, gate_up and down of both layers


def test_fp8_weights_is_a_validated_top_level_setting():
    with pytest.raises(ValueError, match=r"fp8_weights: unknown fp8_weights mode 'bf16' \(choose from dequantize, keep\)"):
        EngineConfig.build("/nowhere", fp8_weights="bf16")
    assert EngineConfig.build("/nowhere").fp8_weights == "dequantize"
    cfg = EngineConfig.build("/nowhere", fp8_weights="keep", tensor_parallel_size=2)
    assert cfg.fp8_weights == "keep" and cfg.parallel.tensor_parallel_size == 2
    assert EngineConfig.from_json(cfg.to_json()) == cfg  # as it travels to the other ranks


def test_cluster_roles_take_fp8_weights_like_dtype():
    from braid.cluster.config import ConfigError, load_config

    cfg = load_config(data={"prefill": {"fp8_weights": "keep", "dtype": "bfloat16"}})
    assert cfg.prefill.fp8_weights == "keep" and cfg.decode.fp8_weights == "dequantize"
    assert cfg.prefill.engine_config("prefill", "/m").fp8_weights == "keep"
    with pytest.raises((ConfigError, ValueError), match="fp8_weights"):
        load_config(data={"decode": {"fp8_weights": "yes"}})


def test_keep_on_a_checkpoint_without_fp8_weights_is_refused(checkpoints):
    """Refused rather than ignored: a deployment sized for float8 at rest would
    otherwise start, then run out of memory holding the weights in full."""
    path = checkpoints.get("llama-gqa1")
    with pytest.raises(ValueError, match=r"fp8_weights: 'keep' needs a block-FP8 checkpoint .*use fp8_weights 'dequantize'"):
        LLM(path, fp8_weights="keep")


def _edited_copy(fp8, tmp_path, edit) -> str:
    import shutil

    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "ckpt")
    shutil.copytree(fp8["hf"][0], path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def test_keep_refuses_a_fused_weight_mixing_float8_and_unquantized(fp8, tmp_path):
    from braid.engine.model_config import CheckpointError

    name = "model.layers.0.self_attn.k_proj.weight"
    ref = fp8["hf"][1]

    def dequantize_k(t):
        t.pop(name + "_scale_inv")
        t[name] = ref[name]

    path = _edited_copy(fp8, tmp_path, dequantize_k)
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.qkv_proj.weight fuses float8 and unquantized"):
        _rank_model(path, 1, 0, torch.float32, keep=True)
    dense = dict(_rank_model(path, 1, 0, torch.float32, keep=False).named_parameters())  # dequantize loads it
    assert torch.equal(dense["model.layers.0.self_attn.qkv_proj.weight"][256:320], ref[name])


def test_keep_still_names_a_missing_weight(fp8, tmp_path):
    from braid.engine.model_config import CheckpointError

    name = "model.layers.1.mlp.down_proj.weight"
    path = _edited_copy(fp8, tmp_path, lambda t: [t.pop(name), t.pop(name + "_scale_inv")])
    with pytest.raises(CheckpointError, match=rf"checkpoint lacks 1 tensors: {name}$"):
        _rank_model(path, 1, 0, torch.float32, keep=True)
