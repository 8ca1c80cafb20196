"""SmoothQuant, folded: move activation outliers into the weights and the inverse into what made them.

Per input channel j, s_j = max|X_j|^alpha / max_k max|W^k_:,j|^(1-alpha) over every Linear k that reads
X. Their weight columns are multiplied by s, and 1/s is folded into the producer of X: a norm's weight
(and bias), or the output rows of the Linear before it (up_proj before down_proj in a gated MLP, v_proj
before o_proj through attention, one s per key/value head channel under GQA). The model stays a plain
transformers model with changed numbers, so every checkpoint format and exporter carries it as is;
llm-compressor folds the same way. Linears whose input has no such producer (fc2 after a GELU, a
projector fed by a residual stream) are not smoothed and are listed as such.

AWQ (activation-aware weight quantization, for INT4) is the same fold with another rule: s_j =
mean|X_j|^alpha (normalized), alpha searched per mapping for the least output error of the INT4 group
weights on sampled calibration inputs; the round-to-nearest INT4 grid is then taken on the scaled weights.

Mappings come from `smooth_rules.RULES` (module-name patterns of the supported families); the fold is checked:
the model's outputs on the first calibration batch must not move, or nothing is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, ConfigError
from compress.observe import observe_inputs
from compress.quant.smooth_rules import Mapping, find_mappings

S_MIN, S_MAX = 1e-5, 1e5  # keep s (and 1/s) finite and away from zero
FOLD_RTOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


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
        if type(m) is not nn.Linear:
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


def smoothing_factors(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = act_amax_j^alpha / w_amax_j^(1-alpha); channels with no signal (0 on either side) keep s=1."""
    a, w = act_amax.float(), w_amax.float()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s).clamp(S_MIN, S_MAX)


def awq_factors(act_mean: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ (Lin et al. 2023): s_j = mean|X_j|^alpha, normalized so sqrt(max * min) = 1; weights do not enter."""
    s = act_mean.float().clamp_min(1e-4).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).clamp(S_MIN, S_MAX)


class _Factors:
    """s for one mapping as a function of alpha; under attention one s per kv-head channel, repeated.

    `act_amax` is the activation statistic the rule reads: max |x| (SmoothQuant) or mean |x| (AWQ)."""

    def __init__(self, mapping: Mapping, act_amax: torch.Tensor, weights: list[torch.Tensor],
                 rule: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = smoothing_factors):
        self.rule = rule
        w_amax = torch.cat([w.detach().abs().float() for w in weights]).amax(dim=0)
        self.groups = mapping.groups
        if self.groups is not None:
            kv, rep, hd = self.groups
            act_amax = act_amax.float().view(kv, rep, hd).amax(dim=1).reshape(-1)
            w_amax = w_amax.view(kv, rep, hd).amax(dim=1).reshape(-1)
        self.act_amax, self.w_amax = act_amax.float(), w_amax

    def source(self, alpha: float) -> torch.Tensor:
        """What the source's output channels are divided by."""
        return self.rule(self.act_amax, self.w_amax, alpha)

    def target(self, alpha: float) -> torch.Tensor:
        """What the targets' input columns are multiplied by."""
        s = self.source(alpha)
        if self.groups is None:
            return s
        kv, rep, hd = self.groups
        return s.view(kv, 1, hd).expand(kv, rep, hd).reshape(-1)


ALPHA_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
AWQ_GRID = tuple(i / 20 for i in range(20))  # AutoAWQ's n_grid = 20

# (smoothed inputs, smoothed float weight) -> the quantized layer's output
Quantized = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def int8_output(act: Any, qmax: int) -> Quantized:
    """The output with the stage's INT8 activation scheme and round-to-nearest per-channel int8 weights."""
    from compress.quant.int8 import quantize_weight
    from compress.quant.observers import make_observer

    def out(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if act is None:
            xq = xs
        elif act.dynamic is not None:
            xq = act.fake_quant(xs)
        else:
            obs = make_observer(act.observer, **act.params)
            obs.update(xs)
            xq = act.fake_quant(xs, obs.scale())
        q, scale = quantize_weight(w, "per_channel", qmax)
        return xq @ (q.float() * scale[:, None]).T

    return out


def int4_output(quant: Any) -> Quantized:
    """The output with float activations and round-to-nearest INT4 group weights (AWQ's objective)."""
    from compress.quant.int4 import dequantize_int4, int4_params, quantize_int4

    def out(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, zero = int4_params(w, quant.group_size, quant.symmetric)
        return xs @ dequantize_int4(quantize_int4(w, scale, zero, quant.group_size), scale, zero,
                                    quant.group_size).T

    return out


def search_alpha(factors: _Factors, weights: list[torch.Tensor], rows: torch.Tensor, quantized: Quantized,
                 grid: tuple[float, ...] = ALPHA_GRID) -> tuple[float, dict[float, float]]:
    """The alpha whose smoothed, quantized targets reproduce the float ones best on `rows`.

    Error: relative squared output error per token (so a few huge-norm tokens do not outvote the rest),
    summed over the targets.
    """
    x = rows.float()
    errors: dict[float, float] = {}
    for alpha in grid:
        s = factors.target(alpha)
        xs = x / s
        total = 0.0
        for weight in weights:
            w = weight.detach().float()
            ref = x @ w.T
            out = quantized(xs, w * s)
            total += float((((out - ref) ** 2).sum(-1) / (ref**2).sum(-1).clamp_min(1e-30)).mean())
        errors[alpha] = total
    best = min(errors, key=lambda a: (errors[a], abs(a - 0.5)))
    return best, errors


@torch.no_grad()
def _fold(model: nn.Module, m: Mapping, factors: _Factors, alpha: float) -> None:
    s_src, s_tgt = factors.source(alpha), factors.target(alpha)
    for name in m.targets:
        w = model.get_submodule(name).weight
        w.mul_(s_tgt.to(w.device, w.dtype)[None, :])
    src = model.get_submodule(m.source)
    inv = (1.0 / s_src).to(src.weight.device)
    if m.kind == "norm":  # scale (offset + w) by 1/s
        src.weight.copy_(((m.offset + src.weight.float()) * inv - m.offset).to(src.weight.dtype))
        if getattr(src, "bias", None) is not None:
            src.bias.mul_(inv.to(src.bias.dtype))
    else:
        src.weight[m.rows].mul_(inv.to(src.weight.dtype)[:, None])
        if src.bias is not None:
            src.bias[m.rows].mul_(inv.to(src.bias.dtype))


class _FirstCall:
    """Records the model's first call (inputs and output logits) so the fold can be checked afterwards."""

    def __init__(self, model: nn.Module):
        self.args: tuple | None = None
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.args is None:
            self.args, self.kwargs, self.ref = args, dict(kwargs), _logits(output).detach().clone()
        self.handle.remove()


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output


def smooth(
    model: nn.Module,
    modules: dict[str, nn.Module] | list[str],
    forward_loop: Callable[[nn.Module], None] | None,
    alpha: float | str = 0.5,
    act: Any = None,
    weight_qmax: int = 127,
    samples: int = 512,
    seed: int = 0,
    int4: Any = None,
) -> dict[str, Any]:
    """Apply folded SmoothQuant (or AWQ when `int4` is given) to the named Linears in place.
    Returns {"modules": per target, "not_smoothed"}.

    `alpha="auto"` searches `ALPHA_GRID` per mapping on sampled calibration inputs, scoring with the
    stage's activation scheme `act` (an `ActQuant`) and int8 weights in [-weight_qmax, weight_qmax].
    AWQ (`int4`: an `Int4Quant`) always searches: s = mean|x|^alpha over `AWQ_GRID`, scored with float
    activations and the INT4 group weights. Calibration runs `forward_loop(model)` once; nothing changes
    unless every mapping saw data and the folded model answers like the original.
    """
    from compress.quant.sensitivity import RowSampler

    method = "AWQ" if int4 is not None else "SmoothQuant"
    auto = alpha == "auto" or int4 is not None
    if not auto and not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"SmoothQuant alpha must be in [0, 1] or 'auto', got {alpha!r}")
    mods = selected_linears(model, modules, method)
    if forward_loop is None:
        raise ConfigError(f"{method} needs calibration data (a forward_loop), but none was given")
    mappings = find_mappings(model, set(mods))
    covered = {t for m in mappings for t in m.targets}
    not_smoothed = sorted(set(mods) - covered)
    if not mappings:
        return {"modules": {}, "not_smoothed": not_smoothed}
    check_unshared(model, resolve(model, [t for m in mappings for t in m.targets] + [m.source for m in mappings]))

    first = {m.targets[0]: m for m in mappings}
    stat: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    samplers = {name: RowSampler(samples if auto else 0, seed) for name in first}

    def observe(name: str, x: torch.Tensor) -> None:
        flat = x.abs().float().reshape(-1, x.shape[-1])
        if int4 is not None:  # running sum of |x| per channel (mean at the end)
            cur = flat.sum(dim=0)
            stat[name] = cur if name not in stat else stat[name] + cur
            rows[name] = rows.get(name, 0) + flat.shape[0]
        else:
            cur = flat.amax(dim=0)
            stat[name] = cur if name not in stat else torch.maximum(stat[name], cur)
        samplers[name].update(x)

    call = _FirstCall(model)
    try:
        observe_inputs(model, resolve(model, list(first)), forward_loop, observe)
    finally:
        call.handle.remove()
    if int4 is not None:
        stat = {name: v / rows[name] for name, v in stat.items()}
    rule, grid = (awq_factors, AWQ_GRID) if int4 is not None else (smoothing_factors, ALPHA_GRID)
    quantized = int4_output(int4) if int4 is not None else int8_output(act, weight_qmax)

    details: dict[str, dict[str, Any]] = {}
    plan = []
    for name, m in first.items():
        factors, chosen, info = _plan_one(model, m, stat[name], samplers[name].rows(), alpha if not auto else None,
                                          quantized, rule, grid, "mean" if int4 is not None else "amax")
        plan.append((m, factors, chosen))
        details.update({t: info for t in m.targets})

    originals = {k: v.detach().clone() for k, v in model.state_dict().items()
                 if k.rsplit(".", 1)[0] in {m.source for m in mappings} | covered}
    for m, factors, chosen in plan:
        _fold(model, m, factors, chosen)
    _check_fold(model, call, originals, method)
    return {"modules": details, "not_smoothed": not_smoothed}


def _plan_one(model: nn.Module, m: Mapping, stat: torch.Tensor, rows: torch.Tensor, alpha: float | None,
              quantized: Quantized, rule: Callable, grid: tuple[float, ...],
              kind: str) -> tuple[_Factors, float, dict[str, Any]]:
    """One mapping's factors and alpha (`alpha`, or searched over `grid` when None), with what the manifest
    records about them."""
    weights = [model.get_submodule(t).weight for t in m.targets]
    factors = _Factors(m, stat, weights, rule)
    searched: dict[float, float] = {}
    chosen = float(alpha) if alpha is not None else 0.0
    if alpha is None:
        chosen, searched = search_alpha(factors, weights, rows, quantized, grid)
    before = stat.cpu()
    s = factors.target(chosen).cpu()
    info = {
        "alpha": chosen,
        "folded_into": f"{m.source} ({m.kind})",
        "outlier_ratio_before": _finite(outlier_ratio(before)),
        "outlier_ratio_after": _finite(outlier_ratio(before / s)),
        f"act_{kind}_before": float(before.max()),
        f"act_{kind}_after": float((before / s).max()),
        "smooth_min": float(s.min()),
        "smooth_max": float(s.max()),
    }
    if alpha is None:
        info["alpha_errors"] = {str(a): round(e, 8) for a, e in searched.items()}
    return factors, chosen, info


@torch.no_grad()
def _check_fold(model: nn.Module, call: _FirstCall, originals: dict[str, torch.Tensor],
                method: str = "SmoothQuant") -> None:
    """The folded model must answer like the original on the first calibration batch, or it is restored."""
    if call.args is None:
        return
    got = _logits(model(*call.args, **call.kwargs)).float()
    ref = call.ref.float()
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if err > FOLD_RTOL.get(call.ref.dtype, 5e-2) or not torch.isfinite(got).all():
        model.load_state_dict(originals, strict=False)
        raise CompressError(f"{method} folding changed the model's outputs (max relative error {err:.3g}); "
                            "a smoothing rule does not fit this architecture, nothing was changed")
