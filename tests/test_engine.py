"""`type: engine`: real TensorRT(-RTX) engines built on this CPU-only machine from a `target: tensorrt` export."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from compress.cli import main
from compress.errors import RecipeError
from compress.recipe import load_recipe

trt_backend = pytest.importorskip("tensorrt_rtx")  # the dev extra installs it; the full tensorrt is opt-in

ROOT = Path(__file__).parent.parent
QUANT = {"type": "quantize", "name": "int8", "scheme": "int8",
         "targets": {"components": ["vision", "projector", "language"]},
         "activations": {"calibration": "percentile", "percentile": 99.99}, "gate": {"min_retention": 0.99}}
EXPORT = {"type": "export", "name": "onnx-trt", "format": "onnx", "target": "tensorrt",
          # decoder: one int8 step apart at a rounding boundary moves a random-input logit by up to ~0.09
          # (measured on an AMX Xeon; see recipes/tensorrt-int8.yaml)
          "parity": {"atol": {"vision": 0.05, "embed": 1.0e-6, "decoder": 0.1, "end_to_end": 0.05}, "rtol": 1.0e-2},
          "gate": {"min_retention": 0.99}}
ENGINE = {"type": "engine", "name": "trt", "precision": "fp16", "compute_capabilities": ["sm86", "sm89", "sm120"],
          "profiles": {"max_batch": 4, "max_prompt_tokens": 128, "max_new_tokens": 32}, "gate": {"min_retention": 0.99}}


def _recipe(tmp: Path, stages: list[dict], samples: int = 50) -> Path:
    doc = {"name": "engine-test", "seed": 0, "model": {"source": "zoo:shapes-vqa"},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 64, "batch_size": 64},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": samples,
                          "batch_size": samples, "max_new_tokens": 24},
           "stages": stages}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("engine")
    out = tmp / "run"
    assert main(["run", str(_recipe(tmp, [QUANT, EXPORT, ENGINE])), "--out", str(out)]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_int8_fp16_engines_are_built_fused_and_honestly_scored(run):
    out, manifest = run
    rec = manifest["stages"][-1]
    assert rec["type"] == "engine" and rec["status"] == "completed"
    d = rec["details"]
    assert d["backend"] == "tensorrt_rtx" and d["precision"] == "fp16" and d["executed"] is False
    assert d["engines_executed"].startswith("no: engines built for sm86, sm89, sm120, not executed on this host")
    assert rec["backend"] == "onnxruntime"  # what the gate really scored
    assert rec["checks"][0]["retention"] >= 0.99
    for graph, engine in d["engines"].items():
        path = out / rec["artifacts"] / ("llm.engine" if graph == "decoder" else "visual/visual.engine")
        assert path.stat().st_size == engine["bytes"] >= 0.9 * engine["onnx_weight_bytes"] > 0
        assert engine["targets"] == ["sm86", "sm89", "sm120"] and engine["build_s"] > 0
        fusion = engine["fusion"]
        # opset 23: every attention is one standard Attention node (boolean mask), run by an MHA kernel;
        # RMSNormalization / RotaryEmbedding nodes all end up inside TensorRT kernels
        assert fusion["attention_kernels"] > 0 and fusion["attention_tactics"], graph
        attention = fusion["source_ops"]["Attention"]
        assert attention["nodes"] == attention["absorbed"] == fusion["attention_ops_in_mha"] > 0, graph
        assert "Softmax" not in fusion["source_ops"], graph
        for op in ("RMSNormalization", "RotaryEmbedding") if graph == "decoder" else ():
            assert fusion["source_ops"][op]["nodes"] == fusion["source_ops"][op]["absorbed"] > 0, op
        assert engine["fusion"]["int8_gemm"] > 0, graph  # the quantize stage's Q/DQ became Int8 GEMMs
        assert engine["memory"]["weights_bytes"] > 0
    assert list(d["engines"]["decoder"]["profiles"]) == ["prefill", "decode"]
    assert "sm86" in (out / "report.md").read_text() and "not executed on this host" in (out / "report.md").read_text()


def test_engine_folder_layout(run):
    out, manifest = run
    folder = out / manifest["stages"][-1]["artifacts"]
    for name in ("llm.engine", "config.json", "embedding.safetensors", "visual/visual.engine", "visual/config.json",
                 "onnx/decoder.onnx", "onnx/vision.onnx", "build/decoder.log", "build/vision.log", "layers.json",
                 "tokenizer.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["max_kv_cache_capacity"] == 160 and config["builder"]["compute_capabilities"] == ["sm86", "sm89",
                                                                                                     "sm120"]
    assert json.loads((folder / "visual/config.json").read_text())["max_batch_size"] == 4
    fp16 = onnx.load(str(folder / "onnx/decoder.onnx"), load_external_data=False)
    assert any(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
    layers = json.loads((folder / "layers.json").read_text())
    assert any("mha" in lay["tactic"] for lay in layers["decoder"])
    # the engines' source graphs: opset 23, attention as standard Attention nodes with a boolean mask
    typed = onnx.shape_inference.infer_shapes(fp16)
    assert {o.version for o in typed.opset_import if o.domain in ("", "ai.onnx")} == {23}
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input]}
    attention = [n for n in typed.graph.node if n.op_type == "Attention"]
    assert attention and all(dtypes[n.input[3]] == TensorProto.BOOL for n in attention)
    assert not [n for n in typed.graph.node if n.op_type == "Softmax"]


def test_fp32_build_and_profile_math(run, tmp_path):
    from compress.export import tensorrt as T
    from compress.export.files import read_meta
    from compress.stages.engine import ProfilesConfig

    out, manifest = run
    export = out / manifest["stages"][1]["artifacts"]
    io = read_meta(export)["io"]
    limits = ProfilesConfig(max_batch=8, max_prompt_tokens=100, max_new_tokens=28, max_images=2)
    prefill, decode = T.profiles_for("decoder", io["decoder"]["inputs"], limits)
    assert prefill.shapes["inputs_embeds"] == ([1, 1, 128], [4, 50, 128], [8, 100, 128])
    assert prefill.shapes["past_key_values.0.key"][2][2] == 0
    assert decode.shapes["attention_mask"] == ([1, 2], [4, 101], [8, 129])
    assert decode.shapes["past_key_values.0.key"][2] == [8, 2, 128, 32]
    (vision,) = T.profiles_for("vision", io["vision"]["inputs"], limits)
    assert vision.shapes["pixel_values"][2][0] == 16
    trt, _ = T.load_backend("tensorrt_rtx")
    info = T.build_engine(trt, export / "vision.onnx", [vision], ["sm80"], tmp_path / "v.engine")
    assert (tmp_path / "v.engine").stat().st_size == info["bytes"] and info["fusion"]["int8_gemm"] > 0


def test_preflight_lists_every_node_tensorrt_cannot_parse(tmp_path):
    from compress.export import tensorrt as T

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    node = helper.make_node("FastGelu", ["x"], ["y"], name="gelu_0", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [x], [y])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = tmp_path / "contrib.onnx"
    onnx.save(model, str(path))
    trt, _ = T.load_backend("auto")
    rows = T.preflight(trt, {"decoder": path})
    assert rows and rows[0]["graph"] == "decoder" and rows[0]["node"] == "gelu_0" and rows[0]["op"] == "FastGelu"
    err = T.PreflightError(rows)
    assert "gelu_0" in str(err) and "FastGelu" in str(err) and "nothing was built" in str(err)


@pytest.mark.parametrize(("stages", "needle"), [
    ([ENGINE], "cannot run (model is float)"),
    ([{**EXPORT, "target": "onnxruntime"}, ENGINE], "builds from an export stage with target: tensorrt"),
    ([EXPORT, {**ENGINE, "compute_capabilities": ["sm86", "sm86"]}], "lists a target twice"),
    ([EXPORT, {**ENGINE, "compute_capabilities": ["sm90"]}], "stages[1].compute_capabilities[0]"),
    ([EXPORT, {**ENGINE, "profiles": {"max_batch": 0}}], "stages[1].profiles.max_batch"),
    ([{**QUANT, "scheme": "nf4", "activations": None}, EXPORT, ENGINE], "NF4"),
    ([{**QUANT, "scheme": "int4", "activations": None, "int4": {"group_size": 32, "symmetric": False}}, EXPORT,
      ENGINE], "TensorRT takes INT4 weights as DequantizeLinear without zero points"),
])
def test_impossible_engine_requests_are_recipe_errors(tmp_path, stages, needle):
    stages = [{k: v for k, v in s.items() if v is not None} for s in stages]
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, stages))
    assert needle in str(e.value)


def test_rebuild_retargets_an_engine_folder_in_place(run, tmp_path):
    import shutil
    import subprocess
    import sys

    out, manifest = run
    folder = tmp_path / "engines"
    shutil.copytree(out / manifest["stages"][-1]["artifacts"], folder)
    before = (folder / "llm.engine").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "compress.export.tensorrt", str(folder), "--targets", "sm80"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decoder: llm.engine" in proc.stdout and "for sm80" in proc.stdout
    assert (folder / "llm.engine").read_bytes() != before  # one architecture instead of three
    for config in ("config.json", "visual/config.json"):
        assert json.loads((folder / config).read_text())["builder"]["compute_capabilities"] == ["sm80"]
    bad = subprocess.run([sys.executable, "-m", "compress.export.tensorrt", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "not an engine stage folder" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_full_tensorrt_rebuilds_the_folder_for_the_local_gpu(run, tmp_path):
    """The full `tensorrt` package (NVIDIA's index; not installable where only PyPI is reachable) builds for the
    GPU it runs on: the same folder, rebuilt with `--backend tensorrt`, records "local GPU" as its target."""
    import shutil

    import torch

    pytest.importorskip("tensorrt", reason="the full TensorRT package is not installed")
    if not torch.cuda.is_available():
        pytest.skip("the full TensorRT builds for a local GPU; none here")
    from compress.export import tensorrt as T

    out, manifest = run
    folder = tmp_path / "engines"
    shutil.copytree(out / manifest["stages"][-1]["artifacts"], folder)
    engines = T.rebuild(folder, backend="tensorrt")
    for graph, engine in engines.items():
        assert engine["targets"] == ["local GPU"] and engine["bytes"] > 0, graph
        assert engine["fusion"]["attention_ops_in_mha"] > 0 and engine["fusion"]["int8_gemm"] > 0, graph
    builder = json.loads((folder / "config.json").read_text())["builder"]
    assert builder["backend"] == "tensorrt" and builder["compute_capabilities"] == ["local GPU"]


def test_int4_language_model_becomes_int4_weight_only_gemms(tmp_path):
    """Symmetric INT4 -> tensorrt export (MatMulNBits rewritten as blocked int4 DequantizeLinear, opset 21,
    still scored through ONNX Runtime) -> engines whose language-model GEMMs take Int4 weights."""
    int4 = {"type": "quantize", "name": "int4", "scheme": "int4", "targets": {"components": ["language"]},
            "int4": {"group_size": 32}, "gate": {"min_retention": 0.98}}
    # opset 18 asked for: the decomposed attention path (MatMul -> Softmax -> MatMul), which TensorRT also fuses
    export = {**EXPORT, "opset": 18, "parity": {"atol": 1e-3, "rtol": 1e-3}, "gate": {"min_retention": 0.98}}
    engine = {**ENGINE, "compute_capabilities": ["sm86"], "gate": {"min_retention": 0.98}}
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, [int4, export, engine], samples=24)), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    quant, exp, eng = manifest["stages"]
    assert [s["status"] for s in manifest["stages"]] == ["completed"] * 3
    modules = len(quant["details"]["modules"])
    folder = out / exp["artifacts"]
    meta = json.loads((folder / "export.json").read_text())
    assert meta["opset"] == 21 and meta["int4_dequantize_linear"] == {"decoder": modules}
    decoder = onnx.load(str(folder / "decoder.onnx"))
    dq = [n for n in decoder.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == modules and not [n for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: t for t in decoder.graph.initializer}
    assert all(inits[n.input[0]].data_type == TensorProto.INT4 for n in dq)
    # one fused weight-only kernel reading Int4 per projection, in each of the prefill and decode profiles
    assert eng["details"]["engines"]["decoder"]["fusion"]["int4_gemm"] == 2 * modules
    for engine in eng["details"]["engines"].values():  # no Attention ops below opset 23: Softmax into MHA kernels
        assert engine["fusion"]["softmax_absorbed"] > 0 and "Attention" not in engine["fusion"]["source_ops"]


@pytest.mark.parametrize(("head_size", "fused"), [(8, False), (16, True), (80, True), (128, True)])
def test_attention_head_sizes_tensorrt_fuses(head_size, fused, tmp_path):
    """One opset-23 Attention with a boolean mask, fp16: TensorRT-RTX runs it as `_gemm_mha_v2` from head size 16
    (80: Qwen2.5-VL's vision, 128: most LLMs); at 8 it has no kernel and builds only because the stage marks
    attention decomposable."""
    from compress.export import tensorrt as T

    dims = ["b", 4, "s", head_size]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, dims) for n in "qkv"]
    mask = helper.make_tensor_value_info("m", TensorProto.BOOL, ["b", 1, "s", "s"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, dims)
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="attention_0")
    model = helper.make_model(helper.make_graph([node], "g", [*io, mask], [y]),
                              opset_imports=[helper.make_opsetid("", 23)])
    path = tmp_path / "attention.onnx"
    onnx.save(model, str(path))
    shapes = {n: ([1, 4, 1, head_size], [2, 4, 64, head_size], [4, 4, 128, head_size]) for n in "qkv"}
    shapes["m"] = ([1, 1, 1, 1], [2, 1, 64, 64], [4, 1, 128, 128])
    info = T.build_engine(T.load_backend("tensorrt_rtx")[0], path, [T.Profile("prefill", shapes)], ["sm86"],
                          tmp_path / "a.engine")
    assert info["fusion"]["attention_decomposable"] == 1
    assert info["fusion"]["attention_ops_in_mha"] == int(fused)
    assert ("_gemm_mha_v2" in info["fusion"]["attention_tactics"]) is fused


@pytest.mark.parametrize(("w8a16_level", "refused"), [(1, False), (4, True)])
def test_int4_and_weight_only_int8_share_one_ort_fusion_setting(tmp_path, capsys, w8a16_level, refused):
    """A tensorrt export with INT4 (language) and INT8 weight-only (vision) layers: ONNX Runtime fuses both
    DequantizeLinear forms into MatMulNBits under one session setting. Levels of the same kind (0 and 1: float)
    share it; float INT4 with int8-activation W8A16 is a recipe error, named with its line, nothing written."""
    w8a16 = {"type": "quantize", "name": "w8a16", "scheme": "int8", "targets": {"components": ["vision"]},
             "activations": "none", "gate": {"min_retention": 0.9}}
    int4 = {"type": "quantize", "name": "int4", "scheme": "int4", "targets": {"components": ["language"]},
            "int4": {"group_size": 32}, "gate": {"min_retention": 0.9}}
    export = {**EXPORT, "int4_accuracy_level": 0, "w8a16_accuracy_level": w8a16_level, "gate": {"min_retention": 0.9},
              "parity": {"atol": 0.5, "rtol": 1.0e-2}}
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, [w8a16, int4, export], samples=8)
    code = main(["run", str(recipe), "--out", str(out)])
    if refused:
        err = capsys.readouterr().err
        assert code != 0 and "same kind (0/1: float, 4: int8 activations)" in err
        assert f"{recipe}:" in err and "w8a16_accuracy_level" in err and "Traceback" not in err
        assert not out.exists()
    else:
        assert code == 0, capsys.readouterr().err
        manifest = json.loads((out / "manifest.json").read_text())
        meta = json.loads((out / manifest["stages"][-1]["artifacts"] / "export.json").read_text())
        assert meta["session"]["config"] == {"session.qdq_matmulnbits_accuracy_level": "0"}
