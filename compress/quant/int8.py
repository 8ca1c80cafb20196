"""INT8 Linear layers (W8A8 with static activation scales, or weight-only W8A16) and their calibration.

`Int8Linear` is fake-quant on the exact integer grid: it stores the weight as a real int8 tensor plus
float32 scales, and its forward computes what an integer deployment computes,

    x' = x * smooth_scale                                 (if SmoothQuant was applied)
    x_q = clamp(round(x' / input_scale), -128, 127)       (if activations are quantized)
    y  = (x_q * input_scale) @ (weight_int8 * weight_scale[:, None])^T + bias

in float32. Rounding is half-to-even and activation saturation is [-128, 127], the semantics of ONNX
QuantizeLinear, so a QDQ export with these exact scales reproduces it; weights use the symmetric
range [-127, 127]. An int8 GEMM (e.g. `torch._int_mm`) would accumulate the same integer products
exactly, but only differs from this in float rounding of the final rescale; it is not used because on
CPU it only helps with AVX-512 VNNI and has shape restrictions, and correctness comes first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError
from compress.quant.observers import QMAX, Observer, make_observer
from compress.quant.smoothquant import (
    Fp32BuffersMixin,
    SmoothedLinear,
    check_unshared,
    observe_inputs,
    resolve,
)

Granularity = Literal["per_channel", "per_tensor"]
ACT_QMIN, ACT_QMAX = -128, 127
S7_QMAX = 64


@dataclass(frozen=True)
class WeightQuant:
    """How weights are quantized: symmetric int8, one scale per output channel or one per tensor.

    `reduce_range` uses [-64, 64] (7 bits): ONNX Runtime's remedy for CPUs whose U8S8 kernels saturate
    (compress.export.portable), exact with the fast kernels on every CPU, at one bit of weight precision.
    """

    granularity: Granularity = "per_channel"
    reduce_range: bool = False

    @property
    def qmax(self) -> int:
        return S7_QMAX if self.reduce_range else QMAX

    def __post_init__(self) -> None:
        if self.granularity not in ("per_channel", "per_tensor"):
            raise ConfigError(f"weight granularity must be per_channel or per_tensor, got {self.granularity!r}")


@dataclass(frozen=True)
class ActQuant:
    """How activations are quantized: static per-tensor symmetric int8, scale chosen by an observer.

    `params` go to the observer: percentile (percentile), bins (histogram observers), stride (entropy/mse).
    """

    observer: str = "minmax"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        make_observer(self.observer, **self.params)  # validates kind and params now, not after calibration


def quantize_weight(weight: torch.Tensor, granularity: Granularity,
                    qmax: int = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight in [-qmax, qmax] and float32 scales: per channel shape (out,), per tensor (1,)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if granularity == "per_channel" else w.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # an all-zero row is exact anyway
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize x (float32) on the int8 grid of `scale`: what QuantizeLinear+DequantizeLinear do."""
    return torch.round(x / scale).clamp(ACT_QMIN, ACT_QMAX) * scale


class Int8Linear(Fp32BuffersMixin, nn.Module):
    """Drop-in replacement for nn.Linear holding int8 weights; see the module docstring for the math.

    Buffers (all that an export needs): `weight_int8` (int8, out x in), `weight_scale` (float32, (out,)
    or (1,)), `input_scale` (float32 scalar, or None for weight-only), `smooth_scale` (float32 (in,), or
    None), and `bias` (a frozen parameter in the model's float dtype, or None). Scales stay float32 when
    the model is cast to another dtype.
    """

    fp32_buffers = ("weight_scale", "input_scale", "smooth_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        granularity: Granularity = "per_channel",
        act_quant: bool = True,
        smooth: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.granularity = granularity
        n_scales = out_features if granularity == "per_channel" else 1
        f32 = {"dtype": torch.float32, "device": device}
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(n_scales, **f32))
        self.register_buffer("input_scale", torch.ones((), **f32) if act_quant else None)
        self.register_buffer("smooth_scale", torch.ones(in_features, **f32) if smooth else None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def scheme(self) -> str:
        return "w8a8" if self.input_scale is not None else "w8a16"

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads `.weight` (dtype/device checks). Not stored."""
        return self.dequantized_weight().to(self.bias.dtype if self.bias is not None else torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        """Exactly weight_int8 * weight_scale, float32."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.smooth_scale is not None:
            h = h * self.smooth_scale
        if self.input_scale is not None:
            h = fake_quant(h, self.input_scale)
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(h, self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scheme={self.scheme}, granularity={self.granularity}, smooth={self.smooth_scale is not None}"
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, granularity: Granularity = "per_channel", input_scale: float | None = None
    ) -> Int8Linear:
        """Quantize a float Linear (a `SmoothedLinear` keeps its smooth_scale). `input_scale=None`: weight-only."""
        smooth = getattr(linear, "smooth_scale", None)
        w = linear.weight
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            granularity=granularity,
            act_quant=input_scale is not None,
            smooth=smooth is not None,
            device=w.device,
            dtype=w.dtype,
        )
        q, scale = quantize_weight(w, granularity)
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(scale)
        if input_scale is not None:
            new.input_scale.fill_(input_scale)
        if smooth is not None:
            new.smooth_scale.copy_(smooth)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new.train(linear.training)

    def spec(self) -> dict[str, Any]:
        """JSON description: enough to build an empty module with the same state_dict keys and shapes."""
        return {
            "kind": "int8_linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "granularity": self.granularity,
            "act_quant": self.input_scale is not None,
            "smooth": self.smooth_scale is not None,
            "dtype": str(self.bias.dtype if self.bias is not None else torch.float32).removeprefix("torch."),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> Int8Linear:
        """An empty (placeholder-valued) module to be filled by `load_state_dict`."""
        if spec.get("kind") != "int8_linear":
            raise ConfigError(f"not an int8_linear spec: {spec}")
        return cls(
            spec["in_features"],
            spec["out_features"],
            bias=spec["bias"],
            granularity=spec["granularity"],
            act_quant=spec["act_quant"],
            smooth=spec["smooth"],
            device=device,
            dtype=getattr(torch, spec.get("dtype", "float32")),
        )


def _weight_bytes(m: Int8Linear) -> int:
    return m.weight_int8.numel() * m.weight_int8.element_size() + m.weight_scale.numel() * 4


def calibrate(
    model: nn.Module,
    modules: dict[str, nn.Module],
    act: ActQuant,
    forward_loop: Callable[[nn.Module], None] | None,
) -> dict[str, Observer]:
    """Observe each module's input (after its smooth_scale) over one run of `forward_loop`; change nothing."""
    if forward_loop is None:
        raise ConfigError("activation quantization needs calibration data (a forward_loop), but none was given")
    observers = {name: make_observer(act.observer, **act.params) for name in modules}
    observe_inputs(model, modules, forward_loop, lambda name, x: observers[name].update(x))
    return observers


def quantize_linears(
    model: nn.Module,
    modules: dict[str, nn.Module] | list[str],
    weight: WeightQuant | None = None,
    act: ActQuant | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Replace the named Linears by Int8Linear in place; returns per-module details for the manifest.

    `act=None` is weight-only (W8A16, no calibration). Otherwise observers are attached as forward
    pre-hooks, `forward_loop(model)` runs once, hooks are removed, and only if every module saw data
    are the modules swapped (so a failed calibration leaves the model untouched). Modules are looked
    up by name in `model`, so a dict from before `smooth()` still works.
    """
    weight = weight or WeightQuant()
    mods = resolve(model, modules)
    if not mods:
        raise ConfigError("INT8 quantization: no modules selected")
    for name, m in mods.items():
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"INT8 quantization applies to float nn.Linear modules; '{name}' is {type(m).__name__}")
    check_unshared(model, mods)
    observers = calibrate(model, mods, act, forward_loop) if act is not None else {}

    new: dict[str, Int8Linear] = {}
    for name, m in mods.items():
        obs = observers.get(name)
        new[name] = Int8Linear.from_linear(m, weight.granularity, obs.scale() if obs else None)
    details: dict[str, dict[str, Any]] = {}
    for name, q in new.items():
        w = mods[name].weight.detach().float()
        err = float((q.dequantized_weight() - w).norm() / w.norm().clamp_min(1e-30))
        obs = observers.get(name)
        details[name] = {
            "scheme": q.scheme,
            "bits": 8,
            "granularity": weight.granularity,
            "observer": obs.kind if obs else None,
            "observer_params": dict(act.params) if act else None,
            "input_scale": float(q.input_scale) if q.input_scale is not None else None,
            "input_amax": obs.amax if obs else None,
            "smoothquant": q.smooth_scale is not None,
            "weight_rel_error": round(err, 6),
            "shape": [q.out_features, q.in_features],
            "quantized_bytes": _weight_bytes(q),
            "fp32_bytes": q.weight_int8.numel() * 4,
        }
        model.set_submodule(name, q)
    return details


def size_summary(details: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over per-module details (INT8 or NF4): quantized vs fp32 weight bytes and their ratio."""
    q = sum(d["quantized_bytes"] for d in details.values())
    f = sum(d["fp32_bytes"] for d in details.values())
    return {"modules": len(details), "quantized_bytes": q, "fp32_bytes": f, "ratio": round(q / f, 6) if f else None}


def quantized_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Spec of every Int8Linear / SmoothedLinear in the model, by module name (JSON-serialisable)."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, Int8Linear | SmoothedLinear)}


def int8_spec(module: nn.Module) -> dict[str, Any]:
    if not isinstance(module, Int8Linear | SmoothedLinear):
        raise TypeError(f"no quantization spec for {type(module).__name__}")
    return module.spec()


def replace_with_int8_from_specs(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    """Put empty Int8Linear / SmoothedLinear modules where `specs` say, on a freshly built float model.

    Each target must currently be an nn.Linear of the same shape (checked for all before any change).
    Afterwards `model.load_state_dict(saved_state)` restores the exact quantized model.
    """
    builders = {"int8_linear": Int8Linear.from_spec, "smoothed_linear": SmoothedLinear.from_spec}
    current = resolve(model, list(specs))
    for name, spec in specs.items():
        m = current[name]
        if spec.get("kind") not in builders:
            raise ConfigError(f"'{name}': unknown quantized module kind {spec.get('kind')!r}")
        if not isinstance(m, nn.Linear) or (m.in_features, m.out_features) != (
            spec["in_features"],
            spec["out_features"],
        ):
            raise ConfigError(f"'{name}': expected an nn.Linear {spec['in_features']}->{spec['out_features']}, "
                              f"found {m}")
        if (m.bias is not None) != spec["bias"]:
            raise ConfigError(f"'{name}': bias presence differs from the spec")
    for name, spec in specs.items():
        device = current[name].weight.device
        model.set_submodule(name, builders[spec["kind"]](spec, device=device).train(current[name].training))
