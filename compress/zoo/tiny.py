"""Tiny, randomly initialised models of every supported family, built entirely offline.

Each has a real transformers architecture and processor (same classes, same special tokens, same
image-token expansion as the released checkpoints), shrunk to under 100k parameters
and 32x32-pixel images, so tests exercise the true code paths in seconds without the model hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.errors import ConfigError
from compress.zoo import tiny_more
from compress.zoo.tiny_parts import (
    HEADS,
    HIDDEN,
    IMAGE_SIZE,
    LAYERS,
    PATCH,
    VISION_HIDDEN,
    byte_tokenizer,
    text_kwargs,
)

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3", "internvl", "mllama")

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The SmolVLM / Idefics3 template shape: "User:<image>question<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _llava() -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = byte_tokenizer(["<image>"], bos="<s>", eos="</s>", pad="<pad>", extra={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_HIDDEN * 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=VISION_HIDDEN,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_kwargs(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaForConditionalGeneration(config), processor


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen(model_type: str) -> tuple[Any, Any]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from compress.arch.qwen2_vl import IMAGE_ONLY_PROCESSORS

    tokenizer = byte_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    merge = 2
    # min = max pixels: every image is resized to IMAGE_SIZE x IMAGE_SIZE (for square inputs).
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=merge,
        temporal_patch_size=2,
        size={"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE},
    )
    processor = IMAGE_ONLY_PROCESSORS[model_type](
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = text_kwargs(tokenizer)
    head_dim = HIDDEN // HEADS
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
    }
    vision: dict[str, Any] = {
        "depth": LAYERS,
        "hidden_size": HIDDEN,  # the merger's output width = the text hidden size
        "num_heads": HEADS,
        "patch_size": PATCH,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision |= {"embed_dim": VISION_HIDDEN, "mlp_ratio": 2}
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision |= {
            "hidden_size": VISION_HIDDEN,
            "out_hidden_size": HIDDEN,
            "intermediate_size": VISION_HIDDEN * 2,
            "window_size": PATCH * merge,  # one merged patch per window: 4 windows per image
            "fullatt_block_indexes": [LAYERS - 1],
        }
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return model_cls(config), processor


IDEFICS3_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
]


def _idefics3(model_type: str) -> tuple[Any, Any]:
    scale = 2
    image_seq_len = (IMAGE_SIZE // PATCH) ** 2 // scale**2
    tokenizer = byte_tokenizer(
        IDEFICS3_SPECIALS,
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        extra={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    # No splitting: one global 32x32 view per image, as with `do_image_splitting=False` upstream.
    image_kwargs: dict[str, Any] = {
        "size": {"longest_edge": IMAGE_SIZE},
        "max_image_size": {"longest_edge": IMAGE_SIZE},
        "do_image_splitting": False,
        "do_convert_rgb": True,
    }
    vision = {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_HIDDEN * 2,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
    }
    text = {"model_type": "llama", **text_kwargs(tokenizer)}
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if model_type == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3Processor as Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as ImageProcessor,
        )
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as ImageProcessor,
        )

        from compress.arch.idefics3 import ImageOnlySmolVLMProcessor as Processor

    processor = Processor(
        image_processor=ImageProcessor(**image_kwargs),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_TEMPLATE,
    )
    config = Config(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return Model(config), processor


def tiny_model(family: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A tiny random model of `family` (a supported config.model_type) and its local processor."""
    if family not in FAMILIES:
        raise ConfigError(f"no tiny model for '{family}'; available: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family == "llava":
        model, processor = _llava()
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        model, processor = _qwen(family)
    elif family in ("paligemma", "gemma3", "internvl", "mllama"):
        model, processor = getattr(tiny_more, family)()
    else:
        model, processor = _idefics3(family)
    return model.eval(), processor


def save_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny model + processor as a normal transformers folder (safetensors weights)."""
    path = Path(path)
    model, processor = tiny_model(family, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
