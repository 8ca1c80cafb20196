"""The loop end to end on the bundled trained model: gates, rollback, resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from compress.cli import main

ROOT = Path(__file__).resolve().parent.parent
EVAL = str(ROOT / "calibration" / "shapes-vqa" / "eval")


def recipe(tmp_path: Path, stages: list[dict], name: str = "t", **extra) -> Path:
    doc = {
        "name": name,
        "model": {"source": "zoo:shapes-vqa"},
        "evaluation": {"source": EVAL, "num_samples": 150, "batch_size": 75, "max_new_tokens": 24},
        "stages": stages,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prune(sparsity: float, on_fail: str = "stop", min_retention: float = 0.95, name: str | None = None,
          scope: str = "per_module", components=("language",)) -> dict:
    stage = {"type": "prune", "method": "l1_unstructured", "sparsity": sparsity, "scope": scope,
             "targets": {"components": list(components)},
             "gate": {"min_retention": min_retention, "on_fail": on_fail}}
    if name:
        stage["name"] = name
    return stage


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def language_sparsity(checkpoint: Path) -> float:
    weights = load_file(checkpoint / "model.safetensors")
    lin = [w for k, w in weights.items() if "language_model" in k and k.endswith("proj.weight")]
    assert lin
    return sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin)


def test_quickstart_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "prune-language-30" in printed.out and "retention" in printed.out

    m = manifest(out)
    assert m["status"] == "completed"
    assert m["tool"]["name"] == "vlm-compress" and "torch" in m["libraries"]
    assert m["model"]["model_type"] == "llava" and len(m["model"]["sha256"]) == 64
    assert m["data"]["evaluation"]["records"] == 500 and len(m["data"]["evaluation"]["sha256"]) == 64
    assert m["baseline"]["metrics"]["exact_match"] >= 0.9
    (stage,) = m["stages"]
    assert stage["status"] == "completed"
    assert stage["checks"][0]["passed"] and stage["checks"][0]["retention"] >= 0.98
    assert abs(stage["details"]["achieved_sparsity"] - 0.3) < 0.01
    assert all(abs(v - 0.3) < 0.01 for v in stage["details"]["sparsity_per_module"].values())
    files = {f["path"]: f for f in m["files"]}
    for rel in ("report.md", "retention.png", "recipe.yaml", "recipe.resolved.yaml",
                "stages/prune-language-30/model.safetensors", "baseline/reference.safetensors"):
        assert rel in files and files[rel]["bytes"] > 0 and len(files[rel]["sha256"]) == 64
    assert (out / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![retention per stage](retention.png)" in (out / "report.md").read_text()

    # The checkpoint is a plain transformers folder: no pruning hooks, zeros kept.
    ckpt = out / "stages" / "prune-language-30"
    keys = load_file(ckpt / "model.safetensors").keys()
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in keys)
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(ckpt)
    q = reloaded.model.language_model.layers[0].self_attn.q_proj.weight
    assert abs(float((q == 0).float().mean()) - 0.3) < 0.01

    # --resume does no stage work and leaves the checkpoint untouched.
    before = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "already completed, skipped" in err and "baseline (recorded)" in err
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == before

    # Without --resume an existing run is refused, and nothing changes.
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out)]) == 2  # bad input: exit 2
    assert "already holds a run" in capsys.readouterr().err


def test_collapse_stops_and_keeps_earlier_stages(tmp_path, capsys):
    path = recipe(tmp_path, [prune(0.1, name="gentle"), prune(0.97, scope="global", name="brutal")])
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 3
    captured = capsys.readouterr()
    assert "stopped at stage 'brutal'" in captured.err and "Traceback" not in captured.err
    m = manifest(out)
    assert m["status"] == "stopped"
    gentle, brutal = m["stages"]
    assert gentle["status"] == "completed" and (out / gentle["checkpoint"] / "model.safetensors").exists()
    assert brutal["status"] == "failed" and not brutal["checks"][0]["passed"]
    assert brutal["metrics"]["exact_match"] < 0.5 * m["baseline"]["metrics"]["exact_match"]
    assert not (out / "stages" / "brutal").exists()
    assert "FAIL" in (out / "report.md").read_text()


def test_rollback_continues_from_last_good_state(tmp_path):
    path = recipe(tmp_path, [prune(0.97, on_fail="rollback", name="too-much"), prune(0.2, name="sane")])
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    m = manifest(out)
    bad, good = m["stages"]
    assert bad["status"] == "rolled_back" and not bad.get("checkpoint")
    assert good["status"] == "completed"
    # The surviving weights carry only the second stage's sparsity, not the rolled-back one.
    assert abs(language_sparsity(out / good["checkpoint"]) - 0.2) < 0.01


def test_warn_keeps_going_with_checkpoint(tmp_path):
    path = recipe(tmp_path, [prune(0.9, on_fail="warn", min_retention=0.999, name="w")])
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    (w,) = manifest(out)["stages"]
    assert w["status"] == "warned" and not w["checks"][0]["passed"]
    assert (out / w["checkpoint"] / "model.safetensors").exists()


def test_changed_recipe_is_not_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(recipe(tmp_path, [prune(0.1)])), "--out", str(out)]) == 0
    changed = recipe(tmp_path, [prune(0.15)])
    assert main(["run", str(changed), "--out", str(out), "--resume"]) == 2
    assert "differ" in capsys.readouterr().err
    assert main(["run", str(changed), "--out", str(out), "--force"]) == 0
    assert manifest(out)["stages"][0]["details"]["target_sparsity"] == 0.15


def test_unknown_architecture_fails_before_writing(tmp_path, capsys):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    doc = yaml.safe_load(recipe(tmp_path, [prune(0.1)]).read_text())
    doc["model"]["source"] = str(model_dir)
    path = tmp_path / "bert.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'bert'" in err and "llava" in err
    assert not out.exists()


def test_non_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["run", str(recipe(tmp_path, [prune(0.1)])), "--out", str(out)]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_blank_images_fall_to_chance(tmp_path):
    """The bundled model's answers depend on the image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from compress.zoo import MODELS
    from compress.zoo.train import evaluate

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(MODELS["shapes-vqa"]).eval()
    processor = AutoProcessor.from_pretrained(MODELS["shapes-vqa"])
    seeds = range(0, 200)
    real = evaluate(model, processor, seeds)
    blank = evaluate(model, processor, seeds, blank=True)
    assert real["overall"] >= 0.9
    assert blank["overall"] <= 0.02  # nothing to describe
    assert blank["overall (final answer only)"] <= 0.45  # yes/no and count priors at best


def test_stage_error_is_recorded_reported_and_exits_4(tmp_path, capsys):
    bad = prune(0.1, name="nothing")
    bad["targets"]["include"] = ["*no_such_module*"]
    out = tmp_path / "run"
    assert main(["run", str(recipe(tmp_path, [prune(0.1, name="ok"), bad])), "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert "stage 'nothing' failed:" in err and "no_such_module" in err and "Traceback" not in err
    m = manifest(out)
    assert m["status"] == "error"
    ok, nothing = m["stages"]
    assert ok["status"] == "completed" and (out / ok["checkpoint"] / "model.safetensors").exists()
    assert nothing["status"] == "error" and "no_such_module" in nothing["message"] and nothing["exit_code"] == 4
    report = (out / "report.md").read_text()
    assert "status: **error**" in report and "**error**: " in report
    assert not (out / ".work").exists()


def test_unexpected_error_keeps_traceback_and_partial_files_and_resume_retries(tmp_path):
    path = recipe(tmp_path, [prune(0.1, name="one"), prune(0.2, name="two")])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "compress.cli", "run", str(path), "--out", str(out)]
    failed = subprocess.run(cmd, env={**os.environ, "COMPRESS_FAULT": "raise:apply:1"}, capture_output=True,
                            text=True, timeout=600)
    assert failed.returncode == 5, failed.stderr
    assert "internal error: RuntimeError: fault injected at apply:1" in failed.stderr
    assert "Traceback" not in failed.stderr
    two = manifest(out)["stages"][1]
    assert two["status"] == "error" and two["partial"] == "failed/two" and (out / "failed" / "two").is_dir()
    assert "RuntimeError" in (out / two["traceback"]).read_text()

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600,
                             env={k: v for k, v in os.environ.items() if k != "COMPRESS_FAULT"})
    assert resumed.returncode == 0, resumed.stderr
    m = manifest(out)
    assert m["status"] == "completed" and [s["status"] for s in m["stages"]] == ["completed", "completed"]
    assert abs(language_sparsity(out / "stages" / "two") - 0.2) < 0.01
    assert not (out / "failed" / "two").exists()
