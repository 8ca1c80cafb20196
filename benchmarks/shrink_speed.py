"""Structured pruning (`type: shrink`): accuracy by importance, and decode speed of the shrunk model.

One shrink stage per importance (magnitude, activation) on the same ratios, each a real pipeline run
(gate on warn); then `vlm-compress bench` on the activation run measures the source model and the
shrunk checkpoint in the same invocation (batch 1, equal output lengths with EOS ignored, warm-up
excluded, medians), so the decode-step ratio is like for like.

    python benchmarks/shrink_speed.py [--out runs/shrink-speed] [--mlp 0.5 --heads 0.5]
    python benchmarks/shrink_speed.py --smollm2 runs/smollm2-llava --mlp 0.5 --heads 0.34   # real weights

Writes results.json and results.md into --out; the tables go to docs/pruning.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_recipes import one_stage_recipe  # noqa: E402

from compress.bench.run import bench  # noqa: E402
from compress.pipeline import run  # noqa: E402


def _recipe(out: Path, name: str, model: str, stage: dict[str, Any], samples: int) -> Path:
    return one_stage_recipe(out, name, model, {"type": "shrink", "name": "shrink", **stage}, samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "shrink-speed")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--smollm2", type=Path, help="a folder built by python -m compress.zoo.smollm2 (real weights)")
    p.add_argument("--mlp", type=float, default=0.5)
    p.add_argument("--heads", type=float, default=0.5)
    p.add_argument("--layers", type=float, default=0.0)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    model, source = ("smollm2", str((args.smollm2 / "model").resolve())) if args.smollm2 else ("bundled",
                                                                                                "zoo:shapes-vqa")
    ratios = {"mlp": args.mlp, "heads": args.heads, "layers": args.layers}
    rows, runs = [], {}
    for importance in ("magnitude", "activation"):
        if importance == "magnitude" and args.layers:
            continue  # layers need activations
        name = f"{model}-{importance}"
        result = run(_recipe(args.out, name, source, {"importance": importance, **ratios}, args.samples),
                     out=args.out / name, force=True)
        runs[importance] = result.run_dir
        rec, base = result.manifest["stages"][0], result.manifest["baseline"]["metrics"]
        d = rec["details"]
        rows.append({"model": model, "importance": importance, **ratios,
                     "retention": rec["metrics"]["exact_match"] / base["exact_match"] if base["exact_match"] else None,
                     **rec["metrics"], "language_removed": d["language_parameters"]["removed_fraction"],
                     "parameters": d["parameters"], "stage_s": rec["wall_s"]})
        print(json.dumps(rows[-1]), flush=True)
    speed = bench(runs["activation"], batch=1, new_tokens=args.new_tokens, warmup=2, repeats=5, log=print)
    arts = {a["name"]: a for a in speed["artifacts"]}
    shrunk = arts["shrink"]
    summary = {"machine": speed["machine"], "new_tokens": args.new_tokens,
               "dense_decode_ms_per_step": arts["source"]["decode_ms_per_step"],
               "shrunk_decode_ms_per_step": shrunk["decode_ms_per_step"],
               "decode_speedup": arts["source"]["decode_ms_per_step"] / shrunk["decode_ms_per_step"],
               "dense_bytes": arts["source"]["bytes"], "shrunk_bytes": shrunk["bytes"]}
    print(json.dumps(summary), flush=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "speed": summary}, indent=2) + "\n")
    lines = ["| model | importance | mlp | heads | layers | language params removed | exact match | retention | "
             "token agreement | KL | stage s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['importance']} | {r['mlp']:g} | {r['heads']:g} | {r['layers']:g} | "
              f"{r['language_removed']:.3f} | {r['exact_match']:.3f} | {r['retention']:.3f} | "
              f"{r['token_agreement']:.4f} | {r['logit_kl']:.2e} | {r['stage_s']:.1f} |" for r in rows]
    lines += ["", f"Decode ms/step (batch 1, {args.new_tokens} new tokens): dense "
              f"{summary['dense_decode_ms_per_step']:.2f}, shrunk {summary['shrunk_decode_ms_per_step']:.2f} "
              f"({summary['decode_speedup']:.2f}x); checkpoint {summary['dense_bytes'] / 1e6:.1f} MB -> "
              f"{summary['shrunk_bytes'] / 1e6:.1f} MB; {speed['machine']['cpu']}"]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
