"""What bounds a batch-1 decode step on this CPU: ONNX Runtime's kernels alone, against the copy bandwidth.

    python benchmarks/bench_kernels.py [--layers 24] [--out benchmarks/results]

The decode-floor bar (a step within 1.5x of weight bytes / copy bandwidth) is a property of two kernels more
than of our graphs, so they are timed here without any graph of ours around them, in one process:

- bandwidth: `compress.bench.floor.memory_bandwidth` (the STREAM-style copy the floor divides by) and a read-only
  `torch.sum` over the same 512 MiB, both on the runtimes' two threads;
- projections: one ONNX graph of the realistic LLaVA decoder's GEMMs at batch 1 (per layer a packed q/k/v
  1024x2048, o 1024x1024, packed gate/up 1024x5632, down 2816x1024; `--layers` of them, far beyond the L3
  cache), each reading the step's activation row: INT4 `MatMulNBits` at block 32 / 128 / 256 and accuracy
  levels 4 and 1, INT8 per-channel `DynamicQuantizeMatMul` (the int8 GEMV kernel ORT's fused int8
  graphs run), and the 8-bit block-32 `MatMulNBits` ORT makes of a weight-only INT8 (W8A16) projection, at
  levels 4 and 1 (`w8a16_accuracy_level`). Reported as weight GB/s and as a multiple of the copy floor;
- scaling: the copy and the INT4 block-128 projections on one thread and on two, and the same weight bytes as
  one GEMV of the full width (what the kernel streams once per-op costs are gone): whether a second core
  buys the kernel what it buys the copy;
- attention: `GroupQueryAttention` for one new token over a past of 64 / 240 / 1000 positions, the cache
  bound as a shared past/present buffer as `OrtRunner` does, microseconds per layer (the cache of all
  layers fits this host's L3 here, so this is the kernel's best case).

Random weights: speed depends on shapes and kernels. Median of 30 runs after 3 warm-ups. Host noise moves
single numbers by 10-30% between minutes on shared machines: read the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from compress.bench.timing import median_ms

SHAPES = ((1024, 2048), (1024, 1024), (1024, 5632), (2816, 1024))  # (K, N) per layer
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 64
WARMUP, RUNS = 3, 30
rng = np.random.default_rng(0)


def _session(model: Any, threads: int = 2) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def projections(layers: int, kind: str, block: int = 128, level: int = 4,
                shapes: tuple[tuple[int, int], ...] = SHAPES) -> tuple[Any, int]:
    """A graph of `layers` x `shapes` batch-1 GEMMs (4- or 8-bit MatMulNBits, or INT8 DynamicQuantizeMatMul)
    and its weight bytes."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, nbytes = [], [], 0
    for layer in range(layers):
        for j, (k, n) in enumerate(shapes):
            name = f"{layer}_{j}"
            x = "x_wide" if k != 1024 else "x"
            if kind in ("int4", "nbits8"):
                bits = 4 if kind == "int4" else 8
                weights = [rng.integers(0, 255, (n, k // block, block * bits // 8), dtype=np.uint8),
                           rng.random(n * (k // block), dtype=np.float32) * 0.01]
                node = helper.make_node("MatMulNBits", [x, f"B{name}", f"s{name}"], [f"y{name}"],
                                        domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                        accuracy_level=level)
            else:
                weights = [rng.integers(-63, 63, (k, n), dtype=np.int8), rng.random(n, dtype=np.float32) * 0.01]
                node = helper.make_node("DynamicQuantizeMatMul", [x, f"B{name}", f"s{name}"], [f"y{name}"],
                                        domain="com.microsoft")
            inits += [numpy_helper.from_array(w, f"{p}{name}") for w, p in zip(weights, ("B", "s"), strict=True)]
            nbytes += sum(w.nbytes for w in weights)
            nodes.append(node)
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, k]) for name, k in (("x", 1024),
                                                                                           ("x_wide", 2816))]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    graph = helper.make_graph(nodes, "projections", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), nbytes


def time_projections(layers: int) -> list[dict[str, Any]]:
    feeds = {name: rng.standard_normal((1, k), dtype=np.float32) for name, k in (("x", 1024), ("x_wide", 2816))}
    rows = []
    for kind, block, level in (("int4", 32, 4), ("int4", 128, 4), ("int4", 256, 4), ("int4", 128, 1),
                               ("int8", 0, 0), ("nbits8", 32, 4), ("nbits8", 32, 1)):
        model, nbytes = projections(layers, kind, block, level)
        session = _session(model)
        ms = median_ms(lambda s=session: s.run(None, feeds), WARMUP, RUNS)
        label = {"int4": f"INT4 MatMulNBits block {block} level {level}", "int8": "INT8 DynamicQuantizeMatMul",
                 "nbits8": f"8-bit MatMulNBits block {block} level {level} (W8A16 as ORT fuses it)"}[kind]
        rows.append({"kernel": label, "weights_mb": round(nbytes / 1e6, 1), "ms": round(ms, 2),
                     "weight_gb_s": round(nbytes / ms / 1e6, 1)})
        print(rows[-1], flush=True)
        del session
    return rows


def time_scaling(layers: int) -> list[dict[str, Any]]:
    """INT4 block-128 projections per layer and as one full-width GEMV of the same K=1024 bytes, and the copy,
    on 1 and 2 threads."""
    import torch

    from compress.bench.floor import memory_bandwidth

    feeds = {name: rng.standard_normal((1, k), dtype=np.float32) for name, k in (("x", 1024), ("x_wide", 2816))}
    width = sum(n for k, n in SHAPES if k == 1024) * layers
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row: dict[str, Any] = {"threads": threads, "copy_gb_s": memory_bandwidth()["copy_gb_s"]}
        for key, (count, shapes) in {"per_layer_gb_s": (layers, SHAPES),
                                     "one_gemv_gb_s": (1, ((1024, width),))}.items():
            model, nbytes = projections(count, "int4", 128, 4, shapes)
            session = _session(model, threads)
            row[key] = round(nbytes / median_ms(lambda s=session: s.run(None, feeds), WARMUP, RUNS) / 1e6, 1)
            del session
        rows.append(row)
        print(row, flush=True)
    torch.set_num_threads(2)
    return rows


def time_attention(layers: int) -> list[dict[str, Any]]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def info(name: str, shape: list[Any], kind: int = TensorProto.FLOAT) -> Any:
        return helper.make_tensor_value_info(name, kind, shape)

    inputs = [info("q", [1, 1, HEADS * HEAD_DIM]), info("k", [1, 1, KV_HEADS * HEAD_DIM]),
              info("v", [1, 1, KV_HEADS * HEAD_DIM]), info("seqlens_k", [1], TensorProto.INT32),
              info("total", [], TensorProto.INT32)]
    nodes, outputs = [], []
    for layer in range(layers):
        inputs += [info(f"past_{kv}{layer}", [1, KV_HEADS, "L", HEAD_DIM]) for kv in "kv"]
        out = [f"o{layer}", f"present_k{layer}", f"present_v{layer}"]
        nodes.append(helper.make_node("GroupQueryAttention", ["q", "k", "v", f"past_k{layer}", f"past_v{layer}",
                                                              "seqlens_k", "total"], out, domain="com.microsoft",
                                      num_heads=HEADS, kv_num_heads=KV_HEADS))
        outputs += [info(name, None) for name in out]
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = _session(model)
    rows = []
    for past in (64, 240, 1000):
        binding, buffers = session.io_binding(), []
        for name, width in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            binding.bind_cpu_input(name, rng.standard_normal((1, 1, width * HEAD_DIM), dtype=np.float32))
        binding.bind_cpu_input("seqlens_k", np.array([past], np.int32))
        binding.bind_cpu_input("total", np.array(past + 1, np.int32))
        for layer in range(layers):
            binding.bind_output(f"o{layer}")
            for kv in "kv":
                buffer = ort.OrtValue.ortvalue_from_numpy(
                    rng.standard_normal((1, KV_HEADS, past + 33, HEAD_DIM), dtype=np.float32))
                buffers.append(buffer)
                binding.bind_ortvalue_input(f"past_{kv}{layer}", buffer)
                binding.bind_ortvalue_output(f"present_{kv}{layer}", buffer)
        ms = median_ms(lambda b=binding: session.run_with_iobinding(b), WARMUP, RUNS)
        cache = 2 * KV_HEADS * (past + 1) * HEAD_DIM * 4
        rows.append({"past": past, "us_per_layer": round(ms * 1000 / layers, 1),
                     "cache_gb_s": round(cache * layers / ms / 1e6, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    import torch

    from compress.bench.floor import memory_bandwidth
    from compress.host import cpu_features

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    copy = memory_bandwidth()["copy_gb_s"]
    a = torch.ones(128 * 2**20)
    read = max(a.numel() * 4 / (median_ms(lambda: a.sum(), WARMUP, 5) / 1000) / 1e9 for _ in range(2))
    print(f"copy {copy} GB/s, read-only sum {read:.1f} GB/s", flush=True)
    report = {"host": cpu_features(), "copy_gb_s": copy, "read_gb_s": round(read, 1), "layers": args.layers,
              "projections": time_projections(args.layers),
              "scaling": time_scaling(args.layers), "attention": time_attention(args.layers),
              "copy_gb_s_after": memory_bandwidth()["copy_gb_s"]}
    # the floor divides by the faster copy: on a shared host the copy swings between minutes, the kernels less
    best = max(report["copy_gb_s"], report["copy_gb_s_after"])
    for row in report["projections"]:
        row["x_floor"] = round(row["ms"] / (row["weights_mb"] / best), 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(report, indent=1))
    lines = [f"Copy {report['copy_gb_s']} GB/s before, {report['copy_gb_s_after']} after (the floor: the faster); "
             f"read-only {report['read_gb_s']} GB/s.", "", "| kernel | weights MB | ms | weight GB/s | x copy floor |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['weights_mb']} | {r['ms']} | {r['weight_gb_s']} | {r['x_floor']} |"
              for r in report["projections"]]
    lines += ["", "| threads | copy GB/s | INT4 b128 per layer, weight GB/s | one full-width GEMV |",
              "|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['copy_gb_s']} | {r['per_layer_gb_s']} | {r['one_gemv_gb_s']} |"
              for r in report["scaling"]]
    lines += ["", "| GroupQueryAttention, past | us per layer | cache GB/s |", "|---|---|---|"]
    lines += [f"| {r['past']} | {r['us_per_layer']} | {r['cache_gb_s']} |" for r in report["attention"]]
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
