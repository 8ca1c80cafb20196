"""Regenerate the bundled shapes-VQA sets in `calibration/shapes-vqa/` from `compress.zoo.shapes`.

    python -m compress.data.make_shapes [--out calibration/shapes-vqa]

Writes `eval/` (EVAL_SEEDS), `calib/` (CALIB_SEEDS) and `distill/` (DISTILL_SEEDS) in the folder format:
`images/NNNNNN.png` plus `metadata.jsonl` (file_name, prompt, answer, qtype, seed). Output is a pure function of the
seeds, and PNGs are written with fixed settings and no metadata chunks, so re-running it gives the
same files (byte-identical with the same zlib; pixel-identical anywhere).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from pathlib import Path

from compress.zoo import shapes

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "calibration" / "shapes-vqa"
SETS: dict[str, tuple[int, int]] = {"eval": shapes.EVAL_SEEDS, "calib": shapes.CALIB_SEEDS,
                                    "distill": shapes.DISTILL_SEEDS}
PNG_PARAMS = {"format": "PNG", "optimize": False, "compress_level": 9}


def png_bytes(image: object) -> bytes:
    """Encode with fixed settings; PIL's PNG writer adds no timestamp or text chunks by default."""
    buf = io.BytesIO()
    image.save(buf, **PNG_PARAMS)  # type: ignore[attr-defined]
    return buf.getvalue()


def write_set(out: Path, start: int, count: int) -> Path:
    """Write seeds [start, start+count) as a folder-format set at `out`, replacing what was there.

    Built in a sibling temp folder and swapped in, so an interrupted run never leaves a half set.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal shared folder
        (tmp / "images").mkdir()
        lines = []
        for i, seed in enumerate(range(start, start + count)):
            s = shapes.sample(seed)
            file_name = f"images/{i:06d}.png"
            (tmp / file_name).write_bytes(png_bytes(s.image))
            row = {"file_name": file_name, "prompt": s.question, "answer": s.answer,
                   "short_answer": s.short_answer, "qtype": s.qtype, "seed": seed}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "metadata.jsonl").write_text("".join(lines), encoding="utf-8", newline="\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.data.make_shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--only", choices=sorted(SETS), action="append",
                        help="regenerate only this set (repeatable)")
    args = parser.parse_args(argv)
    for name in args.only or list(SETS):
        start, count = SETS[name]
        path = write_set(args.out / name, start, count)
        print(f"{name}: seeds {start}..{start + count - 1} -> {path} ({count} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
