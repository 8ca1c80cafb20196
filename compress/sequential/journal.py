"""A stage's progress, saved unit by unit, so that a killed stage resumes at the unit it was working on.

When the stage has finished a unit (a block, or the modules between block sequences), one safetensors file
holds the unit's tensors as the stage left them, which of its modules became INT8 / INT4 layers (class and
shape) and the stage's record of the unit (what goes into the manifest). The file is written atomically,
named by walk and unit, stamped with the stage's key (its config and the state it started from) and a
digest of its tensors. A resumed stage walks the model again: a unit whose file is valid is restored from it
instead of being recomputed, while the forward passes that carry activations on to the next unit still run,
so every later unit sees the inputs an uninterrupted run gave it and the artifacts come out byte for byte
the same. The expensive part of a unit (statistics, GPTQ, AWQ's search, SparseGPT) is never done twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.errors import ConfigError


def stage_key(config: dict[str, Any], state: str) -> str:
    """What a stage's saved progress must match to be used: its config and the state it starts from."""
    return hashlib.sha256((json.dumps(config, sort_keys=True) + "\n" + state).encode()).hexdigest()


def merge(into: dict[str, Any], record: dict[str, Any]) -> None:
    """Add a unit's record to a stage's running details: dicts update, lists extend, the rest is set."""
    for key, value in record.items():
        if isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        elif isinstance(value, list):
            into.setdefault(key, []).extend(value)
        else:
            into[key] = value


def _spec(module: nn.Module) -> dict[str, Any] | None:
    """How to rebuild a compressed layer before its tensors are loaded into it (None: not one)."""
    from compress.quant.int4 import Int4Linear
    from compress.quant.int8 import Int8Linear

    if not isinstance(module, Int8Linear | Int4Linear):
        return None
    base = {"in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None,
            "dtype": str(module.bias.dtype if module.bias is not None else torch.float32).removeprefix("torch.")}
    if isinstance(module, Int8Linear):
        return {"class": "Int8Linear", **base, "granularity": module.granularity,
                "act_quant": module.input_scale is not None, "act_dynamic": module.act_dynamic}
    return {"class": "Int4Linear", **base, "group_size": module.group_size, "symmetric": module.symmetric}


def _build(spec: dict[str, Any]) -> nn.Module:
    from compress.quant.int4 import Int4Linear
    from compress.quant.int8 import Int8Linear

    kwargs = {k: v for k, v in spec.items() if k != "class"}
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return (Int8Linear if spec["class"] == "Int8Linear" else Int4Linear)(**kwargs)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class Journal:
    """One stage's progress in `folder`; `key` identifies the stage and its starting state (a file with another
    key is not used). The stage's walks over the model (keep_float makes two) run one after another, each
    begun by `next_walk()` and journaled apart; `restored` counts the units put back in all of them."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key
        self.walk = 0
        self.restored = 0

    def next_walk(self) -> Journal:
        self.walk += 1
        return self

    def _file(self, unit: Any) -> Path:
        """walk<N>-<block path>, or for modules between block sequences (projector, lm_head: one unit each
        time the walk reaches them) walk<N>-outside-blocks-<first module>."""
        return self.folder / f"walk{self.walk}-{unit.prefix or f'outside-blocks-{unit.names[0]}'}.safetensors"

    @staticmethod
    def _scope(root: nn.Module, prefix: str, paths: list[str]) -> dict[str, nn.Module]:
        """The unit's modules by name relative to its root: a block's all; for the modules between block
        sequences, every module outside the blocks."""
        inside = tuple(f"{p}." for p in paths)
        return {n: m for n, m in root.named_modules()
                if prefix or not (n.startswith(inside) or n in paths)}

    @staticmethod
    def _state(scope: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for name, module in scope.items():
            for key, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is not None and key not in module._non_persistent_buffers_set:
                    state[f"{name}.{key}" if name else key] = t.detach()
        return state

    def save(self, unit: Any, paths: list[str]) -> None:
        """Write the finished unit (its tensors, its compressed layers' specs, `unit.record`) atomically."""
        scope = self._scope(unit.root, unit.prefix, paths)
        state = self._state(scope)
        seen: set[int] = set()
        tensors = {}
        for name, t in state.items():  # tied tensors are stored once each (safetensors refuses shared storage)
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in seen else t.contiguous()
            seen.add(ptr)
        meta = {"key": self.key, "sha256": _digest(tensors),
                "modules": json.dumps({n: s for n, m in scope.items() if (s := _spec(m)) is not None}),
                "record": json.dumps(unit.record)}
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self._file(unit)
        tmp = final.with_name(f".{final.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, final)

    def restore(self, unit: Any, paths: list[str]) -> dict[str, Any] | None:
        """Put the unit back as a finished run left it and return its record; None when there is no valid file
        for it (never written, another stage's, or damaged), and the unit is then computed again."""
        file = self._file(unit)
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), "pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except (OSError, ValueError, RuntimeError):
            return None
        if _digest(tensors) != meta.get("sha256"):
            return None
        for name, spec in json.loads(meta["modules"]).items():
            old = unit.root.get_submodule(name)
            unit.root.set_submodule(name, _build(spec).to(device="cpu").train(old.training))
        state = self._state(self._scope(unit.root, unit.prefix, paths))  # with the rebuilt layers
        if set(state) != set(tensors):  # the key matched, so this is not a stale file but a broken one
            raise ConfigError(f"{file}: the stage's saved progress does not fit the model's {unit.prefix or 'modules'}"
                              " (different tensors); delete the file to recompute that unit")
        with torch.no_grad():
            for name, t in tensors.items():
                state[name].copy_(t)
        self.restored += 1
        return json.loads(meta["record"])
