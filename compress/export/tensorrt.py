"""TensorRT engines from exported ONNX graphs, built ahead of time on a machine without a GPU.

`tensorrt` (the full package) is used when importable, else `tensorrt_rtx` (TensorRT for RTX, real
wheels on PyPI); their Python APIs are the same for this job. Networks are strongly typed: precision
comes from the graph's dtypes (fp16 graphs, int8 Q/DQ, int4 blocked DequantizeLinear), not from
builder flags. Building needs no GPU; deserializing or running an engine does.

What TensorRT made of a graph is read from the build log (`compress.export.trt_layers`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError, ConfigError
from compress.export.trt_layers import fusion_summary, memory, parse_layers, source_ops

BACKENDS = ("tensorrt", "tensorrt_rtx")
# Which graph becomes which engine file (TensorRT Edge-LLM's layout).
ENGINE_FILES = {"decoder": "llm.engine", "vision": "visual/visual.engine"}


class PreflightError(CompressError):
    """A graph TensorRT's parser rejects; `.rows` is the table (graph, node, op, reason)."""

    exit_code = 4

    def __init__(self, rows: list[dict[str, str]]):
        self.rows = rows
        table = "\n".join(f"  {r['graph']}: node {r['node']!r} ({r['op']}): {r['reason']}" for r in rows)
        super().__init__(f"TensorRT cannot parse {len(rows)} node(s); nothing was built:\n{table}")


def load_backend(name: str = "auto") -> tuple[Any, str]:
    """(module, backend name): `auto` prefers the full TensorRT, then TensorRT-RTX."""
    import importlib

    order = BACKENDS if name == "auto" else (name,)
    for candidate in order:
        try:
            return importlib.import_module(candidate), candidate
        except ImportError:
            continue
    hint = "pip install tensorrt-rtx (or vlm-compress[tensorrt])"
    raise ConfigError(f"TensorRT backend {name!r} is not installed: {hint}")


class _Log:
    """Collects every builder message; TensorRT calls `log` from its own threads."""

    def __init__(self, trt: Any):
        outer = self
        self.messages: list[tuple[int, str]] = []

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                outer.messages.append((int(severity), msg))

        self.logger = Logger()

    def text(self) -> str:
        return "\n".join(m for _, m in self.messages)


def _network(trt: Any, builder: Any) -> Any:
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags = 1 << int(strongly)
    return builder.create_network(flags)


def _parse(trt: Any, graph: str, path: Path) -> tuple[_Log, Any, Any, list[dict[str, str]]]:
    """(log, builder, network, rejected-node rows) for one graph; the caller keeps builder and network alive
    (the parser fills the network: it must outlive the parser, else a segfault)."""
    log = _Log(trt)
    builder = trt.Builder(log.logger)
    network = _network(trt, builder)
    parser = trt.OnnxParser(network, log.logger)
    rows = []
    if not parser.parse_from_file(str(path)):
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            reason = err.desc().split("\n")[-1].strip() or err.desc()
            rows.append({"graph": graph, "node": err.node_name(), "op": err.node_operator(), "reason": reason})
    return log, builder, network, rows


def _decomposable_attention(trt: Any, network: Any) -> int:
    """Let TensorRT decompose an opset-23 Attention it has no dedicated kernel for (fp32, odd head sizes)
    instead of failing the build; where a fused kernel exists it still takes it. Returns how many were marked."""
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if kind is not None and layer.type == kind:
            layer = layer if hasattr(layer, "attention") else _as(trt, layer, "IAttentionInputLayer")
            layer.attention.decomposable = True
            marked += 1
    return marked


def _as(trt: Any, layer: Any, cls: str) -> Any:
    layer.__class__ = getattr(trt, cls)  # the bindings hand out ILayer; TensorRT's samples downcast this way
    return layer


def preflight(trt: Any, graphs: dict[str, Path]) -> list[dict[str, str]]:
    """Parse every graph; one row per node the parser rejects (empty: all parse)."""
    return [row for name, path in graphs.items() for row in _parse(trt, name, path)[3]]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min / opt / max shape per input name."""

    name: str
    shapes: dict[str, tuple[list[int], list[int], list[int]]]


def _dims(shape: list[Any], values: dict[str, int], name: str) -> list[int]:
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d not in values:
            raise ConfigError(f"input {name!r}: no profile value for dynamic axis {d!r}")
        else:
            out.append(values[d])
    return out


def profiles_for(graph: str, io: list[dict[str, Any]], limits: Any, patches_per_token: int = 1,
                 tiles: int = 1) -> list[Profile]:
    """Profiles from the recipe's limits and the graph's input shapes (axis names from export.json).

    decoder: a prefill profile (past 0, up to max_prompt_tokens new) and a decode profile (one token, past up
    to max_prompt_tokens + max_new_tokens); Mllama's decoder also takes one image's `tiles` vision states per
    prompt (`vision_states` = batch * tiles); vision: up to max_batch * max_images images (Qwen2-VL: that many
    images of up to max_image_tokens tokens, as patches); embed: prompt ids.
    """
    b, p, n = limits.max_batch, limits.max_prompt_tokens, limits.max_new_tokens

    def build(name: str, lo: dict[str, int], opt: dict[str, int], hi: dict[str, int]) -> Profile:
        lo, opt, hi = ({**d, "tiles": tiles, "vision_states": d.get("batch", 1) * tiles} for d in (lo, opt, hi))
        return Profile(name, {i["name"]: (_dims(i["shape"], lo, i["name"]), _dims(i["shape"], opt, i["name"]),
                                          _dims(i["shape"], hi, i["name"])) for i in io})

    if graph == "decoder":
        prefill = build("prefill", {"batch": 1, "seq": 1, "past": 0, "total": 1},
                        {"batch": max(1, b // 2), "seq": max(1, p // 2), "past": 0, "total": max(1, p // 2)},
                        {"batch": b, "seq": p, "past": 0, "total": p})
        decode = build("decode", {"batch": 1, "seq": 1, "past": 1, "total": 2},
                       {"batch": max(1, b // 2), "seq": 1, "past": p, "total": p + 1},
                       {"batch": b, "seq": 1, "past": p + n, "total": p + n + 1})
        return [prefill, decode]
    if graph == "vision":
        images = b * limits.max_images
        most = images * limits.max_image_tokens * patches_per_token
        return [build("images", {"batch": 1, "patches": patches_per_token},
                      {"batch": max(1, images // 2), "patches": max(patches_per_token, most // 2 // patches_per_token
                                                                   * patches_per_token)},
                      {"batch": images, "patches": most})]
    total = p + n
    return [build("tokens", {"batch": 1, "seq": 1}, {"batch": max(1, b // 2), "seq": max(1, p // 2)},
                  {"batch": b, "seq": total})]


def _targets(trt: Any, config: Any, targets: list[str]) -> list[str]:
    """Set the compute capabilities to build for (TensorRT-RTX); the full TensorRT builds for the local GPU."""
    enum = getattr(trt, "ComputeCapability", None)
    if enum is None or not hasattr(config, "set_compute_capability"):
        return ["local GPU"]
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        config.set_compute_capability(getattr(enum, t.upper()), i)
    return targets


def build_engine(trt: Any, onnx_path: Path, profiles: list[Profile], targets: list[str],
                 engine_path: Path) -> dict[str, Any]:
    """Build and write one engine; returns what the manifest records about it."""
    log, builder, network, rows = _parse(trt, onnx_path.stem, onnx_path)
    if rows:
        raise PreflightError(rows)
    decomposable = _decomposable_attention(trt, network)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    built_for = _targets(trt, config, targets)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        errors = [m for sev, m in log.messages if sev <= int(trt.ILogger.Severity.ERROR)]
        raise CompressError(f"TensorRT could not build {onnx_path.name}: {'; '.join(errors[-3:]) or 'no message'}")
    data = bytes(serialized)
    tmp = engine_path.with_suffix(engine_path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(engine_path)
    layers = parse_layers(log.text())
    return {
        "engine": engine_path.name,
        "source": onnx_path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "build_s": round(seconds, 2),
        "targets": built_for,
        "profiles": {p.name: p.shapes for p in profiles},
        "memory": memory(log.text()),
        "fusion": {**fusion_summary(layers, source_ops(onnx_path)), "attention_decomposable": decomposable},
        "layers": layers,
        "log": log.text(),
    }


def build_all(trt: Any, graphs: dict[str, Path], io: dict[str, Any], limits: Any, targets: list[str], out: Path,
              engine_files: dict[str, str], patches_per_token: int = 1) -> dict[str, dict[str, Any]]:
    """One engine per graph into `out` (names from `engine_files`), build logs in build/, kernels in layers.json."""
    import json

    engines: dict[str, dict[str, Any]] = {}
    layers: dict[str, list[Any]] = {}
    (out / "build").mkdir(exist_ok=True)
    tiles = _tiles(io)
    for name, engine_file in engine_files.items():
        profiles = profiles_for(name, io[name]["inputs"], limits, patches_per_token, tiles)
        info = build_engine(trt, graphs[name], profiles, targets, out / engine_file)
        (out / "build" / f"{name}.log").write_text(info.pop("log"))
        layers[name] = info.pop("layers")
        info["onnx_weight_bytes"] = weight_bytes(graphs[name])
        engines[name] = info
    (out / "layers.json").write_text(json.dumps(layers, indent=1) + "\n")
    return engines


def _tiles(io: dict[str, Any]) -> int:
    """Vision states per image for a decoder that reads them (Mllama: the vision graph's fixed tile count)."""
    if not any("tiles" in i["shape"] for i in io["decoder"]["inputs"]):
        return 1
    pixels = io["vision"]["inputs"][0]["shape"]  # [batch, images, tiles, 3, H, W]
    if len(pixels) != 6 or not isinstance(pixels[2], int):
        raise ConfigError(f"the decoder reads tiled vision states but the vision input has shape {pixels}")
    return pixels[2]


def weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (what the engine must at least carry)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def rebuild(folder: Path, backend: str = "auto", targets: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Rebuild an engine stage folder's engines from its own onnx/ graphs and config.json limits, in place.

    For a host the build machine never saw: another TensorRT (the full package builds for the local GPU)
    or other compute capabilities. Returns the new engine records; config.json's builder section is updated.
    """
    import json
    from types import SimpleNamespace

    from compress.export.files import read_meta

    config_file = folder / "config.json"
    if not config_file.is_file() or not (folder / "onnx").is_dir():
        raise ConfigError(f"'{folder}' is not an engine stage folder (config.json and onnx/ expected)")
    config = json.loads(config_file.read_text())
    builder = config["builder"]
    limits = SimpleNamespace(**{k: builder[k] for k in ("max_batch", "max_prompt_tokens", "max_new_tokens",
                                                        "max_images")},
                             max_image_tokens=builder.get("max_image_tokens", 1))
    trt, name = load_backend(backend)
    chosen = list(targets or builder["compute_capabilities"])
    meta = read_meta(folder / "onnx")
    graphs = {g: folder / "onnx" / meta["graphs"][g] for g in ENGINE_FILES}
    rows = preflight(trt, graphs)
    if rows:
        raise PreflightError(rows)
    unit = (meta.get("vision_inputs") or {}).get("spatial_merge_size", 1) ** 2
    engines = build_all(trt, graphs, meta["io"], limits, chosen, folder, ENGINE_FILES, patches_per_token=unit)
    # what the engines were built for: the chosen targets (TensorRT-RTX) or ["local GPU"] (the full TensorRT)
    built_for = next(iter(engines.values()))["targets"]
    builder.update(backend=name, version=trt.__version__, compute_capabilities=built_for)
    for path in (config_file, folder / "visual" / "config.json"):
        doc = json.loads(path.read_text())
        doc["builder"] = builder
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    return engines


if __name__ == "__main__":  # python -m compress.export.tensorrt FOLDER [--backend B] [--targets sm86 ...]
    import argparse
    import sys

    p = argparse.ArgumentParser(description="rebuild an engine stage folder's engines for this host")
    p.add_argument("folder", type=Path)
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    p.add_argument("--targets", nargs="+", help="compute capabilities (TensorRT-RTX), e.g. sm86 sm120")
    a = p.parse_args()
    try:
        built = rebuild(a.folder, a.backend, a.targets)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    for g, e in built.items():
        print(f"{g}: {e['engine']} {e['bytes']:,} bytes for {', '.join(e['targets'])} in {e['build_s']} s")
