"""DeepSeek-V2 (MLA + MoE) against transformers: greedy tokens and last-position
logits at TP, DCP and PCP; the latent cache's placement, shape and size; YaRN,
interleaved rope, expert routing; absorbed vs un-absorbed MLA in the layer."""
import json
import os

import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.kv_layout import ShardLayout
from braid.engine.layers.attention import AttentionMetadata
from braid.engine.layers.mla import MLAAttention
from braid.engine.layers.moe import select_experts
from braid.engine.layers.rotary import RotaryEmbedding
from braid.engine.model_config import CheckpointError, load_model_config
from braid.engine.parallel_state import ParallelState
from braid.kernels.reference import VarlenRows
from conftest import model_config_of, prompt_of
from deepseek_fixtures import BASE, YARN  # the `ds` fixture is registered in conftest

LENGTHS = [1, 3, 8, 9, 37, 100]
NEW = 20
CASES = [
    # name, tp, dcp, pcp, interleave (None = block size)
    ("ds-dense", 1, 1, 1, None),
    ("ds-moe", 1, 1, 1, None),
    ("ds-group", 1, 1, 1, None),
    ("ds-yarn", 1, 1, 1, None),
    ("ds-moe", 2, 1, 1, None),
    ("ds-group", 2, 1, 1, None),
    ("ds-dense", 2, 2, 1, None),
    ("ds-group", 2, 2, 1, None),
    ("ds-yarn", 2, 2, 1, 1),
    ("ds-moe", 1, 1, 2, None),
    ("ds-yarn", 1, 1, 2, None),
    ("ds-group", 2, 2, 2, None),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "name,tp,dcp,pcp,interleave",
    [pytest.param(*c, id=f"{c[0]}-tp{c[1]}-dcp{c[2]}-pcp{c[3]}" + (f"-i{c[4]}" if c[4] else "")) for c in CASES],
)
def test_greedy_and_logits_equal_transformers(ds, checkpoints, name, tp, dcp, pcp, interleave):
    path = ds(name)
    prompts = [prompt_of(n, seed=500 + n) for n in LENGTHS]
    expected = [checkpoints.greedy(name, p, NEW) for p in prompts]
    with LLM(
        path, tensor_parallel_size=tp, decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp,
        cp_kv_cache_interleave_size=interleave, block_size=4, num_kv_blocks=96,
    ) as llm:
        logits = llm.engine.last_token_logits(prompts)  # prefill: un-absorbed MLA
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))  # + absorbed decode
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    for row, p in zip(logits, prompts):
        ref = checkpoints.last_logits(name, p)
        assert (row - ref).abs().max() / ref.abs().max() < 1e-4, f"prompt length {len(p)}"
    for p, out, exp in zip(prompts, outs, expected):
        assert out.token_ids == exp, f"prompt length {len(p)}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp,dcp,pcp", [(2, 2, 1), (1, 1, 2)])
def test_latent_cache_holds_transformers_latents_on_owner_shards(ds, checkpoints, tp, dcp, pcp):
    """After the prefill, each rank's cache is [L, n, C=1, H=1, B, kv_lora_rank + rope]
    and holds transformers' cached kv_c_normed || k_pe (rope applied, pairs
    interleaved) for exactly the tokens its shard owns (block g on shard g % N)."""
    name, B = "ds-yarn", 4
    lora, rope = BASE["kv_lora_rank"], BASE["qk_rope_head_dim"]
    prompt = prompt_of(45, seed=9)
    path = ds(name)  # built first: the reference below reads the same folder
    ref = checkpoints.kv(name, prompt)  # per layer (kv_c_normed [1, L, lora], k_pe [1, L, rope])
    with LLM(
        path, tensor_parallel_size=tp, decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp,
        block_size=B, num_kv_blocks=32,
    ) as llm:
        seq = llm.engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0))
        llm.engine.step()  # prefill only
        caches = llm.engine.executor.gather_kv(list(seq.block_table))  # per rank [L, n, C, H, B, D]
        topo = llm.engine.config.topology
        llm.engine.abort(seq.request_id)
    n = pcp * dcp
    layout = ShardLayout(B, n, B)
    assert len(caches) == tp * pcp
    for rank, cache in enumerate(caches):
        assert cache.shape[2:] == (1, 1, B, lora + rope), f"rank {rank}"
        shard = topo.for_rank(rank).cp_rank
        expected = torch.zeros_like(cache)
        for x in range(len(prompt)):
            owner, vb, off = layout.owner(x)
            if owner == shard:
                for layer, (kv_c, k_pe) in enumerate(ref):
                    expected[layer, vb, 0, 0, off] = torch.cat([kv_c[0, x], k_pe[0, x]])
        torch.testing.assert_close(cache, expected, atol=1e-5, rtol=1e-5, msg=f"rank {rank} (shard {shard})")


@pytest.mark.timeout(180)
def test_dcp_halves_per_rank_latent_bytes(ds):
    name = "ds-moe"
    prompts = [prompt_of(n, seed=n) for n in (17, 30, 45)]
    cfg = load_model_config(ds(name))
    used = {}
    for dcp in (1, 2):
        with LLM(ds(name), tensor_parallel_size=2, decode_context_parallel_size=dcp, block_size=4, num_kv_blocks=64) as llm:
            for p in prompts:
                llm.engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            llm.engine.step()  # the prefill: all three prompts now hold their latents
            stats = llm.engine.kv_stats()
            used[dcp] = stats["bytes_used_per_rank"]
            per_block = stats["bytes_per_block_per_rank"]
            # one latent head per token, fp32: layers * B * (kv_lora_rank + rope) * 4 bytes
            assert per_block == cfg.num_layers * 4 * (BASE["kv_lora_rank"] + BASE["qk_rope_head_dim"]) * 4
            while llm.engine.has_unfinished():
                llm.engine.step()
    assert abs(used[2] - used[1] / 2) <= len(prompts) * per_block
    assert used[2] < used[1]


def _hf_config(**overrides):
    from transformers import DeepseekV2Config

    cfg = DeepseekV2Config(**dict(BASE, **overrides))
    cfg.architectures = ["DeepseekV2ForCausalLM"]
    return cfg


_ours = model_config_of


YARN_VARIANTS = [
    # DeepSeek-V2 itself
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    # cos/sin magnitude != 1
    dict(factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
    # no ramp truncation
    dict(factor=8.0, original_max_position_embeddings=64, beta_fast=16, beta_slow=2, truncate=False),
    # explicit attention factor
    dict(factor=4.0, original_max_position_embeddings=32, attention_factor=1.3),
    # mscale without mscale_all_dim, or with it 0: magnitude from factor alone, no softmax scale
    dict(factor=16.0, original_max_position_embeddings=128, mscale=0.9),
    dict(factor=8.0, original_max_position_embeddings=64, mscale=0.9, mscale_all_dim=0),
]


@pytest.mark.parametrize("variant", range(len(YARN_VARIANTS)))
def test_yarn_frequencies_magnitude_and_softmax_scale_match_transformers(tmp_path, variant):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention

    params = dict(rope_type="yarn", rope_theta=10000.0, **YARN_VARIANTS[variant])
    hf = _hf_config(q_lora_rank=None, n_routed_experts=4, rope_parameters=params, qk_rope_head_dim=32,
                    max_position_embeddings=int(params["factor"] * params["original_max_position_embeddings"]))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    cfg = _ours(hf, tmp_path)
    rot = RotaryEmbedding(cfg.rope, interleaved=True)
    torch.testing.assert_close(rot.inv_freq, inv_freq.float(), atol=0, rtol=1e-6)
    assert rot.magnitude == pytest.approx(attention_factor, rel=1e-12)
    attn = MLAAttention(cfg, ParallelState.single(), torch.float32)
    assert attn.scale == pytest.approx(DeepseekV2Attention(hf, 0).scaling, rel=1e-12)


@pytest.mark.parametrize("rope", [None, "yarn"])
def test_interleaved_rope_matches_transformers(tmp_path, rope):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding, apply_rotary_emb

    extra = dict(rope_parameters=dict(YARN_VARIANTS[1], rope_type="yarn", rope_theta=10000.0)) if rope else {}
    hf = _hf_config(q_lora_rank=None, n_routed_experts=4, qk_rope_head_dim=16, **extra)
    cfg = _ours(hf, tmp_path)
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 2000, (11,), generator=g)
    q = torch.randn(11, 4, 16, generator=g)
    k = torch.randn(11, 1, 16, generator=g)
    freqs_cis = DeepseekV2RotaryEmbedding(hf)(q, positions[None])  # [1, T, R/2] complex
    hq, hk = apply_rotary_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], freqs_cis)  # [1, H, T, R]
    oq, ok = RotaryEmbedding(cfg.rope, interleaved=True)(positions, q, k)
    torch.testing.assert_close(oq, hq[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok, hk[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_routing_matches_transformers(tmp_path, method):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    group = dict(n_group=4, topk_group=2) if method == "group_limited_greedy" else {}
    hf = _hf_config(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3, topk_method=method,
                    routed_scaling_factor=2.5, **group)
    cfg = _ours(hf, tmp_path)
    g = torch.Generator().manual_seed(2)
    router = DeepseekV2TopkRouter(hf)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64, generator=g))
    x = torch.randn(200, 64, generator=g)
    with torch.no_grad():
        _, hf_w, hf_ids = router(x)
    scores = torch.nn.functional.linear(x, router.weight).softmax(dim=-1)
    w, ids = select_experts(scores, cfg.moe)

    def canonical(weights, experts):
        experts, order = experts.sort(dim=-1)
        return weights.gather(1, order), experts

    for a, b in zip(canonical(w, ids), canonical(hf_w, hf_ids)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    if method == "group_limited_greedy":  # the group limit changed some choices
        assert not torch.equal(ids.sort(-1).values, scores.topk(3, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_decode_equals_unabsorbed_prefill(tmp_path, q_lora_rank):
    """One MLA layer with random weights: prefilling n tokens then decoding token n
    (absorbed, over the latent cache) gives prefill-of-n+1's last row (un-absorbed)."""
    cfg = _ours(_hf_config(q_lora_rank=q_lora_rank, n_routed_experts=4, rope_parameters=dict(YARN, rope_theta=10000.0)), tmp_path)
    torch.manual_seed(3)
    attn = MLAAttention(cfg, ParallelState.single(), torch.float32)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    n, B = 13, 4
    nb = -(-(n + 1) // B)
    x = torch.randn(n + 1, 64)
    positions = torch.arange(n + 1) + 40  # past original_max_position_embeddings
    table = torch.arange(nb)[None]

    def prefill(count):
        meta = AttentionMetadata(True, torch.arange(count), rows=VarlenRows.packed([count], [count]))
        return attn(positions[:count], x[:count], meta)

    attn.cache = torch.zeros(nb, 1, 1, B, cfg.cache_head_dim)
    full = prefill(n + 1)
    full_cache = attn.cache.clone()
    attn.cache = torch.zeros_like(full_cache)
    prefix = prefill(n)
    meta = AttentionMetadata(False, torch.tensor([n]), block_tables=table, local_seq_lens=torch.tensor([n + 1]))
    step = attn(positions[n:], x[n:], meta)
    torch.testing.assert_close(prefix, full[:n], atol=1e-5, rtol=1e-5)  # causal
    torch.testing.assert_close(step[0], full[n], atol=1e-4 * full[n].abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(attn.cache, full_cache, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(norm_topk_prob=True), "norm_topk_prob"),
        (dict(moe_layer_freq=2), "moe_layer_freq"),
        (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
        (dict(topk_method="group_limited_greedy", n_group=4, topk_group=5), "topk_group"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
        (dict(topk_method="noaux_tc"), "topk_method"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    ],
)
def test_unsupported_moe_settings_are_refused(ds, tmp_path, change, match):
    with open(os.path.join(ds("ds-moe"), "config.json")) as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=match):
        load_model_config(str(tmp_path))
