"""Export a VLM to ONNX as three small graphs that a KV-cache runner chains together.

    vision.onnx   pixel_values [batch, C, H, W] -> image_features [image_tokens, hidden] (rows, image order)
    embed.onnx    input_ids [batch, seq] (int64), image_features [image_tokens, hidden]
                  -> inputs_embeds [batch, seq, hidden] (each image token's row replaced by the next feature row)
    decoder.onnx  inputs_embeds, attention_mask [batch, total], position_ids [batch, seq],
                  past_key_values.N.key/value [batch, kv_heads, past, head_dim]
                  -> logits [batch, seq, vocab], present.N.key/value [batch, kv_heads, total, head_dim]

Why three graphs: one decoder graph serves both prefill (past length 0) and decode, so there is a
single copy of the language-model weights, and the vision graph runs once per image, not per step.
The embed graph writes the image features over the image-token positions itself (a cumulative count
of image tokens indexes the feature rows; decode steps pass 0 rows), so a runner only chains graphs:
this layout is what onnxruntime-genai's multimodal pipeline drives too (`compress.export.genai`).
Mllama's vision graph gives per-tile cross-attention states instead, and its embed graph takes ids only.

The decoder is exported with the torch.onnx dynamo exporter from a wrapper with explicit tensor
inputs that rebuilds a `DynamicCache` from the flat past, so transformers' own masking and RoPE code
is what gets traced (no hand-written 4-D mask). `export.json` next to the graphs makes the folder
self-describing for `OrtRunner.from_dir`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from compress.arch.base import text_config
from compress.arch.export_spec import ExportSpec
from compress.errors import ConfigError
from compress.export import gqa
from compress.export.files import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    describe_files,
    save_model,
    write_meta,
)
from compress.export.fuse import fuse_export
from compress.export.genai import genai_support, optional_logits_index, write_genai_config
from compress.export.portable import Int8Kernels, portable_export
from compress.export.trace import DUMMY_BATCH, export_decoder, export_embed, export_vision
from compress.export.wrappers import (
    DecoderWithPast,
    QwenVision,
    decoder_facts,
    decoder_module,
    exportable_adapter,
    model_type_of,
    vision_module,
)
from compress.runtime.mrope import VisionSpec
from compress.runtime.vision_inputs import numpy as _numpy
from compress.runtime.vision_inputs import vision_feeds_for, vision_pixels
from compress.tokens.install import record_of

COMPONENTS = ("vision", "decoder")
ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


@dataclass
class ExportResult:
    """What `export_onnx` wrote: graph paths, fused-op counts, quantized-module summary, the manifest."""

    out_dir: Path
    files: dict[str, Path]
    fused_ops: dict[str, Any] = field(default_factory=dict)
    quantized: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# ---- model facts -----------------------------------------------------------------------------------


def model_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the graphs use (the first floating parameter's); bfloat16 is refused."""
    for p in model.parameters():
        if p.is_floating_point():
            if p.dtype not in ONNX_DTYPES:
                raise ConfigError(
                    f"ONNX export supports float32 and float16 models, not {p.dtype}: ONNX Runtime's CPU provider "
                    "has no bfloat16 kernels for most ops; load the model with dtype float32"
                )
            return p.dtype
    return torch.float32


def image_token_id(model: nn.Module) -> int:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(f"{model_type_of(model)} config has no image_token_id / image_token_index")


# ---- inputs the runner sees ---------------------------------------------------------------------------


def dummy_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ---- the export --------------------------------------------------------------------------------------


@dataclass
class _Traced:
    """What tracing wrote, for export.json: the graph files, the quantization carried into them, and the facts
    only the traced wrappers know."""

    files: dict[str, Path] = field(default_factory=dict)
    quantized: dict[str, Any] = field(default_factory=dict)
    tokens_per_image: int | None = None  # None: no vision graph, or the image size decides (or no image tokens)
    vision_inputs: dict[str, int | None] | None = None
    decoder: DecoderWithPast | None = None


def export_onnx(
    model: nn.Module,
    adapter: Any,
    processor: Any,
    out_dir: str | Path,
    opset: int = 18,
    components: Sequence[str] = COMPONENTS,
    fusion: bool = True,
    quantize: bool = True,
    int8_kernels: Int8Kernels = "portable",
    int4_accuracy_level: int = 0,
    group_query_attention: bool = False,
    select_logits: bool = False,
    int4_prefill: str = "int4",
    w8a16_accuracy_level: int = 1,
) -> ExportResult:
    """Write the vision / embed / decoder graphs and `export.json` to `out_dir` (replacing earlier graphs).

    `quantize=True` carries the model's quantization into the graphs: `Int8Linear` becomes int8 weights with
    DequantizeLinear (+ QuantizeLinear/DequantizeLinear on the input for W8A8, with the module's own scales),
    bitsandbytes NF4 `Linear4bit` becomes com.microsoft MatMulBnb4 with bnb's own codes. `quantize=False`
    exports the same numbers as float ops. `fusion=True` runs `fuse.fuse_export` on the written folder.
    `int8_kernels` says how W8A8 projections are encoded for ORT's integer kernels (`compress.export.portable`).
    `int4_prefill="int8"` adds `prefill.onnx`, the decoder with int8 GEMMs for prompts (`compress.export.prefill`).
    `w8a16_accuracy_level` is the level ORT computes weight-only INT8 layers at once it fuses them into MatMulNBits
    (1: float, the stage's numbers; 4: int8 activations, ~20x faster on CPU; `compress.export.qdq`).
    The decoder graph always comes with the embed graph.
    """
    family_adapter = exportable_adapter(model)  # the family's export facts: nothing here names a family
    unknown = set(components) - set(COMPONENTS)
    if unknown or not components:
        raise ConfigError(f"export components must be a non-empty subset of {COMPONENTS}, got {list(components)}")
    if opset < 18:
        raise ConfigError(f"ONNX export needs opset >= 18 (dynamo exporter, per-axis QDQ), got {opset}")
    dtype = model_dtype(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()

    probe = adapter.build_inputs(processor, dummy_images(DUMMY_BATCH), ["what is this?"] * DUMMY_BATCH).inputs
    flat_patches = _spec(family_adapter).vision == "flat_patches"  # fed as they come, any image size
    pixels = _numpy(probe["pixel_values"]) if flat_patches else vision_pixels(family_adapter.name, probe)
    traced = _trace_graphs(model, adapter, family_adapter, probe, pixels, out, dtype, opset, components, quantize,
                           int4_accuracy_level, group_query_attention, select_logits)
    meta = _meta(model, adapter, processor, family_adapter, traced, pixels, dtype, opset, quantize,
                 w8a16_accuracy_level)
    write_meta(out, meta)
    files = traced.files
    result = ExportResult(out_dir=out, files=files, quantized=traced.quantized, meta=meta)
    if fusion:
        result.fused_ops = fuse_export(out)
    if _has_int8_gemm(traced.quantized):
        portable_export(out, int8_kernels)
    if int4_prefill == "int8" and "decoder" in files:
        from compress.export.prefill import write_int8_prefill

        write_int8_prefill(out)
        files["prefill"] = out / GRAPH_FILES["prefill"]
    result.meta = _genai(out, model, processor)
    return result


def _genai(out: Path, model: nn.Module, processor: Any) -> dict[str, Any]:
    """genai_config.json where onnxruntime-genai can run the folder, and export.json saying which (or why not).
    The decoder graphs' logits_index becomes optional here, after the fusion passes (which drop an input that
    has a default)."""
    import onnx

    for name in ("decoder", "prefill"):
        path = out / GRAPH_FILES[name]
        if path.is_file():
            proto = onnx.load(str(path), load_external_data=False)  # weights stay in their .data file
            if optional_logits_index(proto):
                onnx.save(proto, str(path))
    meta = describe_files(out)
    context = int(getattr(text_config(model), "max_position_embeddings", 0) or 4096)
    written = write_genai_config(out, meta, context, getattr(processor.tokenizer, "bos_token_id", None))
    meta["genai"] = ({"config": written.name, "model_type": meta["genai_model_type"]} if written is not None
                     else {"unsupported": genai_support(meta)})
    write_meta(out, meta)
    return meta


def _spec(family_adapter: Any) -> ExportSpec:
    spec = family_adapter.export_spec
    assert spec is not None  # exportable_adapter refuses a family without one
    return spec


def _trace_graphs(model: nn.Module, adapter: Any, family_adapter: Any, probe: dict[str, Any], pixels: np.ndarray,
                  out: Path, dtype: torch.dtype, opset: int, components: Sequence[str], quantize: bool,
                  int4_accuracy_level: int, group_query_attention: bool, select_logits: bool) -> _Traced:
    """Trace and write the graphs `components` asks for; remove graphs of components not exported this time."""
    from compress.export import qdq

    spec = _spec(family_adapter)
    traced = _Traced()

    def write(name: str, proto: Any) -> None:
        qdq.unshare_qdq(proto)
        written = save_model(proto, out / GRAPH_FILES[name])
        traced.files[name] = written[0]
        if len(written) > 1:
            traced.files[f"{name}.data"] = written[1]

    with qdq.export_modules(model, quantize, int4_accuracy_level) as (quantized, table):
        traced.quantized = quantized
        if "vision" in components:
            vision = vision_module(model, adapter, pixels.shape)
            traced.vision_inputs = vision.spec() if isinstance(vision, QwenVision) else None
            spec_in = VisionSpec(**traced.vision_inputs) if traced.vision_inputs else None
            fed = vision_feeds_for(family_adapter.name, probe, pixels.dtype, spec_in)
            write("vision", export_vision(vision, fed.feeds, dtype, opset, table))
            if spec.fixed_image_tokens:  # not where the image size decides, nor without image tokens
                with torch.no_grad():
                    traced.tokens_per_image = int(vision(torch.from_numpy(pixels[:1]).to(dtype)).shape[0])
        if "decoder" in components:
            write("embed", export_embed(model, adapter, dtype, opset,
                                        None if spec.cross_attention else image_token_id(model)))
            decoder = traced.decoder = decoder_module(model, adapter)
            decoder.gqa = group_query_attention and spec.group_query_attention
            decoder.select_logits = select_logits
            with gqa.traced_with_gqa(decoder.language) if decoder.gqa else contextlib.nullcontext():
                proto = export_decoder(decoder, decoder_facts(model), dtype, opset,
                                       {**table, **gqa.TRANSLATIONS} if decoder.gqa else table,
                                       spec.positions == "mrope")
            write("decoder", proto)
    for name, file in GRAPH_FILES.items():  # a component not exported this time must not linger
        if name not in traced.files:
            for stale in (out / file, out / (file + ".data")):
                stale.unlink(missing_ok=True)
    return traced


def _modules_quantized(quantized: dict[str, Any]) -> list[dict[str, Any]]:
    return list(quantized.get("modules", {}).values())


def _has_int8_gemm(quantized: dict[str, Any]) -> bool:
    """Whether some projection runs as an integer GEMM (W8A8: QDQ or MatMulInteger)."""
    return any(info["onnx"].startswith(("QuantizeLinear", "MatMulInteger")) for info in _modules_quantized(quantized))


def _meta(model: nn.Module, adapter: Any, processor: Any, family_adapter: Any, traced: _Traced, pixels: np.ndarray,
          dtype: torch.dtype, opset: int, quantize: bool, w8a16_accuracy_level: int) -> dict[str, Any]:
    """export.json: what the runner needs to feed the graphs, and how they were made."""
    from compress.export import qdq

    spec = _spec(family_adapter)
    files, decoder = traced.files, traced.decoder
    vision_cfg = getattr(model.config, "vision_config", None)
    has_qdq = any(info["onnx"].startswith("QuantizeLinear") for info in _modules_quantized(traced.quantized))
    has_weight_only = any(info.get("scheme") == "w8a16" for info in _modules_quantized(traced.quantized))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family_adapter.name,
        "model_type": model_type_of(model),
        "opset": opset,
        "dtype": ONNX_DTYPES[dtype],
        "graphs": {name: files[name].name for name in GRAPH_FILES if name in files},
        "image_token_id": image_token_id(model),
        "image_tokens_per_image": traced.tokens_per_image,
        # a `tokens` stage's reduction: prompts carry `tokens` placeholders per image, not the processor's
        "token_reduction": record_of(model),
        "pixel_shape": list(pixels.shape[1:]),
        "eos_token_ids": adapter.eos_token_ids(model, processor),
        "pad_token_id": adapter.pad_token_id(processor),
        # "explicit": [batch, seq] positions = cumsum(mask) - 1; "mrope": [3, batch, seq] from the image grid.
        "positions": spec.positions,
        "vision_inputs": traced.vision_inputs if "vision" in files else None,
        # Image features that reach the decoder as cross-attention states, not as image-token embeddings.
        "cross_attention": spec.cross_attention,
        "cross_attention_tokens": family_adapter.cross_attention_tokens(model) if spec.cross_attention else None,
        # Bidirectional attention blocks of a prompt, from the processor's token_type_ids (runtime.blocks).
        "attention_blocks": spec.attention_blocks,
        "genai_model_type": spec.genai_model_type,
        # Other prompt tokens a runtime that computes M-RoPE positions itself looks for.
        "token_ids": {k: int(getattr(model.config, k)) for k in ("vision_start_token_id", "video_token_id")
                      if getattr(model.config, k, None) is not None},
        **decoder_facts(model),
        # The tower's own width and heads (Qwen2-VL names them embed_dim / num_heads; its hidden_size is the
        # merger's output), which the attention fusion needs.
        "vision_num_heads": int(getattr(vision_cfg, "num_attention_heads", None) or getattr(vision_cfg, "num_heads", 0)
                                or 0),
        "vision_hidden_size": int(getattr(vision_cfg, "embed_dim", None) or getattr(vision_cfg, "hidden_size", 0) or 0),
        # Session settings the runner applies: keep per-projection Q/DQ pairs so ORT picks int8 kernels, and
        # the accuracy level weight-only int8 (fused to MatMulNBits) computes at.
        "session": {"disabled_optimizers": list(qdq.QDQ_SESSION_DISABLED_OPTIMIZERS) if has_qdq else [],
                    "config": qdq.weight_only_session_config(w8a16_accuracy_level) if has_weight_only else {}},
        "quantized": traced.quantized,
        "quantize": quantize,
        # Self-attention as com.microsoft GroupQueryAttention (KV appended in the kernel), or as traced.
        "decoder_attention": "GroupQueryAttention" if decoder is not None and decoder.gqa else "traced",
        # GroupQueryAttention reads lengths from the mask: past/present may share one preallocated buffer.
        "past_buffer": "shared" if decoder is not None and decoder.gqa else "copied",
        # A `logits_index` decoder input: logits for the positions asked for only (the runner asks for the last).
        "logits_index": bool(decoder is not None and decoder.select_logits),
        "fused": False,
        "fused_ops": {},
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import onnx
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__}
    try:
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return versions
