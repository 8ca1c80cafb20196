"""A search's points: the recipe's `search.space` read against the recipe, each point applied to the recipe's
YAML as a plain recipe (no `search:` block, data paths made absolute), and every grid point validated before
anything loads, so a space that makes an invalid recipe is a recipe error with the file and line."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compress.errors import RecipeError
from compress.search.config import Range, SearchConfig

PRESENT = "present"
MAX_GRID = 10_000


@dataclass(frozen=True)
class Axis:
    """One searched field: `key` is its name in Ray Tune's parameter space (choices are passed by index, so any
    YAML value — a mapping, null — can be a choice and every sampler sees plain categories)."""

    key: str
    path: str
    choices: tuple[Any, ...] | None
    range: Range | None

    def value(self, param: Any) -> Any:
        if self.choices is not None:
            return copy.deepcopy(self.choices[int(param)])
        return round(param) if self.range.integer else float(param)  # type: ignore[union-attr]

    def grid(self) -> list[Any]:
        return list(range(len(self.choices))) if self.choices is not None else self.range.grid()  # type: ignore


def axes(cfg: SearchConfig) -> list[Axis]:
    return [Axis(f"a{i}", path, tuple(a) if isinstance(a, list) else None, a if isinstance(a, Range) else None)
            for i, (path, a) in enumerate(cfg.space.items())]


def decode(ax: list[Axis], params: dict[str, Any]) -> dict[str, Any]:
    """Tune's parameters -> {field path: value}."""
    return {a.path: a.value(params[a.key]) for a in ax}


def point_id(point: dict[str, Any]) -> str:
    """A trial's stable name: the same point is the same trial, across retries and `--resume`."""
    blob = json.dumps(point, sort_keys=True, default=str).encode()
    return "t-" + hashlib.sha256(blob).hexdigest()[:10]


def trial_count(cfg: SearchConfig) -> int:
    """How many trials the search runs: every grid point, else `max_trials` draws."""
    if cfg.algorithm != "grid":
        return cfg.max_trials  # type: ignore[return-value]  (required for sampled searches)
    return math.prod(len(a.grid()) for a in axes(cfg))


def grid_points(ax: list[Axis]) -> list[dict[str, Any]]:
    """Every combination, first axis slowest (the order Tune's grid runs them in is its own)."""
    points: list[dict[str, Any]] = [{}]
    for a in ax:
        points = [{**p, a.key: v} for p in points for v in a.grid()]
    return points


def sample_points(ax: list[Axis], n: int, seed: int) -> list[dict[str, Any]]:
    """Independent draws used only to check that sampled trials make valid recipes (the search itself draws
    through Tune)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = {}
        for a in ax:
            if a.choices is not None:
                p[a.key] = rng.randrange(len(a.choices))
            else:
                r = a.range
                lo, hi = (math.log(r.min), math.log(r.max)) if r.log else (r.min, r.max)
                x = rng.uniform(lo, hi)
                p[a.key] = math.exp(x) if r.log else x
        out.append(p)
    return out


def _stage_index(stages: list[Any], name: str) -> int | None:
    for i, s in enumerate(stages):
        if isinstance(s, dict) and (s.get("name") or f"{i:02d}-{s.get('type')}") == name:
            return i
    return None


def _merge(into: dict[str, Any], value: dict[str, Any]) -> None:
    """Each key of `value` into `into`: null removes it, a mapping onto a mapping merges, anything else replaces."""
    for k, v in value.items():
        if v is None:
            into.pop(k, None)
        elif isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def _set(target: dict[str, Any], parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        nxt = target.get(p)
        if not isinstance(nxt, dict):
            nxt = target[p] = {}
        target = nxt
    _merge(target, {parts[-1]: value})


def apply(data: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The recipe mapping with `point` ({field path: value}) applied and the search block removed."""
    out = copy.deepcopy(data)
    out.pop("search", None)
    stages = out.get("stages") or []
    absent = set()
    for path, value in point.items():
        parts = path.split(".")
        if parts[0] != "stages":
            _set(out, parts, value)
            continue
        i = _stage_index(data.get("stages") or [], parts[1]) if len(parts) > 1 else None
        if i is None:
            raise RecipeError(f"search.space: {path!r}: no stage named {parts[1:2]}")
        rest = parts[2:]
        if rest == [PRESENT]:
            if value is not True:
                absent.add(i)
        elif not rest:
            if not isinstance(value, dict):
                raise RecipeError(f"search.space: {path!r}: a choice for a whole stage must be a mapping merged "
                                  f"into it, got {value!r}")
            _merge(stages[i], value)
        else:
            _set(stages[i], rest, value)
    out["stages"] = [s for i, s in enumerate(stages) if i not in absent]
    return out


def absolute_sources(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative model and data paths resolved against the recipe's folder, so the recipe runs from anywhere."""
    out = copy.deepcopy(data)

    def fix(section: Any) -> None:
        if isinstance(section, dict) and isinstance(section.get("source"), str):
            p = Path(section["source"]).expanduser()
            if not p.is_absolute() and (base_dir / p).exists():
                section["source"] = str((base_dir / p).resolve())

    for key in ("model", "evaluation", "calibration"):
        fix(out.get(key))
    for s in out.get("stages") or []:
        if isinstance(s, dict):
            fix(s.get("data"))
    return out


def recipe_text(data: dict[str, Any], header: str) -> str:
    lines = "".join(f"# {h}\n" if h else "#\n" for h in header.splitlines())
    return lines + yaml.safe_dump(data, sort_keys=False)


def check_space(cfg: SearchConfig, data: dict[str, Any], path: Path, line: int, lines: dict[str, int],
                validate: Callable[[str], Any]) -> int:
    """Every grid point (or a sample of random ones) makes a recipe `validate` (the recipe parser) accepts;
    returns the number of grid points (0 for sampled searches). Errors name the line of the field path
    (`lines`), else of the search block, and the offending point."""
    stages = data.get("stages") or []
    for p in cfg.space:
        parts = p.split(".")
        if parts[0] == "stages" and (len(parts) < 2 or _stage_index(stages, parts[1]) is None):
            names = [s.get("name") or f"{i:02d}-{s.get('type')}" for i, s in enumerate(stages) if isinstance(s, dict)]
            raise RecipeError(f"{path}:{lines.get(p, line)}: search.space: {p!r}: no stage named {parts[1:2]}; "
                              f"stages are {names}")
    ax = axes(cfg)
    if cfg.algorithm == "grid":
        n = trial_count(cfg)
        if n > MAX_GRID or (cfg.max_trials is not None and n > cfg.max_trials):
            raise RecipeError(f"{path}:{line}: search: the grid has {n} points, above max_trials "
                              f"({cfg.max_trials or MAX_GRID})")
        points = grid_points(ax)
    else:
        n, points = 0, sample_points(ax, 32, cfg.seed)
    for params in points:
        point = decode(ax, params)
        text = yaml.safe_dump(absolute_sources(apply(data, point), path.parent), sort_keys=False)
        try:
            validate(text)
        except RecipeError as e:
            reason = str(e).split(": ", 1)[-1] if str(e).startswith(str(path)) else str(e)
            raise RecipeError(f"{path}:{line}: search.space: the point {json.dumps(point, default=str)} makes an "
                              f"invalid recipe: {reason}") from None
    return n
