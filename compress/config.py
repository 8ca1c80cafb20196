"""The recipe's shared types: the strict model base, which modules a stage targets, its gate, and the base of
every stage config.

A leaf module (pydantic only): the recipe, the gate checks, the adapters' module selection and the stages
all read these types, so they sit below all of them instead of inside `compress.stages`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Component = Literal["vision", "projector", "language", "lm_head"]


class Strict(BaseModel):
    """A recipe section: unknown keys are errors (a typo must not silently fall back to a default), and the
    loaded values are frozen (a stage cannot change the recipe another stage or the manifest reads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Targets(Strict):
    """Which modules a stage touches: components first, then include globs, then exclude globs.

    Patterns are `fnmatch` globs matched against the module's full name (e.g.
    `model.language_model.layers.0.mlp.up_proj`) and against its name inside the component
    (`layers.0.mlp.up_proj`).
    """

    components: list[Component] = Field(min_length=1, description="which parts of the model")
    include: list[str] = Field(default_factory=list, description="keep only modules matching one of these globs")
    exclude: list[str] = Field(default_factory=list, description="then drop modules matching one of these globs")


class Gate(Strict):
    """What retention the stage must keep, and what happens when it does not."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "anyOf": [{"required": ["min_retention"]}, {"required": ["max_kl"]}]})

    metric: Literal["exact_match", "token_agreement"] = Field(
        "exact_match", description="what min_retention applies to; must be in evaluation.metrics")
    min_retention: float | None = Field(default=None, gt=0.0, le=1.0, description="value / baseline must be at "
                                                                                   "least this")
    max_kl: float | None = Field(default=None, ge=0.0, description="logit_kl must be at most this (needs logit_kl "
                                                                   "measured)")
    on_fail: Literal["stop", "warn", "rollback"] = Field(
        "stop", description="stop: exit 3, report written, earlier stages kept; warn: keep the stage and go on; "
        "rollback: discard the stage, restore the previous state and go on")

    @model_validator(mode="after")
    def _has_threshold(self) -> Gate:
        if self.min_retention is None and self.max_kl is None:
            raise ValueError("a gate needs min_retention and/or max_kl")
        return self


class StageConfig(Strict):
    """Base of every stage config. Subclasses set `type: Literal[...]` and the class vars."""

    type: str
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                             description="checkpoint folder name, unique per recipe (default NN-type)")
    gate: Gate = Field(description="the retention this stage must keep")

    # Ordering rules, checked when the recipe loads (before any model is loaded).
    accepts: ClassVar[frozenset[str]] = frozenset({"float", "sparse"})
    requirement: ClassVar[str] = "float or sparse weights"

    def output_state(self, state: str) -> str:
        return state

    def check_after(self, earlier: list[StageConfig]) -> str | None:
        """Why this stage cannot follow `earlier` (e.g. a backend that cannot run their output), or None."""
        return None

    def check_model(self, config: Any) -> str | None:
        """Why this stage cannot run on a model with this transformers config, or None; asked before any
        weights load."""
        return None
