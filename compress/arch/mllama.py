"""Mllama (Llama 3.2 Vision): a tiled ViT, one linear projector, and a Llama text model whose every
few layers are cross-attention layers reading the image states (no image tokens in the sequence).

What is special: the prompt's `<|image|>` stays one token; the text attends to the image through
`cross_attention_layers` (their own q/k/v/o and gates), fed by vision states computed once per image and
cached. The processor returns `cross_attention_mask`, `aspect_ratio_ids` and `aspect_ratio_mask` with
the tiles. `shrink` is refused: its cross-attention layers share the head count of the self-attention
ones, and removing layers would have to renumber `cross_attention_layers`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image

from compress.arch.base import Adapter
from compress.arch.export_spec import ExportSpec


class MllamaAdapter(Adapter):
    name = "mllama"
    model_types = ("mllama",)
    components: ClassVar[dict[str, str]] = {
        "vision": "model.vision_model",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
        "lm_head": "lm_head",
    }
    default_decoder_layers: ClassVar[dict[str, str]] = {"mllama": "MllamaSelfAttentionDecoderLayer"}
    image_token = "<|image|>"
    default_prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    answer_join = ""
    end_of_turn = "<|eot_id|>"
    refused_stages: ClassVar[dict[str, str]] = {
        "shrink": "its cross-attention layers share the self-attention head count and sit at fixed layer indices "
                  "(cross_attention_layers); structured pruning does not handle them yet",
    }
    # Tiles -> cross-attention states fed to every decoder call; the cross-attention layers do not go through
    # the self-attention cache, so no GroupQueryAttention.
    export_spec = ExportSpec(vision="tiled", cross_attention=True, group_query_attention=False)

    def images_arg(self, images: list[Image.Image]) -> list[Any]:
        return [[image] for image in images]

    def decoder_layers(self, model: Any) -> list[Any]:
        """Every text layer in order, self- and cross-attention alike (what layer-by-layer passes walk)."""
        return list(self.component(model, "language").layers)

    def find_decoder_layer(self, model: Any) -> str:
        return type(self.component(model, "language").layers[0]).__name__

    def cross_attention_tokens(self, model: Any) -> int:
        """Patches per tile (+ class token): the vision states each tile gives the cross-attention layers."""
        return int(self.component(model, "vision").num_patches)
