"""Sibling projections merged into one GEMM + Split give the same outputs bit for bit, in ONNX Runtime itself:
INT4 MatMulNBits at both accuracy levels, W8A8 QDQ MatMuls (what ORT fuses into MatMulIntegerToFloat)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compress.export.fuse import runtime_ops
from compress.export.nbits import matmulnbits_weights
from compress.export.siblings import merge_nbits, merge_qdq
from compress.quant.int4 import Int4Linear


def _run(proto, feeds: dict[str, np.ndarray], outs: list[str]) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outs, feeds)


def _model(nodes: list, inputs: list[str], outs: list[str], inits: list, k: int = 256):
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", k])
                                                  for x in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _nbits_node(name: str, x: str, m: Int4Linear, level: int) -> tuple[object, list[object]]:
    b, scales, zp = matmulnbits_weights(m)
    inits = [helper.make_tensor(f"{name}_b", TensorProto.UINT8, list(b.shape), b.numpy().tobytes(), raw=True),
             helper.make_tensor(f"{name}_s", TensorProto.FLOAT, list(scales.shape), scales.numpy().ravel().tolist())]
    if zp is not None:
        inits.append(helper.make_tensor(f"{name}_z", TensorProto.UINT8, list(zp.shape), zp.numpy().tobytes(),
                                        raw=True))
    node = helper.make_node("MatMulNBits", [x, *(t.name for t in inits)], [name], name=name, domain="com.microsoft",
                            K=m.in_features, N=m.out_features, bits=4, block_size=m.group_size, accuracy_level=level)
    return node, inits


@pytest.mark.parametrize("level", [0, 4])
def test_sibling_matmulnbits_merge_into_one_with_the_same_outputs(level):
    """q/k/v-like siblings (one input, one block size) become one MatMulNBits + Split, bit for bit; a sibling
    with another block size, zero points or another input keeps its own node."""
    g = torch.Generator().manual_seed(3)

    def layer(out: int, group: int = 32, symmetric: bool = True) -> Int4Linear:
        linear = nn.Linear(256, out, bias=False)
        linear.weight.data.copy_(torch.randn(out, 256, generator=g) * 0.02)
        return Int4Linear.from_linear(linear, group, symmetric)

    specs = [("q", "A", layer(64)), ("k", "A", layer(32)), ("v", "A", layer(32)), ("g128", "A", layer(48, 128)),
             ("zp", "A", layer(16, 32, False)), ("zp2", "A", layer(16, 32, False)), ("other", "B", layer(40))]
    nodes, inits = [], []
    for name, x, m in specs:
        node, tensors = _nbits_node(name, x, m, level)
        nodes.append(node)
        inits += tensors
    relu = helper.make_node("Relu", ["q"], ["q_relu"])  # a consumer between the siblings, in graph order
    outs = ["q_relu", *(name for name, _, _ in specs[1:])]
    model = _model([nodes[0], relu, *nodes[1:]], ["A", "B"], outs, inits)
    feeds = {x: torch.randn(3, 256, generator=g).numpy() for x in "AB"}
    before = _run(model, feeds, outs)
    assert merge_nbits(model) == 3  # q/k/v -> 1 (2 away), zp/zp2 -> 1 (1 away); g128 and other stay
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("MatMulNBits") == 4 and kinds.count("Split") == 2
    for a, b in zip(before, _run(model, feeds, outs), strict=True):
        assert np.array_equal(a, b)


def _qdq_projection(name: str, x: str, w: np.ndarray, w_scale: np.ndarray, a_scale: float) -> tuple[list, list]:
    """MatMul(DQ(Q(x, a_scale)), DQ(int8 w [K, N], w_scale, axis 1)): an exported W8A8 projection."""
    inits = [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(w_scale, f"{name}_ws"),
             numpy_helper.from_array(np.array(a_scale, np.float32), f"{name}_as"),
             numpy_helper.from_array(np.array(0, np.int8), f"{name}_az")]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{name}_as", f"{name}_az"], [f"{name}_q"]),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_as", f"{name}_az"], [f"{name}_a"]),
             helper.make_node("DequantizeLinear", [f"{name}_w", f"{name}_ws"], [f"{name}_wf"], axis=1),
             helper.make_node("MatMul", [f"{name}_a", f"{name}_wf"], [name])]
    return nodes, inits


def test_sibling_qdq_projections_merge_into_one_integer_gemm(tmp_path):
    """Siblings quantizing one input with equal scales (names differ) merge, per-tensor weight scales included;
    a sibling with another activation scale keeps its own projection. ORT runs one MatMulIntegerToFloat per
    merged group and the outputs are bit-identical."""
    rng = np.random.default_rng(0)

    def weight(n: int) -> np.ndarray:
        return rng.integers(-127, 128, (256, n)).astype(np.int8)

    specs = [("q", weight(64), rng.uniform(1e-3, 2e-3, 64).astype(np.float32), 0.02),
             ("k", weight(32), rng.uniform(1e-3, 2e-3, 32).astype(np.float32), 0.02),
             ("v", weight(32), np.array(1.5e-3, np.float32), 0.02),  # per-tensor weight scale
             ("other_scale", weight(16), rng.uniform(1e-3, 2e-3, 16).astype(np.float32), 0.03)]
    nodes, inits = [], []
    for name, w, ws, a in specs:
        n, t = _qdq_projection(name, "A", w, ws, a)
        nodes += n
        inits += t
    outs = [name for name, *_ in specs]
    model = _model(nodes, ["A"], outs, inits)
    feeds = {"A": rng.normal(0, 1, (5, 256)).astype(np.float32)}
    before = _run(model, feeds, outs)
    assert merge_qdq(model) == 2
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("MatMul") == 2 and kinds.count("QuantizeLinear") == 2 and kinds.count("Split") == 1
    for a, b in zip(before, _run(model, feeds, outs), strict=True):
        assert np.array_equal(a, b)
    onnx.save(model, tmp_path / "merged.onnx")
    assert runtime_ops(tmp_path / "merged.onnx").get("MatMulIntegerToFloat") == 2
