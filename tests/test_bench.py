"""`vlm-compress bench` on a real run folder, and the runner hooks it relies on.

Speed is measured, never asserted: these tests check what is measured and written, not how fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import onnxruntime
import pytest
import torch
import yaml

from compress.arch import get_adapter
from compress.bench.run import chart, markdown
from compress.bench.timing import median_ms, timed
from compress.checkpoint import load_checkpoint
from compress.cli import main
from compress.errors import CompressError
from compress.runs import Artifact, artifacts
from compress.runtime.ort_runner import OrtRunner
from compress.runtime.torch_runner import TorchRunner
from compress.zoo import MODELS, shapes

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("vision_ms_per_image", "ttft_ms", "decode_tokens_per_s", "decode_ms_per_step", "e2e_ms", "peak_rss_mb")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run: the bundled model, a light prune (a torch checkpoint) and an ONNX export."""
    tmp = tmp_path_factory.mktemp("bench")
    doc = {"name": "b", "model": {"source": "zoo:shapes-vqa"},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 20,
                          "batch_size": 20, "max_new_tokens": 24},
           "stages": [{"type": "prune", "method": "l1_unstructured", "sparsity": 0.1,
                       "targets": {"components": ["language"]}, "gate": {"min_retention": 0.9}},
                      {"type": "export", "format": "onnx", "gate": {"min_retention": 0.9}}]}
    recipe = tmp / "b.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    run = tmp / "run"
    assert main(["run", str(recipe), "--out", str(run)]) == 0
    return run


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_bench_measures_every_artifact(run_dir, capsys):
    capsys.readouterr()
    before = _files(run_dir)
    assert main(["bench", str(run_dir), "--batch", "2", "--new-tokens", "3", "--warmup", "1", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 01-export | onnx |" in out and "| source | torch |" in out

    after = _files(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("bench/")} == before  # manifest etc. untouched
    assert sorted(k for k in after if k.startswith("bench/")) == ["bench/bench.json", "bench/bench.md",
                                                                  "bench/bench.png"]
    assert after["bench/bench.png"][:4] == b"\x89PNG"
    assert after["bench/bench.md"].decode() in out

    result = json.loads(after["bench/bench.json"])
    rows = result["artifacts"]
    genai = importlib.util.find_spec("onnxruntime_genai") is not None  # the export driven by onnxruntime-genai too
    assert [(a["name"], a["kind"]) for a in rows] == [("source", "torch"), ("00-prune", "torch"), ("01-export", "onnx"),
                                                      *([("01-export", "genai")] if genai else [])]
    assert "| 01-export | genai |" in out or not genai
    base = rows[0]
    for a in rows:
        assert "error" not in a, a
        measured = [k for k in METRICS if not (a["kind"] == "genai" and k == "vision_ms_per_image")]
        for key in measured:  # genai runs the vision graph inside its generator: no vision timing of its own
            assert a[key] > 0, (a["name"], key)
        assert a["bytes"] > 0 and a["load_s"] > 0 and a["e2e_ms"] >= a["ttft_ms"]
        assert a["decode_tokens_per_s"] == pytest.approx(2 / (a["decode_ms_per_step"] / 1000))
        for key in (*measured, "bytes"):
            assert a["ratios"][key] == pytest.approx(a[key] / base[key])
        assert a["net_rss_mb"] == pytest.approx(a["peak_rss_mb"] - result["reference_rss_mb"])
        # the compression's own peak RSS, as the run recorded it for the artifact's stage (the baseline's: source)
        m = json.loads((run_dir / "manifest.json").read_text())
        made = {s["name"]: s["peak_rss_mb"] for s in m["stages"]} | {"source": m["baseline"]["peak_rss_mb"]}
        assert a["compress_peak_rss_mb"] == made[a["name"]] > 0
        assert f"| {a['compress_peak_rss_mb']:.0f} |" in after["bench/bench.md"].decode()
        read = a["decode_weight_bytes"] + a["decode_kv_bytes"]
        assert a["decode_floor_ms"] == pytest.approx(read / (result["memory_bandwidth"]["copy_gb_s"] * 1e9) * 1000)
        assert a["decode_x_floor"] == pytest.approx(a["decode_ms_per_step"] / a["decode_floor_ms"])
    # The fp32 export reads what its model reads (embedding table excluded both ways), and so does the pruned
    # checkpoint (zeros are stored); the KV cache is the same size for all three.
    assert rows[2]["decode_weight_bytes"] == pytest.approx(base["decode_weight_bytes"], rel=0.02)
    assert all(a["decode_weight_bytes"] == rows[2]["decode_weight_bytes"] for a in rows[3:])  # the same graphs
    assert rows[1]["decode_weight_bytes"] == base["decode_weight_bytes"]
    assert len({a["decode_kv_bytes"] for a in rows}) == 1 and base["decode_kv_bytes"] > 0
    bandwidth = result["memory_bandwidth"]  # one copy before the artifacts and one after each; the fastest
    assert len(bandwidth["samples_gb_s"]) == len(rows) + 1
    assert bandwidth["copy_gb_s"] == max(bandwidth["samples_gb_s"]) > 0.1
    assert set(base["ratios"].values()) == {1.0}
    assert rows[2]["providers"] == ["CPUExecutionProvider"]
    assert result["settings"] == {"batch": 2, "new_tokens": 3, "warmup": 1, "repeats": 2,
                                  "providers": ["CPUExecutionProvider"], "ignore_eos": True, "statistic": "median"}
    mach = result["machine"]  # this process's machine and libraries, not placeholders
    assert mach["cores"] == os.cpu_count() and mach["cpu"]
    assert mach["torch"] == torch.__version__ and mach["onnxruntime"] == onnxruntime.__version__


def test_ignore_eos_gives_exact_lengths_and_timings_on_both_runners(run_dir):
    adapter = get_adapter("llava")
    model, processor = load_checkpoint(MODELS["shapes-vqa"], adapter)
    batch = [shapes.sample(s) for s in range(3)]
    enc = adapter.build_inputs(processor, [s.image for s in batch], [s.question for s in batch]).inputs
    torch_runner = TorchRunner.for_adapter(model, adapter, processor)
    ort_runner = OrtRunner.from_dir(run_dir / "stages/01-export")
    features = []
    for runner in (torch_runner, ort_runner):
        assert [len(t) for t in runner.generate(enc, 40, ignore_eos=True)] == [40] * 3
        assert runner.timings["decode_steps"] == 39
        assert runner.timings["first_token_s"] > 0 and runner.timings["decode_s"] > 0
        default = runner.generate(enc, 40)  # default behaviour: stop at eos (short answers)
        assert max(len(t) for t in default) < 40
        features.append(runner.image_features({"pixel_values": enc["pixel_values"][:1]}))
    # The vision hook bench times: one image's projected tokens (rows), as many as the prompt has image tokens,
    # the same through both runners (the prune stage left the vision tower and projector alone).
    (ours,), exported = features[0].pooler_output, features[1]
    image_tokens = int((enc["input_ids"][0] == model.config.image_token_index).sum())
    assert ours.shape == exported.shape == (image_tokens, model.config.text_config.hidden_size)
    assert torch.allclose(ours.detach(), torch.from_numpy(exported), atol=1e-4)
    # Same answers both ways: the timing hooks do not change what is generated.
    assert torch_runner.generate(enc, 24) == ort_runner.generate(enc, 24)


def test_artifacts_skip_failed_stages_and_markdown_reports_errors(tmp_path):
    (tmp_path / "stages/a").mkdir(parents=True)
    (tmp_path / "stages/a/w.bin").write_bytes(b"x" * 10)
    (tmp_path / "stages/b").mkdir()
    manifest = {"model": {"resolved": str(MODELS["shapes-vqa"]), "model_type": "llava"},
                "stages": [{"name": "a", "status": "warned", "checkpoint": "stages/a"},
                           {"name": "b", "status": "failed", "artifacts": "stages/b"},
                           {"name": "c", "status": "completed", "checkpoint": None}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    arts = artifacts(tmp_path)
    assert [(a.name, a.kind, a.bytes) for a in arts[1:]] == [("a", "torch", 10)]
    assert arts[0] == Artifact("source", "torch", str(MODELS["shapes-vqa"]), "llava")
    assert arts[0].bytes > 1_000_000  # the bundled model's weights

    row = {"vision_ms_per_image": 2.0, "ttft_ms": 4.0, "decode_tokens_per_s": 100.0, "decode_ms_per_step": 10.0,
           "e2e_ms": 40.0, "peak_rss_mb": 400.0, "net_rss_mb": 40.0, "bytes": 8_000_000, "decode_x_floor": 2.5,
           "preprocess_ms": 1.5}
    result = {"run": str(tmp_path), "reference_rss_mb": 360.0, "memory_bandwidth": {"copy_gb_s": 20.0},
              "settings": {"batch": 1, "new_tokens": 4, "warmup": 2, "repeats": 5, "providers": ["CPU"]},
              "machine": {"cpu": "X", "cores": 2, "torch": "t", "torch_threads": 2, "onnxruntime": "o"},
              "artifacts": [{"name": "source", "kind": "torch", **row, "ratios": dict.fromkeys(row, 1.0)},
                            {"name": "a", "kind": "onnx", **{**row, "e2e_ms": 10.0},
                             "ratios": {**dict.fromkeys(row, 1.0), "e2e_ms": 0.25}},
                            {"name": "b", "kind": "onnx", "path": "p", "bytes": 5, "error": "exit 1: boom | x"}]}
    md = markdown(result)
    assert "| a | onnx | 8.00 (1.00×) |" in md and "10.00 (0.25×)" in md and "| 2.50 | 1.50 |" in md
    assert "| b | onnx | 0.00 | failed: exit 1: boom / x" in md
    assert chart(result)[:4] == b"\x89PNG"


def test_timer_excludes_warmup(monkeypatch):
    """On a scripted clock: the warm-up calls (slow, as lazy initialisation is) are run but not timed, and
    median_ms is the median of the timed calls, in milliseconds."""
    from compress.bench import timing

    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def calls(seconds: list[float]):
        left = iter(seconds)

        def call() -> None:
            now[0] += next(left)
        return call

    call = calls([5.0, 4.0, 0.003, 0.001, 0.002, 0.010, 0.004])
    assert timed(call, warmup=2, repeats=5) == pytest.approx([0.003, 0.001, 0.002, 0.010, 0.004])
    with pytest.raises(StopIteration):  # exactly 2 + 5 calls were made
        call()
    assert median_ms(calls([5.0, 0.003, 0.001, 0.002]), 1, 3) == pytest.approx(2.0)
    assert median_ms(calls([0.004, 0.001]), 0, 2) == pytest.approx(2.5)  # even count: the mean of the middle two


def test_bench_refuses_a_non_run_folder_and_bad_settings(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--new-tokens", "1"]) == 1
    assert "at least 2" in capsys.readouterr().err
    from compress.bench.run import bench

    with pytest.raises(CompressError, match="at least 1"):
        bench(tmp_path, repeats=0)


def test_bench_builds_prompts_with_the_runs_evaluation_prompt(tmp_path):
    """A run whose recipe sets evaluation.prompt (no chat template fits) is benchmarked with that prompt."""
    from helpers import VALID

    from compress.bench.measure import eval_inputs

    doc = yaml.safe_load(VALID)
    doc["evaluation"]["prompt"] = "<image> question: {question} answer:"
    recipes = Path(__file__).parent.parent / "recipes"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "manifest.json").write_text(json.dumps({"recipe": {"path": str(recipes / "t.yaml")}}))
    adapter = get_adapter("llava")
    _, questions = eval_inputs(tmp_path, 2, adapter)
    assert adapter.prompt_template == "<image> question: {question} answer:"
    assert adapter.format_prompt(None, questions[0]) == f"<image> question: {questions[0]} answer:"
