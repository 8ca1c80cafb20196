"""INT4 layers (`Int4Linear`) in ONNX: com.microsoft `MatMulNBits` with the quantize stage's own codes.

MatMulNBits (onnxruntime contrib op) takes B as uint8 [N, K / block, block / 2] (two codes per byte,
the even column in the low nibble), float scales [N, K / block] in A's dtype and, when asymmetric,
packed uint8 zero points [N, ceil(blocks / 2)]; without zero points the codes are read around 8. Our
signed codes q in [-8, 7] are stored as q + 8 (zero points as z + 8), so the graph's weight is
(q - z) * s, exactly the checkpoint's. `accuracy_level` picks the CPU kernel: 0/1 compute in float32
(what the quantize stage measured), 4 quantizes A to int8 per block on the fly (faster, not exact).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.export.portable import drop_unused_initializers
from compress.quant.int4 import Int4Linear

OFFSET = 8  # signed code -> MatMulNBits' unsigned nibble


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 pairs along the last axis (even index in the low nibble) of signed codes in [-8, 7]."""
    u = (codes.to(torch.int16) + OFFSET).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=OFFSET)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def matmulnbits_weights(m: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B [N, blocks, block/2], scales [N, blocks] float32, zero points [N, ceil(blocks/2)] or None)."""
    n, k, bs = m.out_features, m.in_features, m.group_size
    b = pack_nibbles(m.weight_int4.detach().reshape(n, k // bs, bs))
    zp = None if m.weight_zero_point is None else pack_nibbles(m.weight_zero_point.detach())
    return b.contiguous(), m.weight_scale.detach().float().contiguous(), zp


def _unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    both = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :cols].to(torch.int16) - OFFSET


def dequantize(b: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None, n: int, k: int,
               block: int) -> torch.Tensor:
    """The float32 weight [N, K] a MatMulNBits node computes with (for the torch reference of the op)."""
    q = _unpack(b, block).reshape(n, k).float()
    if zp is not None:
        q = q - _unpack(zp, k // block).float().repeat_interleave(block, dim=1)
    return q * scales.float().repeat_interleave(block, dim=1)


@torch.library.custom_op("compress::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None, n: int, k: int,
                 block: int, accuracy_level: int) -> torch.Tensor:
    """x @ W^T for a MatMulNBits weight (exported as com.microsoft MatMulNBits)."""
    return torch.matmul(x, dequantize(b, scales, zp, n, k, block).to(x.dtype).t())


@matmul_nbits.register_fake
def _(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None, n: int, k: int, block: int,
      accuracy_level: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _schema() -> Any:
    """ONNX Runtime's MatMulNBits contrib-op signature (onnx has no schema for com.microsoft ops)."""
    from onnx.defs import OpSchema

    ints = OpSchema.AttrType.INT
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("scales", "T1"),
                OpSchema.FormalParameter("zero_points", "T2", param_option=optional)],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float activations"),
                          ("T2", ["tensor(uint8)"], "packed 4-bit codes")],
        attributes=[OpSchema.Attribute("K", ints, "input features"),
                    OpSchema.Attribute("N", ints, "output features"),
                    OpSchema.Attribute("bits", ints, "bits per weight"),
                    OpSchema.Attribute("block_size", ints, "columns per scale"),
                    OpSchema.Attribute("accuracy_level", ints, "minimum compute precision of A")],
    )


def _matmul_nbits_onnx(x: Any, b: Any, scales: Any, zp: Any, n: int, k: int, block: int,
                       accuracy_level: int) -> Any:
    from onnxscript import values

    op = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", _schema())
    inputs = (x, b, scales) if zp is None else (x, b, scales, zp)
    return op(*inputs, K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)


class NBitsLinear(nn.Module):
    """Export-time stand-in for an `Int4Linear`: its codes, scales and zero points as one MatMulNBits."""

    def __init__(self, m: Int4Linear, accuracy_level: int = 0):
        super().__init__()
        b, scales, zp = matmulnbits_weights(m)
        self.register_buffer("weight_nbits", b)
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zero_points", zp)
        self.n, self.k, self.block, self.accuracy_level = m.out_features, m.in_features, m.group_size, accuracy_level
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        y = matmul_nbits(h, self.weight_nbits, self.weight_scales, self.weight_zero_points, self.n, self.k,
                         self.block, self.accuracy_level)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


TRANSLATIONS = {torch.ops.compress.matmul_nbits.default: _matmul_nbits_onnx}


# ---- TensorRT: the same codes as blocked DequantizeLinear (opset 21) -------------------------------------

QDQ_OPSET = 21  # DequantizeLinear with block_size and int4 inputs


def _unpack_b(b: Any, n: int, k: int) -> Any:
    """Signed int4 codes [N, K] (int8 numpy) from MatMulNBits' B."""
    import numpy as np

    low, high = (b & 0x0F).astype(np.int8), (b >> 4).astype(np.int8)
    return np.stack([low, high], axis=-1).reshape(n, -1)[:, :k] - OFFSET


def _int4_tensor(name: str, codes: Any) -> Any:
    """An ONNX INT4 initializer (two codes per byte, the first in the low nibble) from signed int8 codes."""
    import numpy as np
    from onnx import TensorProto

    flat = codes.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(codes.shape))
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    return t


def nbits_to_dequantize(proto: Any) -> int:
    """Rewrite every symmetric MatMulNBits node as DequantizeLinear(int4 [K, N], scales [K/block, N], axis 0,
    block_size) -> MatMul: the standard form TensorRT fuses into an INT4 weight-only GEMM (and ONNX Runtime
    turns back into MatMulNBits). Same codes and scales; the opset becomes 21. Returns the nodes rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 3 and node.input[3]:
            raise ValueError(f"{node.name}: INT4 with zero points has no TensorRT form (DequantizeLinear with a "
                             "non-zero zero point); quantize with int4.symmetric: true")
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        codes = _unpack_b(numpy_helper.to_array(inits[node.input[1]]), n, k)
        scales = numpy_helper.to_array(inits[node.input[2]])
        w_name, s_name = f"{node.name}_w_int4", f"{node.name}_w_scale"
        graph.initializer.append(_int4_tensor(w_name, np.ascontiguousarray(codes.T)))
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scales.T), s_name))
        dq = helper.make_node("DequantizeLinear", [w_name, s_name], [f"{node.name}_w"], name=f"{node.name}_dq",
                              axis=0, block_size=block)
        nodes += [dq, helper.make_node("MatMul", [node.input[0], dq.output[0]], list(node.output), name=node.name)]
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unused_initializers(graph)
        for opset in proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, QDQ_OPSET)
    return count


def export_to_dequantize(folder: Any) -> dict[str, int]:
    """`nbits_to_dequantize` on every graph of an export folder, in place; MatMulNBits nodes rewritten per graph."""
    from pathlib import Path

    import onnx

    from compress.export.files import read_meta, save_model

    folder = Path(folder)
    done: dict[str, int] = {}
    for name, file in read_meta(folder)["graphs"].items():
        proto = onnx.load(str(folder / file), load_external_data=True)
        count = nbits_to_dequantize(proto)
        if count:
            save_model(proto, folder / file)
            done[name] = count
    return done
