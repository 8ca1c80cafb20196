"""Greedy generation of an export folder by onnxruntime-genai itself (`og.Model(folder)`), with the runner
contract's `generate`: its KV cache, its search, its sessions built from the folder's genai_config.json.

Used to prove a folder runs there as it is (`vlm-compress verify`, tests) and to time it next to our own
runner (`vlm-compress bench`). Prompts are fed one row at a time through `generator.set_inputs`: the row's
unpadded token ids (int32), its images' vision inputs and `num_image_tokens` (the feature rows the vision
graph gives, which genai sizes its buffers by). genai pads batches on the right and ours are left-padded,
so rows are not batched. Nothing here imports torch or the rest of the toolkit's model code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ConfigError
from compress.export.files import read_meta
from compress.export.genai import CONFIG_FILE, genai_support
from compress.runtime.mrope import VisionSpec, vision_feeds
from compress.runtime.ort_runner import NP_DTYPES
from compress.runtime.vision_inputs import numpy as _numpy
from compress.runtime.vision_inputs import vision_feeds_for


class GenaiRunner:
    """Runs an export folder through onnxruntime-genai. `backend` is "onnxruntime-genai"."""

    backend = "onnxruntime-genai"
    providers = ("onnxruntime-genai (CPU)",)

    def __init__(self, folder: str | Path):
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise ConfigError("onnxruntime-genai is not installed: pip install onnxruntime-genai") from e
        self.folder = Path(folder)
        self.meta = read_meta(folder)
        reason = genai_support(self.meta)
        if reason is not None or not (self.folder / CONFIG_FILE).is_file():
            raise ConfigError(f"{folder}: onnxruntime-genai cannot run this export ({reason or 'no ' + CONFIG_FILE})")
        self.og = og
        self.model = og.Model(str(folder))
        self.eos = {int(i) for i in self.meta["eos_token_ids"]}
        self.image_token_id = int(self.meta["image_token_id"])
        self.per_item = self.meta.get("image_tokens_per_image")  # rows per vision-batch item (image or tile)
        self.dtype = NP_DTYPES[self.meta["dtype"]]
        # M-RoPE exports: patches of any image size, fed with their grid (genai computes the positions from it)
        self.spec = VisionSpec.from_meta(self.meta["vision_inputs"]) if self.meta.get("vision_inputs") else None
        self.timings: dict[str, float] = {}

    def _row_inputs(self, ids: np.ndarray, vision: dict[str, np.ndarray] | None, first: int, items: int) -> Any:
        """A row's NamedTensors: its ids, and its `items` vision-batch items (images, tiles or grids) from `first`."""
        named = self.og.NamedTensors()
        named["input_ids"] = ids[None].astype(np.int32)
        if not items:
            return named
        named["num_image_tokens"] = np.array([int((ids == self.image_token_id).sum())], dtype=np.int64)
        if self.spec is None:
            named["pixel_values"] = np.ascontiguousarray(vision["pixel_values"][first:first + items])
            return named
        grid = vision["image_grid_thw"][first:first + items]
        start = int(vision["image_grid_thw"][:first].prod(-1).sum())
        patches = vision["pixel_values"][start:start + int(grid.prod(-1).sum())]
        for name, value in vision_feeds(patches, grid, self.spec).feeds.items():
            named[name] = np.ascontiguousarray(value)
        named["image_grid_thw"] = grid
        return named

    def _items(self, ids: np.ndarray, vision: dict[str, np.ndarray] | None, first: int) -> int:
        """Vision-batch items (images or tiles; grids for M-RoPE exports) a row's image tokens come from."""
        n = int((ids == self.image_token_id).sum())
        if not n:
            return 0
        if self.spec is not None:  # consume grids until they account for the row's tokens
            per = vision["image_grid_thw"][first:].prod(-1) // self.spec.spatial_merge_size ** 2
            return int(np.searchsorted(np.cumsum(per), n) + 1)
        if not self.per_item:
            raise ConfigError("this export's image token count depends on the image size; genai rows need a fixed one")
        return n // int(self.per_item)

    def generate(self, inputs: dict[str, Any], max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        ids_all = _numpy(inputs["input_ids"]).astype(np.int64)
        mask = _numpy(inputs["attention_mask"]).astype(bool)
        vision = None
        if inputs.get("pixel_values") is not None:
            if self.spec is not None:
                vision = {"pixel_values": _numpy(inputs["pixel_values"]).astype(self.dtype, copy=False),
                          "image_grid_thw": _numpy(inputs["image_grid_thw"]).astype(np.int64).reshape(-1, 3)}
            else:
                vision = {"pixel_values": vision_feeds_for(self.meta["family"], inputs, self.dtype)
                          .feeds["pixel_values"]}
        out, first_s, decode_s, steps, taken = [], 0.0, 0.0, 0, 0
        for row in range(len(ids_all)):
            ids = ids_all[row][mask[row]]
            items = self._items(ids, vision, taken)
            params = self.og.GeneratorParams(self.model)
            total = len(ids) + max_new_tokens
            params.set_search_options(max_length=total, min_length=total if ignore_eos else 0, do_sample=False,
                                      batch_size=1)
            t0 = t1 = time.perf_counter()
            gen = self.og.Generator(self.model, params)
            gen.set_inputs(self._row_inputs(ids, vision, taken, items))
            taken += items
            tokens: list[int] = []
            while not gen.is_done() and len(tokens) < max_new_tokens:
                gen.generate_next_token()
                if not tokens:
                    first_s += time.perf_counter() - t0
                    t1 = time.perf_counter()
                token = int(gen.get_next_tokens()[0])
                if token in self.eos and not ignore_eos:
                    break
                tokens.append(token)
            decode_s += time.perf_counter() - t1
            steps += max(len(tokens) - 1, 0)
            out.append(tokens)
        self.timings = {"first_token_s": first_s, "decode_s": decode_s, "decode_steps": steps}
        return out
