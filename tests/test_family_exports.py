"""PaliGemma, Gemma3, InternVL and Mllama through ONNX: what each family does differently, against PyTorch.

PaliGemma attends bidirectionally over image + prompt (prefix-LM) and causally over the answer; Gemma3
attends bidirectionally within each image and has sliding-window layers (their decoder graphs take
`block_sequence_ids` built by the runner from the processor's token types); InternVL tiles large images;
Mllama tiles them too and reads the vision states through cross-attention layers (its decoder graph takes
the states and the processor's cross-attention mask on every call).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from compress.arch import get_adapter
from compress.export.files import read_meta
from compress.export.onnx import export_onnx
from compress.export.parity import check_parity
from compress.runtime.ort_runner import OrtRunner
from compress.runtime.torch_runner import TorchRunner
from compress.runtime.vision_inputs import block_sequence_ids
from compress.zoo.tiny import tiny_model

pytest.importorskip("onnxscript")
FAMILIES = ("paligemma", "gemma3", "internvl", "mllama")
QUESTIONS = ["what?", "what color is the largest shape in the top left corner of this picture?"]


def _images(sizes: list[tuple[int, int]], seed: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    family = request.param
    model, processor = tiny_model(family)
    adapter = get_adapter(family).bind(model)
    out = tmp_path_factory.mktemp(family)
    export_onnx(model, adapter, processor, out)
    if family == "internvl":  # tile images as the released checkpoints do (up to 6 tiles by aspect ratio)
        processor.image_processor.crop_to_patches, processor.image_processor.max_patches = True, 6
    return family, model, adapter, processor, out


def test_gemma3_image_blocks_match_the_model():
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    rng = np.random.default_rng(0)
    for _ in range(20):
        types = (rng.random((3, 17)) < 0.4).astype(np.int64)
        ref = get_block_sequence_ids_for_mask(torch.from_numpy(types)).numpy()
        assert np.array_equal(block_sequence_ids("images", types), ref)
    assert block_sequence_ids("prefix", np.array([[0, 0, 1, 1]])).tolist() == [[0, 0, -1, -1]]


def test_the_export_records_its_attention_blocks(exported):
    family, _, _, _, out = exported
    meta = read_meta(out)
    assert meta["attention_blocks"] == {"paligemma": "prefix", "gemma3": "images"}.get(family)
    inputs = [i.name for i in OrtRunner.from_dir(out).sessions["decoder"].get_inputs()]
    assert ("block_sequence_ids" in inputs) == (family in ("paligemma", "gemma3"))
    assert ("cross_attention_states" in inputs) == (family == "mllama") == meta["cross_attention"]
    if family == "mllama":  # self-attention layers only in the cache
        cross = set(range(meta["num_layers"])) - set(meta["cache_layers"])
        assert cross == {1} and "past_key_values.1.key" not in inputs


def test_teacher_forced_logits_match_torch(exported):
    """Prompt + forced answer (PaliGemma: the answer is the processor's suffix, attended causally)."""
    _, model, adapter, processor, out = exported
    batch = adapter.build_inputs(processor, _images([(64, 64), (40, 100)]), QUESTIONS, ["red", "a blue square"])
    ref = TorchRunner.for_adapter(model, adapter, processor).logits(batch.inputs).numpy()
    got = OrtRunner.from_dir(out).logits(batch.inputs).numpy()
    keep = batch.inputs["attention_mask"].numpy().astype(bool)
    assert np.abs(got - ref)[keep].max() < 1e-5


def test_the_extra_decoder_inputs_change_the_answer(exported):
    """The decoder graph really uses its extra inputs: a causal-only prefill (blocks) or one that attends to no
    image (Mllama's cross-attention mask) computes different logits."""
    family, _, adapter, processor, out = exported
    if family == "internvl":
        pytest.skip("InternVL's decoder has no extra inputs")
    runner = OrtRunner.from_dir(out)
    inputs = adapter.build_inputs(processor, _images([(64, 64), (64, 64)]), QUESTIONS).inputs
    mask = inputs["attention_mask"].numpy()
    embeds, positions = runner.prompt_embeds(inputs), runner.positions(inputs, mask)
    extra = runner.prompt_extras(inputs)
    logits, _ = runner.decode(embeds, mask, positions, runner.empty_past(2), extra)
    if family == "mllama":
        extra = {**extra, "cross_attention_mask": np.zeros_like(extra["cross_attention_mask"])}
    else:
        extra = {}
    changed, _ = runner.decode(embeds, mask, positions, runner.empty_past(2), extra)
    assert np.abs(logits - changed)[mask.astype(bool)].max() > 1e-3


def test_onnx_runtime_generates_what_torch_generates(exported):
    """Batch 2, left padding, 20 tokens (Gemma3: past its 16-token sliding window; InternVL, Mllama: tiles)."""
    family, model, adapter, processor, out = exported
    inputs = adapter.build_inputs(processor, _images([(48, 120), (64, 64)], seed=9), QUESTIONS).inputs
    if family == "internvl":
        assert len(inputs["pixel_values"]) > 2  # tiled
    if family == "mllama":
        assert inputs["aspect_ratio_mask"].sum() > 2  # tiled
    ours = OrtRunner.from_dir(out).generate(inputs, 20, ignore_eos=True)
    assert ours == TorchRunner.for_adapter(model, adapter, processor).generate(inputs, 20, ignore_eos=True)


def test_onnxruntime_genai_runs_the_folder_or_the_export_says_why_not(exported):
    """InternVL (tiles: several vision-batch items per prompt) answers through onnxruntime-genai as through our
    runner; the others carry decoder inputs genai does not feed, and export.json says which."""
    family, _, adapter, processor, out = exported
    meta = read_meta(out)
    if family != "internvl":
        assert "genai" in meta and "unsupported" in meta["genai"]
        assert ("cross-attention" if family == "mllama" else "block_sequence_ids") in meta["genai"]["unsupported"]
        assert not (out / "genai_config.json").exists()
        return
    pytest.importorskip("onnxruntime_genai")
    from compress.runtime.genai_runner import GenaiRunner

    inputs = adapter.build_inputs(processor, _images([(48, 120), (64, 64)], seed=9), QUESTIONS).inputs
    assert len(inputs["pixel_values"]) > 2  # tiled
    want = OrtRunner.from_dir(out).generate(inputs, 20, ignore_eos=True)
    assert GenaiRunner(out).generate(inputs, 20, ignore_eos=True) == want


def test_parity_with_images_of_other_shapes(exported):
    _, model, adapter, processor, out = exported
    samples = list(zip(_images([(40, 100), (100, 40)]), QUESTIONS, strict=True))
    errors = check_parity(model, adapter, processor, out, atol=1e-5, samples=samples, record=False)
    assert errors["end_to_end.logits"] < 1e-5 and errors["vision.image_features"] < 1e-4


def test_mllama_engine_profiles_cover_one_image_of_tiles_per_prompt(exported):
    from compress.export import tensorrt as T
    from compress.stages.engine import ProfilesConfig

    family, model, _, _, out = exported
    if family != "mllama":
        pytest.skip("Mllama's decoder alone reads vision states")
    io = read_meta(out)["io"]
    tiles = T._tiles(io)
    assert tiles == model.config.vision_config.max_num_tiles
    limits = ProfilesConfig(max_batch=4, max_prompt_tokens=64, max_new_tokens=16)
    prefill, decode = T.profiles_for("decoder", io["decoder"]["inputs"], limits, tiles=tiles)
    for profile in (prefill, decode):
        lo, opt, hi = profile.shapes["cross_attention_states"]
        assert (lo[0], opt[0], hi[0]) == (tiles, 2 * tiles, 4 * tiles)  # batch x tiles, as the vision graph gives
        assert profile.shapes["cross_attention_mask"][2] == [4, 64 if profile is prefill else 1, 1, tiles]
