"""Metrics on known inputs, gates as data, and the report's table and plot."""

from __future__ import annotations

import math

import pytest
import torch

from compress.checks import metrics as M
from compress.checks.gate import retention, run_checks
from compress.config import Gate
from compress.report import retention_plot, summary_rows


def test_normalize_and_exact_match():
    assert M.normalize("  Red  Circle. ") == "red circle"
    assert M.exact_match(["Red", "blue ?", "top left", "two"], ["red", "blue", "top  left", "three"]) == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        M.exact_match(["a", "b"], ["a"])


def test_token_agreement_known_values():
    ref = torch.tensor([1, 2, 3, 4])
    assert M.token_agreement(ref, torch.tensor([1, 2, 3, 4])) == 1.0
    assert M.token_agreement(ref, torch.tensor([1, 0, 3, 0])) == 0.5
    with pytest.raises(ValueError):
        M.token_agreement(ref, torch.tensor([1, 2]))


def test_logit_kl_known_values():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert M.logit_kl(p, p) == pytest.approx(0.0, abs=1e-7)
    q = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    # Row 1: KL([.5,.5] || [.9,.1]) = .5 ln(.5/.9) + .5 ln(.5/.1); row 2: 0.
    expected = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)) / 2
    assert M.logit_kl(p, q) == pytest.approx(expected, rel=1e-6)
    assert M.logit_kl(q, p) != pytest.approx(M.logit_kl(p, q))  # not symmetric


def test_retention_edge_cases():
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.0, 0.0) == 1.0
    assert retention(0.1, 0.0) == float("inf")


@pytest.mark.parametrize(
    ("gate", "current", "passed"),
    [
        (Gate(min_retention=0.98), {"exact_match": 0.89}, True),
        (Gate(min_retention=0.98), {"exact_match": 0.88}, False),
        (Gate(metric="token_agreement", min_retention=0.95), {"token_agreement": 0.96, "exact_match": 0}, True),
        (Gate(max_kl=0.05), {"logit_kl": 0.051, "exact_match": 0.9}, False),
        (Gate(min_retention=0.9, max_kl=0.1), {"exact_match": 0.9, "logit_kl": 0.2}, False),
        (Gate(min_retention=0.9, max_kl=0.1), {"exact_match": 0.9, "logit_kl": 0.05}, True),
    ],
)
def test_gates(gate, current, passed):
    baseline = {"exact_match": 0.9, "token_agreement": 1.0, "logit_kl": 0.0}
    results = run_checks(gate, baseline, current)
    assert all(c.passed for c in results) is passed
    for c in results:
        d = c.to_dict()
        assert set(d) == {"metric", "baseline", "value", "retention", "threshold", "passed"}
        if c.metric == "logit_kl":
            assert c.retention is None and c.threshold == gate.max_kl
        else:
            assert c.retention == pytest.approx(current[c.metric] / baseline[c.metric])


def test_gate_needs_a_threshold():
    with pytest.raises(ValueError, match="min_retention and/or max_kl"):
        Gate(on_fail="warn")


def _manifest():
    return {
        "recipe": {"name": "r"},
        "baseline": {"metrics": {"exact_match": 0.8, "logit_kl": 0.0}},
        "stages": [
            {"name": "a", "status": "completed", "metrics": {"exact_match": 0.8, "logit_kl": 0.01},
             "checks": [{"metric": "exact_match", "baseline": 0.8, "value": 0.8, "retention": 1.0,
                         "threshold": 0.9, "passed": True}]},
            {"name": "b", "status": "failed", "metrics": {"exact_match": 0.4, "logit_kl": 2.0},
             "checks": [{"metric": "exact_match", "baseline": 0.8, "value": 0.4, "retention": 0.5,
                         "threshold": 0.9, "passed": False}]},
        ],
    }


def test_summary_rows_and_plot():
    rows = summary_rows(_manifest())
    assert ("b", "failed", "exact_match", "0.4000", "0.5000", "NO") in rows
    assert ("a", "completed", "logit_kl", "0.0100", "–", "–") in rows
    png = retention_plot(_manifest())
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
