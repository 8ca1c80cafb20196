"""The run folder: atomic writes, file hashes, the manifest, and what a resume may trust.

Invariant: a stage is recorded as done in `manifest.json` only after everything it wrote has been
renamed into place, and the manifest itself is replaced atomically. A kill at any moment leaves
either the old manifest (stage not done, its partial files ignored and redone) or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress.errors import CompressError, ConfigError

MANIFEST = "manifest.json"
LOCK = ".lock"  # one writer per run folder (an OS lock on this file)
KEPT = ("completed", "warned")  # stages whose outputs are part of the run
DONE = (*KEPT, "rolled_back")  # stages a resumed run does not redo


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(paths: list[Path], root: Path) -> str:
    """One hash over several files, names included, in a stable order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_files(root: Path, base: Path | None = None) -> list[Path]:
    """The files a run lists as its own (under `base`): hidden files (the lock, temp files) and the manifest aside."""
    out = []
    for p in sorted((base or root).rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and p.name != MANIFEST:
            out.append(p)
    return out


class RunDir:
    """Owns one run folder. Nothing here ever writes outside `root`."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.manifest: dict[str, Any] = {}
        self._created = False
        self._made_lock = False

    # ---- opening ------------------------------------------------------------------------------
    def open(self, inputs_sha256: str, resume: bool, force: bool) -> bool:
        """Lock the folder and prepare it; returns True when resuming an earlier run of the same inputs.

        One writer at a time: an OS lock on `.lock` (released when the process ends, however it ends) is
        taken before anything is read or cleared, so a second `run` / `--resume` / `--force` on the same
        folder is refused with the holder's pid and host instead of mixing two runs' files.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} is a file, not a folder; choose another --out")
        existed = self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self._created = not existed
        try:
            self._lock()
            return self._prepare(inputs_sha256, resume, force)
        except BaseException:
            self.release(remove=self._made_lock)
            if not existed:
                shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _lock(self) -> None:
        import fcntl
        import socket

        self._made_lock = not (self.root / LOCK).exists()
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"run folder {self.root} is in use by {holder}; wait for it to finish or stop it") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def release(self, remove: bool = False) -> None:
        """Drop the lock (the OS drops it too if the process dies); `remove` also deletes the lock file."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is None:
            return
        if remove:
            (self.root / LOCK).unlink(missing_ok=True)
        os.close(fd)

    def _prepare(self, inputs_sha256: str, resume: bool, force: bool) -> bool:
        path = self.root / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            same = old.get("inputs_sha256") == inputs_sha256
            if resume and same:
                self.manifest = old
                self._drop_temporaries()
                return True
            if not force:
                why = ("its recipe, model or data differ from this run's" if resume else
                       "pass --resume to continue it or --force to start over")
                raise ConfigError(f"run folder {self.root} already holds a run; {why}"
                                  + ("; pass --force to start over" if resume else ""))
            self._clear()
        elif any(p.name != LOCK for p in self.root.iterdir()):
            raise ConfigError(f"{self.root} exists, is not empty and holds no run ({MANIFEST} missing); "
                              "choose another --out")
        return False

    def _drop_temporaries(self) -> None:
        """Half-written temp files and folders a killed process left (never listed, never trusted)."""
        for p in sorted(self.root.rglob(".*.tmp"), key=lambda q: len(q.parts), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def discard(self) -> None:
        """Undo `open` of a fresh run: remove what this run wrote (the folder too, if it made it)."""
        self.release(remove=True)
        self.manifest = {}
        if self._created:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.root.is_dir():
            self._clear()

    def _clear(self) -> None:
        """Remove an earlier run's contents (only a folder that has a manifest gets here)."""
        for child in self.root.iterdir():
            if child.name == LOCK:  # held by this process
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # ---- writing ------------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if self.root not in p.parents and p != self.root:
            raise CompressError(f"refusing to write outside the run folder: {rel}")
        return p

    def write(self, rel: str, data: bytes | str) -> Path:
        p = self.path(rel)
        atomic_write(p, data)
        return p

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write(rel, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def save_manifest(self) -> None:
        self.write_json(MANIFEST, self.manifest)

    def file_entries(self, rel_dir: str | None = None) -> list[dict[str, Any]]:
        """Every file (under `rel_dir` or the whole run) with its size and sha256."""
        base = self.path(rel_dir) if rel_dir else self.root
        return [{"path": str(p.relative_to(self.root)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in run_files(self.root, base)]

    # ---- reading stage state ------------------------------------------------------------------
    def stage_record(self, index: int) -> dict[str, Any] | None:
        for rec in self.manifest.get("stages", []):
            if rec["index"] == index:
                return rec
        return None

    def set_stage_record(self, record: dict[str, Any]) -> None:
        stages = [r for r in self.manifest.setdefault("stages", []) if r["index"] != record["index"]]
        stages.append(record)
        self.manifest["stages"] = sorted(stages, key=lambda r: r["index"])
        self.save_manifest()

    def drop_checkpoints_before(self, index: int) -> None:
        """`output.checkpoints: last`: the checkpoints of stages before `index` are removed and unlisted."""
        for rec in self.manifest.get("stages", []):
            if rec["index"] < index and rec.get("checkpoint"):
                shutil.rmtree(self.path(rec["checkpoint"]), ignore_errors=True)
                rec["checkpoint"] = None
                rec["files"] = []
