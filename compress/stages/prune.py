"""`type: prune`: zeros in the weights, made permanent; unstructured or n:m, by magnitude, Wanda or SparseGPT.

`l1_unstructured` is torch's L1 pruning (per module or one global threshold); `magnitude`, `wanda` and
`sparsegpt` come from `compress.prune.sparsity`, the last two calibrated on the recipe's calibration data.
The model stays dense (the zeros are stored), so checkpoints are plain transformers folders; 2:4 only
pays off where sparse kernels run it (see docs/pruning.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.nn.utils import prune as torch_prune

from compress.arch import select_modules
from compress.config import StageConfig, Strict, Targets
from compress.registry import register_stage
from compress.stages.base import StageContext, StageResult


class SparseGPTConfig(Strict):
    block_size: int = Field(128, ge=8, description="columns whose mask is chosen together (a multiple of m for n:m)")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="added to H's diagonal, as a fraction of its mean")


class PruneConfig(StageConfig):
    type: Literal["prune"]
    method: Literal["l1_unstructured", "magnitude", "wanda", "sparsegpt"] = Field(
        description="l1_unstructured / magnitude: smallest |W|; wanda: smallest |W|·‖X‖ per output row "
        "(calibrated); sparsegpt: OBS mask + weight update (calibrated)")
    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of the selected weights set to "
                                   "zero (unstructured); implied by an n:m pattern")
    pattern: Literal["unstructured", "2:4", "4:8"] = Field(
        "unstructured", description="n:m keeps n of every m consecutive input weights in each row")
    scope: Literal["per_module", "global"] = Field("per_module", description="l1_unstructured only: one threshold "
                                                                             "per layer, or one across all")
    targets: Targets = Field(description="nn.Linear modules to prune")
    sparsegpt: SparseGPTConfig | None = Field(None, description="sparsegpt only")

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.pattern == "unstructured" and self.sparsity is None:
            raise ValueError("unstructured pruning needs 'sparsity'")
        if self.pattern != "unstructured":
            n, m = (int(x) for x in self.pattern.split(":"))
            if self.sparsity is not None and abs(self.sparsity - (m - n) / m) > 1e-9:
                raise ValueError(f"pattern {self.pattern} prunes {(m - n) / m:g} of the weights; drop 'sparsity' "
                                 f"or set it to {(m - n) / m:g}")
            if self.method == "l1_unstructured":
                raise ValueError("l1_unstructured is unstructured: use method magnitude for n:m patterns")
        if self.scope == "global" and self.method != "l1_unstructured":
            raise ValueError("scope: global applies to l1_unstructured only")
        if self.sparsegpt is not None and self.method != "sparsegpt":
            raise ValueError("'sparsegpt' settings need method: sparsegpt")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")

    @property
    def streamable(self) -> bool:
        """Walks the model block by block (so it runs on a model streamed from disk)."""
        return self.needs_calibration

    def output_state(self, state: str) -> str:
        return "sparse"


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def _l1(modules: dict[str, torch.nn.Module], cfg: PruneConfig) -> None:
    if cfg.scope == "global":
        # One magnitude threshold across every selected weight: layers that matter less lose more.
        torch_prune.global_unstructured([(m, "weight") for m in modules.values()],
                                        pruning_method=torch_prune.L1Unstructured, amount=cfg.sparsity)
    else:
        for m in modules.values():
            torch_prune.l1_unstructured(m, "weight", amount=cfg.sparsity)
    for m in modules.values():
        torch_prune.remove(m, "weight")  # folds weight_orig * mask into a plain parameter


def _calibrated(model: torch.nn.Module, modules: dict[str, torch.nn.Module], cfg: PruneConfig,
                ctx: StageContext) -> tuple[dict, dict]:
    """Wanda / SparseGPT block by block: each block's statistics come from its own calibration inputs."""
    from compress.prune.sparsity import check_pattern, prune_linears

    check_pattern(modules, cfg.pattern)  # before anything changes
    sg = cfg.sparsegpt or SparseGPTConfig()
    details: dict = {}
    seq = ctx.sequencer(model, f"prune method {cfg.method}")
    for unit in seq.units(list(modules)):
        if not unit.restored:
            found = prune_linears(unit.root, {n: unit.root.get_submodule(n) for n in unit.names}, cfg.method,
                                  cfg.sparsity or 0.0, cfg.pattern, unit.loop, sg.block_size, sg.damp,
                                  one_group=bool(unit.prefix))
            unit.record = {unit.full(n): d for n, d in found.items()}
            ctx.fault_point()
        details.update(unit.record)
    return {n: details[n] for n in modules}, seq.stats()


@register_stage(PruneConfig)
def apply(model: torch.nn.Module, cfg: PruneConfig, ctx: StageContext) -> StageResult:
    from compress.prune.sparsity import prune_linears

    modules = select_modules(model, ctx.adapter, cfg.targets, kinds=(torch.nn.Linear,))
    details: dict = {}
    sequential = None
    if cfg.method == "l1_unstructured":
        _l1(modules, cfg)
    elif cfg.needs_calibration:
        details, sequential = _calibrated(model, modules, cfg, ctx)
    else:
        details = prune_linears(model, modules, cfg.method, cfg.sparsity or 0.0, cfg.pattern, None)
    ctx.fault_point()
    per_module = {name: round(_zero_fraction(m.weight), 6) for name, m in modules.items()}
    total = sum(m.weight.numel() for m in modules.values())
    zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
    result = {
        "method": cfg.method,
        "pattern": cfg.pattern,
        "scope": cfg.scope,
        "modules": len(modules),
        "target_sparsity": cfg.sparsity if cfg.pattern == "unstructured" else None,
        "achieved_sparsity": round(zeros / total, 6),
        "pruned_parameters": zeros,
        "sparsity_per_module": per_module,
    }
    if cfg.pattern != "unstructured":
        result["nm_valid"] = all(d["nm_valid"] for d in details.values())
        result["nm_invalid_modules"] = sorted(n for n, d in details.items() if not d["nm_valid"])
        result["speedup_expectation"] = ("none on CPU, in PyTorch eager or ONNX Runtime (dense kernels); "
                                         "only sparse tensor cores (Ampere+ GPUs) via TensorRT sparse tactics")
    if sequential:
        result["sequential"] = sequential
    return StageResult(model, result)
