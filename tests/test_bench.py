"""`vlm-compress bench` on a real run folder: every artifact measured, ratios against the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from compress.errors import CompressError

ROOT = Path(__file__).resolve().parent.parent


def test_bench_measures_every_artifact(tmp_path, capsys):
    doc = {"name": "b", "model": {"source": "zoo:shapes-vqa"},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 20,
                          "batch_size": 20, "max_new_tokens": 24},
           "stages": [{"type": "prune", "method": "l1_unstructured", "sparsity": 0.1,
                       "targets": {"components": ["language"]}, "gate": {"min_retention": 0.9}},
                      {"type": "export", "format": "onnx", "gate": {"min_retention": 0.9}}]}
    recipe = tmp_path / "b.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["bench", str(run), "--batch", "2", "--new-tokens", "3", "--warmup", "0", "--repeats", "1"]) == 0
    assert "| 01-export | onnx |" in capsys.readouterr().out
    result = json.loads((run / "bench" / "bench.json").read_text())
    names = [a["name"] for a in result["artifacts"]]
    assert names == ["source", "00-prune", "01-export"]
    for a in result["artifacts"]:
        for key in ("vision_ms_per_image", "ttft_ms", "decode_tokens_per_s", "e2e_ms", "peak_rss_mb"):
            assert a[key] > 0, (a["name"], key)
        assert a["ratios"]["e2e_ms"] == pytest.approx(a["e2e_ms"] / result["artifacts"][0]["e2e_ms"])
    assert result["artifacts"][0]["ratios"]["e2e_ms"] == 1.0
    assert (run / "bench" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert result["machine"]["cores"] >= 1 and result["settings"]["new_tokens"] == 3


def test_bench_refuses_a_non_run_folder(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 1
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(CompressError, match="at least 2"):
        from compress.bench import bench

        bench(tmp_path, new_tokens=1)
