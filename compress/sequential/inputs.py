"""The calibration set as model inputs: what every layer-sequential walk of a run replays."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def calibration_batches(adapter: Any, processor: Any, data: Any, batch_size: int) -> list[dict[str, Any]]:
    """One dict of model inputs per batch of `data` (image + prompt records), built once per run: every
    stage's walks reuse them instead of re-encoding the images."""
    total = -(-len(data) // batch_size)
    return [adapter.build_inputs(processor, [r.image for r in batch], [r.prompt for r in batch]).inputs
            for batch in tqdm(data.batches(batch_size), total=total, desc="calibration inputs", leave=False)]
