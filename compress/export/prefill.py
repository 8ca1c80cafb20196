"""An INT8 prefill graph for INT4 exports: prompts through integer GEMMs, decode steps through MatMulNBits.

A decode step at batch 1 streams every weight once for one row of activations: 4-bit weights halve the
bytes, and `MatMulNBits` is the fastest kernel there. A prompt is the opposite case: hundreds of rows
per weight, compute-bound, where ONNX Runtime's block-wise `MatMulNBits` (per-block scales, level 4 or
float) runs about 2x the time of its per-channel int8 GEMM (docs/benchmarks.md). So an INT4 export may
carry a second decoder graph, `prefill.onnx`, that the runner uses for every call of more than one
position: the same graph, with each INT4 projection as a 7-bit per-output-channel int8 weight
(requantized from the INT4 weight's own float values, so both graphs compute with nearly the same
weight: within half a 7-bit step) and int8 activations per token (`MatMulInteger`, u8 x s8). 7-bit
weights keep the integer kernels exact on CPUs without VNNI (`compress.export.portable`); per-token
scales keep a token's outliers out of every other token's grid. The lm_head stays INT4: at prefill it
sees only the last position. The cost is memory: the int8 copy of the projections, ~2x their INT4 bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ConfigError
from compress.export.files import GRAPH_FILES, read_meta, save_model, write_meta
from compress.export.nbits import dequantize
from compress.export.portable import S7_MAX, U8_ZERO, drop_unused_initializers
from compress.quant.int8 import ACT_QMAX, ACT_QMIN, DYNAMIC_DIVISOR

GEMMS = frozenset({"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "MatMulBnb4",
                   "DynamicQuantizeMatMul", "QGemm"})


def head_projection(graph: Any, output: str = "logits") -> str | None:
    """Name of the MatMulNBits node computing `output` (the lm_head), or None when its GEMM is another op."""
    producers = {o: n for n in graph.node for o in n.output}
    todo, seen = [output], set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in GEMMS:
            return node.name if node.op_type == "MatMulNBits" else None
        todo.extend(i for i in node.input if i)
    return None


def _weight_s7(inits: dict[str, Any], node: Any, attrs: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The node's INT4 weight as 7-bit int8 B [K, N] (MatMulInteger's layout) and float32 scales [N]."""
    import torch
    from onnx import numpy_helper

    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    b, scales, zp = (torch.from_numpy(numpy_helper.to_array(inits[name]).copy()) if name else None
                     for name in [*node.input[1:3], node.input[3] if len(node.input) > 3 else ""])
    w = dequantize(b, scales.reshape(n, k // block), zp, n, k, block).numpy()  # what MatMulNBits computes with
    s = np.abs(w).max(axis=1) / S7_MAX
    s = np.where(s == 0, np.finfo(np.float32).tiny, s).astype(np.float32)
    q = np.clip(np.rint(w / s[:, None]), -S7_MAX, S7_MAX).astype(np.int8)
    return np.ascontiguousarray(q.T), s


def _constants(graph: Any) -> None:
    from onnx import numpy_helper

    for name, value in (("prefill_last_axis", np.array([-1], np.int64)),
                        ("prefill_divisor", np.array(DYNAMIC_DIVISOR, np.float32)),
                        ("prefill_tiny", np.array(np.finfo(np.float32).tiny, np.float32)),
                        ("prefill_qmin", np.array(ACT_QMIN, np.float32)),
                        ("prefill_qmax", np.array(ACT_QMAX, np.float32)),
                        ("prefill_offset", np.array(U8_ZERO + 0.5, np.float32)),
                        ("prefill_a_zero", np.array(U8_ZERO, np.uint8)),
                        ("prefill_b_zero", np.array(0, np.int8))):
        graph.initializer.append(numpy_helper.from_array(value, name))


def _int8_projection(node: Any, p: str) -> list[Any]:
    """x -> per-token u8 codes -> MatMulInteger(., int8 B `p`B) -> int32 * (token scale * channel scale `p`B_scale)
    [+ bias], each name prefixed with `p`."""
    from onnx import TensorProto, helper

    nodes = []

    def add(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [p + out], name=p + out, **attrs))
        return p + out

    x = node.input[0]
    amax = add("ReduceMax", [add("Abs", [x], "abs"), "prefill_last_axis"], "amax", keepdims=1)
    scale = add("Max", [add("Div", [amax, "prefill_divisor"], "scale0"), "prefill_tiny"], "scale")
    # Cast truncates: clip to the int8 range, shift by 128.5 and truncate = round half up to the uint8 code.
    codes = add("Clip", [add("Div", [x, scale], "scaled"), "prefill_qmin", "prefill_qmax"], "clip")
    a = add("Cast", [add("Add", [codes, "prefill_offset"], "shift")], "a_u8", to=TensorProto.UINT8)
    acc = add("MatMulInteger", [a, p + "B", "prefill_a_zero", "prefill_b_zero"], "acc")
    add("Mul", [add("Cast", [acc], "acc_f", to=TensorProto.FLOAT), add("Mul", [scale, p + "B_scale"], "scales")], "y")
    if len(node.input) > 5 and node.input[5]:
        add("Add", [p + "y", node.input[5]], "biased")
    nodes[-1].output[0] = node.output[0]
    return nodes


def int8_prefill(proto: Any) -> tuple[int, str | None]:
    """Rewrite every MatMulNBits node but the lm_head as a per-token int8 GEMM, in place.

    Returns (projections rewritten, the lm_head node kept as INT4 or None)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    head = head_projection(graph)
    inits = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or node.name == head:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (attrs.get("bits", 4) != 4 or (len(node.input) > 4 and node.input[4])
                or inits[node.input[2]].data_type != TensorProto.FLOAT):
            raise ConfigError(f"{node.name}: int4_prefill int8 takes float32 4-bit MatMulNBits without g_idx "
                              "(what compress exports)")
        b, s = _weight_s7(inits, node, attrs)
        p = f"{node.name or node.output[0]}_i8/"
        graph.initializer.extend([numpy_helper.from_array(b, p + "B"), numpy_helper.from_array(s, p + "B_scale")])
        nodes += _int8_projection(node, p)
        count += 1
    if count:
        _constants(graph)
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unused_initializers(graph)
    return count, head


def write_int8_prefill(out_dir: str | Path) -> dict[str, Any]:
    """Write `prefill.onnx` beside an export's decoder and list it in export.json; returns what it records."""
    import onnx

    out = Path(out_dir)
    meta = read_meta(out)
    proto = onnx.load(str(out / meta["graphs"]["decoder"]), load_external_data=True)
    count, head = int8_prefill(proto)
    if not count:
        raise ConfigError("int4_prefill: int8 needs INT4 projections in the decoder (a quantize stage with "
                          "scheme: int4 on the language model); this export has none")
    save_model(proto, out / GRAPH_FILES["prefill"])
    meta["graphs"]["prefill"] = GRAPH_FILES["prefill"]
    meta["prefill"] = {"graph": GRAPH_FILES["prefill"], "used_for": "calls of more than one position",
                       "projections_int8": count, "kept_int4": head,
                       "weights": "int8 per output channel, 7-bit, from the INT4 weights' values",
                       "activations": "int8 per token (dynamic, max|x| / 127.5)"}
    write_meta(out, meta)
    return meta["prefill"]
