"""Qwen2-VL / Qwen2.5-VL through ONNX: M-RoPE positions and patch-level vision inputs computed by the runner.

The runner's numpy helpers are checked against the transformers functions they mirror, then whole exports
are checked against the PyTorch model at image sizes, batch sizes and paddings the export never traced,
and a recipe (INT8 W8A8 on every component, then export) keeps its answers through ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import vision_utils

from compress.arch import get_adapter
from compress.export.files import read_meta
from compress.export.fuse import runtime_ops
from compress.export.onnx import export_onnx
from compress.export.parity import check_parity
from compress.pipeline import run
from compress.runtime import mrope
from compress.runtime.ort_runner import OrtRunner
from compress.runtime.torch_runner import TorchRunner
from compress.zoo.tiny import save_tiny, tiny_model

pytest.importorskip("onnxscript")
ROOT = Path(__file__).parent.parent
QWEN = ("qwen2_vl", "qwen2_5_vl")
GRIDS = [[[1, 4, 4]], [[1, 6, 4], [1, 4, 8]], [[2, 6, 10]], [[1, 10, 6], [1, 2, 2], [1, 8, 14]]]
# Sizes the export never saw (it traced two 32x32 images), with a processor that keeps them near their size.
UNSEEN = [(80, 48), (40, 96)]
WIDE = {"shortest_edge": 16 * 16, "longest_edge": 96 * 96}


def _images(sizes: list[tuple[int, int]], seed: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("window", [None, 16, 32, 56])
def test_vision_feeds_match_transformers(grid, window):
    g = torch.tensor(grid)
    ours = mrope.vision_position_ids(np.asarray(grid), 2)
    assert np.array_equal(ours, vision_utils.get_vision_position_ids(g, 2).numpy())
    cu = vision_utils.get_vision_cu_seqlens(g).numpy()
    assert np.array_equal(mrope.image_segments(np.asarray(grid)), np.repeat(np.arange(len(cu) - 1), np.diff(cu)))
    if window is None:
        return
    order, lengths = mrope.window_index(np.asarray(grid), mrope.VisionSpec(2, 8, window))
    ref_order, ref_cu = vision_utils.get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=8)
    assert np.array_equal(order, ref_order.numpy())
    assert np.array_equal(np.concatenate([[0], np.cumsum(lengths * 4)]), ref_cu.numpy())


@pytest.mark.parametrize("family", QWEN)
def test_rope_index_matches_the_model(family):
    model, processor = tiny_model(family)
    processor.image_processor.size = WIDE
    adapter = get_adapter(family).bind(model)
    inputs = adapter.build_inputs(processor, _images([(80, 48), (32, 32), (40, 96)]),
                                  ["what?", "what color is the large shape?", "which"]).inputs
    ref, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])
    ours = mrope.rope_index(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                            inputs["image_grid_thw"].numpy(), model.config.image_token_id, 2)
    assert np.array_equal(ours, ref.numpy())


@pytest.fixture(scope="module", params=[*QWEN, "qwen2_5_vl-window32"])
def exported(request, tmp_path_factory):
    family = request.param.split("-")[0]
    model, processor = tiny_model(family)
    if request.param.endswith("window32"):  # windows of 2x2 merged tokens, cut at the edges of odd grids
        model.model.visual.window_size = model.config.vision_config.window_size = 32
    adapter = get_adapter(family).bind(model)
    out = tmp_path_factory.mktemp(request.param)
    export_onnx(model, adapter, processor, out)
    processor.image_processor.size = WIDE
    return model, adapter, processor, out


def test_export_describes_its_inputs(exported):
    model, _, _, out = exported
    meta = read_meta(out)
    assert meta["positions"] == "mrope" and meta["image_tokens_per_image"] is None
    spec = meta["vision_inputs"]
    assert spec["spatial_merge_size"] == 2 and spec["window_size"] == getattr(model.model.visual, "window_size", None)
    runner = OrtRunner.from_dir(out)
    vision_inputs = [i.name for i in runner.sessions["vision"].get_inputs()]
    expected = ["pixel_values", "vision_position_ids", "attention_segments"]
    assert vision_inputs == expected + (["window_segments"] if spec["window_size"] else [])
    positions = next(i for i in runner.sessions["decoder"].get_inputs() if i.name == "position_ids")
    assert positions.shape[0] == 3


def test_parity_at_unseen_image_sizes_batch_2_left_padded(exported):
    model, adapter, processor, out = exported
    samples = list(zip(_images(UNSEEN), ["what is it?", "what color is the largest shape in this picture?"],
                       strict=True))
    errors = check_parity(model, adapter, processor, out, atol=1e-5, samples=samples, record=False)
    assert errors["vision.image_features"] < 1e-5 and errors["end_to_end.logits"] < 1e-5


def test_onnx_runtime_generates_what_torch_generates(exported):
    model, adapter, processor, out = exported
    inputs = adapter.build_inputs(processor, _images(UNSEEN, seed=5), ["how many?", "where is the red circle?"]).inputs
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) == 2  # rows of different lengths: left padding
    ours = OrtRunner.from_dir(out).generate(inputs, 8, ignore_eos=True)
    assert ours == TorchRunner.for_adapter(model, adapter, processor).generate(inputs, 8, ignore_eos=True)


def test_onnxruntime_genai_runs_the_folder_or_the_export_says_why_not(exported):
    """Qwen2-VL: genai's Qwen type computes the M-RoPE positions from the image grids itself, and answers like
    our runner (prompts one at a time, images of sizes the export never traced). Windowed Qwen2.5-VL towers emit
    window order, which genai would hand on as it comes: refused, with the reason in export.json."""
    _, adapter, processor, out = exported
    meta = read_meta(out)
    if meta["vision_inputs"]["window_size"]:
        assert "window order" in meta["genai"]["unsupported"] and not (out / "genai_config.json").exists()
        return
    pytest.importorskip("onnxruntime_genai")
    from compress.runtime.genai_runner import GenaiRunner

    assert meta["genai"] == {"config": "genai_config.json", "model_type": "qwen2_5_vl"}
    genai, ours = GenaiRunner(out), OrtRunner.from_dir(out)
    for image, question in zip(_images(UNSEEN, seed=5), ["how many?", "where is the red circle?"], strict=True):
        one = adapter.build_inputs(processor, [image], [question]).inputs
        assert genai.generate(one, 8, ignore_eos=True) == ours.generate(one, 8, ignore_eos=True)
    text = dict(processor.tokenizer(["what is it?"], return_tensors="np"))  # no image: 0 feature rows
    assert genai.generate(text, 8, ignore_eos=True) == ours.generate(text, 8, ignore_eos=True)


def test_a_mismatched_grid_is_a_clear_error(exported):
    _, adapter, processor, out = exported
    inputs = adapter.build_inputs(processor, _images(UNSEEN), ["a", "b"]).inputs
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="image_grid_thw covers"):
        OrtRunner.from_dir(out).image_features(inputs)


def _run(tmp: Path, model: Path, stages: list[dict]) -> list[dict]:
    doc = {"name": "qwen", "seed": 0, "model": {"source": str(model)},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 16, "batch_size": 8},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 24, "batch_size": 8,
                          "max_new_tokens": 6},
           "stages": stages}
    tmp.mkdir()
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run(recipe, out=tmp / "run")
    assert result.status == "completed"
    return result.manifest["stages"]


@pytest.mark.parametrize("family", QWEN)
def test_recipes_keep_the_answers_through_onnx_runtime(family, tmp_path):
    """fp32 export gated at 0.995 token agreement with the model's own answers; W8A8 on vision and language
    then export, whose answers are the INT8 PyTorch model's (within one token in 100)."""
    model = save_tiny(family, tmp_path / "model")
    keep = {"metric": "token_agreement", "min_retention": 0.995, "on_fail": "stop"}
    (fp32,) = _run(tmp_path / "fp32", model, [{"name": "onnx", "type": "export", "format": "onnx", "gate": keep}])
    assert fp32["status"] == "completed" and fp32["metrics"]["token_agreement"] >= 0.995

    loose = {"metric": "token_agreement", "min_retention": 0.5, "on_fail": "warn"}
    int8, onnx_int8 = _run(tmp_path / "int8", model, [
        {"name": "int8", "type": "quantize", "scheme": "int8", "activations": {"calibration": "minmax"},
         "targets": {"components": ["vision", "projector", "language"]}, "gate": loose},
        {"name": "onnx", "type": "export", "format": "onnx", "gate": loose}])
    assert onnx_int8["status"] == "completed"  # its parity check passed too
    assert abs(onnx_int8["metrics"]["token_agreement"] - int8["metrics"]["token_agreement"]) <= 0.01
    meta = read_meta(tmp_path / "int8/run" / onnx_int8["artifacts"])
    vision = [name for name in meta["quantized"]["modules"] if ".visual." in name]
    assert vision and all(meta["quantized"]["modules"][n]["onnx"].startswith(("QuantizeLinear", "MatMulInteger"))
                          for n in vision)
    # Qwen's vision blocks take 2-D [patches, hidden] inputs, which ORT would turn into Gemm before its QDQ
    # fusion (weights dequantized on every call): every projection must still run as an integer GEMM.
    art = tmp_path / "int8/run" / onnx_int8["artifacts"]
    used = runtime_ops(art / "vision.onnx", disabled_optimizers=meta["session"]["disabled_optimizers"])
    merged = meta["fused_ops"]["vision"]["passes"][-1]["merged_away"]["qdq_matmul"]  # q/k/v, gate/up: one each
    assert used.get("MatMulIntegerToFloat") == len(vision) - merged and "DequantizeLinear" not in used
    if family == "qwen2_vl" and importlib.util.find_spec("onnxruntime_genai"):  # the INT8 folder in genai too
        from compress.runtime.genai_runner import GenaiRunner

        adapter = get_adapter(family)
        processor = adapter.load_processor(str(art))
        genai, ours = GenaiRunner(art), OrtRunner.from_dir(art)
        for image, question in zip(_images(UNSEEN, seed=6), ["how many?", "what color?"], strict=True):
            one = adapter.build_inputs(processor, [image], [question]).inputs
            assert genai.generate(one, 6, ignore_eos=True) == ours.generate(one, 6, ignore_eos=True)
