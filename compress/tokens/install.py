"""One reduction installed in front of a model's projector, and recorded in its config.

The reduction runs as a forward pre-hook on the projector, so the model's modules, names and state dict
stay exactly the family's (plain `from_pretrained` loads the checkpoint, unreduced) and every caller of
the projector (the model's own `get_image_features`, the ONNX vision wrapper) emits the reduced tokens.
The record (`config.compress_tokens`) is what a checkpoint carries: `load_checkpoint` re-installs it, and
the family adapter reads it to give each image as many placeholder tokens as the tower now emits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError
from compress.tokens.reduce import attention_received, pool, select_merge

RECORD = "compress_tokens"  # the config attribute a reduced model's checkpoint carries
_HANDLE = "_compress_tokens_hook"


def record_of(model: nn.Module) -> dict[str, Any] | None:
    """The installed reduction's record, if the model has one."""
    rec = getattr(model.config, RECORD, None)
    return dict(rec) if rec else None


def tower_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's encoder layers (the first ModuleList named `layers`)."""
    for name, m in tower.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and name.rsplit(".", 1)[-1] == "layers":
            return m
    raise ConfigError("the vision tower has no 'layers' list to score tokens with")


def score_layer(model: nn.Module, tower: nn.Module) -> int:
    """The tower layer that reads the selected feature layer's states (the last layer where the features are
    the tower's output): the attention it pays is what `select_merge` ranks tokens by."""
    feature = getattr(model.config, "vision_feature_layer", -1)
    if not isinstance(feature, int):
        raise ConfigError(f"select_merge needs one vision_feature_layer; this model concatenates {feature}")
    n = len(tower_layers(tower))
    return min(feature % (n + 1), n - 1)


def record_for(method: str, tokens_in: int, keep: int | None, ratio: float | None,
               dominant: int | None) -> dict[str, Any]:
    """The record for `method` on `tokens_in` image tokens per image: how many remain and how."""
    want = keep if keep is not None else max(1, round(tokens_in * (ratio or 1.0)))
    if not 1 <= want < tokens_in:
        raise ConfigError(f"tokens: keep {want} of {tokens_in} image tokens is not a reduction")
    if method == "pool":
        grid, target = math.isqrt(tokens_in), math.isqrt(want)
        if grid * grid != tokens_in:
            raise ConfigError(f"tokens: pool needs a square patch grid; this model gives {tokens_in} tokens per image")
        if target * target != want or grid % target:
            options = [t * t for t in range(1, grid) if grid % t == 0]
            raise ConfigError(f"tokens: pool turns the {grid}x{grid} grid into a smaller square grid of equal "
                              f"windows; keep one of {options}, not {want}")
        return {"method": "pool", "tokens_in": tokens_in, "tokens": want, "grid": grid, "target": target}
    dom = dominant if dominant is not None else max(0, round(want * 54 / 64))  # VisionZip's 54 + 10 split
    if dom >= want:
        dom = want - 1
    return {"method": "select_merge", "tokens_in": tokens_in, "tokens": want, "dominant": dom,
            "contextual": want - dom}


def _reducer(model: nn.Module, tower: nn.Module, rec: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    if rec["method"] == "pool":
        return lambda x: pool(x, rec["grid"], rec["target"])
    layer = tower_layers(tower)[score_layer(model, tower)]
    return lambda x: select_merge(x, attention_received(x, layer), rec["dominant"], rec["contextual"])


def install(model: nn.Module, adapter: Any, rec: dict[str, Any]) -> None:
    """Reduce the projector's input per `rec` from now on (replacing any reduction installed before) and
    record it in the model's config."""
    projector = adapter.component(model, "projector")
    tower = adapter.component(model, "vision")
    old = getattr(projector, _HANDLE, None)
    if old is not None:
        old.remove()
    reduce = _reducer(model, tower, rec)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (reduce(args[0]), *args[1:])

    setattr(projector, _HANDLE, projector.register_forward_pre_hook(hook))
    setattr(model.config, RECORD, dict(rec))


def reinstall(model: nn.Module, adapter: Any) -> bool:
    """Install the reduction a loaded checkpoint's config records; False if it records none."""
    rec = record_of(model)
    if rec is None:
        return False
    install(model, adapter, rec)
    return True
