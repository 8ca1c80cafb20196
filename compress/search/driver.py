"""The search driver: the shared baseline, Ray (local in-process, or a cluster by address), one Ray Tune experiment
whose trials are `compress.search.trial.run_trial`, `--resume` through Tune's own experiment state, and the
report. Ray Tune schedules, retries dead workers and samples; nothing here does."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from compress.artifacts import atomic_write
from compress.errors import ConfigError, RecipeError
from compress.recipe import LoadedRecipe, load_recipe, parse_recipe
from compress.search.config import SearchConfig
from compress.search.space import absolute_sources, apply, axes, decode, trial_count
from compress.search.trial import trial_dir

EXPERIMENT = "tune"  # Ray Tune's experiment folder inside the search folder


def log(msg: str) -> None:
    print(f"[vlm-compress search] {msg}", file=sys.stderr, flush=True)


def search(recipe_path: str | Path, out: str | Path, address: str | None = None, max_trials: int | None = None,
           max_concurrent: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the recipe's search; returns the summary `report.write_report` wrote (winner, trials)."""
    from compress.search.report import write_report

    loaded = load_recipe(recipe_path)
    cfg = _settings(loaded, max_trials, max_concurrent)
    out = Path(out).resolve()
    _check_out(out, resume)
    created, started = not out.exists(), False
    _ray_environment(address)
    try:
        _init_ray(address, max(os.cpu_count() or 1, cfg.max_concurrent * cfg.cpus_per_trial), out)
        gpus = _gpus_per_trial(loaded, cfg)  # before anything of the search is written
        started = True
        with _locked(out):
            data = yaml.safe_load(loaded.text)
            _record_search(out, loaded, resume)
            baseline = _baseline(loaded, data, out)
            t0 = time.time()
            results = _tune(loaded, cfg, data, out, resume, gpus)
            return write_report(out, loaded, cfg, results, baseline, time.time() - t0)
    finally:
        import ray  # imported by _init_ray, after the environment Ray reads at import

        ray.shutdown()
        if created and not started:  # refused: Ray's session files were all it left
            shutil.rmtree(out, ignore_errors=True)


def _settings(loaded: LoadedRecipe, max_trials: int | None, max_concurrent: int | None) -> SearchConfig:
    cfg = loaded.recipe.search
    if cfg is None:
        raise RecipeError(f"{loaded.path}: no 'search' block; add one (docs/search.md) or use `vlm-compress run`")
    update: dict[str, Any] = {}
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be at least 1, got {max_concurrent}")
        update["max_concurrent"] = max_concurrent
    if max_trials is not None:
        if max_trials < 1:
            raise ConfigError(f"--max-trials must be at least 1, got {max_trials}")
        update["max_trials"] = max_trials
    cfg = SearchConfig.model_validate({**cfg.model_dump(), **update})
    if cfg.algorithm == "grid" and cfg.max_trials is not None:
        n = trial_count(cfg)
        if n > cfg.max_trials:
            raise ConfigError(f"the grid has {n} points, above --max-trials {cfg.max_trials}")
    return cfg


def _check_out(out: Path, resume: bool) -> None:
    """A new search needs an empty or absent folder, `--resume` an existing search."""
    if out.exists() and any(out.iterdir()) and not resume and not (out / "search.json").exists():
        raise ConfigError(f"--out {out} exists and is not a search folder; nothing written")
    if (out / "search.json").exists() and not resume:
        raise ConfigError(f"{out} already holds a search; pass --resume to finish it, or another --out")
    if resume and not (out / "search.json").exists():
        raise ConfigError(f"--resume: {out} holds no search to resume")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One driver per search folder."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: another search is running in this folder") from None
        yield


def _record_search(out: Path, loaded: LoadedRecipe, resume: bool) -> None:
    path = out / "search.json"
    if resume:
        prev = json.loads(path.read_text())
        if prev["recipe_sha256"] != loaded.sha256():
            raise ConfigError(f"--resume: {loaded.path} changed since the search in {out} began (its recipe hash "
                              "differs); resume with the recipe it began with, or start a new --out")
        log(f"resuming the search in {out}")
        return
    atomic_write(out / "recipe.yaml", loaded.text)
    atomic_write(path, json.dumps({"recipe": str(loaded.path), "recipe_sha256": loaded.sha256(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))


def _baseline(loaded: LoadedRecipe, data: dict[str, Any], out: Path) -> dict[str, Any]:
    """The baseline every trial adopts: measured once, into `<search>/baseline` (a run folder without stages);
    the calibration inputs are built there once too, into `<search>/calibration`."""
    from compress.pipeline import run
    from compress.runs import read_manifest

    folder = out / "baseline"
    measured = read_manifest(folder) if (folder / "manifest.json").exists() else {}
    if measured.get("status") == "completed":
        log(f"baseline: already measured in {folder}")
        return measured["baseline"]
    log(f"baseline: measuring once for every trial, into {folder}")
    text = yaml.safe_dump(absolute_sources(apply(data, {}), loaded.base_dir), sort_keys=False)
    base = parse_recipe(text, loaded.path)
    result = run(base, out=folder, resume=(folder / "manifest.json").exists(), stages=False, share=out)
    return result.manifest["baseline"]


def _loopback(address: str | None) -> bool:
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0]
    return address is None or host == "localhost" or host.startswith("127.")


def _ray_environment(address: str | None) -> None:
    """Ray reads these when it is imported, so they are set before: no usage stats, Tune's console table off
    (one line per trial instead), and for the local in-process Ray — or a cluster on this machine's loopback —
    nodes on 127.0.0.1 (Ray otherwise swaps 127.0.0.1 for the machine's routable address and listens on every
    interface)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if _loopback(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is None:
        # Loopback only, so Ray's token auth (which would write ~/.ray/auth_token) is not needed.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _init_ray(address: str | None, cpus: int, out: Path) -> None:
    import ray

    if address is None:
        # Ray's session files (logs, sockets) in the search folder; its socket paths must stay under the OS's
        # 107-byte limit, so a deep folder falls back to Ray's default (/tmp/ray).
        temp = out / ".ray"
        ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                       object_store_memory=256 * 2**20, configure_logging=False,
                       **({"_temp_dir": str(temp)} if len(str(temp)) <= 40 else {}))
        ips = {n["NodeManagerAddress"] for n in ray.nodes()}
        if ips != {"127.0.0.1"}:  # Ray was imported before the environment above was set
            ray.shutdown()
            raise ConfigError(f"local Ray came up on {sorted(ips)}, not 127.0.0.1; run the search in a fresh "
                              "process (or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray)")
        log(f"local Ray started in-process on 127.0.0.1 ({cpus} CPUs)")
    else:
        ctx = ray.init(address=address, log_to_driver=False, configure_logging=False)
        res = ray.cluster_resources()
        log(f"connected to the Ray cluster at {address}: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, "
            f"{res.get('GPU', 0):g} GPUs")
    if getattr(ctx, "dashboard_url", None):
        log(f"Ray dashboard: http://{ctx.dashboard_url}")


def _tune(loaded: LoadedRecipe, cfg: SearchConfig, data: dict[str, Any], out: Path, resume: bool,
          gpus: float) -> list[dict[str, Any]]:
    from ray import tune

    from compress.search.trial import run_trial

    recipe_json = out / "recipe.json"  # the recipe mapping every trial applies its point to
    if not recipe_json.exists():
        atomic_write(recipe_json, json.dumps(data))
    settings = {"search_dir": str(out), "search": cfg.model_dump(mode="json"), "recipe_json": str(recipe_json),
                "base_dir": str(loaded.base_dir)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings),
                                    {"cpu": cfg.cpus_per_trial, "gpu": gpus})
    exp = out / EXPERIMENT
    if resume and tune.Tuner.can_restore(str(exp)):
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(cfg), tune_config=_tune_config(cfg),
                           run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0,
                                                     failure_config=tune.FailureConfig(cfg.max_failures),
                                                     callbacks=[_progress(cfg, trial_count(cfg))]))
    return [_collect(out, cfg, r) for r in tuner.fit()]


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider",
                 "ROCMExecutionProvider", "MIGraphXExecutionProvider", "DmlExecutionProvider")


def _gpus_per_trial(loaded: LoadedRecipe, cfg: SearchConfig) -> float:
    """`gpus_per_trial`, else one GPU when a stage (or a choice of the space) scores on a GPU execution
    provider; refused when the cluster has fewer GPUs than one trial needs (Tune would wait forever)."""
    import ray

    text = loaded.text
    need = cfg.gpus_per_trial or (1.0 if any(p in text for p in GPU_PROVIDERS) else 0.0)
    have = ray.cluster_resources().get("GPU", 0.0)
    if need > have:
        why = "search.gpus_per_trial" if cfg.gpus_per_trial else "a stage scores on a GPU execution provider"
        raise ConfigError(f"each trial needs {need:g} GPU(s) ({why}) and the Ray cluster has {have:g}; run the "
                          "search where GPUs are (--address) or score on CPUExecutionProvider")
    if need:
        log(f"each trial gets {need:g} GPU(s)")
    return need


def _param_space(cfg: SearchConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for a in axes(cfg):
        if cfg.algorithm == "grid":
            space[a.key] = tune.grid_search(a.grid())
        elif a.choices is not None:
            space[a.key] = tune.choice(list(range(len(a.choices))))
        else:
            r = a.range
            lo, hi = (r.min, r.max)
            space[a.key] = (tune.randint(int(lo), int(hi) + 1) if r.integer and not r.log
                            else tune.loguniform(lo, hi) if r.log else tune.uniform(lo, hi))
    return space


def _tune_config(cfg: SearchConfig) -> Any:
    from ray import tune

    alg = None
    if cfg.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    elif cfg.algorithm == "random":
        from ray.tune.search import BasicVariantGenerator

        alg = BasicVariantGenerator(random_state=cfg.seed)
    return tune.TuneConfig(metric="objective", mode="min", search_alg=alg,
                           num_samples=1 if cfg.algorithm == "grid" else cfg.max_trials,
                           max_concurrent_trials=cfg.max_concurrent)


def _progress(cfg: SearchConfig, total: int) -> Any:
    from ray.tune import Callback

    class Progress(Callback):
        """One line per finished trial (Tune's own table is off)."""

        done = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            r = trial.last_result or {}
            size = (f"{r['size_bytes'] / 2**20:.2f} MiB" if r.get("size_bytes")
                    else f"at stage {r['failed_stage']}" if r.get("failed_stage") else "no artifact")
            kept = ", ".join(f"{k} {v:.4f}" for k, v in (r.get("retention") or {}).items() if v is not None)
            why = f": {r['message']}" if r.get("message") and r.get("status") != "passed" else ""
            log(f"trial {self.done}/{total} {r.get('trial', trial.trial_id)} {r.get('status')} {size} "
                f"retention {kept or '-'} ({r.get('wall_s', 0):.0f} s){why}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            log(f"trial {self.done}/{total} {trial.trial_id} error: its worker died "
                f"{trial.run_metadata.num_failures} time(s) (retries: {cfg.max_failures})")

    return Progress()


def _collect(out: Path, cfg: SearchConfig, r: Any) -> dict[str, Any]:
    """A trial's result.json, or what Tune knows when the trial never wrote one (its worker kept dying)."""
    point = decode(axes(cfg), r.config)
    folder = trial_dir(out, point)
    path = folder / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    message = f"its worker died and retries ran out ({str(r.error).splitlines()[0] if r.error else 'no result'})"
    return {"trial": folder.name, "point": point, "status": "error", "message": message, "size_bytes": None,
            "metrics": {}, "retention": {}, "wall_s": None}
