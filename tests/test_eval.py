"""`vlm-compress eval`: any artifact scored by the pipeline's own evaluator reproduces the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main

ROOT = Path(__file__).parent.parent
EVAL = ROOT / "calibration/shapes-vqa/eval"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """INT8 W8A8 (dynamic per-token, SmoothQuant) then an ONNX export, on 60 evaluation records."""
    tmp = tmp_path_factory.mktemp("eval")
    recipe = {
        "name": "eval-test", "seed": 0, "model": {"source": "zoo:shapes-vqa"},
        "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 64, "batch_size": 64},
        "evaluation": {"source": str(EVAL), "num_samples": 60, "batch_size": 60, "max_new_tokens": 24},
        "stages": [
            {"type": "quantize", "name": "int8", "scheme": "int8", "targets": {"components": ["language"]},
             "activations": {"dynamic": "per_token"}, "smoothquant": {"alpha": 0.5},
             "gate": {"min_retention": 0.9}},
            {"type": "export", "name": "onnx", "format": "onnx", "gate": {"min_retention": 0.9},
             "parity": {"atol": {"vision": 1e-4, "embed": 1e-6, "decoder": 0.25, "end_to_end": 2.0}, "rtol": 2e-2}},
        ],
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    return out


def _eval(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("stage", ["int8", "onnx"])
def test_eval_reproduces_the_manifest(run_dir, capsys, stage):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rec = next(s for s in manifest["stages"] if s["name"] == stage)
    folder = run_dir / (rec.get("artifacts") or rec["checkpoint"])
    result = _eval(capsys, str(folder), "--reference", str(run_dir))
    assert result["kind"] == ("onnx" if stage == "onnx" else "torch")
    assert result["backend"] == rec["backend"]
    assert result["data"]["sha256"] == manifest["data"]["evaluation"]["sha256"]
    assert set(result["metrics"]) == set(rec["metrics"])
    for name, value in rec["metrics"].items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_eval_without_a_reference_scores_answers_only(run_dir, capsys):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rec = next(s for s in manifest["stages"] if s["name"] == "int8")
    # No --max-new-tokens: the answer budget comes from the data (longest reference answer + 4), so the
    # defaults give the manifest's number and cut nothing.
    result = _eval(capsys, str(run_dir / rec["checkpoint"]), "--data", str(EVAL), "--num-samples", "60")
    assert set(result["metrics"]) == {"exact_match"}  # no baseline: no token agreement or KL claimed
    assert result["metrics"]["exact_match"] == pytest.approx(rec["metrics"]["exact_match"], abs=1e-9)
    assert result["answers"]["truncated"] == 0 and result["answers"]["budget"] >= 24
    assert main(["eval", str(run_dir / rec["checkpoint"]), "--data", str(EVAL), "--num-samples", "60"]) == 0
    text = capsys.readouterr().out
    assert "exact_match" in text and "need --reference" in text and "0 of 60 answers cut" in text
    # A budget shorter than the answers: scored as cut, and said so.
    assert main(["eval", str(run_dir / rec["checkpoint"]), "--data", str(EVAL), "--num-samples", "60",
                 "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    cut = int(text.split(" of 60 answers cut")[0].rsplit(" ", 1)[-1])
    assert cut > 30 and "WARNING: scored as cut" in text


@pytest.mark.parametrize(("args", "needle"), [
    (["{run}"], "is a run folder"),
    (["{tmp}"], "neither config.json"),
    (["{run}/stages/int8"], "nothing to evaluate on"),
    (["{run}/stages/int8", "--reference", "{run}", "--num-samples", "10"], "same set"),
    (["{run}/stages/int8", "--data", str(EVAL), "--extract-after-last", "x", "--extract-regex", "y"],
     "exactly one of"),
    (["{run}/stages/int8", "--data", str(EVAL), "--prompt", "no image {{question}}"], "image token"),
])
def test_eval_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys, args, needle):
    args = [a.format(run=run_dir, tmp=tmp_path) for a in args]
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
