"""Qwen2-VL and Qwen2.5-VL: the patch merger (projector) lives inside the vision tower.

Their processors also insist on a video processor, which needs torchvision; this toolkit only feeds
images, so it loads an image-only variant of the same processor class and works without torchvision.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

from compress.arch.base import Adapter
from compress.arch.export_spec import ExportSpec


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (so no torchvision is needed); same image path."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video processor; same image path."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


IMAGE_ONLY_PROCESSORS: dict[str, type] = {
    "qwen2_vl": ImageOnlyQwen2VLProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
}


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    # `projector` is nested in `vision`; module selection gives each module to its innermost component.
    components: ClassVar[dict[str, str]] = {
        "vision": "model.visual",
        "projector": "model.visual.merger",
        "language": "model.language_model",
        "lm_head": "lm_head",
    }
    default_decoder_layers: ClassVar[dict[str, str]] = {
        "qwen2_vl": "Qwen2VLDecoderLayer",
        "qwen2_5_vl": "Qwen2_5_VLDecoderLayer",
    }
    image_token = "<|image_pad|>"
    explicit_positions = False  # M-RoPE: the model derives 3-D positions from the mask and image grid
    default_prompt = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    # The generation prompt already ends with a newline; the turn closes with <|im_end|>.
    answer_join = ""
    end_of_turn = "<|im_end|>"
    # Patches of any image size in one flat batch (per-patch rotary positions and image/window segments
    # from the runner), 3-D M-RoPE positions for the decoder.
    # onnxruntime-genai's Qwen type computes the M-RoPE positions itself (as HF's get_rope_index does)
    export_spec = ExportSpec(vision="flat_patches", positions="mrope", genai_model_type="qwen2_5_vl")

    @staticmethod
    def decode_positions(model: Any, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """M-RoPE at a decode step: the text position (mask cumsum) plus the prefill's rope delta, on all
        three axes. transformers 5.24 cannot derive it from a full-length mask when one token is fed."""
        deltas = model.model.rope_deltas  # [batch, 1], set by the prefill
        pos = (mask.long().cumsum(-1) - 1)[:, -1:] + deltas.to(mask.device)
        return {"position_ids": pos[None].expand(3, -1, -1)}

    def refuse(self, stage: Any) -> str | None:
        if stage.type == "shrink" and getattr(stage, "heads", 0):
            return ("its attention derives head_dim from hidden_size // num_attention_heads (the M-RoPE sections "
                    "fix head_dim), so heads cannot be pruned; shrink mlp or layers")
        return super().refuse(stage)

    def load_processor(self, source: str, trust_remote_code: bool = False) -> Any:
        return IMAGE_ONLY_PROCESSORS[self.model_type].from_pretrained(source, trust_remote_code=trust_remote_code)
