"""Gemma 3 (4B and up, image + text): SigLIP vision tower, pooled projector, Gemma3 text model.

What is special: the prompt holds one `<start_of_image>` per image, which the processor expands into
the pooled image tokens (`<image_soft_token>`, bidirectional among themselves via token_type_ids);
the text model interleaves sliding-window and full-attention layers (`layer_types`), and a turn
ends with `<end_of_turn>`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from compress.arch.base import Adapter
from compress.arch.export_spec import ExportSpec


class Gemma3Adapter(Adapter):
    name = "gemma3"
    model_types = ("gemma3",)
    components: ClassVar[dict[str, str]] = {
        "vision": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
        "lm_head": "lm_head",
    }
    default_decoder_layers: ClassVar[dict[str, str]] = {"gemma3": "Gemma3DecoderLayer"}
    image_token = "<start_of_image>"  # the placeholder a prompt carries
    image_fill_token = "<image_soft_token>"  # what the processor expands it into
    default_prompt = "<start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n"
    answer_join = ""  # the generation prompt ends with a newline
    end_of_turn = "<end_of_turn>"
    # Each image's tokens form a bidirectional block.
    export_spec = ExportSpec(vision="image_features", attention_blocks="images")

    def images_arg(self, images: list[Image.Image]) -> list[Any]:
        return [[image] for image in images]  # one list per prompt: the processor checks the grouping

    def block_masks(self, block_sequence_ids: torch.Tensor, **mask_kwargs: Any) -> Any:
        """Gemma3's own masks: image blocks in both its full-attention and sliding-window layers."""
        from transformers.models.gemma3 import modeling_gemma3

        return modeling_gemma3.create_masks_for_vision_model(block_sequence_ids=block_sequence_ids, **mask_kwargs)
