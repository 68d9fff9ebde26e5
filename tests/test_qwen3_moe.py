"""Qwen3-MoE (Qwen3MoeForCausalLM, TP-sliced experts) against transformers: greedy
tokens at tp 1, tp 2 with dcp 2, pcp 2, with the prefix cache and a small chunk
budget; the router and sparse block against transformers' own on random inputs;
which layers are sparse; refused settings; the KV layout it describes."""
import json
import os

import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.model_config import CheckpointError, load_model_config
from braid.engine.parallel_state import ParallelState
from conftest import VOCAB, model_config_of, prompt_of, save_random

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=1,  # tp 2 with dcp 2 needs (tp // kv heads) % dcp == 0
    head_dim=16,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
)

CONFIGS = {
    # every layer sparse but layer 1 (mlp_only_layers); top-2 of 8 renormalised
    "q3m-norm": dict(num_hidden_layers=3, num_experts=8, decoder_sparse_step=1, mlp_only_layers=[1],
                     norm_topk_prob=True),
    # layers 1 and 3 sparse (decoder_sparse_step 2), 0 and 2 dense; top-2 of 4 not renormalised; 2 KV heads
    "q3m-step": dict(num_hidden_layers=4, num_experts=4, decoder_sparse_step=2, mlp_only_layers=[],
                     norm_topk_prob=False, num_key_value_heads=2),
}

LENGTHS = [1, 3, 8, 9, 37, 100]
NEW = 48
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


def build_qwen3_moe(path: str, overrides: dict, seed: int = 0) -> str:
    """A random transformers Qwen3MoeForCausalLM saved with save_pretrained; norm
    weights (q/k norms included) randomised too, so that loading them matters."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**dict(BASE, **overrides))).eval()
    return save_random(model, path)


@pytest.fixture(scope="module")
def q3m(checkpoints):
    """name -> checkpoint path, built beside conftest's so `checkpoints.greedy` serves it."""

    def get(name: str) -> str:
        path = os.path.join(checkpoints.root, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_qwen3_moe(path, CONFIGS[name])
        return path

    return get


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name,tp,dcp,pcp",
    [("q3m-norm", 1, 1, 1), ("q3m-step", 1, 1, 1), ("q3m-norm", 2, 2, 1), ("q3m-step", 1, 1, 2)],
    ids=["norm-tp1", "step-tp1", "norm-tp2-dcp2", "step-pcp2"],
)
def test_greedy_equals_transformers(q3m, checkpoints, name, tp, dcp, pcp):
    path = q3m(name)
    prompts = [prompt_of(n, seed=700 + n) for n in LENGTHS]
    with LLM(path, tensor_parallel_size=tp, decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp,
             block_size=4, num_kv_blocks=160) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    for p, out in zip(prompts, outs):
        assert out.token_ids == checkpoints.greedy(name, p, NEW), f"prompt length {len(p)}"


@pytest.mark.timeout(300)
def test_prefix_cache_and_chunked_prefill_at_pcp2(q3m, checkpoints):
    """Prompts sharing a 26-token stem, prefilled in chunks of at most 5 tokens: the
    second wave reuses the first's cached blocks and every output stays exact."""
    name = "q3m-norm"
    stem = prompt_of(26, seed=41)
    waves = [[stem + prompt_of(n, seed=50 + n) for n in (3, 7, 1)], [stem + prompt_of(n, seed=60 + n) for n in (2, 9, 5)]]
    with LLM(q3m(name), prefill_context_parallel_size=2, block_size=4, num_kv_blocks=160,
             enable_prefix_caching=True, max_num_batched_tokens=5) as llm:
        outs = [llm.generate(wave, GREEDY) for wave in waves]
        assert llm.engine.prefix_cache.stats.hit_blocks > 0
        assert llm.engine.scheduler.num_chunks > 0
    for wave, wave_outs in zip(waves, outs):
        for p, out in zip(wave, wave_outs):
            assert out.token_ids == checkpoints.greedy(name, p, NEW), f"prompt length {len(p)}"


def _hf_config(**overrides):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(**dict(BASE, **overrides))
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    return cfg


_ours = model_config_of


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_block_matches_transformers(tmp_path, norm, dtype):
    """Our MoE with transformers' Qwen3MoeSparseMoeBlock's weights: the same experts,
    weights and block output on random tokens."""
    from braid.engine.layers.moe import MoE
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = _hf_config(num_hidden_layers=1, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm)
    cfg = _ours(hf_cfg, tmp_path)
    g = torch.Generator().manual_seed(5)
    block = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    block = block.to(dtype)
    ours = MoE(cfg, ParallelState.single(), dtype)
    with torch.no_grad():
        ours.gate.weight.copy_(block.gate.weight)
        for e, expert in enumerate(ours.experts.values()):
            expert.gate_up_proj.weight.copy_(block.experts.gate_up_proj[e])  # [gate; up] rows, as transformers fuses
            expert.down_proj.weight.copy_(block.experts.down_proj[e])
    x = torch.randn(300, 64, generator=g).to(dtype)
    with torch.no_grad():
        _, hf_w, hf_ids = block.gate(x)
        hf_out = block(x[None])[0]
        w, ids = ours.route(x)
        out = ours(x)
    ids, order = ids.sort(dim=-1)
    hf_ids, hf_order = hf_ids.sort(dim=-1)
    assert torch.equal(ids, hf_ids)
    assert w.dtype == hf_w.dtype == dtype
    torch.testing.assert_close(w.gather(1, order), hf_w.gather(1, hf_order), atol=0, rtol=0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, hf_out, **tol)
    if norm:
        torch.testing.assert_close(w.float().sum(-1), torch.ones(300), atol=1e-2 if dtype != torch.float32 else 1e-6, rtol=0)


@pytest.mark.parametrize(
    "layers,step,only",
    [(4, 1, []), (4, 2, []), (5, 2, [3]), (6, 3, [0, 5]), (3, 1, [0, 1, 2]), (4, 4, [])],
)
def test_sparse_layers_follow_transformers(tmp_path, layers, step, only):
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = _hf_config(num_hidden_layers=layers, num_experts=4, decoder_sparse_step=step, mlp_only_layers=only)
    hf = Qwen3MoeForCausalLM(hf_cfg)
    expected = {i for i, layer in enumerate(hf.model.layers) if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)}
    cfg = _ours(hf_cfg, tmp_path)
    assert set(cfg.moe.sparse_layers) == expected
    assert cfg.qk_norm and not cfg.is_mla and cfg.num_kv_heads == 1


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(mlp_bias=True), "mlp_bias"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, change, match):
    _hf_config(num_hidden_layers=2, num_experts=8).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=match):
        load_model_config(str(tmp_path))


def test_real_checkpoint_spelling_num_experts(tmp_path):
    """Qwen's own config.json says `num_experts` (transformers 5 writes `num_local_experts`)."""
    _hf_config(num_hidden_layers=2, num_experts=8).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["num_experts"] = cfg.pop("num_local_experts")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    moe = load_model_config(str(tmp_path)).moe
    assert moe.num_experts == 8 and moe.sparse_layers == {0, 1}


@pytest.mark.parametrize(
    "change,tp,match",
    [
        (dict(moe_intermediate_size=30), 4, "moe_intermediate_size 30"),
        (dict(intermediate_size=90, mlp_only_layers=[1]), 4, "intermediate size 90"),
    ],
)
def test_tp_that_cannot_split_the_mlps_is_refused(tmp_path, change, tp, match):
    from braid.engine.topology import Topology, validate_for_model

    cfg = _ours(_hf_config(num_hidden_layers=2, num_experts=4, num_key_value_heads=4, **change), tmp_path)
    with pytest.raises(ValueError, match=match):
        validate_for_model(Topology(tp=tp), cfg)


def test_all_sparse_model_does_not_need_tp_to_split_the_unused_dense_size(tmp_path):
    from braid.engine.topology import Topology, validate_for_model

    cfg = _ours(_hf_config(num_hidden_layers=2, num_experts=4, num_key_value_heads=4, intermediate_size=90), tmp_path)
    validate_for_model(Topology(tp=4), cfg)


def test_kv_layout_is_gqa(q3m):
    from braid.engine.config import EngineConfig, resolve
    from braid.kv_transfer.layout import describe_engine, format_name

    path = q3m("q3m-step")
    cfg, model = resolve(EngineConfig.build(path, tensor_parallel_size=2, block_size=4, num_kv_blocks=32))
    layout = describe_engine(cfg, model)
    assert format_name(layout) == "gqa"
    assert layout.num_kv_heads == 2 and layout.head_dim == 16 and layout.num_layers == 4


@pytest.mark.timeout(300)
def test_pd_transfer_pcp2_to_tp2_dcp2_equals_transformers(q3m, checkpoints):
    """P (pcp 2) prefills and pushes the GQA cache over TCP to D (tp 2, dcp 2), which decodes."""
    from braid.engine.config import EngineConfig
    from braid.engine.core import EngineCore
    from test_kv_transfer import GREEDY as PD_GREEDY
    from test_kv_transfer import run_pd

    name = "q3m-norm"
    prompts = [prompt_of(n, seed=800 + n) for n in (1, 4, 9, 33, 50)]

    def engine(role, **parallel):
        return EngineCore(EngineConfig.build(q3m(name), block_size=4, num_kv_blocks=96, kv_role=role,
                                             kv_transport="tcp", **parallel))

    P = engine("prefill", prefill_context_parallel_size=2)
    D = engine("decode", tensor_parallel_size=2, decode_context_parallel_size=2)
    try:
        assert P.kv_layout.format == D.kv_layout.format == 1  # KV_FORMAT_GQA
        outs, p_events, d_errors = run_pd(P, D, prompts)
        assert not d_errors
        for p, out in zip(prompts, outs):
            assert out == checkpoints.greedy(name, p, PD_GREEDY.max_tokens), f"prompt length {len(p)}"
        assert all(ev.finish_reason == "transferred" for ev in p_events.values()) and len(p_events) == len(prompts)
    finally:
        P.shutdown()
        D.shutdown()
