"""The human report: a Markdown page and a retention plot, built only from the manifest."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from compress.artifacts import RunDir


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_rows(manifest: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(stage, status, metric, value, retention, pass) rows, baseline first."""
    rows = []
    for metric, value in manifest.get("baseline", {}).get("metrics", {}).items():
        rows.append(("baseline", "done", metric, _fmt(value), "1.0000" if metric != "logit_kl" else "–", "–"))
    for rec in manifest.get("stages", []):
        checks = {c["metric"]: c for c in rec.get("checks", [])}
        for metric, value in rec.get("metrics", {}).items():
            c = checks.get(metric)
            ret = c["retention"] if c else None
            if ret is None and metric != "logit_kl":
                base = manifest["baseline"]["metrics"].get(metric)
                ret = value / base if base else None
            rows.append((rec["name"], rec["status"], metric, _fmt(value), _fmt(ret),
                         ("yes" if c["passed"] else "NO") if c else "–"))
        for metric, c in checks.items():  # a stage's own checks (export parity) beside the accuracy ones
            if metric not in rec.get("metrics", {}):
                rows.append((rec["name"], rec["status"], metric, _fmt(c["value"]), "–", "yes" if c["passed"] else "NO"))
        if not rec.get("metrics") and not checks:
            rows.append((rec["name"], rec["status"], "–", "–", "–", "–"))
    return rows


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def summary(manifest: dict[str, Any]) -> str:
    """The table `vlm-compress run` prints when a run ends."""
    return table(summary_rows(manifest), ("stage", "status", "metric", "value", "retention", "pass"))


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes, without the Software tag (the file does not change with matplotlib)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def retention_plot(manifest: dict[str, Any]) -> bytes:
    """Retention of each measured metric after every stage; threshold lines where gated."""
    stages = manifest.get("stages", [])
    names = ["baseline", *[r["name"] for r in stages]]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names)), 3.6), dpi=110)
    base = manifest.get("baseline", {}).get("metrics", {})
    for metric in (m for m in base if m != "logit_kl"):
        ys = [1.0] + [
            (r["metrics"][metric] / base[metric] if base[metric] else None) if metric in r.get("metrics", {})
            else None for r in stages
        ]
        xs = [i for i, y in enumerate(ys) if y is not None]
        ax.plot(xs, [ys[i] for i in xs], marker="o", label=metric)
    for i, r in enumerate(stages, start=1):
        for c in r.get("checks", []):
            if c["retention"] is not None:
                ax.hlines(c["threshold"], i - 0.3, i + 0.3, colors="red", linestyles="dashed")
        if r["status"] in ("failed", "rolled_back", "error"):
            ax.annotate(r["status"], (i, 0.0), xycoords=("data", "axes fraction"), ha="center",
                        va="bottom", color="red", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("retention vs baseline")
    ax.set_title(f"{manifest.get('recipe', {}).get('name', '')}: accuracy retention per stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def sensitivity_plot(rec: dict[str, Any]) -> bytes | None:
    """Per-layer INT8 output error of a quantize stage (log scale), layers kept in float in red."""
    modules = rec.get("details", {}).get("modules", {}) if rec.get("type") == "quantize" else {}
    errs = {n: d["output_rel_error"] for n, d in modules.items() if d.get("output_rel_error") is not None}
    if not errs:
        return None
    names = list(errs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(names)), 3.6), dpi=110)
    colors = ["red" if modules[n].get("kept_float") else "tab:blue" for n in names]
    ax.bar(range(len(names)), [max(errs[n], 1e-12) for n in names], color=colors)
    ax.set_yscale("log")
    ax.set_xticks([])
    ax.set_xlabel(f"{len(names)} layers in model order (red: kept in float)")
    ax.set_ylabel("INT8 relative output error")
    ax.set_title(f"{rec['name']}: per-layer INT8 sensitivity")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _peak(rec: dict[str, Any]) -> str:
    """The stage's peak RSS, marked where the OS gave only the process's lifetime peak."""
    if "peak_rss_mb" not in rec:
        return ""
    return f", peak RSS {rec['peak_rss_mb']:.0f} MiB{'' if rec.get('peak_rss_exact') else ' (process lifetime)'}"


def _plan_lines(plan: dict[str, Any] | None) -> list[str]:
    """Where the model lived, and which metrics the baseline did not compute because of it (each stage's
    section says its own)."""
    if not plan:
        return []
    lines = [f"- memory: {plan['mode']} (model {plan['model_gb']} GB, budget {plan['budget_gb']} GB from "
             f"{plan['budget_from']})"]
    lines += [f"- not computed for the baseline: {k} ({why})" for k, why in plan.get("metrics_not_computed",
                                                                                       {}).items()]
    return lines


def write_report(run: RunDir) -> None:
    m = run.manifest
    run.write("retention.png", retention_plot(m))
    base = m.get("baseline", {})
    lines = [
        f"# Compression report: {m['recipe']['name']}",
        "",
        f"- status: **{m.get('status')}**",
        f"- model: `{m['model']['source']}` ({m['model'].get('model_type')}, "
        f"{m['model'].get('parameters', 0):,} parameters)",
        f"- evaluation: `{m['data']['evaluation']['source']}` ({m['data']['evaluation']['records']} records)"
        f"; baseline{_peak(base) or ' scored'}",
        f"- tool: vlm-compress {m['tool']['version']} (git {m['tool'].get('git_sha') or 'n/a'}), seed {m['seed']}",
        "- before deploying: `vlm-compress verify RUN_DIR` re-hashes every file against `manifest.json`, loads each "
        "checkpoint and checks each ONNX graph",
        *_plan_lines(m.get("plan")),
        "",
        "## Accuracy after every stage",
        "",
        "![retention per stage](retention.png)",
        "",
        "| stage | status | metric | value | retention | pass |",
        "|---|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in summary_rows(m)],
        "",
    ]
    per_type = {"baseline": base.get("per_type", {})}
    per_type.update({r["name"]: r.get("per_type", {}) for r in m.get("stages", []) if r.get("per_type")})
    kinds = sorted({k for v in per_type.values() for k in v})
    if len(kinds) > 1:
        lines += ["## Exact match per question type", "",
                  "| stage | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines += [f"| {name} | " + " | ".join(_fmt(v.get(k), 3) for k in kinds) + " |"
                  for name, v in per_type.items()]
        lines.append("")
    lines += ["## Stages", ""]
    for r in m.get("stages", []):
        lines.append(f"### {r['name']} ({r['type']}): {r['status']}, {r.get('wall_s', 0):.1f} s{_peak(r)}")
        if r.get("reused_from"):
            lines.append(f"- not run here: the outcome (files, metrics, checks) of a run that began alike, reused from "
                         f"{r['reused_from']}; its time and peak RSS are that run's")
        lines += [f"- not computed: {k} ({why})" for k, why in r.get("metrics_not_computed", {}).items()]
        if cut := r.get("answers", {}).get("truncated"):
            lines.append(f"- WARNING: {cut} answers used all {r['answers']['budget']} new tokens without their end "
                         "token (scored as cut)")
        for c in r.get("checks", []):
            ret = f"retention {c['retention']:.4f}" if c["retention"] is not None else ""
            lines.append(f"- check {c['metric']}: value {c['value']:.4f} {ret} threshold {c['threshold']} "
                         f"-> {'pass' if c['passed'] else 'FAIL'}")
        details = r.get("details", {})
        for k, v in details.items():
            if not isinstance(v, dict):
                lines.append(f"- {k}: {v}")
        seq = details.get("sequential")
        if isinstance(seq, dict):
            lines.append(f"- calibrated layer by layer: {seq['blocks']} blocks of {', '.join(seq['sequences'])}, "
                         f"inputs from the {seq['layer_inputs']} previous blocks, median {seq['block_s_median']} s "
                         f"per block, activations in memory at most {seq['peak_in_memory_bytes'] / 2**20:.1f} MiB "
                         f"(budget {seq['budget_bytes'] / 2**20:.0f} MiB), {seq['spilled_bytes'] / 2**20:.1f} MiB "
                         "spilled to disk")
        if r.get("checkpoint"):
            lines.append(f"- checkpoint: `{r['checkpoint']}`")
        plot = sensitivity_plot(r)
        if plot is not None:
            run.write(f"sensitivity-{r['name']}.png", plot)
            worst = sorted(details["modules"].items(), key=lambda kv: -(kv[1].get("output_rel_error") or 0))[:5]
            lines += ["", f"![per-layer INT8 sensitivity](sensitivity-{r['name']}.png)", "",
                      "Most sensitive layers: " + ", ".join(
                          f"`{n}` {d['output_rel_error']:.2e}{' (kept float)' if d.get('kept_float') else ''}"
                          for n, d in worst), ""]
        if r.get("message"):
            lines.append(f"- {'**error**: ' if r['status'] == 'error' else ''}{r['message']}")
        if r.get("partial"):
            lines.append(f"- partial files kept for diagnosis: `{r['partial']}` (re-run with --resume to retry)")
        if r.get("traceback"):
            lines.append(f"- traceback: `{r['traceback']}`")
        lines.append("")
    run.write("report.md", "\n".join(lines))
