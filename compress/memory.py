"""The process's memory as a result: peak resident set size per stage, and what the machine has free.

Linux keeps a high-water mark of the resident set (VmHWM in /proc/self/status); writing 5 to
/proc/self/clear_refs resets it to the current RSS, so each stage's peak is measured exactly rather than
sampled. Where either file is missing the peak falls back to getrusage's lifetime maximum, and the record
says which.
"""

from __future__ import annotations

import functools
import resource
import sys
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Start a new peak-RSS window; False where the OS cannot (the peak is then the process's lifetime one)."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last `reset_peak()` (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def available_bytes() -> int:
    """Memory the machine can give this process now (MemAvailable; without /proc, physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def activation_budget(max_memory_gb: float | None, reserve: int = 0) -> int:
    """Bytes of calibration activations a stage may keep in memory: a third of what the budget (else the
    memory available now) leaves beside the process as it stands and `reserve` (a streamed run's block, its
    copies and the shard being filled); the rest is for the algorithms' statistics and the forward passes'
    own temporaries."""
    total = int(max_memory_gb * 2**30) if max_memory_gb is not None else available_bytes() + rss_bytes()
    return max(0, (total - rss_bytes() - reserve) // 3)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_freed_memory() -> bool:
    """Make freed large tensors go back to the OS at once (glibc): its mmap threshold otherwise grows with
    every large free, after which a streamed run's dropped blocks stay in the heap and the resident set
    grows by a block per step. False where the C library is not glibc (nothing to do, or nothing possible)."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20))


def trim() -> None:
    """Hand free heap pages back to the OS (glibc's malloc_trim), after a streamed block is dropped."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class PeakWindow:
    """`with PeakWindow() as w: ...` then `w.record()`: the window's peak RSS for a manifest entry."""

    def __enter__(self) -> PeakWindow:
        self.exact = reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.peak = peak_rss_bytes()

    def record(self) -> dict[str, float | bool]:
        return {"peak_rss_mb": round(self.peak / 2**20, 1), "peak_rss_exact": self.exact}
