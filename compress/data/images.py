"""One image value from any source (a PIL image, a {bytes, path} dict, raw bytes or a path) decoded eagerly to
RGB, so an unreadable image fails when the set loads, naming its row, and never inside a stage."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from compress.errors import ConfigError


def to_image(value: Any, where: str, root: Path) -> Image.Image:
    """An eagerly decoded RGB image from a PIL image, {"bytes", "path"} dict, bytes, or a path."""
    if isinstance(value, Image.Image):
        return _decoded(lambda: value, where, close=False)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ConfigError(f"{where}: image is empty (neither bytes nor path)")
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return _decoded(lambda: Image.open(io.BytesIO(data)), where)
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if not path.is_absolute():
            path = root / path
        if not path.is_file():
            raise ConfigError(f"{where}: image file not found: {path}")
        return _decoded(lambda: Image.open(path), f"{where} ({path})")
    if value is None:
        raise ConfigError(f"{where}: image is missing (null)")
    raise ConfigError(f"{where}: cannot read an image from a {type(value).__name__}; expected an image, "
                      f"a {{bytes, path}} dict, raw bytes or a path")


def _decoded(open_image: Callable[[], Image.Image], where: str, close: bool = True) -> Image.Image:
    """Decode now (not lazily) and detach from the file, so later failures cannot surprise a stage."""
    try:
        img = open_image()
        try:
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
        finally:
            if close:
                img.close()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"{where}: unreadable or corrupt image ({type(e).__name__}: {e})") from None
