"""INT4 weight-only Linear layers: one scale (and optionally one zero point) per block of input columns.

The grid is compressed-tensors' own for `num_bits: 4, strategy: group`, so transformers, vLLM and our
exports compute the same weight from a checkpoint:

    symmetric:  s = max|w_g| / 7.5,              q = clamp(round(w / s), -8, 7),        w' = q * s
    with zero:  s = (max(w_g, 0) - min(w_g, 0)) / 15, z = clamp(round(-8 - min / s), -8, 7),
                q = clamp(round(w / s + z), -8, 7),                                     w' = (q - z) * s

for every group g of `group_size` consecutive input columns of one output row. Rounding is half to
even (torch.round). Activations stay float: the forward is x @ w'^T + b in float32, which ONNX
Runtime's MatMulNBits (accuracy_level 0/1) and TensorRT's INT4 weight-only GEMM reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError
from compress.quant.int8 import Fp32BuffersMixin

QMIN, QMAX = -8, 7
GROUP_SIZES = (32, 64, 128)
Rounding = Literal["rtn", "gptq", "awq"]


@dataclass(frozen=True)
class Int4Quant:
    """How weights are quantized to INT4: block size, zero points, and the rounding method."""

    group_size: int = 128
    symmetric: bool = True
    rounding: Rounding = "rtn"
    block_size: int = 128  # GPTQ lazy-update block
    damp: float = 0.01  # GPTQ dampening

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"int4 group_size must be one of {GROUP_SIZES}, got {self.group_size}")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, cols = w.shape
    if cols % group_size:
        raise ConfigError(f"int4 needs in_features divisible by group_size {group_size}, got {cols}")
    return w.reshape(out, cols // group_size, group_size)


def int4_params(weight: torch.Tensor, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [out, groups] float32, zero point [out, groups] int8 or None) of round-to-nearest."""
    g = _groups(weight.detach().float(), group_size)
    lo, hi = g.amin(dim=-1).clamp(max=0.0), g.amax(dim=-1).clamp(min=0.0)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((QMAX - QMIN) / 2)
        return torch.where(scale == 0, eps, scale), None
    scale = (hi - lo) / (QMAX - QMIN)
    scale = torch.where(scale == 0, eps, scale)
    zero = torch.round(QMIN - lo / scale).clamp(QMIN, QMAX).to(torch.int8)
    return scale, zero


def expand(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, groups] -> [out, groups * group_size]: each group's value over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)


def quantize_int4(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  group_size: int) -> torch.Tensor:
    """int8 codes in [-8, 7] of `weight` on the grid (scale, zero)."""
    x = weight.detach().float() / expand(scale, group_size)
    if zero is not None:
        x = x + expand(zero.float(), group_size)
    return torch.round(x).clamp(QMIN, QMAX).to(torch.int8)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """(q - z) * s in float32, in compressed-tensors' order of operations."""
    x = q.float()
    if zero is not None:
        x = x - expand(zero.float(), group_size)
    return x * expand(scale.float(), group_size)


class Int4Linear(Fp32BuffersMixin, nn.Module):
    """Drop-in replacement for nn.Linear holding INT4 weights (weight-only); see the module docstring.

    Buffers: `weight_int4` (int8 storage of the codes, out x in), `weight_scale` (float32, [out, groups]),
    `weight_zero_point` (int8 [out, groups], or None when symmetric) and a frozen `bias`.
    """

    fp32_buffers = ("weight_scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = True, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % group_size:
            raise ConfigError(f"int4 needs in_features divisible by group_size {group_size}, got {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero_point", None if symmetric else
                             torch.zeros(out_features, groups, dtype=torch.int8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    scheme = "w4a16"
    activations = "none"

    @property
    def symmetric(self) -> bool:
        return self.weight_zero_point is None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads `.weight` (dtype/device checks). Not stored."""
        return self.dequantized_weight().to(self.bias.dtype if self.bias is not None else torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(self.weight_int4, self.weight_scale, self.weight_zero_point, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme=w4a16, group_size={self.group_size}, symmetric={self.symmetric}")

    def packed_bytes(self) -> int:
        """Bytes a deployment stores: two codes per byte, float32 scales, packed zero points."""
        groups = self.weight_scale.numel()
        return self.weight_int4.numel() // 2 + groups * 4 + (0 if self.symmetric else (groups + 1) // 2)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True,
                    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None) -> Int4Linear:
        """Quantize a float Linear (round to nearest), or take (codes, scale, zero) computed elsewhere (GPTQ)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group_size,
                  symmetric=symmetric, device=w.device, dtype=w.dtype)
        if quantized is None:
            scale, zero = int4_params(w, group_size, symmetric)
            quantized = (quantize_int4(w, scale, zero, group_size), scale, zero)
        q, scale, zero = quantized
        new.weight_int4.copy_(q)
        new.weight_scale.copy_(scale)
        if zero is not None:
            new.weight_zero_point.copy_(zero)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new.train(linear.training)


def int4_modules(model: nn.Module) -> dict[str, Int4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
