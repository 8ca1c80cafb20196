"""The shared greedy rule, and both runners on the bundled model at equal output lengths."""

from __future__ import annotations

from compress.arch import get_adapter
from compress.checkpoint import load_checkpoint
from compress.runtime.greedy import greedy
from compress.runtime.torch_runner import TorchRunner
from compress.zoo import MODELS, shapes


def test_greedy_stops_per_row_and_feeds_pad():
    script = iter([[7, 9], [2, 9], [5, 9], [5, 9]])  # row 0 emits eos (2) on the second step
    fed_log = []

    def step(fed):
        fed_log.append(fed)
        return next(script)

    out = greedy([1, 9], step, eos={2}, pad=0, max_new_tokens=5)
    assert out == [[1, 7], [9, 9, 9, 9, 9]]
    assert fed_log[2] == [0, 9]  # the stopped row is fed the pad token


def test_greedy_ignore_eos_gives_exact_lengths():
    out = greedy([2, 2], lambda fed: [2, 2], eos={2}, pad=0, max_new_tokens=4, ignore_eos=True)
    assert out == [[2, 2, 2, 2], [2, 2, 2, 2]]
    assert greedy([2, 3], lambda fed: [3, 3], eos={2}, pad=0, max_new_tokens=4) == [[], [3, 3, 3, 3]]


def test_torch_runner_answers_and_honours_ignore_eos():
    adapter = get_adapter("llava")
    model, processor = load_checkpoint(MODELS["shapes-vqa"], adapter)
    runner = TorchRunner.for_adapter(model, adapter, processor)
    batch = [shapes.sample(s) for s in range(4)]
    enc = adapter.build_inputs(processor, [s.image for s in batch], [s.question for s in batch]).inputs
    said = [processor.tokenizer.decode(t) for t in runner.generate(enc, 24)]
    assert said == [s.answer for s in batch]
    assert [len(t) for t in runner.generate(enc, 30, ignore_eos=True)] == [30] * 4
