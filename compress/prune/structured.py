"""Structured pruning that shrinks the language model: MLP channels, attention heads, whole decoder layers.

Importance follows Minitron (Muralidharan et al. 2024; NVIDIA Model-Optimizer): from calibration
activations, one pass over the dense model — an MLP channel by the L2 norm of its activation entering
down_proj, a query head by the L2 norm of its attention output entering o_proj, a decoder layer by its
block importance 1 - cos(x_in, x_out). `magnitude` scores channels and heads from the weights alone
(the baseline); it has no layer score. hidden_size is never touched (the projector, embeddings and
norms depend on it), so only the decoder layers change.

Every layer keeps the same number of channels / heads (one config value for all of them), each layer
choosing which. The shrunk model is rebuilt from the edited config and loaded strictly from the sliced
weights, so the config always matches the weights: `head_dim` is written explicitly, `layer_types` is
sliced, and the rebuilt layers get fresh `layer_idx` numbers. A family that derives head_dim from
hidden_size // num_attention_heads (Qwen2-VL's M-RoPE attention) cannot lose heads; that is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.arch.base import resolve_path, text_config
from compress.errors import ConfigError


@dataclass
class Layout:
    """Where the decoder layers live and the sizes every layer shares."""

    prefix: str  # state-dict prefix of the layers ModuleList, e.g. "model.language_model.layers"
    layers: list[nn.Module]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def queries_per_group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class Plan:
    """What each kept layer keeps (indices in the original numbering, ascending)."""

    layers: list[int]
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # query heads
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)


def layout(model: nn.Module, language: nn.Module) -> Layout:
    """The decoder's shared sizes; a ConfigError where a layer is not q/k/v/o attention + gated MLP."""
    layers = getattr(language, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(f"shrink: {type(language).__name__} has no 'layers' list to prune")
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ConfigError(f"shrink: {type(layer).__name__} has no self_attn with q/k/v/o_proj Linears")
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ConfigError(f"shrink: {type(layer).__name__} has no gated mlp (gate/up/down_proj Linears)")
    prefix = next(n for n, m in model.named_modules() if m is layers)
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    attn = layers[0].self_attn
    head_dim = int(getattr(attn, "head_dim", 0) or attn.q_proj.out_features // heads)
    kv_heads = attn.k_proj.out_features // head_dim
    if attn.q_proj.out_features != heads * head_dim or heads % kv_heads:
        raise ConfigError(f"shrink: cannot read the head layout of {type(attn).__name__} ({heads} heads, "
                          f"q_proj out {attn.q_proj.out_features}, k_proj out {attn.k_proj.out_features})")
    return Layout(prefix, list(layers), heads, kv_heads, head_dim, layers[0].mlp.down_proj.in_features)


# ---- importance ----------------------------------------------------------------------------------

@dataclass
class Importance:
    mlp: list[torch.Tensor]  # [intermediate] per layer
    heads: list[torch.Tensor]  # [heads] per layer
    layers: torch.Tensor | None  # [layers] block importance, or None (magnitude)


def magnitude_importance(lay: Layout) -> Importance:
    """Weights only: a channel by ||gate_j|| * ||up_j|| * ||down_:,j||, a head by ||q rows|| * ||o columns||."""
    mlp, heads = [], []
    for layer in lay.layers:
        m, a = layer.mlp, layer.self_attn
        mlp.append((m.gate_proj.weight.norm(dim=1) * m.up_proj.weight.norm(dim=1) * m.down_proj.weight.norm(dim=0))
                   .detach().float())
        q = a.q_proj.weight.detach().float().reshape(lay.heads, -1).norm(dim=1)
        o = a.o_proj.weight.detach().float().reshape(a.o_proj.out_features, lay.heads, lay.head_dim)
        heads.append(q * o.pow(2).sum(dim=(0, 2)).sqrt())
    return Importance(mlp, heads, None)


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


def activation_importance(model: nn.Module, lay: Layout, forward_loop: Callable[[nn.Module], None]) -> Importance:
    """One calibration pass over the dense model: channel / head activation norms and block importance."""
    n = len(lay.layers)
    mlp = [torch.zeros(lay.intermediate, dtype=torch.float64) for _ in range(n)]
    heads = [torch.zeros(lay.heads, dtype=torch.float64) for _ in range(n)]
    block = torch.zeros(n, dtype=torch.float64)
    tokens = torch.zeros(n, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def on_down(i: int):
        def hook(_m, args):
            mlp[i] += args[0].detach().double().pow(2).reshape(-1, lay.intermediate).sum(0)
        return hook

    def on_o(i: int):
        def hook(_m, args):
            x = args[0].detach().double().reshape(-1, lay.heads, lay.head_dim)
            heads[i] += x.pow(2).sum(dim=(0, 2))
        return hook

    def on_layer_in(i: int):
        def hook(_m, args, kwargs):
            inputs[i] = _hidden(args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def on_layer_out(i: int):
        def hook(_m, _args, _kwargs, out):
            x_in, x_out = inputs.pop(i).double(), _hidden(out).detach().double()
            cos = nn.functional.cosine_similarity(x_in, x_out, dim=-1).reshape(-1)
            block[i] += (1.0 - cos).sum()
            tokens[i] += cos.numel()
        return hook

    for i, layer in enumerate(lay.layers):
        handles += [layer.mlp.down_proj.register_forward_pre_hook(on_down(i)),
                    layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)),
                    layer.register_forward_pre_hook(on_layer_in(i), with_kwargs=True),
                    layer.register_forward_hook(on_layer_out(i), with_kwargs=True)]
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    if not bool((tokens > 0).all()):
        raise ConfigError("shrink: calibration reached no decoder layer (empty calibration set?)")
    return Importance([t.sqrt().float() for t in mlp], [t.sqrt().float() for t in heads], (block / tokens).float())


# ---- plan ----------------------------------------------------------------------------------------

def kept_width(width: int, ratio: float, multiple: int) -> int:
    """Channels kept of `width` after removing `ratio`, rounded to a multiple (at least one multiple)."""
    keep = round(width * (1.0 - ratio) / multiple) * multiple
    return max(min(keep, width), min(multiple, width))


def plan(lay: Layout, imp: Importance, mlp: float, heads: float, heads_from: str, layers: float,
         round_to: int) -> Plan:
    """Which channels, heads and layers stay; a ConfigError where a ratio removes nothing or everything."""
    n = len(lay.layers)
    keep_layers = list(range(n))
    if layers:
        drop = round(n * layers)
        if drop < 1 or drop >= n:
            raise ConfigError(f"shrink: layers {layers:g} of {n} decoder layers removes {drop}; choose a ratio "
                              f"that removes between 1 and {n - 1}")
        assert imp.layers is not None
        gone = set(imp.layers.argsort()[:drop].tolist())
        keep_layers = [i for i in range(n) if i not in gone]
    p = Plan(keep_layers)
    width = kept_width(lay.intermediate, mlp, round_to) if mlp else lay.intermediate
    if mlp and width == lay.intermediate:
        raise ConfigError(f"shrink: mlp {mlp:g} of {lay.intermediate} channels rounded to a multiple of {round_to} "
                          "removes nothing")
    groups = lay.kv_heads
    per_group = lay.queries_per_group
    by_groups = heads_from == "groups" or per_group == 1  # MHA: each head is its own group
    if heads:
        if by_groups:
            keep_groups = round(groups * (1.0 - heads))
            if keep_groups in (0, groups):
                raise ConfigError(f"shrink: heads {heads:g} of {groups} KV groups keeps {keep_groups}; the steps are "
                                  f"multiples of {1 / groups:g}")
        else:
            keep_q = round(per_group * (1.0 - heads))
            if keep_q in (0, per_group):
                raise ConfigError(f"shrink: heads {heads:g} of {per_group} query heads per KV group keeps {keep_q}; "
                                  f"the steps are multiples of {1 / per_group:g} (or heads_from: groups)")
    for i in keep_layers:
        if mlp:
            p.mlp[i] = imp.mlp[i].topk(width).indices.sort().values
        if heads:
            score = imp.heads[i].reshape(groups, per_group)
            if by_groups:
                kv = score.sum(1).topk(keep_groups).indices.sort().values
                q = (kv[:, None] * per_group + torch.arange(per_group)).reshape(-1)
            else:
                kv = torch.arange(groups)
                q = (score.topk(keep_q, dim=1).indices.sort(dim=1).values + kv[:, None] * per_group).reshape(-1)
            p.heads[i], p.kv_heads[i] = q, kv
    return p


# ---- surgery -------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, units: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of `t` belonging to the kept units (heads of `size` rows each)."""
    idx = (units[:, None] * size + torch.arange(size)).reshape(-1)
    return t.index_select(0, idx)


def sliced_state(model: nn.Module, lay: Layout, p: Plan) -> dict[str, torch.Tensor]:
    """The full state dict with kept layers renumbered and their Linears cut to the plan."""
    out: dict[str, torch.Tensor] = {}
    new_index = {old: new for new, old in enumerate(p.layers)}
    prefix = lay.prefix + "."
    hd = lay.head_dim
    for key, t in model.state_dict().items():
        if not key.startswith(prefix):
            out[key] = t
            continue
        old, rest = key[len(prefix):].split(".", 1)
        i = int(old)
        if i not in new_index:
            continue
        if i in p.heads:
            if rest.startswith("self_attn.q_proj."):
                t = _rows(t, p.heads[i], hd)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                t = _rows(t, p.kv_heads[i], hd)
            elif rest == "self_attn.o_proj.weight":
                t = _rows(t.t(), p.heads[i], hd).t()
        if i in p.mlp:
            if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                t = t.index_select(0, p.mlp[i])
            elif rest == "mlp.down_proj.weight":
                t = t.index_select(1, p.mlp[i])
        out[f"{prefix}{new_index[i]}.{rest}"] = t.contiguous()
    return out


def shrunk_config(model: nn.Module, lay: Layout, p: Plan) -> Any:
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    first = p.layers[0]
    if p.mlp:
        text.intermediate_size = int(p.mlp[first].numel())
    if p.heads:
        text.num_attention_heads = int(p.heads[first].numel())
        text.num_key_value_heads = int(p.kv_heads[first].numel())
    text.head_dim = lay.head_dim  # families that default head_dim to hidden // heads must keep the old value
    if len(p.layers) != len(lay.layers):
        text.num_hidden_layers = len(p.layers)
        types = getattr(text, "layer_types", None)
        if isinstance(types, list) and len(types) == len(lay.layers):
            text.layer_types = [types[i] for i in p.layers]
    return config


def rebuild(model: nn.Module, language_path: str, lay: Layout, p: Plan) -> nn.Module:
    """A fresh model of the same class from the edited config, loaded strictly from the sliced weights."""
    from transformers.modeling_utils import init

    config = shrunk_config(model, lay, p)
    dtype = next(model.parameters()).dtype
    with init.no_init_weights():
        new = type(model)._from_config(config, dtype=dtype)
    attn = resolve_path(new, language_path).layers[0].self_attn
    if p.heads and getattr(attn, "head_dim", lay.head_dim) != lay.head_dim:
        raise ConfigError(f"shrink: {type(attn).__name__} derives head_dim from hidden_size // num_attention_heads "
                          f"({attn.head_dim} instead of {lay.head_dim} with fewer heads; Qwen2-VL's "
                          "M-RoPE sections fix head_dim), so its heads cannot be pruned; prune mlp or layers")
    new.load_state_dict(sliced_state(model, lay, p), strict=True)
    new.tie_weights()  # loading copied lm_head and the embeddings into two tensors; tied models share one
    if _tied(model) and not _tied(new):
        raise ConfigError("shrink: the rebuilt model lost its tied input/output embeddings")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.eval()
    return new


def _tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight
