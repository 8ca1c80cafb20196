"""Rotary embeddings as com.microsoft `RotaryEmbedding`: one kernel per q / k instead of seven ops.

Traced from transformers, every layer rotates its queries and keys as `x * cos + rotate_half(x) * sin`
(two Slices, a Neg, a Concat, two Muls and an Add per tensor, each a separate kernel launch at a decode step).
onnxscript's ORT rotary rule finds that pattern but only keeps it if it can also turn the cos/sin computation
into a constant position table; the dynamo exporter writes `positions x inv_freq` as a Mul rather than the
MatMul it expects, so nothing is fused.

Here the tables are the step's own: the graph still computes cos and sin from `position_ids` exactly as the
model does ([batch, seq, d/2] before the duplicating Concat), flattened to [batch * seq, d/2], and each row reads
its own entry through position ids 0 .. batch * seq - 1. No maximum length, no padding assumption (left-padded
rows keep their own positions), and the kernel computes `x1 * cos - x2 * sin`, `x2 * cos + x1 * sin`: the traced
formula (its rounding may differ in the last bit). Partial or interleaved rotary and M-RoPE do not match and stay
as traced.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from compress.export.portable import drop_unused_initializers, toposort

_LAST_AXIS = (-1, 3)


class _Graph:
    """Lookups over one graph: producers, constant values, known ranks."""

    def __init__(self, graph: Any):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        # tensors by name, converted to numpy only when asked (the weights are most of the bytes)
        self.tensors = {t.name: t for t in graph.initializer}
        self.tensors.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"
                             and n.attribute and n.attribute[0].name == "value"})
        self.rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.value_info, *graph.input]
                     if v.type.tensor_type.HasField("shape")}

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.tensors.get(name)
        small = tensor is not None and int(np.prod(tensor.dims, dtype=np.int64)) <= 16
        return numpy_helper.to_array(tensor) if small else None

    def op(self, name: str, *types: str) -> Any:
        node = self.producer.get(name)
        return node if node is not None and node.op_type in types and node.domain in ("", "ai.onnx") else None

    def ints(self, name: str) -> list[int] | None:
        value = self.value(name)
        return None if value is None or value.dtype.kind not in "iu" else [int(v) for v in value.reshape(-1)]

    def scalar(self, name: str) -> bool:
        value = self.value(name)
        return value is not None and value.size == 1 and value.dtype.kind == "f"


def _table(g: _Graph, name: str, trig: str) -> tuple[str, str | None] | None:
    """`Unsqueeze(Cos(Concat(f, f)) [* k], 1)` -> (f, k): the half-width angles and an optional scale."""
    unsq = g.op(name, "Unsqueeze")
    if unsq is None or len(unsq.input) < 2 or g.ints(unsq.input[1]) != [1]:
        return None
    scale, node = None, g.op(unsq.input[0], "Mul", trig)
    if node is not None and node.op_type == "Mul":
        a, b = node.input
        scale, node = (b, g.op(a, trig)) if g.scalar(b) else (a, g.op(b, trig)) if g.scalar(a) else (None, None)
    cat = g.op(node.input[0], "Concat") if node is not None else None
    if cat is None or len(cat.input) != 2 or cat.input[0] != cat.input[1]:
        return None
    if helper.get_attribute_value(cat.attribute[0]) not in _LAST_AXIS:
        return None
    return cat.input[0], scale


def _half_slice(g: _Graph, name: str) -> tuple[str, int, int] | None:
    """Slice(x, [start], [end], [last axis], [1]) -> (x, start, end)."""
    s = g.op(name, "Slice")
    if s is None or len(s.input) < 4:
        return None
    starts, ends, axes = (g.ints(i) for i in s.input[1:4])
    steps = g.ints(s.input[4]) if len(s.input) > 4 and s.input[4] else [1]
    if None in (starts, ends, axes) or len(starts) != 1 or axes[0] not in _LAST_AXIS or steps != [1]:
        return None
    return s.input[0], starts[0], ends[0]


def _rotate_half(g: _Graph, name: str) -> tuple[str, int] | None:
    """Concat(-x[..., h:], x[..., :h]) -> (x, h)."""
    cat = g.op(name, "Concat")
    if cat is None or len(cat.input) != 2 or helper.get_attribute_value(cat.attribute[0]) not in _LAST_AXIS:
        return None
    neg = g.op(cat.input[0], "Neg")
    high, low = (_half_slice(g, neg.input[0]) if neg is not None else None), _half_slice(g, cat.input[1])
    if high is None or low is None or high[0] != low[0] or low[1] != 0 or high[1] != low[2] or high[2] < 2 * low[2]:
        return None
    return low[0], low[2]


def _match(g: _Graph, add: Any) -> tuple[str, str, str | None, int] | None:
    """Add(Mul(x, cos), Mul(rotate_half(x), sin)) in any operand order -> (x, angles, scale, half)."""
    muls = [g.op(i, "Mul") for i in add.input]
    if None in muls:
        return None
    for direct, rotated in (muls, muls[::-1]):
        for r_in, sin in (rotated.input, rotated.input[::-1]):
            half = _rotate_half(g, r_in)
            sin_table = _table(g, sin, "Sin") if half is not None else None
            if sin_table is None:
                continue
            for x, cos in (direct.input, direct.input[::-1]):
                if x == half[0] and _table(g, cos, "Cos") == sin_table:
                    return x, sin_table[0], sin_table[1], half[1]
    return None


_NORMS = ("SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization")


def _heads_first(g: _Graph, x: str) -> tuple[str, str | None, list[int], Any] | None:
    """x = [norm](Transpose(X, [0, 2, 1, 3])) with X [batch, seq, heads, d] -> (source, head shape, perm, norm).

    X = Reshape(t, shape), the projection split into heads: (t, shape, ..), t already [batch, seq, heads * d].
    Any other X: (X, None, ..); the caller flattens it. A norm over d between the Transpose and the rotary
    (Gemma 3's per-head q/k norms) commutes with the Transpose: it is returned to be applied to X instead."""
    norm = g.producer.get(x)
    if norm is not None and norm.op_type in _NORMS and _last_axis(norm):
        x = norm.input[0]
    else:
        norm = None
    tr = g.op(x, "Transpose")
    perm = helper.get_attribute_value(tr.attribute[0]) if tr is not None and tr.attribute else None
    if perm is None or list(perm) != [0, 2, 1, 3]:
        return None
    reshape = g.op(tr.input[0], "Reshape")
    if norm is None and reshape is not None and g.rank.get(reshape.input[0], 3) == 3:
        return reshape.input[0], reshape.input[1], list(perm), None
    return tr.input[0], None, list(perm), norm


def _last_axis(node: Any) -> bool:
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
    return axis in _LAST_AXIS


def fuse_rotary(proto: Any) -> int:
    """Rewrite every full, non-interleaved rotate-half rotary in `proto` (in place); returns how many."""
    graph = proto.graph
    g = _Graph(graph)
    caches: dict[tuple[str, str | None], tuple[str, str, str]] = {}
    replaced: dict[str, Any] = {}
    known = {v.name: v for v in graph.value_info}
    extra: list[Any] = []
    flatten = ""
    for add in graph.node:
        found = _match(g, add) if add.op_type == "Add" and add.domain in ("", "ai.onnx") else None
        # Rotating a [batch, heads, seq, d] tensor in place would bring back the head Transposes ORT cancels
        # around elementwise ops: rotate the [batch, seq, heads * d] tensor before the split into heads instead.
        split = _heads_first(g, found[0]) if found is not None else None
        if split is None:
            continue
        _, angles, scale, half = found
        if (angles, scale) not in caches:
            caches[angles, scale] = _caches(extra, angles, scale, half, f"rotary_cache_{len(caches)}")
        pos, cos_cache, sin_cache = caches[angles, scale]
        source, shape, perm, norm = split
        r = f"{add.output[0]}_rotary"
        if norm is not None:  # the same norm, on the [batch, seq, heads, d] tensor before the head Transpose
            normed = helper.make_node(norm.op_type, [source, *norm.input[1:]], [f"{r}_norm"], name=f"{r}_norm",
                                      domain=norm.domain)
            normed.attribute.extend(norm.attribute)
            extra.append(normed)
            source = f"{r}_norm"
        if shape is None:  # [batch, seq, heads, d] from a per-head norm: view it as [batch, seq, heads * d]
            flatten = flatten or _const(extra, "rotary_flatten", [0, 0, -1])
            extra += [helper.make_node("Reshape", [source, flatten], [f"{r}_flat"], name=f"{r}_flat"),
                      helper.make_node("Shape", [source], [f"{r}_shape"], name=f"{r}_shape")]
            source, shape = f"{r}_flat", f"{r}_shape"
        if source in known:  # same shape as its input: lets compress.export.views see the round trip back
            graph.value_info.append(copy_value(known[source], r))
        extra += [
            helper.make_node("RotaryEmbedding", [source, pos, cos_cache, sin_cache], [r], name=r,
                             domain="com.microsoft", interleaved=0),  # head size: twice the tables' width
            helper.make_node("Reshape", [r, shape], [f"{r}_heads"], name=f"{r}_heads"),
        ]
        replaced[add.output[0]] = helper.make_node("Transpose", [f"{r}_heads"], [add.output[0]],
                                                   name=f"{r}_transpose", perm=perm)
    if not replaced:
        return 0
    nodes = [replaced.get(node.output[0], node) if node.output else node for node in graph.node]
    del graph.node[:]
    graph.node.extend(extra + nodes)
    toposort(graph)  # the cache nodes land right after the angles they read
    live = _live(list(graph.node), {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(live)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    drop_unused_initializers(graph)
    return len(replaced)


def copy_value(value: Any, name: str) -> Any:
    out = type(value)()
    out.CopyFrom(value)
    out.name = name
    return out


def _caches(extra: list[Any], angles: str, scale: str | None, half: int, p: str) -> tuple[str, str, str]:
    """Nodes (appended to `extra`) for [batch * seq, half] cos / sin tables and positions 0 .. batch*seq - 1."""
    flat, zero, one, width = (_const(extra, f"{p}_flat", [-1, half]), _const(extra, f"{p}_zero", 0),
                              _const(extra, f"{p}_one", 1), _const(extra, f"{p}_half", half))
    out = {}
    for trig in ("Cos", "Sin"):
        t = f"{p}_{trig.lower()}"
        extra.append(helper.make_node(trig, [angles], [t], name=t))
        if scale is not None:
            extra.append(helper.make_node("Mul", [t, scale], [f"{t}_scaled"], name=f"{t}_scaled"))
            t = f"{t}_scaled"
        extra.append(helper.make_node("Reshape", [t, flat], [f"{t}_flat"], name=f"{t}_flat"))
        out[trig] = f"{t}_flat"
    extra += [
        helper.make_node("Shape", [angles], [f"{p}_bs"], name=f"{p}_bs", start=0, end=2),
        helper.make_node("Size", [angles], [f"{p}_size"], name=f"{p}_size"),
        helper.make_node("Div", [f"{p}_size", width], [f"{p}_rows"], name=f"{p}_rows"),
        helper.make_node("Range", [zero, f"{p}_rows", one], [f"{p}_range"], name=f"{p}_range"),
        helper.make_node("Reshape", [f"{p}_range", f"{p}_bs"], [f"{p}_pos"], name=f"{p}_pos"),
    ]
    return f"{p}_pos", out["Cos"], out["Sin"]


def _const(extra: list[Any], name: str, value: Any) -> str:
    tensor = numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)
    extra.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
    return name


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Drop nodes none of whose outputs are read (the traced rotary ops, now unused)."""
    used = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in used for o in node.output):
            keep.append(node)
            used.update(node.input)
    return keep[::-1]
