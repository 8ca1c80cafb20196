"""`scheme: mixed` (`bits: auto`): int4 / int8 / float per Linear under a size budget — the allocation rule, the
recipe's refusals, and a real stage on the outlier model whose checkpoint reloads with both formats in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.errors import ConfigError, RecipeError
from compress.quant.allocate import allocate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "calibration" / "shapes-vqa"


def test_allocation_buys_the_most_error_per_byte_within_the_budget() -> None:
    costs = {
        "a": {"int4": {"error": 0.10, "bytes": 100}, "int8": {"error": 0.01, "bytes": 200}},   # 0.09 / 100
        "b": {"int4": {"error": 0.02, "bytes": 100}, "int8": {"error": 0.001, "bytes": 200}},  # 0.019 / 100
        "c": {"int4": {"error": 0.30, "bytes": 400}, "int8": {"error": 0.02, "bytes": 800}},   # 0.28 / 400
    }
    assert allocate(costs, 600) == {"a": "int4", "b": "int4", "c": "int4"}
    assert allocate(costs, 700) == {"a": "int8", "b": "int4", "c": "int4"}  # best ratio that fits
    assert allocate(costs, 1100) == {"a": "int8", "b": "int4", "c": "int8"}
    assert allocate(costs, 10_000) == {"a": "int8", "b": "int8", "c": "int8"}
    with pytest.raises(ConfigError, match="even the smallest format"):
        allocate(costs, 500)


def _recipe(tmp_path: Path, quant: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"""\
name: m
model: {{source: "zoo:shapes-vqa-outliers"}}
calibration: {{source: {DATA / 'calib'}, num_samples: 64, batch_size: 64}}
evaluation: {{source: {DATA / 'eval'}, num_samples: 100, batch_size: 100, max_new_tokens: 8}}
stages:
  - type: quantize
    name: mixed
    targets: {{components: [language]}}
    gate: {{metric: token_agreement, min_retention: 0.9}}
{quant}""")
    return p


@pytest.mark.parametrize("quant, expected", [
    ("    scheme: mixed\n", "scheme mixed needs 'bits'"),
    ("    scheme: int4\n    bits: {effective_bits: 5}\n", "'bits' needs scheme mixed"),
    ("    scheme: mixed\n    bits: {effective_bits: 5, max_mb: 1}\n", "exactly one of 'effective_bits' or 'max_mb'"),
    ("    scheme: mixed\n    bits: {effective_bits: 5}\n    int4: {rounding: awq}\n", "rtn or gptq"),
    ("    scheme: mixed\n    bits: {effective_bits: 5}\n    keep_float: {budget: 0.05}\n", "weight-only"),
])
def test_mixed_recipes_are_checked_at_load(tmp_path: Path, quant: str, expected: str) -> None:
    from compress.recipe import load_recipe

    with pytest.raises(RecipeError, match=expected):
        load_recipe(_recipe(tmp_path, quant))


def test_a_mixed_stage_fits_its_budget_and_reloads_with_both_formats(tmp_path: Path) -> None:
    from compress.arch import adapter_for_source
    from compress.checkpoint import load_checkpoint
    from compress.pipeline import run
    from compress.quant.int4 import Int4Linear
    from compress.quant.int8 import Int8Linear

    quant = "    scheme: mixed\n    int4: {group_size: 128}\n    bits: {effective_bits: 5.0}\n"
    result = run(_recipe(tmp_path, quant), out=tmp_path / "run")
    assert result.ok, result.manifest["stages"]
    (stage,) = result.manifest["stages"]
    alloc = stage["details"]["bit_allocation"]
    assert alloc["bytes"] <= alloc["budget_bytes"] and 4.25 < alloc["effective_bits"] <= 5.0
    assert set(alloc["counts"]) == {"int4", "int8"}
    chosen, costs = alloc["map"], alloc["costs"]
    int8 = {n for n, f in chosen.items() if f == "int8"}
    assert {n for n, d in stage["details"]["modules"].items() if d["bits"] == 8} == int8

    def extra(n: str) -> int:
        return costs[n]["int8"]["bytes"] - costs[n]["int4"]["bytes"]

    def ratio(n: str) -> float:  # error removed per extra byte
        return (costs[n]["int4"]["error"] - costs[n]["int8"]["error"]) / extra(n)

    # An int4 layer whose upgrade still fits was never worth more per byte than any upgrade taken.
    left = alloc["budget_bytes"] - alloc["bytes"]
    fits = [n for n in set(chosen) - int8 if extra(n) <= left]
    assert all(ratio(n) <= min(ratio(m) for m in int8) for n in fits)
    model, _ = load_checkpoint(tmp_path / "run" / stage["checkpoint"],
                               adapter_for_source(result.manifest["model"]["resolved"]))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, Int4Linear | Int8Linear)}
    assert {n for n, k in kinds.items() if k is Int8Linear} == int8
    assert {n for n, k in kinds.items() if k is Int4Linear} == set(chosen) - int8
    config = json.loads((tmp_path / "run" / stage["checkpoint"] / "config.json").read_text())
    assert len(config["quantization_config"]["config_groups"]) == 2  # one per format
