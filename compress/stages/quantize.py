"""`type: quantize`: INT8 (weights + calibrated activations, optional SmoothQuant) or NF4 (bitsandbytes).

INT8 runs in PyTorch on the exact integer grid it ships with (fake-quant with stored int8 weights
and static scales), so the gate measures what an export will carry. NF4 goes through transformers'
bitsandbytes loading path, so the checkpoint reloads with plain `from_pretrained`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.arch import select_modules
from compress.checkpoint import model_bytes
from compress.errors import ConfigError
from compress.registry import register_stage
from compress.stages.base import StageConfig, StageContext, StageResult, Strict, Targets


class WeightsConfig(Strict):
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    symmetric: Literal[True] = True  # int8 weights are symmetric; the field documents it


class ActivationsConfig(Strict):
    calibration: Literal["minmax", "percentile", "entropy", "mse"]
    percentile: float = Field(99.99, gt=50.0, le=100.0)
    bins: int = Field(2048, ge=256)


class SmoothQuantConfig(Strict):
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class NF4Config(Strict):
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class QuantizeConfig(StageConfig):
    type: Literal["quantize"]
    scheme: Literal["int8", "nf4"]
    targets: Targets
    weights: WeightsConfig = WeightsConfig()
    activations: ActivationsConfig | Literal["none"] | None = None
    smoothquant: SmoothQuantConfig | None = None
    nf4: NF4Config | None = None

    @model_validator(mode="after")
    def _scheme_sections(self) -> QuantizeConfig:
        if self.scheme == "int8":
            if self.activations is None:
                raise ValueError("int8 needs 'activations': {calibration: minmax|percentile|entropy|mse} "
                                 "for W8A8, or 'none' for weight-only")
            if self.nf4 is not None:
                raise ValueError("'nf4' settings only apply to scheme nf4")
            if self.smoothquant is not None and self.activations == "none":
                raise ValueError("smoothquant needs calibrated activations (it moves their outliers into weights)")
        else:
            if self.activations not in (None, "none") or self.smoothquant is not None:
                raise ValueError("nf4 is weight-only: drop 'activations' and 'smoothquant'")
            if self.weights != WeightsConfig():
                raise ValueError("'weights' settings only apply to scheme int8 (nf4 uses 'nf4')")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.scheme == "int8" and isinstance(self.activations, ActivationsConfig)

    def output_state(self, state: str) -> str:
        return "quantized" if self.scheme == "nf4" or state == "quantized" else "fake_quant"

    @property
    def accepts(self) -> frozenset[str]:  # type: ignore[override]
        # NF4 reloads the model through a BitsAndBytesConfig, which cannot carry INT8 modules along.
        return frozenset({"float", "sparse"}) if self.scheme == "nf4" else frozenset(
            {"float", "sparse", "fake_quant", "quantized"})

    @property
    def requirement(self) -> str:  # type: ignore[override]
        if self.scheme == "nf4":
            return "float or sparse weights (put nf4 stages before int8 ones)"
        return "float, sparse or quantized PyTorch weights"


def _int8(model: torch.nn.Module, names: list[str], cfg: QuantizeConfig, ctx: StageContext) -> dict:
    from compress.quant import ActQuant, WeightQuant, quantize_linears, smooth

    details: dict = {}
    act = None
    if isinstance(cfg.activations, ActivationsConfig):
        if ctx.forward_loop is None:
            raise ConfigError("INT8 activation calibration needs a 'calibration' data section")
        params = {"bins": cfg.activations.bins}
        if cfg.activations.calibration == "percentile":
            params["percentile"] = cfg.activations.percentile
        if cfg.activations.calibration == "minmax":
            params = {}
        act = ActQuant(observer=cfg.activations.calibration, params=params)
    if cfg.smoothquant is not None:
        details["smoothquant"] = smooth(model, names, ctx.forward_loop, alpha=cfg.smoothquant.alpha)
    details["modules"] = quantize_linears(model, names, WeightQuant(cfg.weights.granularity), act, ctx.forward_loop)
    return details


@register_stage(QuantizeConfig)
def apply(model: torch.nn.Module, cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    from compress.quant import check_nf4, nf4_details, quantize_nf4, size_summary

    before = model_bytes(model)
    names = list(select_modules(model, ctx.adapter, cfg.targets, kinds=(torch.nn.Linear,)))
    if cfg.scheme == "nf4":
        nf4 = cfg.nf4 or NF4Config()
        if any(type(m).__name__ in ("Int8Linear", "SmoothedLinear") for m in model.modules()):
            raise ConfigError("an nf4 stage must come before int8 stages (it reloads the model through "
                              "bitsandbytes, which cannot carry INT8 layers)")
        check_nf4(model, names, nf4.blocksize)  # shapes checked before anything changes
        model = quantize_nf4(model, names, nf4.blocksize, nf4.double_quant, nf4.compute_dtype, ctx.workdir)
        ctx.adapter.bind(model)
        details = {"modules": nf4_details(model, names)}
    else:
        details = _int8(model, names, cfg, ctx)
    after = model_bytes(model)
    observer = cfg.activations.calibration if isinstance(cfg.activations, ActivationsConfig) else None
    return StageResult(model, {
        "scheme": cfg.scheme if cfg.scheme == "nf4" else ("int8 w8a8" if observer else "int8 w8a16"),
        "observer": observer,
        "quantized_weights": size_summary(details["modules"]),
        "model_bytes_before": before,
        "model_bytes_after": after,
        "model_size_ratio": round(after / before, 4),
        **details,
    })
