"""The bundled model's task and training script: deterministic, self-contained, image-dependent."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from compress.zoo import MODELS, build, shapes
from compress.zoo.train import TrainConfig, train


def test_task_is_a_pure_function_of_the_seed():
    a, b = shapes.sample(123), shapes.sample(123)
    assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer) == (b.question, b.answer)
    assert shapes.sample(124).image.tobytes() != a.image.tobytes()
    assert [shapes.sample(i).qtype for i in range(5)] == list(shapes.QUESTION_TYPES)


def test_reasoned_answers_end_with_the_short_answer():
    for seed in range(50):
        s = shapes.sample(seed)
        assert s.answer.endswith(f" ; {s.short_answer}")
        assert shapes.sample(seed, reasoned=False).answer == s.short_answer


def test_vocabulary_covers_every_answer():
    tok = build.build_tokenizer()
    for seed in range(300):
        s = shapes.sample(seed)
        ids = tok(f"{s.question} {s.answer}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (s.question, s.answer)


def test_training_is_deterministic():
    cfg = TrainConfig(steps=3, batch_size=4, hidden=32, layers=1, log_every=0)
    m1, _ = train(cfg)
    m2, _ = train(cfg)
    m3, _ = train(TrainConfig(steps=3, batch_size=4, hidden=32, layers=1, log_every=0, seed=1))
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_bundled_model_record():
    """The shipped weights come with the record of how they were trained and scored."""
    record = json.loads((MODELS["shapes-vqa"] / "training.json").read_text())
    assert record["heldout"]["overall"] >= 0.9
    assert record["heldout_blank_images"]["overall (final answer only)"] <= 0.45
    weights = load_file(MODELS["shapes-vqa"] / "model.safetensors")  # the record is of the weights shipped
    assert record["parameters"] == sum(t.numel() for t in weights.values())
