"""What a vision graph is fed, from the processor outputs of one batch (shared by the exporter's trace and
the runners, so both build the same feeds).

LLaVA and Idefics3/SmolVLM graphs take an image batch [images, C, H, W]; Qwen2-VL / Qwen2.5-VL graphs take
a flat batch of patches with the per-patch positions and segments `mrope.vision_feeds` computes from the
image grid, and their output comes back in window order (`restore` puts it back in image order).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from compress.errors import ConfigError
from compress.runtime.mrope import VisionFeeds, VisionSpec, vision_feeds


def vision_pixels(family: str, inputs: dict[str, Any]) -> np.ndarray:
    """The [images, C, H, W] batch an image-batch vision graph takes.

    Idefics3/SmolVLM pad a batch to [batch, max_images, C, H, W] with all-zero images and mark padded
    pixels in pixel_attention_mask; the padding images are dropped (as upstream does) and partially
    padded images are refused, because the exported vision graph assumes whole-frame patch positions.
    """
    pixels = numpy(inputs["pixel_values"])
    if family in ("llava", "internvl", "paligemma", "gemma3", "mllama"):  # InternVL: [tiles, C, H, W] in order
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[2:])
    real = (flat == 0).sum(axis=(1, 2, 3)) != int(np.prod(flat.shape[1:]))
    if not real.any():
        real[0] = True  # upstream keeps one image when all are padding
    mask = inputs.get("pixel_attention_mask")
    if mask is not None:
        mask = numpy(mask).reshape(-1, *flat.shape[2:])[real]
        if not mask.all():
            raise ConfigError(
                f"{family} ONNX export handles whole images only: this batch has images padded to a larger frame "
                "(pixel_attention_mask has zeros); resize images to one size (e.g. do_image_splitting=False and "
                "square images)"
            )
    return flat[real]


def vision_feeds_for(family: str, inputs: dict[str, Any], dtype: Any, spec: VisionSpec | None = None) -> VisionFeeds:
    """The vision graph's feeds for one batch; `restore` is None where the output is already in order."""
    if family == "mllama":  # [batch, images, tiles, C, H, W] with each image's aspect-ratio tiling
        return VisionFeeds({"pixel_values": numpy(inputs["pixel_values"]).astype(dtype, copy=False),
                            "aspect_ratio_ids": numpy(inputs["aspect_ratio_ids"]).astype(np.int64),
                            "aspect_ratio_mask": numpy(inputs["aspect_ratio_mask"]).astype(np.int64)}, None)
    if family != "qwen2_vl":
        return VisionFeeds({"pixel_values": vision_pixels(family, inputs).astype(dtype, copy=False)}, None)
    if spec is None or inputs.get("image_grid_thw") is None:
        raise ConfigError("a Qwen2-VL vision graph needs image_grid_thw from the processor and the export's "
                          "vision_inputs")
    return vision_feeds(numpy(inputs["pixel_values"]).astype(dtype, copy=False), numpy(inputs["image_grid_thw"]), spec)


def numpy(x: Any) -> np.ndarray:
    """A processor output as numpy; a torch tensor can only exist once torch is loaded, so it is not
    imported here (a deployment runs export folders without torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def block_sequence_ids(rule: str, token_type_ids: np.ndarray) -> np.ndarray:
    """[batch, seq] bidirectional attention block of each prompt token (-1: causal), as the family's model
    derives it at a prefill: "prefix" (PaliGemma) puts image + prompt (token type 0) in one block and the
    answer suffix outside; "images" (Gemma3) gives each run of image tokens (type 1) its own block."""
    types = np.asarray(token_type_ids)
    if rule == "prefix":
        return np.where(types == 0, 0, -1).astype(np.int64)
    if rule != "images":
        raise ConfigError(f"unknown attention_blocks rule {rule!r} in export.json")
    image = types == 1
    starts = image & ~np.pad(image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int64)
