"""`type: quantize`: INT8 (weights + calibrated activations, optional SmoothQuant), INT4 weight-only
(group-wise, RTN / GPTQ / AWQ) or NF4 (bitsandbytes).

INT8 runs in PyTorch on the exact integer grid it ships with (fake-quant with stored int8 weights
and static scales), so the gate measures what an export will carry. NF4 goes through transformers'
bitsandbytes loading path, so the checkpoint reloads with plain `from_pretrained`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from compress.arch import select_modules
from compress.checkpoint import model_bytes
from compress.config import StageConfig, Strict, Targets
from compress.errors import ConfigError
from compress.registry import register_stage
from compress.sequential import merge
from compress.stages.base import StageContext, StageResult
from compress.stages.quantize_mixed import BitsConfig, mixed


class GptqConfig(Strict):
    block_size: int = Field(128, ge=1, description="columns updated together (lazy batch update)")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="added to H's diagonal, as a fraction of its mean")


class WeightsConfig(Strict):
    granularity: Literal["per_channel", "per_tensor"] = Field("per_channel", description="one scale per output "
                                                                                         "channel, or one per layer")
    reduce_range: bool = Field(False, description="7-bit weights in [-64, 64]: exact with the fast U8S8 kernels "
                                                  "on every CPU, at one bit of precision")
    rounding: Literal["rtn", "gptq"] = Field("rtn", description="round to nearest, or GPTQ error compensation")
    gptq: GptqConfig | None = Field(None, description="GPTQ settings (needs rounding: gptq and a calibration "
                                                       "section)")

    @model_validator(mode="after")
    def _gptq_section(self) -> WeightsConfig:
        if self.gptq is not None and self.rounding != "gptq":
            raise ValueError("'gptq' settings need rounding: gptq")
        return self


class ActivationsConfig(Strict):
    """Static per-tensor scales from an observer (`calibration`), or dynamic ones computed at run time."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "oneOf": [{"required": ["calibration"]}, {"required": ["dynamic"]}]})

    calibration: Literal["minmax", "percentile", "entropy", "mse"] | None = Field(
        None, description="static per-tensor scales chosen by this observer over the calibration data")
    dynamic: Literal["per_token", "per_tensor"] | None = Field(
        None, description="scales computed at run time: max|x| / 127.5 per token, or per call")
    percentile: float = Field(99.99, gt=50.0, le=100.0, description="percentile observer: the |x| percentile "
                                                                    "that maps to 127")
    bins: int = Field(2048, ge=256, description="histogram bins of the percentile / entropy / mse observers")

    @model_validator(mode="after")
    def _one_mode(self) -> ActivationsConfig:
        if (self.calibration is None) == (self.dynamic is None):
            raise ValueError("activations need exactly one of 'calibration' (static: minmax|percentile|entropy|"
                             "mse) or 'dynamic' (per_token|per_tensor)")
        return self


class SmoothQuantConfig(Strict):
    alpha: float | Literal["auto"] = Field(0.5, description="migration strength in [0, 1], or auto: searched "
                                                            "per layer on the calibration data")
    samples: int = Field(512, ge=16, description="input rows per layer the alpha search scores on")

    @model_validator(mode="after")
    def _alpha_range(self) -> SmoothQuantConfig:
        if self.alpha != "auto" and not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1] or 'auto'")
        return self


class KeepFloatConfig(Strict):
    """Keep the layers INT8 hurts most in float (sensitivity on each layer's own calibration inputs)."""

    mode: Literal["auto"] = Field("auto", description="rank layers by INT8 output error on their own inputs")
    budget: float = Field(0.05, gt=0.0, lt=1.0, description="at most this fraction of the selected parameters")
    samples: int = Field(512, ge=16, description="input rows per layer sensitivity is measured on")


class NF4Config(Strict):
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="weights per absmax scale; every layer needs in_features % blocksize == 0")
    double_quant: bool = Field(True, description="quantize the absmax scales too (bitsandbytes' nested quant)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="matmul dtype")


class Int4Config(Strict):
    group_size: Literal[32, 64, 128] = Field(128, description="input columns per scale (and zero point); every "
                                                             "target needs in_features % group_size == 0")
    symmetric: bool = Field(True, description="true: codes in [-8, 7] around 0; false: a zero point per group")
    rounding: Literal["rtn", "gptq", "awq"] = Field("rtn", description="round to nearest; GPTQ error "
                                                    "compensation; or AWQ activation-aware scales folded into the "
                                                    "producers, then round to nearest (both calibrated)")
    gptq: GptqConfig | None = Field(None, description="GPTQ settings (rounding: gptq)")

    @model_validator(mode="after")
    def _gptq_section(self) -> Int4Config:
        if self.gptq is not None and self.rounding != "gptq":
            raise ValueError("'gptq' settings need rounding: gptq")
        return self


class QuantizeConfig(StageConfig):
    type: Literal["quantize"]
    scheme: Literal["int8", "int4", "nf4", "mixed"] = Field(
        description="int8: compressed-tensors checkpoint (W8A8 or W8A16); int4: weight-only, group-wise, "
        "compressed-tensors; nf4: bitsandbytes 4-bit (quantization.md); mixed: int4 / int8 / float per layer "
        "under the `bits` budget, chosen from each layer's measured error (weight-only, compressed-tensors)")
    targets: Targets = Field(description="nn.Linear modules to quantize")
    weights: WeightsConfig = Field(WeightsConfig(), description="int8 only: how weights are quantized")
    activations: ActivationsConfig | Literal["none"] | None = Field(
        None, description="int8 only, required: static (calibration) or dynamic scales, or none for weight-only")
    smoothquant: SmoothQuantConfig | None = Field(
        None, description="int8 W8A8 only: move activation outliers into the weights, folded into the norms / "
        "Linears that produce each input (layers without one are listed as not smoothed)")
    keep_float: KeepFloatConfig | None = Field(
        None, description="int8 only: keep the layers INT8 hurts most in float, within a parameter budget")
    nf4: NF4Config | None = Field(None, description="nf4 only")
    int4: Int4Config | None = Field(None, description="int4 (and mixed's int4 layers) only (defaults: group 128, "
                                                      "symmetric, rtn)")
    bits: BitsConfig | None = Field(None, description="mixed only, required (`bits: auto`): the size budget")

    @model_validator(mode="after")
    def _scheme_sections(self) -> QuantizeConfig:
        if self.int4 is not None and self.scheme not in ("int4", "mixed"):
            raise ValueError("'int4' settings only apply to schemes int4 and mixed")
        if (self.bits is not None) != (self.scheme == "mixed"):
            raise ValueError("scheme mixed needs 'bits' (effective_bits or max_mb), and 'bits' needs scheme mixed")
        if self.scheme == "mixed" and self.int4 is not None and self.int4.rounding == "awq":
            raise ValueError("scheme mixed takes int4 rounding rtn or gptq (AWQ folds scales into producers that "
                             "layers of different formats share)")
        if self.scheme == "int8":
            if self.activations is None:
                raise ValueError("int8 needs 'activations': {calibration: minmax|percentile|entropy|mse} "
                                 "for W8A8, or 'none' for weight-only")
            if self.nf4 is not None:
                raise ValueError("'nf4' settings only apply to scheme nf4")
            if self.smoothquant is not None and self.activations == "none":
                raise ValueError("smoothquant needs quantized activations (it moves their outliers into weights)")
        else:
            if (self.activations not in (None, "none") or self.smoothquant is not None
                    or self.keep_float is not None):
                raise ValueError(f"{self.scheme} is weight-only: drop 'activations', 'smoothquant' and 'keep_float'")
            if self.weights != WeightsConfig() and self.scheme != "mixed":
                raise ValueError(f"'weights' settings only apply to scheme int8 ({self.scheme} uses "
                                 f"'{self.scheme}')")
            if self.nf4 is not None and self.scheme != "nf4":
                raise ValueError("'nf4' settings only apply to scheme nf4")
        return self

    @property
    def needs_calibration(self) -> bool:
        static = isinstance(self.activations, ActivationsConfig) and self.activations.calibration is not None
        if self.scheme == "int4":
            return (self.int4 or Int4Config()).rounding != "rtn"
        if self.scheme == "mixed":
            return True  # each layer's error at each format is measured on its calibration inputs
        return self.scheme == "int8" and (static or self.smoothquant is not None or self.keep_float is not None
                                          or self.weights.rounding == "gptq")

    @property
    def streamable(self) -> bool:
        """Runs on a model streamed from disk (block by block: INT8 and INT4, calibrated or not)."""
        return self.scheme != "nf4"

    @property
    def dynamic_activations(self) -> bool:
        return isinstance(self.activations, ActivationsConfig) and self.activations.dynamic is not None

    def output_state(self, state: str) -> str:
        return "quantized" if self.scheme == "nf4" else "fake_quant"

    @property
    def accepts(self) -> frozenset[str]:  # type: ignore[override]
        # NF4 reloads the model through a BitsAndBytesConfig, which cannot carry INT8 modules along; and an
        # INT8 stage after NF4 would need bitsandbytes' and compressed-tensors' quantization_config in one
        # config.json, which no loader reads: such a folder would load with random weights, so it is refused.
        return frozenset({"float", "sparse"}) if self.scheme == "nf4" else frozenset(
            {"float", "sparse", "fake_quant"})

    @property
    def requirement(self) -> str:  # type: ignore[override]
        if self.scheme == "nf4":
            return "float or sparse weights (nf4 and int8 do not mix in one checkpoint)"
        return ("float, sparse or INT8 weights: INT8 after NF4 has no checkpoint format transformers loads "
                "(bitsandbytes and compressed-tensors each need the one quantization_config); for per-component "
                "precision use int8 W8A8 for one component and int8 weight-only (activations: none) for another")


def _prefixed(unit, found: dict) -> dict:
    return {unit.full(n): v for n, v in found.items()}


def _act(cfg: QuantizeConfig):
    from compress.quant import ActQuant

    a = cfg.activations
    if not isinstance(a, ActivationsConfig):
        return None
    if a.dynamic is not None:
        return ActQuant(dynamic=a.dynamic)
    params: dict = {} if a.calibration == "minmax" else {"bins": a.bins}
    if a.calibration == "percentile":
        params["percentile"] = a.percentile
    return ActQuant(observer=a.calibration, params=params)


def _smooth_unit(unit, cfg: QuantizeConfig, act, weight, seed: int) -> dict:
    """SmoothQuant on one unit; its part of the stage's details."""
    from compress.quant import smooth

    sq = smooth(unit.root, unit.names, unit.loop, alpha=cfg.smoothquant.alpha, act=act, weight_qmax=weight.qmax,
                samples=cfg.smoothquant.samples, seed=seed)
    # not_smoothed: no norm or Linear to fold 1/s into
    return {"smoothquant": _prefixed(unit, sq["modules"]), "not_smoothed": [unit.full(n) for n in sq["not_smoothed"]]}


def _int8(model: torch.nn.Module, names: list[str], cfg: QuantizeConfig, ctx: StageContext) -> dict:
    """Block by block over the calibration set: SmoothQuant folds, then observers / GPTQ / sensitivity and the
    swap. `keep_float` ranks layers over the whole model first (one sweep that smooths and measures), then
    quantizes in a second sweep."""
    from compress.quant import KeepFloat, WeightQuant, quantize_linears

    act = _act(cfg)
    gptq = cfg.weights.gptq or GptqConfig()
    weight = WeightQuant(cfg.weights.granularity, cfg.weights.reduce_range, cfg.weights.rounding,
                         gptq.block_size, gptq.damp)
    if not cfg.needs_calibration and ctx.stream is None:  # dynamic or weight-only RTN: nothing to observe
        return {"modules": quantize_linears(model, names, weight, act, None, None, ctx.seed), "kept_float": []}
    details: dict = {"smoothquant": {}, "not_smoothed": [], "modules": {}} if cfg.smoothquant else {"modules": {}}
    keep = KeepFloat(cfg.keep_float.budget, cfg.keep_float.samples) if cfg.keep_float else None
    kept: set[str] | None = None
    if keep is not None:
        seq = ctx.sequencer(model, "this INT8 stage")
        sensitivity: dict[str, float] = {}
        for unit in seq.units(names):
            if not unit.restored:
                unit.record = _smooth_unit(unit, cfg, act, weight, ctx.seed) if cfg.smoothquant else {}
                found = quantize_linears(unit.root, unit.names, weight, act, unit.loop, keep, ctx.seed, swap=False)
                unit.record["sensitivity"] = {unit.full(n): d["output_rel_error"] for n, d in found.items()}
                ctx.fault_point()
            sensitivity.update(unit.record["sensitivity"])
            merge(details, {k: v for k, v in unit.record.items() if k != "sensitivity"})
        kept = keep.choose(sensitivity, {n: model.get_submodule(n).weight.numel() for n in names})
    seq = ctx.sequencer(model, "this INT8 stage")
    for unit in seq.units(names):
        if not unit.restored:
            unit.record = (_smooth_unit(unit, cfg, act, weight, ctx.seed)
                           if cfg.smoothquant is not None and keep is None else {})
            local = None if kept is None else {n for n in unit.names if unit.full(n) in kept}
            loop = unit.loop if cfg.needs_calibration else None
            found = quantize_linears(unit.root, unit.names, weight, act, loop, keep, ctx.seed, kept=local)
            unit.record["modules"] = _prefixed(unit, found)
            ctx.fault_point()
        merge(details, unit.record)
    details["modules"] = {n: details["modules"][n] for n in names}  # model order, as one pass reported it
    smoothed = details.get("smoothquant", {})
    for name, d in details["modules"].items():
        d["smoothquant"] = name in smoothed
    details["kept_float"] = sorted(n for n, d in details["modules"].items() if d["kept_float"])
    details["sequential"] = seq.stats()
    return details


def _int4(model: torch.nn.Module, names: list[str], cfg: QuantizeConfig, ctx: StageContext) -> dict:
    from compress.quant import smooth
    from compress.quant.int4 import Int4Quant
    from compress.quant.linears import check_int4_shapes, quantize_int4_linears

    c = cfg.int4 or Int4Config()
    gptq = c.gptq or GptqConfig()
    quant = Int4Quant(c.group_size, c.symmetric, c.rounding, gptq.block_size, gptq.damp)
    check_int4_shapes(model, names, quant)  # before anything changes
    if not cfg.needs_calibration and ctx.stream is None:
        return {"modules": quantize_int4_linears(model, names, quant, None, ctx.seed)}
    details: dict = {"awq": {}, "not_scaled": [], "modules": {}} if c.rounding == "awq" else {"modules": {}}
    seq = ctx.sequencer(model, f"int4 rounding: {c.rounding}")
    for unit in seq.units(names):
        if not unit.restored:
            if c.rounding == "awq":
                found = smooth(unit.root, unit.names, unit.loop, int4=quant, seed=ctx.seed)
                unit.record = {"awq": _prefixed(unit, found["modules"]),
                               "not_scaled": [unit.full(n) for n in found["not_smoothed"]]}
            found = quantize_int4_linears(unit.root, unit.names, quant, unit.loop, ctx.seed)
            unit.record["modules"] = _prefixed(unit, found)
            ctx.fault_point()
        merge(details, unit.record)
    details["modules"] = {n: details["modules"][n] for n in names}
    details["sequential"] = seq.stats()
    return details


def _mixed(model: torch.nn.Module, names: list[str], cfg: QuantizeConfig, ctx: StageContext) -> dict:
    from compress.quant import WeightQuant
    from compress.quant.int4 import Int4Quant

    c, g8 = cfg.int4 or Int4Config(), cfg.weights.gptq or GptqConfig()
    g4 = c.gptq or GptqConfig()
    int4 = Int4Quant(c.group_size, c.symmetric, c.rounding, g4.block_size, g4.damp)
    int8 = WeightQuant(cfg.weights.granularity, cfg.weights.reduce_range, cfg.weights.rounding, g8.block_size,
                       g8.damp)
    return mixed(model, names, cfg.bits, int4, int8, ctx)


@register_stage(QuantizeConfig)
def apply(model: torch.nn.Module, cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    from compress.quant import check_nf4, nf4_details, quantize_nf4, size_summary

    before = model_bytes(model)
    names = list(select_modules(model, ctx.adapter, cfg.targets, kinds=(torch.nn.Linear,)))
    if cfg.scheme == "nf4":
        nf4 = cfg.nf4 or NF4Config()
        if any(type(m).__name__ in ("Int8Linear", "Int4Linear") for m in model.modules()):
            raise ConfigError("an nf4 stage must come before int8 stages (it reloads the model through "
                              "bitsandbytes, which cannot carry INT8 layers)")
        check_nf4(model, names, nf4.blocksize)  # shapes checked before anything changes
        model = quantize_nf4(model, names, nf4.blocksize, nf4.double_quant, nf4.compute_dtype, ctx.workdir)
        ctx.adapter.bind(model)
        details = {"modules": nf4_details(model, names)}
    else:
        from compress.quant.untie import untie_heads

        untied = untie_heads(model, names)  # a tied lm_head gets its own copy; the embedding table stays float
        details = (_int4(model, names, cfg, ctx) if cfg.scheme == "int4" else _mixed(model, names, cfg, ctx)
                   if cfg.scheme == "mixed" else _int8(model, names, cfg, ctx))
        if untied:
            details["untied"] = untied
    ctx.fault_point()
    after = model_bytes(model)
    a = cfg.activations
    observer = a.calibration if isinstance(a, ActivationsConfig) else None
    acts = (f"dynamic {a.dynamic}" if a.dynamic else f"static {a.calibration}") if isinstance(
        a, ActivationsConfig) else None
    return StageResult(model, {
        "scheme": cfg.scheme if cfg.scheme != "int8" else ("int8 w8a8" if acts else "int8 w8a16"),
        "activations": acts,
        "observer": observer,
        "quantized_weights": size_summary(details["modules"]),
        "model_bytes_before": before,
        "model_bytes_after": after,
        "model_size_ratio": round(after / before, 4),
        **details,
    })
