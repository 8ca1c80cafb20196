"""Idefics3 and SmolVLM: SigLIP-style vision model, pixel-shuffle connector, Llama-style text model."""

from __future__ import annotations

from typing import Any, ClassVar

from PIL import Image
from transformers import SmolVLMProcessor
from transformers.processing_utils import ProcessorMixin

from compress.arch.base import Adapter
from compress.arch.export_spec import ExportSpec


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLMProcessor without the video processor, so neither torchvision nor num2words is needed.

    Mirrors `SmolVLMProcessor.__init__` minus the video-only requirements; the image path is untouched.
    """

    def __init__(self, image_processor, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        # SmolVLMProcessor's override reads video-sampling defaults from the (absent) video processor.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class Idefics3Adapter(Adapter):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    components: ClassVar[dict[str, str]] = {
        "vision": "model.vision_model",
        "projector": "model.connector",
        "language": "model.text_model",
        "lm_head": "lm_head",
    }
    # The text model is built with AutoModel (Llama for the released checkpoints); `bind` checks.
    default_decoder_layers: ClassVar[dict[str, str]] = {"idefics3": "LlamaDecoderLayer", "smolvlm": "LlamaDecoderLayer"}
    image_token = "<image>"
    default_prompt = "User:<image>{question}<end_of_utterance>\nAssistant:"
    answer_join = " "
    end_of_turn = "<end_of_utterance>"
    # Whole images at the export size (patch positions precomputed, no per-image Python loop in the trace).
    export_spec = ExportSpec(vision="tiled_patches")

    def images_arg(self, images: list[Image.Image]) -> list[Any]:
        # Nested: one list of images per prompt, so the processor never has to guess the grouping.
        return [[image] for image in images]

    def load_processor(self, source: str, trust_remote_code: bool = False) -> Any:
        if self.model_type == "smolvlm":
            return ImageOnlySmolVLMProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        return super().load_processor(source, trust_remote_code=trust_remote_code)
