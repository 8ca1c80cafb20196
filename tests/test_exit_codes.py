"""The README's exit-code table is the CLI's: one scenario per row, asserting the code, the single
`error:` line (no traceback) and what the row says is left behind."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from compress.cli import main

ROOT = Path(__file__).resolve().parent.parent


def readme_codes() -> dict[int, str]:
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (.+?) \|$", (ROOT / "README.md").read_text(), flags=re.M)
    return {int(code): left for code, _, left in rows}


def _recipe(tmp: Path, stage: dict) -> Path:
    doc = {"name": "codes", "seed": 0, "model": {"source": "zoo:shapes-vqa"},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 8, "batch_size": 8,
                          "max_new_tokens": 8},
           "stages": [{"type": "prune", "name": "p", "method": "l1_unstructured",
                       "targets": {"components": ["language"]}, "gate": {"min_retention": 0.5}, **stage}]}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def ok(tmp: Path, monkeypatch) -> tuple[list[str], Callable[[Path], None]]:
    def left(out: Path) -> None:
        assert _manifest(out)["status"] == "completed"
    return ["run", str(_recipe(tmp, {"sparsity": 0.1})), "--out", str(tmp / "run")], left


def named_failure(tmp: Path, monkeypatch):
    folder = tmp / "not-a-run"
    folder.mkdir()

    def left(out: Path) -> None:
        assert not any(folder.iterdir())
    return ["verify", str(folder)], left


def bad_input(tmp: Path, monkeypatch):
    def left(out: Path) -> None:
        assert not out.exists()
    return ["run", str(_recipe(tmp, {"sparsity": 1.5})), "--out", str(tmp / "run")], left


def gate_stop(tmp: Path, monkeypatch):
    def left(out: Path) -> None:
        m = _manifest(out)
        assert m["status"] == "stopped" and m["stages"][0]["status"] == "failed" and (out / "report.md").exists()
    return ["run", str(_recipe(tmp, {"sparsity": 0.97, "scope": "global", "gate": {"min_retention": 0.99}})),
            "--out", str(tmp / "run")], left


def stage_error(tmp: Path, monkeypatch):
    def left(out: Path) -> None:
        rec = _manifest(out)["stages"][0]
        assert rec["status"] == "error" and rec["exit_code"] == 4 and (out / rec["partial"]).is_dir()
        assert "**error**" in (out / "report.md").read_text()
    stage = {"sparsity": 0.1, "targets": {"components": ["language"], "include": ["*nothing*"]}}
    return ["run", str(_recipe(tmp, stage)), "--out", str(tmp / "run")], left


def unexpected(tmp: Path, monkeypatch):
    monkeypatch.setenv("COMPRESS_FAULT", "raise:apply:0")

    def left(out: Path) -> None:
        rec = _manifest(out)["stages"][0]
        assert rec["status"] == "error" and rec["exit_code"] == 5
        assert "RuntimeError: fault injected" in (out / rec["traceback"]).read_text()
    return ["run", str(_recipe(tmp, {"sparsity": 0.1})), "--out", str(tmp / "run")], left


SCENARIOS = {0: ok, 1: named_failure, 2: bad_input, 3: gate_stop, 4: stage_error, 5: unexpected}


def test_every_documented_code_has_a_scenario():
    assert sorted(readme_codes()) == sorted(SCENARIOS)


@pytest.mark.parametrize("code", sorted(SCENARIOS))
def test_readme_exit_code(code, tmp_path, capsys, monkeypatch):
    argv, left = SCENARIOS[code](tmp_path, monkeypatch)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == (0 if code == 0 else 1), err
    left(tmp_path / "run")
