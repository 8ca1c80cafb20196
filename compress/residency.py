"""Where a run's model lives: resident in memory, or streamed from disk block by block. The pipeline asks
this module to load a state, score it and keep it, and never branches on which it is.

Resident: `load_checkpoint`, a `TorchRunner` (generation and teacher-forced logits), `save_checkpoint`.
Streamed (`compress.plan` decided it): a skeleton with the blocks on disk (`compress.sequential.stream`);
the baseline is one read-only walk carrying the evaluation inputs, a stage's own walk carries them through
its compressed blocks, its checkpoint is the walk's shards plus the resident modules, moved into place by
one rename.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from compress.arch.base import DTYPES
from compress.artifacts import atomic_dir
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.plan import Plan, generation_fits
from compress.runtime.torch_runner import TorchRunner, position_ids
from compress.sequential import ActivationStore, Sequencer
from compress.sequential.stream import Stream, StreamedRunner
from compress.stages.base import StageContext


def _log(msg: str) -> None:
    print(f"[vlm-compress] {msg}", file=sys.stderr, flush=True)


class Resident:
    """The whole model in memory."""

    streamed = False
    reserve = 0  # bytes a stage needs besides the resident model and its activations

    def __init__(self, adapter: Any, dtype: str, trust_remote_code: bool):
        self.adapter, self.dtype, self.trust = adapter, dtype, trust_remote_code

    def load(self, folder: str) -> tuple[torch.nn.Module, Any]:
        return load_checkpoint(folder, self.adapter, self.dtype, self.trust)

    def baseline_runner(self, model: torch.nn.Module, processor: Any, evaluator: Any, workdir: Path,
                        budget: int) -> Any:
        return TorchRunner.for_adapter(model, self.adapter, processor)

    def prepare(self, ctx: StageContext, evaluator: Any) -> None:
        """Nothing to add: stages walk the resident model."""

    def stage_runner(self, model: torch.nn.Module, processor: Any) -> Any:
        return TorchRunner.for_adapter(model, self.adapter, processor)

    def keep(self, model: torch.nn.Module, processor: Any, dest: Path) -> None:
        with atomic_dir(dest) as tmp:
            save_checkpoint(model, processor, tmp)


class Streamed(Resident):
    """Blocks on disk until their turn; at most one block and the modules outside blocks in memory."""

    streamed = True

    def __init__(self, adapter: Any, dtype: str, trust_remote_code: bool, max_shard_bytes: int, plan: Plan):
        super().__init__(adapter, dtype, trust_remote_code)
        self.max_shard_bytes, self.budget_bytes = max_shard_bytes, plan.budget_bytes
        self.plan_model_bytes, self.baseline_generation = plan.model_bytes, plan.baseline_generation()
        self.stream: Stream | None = None
        self._passengers: list[dict[str, Any]] | None = None
        self.progress = _log

    @property
    def reserve(self) -> int:  # type: ignore[override]
        """The block being worked on, two copies of it (quantized layers beside it, rounding's working copies)
        and the shard being filled."""
        return 3 * self.stream.block_bytes() + self.max_shard_bytes if self.stream else 0

    def load(self, folder: str) -> tuple[torch.nn.Module, Any]:
        self.stream = Stream.open(folder, DTYPES[self.dtype], self.trust, self.max_shard_bytes)
        processor = self.adapter.load_processor(folder, trust_remote_code=self.trust)
        processor.tokenizer.padding_side = "left"
        self.adapter.bind(self.stream.model)
        return self.stream.model, processor

    def passengers(self, evaluator: Any) -> list[dict[str, Any]]:
        """The evaluation's teacher-forced inputs, with the positions `TorchRunner.logits` would pass."""
        if self._passengers is None:
            self._passengers = [{**x, **({"position_ids": position_ids(x["attention_mask"])}
                                         if self.adapter.explicit_positions else {})}
                                for x in evaluator.teacher_forced_inputs()]
        return self._passengers

    def baseline_runner(self, model: torch.nn.Module, processor: Any, evaluator: Any, workdir: Path,
                        budget: int) -> Any:
        before, after = self.stream.hooks(None)
        seq = Sequencer(model, [], ActivationStore(workdir / "activations", budget), "compressed",
                        self.passengers(evaluator), before, after, progress=self.progress)
        seq.sweep()
        return self._runner(seq, self.stream.state, processor, self.baseline_generation, self.plan_model_bytes)

    def prepare(self, ctx: StageContext, evaluator: Any) -> None:
        ctx.stream, ctx.passengers, ctx.progress = self.stream, self.passengers(evaluator), self.progress

    def stage_runner(self, model: torch.nn.Module, processor: Any) -> Any:
        """Teacher-forced scores from the stage's walk; generation from its checkpoint loaded whole, where the
        compressed model (its bytes as held in memory, known from the skeleton's shapes) fits the budget."""
        self.stream.finish(processor, self.stream.state)
        held = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
        return self._runner(self.stream.last, self.stream.state, processor,
                            generation_fits(held, self.budget_bytes), held)

    def _runner(self, seq: Sequencer, folder: Path, processor: Any, why: str | None, held: int) -> StreamedRunner:
        if why is not None:
            return StreamedRunner(seq, not_computed={"exact_match": why})

        def generator() -> TorchRunner:
            self.progress(f"loading {folder.name} whole ({held / 2**30:.2f} GB in memory) to generate")
            loaded, _ = load_checkpoint(folder, self.adapter, self.dtype, self.trust)
            return TorchRunner.for_adapter(loaded, self.adapter, processor)

        return StreamedRunner(seq, generator)

    def keep(self, model: torch.nn.Module, processor: Any, dest: Path) -> None:
        if dest.exists():  # left by a killed attempt; the manifest never claimed it
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.stream.state, dest)  # same file system: one rename
        self.stream.state = dest


def holder(plan: Plan, adapter: Any, recipe: Any) -> Resident:
    """The residency a run's plan chose, for its model dtype and remote-code permission; a streamed run's
    shards (one is in memory while it fills) are at most an eighth of the budget."""
    r = recipe
    if plan.streamed:
        shard = min(int(r.output.max_shard_gb * 2**30), plan.budget_bytes // 8)
        return Streamed(adapter, r.model.dtype, r.model.trust_remote_code, shard, plan)
    return Resident(adapter, r.model.dtype, r.model.trust_remote_code)
