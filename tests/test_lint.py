"""The deploy lint: each rule on a folder that breaks it, fixes applied where they can be, and a run whose source
carries `use_cache: false` writing artifacts with it corrected (or flagged when the recipe keeps it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from compress.lint import lint_folder
from compress.zoo import MODELS


def _broken_model(tmp: Path) -> Path:
    """The bundled model with the fine-tuning leftovers the lint looks for."""
    folder = tmp / "model"
    shutil.copytree(MODELS["shapes-vqa"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["use_cache"] = False
    (folder / "config.json").write_text(json.dumps(config))
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.pop("pad_token_id", None)
    gen["use_cache"] = False
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def _rules(found: list[dict]) -> list[tuple[str, str, str, bool]]:
    return sorted((f["rule"], f["file"], f["key"], f["fixed"]) for f in found)


def test_use_cache_and_generation_ids_are_found_and_fixed(tmp_path):
    folder = _broken_model(tmp_path)
    before = {f: (folder / f).read_bytes() for f in ("config.json", "generation_config.json")}
    found = lint_folder(folder)
    assert _rules(found) == [("generation_ids", "generation_config.json", "pad_token_id", False),
                             ("use_cache", "config.json", "text_config.use_cache", False),
                             ("use_cache", "generation_config.json", "use_cache", False)]
    assert {f: (folder / f).read_bytes() for f in before} == before  # report only: nothing written
    assert {f["rule"]: f["not_fixed"] for f in found}["use_cache"] == "output.deploy_fix is false"
    fixed = lint_folder(folder, fix=True)
    assert all(f["fixed"] for f in fixed) and len(fixed) == 3
    assert json.loads((folder / "config.json").read_text())["text_config"]["use_cache"] is True
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["use_cache"] is True and gen["pad_token_id"] == json.loads(
        (folder / "config.json").read_text())["pad_token_id"]
    assert lint_folder(folder) == []


def test_a_missing_chat_template_is_named(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(MODELS["shapes-vqa"], folder)
    assert lint_folder(folder) == []
    (folder / "chat_template.jinja").unlink()
    (found,) = lint_folder(folder, fix=True)
    assert (found["rule"], found["fixed"]) == ("chat_template", False) and "llava prompts" in found["detail"]


def test_export_rules_name_reduced_tokens_and_mixed_dtypes(tmp_path):
    def io(dtype_features: str) -> dict:
        return {"vision": {"inputs": [], "outputs": [{"name": "image_features", "dtype": dtype_features}]},
                "embed": {"inputs": [{"name": "image_features", "dtype": "float32"}],
                          "outputs": [{"name": "inputs_embeds", "dtype": "float32"}]},
                "decoder": {"inputs": [{"name": "inputs_embeds", "dtype": "float32"},
                                       {"name": "past_key_values.0.key", "dtype": "float32"}], "outputs": []}}

    meta = {"format": "compress-onnx", "model_type": "llava", "io": io("float32"),
            "token_reduction": {"method": "pool", "tokens_in": 16, "tokens": 4}}
    (tmp_path / "export.json").write_text(json.dumps(meta))
    (found,) = lint_folder(tmp_path)
    assert found["rule"] == "image_tokens" and "emits 4 tokens per image, the processor expands 16" in found["detail"]
    meta.update(io=io("float16"), token_reduction=None)
    (tmp_path / "export.json").write_text(json.dumps(meta))
    (found,) = lint_folder(tmp_path)
    assert found["rule"] == "dtypes" and "vision.image_features float16" in found["detail"]


@pytest.mark.parametrize("deploy_fix", [True, False], ids=["fix", "keep"])
def test_a_run_corrects_what_its_source_carried_or_flags_it(tmp_path, capsys, deploy_fix):
    from compress.cli import main

    source = _broken_model(tmp_path)
    doc = {"name": "lint", "seed": 0, "model": {"source": str(source)},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 16},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 8, "batch_size": 8},
           "stages": [{"type": "quantize", "name": "int8", "scheme": "int8", "targets": {"components": ["language"]},
                       "activations": {"calibration": "minmax"}, "gate": {"min_retention": 0.5}}],
           "output": {"deploy_fix": deploy_fix}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    rec = json.loads((out / "manifest.json").read_text())["stages"][0]
    assert {(f["rule"], f["key"], f["fixed"]) for f in rec["deploy_lint"]} >= {
        ("use_cache", "text_config.use_cache", deploy_fix), ("generation_ids", "pad_token_id", deploy_fix)}
    config = json.loads((out / rec["checkpoint"] / "config.json").read_text())
    assert config["text_config"]["use_cache"] is deploy_fix
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0  # the fixed files are the ones on record
    said = capsys.readouterr().out
    assert ("lint     stages/int8: use_cache: config.json:text_config.use_cache" in said) is not deploy_fix
