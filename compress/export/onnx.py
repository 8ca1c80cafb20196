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
    DecoderWithPast,
    check_exportable,
    decoder_facts,
    decoder_module,
    model_type_of,
    past_names,
    present_names,
    vision_module,
)

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


def vision_pixels(family: str, inputs: dict[str, Any]) -> np.ndarray:
    """The [images, C, H, W] batch the vision graph takes, from the processor outputs of one batch.

    Idefics3/SmolVLM pad a batch to [batch, max_images, C, H, W] with all-zero images and mark padded
    pixels in pixel_attention_mask; the padding images are dropped (as upstream does) and partially
    padded images are refused, because the exported vision graph assumes whole-frame patch positions.
    """
    pixels = _numpy(inputs["pixel_values"])
    if family == "llava":
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[2:])
    real = (flat == 0).sum(axis=(1, 2, 3)) != int(np.prod(flat.shape[1:]))
    if not real.any():
        real[0] = True  # upstream keeps one image when all are padding
    mask = inputs.get("pixel_attention_mask")
    if mask is not None:
        mask = _numpy(mask).reshape(-1, *flat.shape[2:])[real]
        if not mask.all():
            raise ConfigError(
                f"{family} ONNX export handles whole images only: this batch has images padded to a larger frame "
                "(pixel_attention_mask has zeros); resize images to one size (e.g. do_image_splitting=False and "
                "square images)"
            )
    return flat[real]


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


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


def _export_vision(module: nn.Module, pixels: torch.Tensor, opset: int, table: dict[Any, Any]) -> Any:
    batch = torch.export.Dim("batch")
    proto = _torch_export(module, (pixels,), ({0: batch},), ["pixel_values"], ["image_features"], opset, table)
    tidy_dims(proto, {})
    return proto


def _export_decoder(module: DecoderWithPast, facts: dict[str, int], dtype: torch.dtype, opset: int,
                    table: dict[Any, Any]) -> Any:
    b, s, p = DUMMY_BATCH, DUMMY_SEQ, DUMMY_PAST
    layers = facts["num_layers"]
    embeds = torch.randn(b, s, facts["hidden_size"], dtype=dtype)
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row, so the traced masking path is the padded one
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
    past = tuple(torch.randn(b, facts["num_kv_heads"], p, facts["head_dim"], dtype=dtype) for _ in range(2 * layers))
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: seq},
               tuple({0: batch, 2: past_len} for _ in past))
    names = ["inputs_embeds", "attention_mask", "position_ids", *past_names(layers)]
    proto = _torch_export(module, (embeds, mask, positions, past), dynamic, names,
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
    if not getattr(adapter, "explicit_positions", True):
        raise ConfigError(f"{adapter.name}: ONNX export needs 1-D position ids (the runner contract)")
    dtype = model_dtype(model)
    facts = decoder_facts(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()

    probe = adapter.build_inputs(processor, dummy_images(DUMMY_BATCH), ["what is this?"] * DUMMY_BATCH).inputs
    pixels = torch.from_numpy(vision_pixels(family, probe)).to(dtype)
    files: dict[str, Path] = {}

    def write(name: str, proto: Any) -> None:
        written = save_model(proto, out / GRAPH_FILES[name])
        files[name] = written[0]
        if len(written) > 1:
            files[f"{name}.data"] = written[1]

    with qdq.export_modules(model, quantize=quantize) as (quantized, table):
        if "vision" in components:
            vision = vision_module(model, adapter, pixels.shape)
            proto = _export_vision(vision, pixels, opset, table)
            qdq.unshare_qdq(proto)
            write("vision", proto)
            with torch.no_grad():
                tokens_per_image = int(vision(pixels[:1]).shape[1])
        if "decoder" in components:
            write("embed", _export_embed(model, adapter, dtype, opset))
            proto = _export_decoder(decoder_module(model, adapter), facts, dtype, opset, table)
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
        "image_tokens_per_image": tokens_per_image if "vision" in files else None,
        "pixel_shape": list(pixels.shape[1:]),
        "eos_token_ids": adapter.eos_token_ids(model, processor),
        "pad_token_id": adapter.pad_token_id(processor),
        "explicit_positions": True,
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






