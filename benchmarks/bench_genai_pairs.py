"""Our INT4 decoder against onnxruntime-genai's INT4 build of the same decoder, in interleaved pairs.

    python benchmarks/bench_genai_pairs.py [--pairs 15] [--out benchmarks/results]

bench_realistic.py times each artifact in its own stretch of minutes; on a shared host whose memory
bandwidth swings by half between minutes (benchmarks/bench_kernels.py), a ratio of two such stretches can
land on either side of 1.0. Here the two decoders alternate, one generation each, and the answer is the
median of the per-pair ratios. Same realistic LLaVA decoder (random weights, `realistic_models`), INT4 RTN
at block 32 and 128, accuracy level 4 on both sides; ours exported with the export stage's defaults
(GroupQueryAttention, last-position logits) and run by `OrtRunner` on the image + question prompt (222
tokens); genai's generator on the same number of prompt tokens. Per pair: decode ms per step over 32 new
tokens after the first (warm-up pairs excluded), the Python loop of each side included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_peer
import numpy as np
import torch
from realistic_models import BUILDERS, IMAGE_SIZE, random_image

from compress.arch import get_adapter
from compress.bench.timing import machine
from compress.export.onnx import export_onnx
from compress.quant.int4 import Int4Quant
from compress.quant.linears import quantize_int4_linears
from compress.runtime.ort_runner import OrtRunner

NEW_TOKENS = 33  # the first token, then 32 timed decode steps


def genai_steps(folder: Path, prompt: int, vocab: int) -> Any:
    """A function timing one genai generation: ms per decode step after the first token."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ids = np.random.default_rng(0).integers(10, vocab - 10, (1, prompt)).astype(np.int32)

    def run() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + NEW_TOKENS, min_length=prompt + NEW_TOKENS, do_sample=False,
                                  batch_size=1)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        t0, made = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            made += 1
        return (time.perf_counter() - t0) / made * 1000

    return run


def ours_steps(folder: Path, inputs: dict[str, Any]) -> Any:
    runner = OrtRunner.from_dir(folder)

    def run() -> float:
        runner.generate(inputs, NEW_TOKENS, ignore_eos=True)
        return runner.timings["decode_s"] / runner.timings["decode_steps"] * 1000

    return run


def pairs(ours: Any, genai: Any, n: int) -> dict[str, Any]:
    for _ in range(2):
        ours(), genai()
    a, b = [], []
    for _ in range(n):
        a.append(ours())
        b.append(genai())
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"ours_ms": statistics.median(a), "genai_ms": statistics.median(b),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ours_faster": sum(r < 1 for r in ratios), "pairs": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    started = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for block in (32, 128):
            model, processor = BUILDERS["llava"](args.layers)
            adapter = get_adapter("llava").bind(model)
            inputs = adapter.build_inputs(processor, [random_image(0, IMAGE_SIZE["llava"])],
                                          [" ".join(f"w{i}" for i in range(24))]).inputs
            prompt, vocab = int(inputs["input_ids"].shape[1]), model.config.get_text_config().vocab_size
            genai = bench_peer.build(bench_peer.save_causal_lm(model, adapter, processor, work / f"lm{block}"),
                                     work / f"genai{block}", "int4", {"block_size": block, "accuracy_level": 4})
            language = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (
                k == "lm_head" or k.startswith("model.language_model."))]
            quantize_int4_linears(model, language, Int4Quant(group_size=block))
            export_onnx(model, adapter, processor, work / f"ours{block}", fusion=True, quantize=True,
                        int4_accuracy_level=4, group_query_attention=True, select_logits=True)
            del model
            results[f"block_{block}"] = r = pairs(ours_steps(work / f"ours{block}", inputs),
                                                  genai_steps(genai, prompt, vocab), args.pairs)
            print(f"block {block}: {r}", flush=True)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "prompt_tokens": prompt,
              "decode_steps": NEW_TOKENS - 1, "results": results, "wall_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "genai_pairs.json").write_text(json.dumps(report, indent=1))
    lines = ["| INT4, accuracy level 4 | ours ms/step | genai ms/step | ours / genai, median of pairs | range | "
             "ours faster |", "|---|---|---|---|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {r['ours_ms']:.2f} | {r['genai_ms']:.2f} | {r['ratio_median']:.2f} | "
              f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f} | {r['ours_faster']}/{r['pairs']} |"
              for k, r in results.items()]
    (args.out / "genai_pairs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
