"""Per-layer bit allocation under a size budget (`scheme: mixed`): int4, int8 or float for each Linear.

Each selected Linear's cost at every allowed format is measured on its own calibration inputs — the relative
output error its round-to-nearest version adds (`sensitivity.layer_error`, the measure `keep_float` ranks
layers by) and the bytes a deployment stores for it. The allocation starts every layer at its smallest format
and repeatedly takes the upgrade that removes the most error per extra byte while the total stays within the
budget (greedy on the convex hull of each layer's error-vs-bytes points, the classic knapsack relaxation
Model-Optimizer's AutoQuantize and HAWQ-style allocators also solve). The errors are local, so the
allocation costs one calibration pass and a few matmuls per layer; the stage's gate scores the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from compress.errors import ConfigError
from compress.quant.int4 import Int4Linear, Int4Quant
from compress.quant.int8 import Int8Linear, WeightQuant, quantize_weight
from compress.quant.linears import calibrate, int8_weight_bytes
from compress.quant.sensitivity import layer_error
from compress.quant.smoothquant import selected_linears

FORMATS = ("int4", "int8", "float")
BITS = {"int4": 4, "int8": 8, "float": 32}


def measure(root: nn.Module, names: list[str], loop: Callable[[nn.Module], None], int4: Int4Quant,
            int8: WeightQuant, options: tuple[str, ...], samples: int, seed: int) -> dict[str, dict[str, Any]]:
    """{layer: {format: {"error", "bytes"}}} for the named Linears of `root`, over one run of `loop`."""
    mods = selected_linears(root, names, "bit allocation")
    stats = calibrate(root, mods, None, loop, None, samples, seed)  # input rows only
    out: dict[str, dict[str, Any]] = {}
    for n, m in mods.items():
        x = stats[n].samples.rows()
        costs: dict[str, Any] = {}
        if "int4" in options:
            q4 = Int4Linear.from_linear(m, int4.group_size, int4.symmetric)
            costs["int4"] = {"error": layer_error(m, q4, x), "bytes": q4.packed_bytes()}
        if "int8" in options:
            q, scale = quantize_weight(m.weight, int8.granularity, int8.qmax)
            q8 = Int8Linear.from_linear(m, int8.granularity, None, None, quantized=(q, scale))
            costs["int8"] = {"error": layer_error(m, q8, x), "bytes": int8_weight_bytes(q8)}
        if "float" in options:
            costs["float"] = {"error": 0.0, "bytes": m.weight.numel() * m.weight.element_size()}
        out[n] = {f: {"error": round(c["error"], 8), "bytes": c["bytes"]} for f, c in costs.items()}
    return out


def allocate(costs: dict[str, dict[str, Any]], budget: int) -> dict[str, str]:
    """{layer: format} whose total bytes stay within `budget`, least summed error first (see the docstring)."""
    choice = {n: min(c, key=lambda f: (c[f]["bytes"], c[f]["error"])) for n, c in costs.items()}
    total = sum(costs[n][f]["bytes"] for n, f in choice.items())
    if total > budget:
        raise ConfigError(f"bits budget: even the smallest format of every layer takes {total:,} bytes, above the "
                          f"budget of {budget:,}; raise bits.effective_bits / bits.max_mb")
    while True:
        best: tuple[float, str, str, int] | None = None
        for n, c in costs.items():
            cur = c[choice[n]]
            for f, o in c.items():
                extra, gain = o["bytes"] - cur["bytes"], cur["error"] - o["error"]
                if extra > 0 and gain > 0 and total + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, f, extra)
        if best is None:
            return choice
        _, n, f, extra = best
        choice[n], total = f, total + extra


def summary(costs: dict[str, dict[str, Any]], choice: dict[str, str], params: dict[str, int]) -> dict[str, Any]:
    """What the manifest and the search report show: the map, counts, bytes and effective bits."""
    total = sum(costs[n][f]["bytes"] for n, f in choice.items())
    n_params = sum(params.values())
    return {"map": dict(choice), "counts": {f: sum(v == f for v in choice.values()) for f in FORMATS
                                            if any(v == f for v in choice.values())},
            "bytes": total, "effective_bits": round(8 * total / n_params, 4) if n_params else None,
            "predicted_error": round(sum(costs[n][f]["error"] for n, f in choice.items()), 6),
            "costs": {n: costs[n] for n in choice}}
