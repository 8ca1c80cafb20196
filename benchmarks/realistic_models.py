"""Realistic-shape VLMs with random weights, built from config with in-memory tokenizers (no downloads):
a LLaVA (ViT-B/16 CLIP tower + Llama decoder, ~0.44B) and a Qwen2-VL (768-wide tower with 2-D rotary
positions, 2x2 merge, Qwen2 decoder with M-RoPE, ~0.43B). Speed depends on shapes and kernels, not on what
the weights say. Used by bench_realistic.py.
"""

from __future__ import annotations

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
