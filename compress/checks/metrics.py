"""Metrics on plain tensors and strings, so each can be tested on known inputs."""

from __future__ import annotations

import re

import torch

_PUNCT = re.compile(r"[\s.!?,;:]+$")


def normalize(text: str) -> str:
    """Case, surrounding whitespace, inner runs of whitespace and trailing punctuation do not count."""
    return _PUNCT.sub("", " ".join(text.lower().split()))


def exact_match(predictions: list[str], references: list[str]) -> list[int]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [int(normalize(p) == normalize(r)) for p, r in zip(predictions, references, strict=True)]


def token_agreement(reference_top1: torch.Tensor, top1: torch.Tensor) -> float:
    """Share of teacher-forced positions where the top-1 token equals the baseline's."""
    if reference_top1.shape != top1.shape or reference_top1.numel() == 0:
        raise ValueError("token_agreement needs two equal, non-empty sets of positions")
    return float((reference_top1 == top1).float().mean())


def logit_kl(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over positions of KL(baseline || current), in nats."""
    if reference_logprobs.shape != logprobs.shape or reference_logprobs.numel() == 0:
        raise ValueError("logit_kl needs two equal, non-empty [positions, vocab] tensors")
    ref = reference_logprobs.float()
    kl = (ref.exp() * (ref - logprobs.float())).sum(-1)
    return float(kl.clamp(min=0).mean())
