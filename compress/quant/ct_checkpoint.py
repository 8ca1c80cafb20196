"""INT8 and INT4 layers as a compressed-tensors checkpoint: the format transformers, vLLM and SGLang load.

W8A8 (static per-tensor or dynamic per-token/per-tensor activations) is `int-quantized`: `weight` int8,
`weight_scale` [out, 1] or [1], `input_scale` [1] when static. Weight-only (W8A16) is `pack-quantized`:
`weight_packed` int32, `weight_scale`, `weight_shape`. Symmetric INT4 (W4A16) is `pack-quantized` with
`strategy: group`: eight codes per int32, `weight_scale` [out, groups]; INT4 with zero points is
`int-quantized` (see the note at INT_QUANTIZED). Each distinct scheme is one config group whose
targets are anchored module-name regexes that also match transformers' legacy checkpoint names
(`language_model.model.layers…` for `model.language_model.layers…`). Layers kept in float are simply
not targeted. Our Int8Linear grid is compressed-tensors' own (see int8.py), so plain `from_pretrained`
computes what the stage measured; reading back goes through that same loader and converts its modules.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError
from compress.quant.int4 import Int4Linear, int4_modules
from compress.quant.int8 import Int8Linear, int8_modules

INT_QUANTIZED, PACK_QUANTIZED = "int-quantized", "pack-quantized"
# INT4 with zero points is written `int-quantized` (one int8 per code, zero points unpacked): compressed-tensors
# 0.20's loader sizes a pack-quantized `weight_zero_point` unpacked while its compressor stores it packed, so
# transformers refuses such a checkpoint (size mismatch; llm-compressor#1618). Symmetric INT4 is packed.


def _args(strategy: str, dynamic: bool = False) -> dict[str, Any]:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic}


def quant_modules(model: nn.Module) -> dict[str, Int8Linear | Int4Linear]:
    """Every INT8 and INT4 layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear | Int4Linear)}


def scheme_of(m: Int8Linear | Int4Linear) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(format, weight args, input-activation args) of one layer."""
    if isinstance(m, Int4Linear):  # zero points: int-quantized, see the note at INT_QUANTIZED
        return PACK_QUANTIZED if m.symmetric else INT_QUANTIZED, {
            "num_bits": 4, "type": "int", "symmetric": m.symmetric, "strategy": "group", "group_size": m.group_size,
            "dynamic": False}, None
    weights = _args("channel" if m.granularity == "per_channel" else "tensor")
    if m.act_dynamic is not None:
        return INT_QUANTIZED, weights, _args("token" if m.act_dynamic == "per_token" else "tensor", dynamic=True)
    if m.input_scale is not None:
        return INT_QUANTIZED, weights, _args("tensor")
    return PACK_QUANTIZED, weights, None


def _pattern(name: str, generic: bool) -> str:
    """Anchored regex for a module name; `model.` segments optional (new and legacy names both match)."""
    parts = name.split(".")
    if parts[0] == "model" and len(parts) > 2:  # model.language_model.layers… / language_model.model.layers…
        parts = parts[1:]
        if parts[1] == "model":
            parts = [parts[0], *parts[2:]]
    escaped = [r"\d+" if generic and p.isdigit() else re.escape(p) for p in parts]
    if len(parts) == 1:  # lm_head, or language_model.lm_head in legacy names
        return rf"re:^(?:.*\.)?{escaped[0]}$"
    return rf"re:^(?:model\.)?{escaped[0]}\.(?:model\.)?{'.'.join(escaped[1:]).replace('.', chr(92) + '.')}$"


def _targets(names: list[str], linears: list[str]) -> list[str]:
    """Compact targets: one pattern per layer position when every layer's module of it is in the group."""
    chosen = set(names)
    out: list[str] = []
    for name in names:
        generic = _pattern(name, generic=True)
        regex = re.compile(generic.removeprefix("re:"))
        covers = [n for n in linears if regex.match(n)]
        pattern = generic if set(covers) <= chosen else _pattern(name, generic=False)
        if pattern not in out:
            out.append(pattern)
    return out


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The `quantization_config` for config.json, validated by compressed-tensors; None if nothing is INT8."""
    from compressed_tensors import __version__
    from compressed_tensors.quantization import QuantizationConfig

    modules = quant_modules(model)
    if not modules:
        return None
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Int8Linear | Int4Linear)]
    groups: dict[str, list[str]] = {}
    schemes: dict[str, tuple] = {}
    for name, m in modules.items():
        scheme = scheme_of(m)
        key = repr(scheme)
        schemes[key] = scheme
        groups.setdefault(key, []).append(name)
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        fmt, weights, inputs = schemes[key]
        config_groups[f"group_{i}"] = {"targets": _targets(names, linears), "weights": weights,
                                       "input_activations": inputs, "format": fmt}
    formats = {schemes[k][0] for k in groups}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "version": __version__,
    }
    QuantizationConfig.model_validate(config)  # fail here, not in a user's loader
    int8 = int8_modules(model)
    streamed = any(m.weight_int8.is_meta for m in int8.values())  # blocks already written: zeros not countable
    sparsity = sparsity_config(int8, linears) if not int4_modules(model) and not streamed else None
    if sparsity is not None:
        config["sparsity_config"] = sparsity
    return config


def sparsity_config(modules: dict[str, Int8Linear], linears: list[str]) -> dict[str, Any] | None:
    """compressed-tensors' `sparsity_config` (format `dense`: the zeros are stored) when pruning left the
    INT8 layers 2:4 / 4:8 (every one of them) or at least 30% zeros; None otherwise."""
    from compressed_tensors.config import SparsityCompressionConfig

    from compress.prune.sparsity import nm_valid

    weights = {n: m.weight_int8 for n, m in modules.items()}
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / max(sum(w.numel() for w in weights.values()), 1)
    structure = next((f"{n}:{m}" for n, m in ((2, 4), (4, 8)) if zeros >= 0.45
                      and all(nm_valid(w, n, m) for w in weights.values())), None)
    if structure is None and zeros < 0.3:
        return None
    config = {"format": "dense", "global_sparsity": round(zeros, 6), "sparsity_structure": structure or "unstructured",
              "targets": _targets(list(modules), linears), "ignore": []}
    SparsityCompressionConfig.load_from_registry("dense", **{k: v for k, v in config.items() if k != "format"})
    return config


def compressed_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each INT8 / INT4 layer's buffers replaced by its compressed-tensors tensors (layers with no
    tensors in `state` are left out: a streamed run writes the modules outside its blocks last)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = dict(state)
    for name, m in quant_modules(model).items():
        keys = [k for k in out if k.startswith(f"{name}.")]
        if not keys:
            continue
        for key in keys:
            del out[key]
        if isinstance(m, Int4Linear):
            out[f"{name}.weight_scale"] = m.weight_scale.detach().float().contiguous()
            if m.symmetric:
                out[f"{name}.weight_packed"] = pack_to_int32(m.weight_int4.detach().cpu(), 4).contiguous()
                out[f"{name}.weight_shape"] = torch.tensor(list(m.weight_int4.shape))
            else:
                out[f"{name}.weight"] = m.weight_int4.detach().contiguous()
                out[f"{name}.weight_zero_point"] = m.weight_zero_point.detach().contiguous()
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach()
            continue
        fmt, _, _ = scheme_of(m)
        scale = m.weight_scale.detach().float()
        out[f"{name}.weight_scale"] = scale.reshape(-1, 1).contiguous() if m.granularity == "per_channel" else scale
        if fmt == PACK_QUANTIZED:
            out[f"{name}.weight_packed"] = pack_to_int32(m.weight_int8.detach().cpu(), 8).contiguous()
            out[f"{name}.weight_shape"] = torch.tensor(list(m.weight_int8.shape))
        else:
            out[f"{name}.weight"] = m.weight_int8.detach().contiguous()
        if m.input_scale is not None:
            out[f"{name}.input_scale"] = m.input_scale.detach().float().reshape(1)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach()
    return out


def _int_weight(m: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    packed = getattr(m, "weight_packed", None)
    if packed is not None:
        return unpack_from_int32(packed.data, 8, torch.Size(m.weight_shape.tolist())).to(torch.int8)
    w = m.weight.data
    if w.dtype == torch.int8:
        return w
    return torch.round(w.float() / scale.reshape(-1, 1)).clamp(-128, 127).to(torch.int8)  # decompressed already


def _int4_from(m: nn.Module, group_size: int, symmetric: bool) -> Int4Linear:
    """An Int4Linear from a loaded pack-quantized group layer (compressed or already decompressed)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from compress.quant.int4 import quantize_int4

    scale = m.weight_scale.data.float()
    shape = torch.Size(m.weight_shape.tolist()) if getattr(m, "weight_packed", None) is not None else m.weight.shape
    zero = getattr(m, "weight_zero_point", None)
    if zero is not None and not symmetric:
        zero = zero.data
        if zero.shape != scale.shape:  # still packed along the output axis
            zero = unpack_from_int32(zero, 4, scale.shape, packed_dim=0)
        zero = zero.to(torch.int8)
    else:
        zero = None
    if getattr(m, "weight_packed", None) is not None:
        q = unpack_from_int32(m.weight_packed.data, 4, shape).to(torch.int8)
    elif m.weight.dtype == torch.int8:
        q = m.weight.data
    else:
        q = quantize_int4(m.weight.data, scale, zero, group_size)  # decompressed already: exact on the grid
    bias = getattr(m, "bias", None)
    new = Int4Linear(shape[1], shape[0], bias=bias is not None, group_size=group_size, symmetric=symmetric,
                     device=q.device, dtype=bias.dtype if bias is not None else torch.float32)
    new.weight_int4.copy_(q)
    new.weight_scale.copy_(scale)
    if zero is not None:
        new.weight_zero_point.copy_(zero)
    if bias is not None:
        new.bias.data.copy_(bias.data)
    return new


def from_loaded(model: nn.Module) -> int:
    """Turn the layers transformers' compressed-tensors loader built into Int8Linear / Int4Linear; returns how
    many.

    Afterwards the model no longer refers to the quantizer: it is this toolkit's in-memory form again.
    """
    count = 0
    for name, m in list(model.named_modules()):
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None:
            continue
        w, a = scheme.weights, scheme.input_activations
        if w is not None and w.num_bits == 4 and a is None and str(w.strategy).rsplit(".", 1)[-1].lower() == "group":
            model.set_submodule(name, _int4_from(m, int(w.group_size), bool(w.symmetric)).train(m.training))
            count += 1
            continue
        if w is None or w.num_bits != 8 or str(w.type) not in ("int", "QuantizationType.INT") or not w.symmetric \
                or str(w.strategy).rsplit(".", 1)[-1].lower() not in ("channel", "tensor"):
            raise ConfigError(f"'{name}': compressed-tensors scheme {scheme.model_dump(exclude_none=True)} is not "
                              "one this toolkit handles (8-bit symmetric integer weights, per channel or tensor)")
        scale = m.weight_scale.data.float()
        dynamic = None
        if a is not None and a.dynamic:
            dynamic = "per_token" if str(a.strategy).rsplit(".", 1)[-1].lower() == "token" else "per_tensor"
        q = _int_weight(m, scale)
        per_channel = scale.numel() > 1
        new = Int8Linear(q.shape[1], q.shape[0], bias=getattr(m, "bias", None) is not None,
                         granularity="per_channel" if per_channel else "per_tensor",
                         act_quant=a is not None and not a.dynamic, act_dynamic=dynamic, device=q.device,
                         dtype=m.bias.dtype if getattr(m, "bias", None) is not None else torch.float32)
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(scale.reshape(-1))
        if new.input_scale is not None:
            new.input_scale.fill_(float(m.input_scale.data.reshape(-1)[0]))
        if new.bias is not None:
            new.bias.data.copy_(m.bias.data)
        model.set_submodule(name, new.train(m.training))
        count += 1
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return count
