"""Where and with what a run ran: the manifest's tool, library, host and model-hash entries.

Kept apart from the pipeline so the one loop stays about stages; everything here is read-only.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress import __version__
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
