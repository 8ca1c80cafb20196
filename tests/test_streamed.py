"""A model above the memory budget, compressed from disk block by block (real weights files, real
subprocesses, the CLI): the run's measured peak RSS stays under the budget and its artifacts are the ones a
resident run makes; what cannot stream is refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT

from compress.arch import get_adapter
from compress.checkpoint import load_checkpoint
from compress.errors import RecipeError

BUDGET_GB = 0.9  # the llava-test model is 1.4 GB in fp32
QUANTIZE = {"type": "quantize", "name": "w8a8", "scheme": "int8", "targets": {"components": ["language"]},
            "activations": {"calibration": "minmax"}, "smoothquant": {"alpha": 0.5},
            "gate": {"metric": "token_agreement", "min_retention": 0.5}}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """The llava-test shape (~1.4 GB in fp32), written shard by shard by `vlm-compress zoo big`."""
    out = tmp_path_factory.mktemp("big") / "llava-test"
    done = _cli("zoo", "big", "llava-test", "--out", str(out), "--shard-gb", "0.25")
    assert done.returncode == 0, done.stderr
    return out


def _recipe(tmp: Path, model: Path, stages: list[dict], budget: float | None,
            metrics: tuple[str, ...] = ("token_agreement", "logit_kl")) -> Path:
    doc = {"name": "streamed", "seed": 0, "model": {"source": str(model)},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 2, "batch_size": 2},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 2, "batch_size": 2,
                          "max_new_tokens": 4, "metrics": list(metrics),
                          "prompt": "<image> {question}"},
           "stages": stages}
    if budget is not None:
        doc["resources"] = {"max_memory_gb": budget}
    path = tmp / f"recipe-{budget}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


ALL_METRICS = ("exact_match", "token_agreement", "logit_kl")


def _run(tmp: Path, model: Path, budget: float | None) -> tuple[Path, dict]:
    out = tmp / f"run-{budget}"
    done = _cli("run", str(_recipe(tmp, model, [QUANTIZE], budget, ALL_METRICS)), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def resident(big, tmp_path_factory) -> tuple[Path, dict]:
    """The W8A8 recipe run with the whole model in memory: what the streamed runs must reproduce."""
    return _run(tmp_path_factory.mktemp("resident"), big, None)


def test_a_model_above_the_budget_runs_within_it_and_makes_the_resident_runs_artifacts(big, resident, tmp_path):
    model_gb = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**30
    assert model_gb > 1.4 * BUDGET_GB
    (s_dir, streamed), (r_dir, resident) = _run(tmp_path, big, BUDGET_GB), resident
    assert streamed["plan"]["mode"] == "streamed" and resident["plan"]["mode"] == "resident"
    limit_mb = BUDGET_GB * 1024
    stage = streamed["stages"][0]
    assert streamed["baseline"]["peak_rss_mb"] < limit_mb and stage["peak_rss_mb"] < limit_mb, \
        (streamed["baseline"]["peak_rss_mb"], stage["peak_rss_mb"])
    assert stage["details"]["sequential"]["spilled_bytes"] > 0  # activations beyond the budget went to disk
    assert (s_dir / stage["checkpoint"] / "model.safetensors.index.json").is_file()
    # the same numbers as the resident run: metrics, per-module details, weights
    # (metrics to float noise: under load the resident run's whole-model forward has once given KL
    # 0.00023515 where it and the streamed walk give 0.00023525, from the same weights)
    for got, ref in ((streamed["baseline"]["metrics"], resident["baseline"]["metrics"]),
                     (stage["metrics"], resident["stages"][0]["metrics"])):
        assert got.keys() == {"token_agreement", "logit_kl"} and got["token_agreement"] == ref["token_agreement"]
        assert got["logit_kl"] == pytest.approx(ref["logit_kl"], rel=1e-3, abs=1e-9)
    a, b = dict(stage["details"]), dict(resident["stages"][0]["details"])
    a.pop("sequential"), b.pop("sequential")
    assert a == b
    adapter = get_adapter("llava")
    x = load_checkpoint(s_dir / stage["checkpoint"], adapter)[0].state_dict()
    y = load_checkpoint(r_dir / resident["stages"][0]["checkpoint"], adapter)[0].state_dict()
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # neither the fp32 model nor the W8A8 one fits 0.9 GB whole: no generation, and the records say why
    assert "exact_match" in streamed["plan"]["metrics_not_computed"]
    assert "above the budget" in stage["metrics_not_computed"]["exact_match"]
    report = (s_dir / "report.md").read_text()
    assert "peak RSS" in report and "not computed for the baseline: exact_match" in report


def test_a_streamed_stage_generates_where_its_compressed_model_fits(big, resident, tmp_path):
    """2.5 GB: the fp32 model streams and its baseline cannot be loaded whole to generate; the W8A8 stage's
    model can: its exact match comes from the reloaded checkpoint and equals the resident run's."""
    _, streamed = _run(tmp_path, big, 2.5)
    assert streamed["plan"]["mode"] == "streamed"
    assert "exact_match" in streamed["plan"]["metrics_not_computed"]  # 1.4 GB fp32 does not fit whole
    assert "exact_match" not in streamed["baseline"]["metrics"]
    stage, ref = streamed["stages"][0], resident[1]["stages"][0]
    assert "metrics_not_computed" not in stage
    assert stage["metrics"]["exact_match"] == ref["metrics"]["exact_match"]
    assert stage["per_type"] == ref["per_type"] and stage["per_type"]


@pytest.mark.parametrize("stages, field", [
    ([{**QUANTIZE, "scheme": "nf4", "activations": None, "smoothquant": None}], "stages[0]"),
    ([{**QUANTIZE, "gate": {"metric": "exact_match", "min_retention": 0.5}}], "stages[0].gate.metric"),
    ([QUANTIZE, {**QUANTIZE, "name": "vision", "targets": {"components": ["vision"]}}], "stages[1]"),
    ([{"type": "export", "format": "onnx", "gate": {"metric": "token_agreement", "min_retention": 0.5}}], "stages[0]"),
], ids=["nf4", "exact-match-gate", "after-quantize", "export"])
def test_what_cannot_stream_is_refused_before_anything_is_written(big, tmp_path, stages, field):
    from compress.pipeline import run

    stages = [{k: v for k, v in s.items() if v is not None} for s in stages]
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as e:
        run(_recipe(tmp_path, big, stages, BUDGET_GB, ("exact_match", "token_agreement")), out=out)
    assert f"{field}:" in str(e.value) and "max_memory_gb" in str(e.value), str(e.value)
    assert not out.exists()

