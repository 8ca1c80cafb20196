"""Pruning methods × patterns on every family's tiny model, the n:m checks, and the recipe rules."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_with_batch
from torch import nn

from compress.arch import select_modules
from compress.config import Targets
from compress.errors import ConfigError
from compress.prune.sparsity import nm_mask, nm_valid, prune_linears, sparsegpt_prune, unstructured_mask
from compress.zoo.tiny import FAMILIES

LANGUAGE = Targets(components=["language"])


def test_masks_on_known_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1, 9.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, False, True, False]]
    assert unstructured_mask(scores, 0.25, per_row=True).tolist() == [
        [False, False, False, False, True, False, True, False]]
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert nm_valid(w, 2, 4) and not nm_valid(torch.ones(1, 8), 2, 4)
    with pytest.raises(ConfigError, match="divisible by 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_sparsegpt_compensates_where_magnitude_cannot():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ (torch.eye(64) + 0.4 * torch.randn(64, 64, generator=g))
    h = 2 * x.T @ x / x.shape[0]
    ref = x @ w.T

    def err(pruned: torch.Tensor) -> float:
        return float(((x @ pruned.T - ref) ** 2).mean())

    for nm in (None, (2, 4)):
        sparse = sparsegpt_prune(w, h, 0.5, nm, block_size=32)
        magnitude = w.masked_fill(nm_mask(w.abs(), *nm) if nm else unstructured_mask(w.abs(), 0.5, False), 0.0)
        assert float((sparse == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        assert nm is None or nm_valid(sparse, *nm)
        assert err(sparse) < 0.7 * err(magnitude), nm


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_and_pattern_on_every_family(family):
    errors: dict[tuple[str, str], float] = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern in ("unstructured", "2:4", "4:8"):
            model, adapter, batch, loop = tiny_with_batch(family)
            with torch.no_grad():
                ref = model(**batch).logits
            mods = select_modules(model, adapter, LANGUAGE)
            details = prune_linears(model, mods, method, 0.5, pattern, loop)
            for name, d in details.items():
                assert d["sparsity"] == pytest.approx(0.5, abs=0.02), (method, pattern, name)
                assert d.get("nm_valid", True), (method, pattern, name)
            with torch.no_grad():
                out = model(**batch).logits
            assert torch.isfinite(out).all()
            errors[method, pattern] = float((out - ref).norm() / ref.norm())
    for pattern in ("unstructured", "2:4"):  # the calibrated methods beat magnitude at equal sparsity
        assert errors["sparsegpt", pattern] < errors["magnitude", pattern], (family, errors)


def test_calibrated_methods_need_data_and_n_m_needs_divisible_inputs():
    model, adapter, _, _ = tiny_with_batch("llava")
    mods = select_modules(model, adapter, LANGUAGE)
    with pytest.raises(ConfigError, match="needs a 'calibration'"):
        prune_linears(model, mods, "wanda", 0.5, "unstructured", None)
    odd = {"odd": nn.Linear(6, 4)}
    with pytest.raises(ConfigError, match="divisible by 4"):
        prune_linears(nn.Sequential(), odd, "magnitude", 0.5, "2:4", None)


BASE = {"type": "prune", "targets": {"components": ["language"]}, "gate": {"min_retention": 0.5}}


@pytest.mark.parametrize(("stage", "calibration", "needle"), [
    ({"method": "magnitude"}, True, "needs 'sparsity'"),
    ({"method": "wanda", "pattern": "2:4", "sparsity": 0.3}, True, "prunes 0.5 of the weights"),
    ({"method": "l1_unstructured", "pattern": "2:4"}, True, "use method magnitude"),
    ({"method": "wanda", "sparsity": 0.5, "scope": "global"}, True, "l1_unstructured only"),
    ({"method": "magnitude", "sparsity": 0.5, "sparsegpt": {"damp": 0.1}}, True, "need method: sparsegpt"),
    ({"method": "wanda", "sparsity": 0.5}, False, "needs a 'calibration' section"),
    ({"method": "sparsegpt", "pattern": "3:4"}, True, "stages[0].pattern"),
])
def test_prune_recipe_errors(recipe_error, stage, calibration, needle):
    assert needle in recipe_error([{**BASE, **stage}], calibration)
