"""The export folder on disk: graph files, `export.json`, sizes. No torch, no tracing.

Shared by the exporter, the fusion passes, the portability pass and the runner, so none of them
imports another to read or write a folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compress.errors import ConfigError

FORMAT = "compress-onnx"
# 2: image features as rows [tokens, hidden], written over the image tokens by the embed graph; decoders
# whose logits_index is optional. Version 1 folders (the runner scattered 3-D features) are re-exported.
FORMAT_VERSION = 2
META_FILE = "export.json"
# prefill: an INT4 export's optional second decoder for prompts (compress.export.prefill)
GRAPH_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx", "prefill": "prefill.onnx"}
BIG_MODEL_BYTES = 1_800_000_000  # above this, weights go to external data (protobuf's 2 GB limit)


def save_model(proto: Any, path: Path) -> list[Path]:
    """Save one graph; weights go to `<name>.data` only when the model is too large for one protobuf."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    external = proto.ByteSize() > BIG_MODEL_BYTES if _fits(proto) else True
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data] if external else [path]


def _fits(proto: Any) -> bool:
    try:
        proto.ByteSize()
    except ValueError:  # protobuf refuses to measure > 2 GB
        return False
    return True


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (ints or symbolic names) and dtypes of a saved graph's inputs and outputs."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))})
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def describe_files(out_dir: str | Path) -> dict[str, Any]:
    """Record each graph's inputs/outputs and every file's size in export.json; returns the manifest."""
    out = Path(out_dir)
    meta = read_meta(out)
    meta["io"] = {name: graph_io(out / file) for name, file in meta["graphs"].items()}
    names = [f for file in meta["graphs"].values() for f in (file, file + ".data") if (out / f).is_file()]
    meta["sizes"] = {f: (out / f).stat().st_size for f in names}
    write_meta(out, meta)
    return meta


def write_meta(out_dir: str | Path, meta: dict[str, Any]) -> Path:
    path = Path(out_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # a kill mid-write leaves the old export.json, never half of one
    return path


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """The export manifest; a ConfigError says what is missing or wrong."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(f"'{out_dir}' is not an ONNX export folder: {META_FILE} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a {FORMAT} manifest (format={meta.get('format')!r})")
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version {version} is newer than this toolkit reads")
    if version < FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version {version} is older than this toolkit runs ({FORMAT_VERSION}: the "
                          "embed graph writes the image features); export the checkpoint again")
    for name, file in meta.get("graphs", {}).items():
        if not (Path(out_dir) / file).is_file():
            raise ConfigError(f"{path}: graph '{name}' ({file}) is missing")
    return meta


def copy_export(src: str | Path, dst: str | Path) -> Path:
    """Copy an export folder (e.g. to fuse a copy while keeping the unfused graphs)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
