"""Damage a copy of a finished run folder in each way `vlm-compress verify` must catch (used by the tests
that already make such a folder, so no extra pipeline run is paid for)."""

from __future__ import annotations

import shutil
from pathlib import Path

from compress.cli import main


def assert_verify_catches_damage(run: Path, tmp: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verify {run.resolve()}: ok") and "checkpoints loaded" in out, out
    weights = next(run.glob("stages/*/model.safetensors"))
    graphs = sorted(run.glob("stages/*/*.onnx"))
    assert graphs

    def damaged(name: str, harm) -> str:
        copy = tmp / f"verify-{name}"
        shutil.copytree(run, copy)
        harm(copy)
        assert main(["verify", str(copy)]) == 1
        printed = capsys.readouterr()
        assert "Traceback" not in printed.err
        assert printed.out.startswith(f"verify {copy.resolve()}: FAILED"), printed.out
        return printed.out

    def flip(path: Path) -> None:
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x01  # one bit inside the tensor data: every loader still accepts the file
        path.write_bytes(bytes(blob))

    rel_w, rel_g = weights.relative_to(run), graphs[0].relative_to(run)
    found = damaged("flip", lambda c: flip(c / rel_w))
    assert f"changed  {rel_w}: sha256 differs" in found and found.count("\n  ") == 2, found
    found = damaged("delete", lambda c: (c / rel_g).unlink())
    assert f"missing  {rel_g}" in found, found
    found = damaged("extra", lambda c: (c / rel_g.parent / "notes.txt").write_text("x"))
    assert f"extra    {rel_g.parent}/notes.txt" in found, found
    found = damaged("corrupt", lambda c: (c / rel_g).write_bytes((c / rel_g).read_bytes()[:200]))
    assert f"changed  {rel_g}" in found and f"onnx     {rel_g}" in found, found
