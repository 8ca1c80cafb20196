"""The quantize stage: schema, a scheme x family matrix on tiny models, and the bundled recipes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from helpers import lost_fields
from PIL import Image

from compress.arch import get_adapter
from compress.checkpoint import load_checkpoint
from compress.cli import main
from compress.errors import ConfigError, RecipeError
from compress.recipe import load_recipe
from compress.stages.base import StageContext
from compress.stages.catalog import get_stage
from compress.zoo.tiny import FAMILIES, save_tiny

ROOT = Path(__file__).resolve().parent.parent


def _recipe(tmp_path: Path, stages: list[dict], calibration: bool = True, name: str = "q") -> Path:
    doc = {
        "name": name,
        "model": {"source": "zoo:shapes-vqa"},
        "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "batch_size": 100},
        "stages": stages,
    }
    if calibration:
        doc["calibration"] = {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 64}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


INT8 = {"type": "quantize", "scheme": "int8", "targets": {"components": ["language"]},
        "activations": {"calibration": "minmax"}, "gate": {"min_retention": 0.9}}
NF4 = {"type": "quantize", "scheme": "nf4", "targets": {"components": ["language"]}, "gate": {"min_retention": 0.9}}


@pytest.mark.parametrize(
    ("stages", "calibration", "needle"),
    [
        ([{**INT8, "activations": None}], True, "int8 needs 'activations'"),
        ([{**NF4, "activations": {"calibration": "minmax"}}], True, "nf4 is weight-only"),
        ([{**INT8, "nf4": {"blocksize": 64}}], True, "'nf4' settings only apply to scheme nf4"),
        ([{**INT8, "activations": "none", "smoothquant": {"alpha": 0.5}}], True,
         "smoothquant needs quantized activations"),
        ([{**INT8, "activations": {"calibration": "minmax", "dynamic": "per_token"}}], True, "exactly one of"),
        ([{**INT8, "activations": {"dynamic": "per_channel"}}], True, "stages[0].activations.dynamic"),
        ([{**INT8, "smoothquant": {"alpha": 1.5}}], True, "alpha must be in [0, 1] or 'auto'"),
        ([{**INT8, "weights": {"gptq": {"damp": 0.1}}}], True, "'gptq' settings need rounding: gptq"),
        ([{**INT8, "keep_float": {"budget": 0.0}}], True, "stages[0].keep_float.budget"),
        ([{**NF4, "keep_float": {"budget": 0.1}}], True, "nf4 is weight-only"),
        ([{**INT8, "activations": {"dynamic": "per_token"}, "weights": {"rounding": "gptq"}}], False,
         "needs a 'calibration' section"),
        ([{**INT8, "activations": {"dynamic": "per_token"}, "keep_float": {}}], False,
         "needs a 'calibration' section"),
        ([{**NF4, "nf4": {"blocksize": 48}}], True, "stages[0].nf4.blocksize"),
        ([{**INT8, "activations": {"calibration": "kl"}}], True, "stages[0].activations"),
        ([INT8], False, "needs a 'calibration' section"),
        ([INT8, NF4], True, "'quantize' stage cannot run after a 'quantize' stage (model is fake_quant)"),
        ([NF4, INT8], True, "INT8 after NF4 has no checkpoint format transformers loads"),
        ([INT8, {"type": "prune", "method": "l1_unstructured", "sparsity": 0.1,
                 "targets": {"components": ["language"]}, "gate": {"min_retention": 0.9}}], True,
         "'prune' stage cannot run after a 'quantize' stage"),
    ],
)
def test_quantize_recipe_errors(tmp_path, stages, calibration, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, stages, calibration))
    assert needle in str(e.value)
    assert ".yaml:" in str(e.value)


def test_valid_orders(tmp_path):
    """Orders and combinations the rules allow load, and load as written: every field of every stage is in
    the resolved recipe with the written value (what the stage then runs with)."""
    weight_only = {**INT8, "activations": "none"}
    tuned = {**INT8, "smoothquant": {"alpha": "auto"}, "weights": {"rounding": "gptq", "reduce_range": True},
             "keep_float": {"budget": 0.1}}
    for stages in ([weight_only, INT8], [weight_only], [{**INT8, "smoothquant": {"alpha": 0.8}}], [tuned]):
        loaded = load_recipe(_recipe(tmp_path, stages))
        assert lost_fields(stages, loaded.resolved()["stages"]) == [], stages
    first = load_recipe(_recipe(tmp_path, [weight_only, INT8])).recipe.stages
    assert first[0].activations == "none" and first[1].activations.calibration == "minmax"
    (stage,) = load_recipe(_recipe(tmp_path, [tuned])).recipe.stages
    assert stage.smoothquant.alpha == "auto" and stage.weights.rounding == "gptq" and stage.weights.reduce_range
    assert stage.keep_float.budget == 0.1
    dynamic = {**INT8, "activations": {"dynamic": "per_token"}}  # no calibration data needed
    loaded = load_recipe(_recipe(tmp_path, [dynamic], calibration=False))
    assert loaded.recipe.calibration is None
    assert loaded.recipe.stages[0].activations.dynamic == "per_token"
    assert loaded.recipe.stages[0].activations.calibration is None


# ---- every scheme on every family's tiny model, through the registered stage ----------------------


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    return [Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))) for _ in range(n)]


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stage_matrix(tmp_path, family, scheme):
    src = tmp_path / "src"
    save_tiny(family, src)
    adapter = get_adapter(json.loads((src / "config.json").read_text())["model_type"])
    model, processor = load_checkpoint(src, adapter)
    questions = ["what is it?", "which colour is this one?", "how many?"]
    batch = adapter.build_inputs(processor, _images(3, 0), questions)
    with torch.no_grad():
        reference = model(**batch.inputs).logits

    batches = [adapter.build_inputs(processor, _images(3, seed + 1), questions).inputs for seed in range(2)]

    spec = get_stage("quantize")
    raw = {"type": "quantize", "scheme": scheme, "targets": {"components": ["language"]},
           "gate": {"min_retention": 0.5}}
    if scheme == "int8":
        raw["activations"] = {"calibration": "percentile", "percentile": 99.9}
    else:
        raw["nf4"] = {"blocksize": 32}
    cfg = spec.config.model_validate(raw)
    ctx = StageContext(adapter=adapter, processor=processor, workdir=tmp_path / "work", seed=0,
                       calibration_batches=batches)
    result = spec.apply(model, cfg, ctx)
    q = result.model
    kinds = {type(m).__name__ for m in adapter.component(q, "language").modules()}
    assert ("Int8Linear" if scheme == "int8" else "Linear4bit") in kinds
    assert type(adapter.component(q, "lm_head")).__name__ == "Linear"  # not targeted
    details = result.details
    assert details["quantized_weights"]["ratio"] < (0.3 if scheme == "int8" else 0.4)
    assert details["model_bytes_after"] < details["model_bytes_before"]
    with torch.no_grad():
        out = q(**batch.inputs).logits
    assert torch.isfinite(out).all()
    rel = float((out - reference).norm() / reference.norm())
    # A sanity bound on random weights (accuracy is tested on trained models): 4-bit through the tiny
    # Gemma3 (scaled embeddings) measured 0.27, every other family < 0.25.
    assert rel < (0.35 if scheme == "nf4" else 0.25), rel

    # Checkpoint round trip reproduces the quantized model exactly.
    from compress.checkpoint import save_checkpoint

    save_checkpoint(q, processor, tmp_path / "ckpt")
    again, _ = load_checkpoint(tmp_path / "ckpt", get_adapter(adapter.model_type))
    with torch.no_grad():
        assert torch.equal(again(**batch.inputs).logits, out)


def test_nf4_blocksize_error_names_module(tmp_path):
    src = tmp_path / "src"
    save_tiny("llava", src)
    adapter = get_adapter("llava")
    model, processor = load_checkpoint(src, adapter)
    spec = get_stage("quantize")
    cfg = spec.config.model_validate({**NF4, "nf4": {"blocksize": 64}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"model\.language_model\.layers\.0\.\S+.*64"):
        spec.apply(model, cfg, StageContext(adapter, processor, tmp_path / "w", 0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- the bundled model ---------------------------------------------------------------------------


def _run(recipe: Path, out: Path) -> dict:
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    return json.loads((out / "manifest.json").read_text())


def _reevaluate(run: Path, stage: dict, m: dict) -> dict:
    """Score a saved checkpoint with the same evaluator; returns its metrics."""
    from safetensors.torch import load_file

    from compress.checks.evaluator import Evaluator, Reference
    from compress.data import load_dataset
    from compress.runtime.torch_runner import TorchRunner

    lr = load_recipe(run / "recipe.yaml")
    adapter = get_adapter("llava")
    model, processor = load_checkpoint(run / stage["checkpoint"], adapter)
    data = load_dataset(lr.recipe.evaluation, Path(m["recipe"]["path"]).parent)
    ev = Evaluator(adapter, processor, data, lr.recipe.evaluation)
    ref = Reference(**load_file(run / "baseline/reference.safetensors"))
    return ev.evaluate(TorchRunner.for_adapter(model, adapter, processor), ref).metrics


def test_int8_recipe_on_bundled_model(tmp_path):
    out = tmp_path / "int8"
    m = _run(ROOT / "recipes/int8.yaml", out)
    (stage,) = m["stages"]
    assert stage["status"] == "completed"
    assert stage["checks"][0]["retention"] >= 0.99
    assert stage["details"]["quantized_weights"]["ratio"] <= 0.26
    mods = stage["details"]["modules"]
    assert all(d["scheme"] == "w8a8" and d["observer"] == "percentile" and d["input_scale"] > 0
               for d in mods.values())
    config = json.loads((out / stage["checkpoint"] / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    _plain_transformers_scores(out / stage["checkpoint"], stage)
    again = _reevaluate(out, stage, m)
    assert again == pytest.approx(stage["metrics"], abs=1e-6)


def test_nf4_recipe_reloads_with_from_pretrained(tmp_path):
    out = tmp_path / "nf4"
    m = _run(ROOT / "recipes/nf4.yaml", out)
    (stage,) = m["stages"]
    assert stage["status"] == "completed"
    assert stage["checks"][0]["retention"] >= 0.97
    assert stage["details"]["quantized_weights"]["ratio"] <= 0.15
    from transformers import AutoModelForImageTextToText

    ckpt = out / stage["checkpoint"]
    plain = AutoModelForImageTextToText.from_pretrained(ckpt)
    assert "quantization_config" in json.loads((ckpt / "config.json").read_text())
    assert type(plain.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert _reevaluate(out, stage, m) == pytest.approx(stage["metrics"], abs=1e-6)


def test_int4_recipe_keeps_its_answers_through_onnxruntime(tmp_path):
    """recipes/int4.yaml: GPTQ INT4 language model, then ONNX with MatMulNBits; both gated >= 0.98."""
    out = tmp_path / "int4"
    m = _run(ROOT / "recipes/int4.yaml", out)
    quant, export = m["stages"]
    assert quant["status"] == export["status"] == "completed"
    for stage in (quant, export):
        assert stage["checks"][0]["retention"] >= 0.98, stage["checks"]
    mods = quant["details"]["modules"]
    assert all(d["scheme"] == "w4a16" and d["rounding"] == "gptq" for d in mods.values())
    assert quant["details"]["quantized_weights"]["ratio"] <= 0.16
    # q/k/v and gate/up read one input each: one MatMulNBits per group (2 nodes merged away per group of 3).
    fused = export["details"]["fused_ops"]["decoder"]
    merged = fused["passes"][-1]["merged_away"]["matmulnbits"]
    layers = sum(name.endswith("self_attn.q_proj") for name in mods)
    assert merged == 3 * layers and fused["after"]["MatMulNBits"] == len(mods) - merged
    assert max(export["details"]["parity_max_abs_error"].values()) < 1e-3  # accuracy_level 0: float32 compute
    config = json.loads((out / quant["checkpoint"] / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    _plain_transformers_scores(out / quant["checkpoint"], quant)
    assert _reevaluate(out, quant, m) == pytest.approx(quant["metrics"], abs=1e-6)


def test_fast_recipes_keep_their_answers_and_run_as_merged_integer_kernels(tmp_path):
    """recipes/fast-int4.yaml and fast-int8.yaml (the benchmark's fastest rows, docs/benchmarks.md): every
    stage gated >= 0.98 through ONNX Runtime, lm_head quantized, q/k/v and gate/up merged into one kernel.
    fast-int4 runs on the model with real-LLM activation outliers: both of its int8-activation paths (level-4
    MatMulNBits at decode, the int8 prefill graph) must hold there (with GPTQ instead of AWQ they do not:
    exact match 0.78)."""
    from compress.export.files import read_meta
    from compress.export.fuse import runtime_ops

    out = tmp_path / "int4"
    doc = yaml.safe_load((ROOT / "recipes/fast-int4.yaml").read_text())
    doc["model"]["source"] = "zoo:shapes-vqa-outliers"
    for key in ("calibration", "evaluation"):
        doc[key]["source"] = str(ROOT / "calibration/shapes-vqa" / Path(doc[key]["source"]).name)
    # Hidden channels scaled 30-1500x move logits and cache by up to 5.6 there (0.29 on the bundled model,
    # measured), answers unchanged: the recipe's default parity (by distribution) holds on both.
    (tmp_path / "fast-int4.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    m = _run(tmp_path / "fast-int4.yaml", out)
    vision, language, export = m["stages"]
    assert [s["status"] for s in m["stages"]] == ["completed"] * 3
    for stage in m["stages"]:
        assert stage["checks"][0]["retention"] >= 0.98, stage["checks"]
    assert export["details"]["parity_judged_by"] == "distribution" and all(c["passed"] for c in export["checks"])
    assert {d["scheme"] for d in language["details"]["modules"].values()} == {"w4a16"}
    assert "lm_head" in language["details"]["modules"]
    assert all(d["scheme"] == "w8a8" for d in vision["details"]["modules"].values())
    meta = read_meta(out / export["artifacts"])
    layers = sum(name.endswith("self_attn.q_proj") for name in language["details"]["modules"])
    assert meta["fused_ops"]["decoder"]["passes"][-1]["merged_away"]["matmulnbits"] == 3 * layers
    used = runtime_ops(out / export["artifacts"] / "decoder.onnx",
                        disabled_optimizers=meta["session"]["disabled_optimizers"])
    assert used["MatMulNBits"] == len(language["details"]["modules"]) - 3 * layers and "MatMul" not in used
    # Prompts: every merged projection an integer GEMM, only the lm_head (the last position) left INT4.
    assert meta["prefill"]["projections_int8"] == used["MatMulNBits"] - 1
    prefill = runtime_ops(out / export["artifacts"] / "prefill.onnx",
                          disabled_optimizers=meta["session"]["disabled_optimizers"])
    assert prefill["MatMulNBits"] == 1 and prefill["MatMulIntegerToFloat"] == used["MatMulNBits"] - 1
    assert "MatMul" not in prefill and "DequantizeLinear" not in prefill
    used = runtime_ops(out / export["artifacts"] / "vision.onnx",
                        disabled_optimizers=meta["session"]["disabled_optimizers"])
    assert used.get("MatMulIntegerToFloat") and "DequantizeLinear" not in used
    _plain_transformers_scores(out / language["checkpoint"], language)  # INT8 vision + INT4 language and lm_head

    out = tmp_path / "int8"
    m = _run(ROOT / "recipes/fast-int8.yaml", out)
    quant, export = m["stages"]
    assert quant["status"] == export["status"] == "completed"
    assert export["checks"][0]["retention"] >= 0.98
    assert quant["details"]["modules"]["lm_head"]["scheme"] == "w8a8"
    meta = read_meta(out / export["artifacts"])
    used = runtime_ops(out / export["artifacts"] / "decoder.onnx",
                        disabled_optimizers=meta["session"]["disabled_optimizers"])
    assert "MatMul" not in used and "DequantizeLinear" not in used  # lm_head too is an integer GEMM
    _plain_transformers_scores(out / quant["checkpoint"], quant)


def test_mixed_recipe_gives_each_component_its_scheme(tmp_path):
    out = tmp_path / "mixed"
    m = _run(ROOT / "recipes/mixed.yaml", out)
    language, vision = m["stages"]
    assert language["status"] == vision["status"] == "completed"
    assert all("language_model" in k and d["scheme"] == "w8a16" for k, d in language["details"]["modules"].items())
    assert all("vision_tower" in k and d["scheme"] == "w8a8" for k, d in vision["details"]["modules"].items())
    ckpt = out / vision["checkpoint"]
    groups = json.loads((ckpt / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["format"] for g in groups.values()) == ["int-quantized", "pack-quantized"]
    model, _ = load_checkpoint(ckpt, get_adapter("llava"))
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.scheme == "w8a8"
    assert model.model.language_model.layers[0].mlp.up_proj.scheme == "w8a16"
    assert type(model.model.multi_modal_projector.linear_1).__name__ == "Linear"
    assert _reevaluate(out, vision, m) == pytest.approx(vision["metrics"], abs=1e-6)
    _plain_transformers_scores(ckpt, vision)


def _plain_transformers_scores(folder: Path, stage: dict) -> None:
    """A process that never imports this project loads the folder with every weight and scores the same."""
    from helpers import score_in_fresh_process

    result = score_in_fresh_process(folder, ROOT / "calibration/shapes-vqa/eval", max_new_tokens=24)
    assert result["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert result["exact_match"] == pytest.approx(stage["metrics"]["exact_match"], abs=1e-9)


def _bad_calibration(tmp_path: Path, image: bytes | None) -> Path:
    calib = tmp_path / "calib"
    calib.mkdir()
    if image is None:
        (calib / "metadata.jsonl").write_text("")
    else:
        (calib / "a.png").write_bytes(image)
        (calib / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "q", "answer": "a"}) + "\n")
    return calib


@pytest.mark.parametrize(("image", "needle"), [(b"not a png", "a.png"), (None, "empty")],
                         ids=["unreadable-image", "empty-set"])
def test_bad_calibration_data_fails_before_anything(tmp_path, capsys, image, needle):
    path = _recipe(tmp_path, [INT8])
    doc = yaml.safe_load(path.read_text())
    doc["calibration"] = {"source": str(_bad_calibration(tmp_path, image))}
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_union_field_errors_name_only_the_real_problem(tmp_path):
    stage = {**INT8, "activations": {"calibration": "percentile", "percentile": 101}}
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, [stage]))
    (line,) = str(e.value).splitlines()  # not also "Input should be 'none'" from the other union member
    assert "stages[0].activations.percentile: Input should be less than or equal to 100 (got 101)" in line
