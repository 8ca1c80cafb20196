"""One trial, as Ray Tune runs it in a worker: the recipe with the trial's point applied, run by the normal
pipeline into `<search>/trials/<id>/run` against the search's shared baseline, summarized into `result.json`.

Idempotent by design: the trial folder is named by its point, a finished trial's `result.json` is reported
again without work (Tune's experiment state is saved periodically, so a driver killed just after a trial
finished may hand it out again), and a trial whose worker died resumes its run folder from the last completed
stage. Errors the trial can name are its result, reported normally, so Tune never retries them; only a dead
worker reaches Tune, which retries it up to `max_failures` times.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from compress.artifacts import KEPT, atomic_write
from compress.errors import CompressError, first_line
from compress.runs import dir_bytes, read_manifest
from compress.search.config import SearchConfig
from compress.search.space import absolute_sources, apply, axes, decode, point_id, recipe_text

FAILED_FACTOR = 10  # a failing trial's objective for the sampler: this many times its size (worse than any pass)


def trial_dir(search_dir: Path, point: dict[str, Any]) -> Path:
    return Path(search_dir) / "trials" / point_id(point)


def write_trial_recipe(folder: Path, data: dict[str, Any], base_dir: Path, point: dict[str, Any],
                       header: str, threads: int) -> Path:
    """The trial's plain recipe: the point applied, data paths absolute, the trial's CPU threads, every gate
    `on_fail: stop` (in a search a failed gate ends the trial, so a stage after it never runs)."""
    recipe = absolute_sources(apply(data, point), base_dir)
    recipe["threads"] = threads  # as the trial ran: best.yaml reproduces its numbers exactly
    for stage in recipe.get("stages", []):
        if isinstance(stage.get("gate"), dict):
            stage["gate"]["on_fail"] = "stop"
    path = folder / "recipe.yaml"
    atomic_write(path, recipe_text(recipe, header))
    return path


def summarize(manifest: dict[str, Any], run_dir: Path, cfg: SearchConfig) -> dict[str, Any]:
    """What the search compares: status, the final artifact's size, the last stage's metrics and retention."""
    stages = manifest.get("stages", [])
    baseline = manifest.get("baseline", {}).get("metrics", {})
    kept = [s for s in stages if s["status"] in KEPT]
    scored = [s for s in stages if s.get("metrics")]
    final = next((s.get(k) for s in reversed(kept) for k in ("artifacts", "checkpoint") if s.get(k)), None)
    metrics = scored[-1]["metrics"] if scored else {}  # the last stage scored: the failing one, if one failed
    retention = {k: (metrics[k] / baseline[k] if baseline.get(k) else None) for k in metrics if k != "logit_kl"}
    size = dir_bytes(run_dir / final) if final else None
    out: dict[str, Any] = {
        "size_bytes": size,
        "objective_value": size if cfg.objective.minimize == "size" else None,
        "source_bytes": _source_bytes(manifest),
        "final_artifact": final,
        "metrics": metrics,
        "retention": retention,
        "stages": [{"name": s["name"], "status": s["status"], "wall_s": s.get("wall_s"),
                    "metrics": s.get("metrics"), "peak_rss_mb": s.get("peak_rss_mb"),
                    "answers_truncated": (s.get("answers") or {}).get("truncated"),
                    "reused": "reused_from" in s} for s in stages],
        # answers the last scored stage cut at the answer budget (scored as cut)
        "answers_truncated": (scored[-1].get("answers") or {}).get("truncated") if scored else None,
        "peak_rss_mb": max((s.get("peak_rss_mb") or 0 for s in stages), default=None),
        "bit_allocation": {s["name"]: s["details"]["bit_allocation"] for s in kept
                           if "bit_allocation" in (s.get("details") or {})},
    }
    failed = next((s for s in stages if s["status"] not in KEPT), None)
    if manifest.get("status") == "completed" and failed is None and len(kept) == len(stages):
        short = [f"{k} retention {retention.get(k) or 0:.4f} < {v}" for k, v in cfg.min_retention.items()
                 if (retention.get(k) or 0) < v]
        if cfg.max_kl is not None and metrics.get("logit_kl", 0.0) > cfg.max_kl:
            short.append(f"logit_kl {metrics['logit_kl']:.4f} > {cfg.max_kl}")
        out.update(status="constraint_failed" if short else "passed", message="; ".join(short) or None)
    elif failed is not None:
        out.update(status="gate_failed" if failed["status"] == "failed" else "error",
                   failed_stage=failed["name"], message=failed.get("message"))
    else:
        out.update(status="error", message=manifest.get("message"))
    return out


def _source_bytes(manifest: dict[str, Any]) -> int | None:
    source = Path(manifest.get("model", {}).get("resolved", ""))
    return dir_bytes(source) if source.is_dir() else None


def objective(result: dict[str, Any]) -> float:
    """What the sampler minimizes: the objective of a passing trial; a failing one scores ten times its size
    (or its latency), worse than any pass."""
    value = result.get("objective_value") or result.get("size_bytes")
    if value is None:
        return float(1 << 62)
    return float(value) if result["status"] == "passed" else float(value) * FAILED_FACTOR


def _latency(run_dir: Path, result: dict[str, Any], cfg: SearchConfig) -> dict[str, Any]:
    """The passing trial's final artifact measured as `bench` measures it; the objective from it."""
    from compress.bench.run import measure_artifact
    from compress.runs import identify

    o = cfg.objective
    art = identify(run_dir / result["final_artifact"])
    try:
        metrics = measure_artifact(run_dir, Path(art.path), art.kind, o.batch, o.new_tokens, 1, o.repeats)
    except CompressError as e:
        return {"status": "error", "message": f"measuring {o.minimize} failed: {e}"}
    return {"bench": metrics, "objective_value": metrics[o.minimize]}


def run_trial(config: dict[str, Any], settings: dict[str, Any]) -> None:
    """Ray Tune's trainable (function API, wrapped by `tune.with_parameters`): `config` holds the point's
    parameters, `settings` the search's own (folder, search block, recipe)."""
    from ray import tune

    result = execute({**settings, **config})
    tune.report({**{k: v for k, v in result.items() if k != "stages"}, "objective": objective(result)})


def execute(config: dict[str, Any]) -> dict[str, Any]:
    """Run (or read back) one trial; its result, also written to the trial folder's result.json."""
    search_dir, cfg = Path(config["search_dir"]), SearchConfig.model_validate(config["search"])
    point = decode(axes(cfg), config)
    folder = trial_dir(search_dir, point)
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    attempts = _note_attempt(folder)
    t0 = time.time()
    result: dict[str, Any] = {"trial": folder.name, "point": point, "attempts": attempts}
    with open(folder / "log.txt", "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        try:
            result.update(_run(config, cfg, folder, point))
        except CompressError as e:
            result.update(status="error", message=str(e).splitlines()[0], size_bytes=None, metrics={}, retention={})
        except Exception as e:  # a bug, not the point's fault: recorded with its type, never retried by Tune
            result.update(status="error", message=first_line(e), size_bytes=None, metrics={}, retention={})
    result["wall_s"] = round(time.time() - t0, 2)
    atomic_write(done, json.dumps(result, indent=2, default=str))
    return result


def _run(config: dict[str, Any], cfg: SearchConfig, folder: Path, point: dict[str, Any]) -> dict[str, Any]:
    import torch

    from compress.pipeline import run

    search_dir = Path(config["search_dir"])
    data = json.loads(Path(config["recipe_json"]).read_text())
    recipe = write_trial_recipe(folder, data, Path(config["base_dir"]), point,
                                f"trial {folder.name} of the search in {search_dir}\npoint: "
                                f"{json.dumps(point, default=str)}", cfg.cpus_per_trial)
    torch.set_num_threads(cfg.cpus_per_trial)
    run_dir = folder / "run"
    res = run(recipe, out=run_dir, resume=(run_dir / "manifest.json").exists(), threads=cfg.cpus_per_trial,
              share=search_dir)
    result = summarize(read_manifest(res.run_dir), res.run_dir, cfg)
    if cfg.objective.minimize != "size" and result["status"] == "passed":
        result.update(_latency(res.run_dir, result, cfg))
    return result


def _note_attempt(folder: Path) -> int:
    """Which attempt this is (a worker that died is retried in a new one): `worker.json` says where it runs."""
    path = folder / "worker.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    info = {"pid": os.getpid(), "host": socket.gethostname(), "attempt": prev.get("attempt", 0) + 1,
            "ray_node": _node_id()}
    atomic_write(path, json.dumps(info))
    return info["attempt"]


def _node_id() -> str | None:
    with contextlib.suppress(Exception):
        import ray

        return ray.get_runtime_context().get_node_id()
    return None
