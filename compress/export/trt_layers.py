"""What TensorRT made of a graph, read from its VERBOSE build log (DETAILED profiling verbosity).

The engine inspector needs a deserialized engine, hence a GPU; the build log does not. Its `Layers:` message
lists every kernel with its tactic, input precisions and the ONNX nodes it absorbed: enough to say which
attention ran in an MHA kernel, which GEMMs read Int8 / Int4, and where each norm and rotary node went.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),")


def parse_layers(log: str) -> list[dict[str, Any]]:
    """Kernels from the `Layers:` build message: name, type, tactic, input dtypes, absorbed ONNX nodes."""
    block = log.split("Layers:\n", 1)
    if len(block) < 2:
        return []
    layers = []
    for line in block[1].splitlines():
        m = _LAYER.match(line)
        if not m:
            if layers and not line.startswith("Name:"):
                break
            continue
        tactic = re.search(r"TacticName: ([^,]*)", line)
        inputs = line.split("Inputs: ", 1)[1].split("], Outputs:", 1)[0] if "Inputs: " in line else ""
        layers.append({
            "name": m["name"],
            "type": m["type"],
            "tactic": tactic.group(1) if tactic else "",
            "input_dtypes": sorted(set(re.findall(r"Datatype: (\w+)", inputs))),
            "onnx_nodes": re.findall(r"\[ONNX Layer: ([^\]]*)\]", line),
        })
    return layers


# Source-graph ops whose fate the fusion summary reports: attention (opset-23 Attention or a decomposed
# Softmax), norms and rotary (opset 23 writes them as single ops; TensorRT fuses them into its own kernels).
TRACKED_OPS = ("Attention", "Softmax", "RMSNormalization", "LayerNormalization", "RotaryEmbedding")


def source_ops(path: Path) -> dict[str, str]:
    """ONNX node name -> op type for the tracked ops of a graph (weights not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {n.name: n.op_type for n in proto.graph.node if n.op_type in TRACKED_OPS}


def fusion_summary(layers: list[dict[str, Any]], ops: dict[str, str] | None = None) -> dict[str, Any]:
    """What TensorRT fused: attention kernels (and the Attention / Softmax nodes they absorbed), int8 / int4
    GEMMs, and where the tracked source ops (`ops`: node name -> op type) went."""
    ops = ops or {}
    attention = [lay for lay in layers if any(k in (lay["tactic"] + lay["name"]).lower() for k in ("mha", "attention"))]
    gemms = [lay for lay in layers if lay["type"].lower() == "gemm"]
    # TensorRT-RTX runs DequantizeLinear(int4) -> MatMul as a fused weight-only kernel (a `runtime_fusion`
    # such as ReplCastMulCastFc, not a `gemm` layer): count every kernel that reads Int4 weights for a MatMul.
    int4 = [lay for lay in layers if "Int4" in lay["input_dtypes"]
            and any("matmul" in n.lower() or "linear" in n.lower() for n in lay["onnx_nodes"])]
    in_attention = {n for lay in attention for n in lay["onnx_nodes"]}
    absorbed = {n for lay in layers for n in lay["onnx_nodes"]}
    return {
        "kernels": len(layers),
        "attention_kernels": len(attention),
        "attention_tactics": sorted({lay["tactic"].split("_0x")[0] for lay in attention}),
        "softmax_absorbed": sum(any("Softmax" in n for n in lay["onnx_nodes"]) for lay in attention),
        # opset-23 Attention nodes an attention kernel runs (each may serve the prefill and the decode profile)
        "attention_ops_in_mha": sum(op == "Attention" and name in in_attention for name, op in ops.items()),
        "source_ops": {op: {"nodes": sum(o == op for o in ops.values()),
                            "absorbed": sum(o == op and name in absorbed for name, o in ops.items())}
                       for op in TRACKED_OPS if op in ops.values()},
        "gemm": len(gemms),
        "int8_gemm": sum("Int8" in lay["input_dtypes"] for lay in gemms),
        "int4_gemm": len(int4),
        "onnx_nodes_absorbed": sum(len(lay["onnx_nodes"]) for lay in layers),
    }


def memory(log: str) -> dict[str, int]:
    """Weights and (largest) activation memory the builder reported, in bytes."""
    weights = re.findall(r"Total Weights Memory: (\d+) bytes", log)
    acts = [int(x) for x in re.findall(r"Total Activation Memory: (\d+) bytes", log)]
    return {"weights_bytes": int(weights[-1]) if weights else 0, "activation_bytes": max(acts) if acts else 0}
