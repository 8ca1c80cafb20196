"""Every registered family × every registered stage, each on the family's tiny model: half of the cells
(helpers.matrix_cells; test_matrix_b.py runs the other half, two files so two xdist workers share the matrix).

A cell either runs through the real pipeline (apply, gate, save) and the saved artifact is loaded back
and scored again by `vlm-compress eval`, or the family refuses the stage before anything is written,
naming both. A family or stage registered without a row in helpers.STAGES fails
`test_matrix_covers_the_registries`. The tiny models are random, so the gate (logit KL <= 1000) checks
nothing about accuracy; the exports' parity checks run as part of their stage.
"""

from __future__ import annotations

import pytest
from helpers import REFUSED, STAGES, matrix_cells, matrix_families, run_matrix_cell

from compress.arch import get_adapter
from compress.stages.catalog import stages

FAMILIES = matrix_families()


def test_matrix_covers_the_registries():
    assert set(stages()) <= set(STAGES), "a registered stage type has no row in the matrix"
    assert set(STAGES) == set(stages()), "a matrix row names no registered stage"
    assert set(REFUSED) <= set(FAMILIES)


@pytest.mark.parametrize(("family", "stage"), matrix_cells(1))
def test_every_family_takes_every_stage_or_refuses_it_up_front(family, stage, tiny_folder, tmp_path):
    run_matrix_cell(family, stage, tiny_folder(family), tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_runner_decodes_exactly_like_hf_generate(family):
    """The runner contract's explicit prefill + decode loop (what every backend follows) is greedy
    `generate`: Qwen2-VL's M-RoPE decode positions, PaliGemma's prefix-LM, Mllama's cached cross-attention."""
    import torch
    from PIL import Image

    from compress.runtime.torch_runner import TorchRunner
    from compress.zoo.tiny import tiny_model

    model, processor = tiny_model(family)
    adapter = get_adapter(family).bind(model)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    inputs = adapter.build_inputs(processor, images, ["what color?", "how many shapes are there?"]).inputs
    ours = TorchRunner.for_adapter(model, adapter, processor).generate(inputs, 6, ignore_eos=True)
    hf = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert ours == hf[:, inputs["input_ids"].shape[1]:].tolist()
