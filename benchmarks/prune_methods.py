"""Magnitude vs Wanda vs SparseGPT at equal sparsity (50% unstructured, 2:4) on the bundled model and on
the model with real-LLM activation outliers, each a real pipeline run of one prune stage (gate on warn).

    python benchmarks/prune_methods.py [--out runs/prune-methods] [--samples 500]
    python benchmarks/prune_methods.py --smollm2 runs/smollm2-llava   # real SmolLM2-135M weights (see
                                                                      # compress/zoo/smollm2.py), its own eval set

Writes results.json and results.md into --out; the table goes to docs/pruning.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_recipes import one_stage_recipe  # noqa: E402

from compress.pipeline import run  # noqa: E402

MODELS = {"bundled": "zoo:shapes-vqa", "outliers": "zoo:shapes-vqa-outliers"}
PATTERNS = {"50% unstructured": {"pattern": "unstructured", "sparsity": 0.5}, "2:4": {"pattern": "2:4"}}
METHODS = ("magnitude", "wanda", "sparsegpt")


def _recipe(out: Path, name: str, model: str, stage: dict[str, Any], samples: int) -> Path:
    return one_stage_recipe(out, name, model, {"type": "prune", "name": "prune",
                                               "targets": {"components": ["language"]}, **stage}, samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "prune-methods")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--smollm2", type=Path, help="a folder built by python -m compress.zoo.smollm2 (real weights)")
    args = p.parse_args()
    models = {"smollm2": str((args.smollm2 / "model").resolve())} if args.smollm2 else MODELS
    rows = []
    for model, source in models.items():
        for label, pattern in PATTERNS.items():
            for method in METHODS:
                name = f"{model}-{method}-{pattern['pattern'].replace(':', 'of')}"
                t0 = time.perf_counter()
                result = run(_recipe(args.out, name, source, {"method": method, **pattern}, args.samples),
                             out=args.out / name, force=True)
                rec = result.manifest["stages"][0]
                base = result.manifest["baseline"]["metrics"]["exact_match"]
                rows.append({"model": model, "pattern": label, "method": method,
                             "retention": rec["metrics"]["exact_match"] / base, **rec["metrics"],
                             "achieved_sparsity": rec["details"]["achieved_sparsity"],
                             "nm_valid": rec["details"].get("nm_valid"), "stage_s": rec["wall_s"],
                             "run_s": round(time.perf_counter() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | pattern | method | exact match | retention | token agreement | KL | sparsity | stage s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['pattern']} | {r['method']} | {r['exact_match']:.3f} | {r['retention']:.3f} | "
              f"{r['token_agreement']:.4f} | {r['logit_kl']:.2e} | {r['achieved_sparsity']:.3f} | {r['stage_s']:.1f} |"
              for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
