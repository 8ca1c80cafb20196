"""`zoo:shapes-vqa-outliers`: the bundled model with the activation outliers of a real pretrained LLM.

Trained small models have none; real LLMs carry a few hidden channels 10-300x larger than the rest
(SmolLM2-135M: `mlp.down_proj` input absmax 3065 against a 99.99th percentile of 14.9), and one
static per-tensor INT8 scale cannot hold them. This transform puts such channels into the bundled
model without changing the function it computes: each scale-up is undone by the next linear map.

Per decoder layer (language model) and per encoder layer (vision tower):
- norm -> q/k/v and norm -> gate/up (fc1): a few norm channels x a, those weight columns / a;
- up_proj -> down_proj: a few intermediate channels' up rows x b, down_proj columns / b (SiLU-gated
  MLPs are linear in `up`, so the product scales exactly);
- v_proj -> o_proj: a few value channels x g, the o_proj columns reading them / g.

fp32 outputs change only by rounding (checked on build). Regenerate with
`python -m compress.zoo.outliers`; the result is deterministic and bundled in the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

SEED = 0
NORM_GAIN = (30.0, 150.0)  # q/k/v and gate/up input channels
DOWN_GAIN = (300.0, 1500.0)  # down_proj input channels (the worst sites in real LLMs)
VALUE_GAIN = (20.0, 80.0)  # o_proj input channels
CHANNELS = 2  # outlier channels per site
FILES = ("chat_template.jinja", "config.json", "generation_config.json", "processor_config.json",
         "tokenizer.json", "tokenizer_config.json")


def _gains(gen: torch.Generator, lo_hi: tuple[float, float], n: int) -> torch.Tensor:
    lo, hi = torch.tensor(lo_hi).log()
    return (lo + (hi - lo) * torch.rand(n, generator=gen)).exp()


def _pick(gen: torch.Generator, size: int, n: int) -> torch.Tensor:
    return torch.randperm(size, generator=gen)[:n]


@torch.no_grad()
def _norm_into(norm: nn.Module, readers: list[nn.Linear], gen: torch.Generator) -> None:
    """Scale norm output channels up (weight and bias) and the readers' input columns down."""
    idx = _pick(gen, norm.weight.shape[0], CHANNELS)
    gain = _gains(gen, NORM_GAIN, CHANNELS)
    norm.weight[idx] *= gain
    if getattr(norm, "bias", None) is not None:
        norm.bias[idx] *= gain
    for lin in readers:
        lin.weight[:, idx] /= gain


@torch.no_grad()
def _rows_into(writer: nn.Linear, reader: nn.Linear, gain_range: tuple[float, float], gen: torch.Generator,
               reader_cols: list[list[int]] | None = None) -> None:
    """Scale `writer` output rows up and the `reader` input columns that read them down."""
    idx = _pick(gen, writer.weight.shape[0], CHANNELS)
    gain = _gains(gen, gain_range, CHANNELS)
    writer.weight[idx] *= gain[:, None]
    if writer.bias is not None:
        writer.bias[idx] *= gain
    for i, g in zip(idx.tolist(), gain.tolist(), strict=True):
        for col in (reader_cols[i] if reader_cols else [i]):
            reader.weight[:, col] /= g


def _value_readers(attn: nn.Module, config) -> list[list[int]]:
    """o_proj input columns per v_proj output channel (grouped-query attention repeats each kv head)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    cols = []
    for r in range(kv_heads * head_dim):
        kv, d = divmod(r, head_dim)
        cols.append([(kv * group + j) * head_dim + d for j in range(group)])
    return cols


def add_outliers(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Apply the function-preserving outlier transform in place (a LLaVA with a Llama text model)."""
    gen = torch.Generator().manual_seed(seed)
    text_cfg = model.config.get_text_config()
    for layer in model.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _norm_into(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], gen)
        _norm_into(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], gen)
        _rows_into(mlp.up_proj, mlp.down_proj, DOWN_GAIN, gen)
        _rows_into(attn.v_proj, attn.o_proj, VALUE_GAIN, gen, _value_readers(attn, text_cfg))
    for layer in model.model.vision_tower.encoder.layers:
        attn = layer.self_attn
        _norm_into(layer.layer_norm1, [attn.q_proj, attn.k_proj, attn.v_proj], gen)
        _norm_into(layer.layer_norm2, [layer.mlp.fc1], gen)
        _rows_into(attn.v_proj, attn.out_proj, VALUE_GAIN, gen)
    return model


def build(source: Path, out: Path, seed: int = SEED) -> dict[str, float]:
    """Write the transformed model next to a copy of the source's processor files; returns the check."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from compress.zoo import shapes

    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(source)
    tasks = list(shapes.samples(10_000_000, 16))
    inputs = processor(images=[t.image for t in tasks], text=[f"<image> {t.question} answer :" for t in tasks],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**inputs).logits
        add_outliers(model, seed)
        after = model(**inputs).logits
    diff = float((after - before).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"outlier transform changed the logits by {diff}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in FILES:
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    for f in out.iterdir():
        f.chmod(0o644)  # save_pretrained writes 0600; the package ships readable files
    check = {"seed": seed, "max_logit_change": diff}
    (out / "outliers.json").write_text(json.dumps(check, indent=2) + "\n")
    return check


def main() -> None:
    from compress.zoo import MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=MODELS["shapes-vqa-outliers"])
    args = p.parse_args()
    print(build(MODELS["shapes-vqa"], args.out))


if __name__ == "__main__":
    main()
