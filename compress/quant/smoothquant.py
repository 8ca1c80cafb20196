"""SmoothQuant: move activation outliers into the weights before INT8 quantization.

Per input channel j, s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha). The weight columns are multiplied by
s and the activation divided by s, so y = (x / s) @ (W * s)^T = x @ W^T is unchanged while the
per-channel activation ranges become flatter (per-tensor activation scales lose less).

The textbook version folds 1/s into the preceding LayerNorm. Our targets are arbitrary Linears that
need not follow a norm (and q/k/v would need one shared s), so 1/s is kept as a `smooth_scale` buffer
multiplied onto the input inside the module: `SmoothedLinear` (float) and `Int8Linear` (quantized).
An exporter emits it as one elementwise Mul before the (Q)MatMul, or folds it into a preceding
norm/Mul when it can prove the input is not shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError

S_MIN, S_MAX = 1e-5, 1e5  # keep s (and 1/s) finite and away from zero


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


class SmoothedLinear(Fp32BuffersMixin, nn.Linear):
    """A Linear whose weight columns were scaled by s; it multiplies its input by `smooth_scale` = 1/s.

    Still an `nn.Linear` (stages selecting Linears see it), numerically equal to the original layer.
    """

    fp32_buffers = ("smooth_scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("smooth_scale", torch.ones(in_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear((x * self.smooth_scale).to(x.dtype), self.weight, self.bias)

    @classmethod
    def wrap(cls, linear: nn.Linear, smooth_scale: torch.Tensor) -> SmoothedLinear:
        """Reuse `linear`'s weight and bias tensors (no copy); nothing is allocated on the real device."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.smooth_scale = smooth_scale.detach().to(device=linear.weight.device, dtype=torch.float32).clone()
        return new.train(linear.training)

    def spec(self) -> dict[str, Any]:
        """JSON description to rebuild an empty module of this shape before `load_state_dict`."""
        return {
            "kind": "smoothed_linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.weight.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> SmoothedLinear:
        dtype = getattr(torch, spec.get("dtype", "float32"))
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], device=device, dtype=dtype)


def input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input tensor of a Linear call, positional or `input=` keyword."""
    return args[0] if args else kwargs["input"]


def resolve(model: nn.Module, names: list[str] | dict[str, Any]) -> dict[str, nn.Module]:
    """Modules by name from the model itself (a caller's dict may hold modules replaced since)."""
    out: dict[str, nn.Module] = {}
    for name in names:
        try:
            out[name] = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"module '{name}' not found in the model") from exc
    return out


def check_unshared(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Refuse modules whose weight is also used elsewhere (tied embeddings): rewriting one would corrupt both."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, m in modules.items():
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and len(owners.get(id(weight), [])) > 1:
            others = [o for o in owners[id(weight)] if o != f"{name}.weight"]
            raise ConfigError(f"'{name}' shares its weight with {', '.join(others)} (tied); exclude it from targets")


def selected_linears(model: nn.Module, modules: dict[str, nn.Module] | list[str], what: str) -> dict[str, nn.Linear]:
    """The named modules, checked before anything changes: some, all float Linears, none with a tied weight."""
    mods = resolve(model, modules)
    if not mods:
        raise ConfigError(f"{what}: no modules selected")
    for name, m in mods.items():
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"{what} applies to float nn.Linear modules; '{name}' is {type(m).__name__}")
    check_unshared(model, mods)
    return mods  # type: ignore[return-value]


def outlier_ratio(channel_amax: torch.Tensor) -> float:
    """max / median of per-channel |x| maxima: how much one channel dominates a per-tensor scale."""
    med = float(channel_amax.median())
    return float(channel_amax.max()) / med if med > 0 else float("inf")


def _finite(value: float) -> float | None:
    """JSON-safe: a ratio over an all-zero median is reported as None, not inf."""
    return round(value, 4) if value != float("inf") else None


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); channels with no signal (0 on either side) keep s=1."""
    w_amax = weight.detach().abs().float().amax(dim=0)
    a = act_amax.float()
    s = a.pow(alpha) / w_amax.pow(1.0 - alpha)
    dead = (a <= 0) | (w_amax <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s).clamp(S_MIN, S_MAX)


def observe_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    forward_loop: Callable[[nn.Module], None],
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Run `forward_loop` once, calling `observe(name, x)` on each module's input as the module sees it
    (after any smooth_scale); every module must see data, or nothing downstream may change."""
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = input_of(args, kwargs).detach()
            smooth = getattr(module, "smooth_scale", None)
            observe(name, x * smooth if smooth is not None else x)
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


def collect_channel_amax(
    model: nn.Module, modules: dict[str, nn.Module], forward_loop: Callable[[nn.Module], None] | None,
    samples: int = 0, seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-input-channel max |x| of each module's input (after any existing smooth_scale), over forward_loop,
    plus up to `samples` input rows per module (for the alpha search)."""
    from compress.quant.sensitivity import RowSampler

    if forward_loop is None:
        raise ConfigError("SmoothQuant needs calibration data (a forward_loop), but none was given")
    amax: dict[str, torch.Tensor] = {}
    samplers = {name: RowSampler(samples, seed) for name in modules}

    def observe(name: str, x: torch.Tensor) -> None:
        cur = x.abs().float().reshape(-1, x.shape[-1]).amax(dim=0)
        amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        samplers[name].update(x)

    observe_inputs(model, modules, forward_loop, observe)
    return amax, {name: sp.rows() for name, sp in samplers.items()}


ALPHA_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def search_alpha(act_amax: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, act: Any, qmax: int,
                 grid: tuple[float, ...] = ALPHA_GRID) -> tuple[float, dict[float, float]]:
    """The alpha whose smoothed, INT8-quantized layer reproduces the float layer best on `rows`.

    Error: relative squared output error with the stage's own activation scheme (dynamic, or a static
    scale from the same observer over the sampled rows) and round-to-nearest weights. Returns
    (best alpha, {alpha: error}).
    """
    from compress.quant.int8 import quantize_weight
    from compress.quant.observers import make_observer

    x = rows.float()
    w = weight.detach().float()
    ref = x @ w.T
    denom = (ref**2).sum(-1).clamp_min(1e-30)  # per token: a few huge-norm tokens must not outvote the rest
    errors: dict[float, float] = {}
    for alpha in grid:
        s = smoothing_factors(act_amax, w, alpha)
        xs, ws = x / s, w * s
        if act is None:
            xq = xs
        elif act.dynamic is not None:
            xq = act.fake_quant(xs)
        else:
            obs = make_observer(act.observer, **act.params)
            obs.update(xs)
            xq = act.fake_quant(xs, obs.scale())
        q, scale = quantize_weight(ws, "per_channel", qmax)
        out = xq @ (q.float() * scale[:, None]).T
        errors[alpha] = float((((out - ref) ** 2).sum(-1) / denom).mean())
    best = min(errors, key=lambda a: (errors[a], abs(a - 0.5)))
    return best, errors


def smooth(
    model: nn.Module,
    modules: dict[str, nn.Module] | list[str],
    forward_loop: Callable[[nn.Module], None] | None,
    alpha: float | str = 0.5,
    act: Any = None,
    weight_qmax: int = 127,
    samples: int = 512,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Apply SmoothQuant to the named Linears in place (they become `SmoothedLinear`). Returns details.

    `alpha="auto"` searches `ALPHA_GRID` per layer on sampled calibration inputs, scoring each with the
    stage's activation scheme `act` (an `ActQuant`) and int8 weights in [-weight_qmax, weight_qmax].
    Calibration runs `forward_loop(model)` once. Nothing in the model changes unless every module saw
    data. Smoothing an already smoothed module composes the scales.
    """
    auto = alpha == "auto"
    if not auto and not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"SmoothQuant alpha must be in [0, 1] or 'auto', got {alpha!r}")
    mods = selected_linears(model, modules, "SmoothQuant")
    amax, rows = collect_channel_amax(model, mods, forward_loop, samples if auto else 0, seed)

    chosen: dict[str, float] = {}
    searched: dict[str, dict[float, float]] = {}
    for name, m in mods.items():
        if auto:
            chosen[name], searched[name] = search_alpha(amax[name], m.weight, rows[name], act, weight_qmax)
        else:
            chosen[name] = float(alpha)
    details: dict[str, dict[str, Any]] = {}
    for name, m in mods.items():
        s = smoothing_factors(amax[name], m.weight, chosen[name]).to(m.weight.device)
        with torch.no_grad():
            m.weight.mul_(s.to(m.weight.dtype)[None, :])
        if isinstance(m, SmoothedLinear):
            m.smooth_scale = m.smooth_scale / s
        else:
            model.set_submodule(name, SmoothedLinear.wrap(m, 1.0 / s))
        before = amax[name].cpu()
        after = before / s.cpu()
        details[name] = {
            "alpha": chosen[name],
            "outlier_ratio_before": _finite(outlier_ratio(before)),
            "outlier_ratio_after": _finite(outlier_ratio(after)),
            "act_amax_before": float(before.max()),
            "act_amax_after": float(after.max()),
            "smooth_min": float(s.min()),
            "smooth_max": float(s.max()),
        }
        if auto:
            details[name]["alpha_errors"] = {str(a): round(e, 8) for a, e in searched[name].items()}
    return details
