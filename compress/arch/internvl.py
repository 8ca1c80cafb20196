"""InternVL 2.5 / 3 in transformers' native layout (`internvl`, the `-hf` checkpoints): InternViT vision
tower, pixel-shuffle + MLP projector, Qwen2 (or Llama) text model.

What is special: the prompt carries one `<IMG_CONTEXT>` per image, which the processor expands into
`<img>` + image tokens + `</img>` per tile; large images are tiled (`crop_to_patches`), and the
projector first pixel-shuffles the vision grid (`downsample_ratio`, 4x fewer tokens at 0.5). Its
processor also wants a video processor (torchvision); images only need an image-only variant.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from transformers import InternVLProcessor
from transformers.processing_utils import ProcessorMixin

from compress.arch.base import Adapter
from compress.arch.export_spec import ExportSpec


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVLProcessor without the video processor (so no torchvision is needed); same image path.

    transformers reads a processor's parts from its `__init__` signature, so this one names no video
    processor and mirrors `InternVLProcessor.__init__` otherwise.
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")


class InternVLAdapter(Adapter):
    name = "internvl"
    model_types = ("internvl",)
    components: ClassVar[dict[str, str]] = {
        "vision": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
        "lm_head": "lm_head",
    }
    default_decoder_layers: ClassVar[dict[str, str]] = {"internvl": "Qwen2DecoderLayer"}
    image_token = "<IMG_CONTEXT>"
    default_prompt = "<|im_start|>user\n<IMG_CONTEXT>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    answer_join = ""
    end_of_turn = "<|im_end|>"
    # `get_image_features` is batched over tiles, each giving the same number of tokens.
    export_spec = ExportSpec(vision="image_features")

    def images_arg(self, images: list) -> list[Any]:
        return [[image] for image in images]

    def load_processor(self, source: str, trust_remote_code: bool = False) -> Any:
        return ImageOnlyInternVLProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
