"""The quantize stage's `scheme: mixed`: int4 / int8 / float per Linear under a size budget (`bits:`), chosen
from each layer's measured error (`compress.quant.allocate`), then applied.

Two walks over the model, block by block, like `keep_float`: the first measures every selected layer at every
allowed format on its own calibration inputs, the allocation then sees the whole model at once, the second
quantizes each layer to its format — INT4 with the `int4:` settings (RTN or GPTQ), INT8 weight-only with the
`weights:` settings, float left alone. Within a block INT4 layers are quantized first; the INT8 layers' GPTQ
pass (if any) then sees them quantized.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.config import Strict
from compress.sequential import merge
from compress.stages.base import StageContext


class BitsConfig(Strict):
    """`bits: auto`: the budget a mixed-precision allocation must fit."""

    effective_bits: float | None = Field(None, gt=0.0, description="stored bits per selected weight, scales and "
                                         "zero points included (int4 group 128: 4.25, group 32: 5.0; int8 per "
                                         "channel: ~8.0)")
    max_mb: float | None = Field(None, gt=0.0, description="or: the selected layers' stored size in MiB at most")
    options: list[Literal["int4", "int8", "float"]] = Field(
        default_factory=lambda: ["int4", "int8"], min_length=2, description="formats a layer may take")
    samples: int = Field(512, ge=16, description="input rows per layer the errors are measured on")

    @model_validator(mode="after")
    def _one_budget(self) -> BitsConfig:
        if (self.effective_bits is None) == (self.max_mb is None):
            raise ValueError("bits needs exactly one of 'effective_bits' or 'max_mb'")
        if len(set(self.options)) != len(self.options):
            raise ValueError("bits.options lists a format twice")
        return self

    def budget(self, params: int) -> int:
        return int(self.max_mb * 2**20) if self.max_mb is not None else int(self.effective_bits * params / 8)


def mixed(model: torch.nn.Module, names: list[str], bits: BitsConfig, int4: Any, int8: Any,
          ctx: StageContext) -> dict[str, Any]:
    """Measure, allocate, quantize; the stage's details (the map under `bit_allocation`)."""
    from compress.quant import quantize_linears
    from compress.quant.allocate import allocate, measure, summary
    from compress.quant.linears import check_int4_shapes, quantize_int4_linears

    if "int4" in bits.options:
        check_int4_shapes(model, names, int4)  # before anything changes
    params = {n: model.get_submodule(n).weight.numel() for n in names}
    costs: dict[str, Any] = {}
    seq = ctx.sequencer(model, "scheme: mixed")
    for unit in seq.units(names):
        if not unit.restored:
            found = measure(unit.root, unit.names, unit.loop, int4, int8, tuple(bits.options), bits.samples,
                            ctx.seed)
            unit.record = {"costs": {unit.full(n): c for n, c in found.items()}}
            ctx.fault_point()
        costs.update(unit.record["costs"])
    choice = allocate(costs, bits.budget(sum(params.values())))
    details: dict[str, Any] = {"modules": {}}
    seq = ctx.sequencer(model, "scheme: mixed")
    for unit in seq.units(names):
        if not unit.restored:
            fours = [n for n in unit.names if choice[unit.full(n)] == "int4"]
            eights = [n for n in unit.names if choice[unit.full(n)] == "int8"]
            found = {}
            if fours:
                loop = unit.loop if int4.rounding == "gptq" else None
                found.update(quantize_int4_linears(unit.root, fours, int4, loop, ctx.seed))
            if eights:
                loop = unit.loop if int8.rounding == "gptq" else None
                found.update(quantize_linears(unit.root, eights, int8, None, loop, None, ctx.seed))
            unit.record = {"modules": {unit.full(n): d for n, d in found.items()}}
            ctx.fault_point()
        merge(details, unit.record)
    details["modules"] = {n: details["modules"][n] for n in names if n in details["modules"]}
    details["kept_float"] = sorted(n for n in names if choice[n] == "float")
    details["bit_allocation"] = {**summary(costs, choice, params), "budget_bytes": bits.budget(sum(params.values())),
                                 "options": list(bits.options)}
    details["sequential"] = seq.stats()
    return details
