"""`type: tokens`: fewer image tokens per image, gated like any other stage.

The decoder reads every image token in prefill and attends to all of them at every later step; most are
redundant. `pool` averages windows of the patch grid; `select_merge` keeps the tokens the tower attends to
most and merges the rest by similarity (VisionZip). No weight changes: the reduction is installed in front
of the projector and recorded in the checkpoint's config (`compress.tokens.install`), prompts carry as many
placeholders as the tower emits (the adapter), and exports trace the reduced vision graph.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.config import StageConfig
from compress.errors import ConfigError
from compress.registry import register_stage
from compress.stages.base import StageContext, StageResult


class TokensConfig(StageConfig):
    type: Literal["tokens"]
    method: Literal["pool", "select_merge"] = Field(
        description="pool: mean of equal windows of the patch grid (2-D layout kept); select_merge: the most "
        "attended tokens kept, the rest merged by similarity (VisionZip)")
    keep: int | None = Field(None, ge=1, description="image tokens per image after the stage (pool: a square "
                                                     "whose side divides the grid's)")
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="or: the fraction of image tokens kept")
    dominant: int | None = Field(None, ge=0, description="select_merge: tokens kept as they are; the other "
                                 "keep - dominant are merged ones (default: 54 of every 64, VisionZip's split)")

    accepts = frozenset({"float", "sparse", "fake_quant"})
    requirement = "a PyTorch model (reduce tokens before exporting)"

    @model_validator(mode="after")
    def _one_count(self) -> TokensConfig:
        if (self.keep is None) == (self.ratio is None):
            raise ValueError("set exactly one of keep (a count) or ratio (a fraction)")
        if self.dominant is not None:
            if self.method != "select_merge":
                raise ValueError("dominant applies to method select_merge only")
            if self.keep is not None and self.dominant >= self.keep:
                raise ValueError("dominant must be below keep (at least one merged token)")
        return self


    def check_model(self, config: Any) -> str | None:
        """The count and method checked against the model's patch grid before any weights load."""
        from compress.tokens.install import record_for

        try:
            record_for(self.method, _tokens_in(config), self.keep, self.ratio, self.dominant)
        except ConfigError as e:
            return str(e)
        return None


def _tokens_in(cfg: Any) -> int:
    """Patch tokens per image as the projector receives them (LLaVA's 'default' strategy drops the CLS)."""
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(f"tokens: vision_feature_select_strategy {strategy!r} passes the CLS token on; the "
                          "stage reduces patch grids ('default')")
    vision = cfg.vision_config
    return (vision.image_size // vision.patch_size) ** 2


@register_stage(TokensConfig)
def apply(model: torch.nn.Module, cfg: TokensConfig, ctx: StageContext) -> StageResult:
    from compress.tokens.install import install, record_for, record_of

    if record_of(model) is not None:
        raise ConfigError("tokens: this model's image tokens are reduced already (one tokens stage per model)")
    tokens_in = _tokens_in(model.config)
    rec = record_for(cfg.method, tokens_in, cfg.keep, cfg.ratio, cfg.dominant)
    install(model, ctx.adapter, rec)
    ctx.adapter.bind(model)
    return StageResult(model, {
        **rec,
        "kept_fraction": round(rec["tokens"] / tokens_in, 6),
        "note": "prompts carry this many placeholders per image; plain transformers loads the checkpoint "
                "unreduced (it ignores config.compress_tokens)",
    })
