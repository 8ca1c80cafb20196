"""Activation observers: turn calibration batches into one static, symmetric per-tensor INT8 scale.

Every observer answers the same question, "which |x| should map to the int8 code 127?" (the clipping
threshold), and `scale() = threshold / 127`. They differ in how they trade clipping error against
rounding error:

- `minmax`: the running max of |x|; never clips, so a single outlier coarsens the whole grid.
- `percentile`: the p-th percentile of |x| (e.g. 99.99); clips the rarest values.
- `entropy`: TensorRT-style calibration; the threshold whose 128-level quantized histogram has the
  smallest KL divergence from the original (clipped) histogram.
- `mse`: the threshold minimising the expected squared quantization error (rounding + clipping).

The histogram observers never keep samples: they accumulate a fixed-size histogram of |x| over
[0, range]. When a batch exceeds the range, the range is doubled as often as needed and 2^k old bins
are merged into one, so re-binning is exact (old bin edges are new bin edges) and costs O(bins).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from compress.errors import ConfigError

QMAX = 127  # symmetric int8: the threshold maps to +-127
OBSERVERS = ("minmax", "percentile", "entropy", "mse")


class Observer:
    """Base class: feed it activation tensors with `update`, read the threshold and scale at the end."""

    kind: str = ""

    def __init__(self) -> None:
        self.batches = 0  # number of update() calls that carried data
        self.values = 0  # number of elements seen

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.kind} observer: activation contains inf/nan")
        self._update(x.abs().float().reshape(-1))
        self.batches += 1
        self.values += x.numel()

    def _update(self, a: torch.Tensor) -> None:
        raise NotImplementedError

    def threshold(self) -> float:
        """The |x| that maps to 127. Raises if nothing was observed (calibration never reached us)."""
        if self.batches == 0:
            raise RuntimeError(f"{self.kind} observer saw no data: calibration did not reach this module")
        return float(self._threshold())

    def _threshold(self) -> float:
        raise NotImplementedError

    def scale(self) -> float:
        """Static per-tensor scale. An all-zero input quantizes exactly with any scale; 1/127 is used."""
        t = self.threshold()
        return (t if t > 0 else 1.0) / QMAX

    @property
    def amax(self) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"observer": self.kind, "batches": self.batches, "values": self.values}


class MinMaxObserver(Observer):
    kind = "minmax"

    def __init__(self) -> None:
        super().__init__()
        self._amax = 0.0

    def _update(self, a: torch.Tensor) -> None:
        self._amax = max(self._amax, float(a.max()))

    def _threshold(self) -> float:
        return self._amax

    @property
    def amax(self) -> float:
        return self._amax


class HistogramObserver(Observer):
    """Accumulates a histogram of |x| with `bins` bins over [0, range]; subclasses pick the threshold."""

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 2 * (QMAX + 1) or bins & (bins - 1):
            raise ConfigError(f"histogram bins must be a power of two >= {2 * (QMAX + 1)}, got {bins}")
        self.bins = bins
        self.range = 0.0  # upper edge of the last bin; 0 until a non-zero value is seen
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self._zeros = 0  # zeros seen before the range was known
        self._amax = 0.0

    def _update(self, a: torch.Tensor) -> None:
        amax = float(a.max())
        self._amax = max(self._amax, amax)
        if self.range == 0.0:
            if amax == 0.0:
                self._zeros += a.numel()
                return
            self.range = amax
            self.hist[0] += self._zeros
            self._zeros = 0
        elif amax > self.range:
            self._grow(amax)
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.range).double()

    def _grow(self, amax: float) -> None:
        # Double the range k times (exact in floating point) and merge groups of 2^k bins.
        k = max(1, math.ceil(math.log2(amax / self.range)))
        while self.range * 2.0**k < amax:  # guard against log2 rounding
            k += 1
        factor = 2**k
        merged = torch.zeros_like(self.hist)
        if factor >= self.bins:
            merged[0] = self.hist.sum()
        else:
            merged[: self.bins // factor] = self.hist.view(-1, factor).sum(dim=1)
        self.hist = merged
        self.range *= float(factor)

    @property
    def amax(self) -> float:
        return self._amax

    @property
    def bin_width(self) -> float:
        return self.range / self.bins

    def _counts(self) -> np.ndarray:
        return self.hist.numpy().copy()

    def _threshold(self) -> float:
        if self.range == 0.0:
            return 0.0
        return min(self._select(self._counts()), self._amax)

    def _select(self, counts: np.ndarray) -> float:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    kind = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def _select(self, counts: np.ndarray) -> float:
        cdf = np.cumsum(counts)
        target = cdf[-1] * self.percentile / 100.0
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, len(counts) - 1)
        before = cdf[i - 1] if i > 0 else 0.0
        inside = (target - before) / counts[i] if counts[i] > 0 else 1.0
        return (i + float(np.clip(inside, 0.0, 1.0))) * self.bin_width  # linear within the bin

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"percentile": self.percentile, "bins": self.bins}


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (TensorRT / pytorch-quantization `_compute_amax_entropy`).

    For every candidate cut i (in bins, from 128 to `bins`): P = hist[:i] with the clipped tail added
    to its last bin; Q = hist[:i] merged into 128 levels and spread back evenly over each level's
    non-empty bins. The cut with the smallest KL(P || Q) wins (the largest, on ties). As upstream, the
    zero bin is set to bin 1's count so exact zeros (ReLU, padding) do not dominate the divergence.
    """

    kind = "entropy"
    levels = QMAX + 1  # 128 quantization levels on the |x| side

    def __init__(self, bins: int = 2048, stride: int = 1) -> None:
        super().__init__(bins)
        if stride < 1:
            raise ConfigError(f"entropy stride must be >= 1, got {stride}")
        self.stride = stride

    def _select(self, counts: np.ndarray) -> float:
        hist = counts.copy()
        hist[0] = hist[1]
        nonzero = (hist > 0).astype(np.float64)
        tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
        best_i, best_kl = self.bins, math.inf
        for i in range(self.levels, self.bins + 1, self.stride):
            p = hist[:i].copy()
            p[-1] += tail[i]
            # Level j covers bins [ceil(j*i/128), ceil((j+1)*i/128)), as upstream's linspace + digitize.
            starts = (np.arange(self.levels) * i + self.levels - 1) // self.levels
            sums = np.add.reduceat(hist[:i], starts)
            filled = np.add.reduceat(nonzero[:i], starts)
            level = np.repeat(np.arange(self.levels), np.diff(np.append(starts, i)))
            q = np.where(nonzero[:i] > 0, (sums / np.maximum(filled, 1.0))[level], 0.0)
            kl = _kl(p, q)
            if kl <= best_kl:
                best_i, best_kl = i, kl
        return best_i * self.bin_width

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"bins": self.bins, "stride": self.stride}


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return math.inf
    p, q = p / ps, q / qs
    mask = p > 0
    if np.any(q[mask] <= 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class MSEObserver(HistogramObserver):
    """The bin edge t minimising E[(x - q_t(x))^2], with x uniform inside each histogram bin.

    q_t rounds to the grid t/127 * k and saturates at t. Within a bin both error terms have closed
    forms: rounding error integrates a periodic sawtooth (G below), clipping error is (x - t)^2.
    """

    kind = "mse"

    def __init__(self, bins: int = 2048, stride: int = 1) -> None:
        super().__init__(bins)
        if stride < 1:
            raise ConfigError(f"mse stride must be >= 1, got {stride}")
        self.stride = stride

    def _select(self, counts: np.ndarray) -> float:
        # Candidates are bin edges, so a bin is either wholly kept (rounding error) or wholly clipped.
        w = self.bin_width
        edges = np.arange(self.bins + 1) * w
        density = counts / w
        lo, hi = edges[:-1], edges[1:]
        idx = np.arange(self.stride, self.bins + 1, self.stride)
        t = idx * w
        # Clipping error of bins >= c at threshold t: (1/3) sum density*((hi-t)^3 - (lo-t)^3), a cubic in t
        # whose coefficients are suffix sums.
        def suffix(v: np.ndarray) -> np.ndarray:
            return np.concatenate([np.cumsum(v[::-1])[::-1], [0.0]])

        s3, s2, s1 = (suffix(density * (hi**k - lo**k)) for k in (3, 2, 1))
        clipping = (s3[idx] - 3 * t * s2[idx] + 3 * t**2 * s1[idx]) / 3.0
        # Rounding error of bins < c: exact sawtooth integrals, evaluated in torch (it is the O(bins^2) part).
        edges_t, density_t = torch.from_numpy(edges), torch.from_numpy(density)
        rounding = np.empty_like(t)
        for part in np.array_split(np.arange(len(idx)), max(1, len(idx) // 256)):  # bounded memory
            top = int(idx[part[-1]])  # only bins below the largest candidate of this chunk matter
            delta = torch.from_numpy(t[part] / QMAX)[:, None]
            per_bin = torch.diff(_sawtooth_integral(edges_t[None, : top + 1], delta), dim=1)  # (C, top)
            per_bin.masked_fill_(torch.arange(top)[None, :] >= torch.from_numpy(idx[part])[:, None], 0.0)
            rounding[part] = (per_bin @ density_t[:top]).numpy()
        return float(t[int(np.argmin(rounding + clipping))])

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"bins": self.bins, "stride": self.stride}


def _sawtooth_integral(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """G(x) = integral over [0, x] of (u - delta*round(u/delta))^2 du = delta^3 * (k/12 + r^3/3).

    With u = x/delta, k = round(u) and r = u - k: each whole grid step contributes delta^3/12.
    """
    u = x / delta
    k = torch.round(u)
    return delta**3 * (k / 12.0 + (u - k) ** 3 / 3.0)


def make_observer(kind: str, **params: Any) -> Observer:
    """An observer by name. Params: percentile (percentile), bins (histogram kinds), stride (entropy, mse)."""
    classes: dict[str, type[Observer]] = {
        "minmax": MinMaxObserver,
        "percentile": PercentileObserver,
        "entropy": EntropyObserver,
        "mse": MSEObserver,
    }
    if kind not in classes:
        raise ConfigError(f"unknown observer '{kind}'; available: {', '.join(OBSERVERS)}")
    try:
        return classes[kind](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for the {kind} observer: {exc}") from exc
