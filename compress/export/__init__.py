"""ONNX export: vision / embed / KV-cache decoder graphs, fusion, carried quantization, parity checks.

`compress.export.onnx.export_onnx` writes an export folder; `compress.runtime.ort_runner.OrtRunner.from_dir`
runs it. This package file imports nothing, so the runtime (which reads the folder through
`compress.export.files` alone) loads without torch, onnx or the exporter. Exporting needs the `onnx`
extra (onnx, onnxruntime) plus onnxscript for torch's dynamo exporter.
"""
