"""A baseline measured once and adopted by other runs of the same model and evaluation (a search's trials).

The key names everything the baseline's scores and references depend on — the model's weights and load
settings, the evaluation set and its settings, the seed, the metrics the plan can compute — and nothing a
trial varies (stages, calibration). A run given another run's folder adopts its baseline only when the keys
match; the adopting manifest records where its baseline came from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from compress.artifacts import MANIFEST, atomic_dir
from compress.errors import ConfigError

REFERENCE = "baseline/reference.safetensors"


def baseline_key(recipe: Any, model_sha256: str, evaluation_sha256: str, plan: dict[str, Any]) -> str:
    parts = {"model": model_sha256, "model_config": recipe.model.model_dump(mode="json"),
             "evaluation": evaluation_sha256, "evaluation_config": recipe.evaluation.model_dump(mode="json"),
             "seed": recipe.seed, "not_computed": sorted(plan.get("metrics_not_computed", {}))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def adopt(run_dir: Any, source: Path, key: str) -> dict[str, Any]:
    """Copy `source`'s baseline references into `run_dir` and return its baseline record (with `shared_from`);
    a source measured for another model or evaluation is refused."""
    source = Path(source)
    try:
        record = json.loads((source / MANIFEST).read_text())["baseline"]
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"{source}: no measured baseline to share ({e})") from None
    if record.get("key") != key:
        raise ConfigError(f"{source}: its baseline was measured for another model, evaluation or seed (key "
                          f"{str(record.get('key'))[:12]} vs {key[:12]}); measure this run's own")
    with atomic_dir(run_dir.path("baseline")) as tmp:
        shutil.copyfile(source / REFERENCE, tmp / "reference.safetensors")
    return {**record, "shared_from": str(source.resolve())}
