"""The one timer every benchmark shares (warm-up excluded, median of repeats), and the machine it ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from compress.host import cpu_features


def machine() -> dict[str, Any]:
    """Where the numbers came from: CPU model, cores, library versions, default thread counts."""
    import onnxruntime
    import torch

    cpu = cpu_features()["model"] or platform.processor() or ""
    return {"cpu": cpu, "cpu_flags": cpu_features()["flags"], "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime_threads": "default (intra_op_num_threads=0: one per physical core)",
            "onnxruntime_providers": onnxruntime.get_available_providers()}


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds per call for `repeats` calls after `warmup` untimed ones (warm-up pays for lazy init)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median milliseconds per call, warm-up excluded: the one timer bench and the benchmarks share."""
    return statistics.median(timed(fn, warmup, repeats)) * 1000


def med_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000
