"""The reductions themselves: [batch, n, dim] patch features in, [batch, k, dim] out, k fixed by the
configuration (never by the data), so a traced graph has static shapes and every image gives the same
number of tokens.

`pool` averages square windows of the patch grid (the 2-D layout is kept, row-major). `select_merge`
follows VisionZip (Yang et al., CVPR 2025): the `dominant` tokens the tower attends to most are kept as
they are, in image order; the rest are merged into `contextual` tokens, each the mean of an evenly spaced
target token and the remaining tokens most similar to it (cosine of their features).
"""

from __future__ import annotations

import torch
from torch import nn


def pool(x: torch.Tensor, grid: int, target: int) -> torch.Tensor:
    """The mean of each (grid / target)² window of a grid × grid patch layout: [b, grid², d] -> [b, target², d]."""
    b, n, d = x.shape
    if n != grid * grid or grid % target:
        raise ValueError(f"pool: {n} tokens are not a {grid}x{grid} grid divisible into {target}x{target}")
    s = grid // target
    return x.reshape(b, target, s, target, s, d).mean(dim=(2, 4)).reshape(b, target * target, d)


def attention_received(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """How much attention each token receives in a tower layer (pre-norm `layer_norm1`, `self_attn` with
    `q_proj` / `k_proj`, as CLIP and SigLIP layers have), averaged over heads and queries: [b, n]."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    b, n, _ = h.shape
    heads = attn.num_heads
    q = attn.q_proj(h).reshape(b, n, heads, -1).transpose(1, 2)
    k = attn.k_proj(h).reshape(b, n, heads, -1).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # [b, heads, n, n]
    return probs.mean(dim=(1, 2))


def select_merge(x: torch.Tensor, scores: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """[b, n, d] -> [b, dominant + contextual, d]: the top-`dominant` tokens by `scores` ([b, n]) in image
    order, then `contextual` merged tokens."""
    b, n, d = x.shape
    rest_n = n - dominant
    if dominant < 0 or contextual < 1 or rest_n < contextual:
        raise ValueError(f"select_merge: {n} tokens cannot give {dominant} dominant + {contextual} contextual")
    index = torch.arange(n, device=x.device).expand(b, n)
    top = scores.topk(dominant, dim=-1).indices.sort(dim=-1).values if dominant else index[:, :0]
    kept = torch.zeros(b, n, dtype=torch.long, device=x.device).scatter(1, top, 1)
    rest = (kept * n + index).argsort(dim=-1)[:, :rest_n]  # the others, in image order
    dom = x.gather(1, top.unsqueeze(-1).expand(b, dominant, d))
    others = x.gather(1, rest.unsqueeze(-1).expand(b, rest_n, d))
    targets = others[:, torch.arange(contextual, device=x.device) * (rest_n // contextual)]
    unit = others / others.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = unit @ (targets / targets.norm(dim=-1, keepdim=True).clamp_min(1e-6)).transpose(1, 2)  # [b, rest, c]
    assign = (sim.argmax(dim=-1, keepdim=True) == torch.arange(contextual, device=x.device)).to(x.dtype)
    merged = (assign.transpose(1, 2) @ others) / assign.sum(dim=1).clamp_min(1).unsqueeze(-1)
    return torch.cat([dom, merged], dim=1)
