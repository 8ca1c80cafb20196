"""`vlm-compress bench RUN_DIR`: latency, throughput, memory and size of every artifact in a run.

Why it is built this way:

- Each artifact (the source model, every kept checkpoint, every export) is measured in its own fresh
  subprocess, so its peak RSS (`ru_maxrss` at the end) is its own and one artifact's allocator state
  or thread pools cannot slow the next. A reference subprocess that imports the same libraries and
  loads the same inputs, but no model, gives the floor that `net_rss_mb` subtracts.
- All artifacts run on the same inputs (the first `batch` records of the run's evaluation set) and
  generate exactly `new_tokens` tokens (EOS ignored), so output length cannot favour anyone.
- Warm-ups are excluded; every number is the median of the repeats.
- Ratios are against the source model measured in the same invocation on the same machine.
- Results go to RUN_DIR/bench/ (atomically) and nowhere else; the manifest is not touched.

What each metric is:

- `vision_ms_per_image`: the vision tower + projector alone on one image (batch 1).
- `ttft_ms`: time to first token inside `generate` (vision + embedding + prefill + first argmax) at
  the bench batch size; from the runner's `timings`.
- `decode_tokens_per_s`: rows x decode steps / decode seconds, i.e. tokens per second after the
  first one (per-step time is `decode_ms_per_step`).
- `e2e_ms`: image -> answer text: processor (image preprocessing, tokenization) + `generate` +
  detokenization, for the whole batch; `preprocess_ms` is the processor's share, on its own.
- `decode_floor_ms` / `decode_x_floor`: what one decode step must read (decoder weights once, the KV cache
  of every row at the middle of the answer) over the memory bandwidth (compress.floor: the fastest of the
  copies taken before the artifacts and after each one measured in this invocation), and the measured step as
  a multiple of it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compress.artifacts import atomic_write
from compress.errors import CompressError
from compress.host import cpu_features

# Metrics every measured artifact has; lower is better except decode_tokens_per_s.
METRICS = ("vision_ms_per_image", "ttft_ms", "decode_tokens_per_s", "decode_ms_per_step", "e2e_ms",
           "peak_rss_mb", "net_rss_mb")


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str  # "torch" | "onnx"
    path: str
    bytes: int


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.exists():
        raise CompressError(f"{run_dir} is not a run folder (no manifest.json)")
    return json.loads(path.read_text())


def artifacts(run_dir: Path) -> list[Artifact]:
    """The source model, then every completed/warned stage's checkpoint and export folder, in order."""
    m = _manifest(run_dir)
    source = Path(m["model"]["resolved"])
    if not source.is_dir():
        raise CompressError(f"the run's source model {source} is not a local folder; bench needs it")
    out = [Artifact("source", "torch", str(source), _dir_bytes(source))]
    for rec in m.get("stages", []):
        if rec["status"] not in ("completed", "warned"):
            continue
        for key, kind in (("checkpoint", "torch"), ("artifacts", "onnx")):
            if rec.get(key) and (run_dir / rec[key]).is_dir():
                path = run_dir / rec[key]
                out.append(Artifact(rec["name"], kind, str(path), _dir_bytes(path)))
    return out


def machine() -> dict[str, Any]:
    """Where the numbers came from: CPU model, cores, library versions, default thread counts."""
    import onnxruntime
    import torch

    cpu = cpu_features()["model"] or platform.processor() or ""
    return {"cpu": cpu, "cpu_flags": cpu_features()["flags"], "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime_threads": "default (intra_op_num_threads=0: one per physical core)",
            "onnxruntime_providers": onnxruntime.get_available_providers()}


# ---- one artifact (runs in a subprocess) ------------------------------------------------------------


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds per call for `repeats` calls after `warmup` untimed ones (warm-up pays for lazy init)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median milliseconds per call, warm-up excluded: the one timer bench and the benchmarks share."""
    return statistics.median(timed(fn, warmup, repeats)) * 1000


def _med_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def load_runner(kind: str, path: str, source: str, adapter: Any, providers: list[str] | None,
                threads: int | None = None) -> tuple[Any, Any]:
    """(runner, processor) for a torch checkpoint or an ONNX export folder."""
    if kind == "torch":
        from compress.checkpoint import load_checkpoint
        from compress.runtime.torch_runner import TorchRunner

        model, processor = load_checkpoint(path, adapter)
        return TorchRunner.for_adapter(model, adapter, processor), processor
    from compress.runtime.ort_runner import OrtRunner, session_options

    runner = OrtRunner.from_dir(path, providers=providers,
                                session_options=session_options(threads) if threads else None)
    # Export stages save the processor beside the graphs; older exports fall back to the source's.
    has_own = (Path(path) / "processor_config.json").exists() or (Path(path) / "preprocessor_config.json").exists()
    processor = adapter.load_processor(path if has_own else source)
    processor.tokenizer.padding_side = "left"
    return runner, processor


def measure_one(runner: Any, processor: Any, adapter: Any, images: list, questions: list[str], new_tokens: int,
                warmup: int, repeats: int) -> dict[str, float]:
    """Vision at batch 1, then image -> answer at the full batch; timings from the runner's own hooks."""
    one = adapter.build_inputs(processor, images[:1], questions[:1]).inputs
    vision = timed(lambda: runner.image_features(one), warmup, repeats)
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
        "vision_ms_per_image": _med_ms(vision),
        "ttft_ms": _med_ms([r["first_token_s"] for r in runs]),
        "decode_ms_per_step": step_s * 1000,
        "decode_tokens_per_s": len(images) / step_s,
        "preprocess_ms": _med_ms([r["preprocess"] for r in runs]),
        "e2e_ms": _med_ms([r["e2e"] for r in runs]),
        "e2e_spread_ms": (max(r["e2e"] for r in runs) - min(r["e2e"] for r in runs)) * 1000,
    }


def run_recipe(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """(the run's LoadedRecipe, its manifest): the recipe text the run kept, resolved where it was written
    (relative data paths resolve against the recipe's own folder)."""
    from compress.recipe import parse_recipe

    m = _manifest(run_dir)
    where = Path(m.get("recipe", {}).get("path") or run_dir / "recipe.yaml")
    return parse_recipe((run_dir / "recipe.yaml").read_text(encoding="utf-8"), where), m


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
    from compress.floor import kv_bytes, onnx_weight_bytes, torch_decoder_bytes

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


def _spawn(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "compress.bench", json.dumps(args)], capture_output=True, text=True,
                          env=env, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise CompressError(f"exit {proc.returncode}: {tail}")
    return json.loads(lines[-1])


# ---- the whole run ---------------------------------------------------------------------------------


def bench(run_dir: str | Path, batch: int = 1, new_tokens: int = 16, warmup: int = 2, repeats: int = 5,
          providers: list[str] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every artifact of a run; write RUN_DIR/bench/bench.{json,md,png}; return the result."""
    if new_tokens < 2:
        raise CompressError("--new-tokens must be at least 2 (decode speed needs tokens after the first)")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise CompressError("--batch and --repeats must be at least 1, --warmup at least 0")
    run_dir = Path(run_dir).resolve()
    arts = artifacts(run_dir)
    m = _manifest(run_dir)
    common = {"run_dir": str(run_dir), "source": arts[0].path, "model_type": m["model"]["model_type"],
              "batch": batch, "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats, "providers": providers}
    log = log or (lambda msg: None)
    log("reference process (imports + inputs, no model)")
    try:
        reference = _spawn({**common, "kind": "reference", "path": ""})
    except CompressError as e:
        raise CompressError(f"bench: the reference process failed ({e})") from None
    from compress.floor import best_bandwidth, floor_ms, memory_bandwidth

    samples = [memory_bandwidth()]  # one before the artifacts, one after each measured: the floor takes the fastest
    log(f"memory bandwidth: {samples[0]['copy_gb_s']} GB/s (STREAM-style copy)")
    rows: list[dict[str, Any]] = []
    for art in arts:
        log(f"{art.name} ({art.kind})")
        try:
            metrics = _spawn({**common, "kind": art.kind, "path": art.path})
        except CompressError as e:
            if art.name == "source":
                raise CompressError(f"bench: measuring the source model failed ({e})") from None
            rows.append({**asdict(art), "error": str(e)})
            continue
        metrics["net_rss_mb"] = metrics["peak_rss_mb"] - reference["peak_rss_mb"]
        rows.append({**asdict(art), **metrics})
        samples.append(memory_bandwidth())
    bandwidth = best_bandwidth(samples)
    log(f"memory bandwidth: {bandwidth['samples_gb_s']} GB/s; the floor divides by the fastest")
    base = rows[0]
    for row in rows:
        if "error" not in row:
            row["decode_floor_ms"] = floor_ms(row["decode_weight_bytes"] + row["decode_kv_bytes"], bandwidth)
            row["decode_x_floor"] = row["decode_ms_per_step"] / row["decode_floor_ms"]
            row["ratios"] = {k: row[k] / base[k] for k in (*METRICS, "bytes") if base.get(k)}
    result = {"run": str(run_dir),
              "settings": {"batch": batch, "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats,
                           "providers": providers or ["CPUExecutionProvider"], "ignore_eos": True,
                           "statistic": "median"},
              "machine": machine(), "memory_bandwidth": bandwidth, "reference_rss_mb": reference["peak_rss_mb"],
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "artifacts": rows}
    out = run_dir / "bench"
    atomic_write(out / "bench.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "bench.md", markdown(result))
    atomic_write(out / "bench.png", chart(result))
    return result


def _cell(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    ratio = row["ratios"].get(key)
    return f"{row[key] * scale:{fmt}}" + (f" ({ratio:.2f}×)" if ratio is not None and row["name"] != "source" else "")


def markdown(result: dict[str, Any]) -> str:
    """The table `vlm-compress bench` prints and writes to bench.md (ratios vs the source in brackets)."""
    s, mach = result["settings"], result["machine"]
    lines = [f"# Benchmark: {result['run']}", "",
             f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), "
             f"onnxruntime {mach['onnxruntime']} ({', '.join(s['providers'])}). Batch {s['batch']}, "
             f"{s['new_tokens']} new tokens per row (EOS ignored), median of {s['repeats']} after "
             f"{s['warmup']} warm-up call(s). Ratios vs the source model in brackets (decode: >1 is faster, "
             f"others: <1 is better). Net RSS = peak RSS - {result['reference_rss_mb']:.0f} MB of a process "
             f"that imports the same libraries and loads the inputs but no model. Decode floor: bytes a step "
             f"reads / {result['memory_bandwidth']['copy_gb_s']} GB/s (STREAM-style copy on this machine, the "
             f"fastest of {len(result['memory_bandwidth'].get('samples_gb_s', [0]))} taken during the run); "
             "preprocessing (processor) is part of e2e and shown apart.", "",
             "| artifact | kind | size MB | vision ms/img | TTFT ms | decode tok/s | decode × floor | preprocess ms "
             "| e2e ms | peak RSS MB | net RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["artifacts"]:
        if "error" in r:
            err = r["error"].replace("\n", " ").replace("|", "/")[:160]
            lines.append(f"| {r['name']} | {r['kind']} | {r['bytes'] / 1e6:.2f} | failed: {err} |" + " |" * 7)
            continue
        lines.append(f"| {r['name']} | {r['kind']} | {_cell(r, 'bytes', '.2f', 1e-6)} | "
                     f"{_cell(r, 'vision_ms_per_image', '.2f')} | {_cell(r, 'ttft_ms', '.2f')} | "
                     f"{_cell(r, 'decode_tokens_per_s', '.1f')} | {r['decode_x_floor']:.2f} | "
                     f"{r['preprocess_ms']:.2f} | {_cell(r, 'e2e_ms', '.2f')} | "
                     f"{_cell(r, 'peak_rss_mb', '.0f')} | {_cell(r, 'net_rss_mb', '.0f')} |")
    return "\n".join(lines) + "\n"


CHART = (("vision_ms_per_image", "vision"), ("ttft_ms", "TTFT"), ("decode_ms_per_step", "decode ms/step"),
         ("e2e_ms", "end-to-end"), ("net_rss_mb", "net RSS"), ("bytes", "size on disk"))


def chart(result: dict[str, Any]) -> bytes:
    """Grouped bars of lower-is-better ratios vs the source, one group per artifact."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["artifacts"] if "ratios" in r]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names)), 3.8), dpi=110)
    width = 0.8 / len(CHART)
    for j, (key, label) in enumerate(CHART):
        ax.bar([i + j * width for i in range(len(names))], [r["ratios"].get(key, 0.0) for r in rows], width,
               label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_ylabel("ratio vs source (lower is better)")
    ax.set_title(f"batch {result['settings']['batch']}, {result['settings']['new_tokens']} new tokens, "
                 f"{result['machine']['cpu']}", fontsize=8)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
