"""The stage registry: a stage is one config class plus one `apply` function, keyed by `type`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from compress.stages.base import StageConfig, StageContext, StageResult

Apply = Callable[..., StageResult]


@dataclass(frozen=True)
class StageSpec:
    type: str
    config: type[StageConfig]
    apply: Callable[[object, StageConfig, StageContext], StageResult]


_STAGES: dict[str, StageSpec] = {}
BUILTIN_STAGES = ("compress.stages.prune", "compress.stages.shrink", "compress.stages.distill",
                  "compress.stages.quantize", "compress.stages.export", "compress.stages.engine")


def register_stage(config: type[StageConfig]) -> Callable[[Apply], Apply]:
    """Decorator for a stage's `apply(model, cfg, ctx) -> StageResult`."""
    (type_name,) = get_args(config.model_fields["type"].annotation)

    def wrap(fn: Apply) -> Apply:
        if type_name in _STAGES:
            raise RuntimeError(f"stage type {type_name!r} registered twice")
        _STAGES[type_name] = StageSpec(type_name, config, fn)
        return fn

    return wrap


def stages() -> dict[str, StageSpec]:
    import importlib

    for module in BUILTIN_STAGES:  # importing a stage module registers it
        importlib.import_module(module)

    return dict(_STAGES)


def get_stage(type_name: str) -> StageSpec:
    return stages()[type_name]
