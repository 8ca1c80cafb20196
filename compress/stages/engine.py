"""`type: engine`: TensorRT engines from the preceding `target: tensorrt` export, built without a GPU.

The stage folder is laid out as TensorRT Edge-LLM users know it (`llm.engine` + `config.json` +
`embedding.safetensors` + processor files, `visual/visual.engine` + `visual/config.json`), plus the
ONNX graphs the engines came from (`onnx/`), the build logs and `layers.json`. Running an engine needs
a GPU of a targeted compute capability; where there is none, the gate scores the engines' source
graphs in ONNX Runtime and the manifest says, in words, that the engines were not executed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.checkpoint import save_processor
from compress.config import StageConfig, Strict
from compress.errors import ConfigError
from compress.export.tensorrt import ENGINE_FILES
from compress.registry import register_stage
from compress.stages.base import StageContext, StageResult

Target = Literal["sm75", "sm80", "sm86", "sm89", "sm120", "sm121"]


class ProfilesConfig(Strict):
    """The largest requests the engines accept; TensorRT optimizes for half of each."""

    max_batch: int = Field(4, ge=1, le=256, description="questions per call")
    max_prompt_tokens: int = Field(512, ge=2, le=32768, description="prompt length including image tokens")
    max_new_tokens: int = Field(128, ge=1, le=32768, description="generated tokens per answer")
    max_images: int = Field(1, ge=1, le=16, description="images per question")
    max_image_tokens: int = Field(1024, ge=1, le=65536, description="tokens per image where the image size decides "
                                  "them (Qwen2-VL / Qwen2.5-VL); other families have a fixed count")


class EngineConfig(StageConfig):
    type: Literal["engine"]
    backend: Literal["auto", "tensorrt", "tensorrt_rtx"] = Field(
        "auto", description="auto: the full tensorrt package if importable, else tensorrt_rtx (TensorRT for RTX)")
    precision: Literal["fp16", "fp32"] = Field(
        "fp16", description="float precision of the engines; int8 comes from earlier quantize stages as Q/DQ")
    compute_capabilities: list[Target] = Field(
        default_factory=lambda: ["sm80", "sm86", "sm89", "sm120"], min_length=1,
        description="GPUs to build for ahead of time (TensorRT-RTX); the full TensorRT builds for the local GPU")
    profiles: ProfilesConfig = Field(ProfilesConfig(), description="shape limits of the optimization profiles")

    accepts = frozenset({"exported"})
    requirement = "a preceding export stage with target: tensorrt"

    def output_state(self, state: str) -> str:
        return "engine"

    @model_validator(mode="after")
    def _limits(self) -> EngineConfig:
        if len(set(self.compute_capabilities)) != len(self.compute_capabilities):
            raise ValueError("compute_capabilities lists a target twice")
        return self

    def check_after(self, earlier: list[StageConfig]) -> str | None:
        exports = [s for s in earlier if s.type == "export"]
        if not exports or getattr(exports[-1], "target", None) != "tensorrt":
            return "an engine stage builds from an export stage with target: tensorrt (standard ops, signed Q/DQ)"
        return None


def _embedding(model: torch.nn.Module, ctx: StageContext, out: Path) -> dict:
    from safetensors.torch import save_file

    table = ctx.adapter.component(model, "language").get_input_embeddings().weight.detach()
    dtype = torch.float16 if table.dtype == torch.float32 else table.dtype
    save_file({"embedding": table.to(dtype).contiguous()}, str(out / "embedding.safetensors"))
    return {"file": "embedding.safetensors", "shape": list(table.shape), "dtype": str(dtype).removeprefix("torch.")}


def _source_graphs(export_dir: Path, out: Path, precision: str) -> dict[str, Path]:
    """The graphs the engines are built from, in onnx/ with their own export.json (so ONNX Runtime can score
    exactly them): the export's graphs, converted to fp16 when asked."""
    import onnx

    from compress.export.files import read_meta, write_meta

    meta = read_meta(export_dir)
    if meta.get("target") != "tensorrt":
        raise ConfigError(f"{export_dir}: not a target: tensorrt export; build engines from one")
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True)
    graphs: dict[str, Path] = {}
    for name, file in meta["graphs"].items():
        proto = onnx.load(str(export_dir / file))
        if precision == "fp16" and name in ENGINE_FILES:
            proto = to_fp16(proto)
        dest = onnx_dir / f"{name}.onnx"
        onnx.save(proto, str(dest), save_as_external_data=proto.ByteSize() > 1_800_000_000)
        graphs[name] = dest
    write_meta(onnx_dir, {**meta, "graphs": {n: p.name for n, p in graphs.items()}, "precision": precision,
                          "fused": False, "sizes": {}})
    return {name: graphs[name] for name in ENGINE_FILES}


def to_fp16(proto: Any) -> Any:
    """fp16 weights and math, fp32 graph inputs/outputs (casts at the edges, so every runner feeds the same).

    Int8 Q/DQ keep their codes with fp16 scales, which ONNX allows from opset 19; the converter appends
    its input casts at the end of the node list, so the nodes are re-sorted.
    """
    from onnx import version_converter
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from compress.export.portable import toposort

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 19:
        proto = version_converter.convert_version(proto, 19)
    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    toposort(proto.graph)
    return proto


@register_stage(EngineConfig)
def apply(model: torch.nn.Module, cfg: EngineConfig, ctx: StageContext) -> StageResult:
    from compress.export import tensorrt as T
    from compress.export.files import read_meta
    from compress.runtime.ort_runner import OrtRunner, session_options

    if ctx.export_dir is None:
        raise ConfigError("an engine stage needs a kept export stage (target: tensorrt) before it")
    trt, backend = T.load_backend(cfg.backend)
    out = ctx.workdir / "engine"
    if out.exists():
        shutil.rmtree(out)
    (out / "visual").mkdir(parents=True)
    graphs = _source_graphs(ctx.export_dir, out, cfg.precision)
    rows = T.preflight(trt, graphs)
    if rows:
        raise T.PreflightError(rows)
    meta = read_meta(ctx.export_dir)
    unit = (meta.get("vision_inputs") or {}).get("spatial_merge_size", 1) ** 2  # patches per Qwen image token
    engines = T.build_all(trt, graphs, meta["io"], cfg.profiles, cfg.compute_capabilities, out, ENGINE_FILES,
                          patches_per_token=unit)
    limits = cfg.profiles.model_dump()
    common = {"builder": {"backend": backend, "version": trt.__version__, "precision": cfg.precision,
                          "compute_capabilities": cfg.compute_capabilities, **limits}}
    llm_config = {**common, "model_type": meta["model_type"], "engine": "llm.engine",
                  "embedding": _embedding(model, ctx, out), "max_input_len": cfg.profiles.max_prompt_tokens,
                  "max_kv_cache_capacity": cfg.profiles.max_prompt_tokens + cfg.profiles.max_new_tokens,
                  **{k: meta[k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "image_token_id",
                                           "eos_token_ids", "pad_token_id") if k in meta},
                  "io": meta["io"]["decoder"]}
    (out / "config.json").write_text(json.dumps(llm_config, indent=2, sort_keys=True) + "\n")
    visual = {**common, "engine": "visual.engine", "max_batch_size": cfg.profiles.max_batch * cfg.profiles.max_images,
              "image_tokens_per_image": meta.get("image_tokens_per_image"), "pixel_shape": meta.get("pixel_shape"),
              "vision_inputs": meta.get("vision_inputs"),
              "io": meta["io"]["vision"]}
    (out / "visual" / "config.json").write_text(json.dumps(visual, indent=2, sort_keys=True) + "\n")
    save_processor(ctx.processor, out)
    ctx.fault_point()  # engines written, not yet scored or kept

    # No GPU here can run these engines: score the very graphs they were built from, and say so.
    runner = OrtRunner.from_dir(out / "onnx", session_options=session_options(ctx.threads))
    where = ", ".join(cfg.compute_capabilities)
    scored = f"the {cfg.precision} ONNX graphs the engines were built from (onnx/), in ONNX Runtime on the CPU"
    return StageResult(model, {
        "backend": backend,
        "tensorrt_version": trt.__version__,
        "precision": cfg.precision,
        "compute_capabilities": cfg.compute_capabilities,
        "profiles": limits,
        "engines": engines,
        "engine_bytes": sum(e["bytes"] for e in engines.values()),
        "executed": False,
        "engines_executed": f"no: engines built for {where}, not executed on this host (no GPU); "
                            f"the gate scored {scored}",
        "scored_artifact": scored,
    }, runner=runner, artifacts=out)
