"""The torch modules the exporter traces: vision tower + projector, and a decoder with a flat KV cache.

Each wrapper has plain tensor inputs and outputs, so the traced graph's signature is the runner contract.
Which wrapper a model gets is its adapter's `export_spec` (compress.arch.export_spec); nothing here
compares family names, so a new family with a known graph form needs no change in this module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.arch import get_adapter, supported
from compress.arch.base import Adapter, text_config
from compress.arch.export_spec import ExportSpec, VisionForm
from compress.errors import ConfigError
from compress.runtime.cache import cache_kwargs, output_cache


def model_type_of(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def exportable_adapter(model: nn.Module) -> Adapter:
    """The adapter of `model`'s family, which declares its export facts; a ConfigError naming the
    architecture and why not (its adapter refuses export, or no adapter declares an `export_spec`)."""
    model_type = model_type_of(model)
    if model_type in supported():  # the adapter says why its family cannot be exported (one source)
        adapter = get_adapter(model_type)
        reason = adapter.refused_stages.get("export")
        if reason:
            raise ConfigError(f"{adapter.name} ({model_type}) cannot be exported to ONNX yet: {reason}")
        if adapter.export_spec is not None:
            return adapter
    exportable = [mt for mt in supported() if get_adapter(mt).export_spec is not None]
    raise ConfigError(f"ONNX export does not support architecture '{model_type}'; supported: {', '.join(exportable)}")


def export_spec(model: nn.Module) -> ExportSpec:
    """What the exporter builds for `model` (its adapter's `export_spec`), or a ConfigError."""
    spec = exportable_adapter(model).export_spec
    assert spec is not None  # exportable_adapter refuses families without one
    return spec


def decoder_facts(model: nn.Module) -> dict[str, int]:
    """Layer count, head geometry and vocab: what the runner needs to build an empty KV cache."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    cross = set(getattr(cfg, "cross_attention_layers", None) or [])
    return {
        "num_layers": int(cfg.num_hidden_layers),
        # Layers with a self-attention KV cache (Mllama's cross-attention layers have none in the graphs).
        "cache_layers": [i for i in range(int(cfg.num_hidden_layers)) if i not in cross],
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


class ImageFeatures(nn.Module):
    """The model's own `get_image_features` where it is batched already: InternVL (InternViT + pixel shuffle +
    projector over a batch of tiles; every tile gives the same number of tokens, so the runner scatters
    them in order like whole images), PaliGemma and Gemma3 (SigLIP + projector)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.model
        config = model.config
        self.kwargs = {k: getattr(config, k) for k in ("vision_feature_layer", "vision_feature_select_strategy")
                       if getattr(config, k, None) is not None}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values, **self.kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


class MllamaVision(nn.Module):
    """Mllama's tiled vision model + projector: the cross-attention states [batch * images * tiles, patches,
    hidden] every cross-attention layer reads (computed once per batch, fed to each decoder call)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        states = self.model.vision_model(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                         aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
        return self.model.multi_modal_projector(states).reshape(-1, states.shape[-2], self.model.hidden_size)


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


class QwenVision(nn.Module):
    """Qwen2-VL / Qwen2.5-VL vision tower + patch merger over a flat batch of patches from any image sizes.

    Upstream splits attention per image with `cu_seqlens.tolist()` (and Qwen2.5-VL reorders patches into
    windows in Python); here the runner feeds per-patch rotary positions and segment ids
    (`compress.runtime.mrope.vision_feeds`, patches already in window order) and attention is one masked
    softmax over the batch: a patch attends to the patches of its own image (and window, in windowed
    layers). The same block modules compute everything else, so quantized projections export as usual.
    """

    def __init__(self, model: nn.Module, adapter: Any):
        super().__init__()
        self.tower = adapter.component(model, "vision")
        full = getattr(self.tower, "fullatt_block_indexes", None)
        self.windowed = [full is not None and i not in full for i in range(len(self.tower.blocks))]
        self.rotate = sys.modules[type(self.tower).__module__].apply_rotary_pos_emb_vision

    def _attend(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self.rotate(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))

    def forward(self, pixel_values: torch.Tensor, vision_position_ids: torch.Tensor,
                attention_segments: torch.Tensor, window_segments: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.tower.patch_embed(pixel_values)
        cos, sin = self.tower.rotary_pos_emb(hidden, vision_position_ids)
        full = attention_segments[:, None] == attention_segments[None, :]
        window = full if window_segments is None else window_segments[:, None] == window_segments[None, :]
        for block, windowed in zip(self.tower.blocks, self.windowed, strict=True):
            hidden = hidden + self._attend(block.attn, block.norm1(hidden), cos, sin, window if windowed else full)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return self.tower.merger(hidden)

    def spec(self) -> dict[str, int | None]:
        """export.json's `vision_inputs`: what `mrope.VisionSpec` needs to build this graph's feeds."""
        windowed = any(self.windowed)
        return {"spatial_merge_size": int(self.tower.spatial_merge_size),
                "patch_size": int(self.tower.config.patch_size),
                "window_size": int(self.tower.config.window_size) if windowed else None}


class DecoderWithPast(nn.Module):
    """Language model + lm_head with a flat KV cache: one graph for prefill (past 0) and decode."""

    def __init__(self, language: nn.Module, lm_head: nn.Module, num_layers: int, cache_layers: list[int] | None = None):
        super().__init__()
        self.language = language
        self.lm_head = lm_head
        self.num_layers = num_layers
        self.cache_layers = list(range(num_layers)) if cache_layers is None else list(cache_layers)
        self.gqa = False  # set while tracing a GroupQueryAttention graph (compress.export.gqa)
        self.select_logits = False  # trace with a `logits_index` input (logits only where the caller needs them)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        logits_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        return self._run(inputs_embeds, attention_mask, position_ids, self._cache(past, attention_mask, inputs_embeds),
                         logits_index=logits_index)

    def _cache(self, past: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, inputs_embeds: torch.Tensor) -> Any:
        from transformers import DynamicCache

        if self.gqa:
            from compress.export.gqa import gqa_cache

            return gqa_cache(past, attention_mask.shape[-1] - inputs_embeds.shape[1])
        # Every layer keeps every position (no config: no sliding-window layers that crop their cache inside
        # the graph); a sliding layer's mask limits what it attends to, so the outputs are the same.
        cache = DynamicCache()
        for j, i in enumerate(self.cache_layers):
            cache.update(past[2 * j], past[2 * j + 1], i)
        return cache

    def _run(self, inputs_embeds: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor,
             cache: Any, logits_index: torch.Tensor | None = None, **extra: Any) -> tuple[torch.Tensor, ...]:
        """`logits_index` [k]: the sequence positions to compute logits for (a generating caller needs the last
        one only: the lm_head over a whole prompt is a large GEMM wasted), None for all."""
        from compress.export.gqa import active

        with active(cache if self.gqa else None):
            out = self.language(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **cache_kwargs(self.language, cache),
                use_cache=True,
                **extra,
            )
        layers = output_cache(out).layers
        presents: list[torch.Tensor] = []
        for i in self.cache_layers:
            presents += [layers[i].keys, layers[i].values]
        hidden = out.last_hidden_state
        if logits_index is not None:
            hidden = hidden.index_select(1, logits_index)
        return (self.lm_head(hidden), *presents)


class DecoderWithBlocks(DecoderWithPast):
    """A decoder whose prompt attends bidirectionally within blocks: PaliGemma's prefix (image + prompt),
    Gemma3's images. `block_sequence_ids` [batch, seq] names each token's block (-1: causal), as the
    family's model derives it from token_type_ids at a prefill; decode steps pass -1. The masks are
    built by the family's own functions (`masks`: its adapter's `block_masks`), so the graph computes
    what the model computes."""

    def __init__(self, language: nn.Module, lm_head: nn.Module, num_layers: int, masks: Callable[..., Any]):
        super().__init__(language, lm_head, num_layers)
        self.masks = masks

    def forward(  # type: ignore[override]
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        block_sequence_ids: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        logits_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        cache = self._cache(past, attention_mask, inputs_embeds)
        masks = self.masks(block_sequence_ids, config=self.language.config, inputs_embeds=inputs_embeds,
                           attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        return self._run(inputs_embeds, masks, position_ids, cache, logits_index=logits_index)


class DecoderWithCrossAttention(DecoderWithPast):
    """Mllama: self-attention layers with the flat KV cache, cross-attention layers reading the vision states
    fed on every call (their keys/values are recomputed from them, so the cache holds self-attention only).
    `cross_attention_mask` [batch, seq, images, tiles] is the processor's (a decode step: its last row)."""

    def __init__(self, language: nn.Module, lm_head: nn.Module, num_layers: int, cache_layers: list[int],
                 num_vision_tokens: int):
        super().__init__(language, lm_head, num_layers, cache_layers)
        self.num_vision_tokens = num_vision_tokens

    def forward(  # type: ignore[override]
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cross_attention_states: torch.Tensor,
        cross_attention_mask: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        logits_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        # transformers' _prepare_cross_attention_mask for a 0/1 mask, written with ops the ONNX exporter takes.
        batch, seq = cross_attention_mask.shape[:2]
        keep = cross_attention_mask.repeat_interleave(self.num_vision_tokens, dim=3).reshape(batch, seq, -1)[:, None]
        lowest = torch.finfo(inputs_embeds.dtype).min
        cross_mask = torch.where(keep == 0, lowest, 0.0).to(inputs_embeds.dtype)
        rows = (cross_mask != lowest).any(dim=-1).to(inputs_embeds.dtype)[..., None]  # rows attending to some tile
        cross_mask = cross_mask * rows
        cache = self._cache(past, attention_mask, inputs_embeds)
        return self._run(inputs_embeds, attention_mask, position_ids, cache, logits_index=logits_index,
                         cross_attention_states=cross_attention_states, cross_attention_mask=cross_mask,
                         full_text_row_masked_out_mask=rows)


# The vision wrapper per graph form: (model, adapter, pixel shape the graph is exported at) -> module.
VISION_WRAPPERS: dict[VisionForm, Callable[[nn.Module, Any, Sequence[int]], nn.Module]] = {
    "projected_tower": lambda model, adapter, shape: LlavaVision(model, adapter),
    "image_features": lambda model, adapter, shape: ImageFeatures(model),
    "tiled": lambda model, adapter, shape: MllamaVision(model),
    "tiled_patches": lambda model, adapter, shape: Idefics3Vision(model, adapter, int(shape[-2]), int(shape[-1])),
    "flat_patches": lambda model, adapter, shape: QwenVision(model, adapter),
}


class Flat(nn.Module):
    """[images, tokens, hidden] -> [images * tokens, hidden]: image features as rows, in image order, the
    shape the embed graph scatters from (and onnxruntime-genai passes between its vision and embedding
    sessions: a text-only prompt is then 0 rows, not a rank change)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values).flatten(0, 1)


def vision_module(model: nn.Module, adapter: Any, pixel_shape: Sequence[int]) -> nn.Module:
    """The vision wrapper the adapter's `export_spec.vision` names, in eval mode, emitting image-token rows
    [tokens, hidden] (Qwen2-VL's flat patches give rows already); cross-attention states stay per tile."""
    spec = export_spec(model)
    inner = VISION_WRAPPERS[spec.vision](model, adapter, pixel_shape)
    return (Flat(inner) if spec.fixed_image_tokens else inner).eval()


def decoder_module(model: nn.Module, adapter: Any) -> DecoderWithPast:
    """The decoder wrapper for the adapter's `export_spec`: with attention blocks, with cross-attention states,
    or the plain flat-cache decoder."""
    spec = export_spec(model)
    facts = decoder_facts(model)
    language, lm_head = adapter.component(model, "language"), adapter.component(model, "lm_head")
    if spec.attention_blocks is not None:
        return DecoderWithBlocks(language, lm_head, facts["num_layers"], adapter.block_masks).eval()
    if spec.cross_attention:
        return DecoderWithCrossAttention(language, lm_head, facts["num_layers"], facts["cache_layers"],
                                         adapter.cross_attention_tokens(model)).eval()
    return DecoderWithPast(language, lm_head, facts["num_layers"]).eval()


def past_names(layers: int | list[int]) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in _layers(layers) for kv in ("key", "value")]


def present_names(layers: int | list[int]) -> list[str]:
    return [f"present.{i}.{kv}" for i in _layers(layers) for kv in ("key", "value")]


def _layers(layers: int | list[int]) -> list[int]:
    return list(range(layers)) if isinstance(layers, int) else list(layers)
