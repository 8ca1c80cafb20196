"""What a loaded set is: records in a fixed order, plus a content hash that pins them down."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Record:
    """One example: an RGB image (already decoded), the prompt, and the reference answer if any."""

    image: Image.Image
    prompt: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)  # extra JSON-able columns, e.g. "qtype"


@dataclass(frozen=True)
class Dataset:
    """The records a run actually used; `sha256` goes into run reports so results are traceable."""

    records: list[Record]
    sha256: str
    source: str

    def batches(self, batch_size: int) -> Iterator[list[Record]]:
        """Consecutive batches in record order; the last one may be short."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(0, len(self.records), batch_size):
            yield self.records[i : i + batch_size]

    def __len__(self) -> int:
        return len(self.records)


def content_hash(records: Sequence[Record]) -> str:
    """SHA-256 over decoded RGB pixels, prompt and answer of every record, in order.

    Pixels rather than file bytes, so the hash names what the model saw: it does not change when
    the same images are re-encoded (a different zlib gives different PNG bytes) or repackaged.
    Every field is length-prefixed so no two different record lists can share a byte stream.
    """
    h = hashlib.sha256(b"compress.data/v1\0")
    for r in records:
        w, h_px = r.image.size
        pixels = r.image.tobytes()
        h.update(b"I" + w.to_bytes(4, "big") + h_px.to_bytes(4, "big") + len(pixels).to_bytes(8, "big"))
        h.update(pixels)
        _update_text(h, b"P", r.prompt)
        if r.answer is None:
            h.update(b"N")
        else:
            _update_text(h, b"A", r.answer)
    return h.hexdigest()


def _update_text(h: Any, tag: bytes, text: str) -> None:
    data = text.encode("utf-8")
    h.update(tag + len(data).to_bytes(8, "big") + data)
