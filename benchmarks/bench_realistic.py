"""Speed of compressed artifacts on a VLM of realistic shape (random weights), against HF eager fp32.

    python benchmarks/bench_realistic.py [--family llava|qwen2_vl] [--out benchmarks/results] [--layers 24]

`--family qwen2_vl` builds a Qwen2-VL of the same language size with its own attention layout instead:
a 448x448 image as 1024 patches of 14x14 through a 12-layer, 768-wide vision tower with 2-D rotary
positions, merged 2x2 into 256 tokens, and a Qwen2 decoder (hidden 1024, 24 layers, 16 heads / 2 KV
heads, M-RoPE, MLP 2816, vocab 32000): ~0.42B parameters. Results go to realistic-qwen2_vl.{json,md}.

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

Time to first token = generate with N=1; decode ms/token = (generate(N) - generate(1)) / (N - 1),
the same derivation for every artifact. The INT8 and fp32 ONNX runs are then profiled once with
onnxruntime's profiler (`SessionOptions.enable_profiling`) to say where the time goes, per graph
and per op type, plus the time spent outside onnxruntime (Python loop, numpy copies of the cache).
Results: OUT/realistic.json and OUT/realistic.md. About 10 minutes on 2 cores (exports dominate).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from compress.arch import get_adapter
from compress.bench import machine, median_ms
from compress.export import export_onnx
from compress.export.files import read_meta
from compress.export.onnx import image_token_id
from compress.quant import ActQuant, WeightQuant, quantize_linears
from compress.runtime.ort_runner import OrtRunner

TARGETS = {"vision_ms": 0.5, "decode_ms_per_token": 0.5, "e2e_ms": 0.35}  # onnx_int8 / hf_eager_fp32 (issue 4)
TIMES = ("vision_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")


def build(layers: int, vocab: int = 32000) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA of realistic shape with random weights and a word-level tokenizer built in memory."""
    words = [f"w{i}" for i in range(vocab - 5)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<image>",
                                                                    *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"height": 224, "width": 224},
                                              crop_size={"height": 224, "width": 224}, do_center_crop=False),
        tokenizer=fast, patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=224, patch_size=16),
        text_config=LlamaConfig(vocab_size=len(fast), hidden_size=1024, intermediate_size=2816,
                                num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                                max_position_embeddings=2048, pad_token_id=fast.pad_token_id,
                                eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id),
        image_token_index=fast.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=196, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def build_qwen2_vl(layers: int, vocab: int = 32000) -> tuple[Any, Any]:
    """A Qwen2-VL of realistic shape with random weights and a word-level tokenizer built in memory."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from compress.arch.qwen2_vl import ImageOnlyQwen2VLProcessor

    words = [f"w{i}" for i in range(vocab - len(QWEN_SPECIALS) - 1)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", *QWEN_SPECIALS, *words])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    pixels = 448 * 448
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                 size={"shortest_edge": pixels, "longest_edge": pixels}),
        tokenizer=fast)
    ids = {t: fast.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = 1024 // 16
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(fast), "hidden_size": 1024, "intermediate_size": 2816,
                     "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 2,
                     "max_position_embeddings": 4096, "pad_token_id": fast.pad_token_id,
                     "eos_token_id": fast.eos_token_id,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]}},
        vision_config={"depth": 12, "embed_dim": 768, "hidden_size": 1024, "num_heads": 12, "mlp_ratio": 4,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


BUILDERS = {"llava": build, "qwen2_vl": build_qwen2_vl}
IMAGE_SIZE = {"llava": 224, "qwen2_vl": 448}


def random_image(seed: int, size: int = 224) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def timings(vision, generate, n: int, warmup: int, repeats: int) -> dict[str, float]:
    """vision at batch 1; TTFT = generate(1); decode = (generate(n) - generate(1)) / (n - 1)."""
    vision_ms = median_ms(vision, warmup, repeats)
    ttft = median_ms(lambda: generate(1), warmup, repeats)
    e2e = median_ms(lambda: generate(n), warmup, repeats)
    return {"vision_ms": vision_ms, "ttft_ms": ttft, "decode_ms_per_token": (e2e - ttft) / (n - 1), "e2e_ms": e2e}


def hf_generate(model, inputs: dict[str, Any], n: int) -> None:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert out.shape[1] - inputs["input_ids"].shape[1] == n, out.shape


def torch_profile(model, inputs: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Top aten ops by self CPU time over one HF generate (where eager fp32 spends its time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hf_generate(model, inputs, n)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:8]]


def ort_profile(path: Path, inputs: dict[str, Any], n: int, workdir: Path) -> dict[str, Any]:
    """One warm-up generate, then one profiled generate: ms per graph (decoder split prefill / decode),
    ms per op type, and the wall time spent outside onnxruntime's `run`."""
    import onnxruntime as ort

    meta = read_meta(path)
    sessions = {}
    for name, file in meta["graphs"].items():
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(workdir / f"prof-{path.name}-{name}")
        sessions[name] = ort.InferenceSession(str(path / file), sess_options=opts, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=list(meta.get("session", {}).get(
                                                  "disabled_optimizers", [])))
    runner = OrtRunner(sessions, meta)
    runner.generate(inputs, n, ignore_eos=True)
    t0 = time.perf_counter()
    runner.generate(inputs, n, ignore_eos=True)
    wall_ms = (time.perf_counter() - t0) * 1000
    graphs: dict[str, float] = {}
    ops: dict[str, float] = defaultdict(float)
    inside = 0.0
    for name, sess in sessions.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        measured = runs[len(runs) // 2:]  # the warm-up generate made the first half of the runs
        start = measured[0]["ts"]
        inside += sum(e["dur"] for e in measured) / 1000
        if name == "decoder":
            graphs["decoder prefill"] = measured[0]["dur"] / 1000
            graphs["decoder decode (all steps)"] = sum(e["dur"] for e in measured[1:]) / 1000
        else:
            graphs[name] = sum(e["dur"] for e in measured) / 1000
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                ops[f"{name}:{e['args'].get('op_name', '?')}"] += e["dur"] / 1000
    top = sorted(ops.items(), key=lambda kv: kv[1], reverse=True)[:12]
    return {"wall_ms": wall_ms, "inside_onnxruntime_ms": inside, "outside_onnxruntime_ms": wall_ms - inside,
            "graphs_ms": graphs, "top_ops_ms": dict(top)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(BUILDERS), default="llava", help="attention layout to build")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for realistic.{json,md}")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24: ~0.44B parameters in all)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler runs")
    args = ap.parse_args()
    started = time.time()
    n, warmup, repeats = args.new_tokens, args.warmup, args.repeats
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)  # noqa: E731

    family, size = args.family, IMAGE_SIZE[args.family]
    model, processor = BUILDERS[family](args.layers)
    adapter = get_adapter(family).bind(model)
    params = sum(p.numel() for p in model.parameters())
    question = " ".join(f"w{i}" for i in range(24))  # a 24-word question after the image tokens
    inputs = adapter.build_inputs(processor, [random_image(0, size)], [question]).inputs
    image_args = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    results: dict[str, dict[str, float]] = {}
    export_s: dict[str, float] = {}
    profiles: dict[str, Any] = {}

    def vision_torch() -> None:
        with torch.inference_mode():
            model.model.get_image_features(**image_args)

    log(f"model: {params / 1e6:.0f}M parameters, attention {model.config._attn_implementation}; HF eager fp32")
    results["hf_eager_fp32"] = timings(vision_torch, lambda k: hf_generate(model, inputs, k), n, warmup, repeats)
    log(f"hf_eager_fp32: {results['hf_eager_fp32']}")
    if not args.no_profile:
        profiles["hf_eager_fp32_top_ops"] = torch_profile(model, inputs, n)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def export_and_time(name: str, kernels: str = "portable", profile: bool = True) -> None:
            t0 = time.time()
            out = work / name
            export_onnx(model, adapter, processor, out, fusion=True, quantize=True, int8_kernels=kernels)
            export_s[name] = time.time() - t0
            log(f"{name}: exported in {export_s[name]:.0f} s")
            runner = OrtRunner.from_dir(out)
            results[name] = timings(lambda: runner.image_features(inputs),
                                    lambda k: runner.generate(inputs, k, ignore_eos=True), n, warmup, repeats)
            results[name]["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".data"))
            log(f"{name}: {results[name]}")
            runner = None  # free the sessions before profiling
            gc.collect()
            if profile and not args.no_profile:
                profiles[name] = ort_profile(out, inputs, n, work)
                log(f"{name}: profiled")
            for f in out.iterdir():  # free the disk before the next export
                f.unlink()

        export_and_time("onnx_fp32")

        log("INT8 W8A8: minmax calibration on 4 random image + prompt batches")
        names = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear) and k != "lm_head"]

        def calibration_loop(m: torch.nn.Module) -> None:
            with torch.inference_mode():
                for s in range(4):
                    q = " ".join(f"w{(s * 97 + i) % 31000}" for i in range(16 + 4 * s))
                    m(**adapter.build_inputs(processor, [random_image(s + 1, size)], [q]).inputs)

        quantize_linears(model, names, WeightQuant("per_channel"), ActQuant("minmax"), calibration_loop)
        results["torch_int8_w8a8"] = timings(vision_torch, lambda k: hf_generate(model, inputs, k), n, warmup,
                                             repeats)
        log(f"torch_int8_w8a8 (fake-quant): {results['torch_int8_w8a8']}")
        export_and_time("onnx_int8")  # int8_kernels: portable (U8U8 where S8 could saturate non-VNNI CPUs)
        export_and_time("onnx_int8_vnni", "vnni", profile=False)  # S8 weights: fast U8S8 on VNNI hosts only

        log("INT8 W8A8 with dynamic per-token activations (same random weights, rebuilt)")
        model, _ = BUILDERS[family](args.layers)
        quantize_linears(model, names, WeightQuant("per_channel"), ActQuant(dynamic="per_token"))
        export_and_time("onnx_int8_dynamic", profile=False)

    base = results["hf_eager_fp32"]
    ratios = {name: {k: r[k] / base[k] for k in TIMES} for name, r in results.items()}
    targets = {k: {"target": t, "reached": ratios["onnx_int8"][k], "met": ratios["onnx_int8"][k] <= t}
               for k, t in TARGETS.items()}
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "family": family, "parameters": params,
              "layers": args.layers, "image_tokens": int((inputs["input_ids"] == image_token_id(model)).sum()),
              "attention": model.config._attn_implementation, "new_tokens": n,
              "prompt_tokens": int(inputs["input_ids"].shape[1]), "batch": 1, "warmup": warmup, "repeats": repeats,
              "results": results, "ratios_vs_hf_eager_fp32": ratios, "targets_onnx_int8": targets,
              "export_s": export_s, "profiles": profiles, "wall_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "realistic" if family == "llava" else f"realistic-{family}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log("done")


def markdown(report: dict[str, Any]) -> str:
    """Result table, targets, and the profile breakdown."""
    res, ratios = report["results"], report["ratios_vs_hf_eager_fp32"]
    lines = ["| artifact | vision ms (batch 1) | TTFT ms | decode ms/token | end-to-end ms | vision × | TTFT × | "
             "decode × | end-to-end × |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        q = ratios[name]
        lines.append(f"| {name} | {r['vision_ms']:.0f} | {r['ttft_ms']:.0f} | {r['decode_ms_per_token']:.1f} | "
                     f"{r['e2e_ms']:.0f} | {q['vision_ms']:.2f} | {q['ttft_ms']:.2f} | "
                     f"{q['decode_ms_per_token']:.2f} | {q['e2e_ms']:.2f} |")
    lines += ["", "| target (onnx_int8 / hf_eager_fp32) | target | reached | met |", "|---|---|---|---|"]
    for k, t in report["targets_onnx_int8"].items():
        lines.append(f"| {k} | ≤ {t['target']:.2f}× | {t['reached']:.2f}× | {'yes' if t['met'] else 'no'} |")
    for name in ("onnx_fp32", "onnx_int8"):
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
