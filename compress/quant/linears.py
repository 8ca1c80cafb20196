"""Swap float Linears for `Int8Linear`s / `Int4Linear`s: one calibration pass (static scales, GPTQ
Hessians, input samples), weight rounding, per-layer sensitivity and `keep_float`, and the manifest's
per-module details.

Kept apart from `int8.py` (the module and its grid) so that file stays the one place the numbers of an
INT8 layer are defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError
from compress.observe import Hessian, SharedInputs, observe_inputs
from compress.quant.gptq import gptq_quantize
from compress.quant.int4 import Int4Linear, Int4Quant, int4_params, quantize_int4
from compress.quant.int8 import ActQuant, Int8Linear, WeightQuant, quantize_weight
from compress.quant.observers import make_observer
from compress.quant.sensitivity import KeepFloat, RowSampler, layer_error
from compress.quant.smoothquant import selected_linears

SENSITIVITY_SAMPLES = 256  # input rows per layer kept for the sensitivity ranking


def int8_weight_bytes(m: Int8Linear) -> int:
    """Bytes a deployment stores for an INT8 layer: its codes and float32 scales."""
    return m.weight_int8.numel() * m.weight_int8.element_size() + m.weight_scale.numel() * 4


class _LayerStats:
    """What one pass over the calibration data records for a layer: observer, Hessian, input samples."""

    def __init__(self, m: nn.Linear, act: ActQuant | None, weight: WeightQuant, samples: int, seed: int,
                 shared: SharedInputs):
        self.observer = make_observer(act.observer, **act.params) if act and act.dynamic is None else None
        self.gptq = {"hessian": Hessian(m.in_features), "shared": False} if weight.rounding == "gptq" else None
        self.samples = RowSampler(samples, seed)
        self.shared = shared

    @property
    def hessian(self) -> Hessian | None:
        return self.gptq["hessian"] if self.gptq else None

    def release(self) -> None:
        """Drop this layer's hold on its Hessian (shared ones live until their last layer is rounded)."""
        self.gptq = None

    def update(self, x: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.update(x)
        if self.gptq is not None:
            self.shared.update(self.gptq, x)
        self.samples.update(x)


def calibrate(
    model: nn.Module,
    modules: dict[str, nn.Module],
    act: ActQuant | None,
    forward_loop: Callable[[nn.Module], None] | None,
    weight: WeightQuant | None = None,
    samples: int = 0,
    seed: int = 0,
) -> dict[str, _LayerStats]:
    """Observe each module's input over one run of `forward_loop`; change nothing."""
    if forward_loop is None:
        raise ConfigError("INT8 calibration (static activations, GPTQ or sensitivity) needs calibration data "
                          "(a forward_loop), but none was given")
    weight = weight or WeightQuant()
    shared = SharedInputs()
    stats = {name: _LayerStats(m, act, weight, samples, seed, shared) for name, m in modules.items()}
    observe_inputs(model, modules, forward_loop, lambda name, x: stats[name].update(x))
    shared.x = None  # the last input it held (a 7B down_proj's: ~0.2 GB for 8 samples)
    return stats


def _needs_pass(act: ActQuant | None, weight: WeightQuant, keep_float: KeepFloat | None) -> bool:
    return (act is not None and act.dynamic is None) or weight.rounding == "gptq" or keep_float is not None


def quantize_linears(
    model: nn.Module,
    modules: dict[str, nn.Module] | list[str],
    weight: WeightQuant | None = None,
    act: ActQuant | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
    keep_float: KeepFloat | None = None,
    seed: int = 0,
    kept: set[str] | None = None,
    swap: bool = True,
) -> dict[str, dict[str, Any]]:
    """Replace the named Linears by Int8Linear in place; returns per-module details for the manifest.

    `act=None` is weight-only (W8A16); dynamic activations need no calibration. Static scales, GPTQ
    Hessians and the input samples sensitivity is measured on come from one run of `forward_loop`,
    through forward pre-hooks that are removed afterwards; only if every module saw data are modules
    swapped (a failed calibration leaves the model untouched). `keep_float` leaves the layers whose
    INT8 error is worst in float, within its parameter budget, unless `kept` names them already (chosen
    over the whole model when the stage runs block by block). `swap=False` changes nothing and only
    reports (the sensitivity sweep). Modules are looked up by name in `model`, so a dict from before
    `smooth()` still works.
    """
    weight = weight or WeightQuant()
    mods = selected_linears(model, modules, "INT8 quantization")
    # Sensitivity is measured whenever calibration runs anyway (it only needs sampled input rows).
    samples = keep_float.samples if keep_float is not None else SENSITIVITY_SAMPLES
    stats = (calibrate(model, mods, act, forward_loop, weight, samples, seed)
             if _needs_pass(act, weight, keep_float) else {})

    new: dict[str, Int8Linear] = {}
    for name, m in mods.items():
        st = stats.get(name)
        obs = st.observer if st else None
        q, scale = quantize_weight(m.weight, weight.granularity, weight.qmax)
        if st is not None and st.hessian is not None:
            q = gptq_quantize(m.weight, st.hessian, scale, weight.qmax, weight.block_size, weight.damp)
            st.release()
        new[name] = Int8Linear.from_linear(m, weight.granularity, obs.scale() if obs else None,
                                           act.dynamic if act else None, quantized=(q, scale))
    sensitivity = {name: layer_error(mods[name], new[name], st.samples.rows()) for name, st in stats.items()}
    if kept is None:
        kept = keep_float.choose(sensitivity, {n: m.weight.numel() for n, m in mods.items()}) if keep_float else set()
    details: dict[str, dict[str, Any]] = {}
    for name, q in new.items():
        w = mods[name].weight.detach().float()
        err = float((q.dequantized_weight() - w).norm() / w.norm().clamp_min(1e-30))
        obs = stats[name].observer if name in stats else None
        details[name] = {
            "scheme": "float (kept)" if name in kept else q.scheme,
            "bits": 32 if name in kept else (7 if weight.reduce_range else 8),
            "granularity": weight.granularity,
            "activations": q.activations,
            "rounding": weight.rounding,
            "observer": obs.kind if obs else None,
            "observer_params": dict(act.params) if act and act.dynamic is None else None,
            "input_scale": float(q.input_scale) if q.input_scale is not None else None,
            "input_amax": obs.amax if obs else None,
            "weight_rel_error": round(err, 6),
            "output_rel_error": round(sensitivity[name], 6) if name in sensitivity else None,
            "kept_float": name in kept,
            "shape": [q.out_features, q.in_features],
            "quantized_bytes": q.weight_int8.numel() * 4 if name in kept else int8_weight_bytes(q),
            "fp32_bytes": q.weight_int8.numel() * 4,
        }
        if name not in kept and swap:
            model.set_submodule(name, q)
    return details


def check_int4_shapes(model: nn.Module, modules: dict[str, nn.Module] | list[str],
                      quant: Int4Quant) -> dict[str, nn.Linear]:
    """The named Linears, if the group size divides every one's in_features (else a ConfigError)."""
    mods = selected_linears(model, modules, "INT4 quantization")
    bad = [f"{n} ({m.in_features})" for n, m in mods.items() if m.in_features % quant.group_size]
    if bad:
        raise ConfigError(f"int4 group_size {quant.group_size} must divide in_features; not: {', '.join(bad[:5])}"
                          f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}; pick a smaller group_size or "
                          "exclude them from targets")
    return mods


def quantize_int4_linears(
    model: nn.Module,
    modules: dict[str, nn.Module] | list[str],
    quant: Int4Quant,
    forward_loop: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Replace the named Linears by Int4Linear in place (weight-only); returns per-module details.

    GPTQ collects each layer's Hessian in one calibration pass and rounds onto the round-to-nearest grid of
    the original weight (and records each layer's output error on sampled inputs); `rtn` and `awq` round to
    nearest here (AWQ's scales are folded into the weights by `smooth(..., int4=...)` before).
    """
    mods = check_int4_shapes(model, modules, quant)
    gptq = quant.rounding == "gptq"
    if gptq and forward_loop is None:
        raise ConfigError("int4 rounding: gptq needs a 'calibration' data section")
    # Only GPTQ needs a calibration pass here (AWQ ran its own before); its input samples also give each
    # layer's output error, as INT8 measures sensitivity only when calibration runs anyway.
    stats = calibrate(model, mods, None, forward_loop, WeightQuant(rounding="gptq"), SENSITIVITY_SAMPLES,
                      seed) if gptq else {}
    details: dict[str, dict[str, Any]] = {}
    for name, m in mods.items():
        scale, zero = int4_params(m.weight, quant.group_size, quant.symmetric)
        st = stats.get(name)
        if gptq:
            q = gptq_quantize(m.weight, st.hessian, scale, 7, quant.block_size, quant.damp, qmin=-8,
                              zero=zero, group_size=quant.group_size)
            st.release()
        else:
            q = quantize_int4(m.weight, scale, zero, quant.group_size)
        new = Int4Linear.from_linear(m, quant.group_size, quant.symmetric, quantized=(q, scale, zero))
        w = m.weight.detach().float()
        err = float((new.dequantized_weight() - w).norm() / w.norm().clamp_min(1e-30))
        details[name] = {
            "scheme": "w4a16", "bits": 4, "granularity": f"group {quant.group_size}",
            "symmetric": quant.symmetric, "activations": "none", "rounding": quant.rounding,
            "weight_rel_error": round(err, 6),
            "output_rel_error": round(layer_error(m, new, st.samples.rows()), 6) if st else None,
            "shape": [new.out_features, new.in_features],
            "quantized_bytes": new.packed_bytes(), "fp32_bytes": w.numel() * 4,
        }
        model.set_submodule(name, new)
    return details


def size_summary(details: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over per-module details (INT8 or NF4): quantized vs fp32 weight bytes and their ratio."""
    q = sum(d["quantized_bytes"] for d in details.values())
    f = sum(d["fp32_bytes"] for d in details.values())
    return {"modules": len(details), "quantized_bytes": q, "fp32_bytes": f, "ratio": round(q / f, 6) if f else None}
