"""ONNX export: vision / embed / KV-cache decoder graphs, fusion, carried quantization, parity checks.

Run the result with `compress.runtime.ort_runner.OrtRunner.from_dir`. Needs the `onnx` extra
(onnx, onnxruntime) plus onnxscript for torch's dynamo exporter.
"""

from compress.export.files import GRAPH_FILES, META_FILE, copy_export, read_meta
from compress.export.fuse import count_ops, fuse_export, fuse_graph, runtime_ops
from compress.export.onnx import ExportResult, export_onnx
from compress.export.parity import ParityError, check_parity
from compress.export.wrappers import check_exportable

__all__ = [
    "GRAPH_FILES",
    "META_FILE",
    "ExportResult",
    "ParityError",
    "check_exportable",
    "check_parity",
    "copy_export",
    "count_ops",
    "export_onnx",
    "fuse_export",
    "fuse_graph",
    "read_meta",
    "runtime_ops",
]
