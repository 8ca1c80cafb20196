"""Reading records from a local folder, parquet, a `datasets` save_to_disk folder, or the hub.

Every reader first works out how many rows there are, the selection (shuffle, then the first
`num_samples`) is taken on row indices, and only the selected rows have their images decoded.
Every failure a user can fix is a `ConfigError` that names the source and the row or file.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.data.config import DataConfig
from compress.data.images import to_image
from compress.data.records import Dataset, Record, content_hash
from compress.errors import ConfigError

log = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
FOLDER_METADATA = "metadata.jsonl"
FOLDER_IMAGE_KEY = "file_name"  # the HF imagefolder convention
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
ACCEPTED = (
    "a folder with metadata.jsonl (format: folder), a .parquet file or a folder of them "
    "(format: parquet), a `datasets` save_to_disk folder (format: datasets), or hub:owner/name "
    "(format: hub)"
)
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass
class _Row:
    """One selected source row before conversion; `where` is how errors name it."""

    values: dict[str, Any]
    where: str


def load_dataset(cfg: DataConfig, base_dir: Path | None = None) -> Dataset:
    """Load the records `cfg` selects; relative paths resolve against `base_dir` (else the CWD)."""
    fmt, target = _resolve(cfg, base_dir)
    if fmt == "folder":
        source, image_key, root, rows = _read_folder(target, cfg)
    elif fmt == "parquet":
        source, image_key, root, rows = _read_parquet(target, cfg)
    elif fmt == "datasets":
        source, image_key, root, rows = _read_datasets_dir(target, cfg)
    else:
        source, image_key, root, rows = _read_hub(str(target), cfg)
    records = [_to_record(row, cfg, image_key, root, source) for row in rows]
    if not records:
        raise ConfigError(f"calibration/evaluation set is empty: {source} has no records")
    return Dataset(records=records, sha256=content_hash(records), source=source)


# --------------------------------------------------------------------------- format resolution


def _resolve(cfg: DataConfig, base_dir: Path | None) -> tuple[str, Path | str]:
    """The concrete format and the path (or hub name) to read."""
    src = cfg.source
    if cfg.format == "hub" or (cfg.format == "auto" and src.startswith(HUB_PREFIX)):
        name = src.removeprefix(HUB_PREFIX)
        if not name:
            raise ConfigError(f"data source {src!r}: missing dataset name after {HUB_PREFIX!r}")
        return "hub", name
    if src.startswith(HUB_PREFIX):
        raise ConfigError(f"data source {src!r} is a hub name but format is {cfg.format!r}; "
                          f"use format: hub or auto")
    path = Path(src).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    path = path.resolve()
    if not path.exists():
        where = f" (relative paths resolve against {base_dir})" if base_dir is not None else ""
        raise ConfigError(f"data source not found: {path}{where}; expected {ACCEPTED}")
    if cfg.format != "auto":
        return cfg.format, path
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet", path
        raise ConfigError(f"data source {path} is a file but not .parquet; expected {ACCEPTED}")
    if (path / FOLDER_METADATA).is_file() or _folder_splits(path):
        return "folder", path
    if any((path / m).is_file() for m in DATASETS_MARKERS):
        return "datasets", path
    if _parquet_files(path):
        return "parquet", path
    raise ConfigError(f"cannot tell what kind of data source {path} is; expected {ACCEPTED}")


def _select(n: int, cfg: DataConfig, source: str) -> list[int]:
    """Row indices to load, in order: all rows, shuffled with `seed` if asked, then the first N."""
    indices = list(range(n))
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(indices)
    if cfg.num_samples is not None:
        if cfg.num_samples > n > 0:
            log.warning("%s has %d records, fewer than num_samples=%d; using all of them",
                        source, n, cfg.num_samples)
        indices = indices[: cfg.num_samples]
    return indices


# --------------------------------------------------------------------------- folder


def _read_folder(path: Path, cfg: DataConfig) -> tuple[str, str, Path, Iterator[_Row]]:
    """`metadata.jsonl` plus image files, as written by `compress.data.make_shapes`.

    A `split` selects the subfolder of that name, as in the HF imagefolder layout.
    """
    folder = path
    if cfg.split is not None:
        folder = path / cfg.split
        if not (folder / FOLDER_METADATA).is_file():
            raise ConfigError(f"folder:{path} has no split {cfg.split!r} ({folder / FOLDER_METADATA} "
                              f"is missing); splits found: {_folder_splits(path)}")
    elif not (path / FOLDER_METADATA).is_file() and _folder_splits(path):
        raise ConfigError(f"folder:{path} has splits {_folder_splits(path)} (subfolders with "
                          f"{FOLDER_METADATA}); choose one with split:")
    meta_path = folder / FOLDER_METADATA
    source = f"folder:{folder}"
    if not meta_path.is_file():
        raise ConfigError(f"{source}: no {FOLDER_METADATA}; a folder source needs one JSON object per "
                          f"line with {FOLDER_IMAGE_KEY!r} (image path relative to the folder) plus the "
                          f"prompt/answer columns")
    image_key = cfg.columns.image if "image" in cfg.columns.model_fields_set else FOLDER_IMAGE_KEY
    lines: list[tuple[int, dict[str, Any]]] = []
    with meta_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{meta_path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{meta_path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            lines.append((lineno, obj))
    indices = _select(len(lines), cfg, source)
    rows = (_Row(lines[i][1], f"{meta_path}:{lines[i][0]}") for i in indices)
    return source, image_key, folder, _check_row_columns(rows, cfg, image_key)


def _folder_splits(path: Path) -> list[str]:
    """Subfolders holding their own metadata.jsonl: the imagefolder layout for splits."""
    return sorted(p.name for p in path.iterdir() if (p / FOLDER_METADATA).is_file())


def _check_row_columns(rows: Iterable[_Row], cfg: DataConfig, image_key: str) -> Iterator[_Row]:
    """Per-row column check for sources without a schema (jsonl rows may differ)."""
    wanted = [image_key, cfg.columns.prompt] + ([cfg.columns.answer] if cfg.columns.answer else [])
    for row in rows:
        missing = [c for c in wanted if c not in row.values]
        if missing:
            raise ConfigError(_missing_columns_message(row.where, missing, list(row.values), cfg))
        yield row


def _missing_columns_message(where: str, missing: list[str], available: list[str], cfg: DataConfig) -> str:
    msg = f"{where}: missing column(s) {missing}; available columns: {available}"
    msg += "; map them with columns: {image: ..., prompt: ..., answer: ...}"
    if cfg.columns.answer is not None and cfg.columns.answer in missing:
        msg += " (answer: null for a set without reference answers)"
    return msg


# --------------------------------------------------------------------------- parquet


def _parquet_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def _read_parquet(path: Path, cfg: DataConfig) -> tuple[str, str, Path, Iterator[_Row]]:
    """One .parquet file, or every .parquet under a folder in sorted path order.

    With a `split`, a folder keeps only files named `<split>-*.parquet` or under a `<split>/`
    folder (the layouts the hub uses).
    """
    import pyarrow.parquet as pq

    if path.is_file():
        files, root = [path], path.parent
        if cfg.split is not None:
            raise ConfigError(f"parquet:{path} is a single file; split {cfg.split!r} only applies to a "
                              f"folder of parquet files")
    else:
        files, root = _parquet_files(path), path
        if cfg.split is not None:
            split = cfg.split
            files = [f for f in files if f.name.startswith(f"{split}-") or f.stem == split
                     or split in f.relative_to(path).parts[:-1]]
            if not files:
                raise ConfigError(f"parquet:{path} has no files for split {split!r}; found "
                                  f"{[str(f.relative_to(path)) for f in _parquet_files(path)]}")
        if not files:
            raise ConfigError(f"parquet:{path} contains no .parquet files")
    source = f"parquet:{path}" if cfg.split is None else f"parquet:{path}#{cfg.split}"
    counts: list[int] = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise ConfigError(f"{source}: cannot read parquet file {f}: {e}") from None
        names = pf.schema_arrow.names
        missing = [c for c in _wanted(cfg, cfg.columns.image) if c not in names]
        if missing:
            raise ConfigError(_missing_columns_message(f"{source}: {f}", missing, names, cfg))
        counts.append(pf.metadata.num_rows)
    indices = _select(sum(counts), cfg, source)

    def rows() -> Iterator[_Row]:
        # Read only the files that hold selected rows, each once, then emit in selection order.
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        by_file: dict[int, list[int]] = {}
        for g in indices:
            by_file.setdefault(_file_of(g, offsets), []).append(g)
        loaded: dict[int, _Row] = {}
        for fi, globals_ in by_file.items():
            local = [g - offsets[fi] for g in globals_]
            table = pq.read_table(files[fi]).take(local)
            for g, loc, values in zip(globals_, local, table.to_pylist(), strict=True):
                loaded[g] = _Row(values, f"{files[fi]} row {loc}")
        for g in indices:
            yield loaded[g]

    return source, cfg.columns.image, root, rows()


def _file_of(g: int, offsets: list[int]) -> int:
    return bisect.bisect_right(offsets, g) - 1


def _wanted(cfg: DataConfig, image_key: str) -> list[str]:
    return [image_key, cfg.columns.prompt] + ([cfg.columns.answer] if cfg.columns.answer else [])


# --------------------------------------------------------------------------- datasets / hub


def _read_datasets_dir(path: Path, cfg: DataConfig) -> tuple[str, str, Path, Iterator[_Row]]:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ConfigError(f"datasets:{path}: cannot load with datasets.load_from_disk: {e}") from None
    return _from_hf(ds, f"datasets:{path}", cfg, path)


def _read_hub(name: str, cfg: DataConfig) -> tuple[str, str, Path, Iterator[_Row]]:
    """`datasets.load_dataset(name)`; refused up front when the environment says offline."""
    source = f"hub:{name}"
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(v, "").strip().lower() in _TRUTHY]
    hint = ("download it once where the hub is reachable (datasets.load_dataset(...).save_to_disk(DIR) "
            "or its parquet files) and point source: at that local copy")
    if offline:
        raise ConfigError(f"{source}: the hub is offline ({' and '.join(offline)} set), so hub datasets "
                          f"cannot be loaded; {hint}")
    import datasets

    if datasets.config.HF_HUB_OFFLINE:  # set in the environment when `datasets` was first imported
        raise ConfigError(f"{source}: the hub is offline (datasets.config.HF_HUB_OFFLINE), so hub datasets "
                          f"cannot be loaded; {hint}")
    try:
        ds = datasets.load_dataset(name, split=cfg.split)
    except Exception as e:
        what = f"{type(e).__name__}: {e}"
        if _is_network_error(e):
            raise ConfigError(f"{source}: the hub is unreachable ({what}); {hint}") from None
        if isinstance(e, FileNotFoundError):
            raise ConfigError(f"{source}: not found on the hub ({what}); check the name and split, or "
                              f"if the hub is unreachable from here, {hint}") from None
        raise ConfigError(f"{source}: datasets.load_dataset failed ({what}); if the hub is unreachable, "
                          f"{hint}") from None
    return _from_hf(ds, source, cfg, Path.cwd())


def _is_network_error(e: BaseException | None) -> bool:
    """Connection trouble anywhere in the exception chain (the HTTP clients use their own types)."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if type(e).__module__.split(".")[0] in {"httpx", "httpcore", "requests", "urllib3"}:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _from_hf(ds: Any, source: str, cfg: DataConfig, root: Path) -> tuple[str, str, Path, Iterator[_Row]]:
    """Rows of a `datasets.Dataset` (or one split of a DatasetDict), images left undecoded."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if cfg.split is None:
            if len(splits) != 1:
                raise ConfigError(f"{source} is a DatasetDict with splits {splits}; choose one with split:")
            split = splits[0]
        elif cfg.split not in ds:
            raise ConfigError(f"{source} has no split {cfg.split!r}; available splits: {splits}")
        else:
            split = cfg.split
        ds, source = ds[split], f"{source}#{split}"
    elif cfg.split is not None and not source.startswith(HUB_PREFIX):
        known = str(ds.split) if ds.split is not None else None
        if known != cfg.split:
            raise ConfigError(f"{source} is a single Dataset (split {known!r}), not a DatasetDict; "
                              f"split {cfg.split!r} cannot be selected — drop split:")
    elif cfg.split is not None:
        source = f"{source}#{cfg.split}"
    names = list(ds.column_names)
    missing = [c for c in _wanted(cfg, cfg.columns.image) if c not in names]
    if missing:
        raise ConfigError(_missing_columns_message(source, missing, names, cfg))
    feature = ds.features[cfg.columns.image]
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(cfg.columns.image, datasets.Image(decode=False))
    indices = _select(len(ds), cfg, source)

    def rows() -> Iterator[_Row]:
        if not indices:
            return
        for i, values in zip(indices, ds.select(indices), strict=True):
            yield _Row(dict(values), f"{source} row {i}")

    return source, cfg.columns.image, root, rows()


# --------------------------------------------------------------------------- conversion


def _to_record(row: _Row, cfg: DataConfig, image_key: str, root: Path, source: str) -> Record:
    values = row.values
    image = to_image(values[image_key], row.where, root)
    prompt = values[cfg.columns.prompt]
    if not isinstance(prompt, str):
        raise ConfigError(f"{row.where}: prompt column {cfg.columns.prompt!r} must be a string, "
                          f"got {type(prompt).__name__}")
    answer = None
    if cfg.columns.answer is not None:
        answer = values[cfg.columns.answer]
        if answer is not None and not isinstance(answer, str):
            raise ConfigError(f"{row.where}: answer column {cfg.columns.answer!r} must be a string or "
                              f"null, got {type(answer).__name__}")
    used = {image_key, cfg.columns.prompt, cfg.columns.answer}
    meta = {k: v for k, v in values.items() if k not in used and _jsonable(v)}
    return Record(image=image, prompt=prompt, answer=answer, meta=meta)


def _jsonable(v: Any) -> bool:
    if v is None or isinstance(v, str | bool | int):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list | tuple):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False
