"""Training through INT8 layers: a straight-through estimator on the frozen grid of each `Int8Linear`.

Distillation after INT8 must not move a single scale: the checkpoint, the ONNX Q/DQ graphs and the
TensorRT engines all carry the quantize stage's scales. So each Int8Linear is swapped for an `Int8STE`
with a float master weight (its dequantized codes) that is re-rounded on the same scales in every
forward; the rounding passes gradients straight through inside the grid and blocks them where the
clamp bites. Activations go through the same fake-quant (static scale or dynamic rule) as in
`Int8Linear.forward`. Afterwards the master weight is rounded once more into the layer's int8 codes;
codes that were 0 stay 0, which keeps the zeros of earlier pruning (and nothing else changes shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.int8 import ACT_QMAX, ACT_QMIN, Int8Linear, dynamic_scale


def _ste_round(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(round(x)) forward; identity gradient inside [lo, hi], zero outside."""
    inside = ((x >= lo) & (x <= hi)).to(x.dtype)
    return x * inside + (x.round().clamp(lo, hi) - x * inside).detach()


class Int8STE(nn.Module):
    """An Int8Linear being trained: float master weight, frozen scales, same forward numbers."""

    def __init__(self, q: Int8Linear):
        super().__init__()
        self.q = q
        self.qmax = int(q.weight_int8.abs().max().clamp_min(1))  # 127, or 63 for reduce_range codes
        self.zero = q.weight_int8 == 0
        self.master = nn.Parameter(q.dequantized_weight().clone())
        self.bias = q.bias

    def codes(self) -> torch.Tensor:
        s = self.q.weight_scale[:, None]
        return _ste_round(self.master / s, -self.qmax, self.qmax).masked_fill(self.zero, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        q = self.q
        if q.input_scale is not None:
            h = _ste_round(h / q.input_scale, ACT_QMIN, ACT_QMAX) * q.input_scale
        elif q.act_dynamic is not None:
            scale = dynamic_scale(h.detach(), q.act_dynamic)
            h = _ste_round(h / scale, ACT_QMIN, ACT_QMAX) * scale
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(h, self.codes() * q.weight_scale[:, None], bias).to(x.dtype)

    @torch.no_grad()
    def finish(self) -> Int8Linear:
        """Round the master weight into the layer's codes (same scales) and hand the layer back."""
        self.q.weight_int8.copy_(self.codes().to(torch.int8))
        return self.q


def wrap(model: nn.Module) -> dict[str, Int8STE]:
    """Swap every Int8Linear for a trainable Int8STE (in place); returns them by module name."""
    wrapped = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, Int8Linear):
            wrapped[name] = Int8STE(m)
            model.set_submodule(name, wrapped[name])
    return wrapped


def unwrap(model: nn.Module, wrapped: dict[str, Int8STE]) -> dict[str, float]:
    """Put the Int8Linears back with their new codes; returns the share of codes that changed per layer."""
    changed = {}
    for name, m in wrapped.items():
        before = m.q.weight_int8.clone()
        model.set_submodule(name, m.finish())
        changed[name] = float((m.q.weight_int8 != before).float().mean())
    return changed
