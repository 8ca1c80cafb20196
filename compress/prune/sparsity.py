"""Unstructured and n:m pruning of Linear weights: magnitude, Wanda and SparseGPT.

- magnitude: score |W|; unstructured compares within the whole layer, n:m within each group of m inputs.
- Wanda (Sun et al. 2023, locuslab/wanda): score |W_ij| * ||X_j||_2 over the calibration tokens,
  compared within each output row (unstructured) or each group of m input columns (n:m).
- SparseGPT (Frantar & Alistarh 2023, IST-DASLab/sparsegpt): OBS with H = 2 X^T X + damp * mean(diag) I;
  per block of 128 columns the mask is chosen by w^2 / [H^-1]_jj^2 and every pruned weight's error is
  spread over the columns not yet visited, so the kept weights compensate.

Calibrated methods run group by group (one decoder layer's Linears at a time, in model order): the
group's statistics (Wanda: per-column sums of squares; SparseGPT: one Hessian per Linear) are recorded
over the calibration set, then the group is pruned. Run by a stage, a group is one block of the
layer-sequential walk (`compress.sequential`), whose inputs come from the original previous blocks or,
with `calibration.layer_inputs: compressed`, from the pruned ones as in the reference implementations.
Memory holds one group's statistics at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError
from compress.observe import ColumnNorm, Hessian, observe_inputs

_GROUP = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): n weights kept of every m; 'unstructured' -> None."""
    if pattern == "unstructured":
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in each row, the m - n lowest scores of every m consecutive inputs."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    drop = groups.topk(m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """True for the lowest `sparsity` share of scores, per output row or over the whole layer."""
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        drop = scores.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, drop, True)
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive inputs in every row has at most n non-zero weights."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                    block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """The pruned weight (same shape and dtype as `weight`), with OBS updates of the kept weights."""
    w = weight.detach().float().clone()
    h = hessian.clone().float()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))  # h += damp * mean * I, without an [in, in] identity
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:  # not positive definite even after damping
        raise ConfigError(f"SparseGPT: the Hessian is not positive definite ({exc}); raise damp") from None
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if nm is None:
            score = w1**2 / d.reshape(1, -1) ** 2
            mask1 = unstructured_mask(score, sparsity, per_row=False)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                mask1[:, i:i + m] = nm_mask(score, n, m) if score.shape[1] == m else mask1[:, i:i + m]
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    w[mask] = 0.0
    return w.to(weight.dtype)


def check_pattern(modules: dict[str, nn.Linear], pattern: str) -> tuple[int, int] | None:
    """The n:m of `pattern` (None: unstructured), if every module's in_features is a multiple of m."""
    nm = parse_pattern(pattern)
    if nm:
        bad = [n for n, mod in modules.items() if mod.in_features % nm[1]]
        if bad:
            raise ConfigError(f"{pattern} sparsity needs in_features divisible by {nm[1]}: {', '.join(bad[:5])}")
    return nm


def groups_in_order(names: list[str]) -> list[list[str]]:
    """The selected Linears grouped by decoder / encoder block (`...layers.N`), in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        m = _GROUP.match(name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return list(groups.values())


@torch.no_grad()
def prune_linears(model: nn.Module, modules: dict[str, nn.Linear], method: str, sparsity: float,
                  pattern: str, forward_loop: Callable[[nn.Module], None] | None, block_size: int = 128,
                  damp: float = 0.01, one_group: bool = False) -> dict[str, Any]:
    """Prune the named Linears in place (zeros in the weights); returns per-module details. `one_group`: the
    modules are one block's (a layer-sequential unit), observed in one pass and pruned together."""
    nm = check_pattern(modules, pattern)
    target = nm[1] - nm[0] if nm else None
    share = (target / nm[1]) if nm else sparsity
    calibrated = method in ("wanda", "sparsegpt")
    if calibrated and forward_loop is None:
        raise ConfigError(f"prune method {method} needs a 'calibration' data section")
    order = groups_in_order(list(modules)) if calibrated and not one_group else [list(modules)]
    for group in order:
        stats: dict[str, Any] = {}
        if calibrated:
            stats = {n: (ColumnNorm if method == "wanda" else Hessian)(modules[n].in_features) for n in group}
            observe_inputs(model, {n: modules[n] for n in group}, forward_loop,
                           lambda n, x, stats=stats: stats[n].update(x))
        for name in group:
            lin = modules[name]
            w = lin.weight
            if method == "sparsegpt":
                lin.weight.copy_(sparsegpt_prune(w, stats.pop(name).value(), share, nm, block_size, damp))
                continue
            score = w.detach().abs().float()
            if method == "wanda":
                score = score * torch.sqrt(stats[name].sq / max(stats[name].rows, 1)).float().reshape(1, -1)
            mask = nm_mask(score, *nm) if nm else unstructured_mask(score, share, per_row=method == "wanda")
            lin.weight.masked_fill_(mask.to(w.device), 0.0)
    details: dict[str, Any] = {}
    for name, lin in modules.items():
        w = lin.weight.detach()
        details[name] = {"sparsity": round(float((w == 0).sum()) / w.numel(), 6),
                         **({"nm_valid": nm_valid(w, *nm)} if nm else {})}
    return details
