"""Operator fusion for the exported graphs, and op counts that show what fused and what did not.

Five passes per graph, in this order (the third followed by a clean-up):

1. onnxscript's `optimize_for_ort` (onnxscript.rewriter.ort_fusions): pattern rewrites written for
   graphs from the torch dynamo exporter. It fuses RMSNorm -> SimplifiedLayerNormalization, residual
   add + norm -> Skip(Simplified)LayerNormalization, scaled-dot-product attention -> MultiHeadAttention
   (decoder, with the additive mask as attention_bias) or Attention (vision, q/k/v packed), and
   erf-GELU + bias -> BiasGelu.
2. `onnxruntime.transformers.optimizer.optimize_model` with a model_type per graph ("clip" for CLIP
   towers, "vit" for SigLIP-style towers: the adapter's `export_spec.vision_optimizer`; "gpt2" for
   Llama-style decoders), opt_level 0 (offline pattern fusions only, so the result stays portable
   across execution providers). It adds what the first pass lacks, e.g. QuickGelu (x * sigmoid(1.702 x),
   CLIP's activation).
3. `compress.export.rotary`: rotate-half rotary embeddings become com.microsoft RotaryEmbedding on the
   projections' [batch, seq, heads * d] outputs, tables computed per step from position_ids.
   Then `compress.export.views` drops the Reshape round trips left around the fused ops.
4. `unpack_quantized_attention`: an Attention packed over dequantized INT8 q/k/v weights goes back to
   three MatMuls + MultiHeadAttention, so ORT runs the projections as integer GEMMs.
5. `compress.export.siblings`: quantized projections reading one input (q/k/v, gate/up) become one
   MatMulNBits (INT4) or one QDQ MatMul (W8A8) and a Split: fewer GEMV calls per decode step, same numbers.

ONNX Runtime's own pattern fusions were written for TorchScript-exported graphs: on dynamo graphs they
find the norms but not the attention blocks, hence pass 1. What stays unfused is listed in
docs/export.md. Every fused graph is re-checked by `compress.export.parity.check_parity`.
"""

from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from compress.export.files import META_FILE, describe_files, read_meta, save_model, write_meta
from compress.export.portable import ort_optimized
from compress.export.rotary import fuse_rotary
from compress.export.siblings import merge_nbits, merge_qdq
from compress.export.views import cancel_views

FUSED_OP_TYPES = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "LayerNormalization",
    "RotaryEmbedding",
    "Gelu",
    "FastGelu",
    "QuickGelu",
    "BiasGelu",
    "MatMulNBits",
    "MatMulBnb4",
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "QuantizeLinear",
    "DequantizeLinear",
)
DECODER_MODEL_TYPE = "gpt2"


def count_ops(model: Any) -> dict[str, int]:
    """Counts of the fusion-relevant op types (zeros included) plus `nodes`, the total node count."""
    import onnx

    if isinstance(model, str | Path):
        model = onnx.load(str(model), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node)
    return {"nodes": sum(counts.values()), **{op: counts.get(op, 0) for op in FUSED_OP_TYPES}}


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def _onnxscript_pass(path: Path, out: Path) -> dict[str, int]:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(path))
    model, fusions = optimize_for_ort(model)
    save_model(ir.to_proto(model), out)
    return _nonzero(fusions)


def _ort_pass(path: Path, out: Path, model_type: str, num_heads: int, hidden_size: int) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_gelu_approximation = False  # keep the exact erf/tanh GELU: parity, not speed, comes first
    if model_type == DECODER_MODEL_TYPE:
        # Llama-style decoders have no GELU, and ORT's QuickGelu matcher crashes on SiLU fed by a dynamic-INT8
        # projection (x * sigmoid(x) where x = acc * scale: a Mul without a constant operand).
        options.enable_gelu = False
    optimized = optimize_model(str(path), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=options, use_gpu=False)
    save_model(optimized.model, out)


def fuse_graph(path: str | Path, model_type: str, num_heads: int, hidden_size: int,
               out_path: str | Path | None = None) -> dict[str, Any]:
    """Fuse one graph (in place unless `out_path`); returns op counts before / after and what each pass did."""
    import onnx

    from compress.export.qdq import unshare_qdq

    path = Path(path)
    out = Path(out_path) if out_path is not None else path
    before = count_ops(path)
    with tempfile.TemporaryDirectory(prefix="fuse-") as tmp:
        step1 = Path(tmp) / "step1.onnx"
        step2 = Path(tmp) / "step2.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fusions = _onnxscript_pass(path, step1)
            _ort_pass(step1, step2, model_type, num_heads, hidden_size)
        proto = onnx.load(str(step2))
        rotary = fuse_rotary(proto)
        views = cancel_views(proto)
        unpacked = unpack_quantized_attention(proto)
        unshare_qdq(proto)  # the passes' CSE merges per-projection Q/DQ copies again
        merged = {"matmulnbits": merge_nbits(proto), "qdq_matmul": merge_qdq(proto)}
        save_model(proto, out)
    return {
        "before": before,
        "after": count_ops(out),
        "passes": [
            {"tool": "onnxscript.rewriter.ort_fusions.optimize_for_ort", "fusions": fusions},
            {"tool": "onnxruntime.transformers.optimizer.optimize_model", "model_type": model_type, "opt_level": 0},
            {"tool": "compress.export.rotary", "rotary_fused": rotary},
            {"tool": "compress.export.views", "reshapes_bypassed": views},
            {"tool": "compress.export.fuse.unpack_quantized_attention", "attention_unpacked": unpacked},
            {"tool": "compress.export.siblings", "merged_away": merged},
        ],
    }


def unpack_quantized_attention(proto: Any) -> int:
    """Attention over Concat(DequantizeLinear(q), (k), (v)) -> three MatMuls + MultiHeadAttention. In place.

    Both passes pack a vision block's q/k/v weights into one Attention input. With int8 weights that
    packing is a float Concat of three dequantized weights, computed on every call, and the projections
    never reach ORT's integer GEMMs; apart, each DQ -> MatMul <- DQ fuses into MatMulIntegerToFloat.
    Returns how many Attention nodes were rewritten.
    """
    from onnx import helper

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    rewritten = 0
    new_nodes: list[Any] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        packed = producer.get(node.input[1]) if node.op_type == "Attention" and len(node.input) > 1 else None
        extra = list(node.input[3:5])  # mask_index, past: no MultiHeadAttention equivalent here
        if (packed is None or packed.op_type != "Concat" or len(packed.input) != 3 or any(extra)
                or any(producer.get(w) is None or producer[w].op_type != "DequantizeLinear" for w in packed.input)
                or attrs.get("unidirectional", 0) or attrs.get("do_rotary", 0)
                or len(set(attrs.get("qkv_hidden_sizes", [0]))) > 1):
            new_nodes.append(node)
            continue
        rewritten += 1
        qkv = [f"{node.name}_{p}" for p in "qkv"]
        new_nodes += [helper.make_node("MatMul", [node.input[0], w], [out], name=out)
                      for w, out in zip(packed.input, qkv, strict=True)]
        bias = node.input[2] if len(node.input) > 2 else ""
        attention_bias = node.input[5] if len(node.input) > 5 else ""
        keep = {k: v for k, v in attrs.items() if k in ("num_heads", "scale", "mask_filter_value")}
        new_nodes.append(helper.make_node("MultiHeadAttention", [*qkv, bias, "", attention_bias], list(node.output[:1]),
                                          name=f"{node.name}_mha", domain="com.microsoft", **keep))
    if rewritten:
        used = {name for n in new_nodes for name in n.input} | {o.name for o in graph.output}
        del graph.node[:]
        graph.node.extend(n for n in new_nodes if n.op_type != "Concat" or n.output[0] in used)
    return rewritten


def fuse_export(out_dir: str | Path) -> dict[str, Any]:
    """Fuse the vision and decoder graphs of an export folder in place and record the counts in export.json.

    The embed graph is a single Gather and is left alone. Returns {graph: fuse_graph(...) result}.
    """
    from compress.arch import get_adapter

    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    results: dict[str, Any] = {}
    for name, file in meta["graphs"].items():
        if name == "embed":
            continue
        if name == "decoder":
            model_type, heads, hidden = DECODER_MODEL_TYPE, meta["num_heads"], meta["hidden_size"]
        else:  # the vision graph: which tower it is, the family's adapter says
            spec = get_adapter(meta["model_type"]).export_spec
            model_type = spec.vision_optimizer if spec is not None else "vit"
            heads, hidden = meta.get("vision_num_heads", 0), meta.get("vision_hidden_size", 0)
        results[name] = fuse_graph(out_dir / file, model_type, heads, hidden)
    meta["fused"] = True
    meta["fused_ops"] = results
    write_meta(out_dir, meta)
    describe_files(out_dir)
    return results


def runtime_ops(path: str | Path, providers: list[Any] | None = None,
                disabled_optimizers: list[str] | tuple[str, ...] = ()) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its own session-time optimizations).

    This is where the QDQ -> MatMulIntegerToFloat rewrites happen, so it shows whether int8 kernels are used.
    """
    return _nonzero(count_ops(ort_optimized(path, disabled_optimizers, providers)))


__all__ = ["FUSED_OP_TYPES", "META_FILE", "count_ops", "fuse_export", "fuse_graph", "runtime_ops",
           "unpack_quantized_attention"]
