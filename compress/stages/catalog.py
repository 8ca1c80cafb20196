"""The built-in stages, registered by importing their modules: what a recipe's `stages:` may name."""

from __future__ import annotations

from compress.registry import StageSpec, registered
from compress.stages import distill, engine, export, prune, quantize, shrink, tokens

BUILTIN = (prune, shrink, tokens, distill, quantize, export, engine)  # imported for their registration


def stages() -> dict[str, StageSpec]:
    return registered()


def get_stage(type_name: str) -> StageSpec:
    return registered()[type_name]
