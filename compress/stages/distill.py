"""`type: distill`: win back accuracy by training the current model to answer like a teacher.

Teacher: the run's source model (`baseline`) or a checkpoint folder. Loss on the answer positions only
(image, prompt and padding tokens masked): T^2 * KL(teacher || student) of the softened next-token
distributions, plus optional cross-entropy on the reference answer and hidden-state MSE. Data: the
calibration set's image + question + answer records (the teacher's own greedy answers where a record
has none). AdamW; the vision tower, projector and embeddings are frozen by default. Zeros that earlier
pruning put in the weights stay zero: the masks are re-applied after every step and checked at the end.

Distillation runs on float or pruned weights; after INT8 or NF4 it is refused when the recipe loads
(quantize after distilling: the quantize stage calibrates on the distilled weights).
"""

from __future__ import annotations

import random
import resource
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from compress.errors import ConfigError
from compress.registry import register_stage
from compress.stages.base import StageConfig, StageContext, StageResult, Strict

Frozen = Literal["vision", "projector", "embeddings", "lm_head"]


class LossConfig(Strict):
    kl: float = Field(1.0, ge=0.0, description="weight of T^2 * KL(teacher || student) on answer positions")
    ce: float = Field(0.0, ge=0.0, description="weight of cross-entropy on the reference answer tokens")
    hidden_mse: float = Field(0.0, ge=0.0, description="weight of MSE between the last hidden states")
    temperature: float = Field(2.0, gt=0.0, le=20.0, description="softening of both distributions")


class DistillConfig(StageConfig):
    type: Literal["distill"]
    teacher: str = Field("baseline", min_length=1, description="baseline (the run's source model) or a model folder")
    steps: int = Field(200, ge=1, le=100_000, description="optimizer steps")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="AdamW learning rate (constant after a 10% warm-up)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    batch_size: int = Field(16, ge=1, le=1024, description="records per step")
    max_answer_tokens: int = Field(32, ge=1, le=512, description="answer tokens trained on per record")
    freeze: list[Frozen] = Field(default_factory=lambda: ["vision", "projector", "embeddings"],
                                 description="parts that are not trained")
    loss: LossConfig = Field(LossConfig(), description="what the student is trained on")

    requirement = "float or pruned weights (distil before quantizing)"

    @property
    def needs_calibration(self) -> bool:
        return True

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


def _batches(records: list, cfg: DistillConfig, seed: int):
    rng = random.Random(seed)
    order: list = []
    while True:
        if not order:
            order = list(records)
            rng.shuffle(order)
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        yield batch


def _losses(student_out, teacher_out, positions: torch.Tensor, labels: torch.Tensor, cfg: LossConfig) -> dict:
    s, t = student_out.logits[positions].float(), teacher_out.logits[positions].float()
    temp = cfg.temperature
    kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                  reduction="batchmean") * temp**2
    out = {"kl": kl}
    if cfg.ce:
        out["ce"] = F.cross_entropy(s, labels)
    if cfg.hidden_mse:
        out["hidden_mse"] = F.mse_loss(student_out.hidden_states[-1].float(), teacher_out.hidden_states[-1].float())
    return out


@torch.no_grad()
def _agreement(student, teacher, batches: list[tuple[dict, torch.Tensor]]) -> dict:
    kls, hits, n = [], 0, 0
    for inputs, pos in batches:
        s, t = student(**inputs).logits[pos].float(), teacher(**inputs).logits[pos].float()
        kls.append(float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                  reduction="sum")))
        hits += int((s.argmax(-1) == t.argmax(-1)).sum())
        n += int(pos.sum())
    return {"kl": sum(kls) / max(n, 1), "top1_agreement": hits / max(n, 1)}


@register_stage(DistillConfig)
def apply(model: torch.nn.Module, cfg: DistillConfig, ctx: StageContext) -> StageResult:
    from compress.checkpoint import load_checkpoint

    if ctx.calibration is None or not len(ctx.calibration):
        raise ConfigError("distill needs a 'calibration' data section (image + question records)")
    source = ctx.baseline_source if cfg.teacher == "baseline" else cfg.teacher
    teacher, _ = load_checkpoint(source, ctx.adapter, ctx.dtype)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(ctx.seed)
    records = list(ctx.calibration.records)
    hidden = cfg.loss.hidden_mse > 0

    def encode(batch: list) -> tuple[dict, torch.Tensor, torch.Tensor]:
        answers = [r.answer for r in batch]
        if any(a is None for a in answers):  # the teacher's own greedy answers where a record has none
            from compress.runtime.torch_runner import TorchRunner

            enc = ctx.adapter.build_inputs(ctx.processor, [r.image for r in batch], [r.prompt for r in batch])
            out = TorchRunner.for_adapter(teacher, ctx.adapter, ctx.processor).generate(enc.inputs,
                                                                                        cfg.max_answer_tokens)
            made = ctx.processor.tokenizer.batch_decode(out, skip_special_tokens=True)
            answers = [a if a is not None else m.strip() for a, m in zip(answers, made, strict=True)]
        enc = ctx.adapter.build_inputs(ctx.processor, [r.image for r in batch], [r.prompt for r in batch], answers,
                                       cfg.max_answer_tokens)
        labels = enc.inputs["input_ids"][:, 1:][enc.answer_positions[:, :-1]]
        return enc.inputs, enc.answer_positions, labels

    held = [encode(records[i:i + cfg.batch_size])[:2] for i in range(0, min(len(records), 4 * cfg.batch_size),
                                                                       cfg.batch_size)]
    model.eval()
    params = _trainable(model, cfg, ctx)
    masks = _masks(model)
    before = _agreement(model, teacher, held)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    linears = dict(model.named_modules())
    t0, losses = time.time(), []
    bar = tqdm(range(cfg.steps), desc="distill", leave=False)
    stream = _batches(records, cfg, ctx.seed)
    for _ in bar:
        inputs, pos, labels = encode(next(stream))
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=hidden)
        with torch.enable_grad():
            s_out = model(**inputs, output_hidden_states=hidden)
            parts = _losses(s_out, t_out, pos, labels, cfg.loss)
            loss = sum(getattr(cfg.loss, k) * v for k, v in parts.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for name, mask in masks.items():
                linears[name].weight.masked_fill_(mask, 0.0)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    wall = time.time() - t0
    model.requires_grad_(False)
    intact = all(bool((linears[n].weight[m] == 0).all()) for n, m in masks.items())
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
        "masks_intact": intact,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
