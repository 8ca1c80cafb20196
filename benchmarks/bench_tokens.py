"""Fewer image tokens on the realistic LLaVA (random weights, 196 image tokens per 224x224 image): what a
`tokens` reduction saves end to end, against HF eager fp32 and against the same export unreduced.

    python benchmarks/bench_tokens.py [--out benchmarks/results] [--layers 24] [--new-tokens 32]

One process, one image + 24-word question, the same number of new tokens (EOS ignored), warm-up
excluded, median of the repeats; the same derivation as bench_realistic.py (TTFT = generate(1), decode
ms/token = (generate(N) - generate(1)) / (N - 1)). Artifacts, all from one model (rebuilt with the same
random weights): `hf_eager_fp32` (the baseline); `int4` = INT4 group 128 language model + lm_head at
accuracy level 4, 7-bit static W8A8 vision tower + projector, int8 prefill graph (bench_realistic's
fastest row); then the same with the tokens reduced before the projector: `pool` to 7x7 (49 tokens, 25%)
and `select_merge` to 49 (41 dominant + 8 merged) and to 98 (50%). Each row reports image tokens per
image, the prompt length, the KV cache bytes at the end of the answer, vision / prefill (TTFT) / decode /
end-to-end ms. Results: OUT/tokens.json and OUT/tokens.md. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_profile import hf_generate
from bench_realistic import timings
from realistic_models import BUILDERS, random_image

from compress.arch import get_adapter
from compress.bench.floor import kv_bytes
from compress.bench.timing import machine
from compress.export.onnx import export_onnx
from compress.export.wrappers import decoder_facts
from compress.quant import ActQuant, WeightQuant, quantize_linears
from compress.quant.int4 import Int4Quant
from compress.quant.linears import quantize_int4_linears
from compress.runtime.ort_runner import OrtRunner
from compress.tokens.install import install, record_for

REDUCTIONS = {"int4": None, "int4_pool49": ("pool", 49), "int4_select_merge49": ("select_merge", 49),
              "int4_select_merge98": ("select_merge", 98)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    started = time.time()
    n, warmup, repeats = args.new_tokens, args.warmup, args.repeats
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)  # noqa: E731

    model, processor = BUILDERS["llava"](args.layers)
    adapter = get_adapter("llava").bind(model)
    question = " ".join(f"w{i}" for i in range(24))
    image = random_image(0, 224)
    facts = decoder_facts(model)
    results: dict[str, dict[str, float]] = {}

    def row(name: str, inputs: dict, vision, generate) -> None:
        r = timings(vision, generate, n, warmup, repeats)
        prompt = int(inputs["input_ids"].shape[1])
        r.update(image_tokens=int((inputs["input_ids"] == model.config.image_token_id).sum()), prompt_tokens=prompt,
                 kv_bytes_end=kv_bytes(facts, prompt + n))
        results[name] = r
        log(f"{name}: {r}")

    inputs = adapter.build_inputs(processor, [image], [question]).inputs

    def hf_vision() -> None:
        with torch.inference_mode():
            model.model.get_image_features(pixel_values=inputs["pixel_values"])

    row("hf_eager_fp32", inputs, hf_vision, lambda k: hf_generate(model, inputs, k))

    names = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear) and k != "lm_head"]
    language = [k for k in names if k.startswith("model.language_model")] + ["lm_head"]
    vision = [k for k in names if k not in language]

    def calibration_loop(m: torch.nn.Module) -> None:
        with torch.inference_mode():
            for s in range(4):
                q = " ".join(f"w{(s * 97 + i) % 31000}" for i in range(16 + 4 * s))
                m(**adapter.build_inputs(processor, [random_image(s + 1, 224)], [q]).inputs)

    log("INT4 group 128 language + lm_head, 7-bit static W8A8 vision (calibrated unreduced, as a recipe would "
        "quantize before reducing)")
    quantize_int4_linears(model, language, Int4Quant(group_size=128))
    quantize_linears(model, vision, WeightQuant("per_channel", reduce_range=True), ActQuant("minmax"),
                     calibration_loop)
    with tempfile.TemporaryDirectory() as tmp:
        for name, reduction in REDUCTIONS.items():
            if reduction is not None:
                install(model, adapter, record_for(reduction[0], 196, reduction[1], None, None))
                adapter.bind(model)
            out = Path(tmp) / name
            export_onnx(model, adapter, processor, out, fusion=True, quantize=True, int4_accuracy_level=4,
                        group_query_attention=True, select_logits=True, int4_prefill="int8")
            runner = OrtRunner.from_dir(out)
            x = adapter.build_inputs(processor, [image], [question]).inputs
            row(name, x, lambda x=x, runner=runner: runner.image_features(x),
                lambda k, x=x, runner=runner: runner.generate(x, k, ignore_eos=True))
            runner = None
            gc.collect()
            for f in out.iterdir():
                f.unlink()

    base = results["hf_eager_fp32"]
    unreduced = results["int4"]
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "new_tokens": n,
              "warmup": warmup, "repeats": repeats, "results": results,
              "vs_hf_eager_fp32": {k: r["e2e_ms"] / base["e2e_ms"] for k, r in results.items()},
              "prefill_speedup_vs_unreduced": {k: unreduced["ttft_ms"] / r["ttft_ms"] for k, r in results.items()
                                               if k.startswith("int4")},
              "wall_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokens.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Fewer image tokens, realistic LLaVA ({args.layers} decoder layers), image -> {n} tokens", "",
             f"{report['machine']['cpu']} ({', '.join(report['machine']['cpu_flags'])}), "
             f"{report['machine']['cores']} cores, torch {report['machine']['torch']}, onnxruntime "
             f"{report['machine']['onnxruntime']}; {report['date']}", "",
             "| artifact | image tokens | prompt | KV at end (MiB) | vision ms | TTFT ms | decode ms/token | e2e ms "
             "| e2e / HF eager | TTFT speed-up vs int4 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        speed = report["prefill_speedup_vs_unreduced"].get(k)
        lines.append(f"| {k} | {r['image_tokens']} | {r['prompt_tokens']} | {r['kv_bytes_end'] / 2**20:.1f} | "
                     f"{r['vision_ms']:.1f} | {r['ttft_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['e2e_ms']:.0f} | {report['vs_hf_eager_fp32'][k]:.3f} | "
                     f"{f'{speed:.2f}x' if speed else '–'} |")
    md = "\n".join(lines) + "\n"
    (args.out / "tokens.md").write_text(md)
    print(md)
    log("done")


if __name__ == "__main__":
    main()
