"""`vlm-compress eval PATH`: score any artifact with the pipeline's own evaluator, and write nothing.

PATH is a transformers folder (plain, compressed-tensors INT8, bitsandbytes NF4) run in PyTorch, or an
ONNX export folder (export.json) run in ONNX Runtime. The evaluation settings come from `--recipe`
(its `evaluation:` section), from `--reference RUN_DIR` (that run's own recipe), or from flags; flags
override either. With a reference the scores include token agreement and KL against that run's
baseline, and the data must be the very set the baseline was recorded on (checked by content hash).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compress.errors import ConfigError
from compress.runs import identify, load_runner, run_recipe

OVERRIDABLE = ("source", "batch_size", "max_new_tokens", "num_samples", "prompt", "metrics")


def _run_recipe(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    if not (run_dir / "manifest.json").is_file():
        raise ConfigError(f"--reference {run_dir}: not a run folder (no manifest.json)")
    return run_recipe(run_dir)


def evaluation_config(recipe: str | None, reference: str | None, data: str | None,
                      overrides: dict[str, Any]) -> tuple[Any, Path, dict[str, Any] | None]:
    """(EvaluationConfig, base folder for its relative paths, the reference run's manifest or None)."""
    from compress.recipe import EvaluationConfig, load_recipe

    manifest = None
    if recipe is not None:
        loaded = load_recipe(recipe)
        cfg, base = loaded.recipe.evaluation, loaded.base_dir
    elif reference is not None:
        loaded, manifest = _run_recipe(Path(reference))
        cfg, base = loaded.recipe.evaluation, loaded.base_dir
    elif data is not None:
        cfg, base = EvaluationConfig(source=data), Path.cwd()
    else:
        raise ConfigError("nothing to evaluate on: pass --data DIR, --recipe RECIPE or --reference RUN_DIR")
    if reference is not None and manifest is None:
        _, manifest = _run_recipe(Path(reference))
    update = {k: v for k, v in overrides.items() if v is not None and k in OVERRIDABLE}
    if data is not None:
        update["source"] = str(Path(data).resolve())
    if overrides.get("extract") is not None:
        update["extract"] = overrides["extract"]
    if update:
        try:
            cfg = EvaluationConfig.model_validate({**cfg.model_dump(exclude_unset=True), **update})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'evaluation'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"evaluation options: {problems}") from None
    if reference is None:  # token metrics compare to a baseline; without one only answers are scored
        cfg = cfg.model_copy(update={"metrics": [m for m in cfg.metrics if m == "exact_match"] or ["exact_match"]})
    return cfg, base, manifest


def evaluate(path: str | Path, data: str | None = None, recipe: str | None = None, reference: str | None = None,
             providers: list[str] | None = None, threads: int | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Score the artifact at `path`; returns the JSON-able result that `eval --json` prints."""
    import torch
    from safetensors.torch import load_file

    from compress.arch import get_adapter
    from compress.checks.evaluator import Evaluator, Reference
    from compress.data import load_dataset

    artifact = identify(path)
    cfg, base, manifest = evaluation_config(recipe, reference, data, overrides)
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = load_dataset(cfg, base)
    ref = None
    if reference is not None:
        recorded = manifest.get("data", {}).get("evaluation", {}).get("sha256")
        if recorded != dataset.sha256:
            raise ConfigError(f"--reference {reference}: its baseline was recorded on evaluation data "
                              f"{str(recorded)[:12]}…, this evaluation reads {dataset.sha256[:12]}… "
                              f"({dataset.source}); token agreement and KL need the same set")
        ref_file = Path(reference) / "baseline/reference.safetensors"
        if not ref_file.is_file():
            raise ConfigError(f"--reference {reference}: the run has no recorded baseline ({ref_file})")
        ref = Reference(**load_file(str(ref_file)))
    adapter = get_adapter(artifact.model_type)
    adapter.use_prompt(cfg.prompt)
    source = manifest["model"]["resolved"] if manifest else str(artifact.path)
    runner, processor = load_runner(artifact.kind, str(artifact.path), source, adapter, providers, threads)
    ev = Evaluator(adapter, processor, dataset, cfg).evaluate(runner, ref, desc=f"eval ({runner.backend})")
    if ref is None:
        ev.metrics = {k: v for k, v in ev.metrics.items() if k.startswith("exact_match")}
    return {
        "artifact": artifact.path,
        "kind": artifact.kind,
        "backend": runner.backend,
        "model_type": artifact.model_type,
        "metrics": ev.metrics,
        "per_type": ev.per_type,
        "answers": {"budget": ev.budget, "truncated": ev.truncated, "records": len(dataset)},
        "data": {"source": dataset.source, "sha256": dataset.sha256, "records": len(dataset)},
        "evaluation": cfg.model_dump(mode="json"),
        "reference": {"run": str(reference), "baseline": manifest.get("baseline", {}).get("metrics")}
        if reference else None,
        "predictions": ev.predictions,
    }


def summary(result: dict[str, Any]) -> str:
    lines = [f"{result['artifact']} ({result['kind']}, {result['backend']}, {result['model_type']})",
             f"data: {result['data']['source']} ({result['data']['records']} records, "
             f"sha256 {result['data']['sha256'][:12]}…)"]
    lines += [f"  {k}: {v:.4f}" for k, v in result["metrics"].items()]
    answers = result["answers"]
    lines.append(f"  answer budget: {answers['budget']} new tokens; {answers['truncated']} of {answers['records']} "
                 "answers cut by it" + (" (WARNING: scored as cut; raise --max-new-tokens)"
                                        if answers["truncated"] else ""))
    if result["reference"] is None:
        lines.append("  (token_agreement / logit_kl need --reference RUN_DIR: a baseline to compare with)")
    else:
        base = result["reference"]["baseline"] or {}
        if "exact_match" in base and "exact_match" in result["metrics"] and base["exact_match"]:
            lines.append(f"  retention vs {result['reference']['run']} baseline: "
                         f"{result['metrics']['exact_match'] / base['exact_match']:.4f}")
    return "\n".join(lines)
