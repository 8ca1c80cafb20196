"""INT8 Linear layers (W8A8 with static activation scales, or weight-only W8A16) and their calibration.

`Int8Linear` is fake-quant on the exact integer grid: it stores the weight as a real int8 tensor plus
float32 scales, and its forward computes what an integer deployment computes,

    s  = input_scale (static) | max|x| / 127.5 per token or per call (dynamic)
    x_q = clamp(round(x / s), -128, 127)                  (if activations are quantized)
    y  = (x_q * s) @ (weight_int8 * weight_scale[:, None])^T + bias

in float32. Rounding is half-to-even and activation saturation is [-128, 127], the semantics of ONNX
QuantizeLinear, so a QDQ export with these exact scales reproduces it; weights use the symmetric
range [-127, 127]. The dynamic divisor 127.5 (not 127) and the eps for all-zero rows are
compressed-tensors' convention, so transformers computes exactly this from our checkpoints.
SmoothQuant leaves no trace here: it is folded into the float weights before quantization. An int8
GEMM (e.g. `torch._int_mm`) would accumulate the same integer products exactly, but only differs
from this in float rounding of the final rescale; it is not used because on CPU it only helps with
AVX-512 VNNI and has shape restrictions, and correctness comes first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError
from compress.quant.observers import QMAX, make_observer

Granularity = Literal["per_channel", "per_tensor"]
Dynamic = Literal["per_token", "per_tensor"]
ACT_QMIN, ACT_QMAX = -128, 127
S7_QMAX = 64
DYNAMIC_DIVISOR = 127.5  # compressed-tensors: symmetric scale = max|x| / ((qmax - qmin) / 2)


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
    """max|x| / 127.5 per token or over the whole call; a 0 scale (an all-zero row, exact anyway) becomes
    the dtype's eps. Exactly compressed-tensors' rule, rank quirk included: "per token" keeps the first
    two axes ([batch, seq, hidden] -> one scale per token), so a 2-D input ([tokens, hidden], e.g.
    Qwen2-VL's vision blocks) gets one scale for the call, as transformers computes on our checkpoints."""
    if mode == "per_token" and x.ndim > 2:
        amax = x.abs().amax(dim=tuple(range(2, x.ndim)), keepdim=True)
    else:
        amax = x.abs().max()
    scale = amax / DYNAMIC_DIVISOR
    return torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)


class Fp32BuffersMixin:
    """Keep the named buffers in float32 through `model.to(dtype)` / `.half()` (devices still move).

    Quantization scales are part of the integer grid; rounding them to bf16 would change the model.
    """

    fp32_buffers: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        before = {n: b for n in self.fp32_buffers if (b := self._buffers.get(n)) is not None}
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return out


class Int8Linear(Fp32BuffersMixin, nn.Module):
    """Drop-in replacement for nn.Linear holding int8 weights; see the module docstring for the math.

    Buffers (all that an export needs): `weight_int8` (int8, out x in), `weight_scale` (float32, (out,)
    or (1,)), `input_scale` (float32 scalar, or None for weight-only or dynamic), and `bias` (a frozen
    parameter in the model's float dtype, or None). Scales stay float32 when the model is cast.
    """

    fp32_buffers = ("weight_scale", "input_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        granularity: Granularity = "per_channel",
        act_quant: bool = True,
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
        if self.input_scale is not None:
            h = fake_quant(h, self.input_scale)
        elif self.act_dynamic is not None:
            h = fake_quant(h, dynamic_scale(h, self.act_dynamic))
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(h, self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scheme={self.scheme}, activations={self.activations}, granularity={self.granularity}"
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
        """Quantize a float Linear. Neither `input_scale` nor `act_dynamic`: weight-only.
        `quantized`: (int8 weight, scales) computed elsewhere (e.g. GPTQ)."""
        w = linear.weight
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            granularity=granularity,
            act_quant=input_scale is not None,
            device=w.device,
            dtype=w.dtype,
            act_dynamic=act_dynamic,
        )
        q, scale = quantized if quantized is not None else quantize_weight(w, granularity)
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(scale)
        if input_scale is not None and act_dynamic is None:
            new.input_scale.fill_(input_scale)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new.train(linear.training)


def int8_modules(model: nn.Module) -> dict[str, Int8Linear]:
    """Every Int8Linear in the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
