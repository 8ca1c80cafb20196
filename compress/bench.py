"""`vlm-compress bench RUN_DIR`: latency, throughput, memory and size of every artifact in a run.

Each artifact (the source model, every kept checkpoint, every export) is measured in its own
subprocess, so its peak RSS is its own; all of them run on the same inputs, with the same number
of new tokens (EOS ignored), warm-up excluded, median of the repeats. Ratios are against the source
model measured in the same invocation. Results go to RUN_DIR/bench/ and nowhere else.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compress.artifacts import atomic_write
from compress.errors import CompressError

METRICS = ("vision_ms_per_image", "ttft_ms", "decode_tokens_per_s", "e2e_ms", "peak_rss_mb")


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str  # "torch" | "onnx"
    path: str
    bytes: int


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def artifacts(run_dir: Path) -> list[Artifact]:
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise CompressError(f"{run_dir} is not a run folder (no manifest.json)")
    m = json.loads(manifest_path.read_text())
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
    import onnxruntime
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__}


# ---- one artifact (runs in a subprocess) ------------------------------------------------------------


def _median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_one(kind: str, path: str, model_type: str, images: list, questions: list[str], new_tokens: int,
                warmup: int, repeats: int, providers: list[str] | None) -> dict[str, float]:
    import torch

    from compress.arch import get_adapter

    adapter = get_adapter(model_type)
    if kind == "torch":
        from compress.checkpoint import load_checkpoint
        from compress.runtime.torch_runner import TorchRunner

        model, processor = load_checkpoint(path, adapter)
        runner = TorchRunner.for_adapter(model, adapter, processor)

        def vision(inputs: dict) -> Any:
            with torch.inference_mode():
                return model.model.get_image_features(pixel_values=inputs["pixel_values"])
    else:
        from compress.runtime.ort_runner import OrtRunner

        runner = OrtRunner.from_dir(path, providers=providers)
        processor = adapter.load_processor(path) if (Path(path) / "processor_config.json").exists() else None
        if processor is None:
            raise CompressError(f"{path}: the export folder has no processor; re-export with this version")
        vision = runner.image_features
    full = adapter.build_inputs(processor, images, questions).inputs
    one = adapter.build_inputs(processor, images[:1], questions[:1]).inputs
    vision_ms = _median_ms(lambda: vision(one), warmup, repeats)
    ttft = _median_ms(lambda: runner.generate(full, 1, ignore_eos=True), warmup, repeats)
    e2e = _median_ms(lambda: runner.generate(full, new_tokens, ignore_eos=True), warmup, repeats)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "vision_ms_per_image": vision_ms,
        "ttft_ms": ttft,
        "decode_tokens_per_s": len(images) * (new_tokens - 1) / max(e2e - ttft, 1e-9) * 1000,
        "e2e_ms": e2e,
        "peak_rss_mb": rss_kb / 1024,
    }


def _inputs(run_dir: Path, batch: int) -> tuple[list, list[str]]:
    """The first `batch` questions of the run's own evaluation set."""
    from compress.data import DataConfig, load_dataset

    m = json.loads((run_dir / "manifest.json").read_text())
    source = m["data"]["evaluation"]["source"]
    kind, _, path = source.partition(":")
    data = load_dataset(DataConfig(source=path.split("#")[0], format=kind if kind != "hub" else "hub",
                                   num_samples=batch))
    return [r.image for r in data.records], [r.prompt for r in data.records]


def _child(args: dict[str, Any]) -> None:
    run_dir = Path(args["run_dir"])
    images, questions = _inputs(run_dir, args["batch"])
    result = measure_one(args["kind"], args["path"], args["model_type"], images, questions, args["new_tokens"],
                         args["warmup"], args["repeats"], args["providers"])
    print(json.dumps(result))


# ---- the whole run ---------------------------------------------------------------------------------


def bench(run_dir: str | Path, batch: int = 1, new_tokens: int = 16, warmup: int = 2, repeats: int = 5,
          providers: list[str] | None = None) -> dict[str, Any]:
    if new_tokens < 2:
        raise CompressError("--new-tokens must be at least 2 (decode speed needs tokens after the first)")
    run_dir = Path(run_dir).resolve()
    arts = artifacts(run_dir)
    model_type = json.loads((run_dir / "manifest.json").read_text())["model"]["model_type"]
    rows = []
    for art in arts:
        args = {"run_dir": str(run_dir), "kind": art.kind, "path": art.path, "model_type": model_type,
                "batch": batch, "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats,
                "providers": providers}
        proc = subprocess.run([sys.executable, "-m", "compress.bench", json.dumps(args)], capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
        if proc.returncode != 0:
            raise CompressError(f"benchmarking {art.name} failed:\n{proc.stderr.strip()[-2000:]}")
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({**asdict(art), **metrics})
    base = rows[0]
    for row in rows:
        row["ratios"] = {k: row[k] / base[k] for k in (*METRICS, "bytes") if base.get(k)}
    result = {"run": str(run_dir), "settings": {"batch": batch, "new_tokens": new_tokens, "warmup": warmup,
                                                  "repeats": repeats, "providers": providers or ["CPU"]},
              "machine": machine(), "artifacts": rows}
    out = run_dir / "bench"
    atomic_write(out / "bench.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "bench.md", markdown(result))
    atomic_write(out / "bench.png", chart(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    s, mach = result["settings"], result["machine"]
    head = ("| artifact | kind | size MB | vision ms/img | TTFT ms | decode tok/s | e2e ms | peak RSS MB "
            "| e2e vs source |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"# Benchmark: {result['run']}", "",
             f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), "
             f"onnxruntime {mach['onnxruntime']}. Batch {s['batch']}, {s['new_tokens']} new tokens (EOS ignored), "
             f"{s['warmup']} warm-ups, median of {s['repeats']}.", "", head]
    for r in result["artifacts"]:
        lines.append(f"| {r['name']} | {r['kind']} | {r['bytes'] / 1e6:.2f} | {r['vision_ms_per_image']:.2f} | "
                     f"{r['ttft_ms']:.2f} | {r['decode_tokens_per_s']:.1f} | {r['e2e_ms']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['ratios']['e2e_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in result["artifacts"]]
    shown = ("vision_ms_per_image", "ttft_ms", "e2e_ms", "bytes")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 3.6), dpi=110)
    width = 0.8 / len(shown)
    for j, key in enumerate(shown):
        ax.bar([i + j * width for i in range(len(names))], [r["ratios"].get(key, 0) for r in result["artifacts"]],
               width, label=key)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_ylabel("ratio vs source model (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
