"""L1 magnitude pruning, made permanent: zeros stay in the weights, no hooks stay on the model."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn.utils import prune as torch_prune

from compress.arch import select_modules
from compress.registry import register_stage
from compress.stages.base import StageConfig, StageContext, StageResult, Targets


class PruneConfig(StageConfig):
    type: Literal["prune"]
    method: Literal["l1_unstructured"] = Field(description="zero the smallest-magnitude weights")
    sparsity: float = Field(gt=0.0, lt=1.0, description="fraction of the selected weights set to zero")
    scope: Literal["per_module", "global"] = Field("per_module", description="one threshold per layer, or one "
                                                                             "across every selected layer")
    targets: Targets = Field(description="nn.Linear modules to prune")

    def output_state(self, state: str) -> str:
        return "sparse"


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


@register_stage(PruneConfig)
def apply(model: torch.nn.Module, cfg: PruneConfig, ctx: StageContext) -> StageResult:
    modules = select_modules(model, ctx.adapter, cfg.targets, kinds=(torch.nn.Linear,))
    if cfg.scope == "global":
        # One magnitude threshold across every selected weight: layers that matter less lose more.
        torch_prune.global_unstructured(
            [(m, "weight") for m in modules.values()],
            pruning_method=torch_prune.L1Unstructured,
            amount=cfg.sparsity,
        )
    else:
        for m in modules.values():
            torch_prune.l1_unstructured(m, "weight", amount=cfg.sparsity)
    for m in modules.values():
        torch_prune.remove(m, "weight")  # folds weight_orig * mask into a plain parameter
    per_module = {name: round(_zero_fraction(m.weight), 6) for name, m in modules.items()}
    total = sum(m.weight.numel() for m in modules.values())
    zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
    return StageResult(model, {
        "method": cfg.method,
        "scope": cfg.scope,
        "modules": len(modules),
        "target_sparsity": cfg.sparsity,
        "achieved_sparsity": round(zeros / total, 6),
        "pruned_parameters": zeros,
        "sparsity_per_module": per_module,
    })
