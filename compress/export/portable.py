"""INT8 graphs that give the same answers on every x86 CPU, and the arithmetic that proves it.

Root cause of the non-VNNI failures: on x86, ONNX Runtime rewrites int8 activation Q/DQ pairs to
uint8 (+128 zero point) before fusing DQ -> MatMul <- DQ into `MatMulIntegerToFloat`, so our
symmetric S8 x S8 projections run as U8 x S8. MLAS's U8S8 kernels for AVX2 and AVX-512 without VNNI
use `vpmaddubsw`, which adds each pair of u8*s8 products into a *saturating int16*: any pair with
|a0*b0 + a1*b1| > 32767 is clipped (255 * 127 * 2 = 64770). VNNI (`vpdpbusd`), AMX and the U8U8
kernels (int16 widening + `vpmaddwd`) accumulate in int32 and are exact. Two remedies keep the graph's
numbers identical on every host:

- `u8u8` (export default, `int8_kernels: portable`): store the int8 weight as uint8 with zero point
  128 (the same grid, shifted) and quantize the activation to uint8 with zero point 128. ORT then
  fuses U8 x U8, which MLAS never saturates. Values are unchanged; prefill is slower on VNNI hosts.
- `s7` (quantize stage `weights.reduce_range: true`): weights in [-64, 64], for which no pair can
  reach 32767 (255 * 64 * 2 = 32640), so the fast U8S8 kernels are exact; costs one bit of weight.

`int8_kernels: vnni` keeps S8 weights that are not S7-safe: fastest on VNNI/AMX hosts, and the
export records that it needs one (the runner then asks ORT for U8U8 on hosts without VNNI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from compress.errors import ConfigError

Int8Kernels = Literal["portable", "vnni"]
S7_MAX = 64  # |b| <= 64: no u8 x s8 pair can saturate int16 (2 * 255 * 64 = 32640)
U8_ZERO = 128


def s7_safe(weight_int8: np.ndarray) -> bool:
    """True when every weight fits [-64, 64], so the U8S8 kernels cannot saturate on any CPU."""
    return bool(np.abs(weight_int8.astype(np.int16)).max(initial=0) <= S7_MAX)


def u8s8_non_vnni(a_u8: np.ndarray, b_s8: np.ndarray) -> np.ndarray:
    """A @ B as MLAS's AVX2 / AVX-512 (no VNNI) U8S8 kernel computes it: pairs along K summed in int16, saturated.

    `vpmaddubsw` multiplies bytes of A (u8) and B (s8) and adds adjacent pairs (k, k+1) into int16 with
    saturation; `vpmaddwd` by 1 then sums the pairs exactly in int32. A: [M, K] uint8, B: [K, N] int8.
    """
    a = a_u8.astype(np.int32)
    b = b_s8.astype(np.int32)
    k = a.shape[1]
    if k % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    even = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]  # [M, K/2, N]
    return np.clip(even, -32768, 32767).sum(axis=1)


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def make_portable(proto: Any, mode: Int8Kernels = "portable") -> dict[str, int]:
    """Rewrite W8A8 projections whose int8 weights are not S7-safe to U8 x U8 (mode `portable`). In place.

    A projection is `MatMul(DQ(Q(x, s, zp int8)), DQ(W int8 initializer, w_scale))`. The rewrite adds
    128 to W (uint8, zero point 128) and gives the activation pair a uint8 zero point of 128: the
    dequantized values are bit-identical. Returns counts per kind for the manifest.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = _initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    counts = {"u8u8": 0, "s8_s7_safe": 0, "s8_needs_vnni": 0, "weight_only": 0}
    u8_zp = "compress_u8_zero_point_128"
    retyped: set[str] = set()
    for node in list(graph.node):
        if node.op_type == "MatMulInteger":  # dynamic activations: uint8 (+128) A from the graph itself
            counts[_integer_gemm(graph, inits, node, mode)] += 1
            continue
        if node.op_type != "MatMul":
            continue
        act_dq, w_dq = (producer.get(i) for i in node.input)
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in inits:
            continue
        w_init = inits[w_dq.input[0]]
        if w_init.data_type != TensorProto.INT8:
            continue
        q = producer.get(act_dq.input[0]) if act_dq is not None and act_dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            counts["weight_only"] += 1  # float activations: ORT keeps a float MatMul, nothing can saturate
            continue
        w = numpy_helper.to_array(w_init)
        if s7_safe(w):
            counts["s8_s7_safe"] += 1
            continue
        if mode == "vnni":
            counts["s8_needs_vnni"] += 1
            continue
        scale = numpy_helper.to_array(inits[w_dq.input[1]])
        w_dq.input[0], zp_name = _u8_weight(graph, inits, w_init.name, w, scale.shape)
        while len(w_dq.input) < 3:
            w_dq.input.append("")
        w_dq.input[2] = zp_name
        if u8_zp not in inits:
            zp = numpy_helper.from_array(np.array(U8_ZERO, np.uint8), u8_zp)
            graph.initializer.append(zp)
            inits[u8_zp] = zp
        for qdq in (q, act_dq):
            while len(qdq.input) < 3:
                qdq.input.append("")
            qdq.input[2] = u8_zp
        retyped.add(q.output[0])
        counts["u8u8"] += 1
    if retyped:  # declared int8 types of the re-typed activations are stale now
        keep = [v for v in graph.value_info if v.name not in retyped]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    drop_unused_initializers(graph)
    return counts


def _integer_gemm(graph: Any, inits: dict[str, Any], node: Any, mode: Int8Kernels) -> str:
    """MatMulInteger(A u8, W int8): W to uint8 with zero point 128 unless S7-safe (or mode vnni)."""
    from onnx import TensorProto, numpy_helper

    w_init = inits.get(node.input[1])
    if w_init is None or w_init.data_type != TensorProto.INT8:
        return "u8u8" if w_init is not None else "weight_only"
    w = numpy_helper.to_array(w_init)
    if s7_safe(w):
        return "s8_s7_safe"
    if mode == "vnni":
        return "s8_needs_vnni"
    while len(node.input) < 4:
        node.input.append("")
    node.input[1], node.input[3] = _u8_weight(graph, inits, w_init.name, w, ())
    return "u8u8"


def _u8_weight(graph: Any, inits: dict[str, Any], name: str, w: np.ndarray,
               zp_shape: tuple[int, ...]) -> tuple[str, str]:
    """Add `w` + 128 as a uint8 initializer and its zero point of 128 (shaped like the scales); their names."""
    from onnx import numpy_helper

    new_w = numpy_helper.from_array((w.astype(np.int16) + U8_ZERO).astype(np.uint8), f"{name}_u8")
    new_zp = numpy_helper.from_array(np.full(zp_shape, U8_ZERO, np.uint8), f"{name}_u8_zero_point")
    graph.initializer.extend([new_w, new_zp])
    inits[new_w.name], inits[new_zp.name] = new_w, new_zp
    return new_w.name, new_zp.name


def drop_unused_initializers(graph: Any) -> None:
    """Remove the initializers no node and no graph output reads (after a rewrite replaced their readers)."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def toposort(graph: Any) -> None:
    """Re-order the nodes so each comes after what it reads (a rewrite appended or prepended new ones)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(x in ready for x in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ConfigError(f"graph {graph.name}: nodes whose inputs are never produced: {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def saturation_hazards(optimized_graph: Any) -> list[dict[str, Any]]:
    """Integer GEMMs of an ORT-optimized graph that the non-VNNI U8S8 kernels could saturate.

    Reads what ONNX Runtime will actually run (after its S8 -> U8 rewrite): every MatMulIntegerToFloat /
    MatMulInteger / DynamicQuantizeMatMul with a uint8 A and an int8 B initializer that is not S7-safe.
    Host-independent: the optimized graph is the same on every x86 CPU.
    """
    from onnx import TensorProto, numpy_helper

    graph = optimized_graph.graph
    inits = _initializers(graph)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    producer = {out: node for node in graph.node for out in node.output}
    hazards = []
    for node in graph.node:
        if node.op_type not in ("MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul"):
            continue
        a, b = node.input[0], node.input[1]
        if b not in inits or inits[b].data_type != TensorProto.INT8:
            continue
        a_type = types.get(a)
        if a_type is None and a in producer and producer[a].op_type == "QuantizeLinear":
            zp = producer[a].input[2] if len(producer[a].input) > 2 else ""
            a_type = inits[zp].data_type if zp in inits else TensorProto.UINT8
        if node.op_type != "DynamicQuantizeMatMul" and a_type != TensorProto.UINT8:
            continue
        w = numpy_helper.to_array(inits[b])
        if not s7_safe(w):
            hazards.append({"node": node.name, "op": node.op_type, "weight": b,
                            "max_abs_weight": int(np.abs(w.astype(np.int16)).max())})
    return hazards


def ort_optimized(path: str | Path, disabled_optimizers: list[str] | tuple[str, ...] = (),
                  providers: list[Any] | None = None) -> Any:
    """The graph ONNX Runtime runs, at ORT_ENABLE_EXTENDED: where QDQ fuses, and the highest level whose
    saved graph is not hardware-specific (so it is the same on every x86 CPU)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory(prefix="ort-opt-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled_optimizers))
        return onnx.load(options.optimized_model_filepath)


def portable_export(out_dir: str | Path, mode: Int8Kernels = "portable") -> dict[str, Any]:
    """Apply `make_portable` to every graph of an export folder; record the counts in export.json."""
    import onnx

    from compress.export.files import read_meta, save_model, write_meta

    out = Path(out_dir)
    meta = read_meta(out)
    graphs: dict[str, dict[str, int]] = {}
    for name, file in meta["graphs"].items():
        if name == "embed":
            continue
        proto = onnx.load(str(out / file))
        graphs[name] = make_portable(proto, mode)
        if graphs[name]["u8u8"]:
            save_model(proto, out / file)
    needs_vnni = sum(c["s8_needs_vnni"] for c in graphs.values())
    record = {"mode": mode, "graphs": graphs,
              # Hosts whose U8S8 kernels are exact; elsewhere the runner asks ORT for U8U8 kernels.
              "requires": "u8s8_exact (AVX-512 VNNI, AVX-VNNI, AMX or ARM64)" if needs_vnni else None}
    meta["int8_kernels"] = record
    write_meta(out, meta)
    return record
