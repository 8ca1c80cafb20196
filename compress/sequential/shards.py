"""A checkpoint written as it is made: safetensors shards filled tensor by tensor, each file written
atomically once full, and the index transformers reads (`model.safetensors.index.json`) at the end.

Nothing is assembled in memory beyond one shard; a folder whose index is missing is unfinished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """`add(tensors)` as blocks finish, `close()` once: shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own), named in write order."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30):
        self.folder, self.max = Path(folder), max_shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._size = 0
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.shards = 0

    @classmethod
    def reopen(cls, folder: Path, max_shard_bytes: int = 2 << 30) -> ShardWriter:
        """A writer that goes on after the shards a closed writer left in `folder` (its index is rewritten)."""
        writer = cls(folder, max_shard_bytes)
        index = json.loads((Path(folder) / INDEX).read_text())
        writer.weight_map = dict(index["weight_map"])
        writer.total = int(index["metadata"]["total_size"])
        writer.shards = len(set(writer.weight_map.values()))
        return writer

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.weight_map or name in self._pending:
                raise ValueError(f"tensor {name} written twice")
            if self._pending and self._size + _nbytes(t) > self.max:
                self._flush()
            self._pending[name] = t.detach().contiguous()
            self._size += _nbytes(t)

    def _flush(self) -> None:
        if not self._pending:
            return
        self.shards += 1
        name = f"model-{self.shards:05d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_UMASK)  # as any other file the run writes
        os.replace(tmp, self.folder / name)
        self.weight_map.update({k: name for k in self._pending})
        self.total += self._size
        self._pending, self._size = {}, 0

    def close(self) -> None:
        self._flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        tmp = self.folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.folder / INDEX)
