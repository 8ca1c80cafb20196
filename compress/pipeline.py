"""The one loop: baseline, then for each stage apply -> evaluate -> gate -> record.

Stages never call each other and never see the run folder's bookkeeping; this module is the only
place that sequences work, decides what a failed gate means, and says when a stage is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from compress import memory, provenance
from compress.arch import adapter_for_source
from compress.artifacts import DONE, KEPT, RunDir, atomic_dir
from compress.baseline import REFERENCE, adopt, baseline_key
from compress.checks.evaluator import Evaluation, Evaluator, Reference
from compress.checks.gate import run_checks
from compress.data import Dataset, load_dataset
from compress.errors import CompressError, ConfigError
from compress.failures import fault, record_run_error, record_stage_error
from compress.lint import describe, lint_folder
from compress.plan import Plan, check_stages, plan_run
from compress.recipe import LoadedRecipe, load_recipe, stage_name
from compress.report import write_report
from compress.residency import Resident, holder
from compress.sequential import calibration_batches, stage_key
from compress.sequential.inputs import calibration_key
from compress.stage_cache import StageCache, prefix_key
from compress.stages.base import StageContext
from compress.stages.catalog import get_stage
from compress.zoo import resolve_source


def log(msg: str) -> None:
    print(f"[vlm-compress] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed" | "stopped" | "error"
    manifest: dict[str, Any] = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "completed"


@dataclass
class _Inputs:
    """Everything resolved and hashed before the run folder is touched."""

    recipe: LoadedRecipe
    source: str
    model_sha256: str
    evaluation: Dataset
    calibration: Dataset | None
    stage_data: dict[int, Dataset] = field(default_factory=dict)  # a stage's own `data:` set (distill)

    def data_hashes(self, upto: int) -> list[str]:
        """What a stage's outcome depends on besides the recipe: the model and data up to stage `upto`."""
        return [self.model_sha256, self.evaluation.sha256, self.calibration.sha256 if self.calibration else "-",
                *(f"{i}:{d.sha256}" for i, d in sorted(self.stage_data.items()) if i <= upto)]

    def sha256(self) -> str:
        parts = [self.recipe.sha256(), self.model_sha256, self.evaluation.sha256,
                 self.calibration.sha256 if self.calibration else "-",
                 *(f"{i}:{d.sha256}" for i, d in sorted(self.stage_data.items()))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resolve(recipe: LoadedRecipe) -> _Inputs:
    r = recipe.recipe
    source = resolve_source(r.model.source, recipe.base_dir)
    log(f"model {r.model.source} -> {source}")
    evaluation = load_dataset(r.evaluation, recipe.base_dir)
    calibration = load_dataset(r.calibration, recipe.base_dir) if r.calibration else None
    stage_data = {i: load_dataset(s.data, recipe.base_dir) for i, s in enumerate(r.stages)
                  if getattr(s, "data", None) is not None}
    return _Inputs(recipe, source, provenance.model_hash(source), evaluation, calibration, stage_data)


def _out_dir(recipe: LoadedRecipe, out: str | Path | None) -> Path:
    if out is None and recipe.recipe.output.dir is None:
        raise ConfigError("no run folder: pass --out DIR or set output.dir in the recipe")
    return Path(out if out is not None else recipe.recipe.output.dir)


def _record_eval(ev: Evaluation, what: str) -> dict[str, Any]:
    if warning := ev.truncation_warning():
        log(f"WARNING {what}: {warning}")
    return ev.record()


def run(recipe: LoadedRecipe | str | Path, out: str | Path | None = None, resume: bool = False,
        force: bool = False, threads: int | None = None, share: Path | None = None,
        stages: bool = True) -> RunResult:
    """Run a recipe end to end. Raises CompressError subclasses for anything the user must fix.

    `threads` (else the recipe's `threads`) sets torch's and ONNX Runtime's CPU threads; it does not
    enter the resume hash (it changes speed, not results), and the manifest records what each attempt used.
    `share`: a folder of work shared with other runs of the same model and evaluation (a search's): the
    baseline of its `baseline/` run folder is adopted instead of measured (`compress.baseline`), stage outcomes
    of runs that began alike are reused from `stages/` (`compress.stage_cache`), calibration inputs from
    `calibration/`. `stages=False` measures the baseline and stops (what a search measures once).
    """
    recipe = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    r = recipe.recipe
    threads = threads or r.threads
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = _out_dir(recipe, out)
    inputs = _resolve(recipe)  # reads data and model config; nothing written yet
    adapter = adapter_for_source(inputs.source, r.model.trust_remote_code)
    # Calibration, evaluation and exports all prompt alike.
    adapter.use_prompt(r.evaluation.prompt, where=f"{recipe.path}: evaluation.prompt")
    check_stages(r, adapter, inputs.source, str(recipe.path))  # before any weights load
    plan = plan_run(r, inputs.source, str(recipe.path))  # resident or streamed, from the headers alone
    log(plan.describe())
    run_dir = RunDir(out_dir)
    resuming = run_dir.open(inputs.sha256(), resume=resume, force=force)  # locks the folder
    try:
        return _execute(recipe, inputs, adapter, run_dir, resuming, threads, plan, share, stages)
    except CompressError as e:  # named failures outside a stage: the manifest says so (unless nothing is kept)
        if run_dir.manifest:
            run_dir.manifest.update(status="error", message=str(e), exit_code=e.exit_code)
            with contextlib.suppress(OSError):
                run_dir.save_manifest()
        raise
    except KeyboardInterrupt:
        if run_dir.manifest:
            run_dir.manifest["status"] = "interrupted"
            run_dir.save_manifest()
        raise
    except Exception as e:
        raise record_run_error(run_dir, e) from e
    finally:
        run_dir.release()


def _execute(recipe: LoadedRecipe, inputs: _Inputs, adapter: Any, run_dir: RunDir, resuming: bool,
             threads: int | None, plan: Plan, share: Path | None, with_stages: bool) -> RunResult:
    """Everything after the run folder is open (and locked): baseline, stages, report."""
    r = recipe.recipe
    _seed_everything(r.seed)
    provenance.start_manifest(recipe, inputs, adapter, run_dir, resuming, threads)
    run_dir.manifest["plan"] = plan.record()
    hold = holder(plan, adapter, r)
    shared = share / "baseline" if share is not None and (share / "baseline").resolve() != run_dir.root.resolve() \
        else None
    model, scoring, state_source = _baseline(recipe, inputs, adapter, run_dir, resuming, hold, shared)
    batches = (calibration_batches(adapter, scoring.processor, inputs.calibration, r.calibration.batch_size,
                                   share / "calibration" if share else None,
                                   calibration_key(inputs.model_sha256, inputs.calibration.sha256,
                                                   r.calibration.batch_size, r.evaluation.prompt, adapter.name))
               if inputs.calibration and (with_stages or share) else None)
    cache = StageCache(share / "stages") if share is not None else None
    status = _stages(model, scoring, inputs, state_source, batches, threads, cache) if with_stages else "completed"
    m = run_dir.manifest
    shutil.rmtree(run_dir.path(".work"), ignore_errors=True)
    m["status"] = status
    m["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    if r.output.report:
        write_report(run_dir)
    m["files"] = run_dir.file_entries()
    run_dir.save_manifest()
    return RunResult(run_dir.root, status, m)


def _baseline(recipe: LoadedRecipe, inputs: _Inputs, adapter: Any, run_dir: RunDir,
              resuming: bool, hold: Resident, shared: Path | None) -> tuple[torch.nn.Module, _Scoring, str]:
    """(the model in its latest kept state, what stages are scored against, where that state was loaded
    from): the baseline is measured on the source, adopted from `shared`, or read back when a resumed run
    recorded it."""
    r, m = recipe.recipe, run_dir.manifest
    # The latest kept state: the source, or on resume the last kept checkpoint.
    state_source = inputs.source
    for rec in m.get("stages", []):
        if rec["status"] in KEPT and rec.get("checkpoint"):
            state_source = str(run_dir.path(rec["checkpoint"]))
    baseline_recorded = resuming and "baseline" in m and run_dir.path(REFERENCE).exists()
    # The source is only needed when the baseline must be measured; otherwise load the latest state once.
    first = inputs.source if not baseline_recorded else state_source
    if first != inputs.source:
        log(f"restoring model state from {first}")
    try:
        model, processor = hold.load(first)
    except CompressError as e:  # corrupt or mismatched weights: leave nothing half-made behind
        if resuming:
            m.update(status="error", message=str(e))
            run_dir.save_manifest()
        else:
            run_dir.discard()
        raise
    if not resuming:
        m["model"].update(model_type=model.config.model_type,
                          parameters=sum(p.numel() for p in model.parameters()))
    evaluator = Evaluator(adapter, processor, inputs.evaluation, r.evaluation)
    m["prompt"], warning = evaluator.prompt_record()
    if warning:
        log(f"WARNING: {warning}")
    key = baseline_key(r, inputs.model_sha256, inputs.evaluation.sha256, m["plan"])
    if shared is not None and not baseline_recorded:
        m["baseline"] = adopt(run_dir, shared, key)
        run_dir.save_manifest()
    if baseline_recorded or shared is not None:
        reference = Reference(**load_file(run_dir.path(REFERENCE)))
        baseline = m["baseline"]["metrics"]
        log(f"baseline ({'shared from ' + str(shared) if shared else 'recorded'}): {baseline}")
    else:
        t0 = time.time()
        with memory.PeakWindow() as window:
            runner = hold.baseline_runner(model, processor, evaluator, run_dir.path(".work/baseline"),
                                          memory.activation_budget(r.resources.max_memory_gb, hold.reserve))
            ev = evaluator.evaluate(runner, desc="baseline")
            getattr(runner, "close", lambda: None)()  # a streamed runner's files
        reference = ev.reference
        with atomic_dir(run_dir.path("baseline")) as tmp:
            save_file(reference.tensors(), str(tmp / "reference.safetensors"))
        baseline = ev.metrics
        m["baseline"] = {**_record_eval(ev, "baseline"), "wall_s": round(time.time() - t0, 2), **window.record(),
                         "key": key}
        run_dir.save_manifest()
        log(f"baseline: {baseline}")
        fault("baseline")
    # A resumed run whose baseline had to be measured now moves to its latest kept state.
    if first != state_source:
        log(f"restoring model state from {state_source}")
        model, _ = hold.load(state_source)
    return model, _Scoring(run_dir, r, adapter, processor, evaluator, reference, baseline, hold), state_source


def _stages(model: torch.nn.Module, scoring: _Scoring, inputs: _Inputs, state_source: str,
            batches: list[dict[str, Any]] | None, threads: int | None, cache: StageCache | None) -> str:
    """Every stage not done yet, in order; the run's status (completed, stopped or error)."""
    run_dir, r = scoring.run_dir, scoring.recipe
    m = run_dir.manifest
    status, reloaded = "completed", True
    for i, cfg in enumerate(r.stages):
        name = stage_name(cfg, i)
        prev = run_dir.stage_record(i)
        if prev and prev["status"] in DONE:
            log(f"stage {name}: already {prev['status']}, skipped")
            continue
        rec: dict[str, Any] = {"index": i, "name": name, "type": cfg.type, "status": "running",
                               "started": datetime.now(UTC).isoformat(timespec="seconds")}
        key = prefix_key(r.model_dump(mode="json"), inputs.data_hashes(i), i) if cache else ""
        if cache and (hit := cache.adopt(key, run_dir, rec)):  # a run that began alike already did it
            run_dir.set_stage_record(hit)
            log(f"stage {name}: {hit['status']} (outcome reused from {hit['reused_from']})")
            if hit.get("checkpoint"):
                state_source, reloaded = str(run_dir.path(hit["checkpoint"])), False
                if r.output.checkpoints == "last":
                    run_dir.drop_checkpoints_before(i)
            if hit["status"] == "failed":
                return "stopped"
            continue
        if not reloaded:  # the latest state is a reused checkpoint: load it for this stage
            model, reloaded = scoring.hold.load(state_source)[0], True
        log(f"stage {name} ({cfg.type}): applying")
        run_dir.set_stage_record(rec)
        t0 = time.time()
        exports = [s["artifacts"] for s in m.get("stages", []) if s["status"] in KEPT
                   and s.get("artifacts") and s["index"] < i]
        ctx = StageContext(adapter=scoring.adapter, processor=scoring.processor,
                           workdir=run_dir.path(f".work/{name}"), seed=r.seed,
                           calibration_batches=[scoring.adapter.follow_tokens(scoring.processor, b) for b in batches]
                           if batches else batches,
                           layer_inputs=r.calibration.layer_inputs if r.calibration else "original",
                           activation_budget=memory.activation_budget(r.resources.max_memory_gb, scoring.hold.reserve),
                           threads=threads, export_dir=run_dir.path(exports[-1]) if exports else None,
                           calibration=inputs.stage_data.get(i, inputs.calibration),
                           baseline_source=inputs.source, dtype=r.model.dtype,
                           answer_logits=scoring.evaluator.answer_logits,
                           stage_key=stage_key(cfg.model_dump(mode="json"), state_source),
                           fault_point=lambda i=i: fault(f"mid:{i}"))
        window = memory.PeakWindow()
        try:
            with window:
                model, state_source, status = _run_stage(model, cfg, i, rec, ctx, scoring, state_source, window)
        except Exception as e:  # recorded, reported, and the run ends here; --resume retries the stage
            rec.update(window.record())
            record_stage_error(run_dir, rec, e, ctx.workdir, time.time() - t0)
            status = "error"
        else:  # on record: its unit-by-unit progress is no longer needed
            shutil.rmtree(ctx.workdir / "progress", ignore_errors=True)
            if cache:
                cache.offer(key, run_dir, rec)
        if status in ("stopped", "error"):
            break
    return status


@dataclass
class _Scoring:
    """What every stage of one run is scored against and kept with."""

    run_dir: RunDir
    recipe: Any
    adapter: Any
    processor: Any
    evaluator: Evaluator
    reference: Reference
    baseline: dict[str, float]
    hold: Resident  # where the model lives (resident or streamed; compress.residency)


def _run_stage(model: torch.nn.Module, cfg: Any, i: int, rec: dict[str, Any], ctx: StageContext, run: _Scoring,
               state_source: str, window: memory.PeakWindow) -> tuple[torch.nn.Module, str, str]:
    """apply -> evaluate -> gate -> keep / roll back / stop, for one stage. Returns (model, state, status)."""
    run_dir, r, name = run.run_dir, run.recipe, rec["name"]
    t0 = time.time()
    status = "completed"
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    fault(f"apply:{i}")
    run.hold.prepare(ctx, run.evaluator)
    result = get_stage(cfg.type).apply(model, cfg, ctx)
    model = result.model
    if restored := result.details.get("sequential", {}).get("restored_units"):
        log(f"stage {name}: {restored} units restored from the killed attempt's saved progress (not recomputed)")
    fault(f"after_apply:{i}")
    scored = result.runner or run.hold.stage_runner(model, run.processor)
    ev = run.evaluator.evaluate(scored, run.reference, desc=f"{name} ({scored.backend})")
    getattr(scored, "close", lambda: None)()
    rec["backend"] = scored.backend
    if skipped := {k: v for k, v in getattr(scored, "not_computed", {}).items() if k in r.evaluation.metrics}:
        rec["metrics_not_computed"] = skipped
    checks = run_checks(cfg.gate, run.baseline, ev.metrics) + list(result.checks)
    passed = all(c.passed for c in checks)
    rec.update(_record_eval(ev, f"stage {name}"), checks=[c.to_dict() for c in checks], details=result.details)
    if passed or cfg.gate.on_fail == "warn":
        rel = f"stages/{name}"
        if result.artifacts is not None:  # an export: keep its files; the torch state is unchanged
            dest = run_dir.path(rel)
            if dest.exists():  # left by a killed attempt; the manifest never claimed it
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(result.artifacts, dest)  # same file system: one rename
            rec["artifacts"] = rel
        else:
            run.hold.keep(model, run.processor, run_dir.path(rel))
            rec["checkpoint"] = rel
        rec["deploy_lint"] = lint_folder(run_dir.path(rel), fix=r.output.deploy_fix)
        for finding in rec["deploy_lint"]:
            log(f"stage {name}: deploy lint: {describe(finding)}")
        fault(f"after_checkpoint:{i}")
        shutil.rmtree(run_dir.path(f"failed/{name}"), ignore_errors=True)  # an earlier attempt's leftovers
        rec.update(status="completed" if passed else "warned", files=run_dir.file_entries(rel))
        if not passed:
            rec["message"] = "gate failed; continuing because on_fail is 'warn'"
            log(f"WARNING stage {name}: gate failed ({_failed(checks)}); continuing (on_fail: warn)")
        if r.output.checkpoints == "last":
            run_dir.drop_checkpoints_before(i)
    elif cfg.gate.on_fail == "rollback":
        rec.update(status="rolled_back",
                   message=f"gate failed ({_failed(checks)}); state rolled back to the previous stage")
        log(f"stage {name}: gate failed ({_failed(checks)}); rolling back")
        del model
        model, _ = run.hold.load(state_source)
    else:
        rec.update(status="failed", message=f"gate failed ({_failed(checks)}); run stopped (on_fail: stop)")
        status = "stopped"
    rec["wall_s"] = round(time.time() - t0, 2)
    window.stop()  # the peak so far: apply, evaluate, checkpoint
    rec.update(window.record())
    run_dir.set_stage_record(rec)
    fault(f"recorded:{i}")  # a stage boundary: this stage is on record, the next not begun
    if rec.get("checkpoint"):
        state_source = str(run_dir.path(rec["checkpoint"]))
    log(f"stage {name}: {rec['status']} {ev.metrics}")
    if status == "stopped":
        log(f"STOPPED at stage {name}: {rec['message']}")
    return model, state_source, status


def _failed(checks) -> str:
    return ", ".join(f"{c.metric} {c.value:.4f}" + (f", retention {c.retention:.4f} < {c.threshold}"
                                                   if c.retention is not None else f" vs threshold {c.threshold}")
                     for c in checks if not c.passed)
