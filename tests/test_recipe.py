"""Recipe loading: every malformed recipe names the field and the line, exits 2, writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml
from helpers import VALID, lost_fields, write

from compress.cli import main
from compress.config import StageConfig
from compress.errors import RecipeError
from compress.recipe import load_recipe, recipe_model
from compress.registry import _STAGES, StageSpec
from compress.stages.base import StageResult


def test_valid_recipe_loads_with_defaults(tmp_path):
    lr = load_recipe(write(tmp_path, VALID))
    r = lr.recipe
    assert r.stages[0].sparsity == 0.3
    assert r.stages[0].scope == "per_module"
    assert r.stages[0].gate.on_fail == "stop"
    assert r.model.trust_remote_code is False
    assert lr.resolved()["stages"][0]["gate"]["metric"] == "exact_match"


def test_hash_ignores_formatting(tmp_path):
    a = load_recipe(write(tmp_path, VALID)).sha256()
    b = load_recipe(write(tmp_path, VALID.replace("sparsity: 0.3", "sparsity:   0.30  # same"))).sha256()
    c = load_recipe(write(tmp_path, VALID.replace("sparsity: 0.3", "sparsity: 0.4"))).sha256()
    assert a == b != c


# (description, old text, new text, expected line, expected substrings)
BAD = [
    ("unknown top-level field", "output:\n  dir: runs/t\n", "output:\n  dir: runs/t\nmodle: x\n", 17,
     ["modle", "unknown field"]),
    ("missing model", "model:\n  source: zoo:shapes-vqa\n", "", 1, ["model", "required field is missing"]),
    ("empty model source", "source: zoo:shapes-vqa", "source: ''", 3, ["model.source", "at least 1"]),
    ("bad dtype", "source: zoo:shapes-vqa", "source: zoo:shapes-vqa\n  dtype: int4", 4, ["model.dtype", "int4"]),
    ("unknown stage type", "  - type: prune", "  - type: prnue", 8, ["stages[0]", "unknown stage type 'prnue'",
                                                                      "prune"]),
    ("stage without type", "  - type: prune\n    method", "  - method", 8, ["stages[0]", "needs a 'type'"]),
    ("sparsity out of range", "sparsity: 0.3", "sparsity: 1.5", 10, ["stages[0].sparsity", "less than 1"]),
    ("sparsity not a number", "sparsity: 0.3", "sparsity: lots", 10, ["stages[0].sparsity", "number"]),
    ("unknown method", "method: l1_unstructured", "method: l2", 9, ["stages[0].method", "l1_unstructured"]),
    ("unknown component", "components: [language]", "components: [audio]", 12,
     ["stages[0].targets.components[0]", "audio"]),
    ("missing targets", "    targets:\n      components: [language]\n", "", 8, ["stages[0].targets", "missing"]),
    ("missing gate", "    gate:\n      min_retention: 0.9\n", "", 8, ["stages[0].gate", "missing"]),
    ("gate without threshold", "min_retention: 0.9", "on_fail: warn", 14, ["stages[0].gate",
                                                                         "min_retention and/or max_kl"]),
    ("bad on_fail", "min_retention: 0.9", "min_retention: 0.9\n      on_fail: explode", 15,
     ["stages[0].gate.on_fail", "explode"]),
    ("retention above 1", "min_retention: 0.9", "min_retention: 1.5", 14, ["stages[0].gate.min_retention"]),
    ("misspelt stage field", "sparsity: 0.3", "sparsiti: 0.3", 10, ["stages[0].sparsiti", "unknown field"]),
    ("zero batch size", "  metrics: [exact_match, token_agreement, logit_kl]",
     "  metrics: [exact_match, token_agreement, logit_kl]\n  batch_size: 0", 7,
     ["evaluation.batch_size", "greater than or equal to 1"]),
    ("unknown metric", "metrics: [exact_match, token_agreement, logit_kl]", "metrics: [bleu]", 6,
     ["evaluation.metrics[0]", "bleu"]),
    ("kl below zero", "min_retention: 0.9", "max_kl: -1", 14, ["stages[0].gate.max_kl", "greater than or equal"]),
    ("empty stages", VALID[VALID.index("stages:"):VALID.index("output:")], "stages: []\n", 7,
     ["stages", "at least 1"]),
    ("bad output checkpoints", "dir: runs/t", "dir: runs/t\n  checkpoints: sometimes", 17,
     ["output.checkpoints", "sometimes"]),
    ("bad recipe name", "name: t", "name: my recipe", 1, ["name", "pattern"]),
    ("duplicate key", "sparsity: 0.3", "sparsity: 0.3\n    sparsity: 0.5", 11,
     ["stages[0].sparsity", "duplicate key", "line 10"]),
    ("invalid yaml", "sparsity: 0.3", "sparsity: [0.3", 11, ["not valid YAML"]),
    ("bad data format", "  source: ../calibration/shapes-vqa/eval", "  source: x\n  format: csv", 6,
     ["evaluation.format", "csv"]),
]


def test_max_kl_needs_logit_kl(tmp_path):
    text = VALID.replace("metrics: [exact_match, token_agreement, logit_kl]", "metrics: [exact_match]")
    text = text.replace("min_retention: 0.9", "max_kl: 0.1")
    with pytest.raises(RecipeError, match=r"recipe.yaml:14: stages\[0\].gate.max_kl: needs 'logit_kl'"):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(("what", "old", "new", "line", "needles"), BAD, ids=[b[0] for b in BAD])
def test_malformed_recipe(tmp_path, capsys, monkeypatch, what, old, new, line, needles):
    assert old in VALID, what
    path = write(tmp_path, VALID.replace(old, new, 1))
    monkeypatch.chdir(tmp_path)
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{path}:{line}:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # nothing written


def test_gate_metric_must_be_measured(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe.yaml:14: stages\[0\].gate.metric: 'exact_match' is not measured"):
        text = VALID.replace("metrics: [exact_match, token_agreement, logit_kl]", "metrics: [token_agreement]")
        load_recipe(write(tmp_path, text))


def test_duplicate_stage_names(tmp_path):
    stage = VALID[VALID.index("  - type: prune"):VALID.index("output:")]
    text = VALID.replace(stage, stage.replace("  - type: prune", "  - type: prune\n    name: p") * 2)
    with pytest.raises(RecipeError, match=r":16: stages\[1\].name: stage name 'p' is already used by stages\[0\]"):
        load_recipe(write(tmp_path, text))


def test_recipe_not_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe.yaml:1: the recipe must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_every_bundled_recipe_validates():
    """Each bundled recipe loads, and what it says is what runs: every field it writes is in the resolved
    recipe (the one the manifest records and the stages read) with the value written, stages in order."""
    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        written = yaml.safe_load(path.read_text())
        loaded = load_recipe(path)
        assert lost_fields(written, loaded.resolved()) == [], path.name
        assert [s.type for s in loaded.recipe.stages] == [s["type"] for s in written["stages"]], path.name


# ---- ordering rules -------------------------------------------------------------------------------


class _EngineConfig(StageConfig):
    """A stage that ends in an engine: nothing that edits weights may follow it."""

    type: Literal["engine_for_test"]

    def output_state(self, state: str) -> str:
        return "engine"


@pytest.fixture
def engine_stage():
    _STAGES["engine_for_test"] = StageSpec("engine_for_test", _EngineConfig, lambda m, c, x: StageResult(m))
    recipe_model.cache_clear()
    yield
    del _STAGES["engine_for_test"]
    recipe_model.cache_clear()


def test_ordering_rule_names_the_stage_and_line(tmp_path, engine_stage):
    stage = VALID[VALID.index("  - type: prune"):VALID.index("output:")]
    engine = "  - type: engine_for_test\n    gate: {min_retention: 0.9}\n"
    text = VALID.replace(stage, engine + stage)
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    msg = str(e.value)
    assert "recipe.yaml:10: stages[1]" in msg
    assert "'prune' stage cannot run after a 'engine_for_test' stage (model is engine)" in msg
    # The other order is fine.
    fine = load_recipe(write(tmp_path, VALID.replace(stage, stage + engine))).recipe
    assert [s.type for s in fine.stages] == ["prune", "engine_for_test"]


def test_every_registered_stage_has_a_bundled_recipe():
    """A stage type nobody ships a recipe for is a stage nobody ran end to end."""
    from compress.stages.catalog import stages

    used = {s.type for p in Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml")
            for s in load_recipe(p).recipe.stages}
    assert set(stages()) <= used, set(stages()) - used


# ---- JSON Schema and the generated field reference -----------------------------------------------------

ROOT = Path(__file__).parent.parent
SCHEMA_LINE = "# yaml-language-server: $schema=../docs/recipe.schema.json"
# YAML-level faults: the YAML parser rejects them before any schema sees a document.
NOT_SCHEMA_QUESTIONS = {"duplicate key", "invalid yaml"}


def _validator():
    import jsonschema

    from compress.schema import recipe_schema

    schema = recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_and_field_reference_are_current(capsys):
    from compress.schema import field_reference, schema_text

    assert (ROOT / "docs/recipe.schema.json").read_text() == schema_text(), \
        "docs/recipe.schema.json drifted: run python -m compress.schema"
    assert field_reference() in (ROOT / "docs/recipes.md").read_text(), \
        "docs/recipes.md field reference drifted: run python -m compress.schema"
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == schema_text()
    assert main(["schema", "--markdown"]) == 0
    assert capsys.readouterr().out == field_reference()


def test_schema_accepts_every_bundled_recipe_and_they_point_editors_at_it():
    validator = _validator()
    for path in sorted(ROOT.joinpath("recipes").glob("*.yaml")):
        text = path.read_text()
        assert text.splitlines()[0] == SCHEMA_LINE, path
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(text))]
        assert not errors, (path, errors)


@pytest.mark.parametrize(("what", "old", "new", "line", "needles"),
                         [b for b in BAD if b[0] not in NOT_SCHEMA_QUESTIONS],
                         ids=[b[0] for b in BAD if b[0] not in NOT_SCHEMA_QUESTIONS])
def test_schema_rejects_what_the_loader_rejects(tmp_path, what, old, new, line, needles):
    text = VALID.replace(old, new, 1)
    with pytest.raises(RecipeError):
        load_recipe(write(tmp_path, text))
    assert list(_validator().iter_errors(yaml.safe_load(text))), f"schema accepts: {what}"


@pytest.mark.parametrize("stage", [
    {"scheme": "int8", "activations": {"calibration": "minmax", "dynamic": "per_token"}},
    {"scheme": "int8", "activations": {"percentile": 99.0}},
    {"scheme": "int8", "activations": {"dynamic": "per_channel"}},
    {"scheme": "int2", "activations": "none"},
    {"scheme": "int8", "activations": "none", "weights": {"granularity": "per_group"}},
    {"scheme": "nf4", "nf4": {"blocksize": 48}},
], ids=["both-activation-modes", "no-activation-mode", "bad-dynamic", "unknown-scheme", "bad-granularity",
        "bad-blocksize"])
def test_schema_rejects_malformed_quantize_stages(tmp_path, stage):
    doc = yaml.safe_load(VALID)
    doc["stages"] = [{"type": "quantize", "targets": {"components": ["language"]}, "gate": {"min_retention": 0.9},
                      **stage}]
    doc["calibration"] = {"source": "../calibration/shapes-vqa/calib"}
    with pytest.raises(RecipeError):
        load_recipe(write(tmp_path, yaml.safe_dump(doc)))
    assert list(_validator().iter_errors(doc))
