"""How a run ends when something fails: what the manifest says, what is kept, which exit code.

Three kinds, each a documented exit code (README): an error a stage could name (4), a write the file
system refused — disk full, file too large, I/O error — (4, partial files removed so the space is
free for `--resume`), and anything unexpected (5, traceback kept in `logs/`). Also the test hook that
kills the process at named points, so the suite can prove a crash anywhere is resumable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from compress.artifacts import RunDir
from compress.errors import CompressError, InternalError, WriteError

STAGE_ERROR = 4  # any error a stage names (a bad option for this model, parity, data), a refused write too
STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EDQUOT, errno.EROFS}
# Libraries that write through Rust or C++ (safetensors, onnx) report the OS error only in their message.
STORAGE_MESSAGES = tuple(os.strerror(e) for e in sorted(STORAGE_ERRNOS))


_REACHED: Counter[str] = Counter()


def fault(point: str) -> None:
    """Test hook: `COMPRESS_FAULT=<point>` kills the process there, like a crash or SIGKILL;
    `COMPRESS_FAULT=raise:<point>` raises an unexpected exception there instead. `<point>#<n>` means the n-th
    time the point is reached (a stage's `mid` point is reached once per unit it finishes)."""
    wanted = os.environ.get("COMPRESS_FAULT")
    if not wanted:
        return
    _REACHED[point] += 1
    if "#" in wanted:
        wanted, _, nth = wanted.partition("#")
        if int(nth) != _REACHED[point]:
            return
    if wanted == point:
        print(f"[vlm-compress] fault injected at {point}", file=sys.stderr, flush=True)
        os._exit(137)
    if wanted == f"raise:{point}":
        raise RuntimeError(f"fault injected at {point}")


def storage_cause(exc: BaseException) -> str | None:
    """'No space left on device: path' when `exc` (or what caused it) is a refused write, else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return f"{os.strerror(e.errno)}: {e.filename}" if e.filename else os.strerror(e.errno)
        text = str(e)
        for message in STORAGE_MESSAGES:
            if message in text:
                return message
        e = e.__cause__ or e.__context__
    return None


def record_stage_error(run_dir: RunDir, rec: dict[str, Any], exc: BaseException, workdir: Path,
                       wall_s: float) -> None:
    """A stage that raised: status `error` with the message. Partial files of a named or unexpected error
    are kept visibly under failed/; those of a refused write are removed (they hold the space it lacks)."""
    name = rec["name"]
    cause = storage_cause(exc)
    internal = cause is None and not isinstance(exc, CompressError)
    if cause:
        message = f"cannot write in {run_dir.root}: {cause}; partial files removed, free space and re-run with --resume"
        rec.update(error_type="WriteError", exit_code=STAGE_ERROR)
    else:
        message = f"internal error: {type(exc).__name__}: {exc}" if internal else str(exc)
        rec.update(error_type=type(exc).__name__, exit_code=InternalError.exit_code if internal else STAGE_ERROR)
    rec.update(status="error", wall_s=round(wall_s, 2), message=message)
    try:
        if cause:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            if internal:
                log_path = run_dir.write(f"logs/{name}.traceback.txt", "".join(traceback.format_exception(exc)))
                rec["traceback"] = str(log_path.relative_to(run_dir.root))
            if workdir.exists():
                dest = run_dir.path(f"failed/{name}")
                shutil.rmtree(dest, ignore_errors=True)
                dest.parent.mkdir(parents=True, exist_ok=True)
                progress, aside = workdir / "progress", workdir.with_name(f".{workdir.name}.progress")
                if progress.is_dir():  # the units the stage finished stay where --resume restores them from
                    os.replace(progress, aside)
                os.replace(workdir, dest)
                if aside.is_dir():
                    workdir.mkdir()
                    os.replace(aside, progress)
                rec["partial"] = f"failed/{name}"
        run_dir.set_stage_record(rec)
    except OSError as again:  # the disk is full even for the manifest: it still says `running`, resume redoes it
        raise WriteError(f"{message} (the manifest could not record it either: {storage_cause(again) or again})") \
            from exc
    print(f"[vlm-compress] ERROR stage {name}: {message}", file=sys.stderr, flush=True)


def record_run_error(run_dir: RunDir, exc: BaseException) -> CompressError:
    """A failure outside any stage (baseline, report, manifest): say so in the manifest when it can be
    written, keep an unexpected error's traceback, and return the error the CLI reports."""
    cause = storage_cause(exc)
    if cause:
        error: CompressError = WriteError(f"cannot write in {run_dir.root}: {cause}; free space and re-run with "
                                          "--resume")
    else:
        where = ""
        try:
            log_path = run_dir.write("logs/run.traceback.txt", "".join(traceback.format_exception(exc)))
            where = f" (traceback: {log_path})"
        except OSError:
            pass
        error = InternalError(f"internal error: {type(exc).__name__}: {exc}{where}")
    m = run_dir.manifest
    if m:
        m.update(status="error", message=str(error), exit_code=error.exit_code)
        with contextlib.suppress(OSError):  # a full disk may refuse the manifest too; it then still says `running`
            run_dir.save_manifest()
    return error
