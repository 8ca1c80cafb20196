"""Recipes the benchmark scripts write: the data sections per model, one gated stage, the file itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(out: Path, name: str, doc: dict[str, Any]) -> Path:
    path = out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def one_stage_recipe(out: Path, name: str, model: str, stage: dict[str, Any], samples: int) -> Path:
    """`stage` on `model` with a gate that only warns: the bundled sets for zoo models; for the SmolLM2
    LLaVA (a folder built by compress.zoo.smollm2) its own evaluation set and prompt."""
    evaluation = {"source": str(ROOT / "calibration/shapes-vqa/eval"), "batch_size": 100, "max_new_tokens": 24,
                  "num_samples": samples}
    calibration = {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 128, "batch_size": 64}
    if not model.startswith("zoo:"):
        smol = yaml.safe_load((ROOT / "recipes/int8-smollm2.yaml").read_text())
        evaluation = {**smol["evaluation"], "source": str(Path(model).parent / "eval")}
        calibration.update(num_samples=64, batch_size=16)
    doc = {"name": name, "seed": 0, "model": {"source": model}, "calibration": calibration,
           "evaluation": evaluation, "stages": [{**stage, "gate": {"min_retention": 0.99, "on_fail": "warn"}}]}
    return write_recipe(out, name, doc)
