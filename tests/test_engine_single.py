"""Single-rank engine against transformers: greedy tokens, logits, dtypes,
tokenizer, stop handling, admission, preemption and sampling."""
import json
import os
import shutil

import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.model_config import CheckpointError
from conftest import VOCAB, build_checkpoint, edit_config, prompt_of

GREEDY48 = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
LENGTHS = [1, 7, 33, 64, 150, 300]

ARCH_CONFIGS = [
    "llama-gqa1",
    "llama-gqa2-tied",
    "llama-gqa4",
    "llama-mqa",
    "llama-oddhd",
    "llama3-rope",
    "llama-sharded",
    "qwen2-bias",
    "qwen2-mqa",
    "qwen3-norm",
    "qwen3-gqa4",
    "qwen3-bias",
]


@pytest.mark.parametrize("name", ARCH_CONFIGS)
def test_batch_greedy_equals_transformers(checkpoints, name):
    path = checkpoints.get(name)
    prompts = [prompt_of(n, seed=n) for n in LENGTHS]
    expected = [checkpoints.greedy(name, p, 48) for p in prompts]
    for block_size in (1, 16, 32):
        with LLM(path, block_size=block_size, num_kv_blocks=(1024 // block_size) * 8) as llm:
            outs = llm.generate(prompts, GREEDY48)
            for p, out, exp in zip(prompts, outs, expected):
                assert out.token_ids == exp, f"{name} block_size={block_size} prompt len {len(p)}"
                assert out.finish_reason == "length"
            assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_sharded_checkpoint_has_an_index(checkpoints):
    path = checkpoints.get("llama-sharded")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1


@pytest.mark.parametrize("name", ["llama-gqa2-tied", "qwen3-norm", "llama3-rope"])
def test_last_logits_match_transformers(checkpoints, name):
    prompts = [prompt_of(n, seed=100 + n) for n in (1, 17, 200)]
    with LLM(checkpoints.get(name), block_size=16) as llm:
        logits = llm.engine.last_token_logits(prompts)
    for row, p in zip(logits, prompts):
        ref = checkpoints.last_logits(name, p)
        scale = ref.abs().max()
        assert (row - ref).abs().max() / scale < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_checkpoints(tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM

    path = build_checkpoint(str(tmp_path / "half"), "qwen2", dict(num_attention_heads=4, num_key_value_heads=2), {}, dtype=dtype)
    assert json.load(open(os.path.join(path, "config.json")))["dtype"] in ("bfloat16", "float16")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    prompts = [prompt_of(n, seed=n) for n in (5, 40)]
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    with LLM(path, dtype=name, block_size=16) as llm:
        logits = llm.engine.last_token_logits(prompts)
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for row, p, out in zip(logits, prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1].float()
        assert (row - ref).abs().max() / ref.abs().max() < tol
        assert out.token_ids[0] == int(ref.argmax())
        assert len(out.token_ids) == 8


def test_fp32_engine_runs_a_bf16_checkpoint(checkpoints, tmp_path):
    """Requested dtype wins over the checkpoint's: weights are converted at load time."""
    path = build_checkpoint(str(tmp_path / "bf"), "llama", dict(num_key_value_heads=2, num_attention_heads=4), {}, dtype=torch.bfloat16)
    with LLM(path, dtype="float32") as llm:
        assert len(llm.generate([[3, 4, 5]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids) == 4


# -- malformed checkpoints -----------------------------------------------------


def _copy(checkpoints, tmp_path, name="llama-gqa2-tied"):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints.get(name), dst)
    return str(dst)


def test_unsupported_architecture(checkpoints, tmp_path):
    path = _copy(checkpoints, tmp_path)
    edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(path)


def test_missing_config_field(checkpoints, tmp_path):
    path = _copy(checkpoints, tmp_path)
    edit_config(path, hidden_size=None)
    with pytest.raises(CheckpointError, match="hidden_size"):
        LLM(path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        LLM(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(str(tmp_path / "empty"))


def test_missing_tensor(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(checkpoints, tmp_path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="gate_up_proj"):
        LLM(path)


def test_wrong_shape(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(checkpoints, tmp_path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_proj"):
        LLM(path)


def test_missing_shard_and_corrupt_file(checkpoints, tmp_path):
    path = _copy(checkpoints, tmp_path, "llama-sharded")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"names shard {shard}"):
        LLM(path)
    path2 = str(tmp_path / "corrupt")
    shutil.copytree(checkpoints.get("llama-gqa1"), path2)
    with open(os.path.join(path2, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        LLM(path2)


# -- tokenizer, stop tokens, admission -------------------------------------------


def test_text_prompts_use_the_checkpoint_tokenizer(checkpoints):
    from transformers import PreTrainedTokenizerFast

    path = checkpoints.get("llama-gqa2-tied")
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
    text = "The quick brown fox jumps over the lazy dog."
    ids = hf_tok(text)["input_ids"]
    with LLM(path) as llm:
        assert llm.tokenizer.encode(text) == ids
        out = llm.generate([text], GREEDY48)[0]
    assert out.prompt_token_ids == ids
    assert out.token_ids == checkpoints.greedy("llama-gqa2-tied", ids, 48)
    assert out.text == hf_tok.decode(out.token_ids, skip_special_tokens=True)


def test_stop_tokens_and_eos(checkpoints, tmp_path):
    name = "llama-gqa2-tied"
    prompt = prompt_of(20, seed=5)
    ref = checkpoints.greedy(name, prompt, 48)
    stop = ref[5]
    cut = ref.index(stop) + 1  # first occurrence ends the request
    with LLM(checkpoints.get(name)) as llm:
        out = llm.generate([prompt], SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
    # the same token as the model's EOS (generation_config.json)
    path = _copy(checkpoints, tmp_path, name)
    json.dump({"eos_token_id": [stop]}, open(os.path.join(path, "generation_config.json"), "w"))
    with LLM(path) as llm:
        out = llm.generate([prompt], SamplingParams(max_tokens=48, temperature=0))[0]
        assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
        out = llm.generate([prompt], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == ref and out.finish_reason == "length"


def test_overlong_request_rejected_others_continue(checkpoints):
    name = "llama-mqa"
    ok = [prompt_of(10, 1), prompt_of(30, 2)]
    with LLM(checkpoints.get(name), max_model_len=64) as llm:
        outs = llm.generate([ok[0], prompt_of(65, 3), ok[1], [VOCAB + 5], []], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert outs[1].finish_reason == "error" and "max_model_len 64" in outs[1].error
    assert outs[3].finish_reason == "error" and "outside the vocabulary" in outs[3].error
    assert outs[4].finish_reason == "error" and "empty" in outs[4].error
    assert outs[0].token_ids == checkpoints.greedy(name, ok[0], 20)
    assert outs[2].token_ids == checkpoints.greedy(name, ok[1], 20)


def test_max_model_len_caps_the_output(checkpoints):
    name = "llama-mqa"
    p = prompt_of(50, 9)
    with LLM(checkpoints.get(name), max_model_len=60) as llm:
        out = llm.generate([p], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(p) + len(out.token_ids) == 60
    assert out.token_ids == checkpoints.greedy(name, p, 10)


def test_max_model_len_above_kv_capacity_is_refused(checkpoints):
    with pytest.raises(ValueError, match="exceeds the KV cache capacity"):
        LLM(checkpoints.get("llama-mqa"), block_size=4, num_kv_blocks=4, max_model_len=64)


def test_preemption_under_a_small_pool_keeps_outputs_exact(checkpoints):
    name = "llama-gqa2-tied"
    prompts = [prompt_of(n, seed=50 + n) for n in (10, 25, 40, 12, 33, 20)]
    # 24 blocks of 4 tokens: the six sequences (up to 80 tokens each) cannot all fit
    with LLM(checkpoints.get(name), block_size=4, num_kv_blocks=24) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.num_free == 24
    for p, out in zip(prompts, outs):
        assert out.token_ids == checkpoints.greedy(name, p, 40)


def test_sequences_join_and_finish_at_different_steps(checkpoints):
    name = "qwen2-bias"
    prompts = [prompt_of(n, seed=n) for n in (3, 60, 9, 120)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (5, 40, 17, 1)]
    with LLM(checkpoints.get(name), max_num_seqs=2) as llm:
        outs = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == checkpoints.greedy(name, p, sp.max_tokens)


# -- sampling --------------------------------------------------------------------


def test_sampling_seeded_and_bounded(checkpoints):
    name = "llama-gqa1"
    p = prompt_of(12, 4)
    with LLM(checkpoints.get(name)) as llm:
        a = llm.generate([p, p], SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
        b = llm.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
        c = llm.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))
        assert a[0].token_ids == a[1].token_ids == b[0].token_ids
        assert c[0].token_ids != a[0].token_ids
        greedy = llm.generate([p], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
        top1 = llm.generate([p], SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=3, ignore_eos=True))[0]
        assert top1.token_ids == greedy.token_ids
        tiny_p = llm.generate([p], SamplingParams(max_tokens=16, temperature=0.8, top_p=1e-6, seed=3, ignore_eos=True))[0]
        assert tiny_p.token_ids == greedy.token_ids


def test_sampler_respects_top_k_and_top_p_sets():
    """Every sampled token lies in the set a brute-force top-k / top-p computes."""
    from braid.engine.sampling import Sampler

    g = torch.Generator().manual_seed(0)
    sampler = Sampler(seed=1)
    for trial in range(40):
        logits = torch.randn(1, 50, generator=g) * 3
        k, top_p, temp = [0, 1, 3, 10][trial % 4], [1.0, 0.5, 0.9, 0.2][trial // 10], 0.7
        probs = torch.softmax(logits[0] / temp, -1)
        order = probs.argsort(descending=True).tolist()
        allowed = set(order[:k]) if k else set(order)
        # brute force top-p over the top-k survivors
        kept, mass = [], 0.0
        survivors = [t for t in order if t in allowed]
        total = float(sum(probs[t] for t in survivors))
        for t in survivors:
            if mass >= top_p:
                break
            kept.append(t)
            mass += float(probs[t]) / total
        for _ in range(20):
            tok = sampler(logits, [SamplingParams(temperature=temp, top_k=k, top_p=top_p)], [None])[0]
            assert tok in kept


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
