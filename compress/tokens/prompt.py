"""The prompt follows the tokens: a processor expands each image placeholder into as many tokens as the
unreduced tower emits; a reduced model needs as many as it emits now. Applied to the processor's output,
so the family's own expansion rules (and its chat template) stay the processor's business."""

from __future__ import annotations

import itertools

import torch


def shrink_placeholders(enc: dict[str, torch.Tensor], image_id: int, tokens_in: int, tokens: int,
                        pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded processor output with every run of `tokens_in` image tokens cut to `tokens` (a run of m
    images side by side to m * `tokens`); other per-token tensors cut alike, padding rebuilt on the left. A
    run whose length is not a multiple of `tokens_in` is left as it is (cut already)."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    per_token = [k for k, v in enc.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape]
    rows = []
    for r in range(ids.shape[0]):
        keep = mask[r].bool().clone()
        start = 0
        for image, run in itertools.groupby(((ids[r] == image_id) & keep).tolist()):
            n = len(list(run))
            if image and n % tokens_in == 0:
                keep[start:start + n] = torch.arange(n) % tokens_in < tokens
            start += n
        rows.append(keep)
    width = max(int(k.sum()) for k in rows)
    out = dict(enc)
    for key in per_token:
        fill = pad_id if key == "input_ids" else 0
        new = torch.full((ids.shape[0], width), fill, dtype=enc[key].dtype)
        for r, keep in enumerate(rows):
            kept = enc[key][r][keep]
            new[r, width - kept.numel():] = kept
        out[key] = new
    return out
