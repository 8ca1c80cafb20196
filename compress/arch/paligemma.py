"""PaliGemma (1 and 2): SigLIP vision tower, one linear projector, Gemma / Gemma2 text model.

What is special: no chat template (the documented prompt is the image tokens, then bos, the prompt
and a newline, which the processor assembles itself), and prefix-LM attention: image + prompt
tokens (token_type_ids 0) attend to each other both ways, answer tokens (1) causally. So answers are
teacher-forced as the processor's `suffix`, never as prompt text (prompt text would be bidirectional
and see the answer it predicts).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from compress.arch.base import Adapter
from compress.arch.export_spec import ExportSpec


class PaliGemmaAdapter(Adapter):
    name = "paligemma"
    model_types = ("paligemma",)
    components: ClassVar[dict[str, str]] = {
        "vision": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
        "lm_head": "lm_head",
    }
    default_decoder_layers: ClassVar[dict[str, str]] = {"paligemma": "GemmaDecoderLayer"}
    image_token = "<image>"
    # The processor inserts bos after the image tokens and a newline after the prompt.
    default_prompt = "<image>{question}"
    native_prompt = True  # that is PaliGemma's documented format, not a guess
    answer_join = ""
    end_of_turn = None  # the tokenizer's eos
    # Image + prompt form one bidirectional block (the prefix), the answer is causal.
    export_spec = ExportSpec(vision="image_features", attention_blocks="prefix")

    def _encode_answers(self, processor: Any, images: list[Image.Image], prompts: list[str],
                        forced: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        eos = processor.tokenizer.eos_token
        suffixes = [a[: -len(eos)] if a.endswith(eos) else a for a in forced]  # the processor appends eos
        processor.tokenizer.padding_side = "left"
        enc = processor(images=self.images_arg(images), text=prompts, suffix=suffixes, return_tensors="pt",
                        padding=True)
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "labels"}
        return inputs, [0 if a.endswith(eos) else 1 for a in forced]  # a cut answer still got an eos

    def _encode(self, processor: Any, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in super()._encode(processor, images, texts).items() if k != "labels"}

    def block_masks(self, block_sequence_ids: torch.Tensor, **mask_kwargs: Any) -> Any:
        """The prefix block over a full-attention (Gemma) text model, or over the full-attention layers of a
        hybrid (Gemma2) one, whose sliding layers stay causal as upstream builds them."""
        from transformers import masking_utils

        masks = masking_utils.create_causal_mask(**mask_kwargs, block_sequence_ids=block_sequence_ids)
        if getattr(mask_kwargs["config"], "sliding_window", None) is not None:
            masks = {"full_attention": masks,
                     "sliding_attention": masking_utils.create_sliding_window_causal_mask(**mask_kwargs)}
        return masks
