"""What the ONNX exporter needs to know about a family, declared by its adapter (`Adapter.export_spec`).

The exporter builds the same few graph shapes for every family; what differs is which vision wrapper is
traced, how positions are fed, what extra inputs the decoder takes and which fusions apply. Declaring
those facts here, named for what they mean, keeps family names out of `compress.export`: a new family
is one adapter with one `ExportSpec`, and the exporter asks it instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How the vision graph is built and fed:
#   "projected_tower"  vision tower + feature-layer selection + projector over an image batch (LLaVA-style)
#   "image_features"   the model's own batched `get_image_features` over an image (or tile) batch
#   "tiled"            a tiled vision model whose output is cross-attention states (fed with the tiles'
#                      aspect-ratio ids and mask), not image tokens
#   "tiled_patches"    encoder + connector over whole unpadded images, patch positions fixed at export size
#   "flat_patches"     a flat batch of patches from images of any size, with per-patch positions and segments
VisionForm = Literal["projected_tower", "image_features", "tiled", "tiled_patches", "flat_patches"]
# How the decoder's positions are fed: "explicit" [batch, seq] = cumsum(mask) - 1, "mrope" [3, batch, seq]
# multimodal rotary positions from the image grid (computed by the runner).
Positions = Literal["explicit", "mrope"]
# Which tokens of a prompt attend to each other both ways (the decoder then takes block_sequence_ids):
# "prefix" image + prompt as one block, "images" each run of image tokens its own block.
AttentionBlocks = Literal["prefix", "images"]


@dataclass(frozen=True)
class ExportSpec:
    """A family's export facts. Values land in export.json where the runner needs them (positions,
    attention_blocks, cross_attention), so they are the runtime's names, not the family's."""

    vision: VisionForm
    positions: Positions = "explicit"
    attention_blocks: AttentionBlocks | None = None
    # The decoder's cross-attention layers read vision states fed on every call (no image tokens in the
    # sequence; the adapter's `cross_attention_tokens` says how many states each tile gives).
    cross_attention: bool = False
    # Every decoder layer self-attends through transformers' attention interface with the flat cache,
    # so the trace can route it to com.microsoft GroupQueryAttention (compress.export.gqa).
    group_query_attention: bool = True
    # onnxruntime.transformers.optimizer model_type for the vision graph ("clip": CLIP towers with
    # QuickGelu, "vit": SigLIP-style towers).
    vision_optimizer: str = "vit"
    # The onnxruntime-genai model type that drives the folder (compress.export.genai decides whether it can):
    # its `gemma3` type is its plain multimodal pipeline (default positions, the vision graph fed through
    # `generator.set_inputs`), which fits every image-token family here.
    genai_model_type: str = "gemma3"

    def __post_init__(self) -> None:
        if self.attention_blocks is not None and self.cross_attention:
            raise ValueError("a decoder takes either attention blocks or cross-attention states, not both")

    @property
    def fixed_image_tokens(self) -> bool:
        """Whether every image gives the same number of image tokens, counted once at the export size
        (flat patches: the image size decides; tiled cross-attention: no image tokens at all)."""
        return self.vision not in ("flat_patches", "tiled")
