"""Drop shape round trips: a Reshape whose output has exactly the shape of the tensor a chain of views
started from.

The traced decoder splits each projection into heads ([batch, seq, heads * d] -> [batch, seq, heads, d],
often with a head Transpose) and the fused ops take the flat tensor back (GroupQueryAttention reads
[batch, seq, heads * d]; so does the layer's output projection). After fusion these views cancel, but
ONNX Runtime merges neither Reshape pairs nor Reshape -> Transpose -> Transpose -> Reshape chains: on
the realistic INT4 decoder they were 195 of 630 nodes run per decode step. A Reshape B is replaced by
the source X when B reads X through one Reshape and any number of Transposes that compose to the
identity, every intermediate read by that chain alone, and the recorded shapes of X and B's output are
the same (static sizes or the exporter's symbolic dimension names).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from onnx import helper


def _dims(value: Any) -> tuple[Any, ...] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim)
    return dims if all(d not in (None, "", 0) for d in dims) else None


def _source(node: Any, producers: dict[str, Any], uses: Counter) -> tuple[str, list[Any]] | None:
    """(X, the chain's nodes) when `node` (a Reshape) reads Reshape(X) through Transposes composing to the
    identity, each read by the chain alone."""
    perms: list[list[int]] = []
    chain = [node]
    cur = producers.get(node.input[0])
    while cur is not None and cur.op_type == "Transpose" and uses[cur.output[0]] == 1:
        perms.append(next(list(helper.get_attribute_value(a)) for a in cur.attribute if a.name == "perm"))
        chain.append(cur)
        cur = producers.get(cur.input[0])
    if cur is None or cur.op_type != "Reshape" or uses[cur.output[0]] != 1:
        return None
    order = list(range(len(perms[0]))) if perms else []
    for perm in reversed(perms):  # applied first to last: y = x.transpose(p1).transpose(p2)...
        order = [order[p] for p in perm]
    return (cur.input[0], [*chain, cur]) if order == sorted(order) else None


def cancel_views(proto: Any) -> int:
    """Bypass every such Reshape in `proto` (in place) and drop its chain; returns how many."""
    graph = proto.graph
    shapes = {v.name: _dims(v) for v in [*graph.input, *graph.value_info]}
    producers = {o: n for n in graph.node for o in n.output}
    uses = Counter(i for n in graph.node for i in n.input)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or node.output[0] in outputs:
            continue
        target = shapes.get(node.output[0])
        found = _source(node, producers, uses) if target is not None else None
        if found is not None and shapes.get(found[0]) == target and not dropped & {id(n) for n in found[1]}:
            rename[node.output[0]] = found[0]
            dropped.update(id(n) for n in found[1])
    if not rename:
        return 0
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    del graph.node[:]
    graph.node.extend(kept)
    return len(rename)
