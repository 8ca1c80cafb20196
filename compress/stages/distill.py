"""`type: distill`: win back accuracy by training the current model to answer like a teacher.

Teacher: the run's source model (`baseline`) or a checkpoint folder. Loss: T^2 * KL(teacher || student)
of the softened next-token distributions on the answer positions (or, `loss.positions: text`, on every
prompt and answer token; image and padding tokens are always masked), plus optional cross-entropy on
the reference answer and hidden-state MSE. Data: the stage's own `data:` set, else the calibration
set's image + question + answer records (the teacher's own greedy answers where a record has none).
AdamW with warm-up and cosine decay; the vision tower, projector and embeddings are frozen by default.
Zeros that earlier pruning put in the weights stay zero: the masks are re-applied after every step and
checked at the end. After a `tokens` stage the teacher reads the processor's image tokens and the student
as many as its tower emits; the loss compares the same text positions of both.

Distillation runs on float or pruned weights, and after INT8 through a straight-through estimator on
the quantize stage's frozen scales (the int8 codes move, the grid does not). After NF4 it is refused
when the recipe loads: distil first, then quantize (NF4 needs no calibration).
"""

from __future__ import annotations

import copy
import math
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from compress.config import StageConfig, Strict
from compress.data.config import DataConfig
from compress.errors import ConfigError
from compress.quant import ste
from compress.registry import register_stage
from compress.stages.base import StageContext, StageResult

Frozen = Literal["vision", "projector", "embeddings", "lm_head"]


class LossConfig(Strict):
    kl: float = Field(1.0, ge=0.0, description="weight of T^2 * KL(teacher || student) on answer positions")
    ce: float = Field(0.0, ge=0.0, description="weight of cross-entropy on the reference answer tokens")
    hidden_mse: float = Field(0.0, ge=0.0, description="weight of MSE between the last hidden states")
    temperature: float = Field(2.0, gt=0.0, le=20.0, description="softening of both distributions")
    positions: Literal["answer", "text"] = Field(
        "answer", description="where the KL term applies: the answer tokens, or every text token of prompt and "
        "answer (image and padding masked; more signal per record when data is scarce)")


class DistillConfig(StageConfig):
    type: Literal["distill"]
    teacher: str = Field("baseline", min_length=1, description="baseline (the run's source model) or a model folder")
    steps: int = Field(200, ge=1, le=100_000, description="optimizer steps")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="AdamW peak learning rate, reached after a 10% warm-up")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after the warm-up: cosine decay to 0, "
                                                    "or constant")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    batch_size: int = Field(16, ge=1, le=1024, description="records per step")
    max_answer_tokens: int = Field(32, ge=1, le=512, description="answer tokens trained on per record")
    freeze: list[Frozen] = Field(default_factory=lambda: ["vision", "projector", "embeddings"],
                                 description="parts that are not trained")
    loss: LossConfig = Field(LossConfig(), description="what the student is trained on")
    data: DataConfig | None = Field(None, description="image + question (+ answer) records to train on "
                                    "(default: the calibration set)")

    # After INT8 it trains through the frozen int8 grid (compress.quant.ste); NF4 is refused: its 4-bit
    # codes have no straight-through form here, and quantizing after distilling loses nothing.
    accepts = frozenset({"float", "sparse", "fake_quant"})
    requirement = "float, pruned or INT8 weights (distil before an NF4 stage)"

    @property
    def needs_calibration(self) -> bool:
        return self.data is None

    def output_state(self, state: str) -> str:
        return state



def _trainable(model: torch.nn.Module, cfg: DistillConfig, ctx: StageContext) -> list[torch.nn.Parameter]:
    frozen: set[int] = set()
    for part in cfg.freeze:
        if part == "embeddings":
            mods = [ctx.adapter.component(model, "language").get_input_embeddings()]
        else:
            mods = [ctx.adapter.component(model, part)]
        frozen.update(id(p) for m in mods for p in m.parameters())
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen and p.is_floating_point())
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ConfigError("distill: everything is frozen; nothing to train")
    return params


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Zeros already in trainable Linear weights (from pruning), to keep them zero."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.weight.requires_grad:
            zero = m.weight.detach() == 0
            if zero.any():
                out[name] = zero
    return out


def _text_positions(inputs: dict[str, torch.Tensor], image_id: int) -> torch.Tensor:
    """Logits that predict a text token: real (unpadded) positions whose next token is not an image token."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    keep = torch.zeros_like(mask)
    keep[:, :-1] = mask[:, :-1] & mask[:, 1:] & (ids[:, 1:] != image_id)
    return keep


def _batches(records: list, cfg: DistillConfig, seed: int):
    rng = random.Random(seed)
    order: list = []
    while True:
        if not order:
            order = list(records)
            rng.shuffle(order)
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        yield batch


def _losses(student_out, teacher_out, kl_positions: tuple[torch.Tensor, torch.Tensor], answer_positions: torch.Tensor,
            labels: torch.Tensor, cfg: LossConfig) -> dict:
    """The loss terms; `kl_positions` is (student's, teacher's): the same tokens, in the same order, at
    different places where the student's prompts carry fewer image tokens."""
    s_pos, t_pos = kl_positions
    s, t = student_out.logits[s_pos].float(), teacher_out.logits[t_pos].float()
    temp = cfg.temperature
    kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                  reduction="batchmean") * temp**2
    out = {"kl": kl}
    if cfg.ce:
        out["ce"] = F.cross_entropy(student_out.logits[answer_positions].float(), labels)
    if cfg.hidden_mse:
        s_h, t_h = student_out.hidden_states[-1].float(), teacher_out.hidden_states[-1].float()
        if s_h.shape != t_h.shape:  # fewer image tokens: compare where both read the same text
            s_h, t_h = s_h[s_pos], t_h[t_pos]
        out["hidden_mse"] = F.mse_loss(s_h, t_h)
    return out


@torch.no_grad()
def _agreement(student, teacher, batches: list[Pair]) -> dict:
    kls, hits, n = [], 0, 0
    for b in batches:
        s, t = student(**b.inputs).logits[b.positions].float(), teacher(**b.t_inputs).logits[b.t_positions].float()
        kls.append(float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                  reduction="sum")))
        hits += int((s.argmax(-1) == t.argmax(-1)).sum())
        n += int(b.positions.sum())
    return {"kl": sum(kls) / max(n, 1), "top1_agreement": hits / max(n, 1)}


def _lr_factor(step: int, warm: int, steps: int, schedule: str) -> float:
    """Linear warm-up, then constant or a cosine to 0 (small data sets overfit at a constant rate)."""
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@dataclass
class Pair:
    """One batch as the student and as the teacher see it: the same records, the teacher's prompts with the
    processor's image tokens, the student's with as many as its tower emits (the same tensors where no
    `tokens` stage reduced them). Positions are the answer tokens' logits in each."""

    inputs: dict
    positions: torch.Tensor
    t_inputs: dict
    t_positions: torch.Tensor
    labels: torch.Tensor


def _encode(batch: list, teacher: torch.nn.Module, teacher_adapter: Any, cfg: DistillConfig,
            ctx: StageContext) -> Pair:
    """One batch, teacher-forcing each record's answer (the teacher's own greedy answer where a record has
    none)."""
    answers = [r.answer for r in batch]
    if any(a is None for a in answers):
        from compress.runtime.torch_runner import TorchRunner

        enc = teacher_adapter.build_inputs(ctx.processor, [r.image for r in batch], [r.prompt for r in batch])
        out = TorchRunner.for_adapter(teacher, teacher_adapter, ctx.processor).generate(enc.inputs,
                                                                                         cfg.max_answer_tokens)
        made = ctx.processor.tokenizer.batch_decode(out, skip_special_tokens=True)
        answers = [a if a is not None else m.strip() for a, m in zip(answers, made, strict=True)]
    enc = teacher_adapter.build_inputs(ctx.processor, [r.image for r in batch], [r.prompt for r in batch], answers,
                                       cfg.max_answer_tokens)
    labels = enc.inputs["input_ids"][:, 1:][enc.answer_positions[:, :-1]]
    if ctx.adapter.image_tokens == teacher_adapter.image_tokens:
        return Pair(enc.inputs, enc.answer_positions, enc.inputs, enc.answer_positions, labels)
    student = ctx.adapter.follow_tokens(ctx.processor, {**enc.inputs, _ANSWER: enc.answer_positions})
    positions = student.pop(_ANSWER)
    return Pair(student, positions, enc.inputs, enc.answer_positions, labels)


_ANSWER = "_answer_positions"  # carried through the placeholder cut beside the inputs


def _train(model: torch.nn.Module, teacher: torch.nn.Module, params: list, masks: dict[str, torch.Tensor],
           encode: Callable[[list], Pair], stream: Iterator[list],
           cfg: DistillConfig, ctx: StageContext) -> list[float]:
    """`cfg.steps` optimizer steps of the student against the teacher; pruned weights stay zero after every
    step. Returns the loss of each step."""
    hidden = cfg.loss.hidden_mse > 0
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warm, cfg.steps, cfg.schedule))
    linears = dict(model.named_modules())
    image_id = ctx.processor.tokenizer.convert_tokens_to_ids(ctx.adapter.image_fill_token or ctx.adapter.image_token)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="distill", leave=False)
    for step in bar:
        if step == cfg.steps // 2:
            ctx.fault_point()
        b = encode(next(stream))
        with torch.no_grad():
            t_out = teacher(**b.t_inputs, output_hidden_states=hidden)
        with torch.enable_grad():
            s_out = model(**b.inputs, output_hidden_states=hidden)
            kl_pos = ((b.positions, b.t_positions) if cfg.loss.positions == "answer"
                      else (_text_positions(b.inputs, image_id), _text_positions(b.t_inputs, image_id)))
            parts = _losses(s_out, t_out, kl_pos, b.positions, b.labels, cfg.loss)
            loss = sum(getattr(cfg.loss, k) * v for k, v in parts.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for name, mask in masks.items():
                linears[name].weight.masked_fill_(mask, 0.0)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    return losses


@register_stage(DistillConfig)
def apply(model: torch.nn.Module, cfg: DistillConfig, ctx: StageContext) -> StageResult:
    from compress.checkpoint import load_checkpoint

    if ctx.calibration is None or not len(ctx.calibration):
        raise ConfigError("distill needs records to train on: a 'calibration' section or the stage's 'data'")
    source = ctx.baseline_source if cfg.teacher == "baseline" else cfg.teacher
    teacher_adapter = copy.copy(ctx.adapter)  # bound to the teacher: its own image token count
    teacher, _ = load_checkpoint(source, teacher_adapter, ctx.dtype)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(ctx.seed)
    records = list(ctx.calibration.records)

    def encode(batch: list) -> Pair:
        return _encode(batch, teacher, teacher_adapter, cfg, ctx)

    held = [encode(records[i:i + cfg.batch_size]) for i in range(0, min(len(records), 4 * cfg.batch_size),
                                                                   cfg.batch_size)]
    model.eval()
    int8 = ste.wrap(model)  # INT8 layers train through their frozen grid
    params = _trainable(model, cfg, ctx)
    masks = _masks(model)
    before = _agreement(model, teacher, held)
    t0 = time.time()
    losses = _train(model, teacher, params, masks, encode, _batches(records, cfg, ctx.seed), cfg, ctx)
    wall = time.time() - t0
    model.requires_grad_(False)
    codes_changed = ste.unwrap(model, int8)
    linears = dict(model.named_modules())
    intact = all(bool((linears[n].weight[m] == 0).all()) for n, m in masks.items()) and all(
        bool((linears[n].weight_int8[w.zero] == 0).all()) for n, w in int8.items())
    if not intact:
        raise ConfigError("distill: a pruned weight became non-zero (masks not intact)")
    after = _agreement(model, teacher, held)
    return StageResult(model, {
        "teacher": cfg.teacher if cfg.teacher != "baseline" else f"baseline ({source})",
        "steps": cfg.steps,
        "trainable_parameters": sum(p.numel() for p in params),
        "frozen": cfg.freeze,
        "loss_first": round(losses[0], 6),
        "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 6),
        "teacher_kl_before": round(before["kl"], 6),
        "teacher_kl_after": round(after["kl"], 6),
        "teacher_top1_before": round(before["top1_agreement"], 6),
        "teacher_top1_after": round(after["top1_agreement"], 6),
        "masks_kept": len(masks),
        "int8_layers": len(int8),
        "int8_codes_changed": round(sum(codes_changed.values()) / len(codes_changed), 6) if int8 else None,
        "masks_intact": intact,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })

