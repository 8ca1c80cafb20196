"""What a stage runs with and returns: its context (adapter, processor, calibration) and its result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.arch.base import Adapter
from compress.errors import ConfigError
from compress.sequential import ActivationStore, Journal, Sequencer


@dataclass
class StageContext:
    """Everything a stage may use besides its config. Calibration is owned by the pipeline."""

    adapter: Adapter
    processor: Any
    workdir: Path
    seed: int
    calibration_batches: list[dict[str, Any]] | None = None  # the calibration set as model inputs, one per batch
    layer_inputs: str = "original"  # a block calibrates on the original or the compressed previous blocks
    activation_budget: int = 1 << 62  # bytes of calibration activations kept in memory; the rest spill to disk
    stream: Any = None  # a `compress.sequential.stream.Stream` where the model is streamed from disk
    passengers: list[dict[str, Any]] = field(default_factory=list)  # evaluation inputs carried by streamed walks
    progress: Callable[[str], None] | None = None  # where a streamed walk reports each block
    threads: int | None = None  # CPU threads for runtimes the stage creates (None: their default)
    export_dir: Path | None = None  # the latest kept export stage's folder (what an engine stage builds from)
    calibration: Any = None  # records a stage trains on: its own `data:` set, else the calibration set
    baseline_source: str | None = None  # the source model folder (a distillation teacher)
    dtype: str = "float32"
    # a runner's teacher-forced top-1 / log-probabilities at the evaluation set's answer positions (the
    # evaluator's `answer_logits`): an export compares its graphs with its PyTorch model there
    answer_logits: Callable[[Any], Any] | None = None
    fault_point: Callable[[], None] = lambda: None  # called midway through the work (tests kill the process here)
    stage_key: str = ""  # the stage's config and starting state: its saved progress is used only under this key
    journal: Journal | None = field(default=None, init=False)  # the stage's saved progress (with a stage_key)

    def __post_init__(self) -> None:
        if self.stage_key:
            self.journal = Journal(self.workdir / "progress", self.stage_key)

    def sequencer(self, model: torch.nn.Module, what: str) -> Sequencer:
        """A layer-sequential walk of `model` over the calibration set (`what` names the stage in errors)."""
        if not self.calibration_batches and self.stream is None:
            raise ConfigError(f"{what} needs a 'calibration' data section")
        store = ActivationStore(self.workdir / "activations", self.activation_budget)
        journal = self.journal.next_walk() if self.journal is not None else None
        if self.stream is None:
            return Sequencer(model, self.calibration_batches, store, self.layer_inputs,  # type: ignore[arg-type]
                             progress=self.progress, journal=journal)
        out = self.workdir / f"walk-{self.stream.walks + 1}"
        before, after = self.stream.hooks(out)
        return Sequencer(model, self.calibration_batches or [], store, self.layer_inputs,  # type: ignore[arg-type]
                         self.passengers, before, after, lambda seq: self.stream.walked(seq, out), self.progress,
                         journal)


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
