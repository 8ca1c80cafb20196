"""Export a VLM to ONNX as three small graphs that a KV-cache runner chains together.

    vision.onnx   pixel_values [batch, C, H, W] -> image_features [batch, image_tokens, hidden]
    embed.onnx    input_ids [batch, seq] (int64) -> inputs_embeds [batch, seq, hidden]
    decoder.onnx  inputs_embeds, attention_mask [batch, total], position_ids [batch, seq],
                  past_key_values.N.key/value [batch, kv_heads, past, head_dim]
                  -> logits [batch, seq, vocab], present.N.key/value [batch, kv_heads, total, head_dim]

Why three graphs: the image features are merged into the token embeddings at the image-token
positions, a data-dependent scatter that is trivial in the runner and awkward in a graph; and one
decoder graph serves both prefill (past length 0) and decode, so there is a single copy of the
language-model weights. The embedding table gets its own Gather graph (not an .npy) so the runner
needs nothing but ONNX Runtime and the embedding can run on the same execution provider.

The decoder is exported with the torch.onnx dynamo exporter from a wrapper with explicit tensor
inputs that rebuilds a `DynamicCache` from the flat past, so transformers' own masking and RoPE code
is what gets traced (no hand-written 4-D mask). `export.json` next to the graphs makes the folder
self-describing for `OrtRunner.from_dir`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from compress.errors import ConfigError
from compress.export.files import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    describe_files,
    save_model,
    write_meta,
)
from compress.export.fuse import fuse_export
from compress.export.portable import Int8Kernels, portable_export
from compress.export.wrappers import (
    BLOCK_FAMILIES,
    DecoderWithBlocks,
    DecoderWithCrossAttention,
    DecoderWithPast,
    QwenVision,
    check_exportable,
    decoder_facts,
    decoder_module,
    model_type_of,
    past_names,
    present_names,
    vision_module,
)
from compress.runtime.mrope import VisionSpec
from compress.runtime.vision_inputs import numpy as _numpy
from compress.runtime.vision_inputs import vision_feeds_for, vision_pixels

COMPONENTS = ("vision", "decoder")
ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
# Dummy shapes for tracing: deliberately unlike the shapes parity checks use, and never 0 or 1 (torch.export
# specializes dimensions of size 0/1 to constants).
DUMMY_BATCH, DUMMY_SEQ, DUMMY_PAST = 2, 5, 3


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


# ---- wrappers with explicit tensor signatures --------------------------------------------------------


# ---- inputs the runner sees ---------------------------------------------------------------------------


def dummy_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ---- the export --------------------------------------------------------------------------------------


def _torch_export(
    module: nn.Module,
    args: tuple[Any, ...],
    dynamic_shapes: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    custom_table: dict[Any, Any] | None,
) -> Any:
    """torch.onnx dynamo export to an in-memory onnx.ModelProto (weights included)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translation library)
    except ImportError as exc:
        raise ConfigError("ONNX export needs onnxscript: pip install onnxscript") from exc
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            f=None,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=custom_table or None,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    # Per-node provenance (FX node text, class hierarchy, stack traces) is most of a small model's bytes.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def tidy_dims(proto: Any, rename: dict[str, str]) -> None:
    """Readable, consistent symbolic dims: `seq + past` and `past + seq` are the same size to a fusion pass."""

    def fix(name: str) -> str:
        terms = sorted(rename.get(t.strip(), t.strip()) for t in name.split("+"))
        joined = " + ".join(terms)
        return rename.get(joined, joined)

    graph = proto.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = fix(dim.dim_param)


def _embed_graph(embedding: nn.Embedding, dtype: torch.dtype, opset: int) -> Any:
    """input_ids -> table[input_ids] as a single Gather (exact, and trivially portable)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = embedding.weight.detach().to(dtype).cpu().numpy()
    elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], axis=0)],
        "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "seq", table.shape[1]])],
        [numpy_helper.from_array(table, "embed_tokens.weight")],
    )
    # IR 10 (what the dynamo exporter writes): newer onnx packages default to IRs older runtimes refuse.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="compress",
                              ir_version=10)
    onnx.checker.check_model(model)
    return model


def _export_embed(model: nn.Module, adapter: Any, dtype: torch.dtype, opset: int) -> Any:
    embedding = adapter.component(model, "language").get_input_embeddings()
    if type(embedding) is nn.Embedding:
        return _embed_graph(embedding, dtype, opset)
    # A subclass (e.g. a scaled embedding) may compute more than a lookup: trace it instead.
    ids = torch.zeros(DUMMY_BATCH, DUMMY_SEQ, dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    proto = _torch_export(embedding, (ids,), ({0: batch, 1: seq},), ["input_ids"], ["inputs_embeds"], opset, None)
    tidy_dims(proto, {})
    return proto


def _export_vision(module: nn.Module, feeds: dict[str, np.ndarray], dtype: torch.dtype, opset: int,
                   table: dict[Any, Any]) -> Any:
    """An image batch (dynamic batch), or a Qwen flat patch batch (dynamic patch count, a multiple of the
    merge unit) with its position and segment inputs."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    if isinstance(module, QwenVision):
        unit = module.tower.spatial_merge_size ** 2
        size = unit * torch.export.Dim("merged_tokens")
    else:
        size = torch.export.Dim("batch")
    proto = _torch_export(module, args, tuple({0: size} for _ in args), list(feeds), ["image_features"], opset, table)
    if isinstance(module, QwenVision):  # readable axis names: patches in, merged tokens out
        proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "image_tokens"
        tidy_dims(proto, {proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param: "patches"})
    else:
        tidy_dims(proto, {})
    return proto


def _export_decoder(module: DecoderWithPast, facts: dict[str, int], dtype: torch.dtype, opset: int,
                    table: dict[Any, Any], mrope: bool = False) -> Any:
    b, s, p = DUMMY_BATCH, DUMMY_SEQ, DUMMY_PAST
    layers = facts["cache_layers"]
    embeds = torch.randn(b, s, facts["hidden_size"], dtype=dtype)
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row, so the traced masking path is the padded one
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
    if mrope:  # [3, batch, seq]: three different axes, so no axis is traced as a copy of another
        positions = torch.stack([positions, positions // 2, positions + 1])
    kv = (b, facts["num_kv_heads"], p, facts["head_dim"])
    past = tuple(torch.randn(*kv, dtype=dtype) for _ in range(2 * len(layers)))
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    args = [embeds, mask, positions]
    dynamic = [{0: batch, 1: seq}, {0: batch, 1: Dim.DYNAMIC}, {1: batch, 2: seq} if mrope else {0: batch, 1: seq}]
    names = ["inputs_embeds", "attention_mask", "position_ids"]
    if isinstance(module, DecoderWithBlocks):  # a bidirectional block over the first tokens of the padded row
        blocks = torch.full((b, s), -1, dtype=torch.long)
        blocks[0, 2:4], blocks[1, :3] = 0, 1
        args, names = [*args, blocks], [*names, "block_sequence_ids"]
        dynamic.append({0: batch, 1: seq})
    if isinstance(module, DecoderWithCrossAttention):  # Mllama: vision states of 2 tiles per row, all attended
        states = torch.randn(2 * b, module.num_vision_tokens, facts["hidden_size"], dtype=dtype)
        cross_mask = torch.ones(b, s, 1, 2, dtype=torch.long)
        cross_mask[0, :2] = 0  # tokens before the image attend to none of it
        args, names = [*args, states, cross_mask], [*names, "cross_attention_states", "cross_attention_mask"]
        dynamic += [{0: Dim("vision_states")}, {0: batch, 1: seq, 3: Dim("tiles")}]
    dynamic.append(tuple({0: batch, 2: past_len} for _ in past))
    proto = _torch_export(module, (*args, past), tuple(dynamic), [*names, *past_names(layers)],
                          ["logits", *present_names(layers)], opset, table)
    mask_dim = proto.graph.input[1].type.tensor_type.shape.dim[1]
    total = {mask_dim.dim_param: "total"} if mask_dim.HasField("dim_param") else {}
    tidy_dims(proto, {**total, "past + seq": "total"})
    return proto


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
) -> ExportResult:
    """Write the vision / embed / decoder graphs and `export.json` to `out_dir` (replacing earlier graphs).

    `quantize=True` carries the model's quantization into the graphs: `Int8Linear` becomes int8 weights with
    DequantizeLinear (+ QuantizeLinear/DequantizeLinear on the input for W8A8, with the module's own scales),
    bitsandbytes NF4 `Linear4bit` becomes com.microsoft MatMulBnb4 with bnb's own codes. `quantize=False`
    exports the same numbers as float ops. `fusion=True` runs `fuse.fuse_export` on the written folder.
    `int8_kernels` says how W8A8 projections are encoded for ORT's integer kernels (`compress.export.portable`).
    The decoder graph always comes with the embed graph.
    """
    from compress.export import qdq

    family = check_exportable(model)
    unknown = set(components) - set(COMPONENTS)
    if unknown or not components:
        raise ConfigError(f"export components must be a non-empty subset of {COMPONENTS}, got {list(components)}")
    if opset < 18:
        raise ConfigError(f"ONNX export needs opset >= 18 (dynamo exporter, per-axis QDQ), got {opset}")
    dtype = model_dtype(model)
    facts = decoder_facts(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()

    probe = adapter.build_inputs(processor, dummy_images(DUMMY_BATCH), ["what is this?"] * DUMMY_BATCH).inputs
    mrope = family == "qwen2_vl"  # M-RoPE: [3, batch, seq] positions computed by the runner
    files: dict[str, Path] = {}
    tokens_per_image, vision_spec = None, None
    pixels = _numpy(probe["pixel_values"]) if mrope else vision_pixels(family, probe)

    def write(name: str, proto: Any) -> None:
        written = save_model(proto, out / GRAPH_FILES[name])
        files[name] = written[0]
        if len(written) > 1:
            files[f"{name}.data"] = written[1]

    with qdq.export_modules(model, quantize=quantize) as (quantized, table):
        if "vision" in components:
            vision = vision_module(model, adapter, pixels.shape)
            vision_spec = vision.spec() if isinstance(vision, QwenVision) else None
            fed = vision_feeds_for(family, probe, pixels.dtype, VisionSpec(**vision_spec) if vision_spec else None)
            proto = _export_vision(vision, fed.feeds, dtype, opset, table)
            qdq.unshare_qdq(proto)
            write("vision", proto)
            if family not in ("qwen2_vl", "mllama"):  # Qwen: the image size decides; Mllama: no image tokens
                with torch.no_grad():
                    tokens_per_image = int(vision(torch.from_numpy(pixels[:1]).to(dtype)).shape[1])
        if "decoder" in components:
            write("embed", _export_embed(model, adapter, dtype, opset))
            proto = _export_decoder(decoder_module(model, adapter), facts, dtype, opset, table, mrope)
            qdq.unshare_qdq(proto)
            write("decoder", proto)
    for name, file in GRAPH_FILES.items():  # a component not exported this time must not linger
        if name not in files:
            for stale in (out / file, out / (file + ".data")):
                stale.unlink(missing_ok=True)

    vision_cfg = getattr(model.config, "vision_config", None)
    has_qdq = any(info["onnx"].startswith("QuantizeLinear") for info in quantized.get("modules", {}).values())
    has_weight_only = any(info.get("scheme") == "w8a16" for info in quantized.get("modules", {}).values())
    has_int8_gemm = has_qdq or any(info["onnx"].startswith("MatMulInteger")
                                   for info in quantized.get("modules", {}).values())
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family,
        "model_type": model_type_of(model),
        "opset": opset,
        "dtype": ONNX_DTYPES[dtype],
        "graphs": {name: files[name].name for name in GRAPH_FILES if name in files},
        "image_token_id": image_token_id(model),
        "image_tokens_per_image": tokens_per_image if "vision" in files and not mrope else None,
        "pixel_shape": list(pixels.shape[1:]),
        "eos_token_ids": adapter.eos_token_ids(model, processor),
        "pad_token_id": adapter.pad_token_id(processor),
        # "explicit": [batch, seq] positions = cumsum(mask) - 1; "mrope": [3, batch, seq] from the image grid.
        "positions": "mrope" if mrope else "explicit",
        "explicit_positions": True,
        "vision_inputs": vision_spec if "vision" in files else None,
        # Mllama: image features reach the decoder as cross-attention states, not as image-token embeddings.
        "cross_attention": family == "mllama",
        "cross_attention_tokens": int(model.model.vision_model.num_patches) if family == "mllama" else None,
        # Bidirectional attention blocks of a prompt, from the processor's token_type_ids (runtime.blocks).
        "attention_blocks": {"paligemma": "prefix", "gemma3": "images"}.get(family) if family in BLOCK_FAMILIES
        else None,
        **facts,
        "vision_num_heads": int(getattr(vision_cfg, "num_attention_heads", 0) or 0),
        "vision_hidden_size": int(getattr(vision_cfg, "hidden_size", 0) or 0),
        # Session settings the runner applies: keep per-projection Q/DQ pairs so ORT picks int8 kernels, and
        # compute weight-only int8 (fused to MatMulNBits) in float, as the quantize stage measured it.
        "session": {"disabled_optimizers": list(qdq.QDQ_SESSION_DISABLED_OPTIMIZERS) if has_qdq else [],
                    "config": dict(qdq.WEIGHT_ONLY_SESSION_CONFIG) if has_weight_only else {}},
        "quantized": quantized,
        "quantize": quantize,
        "fused": False,
        "fused_ops": {},
        "versions": _versions(),
    }
    write_meta(out, meta)
    result = ExportResult(out_dir=out, files=files, quantized=quantized, meta=meta)
    if fusion:
        result.fused_ops = fuse_export(out)
    if has_int8_gemm:
        portable_export(out, int8_kernels)
    result.meta = describe_files(out)
    return result


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






