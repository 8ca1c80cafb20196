"""Sibling projections (a layer's q/k/v, its gate/up: one input, several weights) as one GEMM and a Split.

At batch-1 decode every projection is a GEMV whose cost is largely the call (thread-pool dispatch,
quantizing the input) rather than the weight bytes, and a transformers decoder makes seven of them per
layer. Stacking siblings' weights along N gives one call that reads the same bytes (onnxruntime-genai's
builder packs them the same way). Both passes stack the nodes' own codes, scales and zero points, so
every output is bit-identical to the separate projections' (tested).

- `merge_nbits`: com.microsoft `MatMulNBits` nodes (INT4 layers) with the same input, K, bits, block
  size, accuracy level and zero-point layout.
- `merge_qdq`: W8A8 projections `MatMul(DQ(Q(x)), DQ(int8 W))` whose activations are quantized with the
  same scale and zero point (equal values, not just equal names) and whose weights share a dtype, axis
  and zero-point layout; ONNX Runtime then fuses the one MatMul into one `MatMulIntegerToFloat`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.export.portable import drop_unused_initializers


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _replace(graph: Any, merged: dict[str, list[Any]], gone: set[str]) -> None:
    """Put each merged group's nodes where its first member was (its input exists there, and every
    member's consumers come after it), drop the members and the initializers nothing reads any more."""
    nodes: list[Any] = []
    for node in graph.node:
        key = node.output[0] if node.output else ""
        if key in merged:
            nodes += merged[key]
        elif key not in gone:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)


def _split(graph: Any, stacked: str, outputs: list[str], sizes: list[int]) -> Any:
    from onnx import helper, numpy_helper

    sizes_init = numpy_helper.from_array(np.array(sizes, dtype=np.int64), f"{stacked}_sizes")
    graph.initializer.append(sizes_init)
    return helper.make_node("Split", [stacked, sizes_init.name], outputs, name=f"{stacked}_split", axis=-1)


def merge_nbits(proto: Any) -> int:
    """MatMulNBits siblings -> one MatMulNBits + Split, in place. Returns the nodes merged away."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.input) > 4 \
                or not all(name in inits for name in node.input[1:] if name):
            continue
        a = _attrs(node)
        key = (node.input[0], a["K"], a.get("bits", 4), a["block_size"], a.get("accuracy_level", 0),
               len([i for i in node.input if i]))
        groups.setdefault(key, []).append(node)
    merged: dict[str, list[Any]] = {}
    gone: set[str] = set()
    for key, members in groups.items():
        if len(members) < 2:
            continue
        first, out = members[0], f"{members[0].output[0]}_merged"
        sizes = [int(_attrs(m)["N"]) for m in members]
        stacked = [numpy_helper.from_array(np.concatenate([numpy_helper.to_array(inits[m.input[i]]) for m in members]),
                                           f"{out}_{i}") for i in range(1, key[-1])]
        graph.initializer.extend(stacked)
        gemm = helper.make_node("MatMulNBits", [key[0], *(t.name for t in stacked)], [out], name=out,
                                domain="com.microsoft", **{**_attrs(first), "N": sum(sizes)})
        merged[first.output[0]] = [gemm, _split(graph, out, [m.output[0] for m in members], sizes)]
        gone.update(m.output[0] for m in members)
    if merged:
        _replace(graph, merged, gone)
    return len(gone) - len(merged)


def _value_key(inits: dict[str, Any], name: str) -> tuple[Any, ...]:
    """An initializer by value (two scales with different names but equal numbers are the same scale)."""
    if not name:
        return ()
    t = inits[name]
    from onnx import numpy_helper

    a = numpy_helper.to_array(t)
    return t.data_type, a.shape, a.tobytes()


def merge_qdq(proto: Any) -> int:
    """W8A8 QDQ siblings -> one Q/DQ pair, one weight DequantizeLinear, one MatMul + Split, in place.

    Returns the MatMuls merged away."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    groups: dict[tuple[Any, ...], list[tuple[Any, Any, Any, Any]]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        act_dq, w_dq = (producer.get(i) for i in node.input)
        q = producer.get(act_dq.input[0]) if act_dq is not None and act_dq.op_type == "DequantizeLinear" else None
        if (q is None or q.op_type != "QuantizeLinear" or w_dq is None or w_dq.op_type != "DequantizeLinear"
                or not all(i in inits for i in w_dq.input if i) or readers.get(act_dq.output[0]) != 1
                or readers.get(q.output[0]) != 1 or readers.get(w_dq.output[0]) != 1
                or not all(i in inits for i in q.input[1:] if i)):
            continue
        w = inits[w_dq.input[0]]
        if len(w.dims) != 2 or _attrs(w_dq).get("axis", 1) != 1 or _attrs(w_dq).get("block_size", 0):
            continue
        key = (q.input[0], *(_value_key(inits, i) for i in q.input[1:]), tuple(_attrs(q).items()), w.data_type,
               w.dims[0], len([i for i in w_dq.input if i]))
        groups.setdefault(key, []).append((node, q, act_dq, w_dq))
    merged: dict[str, list[Any]] = {}
    gone: set[str] = set()
    away = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        away += len(members) - 1
        node, q, act_dq, w_dq = members[0]
        out = f"{node.output[0]}_merged"
        arrays = [[numpy_helper.to_array(inits[i]) for i in m[3].input if i] for m in members]
        sizes = [int(a[0].shape[1]) for a in arrays]
        stacked = [np.concatenate([a[0] for a in arrays], axis=1)]  # weight [K, N]: stack along N
        for i in range(1, len(arrays[0])):  # scales, zero points: per-tensor ones broadcast to per-channel
            stacked.append(np.concatenate([np.broadcast_to(a[i], (n,)) for a, n in zip(arrays, sizes, strict=True)]))
        tensors = [numpy_helper.from_array(np.ascontiguousarray(a), f"{out}_{i}") for i, a in enumerate(stacked)]
        graph.initializer.extend(tensors)
        dq = helper.make_node("DequantizeLinear", [t.name for t in tensors], [f"{out}_w"], name=f"{out}_dq", axis=1)
        gemm = helper.make_node("MatMul", [act_dq.output[0], dq.output[0]], [out], name=out)
        outputs = [m[0].output[0] for m in members]
        merged[node.output[0]] = [q, act_dq, dq, gemm, _split(graph, out, outputs, sizes)]
        gone.update(outputs)
        gone.update(n.output[0] for m in members for n in m[1:])
    if merged:
        _replace(graph, merged, gone)
    return away
