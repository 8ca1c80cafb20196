"""The decode floor: a batch-1 decode step reads every decoder weight once (and the KV cache so far), so
it cannot beat (bytes read per token) / (memory bandwidth). Both halves are measured, not assumed:

- bandwidth: a STREAM-style copy of arrays far larger than the caches, with the same threads the
  runtimes use (torch's intra-op pool), best of several passes; copy moves 2 bytes per byte copied
  (read + write), and that is what it reports, as STREAM does. Taken more than once through a benchmark
  and the fastest kept (`best_bandwidth`): on a shared host the memory bus's share moves by half between
  minutes (29-50 GB/s on the 2-core host of docs/benchmarks.md) while the decode kernels' throughput
  does not, so one copy taken at a slow minute would set a floor the hardware beats;
- bytes per token: the decoder graph's initializers (what a step reads; the embedding is one row and
  lives in its own graph) or a PyTorch model's language-model and lm_head parameters, plus the KV cache
  at the middle of the answer.

A decode step at 1.0x the floor would be pure weight streaming; the speed target is 1.5x.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

STREAM_BYTES = 512 * 2**20  # per array: far beyond any L3 here


def memory_bandwidth(array_bytes: int = STREAM_BYTES, passes: int = 5) -> dict[str, Any]:
    """STREAM-style copy bandwidth in GB/s (10^9 bytes), best of `passes`, with torch's thread count."""
    n = array_bytes // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)  # touch every page before timing
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return {"copy_gb_s": round(2 * a.numel() * 4 / best / 1e9, 2), "array_mib": array_bytes // 2**20,
            "threads": torch.get_num_threads(), "passes": passes}


def best_bandwidth(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of several `memory_bandwidth` samples (the strictest floor), with every sample's GB/s."""
    best = max(samples, key=lambda s: s["copy_gb_s"])
    return {**best, "samples_gb_s": [s["copy_gb_s"] for s in samples]}


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of a graph's initializers, external data included (what one run of it reads)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=True)
    return sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


def torch_decoder_bytes(model: torch.nn.Module, adapter: Any) -> int:
    """Bytes of the language model's and lm_head's parameters and buffers, less the input embedding table."""
    parts = [adapter.component(model, "language"), adapter.component(model, "lm_head")]
    embed = adapter.component(model, "language").get_input_embeddings().weight
    seen: set[int] = set()
    total = 0
    for part in parts:
        for t in [*part.parameters(), *part.buffers()]:
            if id(t) in seen or t is embed:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    if getattr(adapter.component(model, "lm_head"), "weight", None) is embed:  # tied: the head reads it all
        total += embed.numel() * embed.element_size()
    return total


def kv_bytes(facts: dict[str, Any], tokens: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    """KV cache bytes a step reads at `tokens` positions (cached layers only)."""
    layers = facts.get("cache_layers") or facts["num_layers"]
    layers = len(layers) if isinstance(layers, list) else int(layers)
    return 2 * layers * batch * facts["num_kv_heads"] * facts["head_dim"] * tokens * dtype_bytes


def floor_ms(bytes_per_token: int, bandwidth: dict[str, Any]) -> float:
    return bytes_per_token / (bandwidth["copy_gb_s"] * 1e9) * 1000
