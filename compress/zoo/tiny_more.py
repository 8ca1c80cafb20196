"""Tiny PaliGemma, Gemma3 (SigLIP vision + Gemma text), InternVL and Mllama models, built offline like
`compress.zoo.tiny` (which dispatches here)."""

from __future__ import annotations

from typing import Any

import torch

from compress.zoo.tiny_parts import HEADS, IMAGE_SIZE, LAYERS, PATCH, VISION_HIDDEN, byte_tokenizer, text_kwargs

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _siglip() -> dict[str, Any]:
    return {"model_type": "siglip_vision_model", "hidden_size": VISION_HIDDEN, "intermediate_size": VISION_HIDDEN * 2,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "image_size": IMAGE_SIZE,
            "patch_size": PATCH, "vision_use_head": False}  # as in the released PaliGemma / Gemma3 configs


def _image_processor() -> Any:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_convert_rgb=True)


def paligemma() -> tuple[Any, Any]:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    tokenizer = byte_tokenizer(["<image>"], bos="<bos>", eos="<eos>", pad="<pad>", extra={"image_token": "<image>"})
    image_processor = _image_processor()
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds loc/seg tokens
    text = {"model_type": "gemma", **text_kwargs(processor.tokenizer), "head_dim": 8,
            "hidden_activation": "gelu_pytorch_tanh"}
    config = PaliGemmaConfig(vision_config=_siglip(), text_config=text, projection_dim=text["hidden_size"],
                             image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
                             pad_token_id=processor.tokenizer.pad_token_id)
    return PaliGemmaForConditionalGeneration(config), processor


GEMMA3_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def gemma3() -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = byte_tokenizer(GEMMA3_SPECIALS, bos="<bos>", eos="<eos>", pad="<pad>",
                               extra={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                      "eoi_token": "<end_of_image>"})
    tokens_per_image = 4  # 4x4 patches pooled 2x2
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                do_convert_rgb=True, do_pan_and_scan=False),
        tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=tokens_per_image)
    text = {"model_type": "gemma3_text", **text_kwargs(tokenizer), "head_dim": 8, "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 8,
            "hidden_activation": "gelu_pytorch_tanh"}
    config = Gemma3Config(vision_config=_siglip(), text_config=text, mm_tokens_per_image=tokens_per_image,
                          image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
                          boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
                          pad_token_id=tokenizer.pad_token_id)
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection to zeros (every image would look alike): seeded random instead.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight,
                          std=config.text_config.initializer_range)
    return model, processor


INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def internvl() -> tuple[Any, Any]:
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from compress.arch.internvl import ImageOnlyInternVLProcessor

    tokenizer = byte_tokenizer(INTERNVL_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                               extra={"start_image_token": "<img>", "end_image_token": "</img>",
                                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    seq = (IMAGE_SIZE // PATCH) ** 2 // 4  # pixel shuffle at downsample_ratio 0.5
    processor = ImageOnlyInternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 crop_to_patches=False, do_convert_rgb=True),
        tokenizer=tokenizer, image_seq_length=seq, chat_template=INTERNVL_TEMPLATE)
    vision = {"model_type": "internvl_vision", "hidden_size": VISION_HIDDEN, "intermediate_size": VISION_HIDDEN * 2,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "image_size": [IMAGE_SIZE, IMAGE_SIZE],
              "patch_size": [PATCH, PATCH]}
    text = {"model_type": "qwen2", **text_kwargs(tokenizer)}
    config = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=seq,
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), tie_word_embeddings=False)
    return InternVLForConditionalGeneration(config), processor


MLLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|image|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
MLLAMA_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def mllama() -> tuple[Any, Any]:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = byte_tokenizer(MLLAMA_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                               pad="<|finetune_right_pad_id|>", extra={"image_token": "<|image|>"})
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=4,
                                                do_convert_rgb=True),
        tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE)
    vision = {"hidden_size": VISION_HIDDEN, "num_hidden_layers": LAYERS, "num_global_layers": 1,
              "attention_heads": HEADS, "intermediate_size": VISION_HIDDEN * 2, "image_size": IMAGE_SIZE,
              "patch_size": PATCH, "max_num_tiles": 4, "intermediate_layers_indices": [0],  # Llama 3.2's tiling
              "vision_output_dim": VISION_HIDDEN * 2}
    text = {**text_kwargs(tokenizer), "num_hidden_layers": 3, "cross_attention_layers": [1]}
    config = MllamaConfig(vision_config=vision, text_config=text,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the tanh gates closed (images would change nothing): open them
        for name, param in model.named_parameters():
            if name.endswith("gate") and not param.any():
                param.fill_(1.0)
    return model, processor
