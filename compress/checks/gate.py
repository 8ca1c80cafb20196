"""Turn a stage's metrics into check results and a verdict. Checks are data, not control flow."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compress.config import Gate


@dataclass(frozen=True)
class CheckResult:
    metric: str
    baseline: float
    value: float
    retention: float | None
    threshold: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def retention(value: float, baseline: float) -> float:
    """value / baseline; a baseline of 0 can only be 'retained' by another 0."""
    if baseline == 0:
        return 1.0 if value == 0 else float("inf")
    return value / baseline


def run_checks(gate: Gate, baseline: dict[str, float], current: dict[str, float]) -> list[CheckResult]:
    results = []
    if gate.min_retention is not None:
        m = gate.metric
        r = retention(current[m], baseline[m])
        results.append(CheckResult(m, baseline[m], current[m], r, gate.min_retention, r >= gate.min_retention))
    if gate.max_kl is not None:
        v = current["logit_kl"]
        results.append(CheckResult("logit_kl", baseline.get("logit_kl", 0.0), v, None, gate.max_kl,
                                   v <= gate.max_kl))
    return results
