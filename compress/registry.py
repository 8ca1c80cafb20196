"""The stage registry: a stage is one config class plus one `apply` function, keyed by `type`.

A leaf: stage modules register themselves here when imported; `compress.stages.catalog` imports the
built-in ones, so the registry never imports a stage back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from compress.config import StageConfig
from compress.stages.base import StageContext, StageResult

Apply = Callable[..., StageResult]


@dataclass(frozen=True)
class StageSpec:
    type: str
    config: type[StageConfig]
    apply: Callable[[object, StageConfig, StageContext], StageResult]


_STAGES: dict[str, StageSpec] = {}


def register_stage(config: type[StageConfig]) -> Callable[[Apply], Apply]:
    """Decorator for a stage's `apply(model, cfg, ctx) -> StageResult`."""
    (type_name,) = get_args(config.model_fields["type"].annotation)

    def wrap(fn: Apply) -> Apply:
        if type_name in _STAGES:
            raise RuntimeError(f"stage type {type_name!r} registered twice")
        _STAGES[type_name] = StageSpec(type_name, config, fn)
        return fn

    return wrap


def registered() -> dict[str, StageSpec]:
    """Every stage registered so far (the built-in ones once `compress.stages.catalog` is imported)."""
    return dict(_STAGES)
