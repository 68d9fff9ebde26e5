"""The embedded tiny model (`--model tiny`): a random Llama checkpoint in Hugging
Face format (config.json, generation_config.json, model.safetensors,
tokenizer.json), written without downloading anything, so the tests and the
benchmarks that need a fast model have one on a machine that cannot reach a
model hub. (The default model is SmolLM2: see braid.engine.default_model.)

Its weights are random: it produces token salad, exactly reproducibly.
"""
from __future__ import annotations

import json
import os


CORPUS = """
A serving system for large language models spends its life moving numbers.
The prompt arrives, the prefill reads every token of it at once, and the
decoder then writes one token at a time, each step reading everything that
came before. Long contexts make both halves hard: the prefill grows with the
square of the prompt, and the decoder's cache grows with every token kept.
Splitting the prompt across ranks shortens the wait for the first token.
Sharding the cache along tokens lets one node hold more and longer requests.
Blocks of the cache move whole from the prefill node to the decode node,
layer by layer, while the prefill is still running. Every block has one
owner, one deadline and one release, whatever happens to the request.
The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()[]{}<>.,;:!?
Hello world. Once upon a time there was a small model with random weights.
"""

BOS, EOS = "<|bos|>", "<|eos|>"


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on CORPUS; BOS is prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def save_tokenizer(path: str, vocab_size: int = 384) -> dict:
    """Write tokenizer.json; returns {'vocab_size', 'bos_token_id', 'eos_token_id'}."""
    tok = build_tokenizer(vocab_size)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return {
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
    }


DEFAULT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.2,
)


def write_tiny_llama(path: str, seed: int = 0, **overrides) -> str:
    """Write a random LlamaForCausalLM checkpoint with a tokenizer to `path`."""
    import torch  # only when writing: the router process finds the model without torch
    from safetensors.torch import save_file

    ids = save_tokenizer(path)
    cfg = dict(DEFAULT_CONFIG, **overrides)
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
    )
    g = torch.Generator().manual_seed(seed)
    std = cfg["initializer_range"]
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h)}
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": rand(nh * hd, h),
            p + "self_attn.k_proj.weight": rand(nkv * hd, h),
            p + "self_attn.v_proj.weight": rand(nkv * hd, h),
            p + "self_attn.o_proj.weight": rand(h, nh * hd),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        })
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"]}, f, indent=2)
    return path


def default_model_dir() -> str:
    """Where the embedded default model lives (created on first use)."""
    root = os.environ.get("BRAID_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "braid")
    return os.path.join(root, "tiny-llama")


def ensure_default_model() -> str:
    path = default_model_dir()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        tmp = path + f".tmp{os.getpid()}"
        write_tiny_llama(tmp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path
