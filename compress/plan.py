"""Whether a run keeps its model resident or streams it from disk block by block, decided from the
safetensors headers and the memory budget before any weight is read, and the recipe checked against it.

Resident: the model, its evaluation and its checkpoint together need about twice the model's bytes plus
the interpreter's own; above that the run streams. A streamed run takes the stages that walk the model
block by block (calibrated quantization and pruning), scores teacher-forced metrics (generation needs the
whole model) and writes each stage's checkpoint as its blocks finish; anything else is refused here,
naming the field and the budget, before the run folder exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compress import memory
from compress.errors import RecipeError

OVERHEAD = 1 << 30  # the interpreter, torch and transformers themselves
GENERATION_MARGIN = 512 << 20  # a loaded model's generation: activations, KV cache, the loader's transients
RESIDENT_FACTOR = 2  # model + evaluation / checkpoint copies
FLOAT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
TEACHER_FORCED = ("token_agreement", "logit_kl")


@dataclass(frozen=True)
class Plan:
    model_bytes: int
    budget_bytes: int
    budget_from: str  # "resources.max_memory_gb" | "available memory"
    streamed: bool

    def record(self) -> dict[str, Any]:
        return {"mode": "streamed" if self.streamed else "resident",
                "model_gb": round(self.model_bytes / 2**30, 3), "budget_gb": round(self.budget_bytes / 2**30, 3),
                "budget_from": self.budget_from,
                "metrics_not_computed": {"exact_match": why} if (why := self.baseline_generation()) else {}}

    def baseline_generation(self) -> str | None:
        """None if the baseline of a streamed run can generate with the model loaded whole (it fits beside the
        interpreter), else why not. Resident runs always generate."""
        return generation_fits(self.model_bytes, self.budget_bytes, OVERHEAD) if self.streamed else None

    def describe(self) -> str:
        r = self.record()
        if not self.streamed:
            return f"resident: the model ({r['model_gb']} GB) fits the budget ({r['budget_gb']} GB, {self.budget_from})"
        return (f"streamed: the model ({r['model_gb']} GB) is above what the budget ({r['budget_gb']} GB, "
                f"{self.budget_from}) holds resident; blocks are read from disk one at a time, activations "
                "beyond the budget spill to the work folder, gates are teacher-forced")


def generation_fits(model_bytes: int, budget: int, process: int | None = None) -> str | None:
    """None if a model of `model_bytes` (as held in memory) can be loaded beside the process (`process` bytes,
    else its RSS now) and generate within `budget`; else why not (what the report says instead of exact
    match)."""
    process = memory.rss_bytes() if process is None else process
    if process + model_bytes + GENERATION_MARGIN <= budget:
        return None
    return (f"generation loads the model whole: {model_bytes / 2**30:.2f} GB beside the process "
            f"({process / 2**30:.2f} GB) is above the budget ({budget / 2**30:.2f} GB)")


def check_stages(recipe: Any, adapter: Any, source: str, where: str) -> None:
    """Stages the family refuses (`adapter.refuse`) or the model's config rules out (`stage.check_model`, from
    config.json alone) are recipe errors naming the stage, before any weights load."""
    from compress.config import StageConfig

    config = None
    for i, stage in enumerate(recipe.stages):
        reason = adapter.refuse(stage)
        if reason:
            raise RecipeError(f"{where}: stages[{i}]: a '{stage.type}' stage cannot run on {adapter.name} "
                              f"({adapter.model_type}) models: {reason}")
        if type(stage).check_model is not StageConfig.check_model:
            from transformers import AutoConfig

            config = config or AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
            if reason := stage.check_model(config):
                raise RecipeError(f"{where}: stages[{i}]: {reason}")


def plan_run(recipe: Any, source: str, where: str) -> Plan:
    from compress.sequential.weights import WeightSource

    r = recipe
    model_bytes = WeightSource(source).nbytes(float_size=FLOAT_SIZE[r.model.dtype])
    if r.resources.max_memory_gb is not None:
        budget, frm = int(r.resources.max_memory_gb * 2**30), "resources.max_memory_gb"
    else:
        budget, frm = memory.available_bytes() + memory.rss_bytes(), "available memory"
    plan = Plan(model_bytes, budget, frm, RESIDENT_FACTOR * model_bytes + OVERHEAD > budget)
    if plan.streamed:
        _check_streamable(r, where, plan)
    return plan


def _check_streamable(r: Any, where: str, plan: Plan) -> None:
    size = f"the model is {plan.model_bytes / 2**30:.2f} GB at {r.model.dtype}, above what {plan.budget_from} " \
           f"({plan.budget_bytes / 2**30:.2f} GB) holds resident"
    quantized = None
    for i, stage in enumerate(r.stages):
        if not getattr(stage, "streamable", False):
            raise RecipeError(f"{where}: stages[{i}]: a '{stage.type}' stage needs the whole model in memory and "
                              f"{size}; streamed runs take INT8 / INT4 quantize and calibrated prune stages (raise "
                              "resources.max_memory_gb or drop the stage)")
        if quantized is not None:
            raise RecipeError(f"{where}: stages[{i}]: {size}, and a streamed run cannot read back the quantized "
                              f"checkpoint of stages[{quantized}]; make the quantize stage the last one")
        if stage.type == "quantize":
            quantized = i
        if stage.gate.min_retention is not None and stage.gate.metric not in TEACHER_FORCED:
            raise RecipeError(f"{where}: stages[{i}].gate.metric: {stage.gate.metric} needs generation and {size}; "
                              "gate on token_agreement or max_kl")
    missing = [m for m in TEACHER_FORCED if m not in r.evaluation.metrics]
    if len(missing) == len(TEACHER_FORCED):
        raise RecipeError(f"{where}: evaluation.metrics: {size}, so only teacher-forced metrics can be scored; add "
                          "token_agreement or logit_kl")
