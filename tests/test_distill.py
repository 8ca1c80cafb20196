"""`type: distill`: a pruned model trained back toward its dense teacher; pruning masks survive training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compress.cli import main
from compress.errors import RecipeError
from compress.prune.sparsity import nm_valid
from compress.recipe import load_recipe

ROOT = Path(__file__).parent.parent
PRUNE = {"type": "prune", "name": "wanda", "method": "wanda", "pattern": "2:4",
         "targets": {"components": ["language"]}, "gate": {"min_retention": 0.1, "on_fail": "warn"}}
DISTILL = {"type": "distill", "name": "distill", "steps": 40, "lr": 1.0e-3, "batch_size": 32,
           "gate": {"min_retention": 0.5}}


def _recipe(tmp: Path, stages: list[dict], calibration: bool = True) -> Path:
    doc = {"name": "distill-test", "seed": 0, "model": {"source": "zoo:shapes-vqa"},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 100,
                          "batch_size": 100, "max_new_tokens": 24},
           "stages": stages}
    if calibration:
        doc["calibration"] = {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 128,
                              "batch_size": 64}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_distillation_recovers_a_2_4_model_and_keeps_its_zeros(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, [PRUNE, DISTILL])), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    pruned, distilled = m["stages"]
    d = distilled["details"]
    assert d["masks_intact"] and d["masks_kept"] == 28 and d["steps"] == 40
    assert d["teacher_kl_after"] < 0.5 * d["teacher_kl_before"]
    assert d["teacher_top1_after"] >= d["teacher_top1_before"]
    assert d["trainable_parameters"] > 0 and d["frozen"] == ["vision", "projector", "embeddings"]
    assert distilled["metrics"]["logit_kl"] < pruned["metrics"]["logit_kl"]
    assert distilled["metrics"]["exact_match"] >= pruned["metrics"]["exact_match"]
    state = load_file(str(out / distilled["checkpoint"] / "model.safetensors"))
    weights = [v for k, v in state.items() if "language_model" in k and k.endswith("proj.weight")]
    assert len(weights) == 28 and all(nm_valid(w, 2, 4) for w in weights)  # still 2:4 after training
    before = load_file(str(out / pruned["checkpoint"] / "model.safetensors"))
    vision = [k for k in state if "vision_tower" in k]
    assert vision and all(torch.equal(state[k], before[k]) for k in vision)  # frozen by default


@pytest.mark.parametrize(("stages", "calibration", "needle"), [
    ([{"type": "quantize", "scheme": "nf4", "targets": {"components": ["language"]},
       "gate": {"min_retention": 0.5}}, DISTILL], True, "'distill' stage cannot run after a 'quantize' stage"),
    ([{"type": "export", "format": "onnx", "gate": {"min_retention": 0.5}}, DISTILL], True,
     "'distill' stage cannot run after a 'export' stage"),
    ([DISTILL], False, "needs a 'calibration' section"),
    ([{**DISTILL, "loss": {"temperature": 0}}], True, "stages[0].loss.temperature"),
    ([{**DISTILL, "freeze": ["decoder"]}], True, "stages[0].freeze[0]"),
])
def test_distill_ordering_and_field_errors(tmp_path, stages, calibration, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, stages, calibration))
    assert needle in str(e.value)


def test_distill_data_replaces_calibration_and_is_read_before_anything_is_written(tmp_path):
    from compress.stages.distill import _lr_factor

    data = {"source": str(ROOT / "calibration/shapes-vqa/distill"), "num_samples": 64}
    loaded = load_recipe(_recipe(tmp_path, [{**DISTILL, "data": data}], calibration=False)).recipe
    assert loaded.calibration is None  # no calibration needed: the stage trains on its own set
    assert loaded.stages[0].data.source == data["source"] and loaded.stages[0].data.num_samples == 64
    out = tmp_path / "run"
    missing = {**DISTILL, "data": {"source": str(tmp_path / "nowhere")}}
    assert main(["run", str(_recipe(tmp_path, [missing], calibration=False)), "--out", str(out)]) != 0
    assert not out.exists()
    # warm-up, then cosine to zero (or constant)
    assert _lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1) and _lr_factor(10, 10, 100, "cosine") == 1.0
    assert _lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5) and _lr_factor(99, 10, 100, "cosine") < 0.01
    assert _lr_factor(99, 10, 100, "constant") == 1.0


def test_distillation_after_int8_moves_codes_not_scales_and_keeps_2_4(tmp_path):
    """Straight-through training on the frozen grid: same scales, new codes, 2:4 zeros kept, KL down."""
    int8 = {"type": "quantize", "name": "int8", "scheme": "int8", "targets": {"components": ["language"]},
            "weights": {"granularity": "per_tensor"}, "activations": {"calibration": "minmax"},
            "gate": {"min_retention": 0.1, "on_fail": "warn"}}
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, [PRUNE, int8, DISTILL])), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    _, quantized, distilled = m["stages"]
    d = distilled["details"]
    assert d["int8_layers"] == 28 and d["masks_intact"] and 0 < d["int8_codes_changed"] < 0.5
    assert d["teacher_kl_after"] < d["teacher_kl_before"]
    before = load_file(str(out / quantized["checkpoint"] / "model.safetensors"))
    after = load_file(str(out / distilled["checkpoint"] / "model.safetensors"))
    scales = [k for k in before if k.endswith(("weight_scale", "input_scale"))]
    assert len(scales) == 56 and all(torch.equal(before[k], after[k]) for k in scales)  # the grid is frozen
    codes = [k for k in after if "language_model" in k and k.endswith("proj.weight")]
    assert len(codes) == 28 and all(after[k].dtype == torch.int8 and nm_valid(after[k].float(), 2, 4) for k in codes)
    assert any(not torch.equal(before[k], after[k]) for k in codes)
