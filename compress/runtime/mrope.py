"""Qwen2-VL / Qwen2.5-VL inputs computed outside the graphs, in numpy, from the image grid.

Their models compute these in Python loops over images (data-dependent shapes a traced graph would
freeze for one image size), so the exported graphs take them as inputs and the runner computes them:

- vision: per-patch (h, w) rotary positions, one attention segment id per patch (the block-diagonal
  mask that keeps images apart), and for Qwen2.5-VL the window order of the patches plus a window
  segment id (its windowed layers attend within a window). The graph sees patches already in window
  order, and `VisionFeeds.restore` puts the merged tokens back in image order afterwards.
- decoder: the 3-D M-RoPE position ids [3, batch, seq] of a prompt (text tokens count up on all three
  axes; an image's tokens take (t, h, w) grid positions from where the text stopped). A decode step
  continues from the last position + 1 on every axis.

Each function mirrors the transformers 5.x code it replaces (vision_utils.get_vision_position_ids,
get_vision_cu_seqlens, get_vision_window_index, Qwen2VLModel.get_rope_index); tests/test_qwen_export.py
compares them against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower facts the runner needs (export.json's `vision_inputs`)."""

    spatial_merge_size: int
    patch_size: int
    window_size: int | None = None  # Qwen2.5-VL only: windowed attention, in pixels

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> VisionSpec:
        return cls(int(meta["spatial_merge_size"]), int(meta["patch_size"]),
                   int(meta["window_size"]) if meta.get("window_size") else None)


@dataclass
class VisionFeeds:
    feeds: dict[str, np.ndarray]
    restore: np.ndarray | None  # merged token i in image order is graph output row restore[i]


def vision_position_ids(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """[patches, 2] (h, w) of each patch, patches laid out merge-block by merge-block as the processor does."""
    rows = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(rows).astype(np.int64)


def image_segments(grid_thw: np.ndarray) -> np.ndarray:
    """[patches] segment id per patch: one segment per frame of each image (what cu_seqlens delimits)."""
    lengths = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return np.repeat(np.arange(len(lengths)), lengths).astype(np.int64)


def window_index(grid_thw: np.ndarray, spec: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """(order of the merged units in window order, window length in units per window): Qwen2.5-VL's windows
    of window_size pixels, tiled per frame from the top left, the edge windows cut short."""
    merge = spec.spatial_merge_size
    units = spec.window_size // merge // spec.patch_size
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = units - gh % units, units - gw % units  # as upstream: a whole extra window when divisible
        padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        nh, nw = (gh + ph) // units, (gw + pw) // units
        padded = padded.reshape(t, nh, units, nw, units).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, units * units)
        lengths.append((padded != -100).sum(-1).reshape(-1))
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + offset)
        offset += t * gh * gw
    lengths_all = np.concatenate(lengths)
    return np.concatenate(order).astype(np.int64), lengths_all[lengths_all > 0]


def vision_feeds(pixel_values: np.ndarray, grid_thw: np.ndarray, spec: VisionSpec) -> VisionFeeds:
    """The vision graph's inputs for a flat [patches, dim] batch of patches and its [images, 3] grid."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    unit = spec.spatial_merge_size ** 2
    positions, segments = vision_position_ids(grid, spec.spatial_merge_size), image_segments(grid)
    if int(grid.prod(-1).sum()) != len(pixel_values):
        raise ValueError(f"image_grid_thw covers {int(grid.prod(-1).sum())} patches, pixel_values has "
                         f"{len(pixel_values)}")
    if spec.window_size is None:
        feeds = {"pixel_values": pixel_values, "vision_position_ids": positions, "attention_segments": segments}
        return VisionFeeds(feeds, np.arange(len(pixel_values) // unit))
    order, window_units = window_index(grid, spec)
    rows = (order[:, None] * unit + np.arange(unit)).reshape(-1)  # window order, patch by patch
    windows = np.repeat(np.arange(len(window_units)), window_units * unit).astype(np.int64)
    feeds = {"pixel_values": pixel_values[rows], "vision_position_ids": positions[rows],
             "attention_segments": segments[rows], "window_segments": windows}
    return VisionFeeds(feeds, np.argsort(order))


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray, grid_thw: np.ndarray | None,
               image_token_id: int, merge: int) -> np.ndarray:
    """[3, batch, seq] M-RoPE positions of left-padded prompts (0 at padding), images consumed in order."""
    batch, seq = input_ids.shape
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    grids = iter(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist() if grid_thw is not None else [])
    for row in range(batch):
        keep = attention_mask[row].astype(bool)
        is_image = input_ids[row][keep] == image_token_id
        parts, current, start = [], 0, 0
        while start < len(is_image):
            end = start
            while end < len(is_image) and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                parts.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
            else:
                t, h, w = next(grids)
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
                parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
                current += max(h, w) // merge
            start = end
        if parts:
            positions[:, row, keep] = np.concatenate(parts, axis=1)
    return positions
