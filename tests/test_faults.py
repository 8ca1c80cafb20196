"""Kill a run anywhere, resume it, get the same bytes (docs/reliability.md).

SIGKILL-equivalent kills (`COMPRESS_FAULT`, os._exit in the running process) at every stage boundary
and midway through every stage type, refused writes (RLIMIT_FSIZE: the kernel's EFBIG, as a full disk
refuses with ENOSPC), then `--resume`: the final artifacts must be byte-identical to an uninterrupted
run's and the manifest must end `completed`. The default run takes a representative subset; the whole
matrix runs with `-m faults`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "calibration" / "shapes-vqa"
SMALL = {"batch_size": 16, "num_samples": 16}
PRUNE = {"type": "prune", "name": "prune", "method": "l1_unstructured", "sparsity": 0.2,
         "targets": {"components": ["language"]}, "gate": {"min_retention": 0.9}}
INT8 = {"type": "quantize", "name": "int8", "scheme": "int8",
        "activations": {"calibration": "percentile", "percentile": 99.99},
        "targets": {"components": ["vision", "projector", "language"]}, "gate": {"min_retention": 0.9}}
EXPORT = {"type": "export", "name": "onnx", "format": "onnx", "quantize": "from_stage",
          "gate": {"min_retention": 0.9}}
# The other stage types (full matrix only): structured shrink -> distillation -> INT4 -> TensorRT export -> engine.
SHRINK = {"type": "shrink", "name": "shrink", "importance": "magnitude", "mlp": 0.25,
          "gate": {"metric": "token_agreement", "min_retention": 0.1}}
DISTILL = {"type": "distill", "name": "distill", "steps": 6, "batch_size": 8, "lr": 1.0e-3,
           "gate": {"metric": "token_agreement", "min_retention": 0.1}}
INT4 = {"type": "quantize", "name": "int4", "scheme": "int4", "int4": {"group_size": 32},
        "targets": {"components": ["language"]}, "gate": {"metric": "token_agreement", "min_retention": 0.1}}
TRT_EXPORT = {"type": "export", "name": "onnx-trt", "format": "onnx", "target": "tensorrt", "quantize": "from_stage",
              "gate": {"metric": "token_agreement", "min_retention": 0.1}}
ENGINE = {"type": "engine", "name": "engine", "precision": "fp16", "compute_capabilities": ["sm86"],
          "profiles": {"max_batch": 2, "max_prompt_tokens": 160, "max_new_tokens": 16},
          "gate": {"metric": "token_agreement", "min_retention": 0.1}}
NF4 = {"type": "quantize", "name": "nf4", "scheme": "nf4", "targets": {"components": ["language"]},
       "gate": {"min_retention": 0.9}}
# Layer by layer: 9 units (4 vision blocks, the projector between the sequences, 4 decoder blocks).
GPTQ = {"type": "quantize", "name": "int8-gptq", "scheme": "int8", "targets": {"components": ["vision", "projector",
                                                                                              "language"]},
        "weights": {"rounding": "gptq"}, "activations": {"calibration": "minmax"}, "smoothquant": {"alpha": 0.5},
        "gate": {"metric": "token_agreement", "min_retention": 0.5}}
RECIPES = {"main": [PRUNE, INT8, EXPORT], "quick": [PRUNE, INT8], "other": [SHRINK, DISTILL, INT4, TRT_EXPORT, ENGINE],
           "nf4": [NF4], "gptq": [GPTQ], "gptq-streamed": [GPTQ]}


def _has_tensorrt() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))


def _recipe(folder: Path, name: str) -> Path:
    stages = [s for s in RECIPES[name] if s["type"] != "engine" or _has_tensorrt()]
    doc = {"name": f"faults-{name}", "seed": 0, "model": {"source": "zoo:shapes-vqa"},
           **({"resources": {"max_memory_gb": 0.5}} if name.endswith("-streamed") else {}),
           "calibration": {"source": str(DATA / "calib"), **SMALL},
           "evaluation": {"source": str(DATA / "eval"), **SMALL, "max_new_tokens": 8},
           "stages": stages}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(recipe: Path, out: Path, *extra: str, fault: str | None = None, fsize: int | None = None):
    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_FAULT"}
    if fault:
        env["COMPRESS_FAULT"] = fault

    def limit() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=900,
                          preexec_fn=limit if fsize else None)


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _unreproducible(path: str) -> bool:
    """TensorRT engines and their build logs differ between any two builds of the same graphs (two
    uninterrupted runs too), so they are compared by presence; the graphs they are built from by bytes."""
    return path.endswith(".engine") or ("/build/" in path and path.endswith(".log"))


def artifacts(run: Path) -> dict[str, str]:
    """Every file the manifest lists with its sha256; report.md aside (it states wall times)."""
    return {f["path"]: "built" if _unreproducible(f["path"]) else f["sha256"] for f in _manifest(run)["files"]
            if f["path"] != "report.md"}


def _scores(run: Path) -> list:
    return [(s["name"], s["status"], s.get("metrics")) for s in _manifest(run)["stages"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, made once per recipe and compared against."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            folder = tmp_path_factory.mktemp(f"ref-{name}")
            result = _run(_recipe(folder, name), folder / "run")
            assert result.returncode == 0, result.stderr[-3000:]
            made[name] = folder / "run"
        return made[name]

    return get


def _assert_same_as(run: Path, ref: Path) -> None:
    m = _manifest(run)
    assert m["status"] == "completed", m.get("message")
    assert artifacts(run) == artifacts(ref)
    assert _scores(run) == _scores(ref)
    assert not list(run.rglob("*.tmp")) and not (run / ".work").exists() and not (run / "failed").exists()


@pytest.mark.faults
def test_two_runs_give_identical_bytes(reference, tmp_path):
    """By default test_kill_and_resume[mid:2] proves the same: the killed run computed the baseline, prune and
    int8 files, the resumed one the export, each compared with the reference run's bytes."""
    ref = reference("main")
    again = _run(_recipe(tmp_path, "main"), tmp_path / "run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(artifacts(ref)) >= 20  # checkpoints, graphs, processor files, baseline reference, plots
    _assert_same_as(tmp_path / "run", ref)


def _kill_and_resume(reference, tmp_path, recipe: str, point: str) -> None:
    path, out = _recipe(tmp_path, recipe), tmp_path / "run"
    killed = _run(path, out, fault=point)
    assert killed.returncode == 137, f"{point} never reached:\n{killed.stderr[-3000:]}"
    assert f"fault injected at {point}" in killed.stderr
    m = _manifest(out)
    assert m["status"] == "running"  # what a real SIGKILL leaves on record
    done = [s for s in m["stages"] if s["status"] == "completed"]
    kept = {p: p.stat().st_mtime_ns for s in done for p in (out / (s.get("checkpoint") or s["artifacts"])).rglob("*")}
    resumed = _run(path, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for s in done:  # completed stages are neither redone nor rewritten
        assert f"stage {s['name']}: already completed, skipped" in resumed.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    _assert_same_as(out, reference(recipe))


def _points(stages: int) -> list[str]:
    return ["baseline"] + [f"{p}:{i}" for i in range(stages)
                           for p in ("apply", "mid", "after_apply", "after_checkpoint", "recorded")]


# Default: a kill midway through an export (graphs on disk, not yet kept), one at a stage boundary.
@pytest.mark.parametrize("recipe,point", [("main", "mid:2"), ("quick", "recorded:0")])
def test_kill_and_resume(reference, tmp_path, recipe, point):
    _kill_and_resume(reference, tmp_path, recipe, point)


@pytest.mark.faults
@pytest.mark.parametrize("recipe,point", [("main", p) for p in _points(3) if p not in ("mid:2", "recorded:0")]
                         + [("other", p) for p in ["baseline", *(f"{q}:{i}" for i in range(5)
                                                                 for q in ("mid", "after_checkpoint"))]]
                         + [("nf4", p) for p in ("mid:0", "after_apply:0", "after_checkpoint:0")])
def test_kill_and_resume_everywhere(reference, tmp_path, recipe, point):
    if recipe == "other" and point.endswith(":4") and not _has_tensorrt():
        pytest.skip("no TensorRT builder installed (pip install tensorrt-rtx)")
    _kill_and_resume(reference, tmp_path, recipe, point)


def test_refused_write_then_resume(reference, tmp_path):
    """A file-size limit below the first checkpoint (8 MB) and above everything before it."""
    path, out = _recipe(tmp_path, "quick"), tmp_path / "run"
    failed = _run(path, out, fsize=4 << 20)
    assert failed.returncode == 4, failed.stderr[-3000:]
    err = [line for line in failed.stderr.splitlines() if line.startswith("error")]
    assert err == [f"error: stage 'prune' failed: cannot write in {out}: File too large; partial files removed, "
                   "free space and re-run with --resume"]
    assert "Traceback" not in failed.stderr
    m = _manifest(out)
    assert m["status"] == "error" and m["stages"][0]["status"] == "error" and m["stages"][0]["exit_code"] == 4
    assert not [p for p in out.rglob("*") if p.is_file() and ("stages" in p.parts or p.suffix == ".tmp")]
    assert not (out / "failed").exists() and not (out / ".work").exists()
    resumed = _run(path, out, "--resume")  # the space is back
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as(out, reference("quick"))


def test_refused_manifest_write_leaves_a_resumable_run(reference, tmp_path):
    """A limit below the baseline's reference outputs: the run fails before any stage, still resumable."""
    path, out = _recipe(tmp_path, "quick"), tmp_path / "run"
    failed = _run(path, out, fsize=16 << 10)
    assert failed.returncode == 4, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and "File too large" in failed.stderr
    assert _manifest(out)["status"] == "error"
    resumed = _run(path, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as(out, reference("quick"))


@pytest.mark.parametrize("recipe", ["gptq", "gptq-streamed"])
def test_kill_inside_a_layer_resumes_at_that_layer(reference, tmp_path, recipe):
    """SIGKILL while a GPTQ + SmoothQuant stage works on unit k (its statistics and rounding done, its progress
    not yet saved), then --resume: the k-1 finished units are restored from the stage's saved progress, not
    recomputed; unit k and the rest are computed; the artifacts are byte-identical to an uninterrupted run.
    In memory and streamed from disk (under a 0.5 GB budget)."""
    import random

    k = random.Random(recipe).randint(2, 9)  # an arbitrary unit, fixed per variant so a failure reproduces
    path, out = _recipe(tmp_path, recipe), tmp_path / "run"
    killed = _run(path, out, fault=f"mid:0#{k}")
    assert killed.returncode == 137, killed.stderr[-3000:]
    saved = sorted(p.name for p in (out / ".work" / "int8-gptq" / "progress").glob("*.safetensors"))
    assert len(saved) == k - 1, saved
    resumed = _run(path, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{k - 1} units restored" in resumed.stderr
    _assert_same_as(out, reference(recipe))
    rec = _manifest(out)["stages"][0]
    assert rec["details"]["sequential"]["restored_units"] == k - 1
    assert "restored_units" not in _manifest(reference(recipe))["stages"][0]["details"]["sequential"]
