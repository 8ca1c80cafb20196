"""Speed of exported artifacts on a LLaVA of realistic shape (random weights), against HF eager fp32.

    python benchmarks/bench_realistic.py --out benchmarks/results [--layers 24]

Builds a LLaVA from config: a ViT-B/16-sized CLIP tower (224x224, 196 image tokens) and a Llama
decoder (hidden 1024, 16 heads / 8 KV heads, MLP 2816, vocab 32000; 24 layers is ~0.47B parameters
in all). Then, in one process on one machine, with the same prompt and the same number of new tokens
(EOS ignored), warm-up excluded, median of the repeats:

- HF eager fp32 `generate` with KV cache (the baseline) and the eager fp32 vision tower + projector;
- the fp32 ONNX export and the INT8 W8A8 ONNX export (minmax scales calibrated on random images),
  each through `OrtRunner`.
Random weights give garbage answers but the same arithmetic as trained ones; speed is all we measure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

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
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from compress.arch import get_adapter
from compress.bench import machine, median_ms
from compress.export import export_onnx
from compress.quant import ActQuant, WeightQuant, quantize_linears
from compress.runtime.ort_runner import OrtRunner


def build(layers: int, vocab: int = 32000) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model, processor = build(args.layers)
    adapter = get_adapter("llava")
    params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    question = " ".join(f"w{i}" for i in range(24))  # a 24-word prompt after the 196 image tokens
    inputs = adapter.build_inputs(processor, [image], [question]).inputs
    n = args.new_tokens
    results: dict[str, dict[str, float]] = {}
    log = lambda msg: print(f"[bench] {msg}", flush=True)  # noqa: E731

    def timings(vision, generate) -> dict[str, float]:
        vision_ms = median_ms(vision, args.warmup, args.repeats)
        ttft = median_ms(lambda: generate(1), args.warmup, args.repeats)
        e2e = median_ms(lambda: generate(n), args.warmup, args.repeats)
        return {"vision_ms": vision_ms, "ttft_ms": ttft, "decode_ms_per_token": (e2e - ttft) / (n - 1),
                "e2e_ms": e2e}

    pixels = inputs["pixel_values"]
    with torch.inference_mode():
        log(f"model: {params / 1e6:.0f}M parameters; HF eager fp32 generate")
        results["hf_eager_fp32"] = timings(
            lambda: model.model.get_image_features(pixel_values=pixels),
            lambda k: model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False))

    with tempfile.TemporaryDirectory() as tmp:
        for name, quantize in (("onnx_fp32", False), ("onnx_int8", True)):
            if quantize:
                log("INT8 W8A8: calibrating minmax scales on 4 random images")
                names = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear) and k != "lm_head"]

                def loop(m: torch.nn.Module) -> None:
                    with torch.inference_mode():
                        for s in range(4):
                            img = Image.fromarray(np.random.default_rng(s + 1).integers(0, 255, (224, 224, 3),
                                                                                          dtype=np.uint8))
                            m(**adapter.build_inputs(processor, [img], [question]).inputs)

                quantize_linears(model, names, WeightQuant("per_channel"), ActQuant("minmax"), loop)
            t0 = time.time()
            out = Path(tmp) / name
            export_onnx(model, adapter, processor, out, fusion=True, quantize=True)
            log(f"{name}: exported in {time.time() - t0:.0f} s")
            runner = OrtRunner.from_dir(out)
            results[name] = timings(lambda r=runner: r.image_features(inputs),
                                    lambda k, r=runner: r.generate(inputs, k, ignore_eos=True))
            results[name]["bytes"] = sum(p.stat().st_size for p in out.iterdir())
            log(f"{name}: {results[name]}")

    base = results["hf_eager_fp32"]
    ratios = {name: {k: r[k] / base[k] for k in ("vision_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")}
              for name, r in results.items()}
    report = {"machine": machine(), "parameters": params, "layers": args.layers, "new_tokens": n,
              "prompt_tokens": int(inputs["input_ids"].shape[1]), "warmup": args.warmup, "repeats": args.repeats,
              "results": results, "ratios_vs_hf_eager_fp32": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "realistic.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| artifact | vision ms | TTFT ms | decode ms/token | e2e ms | vision × | decode × | e2e × |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        q = ratios[name]
        lines.append(f"| {name} | {r['vision_ms']:.0f} | {r['ttft_ms']:.0f} | {r['decode_ms_per_token']:.1f} | "
                     f"{r['e2e_ms']:.0f} | {q['vision_ms']:.2f} | {q['decode_ms_per_token']:.2f} | "
                     f"{q['e2e_ms']:.2f} |")
    (args.out / "realistic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
