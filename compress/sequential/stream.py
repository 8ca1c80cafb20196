"""A model streamed from disk through a run: the skeleton with everything outside the blocks resident, the
folder the blocks are read from, one writer per walk, the finished stage checkpoint and the runner that
scores it from the walk's recorded outputs.

Each walk reads every block from the current state folder (the source, or the previous walk's output)
and writes it, as the stage left it, into a new folder of shards; so changes a first walk makes (the
SmoothQuant folds of a keep_float sensitivity sweep) reach the second, and no block is ever held with
another. The checkpoint of a stage is its last walk's folder plus the resident modules, the config and
the processor.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import memory
from compress.errors import ConfigError
from compress.sequential.blocks import block_lists
from compress.sequential.runner import Sequencer
from compress.sequential.shards import ShardWriter
from compress.sequential.weights import WeightSource, empty_model, offload, onload, onload_outside

BlockHook = Callable[[str, int, nn.Module], None]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a module stores in a checkpoint: INT8 / INT4 layers in compressed-tensors' tensors."""
    from compress.quant.ct_checkpoint import compressed_state

    return compressed_state(module, module.state_dict())


@dataclass
class Stream:
    """The streamed model of a run; `walk()` gives a stage's sequencer hooks, `finish()` its checkpoint."""

    model: nn.Module
    state: Path
    dtype: torch.dtype
    max_shard_bytes: int = 1 << 30
    walks: int = 0
    bytes_read: int = 0
    last: Sequencer | None = field(default=None, repr=False)
    _writer: ShardWriter | None = field(default=None, repr=False)

    @classmethod
    def open(cls, folder: str | Path, dtype: torch.dtype, trust_remote_code: bool = False,
             max_shard_bytes: int = 1 << 30) -> Stream:
        memory.return_freed_memory()
        model = empty_model(folder, dtype, trust_remote_code)
        source = WeightSource(folder).rename_for(model)
        stream = cls(model, Path(folder), dtype, max_shard_bytes)
        stream.bytes_read += onload_outside(model, block_lists(model), source, dtype)
        return stream

    def block_bytes(self) -> int:
        """The largest block's bytes in memory (parameters and buffers, as loaded)."""
        return max((sum(t.numel() * t.element_size() for t in b.state_dict().values())
                    for p in block_lists(self.model) for b in self.model.get_submodule(p)), default=0)

    def hooks(self, out: Path | None) -> tuple[BlockHook, BlockHook]:
        """(before_block, after_block) for one walk: read each block from the state folder; afterwards write
        it into `out` (None: a read-only sweep) and drop it."""
        source = WeightSource(self.state).rename_for(self.model)
        writer = None
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
            writer = ShardWriter(out, self.max_shard_bytes)
        self._writer = writer

        def before(path: str, j: int, block: nn.Module) -> None:
            self.bytes_read += onload(block, f"{path}.{j}", source, self.dtype)

        def after(path: str, j: int, block: nn.Module) -> None:
            if writer is not None:
                writer.add({f"{path}.{j}.{k}": v for k, v in _state(block).items()})
            offload(block)
            memory.trim()

        return before, after

    def walked(self, seq: Sequencer, out: Path | None) -> None:
        """A walk is over: its folder (complete for the blocks) is the state the next walk reads."""
        self.last = seq
        if out is not None and self._writer is not None:
            self._writer.close()
            self.state = out
            self.walks += 1

    def finish(self, processor: Any, folder: Path) -> None:
        """The stage checkpoint in `folder` (the last walk's): the resident modules' tensors added, the config
        (with compressed-tensors' quantization_config where layers are INT8 / INT4) and the processor."""
        from compress.checkpoint import save_processor
        from compress.quant.ct_checkpoint import compressed_state, quantization_config

        if self.state != folder or not (folder / "model.safetensors.index.json").exists():
            raise ConfigError("a streamed stage must walk the model before its checkpoint is written")
        inside = tuple(f"{p}." for p in block_lists(self.model))
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(inside)}
        resident = compressed_state(self.model, state)
        ptrs = {}
        for k, v in list(resident.items()):  # tied weights (lm_head = embeddings) are stored once
            if v.data_ptr() in ptrs and v.data_ptr() != 0:
                del resident[k]
            ptrs.setdefault(v.data_ptr(), k)
        writer = ShardWriter.reopen(folder, self.max_shard_bytes)
        writer.add(resident)
        writer.close()
        self.model.config.save_pretrained(folder)
        qconfig = quantization_config(self.model)
        if qconfig is not None:
            config_file = folder / "config.json"
            config = json.loads(config_file.read_text())
            config["quantization_config"] = qconfig
            tmp = config_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, config_file)
        save_processor(processor, folder)


class StreamedRunner:
    """The evaluator's runner over a walk's passengers: teacher-forced logits from the recorded block outputs
    (every block was loaded once for calibration and evaluation together). Generation goes to `generator`
    (a runner over the stage's checkpoint loaded whole, made at first use) where the compressed model fits
    the budget; `not_computed` says which metrics the evaluator leaves out, and why."""

    backend = "torch (streamed)"

    def __init__(self, seq: Sequencer, generator: Callable[[], Any] | None = None,
                 not_computed: dict[str, str] | None = None):
        self.seq = seq
        self._make, self._generator = generator, None
        self.not_computed = dict(not_computed or {})

    def _index(self, inputs: dict[str, Any]) -> int:
        for k, p in enumerate(self.seq.passengers):
            if all(n in p and torch.equal(p[n], v) for n, v in inputs.items()):
                return k
        raise ConfigError("the streamed evaluation was asked for inputs its walk did not carry")

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.seq.logits(self._index(inputs)).float()

    def generate(self, inputs: dict[str, Any], max_new_tokens: int) -> list[list[int]]:
        if self._make is None:
            raise ConfigError("generation needs the whole model in memory; this streamed model is scored "
                              "teacher-forced")
        if self._generator is None:
            self._generator = self._make()
        return self._generator.generate(inputs, max_new_tokens)

    def close(self) -> None:
        """Drop the loaded model (its memory goes back before the next stage)."""
        import gc

        self._generator = None
        gc.collect()
        memory.trim()
