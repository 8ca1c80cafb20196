"""Speed of compressed artifacts on a VLM of realistic shape (random weights), against HF eager fp32.

    python benchmarks/bench_realistic.py [--family llava|qwen2_vl] [--out benchmarks/results] [--layers 24]
                                         [--new-tokens 32] [--peer] [--batch8] [--no-profile]

`--family qwen2_vl` builds a Qwen2-VL of the same language size with its own attention layout instead:
a 448x448 image as 1024 patches of 14x14 through a 12-layer, 768-wide vision tower with 2-D rotary
positions, merged 2x2 into 256 tokens, and a Qwen2 decoder (hidden 1024, 24 layers, 16 heads / 2 KV
heads, M-RoPE, MLP 2816, vocab 32000): ~0.43B parameters. Results go to realistic-qwen2_vl.{json,md}.

Why random weights: speed depends on shapes and kernels, not on what the weights say, and a trained
0.5B VLM cannot be downloaded here. The model is built from config: a ViT-B/16-sized CLIP tower
(224x224, patch 16, hidden 768, 12 layers, 12 heads -> 196 image tokens), the LLaVA MLP projector
and a Llama decoder (hidden 1024, 24 layers, 16 heads / 8 KV heads, MLP 2816, vocab 32000): ~0.44B
parameters. Then, in one process on one machine, with the same image + prompt, the same number of
new tokens (EOS ignored), warm-up excluded, median of the repeats:

- `hf_eager_fp32`: the baseline. `model.generate(max_new_tokens=N, min_new_tokens=N,
  do_sample=False)` with its KV cache, PyTorch eager (no compile), transformers' default attention;
  vision = `get_image_features` (tower + projector) at batch 1.
- `torch_int8_w8a8`: the same model after `compress.quant.quantize_linears` (per-channel int8
  weights, static per-tensor int8 activations from minmax observers calibrated on 4 random
  image + prompt batches; every Linear except lm_head). Fake-quant in float: what the accuracy gate
  scores, not a fast path.
- `onnx_fp32` / `onnx_int8`: `export_onnx(fusion=True, quantize=True)` of the float and of the
  quantized model, run through `OrtRunner` (CPU provider). `onnx_int8` uses the default
  `int8_kernels: portable` (exact on every CPU), `onnx_int8_vnni` the S8 graphs that are exact only on
  VNNI / AMX hosts, `onnx_int8_dynamic` dynamic per-token activation scales (MatMulInteger).
- `onnx_int8_s7`: the same W8A8 with `weights.reduce_range` (7-bit weights): exact with the fast
  U8S8 kernels on every x86 CPU, so portable without the U8U8 cost, at one bit of weight precision.
  `onnx_int8_s7_head` quantizes lm_head too (a third of the INT8 decoder's bytes when left fp32).
- `onnx_int4` / `onnx_int4_exact`: INT4 weight-only (RTN, group 32, symmetric) of the language model
  and lm_head, exported as MatMulNBits with accuracy_level 4 (int8 activations on CPU) / 0 (float32).
  `onnx_int4_g128`: the same with group 128 (GPTQ's and AWQ's usual group; fewer scales per weight, so
  fewer bytes and less per-block work); `onnx_int4_g128_s7vision` adds the 7-bit static W8A8 vision
  tower + projector (calibrated as above): each component at its fastest scheme, and
  `onnx_int4_g128_s7vision_prefill8` adds the export's `int4_prefill: int8` (prefill.onnx: prompts
  through 7-bit int8 GEMMs with per-token activations, decode steps through MatMulNBits). Every export uses the export
  stage's defaults: decoder self-attention as GroupQueryAttention and logits for the last position
  only when generating.
- `genai_*` (`--peer`, LLaVA only): the same language model + lm_head saved as a LlamaForCausalLM folder
  and built by onnxruntime-genai's own builder (int4 block 32 and block 128, accuracy_level 4; int8;
  fp32), timed with its generator on a text prompt of the same token count (bench_peer.py).

Also, once per run: image preprocessing (processor: resize, normalize, tokenize) on its own line; the
memory bandwidth (STREAM-style copy, compress.bench.floor, taken at the start and after each artifact; the
fastest counts) and each decoder's floor = bytes read per token
(decoder weights + KV cache at the middle of the answer) / bandwidth, with each decode step as a
multiple of it; and batch 8 (eight images + questions) for the baseline and the INT8 / INT4 exports.

Time to first token = generate with N=1; decode ms/token = (generate(N) - generate(1)) / (N - 1),
the same derivation for every artifact. The fp32 export, the portable INT8 export and the INT4 exports
(group 32, group 128, and group 128 with the int8 prefill) are then profiled once each with
onnxruntime's profiler (`SessionOptions.enable_profiling`) to say where the time goes, per graph and
per op type, plus the time spent outside onnxruntime (Python loop, numpy feeds); the HF baseline with
torch's profiler (top aten ops). The Markdown shows the fp32, INT8 and group-32 INT4 profiles; the JSON
holds all of them. Results: OUT/realistic.json and OUT/realistic.md (OUT/realistic-qwen2_vl.* for
`--family qwen2_vl`). About 25 minutes on 2 cores with `--peer --batch8` (exports dominate).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_profile import hf_generate, ort_profile, torch_profile
from realistic_models import BUILDERS, IMAGE_SIZE, random_image

from compress.arch import get_adapter
from compress.bench.floor import (
    best_bandwidth,
    floor_ms,
    kv_bytes,
    memory_bandwidth,
    onnx_weight_bytes,
    torch_decoder_bytes,
)
from compress.bench.timing import machine, median_ms
from compress.export.files import read_meta
from compress.export.onnx import export_onnx, image_token_id
from compress.export.wrappers import decoder_facts
from compress.quant import ActQuant, WeightQuant, quantize_linears
from compress.quant.int4 import Int4Quant
from compress.quant.linears import quantize_int4_linears
from compress.runtime.ort_runner import OrtRunner

# The speed targets: (what, artifact, measure, reference artifact or None for the decode floor, bound). Each
# target is reported for every portable export of its kind; the INT8 `vnni` graphs are exact on VNNI hosts only,
# so they are timed but not judged.
INT4_ROWS = ("onnx_int4", "onnx_int4_g128", "onnx_int4_g128_s7vision", "onnx_int4_g128_s7vision_prefill8")
INT8_ROWS = ("onnx_int8", "onnx_int8_s7", "onnx_int8_s7_head")
TARGETS = [*[(f"image -> 32-token answer, {r} / HF eager fp32", r, "e2e_ms", "hf_eager_fp32", 0.20)
             for r in INT4_ROWS],
           *[(f"image -> 32-token answer, {r} / HF eager fp32", r, "e2e_ms", "hf_eager_fp32", 0.25)
             for r in INT8_ROWS],
           *[(f"{r} decode step / floor", r, "decode_x_floor", None, 1.5) for r in ("onnx_int4", "onnx_int4_g128")],
           *[(f"{r} decode step / floor", r, "decode_x_floor", None, 1.5) for r in INT8_ROWS],
           ("onnx_int4 decode step / onnxruntime-genai INT4 block 32", "onnx_int4", "decode_ms_per_token",
            "genai_int4", 1.0),
           ("onnx_int4_g128 decode step / onnxruntime-genai INT4 block 128", "onnx_int4_g128",
            "decode_ms_per_token", "genai_int4_g128", 1.0)]
TIMES = ("vision_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")


def timings(vision, generate, n: int, warmup: int, repeats: int) -> dict[str, float]:
    """vision at batch 1; TTFT = generate(1); decode = (generate(n) - generate(1)) / (n - 1)."""
    vision_ms = median_ms(vision, warmup, repeats)
    ttft = median_ms(lambda: generate(1), warmup, repeats)
    e2e = median_ms(lambda: generate(n), warmup, repeats)
    return {"vision_ms": vision_ms, "ttft_ms": ttft, "decode_ms_per_token": (e2e - ttft) / (n - 1), "e2e_ms": e2e}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(BUILDERS), default="llava", help="attention layout to build")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for realistic.{json,md}")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24: ~0.44B parameters in all)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler runs")
    ap.add_argument("--peer", action="store_true", help="also build and time onnxruntime-genai (LLaVA only)")
    ap.add_argument("--batch8", action="store_true", help="also time batch 8 (baseline, INT8, INT4)")
    args = ap.parse_args()
    started = time.time()
    n, warmup, repeats = args.new_tokens, args.warmup, args.repeats
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)  # noqa: E731

    family, size = args.family, IMAGE_SIZE[args.family]
    model, processor = BUILDERS[family](args.layers)
    adapter = get_adapter(family).bind(model)
    params = sum(p.numel() for p in model.parameters())
    question = " ".join(f"w{i}" for i in range(24))  # a 24-word question after the image tokens
    image = random_image(0, size)
    preprocess_ms = median_ms(lambda: adapter.build_inputs(processor, [image], [question]), warmup, repeats)
    inputs = adapter.build_inputs(processor, [image], [question]).inputs
    batch8 = adapter.build_inputs(processor, [random_image(s, size) for s in range(8)], [question] * 8).inputs
    prompt = int(inputs["input_ids"].shape[1])
    facts = decoder_facts(model)
    kv_mid = kv_bytes(facts, prompt + n // 2)
    samples = [memory_bandwidth()]  # and one after each artifact: floors divide by the fastest (compress.bench.floor)
    log(f"memory bandwidth {samples[0]}; preprocessing {preprocess_ms:.1f} ms")
    results: dict[str, dict[str, float]] = {}
    export_s: dict[str, float] = {}
    profiles: dict[str, Any] = {}

    def floor(name: str, weight_bytes: int) -> None:
        results[name]["decode_bytes_per_token"] = weight_bytes + kv_mid
        samples.append(memory_bandwidth())

    def time_torch(name: str) -> None:
        def vision() -> None:
            with torch.inference_mode():
                model.model.get_image_features(**{k: v for k, v in inputs.items()
                                                  if k in ("pixel_values", "image_grid_thw")})
        results[name] = timings(vision, lambda k: hf_generate(model, inputs, k), n, warmup, repeats)
        floor(name, torch_decoder_bytes(model, adapter))
        if args.batch8 and name == "hf_eager_fp32":
            results[name]["batch8_e2e_ms"] = median_ms(lambda: hf_generate(model, batch8, n), 1, max(2, repeats // 2))
        log(f"{name}: {results[name]}")

    time_torch("hf_eager_fp32")
    if not args.no_profile:
        profiles["hf_eager_fp32_top_ops"] = torch_profile(model, inputs, n)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def export_and_time(name: str, kernels: str = "portable", profile: bool = True, level: int = 0,
                            b8: bool = False, prefill: str = "int4") -> None:
            t0 = time.time()
            out = work / name
            # The export stage's defaults: GroupQueryAttention, logits for the last position when generating.
            export_onnx(model, adapter, processor, out, fusion=True, quantize=True, int8_kernels=kernels,
                        int4_accuracy_level=level, group_query_attention=True, select_logits=True,
                        int4_prefill=prefill)
            export_s[name] = time.time() - t0
            log(f"{name}: exported in {export_s[name]:.0f} s")
            runner = OrtRunner.from_dir(out)
            results[name] = timings(lambda: runner.image_features(inputs),
                                    lambda k: runner.generate(inputs, k, ignore_eos=True), n, warmup, repeats)
            results[name]["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".data"))
            floor(name, onnx_weight_bytes(out / read_meta(out)["graphs"]["decoder"]))
            if b8 and args.batch8:
                results[name]["batch8_e2e_ms"] = median_ms(lambda: runner.generate(batch8, n, ignore_eos=True), 1,
                                                           max(2, repeats // 2))
            log(f"{name}: {results[name]}")
            runner = None  # free the sessions before profiling
            gc.collect()
            if profile and not args.no_profile:
                profiles[name] = ort_profile(out, inputs, n, work)
                log(f"{name}: profiled")
            for f in out.iterdir():  # free the disk before the next export
                f.unlink()

        export_and_time("onnx_fp32")
        if args.peer:
            results.update(peer(model, adapter, processor, work, prompt, n, warmup, repeats, kv_mid, args.batch8,
                                log))

        log("INT8 W8A8: minmax calibration on 4 random image + prompt batches")
        names = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear) and k != "lm_head"]

        def calibration_loop(m: torch.nn.Module) -> None:
            with torch.inference_mode():
                for s in range(4):
                    q = " ".join(f"w{(s * 97 + i) % 31000}" for i in range(16 + 4 * s))
                    m(**adapter.build_inputs(processor, [random_image(s + 1, size)], [q]).inputs)

        quantize_linears(model, names, WeightQuant("per_channel"), ActQuant("minmax"), calibration_loop)
        time_torch("torch_int8_w8a8")  # fake-quant in float: what the gate scores, not a fast path
        export_and_time("onnx_int8", b8=True)  # int8_kernels: portable (U8U8 where S8 could saturate non-VNNI CPUs)
        export_and_time("onnx_int8_vnni", "vnni", profile=False)  # S8 weights: fast U8S8 on VNNI hosts only

        log("INT8 W8A8 with 7-bit weights (same random weights, rebuilt)")
        model, _ = BUILDERS[family](args.layers)
        quantize_linears(model, names, WeightQuant("per_channel", reduce_range=True), ActQuant("minmax"),
                         calibration_loop)
        export_and_time("onnx_int8_s7", profile=False)

        log("INT8 W8A8 with 7-bit weights, lm_head included (same random weights, rebuilt)")
        model, _ = BUILDERS[family](args.layers)
        quantize_linears(model, [*names, "lm_head"], WeightQuant("per_channel", reduce_range=True),
                         ActQuant("minmax"), calibration_loop)
        export_and_time("onnx_int8_s7_head", profile=False)

        log("INT8 W8A8 with dynamic per-token activations (same random weights, rebuilt)")
        model, _ = BUILDERS[family](args.layers)
        quantize_linears(model, names, WeightQuant("per_channel"), ActQuant(dynamic="per_token"))
        export_and_time("onnx_int8_dynamic", profile=False)

        log("INT4 weight-only (RTN, group 32) language model + lm_head (same random weights, rebuilt)")
        model, _ = BUILDERS[family](args.layers)
        adapter.bind(model)
        language = [k for k in names if k.startswith(_language_prefix(model, adapter))] + ["lm_head"]
        quantize_int4_linears(model, language, Int4Quant(group_size=32))
        export_and_time("onnx_int4", level=4, b8=True)
        export_and_time("onnx_int4_exact", level=0, profile=False)
        vision = [k for k in names if k not in language]

        log("INT4 weight-only, group 128 (same random weights, rebuilt)")
        model, _ = BUILDERS[family](args.layers)
        adapter.bind(model)
        quantize_int4_linears(model, language, Int4Quant(group_size=128))
        export_and_time("onnx_int4_g128", level=4)
        quantize_linears(model, vision, WeightQuant("per_channel", reduce_range=True), ActQuant("minmax"),
                         calibration_loop)
        export_and_time("onnx_int4_g128_s7vision", level=4, profile=False)
        export_and_time("onnx_int4_g128_s7vision_prefill8", level=4, prefill="int8", b8=True)

    bandwidth = best_bandwidth(samples)
    for r in results.values():
        r["decode_floor_ms"] = floor_ms(r["decode_bytes_per_token"], bandwidth)
        r["decode_x_floor"] = r["decode_ms_per_token"] / r["decode_floor_ms"]
    base = results["hf_eager_fp32"]
    ratios = {name: {k: r[k] / base[k] for k in TIMES if k in r} for name, r in results.items()}
    targets = []
    for what, name, key, ref, bound in TARGETS:
        if name in results and (ref is None or ref in results):
            reached = results[name][key] / (results[ref][key] if ref else 1.0)
            targets.append({"what": what, "target": bound, "reached": reached, "met": 0 < reached <= bound})
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "family": family, "parameters": params,
              "layers": args.layers, "image_tokens": int((inputs["input_ids"] == image_token_id(model)).sum()),
              "attention": model.config._attn_implementation, "new_tokens": n, "prompt_tokens": prompt,
              "batch": 1, "warmup": warmup, "repeats": repeats, "preprocess_ms": preprocess_ms,
              "memory_bandwidth": bandwidth, "kv_bytes_mid_answer": kv_mid,
              "results": results, "ratios_vs_hf_eager_fp32": ratios, "targets": targets,
              "export_s": export_s, "profiles": profiles, "wall_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "realistic" if family == "llava" else f"realistic-{family}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log("done")


def _language_prefix(model: torch.nn.Module, adapter: Any) -> str:
    language = adapter.component(model, "language")
    return next(name for name, m in model.named_modules() if m is language) + "."


def peer(model: Any, adapter: Any, processor: Any, work: Path, prompt: int, n: int, warmup: int, repeats: int,
         kv_mid: int, batch8: bool, log: Any) -> dict[str, dict[str, float]]:
    """onnxruntime-genai builds of the same decoder (int4 block 32 and 128 / accuracy 4, int8, fp32), timed alike."""
    import bench_peer

    src = bench_peer.save_causal_lm(model, adapter, processor, work / "causal-lm")
    out: dict[str, dict[str, float]] = {}
    vocab = model.config.get_text_config().vocab_size
    for name, precision, extra in (("genai_int4", "int4", {"block_size": 32, "accuracy_level": 4}),
                                   ("genai_int4_g128", "int4", {"block_size": 128, "accuracy_level": 4}),
                                   ("genai_int8", "int8", {"accuracy_level": 4}),
                                   ("genai_fp32", "fp32", None)):
        t0 = time.time()
        folder = bench_peer.build(src, work / name, precision, extra)
        r = bench_peer.decode_timings(folder, prompt, n, warmup, repeats, vocab)
        weights = bench_peer.weight_bytes(folder) - model.get_input_embeddings().weight.numel() * 4
        r.update(build_s=time.time() - t0, decode_bytes_per_token=weights + kv_mid)
        if batch8 and name == "genai_int4":
            b8 = bench_peer.decode_timings(folder, prompt, n, 1, max(2, repeats // 2), vocab, batch=8)
            r["batch8_e2e_ms"] = b8["e2e_ms"]
        out[name] = r
        log(f"{name}: {r}")
    return out


def markdown(report: dict[str, Any]) -> str:
    """Result table, targets, and the profile breakdown."""
    res, ratios = report["results"], report["ratios_vs_hf_eager_fp32"]
    bw = report["memory_bandwidth"]
    lines = [f"Image preprocessing (processor, batch 1): {report['preprocess_ms']:.1f} ms, not in the times below. "
             f"Memory bandwidth (STREAM-style copy, {bw['threads']} threads): {bw['copy_gb_s']:.1f} GB/s, the fastest "
             f"of {len(bw['samples_gb_s'])} copies taken through the run ({min(bw['samples_gb_s']):.1f}–"
             f"{max(bw['samples_gb_s']):.1f}); floor = (decoder weights + KV cache at mid-answer) / bandwidth.", "",
             "| artifact | vision ms (batch 1) | TTFT ms | decode ms/token | end-to-end ms | vision × | TTFT × | "
             "decode × | end-to-end × | decode floor ms | decode × floor | batch 8 end-to-end ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r: dict[str, float], key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "–"

    for name, r in res.items():
        q = ratios[name]
        lines.append(f"| {name} | {cell(r, 'vision_ms', '.0f')} | {r['ttft_ms']:.0f} | {r['decode_ms_per_token']:.1f} "
                     f"| {r['e2e_ms']:.0f} | {cell(q, 'vision_ms', '.2f')} | {q['ttft_ms']:.2f} | "
                     f"{q['decode_ms_per_token']:.2f} | {q['e2e_ms']:.2f} | {cell(r, 'decode_floor_ms', '.1f')} | "
                     f"{cell(r, 'decode_x_floor', '.2f')} | {cell(r, 'batch8_e2e_ms', '.0f')} |")
    lines += ["", "genai_* rows: onnxruntime-genai on a text prompt of the same token count (no vision; its "
              "end-to-end is prefill + decode only).", "",
              "| target | bound | reached | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['what']} | ≤ {t['target']:.2f} | {t['reached']:.2f} | {'yes' if t['met'] else 'no'} |")
    for name in ("onnx_fp32", "onnx_int8", "onnx_int4"):
        p = report["profiles"].get(name)
        if not p:
            continue
        lines += ["", f"{name}, one profiled generate of {report['new_tokens']} tokens: {p['wall_ms']:.0f} ms wall, "
                      f"{p['inside_onnxruntime_ms']:.0f} ms inside onnxruntime, {p['outside_onnxruntime_ms']:.0f} ms "
                      "outside (Python loop, numpy KV-cache copies, feature scatter).", "",
                  "| graph | ms |", "|---|---|"]
        lines += [f"| {g} | {ms:.0f} |" for g, ms in p["graphs_ms"].items()]
        lines += ["", "| graph:op type | ms |", "|---|---|"]
        lines += [f"| {op} | {ms:.0f} |" for op, ms in p["top_ops_ms"].items()]
    top = report["profiles"].get("hf_eager_fp32_top_ops")
    if top:
        lines += ["", "hf_eager_fp32, one profiled generate: top aten ops by self CPU time", "",
                  "| op | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| {e['op']} | {e['ms']:.0f} | {e['share']:.0%} | {e['calls']} |" for e in top]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
