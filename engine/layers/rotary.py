"""Rotary position embeddings with default, linear, llama3 and YaRN frequencies.

cos/sin are computed in fp32 from `inv_freq`. For the halves layout (Llama,
Qwen) they are cast to the activations' dtype before rotating; the
interleaved layout rotates in fp32 and casts the result (DeepSeek-V2) or, with
`fp32_pairs=False`, casts cos/sin and rotates in the activations' dtype
(DeepSeek-V3). All are the orders transformers uses. YaRN follows transformers'
`_compute_yarn_parameters` (verified in tests/test_deepseek_v2.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from braid.engine.model_config import RopeConfig


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_factor(s: dict, max_pos: int) -> float:
    """The YaRN scaling factor; when absent, the ratio of the context lengths."""
    factor = s.get("factor")
    if factor is None:
        factor = max_pos / (s.get("original_max_position_embeddings") or max_pos)
    return float(factor)


def yarn_softmax_scale(s: dict | None, max_pos: int) -> float:
    """DeepSeek's extra softmax scale under scaled rope: mscale(factor, mscale_all_dim)**2
    when `mscale_all_dim` is set (non-zero), else 1."""
    if not s or not s.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(yarn_factor(s, max_pos), s["mscale_all_dim"]) ** 2


def _yarn_inv_freq(base: float, dim: int, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies over a ramp of
    dimensions; returns (inv_freq, cos/sin magnitude). Follows transformers'
    `_compute_yarn_parameters`: falsy beta_fast/beta_slow take their defaults,
    the ramp ends are floored/ceiled unless `truncate` is false, and the
    magnitude is `attention_factor`, else mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) when both are set (non-zero), else mscale(factor)."""
    factor = yarn_factor(s, max_pos)
    orig = s.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if s.get("attention_factor") is not None:
        mag = float(s["attention_factor"])
    elif mscale and mscale_all_dim:
        mag = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        mag = yarn_mscale(factor)
    return inv_freq, mag


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle i and keep that layout:
    transformers' DeepSeek-V2 views x as complex numbers and multiplies by
    cos + i*sin in fp32 (DeepSeek-V3 does the same products in cos/sin's dtype).
    x [T, H, d]; cos/sin [T, d/2], fp32 or x's dtype."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))  # [T, H, d/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


_SIGNATURES: dict[tuple, int] = {}
"""Rotary settings -> a small id: instances with equal ids compute equal cos/sin."""


class RotaryEmbedding(nn.Module):
    """`interleaved=False` rotates the halves (x[i], x[i + d/2]) (Llama, Qwen);
    `interleaved=True` rotates adjacent pairs (DeepSeek-V2, V3), in fp32 unless
    `fp32_pairs=False` (V3)."""

    def __init__(self, cfg: RopeConfig, interleaved: bool = False, fp32_pairs: bool = True):
        super().__init__()
        dim = cfg.rotary_dim
        self.rotary_dim = dim
        self.interleaved = interleaved
        self.fp32_pairs = fp32_pairs
        inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.magnitude = 1.0
        kind = cfg.scaling["rope_type"] if cfg.scaling else None
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, cfg.scaling)
        elif kind == "linear":
            inv_freq = inv_freq / cfg.scaling["factor"]
        elif kind == "yarn":
            inv_freq, self.magnitude = _yarn_inv_freq(cfg.theta, dim, cfg.scaling, cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        key = (dim, interleaved, fp32_pairs, cfg.theta, repr(cfg.scaling), cfg.max_position_embeddings)
        self._signature = _SIGNATURES.setdefault(key, len(_SIGNATURES))

    _last: tuple | None = None
    """(positions, signature, dtype, result) of the last cos_sin, shared by every layer's
    instance: a step's layers all rotate the same positions (held, so `is` stays sound)."""

    def cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Halves layout: [T, dim] in `dtype`. Interleaved: [T, dim/2] fp32 (the
        rotation itself runs in fp32, as transformers' DeepSeek-V2 does), or in
        `dtype` without fp32_pairs (DeepSeek-V3). Computed once per positions tensor
        for all layers with the same rotary settings (eager: graph mode's inputs
        are persistent buffers, whose identity says nothing of their values)."""
        if torch.compiler.is_compiling():  # graph mode: no Python-side memo (the compiler shares the work)
            return self._cos_sin(positions, dtype)
        last = RotaryEmbedding._last
        if last is not None and last[0] is positions and last[1] == self._signature and last[2] == dtype:
            return last[3]
        result = self._cos_sin(positions, dtype)
        RotaryEmbedding._last = (positions, self._signature, dtype, result)
        return result

    def _cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dim/2]
        if self.interleaved:
            cos, sin = freqs.cos() * self.magnitude, freqs.sin() * self.magnitude
            return (cos, sin) if self.fp32_pairs else (cos.to(dtype), sin.to(dtype))
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.magnitude).to(dtype), (emb.sin() * self.magnitude).to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D]: rotate the first rotary_dim dims of each head."""
        d = self.rotary_dim
        rot, rest = x[..., :d], x[..., d:]
        if self.interleaved:
            out = _rotate_pairs(rot, cos, sin)
        else:
            out = rot * cos[:, None, :] + _rotate_half(rot) * sin[:, None, :]
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def forward(self, positions, q, k):
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
