"""Where and with what a run ran: the manifest's opening entries (tool, libraries, host, recipe, model and data
hashes, runtime) written when a run starts or resumes.

Kept apart from the pipeline so the one loop stays about stages.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from compress import __version__, memory
from compress.artifacts import sha256_tree
from compress.host import cpu_features

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "pydantic", "numpy", "datasets", "onnx",
             "onnxruntime", "bitsandbytes")


def model_hash(source: str) -> str:
    """sha256 over a local model folder's weights, configs and templates; hub ids hash as their name."""
    path = Path(source)
    if not path.is_dir():
        return f"hub:{source}"
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".jinja")]
    return sha256_tree(files, path)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def libraries() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def header() -> dict[str, Any]:
    """The manifest entries that describe the tool, its libraries and this host."""
    return {
        "format": 1,
        "tool": {"name": "vlm-compress", "version": __version__, "git_sha": git_sha()},
        "libraries": libraries(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu_features()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def start_manifest(recipe: Any, inputs: Any, adapter: Any, run_dir: Any, resuming: bool, threads: int | None) -> None:
    """A new run's manifest header and recipe copies, or a resumed run's manifest marked running again."""
    r, m = recipe.recipe, run_dir.manifest
    if not resuming:
        m.update({
            **header(),
            "recipe": {"name": r.name, "path": str(recipe.path), "sha256": recipe.sha256()},
            "seed": r.seed,
            "inputs_sha256": inputs.sha256(),
            "model": {"source": r.model.source, "resolved": inputs.source, "sha256": inputs.model_sha256,
                      "adapter": adapter.name, "dtype": r.model.dtype},
            "data": {name: {"source": d.source, "sha256": d.sha256, "records": len(d)}
                     for name, d in (("evaluation", inputs.evaluation), ("calibration", inputs.calibration),
                                     *((f"stages.{i}.data", d) for i, d in inputs.stage_data.items()))
                     if d is not None},
            "status": "running",
            "stages": [],
        })
        run_dir.write("recipe.yaml", recipe.text)
        run_dir.write("recipe.resolved.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
        run_dir.save_manifest()
    else:
        print(f"[vlm-compress] resuming {run_dir.root}", file=sys.stderr, flush=True)
        m["status"] = "running"
        for key in ("message", "exit_code", "finished"):  # what the attempt before this one ended with
            m.pop(key, None)
    m["runtime"] = {"threads": torch.get_num_threads(), "threads_requested": threads,
                    "max_memory_gb": r.resources.max_memory_gb,
                    "available_memory_gb": round(memory.available_bytes() / 2**30, 2)}
