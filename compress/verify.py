"""`vlm-compress verify RUN_DIR`: are the files in a run folder still the ones its manifest describes?

Run before deploying. Every file is re-hashed against the manifest's sha256 and size (missing, changed
and extra files listed), every kept checkpoint is loaded the way a stage would load it, and every ONNX
graph goes through `onnx.checker`. Engines are hashed only: deserializing one needs the GPU it targets.
Every kept folder goes through the deploy lint (`compress.lint`, report only: what a run fixed is fixed).
Where an export folder has a genai_config.json and onnxruntime-genai is installed, the folder generates
through it and through our runner on probe prompts (image and text-only), and the tokens are compared.
Nothing is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.artifacts import DONE, LOCK, MANIFEST, run_files, sha256_file
from compress.errors import CompressError, first_line
from compress.lint import describe, lint_folder


@dataclass
class Verification:
    run_dir: Path
    files: int = 0  # files the manifest lists
    checkpoints: int = 0
    graphs: int = 0
    engines: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, path, detail)
    genai: list[tuple[str, str]] = field(default_factory=list)  # (folder, what onnxruntime-genai did with it)
    lint: list[tuple[str, str]] = field(default_factory=list)  # (folder, a deploy-lint finding left unfixed)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def _listed(m: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str]:
    """The files the manifest vouches for; a run that never finished vouches only for its kept stages."""
    if "files" in m:
        return {f["path"]: f for f in m["files"]}, ""
    kept = {f["path"]: f for rec in m.get("stages", []) if rec["status"] in DONE for f in rec.get("files", [])}
    return kept, (f"the run did not finish (status {m.get('status')!r}): only its kept stages' files are on record "
                  "and checked; other files are not reported as extra")


def _check_lock(root: Path) -> None:
    import fcntl

    lock = root / LOCK
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read_text(errors="replace").strip() or "another process"
        raise CompressError(f"run folder {root} is being written by {holder}; verify it when that run ends") from None
    finally:
        os.close(fd)


def verify(run_dir: str | Path, load: bool = True) -> Verification:
    root = Path(run_dir).resolve()
    if not (root / MANIFEST).is_file():
        raise CompressError(f"{root} is not a run folder ({MANIFEST} missing)")
    _check_lock(root)
    try:
        m = json.loads((root / MANIFEST).read_text())
    except ValueError as e:
        raise CompressError(f"{root / MANIFEST} is not valid JSON: {e}") from e
    listed, note = _listed(m)
    v = Verification(root, files=len(listed), note=note)
    present = {e["path"]: e for e in _present(root)}
    for path, want in sorted(listed.items()):
        have = present.get(path)
        if have is None:
            v.problems.append(("missing", path, f"{want['bytes']} bytes on record"))
        elif have["bytes"] != want["bytes"]:
            v.problems.append(("changed", path, f"{have['bytes']} bytes, {want['bytes']} on record"))
        elif sha256_file(root / path) != want["sha256"]:
            v.problems.append(("changed", path, "sha256 differs from the manifest's"))
    if not note:
        v.problems += [("extra", path, "not in the manifest") for path in sorted(set(present) - set(listed))]
    for rec in m.get("stages", []):
        if rec["status"] not in DONE:
            continue
        if load and rec.get("checkpoint") and (root / rec["checkpoint"]).is_dir():
            v.checkpoints += 1
            _load(root / rec["checkpoint"], m, v)
        for rel in (rec.get("checkpoint"), rec.get("artifacts")):
            if rel and (root / rel).is_dir():
                v.lint += [(rel, describe(f)) for f in lint_folder(root / rel)]
        if rec.get("artifacts") and (root / rec["artifacts"]).is_dir():
            folder = root / rec["artifacts"]
            for graph in sorted(folder.rglob("*.onnx")):
                v.graphs += 1
                _check_graph(graph, root, v)
            v.engines += len(list(folder.rglob("*.engine")))
            if load and (folder / "genai_config.json").is_file():
                _check_genai(folder, v)
    return v


def _present(root: Path) -> list[dict[str, Any]]:
    return [{"path": str(p.relative_to(root)), "bytes": p.stat().st_size} for p in run_files(root)]


def _load(folder: Path, m: dict[str, Any], v: Verification) -> None:
    from compress.arch import adapter_for_source
    from compress.checkpoint import load_checkpoint

    model = m.get("model", {})
    try:
        adapter = adapter_for_source(str(folder))
        with contextlib.redirect_stderr(io.StringIO()):  # loaders' progress bars; a failure is reported below
            load_checkpoint(folder, adapter, model.get("dtype") or "float32")
    except Exception as e:  # any failure to load is the finding, whatever raised it
        v.problems.append(("load", str(folder.relative_to(v.run_dir)), first_line(e)))


def _check_genai(folder: Path, v: Verification) -> None:
    """onnxruntime-genai's greedy tokens against our runner's on three probe prompts (one at a time, as genai
    takes them unpadded): two with a random image, one without."""
    import importlib.util

    rel = str(folder.relative_to(v.run_dir))
    if importlib.util.find_spec("onnxruntime_genai") is None:
        v.genai.append((rel, "not run: onnxruntime-genai is not installed (pip install onnxruntime-genai)"))
        return
    try:
        import numpy as np
        from PIL import Image

        from compress.arch import get_adapter
        from compress.runs import load_runner, run_recipe
        from compress.runtime.genai_runner import GenaiRunner

        loaded, m = run_recipe(v.run_dir)
        adapter = get_adapter(m["model"]["model_type"])
        adapter.use_prompt(loaded.recipe.evaluation.prompt, "evaluation.prompt")  # prompts as the run built them
        # our runner as `eval` and `bench` load it: the folder's processor, prompts cut to a `tokens` reduction
        ours, processor = load_runner("onnx", str(folder), m["model"]["resolved"], adapter, None)
        rng = np.random.default_rng(0)
        h, w = ours.meta["pixel_shape"][-2:]
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(2)]
        probes = [adapter.build_inputs(processor, [image], ["what is in the picture?"]).inputs for image in images]
        text = adapter.format_prompt(processor, "what is in the picture?").replace(adapter.image_token, "")
        probes.append(dict(processor.tokenizer([text], return_tensors="np")))
        theirs = GenaiRunner(folder)
        same = sum(ours.generate(p, 16) == theirs.generate(p, 16) for p in probes)
    except Exception as e:  # any failure to run there is the finding, whatever raised it
        v.problems.append(("genai", rel, first_line(e)))
        return
    if same < len(probes):
        v.problems.append(("genai", rel, f"onnxruntime-genai's tokens differ from onnxruntime's on "
                                         f"{len(probes) - same} of {len(probes)} probe prompts"))
    v.genai.append((rel, f"runs in onnxruntime-genai: the same tokens as onnxruntime on {same} of {len(probes)} "
                         "probe prompts (2 with an image, 1 without)"))


def _check_graph(graph: Path, root: Path, v: Verification) -> None:
    """onnx.checker on the graph; ONNX Runtime's own ops in the default domain (SimplifiedLayerNormalization
    in fused graphs) are unknown to the checker, so they are checked as the custom ops they are."""
    import onnx

    try:
        proto = onnx.load(str(graph), load_external_data=False)
        ort_only = _ort_default_domain_ops()
        for node in _nodes(proto.graph):
            if node.domain in ("", "ai.onnx") and node.op_type in ort_only:
                node.domain = "com.microsoft"
        onnx.checker.check_model(proto)
        for init in proto.graph.initializer:  # external weights must exist beside the graph
            if init.data_location == onnx.TensorProto.EXTERNAL:
                location = next(e.value for e in init.external_data if e.key == "location")
                if not (graph.parent / location).is_file():
                    raise FileNotFoundError(f"external data {location} of {init.name} is missing")
    except Exception as e:  # onnx raises ValidationError, DecodeError or OSError depending on the damage
        v.problems.append(("onnx", str(graph.relative_to(root)), first_line(e)))


def _nodes(graph: Any) -> Any:
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def _ort_default_domain_ops() -> set[str]:
    import onnx
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    return {s.name for s in get_all_operator_schema() if s.domain == "" and not onnx.defs.has(s.name)}


def summary(v: Verification) -> str:
    lines = [f"verify {v.run_dir}: {'ok' if v.ok else 'FAILED'}"]
    if v.note:
        lines.append(f"  note: {v.note}")
    lines += [f"  {kind:<8} {path}: {detail}" for kind, path, detail in v.problems]
    lines += [f"  note     {path}: {what}" for path, what in v.genai]
    lines += [f"  lint     {path}: {what}" for path, what in v.lint]
    lines.append(f"  {v.files} files on record, {v.checkpoints} checkpoints loaded, {v.graphs} ONNX graphs checked"
                 + (f", {v.engines} engines hashed (running one needs its GPU)" if v.engines else ""))
    return "\n".join(lines)
