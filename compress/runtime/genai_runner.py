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
from compress.runtime.vision_inputs import numpy as _numpy
from compress.runtime.vision_inputs import vision_feeds_for

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


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
        self.timings: dict[str, float] = {}

    def _row_inputs(self, ids: np.ndarray, pixels: np.ndarray | None, first: int, items: int) -> Any:
        named = self.og.NamedTensors()
        named["input_ids"] = ids[None].astype(np.int32)
        if items:
            named["pixel_values"] = np.ascontiguousarray(pixels[first:first + items])
            named["num_image_tokens"] = np.array([int((ids == self.image_token_id).sum())], dtype=np.int64)
        return named

    def _items(self, ids: np.ndarray) -> int:
        """Vision-batch items (images or tiles) a row's image tokens come from."""
        n = int((ids == self.image_token_id).sum())
        if n and not self.per_item:
            raise ConfigError("this export's image token count depends on the image size; genai rows need a fixed one")
        return n // int(self.per_item) if n else 0

    def generate(self, inputs: dict[str, Any], max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        ids_all = _numpy(inputs["input_ids"]).astype(np.int64)
        mask = _numpy(inputs["attention_mask"]).astype(bool)
        pixels = None
        if inputs.get("pixel_values") is not None:
            pixels = vision_feeds_for(self.meta["family"], inputs, self.dtype).feeds["pixel_values"]
        out, first_s, decode_s, steps, taken = [], 0.0, 0.0, 0, 0
        for row in range(len(ids_all)):
            ids = ids_all[row][mask[row]]
            items = self._items(ids)
            params = self.og.GeneratorParams(self.model)
            total = len(ids) + max_new_tokens
            params.set_search_options(max_length=total, min_length=total if ignore_eos else 0, do_sample=False,
                                      batch_size=1)
            t0 = t1 = time.perf_counter()
            gen = self.og.Generator(self.model, params)
            gen.set_inputs(self._row_inputs(ids, pixels, taken, items))
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
