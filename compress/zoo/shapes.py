"""The synthetic visual question-answering task the bundled model is trained on.

Scenes are a 2x2 grid of cells; each cell is empty or holds one coloured shape drawn with some
jitter in size and position. Every question has a short answer that can only be read off the
image, and every scene/question is a pure function of a seed, so the task regenerates exactly.

The model answers in two parts: it first names the objects cell by cell, then gives the short
answer (`red circle top left , blue square bottom right ; red`). Reading the image and reasoning
over what was read are then learnt separately, which a model this small does in minutes on a CPU
(answering straight from the image tokens stalled near 50% after 20 minutes here).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
CELL = IMAGE_SIZE // 2
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: int  # index into POSITIONS


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str  # what the model is trained to say: description ; short answer
    qtype: str
    short_answer: str


def random_scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(1, 4)
    cells = rng.sample(range(4), n)
    return [Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), c) for c in sorted(cells)]


def render(scene: list[Obj], rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    for o in scene:
        # Mild jitter: enough that no two renderings match, little enough for a tiny model to learn.
        size = rng.randint(20, 24)
        x0 = (o.cell % 2) * CELL + (CELL - size) // 2 + rng.randint(-2, 2)
        y0 = (o.cell // 2) * CELL + (CELL - size) // 2 + rng.randint(-2, 2)
        box = (x0, y0, x0 + size, y0 + size)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return img


def _unique(scene: list[Obj], key: str) -> list[Obj]:
    values = [getattr(o, key) for o in scene]
    return [o for o in scene if values.count(getattr(o, key)) == 1]


def ask(scene: list[Obj], qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """One (question, answer) of the given type, or None when the scene cannot support it."""
    if qtype == "color":
        objs = _unique(scene, "shape")
        if not objs:
            return None
        o = rng.choice(objs)
        return f"what color is the {o.shape} ?", o.color
    if qtype == "shape":
        objs = _unique(scene, "color")
        if not objs:
            return None
        o = rng.choice(objs)
        return f"what shape is the {o.color} object ?", o.shape
    if qtype == "count":
        if rng.random() < 0.3:
            return "how many objects are there ?", NUMBERS[len(scene)]
        shape = rng.choice(SHAPES)
        return f"how many {shape}s are there ?", NUMBERS[sum(o.shape == shape for o in scene)]
    if qtype == "position":
        o = rng.choice(scene)
        return f"where is the {o.color} {o.shape} ?", POSITIONS[o.cell]
    if qtype == "exists":
        if rng.random() < 0.5:
            o = rng.choice(scene)
            return f"is there a {o.color} {o.shape} ?", "yes"
        present = {(o.color, o.shape) for o in scene}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = rng.choice(absent)
        return f"is there a {c} {s} ?", "no"
    raise ValueError(f"unknown question type {qtype!r}")


def describe(scene: list[Obj]) -> str:
    return " , ".join(f"{o.color} {o.shape} {POSITIONS[o.cell]}" for o in scene)


REASONED = True  # the bundled model's answer style (see the module docstring)


def sample(seed: int, reasoned: bool | None = None) -> Sample:
    """The sample for one seed; question types are balanced by seed."""
    reasoned = REASONED if reasoned is None else reasoned
    rng = random.Random(seed)
    qtype = QUESTION_TYPES[seed % len(QUESTION_TYPES)]
    while True:
        scene = random_scene(rng)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            answer = f"{describe(scene)} ; {qa[1]}" if reasoned else qa[1]
            return Sample(render(scene, rng), qa[0], answer, qtype, qa[1])


def samples(start: int, count: int, reasoned: bool | None = None) -> Iterator[Sample]:
    for seed in range(start, start + count):
        yield sample(seed, reasoned)


def vocabulary() -> list[str]:
    words = {"what", "color", "is", "the", "shape", "object", "how", "many", "objects", "are",
             "there", "where", "a", "?", "yes", "no", "answer", ":", ",", ";"}
    words |= set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBERS)
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


# Seed ranges: training never sees the held-out evaluation or calibration seeds.
TRAIN_SEEDS = (1_000_000, 1_000_000_000)
EVAL_SEEDS = (0, 500)
CALIB_SEEDS = (10_000, 256)
DISTILL_SEEDS = (20_000, 2048)
