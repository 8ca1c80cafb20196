"""What a search leaves beside its trials: `trials.json` (every trial's result), `report.md` (the winner, the
Pareto front, a table of every trial), `pareto.png` (size vs retention, failed trials marked, the front drawn),
`best.yaml` (a plain recipe that reproduces the winner with `vlm-compress run`) and `best` (a link to the
winner's run folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compress.artifacts import atomic_write
from compress.search.config import SearchConfig

PASSED = "passed"


def score_metric(results: list[dict[str, Any]], gated: str) -> str:
    """The retention the plot and front use: the metric the recipe's last gate judges, where measured."""
    keys = {k for r in results for k in (r.get("retention") or {})}
    return gated if gated in keys else "exact_match" if "exact_match" in keys else "token_agreement"


def _passing(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r["status"] == PASSED and r.get("objective_value") is not None]


def _ret(r: dict[str, Any], metric: str) -> float:
    return (r.get("retention") or {}).get(metric) or 0.0


def pareto(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Passing trials no other passing trial beats on both the objective (lower) and retention (higher)."""
    ok = _passing(results)
    front = [r for r in ok if not any(
        o["objective_value"] <= r["objective_value"] and _ret(o, metric) >= _ret(r, metric)
        and (o["objective_value"] < r["objective_value"] or _ret(o, metric) > _ret(r, metric)) for o in ok)]
    return sorted(front, key=lambda r: r["objective_value"])


def winner(results: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    return min(_passing(results), key=lambda r: (r["objective_value"], -_ret(r, metric), r["trial"]), default=None)


def write_report(out: Path, loaded: Any, cfg: SearchConfig, results: list[dict[str, Any]],
                 baseline: dict[str, Any], wall_s: float) -> dict[str, Any]:
    results = sorted(results, key=lambda r: r["trial"])
    metric = score_metric(results, loaded.recipe.stages[-1].gate.metric)
    best = winner(results, metric)
    summary = {"recipe": str(loaded.path), "algorithm": cfg.algorithm, "objective": cfg.objective.minimize,
               "score_metric": metric, "baseline": baseline.get("metrics"), "wall_s": round(wall_s, 1),
               "winner": best["trial"] if best else None,
               "pareto": [r["trial"] for r in pareto(results, metric)], "trials": results}
    atomic_write(out / "trials.json", json.dumps(summary, indent=2, default=str))
    if best is not None:
        run = out / "trials" / best["trial"]
        text = (run / "recipe.yaml").read_text().split("\n")
        body = "\n".join(line for line in text if not line.startswith("#"))
        atomic_write(out / "best.yaml", f"# The winner of the search in {out} (trial {best['trial']}): the smallest "
                     f"artifact whose gates all pass.\n#   vlm-compress run {out / 'best.yaml'} --out runs/best\n"
                     + body)
        link = out / "best"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(run / "run", out), link)
    _plot(out / "pareto.png", results, metric, best, cfg.objective.minimize)
    atomic_write(out / "report.md", _markdown(summary, cfg, best, results, metric))
    return summary


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.3f}" if n else "-"


def _markdown(s: dict[str, Any], cfg: SearchConfig, best: dict[str, Any] | None, results: list[dict[str, Any]],
              metric: str) -> str:
    lines = [f"# Search: {Path(s['recipe']).name}", "",
             f"{len(results)} trials ({cfg.algorithm}), objective: smallest {cfg.objective.minimize} among trials "
             f"whose every gate passes; {sum(r['status'] == PASSED for r in results)} passed. "
             f"Baseline (measured once, shared): {s['baseline']}. Wall time {s['wall_s']} s.", ""]
    if best:
        o = cfg.objective.minimize
        measured = "" if o == "size" else f"{o} {best['objective_value']:.1f}, "
        lines += [f"**Winner: {best['trial']}** — {measured}{_mib(best['size_bytes'])} MiB, {metric} retention "
                  f"{best['retention'].get(metric, 0):.4f}; point `{json.dumps(best['point'], default=str)}`. "
                  "Reproduce: `vlm-compress run best.yaml --out runs/best`; its run folder: `best/`.", ""]
        for stage, alloc in (best.get("bit_allocation") or {}).items():
            counts = ", ".join(f"{n} {f}" for f, n in alloc["counts"].items())
            lines += [f"Bit allocation of stage `{stage}` ({alloc['effective_bits']} effective bits, budget "
                      f"{alloc['budget_bytes']:,} bytes): {counts}.", "",
                      "| layer | format |", "|---|---|",
                      *(f"| {n} | {f} |" for n, f in alloc["map"].items()), ""]
    else:
        lines += ["**No trial passed every gate**: relax the space or the gates.", ""]
    lines += [f"Pareto front (size vs {metric} retention): {', '.join(s['pareto']) or 'empty'}. "
              "Plot: pareto.png.", "",
              "| trial | point | status | size MiB | " + " | ".join(f"{k} ret." for k in _ret_keys(results))
              + f" | logit_kl | {cfg.objective.minimize if cfg.objective.minimize != 'size' else 'wall s'} | note |",
              "|---|---|---|---|" + "---|" * len(_ret_keys(results)) + "---|---|---|"]
    for r in results:
        rets = " | ".join(f"{r['retention'][k]:.4f}" if (r.get("retention") or {}).get(k) is not None else "-"
                          for k in _ret_keys(results))
        kl = (r.get("metrics") or {}).get("logit_kl")
        note = (r.get("message") or "").replace("|", "/")[:120]
        if r.get("attempts", 1) > 1:
            note = f"attempt {r['attempts']} (worker died before); {note}"
        lines.append(f"| {r['trial']} | `{json.dumps(r['point'], default=str)}` | {r['status']} | "
                     f"{_mib(r.get('size_bytes'))} | {rets} | {'-' if kl is None else f'{kl:.5f}'} | "
                     f"{_last(r, cfg.objective.minimize)} | {note} |")
    return "\n".join(lines) + "\n"


def _last(r: dict[str, Any], minimize: str) -> str:
    """The table's next-to-last column: the measured objective (latency searches), else the trial's wall time."""
    v = r.get("objective_value") if minimize != "size" else r.get("wall_s")
    return "-" if v is None else f"{v:.1f}"


def _ret_keys(results: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in results for k in (r.get("retention") or {})})


def _plot(path: Path, results: list[dict[str, Any]], metric: str, best: dict[str, Any] | None,
          minimize: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def size(r: dict[str, Any]) -> float | None:  # a failed trial without an artifact sits at the source's size
        if minimize != "size":  # latency: measured for passing trials only
            return r.get("objective_value")
        b = r.get("size_bytes") or r.get("source_bytes")
        return b / 2**20 if b else None

    ok = [r for r in results if r["status"] == PASSED and size(r)]
    bad = [r for r in results if r["status"] != PASSED and size(r) and (r.get("retention") or {}).get(metric)]
    for pts, style in ((ok, dict(marker="o", color="tab:blue", label="passed")),
                       (bad, dict(marker="x", color="tab:red", label="failed (at the source size if it kept no "
                                                                          "artifact)"))):
        if pts:
            ax.scatter([size(r) for r in pts], [r["retention"][metric] for r in pts], **style)
    src = next((r["source_bytes"] for r in results if r.get("source_bytes")), None)
    if src and minimize == "size":
        ax.scatter([src / 2**20], [1.0], marker="s", color="gray", label="source model (baseline)")
    front = pareto(results, metric)
    if front:
        ax.step([size(r) for r in front], [r["retention"][metric] for r in front], where="post",
                color="tab:blue", alpha=0.5, label="Pareto front")
    if best:
        ax.scatter([size(best)], [best["retention"][metric]], s=160, facecolors="none",
                   edgecolors="black", label=f"winner {best['trial']}")
    ax.set_xlabel("final artifact size (MiB)" if minimize == "size" else f"{minimize} (bench, median)")
    ax.set_ylabel(f"{metric} retention vs baseline")
    ax.set_title("search: every trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
