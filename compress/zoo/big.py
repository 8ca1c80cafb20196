"""Realistic-shape LLaVA models with random weights, of any size, written shard by shard without ever being
held in memory: the proof models for streamed runs (`vlm-compress zoo big SHAPE --out DIR`).

`llava-1.5-7b` is LLaVA-1.5-7B's shape (CLIP ViT-L/14 at 336 px, 576 image tokens, a two-layer GELU
projector, a Llama-2-7B decoder; ~7.06B parameters, ~28 GB in fp32). Smaller shapes keep the same layout
for tests. The tokenizer is a word-level one built in memory (no downloads); speed and memory depend on
shapes, not on what the weights say. Each tensor is drawn from its own seeded generator (normal, std 0.02
for matrices and embeddings; norms 1, biases 0), so a folder is the same bytes on every machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, int]] = {
    # vision: CLIP ViT-L/14-336; language: Llama-2-7B (vocab 32064 as llava-1.5-7b-hf)
    "llava-1.5-7b": {"v_hidden": 1024, "v_inter": 4096, "v_layers": 24, "v_heads": 16, "image": 336, "patch": 14,
                     "hidden": 4096, "inter": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32064},
    # a few hundred MB in the same layout (CLIP ViT-B/16 at 224 px, a 1024-wide Llama decoder)
    "llava-small": {"v_hidden": 768, "v_inter": 3072, "v_layers": 12, "v_heads": 12, "image": 224, "patch": 16,
                    "hidden": 1024, "inter": 2816, "layers": 12, "heads": 16, "kv_heads": 8, "vocab": 16000},
    # the memory-bound test's model: deep and narrow-vocabulary, so its blocks (not the embeddings) are the bulk
    "llava-test": {"v_hidden": 768, "v_inter": 3072, "v_layers": 6, "v_heads": 12, "image": 224, "patch": 16,
                   "hidden": 1024, "inter": 2816, "layers": 24, "heads": 16, "kv_heads": 8, "vocab": 8000},
}


def _processor(shape: dict[str, int]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = [f"w{i}" for i in range(shape["vocab"] - len(specials))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*specials, *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    size = {"height": shape["image"], "width": shape["image"]}
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False),
                          tokenizer=fast, patch_size=shape["patch"], vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def config(name: str, processor: Any, layers: int | None = None, vision_layers: int | None = None) -> Any:
    """The shape's LlavaConfig; `layers` / `vision_layers` override its depth (a few blocks of the 7B shape
    measure a 7B block's time and memory in minutes)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = {**SHAPES[name], **({"layers": layers} if layers else {}),
         **({"v_layers": vision_layers} if vision_layers else {})}
    tok = processor.tokenizer
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"],
                                       num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                                       image_size=s["image"], patch_size=s["patch"], projection_dim=s["v_hidden"]),
        text_config=LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                bos_token_id=tok.bos_token_id, tie_word_embeddings=False),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(s["image"] // s["patch"]) ** 2,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def _tensor(name: str, meta: torch.Tensor, seed: int) -> torch.Tensor:
    """One tensor of the model, from a generator seeded by the model seed and the tensor's name."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return torch.ones(meta.shape)
    if leaf == "bias":
        return torch.zeros(meta.shape)
    return torch.randn(meta.shape, generator=g) * 0.02


def write_big(name: str, out: str | Path, seed: int = 0, max_shard_bytes: int = 2 << 30,
              layers: int | None = None, vision_layers: int | None = None) -> dict[str, Any]:
    """Write the `name` shape into `out` (config, processor, sharded safetensors); returns its sizes. At most one
    shard is in memory at a time."""
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    from compress.checkpoint import save_processor
    from compress.sequential.shards import ShardWriter

    out = Path(out)
    processor = _processor(SHAPES[name])
    cfg = config(name, processor, layers, vision_layers)
    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration(cfg)
    writer = ShardWriter(out, max_shard_bytes)
    params = 0
    for key, meta in model.state_dict().items():
        writer.add({key: _tensor(key, meta, seed)})
        params += meta.numel()
    writer.close()
    cfg.save_pretrained(out)
    save_processor(processor, out)
    return {"shape": name, "parameters": params, "bytes": writer.total, "shards": writer.shards}
