"""Where SmoothQuant's 1/s can fold: the producer of each Linear input, by module-name pattern.

A rule names, under some module, a source (a norm, or a Linear whose output rows feed the targets
elementwise or through attention) and the Linears reading it. Patterns cover the families this
toolkit supports (Llama-style text models, CLIP/SigLIP/Idefics3 vision, Qwen2-VL / Qwen2.5-VL vision);
`smoothquant.smooth` checks every fold numerically, so a rule that does not fit a model cannot pass
silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Rule:
    """Under one module: `targets` read the output of `source` (a norm, or a Linear's rows)."""

    source: str
    targets: tuple[str, ...]
    kind: str  # norm | rows (elementwise path, e.g. gated MLP) | heads (through attention)
    requires: str | None = None  # a sibling that must exist (the gate of a gated MLP)
    unless: str | None = None  # a sibling that must not exist (Gemma's post-attention norm is not pre-MLP)


RULES: tuple[Rule, ...] = (
    Rule("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
    Rule("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm", unless="pre_feedforward_layernorm"),
    Rule("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),  # Gemma 2 / 3
    Rule("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),  # CLIP, SigLIP
    Rule("layer_norm2", ("mlp.fc1",), "norm"),
    Rule("norm1", ("attn.qkv",), "norm"),  # Qwen2-VL vision
    Rule("norm2", ("mlp.fc1",), "norm"),
    Rule("norm2", ("mlp.gate_proj", "mlp.up_proj"), "norm"),  # Qwen2.5-VL vision
    Rule("mlp.up_proj", ("mlp.down_proj",), "rows", requires="mlp.gate_proj"),
    Rule("self_attn.v_proj", ("self_attn.o_proj",), "heads"),
    Rule("self_attn.v_proj", ("self_attn.out_proj",), "heads"),
    Rule("attn.qkv", ("attn.proj",), "heads"),
)


@dataclass
class Mapping:
    source: str
    targets: tuple[str, ...]
    kind: str
    rows: slice  # the source rows that produce the targets' input (all, or the V third of a fused qkv)
    groups: tuple[int, int, int] | None = None  # heads: (kv heads, query heads per kv head, head_dim)
    offset: float = 0.0  # norm: it scales by (offset + weight); Gemma's RMSNorm by (1 + weight)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _head_layout(attn: nn.Module | None, source: nn.Linear, target: nn.Linear, fused: bool) -> tuple | None:
    """(rows of source feeding target, (kv heads, queries per kv head, head_dim)), or None if unclear."""
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0 or target.in_features % head_dim:
        return None
    width = target.in_features
    if fused:  # [q; k; v] rows of one Linear, no GQA
        if source.out_features != 3 * width:
            return None
        return slice(2 * width, 3 * width), (width // head_dim, 1, head_dim)
    rep = int(getattr(attn, "num_key_value_groups", 1) or 1)
    if source.out_features * rep != width or source.out_features % head_dim:
        return None
    return slice(0, source.out_features), (source.out_features // head_dim, rep, head_dim)


def find_mappings(model: nn.Module, selected: set[str]) -> list[Mapping]:
    """Every rule that matches under some module, has a float source and at least one selected target."""
    found: list[Mapping] = []
    claimed: set[str] = set()
    for prefix, parent in model.named_modules():
        for rule in RULES:
            src = _get(parent, rule.source)
            tgts = [_get(parent, t) for t in rule.targets]
            if src is None or any(type(t) is not nn.Linear for t in tgts):
                continue
            if (rule.requires and _get(parent, rule.requires) is None) or (rule.unless and _get(parent, rule.unless)):
                continue
            names = tuple(f"{prefix}.{t}" if prefix else t for t in rule.targets)
            if claimed.intersection(names) or not selected.intersection(names):
                continue
            if rule.kind == "norm":
                w = getattr(src, "weight", None)
                if type(src) is nn.Linear or not isinstance(w, torch.Tensor) or w.shape != (tgts[0].in_features,):
                    continue
                mapping = Mapping(_join(prefix, rule.source), names, "norm", slice(None), offset=norm_offset(src))
            elif type(src) is not nn.Linear:
                continue
            elif rule.kind == "rows":
                if src.out_features != tgts[0].in_features:
                    continue
                mapping = Mapping(_join(prefix, rule.source), names, "rows", slice(0, src.out_features))
            else:
                attn = _get(parent, rule.source.rsplit(".", 1)[0])
                layout = _head_layout(attn, src, tgts[0], fused=rule.source.endswith("qkv"))
                if layout is None:
                    continue
                mapping = Mapping(_join(prefix, rule.source), names, "heads", layout[0], layout[1])
            claimed.update(names)
            found.append(mapping)
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """c in y = n(x) * (c + weight) (+ bias): 0 for most norms, 1 for Gemma's RMSNorm. Probed on the module
    (weight 0 and 1, bias 0, on a fixed input) rather than read from class names, so a family that stores
    its scale as an offset is folded right without a rule of its own."""
    weight = norm.weight
    params = [t for t in (weight, getattr(norm, "bias", None)) if isinstance(t, torch.Tensor)]
    saved = [t.detach().clone() for t in params]
    x = torch.randn(1, 4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        for t in params:  # weight 0, bias 0: what is left is c * n(x)
            t.zero_()
        y0 = norm(x).float()
        weight.fill_(1.0)
        n = norm(x).float() - y0
    finally:
        for t, v in zip(params, saved, strict=True):
            t.copy_(v)
    return round(float((y0 * n).sum() / (n * n).sum()), 6)
