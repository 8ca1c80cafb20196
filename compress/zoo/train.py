"""Train the bundled shapes-VQA LLaVA from scratch on CPU, deterministically.

    python -m compress.zoo.train --out compress/zoo/shapes_vqa

Every training sample is drawn fresh from the synthetic task (seeds disjoint from the held-out
evaluation and calibration seeds), so the model cannot memorise its evaluation set.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from compress.runtime.torch_runner import TorchRunner, position_ids
from compress.zoo import build, shapes

MAX_NEW_TOKENS = 24  # four objects described (19 tokens) + " ; " + a two-word answer


def prompt_for(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


def encode(processor, batch: list[shapes.Sample], with_answers: bool) -> dict:
    texts = [prompt_for(processor, s.question) for s in batch]
    if with_answers:
        texts = [f"{t} {s.answer} </s>" for t, s in zip(texts, batch, strict=True)]
    enc = processor(images=[s.image for s in batch], text=texts, padding=True, return_tensors="pt")
    if with_answers:
        labels = torch.full_like(enc["input_ids"], -100)
        for i, s in enumerate(batch):
            k = len(s.answer.split()) + 1  # answer words (one token each) plus </s>
            labels[i, -k:] = enc["input_ids"][i, -k:]
        enc["labels"] = labels
    return dict(enc)


def evaluate(model, processor, seeds: range, batch_size: int = 100, blank: bool = False,
             reasoned: bool | None = None) -> dict:
    runner = TorchRunner(model, processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id)
    hits: dict[str, list[int]] = defaultdict(list)
    for start in range(seeds.start, seeds.stop, batch_size):
        batch = list(shapes.samples(start, min(batch_size, seeds.stop - start), reasoned))
        if blank:
            batch = [shapes.Sample(shapes.render([], random.Random(0)), s.question, s.answer, s.qtype, s.short_answer)
                     for s in batch]
        outs = runner.generate(encode(processor, batch, with_answers=False), max_new_tokens=MAX_NEW_TOKENS)
        for s, toks in zip(batch, outs, strict=True):
            said = processor.tokenizer.decode(toks).strip()
            hits[s.qtype].append(int(said == s.answer))
            hits[f"{s.qtype} (final answer only)"].append(int(said.split(" ; ")[-1] == s.short_answer))
    per_type = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    full = [h for k, v in hits.items() if "(" not in k for h in v]
    final = [h for k, v in hits.items() if "(" in k for h in v]
    total = sum(full) / len(full)
    per_type["overall (final answer only)"] = sum(final) / len(final)
    return {"overall": total, **per_type}


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, hidden: int, layers: int,
          threads: int, reasoned: bool, vision_lr: float, answer_weight: float) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    processor = build.build_processor()
    model = LlavaForConditionalGeneration(build.build_config(processor.tokenizer, hidden, layers))
    # The CLIP tower diverges early at the rates the decoder wants, so it gets its own, lower one.
    vision = list(model.model.vision_tower.parameters())
    ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": vision, "lr": vision_lr}, {"params": rest, "lr": lr}],
                            weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed)
    semicolon = processor.tokenizer.convert_tokens_to_ids(";")
    lo, span = shapes.TRAIN_SEEDS
    t0 = time.time()
    eval_seeds = range(shapes.EVAL_SEEDS[0], shapes.EVAL_SEEDS[0] + 200)
    for step in range(steps):
        model.train()
        batch = [shapes.sample(rng.randrange(lo, lo + span), reasoned) for _ in range(batch_size)]
        enc = encode(processor, batch, with_answers=True)
        labels = enc.pop("labels")
        logits = model(**enc, position_ids=position_ids(enc["attention_mask"])).logits[:, :-1]
        target = labels[:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                      reduction="none")
        # Tokens after ";" are the actual answer: a few per sample against ~20 of description, so
        # they are up-weighted or the reasoning part learns far slower than the reading part.
        after = (enc["input_ids"][:, :-1] == semicolon).long().cumsum(-1).clamp(max=1)
        weight = (target != -100) * (1.0 + (answer_weight - 1.0) * after)
        loss = (per_token * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            msg = f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[-1]:.2e} t {time.time() - t0:.0f}s"
            if step % 500 == 0 or step == steps - 1:
                model.eval()
                msg += f" eval {json.dumps(evaluate(model, processor, eval_seeds, reasoned=reasoned))}"
            print(msg, flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    full = range(*[shapes.EVAL_SEEDS[0], sum(shapes.EVAL_SEEDS)])
    result = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "vision_lr": vision_lr,
        "answer_weight": answer_weight, "seed": seed, "hidden": hidden, "layers": layers,
        "threads": threads, "train_seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "reasoned": reasoned,
        "heldout": evaluate(model, processor, full, reasoned=reasoned),
        "heldout_blank_images": evaluate(model, processor, full, blank=True, reasoned=reasoned),
    }
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "shapes_vqa")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)  # 1e-3 and up stalls training (the CLIP tower first)
    ap.add_argument("--vision-lr", type=float, default=5e-4)
    ap.add_argument("--answer-weight", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--style", choices=["reasoned", "short"], default="reasoned" if shapes.REASONED else "short")
    args = ap.parse_args()
    print(json.dumps(train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.hidden,
                           args.layers, args.threads, args.style == "reasoned", args.vision_lr,
                           args.answer_weight), indent=2))


if __name__ == "__main__":
    main()
