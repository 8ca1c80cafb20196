"""Stage outcomes shared between runs that begin alike (a search's trials with a common stage prefix).

A stage's outcome — its record and, when kept, its checkpoint or export folder — depends only on the source
model, the data and everything the recipe says up to and including that stage; the key hashes exactly that.
A run given a cache adopts a recorded outcome instead of running the stage (its files hard-linked, or copied
across file systems, into the run folder; the record says `reused_from`), and offers every stage it runs to the
cache. Failed gates are outcomes too: a trial whose prefix already failed a gate stops there without work.
Entries are written once, atomically; two runs racing on one key both compute it and the first rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from compress.artifacts import atomic_dir, atomic_write

CACHED = ("completed", "failed")  # outcomes worth sharing (a warn / rollback depends on the gate's on_fail only)
NOT_IN_KEY = ("name", "threads", "resources", "output", "search", "stages")


def prefix_key(resolved: dict[str, Any], data_sha256: list[str], index: int) -> str:
    """The hash of everything stage `index`'s outcome depends on: the data (model, evaluation, calibration and
    stage data hashes), the recipe's sections other than speed and bookkeeping, and stages 0..index."""
    recipe = {k: v for k, v in resolved.items() if k not in NOT_IN_KEY}
    stages = [{k: v for k, v in s.items() if k != "name"} for s in resolved["stages"][: index + 1]]
    blob = json.dumps({"data": data_sha256, "recipe": recipe, "stages": stages}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


class StageCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def adopt(self, key: str, run_dir: Any, rec: dict[str, Any]) -> dict[str, Any] | None:
        """The cached outcome of `key` placed in `run_dir` under this run's stage name, as the stage's record;
        None when the cache has none."""
        entry = self.folder / key
        try:
            cached = json.loads((entry / "record.json").read_text())
            out = {**cached, "index": rec["index"], "name": rec["name"], "started": rec["started"],
                   "reused_from": str(entry)}
            for field in ("checkpoint", "artifacts"):
                if cached.get(field):
                    rel = f"stages/{rec['name']}"
                    with atomic_dir(run_dir.path(rel)) as tmp:
                        _link_tree(entry / "files", tmp)
                    out[field] = rel
                    out["files"] = run_dir.file_entries(rel)
        except (OSError, ValueError):  # no entry (or an unreadable one): the stage runs
            return None
        return out

    def offer(self, key: str, run_dir: Any, rec: dict[str, Any]) -> None:
        """Record a finished stage's outcome under `key` (once; an existing entry is kept)."""
        entry = self.folder / key
        if rec["status"] not in CACHED or entry.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", suffix=".tmp", dir=self.folder))
        try:
            rel = rec.get("checkpoint") or rec.get("artifacts")
            if rel:
                _link_tree(run_dir.path(rel), tmp / "files")
            kept = {k: v for k, v in rec.items() if k not in ("index", "name", "started", "files", "reused_from")}
            atomic_write(tmp / "record.json", json.dumps(kept, default=str))
            with contextlib.suppress(OSError):  # another run stored it first: theirs stays
                os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links where the file system allows (files are never modified in place: every write is a new file
    renamed over the old), copies elsewhere."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
