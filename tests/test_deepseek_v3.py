"""DeepSeek-V3 (DeepseekV3ForCausalLM: MLA, the noaux_tc router, dense first
layers, shared experts, YaRN) against transformers: greedy tokens at tp 1, tp 2
with dcp 2 and pcp 2; the router against a brute-force reading of its rule and
against transformers' (ties and negative biases included), the sparse block in
fp32 and bf16; the MTP layer's weights and one MTP forward against transformers'
MtpLayer loaded from the checkpoint's tensors; what loads and what is refused."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from braid.engine import LLM, SamplingParams
from braid.engine.layers.attention import AttentionMetadata
from braid.engine.layers.moe import MoE, select_experts
from braid.engine.loader import load_weights
from braid.engine.model_config import CheckpointError, load_model_config
from braid.engine.models import build_model
from braid.engine.parallel_state import ParallelState
from braid.kernels.reference import VarlenRows
from conftest import VOCAB, edit_config, model_config_of, prompt_of, save_random

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=4,  # transformers requires it equal to num_attention_heads
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_intermediate_size=32,
    max_position_embeddings=256,
    # YaRN as DeepSeek-V3 uses it, over a short original context that the prompts pass
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                         beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
)

CONFIGS = {
    # q LoRA; layer 0 dense, 1-2 MoE: top-3 of 8 experts in 4 groups, 2 groups kept, renormalised; an MTP layer
    "v3-lora": dict(q_lora_rank=24, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_group=4,
                    topk_group=2, num_experts_per_tok=3, n_shared_experts=1, norm_topk_prob=True,
                    routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    # plain q_proj, attention biases; top-2 of 8 in 2 groups, 1 kept, not renormalised; 2 shared experts; no MTP
    "v3-plain": dict(q_lora_rank=None, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, n_group=2,
                     topk_group=1, num_experts_per_tok=2, n_shared_experts=2, norm_topk_prob=False,
                     routed_scaling_factor=1.5, attention_bias=True, num_nextn_predict_layers=0),
}

LENGTHS = [1, 3, 8, 9, 37, 100]
NEW = 48
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


def _randomise_bias(model) -> None:
    """e_score_correction_bias is a buffer transformers initialises to 0 (save_random
    leaves buffers alone): random, partly negative, so that it changes choices."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DeepseekV3TopkRouter):
                m.e_score_correction_bias.normal_(0.0, 0.15)


def _add_mtp_tensors(path: str, cfg) -> None:
    """Add DeepSeek's MTP layer tensors `model.layers.{L}.*` (transformers saves none):
    a random decoder block shaped as the last (sparse) layer, enorm, hnorm, eh_proj,
    shared_head.norm, and an embed_tokens / shared_head.head of its own, distinct
    from the main model's, so that using the wrong one shows."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    last, mtp = f"model.layers.{cfg.num_hidden_layers - 1}.", f"model.layers.{cfg.num_hidden_layers}."
    h, v = cfg.hidden_size, cfg.vocab_size
    shapes = {mtp + n[len(last):]: t.shape for n, t in tensors.items() if n.startswith(last)}
    shapes.update({mtp + n: s for n, s in [("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
                                          ("shared_head.norm.weight", (h,)), ("shared_head.head.weight", (v, h)),
                                          ("embed_tokens.weight", (v, h))]})
    g = torch.Generator().manual_seed(17)
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if "norm" in name:
            tensors[name] = 1.0 + 0.1 * noise
        elif "e_score_correction_bias" in name:
            tensors[name] = 0.15 * noise
        else:
            tensors[name] = 0.2 * noise
    save_file(tensors, file, metadata={"format": "pt"})


def build_v3(path: str, overrides: dict, seed: int = 0) -> str:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**dict(BASE, **overrides))
    model = DeepseekV3ForCausalLM(cfg).eval()
    _randomise_bias(model)
    save_random(model, path)
    if cfg.num_nextn_predict_layers:
        _add_mtp_tensors(path, cfg)
    return path


@pytest.fixture(scope="module")
def v3(checkpoints):
    """name -> checkpoint path, built beside conftest's so `checkpoints.greedy` serves it."""

    def get(name: str) -> str:
        path = os.path.join(checkpoints.root, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_v3(path, CONFIGS[name])
        return path

    return get


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name,tp,dcp,pcp",
    [("v3-lora", 1, 1, 1), ("v3-plain", 1, 1, 1), ("v3-lora", 2, 2, 1), ("v3-plain", 1, 1, 2)],
    ids=["lora-tp1", "plain-tp1", "lora-tp2-dcp2", "plain-pcp2"],
)
def test_greedy_equals_transformers(v3, checkpoints, name, tp, dcp, pcp):
    path = v3(name)
    prompts = [prompt_of(n, seed=900 + n) for n in LENGTHS]
    with LLM(path, tensor_parallel_size=tp, decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp,
             block_size=4, num_kv_blocks=160) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    for p, out in zip(prompts, outs):
        assert out.token_ids == checkpoints.greedy(name, p, NEW), f"prompt length {len(p)}"


def _hf_config(**overrides):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(**dict(BASE, **dict(CONFIGS["v3-lora"], **overrides)))
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def _brute_force_valid(scores, bias, ids, weights, moe) -> None:
    """The rule read literally, token by token: the kept groups are `topk_group` groups
    whose score (sum of their two best corrected scores) no other group beats; the
    chosen experts are k experts of kept groups whose corrected score no other expert of
    a kept group beats; weights are their plain scores, renormalised (+1e-20) if asked,
    times routed_scaling_factor. Ties allow several answers; any of them passes."""
    e = scores.shape[1]
    size = e // moe.n_group
    for t in range(scores.shape[0]):
        corrected = [float(scores[t, x] + bias[x]) for x in range(e)]
        group_score = [sum(sorted(corrected[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(moe.n_group)]
        chosen = [int(x) for x in ids[t]]
        assert len(set(chosen)) == moe.num_experts_per_tok
        groups = {x // size for x in chosen}
        # the chosen experts' groups fit in topk_group groups that no other group beats
        ranked = sorted(range(moe.n_group), key=lambda g: -group_score[g])
        cutoff = group_score[ranked[moe.topk_group - 1]]
        assert all(group_score[g] >= cutoff for g in groups), f"token {t}: expert outside the best groups"
        if moe.topk_group < moe.n_group and group_score[ranked[moe.topk_group]] == cutoff:
            kept = groups | {g for g in ranked if group_score[g] > cutoff}  # a tie at the cut: either side may stay
        else:
            kept = set(ranked[: moe.topk_group])
        assert groups <= kept and len(kept) <= moe.topk_group, f"token {t}"
        allowed = [x for x in range(e) if x // size in kept and x not in chosen]
        if allowed:
            assert min(corrected[x] for x in chosen) >= max(corrected[x] for x in allowed), f"token {t}"
        raw = [float(scores[t, x]) for x in chosen]
        total = sum(raw) + 1e-20 if moe.norm_topk_prob else 1.0
        expected = torch.tensor([r / total * moe.routed_scaling_factor for r in raw])
        torch.testing.assert_close(weights[t].double(), expected.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["random", "ties"])
@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_brute_force(tmp_path, case, norm):
    """Negative biases push corrected scores below 0 (masking out groups with 0, as
    V2 does, would then pick experts of dropped groups); `ties` draws scores and
    biases from a handful of values, so groups and experts tie."""
    moe = model_config_of(_hf_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                                     norm_topk_prob=norm), tmp_path).moe
    g = torch.Generator().manual_seed(3)
    n = 300
    if case == "ties":
        scores = torch.randint(1, 5, (n, 16), generator=g).float() / 8
        bias = torch.randint(-6, 2, (16,), generator=g).float() / 8
    else:
        scores = torch.rand(n, 16, generator=g)
        bias = torch.rand(16, generator=g) * 1.2 - 1.0
    assert (scores + bias).lt(0).any()
    weights, ids = select_experts(scores, moe, bias)
    assert weights.dtype == torch.float32 and ids.shape == (n, 4)
    _brute_force_valid(scores, bias, ids, weights, moe)
    _, plain = select_experts(scores, moe, torch.zeros(16))
    assert not torch.equal(plain.sort(-1).values, ids.sort(-1).values)  # the bias changed choices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_block_matches_transformers(tmp_path, dtype):
    """Our MoE with transformers' DeepseekV3MoE's weights (router in fp32, as transformers
    keeps it): the same experts, bit-equal fp32 weights, ties included (experts 4 and 5
    share router rows and bias), and the same block output."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = _hf_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    cfg = model_config_of(hf_cfg, tmp_path)
    g = torch.Generator().manual_seed(5)
    block = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        block.gate.weight[5] = block.gate.weight[4]
        block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.2 - 0.1)
        block.gate.e_score_correction_bias[5] = block.gate.e_score_correction_bias[4]
    block = block.to(dtype)
    block.gate.float()  # transformers' _keep_in_fp32_modules_strict
    ours = MoE(cfg, ParallelState.single(), dtype)
    assert ours.gate.weight.dtype == ours.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        ours.gate.weight.copy_(block.gate.weight)
        ours.gate.e_score_correction_bias.copy_(block.gate.e_score_correction_bias)
        for e in range(8):
            ours.experts[str(e)].gate_up_proj.weight.copy_(block.experts.gate_up_proj[e])
            ours.experts[str(e)].down_proj.weight.copy_(block.experts.down_proj[e])
        ours.shared_experts.gate_up_proj.weight.copy_(
            torch.cat([block.shared_experts.gate_proj.weight, block.shared_experts.up_proj.weight]))
        ours.shared_experts.down_proj.weight.copy_(block.shared_experts.down_proj.weight)
    x = torch.randn(300, 64, generator=g).to(dtype)
    with torch.no_grad():
        _, hf_w, hf_ids = block.gate(x)
        hf_out = block(x[None])[0]
        w, ids = ours.route(x)
        out = ours(x)
    assert torch.equal(ids, hf_ids)
    assert w.dtype == hf_w.dtype == torch.float32
    torch.testing.assert_close(w, hf_w, atol=0, rtol=0)
    assert ((ids == 4) | (ids == 5)).any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, hf_out, **tol)


def test_rope_in_bf16_matches_transformers(tmp_path):
    """transformers' DeepseekV3 casts YaRN's cos/sin to the activations' dtype and rotates
    in it (V2 rotates in fp32): the same bits in bf16, up to transformers' layout of the
    rotated dims (even ones first, then odd ones; the dot products are the same)."""
    from braid.engine.layers.rotary import RotaryEmbedding
    from braid.engine.models.deepseek_v3 import v3_attention
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3RotaryEmbedding,
        apply_rotary_pos_emb_interleave,
    )

    hf = _hf_config()
    cfg = model_config_of(hf, tmp_path)
    g = torch.Generator().manual_seed(4)
    positions = torch.randint(0, 250, (11,), generator=g)
    q = torch.randn(11, 4, 8, generator=g).bfloat16()
    k = torch.randn(11, 1, 8, generator=g).bfloat16()
    cos, sin = DeepseekV3RotaryEmbedding(hf)(q, positions[None])
    hq, hk = apply_rotary_pos_emb_interleave(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    rotary = v3_attention(cfg, ParallelState.single(), torch.bfloat16).rotary
    oq, ok = rotary(positions, q, k)
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    torch.testing.assert_close(oq[..., perm], hq[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(ok[..., perm], hk[0].transpose(0, 1), atol=0, rtol=0)
    fp32_q, _ = RotaryEmbedding(cfg.rope, interleaved=True)(positions, q, k)  # V2's order
    assert not torch.equal(fp32_q, oq)


def _load_engine_model(path: str):
    cfg = load_model_config(path)
    model = build_model(cfg, ParallelState.single(), torch.float32)
    load_weights(model, path, torch.float32)
    return cfg, model.eval()


def _hf_mtp_layer(hf, tensors: dict, index: int):
    """transformers' own MTP layer (MtpLayer around a DeepseekV3DecoderLayer, as its
    MtpModel builds it) filled from the checkpoint's `model.layers.{index}.*` tensors."""
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    mtp_cfg = hf.config.get_mtp_config()
    mtp_cfg._attn_implementation = "eager"
    layer = MtpLayer(mtp_cfg, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, 0).eval()
    prefix = f"model.layers.{index}."
    state = {}
    for name, t in tensors.items():
        if not name.startswith(prefix) or name.startswith((prefix + "shared_head.head", prefix + "embed_tokens")):
            continue
        rest = name[len(prefix):]
        if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
            state[rest] = t
        elif rest == "shared_head.norm.weight":
            state["post_norm.weight"] = t
        elif ".experts." not in rest:
            state["mtp_block." + rest] = t
    n = mtp_cfg.n_routed_experts
    ex = prefix + "mlp.experts.{}.{}.weight"
    state["mtp_block.mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([tensors[ex.format(e, "gate_proj")], tensors[ex.format(e, "up_proj")]]) for e in range(n)])
    state["mtp_block.mlp.experts.down_proj"] = torch.stack([tensors[ex.format(e, "down_proj")] for e in range(n)])
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "e_score_correction_bias" not in m], (missing, unexpected)
    layer.mtp_block.mlp.gate.e_score_correction_bias.copy_(tensors[prefix + "mlp.gate.e_score_correction_bias"])
    return layer


@pytest.mark.parametrize("own", [True, False], ids=["own-embed-head", "main-embed-head"])
def test_mtp_layer_forward_matches_transformers_mtp_layer(v3, checkpoints, tmp_path, own):
    """One MTP forward over a prompt (a single prefill through the engine's attention
    metadata, the MTP block's attention on a latent cache of its own), then one decode
    step of it: equal to transformers' MtpLayer with the checkpoint's MTP tensors, fed
    transformers' own final hidden states (after the final norm) and the next tokens'
    embeddings, from the MTP layer's embed_tokens and through its shared_head.head where
    the checkpoint has them (DeepSeek's format), else the main model's."""
    name = "v3-lora"
    path = v3(name)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    index = CONFIGS[name]["num_hidden_layers"]
    embed_name, head_name = f"model.layers.{index}.embed_tokens.weight", f"model.layers.{index}.shared_head.head.weight"
    if not own:
        path = _copy_checkpoint(path, tmp_path)
        save_file({k: t for k, t in tensors.items() if k not in (embed_name, head_name)},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        embed_name, head_name = "model.embed_tokens.weight", "lm_head.weight"
    cfg, model = _load_engine_model(path)
    mtp = model.mtp.layers[0]
    assert cfg.mtp.num_layers == 1 and model.mtp_attention_layers() == [mtp.self_attn]
    assert model.attention_layers() == [layer.self_attn for layer in model.model.layers]  # the cache holds the main layers
    torch.testing.assert_close(mtp.eh_proj.weight, tensors[f"model.layers.{index}.eh_proj.weight"], atol=0, rtol=0)
    assert (mtp.embed_tokens is not None) is own and (mtp.shared_head.head is not None) is own

    hf = checkpoints.hf_model(name)
    ids = torch.tensor(prompt_of(41, seed=77))
    n = len(ids) - 1  # MTP inputs: h_i (i < n) with token i+1
    positions = torch.arange(1, n + 1)  # transformers' MtpModel convention: the position of token i+1
    with torch.no_grad():
        h = hf.model(ids[None]).last_hidden_state[0, :n]  # after the final norm
        ref_layer = _hf_mtp_layer(hf, tensors, index)
        emb = torch.nn.functional.embedding(ids[1:], tensors[embed_name])
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        rope = hf.model.rotary_emb(emb[None], positions[None])
        ref_h = ref_layer(emb[None], h[None], rope, mask, positions[None], None)[0]  # post_norm applied
        ref_logits = ref_h @ tensors[head_name].T

        B = 4
        mtp.self_attn.cache = torch.zeros(-(-n // B), 1, 1, B, cfg.cache_head_dim)
        meta = AttentionMetadata(True, torch.arange(n - 1), rows=VarlenRows.packed([n - 1], [n - 1]))
        out = model.mtp(positions[:-1], h[:-1], ids[1:n], meta)  # prefill of the first n-1
        step = AttentionMetadata(False, torch.tensor([n - 1]), block_tables=torch.arange(-(-n // B))[None],
                                 local_seq_lens=torch.tensor([n]))
        last = model.mtp(positions[-1:], h[-1:], ids[n:], step)  # decode of the last, from the MTP cache
        logits = model.mtp.compute_logits(torch.cat([out, last]))
    torch.testing.assert_close(logits, ref_logits, atol=1e-4 * ref_logits.abs().max().item(), rtol=1e-4)


def test_partial_mtp_layer_is_refused_at_load(v3, tmp_path):
    path = _copy_checkpoint(v3("v3-lora"), tmp_path)
    file = os.path.join(path, "model.safetensors")
    save_file({k: t for k, t in load_file(file).items() if k != "model.layers.3.shared_head.norm.weight"}, file,
              metadata={"format": "pt"})
    cfg = load_model_config(path)
    model = build_model(cfg, ParallelState.single(), torch.float32)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors: mtp\.layers\.0\.shared_head\.norm\.weight"):
        load_weights(model, path, torch.float32)


def _copy_checkpoint(src: str, dst, **config_changes) -> str:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    edit_config(str(dst), **config_changes)
    return str(dst)


def test_mtp_promised_but_absent_loads_without_it(v3, tmp_path, caplog):
    """transformers saves V3 with num_nextn_predict_layers 1 and no MTP layer: the
    model loads without MTP and says so; a second promised layer that is missing
    when the first is there is refused."""
    path = _copy_checkpoint(v3("v3-plain"), tmp_path, num_nextn_predict_layers=1)
    with caplog.at_level("WARNING"):
        cfg, model = _load_engine_model(path)
    assert cfg.mtp is None and model.mtp is None
    assert "has no MTP layer" in caplog.text
    two = _copy_checkpoint(v3("v3-lora"), tmp_path / "two", num_nextn_predict_layers=2)
    with pytest.raises(CheckpointError, match=r"num_nextn_predict_layers is 2 .*eh_proj\.weight"):
        load_model_config(two)


@pytest.mark.parametrize("declared", [0, None])
def test_checkpoint_without_declared_mtp_loads_without_it(v3, tmp_path, declared):
    """MTP tensors that config.json does not declare (0 or absent) are skipped, as
    transformers skips them: no MTP module, no memory for it."""
    cfg, model = _load_engine_model(_copy_checkpoint(v3("v3-lora"), tmp_path, num_nextn_predict_layers=declared))
    assert cfg.mtp is None and model.mtp is None and model.mtp_attention_layers() == []
    assert not [n for n, _ in model.named_parameters() if n.startswith("mtp.")]


def test_kv_layout_is_mla_over_the_main_layers(v3):
    from braid.engine.config import EngineConfig, resolve
    from braid.kv_transfer.layout import describe_engine, format_name

    from braid.engine.config import cache_layers, kv_bytes_per_block
    from braid.kv_transfer.layout import LayoutMismatch, check_compatible

    cfg, model = resolve(EngineConfig.build(v3("v3-lora"), tensor_parallel_size=2, block_size=4, num_kv_blocks=32))
    layout = describe_engine(cfg, model)
    assert format_name(layout) == "mla" and layout.num_layers == 3  # the MTP layer has no cache layer
    # ... until the instance runs it (speculative.method mtp): one more layer, sized and described
    mtp_cfg, _ = resolve(EngineConfig.build(v3("v3-lora"), tensor_parallel_size=2, block_size=4, num_kv_blocks=32,
                                            speculative_method="mtp"))
    mtp_layout = describe_engine(mtp_cfg, model, num_layers=cache_layers(model, mtp_cfg))
    assert mtp_layout.num_layers == 4
    assert kv_bytes_per_block(model, mtp_cfg) * 3 == kv_bytes_per_block(model, cfg) * 4
    check_compatible(mtp_layout, mtp_layout)
    with pytest.raises(LayoutMismatch, match=r"num_layers: prefill 3, decode 4 \(an instance that runs an MTP layer"):
        check_compatible(layout, mtp_layout)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(topk_method="greedy"), "topk_method"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=8), "n_group"),  # groups of one expert: no two best
        (dict(topk_group=5), "topk_group"),
        (dict(topk_group=1, num_experts_per_tok=5), "topk_group"),
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
        (dict(moe_layer_freq=2), "moe_layer_freq"),
        (dict(mlp_bias=True), "mlp_bias"),
    ],
)
def test_unsupported_settings_are_refused(v3, tmp_path, change, match):
    path = _copy_checkpoint(v3("v3-plain"), tmp_path, **change)
    with pytest.raises(CheckpointError, match=match):
        load_model_config(path)


def test_omitted_fields_take_transformers_defaults(v3, tmp_path):
    """DeepseekV3Config's defaults for router fields config.json leaves out
    (norm_topk_prob true, routed_scaling_factor 2.5, ...), not V2's."""
    from transformers import DeepseekV3Config

    dropped = ["norm_topk_prob", "routed_scaling_factor", "n_shared_experts", "first_k_dense_replace", "q_lora_rank"]
    cfg = load_model_config(_copy_checkpoint(v3("v3-plain"), tmp_path, **{k: None for k in dropped}))
    hf = DeepseekV3Config.from_pretrained(str(tmp_path))
    assert cfg.moe.norm_topk_prob is hf.norm_topk_prob is True
    assert cfg.moe.routed_scaling_factor == hf.routed_scaling_factor == 2.5
    assert cfg.moe.n_shared_experts == hf.n_shared_experts
    assert cfg.moe.sparse_layers == frozenset(range(hf.first_k_dense_replace, cfg.num_layers))
    assert cfg.mla.q_lora_rank == hf.q_lora_rank == 1536


@pytest.mark.timeout(300)
def test_pd_transfer_pcp2_to_tp2_dcp2_equals_transformers(v3, checkpoints):
    """P (pcp 2) prefills and pushes the MLA latent cache (main layers only; the MTP
    layer has none) over TCP to D (tp 2, dcp 2), which decodes."""
    from braid.engine.config import EngineConfig
    from braid.engine.core import EngineCore
    from test_kv_transfer import GREEDY as PD_GREEDY
    from test_kv_transfer import run_pd

    name = "v3-lora"
    prompts = [prompt_of(n, seed=950 + n) for n in (1, 4, 9, 33, 50)]

    def engine(role, **parallel):
        return EngineCore(EngineConfig.build(v3(name), block_size=4, num_kv_blocks=96, kv_role=role,
                                             kv_transport="tcp", **parallel))

    P = engine("prefill", prefill_context_parallel_size=2)
    D = engine("decode", tensor_parallel_size=2, decode_context_parallel_size=2)
    try:
        assert P.kv_layout.format == D.kv_layout.format == 2  # KV_FORMAT_MLA
        assert P.kv_layout.num_layers == D.kv_layout.num_layers == 3
        outs, p_events, d_errors = run_pd(P, D, prompts)
        assert not d_errors
        for p, out in zip(prompts, outs):
            assert out == checkpoints.greedy(name, p, PD_GREEDY.max_tokens), f"prompt length {len(p)}"
        assert all(ev.finish_reason == "transferred" for ev in p_events.values()) and len(p_events) == len(prompts)
    finally:
        P.shutdown()
        D.shutdown()
