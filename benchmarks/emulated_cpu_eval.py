"""Score an ONNX export folder with the pipeline's evaluator, to run under an emulated CPU.

    python benchmarks/emulated_cpu_eval.py RUN_DIR STAGE
    qemu-x86_64 -cpu Haswell $(python -c 'import sys; print(sys.executable)') benchmarks/emulated_cpu_eval.py ...

Under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512, no VNNI) ONNX Runtime's MLAS picks its non-VNNI
integer kernels from the emulated CPUID, so this answers "what does this artifact score on an AVX2
host" on any x86 machine. Prints the metrics as JSON (exact match, token agreement and KL against the
run's own baseline reference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("stage")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from safetensors.torch import load_file

    from compress.arch import adapter_for_source
    from compress.checks.evaluator import Evaluator, Reference
    from compress.data import load_dataset
    from compress.recipe import load_recipe
    from compress.runtime.ort_runner import OrtRunner

    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    recipe = load_recipe(manifest["recipe"]["path"])
    cfg = recipe.recipe.evaluation
    data = load_dataset(cfg, recipe.base_dir)
    stage = next(s for s in manifest["stages"] if s["name"] == args.stage)
    folder = args.run_dir / stage["artifacts"]
    adapter = adapter_for_source(manifest["model"]["resolved"])
    processor = adapter.load_processor(str(folder))
    processor.tokenizer.padding_side = "left"
    reference = Reference(**load_file(args.run_dir / "baseline" / "reference.safetensors"))
    ev = Evaluator(adapter, processor, data, cfg).evaluate(OrtRunner.from_dir(folder), reference)
    print(json.dumps({"metrics": ev.metrics, "records": len(data)}))


if __name__ == "__main__":
    main()
