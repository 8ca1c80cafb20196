"""Run folders read back: the manifest, its stage records, the recipe the run kept, and the artifacts a run
(or any model / export folder) holds, with the runner that answers through each.

The pipeline writes run folders (`compress.artifacts.RunDir`); `bench`, `eval` and `verify` only read them,
and read them here, so a manifest field is interpreted in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.artifacts import KEPT, MANIFEST
from compress.errors import CompressError, ConfigError


@dataclass(frozen=True)
class StageRecord:
    """One stage as the manifest records it (the fields readers use; `raw` keeps the rest)."""

    name: str
    type: str
    status: str
    checkpoint: str | None
    artifacts: str | None
    raw: dict[str, Any]

    @classmethod
    def from_manifest(cls, rec: dict[str, Any]) -> StageRecord:
        return cls(rec["name"], rec.get("type", ""), rec["status"], rec.get("checkpoint"), rec.get("artifacts"), rec)

    @property
    def kept(self) -> bool:
        """Its outputs are part of the run (completed, or let through by `on_fail: warn`)."""
        return self.status in KEPT


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise CompressError(f"{run_dir} is not a run folder (no {MANIFEST})")
    return json.loads(path.read_text())


def stage_records(manifest: dict[str, Any]) -> list[StageRecord]:
    return [StageRecord.from_manifest(rec) for rec in manifest.get("stages", [])]


def run_recipe(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """(the run's LoadedRecipe, its manifest): the recipe text the run kept, resolved where it was written
    (relative data paths resolve against the recipe's own folder)."""
    from compress.recipe import parse_recipe

    m = read_manifest(run_dir)
    where = Path(m.get("recipe", {}).get("path") or run_dir / "recipe.yaml")
    return parse_recipe((run_dir / "recipe.yaml").read_text(encoding="utf-8"), where), m


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass(frozen=True)
class Artifact:
    """Something that answers questions: a transformers folder run in PyTorch ("torch") or an ONNX export
    folder run in ONNX Runtime ("onnx")."""

    name: str
    kind: str  # "torch" | "onnx"
    path: str
    model_type: str

    @property
    def bytes(self) -> int:
        return dir_bytes(Path(self.path))


def identify(path: str | Path) -> Artifact:
    """What PATH is, from its files alone (nothing heavy is loaded)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"'{path}' is not a folder (expected a transformers model folder or an ONNX export folder)")
    if (p / "export.json").is_file():
        from compress.export.files import read_meta

        return Artifact(p.name, "onnx", str(p), read_meta(p)["model_type"])
    if (p / "config.json").is_file():
        from compress.arch import adapter_for_source

        return Artifact(p.name, "torch", str(p), adapter_for_source(str(p)).model_type)
    if (p / MANIFEST).is_file():
        raise ConfigError(f"'{path}' is a run folder; pass one of its artifacts, e.g. {p}/stages/<name>")
    raise ConfigError(f"'{path}' has neither config.json (a transformers model) nor export.json (an ONNX export)")


def artifacts(run_dir: Path) -> list[Artifact]:
    """The source model, then every kept stage's checkpoint and export folder, in order."""
    m = read_manifest(run_dir)
    source = Path(m["model"]["resolved"])
    if not source.is_dir():
        raise CompressError(f"the run's source model {source} is not a local folder; bench needs it")
    model_type = m["model"]["model_type"]
    out = [Artifact("source", "torch", str(source), model_type)]
    for rec in stage_records(m):
        if not rec.kept:
            continue
        for rel, kind in ((rec.checkpoint, "torch"), (rec.artifacts, "onnx")):
            if rel and (run_dir / rel).is_dir():
                out.append(Artifact(rec.name, kind, str(run_dir / rel), model_type))
                if kind == "onnx" and _genai_runs(run_dir / rel):  # the same folder driven by onnxruntime-genai
                    out.append(Artifact(rec.name, "genai", str(run_dir / rel), model_type))
    return out


def _genai_runs(folder: Path) -> bool:
    import importlib.util

    return (folder / "genai_config.json").is_file() and importlib.util.find_spec("onnxruntime_genai") is not None


def load_runner(kind: str, path: str, source: str, adapter: Any, providers: list[str] | None,
                threads: int | None = None) -> tuple[Any, Any]:
    """(runner, processor) for a torch checkpoint, an ONNX export folder, or one driven by onnxruntime-genai."""
    if kind == "torch":
        from compress.checkpoint import load_checkpoint
        from compress.runtime.torch_runner import TorchRunner

        model, processor = load_checkpoint(path, adapter)
        return TorchRunner.for_adapter(model, adapter, processor), processor
    from compress.runtime.ort_runner import OrtRunner, session_options

    if kind == "genai":
        from compress.runtime.genai_runner import GenaiRunner

        runner: Any = GenaiRunner(path)
    else:
        runner = OrtRunner.from_dir(path, providers=providers,
                                    session_options=session_options(threads) if threads else None)
    # Export stages save the processor beside the graphs; a folder without one takes the source model's.
    has_own = (Path(path) / "processor_config.json").exists() or (Path(path) / "preprocessor_config.json").exists()
    processor = adapter.load_processor(path if has_own else source)
    processor.tokenizer.padding_side = "left"
    reduced = runner.meta.get("token_reduction")  # the prompts follow a `tokens` stage's reduction
    adapter.image_tokens = (reduced["tokens_in"], reduced["tokens"]) if reduced else None
    return runner, processor
