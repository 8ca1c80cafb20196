"""GPTQ rounding (int8 per channel/tensor, int4 per group): each rounding error is compensated by the
columns not yet rounded.

Frantar et al. 2022 (IST-DASLab/gptq): with H = 2 X^T X over the layer's calibration inputs, round
the weight column by column; the error of column i, divided by the Cholesky factor of H^-1, is spread
over columns i+1.. in proportion to how the inputs correlate. Blocks of `block_size` columns are
updated lazily. Scales (and zero points) stay the round-to-nearest ones of the original weight
("static groups"), so the grid and the exported graph are unchanged; only which grid point each
weight takes differs.
"""

from __future__ import annotations

import torch

from compress.errors import ConfigError
from compress.observe import Hessian


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | Hessian, scale: torch.Tensor, qmax: int,
                  block_size: int = 128, damp: float = 0.01, qmin: int | None = None,
                  zero: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """int8 codes [out, in] on the grid of `scale`, rounded with error compensation.

    `scale` is (out,) / (1,) for one scale per row / tensor, or [out, groups] with `group_size` columns per
    group (int4); `zero` ([out, groups], optional) shifts codes as compressed-tensors does: w = (q - z) * s.
    Codes are clamped to [qmin, qmax] (qmin defaults to -qmax). A `Hessian` is taken from (its last reader
    damps and factors the tensor itself, so no copy of a 7B down_proj's 0.5 GB is made); a tensor is copied.
    """
    h = hessian.take() if isinstance(hessian, Hessian) else hessian.clone()
    del hessian
    w = weight.detach().float().clone()
    rows, cols = w.shape
    qmin = -qmax if qmin is None else qmin
    dead = torch.diag(h) == 0
    w[:, dead] = 0.0
    with torch.inference_mode(h.is_inference()):  # a sum made in inference mode is changed in it
        h[dead, dead] = 1.0
        h.diagonal().add_(damp * torch.diag(h).mean())  # h += damp * mean * I, without an [in, in] identity
    try:  # one step at a time, each input freed as soon as the next is made (a 7B down_proj's is ~0.5 GB)
        hinv = torch.linalg.cholesky(h)
        del h
        hinv = torch.cholesky_inverse(hinv)
        hinv = torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ConfigError(f"GPTQ: the calibration Hessian is not positive definite (raise gptq.damp): {exc}") from exc
    s = scale.float().reshape(rows if scale.numel() > 1 else 1, -1).expand(rows, -1)
    z = torch.zeros_like(s) if zero is None else zero.float().reshape(rows, -1)
    group = group_size or cols
    q = torch.zeros(w.shape, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = (i1 + i) // group
            sc, zc = s[:, g : g + 1], z[:, g : g + 1]
            col = w1[:, i : i + 1]
            qcol = torch.round(col / sc + zc).clamp(qmin, qmax)
            q[:, i1 + i : i1 + i + 1] = qcol
            err = (col - (qcol - zc) * sc) / hinv1[i, i]
            w1[:, i:] -= err @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q
