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
    """Running H = 2/n * sum x^T x over every input row the layer sees, in float32 as the GPTQ and SparseGPT
    reference implementations keep it (a 7B down_proj's is 0.5 GB; float64 doubled that and the time).

    The sum is allocated at the first update (a layer that shares another's Hessian never allocates one);
    `value()` divides it in place. `users` counts the layers that read it: `take()` hands the last one the
    tensor itself (to damp and factor in place, freed as it goes) and the others a copy.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.h: torch.Tensor | None = None
        self.rows = 0
        self.users = 1
        self._divided = False

    def update(self, x: torch.Tensor) -> None:
        if self._divided:
            raise RuntimeError("Hessian.update after value(): the sum was divided")
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.h is None:
            self.h = torch.zeros(self.in_features, self.in_features)
        self.h.addmm_(x.T, x, alpha=2.0)
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.rows == 0:
            raise ConfigError("GPTQ: the layer saw no calibration inputs")
        if self.h is None:
            raise RuntimeError("Hessian.value after its last reader took it")
        if not self._divided:
            with torch.inference_mode(self.h.is_inference()):  # inference-mode sums are divided in inference mode
                self.h.div_(self.rows)
            self._divided = True
        return self.h

    def take(self) -> torch.Tensor:
        """H for one reader that may change it: a copy while other layers still need it, else the tensor."""
        h = self.value()
        self.users -= 1
        if self.users > 0:
            return h.clone()
        self.h = None
        return h


class SharedInputs:
    """Linears that read the same input tensor in the same call (q/k/v of an attention, gate/up of an MLP)
    accumulate the same Hessian, so they share one: found at the first batch by the input's storage, shape,
    strides and version, and checked on every batch after. The last input is held, so its storage cannot be
    freed and reused by another tensor that would then look the same."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.last: Hessian | None = None
        self.x: torch.Tensor | None = None

    def update(self, owner: dict[str, Any], x: torch.Tensor) -> None:
        """`owner` is the layer's record: {"hessian": Hessian, "shared": bool}; updates or binds it."""
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), None if x.is_inference() else x._version)
        h: Hessian = owner["hessian"]
        if owner["shared"] or (h.rows == 0 and key == self.key and self.last is not None):
            if key != self.key or (owner["shared"] and h is not self.last):
                raise RuntimeError("layers that shared an input at the first batch read different inputs later")
            if not owner["shared"]:
                self.last.users += 1
            owner["hessian"], owner["shared"] = self.last, True
            return
        h.update(x)
        self.key, self.last, self.x = key, h, x


class ColumnNorm:
    """Running sum over tokens of x_j^2 per input column (Wanda's ||X_j||_2^2)."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sq += (x**2).sum(0)
        self.rows += x.shape[0]
