"""The decoder's self-attention as one com.microsoft `GroupQueryAttention` node per layer.

Traced as transformers computes attention, the decoder graph concatenates each layer's past keys and
values with the new ones, then expands the KV heads to the query heads, every step: copies of the whole
cache that ONNX Runtime's own pattern fusions do not remove on dynamo graphs. Here the trace itself emits
GroupQueryAttention instead, which appends the new keys and values to the past inside the kernel and
reads grouped heads as they are.

How, without a pattern rewrite: during the trace a cache whose layers hand back only the new keys and
values (`GqaCache`) and an attention function registered with transformers (`ATTENTION`) route every
self-attention call to the custom op `compress::group_query_attention`, whose ONNX translation is the
contrib op. The mask is the model's own additive mask (padding, causality, sliding windows, bidirectional
image/prefix blocks), fed as `attention_bias` with `causal=0`, so the kernel computes exactly what the
model computes for left-padded batches; rotary embeddings stay where the model applies them (M-RoPE
included). ONNX Runtime's CPU kernel runs a prompt on an empty past or one token on any past (not several
tokens on a past with batch > 1), which is what the runners do.

Lengths come from the attention mask, never from the past tensors, so a caller may feed past buffers longer
than the cache (ORT's past_present_share_buffer: past and present bound to one preallocated buffer, the
kernel writing each new key/value in place instead of copying the whole cache every step).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

ATTENTION = "compress_gqa"
# Which families' decoders can take it (every layer calls transformers' attention interface with a
# self-attention cache) is their adapter's `export_spec.group_query_attention`.
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("compress_gqa_cache", default=None)


@torch.library.custom_op("compress::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, bias: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v over [past; new] keys, grouped heads; returns (out, present k, present v).

    query [b, s, heads * d], key/value [b, s, kv_heads * d], past [b, kv_heads, p, d], bias [b, 1, s, p + s]."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    k = torch.cat([past_key, key.reshape(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
    v = torch.cat([past_value, value.reshape(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
    q = query.reshape(b, s, num_heads, d).transpose(1, 2)
    group = num_heads // kv_num_heads
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax((scores + bias).float(), dim=-1).to(q.dtype)
    out = (probs @ v.repeat_interleave(group, dim=1)).transpose(1, 2).reshape(b, s, num_heads * d)
    return out, k.clone(), v.clone()


@group_query_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
      bias: torch.Tensor, num_heads: int, kv_num_heads: int, scale: float,
      softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, p, d = past_key.shape[0], past_key.shape[2], past_key.shape[3]
    t = p + key.shape[1]
    return query.new_empty(query.shape), past_key.new_empty((b, kv_num_heads, t, d)), \
        past_value.new_empty((b, kv_num_heads, t, d))


def _schema() -> Any:
    """ONNX Runtime's GroupQueryAttention signature, the inputs this export feeds (onnx has no contrib schemas)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    ints, floats = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT

    def param(name: str, kind: str, opt: bool = False) -> Any:
        return OpSchema.FormalParameter(name, kind, param_option=optional) if opt else OpSchema.FormalParameter(
            name, kind)

    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T", True), param("value", "T", True),
                param("past_key", "T", True), param("past_value", "T", True), param("seqlens_k", "M"),
                param("total_sequence_length", "M"), param("cos_cache", "T", True), param("sin_cache", "T", True),
                param("position_ids", "P", True), param("attention_bias", "T", True)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors"),
                          ("M", ["tensor(int32)"], "lengths"), ("P", ["tensor(int64)"], "positions")],
        attributes=[OpSchema.Attribute("num_heads", ints, "query heads"),
                    OpSchema.Attribute("kv_num_heads", ints, "key/value heads"),
                    OpSchema.Attribute("scale", floats, "score scale"),
                    OpSchema.Attribute("softcap", floats, "score softcap (0: none)"),
                    OpSchema.Attribute("causal", ints, "1: causal mask inside the kernel")],
    )


def _gqa_onnx(query: Any, key: Any, value: Any, past_key: Any, past_value: Any, bias: Any, num_heads: int,
              kv_num_heads: int, scale: float, softcap: float) -> Any:
    from onnxscript import opset18 as op
    from onnxscript import values

    # Every row's keys are physical positions 0..total-1 (left padding is masked by the bias), so each row's
    # seqlens_k is total - 1: the kernel then treats the batch as right-aligned and full. `total` is the mask's
    # length (the bias's last axis), not past + new: a shared past buffer is longer than the cache it holds.
    total = op.Shape(bias, start=3, end=4)
    seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), op.Shape(query, start=0, end=1)), to=6)
    total_scalar = op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=6)
    gqa = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _schema())
    return gqa(query, key, value, past_key, past_value, seqlens, total_scalar, None, None, None, bias,
               num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap, causal=0)


TRANSLATIONS = {torch.ops.compress.group_query_attention.default: _gqa_onnx}


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q [b, heads, s, d], new k/v [b, kv_heads, s, d] (GqaCache)."""
    cache = _ACTIVE.get()
    layer = cache.layers[module.layer_idx] if cache is not None and module.layer_idx < len(cache.layers) else None
    if not hasattr(layer, "past_length") or attention_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    flat = lambda t, n: t.transpose(1, 2).reshape(b, s, n * d)  # noqa: E731
    bias = attention_mask.to(query.dtype)
    out, present_key, present_value = group_query_attention(
        flat(query, heads), flat(key, kv_heads), flat(value, kv_heads), layer.keys, layer.values, bias, heads,
        kv_heads, float(scaling if scaling is not None else d ** -0.5), float(softcap or 0.0))
    layer.keys, layer.values = present_key, present_value
    return out.reshape(b, s, heads, d), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)  # an additive float mask: the kernel's attention_bias


def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GqaLayer(DynamicLayer):
        """A cache layer holding a layer's past; `update` hands back only the new keys and values (the kernel
        appends them), and the attention function stores the presents it returns."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, past_length: Any):
            super().__init__()
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True
            self.past_length = past_length

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return key_states, value_states

        def get_seq_length(self) -> int:
            return self.past_length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.past_length + query_length, 0

    return GqaLayer


def gqa_cache(past: tuple[torch.Tensor, ...], past_length: Any) -> Any:
    """A DynamicCache whose layers are `GqaLayer`s over the graph's past inputs (every layer self-attends).

    `past_length`: the cached tokens, from the attention mask (mask length - new tokens)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layer = _layer_class()
    cache.layers = [layer(past[i], past[i + 1], past_length) for i in range(0, len(past), 2)]
    return cache


@contextlib.contextmanager
def active(cache: Any) -> Iterator[None]:
    """The cache the attention function reads pasts from (None: attention as traced normally)."""
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def traced_with_gqa(language: nn.Module) -> Iterator[None]:
    """While tracing, the language model's attention (and mask format) is this module's."""
    _register()
    configs = {id(m.config): m.config for m in language.modules() if hasattr(getattr(m, "config", None),
                                                                              "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = ATTENTION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
