"""Bad models and bad output folders: exit 2, one line, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main

ROOT = Path(__file__).parent.parent
ZOO = ROOT / "compress/zoo/shapes_vqa"


def _recipe(tmp: Path, source: str) -> Path:
    doc = {"name": "fail", "seed": 0, "model": {"source": source},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 8, "batch_size": 8,
                          "max_new_tokens": 8},
           "stages": [{"type": "prune", "method": "l1_unstructured", "sparsity": 0.1,
                       "targets": {"components": ["language"]}, "gate": {"min_retention": 0.5}}]}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _error(capsys) -> str:
    """The one error line (progress bars and [vlm-compress] log lines aside); no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _copy_model(tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(ZOO, folder)
    return folder


def test_truncated_weights(tmp_path, capsys):
    model = _copy_model(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, str(model))), "--out", str(out)]) == 2
    err = _error(capsys)
    assert "model.safetensors: truncated" in err and "is cut off" in err, err
    assert not out.exists()


def test_weights_that_do_not_match_the_config(tmp_path, capsys):
    model = _copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, str(model))), "--out", str(out)]) == 2
    err = _error(capsys)
    assert "mlp" in err and ("do not match its config.json" in err or "size mismatch" in err), err
    assert not out.exists()


def test_missing_tensors_are_refused_not_random(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tmp_path)
    state = load_file(str(model / "model.safetensors"))
    gone = sorted(k for k in state if k.endswith("mlp.down_proj.weight"))
    save_file({k: v for k, v in state.items() if k not in gone}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, str(model))), "--out", str(out)]) == 2
    err = _error(capsys)
    assert f"{len(gone)} missing" in err and "down_proj" in err
    assert not out.exists()


def test_remote_code_is_not_run_unless_the_recipe_allows_it(tmp_path, capsys):
    model = _copy_model(tmp_path)
    marker = tmp_path / "remote-code-ran"
    (model / "configuration_mine.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_vlm", auto_map={"AutoConfig": "configuration_mine.MyConfig"})
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, str(model))), "--out", str(out)]) == 2
    err = _error(capsys)
    assert "configuration_mine.py" in err and "model.trust_remote_code: true" in err, err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("case", ["prequantized", "fp8_tensor", "pickles_only"])
def test_model_files_the_stages_cannot_take(tmp_path, capsys, case):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tmp_path)
    weights = model / "model.safetensors"
    if case == "prequantized":
        config = json.loads((model / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        (model / "config.json").write_text(json.dumps(config))
        needle = "already quantized (quant_method 'gptq')"
    elif case == "fp8_tensor":
        state = load_file(str(weights))
        name = sorted(k for k in state if k.endswith("q_proj.weight"))[0]
        state[name] = state[name].to(torch.float8_e4m3fn)
        save_file(state, str(weights), metadata={"format": "pt"})
        needle = f"tensor {name} is F8_E4M3"
    else:
        weights.rename(model / "pytorch_model.bin")
        needle = "pickled weights only (pytorch_model.bin)"
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, str(model))), "--out", str(out)]) == 2
    assert needle in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["file", "run"])
def test_unusable_out_folders(tmp_path, capsys, kind):
    recipe = _recipe(tmp_path, "zoo:shapes-vqa")
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
        needle = "is a file, not a folder"
    else:
        assert main(["run", str(recipe), "--out", str(out)]) == 0
        capsys.readouterr()
        needle = "already holds a run; pass --resume"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert needle in _error(capsys)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_one_writer_per_run_folder(tmp_path, capsys):
    """A second process on a locked run folder is refused with the holder's pid; the lock dies with it."""
    import os
    import signal
    import subprocess
    import sys

    recipe = _recipe(tmp_path, "zoo:shapes-vqa")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom compress.artifacts import RunDir\n"
         "d = RunDir(Path(sys.argv[1]))\nd._lock()\nprint('locked', flush=True)\ntime.sleep(60)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 2
        assert f"is in use by pid {holder.pid} on" in _error(capsys)
        assert main(["run", str(recipe), "--out", str(out), "--force"]) == 2  # --force cannot take it either
        _error(capsys)
        assert main(["verify", str(out)]) == 1  # nor is a folder being written verified
        assert f"is being written by pid {holder.pid} on" in _error(capsys)
        assert (out / "manifest.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # killed, not released: the OS drops the lock
        holder.wait()
    assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 0


def test_unexpected_error_outside_a_stage(tmp_path, capsys, monkeypatch):
    """A bug while measuring the baseline: exit 5, one line, the traceback kept in the run folder, resumable."""
    recipe, out = _recipe(tmp_path, "zoo:shapes-vqa"), tmp_path / "run"
    monkeypatch.setenv("COMPRESS_FAULT", "raise:baseline")
    assert main(["run", str(recipe), "--out", str(out)]) == 5
    line = _error(capsys)
    assert line.startswith("error: internal error: RuntimeError: fault injected at baseline (traceback: "), line
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "error" and m["exit_code"] == 5 and m["stages"] == []
    assert "RuntimeError: fault injected at baseline" in (out / "logs/run.traceback.txt").read_text()
    monkeypatch.delenv("COMPRESS_FAULT")
    assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed" and "message" not in m
