"""One evaluator for every artifact: it only needs a runner with `generate` and `logits`.

The baseline pass also records a *reference* (teacher-forced top-1 tokens and log-probabilities
at the answer positions) so later stages can be compared to the original model token by token.
The reference is saved in the run folder, so a resumed run compares against the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from compress.checks import metrics as M
from compress.data import Dataset
from compress.errors import ConfigError


class Runner(Protocol):
    backend: str

    def generate(self, inputs: dict[str, Any], max_new_tokens: int) -> list[list[int]]: ...

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor: ...


@dataclass
class Reference:
    top1: torch.Tensor  # [positions]
    logprobs: torch.Tensor  # [positions, vocab]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"top1": self.top1.contiguous(), "logprobs": self.logprobs.contiguous()}


ANSWER_MARGIN = 4  # tokens past the longest reference answer that the default budget allows


@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_type: dict[str, float] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)
    reference: Reference | None = None
    # Answers that used the whole budget without their end token: cut, and scored as cut.
    truncated: int = 0
    budget: int = 0

    def record(self) -> dict[str, Any]:
        """What the manifest records of it."""
        return {"metrics": self.metrics, "per_type": self.per_type,
                "answers": {"budget": self.budget, "truncated": self.truncated}}

    def truncation_warning(self) -> str | None:
        if not self.truncated:
            return None
        return (f"{self.truncated} answers used all {self.budget} new tokens without their end token (cut; raise "
                "evaluation.max_new_tokens, or leave it unset to size it from the data)")


class Evaluator:
    def __init__(self, adapter, processor, data: Dataset, cfg) -> None:
        if any(r.answer is None for r in data.records):
            raise ConfigError(f"evaluation set {data.source} has records without a reference answer")
        self.adapter, self.processor, self.data, self.cfg = adapter, processor, data, cfg
        self.budget = cfg.max_new_tokens or self.longest_answer() + ANSWER_MARGIN

    def longest_answer(self) -> int:
        """The longest reference answer in tokens: what the default answer budget is sized by."""
        tok = self.processor.tokenizer
        return max((len(tok(r.answer, add_special_tokens=False)["input_ids"]) for r in self.data.records), default=1)

    def prompt_record(self) -> tuple[dict[str, str], str | None]:
        """Which prompt format the evaluation uses, with its first question formatted, and a warning when the
        format is a guess (no chat template, no recipe prompt, no family format)."""
        adapter, processor = self.adapter, self.processor
        source = ("recipe" if adapter.prompt_template is not None
                  else "chat template" if getattr(processor, "chat_template", None) else "adapter default")
        example = adapter.format_prompt(processor, self.data.records[0].prompt) if len(self.data) else ""
        if source == "adapter default" and adapter.native_prompt:
            source = "family format"
        warning = None
        if source == "adapter default":
            warning = (f"the processor has no chat template and the recipe sets no evaluation.prompt; prompts are "
                       f"built as {example!r}. Set evaluation.prompt (e.g. \"<image> question: {{question}} "
                       "answer:\") to the format the model was trained on")
        return {"source": source, "example": example}, warning

    def teacher_forced_inputs(self) -> list[dict[str, Any]]:
        """The inputs `evaluate` asks `runner.logits` for, batch by batch (a streamed walk carries them)."""
        return [self.adapter.build_inputs(self.processor, [r.image for r in batch], [r.prompt for r in batch],
                                          [r.answer for r in batch], self.budget).inputs
                for batch in self.data.batches(self.cfg.batch_size)]

    def _answer_logits(self, runner: Runner, batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.adapter.build_inputs(self.processor, [r.image for r in batch], [r.prompt for r in batch],
                                        [r.answer for r in batch], self.budget)
        logits = runner.logits(enc.inputs)[enc.answer_positions]
        return logits.argmax(-1), torch.log_softmax(logits.float(), -1)

    def answer_logits(self, runner: Runner, desc: str = "logits") -> Reference:
        """`runner`'s teacher-forced top-1 tokens and log-probabilities at the evaluation set's answer positions:
        what token agreement and KL compare. An export's parity compares its graphs with their PyTorch stage
        here, on the positions the gate scores, rather than on random inputs."""
        n_batches = -(-len(self.data) // self.cfg.batch_size)
        pairs = [self._answer_logits(runner, batch) for batch in
                 tqdm(self.data.batches(self.cfg.batch_size), total=n_batches, desc=desc, leave=False)]
        return Reference(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))

    def evaluate(self, runner: Runner, reference: Reference | None = None, desc: str = "eval") -> Evaluation:
        """Score `runner`; with no `reference` the result carries one (this is the baseline). Metrics the
        runner names in `not_computed` (generation on a streamed model that does not fit) are left out."""
        wanted = set(self.cfg.metrics) - set(getattr(runner, "not_computed", {}))
        tokenizer = self.processor.tokenizer
        extract = self.cfg.extract
        hits: list[int] = []
        raw_hits: list[int] = []
        by_type: dict[str, list[int]] = defaultdict(list)
        predictions: list[str] = []
        truncated = 0
        top1s, logps = [], []
        n_batches = -(-len(self.data) // self.cfg.batch_size)
        for batch in tqdm(self.data.batches(self.cfg.batch_size), total=n_batches, desc=desc, leave=False):
            images = [r.image for r in batch]
            questions = [r.prompt for r in batch]
            answers = [r.answer for r in batch]
            if "exact_match" in wanted:
                enc = self.adapter.build_inputs(self.processor, images, questions)
                out = runner.generate(enc.inputs, self.budget)
                truncated += sum(len(t) >= self.budget for t in out)
                preds = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
                raw = M.exact_match(preds, answers)
                batch_hits = (M.exact_match([extract(p) for p in preds], [extract(a) for a in answers])
                              if extract else raw)
                hits += batch_hits
                raw_hits += raw
                predictions += preds
                for r, h in zip(batch, batch_hits, strict=True):
                    by_type[str(r.meta.get("qtype", "all"))].append(h)
            if wanted & {"token_agreement", "logit_kl"} or reference is None:
                top1, logp = self._answer_logits(runner, batch)
                top1s.append(top1)
                logps.append(logp)
        result: dict[str, float] = {}
        if "exact_match" in wanted:
            result["exact_match"] = sum(hits) / len(hits)
            if extract:  # exact_match scores the extracted answers; the raw strings are reported beside it
                result["exact_match_raw"] = sum(raw_hits) / len(raw_hits)
        own = Reference(torch.cat(top1s), torch.cat(logps)) if top1s else None
        if reference is not None and own is not None:
            if "token_agreement" in wanted:
                result["token_agreement"] = M.token_agreement(reference.top1, own.top1)
            if "logit_kl" in wanted:
                result["logit_kl"] = M.logit_kl(reference.logprobs, own.logprobs)
        elif reference is None:
            result.update({k: v for k, v in (("token_agreement", 1.0), ("logit_kl", 0.0)) if k in wanted})
        per_type = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
        return Evaluation(result, per_type, predictions, own if reference is None else None, truncated, self.budget)
