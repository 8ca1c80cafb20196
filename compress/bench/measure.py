"""The subprocess that measures one artifact of a run (or, kind "reference", only the imports and inputs), so
each artifact's peak RSS and thread pools are its own. Run as `python -m compress.bench.measure ARGS_JSON`;
prints one JSON line."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from compress.bench.timing import med_ms, timed
from compress.errors import CompressError
from compress.runs import load_runner, run_recipe


def measure_one(runner: Any, processor: Any, adapter: Any, images: list, questions: list[str], new_tokens: int,
                warmup: int, repeats: int) -> dict[str, float]:
    """Vision at batch 1, then image -> answer at the full batch; timings from the runner's own hooks."""
    one = adapter.build_inputs(processor, images[:1], questions[:1]).inputs
    # onnxruntime-genai runs the vision graph inside its generator: no separate vision timing
    vision = timed(lambda: runner.image_features(one), warmup, repeats) if hasattr(runner, "image_features") else None
    runs: list[dict[str, float]] = []

    def answer() -> None:
        t0 = time.perf_counter()
        enc = adapter.build_inputs(processor, images, questions).inputs
        t1 = time.perf_counter()
        tokens = runner.generate(enc, new_tokens, ignore_eos=True)
        processor.tokenizer.batch_decode(tokens)
        if [len(t) for t in tokens] != [new_tokens] * len(images):
            raise CompressError(f"ignore_eos did not give {new_tokens} tokens per row: {[len(t) for t in tokens]}")
        runs.append({"preprocess": t1 - t0, "e2e": time.perf_counter() - t0, **runner.timings})

    timed(answer, warmup, repeats)
    runs = runs[warmup:]
    step_s = statistics.median(r["decode_s"] / r["decode_steps"] for r in runs)
    return {
        "vision_ms_per_image": med_ms(vision) if vision is not None else None,
        "ttft_ms": med_ms([r["first_token_s"] for r in runs]),
        "decode_ms_per_step": step_s * 1000,
        "decode_tokens_per_s": len(images) / step_s,
        "preprocess_ms": med_ms([r["preprocess"] for r in runs]),
        "e2e_ms": med_ms([r["e2e"] for r in runs]),
        "e2e_spread_ms": (max(r["e2e"] for r in runs) - min(r["e2e"] for r in runs)) * 1000,
    }


def eval_inputs(run_dir: Path, batch: int, adapter: Any = None) -> tuple[list, list[str]]:
    """The first `batch` image + prompt pairs of the run's own evaluation set, read as the run read it;
    `adapter` (when given) also gets the run's `evaluation.prompt`, so prompts are built as the run built them."""
    from compress.data import load_dataset

    loaded, _ = run_recipe(run_dir)
    cfg = loaded.recipe.evaluation.model_copy(update={"num_samples": batch, "shuffle": False})
    data = load_dataset(cfg, loaded.base_dir)
    if len(data.records) < batch:
        raise CompressError(f"--batch {batch}: the evaluation set has only {len(data.records)} records")
    if adapter is not None:
        adapter.use_prompt(loaded.recipe.evaluation.prompt, "evaluation.prompt")
    return [r.image for r in data.records], [r.prompt for r in data.records]


def _child(args: dict[str, Any]) -> None:
    """Subprocess entry: measure one artifact (or, kind "reference", nothing) and print one JSON line."""
    import torch

    from compress.arch import get_adapter

    run_dir = Path(args["run_dir"])
    adapter = get_adapter(args["model_type"])
    images, questions = eval_inputs(run_dir, args["batch"], adapter)
    import onnxruntime  # noqa: F401  (the reference process imports what every artifact process does)
    import transformers  # noqa: F401

    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if args["kind"] != "reference":
        t0 = time.perf_counter()
        runner, processor = load_runner(args["kind"], args["path"], args["source"], adapter, args["providers"])
        result["load_s"] = time.perf_counter() - t0
        result.update(measure_one(runner, processor, adapter, images, questions, args["new_tokens"], args["warmup"],
                                  args["repeats"]))
        result["providers"] = list(getattr(runner, "providers", ["torch-cpu"]))
        result.update(_decode_bytes(runner, args["path"], adapter, processor, images, questions, args["new_tokens"]))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(json.dumps(result))


def _decode_bytes(runner: Any, path: str, adapter: Any, processor: Any, images: list, questions: list[str],
                  new_tokens: int) -> dict[str, int]:
    """Bytes one decode step reads: decoder weights, and the KV cache of the batch at mid-answer."""
    from compress.bench.floor import kv_bytes, onnx_weight_bytes, torch_decoder_bytes

    enc = adapter.build_inputs(processor, images, questions).inputs
    tokens = int(enc["input_ids"].shape[1]) + new_tokens // 2
    if hasattr(runner, "meta"):
        meta = runner.meta
        weights = onnx_weight_bytes(Path(path) / meta["graphs"]["decoder"])
        facts, width = meta, 2 if meta.get("dtype") == "float16" else 4
    else:
        from compress.export.wrappers import decoder_facts

        weights, facts = torch_decoder_bytes(runner.model, adapter), decoder_facts(runner.model)
        width = runner.model.dtype.itemsize
    return {"decode_weight_bytes": weights, "decode_kv_bytes": kv_bytes(facts, tokens, len(images), width)}


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
