"""Calibration statistics that pruning and quantization both collect: hooks on chosen modules over one
calibration pass, the running Hessian 2/n * sum x^T x (GPTQ rounding, SparseGPT pruning) and per-column
squared norms (Wanda).

Neutral ground between `compress.prune` and `compress.quant`, so neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError


def input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input tensor of a Linear call, positional or `input=` keyword."""
    return args[0] if args else kwargs["input"]


def observe_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    forward_loop: Callable[[nn.Module], None],
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Run `forward_loop` once, calling `observe(name, x)` on each module's input; every module must see
    data, or nothing downstream may change."""
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            observe(name, input_of(args, kwargs).detach())
            seen.add(name)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ConfigError(
            f"calibration observed no activations for {len(missing)} of {len(modules)} modules: {shown}; "
            "the calibration set is empty or these modules are not used by the model's forward pass"
        )


class Hessian:
    """Running H = 2/n * sum x^T x over every input row the layer sees (float64 for the sum)."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.h += 2.0 * x.T @ x
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.rows == 0:
            raise ConfigError("GPTQ: the layer saw no calibration inputs")
        return (self.h / self.rows).float()


class ColumnNorm:
    """Running sum over tokens of x_j^2 per input column (Wanda's ||X_j||_2^2)."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sq += (x**2).sum(0)
        self.rows += x.shape[0]
