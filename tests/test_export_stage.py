"""The export stage in the pipeline: recipes, ordering, and the gate scoring ONNX Runtime's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from compress.errors import RecipeError
from compress.recipe import load_recipe
from compress.runtime.ort_runner import OrtRunner

ROOT = Path(__file__).resolve().parent.parent
EXPORT = {"type": "export", "format": "onnx", "gate": {"min_retention": 0.99}}
PRUNE = {"type": "prune", "method": "l1_unstructured", "sparsity": 0.1, "targets": {"components": ["language"]},
         "gate": {"min_retention": 0.9}}


def _recipe(tmp_path: Path, stages: list[dict], name: str = "e") -> Path:
    doc = {"name": name, "model": {"source": "zoo:shapes-vqa"},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 100,
                          "batch_size": 50, "max_new_tokens": 24},
           "stages": stages}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("stages", "needle"),
    [
        ([EXPORT, PRUNE], "'prune' stage cannot run after a 'export' stage (model is exported)"),
        ([EXPORT, EXPORT], "'export' stage cannot run after a 'export' stage"),
        ([{**EXPORT, "components": ["vision"]}], "components must be [vision, decoder]"),
        ([{**EXPORT, "format": "tflite"}], "stages[0].format"),
        ([{**EXPORT, "opset": 13}], "stages[0].opset"),
        ([{**EXPORT, "opset": 23}], "stages[0].opset: opset 23 needs target: tensorrt"),
        ([{**EXPORT, "target": "tensorrt", "int4_prefill": "int8"}], "stages[0].int4_prefill: int4_prefill: int8"),
        ([{**EXPORT, "int4_prefill": "int8"}], "no earlier quantize stage has scheme: int4"),
        ([{**EXPORT, "dynamic": {"batch": False}}], "stages[0].dynamic"),  # axes are always dynamic: no such field
        ([{**EXPORT, "parity": {"atol": {"audio": 1.0}}}], "stages[0].parity.atol"),
    ],
)
def test_export_recipe_errors(tmp_path, stages, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, stages))
    assert needle in str(e.value) and ".yaml:" in str(e.value)


def test_onnx_fp32_recipe(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes/onnx-fp32.yaml"), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    (stage,) = m["stages"]
    assert stage["status"] == "completed" and stage["backend"] == "onnxruntime"
    assert stage["checks"][0]["retention"] >= 0.995
    assert stage["artifacts"] == "stages/onnx" and "checkpoint" not in stage
    art = out / stage["artifacts"]
    assert {p.name for p in art.iterdir()} >= {"vision.onnx", "embed.onnx", "decoder.onnx", "export.json"}
    errors = stage["details"]["parity_max_abs_error"]
    assert errors and max(errors.values()) <= 1e-3
    fused = stage["details"]["fused_ops"]
    # Decoder self-attention is one GroupQueryAttention per layer (the KV cache appended in the kernel).
    decoder = fused["decoder"]["after"]
    assert decoder["GroupQueryAttention"] == 4 and decoder["MultiHeadAttention"] == 0
    assert stage["details"]["decoder_attention"] == "GroupQueryAttention" and fused["vision"]["after"]["Attention"] > 0
    listed = {f["path"] for f in m["files"]}
    assert "stages/onnx/decoder.onnx" in listed
    assert not (out / ".work").exists()
    # The folder is self-describing: its graphs and processor alone answer the task's questions.
    from transformers import AutoProcessor

    from compress.arch import get_adapter
    from compress.zoo import shapes

    runner = OrtRunner.from_dir(art)
    assert runner.backend == "onnxruntime"
    processor = AutoProcessor.from_pretrained(art)
    batch = [shapes.sample(s) for s in range(4)]
    enc = get_adapter("llava").build_inputs(processor, [s.image for s in batch], [s.question for s in batch]).inputs
    assert [processor.tokenizer.decode(t) for t in runner.generate(enc, 24)] == [s.answer for s in batch]


def test_export_after_int8_carries_the_integers_and_verifies(tmp_path, capsys):
    stages = [
        {"type": "quantize", "scheme": "int8", "targets": {"components": ["language"]},
         "activations": {"calibration": "minmax"}, "gate": {"min_retention": 0.98}},
        {**EXPORT, "parity": {"atol": {"vision": 1e-4, "decoder": 0.01, "end_to_end": 0.05}, "rtol": 1e-2}},
    ]
    path = _recipe(tmp_path, stages)
    doc = yaml.safe_load(path.read_text())
    doc["calibration"] = {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 64}
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    int8, export = m["stages"]
    assert export["status"] == "completed" and export["backend"] == "onnxruntime"
    after = export["details"]["fused_ops"]["decoder"]["after"]
    assert after["QuantizeLinear"] > 0 and after["DequantizeLinear"] > 0
    # ONNX Runtime answers like the torch INT8 model it came from.
    assert export["metrics"]["exact_match"] == pytest.approx(int8["metrics"]["exact_match"], abs=0.011)
    assert (out / "stages/01-export/decoder.onnx").stat().st_size < 0.5 * (
        (out / "stages/00-quantize/model.safetensors").stat().st_size * 4)
    # What ships is what the manifest describes: verify passes it and catches each kind of damage.
    from helpers import assert_verify_catches_damage

    assert_verify_catches_damage(out, tmp_path, capsys)


@pytest.mark.parametrize("on_fail", ["stop", "warn"])
def test_parity_miss_is_a_check_that_follows_on_fail(tmp_path, capsys, on_fail):
    stage = {**EXPORT, "parity": {"atol": 1e-12, "rtol": 0.0}, "gate": {"min_retention": 0.99, "on_fail": on_fail}}
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, [stage])), "--out", str(out)]) == (3 if on_fail == "stop" else 0)
    err = capsys.readouterr().err
    assert "parity" in err and "Traceback" not in err
    rec = json.loads((out / "manifest.json").read_text())["stages"][0]
    parity = next(c for c in rec["checks"] if c["metric"] == "parity")
    assert not parity["passed"] and rec["details"]["parity_failures"]
    assert "max abs error" in rec["details"]["parity_failures"][0]
    assert rec["metrics"]["exact_match"] > 0.9  # the graphs were still scored through ONNX Runtime
    assert rec["status"] == ("failed" if on_fail == "stop" else "warned")
    assert (out / "stages" / "00-export").exists() == (on_fail == "warn")
    assert "| 00-export |" in (out / "report.md").read_text() and "parity" in (out / "report.md").read_text()


def test_tensorrt_provider_after_dynamic_int8_is_a_load_time_error(tmp_path):
    quant = {"type": "quantize", "name": "dyn", "scheme": "int8", "targets": {"components": ["language"]},
             "activations": {"dynamic": "per_token"}, "gate": {"min_retention": 0.9}}
    export = {**EXPORT, "providers": ["TensorrtExecutionProvider", "CPUExecutionProvider"]}
    with pytest.raises(RecipeError, match=r"stages\[1\].*TensorRT.*dynamic INT8.*'dyn'"):
        load_recipe(_recipe(tmp_path, [quant, export]))
    target = {**EXPORT, "target": "tensorrt"}
    with pytest.raises(RecipeError, match=r"stages\[1\].*TensorRT.*dynamic INT8.*'dyn'"):
        load_recipe(_recipe(tmp_path, [quant, target]))


def test_a_quantized_export_missing_float_parity_says_why(tmp_path):
    """Default parity tolerances are float exports'; INT8 graphs computed by integer kernels can miss them by a
    rounding step. The stage says so (and where tolerances that fit are) when that is what happened."""
    from compress.stages.export import ExportConfig, parity_note
    from compress.zoo.tiny import save_tiny

    model = save_tiny("llava", tmp_path / "model")
    doc = {"name": "q", "model": {"source": str(model)},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 4, "batch_size": 4},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 4, "batch_size": 4,
                          "max_new_tokens": 4},
           "stages": [{"type": "quantize", "scheme": "int8", "targets": {"components": ["language"]},
                       "activations": {"dynamic": "per_token"}, "gate": {"max_kl": 1000.0}},
                      {**EXPORT, "gate": {"max_kl": 1000.0, "on_fail": "warn"}}]}
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    export = json.loads((out / "manifest.json").read_text())["stages"][1]
    missed = not next(c for c in export["checks"] if c["metric"] == "parity")["passed"]
    assert ("parity_note" in export["details"]) == missed  # measured here: end_to_end 0.0017 vs 1e-4
    if missed:
        assert "recipes/onnx-int8.yaml" in (out / "report.md").read_text()
    quantized = {"modules": {"x": {"scheme": "w8a8"}}}
    cfg = ExportConfig.model_validate({**EXPORT, "name": "e"})
    assert parity_note(cfg, quantized, ["miss"]) and not parity_note(cfg, quantized, [])
    assert not parity_note(cfg, {}, ["miss"])  # a float export's miss is a real one
    explicit = ExportConfig.model_validate({**EXPORT, "name": "e", "parity": {"atol": 0.05}})
    assert not parity_note(explicit, quantized, ["miss"])  # the author chose the tolerance
