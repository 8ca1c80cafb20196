"""The sequencer: block inputs captured once per sequence, finished sequences replayed, every block handed
to the stage as a `Unit` and its outputs recorded as the next block's inputs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import ConfigError
from compress.sequential.blocks import block_lists
from compress.sequential.journal import Journal
from compress.sequential.store import ActivationStore

LayerInputs = Literal["compressed", "original"]


class _Stop(Exception):
    """Raised by a patched block to end a model pass: nothing after that point is needed."""


@dataclass
class Unit:
    """One thing a stage calibrates and changes: a block (`prefix` its path) or, between block sequences,
    the whole model (`prefix` empty) with the selected modules that run there. `loop(root)` runs the
    calibration batches through `root` alone; `names` are relative to it."""

    root: nn.Module
    prefix: str
    names: list[str]
    loop: Callable[[nn.Module], None]
    record: dict[str, Any] = field(default_factory=dict)  # the stage's account of the unit (JSON), journaled
    restored: bool = False  # put back from the stage's saved progress: `record` is filled, nothing to do

    def full(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name


@dataclass
class _Call:
    """How a block was called besides its hidden states (masks, positions, per-block segments)."""

    positional: bool
    args: tuple
    kwargs: dict[str, Any]

    def invoke(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.positional:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, hidden_states=hidden, **self.kwargs)


def _split(path: str, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, _Call]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], _Call(True, args[1:], dict(kwargs))
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], _Call(False, args, rest)
    raise ConfigError(f"{path}: a block was called without hidden states as its first argument; it cannot be "
                      "calibrated layer by layer")


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def _mute(block: nn.Module) -> list[tuple[dict, int, Any]]:
    """Remove the hooks on `block` that are not transformers' own; what to put back."""
    muted = []
    for attr in _HOOK_DICTS:
        hooks = getattr(block, attr)
        for key, fn in list(hooks.items()):
            if not getattr(fn, "__module__", "").startswith("transformers."):
                muted.append((hooks, key, hooks.pop(key)))
    return muted


@dataclass
class Sequencer:
    """Layer-major calibration over `batches` (the model's keyword inputs, one dict per batch).

    `units(names)` yields the units holding selected modules, in execution order; it is single-use (a
    second sweep needs a new sequencer or `reset()`). `layer_inputs` says whether a block's calibration
    inputs come from the previous blocks as the stage left them (compressed) or as they were (original).
    `passengers` are batches that ride along without being calibrated on (the evaluation set): they go
    through every block as the stage left it, so `logits(k)` afterwards is the compressed model's answer
    to passenger k with every block loaded once. `before_block` / `after_block` load a block's weights and
    drop (or write) them again where the model is streamed from disk.
    """

    model: nn.Module
    batches: list[dict[str, Any]]
    store: ActivationStore
    layer_inputs: LayerInputs = "original"
    passengers: list[dict[str, Any]] = field(default_factory=list)
    before_block: Callable[[str, int, nn.Module], None] | None = None
    after_block: Callable[[str, int, nn.Module], None] | None = None
    finished: Callable[[Sequencer], None] | None = None  # called once every sequence has been walked
    progress: Callable[[str], None] | None = None  # one line per block walked (long runs say where they are)
    journal: Journal | None = None  # where finished units are saved and, on a resumed stage, restored from
    paths: list[str] = field(init=False)
    block_seconds: list[float] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.batches and not self.passengers:
            raise ConfigError("layer-sequential calibration needs at least one calibration batch")
        self.paths = block_lists(self.model)
        self._all = list(self.batches) + list(self.passengers)
        self.reset()

    def reset(self) -> None:
        self.done: list[str] = []
        self._calls: dict[str, list[dict[int, _Call]]] = {}
        self._batch, self._hit, self._next = 0, None, 0
        self.store.clear()

    # ---- model passes with patched blocks ---------------------------------------------------------

    def _key(self, path: str, what: str, b: int) -> str:
        return f"{path}.{what}.{b}"

    def _input(self, path: str, j: int, b: int) -> torch.Tensor:
        return self.store.get(self._key(path, "in" if j == 0 else f"out{j - 1}", b))

    def _stop(self, *args: Any, **kwargs: Any) -> Any:
        raise _Stop

    def _replay(self, path: str, j: int) -> Callable[..., torch.Tensor]:
        return lambda *args, **kwargs: self.store.get(self._key(path, f"out{j}", self._batch))

    def _record(self, path: str, j: int, n: int) -> Callable[..., torch.Tensor]:
        def record(*args: Any, **kwargs: Any) -> torch.Tensor:
            if self._hit is None:
                self._hit, self._next = path, 0
            if path != self._hit or j != self._next:
                raise ConfigError(f"{path}.{j} ran out of order (expected {self._hit}.{self._next}): its blocks "
                                  "are not called as a chain and cannot be calibrated layer by layer")
            hidden, call = _split(f"{path}.{j}", args, kwargs)
            calls = self._calls.setdefault(path, [{} for _ in range(n)])
            calls[j][self._batch] = call
            if j == 0:
                self.store.put(self._key(path, "in", self._batch), hidden)
            self._next += 1
            if j == n - 1:
                raise _Stop
            return hidden

        return record

    @contextmanager
    def _patched(self, record: bool) -> Iterator[None]:
        """Finished sequences replay their outputs; the others record their calls (`record`) or end the pass.
        A stage's own hooks on a block stay silent meanwhile (the block does not really run); transformers'
        output-capturing hooks still fire, so replayed blocks feed `hidden_states` (LLaVA's feature layer)."""
        patched: list[tuple[nn.Module, list[tuple[dict, int, Any]]]] = []
        try:
            for path in self.paths:
                blocks = self.model.get_submodule(path)
                for j, block in enumerate(blocks):
                    block.forward = (self._replay(path, j) if path in self.done
                                     else self._record(path, j, len(blocks)) if record else self._stop)
                    patched.append((block, _mute(block)))
            yield
        finally:
            for block, muted in patched:
                del block.forward
                for hooks, key, fn in muted:
                    hooks[key] = fn

    def _model_pass(self, b: int, record: bool = False) -> Any:
        self._batch, self._hit = b, None
        with self._patched(record), torch.inference_mode(), suppress(_Stop):
            return self.model(**self._all[b], use_cache=False)
        return None  # ended early by a patched block

    def _glue_loop(self, model: nn.Module) -> None:
        for b in range(len(self.batches)):
            self._model_pass(b)

    def logits(self, k: int) -> torch.Tensor:
        """Passenger k's logits from the blocks' recorded outputs (after the walk: every sequence replays)."""
        out = self._model_pass(len(self.batches) + k)
        return out.logits if hasattr(out, "logits") else out[0]

    def _block_loop(self, path: str, j: int) -> Callable[[nn.Module], None]:
        def loop(block: nn.Module) -> None:
            with torch.inference_mode():
                for b in range(len(self.batches)):
                    self._calls[path][j][b].invoke(block, self._input(path, j, b))

        return loop

    # ---- the walk ---------------------------------------------------------------------------------

    def _capture(self, which: range | None = None) -> str | None:
        """Record the next sequence's block calls for every batch (or `which`); its path, or None when none
        is left."""
        path = None
        for b in which if which is not None else range(len(self._all)):
            self._model_pass(b, record=True)
            if path is None:
                path = self._hit
                if path is None:
                    return None
            n = len(self.model.get_submodule(path))
            if self._hit != path or self._next != n:
                raise ConfigError(f"calibration batch {b} did not run {path} like batch 0 did")
        return path

    def _propagate(self, path: str, j: int, which: range) -> None:
        block = self.model.get_submodule(path)[j]
        with torch.inference_mode():
            for b in which:
                out = self._calls[path][j][b].invoke(block, self._input(path, j, b))
                if not isinstance(out, torch.Tensor):
                    raise ConfigError(f"{path}.{j} returned {type(out).__name__}, not hidden states: its "
                                      "sequence cannot be calibrated layer by layer")
                self.store.put(self._key(path, f"out{j}", b), out)

    def _glue_unit(self, glue: list[str]) -> Unit | None:
        """The selected modules outside any block that run before the next sequence (probed on one batch)."""
        if not glue:
            return None
        fired: set[str] = set()
        handles = [self.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: fired.add(n))
                   for n in glue]
        try:
            self._model_pass(0)
        finally:
            for h in handles:
                h.remove()
        local = [n for n in glue if n in fired]
        for n in local:
            glue.remove(n)
        return Unit(self.model, "", local, self._glue_loop) if local else None

    def _sequence(self, path: str, names: list[str]) -> Iterator[Unit]:
        calibration, everything = range(len(self.batches)), range(len(self._all))
        passengers = range(len(self.batches), len(self._all))
        original = self.layer_inputs == "original"
        for j, block in enumerate(self.model.get_submodule(path)):
            t0 = time.perf_counter()
            if self.before_block is not None:
                self.before_block(path, j, block)
            prefix = f"{path}.{j}"
            local = [n[len(prefix) + 1:] for n in names if n.startswith(f"{prefix}.")]
            if not local:
                self._propagate(path, j, everything)
            else:
                if original:  # calibration inputs from the block as it was; passengers see it compressed
                    self._propagate(path, j, calibration)
                yield from self._journaled(Unit(block, prefix, local, self._block_loop(path, j)))
                self._propagate(path, j, passengers if original else everything)
            if self.after_block is not None:
                self.after_block(path, j, block)
            self.block_seconds.append(time.perf_counter() - t0)
            if self.progress is not None:
                from compress import memory

                self.progress(f"{path}.{j}: {self.block_seconds[-1]:.1f} s, RSS {memory.rss_bytes() / 2**20:.0f} MiB "
                              f"(peak {memory.peak_rss_bytes() / 2**20:.0f} MiB)")
        self._calls.pop(path, None)

    def _journaled(self, unit: Unit) -> Iterator[Unit]:
        """The unit, restored from the journal when a killed attempt finished it; saved once the stage is done
        with it (the stage sets `unit.record` and skips its work on a restored unit)."""
        if self.journal is not None:
            record = self.journal.restore(unit, self.paths)
            if record is not None:
                unit.record, unit.restored = record, True
                if self.progress is not None:
                    self.progress(f"{unit.prefix or 'modules outside blocks'}: restored from the stage's progress")
        yield unit
        if self.journal is not None and not unit.restored:
            self.journal.save(unit, self.paths)

    def units(self, names: Iterable[str]) -> Iterator[Unit]:
        """Every unit holding some of `names` (full module names), in the order the model runs them."""
        names = list(names)
        glue = [n for n in names if not any(n.startswith(f"{p}.") for p in self.paths)]
        while True:
            if self.layer_inputs == "original":  # the next sequence sees the glue as it was
                path = self._capture()
                unit = self._glue_unit(glue)
                if unit:
                    yield from self._journaled(unit)
                    if path is not None and self.passengers:  # the evaluation sees the glue as the stage left it
                        self._capture(range(len(self.batches), len(self._all)))
            else:
                unit = self._glue_unit(glue)
                if unit:
                    yield from self._journaled(unit)
                path = self._capture()
            if path is None:
                break
            yield from self._sequence(path, names)
            self.done.append(path)
        if self.finished is not None:
            self.finished(self)
        if glue:
            shown = ", ".join(glue[:5]) + (f" (+{len(glue) - 5} more)" if len(glue) > 5 else "")
            raise ConfigError(f"calibration observed no activations for {len(glue)} modules: {shown}; the "
                              "calibration set is empty or these modules are not used by the model's forward pass")

    def sweep(self) -> None:
        """One layer-major pass over everything, changing nothing: hooks inside blocks see each batch once
        (modules outside blocks may run again in later capture passes)."""
        for _ in self.units([]):
            pass

    def stats(self) -> dict[str, Any]:
        s = sorted(self.block_seconds)
        restored = {"restored_units": self.journal.restored} if self.journal and self.journal.restored else {}
        return {"layer_inputs": self.layer_inputs, "sequences": list(self.paths), "blocks": len(s),
                "block_s_median": round(s[len(s) // 2], 4) if s else None, **self.store.stats(), **restored}
