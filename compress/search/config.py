"""The recipe's `search:` block: which recipe fields vary (by path), how points are picked, what is minimized
and what every trial must keep. Checked against the recipe itself in `compress.search.space`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.config import Strict

# Recipe sections a search may vary: the baseline (model, evaluation, seed) is measured once and shared by every
# trial, and output / resources / threads change where and how fast, not what.
SEARCHABLE_ROOTS = ("stages", "calibration")


class Range(Strict):
    """A numeric interval: sampled (random, optuna) or, with `step`, enumerated (grid)."""

    min: float = Field(description="lower end (inclusive)")
    max: float = Field(description="upper end (inclusive)")
    step: float | None = Field(None, gt=0.0, description="grid spacing; required for algorithm grid")
    log: bool = Field(False, description="sample on a log scale (random, optuna; min must be > 0)")
    integer: bool = Field(False, description="integer values")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        if self.log and self.min <= 0:
            raise ValueError("log needs min > 0")
        return self

    def grid(self) -> list[float | int]:
        """min, min+step, ... up to max (inclusive, within a rounding tolerance)."""
        assert self.step is not None
        n = int((self.max - self.min) / self.step + 1e-9) + 1
        values = [round(self.min + k * self.step, 12) for k in range(n)]
        return [int(v) for v in values] if self.integer else values


class Objective(Strict):
    minimize: Literal["size", "e2e_ms", "ttft_ms", "decode_ms_per_step"] = Field(
        "size", description="size: bytes on disk of the trial's final artifact (the last kept export folder, else "
        "the last kept checkpoint); e2e_ms (image -> answer latency), ttft_ms, decode_ms_per_step: that artifact "
        "measured as `vlm-compress bench` measures it, after the trial passed")
    batch: int = Field(1, ge=1, description="latency objectives: questions per call")
    new_tokens: int = Field(16, ge=2, description="latency objectives: tokens generated per call (EOS ignored)")
    repeats: int = Field(3, ge=1, description="latency objectives: timed calls (median), after one warm-up")


class SearchConfig(Strict):
    """Trials are the recipe with one point of `space` applied; each runs through the normal pipeline, is gated
    at every stage (a failed gate ends the trial there), and the passing trial with the smallest objective
    wins."""

    space: dict[str, list[Any] | Range] = Field(
        min_length=1, description="recipe field path -> choices (a list) or a range. Paths: `stages.<stage "
        "name>.<field>[.<field>...]` (a mapping choice on a section is merged into it, null removes a field), "
        "`stages.<stage name>.present: [true, false]` (whether the stage runs), or `calibration.<field>`")
    algorithm: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination (ranges need step); random: independent draws; optuna: "
        "Optuna's TPE sampler, learning from finished trials (needs `pip install optuna`)")
    max_trials: int | None = Field(None, ge=1, description="random / optuna: how many trials (required); grid: "
                                   "at most this many combinations, refused if the grid is larger")
    max_concurrent: int = Field(2, ge=1, description="trials running at once (`--max-concurrent` overrides)")
    cpus_per_trial: int = Field(1, ge=1, description="CPUs Ray reserves per trial; torch threads are set to match")
    gpus_per_trial: float = Field(0.0, ge=0.0, description="GPUs Ray reserves per trial (TensorRT engine stages "
                                  "need one where engines are run)")
    max_failures: int = Field(2, ge=0, description="retries of a trial whose worker died (killed, out of memory, "
                              "node lost); a trial's own error is recorded and never retried")
    seed: int = Field(0, description="seeds random and optuna sampling")
    objective: Objective = Field(Objective(), description="what the winner minimizes among passing trials")
    min_retention: dict[Literal["exact_match", "token_agreement"], float] = Field(
        default_factory=dict, description="extra constraints on the final stage: metric -> least value / baseline "
        "(every stage's own gate applies too)")
    max_kl: float | None = Field(None, ge=0.0, description="extra constraint: the final stage's logit_kl at most "
                                 "this")

    @field_validator("space")
    @classmethod
    def _paths(cls, space: dict[str, Any]) -> dict[str, Any]:
        for path, axis in space.items():
            root = path.split(".")[0]
            if root not in SEARCHABLE_ROOTS:
                raise ValueError(f"{path!r}: a search varies stages.* or calibration.* (the baseline — model, "
                                 "evaluation, seed — is measured once and shared by every trial)")
            if isinstance(axis, list) and not axis:
                raise ValueError(f"{path!r}: an empty list of choices")
        return space

    @field_validator("min_retention")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if not 0.0 < x <= 1.0:
                raise ValueError(f"{k}: a retention in (0, 1], got {x}")
        return v

    @model_validator(mode="after")
    def _counts(self) -> SearchConfig:
        if self.algorithm != "grid" and self.max_trials is None:
            raise ValueError(f"algorithm {self.algorithm} needs max_trials")
        if self.algorithm == "grid":
            stepless = [p for p, a in self.space.items() if isinstance(a, Range) and a.step is None]
            if stepless:
                raise ValueError(f"algorithm grid needs a step on every range: {', '.join(stepless)}")
        return self
