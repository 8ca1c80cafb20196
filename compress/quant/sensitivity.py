"""Which layers INT8 hurts most, measured on their own calibration inputs, and which to keep in float.

A layer's sensitivity is the relative error its INT8 version adds to its own output,
||int8(x) - float(x)||^2 / ||float(x)||^2, over input rows sampled from the calibration pass (the
rows each layer really sees, after any SmoothQuant scale). It is local (one layer, no propagation),
so ranking N layers costs N small matmuls, not N model evaluations; the gate still scores the
whole model afterwards. `keep_float: {budget: 0.05}` keeps the worst layers in float while their
parameters stay within 5% of the selected layers' parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class RowSampler:
    """Keeps up to `limit` input rows of a layer, a deterministic random subset of each batch."""

    def __init__(self, limit: int, seed: int = 0, per_batch: int = 128):
        self.limit, self.per_batch = limit, per_batch
        self.gen = torch.Generator().manual_seed(seed)
        self.kept: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if self.count >= self.limit:
            return
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        take = min(self.per_batch, self.limit - self.count, rows.shape[0])
        idx = torch.randperm(rows.shape[0], generator=self.gen)[:take]
        self.kept.append(rows[idx].clone())
        self.count += take

    def rows(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0)


@torch.no_grad()
def layer_error(original: nn.Module, quantized: nn.Module, rows: torch.Tensor) -> float:
    """Relative squared output error of `quantized` against `original` on the sampled input rows."""
    if rows.numel() == 0:
        return 0.0
    x = rows
    ref = original(x.to(original.weight.dtype)).float()
    got = quantized(x.to(original.weight.dtype)).float()
    return float(((got - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))


@dataclass(frozen=True)
class KeepFloat:
    """Keep the most INT8-sensitive layers in float, up to `budget` of the selected layers' parameters."""

    budget: float = 0.05
    samples: int = 512

    def choose(self, sensitivity: dict[str, float], params: dict[str, int]) -> set[str]:
        allowed = self.budget * sum(params.values())
        kept: set[str] = set()
        used = 0
        for name in sorted(sensitivity, key=lambda n: -sensitivity[n]):
            if used + params[name] <= allowed:
                kept.add(name)
                used += params[name]
        return kept
