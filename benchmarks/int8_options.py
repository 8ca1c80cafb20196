"""Every INT8 option on the bundled model and on the outlier model: accuracy through PyTorch and ONNX
Runtime, and ONNX Runtime speed relative to the fp32 export of the same model, all in one run.

    python benchmarks/int8_options.py [--out runs/int8-options] [--samples 500]

Each (model, option) is a real pipeline run (quantize stage, then export stage, both gated with
on_fail: warn so every number is recorded); speed is the end-to-end image -> 16-token answer latency
of the exported graphs at batch 4 (EOS ignored, 3 warm-ups, median of 9), measured after all runs in
this process. Writes results.json and results.md into --out; the table goes to docs/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.bench.measure import measure_one  # noqa: E402
from compress.bench.timing import machine  # noqa: E402
from compress.host import cpu_features  # noqa: E402
from compress.pipeline import run  # noqa: E402
from compress.runs import load_runner  # noqa: E402

MODELS = {"bundled": "zoo:shapes-vqa", "outliers": "zoo:shapes-vqa-outliers"}
STATIC = {"calibration": "percentile", "percentile": 99.99}
OPTIONS: dict[str, dict[str, Any]] = {
    "static percentile (int8.yaml)": {"activations": STATIC},
    "static + SmoothQuant 0.5": {"activations": STATIC, "smoothquant": {"alpha": 0.5}},
    "static + SmoothQuant auto": {"activations": STATIC, "smoothquant": {"alpha": "auto"}},
    "static + SmoothQuant auto, 7-bit weights": {"activations": STATIC, "smoothquant": {"alpha": "auto"},
                                                 "weights": {"reduce_range": True}},
    "dynamic per-token": {"activations": {"dynamic": "per_token"}},
    "dynamic per-token + SmoothQuant auto + GPTQ + keep_float 2%": {
        "activations": {"dynamic": "per_token"}, "smoothquant": {"alpha": "auto"},
        "weights": {"rounding": "gptq"}, "keep_float": {"budget": 0.02}},
    "dynamic per-token + SmoothQuant 0.5 + GPTQ + keep_float 2% (int8-outliers.yaml)": {
        "activations": {"dynamic": "per_token"}, "smoothquant": {"alpha": 0.5},
        "weights": {"rounding": "gptq"}, "keep_float": {"budget": 0.02}},
    "weight-only W8A16": {"activations": "none"},
}
BATCH = 4
# The portability remedy alone: the same static model exported with each int8_kernels setting.
KERNELS = ("portable", "vnni")


def _recipe(out: Path, name: str, model: str, quant: dict[str, Any] | None, kernels: str, samples: int) -> Path:
    stages: list[dict[str, Any]] = []
    if quant is not None:
        stages.append({"type": "quantize", "name": "int8", "scheme": "int8",
                       "targets": {"components": ["vision", "projector", "language"]}, **quant,
                       "gate": {"min_retention": 0.99, "on_fail": "warn"}})
    stages.append({"type": "export", "name": "onnx", "format": "onnx", "int8_kernels": kernels,
                   "parity": {"atol": 1e9, "rtol": 0.0},  # accuracy is scored below; parity is tested elsewhere
                   "gate": {"min_retention": 0.99, "on_fail": "warn"}})
    doc = {"name": name, "seed": 0, "model": {"source": model},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "batch_size": 64},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "batch_size": 100,
                          "max_new_tokens": 24, "num_samples": samples},
           "stages": stages}
    path = out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:48]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "int8-options")
    p.add_argument("--samples", type=int, default=500)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict[str, Any]] = []
    jobs = [(m, "fp32 export", None, "portable") for m in MODELS]
    jobs += [(m, opt, q, "portable") for m in MODELS for opt, q in OPTIONS.items()]
    jobs += [(m, f"static percentile, int8_kernels: {k}", OPTIONS["static percentile (int8.yaml)"], k)
             for m in MODELS for k in KERNELS if k != "portable"]
    for model, option, quant, kernels in jobs:
        name = f"{model}-{_slug(option)}"
        result = run(_recipe(args.out, name, MODELS[model], quant, kernels, args.samples),
                     out=args.out / name, force=True)
        m = result.manifest
        base = m["baseline"]["metrics"]
        stages = {s["name"]: s for s in m["stages"]}
        row: dict[str, Any] = {"model": model, "option": option, "kernels": kernels, "run": str(result.run_dir)}
        for key, rec in (("torch", stages.get("int8")), ("ort", stages["onnx"])):
            if rec is None or "metrics" not in rec:
                continue
            row[key] = {"retention": rec["metrics"]["exact_match"] / base["exact_match"],
                        "token_agreement": rec["metrics"]["token_agreement"], "logit_kl": rec["metrics"]["logit_kl"]}
        row["export"] = str(result.run_dir / stages["onnx"]["artifacts"])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)

    # Speed, after all runs, in one process: e2e latency of each export, batch 4, 16 tokens.
    from compress.arch import adapter_for_source
    from compress.bench.measure import eval_inputs
    from compress.zoo import resolve_source

    for row in rows:
        adapter = adapter_for_source(resolve_source(MODELS[row["model"]]))
        runner, processor = load_runner("onnx", row["export"], resolve_source(MODELS[row["model"]]), adapter, None)
        images, questions = eval_inputs(Path(row["run"]), BATCH)
        row["speed"] = measure_one(runner, processor, adapter, images, questions, 16, 3, 9)
    for model in MODELS:
        ref = next(r for r in rows if r["model"] == model and r["option"] == "fp32 export")["speed"]["e2e_ms"]
        for r in rows:
            if r["model"] == model:
                r["e2e_vs_fp32_onnx"] = r["speed"]["e2e_ms"] / ref
    result = {"machine": machine(), "cpu": cpu_features(), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine'].get('cpu', '?')}, {result['machine'].get('cores', '?')} cores; "
             f"CPU flags {', '.join(result['cpu']['flags'])}", "",
             "| option | model | retention (torch) | agreement (torch) | KL (torch) | retention (ORT) | "
             "agreement (ORT) | KL (ORT) | ORT e2e vs fp32 ONNX |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t, o = r.get("torch", {}), r.get("ort", {})

        def f(d: dict[str, Any], k: str, fmt: str = ".3f") -> str:
            return format(d[k], fmt) if k in d else "–"

        lines.append(f"| {r['option']} | {r['model']} | {f(t, 'retention')} | {f(t, 'token_agreement')} | "
                     f"{f(t, 'logit_kl', '.2e')} | {f(o, 'retention')} | {f(o, 'token_agreement')} | "
                     f"{f(o, 'logit_kl', '.2e')} | {r['e2e_vs_fp32_onnx']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
