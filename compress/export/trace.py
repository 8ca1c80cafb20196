"""Trace one torch module into an in-memory ONNX graph: the dynamo exporter call, dynamic axes with readable
names, and the example inputs each graph (vision, embed, KV-cache decoder) is traced with.

Kept apart from `onnx.py`, which decides what goes into an export folder and describes it in export.json.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from compress.errors import ConfigError
from compress.export.wrappers import (
    DecoderWithBlocks,
    DecoderWithCrossAttention,
    DecoderWithPast,
    QwenVision,
    past_names,
    present_names,
)

# Dummy shapes for tracing: deliberately unlike the shapes parity checks use, and never 0 or 1 (torch.export
# specializes dimensions of size 0/1 to constants).
DUMMY_BATCH, DUMMY_SEQ, DUMMY_PAST = 2, 5, 3


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


def export_embed(model: nn.Module, adapter: Any, dtype: torch.dtype, opset: int, image_id: int | None) -> Any:
    """The embed graph; with `image_id`, it also takes the image feature rows and writes them over the image
    tokens (`with_image_scatter`)."""
    embedding = adapter.component(model, "language").get_input_embeddings()
    if type(embedding) is nn.Embedding:
        proto = _embed_graph(embedding, dtype, opset)
    else:  # a subclass (e.g. a scaled embedding) may compute more than a lookup: trace it instead
        ids = torch.zeros(DUMMY_BATCH, DUMMY_SEQ, dtype=torch.long)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        proto = _torch_export(embedding, (ids,), ({0: batch, 1: seq},), ["input_ids"], ["inputs_embeds"], opset,
                              None)
        tidy_dims(proto, {})
    if image_id is not None:
        with_image_scatter(proto, image_id)
    return proto


def with_image_scatter(proto: Any, image_id: int) -> None:
    """Make an ids -> embeddings graph take `image_features` [image_tokens, hidden] too, and write row k over
    the k-th image token (row-major over batch and sequence, the order HF's masked_scatter uses).

    Image tokens are looked up as id 0 (an image id past the vocab is allowed upstream), the row index is the
    running count of image tokens - 1, and one zero row is appended to the features so the Gather stays
    valid with 0 rows (text-only prompts, decode steps). A prompt with more image tokens than rows reads
    past them: the runner checks the counts before it calls."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    ids, out = graph.input[0].name, graph.output[0].name
    out_type = graph.output[0].type.tensor_type
    hidden = out_type.shape.dim[2].dim_value
    for node in graph.node:
        node.input[:] = ["scatter.text_ids" if x == ids else x for x in node.input]
        node.output[:] = ["scatter.text_embeds" if x == out else x for x in node.output]
    np_dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[out_type.elem_type]
    graph.initializer.extend([
        numpy_helper.from_array(np.array(image_id, np.int64), "scatter.image_id"),
        numpy_helper.from_array(np.array(0, np.int64), "scatter.zero"),
        numpy_helper.from_array(np.array(1, np.int64), "scatter.one"),
        numpy_helper.from_array(np.array([-1], np.int64), "scatter.flat"),
        numpy_helper.from_array(np.zeros((1, hidden), np_dtype), "scatter.zero_row"),
    ])
    node = helper.make_node
    before = [node("Equal", [ids, "scatter.image_id"], ["scatter.is_image"]),
              node("Where", ["scatter.is_image", "scatter.zero", ids], ["scatter.text_ids"])]
    after = [
        node("Cast", ["scatter.is_image"], ["scatter.is_image_i"], to=TensorProto.INT64),
        node("Reshape", ["scatter.is_image_i", "scatter.flat"], ["scatter.is_image_flat"]),
        node("CumSum", ["scatter.is_image_flat", "scatter.zero"], ["scatter.count"]),
        node("Sub", ["scatter.count", "scatter.one"], ["scatter.row_from_1"]),
        node("Max", ["scatter.row_from_1", "scatter.zero"], ["scatter.row"]),
        node("Concat", ["image_features", "scatter.zero_row"], ["scatter.rows"], axis=0),
        node("Gather", ["scatter.rows", "scatter.row"], ["scatter.picked_flat"], axis=0),
        node("Shape", ["scatter.text_embeds"], ["scatter.shape"]),
        node("Reshape", ["scatter.picked_flat", "scatter.shape"], ["scatter.picked"]),
        node("Unsqueeze", ["scatter.is_image", "scatter.flat"], ["scatter.is_image_3d"]),
        node("Where", ["scatter.is_image_3d", "scatter.picked", "scatter.text_embeds"], [out]),
    ]
    nodes = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info("image_features", out_type.elem_type, ["image_tokens", hidden]))


def export_vision(module: nn.Module, feeds: dict[str, np.ndarray], dtype: torch.dtype, opset: int,
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
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) == 2:  # image-token rows (images x tokens, or Qwen2-VL's merged patches)
        out_dims[0].dim_param = "image_tokens"
    if isinstance(module, QwenVision):  # readable axis names: patches in, merged tokens out
        tidy_dims(proto, {proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param: "patches"})
    else:
        tidy_dims(proto, {})
    return proto


def export_decoder(module: DecoderWithPast, facts: dict[str, int], dtype: torch.dtype, opset: int,
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
    args, names = [*args, past], [*names, *past_names(layers)]
    if module.select_logits:  # positions to compute logits for: [seq - 1] when generating, all when scoring
        args, names = [*args, torch.arange(s)[-2:]], [*names, "logits_index"]
        dynamic.append({0: Dim("logits")})
    proto = _torch_export(module, tuple(args), tuple(dynamic), names, ["logits", *present_names(layers)], opset,
                          table)
    mask_dim = proto.graph.input[1].type.tensor_type.shape.dim[1]
    total = {mask_dim.dim_param: "total"} if mask_dim.HasField("dim_param") else {}
    tidy_dims(proto, {**total, "past + seq": "total"})
    return proto
