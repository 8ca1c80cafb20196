"""A benchmark of a whole run folder: every artifact measured in its own process (`compress.bench.measure`),
the decode floor, ratios vs the source, and RUN_DIR/bench/bench.{json,md,png} (see the package docstring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.artifacts import atomic_write
from compress.bench.timing import machine
from compress.errors import CompressError
from compress.runs import Artifact, artifacts, read_manifest

# Metrics every measured artifact has; lower is better except decode_tokens_per_s.
METRICS = ("vision_ms_per_image", "ttft_ms", "decode_tokens_per_s", "decode_ms_per_step", "e2e_ms",
           "peak_rss_mb", "net_rss_mb")


def _row(art: Artifact, made: dict[str, Any]) -> dict[str, Any]:
    return {"name": art.name, "kind": art.kind, "path": art.path, "bytes": art.bytes,
            "compress_peak_rss_mb": made.get(art.name)}


def _spawn(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "compress.bench.measure", json.dumps(args)], capture_output=True,
                          text=True, env=env, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise CompressError(f"exit {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def measure_artifact(run_dir: Path, path: Path, kind: str, batch: int = 1, new_tokens: int = 16, warmup: int = 1,
                     repeats: int = 3) -> dict[str, Any]:
    """One artifact of a run measured as `bench` measures it (its own process, the run's evaluation inputs)."""
    m = read_manifest(run_dir)
    return _spawn({"run_dir": str(Path(run_dir).resolve()), "source": m["model"]["resolved"],
                   "model_type": m["model"]["model_type"], "batch": batch, "new_tokens": new_tokens,
                   "warmup": warmup, "repeats": repeats, "providers": None, "kind": kind, "path": str(path)})


def bench(run_dir: str | Path, batch: int = 1, new_tokens: int = 16, warmup: int = 2, repeats: int = 5,
          providers: list[str] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every artifact of a run; write RUN_DIR/bench/bench.{json,md,png}; return the result."""
    if new_tokens < 2:
        raise CompressError("--new-tokens must be at least 2 (decode speed needs tokens after the first)")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise CompressError("--batch and --repeats must be at least 1, --warmup at least 0")
    run_dir = Path(run_dir).resolve()
    arts = artifacts(run_dir)
    m = read_manifest(run_dir)
    common = {"run_dir": str(run_dir), "source": arts[0].path, "model_type": m["model"]["model_type"],
              "batch": batch, "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats, "providers": providers}
    log = log or (lambda msg: None)
    log("reference process (imports + inputs, no model)")
    try:
        reference = _spawn({**common, "kind": "reference", "path": ""})
    except CompressError as e:
        raise CompressError(f"bench: the reference process failed ({e})") from None
    from compress.bench.floor import best_bandwidth, floor_ms, memory_bandwidth

    samples = [memory_bandwidth()]  # one before the artifacts, one after each measured: the floor takes the fastest
    log(f"memory bandwidth: {samples[0]['copy_gb_s']} GB/s (STREAM-style copy)")
    # What making each artifact cost in memory: the run's recorded peak RSS of its stage (the baseline's for
    # the source), measured by the pipeline while it compressed; not a number bench measures itself.
    made = {rec["name"]: rec.get("peak_rss_mb") for rec in m.get("stages", [])}
    made["source"] = m.get("baseline", {}).get("peak_rss_mb")
    rows: list[dict[str, Any]] = []
    for art in arts:
        log(f"{art.name} ({art.kind})")
        try:
            metrics = _spawn({**common, "kind": art.kind, "path": art.path})
        except CompressError as e:
            if art.name == "source":
                raise CompressError(f"bench: measuring the source model failed ({e})") from None
            rows.append({**_row(art, made), "error": str(e)})
            continue
        metrics["net_rss_mb"] = metrics["peak_rss_mb"] - reference["peak_rss_mb"]
        rows.append({**_row(art, made), **metrics})
        samples.append(memory_bandwidth())
    bandwidth = best_bandwidth(samples)
    log(f"memory bandwidth: {bandwidth['samples_gb_s']} GB/s; the floor divides by the fastest")
    base = rows[0]
    for row in rows:
        if "error" not in row:
            row["decode_floor_ms"] = floor_ms(row["decode_weight_bytes"] + row["decode_kv_bytes"], bandwidth)
            row["decode_x_floor"] = row["decode_ms_per_step"] / row["decode_floor_ms"]
            row["ratios"] = {k: row[k] / base[k] for k in (*METRICS, "bytes") if base.get(k) and row.get(k) is not None}
    result = {"run": str(run_dir),
              "settings": {"batch": batch, "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats,
                           "providers": providers or ["CPUExecutionProvider"], "ignore_eos": True,
                           "statistic": "median"},
              "machine": machine(), "memory_bandwidth": bandwidth, "reference_rss_mb": reference["peak_rss_mb"],
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "artifacts": rows}
    out = run_dir / "bench"
    atomic_write(out / "bench.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "bench.md", markdown(result))
    atomic_write(out / "bench.png", chart(result))
    return result


def _cell(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    if row.get(key) is None:  # onnxruntime-genai: no vision timing of its own
        return "–"
    ratio = row["ratios"].get(key)
    return f"{row[key] * scale:{fmt}}" + (f" ({ratio:.2f}×)" if ratio is not None and row["name"] != "source" else "")


def _made(row: dict[str, Any]) -> str:
    value = row.get("compress_peak_rss_mb")
    return "–" if value is None else f"{value:.0f}"


def markdown(result: dict[str, Any]) -> str:
    """The table `vlm-compress bench` prints and writes to bench.md (ratios vs the source in brackets)."""
    s, mach = result["settings"], result["machine"]
    lines = [f"# Benchmark: {result['run']}", "",
             f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), "
             f"onnxruntime {mach['onnxruntime']} ({', '.join(s['providers'])}). Batch {s['batch']}, "
             f"{s['new_tokens']} new tokens per row (EOS ignored), median of {s['repeats']} after "
             f"{s['warmup']} warm-up call(s). Ratios vs the source model in brackets (decode: >1 is faster, "
             f"others: <1 is better). Net RSS = peak RSS - {result['reference_rss_mb']:.0f} MB of a process "
             f"that imports the same libraries and loads the inputs but no model. Decode floor: bytes a step "
             f"reads / {result['memory_bandwidth']['copy_gb_s']} GB/s (STREAM-style copy on this machine, the "
             f"fastest of {len(result['memory_bandwidth'].get('samples_gb_s', [0]))} taken during the run); "
             "preprocessing (processor) is part of e2e and shown apart. Compress RSS: the peak RSS the run "
             "recorded while making the artifact (its stage; the baseline for the source).", "",
             "| artifact | kind | size MB | vision ms/img | TTFT ms | decode tok/s | decode × floor | preprocess ms "
             "| e2e ms | peak RSS MB | net RSS MB | compress RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["artifacts"]:
        if "error" in r:
            err = r["error"].replace("\n", " ").replace("|", "/")[:160]
            lines.append(f"| {r['name']} | {r['kind']} | {r['bytes'] / 1e6:.2f} | failed: {err} |" + " |" * 7
                         + f" {_made(r)} |")
            continue
        lines.append(f"| {r['name']} | {r['kind']} | {_cell(r, 'bytes', '.2f', 1e-6)} | "
                     f"{_cell(r, 'vision_ms_per_image', '.2f')} | {_cell(r, 'ttft_ms', '.2f')} | "
                     f"{_cell(r, 'decode_tokens_per_s', '.1f')} | {r['decode_x_floor']:.2f} | "
                     f"{r['preprocess_ms']:.2f} | {_cell(r, 'e2e_ms', '.2f')} | "
                     f"{_cell(r, 'peak_rss_mb', '.0f')} | {_cell(r, 'net_rss_mb', '.0f')} | {_made(r)} |")
    return "\n".join(lines) + "\n"


CHART = (("vision_ms_per_image", "vision"), ("ttft_ms", "TTFT"), ("decode_ms_per_step", "decode ms/step"),
         ("e2e_ms", "end-to-end"), ("net_rss_mb", "net RSS"), ("bytes", "size on disk"))


def chart(result: dict[str, Any]) -> bytes:
    """Grouped bars of lower-is-better ratios vs the source, one group per artifact."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["artifacts"] if "ratios" in r]
    names = [r["name"] if r["kind"] != "genai" else f"{r['name']} (genai)" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names)), 3.8), dpi=110)
    width = 0.8 / len(CHART)
    for j, (key, label) in enumerate(CHART):
        ax.bar([i + j * width for i in range(len(names))], [r["ratios"].get(key, 0.0) for r in rows], width,
               label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_ylabel("ratio vs source (lower is better)")
    ax.set_title(f"batch {result['settings']['batch']}, {result['settings']['new_tokens']} new tokens, "
                 f"{result['machine']['cpu']}", fontsize=8)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


