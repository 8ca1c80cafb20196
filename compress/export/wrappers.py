"""The torch modules the exporter traces: vision tower + projector, and a decoder with a flat KV cache.

Each wrapper has plain tensor inputs and outputs, so the traced graph's signature is the runner contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compress.arch.base import text_config
from compress.errors import ConfigError
from compress.runtime.cache import cache_kwargs, output_cache

# Families whose graphs this exporter can build, by config.model_type.
SUPPORTED = {"llava": "llava", "idefics3": "idefics3", "smolvlm": "idefics3"}


def model_type_of(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def check_exportable(model: nn.Module) -> str:
    """The exporter family of `model`, or a ConfigError naming the architecture and why not."""
    from compress.arch import get_adapter, supported

    model_type = model_type_of(model)
    if model_type in supported():  # the adapter says why its family cannot be exported (one source)
        adapter = get_adapter(model_type)
        reason = adapter.refused_stages.get("export")
        if reason:
            raise ConfigError(f"{adapter.name} ({model_type}) cannot be exported to ONNX yet: {reason}")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"ONNX export does not support architecture '{model_type}'; supported: {', '.join(sorted(SUPPORTED))}"
        )
    return SUPPORTED[model_type]


def decoder_facts(model: nn.Module) -> dict[str, int]:
    """Layer count, head geometry and vocab: what the runner needs to build an empty KV cache."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "num_layers": int(cfg.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
    }



class LlavaVision(nn.Module):
    """Vision tower + feature-layer selection + projector, batched (not `get_image_features`, which returns
    a per-image list and so bakes the batch size into the trace)."""

    def __init__(self, model: nn.Module, adapter: Any):
        super().__init__()
        self.tower = adapter.component(model, "vision")
        self.projector = adapter.component(model, "projector")
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return self.projector(torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0])


class Idefics3Vision(nn.Module):
    """SigLIP-style encoder + pixel-shuffle connector for whole (unpadded) images.

    The upstream embedding computes patch position ids per image from the patch attention mask in a
    Python loop over the batch; for an image that fills the frame those ids are a fixed table, so it is
    precomputed here (same bucketize formula) and the batch dimension stays dynamic. Images with padded
    patches are refused by the runner instead of being silently mis-positioned.
    """

    def __init__(self, model: nn.Module, adapter: Any, height: int, width: int):
        super().__init__()
        vision = adapter.component(model, "vision")
        self.embeddings = vision.embeddings
        self.encoder = vision.encoder
        self.post_layernorm = vision.post_layernorm
        self.connector = adapter.component(model, "projector")
        emb = vision.embeddings
        per_side = emb.num_patches_per_side
        rows, cols = height // emb.patch_size, width // emb.patch_size
        boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)

        def buckets(n: int) -> torch.Tensor:  # float32 arithmetic exactly as upstream, for a full row of n patches
            step = 1.0 / torch.tensor(n, dtype=torch.float32)
            frac = torch.clamp(torch.arange(n, dtype=torch.float32) * step, max=1.0 - 1e-6)
            return torch.bucketize(frac, boundaries, right=True)

        h, w = buckets(rows), buckets(cols)
        self.register_buffer("position_ids", (h[:, None] * per_side + w).flatten()[None], persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        hidden = patches + self.embeddings.position_embedding(self.position_ids)
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        return self.connector(self.post_layernorm(hidden))


class DecoderWithPast(nn.Module):
    """Language model + lm_head with a flat KV cache: one graph for prefill (past 0) and decode."""

    def __init__(self, language: nn.Module, lm_head: nn.Module, num_layers: int):
        super().__init__()
        self.language = language
        self.lm_head = lm_head
        self.num_layers = num_layers

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.language.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.language(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(self.language, cache),
            use_cache=True,
        )
        presents: list[torch.Tensor] = []
        for layer in output_cache(out).layers:
            presents += [layer.keys, layer.values]
        return (self.lm_head(out.last_hidden_state), *presents)


def vision_module(model: nn.Module, adapter: Any, pixel_shape: Sequence[int]) -> nn.Module:
    family = check_exportable(model)
    if family == "llava":
        return LlavaVision(model, adapter).eval()
    return Idefics3Vision(model, adapter, int(pixel_shape[-2]), int(pixel_shape[-1])).eval()


def decoder_module(model: nn.Module, adapter: Any) -> DecoderWithPast:
    check_exportable(model)
    facts = decoder_facts(model)
    language = adapter.component(model, "language")
    return DecoderWithPast(language, adapter.component(model, "lm_head"), facts["num_layers"]).eval()


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
