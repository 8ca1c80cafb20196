"""The peer a user would pick for the decoder instead: onnxruntime-genai's own model builder and generator.

`save_causal_lm` writes the VLM's language model + lm_head as a plain causal-LM folder (LlamaForCausalLM
for LLaVA), `build` runs `python -m onnxruntime_genai.models.builder` on it (offline, CPU) at a
precision, and `decode_timings` times its generator on a prompt of the same token count as ours with
the same derivation: TTFT = append_tokens + 1 token, decode = (T(n) - T(1)) / (n - 1), warm-up excluded,
median of the repeats, EOS ignored (min_length = max_length).

Needs `pip install --no-deps onnxruntime-genai` (its wheel pins only numpy and onnxruntime).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from compress.bench.timing import median_ms


def save_causal_lm(model: Any, adapter: Any, processor: Any, out: Path) -> Path:
    """The language model and lm_head of a LLaVA-style VLM as a LlamaForCausalLM folder (+ tokenizer)."""
    from transformers import AutoModelForCausalLM

    text_config = model.config.get_text_config()
    lm = AutoModelForCausalLM.from_config(text_config).eval()
    state = {f"model.{k}": v for k, v in adapter.component(model, "language").state_dict().items()}
    state["lm_head.weight"] = adapter.component(model, "lm_head").weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"language model does not map onto {type(lm).__name__}: {missing} {unexpected}")
    lm.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    return out


def build(src: Path, out: Path, precision: str, extra: dict[str, Any] | None = None) -> Path:
    """onnxruntime-genai's builder for the CPU execution provider; returns the output folder."""
    options = [f"{k}={v}" for k, v in (extra or {}).items()]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(out.parent / f"cache-{out.name}")]
    if options:
        cmd += ["--extra_options", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed ({precision}): {proc.stderr[-2000:]}")
    return out


def weight_bytes(folder: Path) -> int:
    """Bytes of the built model's weights (model.onnx + its external data)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(
        ".onnx.data"))


def decode_timings(folder: Path, prompt_tokens: int, n: int, warmup: int, repeats: int, vocab: int,
                   batch: int = 1) -> dict[str, float]:
    """TTFT and decode ms/token of onnxruntime-genai's generator on `prompt_tokens` random ids per row."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ids = np.random.default_rng(0).integers(10, vocab - 10, (batch, prompt_tokens)).astype(np.int32)

    def generate(k: int) -> None:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + k, min_length=prompt_tokens + k, do_sample=False,
                                  batch_size=batch)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        made = 0
        while not gen.is_done():
            gen.generate_next_token()
            made += 1
        assert made == k, (made, k)

    ttft = median_ms(lambda: generate(1), warmup, repeats)
    total = median_ms(lambda: generate(n), warmup, repeats)
    return {"ttft_ms": ttft, "decode_ms_per_token": (total - ttft) / (n - 1), "e2e_ms": total}
