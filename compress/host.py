"""Facts about the machine that change numeric results: recorded wherever a result depends on them.

Integer GEMM kernels differ by CPU (compress.export.portable); the manifest and every export stage
record what the parity checks and gates ran on.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "asimd")


@functools.cache
def cpu_features() -> dict[str, Any]:
    """What the integer kernels depend on: architecture, model name and the relevant feature flags."""
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = set(value.split())
            elif key == "model name" and not model:
                model = value.strip()
    except OSError:
        pass
    found = [f for f in CPU_FLAGS if f in flags]
    machine = platform.machine().lower()
    exact_u8s8 = machine in ("aarch64", "arm64") or bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    return {"machine": machine, "model": model, "flags": found, "u8s8_exact": exact_u8s8}
