"""The `tokens` stage: the reductions' arithmetic, prompts that follow them, the bundled model reduced,
quantized and exported (the reduced vision graph parity-checked, the folder scored again from disk), the
checkpoint that reloads reduced in this toolkit and unreduced in plain transformers, and the refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, recipe_error

from compress.tokens.install import record_for
from compress.tokens.prompt import shrink_placeholders
from compress.tokens.reduce import pool, select_merge


def test_pool_averages_equal_windows_of_the_grid():
    x = torch.randn(2, 16, 5)
    got = pool(x, 4, 2)
    grid = x.reshape(2, 4, 4, 5)
    assert got.shape == (2, 4, 5)
    assert torch.allclose(got[:, 1], grid[:, 0:2, 2:4].mean(dim=(1, 2)))  # top-right window
    assert torch.allclose(got[:, 2], grid[:, 2:4, 0:2].mean(dim=(1, 2)))  # bottom-left window


def test_select_merge_keeps_the_top_tokens_in_order_and_merges_the_rest_by_similarity():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6)
    x[0, 5] = x[0, 2] * 3  # same direction as token 2: merged with it
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.8, 0.0, 0.3, 0.0]])
    out = select_merge(x, scores, dominant=2, contextual=3)
    assert out.shape == (1, 5, 6)
    assert torch.equal(out[0, :2], x[0, [1, 4]])  # the two most attended, in image order
    # the rest (0, 2, 3, 5, 6, 7): targets every 2nd (0, 3, 6); each other token joins its most similar target
    rest = x[0, [0, 2, 3, 5, 6, 7]]
    unit = rest / rest.norm(dim=-1, keepdim=True)
    assign = (unit @ unit[[0, 2, 4]].T).argmax(-1)
    for c in range(3):
        assert torch.allclose(out[0, 2 + c], rest[assign == c].mean(0), atol=1e-6)
    assert assign[1] == assign[3]  # tokens 2 and 5 (parallel) land in one merged token


def test_plans_refuse_what_is_not_a_reduction_or_not_a_square_grid():
    assert record_for("pool", 576, None, 0.25, None) == {"method": "pool", "tokens_in": 576, "tokens": 144,
                                                         "grid": 24, "target": 12}
    assert record_for("select_merge", 576, 64, None, None)["dominant"] == 54  # VisionZip's 54 + 10
    for args, words in ((("pool", 576, 100, None, None), "keep one of"),
                        (("pool", 16, 16, None, None), "not a reduction"),
                        (("pool", 12, 4, None, None), "square patch grid")):
        with pytest.raises(Exception, match=words):
            record_for(*args)


def test_placeholders_follow_the_reduction_with_left_padding_rebuilt():
    img, pad = 9, 0
    ids = torch.tensor([[pad, pad, 1, img, img, img, img, 2, 3],
                        [1, img, img, img, img, img, img, img, img]])  # row 2: two images side by side
    mask = (ids != pad).long()
    out = shrink_placeholders({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(2, 3)},
                              img, tokens_in=4, tokens=1, pad_id=pad)
    assert out["input_ids"].tolist() == [[1, img, 2, 3], [pad, 1, img, img]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert out["pixel_values"] is not None and out["pixel_values"].shape == (2, 3)
    again = shrink_placeholders(out, img, tokens_in=4, tokens=1, pad_id=pad)  # cut already: unchanged
    assert torch.equal(again["input_ids"], out["input_ids"])


def _recipe(tmp: Path, stages: list[dict]) -> Path:
    doc = {"name": "tokens", "seed": 0, "model": {"source": "zoo:shapes-vqa"},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 32,
                           "batch_size": 32},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 40, "batch_size": 40,
                          "max_new_tokens": 8},
           "stages": stages}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_fast_tokens_recipe_keeps_its_answers_through_onnx(tmp_path):
    """recipes/fast-tokens.yaml as shipped (evaluation cut to 100 records): pooling 16 -> 4 tokens alone
    fails its gate (it warns), distillation from the unreduced model wins the answers back, and INT8 and the
    ONNX export keep >= 0.97 retention; the vision graph emits 4 tokens, onnxruntime-genai runs the folder,
    the checkpoint reloads reduced here and unreduced in plain transformers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from compress.arch import get_adapter
    from compress.checkpoint import load_checkpoint
    from compress.pipeline import run

    doc = yaml.safe_load((ROOT / "recipes/fast-tokens.yaml").read_text())
    for section in ("calibration", "evaluation"):
        doc[section]["source"] = str(ROOT / doc[section]["source"].removeprefix("../"))
    doc["stages"][1]["data"]["source"] = str(ROOT / "calibration/shapes-vqa/distill")
    doc["evaluation"]["num_samples"] = 100
    recipe = tmp_path / "fast-tokens.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "run"
    result = run(recipe, out=out)
    recs = {s["name"]: s for s in result.manifest["stages"]}
    retention = {n: next(c["retention"] for c in r["checks"] if c["metric"] == "exact_match")
                 for n, r in recs.items()}
    assert recs["pool-4"]["status"] == "warned" and retention["pool-4"] < 0.5, retention
    assert [recs[n]["status"] for n in ("distill", "int8", "onnx")] == ["completed"] * 3, retention
    assert min(retention["distill"], retention["int8"], retention["onnx"]) >= 0.97, retention
    report = (out / "report.md").read_text()
    assert "### pool-4 (tokens): warned" in report and "### distill (distill): completed" in report
    folder = out / recs["onnx"]["artifacts"]
    meta = json.loads((folder / "export.json").read_text())
    assert meta["image_tokens_per_image"] == 4 and meta["token_reduction"]["method"] == "pool"
    assert meta["genai"]["config"] == "genai_config.json"

    adapter = get_adapter("llava")
    ckpt = out / recs["int8"]["checkpoint"]
    model, processor = load_checkpoint(ckpt, adapter)
    assert adapter.image_tokens == (16, 4)
    batch = adapter.build_inputs(processor, [_image()], ["what color is the shape?"])
    assert int((batch.inputs["input_ids"] == model.config.image_token_id).sum()) == 4
    if importlib.util.find_spec("onnxruntime_genai"):
        from compress.runtime.genai_runner import GenaiRunner
        from compress.runtime.ort_runner import OrtRunner

        assert GenaiRunner(folder).generate(batch.inputs, 24) == OrtRunner.from_dir(folder).generate(batch.inputs, 24)
    # plain transformers: the unreduced model (it ignores config.compress_tokens), its processor's 16 tokens
    plain = LlavaForConditionalGeneration.from_pretrained(out / recs["distill"]["checkpoint"])
    proc = AutoProcessor.from_pretrained(ckpt)
    enc = proc(images=[_image()], text=["<image> what color?"], return_tensors="pt")
    assert int((enc["input_ids"] == plain.config.image_token_id).sum()) == 16
    with torch.no_grad():
        assert plain(**enc).logits.isfinite().all()


def test_select_merge_graph_ops_match_torch():
    """select_merge 16 -> 6 (4 dominant + 2 merged) on a tiny LLaVA: the vision graph's TopK / GatherElements
    / ScatterElements / ArgMax / MatMul program gives the hook's tokens, and the folder answers like torch."""
    import tempfile

    from compress.arch import get_adapter
    from compress.export.onnx import export_onnx
    from compress.export.parity import check_parity
    from compress.tokens.install import install
    from compress.zoo.tiny import tiny_model

    model, processor = tiny_model("llava")
    adapter = get_adapter("llava")
    install(model, adapter, record_for("select_merge", 16, 6, None, 4))
    adapter.bind(model)
    with tempfile.TemporaryDirectory() as out:
        export_onnx(model, adapter, processor, out, fusion=False)
        meta = json.loads((Path(out) / "export.json").read_text())
        assert meta["image_tokens_per_image"] == 6 and meta["token_reduction"]["dominant"] == 4
        errors = check_parity(model, adapter, processor, out, atol=1e-4, rtol=1e-3, record=False)
        assert errors["vision.image_features"] < 1e-4 and errors["end_to_end.logits"] < 1e-4


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.mark.parametrize("stages, words", [
    ([{"type": "tokens", "method": "pool", "gate": {"min_retention": 0.5}}], "exactly one of keep"),
    ([{"type": "tokens", "method": "pool", "keep": 2, "dominant": 1, "gate": {"min_retention": 0.5}}],
     "select_merge only"),
], ids=["no-count", "dominant-with-pool"])
def test_recipes_that_cannot_reduce_are_refused_when_they_load(tmp_path, stages, words):
    assert words in recipe_error(tmp_path, stages)


def test_stages_after_a_reduction_keep_it(tmp_path):
    """Distillation from the unreduced model (teacher prompts with 4 image tokens, student prompts with 1),
    shrink (rebuilds the model) and INT4 GPTQ (calibrates on the prompts): all after a pool stage, all on
    the reduced model, and the last checkpoint reloads reduced."""
    from compress.arch import get_adapter
    from compress.checkpoint import load_checkpoint
    from compress.pipeline import run

    lenient = {"min_retention": 0.01, "on_fail": "warn"}
    stages = [{"type": "tokens", "name": "pool", "method": "pool", "keep": 1, "gate": lenient},
              {"type": "distill", "name": "distill", "steps": 12, "batch_size": 8, "lr": 1e-3,
               "freeze": ["vision", "embeddings"], "gate": lenient},
              {"type": "shrink", "name": "shrink", "mlp": 0.5, "gate": lenient},
              {"type": "quantize", "name": "int4", "scheme": "int4", "targets": {"components": ["language"]},
               "int4": {"group_size": 32, "rounding": "gptq"}, "gate": lenient}]
    result = run(_recipe(tmp_path, stages), out=tmp_path / "run")
    statuses = [s["status"] for s in result.manifest["stages"]]
    distill = result.manifest["stages"][1]["details"]
    assert distill["teacher_kl_after"] < 0.8 * distill["teacher_kl_before"], distill
    assert len(statuses) == 4 and set(statuses) <= {"completed", "warned"}, result.manifest["stages"]
    adapter = get_adapter("llava")
    model, processor = load_checkpoint(tmp_path / "run" / result.manifest["stages"][-1]["checkpoint"], adapter)
    assert adapter.image_tokens == (4, 1)
    batch = adapter.build_inputs(processor, [_image()], ["what color is the shape?"])
    with torch.no_grad():
        assert model(**batch.inputs).logits.isfinite().all()


def test_a_count_the_grid_cannot_give_is_refused_before_anything_loads(tmp_path, capsys):
    """pool keep 2 on a 2x2 grid (1 is the only smaller square): `validate` and `run` both say so, naming the
    stage, and nothing is written."""
    from compress.cli import main

    recipe = _recipe(tmp_path, [{"type": "tokens", "method": "pool", "keep": 2, "gate": {"min_retention": 0.5}}])
    assert main(["validate", str(recipe)]) == 2
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("stages[0]: tokens: pool turns the 2x2 grid into a smaller square grid") == 2, err
    assert "keep one of [1]" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
