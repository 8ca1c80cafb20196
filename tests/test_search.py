"""`vlm-compress search`: the search block's validation, points applied to recipes, and real searches on local
Ray (started by the code) over the bundled model — a trial's worker SIGKILLed mid-stage and retried, the driver
SIGKILLed and `--resume`d, the winner's best.yaml reproducing its numbers through `vlm-compress run`. The
two-node loopback cluster test is `-m cluster`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from compress.errors import RecipeError
from compress.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "calibration" / "shapes-vqa"

BASE = f"""\
name: s
model: {{source: "zoo:shapes-vqa"}}
calibration: {{source: {DATA / 'calib'}, num_samples: 64, batch_size: 64}}
evaluation: {{source: {DATA / 'eval'}, num_samples: 100, batch_size: 50, max_new_tokens: 8}}
stages:
  - type: prune
    name: prune
    method: wanda
    sparsity: 0.3
    targets: {{components: [language]}}
    gate: {{min_retention: 0.97}}
  - type: quantize
    name: quant
    scheme: int8
    targets: {{components: [language]}}
    activations: {{calibration: minmax}}
    gate: {{min_retention: 0.97}}
"""

# 2 sparsities x 3 quantize variants: 0.7 fails the prune gate (the quantize stage never runs), the third
# variant selects no module (the trial's own error: recorded, not retried), int4 is the smallest that passes.
SEARCH = """\
search:
  space:
    stages.prune.sparsity: [0.3, 0.7]
    stages.quant:
      - {scheme: int8}
      - {scheme: int4, activations: null, int4: {group_size: 32}}
      - {targets: {include: ["*nomatch*"]}}
  max_concurrent: 2
"""


def _recipe(tmp_path: Path, search: str = SEARCH, base: str = BASE) -> Path:
    p = tmp_path / "search.yaml"
    p.write_text(base + textwrap.dedent(search))
    return p


def _error(tmp_path: Path, search: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, search))
    return str(e.value)


def test_the_search_block_is_checked_against_the_recipe_with_file_and_line(tmp_path: Path) -> None:
    line = BASE.count("\n") + 1  # the `search:` line
    msg = _error(tmp_path, "search:\n  space:\n    stages.prnue.sparsity: [0.3]\n")
    assert msg.startswith(f"{tmp_path / 'search.yaml'}:{line + 2}: search.space:") and "no stage named ['prnue']" in msg
    assert "['prune', 'quant']" in msg
    msg = _error(tmp_path, "search:\n  space:\n    evaluation.batch_size: [10, 20]\n")
    assert f":{line + 2}: search.space" in msg and "measured once and shared" in msg
    msg = _error(tmp_path, "search:\n  space:\n    stages.quant.keep_float: [{budget: 0.05}]\n    "
                           "stages.quant.scheme: [int8, int4]\n")
    assert f":{line}: search.space: the point" in msg and '"stages.quant.scheme": "int4"' in msg
    assert "weight-only" in msg
    msg = _error(tmp_path, "search:\n  space:\n    stages.prune.sparsity: {min: 0.1, max: 0.5}\n")
    assert "algorithm grid needs a step on every range: stages.prune.sparsity" in msg
    msg = _error(tmp_path, "search:\n  algorithm: optuna\n  space:\n    stages.prune.sparsity: {min: 0.1, max: 0.5}\n")
    assert "algorithm optuna needs max_trials" in msg
    msg = _error(tmp_path, "search:\n  max_trials: 3\n  space:\n    stages.prune.sparsity: [0.1, 0.2]\n"
                           "    stages.quant.scheme: [int8, int4]\n")
    assert "the grid has 4 points, above max_trials (3)" in msg


def test_points_are_applied_as_plain_recipes(tmp_path: Path) -> None:
    from compress.search.space import absolute_sources, apply, axes, decode, grid_points

    present = "    stages.prune.present: [true, false]\n  max_concurrent"
    loaded = load_recipe(_recipe(tmp_path, SEARCH.replace("  max_concurrent", present)))
    data = yaml.safe_load(loaded.text)
    ax = axes(loaded.recipe.search)
    points = [decode(ax, p) for p in grid_points(ax)]
    assert len(points) == 12
    int4_without_prune = next(p for p in points if p["stages.prune.present"] is False
                              and p["stages.quant"].get("scheme") == "int4")
    out = apply(data, int4_without_prune)
    assert "search" not in out and [s["name"] for s in out["stages"]] == ["quant"]
    assert out["stages"][0]["scheme"] == "int4" and "activations" not in out["stages"][0]  # null removes it
    assert out["stages"][0]["targets"] == {"components": ["language"]}  # a merge keeps what the choice omits
    rel = absolute_sources({"evaluation": {"source": "../x"}, "model": {"source": "zoo:shapes-vqa"}},
                           ROOT / "recipes")
    assert rel["evaluation"]["source"] == "../x"  # not a path that exists there: left alone
    rel = absolute_sources({"evaluation": {"source": "../calibration/shapes-vqa/eval"}}, ROOT / "recipes")
    assert rel["evaluation"]["source"] == str(DATA / "eval")


def test_search_cli_refuses_bad_invocations_without_writing(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(BASE)
    out = tmp_path / "out"
    for args, expected in (([str(plain)], "no 'search' block"),
                           ([str(_recipe(tmp_path)), "--resume"], "holds no search to resume"),
                           ([str(_recipe(tmp_path)), "--max-concurrent", "0"], "--max-concurrent must be at least 1"),
                           ([str(_recipe(tmp_path)), "--max-trials", "4"],
                            "the grid has 6 points, above --max-trials 4")):
        p = subprocess.run([sys.executable, "-m", "compress.cli", "search", *args, "--out", str(out)],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert p.returncode != 0 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not out.exists()


def test_a_search_whose_trials_need_a_gpu_is_refused_where_ray_has_none(tmp_path: Path) -> None:
    export = ("  - type: export\n    name: onnx\n    format: onnx\n    providers: [CUDAExecutionProvider]\n"
              "    gate: {min_retention: 0.5}\n")
    recipe = _recipe(tmp_path, base=BASE + export)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "compress.cli", "search", str(recipe), "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "each trial needs 1 GPU(s) (a stage scores on a GPU execution provider) and the Ray cluster has 0" \
        in p.stderr
    assert not out.exists()


def _trials(out: Path) -> dict[str, dict]:
    return {r["trial"]: r for r in json.loads((out / "trials.json").read_text())["trials"]}


def _kill_first_worker_in(out: Path, stage: str, killed: list[dict], stop: threading.Event) -> None:
    """SIGKILL the worker of the first (passing) trial seen working on `stage` (its run folder's work dir
    exists)."""
    while not stop.is_set():
        for work in sorted(out.glob(f"trials/*/run/.work/{stage}")):
            if "nomatch" in (work.parents[2] / "recipe.yaml").read_text():  # that trial fails on its own
                continue
            info = json.loads((work.parents[2] / "worker.json").read_text())
            os.kill(info["pid"], signal.SIGKILL)
            killed.append({"trial": work.parents[2].name, **info})
            return
        time.sleep(0.05)


def test_search_on_local_ray_retries_a_killed_worker_and_names_the_smallest_passing_artifact(tmp_path: Path) -> None:
    from compress.pipeline import run
    from compress.search.driver import search

    out = tmp_path / "search"
    killed: list[dict] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker_in, args=(out, "quant", killed, stop), daemon=True)
    killer.start()
    try:
        summary = search(_recipe(tmp_path), out)
    finally:
        stop.set()
    trials = _trials(out)
    assert len(trials) == 6
    by_point = {(t["point"]["stages.prune.sparsity"], json.dumps(t["point"]["stages.quant"])): t
                for t in trials.values()}
    int8, int4, nomatch = (json.dumps(c) for c in load_recipe(_recipe(tmp_path)).recipe.search.space["stages.quant"])
    for q in (int8, int4, nomatch):  # 70% sparsity fails the prune gate; the next stage never ran
        t = by_point[(0.7, q)]
        assert t["status"] == "gate_failed" and t["failed_stage"] == "prune" and t["size_bytes"] is None
        assert [s["name"] for s in t["stages"]] == ["prune"]
    # Trials that begin alike share their prefix: each sparsity's prune stage ran at most twice (two trials at
    # once), the others adopted its outcome — a failed gate included.
    for sparsity in (0.3, 0.7):
        reused = [t["stages"][0]["reused"] for (s, _), t in by_point.items() if s == sparsity]
        assert 1 <= sum(reused) <= 2, reused
    reusing = next(t for t in by_point.values() if t["stages"][0]["reused"])
    assert "- not run here: the outcome" in (out / "trials" / reusing["trial"] / "run" / "report.md").read_text()
    err = by_point[(0.3, nomatch)]
    assert err["status"] == "error" and "no Linear modules selected" in err["message"] and err["attempts"] == 1
    assert by_point[(0.3, int8)]["status"] == by_point[(0.3, int4)]["status"] == "passed"
    assert by_point[(0.3, int4)]["size_bytes"] < by_point[(0.3, int8)]["size_bytes"]
    assert summary["winner"] == by_point[(0.3, int4)]["trial"]
    # The killed trial was retried in a new worker and resumed its run folder.
    assert len(killed) == 1
    retried = trials[killed[0]["trial"]]
    assert retried["attempts"] == 2 and retried["status"] == "passed"
    assert json.loads((out / "trials" / retried["trial"] / "worker.json").read_text())["pid"] != killed[0]["pid"]
    # The calibration inputs, built once (by the baseline run) and read by every trial.
    assert len(list(out.glob("calibration/*/batches.safetensors"))) == 1
    assert not any("calibration inputs" in log.read_text() for log in out.glob("trials/*/log.txt"))
    # One baseline, measured once, adopted by every trial that ran.
    assert json.loads((out / "baseline" / "manifest.json").read_text())["stages"] == []
    for t in trials.values():
        m = json.loads((out / "trials" / t["trial"] / "run" / "manifest.json").read_text())
        assert m["baseline"]["shared_from"] == str(out / "baseline")
    report = (out / "report.md").read_text()
    assert f"**Winner: {summary['winner']}**" in report and (out / "pareto.png").stat().st_size > 10_000
    assert (out / "best").resolve() == (out / "trials" / summary["winner"] / "run").resolve()
    # best.yaml is a plain recipe: `vlm-compress run` reproduces the winner's numbers exactly.
    best = run(out / "best.yaml", out=tmp_path / "best")
    winner = json.loads((out / "best" / "manifest.json").read_text())
    assert [s["metrics"] for s in best.manifest["stages"]] == [s["metrics"] for s in winner["stages"]]


def test_a_killed_driver_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    out = tmp_path / "search"
    small = SEARCH.replace("max_concurrent: 2", "max_concurrent: 1").replace("[0.3, 0.7]", "[0.3]")
    recipe = _recipe(tmp_path, small)  # 3 trials, one at a time
    cmd = [sys.executable, "-m", "compress.cli", "search", str(recipe), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("trials/*/result.json"))) < 1 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started (local Ray dies with it)
    driver.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    assert 1 <= len(finished) < 3
    p = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming the search" in p.stderr and "baseline: already measured" in p.stderr
    trials = _trials(out)
    assert len(trials) == 3
    for name, mtime in finished.items():  # reported again from result.json, not rerun
        assert (out / "trials" / name / "result.json").stat().st_mtime_ns == mtime
        assert trials[name]["attempts"] == 1


@pytest.mark.cluster
def test_a_two_node_loopback_cluster_gives_the_same_winner_and_table(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    recipe = _recipe(tmp_path)
    local = subprocess.run([sys.executable, "-m", "compress.cli", "search", str(recipe), "--out",
                            str(tmp_path / "local")], env=env, capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    cluster = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ray_cluster.py"))], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        p = subprocess.run([sys.executable, "-m", "compress.cli", "search", str(recipe), "--out",
                            str(tmp_path / "cluster"), "--address", address], env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"connected to the Ray cluster at {address}: 2 node(s), 2 CPUs" in p.stderr
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)
    a, b = _trials(tmp_path / "local"), _trials(tmp_path / "cluster")
    keys = ("point", "status", "size_bytes", "metrics", "retention", "failed_stage")
    assert {t: {k: r.get(k) for k in keys} for t, r in a.items()} == {t: {k: r.get(k) for k in keys}
                                                                       for t, r in b.items()}
    summary = json.loads((tmp_path / "cluster" / "trials.json").read_text())
    assert summary["winner"] == json.loads((tmp_path / "local" / "trials.json").read_text())["winner"]
    nodes = {json.loads(w.read_text())["ray_node"] for w in (tmp_path / "cluster").glob("trials/*/worker.json")}
    assert len(nodes) == 2  # trials ran on both nodes


def test_an_optuna_search_on_latency_measures_passing_trials_as_bench_does(tmp_path: Path) -> None:
    from compress.search.driver import search

    base = BASE.split("  - type: quantize")[0]  # the prune stage only
    recipe = _recipe(tmp_path, """\
search:
  algorithm: optuna
  max_trials: 3
  space:
    stages.prune.sparsity: {min: 0.1, max: 0.4}
    calibration.num_samples: {min: 16, max: 64, integer: true}
  objective: {minimize: e2e_ms, new_tokens: 4, repeats: 2}
""", base=base)
    summary = search(recipe, tmp_path / "out")
    trials = summary["trials"]
    assert len(trials) == 3 and len({json.dumps(t["point"]) for t in trials}) == 3
    for t in trials:
        assert 0.1 <= t["point"]["stages.prune.sparsity"] <= 0.4
        n = t["point"]["calibration.num_samples"]
        assert isinstance(n, int) and 16 <= n <= 64
        if t["status"] == "passed":  # measured in its own process, as bench does
            assert t["objective_value"] == t["bench"]["e2e_ms"] > 0 and t["bench"]["peak_rss_mb"] > 0
    passing = [t for t in trials if t["status"] == "passed"]
    assert summary["winner"] == min(passing, key=lambda t: t["objective_value"])["trial"]
    assert list((tmp_path / "out" / "tune").glob("searcher-state-*.pkl"))  # Optuna's study, for --resume
    assert "e2e_ms" in (tmp_path / "out" / "report.md").read_text()


def test_extra_constraints_judge_the_last_stage() -> None:
    from compress.search.config import SearchConfig
    from compress.search.trial import summarize

    manifest = {"status": "completed", "model": {"resolved": "/nonexistent"},
                "baseline": {"metrics": {"exact_match": 0.8, "token_agreement": 1.0, "logit_kl": 0.0}},
                "stages": [{"name": "q", "status": "completed", "checkpoint": None,
                            "metrics": {"exact_match": 0.78, "token_agreement": 0.95, "logit_kl": 0.02},
                            "answers": {"budget": 26, "truncated": 3}}]}
    cfg = {"space": {"stages.q.scheme": ["int8"]}}
    summary = summarize(manifest, Path("/nonexistent"), SearchConfig.model_validate(cfg))
    assert summary["status"] == "passed"
    assert summary["answers_truncated"] == 3 and summary["stages"][0]["answers_truncated"] == 3  # cut answers
    strict = SearchConfig.model_validate({**cfg, "min_retention": {"token_agreement": 0.96}, "max_kl": 0.01})
    r = summarize(manifest, Path("/nonexistent"), strict)
    assert r["status"] == "constraint_failed"
    assert r["message"] == "token_agreement retention 0.9500 < 0.96; logit_kl 0.0200 > 0.01"
    assert r["retention"]["exact_match"] == pytest.approx(0.975)
