"""LLaVA (llava-hf layout): CLIP-style vision tower, MLP projector, any causal LM as the text backbone."""

from __future__ import annotations

from typing import ClassVar

from compress.arch.base import Adapter
from compress.arch.export_spec import ExportSpec


class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava",)
    components: ClassVar[dict[str, str]] = {
        "vision": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
        "lm_head": "lm_head",
    }
    # The text backbone varies (Llama, Mistral, Qwen2, ...); `bind` replaces this with what is loaded.
    default_decoder_layers: ClassVar[dict[str, str]] = {"llava": "LlamaDecoderLayer"}
    image_token = "<image>"
    # The llava-1.5 conversation format, used when the processor ships no chat template.
    default_prompt = "USER: <image>\n{question} ASSISTANT:"
    answer_join = " "
    end_of_turn = None  # the tokenizer's eos (</s>)
    # The tower's hidden states at the configured feature layer(s) + projector, batched (not
    # `get_image_features`, whose per-image list bakes the batch size into the trace); CLIP fusions.
    export_spec = ExportSpec(vision="projected_tower", vision_optimizer="clip")
    tokens_refused = None  # one CLIP / SigLIP patch grid per image into the projector: pool and select_merge
