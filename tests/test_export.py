"""ONNX export, fusion, carried quantization and the ONNX Runtime runner, on tiny real models (no mocks).

Each export traces real torch modules with the dynamo exporter and runs the graphs in ONNX Runtime's
CPU provider; module-scoped fixtures export each model once.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.arch import get_adapter, select_modules
from compress.config import Targets
from compress.errors import ConfigError
from compress.export.files import copy_export, read_meta
from compress.export.fuse import count_ops, fuse_export, runtime_ops
from compress.export.onnx import dummy_images, export_onnx
from compress.export.parity import ParityError, check_parity
from compress.export.portable import ort_optimized
from compress.quant import ActQuant, Int8Linear, WeightQuant, quantize_linears
from compress.runtime.ort_runner import OrtRunner, resolve_providers
from compress.runtime.torch_runner import TorchRunner
from compress.stages.export import speed_note
from compress.zoo.tiny import tiny_model

pytest.importorskip("onnxscript")

QUESTIONS = ["what?", "what color is the large shape in the top left corner?", "which one is it"]
FP32_ATOL = 1e-5
# INT8: graph and torch use the same grid, but ORT's integer GEMM accumulates exactly where torch's fake-quant
# accumulates in float; a value within ~1e-6 of a rounding boundary can land one step apart in the next
# layer. On these tiny models the measured error is ~1e-7; the tolerance allows a few such flips (end to end,
# a flip in the vision tower's integer GEMMs reaches the logits through the decoder: 6.5e-3 at 28 of 43,420).
INT8_ATOL = {"vision": 5e-3, "embed": 0.0, "decoder": 5e-3, "end_to_end": 1e-2}
NF4_ATOL = 1e-5  # bnb's own codes and absmax: exact weights, float32 GEMM on both sides


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Exported:
    def __init__(self, family: str, out: Path, model: nn.Module, adapter: Any, processor: Any, result: Any):
        self.family, self.out, self.model, self.adapter, self.processor, self.result = (
            family, out, model, adapter, processor, result)

    def inputs(self, answers: list[str] | None = None, seed: int = 7) -> Any:
        return self.adapter.build_inputs(self.processor, dummy_images(3, seed=seed), QUESTIONS, answers)

    def torch_runner(self) -> TorchRunner:
        return TorchRunner.for_adapter(self.model, self.adapter, self.processor)


def _export(family: str, out: Path, fusion: bool, prepare=None, **options: Any) -> Exported:
    model, processor = tiny_model(family)
    adapter = get_adapter(family).bind(model)
    if prepare is not None:
        model = prepare(model, adapter, processor)
        adapter = get_adapter(family).bind(model)
    result = export_onnx(model, adapter, processor, out, fusion=fusion, **options)
    return Exported(family, out, model, adapter, processor, result)


def _w8a8(model: nn.Module, adapter: Any, processor: Any) -> nn.Module:
    targets = Targets(components=["vision", "projector", "language", "lm_head"])
    calib = [adapter.build_inputs(processor, dummy_images(3, seed=s), QUESTIONS).inputs for s in (1, 2)]

    def loop(m: nn.Module) -> None:
        with torch.inference_mode():
            for batch in calib:
                m(**batch)

    quantize_linears(model, select_modules(model, adapter, targets), WeightQuant(), ActQuant("minmax"), loop)
    return model


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export("llava", tmp_path_factory.mktemp("llava") / "onnx", fusion=False)


@pytest.fixture(scope="module")
def llava_fused(llava: Exported, tmp_path_factory: pytest.TempPathFactory) -> tuple[Exported, dict[str, Any]]:
    out = copy_export(llava.out, tmp_path_factory.mktemp("llava-fused") / "onnx")
    fused = fuse_export(out)
    return Exported(llava.family, out, llava.model, llava.adapter, llava.processor, llava.result), fused


def _same_generation(exp: Exported, runner: OrtRunner, tokens: int = 10) -> None:
    batch = exp.inputs()
    ref = exp.torch_runner()
    want = ref.generate(batch.inputs, tokens)
    assert runner.generate(batch.inputs, tokens) == want
    # Stopping rule: make a token the middle row produces an eos, so rows stop at different steps and
    # finished rows are fed the pad token, exactly as TorchRunner does.
    stop = want[1][2]
    ref.eos.add(stop)
    runner.eos.add(stop)
    try:
        stopped = ref.generate(batch.inputs, tokens)
        assert len(stopped[1]) <= 2
        assert runner.generate(batch.inputs, tokens) == stopped
    finally:
        ref.eos.discard(stop)
        runner.eos.discard(stop)


# ---- fp32 LLaVA ----------------------------------------------------------------------------------------


def test_llava_artifact_is_self_describing(llava: Exported):
    meta = read_meta(llava.out)
    assert meta["graphs"] == {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}
    assert set(llava.result.files) == {"vision", "embed", "decoder"}
    assert meta["num_layers"] == 2 and meta["num_kv_heads"] == 2 and meta["head_dim"] == 8
    assert meta["image_token_id"] == llava.model.config.image_token_index
    assert meta["image_tokens_per_image"] == 16 and meta["dtype"] == "float32"
    io = {g: {v["name"]: v["shape"] for v in d["inputs"] + d["outputs"]} for g, d in meta["io"].items()}
    assert io["vision"]["pixel_values"][0] == "batch" and io["vision"]["image_features"] == ["image_tokens", 32]
    dec = io["decoder"]
    assert dec["inputs_embeds"] == ["batch", "seq", 32]
    assert dec["attention_mask"] == ["batch", "total"]
    assert dec["past_key_values.1.value"] == ["batch", 2, "past", 8]
    assert dec["present.1.value"] == ["batch", 2, "total", 8]
    assert dec["logits"][:2] == ["batch", "seq"]
    assert all(size > 0 for size in meta["sizes"].values())


def test_llava_fp32_parity(llava: Exported):
    errors = check_parity(llava.model, llava.adapter, llava.processor, llava.out, atol=FP32_ATOL, rtol=1e-4)
    assert {"vision.image_features", "embed.inputs_embeds", "decoder.prefill.logits", "decoder.prefill.present",
            "decoder.decode.logits", "decoder.decode.present", "end_to_end.logits"} <= set(errors)
    assert max(errors.values()) < FP32_ATOL
    assert read_meta(llava.out)["parity"]["max_abs_error"] == errors


def test_ort_runner_matches_torch_runner(llava: Exported):
    runner = OrtRunner.from_dir(llava.out)
    assert runner.backend == "onnxruntime" and runner.providers == ["CPUExecutionProvider"]
    _same_generation(llava, runner)
    batch = llava.inputs(answers=["red", "a blue circle", "no"])
    got, want = runner.logits(batch.inputs), llava.torch_runner().logits(batch.inputs)
    assert got.shape == want.shape and got.dtype == torch.float32
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=FP32_ATOL, rtol=1e-4)


def test_parity_failure_names_the_output(llava: Exported):
    head = llava.model.lm_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.add_(0.05)
        with pytest.raises(ParityError, match=r"decoder output 'prefill.logits': max abs error"):
            check_parity(llava.model, llava.adapter, llava.processor, llava.out, record=False)
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_fused_graphs_show_fused_ops_and_keep_parity(llava_fused: tuple[Exported, dict[str, Any]]):
    exp, fused = llava_fused
    vision, decoder = fused["vision"], fused["decoder"]
    assert vision["after"]["Attention"] == 2 and vision["before"]["Attention"] == 0
    assert vision["after"]["SkipLayerNormalization"] >= 2 and vision["after"]["QuickGelu"] == 2
    assert decoder["after"]["MultiHeadAttention"] == 2
    assert decoder["after"]["SkipSimplifiedLayerNormalization"] == 4
    assert decoder["after"]["SimplifiedLayerNormalization"] == 1
    assert decoder["after"]["RotaryEmbedding"] == 4  # q and k of 2 layers, on [batch, seq, heads * d]
    for graph in (vision, decoder):
        assert graph["after"]["nodes"] < graph["before"]["nodes"]
    meta = read_meta(exp.out)
    assert meta["fused"] and meta["fused_ops"]["decoder"]["after"] == count_ops(exp.out / "decoder.onnx")
    errors = check_parity(exp.model, exp.adapter, exp.processor, exp.out, atol=FP32_ATOL, rtol=1e-4)
    assert max(errors.values()) < FP32_ATOL
    _same_generation(exp, OrtRunner.from_dir(exp.out))


# ---- quantized graphs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_group_query_attention_and_last_position_logits(family: str, tmp_path: Path):
    """One GroupQueryAttention per layer replaces the traced cache Concat / head Expand / attention; the
    model's own mask rides along as attention_bias (Gemma 3: sliding windows and bidirectional image
    blocks), and generation asks the lm_head for the last position only. Same logits, same answers."""
    model, processor = tiny_model(family)
    adapter = get_adapter(family).bind(model)
    out = tmp_path / "onnx"
    export_onnx(model, adapter, processor, out, fusion=True, group_query_attention=True, select_logits=True)
    meta = read_meta(out)
    assert meta["decoder_attention"] == "GroupQueryAttention" and meta["logits_index"] is True
    layers = meta["num_layers"]
    after = meta["fused_ops"]["decoder"]["after"]
    assert after["GroupQueryAttention"] == layers and after["MultiHeadAttention"] == 0
    # rotary: one com.microsoft RotaryEmbedding per q and k (Gemma 3: local and global tables, per-head norms
    # before it), and at run time no head Transposes or rotate-half ops are left around it
    assert after["RotaryEmbedding"] == 2 * layers
    assert meta["fused_ops"]["decoder"]["passes"][2] == {"tool": "compress.export.rotary", "rotary_fused": 2 * layers}
    ran = runtime_ops(out / "decoder.onnx")
    assert ran["RotaryEmbedding"] == 2 * layers and "Transpose" not in ran and "Neg" not in ran
    # the head views around the fused ops cancel (compress.export.views): LLaVA's q, k, v and attention output
    # go from projection to GroupQueryAttention to o_proj without a Reshape (Gemma 3: v and the output)
    views = meta["fused_ops"]["decoder"]["passes"][3]
    assert views["tool"] == "compress.export.views" and views["reshapes_bypassed"] >= 2 * layers
    if family == "llava":
        kept = [n for n in ort_optimized(out / "decoder.onnx").graph.node if n.op_type == "Reshape"]
        assert views["reshapes_bypassed"] == 4 * layers and len(kept) <= 3
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    past = {i.name for i in graph.graph.input if i.name.startswith("past_key_values.")}
    assert not [n for n in graph.graph.node if n.op_type in ("Concat", "Expand") and set(n.input) & past]
    errors = check_parity(model, adapter, processor, out, atol=1e-4, rtol=1e-3)
    assert "decoder.prefill.last_logits" in errors and errors["decoder.decode.logits"] <= 1e-4
    runner = OrtRunner.from_dir(out)
    assert runner.selects_logits and meta["past_buffer"] == "shared" and runner.shared_past
    exp = Exported(family, out, model, adapter, processor, None)
    _same_generation(exp, runner)
    # The shared buffer (past and present bound to one preallocated OrtValue per layer) gives the logits the
    # copying path gives, step by step: lengths come from the mask, never from the buffer's size.
    batch = exp.inputs().inputs
    mask = batch["attention_mask"].numpy().astype(np.int64)
    positions, extra = runner.positions(batch, mask), runner.prompt_extras(batch)
    embeds = runner.prompt_embeds(batch)
    buffers = runner.shared_buffers(len(mask), mask.shape[1] + 8)
    copied, past = runner.decode(embeds, mask, positions, runner.empty_past(len(mask)), extra, last_only=True)
    shared = runner.decode_shared(embeds, mask, positions, buffers, extra)
    assert np.abs(shared[:, -1] - copied[:, -1]).max() <= 1e-5
    step_extra = runner.step_extras(extra)
    for _ in range(3):
        fed = copied[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
        positions = positions[..., -1:] + 1
        copied, past = runner.decode(runner.embed(fed), mask, positions, past, step_extra)
        shared = runner.decode_shared(runner.embed(fed), mask, positions, buffers, step_extra)
        assert np.abs(shared[:, -1] - copied[:, -1]).max() <= 1e-5
    keys = buffers[0].numpy()
    assert np.abs(keys[:, :, : mask.shape[1]] - past[0]).max() <= 1e-6 and not keys[:, :, mask.shape[1]:].any()


def test_int8_w8a8_export_carries_the_quantize_stage_scales(tmp_path: Path):
    exp = _export("llava", tmp_path / "int8", fusion=True, prepare=_w8a8)
    int8 = {n: m for n, m in exp.model.named_modules() if isinstance(m, Int8Linear)}
    decoder_int8 = [n for n in int8 if n.startswith(("model.language_model", "lm_head"))]
    assert exp.result.quantized["schemes"] == {"w8a8": len(int8)}
    meta = read_meta(exp.out)
    assert meta["session"]["disabled_optimizers"] == ["CommonSubexpressionElimination"]

    decoder = onnx.load(str(exp.out / "decoder.onnx"))
    ops = count_ops(decoder)
    # A layer's q/k/v and gate/up read one input with one scale: each group is one projection over stacked
    # weights (2 + 1 nodes merged away per layer), bit-identical to the separate ones.
    merged = {g: meta["fused_ops"][g]["passes"][-1]["merged_away"]["qdq_matmul"] for g in ("decoder", "vision")}
    assert merged["decoder"] == 3 * exp.model.config.text_config.num_hidden_layers
    gemms = len(decoder_int8) - merged["decoder"]
    # One activation QuantizeLinear per projection; one DequantizeLinear per activation and per weight.
    assert ops["QuantizeLinear"] == gemms and ops["DequantizeLinear"] == 2 * gemms
    # Portable encoding: each int8 weight is stored as uint8 with zero point 128, the same grid shifted.
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in decoder.graph.initializer}
    weight_dq = [n for n in decoder.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
                 and consts[n.input[0]].ndim == 2]
    assert len(weight_dq) == gemms
    assert sum(consts[n.input[0]].shape[1] for n in weight_dq) == sum(int8[n].out_features for n in decoder_int8)
    qkv = [int8[f"model.language_model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    qkv_scale = np.concatenate([m.weight_scale.numpy().reshape(-1) for m in qkv])
    matches = [n for n in weight_dq if np.array_equal(consts[n.input[1]], qkv_scale)]
    assert len(matches) == 1 and consts[matches[0].input[0]].dtype == np.uint8
    codes = np.concatenate([m.weight_int8.numpy().T for m in qkv], axis=1)
    assert np.array_equal(consts[matches[0].input[0]].astype(np.int16) - 128, codes)
    assert np.all(consts[matches[0].input[2]] == 128)
    assert meta["int8_kernels"]["mode"] == "portable" and meta["int8_kernels"]["requires"] is None
    # The scales are the module's own, not recalibrated.
    q_scales = {float(consts[n.input[1]]) for n in decoder.graph.node if n.op_type == "QuantizeLinear"}
    assert q_scales == {float(int8[n].input_scale) for n in decoder_int8}
    # ONNX Runtime's CPU provider runs every decoder projection as an integer GEMM.
    used = runtime_ops(exp.out / "decoder.onnx", disabled_optimizers=meta["session"]["disabled_optimizers"])
    assert used.get("MatMulIntegerToFloat") == gemms
    # Vision too: q/k/v stay three integer GEMMs feeding MultiHeadAttention (a packed Attention would
    # dequantize and concatenate their weights on every call); no weight is dequantized at run time.
    vision_int8 = [n for n in int8 if n.startswith(("model.vision_tower", "model.multi_modal_projector"))]
    used = runtime_ops(exp.out / "vision.onnx", disabled_optimizers=meta["session"]["disabled_optimizers"])
    assert merged["vision"] > 0
    assert used.get("MatMulIntegerToFloat") == len(vision_int8) - merged["vision"] and "DequantizeLinear" not in used
    layers = exp.model.config.vision_config.num_hidden_layers
    passes = {p["tool"].rsplit(".", 1)[-1]: p for p in meta["fused_ops"]["vision"]["passes"]}
    assert passes["unpack_quantized_attention"]["attention_unpacked"] == layers

    errors = check_parity(exp.model, exp.adapter, exp.processor, exp.out, atol=INT8_ATOL, rtol=1e-3)
    assert max(errors.values()) < 1e-2
    _same_generation(exp, OrtRunner.from_dir(exp.out))


def test_nf4_export_packs_bnb_codes_into_matmulbnb4(tmp_path: Path, llava: Exported):
    pytest.importorskip("bitsandbytes")
    from compress.export.qdq import Bnb4Linear
    from compress.quant import quantize_nf4

    def nf4(model: nn.Module, adapter: Any, processor: Any) -> nn.Module:
        names = list(select_modules(model, adapter, Targets(components=["language"])))
        return quantize_nf4(model, names, blocksize=32, double_quant=True, workdir=tmp_path / "work")

    exp = _export("llava", tmp_path / "nf4", fusion=False, prepare=nf4)
    layers = {n: m for n, m in exp.model.named_modules() if type(m).__name__ == "Linear4bit"}
    import bitsandbytes as bnb

    for layer in layers.values():  # the packed codes reproduce bnb's weight exactly
        want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(Bnb4Linear(layer).dequantized_weight(), want.float())
    decoder = onnx.load(str(exp.out / "decoder.onnx"))
    bnb_nodes = [n for n in decoder.graph.node if n.op_type == "MatMulBnb4"]
    assert len(bnb_nodes) == len(layers) and all(n.domain == "com.microsoft" for n in bnb_nodes)
    attrs = {a.name: a.i for a in bnb_nodes[0].attribute}
    assert attrs["quant_type"] == 1 and attrs["block_size"] == 32
    assert read_meta(exp.out)["sizes"]["decoder.onnx"] < read_meta(llava.out)["sizes"]["decoder.onnx"]
    fp32_weights = sum(t.ByteSize() for t in onnx.load(str(llava.out / "decoder.onnx")).graph.initializer)
    assert sum(t.ByteSize() for t in decoder.graph.initializer) < 0.6 * fp32_weights  # lm_head stays fp32

    errors = check_parity(exp.model, exp.adapter, exp.processor, exp.out, atol=NF4_ATOL, rtol=1e-4)
    assert max(errors.values()) < NF4_ATOL
    _same_generation(exp, OrtRunner.from_dir(exp.out))


# ---- other families ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_family_exports_fused_with_parity(family: str, tmp_path: Path):
    exp = _export(family, tmp_path / family, fusion=True)
    assert exp.result.fused_ops["vision"]["after"]["Attention"] == 2
    errors = check_parity(exp.model, exp.adapter, exp.processor, exp.out, atol=FP32_ATOL, rtol=1e-4)
    assert max(errors.values()) < FP32_ATOL
    _same_generation(exp, OrtRunner.from_dir(exp.out))
    if importlib.util.find_spec("onnxruntime_genai"):  # the same folder through onnxruntime-genai
        from compress.runtime.genai_runner import GenaiRunner

        # One prompt per call, as genai takes them (unpadded): a random tiny model's near-tied logits move
        # with the padding of a batch.
        for image, question in zip(dummy_images(3), QUESTIONS, strict=False):
            one = exp.adapter.build_inputs(exp.processor, [image], [question]).inputs
            want = OrtRunner.from_dir(exp.out).generate(one, 10, ignore_eos=True)
            assert GenaiRunner(exp.out).generate(one, 10, ignore_eos=True) == want


def test_idefics3_refuses_padded_images():
    from compress.export.onnx import vision_pixels

    pixels = np.ones((1, 1, 3, 32, 32), dtype=np.float32)
    mask = np.ones((1, 1, 32, 32), dtype=np.int64)
    assert vision_pixels("idefics3", {"pixel_values": pixels, "pixel_attention_mask": mask}).shape == (1, 3, 32, 32)
    mask[..., 20:] = 0
    with pytest.raises(ConfigError, match="whole images only"):
        vision_pixels("idefics3", {"pixel_values": pixels, "pixel_attention_mask": mask})


def test_an_unknown_architecture_is_refused_before_writing(tmp_path: Path):
    model, processor = tiny_model("llava")
    adapter = get_adapter("llava").bind(model)
    model.config.model_type = "bert"
    with pytest.raises(ConfigError, match="ONNX export does not support architecture 'bert'; supported: gemma3, "):
        export_onnx(model, adapter, processor, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- runner plumbing -----------------------------------------------------------------------------------


def test_providers_and_folder_errors(tmp_path: Path, llava: Exported):
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"
    assert resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])[-1] == "CPUExecutionProvider"
    with pytest.raises(ConfigError, match="none of the execution providers"):
        resolve_providers(["NoSuchExecutionProvider"])
    with pytest.raises(ConfigError, match=r"export\.json is missing"):
        OrtRunner.from_dir(tmp_path)
    broken = copy_export(llava.out, tmp_path / "broken")
    (broken / "decoder.onnx").unlink()
    with pytest.raises(ConfigError, match="graph 'decoder'"):
        OrtRunner.from_dir(broken)
    meta = json.loads((broken / "export.json").read_text())
    meta["format"] = "other"
    (broken / "export.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="not a compress-onnx manifest"):
        read_meta(broken)


@pytest.mark.parametrize("level", [1, 4])
def test_weight_only_int8_accuracy_level_reaches_onnxruntime(tmp_path: Path, level: int, llava: Exported):
    """ORT fuses DQ(int8) -> MatMul to MatMulNBits: the export records the accuracy level W8A16 computes at and
    the runner applies it. Level 1 keeps the quantize stage's float numbers; level 4 (int8 activations per
    block, ~20x faster decode on CPU) measurably does not on outlier activations."""
    from compress.zoo.outliers import add_outliers

    def w8a16(model: nn.Module, adapter: Any, processor: Any) -> nn.Module:
        add_outliers(model)  # activations with outliers: where int8 activations would show
        quantize_linears(model, select_modules(model, adapter, Targets(components=["language"])), WeightQuant())
        return model

    exp = _export("llava", tmp_path / "w8a16", fusion=True, prepare=w8a16, w8a16_accuracy_level=level)
    meta = read_meta(exp.out)
    assert meta["session"]["config"] == {"session.qdq_matmulnbits_accuracy_level": str(level)}
    # the stage's report names the slow kernel level 1 picks, and the setting that trades it
    assert (speed_note(meta) is not None) == (level == 1)
    assert speed_note({**meta, "target": "tensorrt"}) is None and speed_note(read_meta(llava.out)) is None
    assert runtime_ops(exp.out / "decoder.onnx").get("MatMulNBits", 0) > 0
    batch = exp.inputs()
    want = exp.torch_runner().logits(batch.inputs)
    got = OrtRunner.from_dir(exp.out).logits(batch.inputs)
    keep = batch.inputs["attention_mask"].bool()
    err = (got - want)[keep].abs().max()
    if level == 1:
        assert err < 1e-3 * want.abs().max()
    else:  # ~0.12 here, 280x the float bound: the setting took effect
        assert 1e-2 * want.abs().max() < err < want.abs().max()


NO_TORCH_RUN = """
import json, sys
sys.modules["torch"] = None  # as on a deployment host without torch: importing it fails
from PIL import Image
from transformers import AutoProcessor
from compress.runtime.ort_runner import OrtRunner
folder, prompts, images = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
processor = AutoProcessor.from_pretrained(folder)
processor.tokenizer.padding_side = "left"
enc = processor(images=[Image.open(p) for p in images], text=prompts, return_tensors="np", padding=True)
tokens = OrtRunner.from_dir(folder).generate(dict(enc), 8)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx") and sys.modules[m] is not None)
print(json.dumps({"tokens": tokens, "loaded": loaded, "exporter": sorted(
    m for m in sys.modules if m.startswith("compress.export.") and m != "compress.export.files")}))
"""


def test_an_export_folder_answers_on_a_host_without_torch(llava: Exported, tmp_path: Path):
    """Deploying an export folder needs numpy + onnxruntime + the processor: the folder answers in a process
    where torch cannot be imported, with the same tokens as in the toolkit's own process."""
    import subprocess
    import sys

    folder = copy_export(llava.out, tmp_path / "onnx")
    llava.processor.save_pretrained(folder)
    images = dummy_images(3, seed=7)
    paths = [str(tmp_path / f"{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    prompts = [llava.adapter.format_prompt(llava.processor, q) for q in QUESTIONS]
    want = OrtRunner.from_dir(folder).generate(llava.inputs().inputs, 8)
    out = subprocess.run([sys.executable, "-c", NO_TORCH_RUN, str(folder), json.dumps(prompts), json.dumps(paths)],
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [] and got["exporter"] == []
    assert got["tokens"] == want
