"""Accuracy checks: metrics, the evaluator shared by every backend, and stage gates."""
