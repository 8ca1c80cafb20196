"""Calibration activations by key: in memory up to a byte budget, spilled to safetensors files beyond it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ActivationStore:
    """Tensors kept in memory while their total stays within `budget` bytes; the rest are written to
    `folder` (one file per key, atomically) and read back when asked for."""

    def __init__(self, folder: Path, budget: int):
        self.folder, self.budget = Path(folder), budget
        self._memory: dict[str, torch.Tensor] = {}
        self._disk: dict[str, Path] = {}
        self.in_memory = 0
        self.peak_in_memory = 0
        self.spilled = 0  # bytes ever written to disk

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.drop(key)
        size = _nbytes(tensor)
        if self.in_memory + size <= self.budget:
            self._memory[key] = tensor
            self.in_memory += size
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({"t": tensor.detach().contiguous()}, str(tmp))
        os.replace(tmp, path)
        self._disk[key] = path
        self.spilled += size

    def get(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        if key in self._disk:
            return load_file(str(self._disk[key]))["t"]
        raise KeyError(key)

    def drop(self, key: str) -> None:
        if key in self._memory:
            self.in_memory -= _nbytes(self._memory.pop(key))
        path = self._disk.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        for key in list(self._memory) + list(self._disk):
            self.drop(key)

    def stats(self) -> dict[str, int]:
        return {"budget_bytes": self.budget, "peak_in_memory_bytes": self.peak_in_memory,
                "spilled_bytes": self.spilled}
