"""`type: shrink`: structured pruning of the language model that really removes weights.

MLP channels, query heads (or whole KV groups) and decoder layers go; the checkpoint is smaller, its
config matches its weights and it reloads with plain `from_pretrained`. Importance comes from the
calibration activations (or weight magnitude, as a baseline); see `compress.prune.structured`. Structured
pruning without recovery loses accuracy: follow it with `type: distill`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.checkpoint import model_bytes
from compress.config import StageConfig
from compress.prune.structured import activation_importance, layout, magnitude_importance, plan, rebuild
from compress.registry import register_stage
from compress.stages.base import StageContext, StageResult
from compress.tokens.install import reinstall


class ShrinkConfig(StageConfig):
    type: Literal["shrink"]
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="activation: norms of calibration activations (Minitron); magnitude: weights only")
    mlp: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP intermediate channels removed in every "
                                                        "decoder layer")
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of query heads removed in every decoder layer")
    heads_from: Literal["queries", "groups"] = Field(
        "queries", description="queries: the same number from every KV group (KV cache unchanged); groups: whole "
        "KV groups with their query heads (KV cache shrinks too)")
    layers: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of decoder layers removed, lowest block "
                                                           "importance 1 - cos(x_in, x_out) first (activation only)")
    round_to: int = Field(8, ge=1, le=1024, description="the kept MLP width is a multiple of this")

    requirement = "float or pruned weights (shrink before quantizing)"

    @model_validator(mode="after")
    def _something(self) -> ShrinkConfig:
        if not (self.mlp or self.heads or self.layers):
            raise ValueError("set at least one of mlp, heads, layers above 0")
        if self.layers and self.importance == "magnitude":
            raise ValueError("layers are scored by block importance from activations: use importance: activation")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.importance == "activation"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@register_stage(ShrinkConfig)
def apply(model: torch.nn.Module, cfg: ShrinkConfig, ctx: StageContext) -> StageResult:
    language = ctx.adapter.component(model, "language")
    lay = layout(model, language)
    if cfg.importance == "activation":
        seq = ctx.sequencer(model, "shrink with importance: activation")
        imp = activation_importance(model, lay, lambda m: seq.sweep())
    else:
        imp = magnitude_importance(lay)
    p = plan(lay, imp, cfg.mlp, cfg.heads, cfg.heads_from, cfg.layers, cfg.round_to)
    lang_before, total_before = _count(language), _count(model)
    bytes_before = model_bytes(model)
    new = rebuild(model, ctx.adapter.components["language"], lay, p)
    reinstall(new, ctx.adapter)  # a `tokens` stage's reduction: the rebuilt model keeps it
    ctx.adapter.bind(new)
    ctx.fault_point()
    new_language = ctx.adapter.component(new, "language")
    lang_after, total_after = _count(new_language), _count(new)
    first = p.layers[0]
    details = {
        "importance": cfg.importance,
        "layers": {"before": len(lay.layers), "after": len(p.layers),
                   "removed": [i for i in range(len(lay.layers)) if i not in p.layers]},
        "mlp_width": {"before": lay.intermediate, "after": int(p.mlp[first].numel()) if p.mlp else lay.intermediate},
        "heads": {"before": lay.heads, "after": int(p.heads[first].numel()) if p.heads else lay.heads,
                  "from": cfg.heads_from},
        "kv_heads": {"before": lay.kv_heads, "after": int(p.kv_heads[first].numel()) if p.heads else lay.kv_heads},
        "head_dim": lay.head_dim,
        "language_parameters": {"before": lang_before, "after": lang_after,
                                "removed_fraction": round(1 - lang_after / lang_before, 6)},
        "parameters": {"before": total_before, "after": total_after,
                       "removed_fraction": round(1 - total_after / total_before, 6)},
        "model_bytes": {"before": bytes_before, "after": model_bytes(new)},
    }
    if cfg.importance == "activation":
        details["sequential"] = seq.stats()
    if imp.layers is not None:
        details["block_importance"] = [round(float(v), 6) for v in imp.layers]
    return StageResult(new, details)
