"""INT8 Linear layers (W8A8 with static activation scales, or weight-only W8A16) and their calibration.

`Int8Linear` is fake-quant on the exact integer grid: it stores the weight as a real int8 tensor plus
float32 scales, and its forward computes what an integer deployment computes,

    x' = x * smooth_scale                                 (if SmoothQuant was applied)
    s  = input_scale (static) | max|x'| / 127 per token or per call (dynamic)
    x_q = clamp(round(x' / s), -128, 127)                 (if activations are quantized)
    y  = (x_q * s) @ (weight_int8 * weight_scale[:, None])^T + bias

in float32. Rounding is half-to-even and activation saturation is [-128, 127], the semantics of ONNX
QuantizeLinear, so a QDQ export with these exact scales reproduces it; weights use the symmetric
range [-127, 127]. An int8 GEMM (e.g. `torch._int_mm`) would accumulate the same integer products
exactly, but only differs from this in float rounding of the final rescale; it is not used because on
CPU it only helps with AVX-512 VNNI and has shape restrictions, and correctness comes first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError
from compress.quant.observers import QMAX, make_observer
from compress.quant.smoothquant import (
    Fp32BuffersMixin,
    SmoothedLinear,
    resolve,
)

Granularity = Literal["per_channel", "per_tensor"]
Dynamic = Literal["per_token", "per_tensor"]
ACT_QMIN, ACT_QMAX = -128, 127
S7_QMAX = 64
DYNAMIC_EPS = 1e-8  # floor of a dynamic max|x|: keeps the scale finite on all-zero (padding) rows


@dataclass(frozen=True)
class WeightQuant:
    """How weights are quantized: symmetric int8, one scale per output channel or one per tensor.

    `reduce_range` uses [-64, 64] (7 bits): ONNX Runtime's remedy for CPUs whose U8S8 kernels saturate
    (compress.export.portable), exact with the fast kernels on every CPU, at one bit of weight precision.
    """

    granularity: Granularity = "per_channel"
    reduce_range: bool = False
    rounding: Literal["rtn", "gptq"] = "rtn"
    block_size: int = 128
    damp: float = 0.01

    @property
    def qmax(self) -> int:
        return S7_QMAX if self.reduce_range else QMAX

    def __post_init__(self) -> None:
        if self.granularity not in ("per_channel", "per_tensor"):
            raise ConfigError(f"weight granularity must be per_channel or per_tensor, got {self.granularity!r}")


@dataclass(frozen=True)
class ActQuant:
    """How activations are quantized: symmetric int8, static per tensor (scale chosen by an observer over
    the calibration data) or dynamic (max |x| of each token, or of each call, at run time).

    `params` go to the observer: percentile (percentile), bins (histogram observers), stride (entropy/mse).
    """

    observer: str = "minmax"
    params: dict[str, Any] = field(default_factory=dict)
    dynamic: Dynamic | None = None

    def __post_init__(self) -> None:
        if self.dynamic is None:
            make_observer(self.observer, **self.params)  # validates kind and params now, not after calibration
        elif self.dynamic not in ("per_token", "per_tensor"):
            raise ConfigError(f"dynamic activations are per_token or per_tensor, got {self.dynamic!r}")

    def fake_quant(self, x: torch.Tensor, static_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """x on this scheme's grid; static needs the calibrated scale."""
        if self.dynamic is not None:
            return fake_quant(x, dynamic_scale(x, self.dynamic))
        return fake_quant(x, torch.as_tensor(static_scale))


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


def dynamic_scale(x: torch.Tensor, mode: Dynamic) -> torch.Tensor:
    """max|x| / 127 per token (last axis reduced) or over the whole call; never 0 (an all-zero row is exact)."""
    amax = x.abs().amax(dim=-1, keepdim=True) if mode == "per_token" else x.abs().max()
    return torch.clamp(amax, min=DYNAMIC_EPS) / QMAX


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
        act_dynamic: Dynamic | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.granularity = granularity
        self.act_dynamic = act_dynamic  # dynamic scales need no input_scale buffer
        act_quant = act_quant and act_dynamic is None
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
        return "w8a8" if self.input_scale is not None or self.act_dynamic else "w8a16"

    @property
    def activations(self) -> str:
        """static | dynamic_per_token | dynamic_per_tensor | none."""
        if self.act_dynamic:
            return f"dynamic_{self.act_dynamic}"
        return "static" if self.input_scale is not None else "none"

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
        elif self.act_dynamic is not None:
            h = fake_quant(h, dynamic_scale(h, self.act_dynamic))
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(h, self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scheme={self.scheme}, activations={self.activations}, granularity={self.granularity}, "
            f"smooth={self.smooth_scale is not None}"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        granularity: Granularity = "per_channel",
        input_scale: float | None = None,
        act_dynamic: Dynamic | None = None,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Int8Linear:
        """Quantize a float Linear (a `SmoothedLinear` keeps its smooth_scale). Neither `input_scale` nor
        `act_dynamic`: weight-only. `quantized`: (int8 weight, scales) computed elsewhere (e.g. GPTQ)."""
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
            act_dynamic=act_dynamic,
        )
        q, scale = quantized if quantized is not None else quantize_weight(w, granularity)
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(scale)
        if input_scale is not None and act_dynamic is None:
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
            "act_dynamic": self.act_dynamic,
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
            act_dynamic=spec.get("act_dynamic"),
        )


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
