from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 and cast back before the weight, as HF does."""

    def __init__(self, dim: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

        def load(param, lazy, shard_id=None):
            value = lazy.full()
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{lazy.name}: checkpoint shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
            param.data.copy_(value)

        self.weight.weight_loader = load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
