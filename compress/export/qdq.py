"""Carry the quantize stage's own quantization into the ONNX graphs, without recalibrating anything.

INT8 (`Int8Linear`): for the export each module is swapped for `QdqLinear`, which computes the same
thing with torch's `quantized_decomposed` ops; the dynamo exporter translates those to ONNX
QuantizeLinear / DequantizeLinear, so the graph holds, per module,

    x -> QuantizeLinear(input_scale, zp 0, int8) -> DequantizeLinear      (W8A8 only)
    weight: int8 initializer [in, out] -> DequantizeLinear(weight_scale, axis=1)           (per channel)
    MatMul(x_dq, w_dq) (+ bias)

with the module's exact scales. That is the standard QDQ form: ONNX Runtime's CPU provider rewrites
DQ -> MatMul (<- DQ) into integer kernels (MatMulIntegerToFloat / DynamicQuantizeMatMul /
QLinearMatMul) when the session is created. QuantizeLinear rounds half to even and saturates to
[-128, 127], which is exactly `compress.quant.int8.fake_quant`, so graph and torch share one grid.
The weight is stored transposed so DequantizeLinear feeds MatMul directly (no Transpose between them,
which would hide the pattern from ORT's QDQ fusions).

NF4 (bitsandbytes `Linear4bit`): swapped for `Bnb4Linear`, a torch custom op that the exporter
translates to com.microsoft `MatMulBnb4` (quant_type 1 = NF4). Its inputs are bnb's own packed 4-bit
codes and per-block absmax (double quantization resolved to float32), so the graph reproduces the
bnb weights bit for bit; nothing is re-quantized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed
from torch import nn

from compress.errors import ConfigError
from compress.export.portable import U8_ZERO
from compress.quant.int8 import ACT_QMAX, ACT_QMIN, Int8Linear, dynamic_scale
from compress.quant.observers import QMAX

NF4 = 1  # MatMulBnb4 quant_type: 0 = FP4, 1 = NF4
# bitsandbytes' NF4 code book (bnb.functional.get_4bit_type("nf4")); ORT's MatMulBnb4 uses the same table.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


# ---- INT8 ----------------------------------------------------------------------------------------------


@torch.library.custom_op("compress::matmul_integer", mutates_args=())
def matmul_integer(a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor, b_zero: torch.Tensor) -> torch.Tensor:
    """(a - a_zero) @ (b - b_zero) in int32, as ONNX MatMulInteger (a uint8 [..., K], b int8/uint8 [K, N])."""
    return (a.int() - a_zero.int()) @ (b.int() - b_zero.int())


@matmul_integer.register_fake
def _(a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor, b_zero: torch.Tensor) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


def _matmul_integer_onnx(a: Any, b: Any, a_zero: Any, b_zero: Any) -> Any:
    from onnxscript import opset18 as op

    return op.MatMulInteger(a, b, a_zero, b_zero)


class QdqLinear(nn.Module):
    """Export-time stand-in for an `Int8Linear`: same numbers, expressed as ops the exporter keeps.

    Static scales: Q/DQ pairs (ORT fuses them into integer GEMMs). Dynamic scales: the scale is computed
    in the graph (ReduceMax / 127.5, per token or per call), the input quantized to uint8 (+128) and fed
    with the int8 weight to ONNX MatMulInteger, then rescaled: ORT runs the integer GEMM directly.
    """

    def __init__(self, m: Int8Linear):
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self.per_channel = m.weight_scale.numel() > 1
        self.act_dynamic = m.act_dynamic
        self.register_buffer("a_zero", torch.tensor(U8_ZERO, dtype=torch.uint8))
        self.register_buffer("w_zero", torch.tensor(0, dtype=torch.int8))
        self.register_buffer("weight_int8", m.weight_int8.t().contiguous())  # [in, out]: MatMul's B
        self.register_buffer("weight_scale", m.weight_scale.detach().float().clone())
        self.input_scale = None if m.input_scale is None else float(m.input_scale)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        h = x.float()
        if self.act_dynamic is not None:
            return self._dynamic(h).to(x.dtype)
        # ORT turns a 2-D MatMul + bias into Gemm before its QDQ fusion (weights then dequantized on every
        # call): keep it 3-D, with the Unsqueeze ahead of the Q/DQ pair so each projection keeps its own copy.
        flat = h.dim() == 2
        if flat:
            h = h.unsqueeze(0)
        if self.input_scale is not None:
            q = qd.quantize_per_tensor(h, self.input_scale, 0, ACT_QMIN, ACT_QMAX, torch.int8)
            h = qd.dequantize_per_tensor(q, self.input_scale, 0, ACT_QMIN, ACT_QMAX, torch.int8)
        if self.per_channel:
            w = qd.dequantize_per_channel(self.weight_int8, self.weight_scale, None, 1, -QMAX, QMAX, torch.int8)
        else:
            w = qd.dequantize_per_tensor(self.weight_int8, float(self.weight_scale), 0, -QMAX, QMAX, torch.int8)
        y = torch.matmul(h, w)
        if flat:
            y = y.squeeze(0)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def _dynamic(self, h: torch.Tensor) -> torch.Tensor:
        scale = dynamic_scale(h, self.act_dynamic)
        a = (torch.round(h / scale).clamp(ACT_QMIN, ACT_QMAX) + U8_ZERO).to(torch.uint8)
        acc = matmul_integer(a, self.weight_int8, self.a_zero, self.w_zero)
        y = acc.float() * (scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y


# ---- NF4 -----------------------------------------------------------------------------------------------


def _unpack_nf4(packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, block_size: int) -> torch.Tensor:
    """bnb layout: W [n, k] row-major, two codes per byte (first in the high nibble), one absmax per block."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=-1).reshape(-1)[: n * k].long()
    table = torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device)
    w = table[codes].reshape(-1, block_size) * absmax.float().reshape(-1, 1)
    return w.reshape(n, k)


@torch.library.custom_op("compress::matmul_bnb4", mutates_args=())
def matmul_bnb4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int,
                block_size: int) -> torch.Tensor:
    """x @ W^T for an NF4 weight in bnb layout (exported as com.microsoft MatMulBnb4)."""
    w = _unpack_nf4(packed, absmax, n, k, block_size).to(x.dtype)
    return torch.matmul(x, w.t())


@matmul_bnb4.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, block_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _matmul_bnb4_schema() -> Any:
    """ONNX Runtime's MatMulBnb4 contrib-op signature (onnx has no schema for com.microsoft ops)."""
    from onnx.defs import OpSchema

    ints = OpSchema.AttrType.INT
    return OpSchema(
        "MatMulBnb4",
        "com.microsoft",
        1,
        inputs=[
            OpSchema.FormalParameter("A", "T1"),
            OpSchema.FormalParameter("B", "T2"),
            OpSchema.FormalParameter("absmax", "T1"),
        ],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float activations"),
            ("T2", ["tensor(uint8)"], "packed 4-bit codes"),
        ],
        attributes=[
            OpSchema.Attribute("K", ints, "input features"),
            OpSchema.Attribute("N", ints, "output features"),
            OpSchema.Attribute("block_size", ints, "elements per absmax"),
            OpSchema.Attribute("quant_type", ints, "0 FP4, 1 NF4"),
        ],
    )


def _matmul_bnb4_onnx(x: Any, packed: Any, absmax: Any, n: int, k: int, block_size: int) -> Any:
    from onnxscript import values

    op = values.Op(values.Opset("com.microsoft", 1), "MatMulBnb4", _matmul_bnb4_schema())
    return op(x, packed, absmax, K=k, N=n, block_size=block_size, quant_type=NF4)


def nf4_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(packed uint8 codes, float32 absmax per block, n=out, k=in, block_size) of a bnb NF4 Linear4bit."""
    import bitsandbytes as bnb

    state = layer.weight.quant_state
    if state is None or state.quant_type != "nf4":
        kind = getattr(state, "quant_type", None)
        raise ConfigError(f"only bitsandbytes NF4 layers can be exported, got quant_type={kind}")
    if getattr(state, "packing_format_for_cpu", False):
        raise ConfigError("this Linear4bit was repacked for bnb's AVX512-BF16 CPU kernel; reload the model and call "
                          "compress.quant.use_portable_nf4_kernel before running it, then export")
    n, k = (int(d) for d in state.shape)
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = layer.weight.data.reshape(-1).view(torch.uint8).contiguous()
    if packed.numel() != (n * k + 1) // 2:
        raise ConfigError(f"unexpected bnb packed size {packed.numel()} for a {n}x{k} NF4 weight")
    return packed, absmax.float().contiguous(), n, k, int(state.blocksize)


class Bnb4Linear(nn.Module):
    """Export-time stand-in for a bnb NF4 `Linear4bit`: bnb's own codes and absmax, one custom op."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        packed, absmax, n, k, block = nf4_weight(layer)
        self.register_buffer("weight_nf4", packed)
        self.register_buffer("weight_absmax", absmax)
        self.n, self.k, self.block_size = n, k, block
        self.compute_dtype = layer.compute_dtype or torch.float32
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.compute_dtype)
        y = matmul_bnb4(h, self.weight_nf4, self.weight_absmax, self.n, self.k, self.block_size)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return _unpack_nf4(self.weight_nf4, self.weight_absmax, self.n, self.k, self.block_size)


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A float nn.Linear holding exactly bnb's dequantized weight (the `quantize=False` export)."""
    import bitsandbytes as bnb

    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    dtype = layer.compute_dtype or torch.float32
    linear = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, dtype=dtype)
    linear.weight.data.copy_(w)
    if layer.bias is not None:
        linear.bias.data.copy_(layer.bias.detach())
    return linear.eval()


def _is_bnb4(m: nn.Module) -> bool:
    return type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(getattr(m, "weight", None),
                                                                                  "quant_state")


def custom_translations() -> dict[Any, Any]:
    from compress.export.nbits import TRANSLATIONS

    return {torch.ops.compress.matmul_bnb4.default: _matmul_bnb4_onnx,
            torch.ops.compress.matmul_integer.default: _matmul_integer_onnx, **TRANSLATIONS}


@contextlib.contextmanager
def export_modules(model: nn.Module, quantize: bool = True,
                   int4_accuracy_level: int = 0) -> Iterator[tuple[dict[str, Any], dict[Any, Any]]]:
    """Swap quantized modules for exportable stand-ins for the duration of an export; always restores.

    Yields (summary for the manifest, custom translation table for torch.onnx.export).
    `int4_accuracy_level` is MatMulNBits' accuracy_level for INT4 layers (0: float32 compute, 4: int8 A).
    """
    from compress.export.nbits import NBitsLinear
    from compress.quant.int4 import Int4Linear

    swaps: dict[str, tuple[nn.Module, nn.Module]] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            new = QdqLinear(m) if quantize else m
            onnx_form = ("QuantizeLinear/DequantizeLinear" if m.input_scale is not None
                         else "MatMulInteger (dynamic scales)" if m.act_dynamic else "DequantizeLinear")
            modules[name] = {"scheme": m.scheme, "activations": m.activations, "granularity": m.granularity,
                             "onnx": onnx_form if quantize else "float fake-quant ops"}
        elif isinstance(m, Int4Linear):
            new = NBitsLinear(m, int4_accuracy_level) if quantize else m
            modules[name] = {"scheme": "w4a16", "group_size": m.group_size, "symmetric": m.symmetric,
                             "onnx": f"com.microsoft.MatMulNBits (accuracy_level {int4_accuracy_level})"
                             if quantize else "float fake-quant ops"}
        elif _is_bnb4(m):
            new = Bnb4Linear(m) if quantize else dequantized_linear(m)
            state = m.weight.quant_state
            modules[name] = {"scheme": "nf4", "blocksize": int(state.blocksize),
                             "onnx": "com.microsoft.MatMulBnb4" if quantize else "float (dequantized NF4)"}
        else:
            continue
        if new is not m:
            swaps[name] = (m, new)
    for name, (_, new) in swaps.items():
        model.set_submodule(name, new)
    schemes: dict[str, int] = {}
    for info in modules.values():
        schemes[info["scheme"]] = schemes.get(info["scheme"], 0) + 1
    summary = {"carried": quantize, "schemes": schemes, "modules": modules} if modules else {}
    try:
        yield summary, custom_translations()
    finally:
        for name, (old, _) in swaps.items():
            model.set_submodule(name, old)


# ---- graph hygiene for ONNX Runtime's QDQ fusions -------------------------------------------------------

# ORT's CPU provider only turns DQ -> MatMul into MatMulIntegerToFloat when that Q -> DQ pair feeds this one
# MatMul; its common-subexpression pass would merge the per-consumer copies `unshare_qdq` makes again.
QDQ_SESSION_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)
# ORT fuses a weight-only DQ(int8) -> MatMul into an 8-bit MatMulNBits (block 32) at session load, computing
# at the accuracy level this session setting names (ORT's own default: 4). Level 4 quantizes the *activations*
# to int8 per block: W8A16 becomes W8A8, which on outlier activations costs accuracy (zoo:shapes-vqa-outliers:
# KL 8e-4 instead of 2.6e-6). Level 1 computes in fp32 from the int8 weights, the quantize stage's numbers,
# but onnxruntime 1.32's CPU kernel for 8 bits at level 1 is a reference loop: ~0.9 GB/s of weights against
# 26-33 at level 4 (benchmarks/bench_kernels.py), 384 vs 18 ms per decode step on the realistic decoder.
# The same setting covers every DQ -> MatMul ORT fuses into MatMulNBits (INT4 of a tensorrt-target export too).
NBITS_FUSION_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"


def weight_only_session_config(level: int) -> dict[str, str]:
    return {NBITS_FUSION_LEVEL_KEY: str(level)}


def same_fusion_kind(a: int | str, b: int | str) -> bool:
    """Whether two MatMulNBits accuracy levels compute alike (0 and 1 both in float32): one session setting
    can then serve layers asking for either."""
    kind = lambda v: "float" if str(v) in ("0", "1") else str(v)  # noqa: E731
    return kind(a) == kind(b)


def unshare_qdq(proto: Any) -> int:
    """Give every consumer of an activation Q -> DQ pair its own copy of the pair. Returns copies made.

    Both the exporter's and the fusion passes' common-subexpression elimination merge the identical
    QuantizeLinear of q/k/v (or gate/up) projections, which read one input with one scale. The copies
    keep the numbers identical and let ORT fuse each projection into an integer MatMul.
    """
    import copy

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    new_nodes: list[Any] = []
    used_q: set[str] = set()
    copies = 0
    for node in graph.node:
        new_nodes.append(node)
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if q is None or q.op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        for k, user in enumerate(users):
            if k == 0 and q.output[0] not in used_q:
                used_q.add(q.output[0])
                continue
            copies += 1
            q2, dq2 = copy.deepcopy(q), copy.deepcopy(node)
            q2.name, dq2.name = f"{q.name}_u{copies}", f"{node.name}_u{copies}"
            q2.output[0] = f"{q.output[0]}_u{copies}"
            dq2.input[0], dq2.output[0] = q2.output[0], f"{node.output[0]}_u{copies}"
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = dq2.output[0]
            new_nodes += [q2, dq2]  # right after the original DQ: its inputs exist, its user comes later
    if copies:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return copies
