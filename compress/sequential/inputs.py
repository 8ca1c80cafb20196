"""The calibration set as model inputs: what every layer-sequential walk of a run replays, built once per run,
and once per search when runs share a cache folder (the same model, data, batch size and prompt give the
same inputs; they are stored as one safetensors file, exact in every dtype)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

FILE = "batches.safetensors"


def calibration_key(model_sha256: str, data_sha256: str, batch_size: int, prompt: str | None, adapter: str) -> str:
    import transformers

    parts = [model_sha256, data_sha256, batch_size, prompt, adapter, transformers.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def calibration_batches(adapter: Any, processor: Any, data: Any, batch_size: int, cache: Path | None = None,
                        key: str = "") -> list[dict[str, Any]]:
    """One dict of model inputs per batch of `data` (image + prompt records): every stage's walks reuse them
    instead of re-encoding the images. With `cache`, read from `cache/key` when another run stored them."""
    path = Path(cache) / key / FILE if cache is not None else None
    if path is not None and path.exists():
        try:
            return _unflatten(load_file(str(path)))
        except (OSError, SafetensorError, ValueError):
            pass  # unreadable (a foreign or damaged file): build them again
    total = -(-len(data) // batch_size)
    batches = [adapter.build_inputs(processor, [r.image for r in batch], [r.prompt for r in batch]).inputs
               for batch in tqdm(data.batches(batch_size), total=total, desc="calibration inputs", leave=False)]
    if path is not None and all(isinstance(v, torch.Tensor) for b in batches for v in b.values()):
        _store(path, batches)
    return batches


def _store(path: Path, batches: list[dict[str, Any]]) -> None:
    """Written once, atomically; a run that stored it first keeps its file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{i}/{name}": t.contiguous() for i, b in enumerate(batches) for name, t in b.items()}
    fd, tmp = tempfile.mkstemp(prefix=".batches.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"batches": str(len(batches))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unflatten(flat: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    batches: dict[int, dict[str, Any]] = {}
    for key, t in flat.items():
        i, name = key.split("/", 1)
        batches.setdefault(int(i), {})[name] = t
    return [batches[i] for i in sorted(batches)]
