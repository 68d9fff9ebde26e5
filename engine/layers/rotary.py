"""Rotary position embeddings with default, linear, llama3 and YaRN frequencies.

cos/sin are computed in fp32 from `inv_freq` and cast to the activations'
dtype before rotating, which is the order transformers uses.
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


def _yarn_inv_freq(base: float, dim: int, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies over a ramp of
    dimensions; returns (inv_freq, cos/sin magnitude)."""
    factor = s["factor"]
    orig = s.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    if "attention_factor" in s and s["attention_factor"] is not None:
        mag = float(s["attention_factor"])
    elif "mscale" in s and "mscale_all_dim" in s:
        mag = yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
    else:
        mag = yarn_mscale(factor)
    return inv_freq, mag


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: RopeConfig, interleaved: bool = False):
        super().__init__()
        dim = cfg.rotary_dim
        self.rotary_dim = dim
        self.interleaved = interleaved
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

    def cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.magnitude).to(dtype), (emb.sin() * self.magnitude).to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D]: rotate the first rotary_dim dims of each head."""
        d = self.rotary_dim
        rot, rest = x[..., :d], x[..., d:]
        if self.interleaved:
            # pairs (0,1), (2,3), ... -> halves, as DeepSeek's checkpoints expect
            t, h = rot.shape[0], rot.shape[1]
            rot = rot.view(t, h, d // 2, 2).transpose(-1, -2).reshape(t, h, d)
        out = rot * cos[:, None, :] + _rotate_half(rot) * sin[:, None, :]
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def forward(self, positions, q, k):
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
