"""Every registered family × every registered stage, each on the family's tiny model: the other half of the
cells (helpers.matrix_cells; test_matrix_a.py runs the first half and checks the matrix covers the registries)."""

from __future__ import annotations

import pytest
from helpers import STAGES, matrix_cells, matrix_recipe, run_matrix_cell

from compress.cli import main


@pytest.mark.parametrize(("family", "stage"), matrix_cells(0))
def test_every_family_takes_every_stage_or_refuses_it_up_front(family, stage, tiny_folder, tmp_path):
    run_matrix_cell(family, stage, tiny_folder(family), tmp_path)


def test_a_refused_stage_exits_2_with_one_line(tiny_folder, tmp_path, capsys):
    recipe = matrix_recipe(tmp_path, tiny_folder("mllama"), STAGES["shrink"])
    capsys.readouterr()  # saving the tiny model (on first use) prints progress
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("[vlm-compress]"))
    assert len(err.splitlines()) == 1 and "cannot run on mllama (mllama) models: its cross-attention" in err
    assert not (tmp_path / "run").exists()


def test_zoo_tiny_writes_a_loadable_folder(tmp_path, capsys):
    """The folder `vlm-compress zoo tiny` writes is the tiny model itself: plain transformers loads the same
    weights, and its processor prepares the same inputs as the in-memory one."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from compress.arch import get_adapter
    from compress.zoo.tiny import tiny_model

    out = tmp_path / "gemma3"
    assert main(["zoo", "tiny", "gemma3", "--out", str(out)]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    want, processor = tiny_model("gemma3")
    assert model.config.model_type == "gemma3"
    got, expected = model.state_dict(), want.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    adapter = get_adapter("gemma3")
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    loaded = adapter.build_inputs(AutoProcessor.from_pretrained(out), [image], ["what color?"]).inputs
    built = adapter.build_inputs(processor, [image], ["what color?"]).inputs
    assert loaded.keys() == built.keys() and all(torch.equal(loaded[k], built[k]) for k in built)
    assert main(["zoo", "tiny", "gemma3", "--out", str(out)]) == 2  # never overwrites
    assert main(["zoo", "tiny", "bert", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()
    assert "not an empty folder" in capsys.readouterr().err
