"""What every stage shares: its config base class, targets, gate, and the context it runs in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

    from compress.arch.base import Adapter

Component = Literal["vision", "projector", "language", "lm_head"]
# What state the model is in between stages; stages declare which states they accept.
ModelState = Literal["float", "sparse", "fake_quant", "quantized", "exported", "engine"]


class Strict(BaseModel):
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


@dataclass
class StageContext:
    """Everything a stage may use besides its config. Calibration is owned by the pipeline."""

    adapter: Adapter
    processor: Any
    workdir: Path
    seed: int
    forward_loop: Callable[[torch.nn.Module], None] | None = None
    threads: int | None = None  # CPU threads for runtimes the stage creates (None: their default)
    export_dir: Path | None = None  # the latest kept export stage's folder (what an engine stage builds from)
    calibration: Any = None  # records a stage trains on: its own `data:` set, else the calibration set
    baseline_source: str | None = None  # the source model folder (a distillation teacher)
    dtype: str = "float32"
    fault_point: Callable[[], None] = lambda: None  # called midway through the work (tests kill the process here)


@dataclass
class StageResult:
    """The (possibly new) model, details for the manifest, and for exports what to score and keep.

    `runner` (when set) is what the gate evaluates instead of the PyTorch model; `artifacts` is a
    folder the pipeline moves into the run folder when the stage is kept; `checks` are the stage's own
    `CheckResult`s (e.g. export parity), judged with the gate's on_fail like the accuracy checks.
    """

    model: torch.nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    runner: Any = None
    artifacts: Path | None = None
    checks: list[Any] = field(default_factory=list)
