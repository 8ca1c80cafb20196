"""INT4 weight-only: the grid is compressed-tensors' own, MatMulNBits computes the same weight, GPTQ and AWQ
beat round-to-nearest on a model with real-LLM activation outliers, and the bundled model keeps its answers
through ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from compress.export.nbits import matmulnbits_weights
from compress.quant.int4 import Int4Linear, dequantize_int4, int4_params, quantize_int4


def _outlier_weight(out: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.02
    w[:, 7] *= 30.0  # a column with LLM-like outliers
    w[3] += 0.05  # a row shifted off zero (zero points matter)
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_grid_is_compressed_tensors_own(symmetric, group):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _outlier_weight()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)
    grouped = w.reshape(w.shape[0], -1, group)
    ref_scale, ref_zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    scale, zero = int4_params(w, group, symmetric)
    assert torch.equal(scale, ref_scale)
    assert zero is None if symmetric else torch.equal(zero, ref_zero.to(torch.int8))
    ours = dequantize_int4(quantize_int4(w, scale, zero, group), scale, zero, group)
    theirs = fake_quantize(w, ref_scale, ref_zero, args)
    assert torch.equal(ours, theirs)
    rel = float((ours - w).norm() / w.norm())
    assert 0.0 < rel < 0.3  # 4 bits with a 30x outlier column in every group: lossy, never garbage


def _matmulnbits_session(m: Int4Linear, level: int) -> ort.InferenceSession:
    return ort.InferenceSession(matmulnbits_model(m, level).SerializeToString(), providers=["CPUExecutionProvider"])


def matmulnbits_model(m: Int4Linear, level: int) -> onnx.ModelProto:
    """One MatMulNBits node computing `m` (A [m, K] -> Y [m, N])."""
    b, scales, zp = matmulnbits_weights(m)
    inits = [helper.make_tensor("B", TensorProto.UINT8, list(b.shape), b.numpy().tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, list(scales.shape), scales.numpy().ravel().tolist())]
    inputs = ["A", "B", "scales"]
    if zp is not None:
        inits.append(helper.make_tensor("zp", TensorProto.UINT8, list(zp.shape), zp.numpy().tobytes(), raw=True))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=m.in_features,
                            N=m.out_features, bits=4, block_size=m.group_size, accuracy_level=level)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT,
                                                                                ["m", m.in_features])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", m.out_features])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_matmulnbits_computes_the_int4_layer(symmetric, group):
    linear = nn.Linear(256, 48, bias=False)
    linear.weight.data.copy_(_outlier_weight())
    m = Int4Linear.from_linear(linear, group, symmetric)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    x[:, 11] *= 20.0
    ref = m(x).numpy()
    scale = np.abs(ref).max()
    exact = _matmulnbits_session(m, 0).run(None, {"A": x.numpy()})[0]
    assert np.abs(exact - ref).max() <= 1e-5 * scale  # the same weight, float32 accumulation
    fast = _matmulnbits_session(m, 4).run(None, {"A": x.numpy()})[0]
    err = np.abs(fast - ref).max() / scale
    assert 0 < err < 0.05  # int8 activations per block: close, not exact


def test_int4_config_errors_name_the_field(recipe_error):
    def stage(scheme: str, **fields) -> list[dict]:
        return [{"type": "quantize", "scheme": scheme, "targets": {"components": ["language"]},
                 "gate": {"min_retention": 0.9}, **fields}]

    msg = recipe_error(stage("int4", int4={"group_size": 48}))
    assert "stages[0].int4.group_size" in msg and "32, 64 or 128" in msg.replace("'", "")
    msg = recipe_error(stage("int4", activations={"dynamic": "per_token"}))
    assert "weight-only" in msg
    msg = recipe_error(stage("int8", activations="none", int4={"group_size": 32}))
    assert "only apply to schemes int4 and mixed" in msg
    msg = recipe_error(stage("int4", int4={"rounding": "awq"}), calibration=False)
    assert "calibration" in msg


def _outlier_model_batches(n_batches: int, size: int, start: int = 0):
    """The outlier model (real-LLM activation statistics) and image + question batches from the bundled data."""
    import json
    from pathlib import Path

    from PIL import Image

    from compress.arch import get_adapter
    from compress.checkpoint import load_checkpoint
    from compress.zoo import MODELS

    root = Path(__file__).resolve().parents[1] / "calibration" / "shapes-vqa" / "calib"
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    model, processor = load_checkpoint(MODELS["shapes-vqa-outliers"], get_adapter("llava"))
    adapter = get_adapter("llava").bind(model)
    batches = []
    for b in range(n_batches):
        chunk = rows[start + b * size:start + (b + 1) * size]
        images = [Image.open(root / r["file_name"]).convert("RGB") for r in chunk]
        batches.append(adapter.build_inputs(processor, images, [r["prompt"] for r in chunk]).inputs)
    return model.eval(), processor, adapter, batches


def test_gptq_and_awq_beat_round_to_nearest_on_real_outliers(tmp_path):
    """Language model to INT4 (group 32) on the outlier model; logit KL on held-out batches, each rounding
    from the same float weights and calibration batches."""
    import copy

    import torch.nn.functional as F

    from compress.arch import get_adapter
    from compress.stages.base import StageContext
    from compress.stages.catalog import get_stage

    model, processor, _, batches = _outlier_model_batches(6, 16)
    calib, held_out = batches[:4], batches[4:]
    with torch.no_grad():
        ref = [model(**b).logits.float() for b in held_out]

    spec = get_stage("quantize")
    errors = {}
    for rounding in ("rtn", "gptq", "awq"):
        m = copy.deepcopy(model)
        cfg = spec.config.model_validate({"type": "quantize", "scheme": "int4", "targets": {"components": ["language"]},
                                          "int4": {"group_size": 32, "rounding": rounding},
                                          "gate": {"min_retention": 0.5}})
        ctx = StageContext(adapter=get_adapter("llava").bind(m), processor=processor, workdir=tmp_path / rounding,
                           seed=0, calibration_batches=calib)
        q = spec.apply(m, cfg, ctx).model
        with torch.no_grad():
            kl = [F.kl_div(q(**b).logits.float().log_softmax(-1), r.log_softmax(-1), log_target=True,
                           reduction="batchmean") for b, r in zip(held_out, ref, strict=True)]
        errors[rounding] = float(sum(kl) / len(kl))
    print("int4 held-out KL by rounding:", errors)
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_toolkit_reads_its_int4_checkpoints_back_exactly(symmetric, tmp_path):
    """Symmetric INT4 is written pack-quantized, with zero points int-quantized (see ct_checkpoint); both come
    back through transformers' loader as the same Int4Linear codes, scales and zero points."""
    from compress.arch import get_adapter, select_modules
    from compress.checkpoint import load_checkpoint, save_checkpoint
    from compress.config import Targets
    from compress.quant.int4 import Int4Quant
    from compress.quant.linears import quantize_int4_linears
    from compress.zoo.tiny import save_tiny

    adapter = get_adapter("llava")
    model, processor = load_checkpoint(save_tiny("llava", tmp_path / "src"), adapter)
    names = list(select_modules(model, adapter.bind(model), Targets(components=["language"])))
    quantize_int4_linears(model, names, Int4Quant(group_size=32, symmetric=symmetric))
    save_checkpoint(model, processor, tmp_path / "q")
    fmt = "pack-quantized" if symmetric else "int-quantized"
    assert fmt in (tmp_path / "q" / "config.json").read_text()
    again, _ = load_checkpoint(tmp_path / "q", adapter)
    for name in names:
        a, b = model.get_submodule(name), again.get_submodule(name)
        assert isinstance(b, Int4Linear) and b.symmetric == symmetric
        assert torch.equal(a.weight_int4, b.weight_int4) and torch.equal(a.weight_scale, b.weight_scale)
        assert symmetric or torch.equal(a.weight_zero_point, b.weight_zero_point)


def test_int8_prefill_computes_its_documented_arithmetic_per_token():
    """compress.export.prefill on real activations of the outlier model (channels 30-1500x, rows of very
    different size): the rewritten MatMulNBits computes exactly the scheme it documents (7-bit weights per
    output channel from the INT4 values, uint8 codes per token, round half up), and per-token scales are why
    it is usable: half the error of one scale per call."""
    from compress.export.nbits import dequantize
    from compress.export.prefill import int8_prefill

    model, _, _, batches = _outlier_model_batches(1, 8)
    layer = model.model.language_model.layers[0]
    seen: dict[str, np.ndarray] = {}
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, a, name=name: seen.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]).numpy()))
    with torch.no_grad():
        model(**batches[0])
    tiny = np.finfo(np.float32).tiny
    for name, x in seen.items():
        m = Int4Linear.from_linear(layer.get_submodule(name), 32, True)
        proto = matmulnbits_model(m, 4)
        assert int8_prefill(proto) == (1, None)  # no `logits` output here: no lm_head to keep
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": x})[0]
        w = dequantize(*matmulnbits_weights(m), m.out_features, m.in_features, m.group_size).numpy()
        per_token = _int8_emulation(x, w, np.maximum(np.abs(x).max(1, keepdims=True) / np.float32(127.5), tiny))
        assert np.abs(got - per_token).max() <= 1e-5 * np.abs(per_token).max()
        exact = x.astype(np.float64) @ w.T
        per_call = _int8_emulation(x, w, np.float32(np.abs(x).max() / 127.5))
        assert 0 < _rel(got, exact) < 0.6 * _rel(per_call, exact), (name, _rel(got, exact), _rel(per_call, exact))


def _int8_emulation(x: np.ndarray, w: np.ndarray, a_scale: np.ndarray) -> np.ndarray:
    """x @ w.T as the prefill graph documents it: 7-bit weights per row of w, uint8 codes of x / a_scale."""
    w_scale = np.abs(w).max(1) / 64
    w_codes = np.clip(np.rint(w / w_scale[:, None]), -64, 64)
    codes = np.trunc(np.clip(x / a_scale, -128, 127) + np.float32(128.5)) - 128
    return (codes.astype(np.float64) @ w_codes.T) * a_scale * w_scale[None, :]


def _rel(y: np.ndarray, exact: np.ndarray) -> float:
    return float(np.sqrt(((y - exact) ** 2).mean() / (exact**2).mean()))
