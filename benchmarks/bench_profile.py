"""Where the time goes: the top aten ops of one HF generate, and onnxruntime's profiler over one generate of
an export (per graph, per op type, and the wall time outside onnxruntime). Used by bench_realistic.py.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from compress.export.files import read_meta
from compress.runtime.ort_runner import OrtRunner


def hf_generate(model: Any, inputs: dict[str, Any], n: int) -> None:
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert out.shape[1] - inputs["input_ids"].shape[1] == n, out.shape


def torch_profile(model, inputs: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Top aten ops by self CPU time over one HF generate (where eager fp32 spends its time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hf_generate(model, inputs, n)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:8]]


def ort_profile(path: Path, inputs: dict[str, Any], n: int, workdir: Path) -> dict[str, Any]:
    """One warm-up generate, then one profiled generate: ms per graph (decoder split prefill / decode),
    ms per op type, and the wall time spent outside onnxruntime's `run`."""
    import onnxruntime as ort

    meta = read_meta(path)
    sessions = {}
    for name, file in meta["graphs"].items():
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(workdir / f"prof-{path.name}-{name}")
        sessions[name] = ort.InferenceSession(str(path / file), sess_options=opts, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=list(meta.get("session", {}).get(
                                                  "disabled_optimizers", [])))
    runner = OrtRunner(sessions, meta)
    runner.generate(inputs, n, ignore_eos=True)
    t0 = time.perf_counter()
    runner.generate(inputs, n, ignore_eos=True)
    wall_ms = (time.perf_counter() - t0) * 1000
    graphs: dict[str, float] = {}
    ops: dict[str, float] = defaultdict(float)
    inside = 0.0
    for name, sess in sessions.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        measured = runs[len(runs) // 2:]  # the warm-up generate made the first half of the runs
        start = measured[0]["ts"]
        inside += sum(e["dur"] for e in measured) / 1000
        if name == "decoder" and "prefill" in sessions:  # the prompt ran in prefill.onnx
            graphs["decoder decode (all steps)"] = sum(e["dur"] for e in measured) / 1000
        elif name == "decoder":
            graphs["decoder prefill"] = measured[0]["dur"] / 1000
            graphs["decoder decode (all steps)"] = sum(e["dur"] for e in measured[1:]) / 1000
        else:
            graphs[name] = sum(e["dur"] for e in measured) / 1000
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                ops[f"{name}:{e['args'].get('op_name', '?')}"] += e["dur"] / 1000
    top = sorted(ops.items(), key=lambda kv: kv[1], reverse=True)[:12]
    return {"wall_ms": wall_ms, "inside_onnxruntime_ms": inside, "outside_onnxruntime_ms": wall_ms - inside,
            "graphs_ms": graphs, "top_ops_ms": dict(top)}
