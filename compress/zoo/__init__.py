"""Bundled models. `zoo:NAME` in a recipe resolves to a folder inside the installed package."""

from __future__ import annotations

from pathlib import Path

from compress.errors import ConfigError

_HERE = Path(__file__).parent
# shapes-vqa-16: the same task and recipe with 16x16 patches (16 image tokens, 4 per scene cell), trained
# with `python -m compress.zoo.train --patch 16`: the model with tokens to spare for the `tokens` stage.
MODELS = {"shapes-vqa": _HERE / "shapes_vqa", "shapes-vqa-outliers": _HERE / "shapes_vqa_outliers",
          "shapes-vqa-16": _HERE / "shapes_vqa_16"}


def resolve_source(source: str, base_dir: Path | None = None) -> str:
    """A zoo name or a local path becomes an absolute folder; anything else is a hub id."""
    if source.startswith("zoo:"):
        name = source.removeprefix("zoo:")
        if name not in MODELS:
            raise ConfigError(f"unknown zoo model {name!r}; bundled: {', '.join(sorted(MODELS))}")
        path = MODELS[name]
        if not (path / "config.json").exists():
            raise ConfigError(f"zoo model {name!r} is missing its files at {path}; "
                              "retrain with `python -m compress.zoo.train`")
        return str(path)
    local = Path(source).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    if local.exists():
        if not (local / "config.json").exists():
            raise ConfigError(f"model folder {local} has no config.json")
        return str(local.resolve())
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConfigError(f"model path {source!r} does not exist")
    return source  # a hub id: works online or from the local hub cache
