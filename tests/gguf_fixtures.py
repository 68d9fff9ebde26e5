"""Tiny random checkpoints written as GGUF files with the `gguf` package, and
the transformers reference holding the same (dequantized) weights.

The reference never undoes llama.cpp's q/k row permutation: blocks quantize
along a row, so permuting rows commutes with quantization; the reference
dequantizes the blocks of each weight in Hugging Face row order, and only the
file gets the permuted rows (as llama.cpp's converter writes them)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

QK_K = 256
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# shapes whose rows are multiples of 256 (K-quant super-blocks)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=2)
TINY_ARCHS = {
    "llama": dict(tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=False),
}


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """ggml's Q6_K layout (ql[128], qh[64], int8 scales[16], f16 d per 256
    values; value = d * scale * (q - 32)), with a plain max-abs quantizer."""
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(axis=-1) / 31.0  # q - 32 spans -32..31
    d = _f16(sub_scale.max(axis=-1) / 127.0)
    dd = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(sub_scale, dd, out=np.zeros_like(sub_scale), where=dd > 0)), -128, 127)
    step = (dd * sc)[:, :, None]
    q = np.clip(np.rint(np.divide(sub, step, out=np.zeros_like(sub), where=step > 0)), -32, 31).astype(np.int16) + 32
    q = q.reshape(n, QK_K).astype(np.uint8)
    # element e: half h = e // 128; low nibble in ql[h*64 + e%64] at shift 4*((e%128)//64);
    # high two bits in qh[h*32 + e%32] at shift 2*((e%128)//32)
    halves = q.reshape(n, 2, 128)
    low, high = halves & 0x0F, halves >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    hq = high.reshape(n, 2, 4, 32)
    qh = (hq[:, :, 0] | (hq[:, :, 1] << 2) | (hq[:, :, 2] << 4) | (hq[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """ggml's Q4_K layout (f16 d, f16 dmin, 12 bytes of packed 6-bit scales
    and mins, 128 bytes of nibbles per 256 values; value = d*sc*q - dmin*m)."""
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    sub_scale, sub_min = (sub.max(axis=-1) - lo) / 15.0, -lo
    d, dmin = _f16(sub_scale.max(axis=-1) / 63.0), _f16(sub_min.max(axis=-1) / 63.0)
    dd, dm = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(sub_scale, dd, out=np.zeros_like(sub_scale), where=dd > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(np.divide(sub_min, dm, out=np.zeros_like(sub_min), where=dm > 0)), 0, 63).astype(np.uint8)
    step = (dd * sc)[:, :, None]
    shifted = sub + (dm * mn)[:, :, None]
    q = np.clip(np.rint(np.divide(shifted, step, out=np.zeros_like(sub), where=step > 0)), 0, 15).astype(np.uint8)
    # sub-blocks 2k and 2k+1 share bytes 32k..32k+31: low and high nibbles
    pairs = q.reshape(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, qs], axis=1)


def quantize(w: np.ndarray, qname: str) -> np.ndarray:
    """The stored form of a 2-D weight: F32/F16 arrays, or bytes [rows, bytes per row]."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qname]
    if qname == "Q4_K":
        return quantize_q4_k(w).reshape(w.shape[0], -1)
    if qname == "Q6_K":
        return quantize_q6_k(w).reshape(w.shape[0], -1)
    return gguf.quants.quantize(w, qtype)


def dequantize(raw: np.ndarray, qname: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qname])


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: each head's two halves interleaved."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def _write_metadata(writer, arch: str, cfg) -> None:
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)


def _write_tokenizer(writer, tokenizer_json: str) -> None:
    """The tiny byte-level BPE tokenizer as GGUF "gpt2" metadata."""
    with open(tokenizer_json) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<s>"] if "<s>" in vocab else 0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)


def write_gguf(path: str, arch: str, model, qname: str, tokenizer_json: str | None) -> dict[str, torch.Tensor]:
    """Write `model` (transformers, fp32) as GGUF with its matrices in `qname`;
    returns the reference state dict: each weight as the file's blocks decode."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(path, GGUF_ARCH[arch])
    _write_metadata(writer, arch, cfg)
    if tokenizer_json:
        _write_tokenizer(writer, tokenizer_json)
    reference = {}
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().float().numpy()
        if w.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            stored, ref = w, w
        else:
            stored = quantize(w, qname)
            ref = w if qname == "F32" else dequantize(stored, qname).reshape(w.shape)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            stored = permute_rope_rows(stored, heads)
        qtype = gguf.GGMLQuantizationType[qname] if w.ndim > 1 and qname not in ("F32", "F16") else None
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(stored), raw_dtype=qtype)
        reference[name] = torch.from_numpy(np.array(ref, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def reference_model(model_cls, cfg, state: dict[str, torch.Tensor]):
    """A transformers model of `cfg` holding exactly `state`."""
    ref = model_cls(cfg).float().eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    ref.generation_config.eos_token_id = None
    return ref


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def build_tiny_gguf(root: str, arch: str, qname: str, tokenizer_json: str | None = None):
    """(path of the .gguf, the transformers reference holding its dequantized weights)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    from conftest import BASE

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    kwargs = dict(BASE, **TINY, **TINY_ARCHS[arch])
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    torch.manual_seed(7)
    cfg = cfg_cls(**kwargs)
    model = model_cls(cfg).float().eval()
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"tiny-{arch}-{qname}.gguf")
    state = write_gguf(path, arch, model, qname, tokenizer_json)
    return path, reference_model(model_cls, cfg, state)


def smol_gguf_folder(tmp_path_factory) -> str:
    """A fresh folder holding (a link to) the installed SmolLM2 GGUF file, or skip
    the calling test saying how to install it."""
    import pytest

    from braid.engine.default_model import default_gguf_path
    from braid.engine.model_config import CheckpointError

    try:
        path = default_gguf_path()
    except CheckpointError as e:
        pytest.skip(f"{e} (scripts/setup.sh installs it)")
    folder = tmp_path_factory.mktemp("smol")
    os.symlink(path, folder / SMOL_FILE)
    return str(folder)
